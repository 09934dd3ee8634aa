"""Throughput of a model on this machine: what ``kdet bench`` runs.

Times ``predict_on_batch`` (forward + decoding + NMS) and, unless
``bench_train`` is false, one optimizer step (``train_on_batch`` with the
model's own optimizer) on random images and targets (with box-filling masks
for Mask R-CNN and keypoints inside the boxes for Keypoint R-CNN), after ``warmup``
untimed batches (tracing/compilation), and reports images per second and
milliseconds per batch. The numbers describe this machine, backend and
``jit_compile`` setting only; compare models in one run.

``--compare effdet|torchvision`` measures kdet and the PyTorch peer side by
side instead (:mod:`kdet.workflow.peer_benchmark`), ``--model`` efficientdet,
retinanet, fasterrcnn or maskrcnn.
"""
import platform
import time

import numpy as np

from kdet.workflow.config import resolve


def _time(step, warmup, steps):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _random_batch(batch_size, image_size, num_classes, seed, max_boxes=8, annotations=(),
                  num_keypoints=17):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    xy = rng.uniform(0, image_size * 0.7, (batch_size, max_boxes, 2))
    wh = rng.uniform(image_size * 0.05, image_size * 0.3, (batch_size, max_boxes, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, image_size)], axis=-1).astype("float32")
    labels = rng.integers(0, num_classes, (batch_size, max_boxes)).astype("int32")
    labels[:, max_boxes // 2:] = -1  # padding rows, as real batches have
    targets = {"boxes": boxes, "labels": labels}
    if "masks" in annotations:  # each object's box filled
        grid = np.arange(image_size, dtype="float32") + 0.5
        inside_x = (grid >= boxes[..., 0:1]) & (grid < boxes[..., 2:3])  # [B, N, S]
        inside_y = (grid >= boxes[..., 1:2]) & (grid < boxes[..., 3:4])
        targets["masks"] = (inside_y[..., :, None] & inside_x[..., None, :]).astype("float32")
    if "keypoints" in annotations:  # visible points inside each box
        u = rng.uniform(0, 1, (batch_size, max_boxes, num_keypoints, 2))
        xy = boxes[..., None, :2] + u * (boxes[..., None, 2:] - boxes[..., None, :2])
        targets["keypoints"] = np.concatenate(
            [xy, np.full(xy.shape[:-1] + (1,), 2.0)], axis=-1).astype("float32")
    return images, targets


def benchmark(config, *, model=None, config_path="config"):
    """Measure as ``kdet bench`` does; returns a dict of the figures (also printed)."""
    import keras

    from kdet.workflow.config import MODEL_NAMES
    from kdet.workflow.models import (build_model, is_saved_model_file, load_model,
                                      make_optimizer, model_annotations, model_image_size,
                                      resolve_jit_compile)

    settings = resolve("bench", file_config=config, config_path=config_path)
    if settings["compare"] and model is None:
        from kdet.workflow.peer_benchmark import compare
        rows, table = compare(
            settings["model"], peer=settings["compare"], phi=settings["phi"],
            image_size=settings["image_size"],
            batches=[int(b) for b in settings["bench_batches"]],
            tasks=("predict", "train") if settings["bench_train"] else ("predict",),
            threads=settings["threads"], warmup=int(settings["warmup"]),
            repeats=int(settings["bench_steps"]), verbose=bool(settings["verbose"]))
        print(table, flush=True)
        return rows
    if model is None and settings["model"] in MODEL_NAMES:
        keras.utils.set_random_seed(int(settings["seed"]))
        # COCO's class count; Keypoint R-CNN's person only
        default_classes = 1 if settings["model"] == "keypointrcnn" else 90
        model = build_model(settings, settings["num_classes"] or default_classes,
                            settings["image_size"])
    elif model is None:  # a .keras file or a zoo name
        model = load_model(settings["model"], weights=settings["weights"])
    size = model_image_size(model)
    num_classes = int(getattr(model, "num_classes", settings["num_classes"] or 90))
    batch_size = int(settings["batch_size"])
    jit = resolve_jit_compile(settings["jit_compile"])
    images, targets = _random_batch(batch_size, size, num_classes, int(settings["seed"]),
                                    annotations=model_annotations(model),
                                    num_keypoints=getattr(model, "num_keypoints", None) or 17)
    warmup, steps = int(settings["warmup"]), int(settings["bench_steps"])
    if steps < 1 or warmup < 0:
        raise ValueError("bench_steps must be >= 1 and warmup >= 0")

    model.compile(optimizer=make_optimizer(model, {"ema": "auto"}, total_steps=10000),
                  jit_compile=jit)
    row = {"model": str(settings["model"]) if is_saved_model_file(settings["model"])
           else model.name, "backend": keras.backend.backend(),
           "device": _device(), "jit_compile": jit, "image_size": size,
           "batch_size": batch_size}
    predict_s = _time(lambda: model.predict_on_batch(images), warmup, steps)
    row.update(predict_ms_per_batch=1000 * predict_s, predict_images_per_s=batch_size / predict_s)
    if settings["bench_train"]:
        train_s = _time(lambda: model.train_on_batch(images, targets), warmup, steps)
        row.update(train_ms_per_batch=1000 * train_s, train_images_per_s=batch_size / train_s)
    print(format_table([row]), flush=True)
    return row


def _device():
    from kdet.workflow.models import accelerator_visible
    if accelerator_visible():
        import keras
        return ",".join(str(d) for d in keras.distribution.list_devices())
    return f"cpu ({platform.processor() or platform.machine()})"


def format_table(rows):
    """A plain-text table of benchmark rows."""
    columns = [("model", "model"), ("backend", "backend"), ("jit_compile", "jit"),
               ("image_size", "size"), ("batch_size", "batch"),
               ("predict_images_per_s", "predict img/s"), ("predict_ms_per_batch", "ms/batch"),
               ("train_images_per_s", "train img/s"), ("train_ms_per_batch", "ms/batch")]
    columns = [(k, t) for k, t in columns if any(k in r for r in rows)]

    def cell(row, key):
        value = row.get(key, "")
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    widths = [max(len(t), *(len(cell(r, k)) for r in rows)) for k, t in columns]
    lines = ["  ".join(t.rjust(w) for (_, t), w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(cell(r, k).rjust(w) for (k, _), w in zip(columns, widths)))
    if rows and "device" in rows[0]:
        lines.append(f"device: {rows[0]['device']}")
    return "\n".join(lines)
