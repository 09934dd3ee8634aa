"""Pascal VOC XML reader.

Coordinate convention: VOC ``<bndbox>`` values are 1-based *inclusive* pixel
indices (the devkit's top-left pixel is (1, 1)). kdet boxes are 0-based
continuous coordinates, so a VOC box becomes

    x1 = xmin - 1,  y1 = ymin - 1,  x2 = xmax,  y2 = ymax

which keeps the devkit's width ``xmax - xmin + 1`` as ``x2 - x1``. The raw
devkit values come back as ``(x1 + 1, y1 + 1, x2, y2)``; the VOC evaluator
(``kdet.metrics.voc``) applies the devkit's +1 convention on raw coordinates.

Layouts: a VOCdevkit year folder (``Annotations/``, ``JPEGImages/``,
``ImageSets/Main/<split>.txt``) or any ``annotations/`` + ``images/`` pair
(e.g. the raccoon set), or explicit ``annotation_dir`` and ``image_dir``.
The image is found by the XML stem (``<filename>``/``<path>`` are often stale);
a ``<size>`` of 0x0 (labelImg does that) is read from the image file.

    >>> ds = VOCDataset("raccoon")  # doctest: +SKIP
    >>> ds.class_names  # doctest: +SKIP
    ('raccoon',)
"""
import os
import xml.etree.ElementTree as ET

import numpy as np

from kdet.data.dataset import (DEFAULT_MAX_PIXELS, CHECK_IMAGES, DetectionDataset,
                               read_image_header)
from kdet.data.errors import ProblemLog, sanitize_boxes

#: The 20 Pascal VOC classes in the devkit's order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp",
                    ".JPG", ".JPEG", ".PNG", ".BMP")


def parse_voc_xml(path):
    """Parse one VOC XML into a dict (raises ``ValueError`` naming the file).

    Returns ``{"filename", "width", "height", "objects": [{"name", "bbox"
    (raw xmin, ymin, xmax, ymax floats), "difficult", "truncated"}]}``.
    """
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"{path}: malformed XML ({e})") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <annotation>")

    def number(node, tag, default=None, kind=float, where=path):
        text = node.findtext(tag)
        if text is None or not text.strip():
            if default is None:
                raise ValueError(f"{where}: <{tag}> missing")
            return default
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{where}: <{tag}> is {text!r}, not a number") from None
        if kind is int:  # sizes and flags: int(inf) would raise OverflowError, 12.5 truncate
            if not value.is_integer():
                raise ValueError(f"{where}: <{tag}> is {text!r}, not an integer")
            return int(value)
        return value

    size = root.find("size")
    out = {"filename": (root.findtext("filename") or "").strip(),
           "width": number(size, "width", 0, int) if size is not None else 0,
           "height": number(size, "height", 0, int) if size is not None else 0,
           "objects": []}
    for k, obj in enumerate(root.findall("object")):
        where = f"{path}: object {k}"
        box = obj.find("bndbox")
        name = (obj.findtext("name") or "").strip()
        if box is None or not name:
            raise ValueError(f"{where} lacks <name> or <bndbox>")
        out["objects"].append({
            "name": name,
            "bbox": [number(box, t, where=where) for t in ("xmin", "ymin", "xmax", "ymax")],
            "difficult": number(obj, "difficult", 0, int, where),
            "truncated": number(obj, "truncated", 0, int, where)})
    return out


