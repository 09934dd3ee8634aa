"""kdet.boxes against written-out numpy formulas and, when importable, torchvision.

The numpy references work in float64 from the textbook formulas (torchvision
``box_iou`` / ``generalized_box_iou`` / ``distance_box_iou``, ``BoxCoder``
of ``models/detection/_utils.py``); kdet computes in float32, so values are
compared with an absolute tolerance of 1e-5 (IoU-like, in [-1, 1]) or a
relative one for coordinates.
"""
import math

import keras
import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, backend
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from kdet import boxes as kb

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION,
                                       reason="torchvision not importable")
ATOL = 1e-5
# Few distinct shapes: eager JAX compiles every op anew for every new shape.
NA, NB = 16, 12
CLIP = math.log(1000.0 / 16)


# ----------------------------------------------------------------- reference

def np_area(b):
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def np_parts(b1, b2):
    b1, b2 = b1.astype(np.float64), b2.astype(np.float64)
    p, q = b1[..., :, None, :], b2[..., None, :, :]
    w = np.clip(np.minimum(p[..., 2], q[..., 2]) - np.maximum(p[..., 0], q[..., 0]), 0, None)
    h = np.clip(np.minimum(p[..., 3], q[..., 3]) - np.maximum(p[..., 1], q[..., 1]), 0, None)
    inter = w * h
    union = np_area(b1)[..., :, None] + np_area(b2)[..., None, :] - inter
    return p, q, inter, union


def np_div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def np_iou(b1, b2):
    _, _, inter, union = np_parts(b1, b2)
    return np_div(inter, union)


def np_giou(b1, b2):
    p, q, inter, union = np_parts(b1, b2)
    ew = np.maximum(p[..., 2], q[..., 2]) - np.minimum(p[..., 0], q[..., 0])
    eh = np.maximum(p[..., 3], q[..., 3]) - np.minimum(p[..., 1], q[..., 1])
    enclosing = np.clip(ew, 0, None) * np.clip(eh, 0, None)
    return np_div(inter, union) - np_div(enclosing - union, enclosing)


def np_diou(b1, b2, eps=1e-7):
    p, q, inter, union = np_parts(b1, b2)
    ew = np.clip(np.maximum(p[..., 2], q[..., 2]) - np.minimum(p[..., 0], q[..., 0]), 0, None)
    eh = np.clip(np.maximum(p[..., 3], q[..., 3]) - np.minimum(p[..., 1], q[..., 1]), 0, None)
    centre = (((p[..., 0] + p[..., 2]) - (q[..., 0] + q[..., 2])) / 2) ** 2 + \
        (((p[..., 1] + p[..., 3]) - (q[..., 1] + q[..., 3])) / 2) ** 2
    return np_div(inter, union) - centre / (ew ** 2 + eh ** 2 + eps)


def np_encode(gt, anchors, weights):
    gt, anchors = gt.astype(np.float64), anchors.astype(np.float64)
    wx, wy, ww, wh = weights
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    gx, gy = gt[..., 0] + 0.5 * gw, gt[..., 1] + 0.5 * gh
    return np.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                     ww * np.log(gw / aw), wh * np.log(gh / ah)], -1)


def np_decode(deltas, anchors, weights, clip=CLIP):
    deltas, anchors = deltas.astype(np.float64), anchors.astype(np.float64)
    wx, wy, ww, wh = weights
    dx, dy, dw, dh = (deltas[..., i] / w for i, w in enumerate((wx, wy, ww, wh)))
    if clip is not None:
        dw, dh = np.minimum(dw, clip), np.minimum(dh, clip)
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    cx, cy, w, h = dx * aw + ax, dy * ah + ay, np.exp(dw) * aw, np.exp(dh) * ah
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


# ------------------------------------------------------------------- helpers

def random_boxes(rng, shape, degenerate=0.0, padding=0.0, min_size=0.5):
    """Valid xyxy boxes; a share with zero width/height and a share of zero rows."""
    xy = rng.uniform(0, 100, shape + (2,))
    wh = rng.uniform(min_size, 60, shape + (2,))
    wh[rng.uniform(size=shape) < degenerate, rng.integers(0, 2)] = 0
    boxes = np.concatenate([xy, xy + wh], -1)
    boxes[rng.uniform(size=shape) < padding] = 0
    return boxes.astype(np.float32)


