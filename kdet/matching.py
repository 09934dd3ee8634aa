"""Anchor/proposal matching, balanced sampling and training-target encoding.

Integer conventions (the contract every detector's loss reads):

* ``Matcher`` output, per anchor/proposal: the matched ground-truth index
  ``>= 0``, ``BELOW_LOW_THRESHOLD = -1`` (background) or
  ``BETWEEN_THRESHOLDS = -2`` (ignored) — torchvision's ``Matcher``.
* Ground truth arrives padded: ``gt_boxes [B, M, 4]`` xyxy and
  ``gt_labels [B, M]`` int with ``-1`` on padding rows. A row is valid iff its
  label is ``>= 0``; padded rows are never matched, and an image with no
  valid row has every anchor background.
* Encoded class targets (``labels`` of every ``encode_*`` function):
  the ground-truth class (``>= 0``) for foreground, ``-1`` for background,
  ``-2`` for ignored (between thresholds, not sampled, padding). RPN
  objectness uses the same code with the single class ``0`` ("object").
  Foreground classes are the dataset's 0-based labels; a softmax head with a
  background column maps them (see ``kdet.losses.softmax_cross_entropy_with_background``).
* Box targets are ``BoxCoder.encode(matched_gt, anchor)`` on foreground and
  exactly 0 elsewhere.

Everything is ``keras.ops`` with static shapes (``[B, A]`` masks, fixed
sample counts), so it runs under ``jax.jit`` and ``tf.function(jit_compile=True)``.

    >>> import numpy as np
    >>> anchors = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10]], "float32")
    >>> gt_boxes = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]]], "float32")
    >>> gt_labels = np.array([[3, -1]], "int32")
    >>> t = encode_dense_targets(anchors, gt_boxes, gt_labels, Matcher(0.5, 0.4, True))
    >>> np.asarray(t["labels"]).tolist()
    [[3, -1, 3]]
"""
import keras
from keras import ops

from kdet.boxes import BoxCoder, pairwise_iou

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2
BACKGROUND = -1
IGNORE = -2


