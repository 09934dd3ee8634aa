"""Losses vs their formulas written out in NumPy (float64), and vs torchvision /
torch / Keras implementations when importable."""
import keras
import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, backend

from kdet import losses as L


def np_(x):
    return keras.ops.convert_to_numpy(x)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def focal_reference(t, x, alpha, gamma, smoothing=0.0):
    x = x.astype(np.float64)
    p = _sigmoid(x)
    ts = t * (1 - smoothing) + 0.5 * smoothing
    ce = np.logaddexp(0, x) - ts * x  # = -(ts log p + (1-ts) log(1-p)), stable
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def _jit(fn):
    if backend() == "tensorflow":
        import tensorflow as tf
        return tf.function(fn, jit_compile=True)
    if backend() == "jax":
        import jax
        return jax.jit(fn)
    pytest.skip(f"no jit test for backend {backend()}")


# ------------------------------------------------------------------- focal
@pytest.mark.parametrize("alpha,gamma,smoothing", [(0.25, 2.0, 0.0), (0.25, 1.5, 0.0),
                                                   (-1.0, 0.0, 0.0), (0.25, 1.5, 0.1)])
def test_focal_matches_formula(rng, alpha, gamma, smoothing):
    x = rng.normal(0, 4, (3, 50, 6)).astype("float32")
    x[0, 0, :3] = [60.0, -60.0, 0.0]
    t = (rng.random((3, 50, 6)) < 0.2).astype("float32")
    t[0, 0, :3] = [0.0, 1.0, 1.0]  # confidently wrong: the loss is large, not inf
    out = np_(L.sigmoid_focal_loss(t, x, alpha, gamma, smoothing))
    np.testing.assert_allclose(out, focal_reference(t, x, alpha, gamma, smoothing),
                               rtol=1e-5, atol=1e-6)
    assert np.isfinite(out).all() and out[0, 0, 0] > 10


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_focal_matches_torchvision(rng):
    import torch
    from torchvision.ops import sigmoid_focal_loss

    x = rng.normal(0, 3, (200, 7)).astype("float32")
    t = (rng.random((200, 7)) < 0.3).astype("float32")
    for alpha, gamma in [(0.25, 2.0), (0.5, 1.5), (-1, 2.0)]:
        ref = sigmoid_focal_loss(torch.from_numpy(x), torch.from_numpy(t), alpha, gamma).numpy()
        np.testing.assert_allclose(np_(L.sigmoid_focal_loss(t, x, alpha, gamma)), ref,
                                   rtol=1e-5, atol=1e-7)