def box_arrays(n):
    """Hypothesis: [n, 4] boxes on a quarter-pixel grid (exact ties, zero sizes), zero rows."""
    coord = st.integers(0, 200).map(lambda v: v / 4)
    size = st.integers(0, 120).map(lambda v: v / 4)
    row = st.one_of(
        st.just((0.0, 0.0, 0.0, 0.0)),
        st.tuples(coord, coord, size, size).map(
            lambda r: (r[0], r[1], r[0] + r[2], r[1] + r[3])))
    return st.lists(row, min_size=n, max_size=n).map(lambda rows: np.array(rows, np.float32))


def np_(x):
    return np.asarray(ops.convert_to_numpy(x))


def grad_of(fn, x):
    """d sum(fn(x)) / dx with the backend's autodiff."""
    if backend() == "jax":
        import jax
        return np.asarray(jax.grad(lambda v: fn(v).sum())(x))
    if backend() == "tensorflow":
        import tensorflow as tf
        v = tf.Variable(x)
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(fn(v))
        return tape.gradient(y, v).numpy()
    pytest.skip(f"no gradient helper for backend {backend()}")


# ---------------------------------------------------------------- IoU family

@settings(max_examples=25, deadline=None)
@given(a=box_arrays(NA), b=box_arrays(NB))
def test_pairwise_properties(a, b):
    iou = np_(kb.pairwise_iou(a, b))
    giou = np_(kb.pairwise_giou(a, b))
    diou = np_(kb.pairwise_diou(a, b))
    assert iou.shape == giou.shape == diou.shape == (len(a), len(b))
    for m in (iou, giou, diou):
        assert np.all(np.isfinite(m))
    assert np.all((iou >= 0) & (iou <= 1 + 1e-6))
    assert np.all((giou >= -1 - 1e-6) & (giou <= 1 + 1e-6))
    assert np.all((diou >= -1 - 1e-6) & (diou <= 1 + 1e-6))
    assert np.all(giou <= iou + 1e-6) and np.all(diou <= iou + 1e-6)
    # symmetric (the arithmetic is the same both ways: exact)
    np.testing.assert_array_equal(np_(kb.pairwise_iou(b, a)), iou.T)
    np.testing.assert_array_equal(np_(kb.pairwise_giou(b, a)), giou.T)
    np.testing.assert_allclose(np_(kb.pairwise_diou(b, a)), diou.T, atol=1e-6)
    # formulas
    np.testing.assert_allclose(iou, np_iou(a, b), atol=ATOL)
    np.testing.assert_allclose(giou, np_giou(a, b), atol=ATOL)
    np.testing.assert_allclose(diou, np_diou(a, b), atol=ATOL)
    # itself: 1 for boxes with area, 0 for zero-area rows (never NaN)
    self_iou = np.diag(np_(kb.pairwise_iou(a, a)))
    has_area = np_area(a) > 0
    np.testing.assert_allclose(self_iou[has_area], 1, atol=1e-6)
    np.testing.assert_array_equal(self_iou[~has_area], 0)
    # paired versions are the diagonal
    np.testing.assert_allclose(np_(kb.paired_iou(a, a)), self_iou, atol=1e-7)
    n = min(len(a), len(b))
    np.testing.assert_allclose(np_(kb.paired_iou(a[:n], b[:n])), np.diag(iou[:n, :n]), atol=1e-7)
    np.testing.assert_allclose(np_(kb.paired_giou(a[:n], b[:n])), np.diag(giou[:n, :n]),
                               atol=1e-7)