@keras.saving.register_keras_serializable(package="kdet")
class Matcher:
    """Assign each prediction (anchor/proposal) to a ground truth (torchvision ``Matcher``).

    For quality matrix ``q [..., M, N]`` (M ground truths, N predictions):
    the best ground truth of each prediction (first index on ties) is kept
    when its quality is ``>= high_threshold``; ``< low_threshold`` gives
    ``-1``, in between ``-2``. With ``allow_low_quality_matches`` every
    prediction that attains some ground truth's maximum quality (ties
    included) gets its best match back, even below the thresholds.

    ``force_match_for_each_gt`` gives automl/effdet's ``ArgMaxMatcher(
    force_match_for_each_row=True)`` instead: each ground truth's first best
    prediction is matched to *that* ground truth (the lowest-index ground
    truth wins when several pick the same prediction).

    Args of ``__call__``: ``match_quality_matrix [..., M, N]`` and optional
    ``gt_valid [..., M]`` bool (padding rows False). Returns int32 ``[..., N]``.

        >>> import numpy as np
        >>> q = np.array([[0.9, 0.45, 0.2, 0.3]], "float32")
        >>> np.asarray(Matcher(0.5, 0.4)(q)).tolist()
        [0, -2, -1, -1]
        >>> np.asarray(Matcher(0.95, 0.4)(q)).tolist()
        [-2, -2, -1, -1]
        >>> np.asarray(Matcher(0.95, 0.4, allow_low_quality_matches=True)(q)).tolist()
        [0, -2, -1, -1]
    """

    def __init__(self, high_threshold, low_threshold, allow_low_quality_matches=False,
                 force_match_for_each_gt=False):
        if low_threshold > high_threshold:
            raise ValueError(f"Matcher: low_threshold {low_threshold} must be <= "
                             f"high_threshold {high_threshold}")
        if allow_low_quality_matches and force_match_for_each_gt:
            raise ValueError("Matcher: choose one of allow_low_quality_matches (torchvision) and "
                             "force_match_for_each_gt (automl), not both")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)
        self.force_match_for_each_gt = bool(force_match_for_each_gt)

    def __call__(self, match_quality_matrix, gt_valid=None):
        q = ops.convert_to_tensor(match_quality_matrix)
        if len(q.shape) < 2:
            raise ValueError(f"Matcher: match_quality_matrix must be [..., M, N], got {q.shape}")
        num_gt, num_pred = q.shape[-2], q.shape[-1]
        if num_gt == 0:  # static: no ground-truth slots at all
            return ops.full(tuple(q.shape[:-2]) + (num_pred,), BELOW_LOW_THRESHOLD, "int32")
        if gt_valid is None:
            gt_valid = ops.ones(q.shape[:-1], "bool")
        gt_valid = ops.cast(gt_valid, "bool")
        valid_rows = ops.expand_dims(gt_valid, -1)  # [..., M, 1]
        # Padding rows get -inf: never the best match, never anyone's maximum.
        q = ops.where(valid_rows, q, ops.cast(float("-inf"), q.dtype))

        matched_vals = ops.max(q, axis=-2)
        all_matches = ops.cast(ops.argmax(q, axis=-2), "int32")
        below = matched_vals < self.low_threshold
        between = ops.logical_and(matched_vals >= self.low_threshold,
                                  matched_vals < self.high_threshold)
        matches = ops.where(below, BELOW_LOW_THRESHOLD,
                            ops.where(between, BETWEEN_THRESHOLDS, all_matches))

        if self.allow_low_quality_matches:
            highest = ops.max(q, axis=-1, keepdims=True)  # [..., M, 1]
            is_best = ops.logical_and(q == highest, valid_rows)
            restore = ops.any(is_best, axis=-2)
            matches = ops.where(restore, all_matches, matches)
        if self.force_match_for_each_gt:
            best_pred = ops.argmax(q, axis=-1)  # [..., M]
            pred_ids = ops.arange(num_pred, dtype="int32")
            forced = ops.logical_and(
                ops.expand_dims(ops.cast(best_pred, "int32"), -1) == pred_ids, valid_rows)
            forced_any = ops.any(forced, axis=-2)
            forced_gt = ops.cast(ops.argmax(ops.cast(forced, "int32"), axis=-2), "int32")
            matches = ops.where(forced_any, forced_gt, matches)

        any_valid = ops.any(gt_valid, axis=-1, keepdims=True)
        return ops.cast(ops.where(any_valid, matches, BELOW_LOW_THRESHOLD), "int32")

    def get_config(self):
        return {"high_threshold": self.high_threshold, "low_threshold": self.low_threshold,
                "allow_low_quality_matches": self.allow_low_quality_matches,
                "force_match_for_each_gt": self.force_match_for_each_gt}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _scatter_mask(indices, keep, num_items):
    """Boolean ``[R, num_items]`` with True at ``indices[r, j]`` where ``keep[r, j]``."""
    rows, k = ops.shape(indices)[0], int(indices.shape[1])  # rows may be dynamic
    row_ids = ops.repeat(ops.arange(rows, dtype="int32")[:, None], k, axis=1)
    coords = ops.stack([ops.reshape(row_ids, (-1,)),
                        ops.reshape(ops.cast(indices, "int32"), (-1,))], axis=-1)
    counts = ops.scatter(coords, ops.reshape(ops.cast(keep, "int32"), (-1,)), (rows, num_items))
    return counts > 0


