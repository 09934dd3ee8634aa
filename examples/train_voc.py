"""Train EfficientDet on a Pascal VOC-format dataset, evaluate it, draw a few predictions.

Any folder with ``Annotations/`` + ``JPEGImages/`` (a VOCdevkit year) or
``annotations/`` + ``images/`` (labelImg output) works. Without arguments it
trains on the 200-image raccoon set of ``shared/data`` with 10% held out.

    python examples/train_voc.py                                     # raccoon, EfficientDet-D0
    python examples/train_voc.py --data VOCdevkit/VOC2012 --train-split train --val-split val \
        --image-size 512 --epochs 50 --batch-size 16
    python examples/train_voc.py --epochs 1 --steps-per-epoch 2 --image-size 128   # smoke run

The same run from the shell: ``kdet train --format voc --train-data <root> --val-fraction 0.1
--phi 0 --image-size 384 --epochs 30``; rerunning the command after a crash resumes it.
"""
import argparse
import os

from kdet.training import train
from kdet.workflow.data import read_datasets
from kdet.workflow.evaluation import evaluate
from kdet.workflow.prediction import predict

HERE = os.path.dirname(os.path.abspath(__file__))
RACCOON = os.path.join(HERE, "..", "..", "shared", "data", "raccoon")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=RACCOON, help="VOC root (default: the raccoon set)")
    parser.add_argument("--train-split", default=None, help="ImageSets/Main split for training")
    parser.add_argument("--val-split", default=None,
                        help="ImageSets/Main split for validation (default: hold out 10%%)")
    parser.add_argument("--phi", default="0", help="EfficientDet variant (0..7, lite0..lite4)")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone-weights", default=None,
                        help="ImageNet EfficientNet .weights.h5 (recommended for small sets)")
    parser.add_argument("--output-dir", default="runs/voc")
    args = parser.parse_args()

    settings = {
        "format": "voc", "train_data": args.data, "train_split": args.train_split,
        "model": "efficientdet", "phi": args.phi, "image_size": args.image_size,
        "backbone_weights": args.backbone_weights,
        "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size, "output_dir": args.output_dir,
        # small data: milder scale jitter than automl's 0.1-2.0
        "scale_range": (0.5, 1.5),
        # EfficientDet's EMA momentum 0.9998 suits 100k+ steps; Keras' EMA has no warm-up,
        # so a short run would evaluate (almost) its initial weights
        "ema_momentum": 0.99,
    }
    if args.val_split:
        settings.update(val_data=args.data, val_split=args.val_split)
    else:
        settings["val_fraction"] = 0.1
    result = train(settings)

    model_path = result.best_checkpoint or result.last_checkpoint
    report = evaluate(dict(settings, model=model_path,
                           output_dir=os.path.join(args.output_dir, "eval")))
    print(f"validation AP {report.results['AP']:.3f}, AP50 {report.results['AP50']:.3f}")

    # draw the first validation images
    _, val = read_datasets(settings)
    images = [r["file_name"] for r in val.records[:8]]
    predict({"model": model_path, "inputs": images, "score_threshold": 0.3,
             "output_dir": os.path.join(args.output_dir, "predictions")})


if __name__ == "__main__":
    main()
