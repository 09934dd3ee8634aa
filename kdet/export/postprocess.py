"""Detection post-processing as TensorFlow graph ops that every export target runs.

A dense detector's raw outputs (``cls_logits [B, A, K]``, ``box_deltas [B, A, 4]``)
become final detections inside the exported graph, in one of two layouts:

``builtin`` (default): the same decode as :class:`kdet.layers.DetectionDecoder`
(sigmoid, pre-NMS top-k per level or over all levels, box decoding, clipping),
then class-aware NMS with torchvision's coordinate-offset trick on
``NonMaxSuppressionV4`` — a TF kernel, the ``NON_MAX_SUPPRESSION_V4`` LiteRT
builtin and ONNX ``NonMaxSuppression`` after tf2onnx. Output: kdet's padded dict
``{"boxes" [B, D, 4] xyxy pixels, "scores" [B, D], "labels" [B, D] int32,
"num_detections" [B] int32}`` (padding: zero box, score 0, label -1).

Four details make it equal to ``model.predict`` (``DetectionDecoder`` and kdet's
own NMS), row for row, padding included:

* Candidates. Boxes empty after clipping or non-finite, and NaN logits, are
  dropped before NMS (:func:`candidate_mask`, :func:`kdet.boxes.nonempty_box_mask`),
  in ``predict`` and here alike. LiteRT's kernel needs this: it re-queues each
  box it selects and counts on ``IoU(box, box) = 1`` to drop the copy, so a
  zero-area or NaN box came out again and again until the output was full
  (issue #10). Candidates whose *class-shifted* box has zero float32 area skip
  the kernel and are merged back by rank (see :func:`class_aware_nms`).
* Order. NMS kernels sort candidates by score with no rule for ties (a heap in
  TF and LiteRT, ORT's sort). kdet visits them by score with the lower
  candidate index first. So the graph sorts the candidates itself (``top_k`` is
  stable) and hands the kernel strictly decreasing *rank* scores; the kernel's
  visiting order is then exactly kdet's, even when scores tie (saturated
  sigmoids, int8 models).
* Threshold semantics. kdet suppresses when ``IoU > t`` (strict), ``t`` the
  float32 value just below the Python threshold (torchvision, see
  ``kdet.ops.nms``). The TF kernel and onnxruntime also test ``IoU > t``; the
  LiteRT kernel tests ``IoU >= t`` (measured: a pair with IoU exactly 0.5 is
  suppressed at 0.5 in LiteRT, kept in TF), so the LiteRT graph gets the next
  float32 above ``t``, which makes ``>=`` the same test as kdet's ``>``.
* IoU arithmetic. All three kernels compute ``inter / (area_a + area_b - inter)``
  in float32 with the same products as ``kdet.boxes.pairwise_iou`` (NMS is
  symmetric in x and y, so xyxy boxes go in as they are).

``tflite_postprocess``: the ``TFLite_Detection_PostProcess`` custom op of the TF
object-detection API / automl (regular per-class NMS). Output: its SSD layout
``{"detection_boxes" [B, D, 4] normalised (ymin, xmin, ymax, xmax),
"detection_classes" [B, D] float, "detection_scores" [B, D], "num_detections" [B]
float}``, the layout on-device detection libraries read. The op only does the
NMS: the graph gives it kdet's decoded, clipped boxes (encoded for a unit-anchor
decode) and, instead of scores, each candidate's rank in kdet's order (0 for
everything that is not a candidate: outside the pre-NMS top-k, low score,
empty or non-finite box), then gathers the real scores back by rank. So the
detections are ``model.predict``'s (boxes to float32 rounding of the op's
decode), except that the op caps detections per class (``detections_per_class``,
default ``max_detections``, where it never binds). Its TF body is
``tf.image.combined_non_max_suppression`` (the same regular NMS), so the graph
also runs in TF; the LiteRT converter replaces the body with the custom op.

    >>> import numpy as np, tensorflow as tf
    >>> settings = PostprocessSettings(
    ...     num_classes=2, image_size=(32, 32), max_detections=3, pre_nms_topk=10,
    ...     anchors=np.array([[0, 0, 10, 10], [20, 20, 30, 30]], "float32"))
    >>> logits = tf.constant([[[5., -5.], [-5., 5.]]])
    >>> out = detections(logits, tf.zeros((1, 2, 4)), settings)
    >>> out["labels"].numpy().tolist(), out["num_detections"].numpy().tolist()
    ([[0, 1, -1]], [2])
"""
import dataclasses
import math
import numbers