@keras.saving.register_keras_serializable(package="kdet")
class BalancedSampler(keras.layers.Layer):
    """Random fixed-size subset with a positive fraction (torchvision
    ``BalancedPositiveNegativeSampler``), as static-shape masks.

    Per image: ``num_pos = min(int(num_samples_per_image * positive_fraction), #positive)``
    positives and ``num_neg = min(num_samples_per_image - num_pos, #negative)``
    negatives, each a uniformly random subset (top-k of uniform random scores).

    A layer so that its ``SeedGenerator`` state is tracked by the model that
    owns it (needed for ``jax.jit`` training); ``seed`` makes it reproducible.

    Call: ``positive_mask, negative_mask = sampler(positive, negative)`` with
    bool ``[..., N]`` inputs (an element that is both counts as positive).

        >>> import numpy as np
        >>> sampler = BalancedSampler(4, 0.5, seed=0)
        >>> pos, neg = sampler(np.array([[1, 1, 1, 0, 0, 0, 0, 0]], bool),
        ...                    np.array([[0, 0, 0, 1, 1, 1, 1, 1]], bool))
        >>> int(np.sum(pos)), int(np.sum(neg))
        (2, 2)
    """

    def __init__(self, num_samples_per_image=256, positive_fraction=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        if num_samples_per_image < 1:
            raise ValueError(f"BalancedSampler: num_samples_per_image must be >= 1, "
                             f"got {num_samples_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"BalancedSampler: positive_fraction must be in [0, 1], "
                             f"got {positive_fraction}")
        self.num_samples_per_image = int(num_samples_per_image)
        self.positive_fraction = float(positive_fraction)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, positive, negative):
        positive = ops.cast(positive, "bool")
        negative = ops.logical_and(ops.cast(negative, "bool"), ops.logical_not(positive))
        # ops.shape: the batch dimension is None when Keras traces evaluate / a
        # smaller last batch; the item count stays static.
        shape = tuple(ops.shape(positive))
        num_items = int(positive.shape[-1])
        positive = ops.reshape(positive, (-1, num_items))
        negative = ops.reshape(negative, (-1, num_items))
        rows = ops.shape(positive)[0]

        scores = keras.random.uniform((rows, num_items), dtype="float32",
                                      seed=self.seed_generator)
        minus_one = ops.full_like(scores, -1.0)
        quota = int(self.num_samples_per_image * self.positive_fraction)
        k_pos = min(quota, num_items)
        if k_pos > 0:
            values, indices = ops.top_k(ops.where(positive, scores, minus_one), k_pos)
            keep = values >= 0  # ranked first, so at most min(quota, #positive) survive
            pos_mask = _scatter_mask(indices, keep, num_items)
            num_pos = ops.sum(ops.cast(keep, "int32"), axis=-1, keepdims=True)
        else:
            pos_mask = ops.zeros_like(positive)
            num_pos = ops.zeros((rows, 1), "int32")
        k_neg = min(self.num_samples_per_image, num_items)
        values, indices = ops.top_k(ops.where(negative, scores, minus_one), k_neg)
        rank = ops.arange(k_neg, dtype="int32")[None, :]
        keep = ops.logical_and(values >= 0, rank < self.num_samples_per_image - num_pos)
        neg_mask = _scatter_mask(indices, keep, num_items)
        return ops.reshape(pos_mask, shape), ops.reshape(neg_mask, shape)

    def compute_output_spec(self, positive, negative):
        spec = keras.KerasTensor(positive.shape, dtype="bool")
        return spec, keras.KerasTensor(positive.shape, dtype="bool")

    def get_config(self):
        config = super().get_config()
        config.update({"num_samples_per_image": self.num_samples_per_image,
                       "positive_fraction": self.positive_fraction, "seed": self.seed})
        return config


# --------------------------------------------------------------- target encoders
def _gt_valid(gt_labels):
    return ops.convert_to_tensor(gt_labels) >= 0


def gather_rows(values, indices):
    """``values [B, M, ...]`` gathered along M by ``indices [B, N]`` -> ``[B, N, ...]``
    (indices in ``[-M, M)``; negative ones count from the end, as ``take_along_axis``).

    One row gather of the flattened batch: Keras' ``take_along_axis`` along axis 1
    transposes all of ``values`` on TensorFlow and gathers element by element (5.7 of
    EfficientDet-Lite0's 21 ms of decoding at batch 1, its [1, 19206, 90] scores).
    """
    extra = tuple(values.shape[2:])
    # ops.shape, not .shape: the batch dimension (and, in a retraced predict, M) is None
    # when Keras traces evaluate / a smaller last batch with a dynamic batch size.
    shape = ops.shape(values)
    indices = ops.cast(indices, "int32")
    indices = ops.where(indices < 0, indices + shape[1], indices)
    offsets = ops.arange(shape[0], dtype="int32") * shape[1]
    return ops.take(ops.reshape(values, (-1,) + extra), indices + offsets[:, None], axis=0)


def _check_gt(gt_boxes, gt_labels, where):
    if len(gt_boxes.shape) != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"{where}: gt_boxes must be [B, M, 4], got {tuple(gt_boxes.shape)}")
    if tuple(gt_labels.shape) != tuple(gt_boxes.shape[:2]):
        raise ValueError(f"{where}: gt_labels must be [B, M] = {tuple(gt_boxes.shape[:2])}, "
                         f"got {tuple(gt_labels.shape)}")