class VOCDataset(DetectionDataset):
    """Pascal VOC XML annotations with an image folder.

    Args:
        root: dataset folder (VOCdevkit year folder or ``annotations/`` +
            ``images/``); or give ``annotation_dir`` and ``image_dir``.
        split: with a devkit layout, read ``ImageSets/Main/<split>.txt``.
        class_names: the class list (labels follow its order); default: the
            sorted names found in the XMLs. Names outside a given list are
            ``unknown_class`` problems.
        include_difficult: keep ``difficult`` objects (flagged in
            ``"difficult"``); the VOC evaluator needs them.
        on_error, check_images, max_pixels: see :class:`kdet.data.COCODataset`.
        apply_exif: rotate images by their EXIF orientation (default False:
            devkit and labelImg annotations refer to the stored pixels).
    """

    def __init__(self, root=None, *, annotation_dir=None, image_dir=None, split=None,
                 class_names=None, include_difficult=True, on_error="raise",
                 check_images="header", max_pixels=DEFAULT_MAX_PIXELS, apply_exif=False):
        if check_images not in CHECK_IMAGES:
            raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
        annotation_dir, image_dir = _resolve_dirs(root, annotation_dir, image_dir)
        self.annotation_dir, self.image_dir = annotation_dir, image_dir
        log = ProblemLog(on_error)
        xml_files = _xml_files(root, annotation_dir, split)

        parsed = []
        for image_id, path in enumerate(xml_files):
            try:
                parsed.append((image_id, path, parse_voc_xml(path)))
            except ValueError as e:
                log.error("malformed_annotation", path, str(e).replace(f"{path}: ", ""))
        if class_names is None:
            class_names = sorted({o["name"] for _, _, p in parsed for o in p["objects"]})
        label_of = {name: i for i, name in enumerate(class_names)}

        records = []
        for image_id, path, ann in parsed:
            record = self._record(image_id, path, ann, label_of, include_difficult,
                                  image_dir, log, check_images, max_pixels, apply_exif)
            if record is not None:
                records.append(record)
        log.summarize(annotation_dir)
        super().__init__(records, class_names, problems=log.counts, source=annotation_dir,
                         on_error=on_error)

    @staticmethod
    def _record(image_id, path, ann, label_of, include_difficult, image_dir, log,
                check_images, max_pixels, apply_exif):
        stem = os.path.splitext(os.path.basename(path))[0]
        file_name = _find_image(image_dir, stem, ann["filename"])
        where = f"{path}"
        height, width, orientation = ann["height"], ann["width"], 1
        if file_name is None:
            log.error("missing_image", where, f"no image {stem}.* in {image_dir}")
            return None
        if check_images != "none" or not (height > 0 and width > 0):
            header = read_image_header(file_name, apply_exif=apply_exif, max_pixels=max_pixels,
                                       check=check_images,
                                       log=log, where=where)
            if header is None:
                return None
            if not (height > 0 and width > 0):
                log.fixed("size_from_image", where, f"<size> is {width}x{height}; using the "
                          f"image's {header[1]}x{header[0]}")
            elif (height, width) != header[:2]:
                log.error("size_mismatch", where, f"<size> says {width}x{height}, image "
                          f"{file_name} is {header[1]}x{header[0]}")
                return None
            height, width, orientation = header[0], header[1], header[2]
        elif height * width > max_pixels:
            log.error("image_too_large", where, f"{width}x{height} > max_pixels={max_pixels}")
            return None

        boxes, labels, difficult, truncated, names = [], [], [], [], []
        for k, obj in enumerate(ann["objects"]):
            if obj["name"] not in label_of:
                log.error("unknown_class", f"{where}: object {k}",
                          f"class {obj['name']!r} not in class_names")
                continue
            if obj["difficult"] and not include_difficult:
                continue
            xmin, ymin, xmax, ymax = obj["bbox"]
            boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])  # 1-based inclusive -> 0-based
            labels.append(label_of[obj["name"]])
            difficult.append(obj["difficult"])
            truncated.append(obj["truncated"])
            names.append(k)
        boxes, keep = sanitize_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), height, width,
                                     log, lambda i: f"{where}: object {names[i]}")
        return {"image_id": image_id, "file_name": file_name, "original_size": (height, width),
                "orientation": orientation, "boxes": boxes[keep],
                "labels": np.asarray(labels, np.int32)[keep],
                "iscrowd": np.zeros(int(keep.sum()), np.int32),
                "difficult": np.asarray(difficult, np.int32)[keep],
                "truncated": np.asarray(truncated, np.int32)[keep]}


def _resolve_dirs(root, annotation_dir, image_dir):
    if root is not None:
        root = str(root)
        for ann, img in (("Annotations", "JPEGImages"), ("annotations", "images")):
            if os.path.isdir(os.path.join(root, ann)):
                annotation_dir = annotation_dir or os.path.join(root, ann)
                image_dir = image_dir or os.path.join(root, img)
                break
        else:
            raise ValueError(f"{root}: no Annotations/ or annotations/ folder")
    if annotation_dir is None or image_dir is None:
        raise ValueError("give root, or both annotation_dir and image_dir")
    for d in (annotation_dir, image_dir):
        if not os.path.isdir(d):
            raise ValueError(f"{d}: folder not found")
    return str(annotation_dir), str(image_dir)


def _xml_files(root, annotation_dir, split):
    if split is None:
        return sorted(os.path.join(annotation_dir, f) for f in os.listdir(annotation_dir)
                      if f.lower().endswith(".xml"))
    list_file = os.path.join(str(root or os.path.dirname(annotation_dir)),
                             "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(list_file):
        raise ValueError(f"{list_file}: split list not found")
    with open(list_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    return [os.path.join(annotation_dir, f"{i}.xml") for i in ids]


def _find_image(image_dir, stem, xml_filename):
    candidates = [stem + ext for ext in IMAGE_EXTENSIONS]
    if xml_filename and os.path.splitext(os.path.basename(xml_filename))[0] == stem:
        candidates.insert(0, os.path.basename(xml_filename))
    for name in candidates:
        path = os.path.join(image_dir, name)
        if os.path.isfile(path):
            return path
    return None
