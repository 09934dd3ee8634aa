"""RoIAlign / RoIPool / level mapping / multi-level RoIAlign vs torchvision semantics.

The references below transcribe torchvision's CPU kernels
(``roi_align_forward_kernel_impl`` + ``pre_calc_for_bilinear_interpolate``,
``roi_pool_forward_kernel_impl``) loop by loop in NumPy float32 scalars, so
they are independent of the vectorised keras.ops code under test. When
torchvision is importable the ops (and the references) are also compared with
``torchvision.ops.roi_align / roi_pool / MultiScaleRoIAlign / LevelMapper``.
"""
import math

import keras
import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, backend

import kdet.ops
from kdet.layers.roi import MultiLevelRoIAlign, RoIAlign, RoIPool
from kdet.ops.roi_align import map_roi_levels, multilevel_roi_align, roi_align
from kdet.ops.roi_pool import roi_pool

if HAVE_TORCHVISION:
    import torch
    import torchvision

F32 = np.float32
TOL = 1e-5
needs_torchvision = pytest.mark.skipif(
    not HAVE_TORCHVISION, reason="torchvision not importable: reference-only comparison")

# Largest deviations seen, printed at the end of the session (pytest -s).
DEVIATIONS = {}


def _record(name, value):
    DEVIATIONS[name] = max(DEVIATIONS.get(name, 0.0), float(value))


def _run(fn, *arrays):
    """``fn(*arrays)`` as NumPy: eager on TensorFlow, under ``jax.jit`` on JAX.

    Eager JAX compiles every primitive for every new shape (seconds per call
    on a shared CPU); one jit per call is 10x cheaper. Eager JAX is still
    covered by ``test_roi_align_compiled_matches_reference``.
    """
    if backend() == "jax":
        import jax
        return np.asarray(jax.jit(fn)(*arrays))
    return np.asarray(fn(*arrays))


def _crop_and_resize_tol(sampling_ratio):
    """Tolerance vs torchvision where TF takes the crop-and-resize route (fixed grid):
    its sample positions are a few float32 ulps off torchvision's, which on
    unit-variance noise on maps over ~64 px reaches 2e-5 (see
    test_ops_roi_crop_and_resize.py, which checks that route on its own)."""
    return 5e-5 if backend() == "tensorflow" and sampling_ratio > 0 else TOL


def align(features, rois, *args, **kwargs):
    return _run(lambda f, r: roi_align(f, r, *args, **kwargs), features, rois)


def pool(features, rois, *args, **kwargs):
    return _run(lambda f, r: roi_pool(f, r, *args, **kwargs), features, rois)


def multilevel(features, rois, *args, **kwargs):
    return _run(lambda f, r: multilevel_roi_align(f, r, *args, **kwargs), features, rois)


def levels_of(rois, *args):
    return _run(lambda r: map_roi_levels(r, *args), rois)


@pytest.fixture(scope="module", autouse=True)
def _report_deviations():
    yield
    for name, value in sorted(DEVIATIONS.items()):
        print(f"\n[test_ops_roi] max |diff| {name}: {value:.3g}")


# --------------------------------------------------------------------------
# NumPy references: torchvision's C++ loops, transcribed.
# --------------------------------------------------------------------------

