"""Matcher / BalancedSampler / target encoders vs NumPy references written from
torchvision's and automl's rules, and vs torchvision itself when installed."""
import keras
import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, backend
from keras import ops

from kdet.boxes import BoxCoder
from kdet.matching import (BalancedSampler, Matcher, encode_dense_targets, encode_roi_targets,
                           encode_rpn_targets)


def np_(x):
    return keras.ops.convert_to_numpy(x)


def run(fn, *args, samplers=()):
    """``fn(*args)``; on JAX inside ``jax.jit`` (one compile instead of one per eager op,
    which keeps this file fast), threading the samplers' seed state as the JAX trainer does."""
    if backend() != "jax":
        return fn(*args)
    import jax
    states = [s.seed_generator.state for s in samplers]

    def pure(state_values, *inner):
        with keras.StatelessScope(state_mapping=list(zip(states, state_values))) as scope:
            out = fn(*inner)
            new_values = [scope.get_current_value(v) for v in states]
        return out, new_values

    out, new_values = jax.jit(pure)([v.value for v in states], *args)
    for variable, value in zip(states, new_values):
        variable.assign(value)
    return out


# ------------------------------------------------------------------ references
def matcher_reference(q, high, low, allow_low_quality):
    """torchvision Matcher on one unpadded [M, N] matrix, written out in loops."""
    num_gt, num_pred = q.shape
    if num_gt == 0:
        return np.full(num_pred, -1)
    best = [int(np.argmax(q[:, n])) for n in range(num_pred)]  # first max
    out = []
    for n in range(num_pred):
        value = q[best[n], n]
        out.append(-1 if value < low else (-2 if value < high else best[n]))
    if allow_low_quality:
        for m in range(num_gt):
            top = q[m].max()
            for n in range(num_pred):
                if q[m, n] == top:
                    out[n] = best[n]
    return np.asarray(out)


def force_match_reference(q, threshold):
    """automl/effdet ArgMaxMatcher(threshold, threshold, force_match_for_each_row=True)."""
    num_gt, num_pred = q.shape
    if num_gt == 0:
        return np.full(num_pred, -1)
    out = [int(np.argmax(q[:, n])) if q[:, n].max() >= threshold else -1 for n in range(num_pred)]
    forced = {}
    for m in range(num_gt):
        forced.setdefault(int(np.argmax(q[m])), m)  # first gt wins
    for n, m in forced.items():
        out[n] = m
    return np.asarray(out)


def random_quality(rng, batch, num_gt, num_pred, levels=6):
    # Coarse values force many ties, both per prediction and per ground truth.
    values = rng.integers(0, levels, size=(batch, num_gt, num_pred)) / (levels - 1)
    return values.astype("float32")


def padded_batch(rng, q):
    """Random validity mask (padding interleaved) and the compact per-image matrices."""
    valid = rng.random(q.shape[:2]) < 0.7
    valid[0] = False  # one image without any ground truth
    compact = [q[b][valid[b]] for b in range(q.shape[0])]
    index = [np.flatnonzero(valid[b]) for b in range(q.shape[0])]
    return valid, compact, index


def expand(matches, index):
    """Map compact gt indices back to padded positions."""
    return np.where(matches >= 0, index[np.maximum(matches, 0)] if len(index) else 0, matches)


# --------------------------------------------------------------------- Matcher
@pytest.mark.parametrize("high,low,allow", [(0.5, 0.4, True), (0.7, 0.3, True),
                                            (0.5, 0.5, False), (0.6, 0.2, False)])
def test_matcher_matches_reference_with_ties_and_padding(rng, high, low, allow):
    q = random_quality(rng, 4, 5, 40)
    valid, compact, index = padded_batch(rng, q)
    out = np_(run(Matcher(high, low, allow), q, valid))
    assert out.dtype == np.int32 and out.shape == (4, 40)
    for b in range(4):
        expected = expand(matcher_reference(compact[b], high, low, allow), index[b])
        np.testing.assert_array_equal(out[b], expected)
    np.testing.assert_array_equal(out[0], -1)  # no valid gt -> all background


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
@pytest.mark.parametrize("allow", [True, False])
def test_matcher_matches_torchvision(rng, allow):
    import torch
    from torchvision.models.detection._utils import Matcher as TVMatcher

    tv = TVMatcher(0.5, 0.4, allow_low_quality_matches=allow)
    q = random_quality(rng, 6, 7, 60)
    q[2] = rng.random((7, 60)).astype("float32")  # and continuous values
    ours = np_(run(Matcher(0.5, 0.4, allow), q))
    for b in range(6):
        np.testing.assert_array_equal(ours[b], tv(torch.from_numpy(q[b])).numpy())


