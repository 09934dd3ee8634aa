"""COCO JSON reader (instances and person keypoints).

Boxes: COCO ``[x, y, w, h]`` (0-based continuous pixels) become xyxy
``[x, y, x + w, y + h]``. Categories (COCO ids 1..90, with gaps) map to
contiguous labels ``0..C-1`` in id order over all categories of the file;
``label_to_category_id`` maps back. Crowd annotations stay, with
``iscrowd=1`` (the pipeline drops them for training, the evaluator ignores
them). Masks: polygons and RLE (crowd) through ``pycocotools.mask``, decoded
lazily per image. Keypoints: ``[N, K, 3]`` (x, y, v) as stored (COCO integer
pixel coordinates, torchvision convention, no +0.5 shift).

EXIF orientation is *not* applied: COCO annotations and the ``width``/
``height`` of the JSON refer to the pixels as stored.

    >>> ds = COCODataset("coco128/annotations/instances_train2017.json",
    ...                  "coco128/train2017", include_masks=True)  # doctest: +SKIP
    >>> ds[0]["masks"].shape  # doctest: +SKIP
    (8, 480, 640)
"""
import collections
import json
import os

import numpy as np

from kdet.data.dataset import (DEFAULT_MAX_PIXELS, CHECK_IMAGES, DetectionDataset,
                               read_image_header)
from kdet.data.errors import ProblemLog, sanitize_boxes