def test_random_against_formulas_with_padding(rng):
    for _ in range(5):
        a = random_boxes(rng, (NA,), degenerate=0.1, padding=0.2)
        b = random_boxes(rng, (NB,), degenerate=0.1, padding=0.2)
        for fn, ref in ((kb.pairwise_iou, np_iou), (kb.pairwise_giou, np_giou),
                        (kb.pairwise_diou, np_diou)):
            np.testing.assert_allclose(np_(fn(a, b)), ref(a, b), atol=ATOL, err_msg=fn.__name__)
        pad_a = np.all(a == 0, -1)
        np.testing.assert_array_equal(np_(kb.pairwise_iou(a, b))[pad_a], 0)
    zeros_a, zeros_b = np.zeros((NA, 4), np.float32), np.zeros((NB, 4), np.float32)
    for fn in (kb.pairwise_iou, kb.pairwise_giou, kb.pairwise_diou):
        np.testing.assert_array_equal(np_(fn(zeros_a, zeros_b)), 0)


def test_known_values():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 5, 15, 15], [20, 0, 30, 10], [0, 0, 10, 5]], np.float32)
    np.testing.assert_allclose(np_(kb.pairwise_iou(a, b)), [[25 / 175, 0, 0.5]], atol=1e-7)
    # disjoint, enclosing 30x10 = 300, union 200: giou = -100/300
    np.testing.assert_allclose(np_(kb.pairwise_giou(a, b))[0, 1], -1 / 3, atol=1e-7)
    # diou: centres 20 apart, enclosing diagonal^2 = 30^2 + 10^2
    np.testing.assert_allclose(np_(kb.pairwise_diou(a, b))[0, 1], -400 / 1000, atol=1e-6)
    np.testing.assert_allclose(np_(kb.area(b)), [100, 100, 50])
    np.testing.assert_array_equal(np_(kb.area(np.array([[5, 5, 1, 9]], np.float32))), [0])


def test_batched_shapes(rng):
    a = random_boxes(rng, (3, NA), padding=0.2)
    b = random_boxes(rng, (3, NB), padding=0.2)
    for fn, ref in ((kb.pairwise_iou, np_iou), (kb.pairwise_giou, np_giou),
                    (kb.pairwise_diou, np_diou)):
        out = np_(fn(a, b))
        assert out.shape == (3, NA, NB)
        for i in range(3):
            np.testing.assert_allclose(out[i], np_(fn(a[i], b[i])), atol=1e-7)
        np.testing.assert_allclose(out, ref(a, b), atol=ATOL)
    # broadcast: one set of anchors against a batch of boxes
    out = np_(kb.pairwise_iou(a, b[0]))
    assert out.shape == (3, NA, NB)
    assert np_(kb.paired_iou(a, a[::-1])).shape == (3, NA)


@pytest.mark.parametrize("fn", ["pairwise_iou", "pairwise_giou", "pairwise_diou",
                                "paired_iou", "paired_giou"])
def test_gradients_finite_with_padding(rng, fn):
    a = random_boxes(rng, (NA,), degenerate=0.3)
    a[[1, 4]] = 0  # padding rows
    b = a.copy()
    b[0] = 0
    b[2] = a[2]  # identical pair
    got = grad_of(lambda x: getattr(kb, fn)(x, b), a)
    assert got.shape == a.shape
    assert np.all(np.isfinite(got)), got


# --------------------------------------------------------------------- coder

@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
@pytest.mark.parametrize("order", ["xy", "yx"])
def test_box_coder_round_trip_and_formula(rng, weights, order):
    anchors = random_boxes(rng, (2, NA), min_size=4)  # size ratios stay below the clamp
    gt = random_boxes(rng, (2, NA))
    coder = kb.BoxCoder(weights=weights, order=order)
    deltas = np_(coder.encode(gt, anchors))
    expected = np_encode(gt, anchors, weights)
    if order == "yx":
        expected = expected[..., [1, 0, 3, 2]]
    np.testing.assert_allclose(deltas, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np_(coder.decode(deltas, anchors)), gt, rtol=1e-5, atol=1e-3)
    # decode against the formula on random deltas (inside the clamp)
    raw = rng.normal(0, 1, (2, NA, 4)).astype(np.float32) * np.array(weights, np.float32)
    ref = np_decode(raw if order == "xy" else raw[..., [1, 0, 3, 2]], anchors, weights)
    np.testing.assert_allclose(np_(coder.decode(raw, anchors)), ref, rtol=1e-5, atol=1e-3)


