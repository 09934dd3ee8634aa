"""Detection losses on ``keras.ops``: focal, cross-entropy, smooth-L1 / Huber, GIoU,
mask BCE and keypoint CE.

Elementwise functions return float32 losses of the input shape (inputs in
float16 / bfloat16 are upcast first, so ``mixed_float16`` models stay finite);
reducers turn them into scalars. Padded or ignored entries are removed with
weights/masks and contribute exactly zero; every normaliser is clamped so a
batch without positives gives a finite loss (0 for the positive-only terms).

Label conventions follow :mod:`kdet.matching`: class ``>= 0`` foreground,
``-1`` background, ``-2`` ignored.

References: torchvision ``ops.sigmoid_focal_loss``,
``ops.generalized_box_iou_loss``, ``models.detection.roi_heads`` (``fastrcnn_loss``,
``maskrcnn_loss``, ``keypointrcnn_loss``), ``retinanet`` (loss normalised per
image by ``max(1, #foreground)``); automl/effdet ``det_loss`` (focal loss
normalised by ``sum(#positives) + 1``, Huber box loss with delta 0.1).

    >>> import numpy as np
    >>> logits = np.array([[[2.0, -1.0], [0.5, 0.0]]], "float32")   # [B=1, A=2, C=2]
    >>> labels = np.array([[1, -1]], "int32")                         # fg class 1, bg
    >>> onehot, weights = dense_class_targets(labels, num_classes=2)
    >>> per_anchor = np.sum(sigmoid_focal_loss(onehot, logits), -1) * weights
    >>> float(reduce_by_num_positives(per_anchor, np.array([1.0]))) > 0
    True
"""
import keras
from keras import ops

from kdet.boxes import paired_giou
from kdet.distribute import all_replicas_sum, global_mean


def _float(x):
    x = ops.convert_to_tensor(x)
    return x if x.dtype == "float32" else ops.cast(x, "float32")


def _data_format(data_format):
    data_format = data_format or keras.config.image_data_format()
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError(f"data_format must be 'channels_last' or 'channels_first', "
                         f"got {data_format!r}")
    return data_format


# ------------------------------------------------------------------ classification
def sigmoid_cross_entropy(labels, logits):
    """Elementwise ``BCEWithLogits``: ``-(t log s(x) + (1 - t) log s(-x))``, stable for any x.

    (Two log-sigmoids, not ``max(x, 0) - x t + log(1 + exp(-|x|))``: that form's two
    kinks at ``x = 0`` cancel in the gradient only where the backend's ``maximum`` and
    ``abs`` pick matching sides; JAX splits ``maximum``'s ties.)
    """
    labels, logits = _float(labels), _float(logits)
    return -(labels * ops.log_sigmoid(logits) + (1.0 - labels) * ops.log_sigmoid(-logits))


def _power(base, exponent):
    """``base ** exponent`` for ``base >= 0`` (None for exponent 0). Whole and half-whole
    exponents up to 4 (focal gammas: torchvision's 2, automl's 1.5) are products and one
    square root: TensorFlow's ``Pow`` costs ~10 ns an element on CPU, the largest single
    op of an EfficientDet-Lite0 training step at batch 1. The root reads
    ``max(base, 1e-30)`` so its gradient stays finite where ``base`` is 0 (saturated
    sigmoids), as ``pow``'s does."""
    if exponent == 0:
        return None
    whole, half = divmod(exponent, 1.0)
    if half not in (0.0, 0.5) or exponent > 4:
        return ops.power(base, exponent)
    result = ops.sqrt(ops.maximum(base, 1e-30)) if half else None
    for _ in range(int(whole)):
        result = base if result is None else result * base
    return result