def test_dense_targets_and_reductions(rng):
    labels = np.array([[2, -1, -2, 0, -1], [-1, -1, -2, -1, -1]], "int32")
    onehot, weights = L.dense_class_targets(labels, 3)
    np.testing.assert_array_equal(np_(onehot)[0], [[0, 0, 1], [0, 0, 0], [0, 0, 0],
                                                   [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(np_(weights), [[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])
    loss = rng.random((2, 5)).astype("float32")
    num_pos = np.array([2.0, 0.0], "float32")
    tv = np_(L.reduce_by_num_positives(loss, num_pos, "torchvision"))
    np.testing.assert_allclose(tv, (loss[0].sum() / 2 + loss[1].sum() / 1) / 2, rtol=1e-6)
    automl = np_(L.reduce_by_num_positives(loss, num_pos, "automl"))
    np.testing.assert_allclose(automl, loss.sum() / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="convention"):
        L.reduce_by_num_positives(loss, num_pos, "detectron")


def test_ignored_entries_contribute_nothing(rng):
    x = rng.normal(0, 2, (2, 30, 4)).astype("float32")
    labels = rng.integers(-2, 4, (2, 30)).astype("int32")
    onehot, weights = L.dense_class_targets(labels, 4)

    def total(logits):
        per_anchor = keras.ops.sum(L.sigmoid_focal_loss(onehot, logits), -1) * weights
        return L.reduce_by_num_positives(per_anchor, keras.ops.sum(
            keras.ops.cast(labels >= 0, "float32"), -1))

    x2 = x.copy()
    x2[labels == -2] = rng.normal(0, 50, x2[labels == -2].shape)
    np.testing.assert_allclose(np_(total(x)), np_(total(x2)), rtol=1e-6)
    # No positives at all: finite.
    none, w0 = L.dense_class_targets(np.full((2, 30), -1, "int32"), 4)
    value = np_(L.reduce_by_num_positives(
        keras.ops.sum(L.sigmoid_focal_loss(none, x), -1) * w0, np.zeros(2, "float32")))
    assert np.isfinite(value) and value > 0


def _value_and_gradient(fn, x, upstream):
    """``fn(x)`` and the gradient of ``sum(upstream * fn(x))`` on the active backend."""
    if backend() == "jax":
        import jax
        return np_(fn(x)), np_(jax.grad(lambda v: keras.ops.sum(upstream * fn(v)))(x))
    import tensorflow as tf
    variable = tf.Variable(x)
    with tf.GradientTape() as tape:
        value = fn(variable)
        total = tf.reduce_sum(upstream * value)
    return np_(value), np_(tape.gradient(total, variable))


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.25, 1.5), (-1.0, 0.0), (0.5, 3.0),
                                         (0.25, 1.0)])
def test_focal_loss_per_image_matches_torchvision_value_and_gradient(rng, alpha, gamma):
    """The detectors' classification loss (TensorFlow: one closed-form custom gradient;
    JAX: the composite) against torchvision's ``sigmoid_focal_loss`` in float64 and torch's
    autograd, on awkward logits: saturated (+-60, +-100) on the matched class and off it,
    exact zeros, ties; labels with foreground, background, ignored, a class past the last
    column (foreground without a positive column, as ``dense_class_targets``), an image
    with no foreground and one all ignored."""
    import torch
    from torchvision.ops import sigmoid_focal_loss

    classes = 5
    x = rng.normal(-2, 4, (4, 40, classes)).astype("float32")
    labels = rng.choice([-2, -1, -1, -1, 0, 1, 2, 3, 4], (4, 40)).astype("int32")
    labels[0, :6] = [0, 1, 2, 3, 7, -1]
    x[0, 0, 0], x[0, 0, 1] = 100.0, -100.0   # matched column confident and right; other wrong
    x[0, 1, 1], x[0, 1, 0] = -60.0, 60.0     # matched column confidently wrong
    x[0, 2] = 0.0
    x[0, 3] = 1.25                            # ties across the row
    labels[1] = -1                            # no foreground
    labels[2] = -2                            # everything ignored
    upstream = rng.uniform(0.5, 2.0, (4,)).astype("float32")

    value, grad = _value_and_gradient(
        lambda v: L.focal_loss_per_image(labels, v, alpha, gamma), x, upstream)

    onehot = np.zeros((4, 40, classes))
    fg = (labels >= 0) & (labels < classes)
    onehot[fg, labels[fg]] = 1.0
    weights = torch.from_numpy((labels != -2).astype("float64"))[..., None]
    reference = torch.from_numpy(x.astype("float64")).requires_grad_()
    per_image = (sigmoid_focal_loss(reference, torch.from_numpy(onehot), alpha, gamma,
                                    reduction="none") * weights).sum((1, 2))
    (per_image * torch.from_numpy(upstream.astype("float64"))).sum().backward()
    np.testing.assert_allclose(value, per_image.detach().numpy(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(grad, reference.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert value[2] == 0 and (grad[2] == 0).all() and (grad[labels == -2] == 0).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_loss_per_image_is_the_summed_elementwise_loss(rng, smoothing):
    """Label smoothing (effdet's) takes the composite on every backend: equal to the
    weighted sum of :func:`sigmoid_focal_loss`, as is the unsmoothed route."""
    x = rng.normal(0, 3, (2, 30, 4)).astype("float32")
    labels = rng.integers(-2, 4, (2, 30)).astype("int32")
    onehot, weights = L.dense_class_targets(labels, 4)
    expected = np_(keras.ops.sum(L.sigmoid_focal_loss(onehot, x, 0.25, 1.5, smoothing)
                                 * weights[..., None], axis=(1, 2)))
    np.testing.assert_allclose(np_(L.focal_loss_per_image(labels, x, 0.25, 1.5, smoothing)),
                               expected, rtol=1e-5)


# ----------------------------------------------------------- softmax CE
@pytest.mark.parametrize("background_index", [0, -1])
def test_softmax_ce_with_background(rng, background_index):
    logits = rng.normal(0, 3, (4, 20, 6)).astype("float32")
    labels = rng.integers(-2, 5, (4, 20)).astype("int32")
    out = np_(L.softmax_cross_entropy_with_background(labels, logits, background_index))
    z = logits.astype(np.float64)
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    if background_index == 0:
        column = np.where(labels >= 0, labels + 1, 0)
    else:
        column = np.where(labels >= 0, labels, 5)
    expected = -np.take_along_axis(log_probs, np.clip(column, 0, 5)[..., None], -1)[..., 0]
    expected[labels == -2] = 0
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_softmax_ce_matches_torch_fastrcnn(rng):
    import torch
    import torch.nn.functional as F

    logits = rng.normal(0, 3, (64, 5)).astype("float32")
    tv_labels = rng.integers(0, 5, 64)  # torchvision: 0 background, class c at column c
    ours = tv_labels - 1  # kdet: 0-based class, -1 background
    loss = L.weighted_mean(L.softmax_cross_entropy_with_background(ours, logits),
                           np.ones(64, "float32"))
    ref = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(tv_labels)).item()
    np.testing.assert_allclose(np_(loss), ref, rtol=1e-5)


# ------------------------------------------------------------- regression
@pytest.mark.parametrize("beta", [1.0 / 9, 1.0, 0.0])
def test_smooth_l1(rng, beta):
    pred = rng.normal(0, 1, (3, 40, 4)).astype("float32")
    target = rng.normal(0, 1, (3, 40, 4)).astype("float32")
    d = np.abs(pred.astype(np.float64) - target)
    expected = d if beta == 0 else np.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta)
    np.testing.assert_allclose(np_(L.smooth_l1_loss(pred, target, beta)), expected, rtol=1e-5,
                               atol=1e-7)
    if HAVE_TORCHVISION:
        import torch
        import torch.nn.functional as F
        ref = F.smooth_l1_loss(torch.from_numpy(pred), torch.from_numpy(target), reduction="none",
                               beta=beta).numpy()
        np.testing.assert_allclose(np_(L.smooth_l1_loss(pred, target, beta)), ref, rtol=1e-5,
                                   atol=1e-7)
    np.testing.assert_allclose(np_(L.l1_loss(pred, target)), d, rtol=1e-6)


def test_huber(rng):
    pred = rng.normal(0, 0.2, (3, 40, 4)).astype("float32")
    target = rng.normal(0, 0.2, (3, 40, 4)).astype("float32")
    d = np.abs(pred.astype(np.float64) - target)
    expected = np.where(d <= 0.1, 0.5 * d ** 2, 0.1 * (d - 0.05))
    out = np_(L.huber_loss(pred, target, 0.1))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-8)
    # Keras' Huber averages over the last axis.
    keras_ref = np_(keras.losses.huber(target, pred, delta=0.1))
    np.testing.assert_allclose(out.mean(-1), keras_ref, rtol=1e-5, atol=1e-8)


def _giou_np(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)

    def area(x):
        return np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)

    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a) + area(b) - inter
    ewh = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
    enclose = ewh[..., 0] * ewh[..., 1]
    return 1 - (inter / union - (enclose - union) / enclose)