def test_matcher_low_quality_restores_ties_by_hand():
    # gt0's max 0.3 is reached by preds 0 and 2 (tie); pred 2's best gt is gt1 (0.35).
    q = np.array([[0.3, 0.1, 0.3, 0.0],
                  [0.0, 0.2, 0.35, 0.1]], "float32")
    np.testing.assert_array_equal(np_(Matcher(0.5, 0.4)(q)), [-1, -1, -1, -1])
    np.testing.assert_array_equal(np_(Matcher(0.5, 0.4, True)(q)), [0, -1, 1, -1])


def test_matcher_unbatched_empty_and_errors():
    q = np.zeros((0, 5), "float32")
    np.testing.assert_array_equal(np_(Matcher(0.5, 0.4, True)(q)), [-1] * 5)
    q = np.ones((2, 3, 5), "float32")
    np.testing.assert_array_equal(np_(Matcher(0.5, 0.4, True)(q, np.zeros((2, 3), bool))), -1)
    with pytest.raises(ValueError, match="low_threshold"):
        Matcher(0.3, 0.5)
    cfg = Matcher(0.7, 0.3, True).get_config()
    assert Matcher.from_config(cfg).get_config() == cfg


def test_force_match_matches_effdet_reference(rng):
    q = random_quality(rng, 5, 6, 30, levels=4)
    valid, compact, index = padded_batch(rng, q)
    out = np_(run(Matcher(0.5, 0.5, force_match_for_each_gt=True), q, valid))
    for b in range(5):
        expected = expand(force_match_reference(compact[b], 0.5), index[b])
        np.testing.assert_array_equal(out[b], expected)


# --------------------------------------------------------------------- Sampler
def _sampler_case(rng, batch=6, n=300):
    labels = rng.choice([-1, 0, 1], size=(batch, n), p=[0.2, 0.6, 0.2])
    labels[1, :] = np.where(labels[1] == 1, 0, labels[1])  # no positives
    labels[2, :] = np.where(labels[2] == 0, -1, labels[2])  # no negatives
    labels[3, :] = -1
    labels[3, :5] = 1  # few positives, few negatives
    labels[3, 5:9] = 0
    return labels == 1, labels == 0


@pytest.mark.parametrize("num,frac", [(64, 0.25), (128, 0.5), (16, 1.0), (10, 0.0)])
def test_sampler_counts_and_subsets(rng, num, frac):
    positive, negative = _sampler_case(rng)
    sampler = BalancedSampler(num, frac, seed=1)
    pos, neg = (np_(m) for m in run(sampler, positive, negative, samplers=[sampler]))
    assert pos.dtype == bool and pos.shape == positive.shape
    for b in range(positive.shape[0]):
        num_pos = min(int(num * frac), positive[b].sum())
        num_neg = min(num - num_pos, negative[b].sum())
        assert pos[b].sum() == num_pos and neg[b].sum() == num_neg
        assert not (pos[b] & ~positive[b]).any() and not (neg[b] & ~negative[b]).any()


def test_sampler_is_seeded_and_random():
    positive = np.zeros((1, 200), bool)
    positive[0, :100] = True
    negative = ~positive
    def draw(sampler):
        return [np_(m) for m in run(sampler, positive, negative, samplers=[sampler])]

    a = draw(BalancedSampler(20, 0.5, seed=7))
    b = draw(BalancedSampler(20, 0.5, seed=7))
    c = draw(BalancedSampler(20, 0.5, seed=8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[0] != c[0]).any()
    sampler = BalancedSampler(20, 0.5, seed=7)
    first, second = draw(sampler)[0], draw(sampler)[0]
    assert (first != second).any()  # the generator advances between calls


def test_sampler_is_uniform():
    # 10 positives, quota 3: each one picked with probability 0.3.
    rows = 4000
    positive = np.zeros((rows, 12), bool)
    positive[:, :10] = True
    sampler = BalancedSampler(6, 0.5, seed=3)
    pos, _ = run(sampler, positive, ~positive, samplers=[sampler])
    freq = np_(pos)[:, :10].mean(0)
    np.testing.assert_allclose(freq, 0.3, atol=0.04)


def _jit(fn):
    if backend() == "tensorflow":
        import tensorflow as tf
        return tf.function(fn, jit_compile=True)
    if backend() == "jax":
        import jax
        return jax.jit(fn)
    pytest.skip(f"no jit test for backend {backend()}")


def test_sampler_under_jit(rng):
    positive, negative = _sampler_case(rng)
    sampler = BalancedSampler(32, 0.25, seed=5)
    if backend() == "jax":  # run() jits with the seed state threaded through
        pos, neg = run(sampler, positive, negative, samplers=[sampler])
        pos2, _ = run(sampler, positive, negative, samplers=[sampler])
        assert (np_(pos) != np_(pos2)).any()
    else:
        pos, neg = _jit(lambda p, n: sampler(p, n))(positive, negative)
    pos, neg = np_(pos), np_(neg)
    for b in range(positive.shape[0]):
        num_pos = min(8, positive[b].sum())
        assert pos[b].sum() == num_pos
        assert neg[b].sum() == min(32 - num_pos, negative[b].sum())


def test_sampler_config_round_trip():
    sampler = BalancedSampler(512, 0.25, seed=3, name="roi_sampler")
    clone = BalancedSampler.from_config(sampler.get_config())
    assert clone.get_config() == sampler.get_config()
    with pytest.raises(ValueError, match="positive_fraction"):
        BalancedSampler(10, 1.5)


# ------------------------------------------------------------------- encoders
def _encode_np(gt, anchors, weights):
    """torchvision encode_boxes, written out (float64)."""
    wx, wy, ww, wh = weights
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return np.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                     ww * np.log(gw / aw), wh * np.log(gh / ah)], -1)