def _ref_bilinear(height, width, y, x):
    """torchvision ``pre_calc_for_bilinear_interpolate`` for one sample point.

    Returns ``[(weight, y, x), ...]`` (4 taps) or ``[]`` for an empty sample.
    """
    if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
        return []
    if y <= 0:
        y = F32(0)
    if x <= 0:
        x = F32(0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = F32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = F32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = F32(y - F32(y_low)), F32(x - F32(x_low))
    hy, lx_ = F32(F32(1) - ly), lx
    hx = F32(F32(1) - lx)
    return [(F32(hy * hx), y_low, x_low), (F32(hy * lx_), y_low, x_high),
            (F32(ly * hx), y_high, x_low), (F32(ly * lx_), y_high, x_high)]


def _ref_roi_align_taps(roi, height, width, out_h, out_w, scale, sampling_ratio, aligned,
                        grid_cap=None):
    """Per bin: ``(count, [(weight, y, x), ...])`` for one RoI (torchvision loops)."""
    scale = F32(scale)
    offset = F32(0.5) if aligned else F32(0)
    x1, y1, x2, y2 = (F32(v) for v in roi)
    start_w, start_h = F32(x1 * scale - offset), F32(y1 * scale - offset)
    end_w, end_h = F32(x2 * scale - offset), F32(y2 * scale - offset)
    roi_w, roi_h = F32(end_w - start_w), F32(end_h - start_h)
    if not aligned:
        roi_w, roi_h = max(roi_w, F32(1)), max(roi_h, F32(1))
    bin_h, bin_w = F32(roi_h / F32(out_h)), F32(roi_w / F32(out_w))
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(F32(roi_h / F32(out_h)))
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(F32(roi_w / F32(out_w)))
    if grid_cap is not None:
        grid_h, grid_w = min(grid_h, grid_cap), min(grid_w, grid_cap)
    count = max(grid_h * grid_w, 1)
    bins = {}
    for ph in range(out_h):
        for pw in range(out_w):
            taps = []
            for iy in range(grid_h):
                yy = F32(F32(start_h + F32(F32(ph) * bin_h))
                         + F32(F32(F32(iy + 0.5) * bin_h) / F32(grid_h)))
                for ix in range(grid_w):
                    xx = F32(F32(start_w + F32(F32(pw) * bin_w))
                             + F32(F32(F32(ix + 0.5) * bin_w) / F32(grid_w)))
                    taps.extend(_ref_bilinear(height, width, yy, xx))
            bins[ph, pw] = (count, taps)
    return bins


def ref_roi_align(features, rois, output_size, scale, sampling_ratio, aligned, grid_cap=None):
    """``[B, R, out_h, out_w, C]`` float64 from NHWC features and ``[B, R, 4]`` RoIs."""
    out_h, out_w = (output_size, output_size) if np.isscalar(output_size) else output_size
    batch, height, width, channels = features.shape
    out = np.zeros((batch, rois.shape[1], out_h, out_w, channels))
    for b in range(batch):
        for r in range(rois.shape[1]):
            bins = _ref_roi_align_taps(rois[b, r], height, width, out_h, out_w, scale,
                                       sampling_ratio, aligned, grid_cap)
            for (ph, pw), (count, taps) in bins.items():
                value = np.zeros(channels)
                for weight, y, x in taps:
                    value += float(weight) * features[b, y, x].astype(np.float64)
                out[b, r, ph, pw] = value / count
    return out


def ref_roi_align_grad(features_shape, rois, output_size, scale, sampling_ratio, aligned,
                       upstream):
    """Adjoint of ``ref_roi_align`` (torchvision ``roi_align_backward_kernel_impl``)."""
    out_h, out_w = (output_size, output_size) if np.isscalar(output_size) else output_size
    batch, height, width, _ = features_shape
    grad = np.zeros(features_shape)
    for b in range(batch):
        for r in range(rois.shape[1]):
            bins = _ref_roi_align_taps(rois[b, r], height, width, out_h, out_w, scale,
                                       sampling_ratio, aligned)
            for (ph, pw), (count, taps) in bins.items():
                for weight, y, x in taps:
                    grad[b, y, x] += float(weight) * upstream[b, r, ph, pw] / count
    return grad


def _c_round(value):
    """C ``round`` of a float32 value: half away from zero (exact in float64)."""
    value = float(F32(value))
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def _ref_roi_pool_windows(roi, height, width, out_h, out_w, scale):
    scale = F32(scale)
    x1, y1, x2, y2 = (F32(v) for v in roi)
    start_w, start_h = _c_round(x1 * scale), _c_round(y1 * scale)
    end_w, end_h = _c_round(x2 * scale), _c_round(y2 * scale)
    roi_w, roi_h = max(end_w - start_w + 1, 1), max(end_h - start_h + 1, 1)
    bin_h, bin_w = F32(F32(roi_h) / F32(out_h)), F32(F32(roi_w) / F32(out_w))
    for ph in range(out_h):
        for pw in range(out_w):
            hstart = int(math.floor(F32(F32(ph) * bin_h)))
            wstart = int(math.floor(F32(F32(pw) * bin_w)))
            hend = int(math.ceil(F32(F32(ph + 1) * bin_h)))
            wend = int(math.ceil(F32(F32(pw + 1) * bin_w)))
            hstart = min(max(hstart + start_h, 0), height)
            hend = min(max(hend + start_h, 0), height)
            wstart = min(max(wstart + start_w, 0), width)
            wend = min(max(wend + start_w, 0), width)
            yield ph, pw, hstart, hend, wstart, wend


def ref_roi_pool(features, rois, output_size, scale, upstream=None):
    """torchvision ``roi_pool_forward_kernel_impl`` (and, with ``upstream``, its backward)."""
    out_h, out_w = (output_size, output_size) if np.isscalar(output_size) else output_size
    batch, height, width, channels = features.shape
    out = np.zeros((batch, rois.shape[1], out_h, out_w, channels), np.float32)
    grad = np.zeros(features.shape)
    for b in range(batch):
        for r in range(rois.shape[1]):
            for ph, pw, hs, he, ws, we in _ref_roi_pool_windows(
                    rois[b, r], height, width, out_h, out_w, scale):
                if he <= hs or we <= ws:
                    continue  # empty bin: 0, no gradient
                window = features[b, hs:he, ws:we].reshape(-1, channels)
                out[b, r, ph, pw] = window.max(axis=0)
                if upstream is not None:
                    first = window.argmax(axis=0)  # first max in row-major scan, like C++ '>'
                    for c in range(channels):
                        y, x = divmod(int(first[c]), we - ws)
                        grad[b, hs + y, ws + x, c] += upstream[b, r, ph, pw, c]
    return out, grad


def ref_level(rois, k_min=2, k_max=5, canonical_scale=224, canonical_level=4, eps=1e-6):
    """LevelMapper formula in float32."""
    rois = rois.astype(np.float32)
    area = (rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.floor(F32(canonical_level) + np.log2(np.sqrt(area) / F32(canonical_scale))
                         + F32(eps))
    level = np.where(area > 0, level, k_min)
    return np.clip(level, k_min, k_max).astype(np.int32)


def ref_multilevel(features_list, rois, output_size, levels, sampling_ratio, aligned,
                   canonical_scale=224, canonical_level=4):
    level = ref_level(rois, levels[0], levels[-1], canonical_scale, canonical_level)
    out = None
    for features, lv in zip(features_list, levels):
        pooled = ref_roi_align(features, rois, output_size, 2.0 ** -lv, sampling_ratio, aligned)
        if out is None:
            out = np.zeros_like(pooled)
        out[level == lv] = pooled[level == lv]
    return out


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def make_rois(rng, batch, image_h, image_w, stride=1.0, out=(7, 7)):
    """RoIs of every awkward kind, in image pixels: ``[batch, 9, 4]`` float32."""
    rows = []
    for _ in range(batch):
        def box(x, y, w, h):
            return [x, y, x + w, y + h]
        u = rng.uniform
        rows.append([
            box(u(0, image_w / 2), u(0, image_h / 2), u(4, image_w / 2), u(4, image_h / 2)),
            box(u(-image_w / 3, 0), u(image_h / 2, image_h), u(image_w / 4, image_w),
                u(image_h / 4, image_h)),                                   # partly outside
            box(u(1.2, 2) * image_w, u(-2, -1.5) * image_h, u(5, 30), u(5, 30)),  # outside
            box(u(0, image_w), u(0, image_h), u(0, 1), u(0, 1)),            # tiny < 1 px
            box(u(-2, -1) * image_w, u(-2, -1) * image_h, u(3, 4) * image_w,
                u(3, 4) * image_h),                                         # huge
            box(u(0, image_w), u(0, image_h), -u(1, 10), -u(1, 10)),        # x2 < x1
            [0.0, 0.0, 0.0, 0.0],                                           # padding row
            # Feature-pixel aligned, size an exact multiple of the output: the
            # adaptive grid is exactly ceil(k) (an inexact division gives k+1).
            [stride * 2, stride * 1, stride * (2 + out[1] * 2), stride * (1 + out[0] * 3)],
            [stride * 0.5, stride * 3, stride * (0.5 + out[1]), stride * (3 + out[0] * 2)],
        ])
    return np.array(rows, np.float32)


SCALES = (1.0, 0.25, 1.0 / 16)
OUTPUT_SIZES = (7, (14, 14), (5, 3))
FEATURE_HW = (13, 17)


def _case(rng, scale, out, batch=2, channels=3):
    out_hw = (out, out) if np.isscalar(out) else out
    image_h, image_w = FEATURE_HW[0] / scale, FEATURE_HW[1] / scale
    features = rng.normal(size=(batch, *FEATURE_HW, channels)).astype(np.float32)
    rois = make_rois(rng, batch, image_h, image_w, stride=1.0 / scale, out=out_hw)
    return features, rois


def _torch_rois(rois):
    """``[B, R, 4]`` -> torchvision ``[K, 5]`` (batch index first)."""
    batch, count = rois.shape[:2]
    index = np.repeat(np.arange(batch, dtype=np.float32), count)[:, None]
    return torch.from_numpy(np.concatenate([index, rois.reshape(-1, 4)], axis=1))


def _torch_features(features):
    return torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))


