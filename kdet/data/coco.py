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

        categories = sorted(data.get("categories", []), key=lambda c: c["id"])
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

        anns_by_image = collections.defaultdict(list)
        for k, ann in enumerate(data.get("annotations", [])):
            if not isinstance(ann, dict) or "image_id" not in ann:
                log.error("malformed_annotation", f"{name}: annotations[{k}]",
                          "annotation without image_id")
                continue
            anns_by_image[ann["image_id"]].append(ann)

        records, seen = [], set()
        for k, image in enumerate(data.get("images", [])):
            where = f"{name}: images[{k}]"
            try:
                image_id = int(image["id"])
                file_name = os.path.join(self.image_dir, image["file_name"])
                height, width = int(image["height"]), int(image["width"])
            except (KeyError, TypeError, ValueError) as e:
                log.error("malformed_annotation", where, f"image entry lacks id/file_name/"
                          f"height/width ({e!r})")
                continue
            where = f"{name}: image id {image_id} ({image['file_name']})"
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
        boxes, labels, crowd, area, ids, kps, segs = [], [], [], [], [], [], []
        for ann in anns:
            at = f"{where}, annotation id {ann.get('id')}"
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
                category = ann["category_id"]
            except (KeyError, TypeError, ValueError) as e:
                log.error("malformed_annotation", at, f"bad bbox/category_id ({e!r})")
                continue
            if category not in label_of:
                log.error("unknown_class", at, f"category_id {category} is not in the "
                          "categories list")
                continue
            kp = None
            if num_kp:
                kp = np.asarray(ann.get("keypoints") or np.zeros(num_kp * 3), np.float32)
                if kp.size != num_kp * 3 or not np.all(np.isfinite(kp)):
                    log.error("bad_keypoints", at, f"{kp.size} keypoint values, expected "
                              f"{num_kp} x 3")
                    continue
                kp = kp.reshape(num_kp, 3)
            if include_masks:
                problem = _segmentation_problem(ann.get("segmentation"), height, width)
                if problem:
                    log.error("bad_mask", at, problem)
                    continue
                segs.append(ann["segmentation"])
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[category])
            crowd.append(int(bool(ann.get("iscrowd", 0))))
            area.append(float(ann.get("area", w * h)))
            ids.append(ann.get("id", -1))
            kps.append(kp)
        boxes, keep = sanitize_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), height, width,
                                     log, lambda i: f"{where}, annotation id {ids[i]}")
        record = {"boxes": boxes[keep], "labels": np.asarray(labels, np.int32)[keep],
                  "iscrowd": np.asarray(crowd, np.int32)[keep],
                  "area": np.asarray(area, np.float32)[keep],
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
    """Why ``segmentation`` cannot be decoded (cheap structural check), or ``None``."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list)]
        if len(polygons) != len(segmentation) or not any(len(p) >= 6 for p in polygons):
            return "segmentation is not a list of polygons with 3 or more points"
        if any(len(p) % 2 or not all(isinstance(v, (int, float)) for v in p) for p in polygons):
            return "polygon with an odd number of values or non-numbers"
        return None
    if isinstance(segmentation, dict) and "counts" in segmentation:
        if list(segmentation.get("size", [])) != [height, width]:
            return f"RLE size {segmentation.get('size')} differs from the image {height}x{width}"
        return None
    return f"no usable segmentation ({type(segmentation).__name__})"


def _load_json(path):
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: annotation file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: not a COCO annotation file (no 'images' list)")
    return data
