"""Pascal VOC detection AP, the rules of the devkit's ``voc_eval.py``.

The matching and AP follow py-faster-rcnn's ``lib/datasets/voc_eval.py``
(itself a port of the MATLAB VOC devkit) exactly:

* per class, detections of all images are sorted by score, descending
  (stable, so ties keep the order they were added in);
* each detection takes the ground truth (GT) box of its image with the largest
  IoU, IoU measured with the devkit's inclusive-pixel ``+1`` convention:
  ``iw = min(x2) - max(x1) + 1``, ``area = (x2 - x1 + 1) * (y2 - y1 + 1)``
  (with the default ``pixel_convention="continuous"``, kdet's 0-based
  continuous boxes, ``x1 = xmin - 1``, are first mapped back to the XML's
  inclusive pixels, so kdet's own outputs and GT give the devkit's numbers);
* ``IoU > iou_threshold`` (strict): a ``difficult`` GT makes the detection
  neither a true nor a false positive; a GT not yet claimed makes it a true
  positive and is claimed; a claimed GT makes it a false positive (duplicate).
  ``IoU <= iou_threshold`` (or no GT in the image) is a false positive;
* recall = cumulative TP / number of non-difficult GT, precision =
  TP / max(TP + FP, eps);
* ``use_07_metric=True``: VOC2007 11-point AP, the mean over
  ``t in 0, 0.1, ..., 1`` of the largest precision at recall >= t (0 if none);
  ``use_07_metric=False``: VOC2010+ AP, the area under the precision envelope
  (precision made monotone from the right) at the points where recall changes.

The per-detection greedy loop of the devkit is vectorised per class: since a
GT can only be claimed by detections of its own image, "first detection (in
score order) above the threshold on a given non-difficult GT is the TP, later
ones are duplicates" is exactly the devkit's sequential result, and is found
with one ``np.unique(..., return_index=True)``.

Example:

>>> import numpy as np
>>> ev = VOCEvaluator(class_names=["cat", "dog"])
>>> ev.add_ground_truth("img1", boxes=[[10, 10, 50, 50], [60, 60, 90, 90]],
...                     labels=[0, 1])
>>> ev.add_detections("img1", boxes=[[11, 10, 50, 52], [0, 0, 5, 5]],
...                   scores=[0.9, 0.8], labels=[0, 1])
>>> result = ev.evaluate()
>>> result["per_class_AP"]["cat"], result["per_class_AP"]["dog"], result["mAP"]
(1.0, 0.0, 0.5)
"""
import numpy as np

__all__ = ["VOCEvaluator"]

# Absolute box formats this numpy module converts itself; the ``rel_*``
# formats need the image size and must be converted by the caller.
_ABSOLUTE_FORMATS = ("xyxy", "yxyx", "xywh", "center_xywh", "center_yxhw")

# 11 recall thresholds of the VOC2007 metric, the devkit's own expression.
_VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)

# Largest number of IoU entries computed at once (detections x GT per image).
_IOU_CHUNK_ENTRIES = 1 << 22


def _normalise_image_id(image_id):
    """Make ids from numpy / tf.data (``np.int64``, ``b"name"``) hashable and equal
    to the plain Python ids a user passes (``int``, ``str``)."""
    if isinstance(image_id, np.ndarray):
        if image_id.ndim != 0:
            raise ValueError(f"image id must be a scalar, got an array of shape {image_id.shape}")
        image_id = image_id.item()
    elif isinstance(image_id, np.generic):
        image_id = image_id.item()
    if isinstance(image_id, bytes):
        image_id = image_id.decode("utf-8")
    try:
        hash(image_id)
    except TypeError as error:
        raise ValueError(f"image id {image_id!r} is not hashable") from error
    return image_id