def _from_torch(output, rois):
    out = output.permute(0, 2, 3, 1).numpy()
    return out.reshape(rois.shape[0], rois.shape[1], *out.shape[1:])


ALIGN_CASES = [(sr, aligned, si, (si + k) % 3)
               for k, sr in enumerate((-1, 0, 2)) for aligned in (False, True)
               for si in range(3)]


# --------------------------------------------------------------------------
# roi_align
# --------------------------------------------------------------------------

# The reference and the torchvision tests share one op call and one reference
# run per case (the op compiles once per case on JAX).
_RESULTS = {}


def _align_result(sampling_ratio, aligned, scale_i, out_i):
    key = ("align", sampling_ratio, aligned, scale_i, out_i)
    if key not in _RESULTS:
        scale, out = SCALES[scale_i], OUTPUT_SIZES[out_i]
        features, rois = _case(np.random.default_rng(0), scale, out)
        got = align(features, rois, out, scale, sampling_ratio, aligned)
        expected = ref_roi_align(features, rois, out, scale, sampling_ratio, aligned)
        _RESULTS[key] = features, rois, got, expected
    return _RESULTS[key]


@pytest.mark.parametrize("sampling_ratio,aligned,scale_i,out_i", ALIGN_CASES)
def test_roi_align_matches_reference(sampling_ratio, aligned, scale_i, out_i):
    _, _, got, expected = _align_result(sampling_ratio, aligned, scale_i, out_i)
    assert got.shape == expected.shape and got.dtype == np.float32
    _record("roi_align vs numpy reference", np.abs(got - expected).max())
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


