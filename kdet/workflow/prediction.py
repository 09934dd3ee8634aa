"""Detect on image files and draw the results: what ``kdet predict`` runs.

For every input image (files, or every image in the given folders) it runs
``model.predict_images`` (any size in, boxes in the image's own pixels out),
draws the detections with ``score >= score_threshold`` with class names
(:func:`kdet.visualize.draw_detections`; masks and keypoints too when the
model predicts them) and writes ``<output_dir>/<name>.png`` plus all
detections in ``<output_dir>/predictions.json``.

Class names: ``class_names``, else the ``labels`` file, else the
``labels.txt`` that ``kdet train`` writes beside its checkpoints, else the
label numbers.
"""
import os

import numpy as np

from kdet.workflow.config import resolve

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def list_images(inputs):
    """Image paths from files and folders (folders: their images, sorted, not recursive)."""
    if not inputs:
        raise ValueError("kdet predict needs images: give files or folders")
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            if not found:
                raise ValueError(f"{item}: no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise ValueError(f"{item}: no such image file or folder")
    return paths


def read_image(path):
    """uint8 RGB ``[H, W, 3]`` with the EXIF orientation applied (as a phone shows it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error


def read_class_names(settings, num_classes=None):
    names = settings.get("class_names")
    path = settings.get("labels")
    model = settings.get("model")
    if names is None and path is None and isinstance(model, str):
        beside = os.path.join(os.path.dirname(os.path.abspath(model)), "labels.txt")
        path = beside if os.path.isfile(beside) else None
    if names is None and path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"--labels {path}: file not found")
        with open(path, encoding="utf-8") as f:
            names = [line.rstrip("\r\n") for line in f]
        while names and not names[-1].strip():
            names.pop()
    if names is not None and num_classes is not None and len(names) != int(num_classes):
        raise ValueError(f"{len(names)} class names for a model of {num_classes} classes")
    return names


def _output_name(path, used):
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = f"{stem}.png", 1
    while name in used:  # same stem in two folders
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name)
    return name


def masks_in_image(masks, scale, height, width):
    """Masks ``[N, S, S]`` of the resized-and-padded model input -> ``[N, height, width]``
    probabilities in the original image.

    The input holds the image resized by ``scale`` (a number, or ``(x_scale, y_scale)``)
    at the top left, ``round(height * y_scale) x round(width * x_scale)`` pixels (as
    :func:`kdet.models.detector.resize_and_pad` and the evaluation pipeline place it); that
    region is cut out and resized bilinearly to ``height x width``. Threshold at 0.5 for
    binary masks.

    >>> m = np.zeros((1, 8, 8), "float32"); m[0, :2, :4] = 1   # an 8 x 12 image at scale 0.5
    >>> (masks_in_image(m, 0.5, 8, 12)[0] > 0.5).sum(axis=1).tolist()  # its top-left 4 x 8
    [8, 8, 8, 8, 0, 0, 0, 0]
    """
    from PIL import Image

    masks = np.asarray(masks, np.float32)
    sx, sy = (float(scale), float(scale)) if np.ndim(scale) == 0 else (float(v) for v in scale)
    rows = min(masks.shape[1], max(1, int(round(height * sy))))
    cols = min(masks.shape[2], max(1, int(round(width * sx))))
    out = np.zeros((len(masks), int(height), int(width)), np.float32)
    for i, mask in enumerate(masks):
        region = Image.fromarray(np.ascontiguousarray(mask[:rows, :cols]), mode="F")
        out[i] = np.asarray(region.resize((int(width), int(height)), Image.BILINEAR))
    return out


def predict(config, *, model=None, config_path="config"):
    """Predict and draw as ``kdet predict`` does; returns the written PNG paths."""
    from tqdm.auto import tqdm

    from kdet import visualize
    from kdet.workflow.callbacks import write_json_atomic
    from kdet.workflow.models import load_model

    settings = resolve("predict", file_config=config, config_path=config_path)
    paths = list_images(settings["inputs"])
    if model is None:
        model = load_model(settings["model"])
    if not hasattr(model, "predict_images"):
        raise ValueError(f"{type(model).__name__} has no predict_images; kdet predict needs a "
                         "kdet detector")
    names = read_class_names(settings, getattr(model, "num_classes", None))
    out = settings["output_dir"]
    os.makedirs(out, exist_ok=True)
    threshold = float(settings["score_threshold"])
    batch = 8
    written, records, used = [], [], set()
    progress = tqdm(total=len(paths), desc="predict", unit="image",
                    disable=not settings["verbose"])
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        images = [read_image(p) for p in chunk]
        predictions = model.predict_images(images, batch_size=batch)
        for i, (path, image) in enumerate(zip(chunk, images)):
            found = visualize.select_detections(predictions, i, threshold)
            masks = found.get("masks") if settings["draw_masks"] else None
            if masks is not None:  # model-input space -> this image's pixels
                scale = predictions["scale"][i] if "scale" in predictions else \
                    min(np.asarray(masks).shape[1:]) / max(image.shape[:2])
                masks = masks_in_image(masks, scale, *image.shape[:2])
            keypoints = found.get("keypoints")
            drawn = visualize.draw_detections(
                image, found["boxes"], found["labels"], found["scores"], class_names=names,
                masks=masks, keypoints=keypoints,
                skeleton=visualize.skeleton_for(keypoints),
                keypoint_threshold=-np.inf)  # predicted: every keypoint of a drawn detection
            target = os.path.join(out, _output_name(path, used))
            visualize.save_image(drawn, target)
            written.append(target)
            detections = [
                {"box": [float(v) for v in box], "label": int(label),
                 "name": names[int(label)] if names else str(int(label)), "score": float(score)}
                for box, label, score in zip(found["boxes"], found["labels"], found["scores"])]
            if keypoints is not None:  # (x, y, score) per keypoint
                for detection, points in zip(detections, np.asarray(keypoints)):
                    detection["keypoints"] = [[float(v) for v in p] for p in points]
            records.append({"image": path, "output": target, "detections": detections})
            progress.update(1)
    progress.close()
    write_json_atomic(os.path.join(out, "predictions.json"),
                      {"score_threshold": threshold, "images": records})
    if settings["verbose"]:
        print(f"wrote {len(written)} images to {out}", flush=True)
    return written