def _to_xyxy(boxes, bounding_box_format):
    """Convert ``[N, 4]`` absolute boxes from a Keras box format to ``xyxy``."""
    if bounding_box_format == "xyxy":
        return boxes
    a, b, c, d = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    if bounding_box_format == "yxyx":
        out = (b, a, d, c)
    elif bounding_box_format == "xywh":
        out = (a, b, a + c, b + d)
    elif bounding_box_format == "center_xywh":
        out = (a - c / 2, b - d / 2, a + c / 2, b + d / 2)
    elif bounding_box_format == "center_yxhw":
        out = (b - d / 2, a - c / 2, b + d / 2, a + c / 2)
    else:
        raise ValueError(
            f"bounding_box_format={bounding_box_format!r} is not supported here; use one of "
            f"{_ABSOLUTE_FORMATS} (convert relative formats to pixels first)")
    return np.stack(out, axis=-1)


def _check_boxes(boxes, image_id, what, bounding_box_format="xyxy"):
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4), np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"image {image_id!r}: {what} boxes must have shape [N, 4], "
                         f"got {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(boxes), axis=1))[0])
        raise ValueError(f"image {image_id!r}: {what} box {bad} is not finite: {boxes[bad].tolist()}")
    boxes = _to_xyxy(boxes, bounding_box_format)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if np.any(inverted):
        bad = int(np.flatnonzero(inverted)[0])
        raise ValueError(f"image {image_id!r}: {what} box {bad} has x2 < x1 or y2 < y1 "
                         f"(xyxy {boxes[bad].tolist()})")
    return boxes


def _check_vector(values, n, image_id, name, dtype):
    values = np.asarray(values)
    if values.size == 0 and n == 0:
        return np.zeros((0,), dtype)
    if values.shape != (n,):
        raise ValueError(f"image {image_id!r}: {name} must have shape [{n}] to match the boxes, "
                         f"got {values.shape}")
    if dtype is np.int64:
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
                raise ValueError(f"image {image_id!r}: {name} must be integers, got {values.tolist()}")
        elif values.dtype.kind not in "iub":
            raise ValueError(f"image {image_id!r}: {name} must be integers, got dtype {values.dtype}")
    return values.astype(dtype)


def _pairwise_iou_plus_one(boxes, gt_boxes):
    """Devkit IoU between ``boxes [..., 4]`` and ``gt_boxes [..., 4]`` (broadcast)."""
    iw = np.minimum(boxes[..., 2], gt_boxes[..., 2]) - np.maximum(boxes[..., 0], gt_boxes[..., 0]) + 1.0
    ih = np.minimum(boxes[..., 3], gt_boxes[..., 3]) - np.maximum(boxes[..., 1], gt_boxes[..., 1]) + 1.0
    inters = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area = (boxes[..., 2] - boxes[..., 0] + 1.0) * (boxes[..., 3] - boxes[..., 1] + 1.0)
    gt_area = (gt_boxes[..., 2] - gt_boxes[..., 0] + 1.0) * (gt_boxes[..., 3] - gt_boxes[..., 1] + 1.0)
    union = area + gt_area - inters
    # union >= 1 for any valid inclusive box; only zero-size continuous boxes reach 0.
    return np.where(union > 0, inters / np.where(union > 0, union, 1.0), 0.0)


def voc_ap(recall, precision, use_07_metric=True):
    """AP from the devkit's cumulative ``recall``/``precision`` arrays (``voc_ap``)."""
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        # recall is non-decreasing, so {recall >= t} is a suffix of the array and
        # "max precision over it" is a suffix maximum.
        if recall.size == 0:
            return 0.0
        suffix_max = np.maximum.accumulate(precision[::-1])[::-1]
        first = np.searchsorted(recall, _VOC07_RECALL_THRESHOLDS, side="left")
        p = np.where(first < recall.size, suffix_max[np.minimum(first, recall.size - 1)], 0.0)
        return float(np.sum(p / 11.0))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope from the right
    change = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