@needs_torchvision
@pytest.mark.parametrize("sampling_ratio,aligned,scale_i,out_i", ALIGN_CASES)
def test_roi_align_matches_torchvision(sampling_ratio, aligned, scale_i, out_i):
    features, rois, got, reference = _align_result(sampling_ratio, aligned, scale_i, out_i)
    scale, out = SCALES[scale_i], OUTPUT_SIZES[out_i]
    expected = _from_torch(torchvision.ops.roi_align(
        _torch_features(features), _torch_rois(rois), out, scale, sampling_ratio, aligned), rois)
    _record("roi_align vs torchvision", np.abs(got - expected).max())
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    # The NumPy reference itself agrees with torchvision (checks the reference).
    np.testing.assert_allclose(reference, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_adaptive_gather_with_cap(rng, aligned):
    """max_sampling_ratio: exact under the cap, clamped grid (reference with cap) above."""
    features, rois = _case(rng, 0.25, 7)
    big_enough = int(np.ceil(np.abs(rois[..., 2:] - rois[..., :2]).max() * 0.25 / 7))
    expected = ref_roi_align(features, rois, 7, 0.25, -1, aligned)
    got = align(features, rois, 7, 0.25, -1, aligned,
                               max_sampling_ratio=big_enough)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    capped = ref_roi_align(features, rois, 7, 0.25, -1, aligned, grid_cap=2)
    got = align(features, rois, 7, 0.25, -1, aligned, max_sampling_ratio=2)
    _record("roi_align (max_sampling_ratio) vs numpy reference", np.abs(got - capped).max())
    np.testing.assert_allclose(got, capped, atol=TOL, rtol=TOL)
    assert np.abs(capped - expected).max() > 1e-3  # the cap did bite on the huge RoIs


def test_roi_align_small_known_values():
    features = np.arange(20, dtype=np.float32).reshape(1, 4, 5, 1)
    rois = np.array([[[0, 0, 2, 2], [1, 1, 3, 2], [-3, -3, -2.5, -2.5]]], np.float32)
    out = align(features, rois, 1, 1.0, 1, False)[0, :, 0, 0, 0]
    # centre (1, 1) -> 6; centre (y=1.5, x=2) -> 7 + 2.5; fully outside (< -1) -> 0
    np.testing.assert_allclose(out, [6.0, 9.5, 0.0])
    # aligned: half a pixel earlier -> samples at (0.5, 0.5) and (y=1, x=1.5); the
    # second RoI keeps its height of 1 only because aligned skips the max(., 1).
    out = align(features, rois, 1, 1.0, 1, True)[0, :2, 0, 0, 0]
    np.testing.assert_allclose(out, [3.0, 6.5])


def test_roi_align_padding_rows_finite(rng):
    features = rng.normal(size=(2, 8, 9, 4)).astype(np.float32)
    rois = np.zeros((2, 5, 4), np.float32)
    rois[0, 1] = np.nan
    rois[1, 2] = [np.inf, -np.inf, np.inf, 1e30]
    rois[1, 3] = [-1e30, -1e30, 1e30, 1e30]
    for sr, cap, aligned in ((2, None, True), (-1, None, False), (0, None, True), (0, 3, False)):
        out = align(features, rois, 7, 0.5, sr, aligned, max_sampling_ratio=cap)
        assert np.isfinite(out).all(), (sr, aligned)
    out = pool(features, rois, 7, 0.5)
    assert np.isfinite(out).all()
    out = multilevel([features] * 2, rois, 7, levels=(2, 3))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (-1, True), (0, False)])
def test_roi_align_gradient_matches_reference_adjoint(rng, sampling_ratio, aligned):
    """d(sum(out * G))/d features == torchvision's backward loop on the reference."""
    features, rois = _case(rng, 0.25, (5, 3))
    upstream = rng.normal(size=(2, rois.shape[1], 5, 3, 3)).astype(np.float32)
    expected = ref_roi_align_grad(features.shape, rois, (5, 3), 0.25, sampling_ratio, aligned,
                                  upstream)

    def loss(x):
        out = roi_align(x, rois, (5, 3), 0.25, sampling_ratio, aligned)
        return keras.ops.sum(out * upstream)

    got = _gradient(loss, features)
    _record("roi_align gradient vs reference adjoint", np.abs(got - expected).max())
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    assert np.abs(expected).max() > 0.1


def _gradient(loss, features):
    if backend() == "tensorflow":
        import tensorflow as tf
        x = tf.constant(features)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = loss(x)
        return np.asarray(tape.gradient(value, x))
    if backend() == "jax":
        import jax
        return np.asarray(jax.jit(jax.grad(loss))(features))
    pytest.skip(f"no gradient helper for backend {backend()}")


def test_roi_align_finite_differences(rng):
    """Tiny case: autodiff gradient == central finite differences.

    All perturbed inputs go through one batched call (image i of the batch is
    the input with element i nudged), so the check costs two op calls.
    """
    features = rng.normal(size=(1, 4, 5, 2)).astype(np.float32)
    rois = np.array([[[0.3, 0.2, 3.7, 2.9], [-1.5, 1.0, 2.0, 5.5]]], np.float32)
    upstream = rng.normal(size=(1, 2, 2, 2, 2)).astype(np.float32)

    def loss(x):
        return keras.ops.sum(roi_align(x, rois, 2, 1.0, 0, True) * upstream)

    got = _gradient(loss, features)
    size = features.size
    steps = np.eye(size, dtype=np.float32).reshape(size, *features.shape[1:])
    batch = np.concatenate([features + steps, features - steps])
    out = align(batch, np.repeat(rois, 2 * size, axis=0), 2, 1.0, 0, True)
    values = (out.astype(np.float64) * upstream).reshape(2 * size, -1).sum(axis=1)
    numeric = ((values[:size] - values[size:]) / 2.0).reshape(features.shape)
    np.testing.assert_allclose(got, numeric, atol=1e-4)
    assert np.abs(numeric).max() > 0.1