def _match_and_label(boxes, gt_boxes, gt_labels, matcher):
    """Match ``boxes [A,4] | [B,A,4]`` to padded GT; returns matches, labels, matched gt boxes."""
    valid = _gt_valid(gt_labels)
    batch, num_gt = gt_boxes.shape[0], gt_boxes.shape[1]
    num_boxes = boxes.shape[-2]
    if num_gt == 0:
        matches = ops.full((batch, num_boxes), BELOW_LOW_THRESHOLD, "int32")
    else:
        quality = pairwise_iou(gt_boxes, boxes)  # [B, M, A]
        matches = matcher(quality, valid)
    foreground = matches >= 0
    if num_gt == 0:
        matched_labels = ops.zeros((batch, num_boxes), "int32")
        matched_boxes = ops.zeros((batch, num_boxes, 4), gt_boxes.dtype)
    else:
        safe = ops.maximum(matches, 0)
        matched_labels = gather_rows(ops.cast(gt_labels, "int32"), safe)
        matched_boxes = gather_rows(gt_boxes, safe)
    labels = ops.where(foreground, matched_labels,
                       ops.where(matches == BETWEEN_THRESHOLDS, IGNORE, BACKGROUND))
    matched_boxes = ops.where(foreground[..., None], matched_boxes, ops.zeros_like(matched_boxes))
    return matches, ops.cast(labels, "int32"), matched_boxes


def _best_gt_iou(boxes, gt_boxes, gt_labels):
    """Each box's highest IoU with a valid (label >= 0) GT box, ``[B, A]``; 0 without GT."""
    batch, num_gt, num_boxes = gt_boxes.shape[0], gt_boxes.shape[1], boxes.shape[-2]
    if num_gt == 0:
        return ops.zeros((batch, num_boxes), "float32")
    quality = pairwise_iou(gt_boxes, boxes)  # [B, M, A]
    quality = ops.where(_gt_valid(gt_labels)[..., None], quality, 0.0)
    return ops.max(quality, axis=-2)


def _encode_boxes(box_coder, matched_boxes, boxes, foreground):
    deltas = box_coder.encode(matched_boxes, boxes)
    return ops.where(foreground[..., None], deltas, ops.zeros_like(deltas))


def encode_dense_targets(anchors, gt_boxes, gt_labels, matcher=None, box_coder=None):
    """Dense (one-stage) targets: RetinaNet / EfficientDet.

    Args:
        anchors: ``[A, 4]`` (or ``[B, A, 4]``) xyxy.
        gt_boxes: ``[B, M, 4]`` xyxy; gt_labels: ``[B, M]`` int, ``-1`` padding.
        matcher: default ``Matcher(0.5, 0.4, allow_low_quality_matches=True)``
            (torchvision RetinaNet); EfficientDet (automl) uses
            ``Matcher(0.5, 0.5, force_match_for_each_gt=True)``.
        box_coder: default ``BoxCoder((1, 1, 1, 1))``; EfficientDet uses
            ``BoxCoder(clip=None, order="yx")``.

    Returns:
        dict with ``labels [B, A]`` int32 (class / -1 bg / -2 ignore),
        ``box_targets [B, A, 4]`` (0 off foreground), ``matched_boxes
        [B, A, 4]`` (xyxy, 0 off foreground; for IoU losses) and ``matches
        [B, A]`` (raw matcher output).
    """
    matcher = matcher or Matcher(0.5, 0.4, allow_low_quality_matches=True)
    box_coder = box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))
    gt_boxes = ops.cast(ops.convert_to_tensor(gt_boxes), "float32")
    gt_labels = ops.convert_to_tensor(gt_labels)
    anchors = ops.cast(ops.convert_to_tensor(anchors), "float32")
    _check_gt(gt_boxes, gt_labels, "encode_dense_targets")
    matches, labels, matched_boxes = _match_and_label(anchors, gt_boxes, gt_labels, matcher)
    box_targets = _encode_boxes(box_coder, matched_boxes, anchors, matches >= 0)
    return {"labels": labels, "box_targets": box_targets, "matched_boxes": matched_boxes,
            "matches": matches}


