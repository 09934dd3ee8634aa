"""The TensorFlow crop-and-resize route of fixed-grid RoIAlign (``kdet.ops.roi_align``).

``roi_align`` / ``multilevel_roi_align`` with ``sampling_ratio > 0`` on float32
features run ``tf.image.crop_and_resize`` on an edge-padded canvas on the TF
backend (see the module docstring). Checked here against torchvision's
``roi_align`` / ``MultiScaleRoIAlign`` (forward and autograd gradient) and
against kdet's gather route (the JAX and XLA one) on awkward RoIs: partly and
fully outside, zero and negative size, NaN, tiny maps, batch 1.

Tolerances: the route's sample positions come out of crop-and-resize's
normalised box arithmetic, a few float32 ulps of the coordinate away from
torchvision's (whose own loop is bit-reproduced by the gather route). On a
linear ramp (bilinear reads exact, small slope) that is invisible and the
outputs agree to 1e-5; on unit-variance noise, where one ulp of position
moves a read by up to ~1e-5 x the neighbour difference, to ``NOISE_TOL``. A
sample grid off by even 1/100 pixel misses both by > 1e-4. The gradient is the
gather route's (TensorFlow's CropAndResizeGradImage loses updates between CPU
threads): equal to it bit for bit, and to torchvision's within 1e-5.
"""
import contextlib
import importlib

import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, backend

from kdet.ops.roi_align import multilevel_roi_align, roi_align

# kdet.ops re-exports the function roi_align under its module's name.
roi_align_module = importlib.import_module("kdet.ops.roi_align")

TOL = 1e-5
NOISE_TOL = 5e-5

pytestmark = pytest.mark.skipif(
    backend() != "tensorflow",
    reason="the crop-and-resize route is TensorFlow-only (JAX always gathers)")
needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")

if HAVE_TORCHVISION:
    import torch
    import torchvision


def _rois(rng, image_h, image_w, batch, count=12):
    """Ordinary RoIs plus one of every awkward kind, ``[batch, count + 6, 4]``."""
    xy = rng.uniform(-0.1, 0.9, size=(batch, count, 2)) * [image_w, image_h]
    wh = np.exp(rng.uniform(np.log(2.0), np.log(max(image_h, image_w, 2.0) * 1.3),
                            size=(batch, count, 2)))
    rows = np.concatenate([xy, xy + wh], axis=-1)
    awkward = np.array([
        [-0.3 * image_w, -0.2 * image_h, 0.5 * image_w, 0.4 * image_h],   # partly outside
        [0.6 * image_w, 0.7 * image_h, 1.4 * image_w, 1.6 * image_h],      # partly outside
        [-3.0 * image_w, -2.0 * image_h, -1.5 * image_w, -1.2 * image_h],  # fully outside
        [0.3 * image_w, 0.3 * image_h, 0.3 * image_w, 0.3 * image_h],      # zero size
        [0.6 * image_w, 0.5 * image_h, 0.2 * image_w, 0.1 * image_h],      # negative size
        [0.0, 0.0, image_w, image_h],                                      # the whole image
    ])
    return np.concatenate([rows, np.repeat(awkward[None], batch, axis=0)],
                          axis=1).astype(np.float32)


def _noise(rng, shape):
    return rng.normal(size=shape).astype(np.float32)


def _ramp(rng, shape):
    """``a_c * y + b_c * x + c_c``: bilinear reads of it are exact."""
    _, height, width, channels = shape
    y = np.arange(height, dtype=np.float64)[:, None, None]
    x = np.arange(width, dtype=np.float64)[None, :, None]
    a, b, c = (rng.uniform(-0.05, 0.05, size=channels) for _ in range(3))
    ramp = np.broadcast_to(a * y + b * x + c, shape)
    return (ramp + rng.uniform(-1, 1, size=(shape[0], 1, 1, 1)) * 0.1).astype(np.float32)


@contextlib.contextmanager
def _gather_route():
    saved = roi_align_module.CROP_AND_RESIZE
    roi_align_module.CROP_AND_RESIZE = False
    try:
        yield
    finally:
        roi_align_module.CROP_AND_RESIZE = saved


def _torch_rois(rois):
    index = np.repeat(np.arange(rois.shape[0], dtype=np.float32), rois.shape[1])[:, None]
    return torch.from_numpy(np.concatenate([index, rois.reshape(-1, 4)], axis=1))


def _nchw(features, grad=False):
    return torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2))
                            ).requires_grad_(grad)


def _nhwc(output, rois):
    out = output.detach().permute(0, 2, 3, 1).numpy()
    return out.reshape(rois.shape[0], rois.shape[1], *out.shape[1:])


def _tf_value_and_grad(fn, features_list, upstream):
    import tensorflow as tf

    inputs = [tf.constant(f) for f in features_list]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = fn(inputs)
        loss = tf.reduce_sum(out * upstream)
    return np.asarray(out), [np.asarray(g) for g in tape.gradient(loss, inputs)]