def test_roi_align_adaptive_dense_sample_spacing(rng):
    """Adaptive grids where samples are densest (bin just above an integer: spacing
    just above 1/2 px) and large grids: the separable path must see every sample."""
    features = rng.normal(size=(1, 11, 12, 2)).astype(np.float32)
    out = 3
    k = rng.integers(1, 6, size=(40, 2)).astype(np.float32)
    bins = k + rng.choice([1e-3, 0.05, 0.5, 1.0], size=(40, 2)).astype(np.float32)
    xy = rng.uniform(-3, 9, size=(40, 2)).astype(np.float32)
    rois = np.concatenate([xy, xy + bins * out], axis=1)[None].astype(np.float32)
    for aligned in (False, True):
        expected = ref_roi_align(features, rois, out, 1.0, 0, aligned)
        got = align(features, rois, out, 1.0, 0, aligned)
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


# --------------------------------------------------------------------------
# roi_pool
# --------------------------------------------------------------------------

POOL_CASES = [(si, oi) for si in range(3) for oi in range(3)]


def _pool_result(scale_i, out_i):
    key = ("pool", scale_i, out_i)
    if key not in _RESULTS:
        scale, out = SCALES[scale_i], OUTPUT_SIZES[out_i]
        features, rois = _case(np.random.default_rng(0), scale, out)
        # Corners at exact half feature pixels: C round goes away from zero.
        rois[0, 6] = np.array([-0.5, -1.5, 2.5, 0.5], np.float32) / scale
        got = pool(features, rois, out, scale)
        _RESULTS[key] = features, rois, got, ref_roi_pool(features, rois, out, scale)[0]
    return _RESULTS[key]


@pytest.mark.parametrize("scale_i,out_i", POOL_CASES)
def test_roi_pool_matches_reference(scale_i, out_i):
    _, _, got, expected = _pool_result(scale_i, out_i)
    _record("roi_pool vs numpy reference", np.abs(got - expected).max())
    np.testing.assert_array_equal(got, expected)


@needs_torchvision
@pytest.mark.parametrize("scale_i,out_i", POOL_CASES)
def test_roi_pool_matches_torchvision(scale_i, out_i):
    features, rois, got, reference = _pool_result(scale_i, out_i)
    scale, out = SCALES[scale_i], OUTPUT_SIZES[out_i]
    expected = _from_torch(torchvision.ops.roi_pool(
        _torch_features(features), _torch_rois(rois), out, scale), rois)
    _record("roi_pool vs torchvision", np.abs(got - expected).max())
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(reference, expected)


def test_roi_pool_gradient_goes_to_argmax(rng):
    features, rois = _case(rng, 0.25, (5, 3))
    upstream = rng.normal(size=(2, rois.shape[1], 5, 3, 3)).astype(np.float32)
    _, expected = ref_roi_pool(features, rois, (5, 3), 0.25, upstream)
    got = _gradient(lambda x: keras.ops.sum(roi_pool(x, rois, (5, 3), 0.25) * upstream),
                    features)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


def test_roi_pool_whole_map_and_single_pixel():
    features = np.random.default_rng(1).normal(size=(1, 6, 7, 2)).astype(np.float32)
    rois = np.array([[[0, 0, 100, 100], [3, 2, 3, 2]]], np.float32)
    out = pool(features, rois, 1, 1.0)
    np.testing.assert_array_equal(out[0, 0, 0, 0], features[0].max(axis=(0, 1)))
    np.testing.assert_array_equal(out[0, 1, 0, 0], features[0, 2, 3])


# --------------------------------------------------------------------------
# Level mapping and multi-level RoIAlign
# --------------------------------------------------------------------------

def _level_rois(rng, count=40, max_size=1200.0):
    sizes = np.exp(rng.uniform(np.log(2.0), np.log(max_size), size=(count, 2)))
    xy = rng.uniform(0, 100, size=(count, 2))
    rois = np.concatenate([xy, xy + sizes], axis=1).astype(np.float32)
    # Exact level boundaries: sqrt(area) = 224 * 2**k.
    rois[:4] = [[0, 0, 224, 224], [0, 0, 112, 112], [10, 10, 458, 458], [0, 0, 0, 0]]
    return rois


def test_map_roi_levels_formula(rng):
    rois = _level_rois(rng)
    got = levels_of(rois)
    np.testing.assert_array_equal(got, ref_level(rois))
    assert got[:4].tolist() == [4, 3, 5, 2]
    assert set(got.tolist()) == {2, 3, 4, 5}
    got = levels_of(rois.reshape(4, 10, 4), 3, 6, 128, 5)
    np.testing.assert_array_equal(got, ref_level(rois, 3, 6, 128, 5).reshape(4, 10))


@needs_torchvision
def test_map_roi_levels_matches_torchvision_level_mapper(rng):
    from torchvision.ops.poolers import LevelMapper
    rois = _level_rois(rng)[4:]  # torchvision is undefined (NaN) on empty boxes
    for k_min, k_max, scale, level in ((2, 5, 224, 4), (3, 6, 96, 5)):
        mapper = LevelMapper(k_min, k_max, canonical_scale=scale, canonical_level=level)
        expected = mapper([torch.from_numpy(rois)]).numpy() + k_min
        got = levels_of(rois, k_min, k_max, scale, level)
        np.testing.assert_array_equal(got, expected)