def sigmoid_focal_loss(labels, logits, alpha=0.25, gamma=2.0, label_smoothing=0.0):
    """Elementwise focal loss (torchvision ``sigmoid_focal_loss``, ``reduction="none"``).

    ``alpha_t * (1 - p_t)**gamma * BCE(x, t)`` with ``p = sigmoid(x)``,
    ``p_t = p t + (1 - p)(1 - t)``, ``alpha_t = alpha t + (1 - alpha)(1 - t)``
    (``alpha < 0`` disables the weighting, as in torchvision). The BCE comes
    from log-sigmoids and ``1 - p_t = t s(-x) + (1 - t) s(x)`` so large
    logits never overflow; ``(1 - p_t)**gamma`` is products and a square root
    for automl's 1.5 and torchvision's 2 (:func:`_power`). ``label_smoothing``
    (effdet) smooths only the BCE target ``t (1 - ls) + ls / 2``, as effdet does.
    """
    labels, logits = _float(labels), _float(logits)
    one_minus_p_t = labels * ops.sigmoid(-logits) + (1.0 - labels) * ops.sigmoid(logits)
    modulating = _power(one_minus_p_t, float(gamma))
    bce_target = labels
    if label_smoothing > 0:
        bce_target = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
    loss = sigmoid_cross_entropy(bce_target, logits)
    if modulating is not None:
        loss = loss * modulating
    if alpha >= 0:
        loss = (alpha * labels + (1.0 - alpha) * (1.0 - labels)) * loss
    return loss


def focal_loss_per_image(labels, logits, alpha=0.25, gamma=2.0, label_smoothing=0.0):
    """Per image ``[B]``: :func:`sigmoid_focal_loss` summed over the classes and the anchors
    not ignored, from dense labels ``[B, A]`` (class ``>= 0`` foreground, ``-1``
    background, ``-2`` ignored; a class ``>= C`` has no positive column, as in
    :func:`dense_class_targets`) and logits ``[B, A, C]``. Equal to
    ``sum(sigmoid_focal_loss(onehot, logits) * weights)`` over the last two axes.

    On TensorFlow without label smoothing it is one custom gradient: every other column
    is scored as a negative, ``s(x)**gamma softplus(x)`` (``s`` the sigmoid), the matched
    column of each foreground anchor as a positive on ``[B, A]``, and the gradient is the
    closed form ``s**gamma (gamma (1 - s) softplus(x) + s)``. That is ~20 of TensorFlow's
    elementwise kernels over ``[B, A, C]`` for the composite's ~45: 16 against 44 ms for
    EfficientDet-Lite0's 19,206 anchors x 90 classes (1 thread), whose whole training step
    at batch 1 is ~0.27 s. Elsewhere (JAX: XLA fuses the composite) it is the composite.

        >>> import numpy as np
        >>> logits = np.zeros((1, 3, 2), "float32")
        >>> per_image = focal_loss_per_image(np.array([[1, -1, -2]]), logits, 0.25, 2.0)
        >>> # each column: weight x (1/2)**2 x log 2; one positive (0.25), three negatives (0.75)
        >>> round(float(per_image[0] / (0.25 * np.log(2))), 4)
        2.5
    """
    logits = _float(logits)
    labels = ops.cast(labels, "int32")
    if keras.backend.backend() == "tensorflow" and not label_smoothing:
        return _focal_loss_per_image_tf(labels, logits, float(alpha), float(gamma))
    onehot, weights = dense_class_targets(labels, logits.shape[-1])
    elementwise = sigmoid_focal_loss(onehot, logits, alpha, gamma, label_smoothing)
    return ops.sum(elementwise * weights[..., None], axis=(1, 2))


def _negative_focal_terms(x, gamma):
    """``(s, softplus, s**gamma or None)`` of ``x``: a negative's focal loss is
    ``s**gamma softplus`` (``1 - p_t = s``, ``BCE = softplus``), up to alpha."""
    import tensorflow as tf

    s = tf.sigmoid(x)
    softplus = tf.nn.relu(x) + tf.math.log1p(tf.exp(-tf.abs(x)))  # finite for any x
    return s, softplus, _power(s, gamma)


def _negative_focal(terms):
    _, softplus, modulating = terms
    return softplus if modulating is None else modulating * softplus


def _negative_focal_slope(terms, gamma):
    """``d/dx s**gamma softplus(x) = s**gamma (gamma (1 - s) softplus + s)``, as
    ``ds/dx = s (1 - s)`` and ``d softplus/dx = s``."""
    s, softplus, modulating = terms
    slope = gamma * (1.0 - s) * softplus + s if gamma else s
    return slope if modulating is None else modulating * slope