def _uses_crop_and_resize(fn, *args, jit_compile=False):
    import tensorflow as tf

    graph = tf.function(fn, jit_compile=jit_compile).get_concrete_function(*args).graph
    return any(op.type == "CropAndResize" for op in graph.get_operations())


SINGLE_CASES = [  # (map h, w, scale, output, sampling_ratio, aligned, batch)
    (13, 17, 0.25, 7, 2, False, 2),
    (13, 17, 0.25, (5, 3), 2, True, 1),
    (9, 6, 1.0, 4, 1, True, 2),
    (40, 33, 1 / 8, 14, 3, False, 1),
    (1, 1, 1.0, 2, 2, True, 1),    # tiny maps
    (2, 3, 0.5, 7, 2, False, 2),
]


@needs_torchvision
@pytest.mark.parametrize("height,width,scale,out,sampling_ratio,aligned,batch", SINGLE_CASES)
def test_roi_align_matches_torchvision_forward_and_gradient(
        height, width, scale, out, sampling_ratio, aligned, batch):
    rng = np.random.default_rng(height * 100 + width)
    rois = _rois(rng, height / scale, width / scale, batch)
    out_hw = (out, out) if np.isscalar(out) else out
    upstream = _noise(rng, (batch, rois.shape[1], *out_hw, 3))
    fn = lambda f: roi_align(f[0], rois, out, scale, sampling_ratio, aligned)  # noqa: E731
    for make, tol in ((_ramp, TOL), (_noise, NOISE_TOL)):
        features = make(rng, (batch, height, width, 3))
        assert _uses_crop_and_resize(fn, [features])
        got, (grad,) = _tf_value_and_grad(fn, [features], upstream)
        x = _nchw(features, grad=True)
        ref = torchvision.ops.roi_align(x, _torch_rois(rois), out, scale, sampling_ratio,
                                        aligned)
        ref.backward(torch.from_numpy(upstream.reshape(-1, *out_hw, 3).transpose(0, 3, 1, 2)))
        np.testing.assert_allclose(got, _nhwc(ref, rois), atol=tol, rtol=tol)
        np.testing.assert_allclose(grad, x.grad.numpy().transpose(0, 2, 3, 1),
                                   atol=TOL, rtol=TOL)
        with _gather_route():
            assert not _uses_crop_and_resize(fn, [features])
            gathered, (gathered_grad,) = _tf_value_and_grad(fn, [features], upstream)
        np.testing.assert_allclose(got, gathered, atol=tol, rtol=tol)
        np.testing.assert_array_equal(grad, gathered_grad)


@needs_torchvision
@pytest.mark.parametrize("image,batch,aligned", [(64, 2, False), (256, 1, False),
                                                 (96, 1, True)])