def _pyramid(rng, image=64, levels=(2, 3, 4, 5), channels=3, batch=2):
    return [rng.normal(size=(batch, image // 2 ** lv, image // 2 ** lv, channels))
            .astype(np.float32) for lv in levels]


def _pyramid_rois(rng, image, batch=2, count=10):
    sizes = np.exp(rng.uniform(np.log(2.0), np.log(image * 1.5), size=(batch, count, 2)))
    xy = rng.uniform(-image / 8, image, size=(batch, count, 2))
    return np.concatenate([xy, xy + sizes], axis=-1).astype(np.float32)


@pytest.mark.parametrize("sampling_ratio,aligned", [(2, False), (-1, False), (0, True)])
def test_multilevel_matches_reference(rng, sampling_ratio, aligned):
    levels = (2, 3, 4, 5)
    features = _pyramid(rng)
    rois = _pyramid_rois(rng, 64)
    expected = ref_multilevel(features, rois, (7, 5), levels, sampling_ratio, aligned, 32)
    got = multilevel(features, rois, (7, 5), levels, sampling_ratio,
                                          aligned, canonical_scale=32)
    assert len(set(ref_level(rois, 2, 5, 32).ravel().tolist())) >= 3  # several levels used
    _record("multilevel_roi_align vs numpy reference", np.abs(got - expected).max())
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    if sampling_ratio != 2:
        return
    as_dict = {f"P{lv}": f for lv, f in zip(levels, features)}
    got_dict = multilevel(as_dict, rois, (7, 5), levels, sampling_ratio,
                                               aligned, canonical_scale=32)
    np.testing.assert_array_equal(got_dict, got)


@needs_torchvision
@pytest.mark.parametrize("image,canonical_scale,sampling_ratio",
                         [(64, 32, 2), (64, 32, -1), (512, 224, 2)])
def test_multilevel_matches_torchvision(rng, image, canonical_scale, sampling_ratio):
    from collections import OrderedDict
    levels = (2, 3, 4, 5)
    features = _pyramid(rng, image=image, channels=2)
    rois = _pyramid_rois(rng, image)
    pooler = torchvision.ops.MultiScaleRoIAlign(
        [f"p{lv}" for lv in levels], (7, 5), sampling_ratio, canonical_scale=canonical_scale)
    expected = pooler(OrderedDict((f"p{lv}", _torch_features(f)) for lv, f in
                                  zip(levels, features)),
                      [torch.from_numpy(r) for r in rois], [(image, image)] * 2)
    expected = _from_torch(expected, rois)
    got = multilevel(features, rois, (7, 5), levels, sampling_ratio,
                                          canonical_scale=canonical_scale)
    _record("multilevel_roi_align vs torchvision MultiScaleRoIAlign",
            np.abs(got - expected).max())
    tol = _crop_and_resize_tol(sampling_ratio)
    np.testing.assert_allclose(got, expected, atol=tol, rtol=tol)


def test_multilevel_gradient_reaches_each_level(rng):
    levels = (2, 3, 4)
    features = _pyramid(rng, levels=levels, batch=1)
    rois = _pyramid_rois(rng, 64, batch=1, count=8)
    level = ref_level(rois, 2, 4, 32)
    upstream = rng.normal(size=(1, 8, 3, 3, 3)).astype(np.float32)

    for index, lv in enumerate(levels):
        def loss(x, index=index):
            inputs = list(features)
            inputs[index] = x
            return keras.ops.sum(multilevel_roi_align(inputs, rois, 3, levels, 2,
                                                      canonical_scale=32) * upstream)

        got = _gradient(loss, features[index])
        mine = np.where((level == lv)[..., None, None, None], upstream, 0.0)
        expected = ref_roi_align_grad(features[index].shape, rois, 3, 2.0 ** -lv, 2, False, mine)
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


# --------------------------------------------------------------------------
# Compilation: XLA on TensorFlow, jax.jit on JAX
# --------------------------------------------------------------------------

def _compiled(fn):
    if backend() == "tensorflow":
        import tensorflow as tf
        return tf.function(fn, jit_compile=True)
    if backend() == "jax":
        import jax
        return jax.jit(fn)
    pytest.skip(f"no compiler for backend {backend()}")


@pytest.mark.parametrize("sampling_ratio,cap", [(2, None), (-1, None), (0, 4)])
def test_roi_align_compiled_matches_reference(rng, sampling_ratio, cap):
    features, rois = _case(rng, 0.25, (5, 3))
    fn = _compiled(lambda f, r: roi_align(f, r, (5, 3), 0.25, sampling_ratio, False,
                                          max_sampling_ratio=cap))
    got = np.asarray(fn(features, rois))
    expected = ref_roi_align(features, rois, (5, 3), 0.25, sampling_ratio, False,
                             grid_cap=cap)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)
    if backend() == "jax" and sampling_ratio != 2:
        return  # op-by-op JAX compiles ~100 primitives: one eager case is enough
    eager = np.asarray(roi_align(features, rois, (5, 3), 0.25, sampling_ratio, False,
                                 max_sampling_ratio=cap))
    _record("roi_align compiled vs eager", np.abs(got - eager).max())
    # Eager TF with a fixed grid takes the crop-and-resize route, XLA gathers.
    tol = TOL if _crop_and_resize_tol(sampling_ratio) > TOL else 1e-6
    np.testing.assert_allclose(got, eager, atol=tol)


def test_roi_pool_and_multilevel_compiled(rng):
    features, rois = _case(rng, 0.25, 7)
    got = np.asarray(_compiled(lambda f, r: roi_pool(f, r, 7, 0.25))(features, rois))
    np.testing.assert_array_equal(got, ref_roi_pool(features, rois, 7, 0.25)[0])
    pyramid = _pyramid(rng)
    rois = _pyramid_rois(rng, 64)
    fn = _compiled(lambda f, r: multilevel_roi_align(f, r, 7, canonical_scale=32))
    got = np.asarray(fn(pyramid, rois))
    expected = ref_multilevel(pyramid, rois, 7, (2, 3, 4, 5), 2, False, 32)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=TOL)


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------