def encode_rpn_targets(anchors, gt_boxes, gt_labels, sampler=None, matcher=None, box_coder=None):
    """RPN targets (torchvision ``RegionProposalNetwork.assign_targets_to_anchors`` + sampling).

    Args:
        anchors: ``[A, 4]`` xyxy; gt_boxes ``[B, M, 4]``; gt_labels ``[B, M]``.
        sampler: a :class:`BalancedSampler` (torchvision: 256 per image, 50 %
            positive); ``None`` keeps every positive and negative.
        matcher: default ``Matcher(0.7, 0.3, allow_low_quality_matches=True)``.
        box_coder: default ``BoxCoder((1, 1, 1, 1))``.

    Returns:
        dict: ``labels [B, A]`` int32 objectness (0 object, -1 background, -2
        ignored or not sampled), ``box_targets [B, A, 4]`` (0 off the
        positives), ``matched_boxes [B, A, 4]``, ``matches [B, A]``.
    """
    matcher = matcher or Matcher(0.7, 0.3, allow_low_quality_matches=True)
    box_coder = box_coder or BoxCoder((1.0, 1.0, 1.0, 1.0))
    gt_boxes = ops.cast(ops.convert_to_tensor(gt_boxes), "float32")
    gt_labels = ops.convert_to_tensor(gt_labels)
    anchors = ops.cast(ops.convert_to_tensor(anchors), "float32")
    _check_gt(gt_boxes, gt_labels, "encode_rpn_targets")
    matches, _, matched_boxes = _match_and_label(anchors, gt_boxes, gt_labels, matcher)
    positive = matches >= 0
    negative = matches == BELOW_LOW_THRESHOLD
    if sampler is not None:
        positive, negative = sampler(positive, negative)
    labels = ops.where(positive, 0, ops.where(negative, BACKGROUND, IGNORE))
    matched_boxes = ops.where(positive[..., None], matched_boxes, ops.zeros_like(matched_boxes))
    box_targets = _encode_boxes(box_coder, matched_boxes, anchors, positive)
    return {"labels": ops.cast(labels, "int32"), "box_targets": box_targets,
            "matched_boxes": matched_boxes, "matches": matches}


def encode_roi_targets(proposals, gt_boxes, gt_labels, sampler=None, proposals_valid=None,
                       matcher=None, box_coder=None, add_gt_as_proposals=True,
                       bg_iou_low_threshold=0.0):
    """Second-stage (RoI head) targets: torchvision ``RoIHeads.select_training_samples``.

    Ground-truth boxes are appended to the proposals (``add_gt_as_proposals``),
    every candidate is matched (default ``Matcher(0.5, 0.5)``: fg IoU >= 0.5,
    bg otherwise), a :class:`BalancedSampler` (torchvision: 512 per image at
    25 % foreground) picks the RoIs, and the picked ones are packed first,
    in ascending candidate order as torchvision's ``torch.where`` gives them.

    Args:
        proposals: ``[B, P, 4]`` xyxy; proposals_valid: optional ``[B, P]`` bool
            (padded proposals are never sampled).
        gt_boxes ``[B, M, 4]``, gt_labels ``[B, M]`` (``-1`` padding).
        sampler: ``BalancedSampler``; ``None`` keeps every valid candidate.
        box_coder: default ``BoxCoder((10, 10, 5, 5))``.
        bg_iou_low_threshold: background candidates must have a best IoU of at
            least this (Fast R-CNN's ``bg_thresh_lo`` 0.1: background from
            ``[0.1, 0.5)``); 0 (torchvision) takes every candidate below the
            matcher's low threshold. With a positive value an image without
            ground truth has no background candidates.

    Returns:
        dict with ``S = min(num_samples_per_image, P + M)`` rows per image
        (``P + M`` without a sampler): ``rois [B, S, 4]``, ``labels [B, S]``
        (class / -1 bg / -2 padding), ``box_targets [B, S, 4]`` (0 off
        foreground), ``matched_boxes [B, S, 4]``, ``matches [B, S]`` (matched
        gt index for foreground — to pick mask/keypoint targets — else -1)
        and ``valid [B, S]`` bool.
    """
    matcher = matcher or Matcher(0.5, 0.5, allow_low_quality_matches=False)
    box_coder = box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0))
    proposals = ops.cast(ops.convert_to_tensor(proposals), "float32")
    gt_boxes = ops.cast(ops.convert_to_tensor(gt_boxes), "float32")
    gt_labels = ops.convert_to_tensor(gt_labels)
    _check_gt(gt_boxes, gt_labels, "encode_roi_targets")
    if len(proposals.shape) != 3 or proposals.shape[-1] != 4:
        raise ValueError(f"encode_roi_targets: proposals must be [B, P, 4], "
                         f"got {tuple(proposals.shape)}")
    if proposals_valid is None:
        proposals_valid = ops.ones(proposals.shape[:2], "bool")
    candidates_valid = ops.cast(proposals_valid, "bool")
    candidates = proposals
    if add_gt_as_proposals:
        candidates = ops.concatenate([proposals, gt_boxes], axis=1)
        candidates_valid = ops.concatenate([candidates_valid, _gt_valid(gt_labels)], axis=1)

    matches, labels, matched_boxes = _match_and_label(candidates, gt_boxes, gt_labels, matcher)
    positive = ops.logical_and(matches >= 0, candidates_valid)
    negative = ops.logical_and(matches == BELOW_LOW_THRESHOLD, candidates_valid)
    if bg_iou_low_threshold > 0:
        best_iou = _best_gt_iou(candidates, gt_boxes, gt_labels)
        negative = ops.logical_and(negative, best_iou >= bg_iou_low_threshold)
    num_candidates = candidates.shape[1]
    if sampler is not None:
        positive, negative = sampler(positive, negative)
        num_out = min(sampler.num_samples_per_image, num_candidates)
    else:
        num_out = num_candidates
    sampled = ops.logical_or(positive, negative)

    # Pack the sampled candidates first, in ascending index order.
    order_key = ops.where(sampled, num_candidates - ops.arange(num_candidates, dtype="int32"), 0)
    key, index = ops.top_k(ops.cast(order_key, "int32"), num_out)
    valid = key > 0
    fg = ops.logical_and(gather_rows(positive, index), valid)

    rois = gather_rows(candidates, index)
    labels = ops.where(fg, gather_rows(labels, index), ops.where(valid, BACKGROUND, IGNORE))
    matched_boxes = ops.where(fg[..., None], gather_rows(matched_boxes, index), 0.0)
    box_targets = _encode_boxes(box_coder, matched_boxes, rois, fg)
    matches = ops.where(fg, gather_rows(matches, index), BELOW_LOW_THRESHOLD)
    return {"rois": rois, "labels": ops.cast(labels, "int32"), "box_targets": box_targets,
            "matched_boxes": matched_boxes, "matches": ops.cast(matches, "int32"), "valid": valid}