def _boxes(rng, n):
    xy = rng.uniform(0, 50, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(1, 30, (n, 2))], -1).astype("float32")


def test_giou_loss(rng):
    a, b = _boxes(rng, 300), _boxes(rng, 300)
    b[:5] = a[:5]  # identical -> 0
    out = np_(L.giou_loss(a, b))
    np.testing.assert_allclose(out, _giou_np(a, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:5], 0, atol=1e-6)
    assert (out >= 0).all() and (out <= 2).all()
    zero = np.zeros((2, 4), "float32")
    np.testing.assert_array_equal(np_(L.giou_loss(zero, zero)), [1, 1])  # padding: finite
    if HAVE_TORCHVISION:
        import torch
        from torchvision.ops import generalized_box_iou_loss
        ref = generalized_box_iou_loss(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------- mask / keypoint
def _bce_np(t, x):
    x = x.astype(np.float64)
    return np.logaddexp(0, x) - t * x


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_mask_bce_loss(rng, data_format):
    rois, classes, size = 7, 4, 6
    logits = rng.normal(0, 2, (rois, classes, size, size)).astype("float32")
    labels = rng.integers(0, classes, rois).astype("int32")
    targets = (rng.random((rois, size, size)) < 0.4).astype("float32")
    valid = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    picked = logits[np.arange(rois), labels]
    expected = _bce_np(targets, picked)[valid].mean()
    given = logits if data_format == "channels_first" else logits.transpose(0, 2, 3, 1)
    out = np_(L.mask_bce_loss(given, labels, targets, valid, data_format=data_format))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    if HAVE_TORCHVISION:
        import torch
        import torch.nn.functional as F
        ref = F.binary_cross_entropy_with_logits(torch.from_numpy(picked[valid]),
                                                 torch.from_numpy(targets[valid])).item()
        np.testing.assert_allclose(out, ref, rtol=1e-5)
    # Invalid RoIs (any label, garbage logits) change nothing; none valid -> 0.
    labels2, given2 = labels.copy(), given.copy()
    labels2[~valid] = -1
    given2[~valid] = 1e4
    np.testing.assert_allclose(np_(L.mask_bce_loss(given2, labels2, targets, valid,
                                                   data_format=data_format)), out, rtol=1e-6)
    assert np_(L.mask_bce_loss(given, labels, targets, np.zeros(rois, bool),
                               data_format=data_format)) == 0


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_mask_bce_loss_gradient_with_batch_dimension(rng, data_format):
    """Value and gradient with leading ``[B, R]`` dimensions equal torch autograd through
    torchvision's indexing pick: the gradient lives only in each valid RoI's own channel."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    batch, rois, classes, size = 2, 5, 3, 4
    logits = rng.normal(0, 2, (batch, rois, classes, size, size)).astype("float32")
    labels = rng.integers(0, classes, (batch, rois)).astype("int32")
    targets = (rng.random((batch, rois, size, size)) < 0.5).astype("float32")
    valid = rng.random((batch, rois)) < 0.7
    valid[0, 0] = True
    given = logits if data_format == "channels_first" else logits.transpose(0, 1, 3, 4, 2)
    reference = torch.from_numpy(logits).requires_grad_()
    picked = reference[torch.arange(batch)[:, None], torch.arange(rois)[None],
                       torch.from_numpy(labels).long()]
    mask = torch.from_numpy(valid)
    expected = F.binary_cross_entropy_with_logits(picked[mask], torch.from_numpy(targets)[mask])
    expected.backward()
    expected_grad = reference.grad.numpy()

    value, grad = _value_and_gradient(
        lambda x: L.mask_bce_loss(x, labels, targets, valid, data_format=data_format), given,
        1.0)
    grad = grad if data_format == "channels_first" else grad.transpose(0, 1, 4, 2, 3)
    np.testing.assert_allclose(value, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-9)
    own = valid[..., None] & (labels[..., None] == np.arange(classes))  # [B, R, C]
    assert (grad[~own] == 0).all() and (np.abs(grad[own]).sum(axis=(-2, -1)) > 0).all()


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_keypoint_loss(rng, data_format):
    rois, kps, size = 5, 3, 8
    logits = rng.normal(0, 2, (rois, kps, size, size)).astype("float32")
    targets = rng.integers(0, size * size, (rois, kps)).astype("int32")
    valid = rng.random((rois, kps)) < 0.6
    flat = logits.reshape(rois, kps, -1).astype(np.float64)
    log_probs = flat - np.log(np.exp(flat).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    expected = nll[valid].mean()
    given = logits if data_format == "channels_first" else logits.transpose(0, 2, 3, 1)
    out = np_(L.keypoint_loss(given, targets, valid, data_format=data_format))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    if HAVE_TORCHVISION:
        import torch
        import torch.nn.functional as F
        keep = valid.reshape(-1)
        ref = F.cross_entropy(torch.from_numpy(logits.reshape(rois * kps, -1)[keep]),
                              torch.from_numpy(targets.reshape(-1)[keep].astype("int64")))
        np.testing.assert_allclose(out, ref.item(), rtol=1e-5)
    assert np_(L.keypoint_loss(given, targets, np.zeros_like(valid), data_format=data_format)) == 0


# ------------------------------------------------- jit, precision, Keras API
def test_losses_under_jit_with_zero_positives_and_gradients(rng):
    logits = rng.normal(0, 2, (2, 30, 3)).astype("float32")
    labels = np.full((2, 30), -1, "int32")
    labels[0, :3] = [0, 2, -2]
    deltas = rng.normal(0, 1, (2, 30, 4)).astype("float32")
    targets = rng.normal(0, 1, (2, 30, 4)).astype("float32")

    def total(logits, deltas, labels, targets):
        onehot, weights = L.dense_class_targets(labels, 3)
        fg = keras.ops.cast(labels >= 0, "float32")
        num_pos = keras.ops.sum(fg, -1)
        cls = L.reduce_by_num_positives(
            keras.ops.sum(L.sigmoid_focal_loss(onehot, logits), -1) * weights, num_pos)
        box = L.reduce_by_num_positives(
            keras.ops.sum(L.huber_loss(deltas, targets), -1) * fg, num_pos, "automl")
        return cls + box

    eager = np_(total(logits, deltas, labels, targets))
    jitted = np_(_jit(total)(logits, deltas, labels, targets))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)
    none = np.full((2, 30), -1, "int32")
    assert np.isfinite(np_(_jit(total)(logits, deltas, none, targets)))
    if backend() == "jax":
        import jax
        grads = jax.grad(total, argnums=(0, 1))(logits, deltas, labels, targets)
    else:
        import tensorflow as tf
        lv, dv = tf.Variable(logits), tf.Variable(deltas)
        with tf.GradientTape() as tape:
            value = total(lv, dv, labels, targets)
        grads = tape.gradient(value, [lv, dv])
    g_logits, g_deltas = np_(grads[0]), np_(grads[1])
    assert np.isfinite(g_logits).all() and np.isfinite(g_deltas).all()
    np.testing.assert_array_equal(g_logits[labels == -2], 0)  # ignored: no gradient
    np.testing.assert_array_equal(g_deltas[labels < 0], 0)    # background: no box gradient


def test_float16_inputs_are_finite(rng):
    logits = (rng.normal(0, 8, (2, 20, 3))).astype("float16")
    onehot = (rng.random((2, 20, 3)) < 0.3).astype("float16")
    out = L.sigmoid_focal_loss(onehot, logits, 0.25, 1.5)
    assert out.dtype == "float32" and np.isfinite(np_(out)).all()
    np.testing.assert_allclose(np_(out), focal_reference(onehot.astype("float32"),
                                                         logits.astype("float32"), 0.25, 1.5),
                               rtol=1e-4, atol=1e-6)
    boxes = _boxes(rng, 10).astype("float16")
    assert np.isfinite(np_(L.giou_loss(boxes, boxes[::-1]))).all()
    assert np.isfinite(np_(L.smooth_l1_loss(boxes, boxes[::-1]))).all()
    masks = rng.normal(0, 20, (3, 4, 4, 2)).astype("float16")
    value = L.mask_bce_loss(masks, np.array([0, 1, 1]), np.ones((3, 4, 4), "float16"))
    assert np.isfinite(np_(value))


@pytest.mark.parametrize("cls,kwargs", [(L.SigmoidFocalLoss, {"alpha": 0.25, "gamma": 1.5}),
                                        (L.SmoothL1Loss, {"beta": 0.5}), (L.GIoULoss, {})])
def test_keras_loss_classes(rng, cls, kwargs):
    loss = cls(**kwargs)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(clone) is cls and clone.get_config() == loss.get_config()
    if cls is L.GIoULoss:
        y_true, y_pred = _boxes(rng, 8), _boxes(rng, 8)
        expected = _giou_np(y_pred, y_true).mean()
    elif cls is L.SmoothL1Loss:
        y_true = rng.normal(size=(8, 4)).astype("float32")
        y_pred = rng.normal(size=(8, 4)).astype("float32")
        d = np.abs(y_true - y_pred)
        expected = np.where(d < 0.5, d ** 2, d - 0.25).sum(-1).mean()
    else:
        y_true = (rng.random((8, 5)) < 0.3).astype("float32")
        y_pred = rng.normal(size=(8, 5)).astype("float32")
        expected = focal_reference(y_true, y_pred, 0.25, 1.5).sum(-1).mean()
    np.testing.assert_allclose(np_(clone(y_true, y_pred)), expected, rtol=1e-5)