def test_layers_keras_round_trip(rng, tmp_path):
    levels = (2, 3, 4, 5)
    pyramid_in = [keras.Input((64 // 2 ** lv, 64 // 2 ** lv, 3)) for lv in levels]
    rois_in = keras.Input((10, 4))
    single = RoIAlign((7, 5), spatial_scale=0.25, sampling_ratio=-1, aligned=True)
    pooler = RoIPool(3, spatial_scale=0.25)
    multi = MultiLevelRoIAlign(7, levels=levels, sampling_ratio=2, canonical_scale=32)
    outputs = {"align": single(pyramid_in[0], rois_in), "pool": pooler(pyramid_in[0], rois_in),
               "multi": multi(pyramid_in, rois_in)}
    model = keras.Model([*pyramid_in, rois_in], outputs)
    assert tuple(model.output["multi"].shape) == (None, 10, 7, 7, 3)

    pyramid = _pyramid(rng)
    rois = _pyramid_rois(rng, 64)
    before = model.predict([*pyramid, rois], verbose=0)
    np.testing.assert_allclose(
        before["align"], ref_roi_align(pyramid[0], rois, (7, 5), 0.25, -1, True), atol=TOL)
    np.testing.assert_array_equal(before["pool"], ref_roi_pool(pyramid[0], rois, 3, 0.25)[0])
    np.testing.assert_allclose(
        before["multi"], ref_multilevel(pyramid, rois, 7, levels, 2, False, 32), atol=TOL)

    path = tmp_path / "roi.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    after = loaded.predict([*pyramid, rois], verbose=0)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    config = loaded.get_layer(multi.name).get_config()
    assert config["levels"] == [2, 3, 4, 5] and config["canonical_scale"] == 32
    assert config["output_size"] == [7, 7] and config["sampling_ratio"] == 2
    config = loaded.get_layer(single.name).get_config()
    assert (config["output_size"], config["spatial_scale"], config["aligned"]) == ([7, 5], 0.25,
                                                                                  True)


def test_roi_align_layer_dynamic_spatial_size(rng):
    """Functional model with unknown H, W (both strategies), run at two sizes."""
    features_in = keras.Input((None, None, 3))
    rois_in = keras.Input((None, 4))
    outputs = [RoIAlign(4, 0.5, sampling_ratio=2)(features_in, rois_in),
               RoIAlign(4, 0.5, sampling_ratio=-1)(features_in, rois_in)]
    model = keras.Model([features_in, rois_in], outputs)
    for height, width in ((9, 11), (6, 14)):
        features = rng.normal(size=(2, height, width, 3)).astype(np.float32)
        rois = make_rois(rng, 2, height * 2, width * 2, stride=2.0, out=(4, 4))
        got = model.predict([features, rois], verbose=0)
        for out, sr in zip(got, (2, -1)):
            np.testing.assert_allclose(out, ref_roi_align(features, rois, 4, 0.5, sr, False),
                                       atol=TOL)


def test_layer_mixed_precision_keeps_float32_rois(rng):
    """Under mixed_float16 the features are float16 but RoIs stay float32."""
    features = rng.normal(size=(1, 4, 2100, 2)).astype(np.float32)
    x1 = rng.uniform(2000, 2050, size=(1, 6)).astype(np.float32) + 0.3
    rois = np.stack([x1, np.full_like(x1, 0.4), x1 + 5.3, np.full_like(x1, 3.1)], axis=-1)
    layer = RoIAlign(3, 1.0, sampling_ratio=2, dtype="mixed_float16")
    got = _run(layer, features, rois)
    assert keras.backend.standardize_dtype(got.dtype) == "float16"
    expected = ref_roi_align(features, rois, 3, 1.0, 2, False)
    # float16 RoIs would be off by up to 1 px here (errors ~0.5); features in
    # float16 cost ~1e-3.
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=2e-2)


# --------------------------------------------------------------------------
# API and errors
# --------------------------------------------------------------------------

def test_public_names_are_the_functions():
    # kdet.ops lazily exports roi_align from the module kdet/ops/roi_align.py: the
    # package attribute must end up being the function, not the submodule.
    from kdet.ops import roi_align as public_align  # noqa: F401  (binds the submodule)
    assert kdet.ops.roi_align is roi_align, (
        "kdet.ops.roi_align resolves to the submodule kdet/ops/roi_align.py; "
        "kdet/ops/__init__.py must bind the function over it")
    assert kdet.ops.roi_pool is roi_pool
    assert kdet.ops.map_roi_levels is map_roi_levels
    assert kdet.ops.multilevel_roi_align is multilevel_roi_align


def test_bad_inputs_raise_value_errors():
    features = np.zeros((2, 8, 8, 3), np.float32)
    rois = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="features must be"):
        roi_align(features[0], rois, 7)
    with pytest.raises(ValueError, match="rois must be"):
        roi_align(features, rois[..., :3], 7)
    with pytest.raises(ValueError, match="batch"):
        roi_pool(features, rois[:1], 7)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(features, rois, (7, 0))
    with pytest.raises(ValueError, match="max_sampling_ratio"):
        roi_align(features, rois, 7, max_sampling_ratio=0)
    with pytest.raises(ValueError, match="consecutive"):
        multilevel_roi_align([features, features], rois, 7, levels=(2, 4))
    with pytest.raises(ValueError, match="levels"):
        multilevel_roi_align([features], rois, 7, levels=(2, 3))
    with pytest.raises(ValueError, match="P3"):
        multilevel_roi_align({"P2": features}, rois, 7, levels=(2, 3))
    with pytest.raises(ValueError, match="k_min"):
        map_roi_levels(rois, 5, 2)


# --------------------------------------------------------------------------- per-RoI maps
@pytest.mark.parametrize("chunk_elements", [None, 1])
def test_roi_align_maps_equals_roi_align_of_each_rois_own_map(rng, chunk_elements):
    """Chunked by-index reading gives exactly roi_align of the gathered map, whatever the
    chunking (1 element per chunk: one RoI a chunk, 7 chunks; the last one partial)."""
    from kdet.ops.roi_align import roi_align_maps
    maps = (rng.uniform(0, 1, (2, 4, 64, 48)) > 0.5).astype("float32")
    xy = rng.uniform(-5, 40, (2, 7, 2))
    rois = np.concatenate([xy, xy + rng.uniform(0.5, 60, (2, 7, 2))], -1).astype(F32)
    rois[1, 3] = rois[1, 2]  # a duplicate RoI
    rois[0, 6] = [10, 10, 10, 10]  # a degenerate one
    index = rng.integers(0, 4, (2, 7)).astype("int32")
    out = _run(lambda m, r, i: roi_align_maps(m, r, i, 28, chunk_elements=chunk_elements),
               maps, rois, index)
    assert out.shape == (2, 7, 28, 28)
    gathered = maps[np.arange(2)[:, None], index]  # [B, R, H, W]: one map per "image"
    ref = align(gathered.reshape(14, 64, 48, 1), rois.reshape(14, 1, 4), 28)
    np.testing.assert_array_equal(out, ref.reshape(2, 7, 28, 28))
    if HAVE_TORCHVISION:  # torchvision roi_align with a box index per RoI
        boxes = torch.from_numpy(np.concatenate(
            [(np.arange(2)[:, None] * 4 + index).reshape(-1, 1).astype(F32),
             rois.reshape(-1, 4)], 1))
        ref = torchvision.ops.roi_align(torch.from_numpy(maps.reshape(8, 1, 64, 48)), boxes,
                                        28, 1.0, -1, False).numpy().reshape(2, 7, 28, 28)
        np.testing.assert_allclose(out, ref, atol=TOL)


def test_image_index_packs_several_images_rois_in_one_row():
    # Mask R-CNN's training mask rows: the RoIs of both images in one row, each reading its
    # own image (features and maps) through image_index, equal the per-image results.
    from kdet.ops.roi_align import roi_align_maps

    rng = np.random.default_rng(3)
    features = [rng.normal(size=(2, 64 // 2 ** lv, 64 // 2 ** lv, 8)).astype("float32")
                for lv in (2, 3, 4, 5)]
    maps = (rng.uniform(size=(2, 3, 64, 64)) > 0.5).astype("float32")
    xy = rng.uniform(0, 40, size=(2, 5, 2))
    rois = np.concatenate([xy, xy + rng.uniform(2, 30, (2, 5, 2))], -1).astype("float32")
    matches = rng.integers(0, 3, size=(2, 5)).astype("int32")
    # image 1's RoIs 4, 0, 2, then image 0's 1, 3
    image = np.array([[1, 1, 1, 0, 0]], "int32")
    slot = np.array([[4, 0, 2, 1, 3]])
    packed_rois = rois[image, slot]
    per_image = _run(lambda f0, f1, f2, f3, r: multilevel_roi_align(
        [f0, f1, f2, f3], r, 7, crop_and_resize=False), *features, rois)
    packed = _run(lambda f0, f1, f2, f3, r, i: multilevel_roi_align(
        [f0, f1, f2, f3], r, 7, crop_and_resize=False, image_index=i),
        *features, packed_rois, image)
    # the same ops on other shapes: equal to the bit on TF; XLA (JAX) may fuse a
    # multiply-add into an FMA differently per shape (an ulp of a sample, ~2e-6 here)
    exact = keras.backend.backend() == "tensorflow"
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed, per_image[image, slot], **tolerance)
    per_image = _run(lambda m, r, i: roi_align_maps(m, r, i, 14), maps, rois, matches)
    packed = _run(lambda m, r, i, b: roi_align_maps(m, r, i, 14, image_index=b),
                  maps, packed_rois, matches[image, slot], image)
    np.testing.assert_allclose(packed, per_image[image, slot], **tolerance)
