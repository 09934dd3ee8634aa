"""Box math shared by every detector.

Boxes are ``xyxy`` in absolute pixels inside kdet (``[..., 4]`` as
``x1, y1, x2, y2``). Format conversion is ``keras.utils.bounding_boxes``'s job
(:func:`convert_format` below only adds the kdet default target); this module
adds what Keras lacks: batched pairwise IoU / GIoU / DIoU matrices that stay
finite on padded rows, and torchvision's ``BoxCoder``.

All functions are pure ``keras.ops`` and accept any leading batch dimensions.

    >>> import numpy as np
    >>> a = np.array([[0., 0., 10., 10.]], "float32")
    >>> b = np.array([[5., 5., 15., 15.], [0., 0., 0., 0.]], "float32")
    >>> np.asarray(pairwise_iou(a, b)).astype(float).round(4).tolist()  # padding row gives 0
    [[0.1429, 0.0]]
"""
import math

import keras
from keras import ops

# torchvision's clamp on dw/dh before exp() when decoding: log(1000 / 16).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def convert_format(boxes, source, target="xyxy", height=None, width=None, dtype="float32"):
    """Convert between Keras box formats (thin wrapper; xyxy by default).

    ``source``/``target`` are Keras names: ``xyxy``, ``yxyx``, ``xywh``,
    ``center_xywh``, ``center_yxhw``, ``rel_xyxy``, ... Relative formats need
    ``height`` and ``width``.
    """
    if source == target:
        return ops.cast(boxes, dtype)
    return keras.utils.bounding_boxes.convert_format(
        boxes, source=source, target=target, height=height, width=width, dtype=dtype)


