"""``kdet.training.train`` of the tiny detector with a validation set, in its own process:
one worker of a ``MultiWorkerMirroredStrategy`` run (``TF_CONFIG`` set by the caller) or,
with ``--strategy none``, one device.

tests/test_distribute.py starts two of these on localhost ports: the chief evaluates on
the shapes validation images at every epoch end, the other worker does not.

    python tests/distributed_train.py --strategy none --output-dir /tmp/one
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser()
parser.add_argument("--strategy", default="multiworker")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--output-dir", required=True)
args = parser.parse_args()


def main():
    from kdet.training import train

    import tiny_detector
    settings = {"format": "shapes", "num_images": 16, "val_num_images": 8,
                "image_size": tiny_detector.SIZE, "batch_size": 4, "epochs": args.epochs,
                "steps_per_epoch": args.steps, "learning_rate": 0.01, "ema": False, "augment": [],
                "tensorboard": False, "verbose": 2,
                "strategy": args.strategy, "output_dir": args.output_dir}
    # a factory: train() makes the strategy first (before any TF op) and builds the model
    # in its scope
    result = train(settings, model=tiny_detector.TinyDetector)
    print(json.dumps({"output_dir": result.output_dir, "epochs": result.history.epoch}))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