def encode_keypoint_targets(keypoints, rois, heatmap_size=56):
    """Keypoint R-CNN heatmap targets (torchvision ``keypoints_to_heatmap``).

    Each keypoint ``(x, y)`` of the GT matched to a RoI becomes the discrete
    cell ``floor((x - x0) * S / (x1 - x0))`` (same for y) of the RoI's
    ``S x S`` heatmap; a keypoint exactly on the RoI's right / bottom edge
    takes cell ``S - 1``. It is a target only when it is labelled
    (visibility > 0) and its cell lies inside the heatmap.

    Args:
        keypoints: ``[..., R, K, 3]`` (x, y, visibility) in image pixels, the
            matched GT's keypoints of each RoI.
        rois: ``[..., R, 4]`` xyxy.
        heatmap_size: ``S`` (56).

    Returns:
        ``(targets, valid)``: ``[..., R, K]`` int32 flat index ``y * S + x``
        (0 where not valid) and bool. A degenerate RoI (zero width or height,
        where torchvision divides by zero) or a non-finite keypoint gives no
        valid target.

    >>> import numpy as np
    >>> t, v = encode_keypoint_targets(np.array([[[5., 5., 2.], [10., 10., 2.], [5., 5., 0.]]]),
    ...                                np.array([[0., 0., 10., 10.]]), 4)
    >>> np.asarray(t).tolist(), np.asarray(v).tolist()
    ([[10, 15, 0]], [[True, True, False]])
    """
    keypoints = ops.cast(ops.convert_to_tensor(keypoints), "float32")
    rois = ops.cast(ops.convert_to_tensor(rois), "float32")
    size = int(heatmap_size)
    x0, y0 = rois[..., 0:1], rois[..., 1:2]
    x1, y1 = rois[..., 2:3], rois[..., 3:4]
    width, height = x1 - x0, y1 - y0
    # torchvision: scale = S / (x1 - x0), then floor((x - x0) * scale) — the same float order.
    scale_x = size / ops.where(width > 0, width, 1.0)
    scale_y = size / ops.where(height > 0, height, 1.0)
    x, y = keypoints[..., 0], keypoints[..., 1]
    cell_x = ops.floor((x - x0) * scale_x)
    cell_y = ops.floor((y - y0) * scale_y)
    cell_x = ops.where(x == x1, float(size - 1), cell_x)
    cell_y = ops.where(y == y1, float(size - 1), cell_y)
    finite = ops.isfinite(cell_x) & ops.isfinite(cell_y)
    inside = (cell_x >= 0) & (cell_y >= 0) & (cell_x < size) & (cell_y < size)
    valid = finite & inside & (keypoints[..., 2] > 0) & (width > 0) & (height > 0)
    flat = ops.where(valid, cell_y * size + cell_x, 0.0)
    return ops.cast(flat, "int32"), valid