def _safe_divide(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0 (never NaN)."""
    zero = ops.cast(0, denominator.dtype)
    safe = ops.where(denominator > zero, denominator, ops.ones_like(denominator))
    return ops.where(denominator > zero, numerator / safe, ops.zeros_like(numerator))


def area(boxes):
    """Area of ``xyxy`` boxes; inverted or degenerate boxes give 0."""
    boxes = ops.convert_to_tensor(boxes)
    w = ops.maximum(boxes[..., 2] - boxes[..., 0], 0)
    h = ops.maximum(boxes[..., 3] - boxes[..., 1], 0)
    return w * h


def _pairwise_parts(boxes1, boxes2):
    """Intersection, union, and the two corner sets broadcast to [..., N, M]."""
    boxes1 = ops.convert_to_tensor(boxes1)
    boxes2 = ops.cast(ops.convert_to_tensor(boxes2), boxes1.dtype)
    b1 = ops.expand_dims(boxes1, -2)  # [..., N, 1, 4]
    b2 = ops.expand_dims(boxes2, -3)  # [..., 1, M, 4]
    lt = ops.maximum(b1[..., :2], b2[..., :2])
    rb = ops.minimum(b1[..., 2:], b2[..., 2:])
    wh = ops.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = ops.expand_dims(area(boxes1), -1) + ops.expand_dims(area(boxes2), -2) - inter
    return inter, union, b1, b2


def pairwise_iou(boxes1, boxes2):
    """IoU matrix ``[..., N, M]`` of ``xyxy`` boxes (torchvision ``box_iou``).

    Pairs whose union is empty (padding rows of zeros) give 0, not NaN.
    """
    inter, union, _, _ = _pairwise_parts(boxes1, boxes2)
    return _safe_divide(inter, union)


def _enclosing_box(b1, b2):
    lt = ops.minimum(b1[..., :2], b2[..., :2])
    rb = ops.maximum(b1[..., 2:], b2[..., 2:])
    return lt, rb


def pairwise_giou(boxes1, boxes2):
    """Generalised IoU matrix (torchvision ``generalized_box_iou``), in [-1, 1]."""
    inter, union, b1, b2 = _pairwise_parts(boxes1, boxes2)
    iou = _safe_divide(inter, union)
    lt, rb = _enclosing_box(b1, b2)
    wh = ops.maximum(rb - lt, 0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - _safe_divide(enclosing - union, enclosing)


def pairwise_diou(boxes1, boxes2, eps=1e-7):
    """Distance IoU matrix (torchvision ``distance_box_iou``)."""
    inter, union, b1, b2 = _pairwise_parts(boxes1, boxes2)
    iou = _safe_divide(inter, union)
    lt, rb = _enclosing_box(b1, b2)
    diagonal_sq = ops.sum(ops.square(rb - lt), axis=-1) + eps
    c1 = (b1[..., :2] + b1[..., 2:]) / 2
    c2 = (b2[..., :2] + b2[..., 2:]) / 2
    centre_sq = ops.sum(ops.square(c1 - c2), axis=-1)
    return iou - centre_sq / diagonal_sq


def _paired_parts(boxes1, boxes2):
    boxes1 = ops.convert_to_tensor(boxes1)
    boxes2 = ops.cast(ops.convert_to_tensor(boxes2), boxes1.dtype)
    lt = ops.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = ops.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = ops.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(boxes1) + area(boxes2) - inter
    return inter, union, boxes1, boxes2


def paired_iou(boxes1, boxes2):
    """Element-wise IoU of two aligned box sets ``[..., 4]`` -> ``[...]``."""
    inter, union, _, _ = _paired_parts(boxes1, boxes2)
    return _safe_divide(inter, union)


def paired_giou(boxes1, boxes2):
    """Element-wise GIoU of aligned box sets (used by the GIoU loss)."""
    inter, union, b1, b2 = _paired_parts(boxes1, boxes2)
    iou = _safe_divide(inter, union)
    lt, rb = _enclosing_box(b1, b2)
    wh = ops.maximum(rb - lt, 0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - _safe_divide(enclosing - union, enclosing)


def clip_boxes(boxes, height, width):
    """Clip ``xyxy`` boxes to ``[0, width] x [0, height]`` (torchvision ``clip_boxes_to_image``).

    ``height``/``width`` may be Python numbers or tensors broadcastable to
    ``boxes[..., 0]`` (for per-image sizes pass shape ``[B, 1]``).
    """
    boxes = ops.convert_to_tensor(boxes)
    height = ops.cast(height, boxes.dtype)
    width = ops.cast(width, boxes.dtype)
    x1 = ops.minimum(ops.maximum(boxes[..., 0], 0), width)
    y1 = ops.minimum(ops.maximum(boxes[..., 1], 0), height)
    x2 = ops.minimum(ops.maximum(boxes[..., 2], 0), width)
    y2 = ops.minimum(ops.maximum(boxes[..., 3], 0), height)
    return ops.stack([x1, y1, x2, y2], axis=-1)


def valid_box_mask(boxes, min_size=0.0):
    """True where a box has width and height > ``min_size`` (padding rows are False)."""
    boxes = ops.convert_to_tensor(boxes)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return ops.logical_and(w > min_size, h > min_size)


def nonempty_box_mask(boxes):
    """True where an ``xyxy`` box can match an object: finite, width and height > 0.

    The rule every detector applies before NMS (dense decoders, and their
    exports), after clipping: torchvision's ``remove_small_boxes`` with a
    strict test and NaN/inf rejected. ``0 < w * h < inf`` is required too, so
    the area that NMS kernels compute is positive and finite (widths that
    underflow or overflow the float32 product count as empty). Written with
    ``abs``/comparisons only, which every export runtime has (LiteRT has no
    ``is_finite``).

    >>> import numpy as np
    >>> boxes = np.array([[0, 0, 2, 1], [0, 33.3, 0, 90.5], [np.nan, 0, 1, 1],
    ...                   [-np.inf, 0, 5, 5]], "float32")
    >>> np.asarray(nonempty_box_mask(boxes)).tolist()
    [True, False, False, False]
    """
    boxes = ops.convert_to_tensor(boxes)
    inf = float("inf")
    finite = ops.all(ops.abs(boxes) < inf, axis=-1)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    box_area = w * h
    return finite & (w > 0) & (h > 0) & (box_area > 0) & (box_area < inf)


def to_center(boxes):
    """``xyxy`` -> (cx, cy, w, h) as four tensors."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


@keras.saving.register_keras_serializable(package="kdet")
class BoxCoder:
    """Encode boxes as deltas to reference boxes and back (torchvision ``BoxCoder``).

    ``t = (wx*(x-xa)/wa, wy*(y-ya)/ha, ww*log(w/wa), wh*log(h/ha))`` with centres
    ``x = x1 + w/2`` and widths ``w = x2 - x1`` (no +1). Decoding clamps
    ``dw, dh`` at ``clip`` (``log(1000/16)`` by default; ``None`` disables it,
    as automl's EfficientDet coder does). ``order="yx"`` reads and writes deltas as
    ``(ty, tx, th, tw)`` — the layout of automl/effdet box heads.

    >>> import numpy as np
    >>> coder = BoxCoder(weights=(10., 10., 5., 5.))
    >>> anchors = np.array([[0., 0., 10., 20.]], "float32")
    >>> gt = np.array([[1., 2., 12., 18.]], "float32")
    >>> np.allclose(coder.decode(coder.encode(gt, anchors), anchors), gt, atol=1e-4)
    True
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), clip=BBOX_XFORM_CLIP, order="xy"):
        if order not in ("xy", "yx"):
            raise ValueError(f"BoxCoder order must be 'xy' or 'yx', got {order!r}")
        self.weights = tuple(float(w) for w in weights)
        self.clip = None if clip is None else float(clip)
        self.order = order

    def encode(self, boxes, anchors):
        """Deltas ``[..., 4]`` that take ``anchors`` to ``boxes`` (both xyxy)."""
        boxes = ops.convert_to_tensor(boxes)
        anchors = ops.cast(ops.convert_to_tensor(anchors), boxes.dtype)
        wx, wy, ww, wh = self.weights
        xa, ya, wa, ha = to_center(anchors)
        x, y, w, h = to_center(boxes)
        # Padding rows (zero-size boxes or anchors) must not produce inf/NaN.
        tiny = ops.cast(1e-8, boxes.dtype)
        wa_safe = ops.maximum(wa, tiny)
        ha_safe = ops.maximum(ha, tiny)
        dx = wx * (x - xa) / wa_safe
        dy = wy * (y - ya) / ha_safe
        dw = ww * ops.log(ops.maximum(w, tiny) / wa_safe)
        dh = wh * ops.log(ops.maximum(h, tiny) / ha_safe)
        parts = [dx, dy, dw, dh] if self.order == "xy" else [dy, dx, dh, dw]
        return ops.stack(parts, axis=-1)

    def decode(self, deltas, anchors):
        """Boxes (xyxy) from ``deltas`` applied to ``anchors``."""
        deltas = ops.convert_to_tensor(deltas)
        anchors = ops.cast(ops.convert_to_tensor(anchors), deltas.dtype)
        wx, wy, ww, wh = self.weights
        if self.order == "xy":
            dx, dy, dw, dh = (deltas[..., i] for i in range(4))
        else:
            dy, dx, dh, dw = (deltas[..., i] for i in range(4))
        dx, dy, dw, dh = dx / wx, dy / wy, dw / ww, dh / wh
        if self.clip is not None:
            dw = ops.minimum(dw, self.clip)
            dh = ops.minimum(dh, self.clip)
        xa, ya, wa, ha = to_center(anchors)
        cx = dx * wa + xa
        cy = dy * ha + ya
        w = ops.exp(dw) * wa
        h = ops.exp(dh) * ha
        return ops.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)

    def get_config(self):
        return {"weights": self.weights, "clip": self.clip, "order": self.order}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
