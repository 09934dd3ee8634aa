"""YOLO (ultralytics) txt reader and writer.

One ``.txt`` per image under ``labels/`` mirroring ``images/`` (the path's
last ``/images/`` becomes ``/labels/``), one object a line:

* ``class cx cy w h`` — box centre and size normalised by the image size;
* ``class x1 y1 x2 y2 ...`` — a polygon (segment), normalised; the box is its
  extent and, with ``include_masks=True``, the polygon is the mask;
* ``class cx cy w h px py [v] ...`` — pose rows when ``data.yaml`` has
  ``kpt_shape: [K, 2 or 3]`` (its ``flip_idx`` becomes ``keypoint_flip_map``).

A missing or empty label file is a negative image. ``data.yaml`` gives
``names`` (list or ``{id: name}``), ``path`` (root; relative to the yaml's
folder) and ``train``/``val``/``test`` (a folder, a ``.txt`` list of images or
a list of those). EXIF orientation is applied, as ultralytics does.

    >>> ds = YOLODataset("data.yaml", split="val")  # doctest: +SKIP
"""
import os
import shutil

import numpy as np

from kdet.data.coco import _segmentation_problem, segmentation_to_mask
from kdet.data.dataset import (DEFAULT_MAX_PIXELS, CHECK_IMAGES, DetectionDataset,
                               read_image_header)
from kdet.data.errors import ProblemLog, sanitize_boxes
from kdet.data.voc import IMAGE_EXTENSIONS


#: How far (a fraction of the image side) a box edge may lie past the border
#: before it counts as ``box_clipped``. Label writers (ultralytics, labelImg,
#: CVAT) print normalised values with 6 decimals, each off by up to 0.5e-6; an
#: edge ``c +- w / 2`` is then off by up to 0.75e-6 of the side (0.0005 px on
#: 640 px), so a clean label can reach that far past the border. Anything
#: beyond 1e-6 of the side is a real annotation fault.
ROUNDING_TOLERANCE = 1e-6


def image_to_label_path(image_path):
    """ultralytics' rule: last ``/images/`` -> ``/labels/``, extension -> ``.txt``."""
    a, b = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return os.path.splitext(b.join(image_path.rsplit(a, 1)))[0] + ".txt"


def load_data_yaml(path):
    """Read ``data.yaml``: returns the dict with ``names`` as a list and ``path`` absolute."""
    import yaml

    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: data.yaml not found") from None
    except (yaml.YAMLError, OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: malformed YAML ({e})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise ValueError(f"{path}: no 'names' entry")
    names = data["names"]
    if isinstance(names, dict):
        ids = list(names)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) \
                or sorted(ids) != list(range(len(ids))):
            raise ValueError(f"{path}: names ids must be 0..{len(ids) - 1}, got {ids}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not all(
            isinstance(n, (str, int, float)) and not isinstance(n, bool) for n in names):
        raise ValueError(f"{path}: 'names' must be a list of class names or a dict "
                         f"{{id: name}}, got {names!r}")
    nc = data.get("nc", len(names))
    if isinstance(nc, bool) or not isinstance(nc, int) or nc != len(names):
        raise ValueError(f"{path}: nc={nc!r} but {len(names)} names")
    data["names"] = [str(n) for n in names]
    root = data.get("path") or "."
    if not isinstance(root, str):
        raise ValueError(f"{path}: 'path' must be a folder name, got {root!r}")
    data["path"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), root))
    kpt_shape, flip_idx = data.get("kpt_shape"), data.get("flip_idx")
    if kpt_shape is not None:
        if not (isinstance(kpt_shape, list) and len(kpt_shape) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in kpt_shape)
                and kpt_shape[0] > 0 and kpt_shape[1] in (2, 3)):
            raise ValueError(f"{path}: kpt_shape must be [K, 2 or 3], got {kpt_shape!r}")
        if flip_idx is not None and not (
                isinstance(flip_idx, list)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in flip_idx)
                and sorted(flip_idx) == list(range(kpt_shape[0]))):
            raise ValueError(f"{path}: flip_idx must be a permutation of 0..{kpt_shape[0] - 1}, "
                             f"got {flip_idx!r}")
    return data


def _list_images(source, root):
    """Image paths of one split entry (folder, list file or list)."""
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in _list_images(s, root)]
    path = os.path.join(root, str(source))
    if os.path.isdir(path):
        out = []
        for dirpath, _, files in os.walk(path):
            out += [os.path.join(dirpath, f) for f in files if f.endswith(IMAGE_EXTENSIONS)]
        return sorted(out)
    if os.path.isfile(path) and path.endswith(".txt"):
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
        base = os.path.dirname(path)
        return [os.path.normpath(os.path.join(base, p)) for p in lines]
    raise ValueError(f"{path}: image folder or list not found")