def _focal_loss_per_image_tf(labels, logits, alpha, gamma):
    import tensorflow as tf

    num_classes = logits.shape[-1]
    # as dense_class_targets: a class >= C is foreground without a positive column
    positive = (labels >= 0) & (labels < num_classes)
    column = tf.where(positive, labels, 0)[..., None]  # [B, A, 1]
    at_positive = tf.equal(tf.range(num_classes), tf.where(positive, labels, -1)[..., None])
    weights = tf.cast(labels != -2, "float32")
    negative_weight, positive_weight = (1.0 - alpha, alpha) if alpha >= 0 else (1.0, 1.0)

    @tf.custom_gradient
    def per_image(x):
        # the positive column is left out of the negatives' sum and scored on [B, A]:
        # subtracting its negative term back would cancel (a confident right positive's
        # negative term is ~x, its loss ~0)
        everywhere = _negative_focal_terms(x, gamma)
        negatives = tf.reduce_sum(tf.where(at_positive, 0.0, _negative_focal(everywhere)), -1)
        as_positive = _negative_focal_terms(-tf.gather(x, column, batch_dims=2)[..., 0], gamma)
        positives = tf.where(positive, _negative_focal(as_positive), 0.0)
        value = tf.reduce_sum(weights * (negative_weight * negatives
                                         + positive_weight * positives), -1)

        def gradient(upstream):  # [B]
            anchor_weight = upstream[:, None] * weights  # [B, A]
            d_negative = (negative_weight * anchor_weight)[..., None] * _negative_focal_slope(
                everywhere, gamma)
            d_positive = -positive_weight * anchor_weight * _negative_focal_slope(
                as_positive, gamma)
            return tf.where(at_positive, d_positive[..., None], d_negative)

        return value, gradient

    return per_image(logits)


def dense_class_targets(labels, num_classes):
    """One-hot targets and weights from dense class labels (class / -1 bg / -2 ignore).

    Returns ``onehot [..., num_classes]`` float32 (all zero for background and
    ignored) and ``weights [...]`` float32 (0 for ignored, 1 otherwise), the
    torchvision RetinaNet ``valid_idxs`` and effdet ``!= -2`` masks.
    """
    labels = ops.cast(labels, "int32")
    onehot = ops.one_hot(ops.maximum(labels, 0), num_classes, dtype="float32")
    onehot = onehot * ops.cast(labels >= 0, "float32")[..., None]
    return onehot, ops.cast(labels != -2, "float32")


def softmax_cross_entropy_with_background(labels, logits, background_index=0):
    """Elementwise softmax cross-entropy over ``C + 1`` columns with a background column.

    ``labels`` follow kdet's dense code: class ``c >= 0`` is column ``c + 1``
    when ``background_index=0`` (torchvision Fast/Faster R-CNN layout) or
    column ``c`` when ``background_index=-1`` (background last); ``-1`` is
    the background column; ``< -1`` (ignored / padding) gives exactly 0.
    torchvision ``fastrcnn_loss`` is the mean of this over the sampled RoIs.
    """
    logits = _float(logits)
    labels = ops.cast(labels, "int32")
    num_columns = logits.shape[-1]
    if background_index == 0:
        column = ops.where(labels >= 0, labels + 1, 0)
    elif background_index in (-1, num_columns - 1):
        column = ops.where(labels >= 0, labels, num_columns - 1)
    else:
        raise ValueError(f"softmax_cross_entropy_with_background: background_index must be 0 "
                         f"or -1 (last), got {background_index}")
    column = ops.clip(column, 0, num_columns - 1)
    log_probs = ops.log_softmax(logits, axis=-1)
    picked = ops.take_along_axis(log_probs, column[..., None], axis=-1)[..., 0]
    return ops.where(labels >= -1, -picked, ops.zeros_like(picked))


# ---------------------------------------------------------------------- regression
def smooth_l1_loss(pred, target, beta=1.0 / 9):
    """Elementwise smooth-L1 (torch ``F.smooth_l1_loss``): ``0.5 x^2 / beta`` if ``|x| < beta``
    else ``|x| - 0.5 beta``; ``beta < 1e-5`` is plain L1 (torchvision ``_box_loss``).
    torchvision uses ``beta=1/9`` in the RPN and box head."""
    diff = ops.abs(_float(pred) - _float(target))
    if beta < 1e-5:
        return diff
    return ops.where(diff < beta, 0.5 * ops.square(diff) / beta, diff - 0.5 * beta)