import numpy as np

from kdet.boxes import BoxCoder, clip_boxes, nonempty_box_mask

RUNTIMES = ("tensorflow", "litert", "onnx")
NMS_MODES = ("builtin", "tflite_postprocess")
DETECTION_KEYS = ("boxes", "scores", "labels", "num_detections")
SSD_KEYS = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")
# Name scope of every post-processing op: int8 export keeps these in float.
SCOPE = "kdet_postprocess"


@dataclasses.dataclass
class PostprocessSettings:
    """Everything the exported post-processing needs, copied from a model.

    Build it with :func:`settings_from_model`; the fields mirror
    :class:`kdet.layers.DetectionDecoder` plus the model's anchors and size.
    """

    num_classes: int
    image_size: tuple
    anchors: np.ndarray
    level_counts: tuple = ()
    per_level_topk: bool = False
    pre_nms_topk: int = 1000
    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    max_detections: int = 100
    box_coder: BoxCoder = dataclasses.field(default_factory=BoxCoder)
    clip_to_image: bool = True

    def __post_init__(self):
        self.anchors = np.asarray(self.anchors, np.float32)
        if self.anchors.ndim != 2 or self.anchors.shape[1] != 4:
            raise ValueError(f"anchors must be [A, 4] xyxy, got shape {self.anchors.shape}")
        self.image_size = tuple(int(s) for s in self.image_size)
        self.level_counts = tuple(int(c) for c in self.level_counts)
        if self.level_counts and sum(self.level_counts) != len(self.anchors):
            raise ValueError(f"level_counts {self.level_counts} do not add up to "
                             f"{len(self.anchors)} anchors")
        if isinstance(self.box_coder, dict):
            self.box_coder = BoxCoder(**self.box_coder)
        self.num_classes = int(self.num_classes)
        self.pre_nms_topk = int(self.pre_nms_topk)
        self.max_detections = int(self.max_detections)
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {self.max_detections}")
        if not 0.0 <= float(self.iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must lie in [0, 1], got {self.iou_threshold}")
        self.iou_threshold = float(self.iou_threshold)
        self.score_threshold = float(self.score_threshold)


def settings_from_model(model, max_detections=None, score_threshold=None, iou_threshold=None):
    """:class:`PostprocessSettings` of a dense detector, with optional overrides.

    The model needs what :class:`kdet.models.DenseDetector` has: ``num_classes``,
    ``image_size``, ``anchors``, ``level_counts`` and a ``decoder``
    (:class:`kdet.layers.DetectionDecoder`).
    """
    missing = [a for a in ("num_classes", "image_size", "anchors", "decoder")
               if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"kdet.export: {type(model).__name__} has no {', '.join(missing)}; export "
            "supports dense detectors (kdet.models.RetinaNet, EfficientDet, DenseDetector) "
            "and, through kdet.export.export, FasterRCNN / MaskRCNN / KeypointRCNN")
    decoder = model.decoder
    return PostprocessSettings(
        num_classes=model.num_classes, image_size=model.image_size, anchors=model.anchors,
        level_counts=getattr(model, "level_counts", ()) or (),
        per_level_topk=decoder.per_level_topk, pre_nms_topk=decoder.pre_nms_topk,
        score_threshold=decoder.score_threshold if score_threshold is None else score_threshold,
        iou_threshold=decoder.iou_threshold if iou_threshold is None else iou_threshold,
        max_detections=decoder.max_detections if max_detections is None else max_detections,
        box_coder=decoder.box_coder, clip_to_image=decoder.clip_to_image)


# ------------------------------------------------------------- thresholds
def float32_iou_threshold(value):
    """The float32 ``t`` with ``iou > t`` iff ``float64(iou) > value`` (as kdet / torchvision)."""
    t = np.float32(value)
    if math.isfinite(value) and float(t) > value:
        t = np.nextafter(t, np.float32(-np.inf))
    return t


def kernel_iou_threshold(value, runtime):
    """Threshold to give the NMS kernel of ``runtime`` so it suppresses iff ``IoU > value``.

    TF's and onnxruntime's kernels test ``iou > threshold``; LiteRT's tests
    ``iou >= threshold``, so it gets the next float32 up.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    t = float32_iou_threshold(float(value))
    if runtime == "litert":
        t = np.nextafter(t, np.float32(np.inf))
    return t


# --------------------------------------------------------------- decoding
def pre_nms_candidates(cls_logits, settings):
    """The pre-NMS top-k of ``DetectionDecoder``: ``(scores, anchor_index, labels)`` ``[B, C]``.

    Sigmoid scores (NaN logits give -inf: ranked last, never kept), top-k over
    all levels or per level, ties to the lower (anchor, class) index.
    """
    import tensorflow as tf

    k = settings.num_classes
    probs = tf.sigmoid(tf.cast(cls_logits, tf.float32))
    probs = tf.where(probs >= 0, probs, tf.constant(-np.inf, tf.float32))
    num_anchors = len(settings.anchors)
    counts = settings.level_counts if (settings.per_level_topk and settings.level_counts) \
        else (num_anchors,)
    scores, anchor_index, labels = [], [], []
    start = 0
    for count in counts:
        level = tf.reshape(probs[:, start:start + count, :], [-1, count * k])
        values, flat = tf.math.top_k(level, k=min(settings.pre_nms_topk, count * k), sorted=True)
        scores.append(values)
        anchor_index.append(flat // k + start)  # flat index = anchor * K + class
        labels.append(flat % k)
        start += count
    scores = tf.concat(scores, axis=1)
    anchor_index = tf.concat(anchor_index, axis=1)
    labels = tf.cast(tf.concat(labels, axis=1), tf.int32)
    return scores, anchor_index, labels


def decode_boxes(box_deltas, anchors, settings):
    """kdet's box decoding (and clipping when the decoder clips), TF ops on TF."""
    import tensorflow as tf

    boxes = settings.box_coder.decode(tf.cast(box_deltas, tf.float32), anchors)
    if settings.clip_to_image:
        boxes = clip_boxes(boxes, settings.image_size[0], settings.image_size[1])
    return boxes


def decode_candidates(cls_logits, box_deltas, settings):
    """Pre-NMS candidates exactly as ``DetectionDecoder``: ``(boxes, scores, labels)``.

    ``boxes [B, C, 4]`` xyxy (clipped to the image when the decoder clips),
    ``scores [B, C]`` sigmoid probabilities, ``labels [B, C]`` int32, ``C`` the
    pre-NMS top-k over all levels or per level.
    """
    import tensorflow as tf

    scores, anchor_index, labels = pre_nms_candidates(cls_logits, settings)
    deltas = tf.gather(tf.cast(box_deltas, tf.float32), anchor_index, batch_dims=1)
    anchors = tf.gather(tf.constant(settings.anchors), anchor_index)
    return decode_boxes(deltas, anchors, settings), scores, labels


# -------------------------------------------------------------------- NMS
def candidate_mask(boxes, scores, score_threshold):
    """Candidates NMS may keep: ``score > threshold`` and a non-empty, finite box.

    The rule of :class:`kdet.layers.DetectionDecoder` (``batched_nms`` with
    ``valid_mask=nonempty_box_mask(boxes)``); NaN/-inf scores never pass.
    """
    import tensorflow as tf

    return tf.logical_and(scores > tf.constant(score_threshold, tf.float32),
                          nonempty_box_mask(boxes))


def class_aware_nms(boxes, scores, labels, settings, runtime="tensorflow"):
    """kdet's ``batched_nms`` for one image on the ``NonMaxSuppressionV4`` kernel.

    Args:
        boxes ``[C, 4]``, scores ``[C]``, labels ``[C]``: candidates of one image.
        runtime: where the graph will run ("tensorflow", "litert", "onnx"); picks
            the threshold that gives strict ``IoU >`` semantics there.

    Returns ``(indices [D] int32 padded with -1, count)``, indices into the
    candidates in kdet's output order.

    Candidates with an empty or non-finite box or a score too low are dropped
    first (:func:`candidate_mask`), as ``DetectionDecoder`` drops them. A valid
    candidate whose *class-shifted* box has zero float32 area (a box thinner
    than the float32 spacing at its class offset) has IoU 0 with everything in
    every kernel and in kdet: it is never suppressed and suppresses nothing.
    TF and onnxruntime would keep it once; LiteRT's kernel re-queues every box
    it selects and relies on ``IoU(box, box) = 1`` to drop the copy, so it would
    select such a box again and again until the output is full (issue #10: 95
    copies of one box). Those candidates are therefore merged back by rank
    after the kernel. With ``iou_threshold >= 1`` nothing can be suppressed
    (float32 IoU never exceeds 1) and no candidate goes to the kernel.
    """
    import tensorflow as tf

    num = int(boxes.shape[0])
    limit = settings.max_detections
    valid = candidate_mask(boxes, scores, settings.score_threshold)
    any_valid = tf.reduce_any(valid)
    # torchvision coordinate trick: shift each class by label * (max coordinate
    # over the candidates + 1), as kdet.ops.batched_nms(method="offset") does.
    # Valid boxes are finite, so the maximum is finite when any is valid.
    masked = tf.where(valid[:, None], boxes, tf.constant(-np.inf, tf.float32))
    top = tf.where(any_valid, tf.reduce_max(masked), tf.constant(0.0, tf.float32))
    shifted = boxes + tf.cast(labels, tf.float32)[:, None] * (top + 1.0)
    # Invalid rows (NaN boxes) get rank score -1 below, so no kernel selects
    # them; zeroed here so that the kernel's input is finite where it can be.
    shifted = tf.where(valid[:, None], shifted, tf.zeros_like(shifted))
    # kdet's visiting order: score descending, lower index first on ties
    # (top_k is stable); the kernel gets strictly decreasing rank scores.
    keys = tf.where(valid, scores, tf.constant(-np.inf, tf.float32))
    _, order = tf.math.top_k(keys, k=num, sorted=True)
    sorted_valid = tf.gather(valid, order)
    sorted_shifted = tf.gather(shifted, order)
    width = sorted_shifted[:, 2] - sorted_shifted[:, 0]
    height = sorted_shifted[:, 3] - sorted_shifted[:, 1]
    kernel_threshold = kernel_iou_threshold(settings.iou_threshold, runtime)
    if float32_iou_threshold(settings.iou_threshold) >= 1.0:
        in_kernel = tf.zeros_like(sorted_valid)
        kernel_threshold = np.float32(1.0)  # TF's kernel checks 0 <= t <= 1
    else:
        in_kernel = tf.logical_and(sorted_valid, width * height > 0)
    always_kept = tf.logical_and(sorted_valid, tf.logical_not(in_kernel))
    positions = tf.range(num)
    rank = tf.cast(num - positions, tf.float32)  # > 0, strictly decreasing
    rank_score = tf.where(in_kernel, rank, -tf.ones_like(rank))
    selected, count = tf.raw_ops.NonMaxSuppressionV4(
        boxes=sorted_shifted, scores=rank_score, max_output_size=limit,
        iou_threshold=tf.constant(kernel_threshold), score_threshold=tf.constant(0.0, tf.float32),
        pad_to_max_output_size=True)
    # Sorted positions the kernel kept, plus the always-kept ones, in rank order.
    slot_used = tf.range(limit) < count
    hits = tf.logical_and(tf.equal(selected[:, None], positions[None, :]), slot_used[:, None])
    kept = tf.logical_or(tf.reduce_any(hits, axis=0), always_kept)
    first = min(limit, num)
    _, kept_positions = tf.math.top_k(tf.where(kept, rank, tf.zeros_like(rank)), k=first,
                                      sorted=True)
    total = tf.minimum(tf.reduce_sum(tf.cast(kept, tf.int32)), limit)
    indices = tf.gather(order, kept_positions)
    if first < limit:
        indices = tf.concat([indices, tf.zeros([limit - first], indices.dtype)], axis=0)
    indices = tf.where(tf.range(limit) < total, indices, -tf.ones_like(indices))
    return indices, total


def _gather_padded(values, indices, pad_value):
    """``values[indices]`` with ``pad_value`` where ``indices < 0``.

    Gathers from the values with one padding row appended instead of
    ``tf.where(valid, gathered, 0)``: tf2onnx rewrites that select as a
    multiplication by the mask, and an invalid candidate's -inf score or NaN
    box times 0 is NaN in the padding.
    """
    import tensorflow as tf

    num = int(values.shape[0])
    pad = tf.fill([1] + values.shape.as_list()[1:], tf.constant(pad_value, values.dtype))
    safe = tf.where(indices >= 0, indices, tf.fill(tf.shape(indices), num))
    return tf.gather(tf.concat([values, pad], axis=0), safe)


def _gather_detections(boxes, scores, labels, indices, count):
    import tensorflow as tf

    return (_gather_padded(boxes, indices, 0.0), _gather_padded(scores, indices, 0.0),
            _gather_padded(labels, indices, -1), tf.cast(count, tf.int32))


def detections(cls_logits, box_deltas, settings, runtime="tensorflow", batch_size=None):
    """Raw head outputs -> kdet's padded detection dict, NMS included.

    ``batch_size`` None (or the batch dimension unknown) maps the per-image
    NMS over the batch (``tf.map_fn``); a static batch is unrolled, which is
    what LiteRT needs (its NMS kernel takes one image).
    """
    import tensorflow as tf

    with tf.name_scope(SCOPE):
        return _detections(cls_logits, box_deltas, settings, runtime, batch_size)


def _detections(cls_logits, box_deltas, settings, runtime, batch_size):
    import tensorflow as tf

    boxes, scores, labels = decode_candidates(cls_logits, box_deltas, settings)

    def one_image(b, s, l):
        indices, count = class_aware_nms(b, s, l, settings, runtime)
        return _gather_detections(b, s, l, indices, count)

    if batch_size is None:
        batch_size = cls_logits.shape[0]
    if batch_size is None:
        limit = settings.max_detections
        signature = (tf.TensorSpec([limit, 4], tf.float32), tf.TensorSpec([limit], tf.float32),
                     tf.TensorSpec([limit], tf.int32), tf.TensorSpec([], tf.int32))
        parts = tf.map_fn(lambda x: one_image(*x), (boxes, scores, labels),
                          fn_output_signature=signature)
    else:
        per_image = [one_image(boxes[i], scores[i], labels[i]) for i in range(int(batch_size))]
        parts = [tf.stack(p, axis=0) for p in zip(*per_image)]
    return dict(zip(DETECTION_KEYS, parts))


# ---------------------------------------------- TFLite_Detection_PostProcess
def _attr(key, value):
    if isinstance(value, bool):
        return 'attr { key: "%s" value { b: %s } }' % (key, str(value).lower())
    if isinstance(value, numbers.Integral):
        return 'attr { key: "%s" value { i: %d } }' % (key, value)
    # repr keeps every digit: a float32 nudged by one ulp must survive the text form.
    return 'attr { key: "%s" value { f: %r } }' % (key, float(value))


# The custom op decodes (ty, tx, th, tw) against anchors (yc, xc, h, w); with
# these unit anchors and unit scales its decode is yc = ty, h = exp(th).
_SSD_UNIT_ANCHOR = (0.0, 0.0, 1.0, 1.0)
# The op gets rank scores (>= 1, 0 for non-candidates) and keeps those >= this.
_SSD_RANK_THRESHOLD = 0.5


def ssd_implements_signature(settings, detections_per_class=None):
    """The ``experimental_implements`` string that the converter turns into the custom op."""
    per_class = settings.max_detections if detections_per_class is None else detections_per_class
    # The op requires 0 < t <= 1; IoU > 0 and IoU > (smallest float) are the same test.
    iou = max(float32_iou_threshold(settings.iou_threshold), np.nextafter(np.float32(0), 1))
    parts = ['name: "TFLite_Detection_PostProcess"',
             _attr("max_detections", int(settings.max_detections)),
             _attr("max_classes_per_detection", 1),
             _attr("detections_per_class", int(per_class)),
             _attr("use_regular_nms", True),
             _attr("nms_score_threshold", _SSD_RANK_THRESHOLD),
             _attr("nms_iou_threshold", iou),
             _attr("y_scale", 1.0), _attr("x_scale", 1.0), _attr("h_scale", 1.0),
             _attr("w_scale", 1.0), _attr("num_classes", int(settings.num_classes))]
    return " ".join(parts)


def _ssd_function(settings, detections_per_class):
    """A tf.function with the custom op's signature whose TF body does the same NMS."""
    import tensorflow as tf

    limit = settings.max_detections
    per_class = limit if detections_per_class is None else int(detections_per_class)
    iou_threshold = float(float32_iou_threshold(settings.iou_threshold))

    @tf.function(experimental_implements=ssd_implements_signature(settings, detections_per_class))
    def tflite_detection_postprocess(box_encodings, class_predictions, anchors):
        yc = box_encodings[..., 0] * anchors[:, 2] + anchors[:, 0]
        xc = box_encodings[..., 1] * anchors[:, 3] + anchors[:, 1]
        half_h = 0.5 * tf.exp(box_encodings[..., 2]) * anchors[:, 2]
        half_w = 0.5 * tf.exp(box_encodings[..., 3]) * anchors[:, 3]
        boxes = tf.stack([yc - half_h, xc - half_w, yc + half_h, xc + half_w], axis=-1)
        nmsed_boxes, nmsed_scores, nmsed_classes, count = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :], class_predictions, max_output_size_per_class=per_class,
            max_total_size=limit, iou_threshold=iou_threshold,
            score_threshold=_SSD_RANK_THRESHOLD, pad_per_class=False, clip_boxes=False)
        return nmsed_boxes, nmsed_classes, nmsed_scores, tf.cast(count, tf.float32)

    return tflite_detection_postprocess