def test_dense_targets_by_hand():
    anchors = np.array([[0, 0, 10, 10],     # IoU 1 with gt0 -> fg class 3
                        [0, 0, 10, 20],     # IoU 0.5 with gt0 -> fg
                        [0, 0, 10, 22],     # IoU 100/220 = 0.4545 -> ignore
                        [40, 40, 50, 50],   # IoU 0 -> background
                        [21, 20, 31, 30]],  # IoU 90/110 = 0.82 with gt2 -> fg class 0
                       "float32")
    gt_boxes = np.array([[[0, 0, 10, 10], [0, 0, 0, 0], [20, 20, 30, 30]]], "float32")
    gt_labels = np.array([[3, -1, 0]], "int32")
    out = run(lambda *a: encode_dense_targets(*a, Matcher(0.5, 0.4, True)),
              anchors, gt_boxes, gt_labels)
    np.testing.assert_array_equal(np_(out["labels"]), [[3, 3, -2, -1, 0]])
    np.testing.assert_array_equal(np_(out["matches"]), [[0, 0, -2, -1, 2]])
    expected = np.zeros((5, 4))
    expected[1] = [0, -0.25, 0, np.log(0.5)]
    expected[4] = [-0.1, 0, 0, 0]
    np.testing.assert_allclose(np_(out["box_targets"])[0], expected, atol=1e-6)
    np.testing.assert_array_equal(np_(out["matched_boxes"])[0, [0, 1, 4]],
                                  gt_boxes[0, [0, 0, 2]])
    np.testing.assert_array_equal(np_(out["matched_boxes"])[0, [2, 3]], 0)
    # automl: force match + yx deltas
    coder = BoxCoder(clip=None, order="yx")
    out = run(lambda *a: encode_dense_targets(
        *a, Matcher(0.5, 0.5, force_match_for_each_gt=True), coder), anchors, gt_boxes, gt_labels)
    np.testing.assert_array_equal(np_(out["labels"]), [[3, 3, -1, -1, 0]])
    np.testing.assert_allclose(np_(out["box_targets"])[0, 1], [-0.25, 0, np.log(0.5), 0],
                               atol=1e-6)


def random_boxes(rng, shape, size=100.0):
    xy = rng.uniform(0, size, shape + (2,))
    wh = rng.uniform(4, size / 2, shape + (2,))
    return np.concatenate([xy, xy + wh], -1).astype("float32")