class YOLODataset(DetectionDataset):
    """ultralytics YOLO txt labels.

    Args:
        data_yaml: a ``data.yaml``; with it, ``split`` picks ``train``/``val``/``test``.
        images_dir, labels_dir: instead of a yaml: the folders (then
            ``class_names`` is required). ``labels_dir`` defaults to the
            ``images`` -> ``labels`` rule.
        class_names: names of class ids ``0..C-1`` (overrides the yaml's).
        include_masks: rasterise polygon rows into masks.
        on_error, check_images, max_pixels: see :class:`kdet.data.COCODataset`.
        apply_exif: rotate by the EXIF orientation (ultralytics does).
    """

    def __init__(self, data_yaml=None, split="train", *, images_dir=None, labels_dir=None,
                 class_names=None, include_masks=False, on_error="raise",
                 check_images="header", max_pixels=DEFAULT_MAX_PIXELS, apply_exif=True):
        if check_images not in CHECK_IMAGES:
            raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
        log = ProblemLog(on_error)
        kpt_shape, flip_idx = None, None
        if data_yaml is not None:
            data = load_data_yaml(data_yaml)
            if not data.get(split):
                raise ValueError(f"{data_yaml}: no {split!r} entry")
            try:
                images = _list_images(data[split], data["path"])
            except ValueError as e:
                raise ValueError(f"{data_yaml}: {split!r} entry: {e}") from None
            class_names = class_names or data["names"]
            kpt_shape, flip_idx = data.get("kpt_shape"), data.get("flip_idx")
            source = str(data_yaml)
        else:
            if images_dir is None or class_names is None:
                raise ValueError("give data_yaml, or images_dir and class_names")
            images = _list_images(str(images_dir), ".")
            source = str(images_dir)
        num_kp, kp_dims = (int(kpt_shape[0]), int(kpt_shape[1])) if kpt_shape else (0, 0)

        records = []
        for image_id, file_name in enumerate(images):
            if labels_dir is not None:
                stem = os.path.splitext(os.path.basename(file_name))[0]
                label_file = os.path.join(str(labels_dir), stem + ".txt")
            else:
                label_file = image_to_label_path(file_name)
            header = read_image_header(file_name, apply_exif=apply_exif, max_pixels=max_pixels,
                                       check=check_images,
                                       log=log, where=file_name)
            if header is None:
                continue
            height, width, orientation, _ = header
            record = _parse_label_file(label_file, height, width, len(class_names), num_kp,
                                       kp_dims, include_masks, log)
            if record is None:
                continue
            record.update(image_id=image_id, file_name=file_name, original_size=(height, width),
                          orientation=orientation)
            records.append(record)
        log.summarize(source)
        names = [f"kp{i}" for i in range(num_kp)] if num_kp else None
        super().__init__(records, class_names, keypoint_names=names,
                         keypoint_flip_map=flip_idx if num_kp else None,
                         problems=log.counts, source=source, on_error=on_error)
        self.has_masks = bool(include_masks)

    def load_masks(self, index):
        if not self.has_masks:
            raise ValueError("YOLODataset was built with include_masks=False")
        record = self.records[index]
        height, width = (int(v) for v in record["original_size"])
        masks = np.zeros((len(record["polygons"]), height, width), np.uint8)
        for i, polygon in enumerate(record["polygons"]):
            masks[i] = segmentation_to_mask([polygon], height, width)
        return masks