def l1_loss(pred, target):
    """Elementwise ``|pred - target|`` (torchvision RetinaNet box loss)."""
    return ops.abs(_float(pred) - _float(target))


def huber_loss(pred, target, delta=0.1):
    """Elementwise Huber (automl / tf.keras ``Huber``): ``0.5 x^2`` if ``|x| <= delta``
    else ``delta (|x| - 0.5 delta)``. automl's box loss sums this over the
    positive anchors and divides by ``4 * (sum(#positives) + 1)``."""
    diff = ops.abs(_float(pred) - _float(target))
    quadratic = ops.minimum(diff, delta)
    return 0.5 * ops.square(quadratic) + delta * (diff - quadratic)


def giou_loss(pred_boxes, target_boxes):
    """Elementwise ``1 - GIoU`` of aligned xyxy boxes (torchvision
    ``generalized_box_iou_loss``, ``reduction="none"``; degenerate pairs give 1, not NaN)."""
    return 1.0 - paired_giou(_float(pred_boxes), _float(target_boxes))


# -------------------------------------------------------------------- reductions
def weighted_mean(loss, weights):
    """``sum(loss * weights) / max(sum(weights), 1)`` — mean over the valid entries.

    Under ``tf.distribute`` the count is the global batch's (this replica's share of the
    mean, :func:`kdet.distribute.global_mean`); elsewhere the plain mean.
    """
    loss, weights = _float(loss), _float(weights)
    return global_mean(ops.sum(loss * weights), ops.sum(weights))


def reduce_by_num_positives(loss, num_positives, convention="torchvision"):
    """Scalar from a masked elementwise loss ``[B, ...]`` and ``num_positives [B]``.

    ``"torchvision"`` (RetinaNet): ``mean_b(sum(loss_b) / max(1, n_b))``.
    ``"automl"`` (EfficientDet): ``sum(loss) / (sum_b n_b + 1)``.

    Under ``tf.distribute`` the mean over images and the sum of positives are the global
    batch's (this replica's share, :mod:`kdet.distribute`), so a run is the same whatever
    the number of devices.
    """
    loss = _float(loss)
    num_positives = _float(num_positives)
    if convention == "torchvision":
        # sum over everything but the batch axis (no reshape: the batch may be dynamic)
        per_image = ops.sum(loss, axis=tuple(range(1, len(loss.shape)))) \
            if len(loss.shape) > 1 else loss
        images = ops.cast(ops.shape(per_image)[0], "float32")
        return global_mean(ops.sum(per_image / ops.maximum(num_positives, 1.0)), images)
    if convention == "automl":
        return ops.sum(loss) / (all_replicas_sum(ops.sum(num_positives)) + 1.0)
    raise ValueError(f"reduce_by_num_positives: convention must be 'torchvision' or 'automl', "
                     f"got {convention!r}")


# ---------------------------------------------------------------- mask / keypoint
def mask_bce_loss(mask_logits, labels, mask_targets, valid=None, data_format=None):
    """Mask R-CNN mask loss (torchvision ``maskrcnn_loss``).

    Binary cross-entropy between the logits of each RoI's own class channel
    and its ``M x M`` target, averaged over valid RoIs and pixels.

    Args:
        mask_logits: ``[..., R, M, M, C]`` (channels-last) or ``[..., R, C, M, M]``.
        labels: ``[..., R]`` int, the channel of each RoI's class.
        mask_targets: ``[..., R, M, M]`` in ``[0, 1]``.
        valid: ``[..., R]`` bool (foreground, non-padded RoIs); default all.
        data_format: ``"channels_last"`` / ``"channels_first"`` (default Keras').

    Returns a scalar; 0 when no RoI is valid. Under ``tf.distribute`` the mean is over the
    valid RoIs of the global batch (this replica's share of it).
    """
    total, count = mask_bce_sum(mask_logits, labels, mask_targets, valid, data_format)
    # the count of the global batch under tf.distribute (kdet.distribute.global_mean)
    return global_mean(total, count)