def padded_gt(rng, batch, num_gt, num_classes=5):
    boxes = random_boxes(rng, (batch, num_gt))
    labels = rng.integers(0, num_classes, (batch, num_gt)).astype("int32")
    valid = rng.random((batch, num_gt)) < 0.7
    valid[0] = False
    valid[1, 0] = True
    labels[~valid] = -1
    boxes[~valid] = 0
    return boxes, labels, valid


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_dense_targets_match_torchvision_retinanet(rng):
    import torch
    from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
    from torchvision.models.detection._utils import Matcher as TVMatcher
    from torchvision.ops import box_iou

    anchors = random_boxes(rng, (400,))
    gt_boxes, gt_labels, valid = padded_gt(rng, 4, 6)
    out = run(encode_dense_targets, anchors, gt_boxes, gt_labels)
    tv_matcher, tv_coder = TVMatcher(0.5, 0.4, True), TVBoxCoder((1.0, 1.0, 1.0, 1.0))
    for b in range(4):
        gt = torch.from_numpy(gt_boxes[b][valid[b]])
        if len(gt) == 0:  # torchvision RetinaNet: all background
            matched = np.full(400, -1)
        else:
            matched = tv_matcher(box_iou(gt, torch.from_numpy(anchors))).numpy()
        fg = matched >= 0
        labels = np.where(fg, gt_labels[b][valid[b]][np.maximum(matched, 0)] if len(gt) else 0,
                          matched)
        np.testing.assert_array_equal(np_(out["labels"])[b], labels)
        if fg.any():
            target = tv_coder.encode_single(gt[matched[fg]], torch.from_numpy(anchors[fg])).numpy()
            np.testing.assert_allclose(np_(out["box_targets"])[b][fg], target, atol=1e-5)
        np.testing.assert_array_equal(np_(out["box_targets"])[b][~fg], 0)


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_rpn_targets_match_torchvision(rng):
    import torch
    from torchvision.models.detection.rpn import RegionProposalNetwork

    anchors = random_boxes(rng, (300,))
    gt_boxes, gt_labels, valid = padded_gt(rng, 3, 5)
    rpn = RegionProposalNetwork(None, None, 0.7, 0.3, 256, 0.5, {"training": 1, "testing": 1},
                                {"training": 1, "testing": 1}, 0.7)
    targets = [{"boxes": torch.from_numpy(gt_boxes[b][valid[b]])} for b in range(3)]
    tv_labels, tv_matched = rpn.assign_targets_to_anchors([torch.from_numpy(anchors)] * 3, targets)
    out = run(encode_rpn_targets, anchors, gt_boxes, gt_labels)  # no sampler: every fg / bg
    for b in range(3):
        mapped = {1.0: 0, 0.0: -1, -1.0: -2}
        expected = np.vectorize(mapped.get)(tv_labels[b].numpy())
        np.testing.assert_array_equal(np_(out["labels"])[b], expected)
        fg = expected == 0
        np.testing.assert_array_equal(np_(out["matched_boxes"])[b][fg], tv_matched[b].numpy()[fg])
        target = rpn.box_coder.encode_single(tv_matched[b][fg], torch.from_numpy(anchors[fg]))
        np.testing.assert_allclose(np_(out["box_targets"])[b][fg], target.numpy(), atol=1e-5)


def test_rpn_targets_sampled_counts(rng):
    anchors = random_boxes(rng, (500,))
    gt_boxes, gt_labels, _ = padded_gt(rng, 3, 4)
    full = run(encode_rpn_targets, anchors, gt_boxes, gt_labels)
    sampler = BalancedSampler(64, 0.5, seed=0)
    out = run(lambda *a: encode_rpn_targets(*a, sampler), anchors, gt_boxes, gt_labels,
              samplers=[sampler])
    full_labels, labels = np_(full["labels"]), np_(out["labels"])
    for b in range(3):
        num_pos = min(32, (full_labels[b] == 0).sum())
        assert (labels[b] == 0).sum() == num_pos
        assert (labels[b] == -1).sum() == min(64 - num_pos, (full_labels[b] == -1).sum())
        picked = labels[b] != -2
        np.testing.assert_array_equal(labels[b][picked], full_labels[b][picked])
    np.testing.assert_array_equal(np_(out["box_targets"])[labels != 0], 0)
    assert (full_labels[0] == -1).all()  # image without gt: all background


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_roi_targets_match_torchvision_when_everything_is_sampled(rng):
    import torch
    from torchvision.models.detection.roi_heads import RoIHeads

    proposals = random_boxes(rng, (3, 50))
    gt_boxes, gt_labels, valid = padded_gt(rng, 3, 5)
    heads = RoIHeads(None, None, None, 0.5, 0.5, 100000, 0.5, None, 0.05, 0.5, 100)
    targets = [{"boxes": torch.from_numpy(gt_boxes[b][valid[b]]),
                "labels": torch.from_numpy(gt_labels[b][valid[b]].astype("int64") + 1)}
               for b in range(3)]
    tv_props, _, tv_labels, tv_targets = heads.select_training_samples(
        [torch.from_numpy(p) for p in proposals], targets)
    out = run(encode_roi_targets, proposals, gt_boxes, gt_labels)
    for b in range(3):
        ok = np_(out["valid"])[b]
        assert ok.sum() == len(tv_props[b])
        np.testing.assert_array_equal(np_(out["rois"])[b][ok], tv_props[b].numpy())
        # torchvision labels: class + 1, background 0
        np.testing.assert_array_equal(np_(out["labels"])[b][ok] + 1, tv_labels[b].numpy())
        fg = np_(out["labels"])[b][ok] >= 0
        np.testing.assert_allclose(np_(out["box_targets"])[b][ok][fg],
                                   tv_targets[b].numpy()[fg], atol=1e-4)
        np.testing.assert_array_equal(np_(out["box_targets"])[b][ok][~fg], 0)