def _parse_label_file(path, height, width, num_classes, num_kp, kp_dims, include_masks, log):
    """Objects of one label file (a record without image fields) or ``None``."""
    lines = []
    if os.path.isfile(path):
        try:
            with open(path) as f:
                lines = [line.split() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            log.error("malformed_annotation", path, f"unreadable label file ({e})")
            return None
    boxes, labels, polygons, keypoints, rows = [], [], [], [], []
    scale = np.array([width, height], np.float64)
    for n, tokens in enumerate(lines, 1):
        if not tokens:
            continue
        where = f"{path}: line {n}"
        try:
            values = np.array([float(t) for t in tokens], np.float64)
        except ValueError:
            log.error("malformed_annotation", where, f"non-numeric values {tokens}")
            continue
        cls = values[0]
        if not 0 <= cls < num_classes or cls != np.floor(cls):  # NaN fails the first test
            log.error("unknown_class", where, f"class {tokens[0]} outside 0..{num_classes - 1}")
            continue
        rest = values[1:]
        polygon, kp = None, None
        if num_kp and len(rest) == 4 + num_kp * kp_dims:
            kp = rest[4:].reshape(num_kp, kp_dims)
            rest = rest[:4]
            if not np.isfinite(kp).all():
                log.error("bad_keypoints", where, f"keypoints {tokens[5:]} are not all finite")
                continue
        if len(rest) == 4:
            cx, cy, w, h = rest
            box = [(cx - w / 2) * width, (cy - h / 2) * height,
                   (cx + w / 2) * width, (cy + h / 2) * height]
        elif len(rest) >= 6 and len(rest) % 2 == 0:
            polygon = rest.reshape(-1, 2) * scale
            box = [*polygon.min(0), *polygon.max(0)]
        else:
            log.error("malformed_annotation", where, f"{len(tokens)} values: expected 5 "
                      "(box), 1 + 2k (polygon) or a pose row of the yaml's kpt_shape")
            continue
        if include_masks and polygon is None:
            log.error("bad_mask", where, "include_masks=True but the row is a box, not a polygon")
            continue
        if include_masks:  # e.g. coordinates far outside would crash pycocotools
            problem = _segmentation_problem([polygon.reshape(-1).tolist()], height, width)
            if problem:
                log.error("bad_mask", where, problem)
                continue
        if num_kp:
            if kp is None:
                kp = np.zeros((num_kp, 3))
            else:
                vis = kp[:, 2] if kp_dims == 3 else np.full(num_kp, 2.0)
                kp = np.concatenate([kp[:, :2] * scale, vis[:, None]], 1)
                kp[kp[:, 2] == 0, :2] = 0
            keypoints.append(kp)
        boxes.append(box)
        labels.append(int(cls))
        polygons.append(None if polygon is None else polygon.reshape(-1).tolist())
        rows.append(n)
    boxes, keep = sanitize_boxes(np.asarray(boxes).reshape(-1, 4), height, width, log,
                                 lambda i: f"{path}: line {rows[i]}",
                                 tolerance=ROUNDING_TOLERANCE * np.array([width, height] * 2))
    record = {"boxes": boxes[keep], "labels": np.asarray(labels, np.int32)[keep]}
    if num_kp:
        record["keypoints"] = np.asarray(keypoints, np.float32).reshape(-1, num_kp, 3)[keep]
    if include_masks:
        record["polygons"] = [p for p, k in zip(polygons, keep) if k]
    return record


def write_yolo(dataset, root, split="train", copy_images=True):
    """Write a kdet dataset in YOLO layout: images, labels and ``data.yaml``.

    ``root/images/<split>/``, ``root/labels/<split>/``, ``root/data.yaml``.
    Crowd objects are left out (YOLO has no crowd flag). Images are copied
    as they are, unless the file's EXIF orientation would be applied by the
    YOLO reader but was not by ``dataset`` (or the image is in memory); those
    are written as PNG from the decoded pixels. Returns the yaml path.

        >>> from kdet.data.shapes import ShapesDataset
        >>> path = write_yolo(ShapesDataset(4, seed=0), "/tmp/shapes_yolo")  # doctest: +SKIP
        >>> len(YOLODataset(path))  # doctest: +SKIP
        4
    """
    import yaml
    from PIL import Image

    root = str(root)
    image_dir = os.path.join(root, "images", split)
    label_dir = os.path.join(root, "labels", split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    for index, record in enumerate(dataset.records):
        height, width = (float(v) for v in record["original_size"])
        source = record.get("file_name")
        if source and copy_images and _orientation_matches(source, record["orientation"]):
            stem, ext = os.path.splitext(os.path.basename(source))
            name = f"{record['image_id']}_{stem}{ext}"
            shutil.copyfile(source, os.path.join(image_dir, name))
        else:
            name = f"{record['image_id']}.png"
            Image.fromarray(dataset.load_image(index)).save(os.path.join(image_dir, name))
        lines = []
        for box, label, crowd in zip(record["boxes"], record["labels"], record["iscrowd"]):
            if crowd:
                continue
            x1, y1, x2, y2 = box.astype(np.float64)
            values = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height,
                      (x2 - x1) / width, (y2 - y1) / height]
            lines.append(f"{int(label)} " + " ".join(f"{v:.10g}" for v in values))
        with open(os.path.join(label_dir, os.path.splitext(name)[0] + ".txt"), "w") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
    yaml_path = os.path.join(root, "data.yaml")
    data = {}
    if os.path.isfile(yaml_path):
        with open(yaml_path) as f:
            data = yaml.safe_load(f) or {}
    data.update(path=".", names=list(dataset.class_names), nc=dataset.num_classes)
    data[split] = f"images/{split}"
    with open(yaml_path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return yaml_path


def _orientation_matches(path, orientation):
    """True when the YOLO reader (EXIF applied) sees the file as ``dataset`` did."""
    from PIL import Image

    with Image.open(path) as im:
        tag = int(im.getexif().get(0x0112, 1) or 1)
    return (tag if tag in range(2, 9) else 1) == orientation