def mask_bce_sum(mask_logits, labels, mask_targets, valid=None, data_format=None):
    """:func:`mask_bce_loss` before the mean: ``(sum of the per-pixel BCE over the valid
    RoIs, valid RoIs x M x M)``, two float32 scalars (arguments as ``mask_bce_loss``)."""
    channels_last = _data_format(data_format) == "channels_last"
    logits = _float(mask_logits)
    targets = _float(mask_targets)
    num_channels = logits.shape[-1] if channels_last else logits.shape[-3]
    channel = ops.clip(ops.cast(labels, "int32"), 0, num_channels - 1)
    # The RoI's own channel as a product with its one-hot class: its gradient is an outer
    # product, where take_along_axis' is a scatter (UnsortedSegmentSum on TF) over all C
    # channels, ~6x slower at [8, 128, 28, 28, 91]. Equal values while the logits are finite.
    one_hot = ops.one_hot(channel, num_channels, dtype=logits.dtype)
    picked = ops.einsum("...hwc,...c->...hw" if channels_last else "...chw,...c->...hw",
                        logits, one_hot)
    pixel_loss = sigmoid_cross_entropy(targets, picked)
    if valid is None:
        valid = ops.ones(picked.shape[:-2], "bool")
    weights = ops.cast(valid, "float32")
    pixels = float(picked.shape[-1] * picked.shape[-2])
    total = ops.sum(ops.sum(pixel_loss, axis=(-2, -1)) * weights)
    return total, ops.sum(weights) * pixels


def keypoint_loss(keypoint_logits, keypoint_targets, valid, data_format=None):
    """Keypoint R-CNN loss (torchvision ``keypointrcnn_loss``).

    Softmax cross-entropy over the ``S * S`` positions of each keypoint's
    heatmap against its one-hot target, averaged over valid keypoints.

    Args:
        keypoint_logits: ``[..., R, S, S, K]`` (channels-last) or ``[..., R, K, S, S]``.
        keypoint_targets: ``[..., R, K]`` int flat index ``y * S + x``.
        valid: ``[..., R, K]`` bool (visible keypoint of a foreground RoI).

    Returns a scalar; 0 when no keypoint is valid. Under ``tf.distribute`` the mean is over
    the valid keypoints of the global batch (this replica's share of it).
    """
    channels_last = _data_format(data_format) == "channels_last"
    logits = _float(keypoint_logits)
    if channels_last:
        logits = ops.moveaxis(logits, -1, -3)  # -> [..., R, K, S, S]
    size_h, size_w = logits.shape[-2], logits.shape[-1]
    logits = ops.reshape(logits, tuple(ops.shape(logits)[:-2]) + (size_h * size_w,))
    target = ops.clip(ops.cast(keypoint_targets, "int32"), 0, size_h * size_w - 1)
    log_probs = ops.log_softmax(logits, axis=-1)
    nll = -ops.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
    return weighted_mean(nll, ops.cast(valid, "float32"))


# ------------------------------------------------------------ Keras Loss classes
@keras.saving.register_keras_serializable(package="kdet")
class SigmoidFocalLoss(keras.losses.Loss):
    """Keras loss wrapper of :func:`sigmoid_focal_loss` (``y_true`` one-hot, ``y_pred`` logits),
    summed over the class axis before the Keras reduction."""

    def __init__(self, alpha=0.25, gamma=2.0, label_smoothing=0.0, name="sigmoid_focal_loss",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        return ops.sum(sigmoid_focal_loss(y_true, y_pred, self.alpha, self.gamma,
                                          self.label_smoothing), axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update({"alpha": self.alpha, "gamma": self.gamma,
                       "label_smoothing": self.label_smoothing})
        return config


@keras.saving.register_keras_serializable(package="kdet")
class SmoothL1Loss(keras.losses.Loss):
    """Keras loss wrapper of :func:`smooth_l1_loss`, summed over the last (box) axis."""

    def __init__(self, beta=1.0 / 9, name="smooth_l1_loss", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.beta = float(beta)

    def call(self, y_true, y_pred):
        return ops.sum(smooth_l1_loss(y_pred, y_true, self.beta), axis=-1)

    def get_config(self):
        config = super().get_config()
        config["beta"] = self.beta
        return config


@keras.saving.register_keras_serializable(package="kdet")
class GIoULoss(keras.losses.Loss):
    """Keras loss wrapper of :func:`giou_loss` (xyxy boxes, ``[..., 4]``)."""

    def __init__(self, name="giou_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return giou_loss(y_pred, y_true)