def test_roi_targets_by_hand_and_sampling(rng):
    proposals = np.array([[[0, 0, 10, 10], [0, 0, 10, 20], [50, 50, 60, 60], [0, 0, 0, 0]]],
                         "float32")
    gt_boxes = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]]], "float32")
    gt_labels = np.array([[2, -1]], "int32")
    valid = np.array([[True, True, True, False]])
    out = run(encode_roi_targets, proposals, gt_boxes, gt_labels, None, valid)
    # candidates: 3 valid proposals + gt0 (gt1 and proposal 3 are padding)
    np.testing.assert_array_equal(np_(out["valid"]), [[1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(np_(out["labels"]), [[2, 2, -1, 2, -2, -2]])
    np.testing.assert_array_equal(np_(out["matches"]), [[0, 0, -1, 0, -1, -1]])
    np.testing.assert_allclose(np_(out["box_targets"])[0, 1], [0, -2.5, 0, 5 * np.log(0.5)],
                               atol=1e-5)
    np.testing.assert_array_equal(np_(out["rois"])[0, 3], gt_boxes[0, 0])

    proposals = random_boxes(rng, (2, 300))
    gt_boxes, gt_labels, _ = padded_gt(rng, 2, 6)
    gt_boxes[1, 0] = proposals[1, 0] + 1.0  # guarantee some foreground in image 1
    full = run(encode_roi_targets, proposals, gt_boxes, gt_labels)
    sampler = BalancedSampler(64, 0.25, seed=2)
    out = run(lambda *a: encode_roi_targets(*a, sampler), proposals, gt_boxes, gt_labels,
              samplers=[sampler])
    labels, ok = np_(out["labels"]), np_(out["valid"])
    assert labels.shape == (2, 64)
    for b in range(2):
        num_fg_all = (np_(full["labels"])[b] >= 0).sum()
        num_bg_all = (np_(full["labels"])[b] == -1).sum()
        num_fg = min(16, num_fg_all)
        assert (labels[b] >= 0).sum() == num_fg
        assert (labels[b] == -1).sum() == min(64 - num_fg, num_bg_all)
        assert ok[b].sum() == (labels[b] >= -1).sum()
        assert (np.diff(np.flatnonzero(ok[b])) == 1).all() and (not ok[b].any() or ok[b][0])


def test_encoders_under_jit_and_float16(rng):
    anchors = random_boxes(rng, (200,))
    gt_boxes, gt_labels, _ = padded_gt(rng, 2, 4)
    proposals = random_boxes(rng, (2, 40))
    sampler = BalancedSampler(16, 0.25, seed=0)

    def fn(a, g, l, p):
        dense = encode_dense_targets(a, g, l)
        rpn = encode_rpn_targets(a, g, l)
        roi = encode_roi_targets(p, g, l)
        return dense["labels"], dense["box_targets"], rpn["labels"], roi["labels"], roi["rois"]

    jitted = _jit(fn)(anchors, gt_boxes, gt_labels, proposals)
    if backend() == "tensorflow":  # (on JAX every other test already runs jitted)
        eager = fn(anchors, gt_boxes, gt_labels, proposals)
        for e, j in zip(eager, jitted):
            np.testing.assert_allclose(np_(e), np_(j), atol=1e-5)
    np.testing.assert_array_equal(np_(jitted[0])[0], -1)  # image 0 has no gt
    if backend() == "tensorflow":  # sampler state is a tf.Variable: fine under XLA
        out = _jit(lambda p, g, l: encode_roi_targets(p, g, l, sampler)["labels"])(
            proposals, gt_boxes, gt_labels)
        assert np_(out).shape == (2, 16)
    half = run(encode_dense_targets, anchors.astype("float16"), gt_boxes.astype("float16"),
               gt_labels)
    assert np.isfinite(np_(half["box_targets"])).all()
    assert half["box_targets"].dtype == "float32"
    assert ops.convert_to_numpy(half["labels"]).dtype == np.int32