def test_box_coder_clamp():
    anchors = np.array([[0, 0, 16, 32]], np.float32)
    huge = np.array([[0.0, 0.0, 50.0, 80.0]], np.float32)
    coder = kb.BoxCoder(weights=(10, 10, 5, 5))
    out = np_(coder.decode(huge, anchors))[0]
    # w = exp(log(1000/16)) * 16 = 1000 around centre 8; h = 1000/16 * 32 = 2000 around 16
    np.testing.assert_allclose(out, [8 - 500, 16 - 1000, 8 + 500, 16 + 1000], rtol=1e-5)
    np.testing.assert_allclose(out, np_decode(huge, anchors, (10, 10, 5, 5))[0], rtol=1e-5)
    assert np.all(np.isfinite(np_(coder.decode(np.full((1, 4), 1e4, np.float32), anchors))))
    # below the clamp nothing changes; clip=None disables it
    small = np.array([[0, 0, 5 * CLIP - 0.5, 0]], np.float32)
    np.testing.assert_allclose(np_(coder.decode(small, anchors)),
                               np_decode(small, anchors, (10, 10, 5, 5)), rtol=1e-5)
    free = kb.BoxCoder(weights=(10, 10, 5, 5), clip=None)
    np.testing.assert_allclose(np_(free.decode(huge, anchors)),
                               np_decode(huge, anchors, (10, 10, 5, 5), clip=None), rtol=1e-5)


def test_box_coder_degenerate_inputs_stay_finite():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 0, 0], [5, 5, 5, 9]], np.float32)
    gt = np.array([[0, 0, 0, 0], [1, 1, 4, 4], [0, 0, 0, 0]], np.float32)
    coder = kb.BoxCoder(weights=(10, 10, 5, 5))
    assert np.all(np.isfinite(np_(coder.encode(gt, anchors))))
    assert np.all(np.isfinite(np_(coder.decode(np.zeros((3, 4), np.float32), anchors))))
    got = grad_of(lambda x: coder.encode(x, anchors), gt)
    assert np.all(np.isfinite(got))


def test_box_coder_config_and_errors():
    coder = kb.BoxCoder(weights=(10, 10, 5, 5), clip=None, order="yx")
    again = kb.BoxCoder.from_config(coder.get_config())
    assert again.get_config() == coder.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(coder))
    assert restored.get_config() == coder.get_config()
    with pytest.raises(ValueError, match="order"):
        kb.BoxCoder(order="xyxy")


# --------------------------------------------------------- clip and formats

def test_clip_boxes(rng):
    boxes = rng.uniform(-50, 150, (2, NA, 4)).astype(np.float32)
    out = np_(kb.clip_boxes(boxes, 80, 120))
    ref = np.stack([np.clip(boxes[..., 0], 0, 120), np.clip(boxes[..., 1], 0, 80),
                    np.clip(boxes[..., 2], 0, 120), np.clip(boxes[..., 3], 0, 80)], -1)
    np.testing.assert_array_equal(out, ref)
    # per-image sizes
    heights = np.array([[80], [40]], np.float32)
    widths = np.array([[120], [60]], np.float32)
    out = np_(kb.clip_boxes(boxes, heights, widths))
    np.testing.assert_array_equal(out[1], np_(kb.clip_boxes(boxes[1], 40, 60)))


def test_valid_box_mask_and_to_center():
    boxes = np.array([[0, 0, 4, 2], [0, 0, 0, 0], [3, 3, 3, 9], [1, 1, 1.5, 3]], np.float32)
    np.testing.assert_array_equal(np_(kb.valid_box_mask(boxes)), [True, False, False, True])
    np.testing.assert_array_equal(np_(kb.valid_box_mask(boxes, min_size=1.0)),
                                  [True, False, False, False])
    cx, cy, w, h = (np_(t) for t in kb.to_center(boxes))
    np.testing.assert_allclose(cx, [2, 0, 3, 1.25])
    np.testing.assert_allclose(h, [2, 0, 6, 2])


@pytest.mark.parametrize("fmt", ["xyxy", "yxyx", "xywh", "center_xywh", "center_yxhw",
                                 "rel_xyxy", "rel_yxyx", "rel_xywh", "rel_center_xywh"])