def segmentation_to_mask(segmentation, height, width):
    """Decode a COCO segmentation (polygons, RLE or compressed RLE) to uint8 ``[H, W]``."""
    from pycocotools import mask as mask_utils

    problem = _segmentation_problem(segmentation, height, width)
    if problem:  # pycocotools would crash the process on some of these
        raise ValueError(problem)
    if isinstance(segmentation, list):  # polygons: list of flat [x1, y1, x2, y2, ...]
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            raise ValueError("no polygon with 3 or more points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    if tuple(rle["size"]) != (height, width):
        raise ValueError(f"RLE size {rle['size']} differs from the image {height}x{width}")
    return mask_utils.decode(rle)


class COCODataset(DetectionDataset):
    """COCO instances / keypoints JSON with an image folder.

    Args:
        annotation_file: path of the COCO JSON.
        image_dir: folder the ``file_name`` entries are relative to.
        on_error: ``"raise"`` or ``"skip"`` (see :mod:`kdet.data.errors`).
        include_masks: decode ``segmentation`` into ``masks``.
        include_keypoints: read ``keypoints`` (``[N, K, 3]``); K comes from
            the categories' ``keypoints`` names.
        check_images: ``"header"`` (open each image header: missing, corrupt,
            size; ~1-2 ms an image, minutes for all of COCO train2017),
            ``"full"`` (decode every image) or ``"none"`` (trust the JSON).
        max_pixels: images with more pixels are bad input.
        category_ids: keep only these categories (labels follow their order);
            default all categories of the file, sorted by id.

    Attributes:
        label_to_category_id, category_id_to_label: label <-> COCO id maps.
    """

    has_masks = False

    def __init__(self, annotation_file, image_dir, on_error="raise", include_masks=False,
                 include_keypoints=False, check_images="header",
                 max_pixels=DEFAULT_MAX_PIXELS, category_ids=None):
        if check_images not in CHECK_IMAGES:
            raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
        log = ProblemLog(on_error)
        self.annotation_file = str(annotation_file)
        self.image_dir = str(image_dir)
        data = _load_json(self.annotation_file)
        name = os.path.basename(self.annotation_file)

        categories = sorted(_categories(data, self.annotation_file), key=lambda c: c["id"])
        if category_ids is not None:
            by_id = {c["id"]: c for c in categories}
            missing = [c for c in category_ids if c not in by_id]
            if missing:
                raise ValueError(f"{self.annotation_file}: category ids {missing} not in the file")
            categories = [by_id[c] for c in category_ids]
        if not categories:
            raise ValueError(f"{self.annotation_file}: no categories")
        label_of = {c["id"]: i for i, c in enumerate(categories)}
        keypoint_names = next((c["keypoints"] for c in categories if c.get("keypoints")), None)
        skeleton = next((c["skeleton"] for c in categories if c.get("skeleton")), None)
        if include_keypoints and not keypoint_names:
            raise ValueError(f"{self.annotation_file}: include_keypoints=True but no category "
                             "lists 'keypoints' names")
        num_kp = len(keypoint_names) if include_keypoints else 0

        annotations = data.get("annotations", [])
        if not isinstance(annotations, list):
            raise ValueError(f"{self.annotation_file}: 'annotations' must be a list, got "
                             f"{type(annotations).__name__}")
        anns_by_image = collections.defaultdict(list)  # image id -> [(file index, annotation)]
        ann_ids = set()
        for k, ann in enumerate(annotations):
            at = f"{name}: annotations[{k}]"
            image_id = _integer(ann.get("image_id")) if isinstance(ann, dict) else None
            if image_id is None:
                log.error("malformed_annotation", at, "not an object with an integer image_id")
                continue
            if "id" in ann:  # pycocotools indexes annotations by id: one id, one annotation
                ann_id = _integer(ann["id"])
                if ann_id is None or ann_id in ann_ids:
                    log.error("malformed_annotation", f"{at} (id {ann['id']!r})",
                              "annotation id is not an int64 integer" if ann_id is None else
                              "annotation id listed twice")
                    continue
                ann_ids.add(ann_id)
            anns_by_image[image_id].append((k, ann))

        records, seen = [], set()
        for k, image in enumerate(data.get("images", [])):
            where = f"{name}: images[{k}]"
            entry = image if isinstance(image, dict) else {}
            image_id = _integer(entry.get("id"))
            height, width = _integer(entry.get("height")), _integer(entry.get("width"))
            file_name = entry.get("file_name")
            if (image_id is None or height is None or width is None or height <= 0
                    or width <= 0 or not isinstance(file_name, str) or not file_name):
                shown = {key: entry.get(key) for key in ("id", "file_name", "height", "width")}
                log.error("malformed_annotation", where, "image entry needs an integer id, a "
                          f"file_name and positive integer height/width, got {shown}"
                          if entry else f"not an image object: {image!r}")
                seen.add(image_id)  # its annotations go with it, not reported as orphans
                continue
            where = f"{name}: image id {image_id} ({file_name})"
            file_name = os.path.join(self.image_dir, file_name)
            if image_id in seen:
                log.error("duplicate_image_id", where, "image id listed twice")
                continue
            seen.add(image_id)
            if check_images != "none":
                header = read_image_header(file_name, apply_exif=False, max_pixels=max_pixels,
                                           check=check_images, log=log, where=where)
                if header is None:
                    continue
                if header[:2] != (height, width):
                    log.error("size_mismatch", where,
                              f"JSON says {width}x{height}, file is {header[1]}x{header[0]}")
                    continue
            elif height * width > max_pixels:
                log.error("image_too_large", where, f"{width}x{height} > max_pixels={max_pixels}")
                continue
            record = self._parse_annotations(anns_by_image.get(image_id, []), height, width,
                                             label_of, num_kp, include_masks, log, where)
            record.update(image_id=image_id, file_name=file_name,
                          original_size=(height, width))
            records.append(record)
        for image_id in sorted(set(anns_by_image) - seen):
            for k, ann in anns_by_image[image_id]:
                log.error("malformed_annotation",
                          f"{name}: annotations[{k}] (id {ann.get('id')!r})",
                          f"image_id {image_id} is not in 'images'")

        log.summarize(self.annotation_file)
        super().__init__(
            records, [c["name"] for c in categories],
            label_to_category_id={i: c["id"] for i, c in enumerate(categories)},
            keypoint_names=keypoint_names if include_keypoints else None,
            skeleton=skeleton if include_keypoints else None,
            problems=log.counts, source=self.annotation_file, on_error=on_error)
        self.has_masks = bool(include_masks)

    @staticmethod
    def _parse_annotations(anns, height, width, label_of, num_kp, include_masks, log, where):
        """Objects of one image from ``[(file index, annotation)]``; bad ones go to ``log``."""
        boxes, labels, crowd, area, ids, kps, segs, names = [], [], [], [], [], [], [], []
        for k, ann in anns:
            at = f"{where}, annotation id {ann.get('id')} (annotations[{k}])"
            bbox, category = ann.get("bbox"), ann.get("category_id")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
                log.error("malformed_annotation", at,
                          f"bbox {bbox!r} is not 4 numbers [x, y, w, h]")
                continue
            x, y, w, h = (float(v) for v in bbox)
            if not _is_number(category) or category not in label_of:
                log.error("unknown_class", at, f"category_id {category!r} is not in the "
                          "categories list")
                continue
            given_area = ann.get("area", np.nan)  # no 'area': the box's, below
            if "area" in ann and not (_is_number(given_area) and 0 <= given_area < float("inf")):
                log.error("malformed_annotation", at, f"area {given_area!r} is not a finite "
                          "non-negative number")
                continue
            is_crowd = ann.get("iscrowd", 0)
            if is_crowd not in (0, 1) or isinstance(is_crowd, str):
                log.error("malformed_annotation", at, f"iscrowd {is_crowd!r} is not 0 or 1")
                continue
            kp = None
            if num_kp:
                values = ann.get("keypoints") or [0] * (num_kp * 3)
                if not (isinstance(values, list) and len(values) == num_kp * 3
                        and all(_is_number(v) and abs(v) < float("inf") for v in values)):
                    log.error("bad_keypoints", at, "keypoints must be "
                              f"{num_kp} x 3 finite numbers, got {values!r}")
                    continue
                kp = np.asarray(values, np.float32).reshape(num_kp, 3)
            if include_masks:
                problem = _segmentation_problem(ann.get("segmentation"), height, width)
                if problem:
                    log.error("bad_mask", at, problem)
                    continue
                segs.append(ann["segmentation"])
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[category])
            crowd.append(int(is_crowd))
            area.append(float(given_area))
            ids.append(_integer(ann.get("id", -1)))
            kps.append(kp)
            names.append(at)
        boxes, keep = sanitize_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), height, width,
                                     log, lambda i: names[i])
        # no 'area': the box's (after clipping, so that it stays finite)
        area = np.asarray(area, np.float64).reshape(-1)
        area = np.where(np.isnan(area), (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
                        area)
        record = {"boxes": boxes[keep], "labels": np.asarray(labels, np.int32)[keep],
                  "iscrowd": np.asarray(crowd, np.int32)[keep],
                  "area": area.astype(np.float32)[keep],
                  "annotation_ids": np.asarray(ids, np.int64)[keep]}
        if num_kp:
            record["keypoints"] = np.asarray(kps, np.float32).reshape(-1, num_kp, 3)[keep]
        if include_masks:
            record["segmentation"] = [s for s, k in zip(segs, keep) if k]
        return record

    def load_masks(self, index):
        if not self.has_masks:
            raise ValueError("COCODataset was built with include_masks=False")
        record = self.records[index]
        height, width = (int(v) for v in record["original_size"])
        masks = np.zeros((len(record["segmentation"]), height, width), np.uint8)
        for i, seg in enumerate(record["segmentation"]):
            try:
                masks[i] = segmentation_to_mask(seg, height, width)
            except Exception as e:  # pycocotools raises bare Exceptions
                raise ValueError(f"{self.annotation_file}: image id {record['image_id']}, "
                                 f"annotation id {record['annotation_ids'][i]}: segmentation "
                                 f"does not decode ({e})") from e
        return masks


def _segmentation_problem(segmentation, height, width):
    """Why ``segmentation`` cannot be decoded, or ``None``.

    pycocotools' C code trusts its input: polygon coordinates past ~4e8 overflow
    an int and RLE counts that do not add up to ``height * width`` write past the
    mask; both crash the process. So everything is checked here first.
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list)]
        if len(polygons) != len(segmentation) or not any(len(p) >= 6 for p in polygons):
            return "segmentation is not a list of polygons with 3 or more points"
        # generous: a polygon may reach past the border, not millions of pixels past it
        limit = 4 * max(height, width) + 1000
        if any(len(p) % 2 or not all(_is_number(v) and abs(v) <= limit for v in p)
               for p in polygons):
            return ("polygon with an odd number of values, non-numbers, or coordinates "
                    f"beyond +-{limit} (4 x the image size + 1000)")
        return None
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if segmentation.get("size") != [height, width]:
            return f"RLE size {segmentation.get('size')} differs from the image {height}x{width}"
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = rle_string_counts(counts)
        elif not (isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool)
                                                   for c in counts)):
            counts = None
        if counts is None or min(counts, default=0) < 0 or sum(counts) != height * width:
            return (f"RLE counts do not decode to {height} x {width} = {height * width} pixels "
                    "(neither a COCO RLE string nor a list of run lengths adding up to that)")
        return None
    return f"no usable segmentation ({type(segmentation).__name__})"


def rle_string_counts(text):
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString), or ``None``."""
    counts, x, k = [], 0, 0
    for char in text:
        c = ord(char) - 48
        if not 0 <= c < 64:  # outside the alphabet: the C code reads garbage
            return None
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:  # more 5-bit groups follow
            continue
        if c & 0x10:  # sign bit of the last group
            x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
        x, k = 0, 0
    return None if k else counts  # k: the string ended inside a number


def _load_json(path):
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: annotation file not found") from None
    except (ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError, UnicodeDecodeError and integers of more digits
        # than int() parses; RecursionError: nesting deeper than the parser goes
        raise ValueError(f"{path}: malformed JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO annotation file (no 'images' list)")
    return data


def _is_number(value):
    """An int or float (JSON number; NaN and inf included), not a bool or a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value):
    """``value`` as an int when it is an integer number (``3`` or ``3.0``) that fits an
    int64 (ids become int64 arrays), else ``None``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63:
        return value
    return None


def _categories(data, path):
    """The ``categories`` list, checked: objects with an integer ``id`` and a ``name``."""
    categories = data.get("categories", [])
    if not isinstance(categories, list):
        raise ValueError(f"{path}: 'categories' must be a list, got {type(categories).__name__}")
    out = []
    for k, c in enumerate(categories):
        if not isinstance(c, dict) or _integer(c.get("id")) is None or "name" not in c:
            raise ValueError(f"{path}: categories[{k}]: a category needs an integer 'id' and a "
                             f"'name', got {c!r}")
        if any(o["id"] == c["id"] for o in out):
            raise ValueError(f"{path}: categories[{k}]: category id {c['id']} listed twice")
        out.append(dict(c, id=_integer(c["id"])))
    return out
