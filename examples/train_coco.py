"""Train a detector on COCO-format data, evaluate it (COCO AP, PR curves, confusion matrix)
and export it to LiteRT (TFLite) with NMS inside.

Without arguments: ``shared/data/coco128`` (128 images, 80 classes) with 12 images held
out; EfficientDet-D0 at 512. For real COCO give the train and val JSONs and folders.

    python examples/train_coco.py
    python examples/train_coco.py --train-json instances_train2017.json --train-images train2017 \
        --val-json instances_val2017.json --val-images val2017 --epochs 300 --batch-size 64
    python examples/train_coco.py --model retinanet --image-size 640      # RetinaNet R50-FPN
    python examples/train_coco.py --epochs 1 --steps-per-epoch 2 --image-size 128 --no-export

Everything the script does is also ``kdet train|eval|export --config coco.yaml`` with the
settings dict below written as YAML.
"""
import argparse
import os

from kdet.training import train
from kdet.workflow.evaluation import evaluate
from kdet.workflow.exporting import export_model

HERE = os.path.dirname(os.path.abspath(__file__))
COCO128 = os.path.join(HERE, "..", "..", "shared", "data", "coco128")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-json",
                        default=os.path.join(COCO128, "annotations", "instances_train2017.json"))
    parser.add_argument("--train-images", default=os.path.join(COCO128, "train2017"))
    parser.add_argument("--val-json", default=None)
    parser.add_argument("--val-images", default=None)
    parser.add_argument("--model", default="efficientdet", choices=("efficientdet", "retinanet"))
    parser.add_argument("--phi", default="0")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/coco")
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args()

    settings = {
        "format": "coco", "train_data": args.train_json, "train_images": args.train_images,
        "model": args.model, "phi": args.phi, "image_size": args.image_size,
        "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch,
        "batch_size": args.batch_size, "output_dir": args.output_dir,
        "eval_every": 1 if args.epochs < 50 else 5,
    }
    if args.val_json:
        settings.update(val_data=args.val_json, val_images=args.val_images)
    else:
        settings["val_fraction"] = 0.1
        if args.epochs * (args.steps_per_epoch or 15) < 20000:
            settings["ema_momentum"] = 0.99  # 0.9998 needs a long run (Keras EMA has no warm-up)
    result = train(settings)
    model_path = result.best_checkpoint or result.last_checkpoint

    report = evaluate(dict(settings, model=model_path,
                           output_dir=os.path.join(args.output_dir, "eval")))
    print(f"COCO AP {report.results['AP']:.3f} (AP50 {report.results['AP50']:.3f}); plots in "
          f"{os.path.join(args.output_dir, 'eval')}")

    if not args.no_export:  # TensorFlow backend only
        path = export_model({"model": model_path, "quantization": "fp16",
                             "output": os.path.join(args.output_dir, "model_fp16.tflite")})
        print(f"LiteRT model: {path}")


if __name__ == "__main__":
    main()