def test_convert_format_round_trip(rng, fmt):
    height, width = 480, 640
    boxes = random_boxes(rng, (2, NA)) * np.array([6.4, 4.8, 6.4, 4.8], np.float32) / 1.6
    there = np_(kb.convert_format(boxes, "xyxy", fmt, height=height, width=width))
    back = np_(kb.convert_format(there, fmt, height=height, width=width))
    np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)
    x1, y1, x2, y2 = np.moveaxis(boxes.astype(np.float64), -1, 0)
    expected = {
        "xyxy": [x1, y1, x2, y2], "yxyx": [y1, x1, y2, x2],
        "xywh": [x1, y1, x2 - x1, y2 - y1],
        "center_xywh": [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1],
        "center_yxhw": [(y1 + y2) / 2, (x1 + x2) / 2, y2 - y1, x2 - x1],
        "rel_xyxy": [x1 / width, y1 / height, x2 / width, y2 / height],
        "rel_yxyx": [y1 / height, x1 / width, y2 / height, x2 / width],
        "rel_xywh": [x1 / width, y1 / height, (x2 - x1) / width, (y2 - y1) / height],
        "rel_center_xywh": [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height,
                            (x2 - x1) / width, (y2 - y1) / height],
    }[fmt]
    np.testing.assert_allclose(there, np.stack(expected, -1), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- torchvision

@needs_torchvision
def test_iou_family_matches_torchvision(rng):
    import torch
    import torchvision
    a = np.concatenate([random_boxes(rng, (NA,), degenerate=0.1) for _ in range(5)])
    b = np.concatenate([random_boxes(rng, (NB,), degenerate=0.1) for _ in range(5)])
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for fn, tv, ref in ((kb.pairwise_iou, torchvision.ops.box_iou, np_iou),
                        (kb.pairwise_giou, torchvision.ops.generalized_box_iou, np_giou),
                        (kb.pairwise_diou, torchvision.ops.distance_box_iou, np_diou)):
        ours, theirs = np_(fn(a, b)), tv(ta, tb).numpy()
        # torchvision divides 0 by 0 for two zero-area boxes; kdet stays finite
        # (IoU 0 there, GIoU/DIoU from the enclosing box)
        undefined = np.isnan(theirs)
        np.testing.assert_array_equal(undefined, (np_area(a)[:, None] == 0) & (np_area(b) == 0))
        assert np.all(np.isfinite(ours))
        np.testing.assert_allclose(ours, ref(a, b), atol=ATOL, err_msg=fn.__name__)
        np.testing.assert_allclose(ours[~undefined], theirs[~undefined], atol=ATOL,
                                   err_msg=fn.__name__)
    # IoU is computed in the same float32 order as torchvision: equal bit for bit
    np.testing.assert_array_equal(np_(kb.pairwise_iou(a, b))[~undefined],
                                  torchvision.ops.box_iou(ta, tb).numpy()[~undefined])


@needs_torchvision
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(rng, weights):
    import torch
    from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
    anchors = random_boxes(rng, (NA,))
    gt = random_boxes(rng, (NA,))
    tv = TVBoxCoder(weights)
    coder = kb.BoxCoder(weights=weights)
    np.testing.assert_allclose(np_(coder.encode(gt, anchors)),
                               tv.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy(),
                               rtol=1e-5, atol=ATOL)
    deltas = (rng.normal(0, 1.5, (NA, 4)) * np.array(weights) * [1, 1, 3, 3]).astype(np.float32)
    deltas[:5, 2:] = 40 * np.array(weights[2:])  # beyond the clamp
    expected = tv.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
    np.testing.assert_allclose(np_(coder.decode(deltas, anchors)), expected, rtol=1e-5, atol=ATOL)


@needs_torchvision
def test_clip_boxes_matches_torchvision(rng):
    import torch
    import torchvision
    boxes = rng.uniform(-50, 150, (NA, 4)).astype(np.float32)
    expected = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (80, 120)).numpy()
    np.testing.assert_array_equal(np_(kb.clip_boxes(boxes, 80, 120)), expected)