def ssd_detections(cls_logits, box_deltas, settings, batch_size=1, detections_per_class=None):
    """Raw head outputs -> the ``TFLite_Detection_PostProcess`` outputs (SSD layout).

    The custom op takes one image, so a static batch is unrolled.
    """
    import tensorflow as tf

    if batch_size is None:
        raise ValueError("nms='tflite_postprocess' needs a static batch size "
                         "(TFLite_Detection_PostProcess takes one image per call)")
    with tf.name_scope(SCOPE):
        return _ssd_detections(cls_logits, box_deltas, settings, batch_size, detections_per_class)


def _ssd_detections(cls_logits, box_deltas, settings, batch_size, detections_per_class):
    """kdet's candidates and boxes, the custom op's per-class NMS on rank scores.

    The op sees, per anchor, kdet's decoded and clipped box (encoded for its
    unit-anchor decode, in normalised coordinates) and, per (anchor, class),
    the candidate's rank in kdet's visiting order (``C`` for the best, 0 for
    anchors outside the pre-NMS top-k, low scores and empty or non-finite
    boxes). Its regular NMS then visits kdet's candidates in kdet's order, ties
    included (its cross-class merge sorts with no rule for ties, ranks have
    none), and the real scores are gathered back by rank after it.
    """
    import tensorflow as tf

    height, width = settings.image_size
    k = settings.num_classes
    num_anchors = len(settings.anchors)
    scores, anchor_index, labels = pre_nms_candidates(cls_logits, settings)
    boxes = decode_boxes(box_deltas, tf.constant(settings.anchors)[None], settings)  # [B, A, 4]
    anchor_ok = nonempty_box_mask(boxes)
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    encodings = tf.stack([(y1 + y2) * (0.5 / height), (x1 + x2) * (0.5 / width),
                          tf.math.log((y2 - y1) / height), tf.math.log((x2 - x1) / width)],
                         axis=-1)
    encodings = tf.where(anchor_ok[..., None], encodings, tf.zeros_like(encodings))
    anchors = tf.constant([_SSD_UNIT_ANCHOR] * num_anchors, tf.float32)
    num = int(scores.shape[1])
    rank = tf.cast(num - tf.range(num), tf.float32)
    postprocess = _ssd_function(settings, detections_per_class)
    per_image = []
    for i in range(int(batch_size)):
        cand_boxes = tf.gather(boxes[i], anchor_index[i])
        valid = candidate_mask(cand_boxes, scores[i], settings.score_threshold)
        keys = tf.where(valid, scores[i], tf.constant(-np.inf, tf.float32))
        _, order = tf.math.top_k(keys, k=num, sorted=True)
        flat = tf.gather(anchor_index[i] * k + labels[i], order)  # (anchor, class) pairs, unique
        ranks = tf.where(tf.gather(valid, order), rank, tf.zeros_like(rank))
        predictions = tf.reshape(tf.scatter_nd(flat[:, None], ranks, [num_anchors * k]),
                                 [1, num_anchors, k])
        out_boxes, out_classes, out_ranks, count = postprocess(encodings[i:i + 1], predictions,
                                                               anchors)
        position = tf.clip_by_value(num - tf.cast(tf.round(out_ranks[0]), tf.int32), 0, num - 1)
        filled = tf.range(settings.max_detections) < tf.cast(count[0], tf.int32)
        real = _gather_padded(tf.gather(scores[i], order),
                              tf.where(filled, position, -tf.ones_like(position)), 0.0)
        per_image.append((out_boxes, out_classes, real[None], count))
    parts = [tf.concat(p, axis=0) for p in zip(*per_image)]
    return dict(zip(SSD_KEYS, parts))


def ssd_to_detections(outputs, image_size, clip_to_image=True):
    """SSD-layout outputs (numpy) -> kdet's padded dict in input pixels."""
    height, width = image_size
    boxes = np.asarray(outputs["detection_boxes"], np.float32)
    classes = np.asarray(outputs["detection_classes"])
    scores = np.asarray(outputs["detection_scores"], np.float32)
    count = np.asarray(outputs["num_detections"]).reshape(-1).astype(np.int32)
    xyxy = np.stack([boxes[..., 1] * width, boxes[..., 0] * height,
                     boxes[..., 3] * width, boxes[..., 2] * height], axis=-1)
    if clip_to_image:
        xyxy = np.clip(xyxy, 0, [width, height, width, height]).astype(np.float32)
    valid = np.arange(scores.shape[1])[None, :] < count[:, None]
    return {"boxes": np.where(valid[..., None], xyxy, 0).astype(np.float32),
            "scores": np.where(valid, scores, 0).astype(np.float32),
            "labels": np.where(valid, np.round(classes), -1).astype(np.int32),
            "num_detections": count}