def test_multilevel_matches_torchvision_forward_and_gradient(image, batch, aligned):
    """Every level on one canvas; RoIs partly outside read no neighbouring level."""
    from collections import OrderedDict

    rng = np.random.default_rng(image)
    levels = (2, 3, 4, 5)
    rois = _rois(rng, image, image, batch, count=30)
    upstream = _noise(rng, (batch, rois.shape[1], 7, 7, 2))
    fn = lambda f: multilevel_roi_align(f, rois, 7, levels, 2, aligned,  # noqa: E731
                                        canonical_scale=image / 4)
    names = [f"p{lv}" for lv in levels]
    for make, tol in ((_ramp, TOL), (_noise, NOISE_TOL)):
        features = [make(rng, (batch, image // 2 ** lv, image // 2 ** lv, 2)) for lv in levels]
        assert _uses_crop_and_resize(fn, features)
        got, grads = _tf_value_and_grad(fn, features, upstream)
        inputs = [_nchw(f, grad=True) for f in features]
        if aligned:  # MultiScaleRoIAlign has no aligned flag: its own level mapper + roi_align
            from torchvision.ops.poolers import LevelMapper
            mapper = LevelMapper(levels[0], levels[-1], canonical_scale=image / 4)
            flat = _torch_rois(rois)
            level = mapper([flat[:, 1:]]).numpy()
            ref = torch.zeros(flat.shape[0], 2, 7, 7)
            for index, lv in enumerate(levels):
                chosen = np.flatnonzero(level == index)
                ref[chosen] = torchvision.ops.roi_align(inputs[index], flat[chosen], 7,
                                                        2.0 ** -lv, 2, True)
        else:
            pooler = torchvision.ops.MultiScaleRoIAlign(names, 7, 2, canonical_scale=image / 4)
            ref = pooler(OrderedDict(zip(names, inputs)), [torch.from_numpy(r) for r in rois],
                         [(image, image)] * batch)
        ref.backward(torch.from_numpy(upstream.reshape(-1, 7, 7, 2).transpose(0, 3, 1, 2)))
        np.testing.assert_allclose(got, _nhwc(ref, rois), atol=tol, rtol=tol)
        for grad, x in zip(grads, inputs):
            np.testing.assert_allclose(grad, x.grad.numpy().transpose(0, 2, 3, 1),
                                       atol=TOL, rtol=TOL)
        assert max(np.abs(g).max() for g in grads[1:]) > 0.05  # upper levels were used


def test_nan_and_infinite_rois_give_finite_outputs():
    rng = np.random.default_rng(3)
    features = _noise(rng, (2, 8, 9, 4))
    rois = np.zeros((2, 4, 4), np.float32)
    rois[0, 1] = np.nan
    rois[1, 2] = [np.inf, -np.inf, np.inf, 1e30]
    rois[1, 3] = [-1e30, -1e30, 1e30, 1e30]
    out = np.asarray(roi_align(features, rois, 7, 0.5, 2, True))
    assert np.isfinite(out).all()
    out = np.asarray(multilevel_roi_align([features, features[:, ::2, ::2]], rois, 7,
                                          levels=(2, 3)))
    assert np.isfinite(out).all()


def test_xla_and_mixed_precision_take_the_gather_route():
    """No XLA kernel for CropAndResize: under jit_compile the op gathers (and compiles);
    float16 maps gather too (the route is float32 only)."""
    import tensorflow as tf

    rng = np.random.default_rng(4)
    features = _noise(rng, (1, 13, 17, 3))
    rois = _rois(rng, 52, 68, 1)
    fn = lambda f, r: roi_align(f, r, 7, 0.25, 2, False)  # noqa: E731
    assert not _uses_crop_and_resize(fn, features, rois, jit_compile=True)
    compiled = np.asarray(tf.function(fn, jit_compile=True)(features, rois))
    with _gather_route():
        expected = np.asarray(fn(features, rois))
    np.testing.assert_allclose(compiled, expected, atol=1e-6)
    assert not _uses_crop_and_resize(fn, features.astype(np.float16), rois)


def test_layer_takes_the_route_in_inference_only():
    """``MultiLevelRoIAlign`` (the R-CNN heads' pooler) crops and resizes when called for
    inference and gathers in training: there the routes' ulp differences flipped Mask
    R-CNN's RoI sampling within 3 steps of the torchvision-trainer parity test."""
    from kdet.layers import MultiLevelRoIAlign

    rng = np.random.default_rng(6)
    features = [_noise(rng, (1, 32 // 2 ** i, 32 // 2 ** i, 4)) for i in range(4)]
    rois = _rois(rng, 128, 128, 1)
    layer = MultiLevelRoIAlign(7)
    assert _uses_crop_and_resize(lambda f, r: layer(f, r, training=False), features, rois)
    assert _uses_crop_and_resize(lambda f, r: layer(f, r), features, rois)
    assert not _uses_crop_and_resize(lambda f, r: layer(f, r, training=True), features, rois)
    with _gather_route():
        expected = np.asarray(layer(features, rois))
    np.testing.assert_array_equal(np.asarray(layer(features, rois, training=True)), expected)


def test_gradient_is_deterministic_with_many_overlapping_rois():
    """512 overlapping RoIs on 4 levels, twice: the same gradient bit for bit, equal to the
    gather route's (TensorFlow's own CropAndResizeGradImage differed by ~0.5 here)."""
    import tensorflow as tf

    rng = np.random.default_rng(5)
    features = [tf.constant(_noise(rng, (2, 128 // 2 ** i, 128 // 2 ** i, 16)))
                for i in range(4)]
    rois = _rois(rng, 512, 512, 2, count=506)
    upstream = tf.constant(_noise(rng, (2, 512, 7, 7, 16)))

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            tape.watch(features)
            loss = tf.reduce_sum(multilevel_roi_align(features, rois, 7) * upstream)
        return tape.gradient(loss, features)

    first, second = gradient(), gradient()
    with _gather_route():
        gathered = tf.function(gradient.python_function)()
    for a, b, c in zip(first, second, gathered):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_inside_nested_conds_the_gather_route_runs_and_differentiates():
    """Mask R-CNN's training runs RoIAlign inside nested ops.cond (row buckets), where
    the crop-and-resize route's custom gradient cannot be differentiated: it gathers."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(6)
    features = [tf.constant(_noise(rng, (1, 32 // 2 ** i, 32 // 2 ** i, 4))) for i in range(4)]
    rois = _rois(rng, 128, 128, 1, count=10)

    def pool(count):
        return lambda: multilevel_roi_align(features, rois[:, :count], 7, canonical_scale=32)[:, :2]

    @tf.function
    def gradient(flag):
        with tf.GradientTape() as tape:
            tape.watch(features)
            out = keras.ops.cond(flag < 1, pool(2),
                                 lambda: keras.ops.cond(flag < 2, pool(4), pool(16)))
            loss = tf.reduce_sum(out * out)
        return tape.gradient(loss, features)

    got = gradient(tf.constant(1))  # with the crop route inside: AssertionError in cond_v2
    with _gather_route():
        expected = tf.function(gradient.python_function)(tf.constant(1))
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