class VOCEvaluator:
    """Pascal VOC mAP (2007 11-point or 2010+ area) over accumulated images.

    Args:
        class_names: optional list of class names; ``labels`` index into it and
            ``per_class_AP`` is keyed by name.
        num_classes: number of classes when no names are given (keys are then
            the integer labels). With neither, the number of classes is the
            largest label seen + 1.
        use_07_metric: ``True`` for the VOC2007 11-point AP, ``False`` for the
            VOC2010+ area under the precision envelope.
        iou_threshold: a detection matches a GT when IoU > this (strict).
        pixel_convention: how to read the ``xyxy`` boxes.
            ``"continuous"`` (default): 0-based continuous coordinates, what
            every kdet model predicts and every kdet reader
            (``kdet.data.VOCDataset`` included: ``x1 = xmin - 1, x2 = xmax``)
            yields; boxes are moved to the inclusive form by ``x1 + 1,
            y1 + 1``, which gives the devkit's numbers on the original XML
            (and equals the plain IoU). Use it for kdet predictions and GT.
            ``"inclusive"``: integer pixel indices exactly as written in VOC
            XML, ``xmax`` included, so a box is ``x2 - x1 + 1`` wide. Choose it
            only when both GT and detections come in the devkit's own frame
            (raw XML numbers, or detections from a devkit-style tool such as
            py-faster-rcnn's result files); mixing it with kdet boxes shifts
            every box by one pixel.

    Detections must be in the same frame as the GT.
    Images are keyed by any hashable id (``np.int64`` and ``bytes`` ids, as
    tf.data yields them, are turned into ``int`` / ``str``). Every image a
    detection refers to must have been registered with ``add_ground_truth``;
    register images without objects with empty boxes. Calling
    ``add_ground_truth`` twice for an image adds to its objects.

    ``evaluate()`` returns ``{"mAP": float, "per_class_AP": {key: AP}}``;
    classes without non-difficult GT get ``nan`` and are left out of the mAP.

    >>> ev = VOCEvaluator(num_classes=1)
    >>> ev.add_ground_truth(7, [[0, 0, 9, 9]], [0])
    >>> ev.add_predictions([7], {"boxes": [[[0, 0, 9, 9], [0, 0, 0, 0]]],
    ...                          "scores": [[0.8, 0.0]], "labels": [[0, -1]],
    ...                          "num_detections": [1]})
    >>> ev.evaluate()["mAP"]
    1.0
    """

    def __init__(self, class_names=None, num_classes=None, use_07_metric=True,
                 iou_threshold=0.5, pixel_convention="continuous"):
        if class_names is not None:
            class_names = [str(name) for name in class_names]
            if len(set(class_names)) != len(class_names):
                raise ValueError(f"class_names has duplicates: {class_names}")
            if num_classes is not None and int(num_classes) != len(class_names):
                raise ValueError(f"num_classes={num_classes} but {len(class_names)} class_names given")
            num_classes = len(class_names)
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= float(iou_threshold) < 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
        if pixel_convention not in ("inclusive", "continuous"):
            raise ValueError("pixel_convention must be 'inclusive' (VOC XML) or 'continuous' "
                             f"(0-based, x1 = xmin - 1), got {pixel_convention!r}")
        self.pixel_convention = pixel_convention
        self.class_names = class_names
        self.num_classes = None if num_classes is None else int(num_classes)
        self.use_07_metric = bool(use_07_metric)
        self.iou_threshold = float(iou_threshold)
        self.reset()

    # ------------------------------------------------------------------ input
    def reset(self):
        """Forget all ground truth and detections."""
        self._image_index = {}  # image id -> dense index
        self._gt = {}  # image index -> (boxes [G, 4], labels [G], difficult [G])
        self.reset_detections()

    def reset_detections(self):
        """Forget the detections, keep the ground truth (evaluate a new model)."""
        self._dets = []  # chunks of (image index [D], boxes [D, 4], scores [D], labels [D], ids)
        self._results = None

    @property
    def num_images(self):
        """Number of images with registered ground truth."""
        return len(self._gt)

    def _index_of(self, image_id):
        index = self._image_index.get(image_id)
        if index is None:
            index = self._image_index[image_id] = len(self._image_index)
        return index

    def _to_inclusive(self, boxes):
        if self.pixel_convention == "continuous" and len(boxes):
            boxes = boxes + np.array([1.0, 1.0, 0.0, 0.0])
        return boxes

    def _check_labels(self, labels, image_id, what):
        if labels.size == 0:
            return
        bad = (labels < 0) if self.num_classes is None else (labels < 0) | (labels >= self.num_classes)
        if np.any(bad):
            allowed = ("labels >= 0" if self.num_classes is None
                       else f"labels in 0..{self.num_classes - 1}")
            raise ValueError(f"image {image_id!r}: {what} label {int(labels[bad][0])} is outside the "
                             f"class list ({allowed})")

    def add_ground_truth(self, image_id, boxes, labels, difficult=None):
        """Register the GT objects of one image.

        Args:
            image_id: hashable id of the image.
            boxes: ``[G, 4]`` xyxy pixels (may be empty: an image with no objects).
            labels: ``[G]`` class indices ``0..C-1``.
            difficult: optional ``[G]`` bools; difficult objects are neither
                required (not counted in recall) nor penalised.
        """
        image_id = _normalise_image_id(image_id)
        boxes = self._to_inclusive(_check_boxes(boxes, image_id, "ground-truth"))
        labels = _check_vector(labels, len(boxes), image_id, "labels", np.int64)
        self._check_labels(labels, image_id, "ground-truth")
        if difficult is None:
            difficult = np.zeros(len(boxes), bool)
        else:
            difficult = _check_vector(difficult, len(boxes), image_id, "difficult", bool)
        index = self._index_of(image_id)
        if index in self._gt:
            old = self._gt[index]
            boxes = np.concatenate([old[0], boxes])
            labels = np.concatenate([old[1], labels])
            difficult = np.concatenate([old[2], difficult])
        self._gt[index] = (boxes, labels, difficult)
        self._results = None

    def add_detections(self, image_id, boxes, scores, labels, bounding_box_format="xyxy"):
        """Add the detections of one image (``[D, 4]`` boxes, ``[D]`` scores and labels)."""
        image_id = _normalise_image_id(image_id)
        boxes = self._to_inclusive(_check_boxes(boxes, image_id, "detection", bounding_box_format))
        scores = _check_vector(scores, len(boxes), image_id, "scores", np.float64)
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"image {image_id!r}: detection scores must be finite, got "
                             f"{scores[~np.isfinite(scores)][:3].tolist()}")
        labels = _check_vector(labels, len(boxes), image_id, "labels", np.int64)
        self._check_labels(labels, image_id, "detection")
        index = self._index_of(image_id)
        if len(boxes):
            self._dets.append((np.full(len(boxes), index, np.int64), boxes, scores, labels))
        self._results = None

    def add_predictions(self, image_ids, predictions, bounding_box_format="xyxy"):
        """Add a batch of padded model outputs.

        Args:
            image_ids: ``[B]`` ids, one per image of the batch.
            predictions: dict with ``"boxes" [B, D, 4]``, ``"scores" [B, D]``,
                ``"labels" [B, D]`` and optionally ``"num_detections" [B]``
                (rows past it are padding). Without ``num_detections`` the rows
                with label ``-1`` are padding. numpy, TF, JAX or torch arrays.
            bounding_box_format: format of ``predictions["boxes"]`` (absolute).
        """
        missing = {"boxes", "scores", "labels"} - set(predictions)
        if missing:
            raise ValueError(f"predictions lack keys {sorted(missing)}; got {sorted(predictions)}")
        boxes = np.asarray(predictions["boxes"], np.float64)
        scores = np.asarray(predictions["scores"], np.float64)
        labels = np.asarray(predictions["labels"])
        image_ids = list(np.asarray(image_ids).reshape(-1)) if not isinstance(image_ids, (list, tuple)) \
            else list(image_ids)
        batch = len(image_ids)
        if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
            raise ValueError(f"predictions['boxes'] must have shape [{batch}, D, 4] for {batch} image "
                             f"ids, got {boxes.shape}")
        if scores.shape != boxes.shape[:2] or labels.shape != boxes.shape[:2]:
            raise ValueError(f"predictions['scores'] {scores.shape} and ['labels'] {labels.shape} "
                             f"must have shape {boxes.shape[:2]}")
        if "num_detections" in predictions and predictions["num_detections"] is not None:
            counts = np.asarray(predictions["num_detections"]).reshape(-1).astype(np.int64)
            if counts.shape != (batch,) or np.any(counts < 0) or np.any(counts > boxes.shape[1]):
                raise ValueError(f"predictions['num_detections'] must be [{batch}] in "
                                 f"0..{boxes.shape[1]}, got {counts.tolist()}")
            valid = np.arange(boxes.shape[1])[None, :] < counts[:, None]
        else:
            valid = labels >= 0
        for b, image_id in enumerate(image_ids):
            keep = valid[b]
            self.add_detections(image_id, boxes[b][keep], scores[b][keep], labels[b][keep],
                                bounding_box_format=bounding_box_format)

    # ------------------------------------------------------------- evaluation
    def _class_count(self, gt_labels, det_labels):
        if self.num_classes is not None:
            return self.num_classes
        largest = max([-1] + [int(x.max()) for x in (gt_labels, det_labels) if x.size])
        return largest + 1

    def _evaluate_class(self, det_image, det_boxes, det_scores, gt_image, gt_boxes, gt_difficult,
                        num_images):
        """TP/FP flags of one class, in the devkit's order. Returns (tp, fp, npos)."""
        npos = int(np.sum(~gt_difficult))
        nd = len(det_scores)
        if nd == 0:
            return np.zeros(0), np.zeros(0), npos
        order = np.argsort(-det_scores, kind="stable")
        det_image, det_boxes = det_image[order], det_boxes[order]

        # GT of this class grouped by image: image i owns rows offset[i]:offset[i]+count[i].
        by_image = np.argsort(gt_image, kind="stable")
        gt_image, gt_boxes, gt_difficult = gt_image[by_image], gt_boxes[by_image], gt_difficult[by_image]
        count = np.bincount(gt_image, minlength=num_images)
        offset = np.concatenate([[0], np.cumsum(count)[:-1]])
        width = max(int(count.max()) if count.size else 0, 1)

        ovmax = np.full(nd, -np.inf)
        jmax = np.zeros(nd, np.int64)
        padded_gt = np.concatenate([gt_boxes, np.zeros((1, 4))])  # row -1: dummy for padding
        step = max(_IOU_CHUNK_ENTRIES // width, 1)
        slots = np.arange(width)
        for start in range(0, nd, step):
            img = det_image[start:start + step]
            valid = slots[None, :] < count[img][:, None]
            rows = np.where(valid, offset[img][:, None] + slots[None, :], -1)
            iou = _pairwise_iou_plus_one(det_boxes[start:start + step, None, :], padded_gt[rows])
            iou = np.where(valid, iou, -np.inf)
            jmax[start:start + step] = np.argmax(iou, axis=1)  # first maximum, as np.argmax in the devkit
            ovmax[start:start + step] = np.max(iou, axis=1)

        matched = ovmax > self.iou_threshold
        gt_row = offset[det_image] + jmax
        ignored = matched & gt_difficult[np.where(matched, gt_row, 0)] if len(gt_difficult) else \
            np.zeros(nd, bool)
        candidate = matched & ~ignored
        tp = np.zeros(nd)
        positions = np.flatnonzero(candidate)
        _, first = np.unique(gt_row[positions], return_index=True)  # first claim of each GT
        tp[positions[first]] = 1.0
        fp = (~matched | (candidate & (tp == 0))).astype(np.float64)
        return tp, fp, npos

    def evaluate(self):
        """Compute per-class AP and their mean.

        Returns:
            ``{"mAP": float, "per_class_AP": {class name or index: float}}``;
            classes with no non-difficult GT are ``nan`` and not in the mean
            (``mAP`` is ``nan`` when no class has GT).
        """
        unknown = sorted({int(chunk[0][0]) for chunk in self._dets} - set(self._gt))
        if unknown:
            ids = {index: image_id for image_id, index in self._image_index.items()}
            names = [ids[i] for i in unknown[:5]]
            raise ValueError(
                f"detections given for {len(unknown)} image(s) with no registered ground truth, "
                f"e.g. {names}; register every evaluated image with add_ground_truth "
                "(empty boxes for images without objects) and check the ids match")
        num_images = len(self._image_index)
        if self._gt:
            gt_items = list(self._gt.items())
            gt_image = np.concatenate([np.full(len(v[0]), k, np.int64) for k, v in gt_items])
            gt_boxes = np.concatenate([v[0] for _, v in gt_items])
            gt_labels = np.concatenate([v[1] for _, v in gt_items])
            gt_difficult = np.concatenate([v[2] for _, v in gt_items])
        else:
            gt_image, gt_boxes = np.zeros(0, np.int64), np.zeros((0, 4))
            gt_labels, gt_difficult = np.zeros(0, np.int64), np.zeros(0, bool)
        if self._dets:
            det_image, det_boxes, det_scores, det_labels = (
                np.concatenate([chunk[i] for chunk in self._dets]) for i in range(4))
        else:
            det_image, det_boxes = np.zeros(0, np.int64), np.zeros((0, 4))
            det_scores, det_labels = np.zeros(0), np.zeros(0, np.int64)

        num_classes = self._class_count(gt_labels, det_labels)
        per_class, rows = {}, []
        for c in range(num_classes):
            in_gt, in_det = gt_labels == c, det_labels == c
            tp, fp, npos = self._evaluate_class(
                det_image[in_det], det_boxes[in_det], det_scores[in_det],
                gt_image[in_gt], gt_boxes[in_gt], gt_difficult[in_gt], num_images)
            if npos == 0:
                ap = float("nan")
            else:
                tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
                recall = tp_cum / float(npos)
                precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
                ap = voc_ap(recall, precision, self.use_07_metric)
            key = self.class_names[c] if self.class_names is not None else c
            per_class[key] = ap
            rows.append((key, npos, int(in_gt.sum() - npos), int(in_det.sum()), ap))
        valid = [ap for ap in per_class.values() if not np.isnan(ap)]
        mean_ap = float(np.mean(valid)) if valid else float("nan")
        self._results = {"mAP": mean_ap, "per_class_AP": per_class, "_rows": rows}
        return {"mAP": mean_ap, "per_class_AP": dict(per_class)}

    def summary(self):
        """A readable per-class table (evaluates first if needed); returns the string."""
        if self._results is None:
            self.evaluate()
        rows = self._results["_rows"]
        width = max([len(str(r[0])) for r in rows] + [5])
        metric = "VOC2007 11-point" if self.use_07_metric else "VOC2010+ area"
        lines = [f"{'class':<{width}}  {'#gt':>6}  {'#diff':>6}  {'#det':>7}  {'AP':>7}",
                 "-" * (width + 36)]
        for key, npos, ndiff, ndet, ap in rows:
            shown = "    n/a" if np.isnan(ap) else f"{ap:7.4f}"
            lines.append(f"{str(key):<{width}}  {npos:>6}  {ndiff:>6}  {ndet:>7}  {shown}")
        lines.append("-" * (width + 36))
        lines.append(f"mAP ({metric}, IoU > {self.iou_threshold:g}, {len(self._gt)} images): "
                     f"{self._results['mAP']:.4f}")
        return "\n".join(lines)

    def __repr__(self):
        return (f"VOCEvaluator(num_classes={self.num_classes}, use_07_metric={self.use_07_metric}, "
                f"iou_threshold={self.iou_threshold}, pixel_convention={self.pixel_convention!r}, "
                f"images={len(self._gt)})")
