"""kdet.ops.nms / batched_nms against a numpy transcription of torchvision's kernel.

The reference below is torchvision's CPU ``nms_kernel`` written out in numpy:
float32 box arithmetic in the kernel's order, ``ovr > iou_threshold`` with the
threshold as float64, stable descending sort (kdet's defined tie order). When
torchvision is importable the tests also compare with it directly.
"""
import functools

import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, backend
from hypothesis import given, settings
from hypothesis import strategies as st

from kdet.ops.nms import batched_nms, nms, select_detections

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION,
                                       reason="torchvision not importable")


# ----------------------------------------------------------------- reference

def ref_nms(boxes, scores, iou_threshold, max_output_size=None,
            score_threshold=-np.inf, valid=None):
    """torchvision ``nms`` on one image; returns kept indices, best first."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    cand = scores > np.float32(score_threshold)  # torch compares in float32
    if valid is not None:
        cand &= np.asarray(valid, bool)
    order = [i for i in np.argsort(-scores, kind="stable") if cand[i]]
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)  # the kernel does not clamp
    keep = []
    suppressed = np.zeros(len(boxes), bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            for j in order[pos + 1:]:
                if suppressed[j]:
                    continue
                w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]))
                h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]))
                inter = np.float32(w * h)
                ovr = np.float32(inter / np.float32(areas[i] + areas[j] - inter))
                if float(ovr) > float(iou_threshold):  # float vs double, as in C++
                    suppressed[j] = True
    keep = np.array(keep, np.int64)
    return keep if max_output_size is None else keep[:max_output_size]


def ref_batched_offset(boxes, scores, labels, iou_threshold, max_output_size=None,
                       score_threshold=-np.inf, valid=None):
    """torchvision ``_batched_nms_coordinate_trick`` on the candidates."""
    boxes = np.asarray(boxes, np.float32)
    cand = np.asarray(scores, np.float32) > np.float32(score_threshold)
    if valid is not None:
        cand &= np.asarray(valid, bool)
    max_coordinate = boxes[cand].max() if cand.any() else np.float32(0)
    offsets = np.asarray(labels).astype(np.float32) * (max_coordinate + np.float32(1))
    return ref_nms(boxes + offsets[:, None], scores, iou_threshold, max_output_size,
                   score_threshold, valid)


def ref_per_class(boxes, scores, labels, iou_threshold, max_output_size=None,
                  score_threshold=-np.inf, valid=None):
    """NMS class by class, merged by score (stable: lower index first on ties)."""
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels)
    valid = np.ones(len(scores), bool) if valid is None else np.asarray(valid, bool)
    kept = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        kept.extend(idx[ref_nms(boxes[idx], scores[idx], iou_threshold, None,
                                score_threshold, valid[idx])])
    kept = np.array(sorted(kept), np.int64)
    kept = kept[np.argsort(-scores[kept], kind="stable")]
    return kept if max_output_size is None else kept[:max_output_size]


# ------------------------------------------------------------------- helpers

def random_boxes(rng, n, clusters=4, spread=6.0, integer=False):
    """Boxes bunched around a few centres: many overlaps, chains, near-duplicates."""
    centres = rng.uniform(20, 100, (clusters, 2))
    c = centres[rng.integers(0, clusters, n)] + rng.normal(0, spread, (n, 2))
    wh = rng.uniform(2, 40, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], -1)
    if integer:
        boxes = np.round(boxes)
    return boxes.astype(np.float32)


def kdet_result(indices, count):
    """Kept indices of one image as numpy, after checking the padding."""
    indices, count = np.asarray(indices), int(np.asarray(count))
    assert indices.dtype == np.int32
    assert np.all(indices[count:] == -1)
    assert np.all(indices[:count] >= 0)
    return indices[:count].astype(np.int64)


def check_batch(indices, counts, expected):
    indices, counts = np.asarray(indices), np.asarray(counts)
    assert counts.dtype == np.int32
    assert indices.shape[0] == len(expected)
    for b, exp in enumerate(expected):
        np.testing.assert_array_equal(kdet_result(indices[b], counts[b]), exp, err_msg=f"image {b}")


@functools.lru_cache(maxsize=None)
def compiled(fn_name, **static):
    """``nms``/``batched_nms`` jit-compiled for this backend, static args baked in."""
    fn = {"nms": nms, "batched_nms": batched_nms}[fn_name]

    def call(*arrays):
        return fn(*arrays, **static)

    if backend() == "jax":
        import jax
        return jax.jit(call)
    if backend() == "tensorflow":
        import tensorflow as tf
        return tf.function(call, jit_compile=True, autograph=False)
    pytest.skip(f"no jit for backend {backend()}")


def run_nms(mode, boxes, scores, **static):
    if mode == "eager":
        return nms(boxes, scores, **static)
    return compiled("nms", **static)(boxes, scores)


def run_batched(mode, boxes, scores, labels, **static):
    if mode == "eager":
        return batched_nms(boxes, scores, labels, **static)
    return compiled("batched_nms", **static)(boxes, scores, labels)


# --------------------------------------------------------------------- tests

@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("n, thr, max_out, tile", [
    (1, 0.5, 4, 256), (7, 0.5, 10, 256), (64, 0.3, 100, 16),
    (300, 0.5, 50, 64), (300, 0.7, 400, 128)])
def test_nms_matches_reference(rng, mode, n, thr, max_out, tile):
    boxes = np.stack([random_boxes(rng, n, integer=b == 1) for b in range(3)])
    scores = rng.uniform(0, 1, (3, n)).astype(np.float32)
    scores[1] = np.round(scores[1] * 4) / 4  # many exact ties
    indices, counts = run_nms(mode, boxes, scores, iou_threshold=thr,
                              max_output_size=max_out, tile_size=tile)
    assert np.asarray(indices).shape == (3, max_out)
    check_batch(indices, counts, [ref_nms(boxes[b], scores[b], thr, max_out) for b in range(3)])


@settings(max_examples=25, deadline=None)
@given(data=st.data(), thr=st.sampled_from([0.0, 0.25, 0.5, 0.7]))
def test_nms_property_against_reference(data, thr):
    """Integer boxes and coarse scores: exact ties and exact-threshold IoUs are common."""
    n = 24
    coords = data.draw(st.lists(st.integers(0, 12), min_size=4 * n, max_size=4 * n))
    boxes = np.array(coords, np.float32).reshape(1, n, 4)
    boxes[..., 2:] = boxes[..., :2] + boxes[..., 2:] / 2  # w, h in [0, 6], some zero
    score_ints = data.draw(st.lists(st.integers(-1, 5), min_size=n, max_size=n))
    scores = np.array(score_ints, np.float32).reshape(1, n) / 5
    scores[scores < 0] = -np.inf  # padding
    indices, counts = run_nms("jit", boxes, scores, iou_threshold=thr, max_output_size=16,
                              score_threshold=0.1, tile_size=8)
    check_batch(indices, counts, [ref_nms(boxes[0], scores[0], thr, 16, 0.1)])


def test_iou_exactly_at_threshold_is_kept(rng):
    # IoU 2/4 = 0.5 exactly in float32, and 50/100 = 0.5 for a nested box.
    # The last pair has IoU 0.501, a hair above 0.5.
    boxes = np.array([[0, 0, 3, 1], [1, 0, 4, 1], [10, 10, 20, 20], [10, 10, 20, 15],
                      [30, 30, 40, 40], [30, 30, 40, 35.01]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)
    for mode in ("eager", "jit"):
        idx, count = run_nms(mode, boxes, scores, iou_threshold=0.5, max_output_size=6)
        np.testing.assert_array_equal(kdet_result(idx, count), [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(kdet_result(idx, count), ref_nms(boxes, scores, 0.5))
        idx, count = run_nms(mode, boxes, scores, iou_threshold=0.4999, max_output_size=6)
        np.testing.assert_array_equal(kdet_result(idx, count), [0, 2, 4])


def test_threshold_compared_as_torchvision_does():
    """IoU = float32(0.3) = 0.30000001... is > 0.3 (double): suppressed, as in torchvision."""
    boxes = np.array([[0, 0, 6.5, 1], [3.5, 0, 10, 1]], np.float32)  # inter 3, union 10
    scores = np.array([0.9, 0.8], np.float32)
    for mode in ("eager", "jit"):
        idx, count = run_nms(mode, boxes, scores, iou_threshold=0.3, max_output_size=2)
        np.testing.assert_array_equal(kdet_result(idx, count), ref_nms(boxes, scores, 0.3))
        np.testing.assert_array_equal(kdet_result(idx, count), [0])
        # the float32 value itself as threshold: IoU is not > it, both kept
        idx, count = run_nms(mode, boxes, scores, iou_threshold=float(np.float32(0.3)),
                             max_output_size=2)
        np.testing.assert_array_equal(kdet_result(idx, count), [0, 1])


def test_ties_keep_lower_index_first():
    # 600 identical scores across several tiles; disjoint boxes, every one kept.
    n = 600
    x = np.arange(n, dtype=np.float32) * 20
    boxes = np.stack([x, np.zeros(n), x + 10, np.full(n, 10)], -1).astype(np.float32)
    scores = np.full(n, 0.5, np.float32)
    scores[::7] = 0.75
    for mode in ("eager", "jit"):
        idx, count = run_nms(mode, boxes, scores, iou_threshold=0.5, max_output_size=n,
                             tile_size=128)
        expected = np.concatenate([np.arange(0, n, 7), np.setdiff1d(np.arange(n), np.arange(0, n, 7))])
        np.testing.assert_array_equal(kdet_result(idx, count), expected)


def test_identical_boxes_equal_scores():
    boxes = np.tile(np.array([[5, 5, 15, 15]], np.float32), (5, 1))
    scores = np.ones(5, np.float32)
    idx, count = nms(boxes, scores, 0.5, max_output_size=3)
    np.testing.assert_array_equal(kdet_result(idx, count), [0])


def test_degenerate_boxes(rng):
    boxes = random_boxes(rng, 40)
    boxes[::4, 2] = boxes[::4, 0]          # zero width
    boxes[1::9] = 0                        # all-zero rows
    boxes[2::11, 2:] = boxes[2::11, :2] - 3  # inverted
    boxes[3] = boxes[5]                    # duplicates
    scores = rng.uniform(size=40).astype(np.float32)
    for mode in ("eager", "jit"):
        idx, count = run_nms(mode, boxes, scores, iou_threshold=0.5, max_output_size=40,
                             tile_size=16)
        np.testing.assert_array_equal(kdet_result(idx, count), ref_nms(boxes, scores, 0.5))


def test_all_padding():
    boxes = np.zeros((2, 30, 4), np.float32)
    scores = np.full((2, 30), -np.inf, np.float32)
    for mode in ("eager", "jit"):
        idx, count = run_nms(mode, boxes, scores, iou_threshold=0.5, max_output_size=8)
        np.testing.assert_array_equal(np.asarray(idx), -np.ones((2, 8)))
        np.testing.assert_array_equal(np.asarray(count), [0, 0])
    # padding by mask: high scores that must still never be kept
    idx, count = nms(np.ones((30, 4), np.float32) * [0, 0, 1, 1], np.ones(30, np.float32),
                     0.5, 8, valid_mask=np.zeros(30, bool))
    assert int(count) == 0 and np.all(np.asarray(idx) == -1)


def test_valid_mask_and_nan_scores(rng):
    boxes = random_boxes(rng, 50)
    scores = rng.uniform(size=50).astype(np.float32)
    valid = rng.uniform(size=50) < 0.7
    scores[7] = np.nan
    valid_ref = valid & ~np.isnan(scores)
    idx, count = nms(boxes, scores, 0.5, 50, valid_mask=valid, tile_size=16)
    np.testing.assert_array_equal(kdet_result(idx, count),
                                  ref_nms(boxes, scores, 0.5, valid=valid_ref))


def test_score_threshold(rng):
    boxes = random_boxes(rng, 80)
    scores = (np.round(rng.uniform(size=80) * 20) / 20).astype(np.float32)
    scores[:5] = np.float32(0.05)  # equal to the threshold in float32: dropped, as torch
    for mode in ("eager", "jit"):
        idx, count = run_nms(mode, boxes, scores, iou_threshold=0.5, max_output_size=80,
                             score_threshold=0.05, tile_size=32)
        kept = kdet_result(idx, count)
        np.testing.assert_array_equal(kept, ref_nms(boxes, scores, 0.5, None, 0.05))
        assert np.all(scores[kept] > np.float32(0.05))


def test_max_output_size_smaller_and_larger(rng):
    boxes = random_boxes(rng, 200, clusters=20, spread=30)
    scores = rng.uniform(size=200).astype(np.float32)
    full = ref_nms(boxes, scores, 0.5)
    assert len(full) > 10
    for max_out in (1, 10, len(full), 250):
        idx, count = nms(boxes, scores, 0.5, max_output_size=max_out, tile_size=32)
        assert np.asarray(idx).shape == (max_out,)
        np.testing.assert_array_equal(kdet_result(idx, count), full[:max_out])
    idx, count = nms(boxes, scores, 0.5, max_output_size=0)
    assert np.asarray(idx).shape == (0,) and int(count) == 0


def test_result_does_not_depend_on_tile_size(rng):
    boxes = random_boxes(rng, 90)
    scores = rng.uniform(size=90).astype(np.float32)
    expected = ref_nms(boxes, scores, 0.45, 60)
    for tile in (1, 7, 32, 90, 1000):
        idx, count = nms(boxes, scores, 0.45, max_output_size=60, tile_size=tile)
        np.testing.assert_array_equal(kdet_result(idx, count), expected, err_msg=f"tile {tile}")


def test_suppression_chain_across_tiles():
    """Box i overlaps only i+1: greedy keeps every other box; needs many fixed-point rounds."""
    n = 100
    x = np.arange(n, dtype=np.float32) * 4
    boxes = np.stack([x, np.zeros(n), x + 10, np.full(n, 10)], -1).astype(np.float32)
    scores = np.linspace(1, 0.1, n).astype(np.float32)
    for mode in ("eager", "jit"):
        idx, count = run_nms(mode, boxes, scores, iou_threshold=0.4, max_output_size=n,
                             tile_size=32)
        np.testing.assert_array_equal(kdet_result(idx, count), np.arange(0, n, 2))


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_batched_nms_offset_and_mask_match_references(rng, mode):
    n = 150
    boxes = np.stack([random_boxes(rng, n, integer=True) for _ in range(2)])
    scores = (np.round(rng.uniform(size=(2, n)) * 10) / 10).astype(np.float32)
    labels = rng.integers(0, 4, (2, n)).astype(np.int32)
    static = dict(iou_threshold=0.5, max_output_size=100, score_threshold=0.05, tile_size=64)
    idx, count = run_batched(mode, boxes, scores, labels, method="offset", **static)
    check_batch(idx, count, [ref_batched_offset(boxes[b], scores[b], labels[b], 0.5, 100, 0.05)
                             for b in range(2)])
    idx, count = run_batched(mode, boxes, scores, labels, method="mask", **static)
    expected = [ref_per_class(boxes[b], scores[b], labels[b], 0.5, 100, 0.05) for b in range(2)]
    check_batch(idx, count, expected)
    # moderate integer coordinates: the offset trick is exact, both agree
    for b in range(2):
        np.testing.assert_array_equal(
            ref_batched_offset(boxes[b], scores[b], labels[b], 0.5, 100, 0.05), expected[b])


def test_batched_nms_labels_never_suppress_each_other():
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (6, 1))
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    for method in ("offset", "mask"):
        idx, count = batched_nms(boxes, scores, labels, 0.5, 6, method=method)
        np.testing.assert_array_equal(kdet_result(idx, count), [0, 1, 2])
    idx, count = nms(boxes, scores, 0.5, 6)
    np.testing.assert_array_equal(kdet_result(idx, count), [0])


def test_jit_equals_eager(rng):
    boxes = np.stack([random_boxes(rng, 120) for _ in range(2)])
    scores = rng.uniform(size=(2, 120)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 120)).astype(np.int32)
    static = dict(iou_threshold=0.6, max_output_size=40, tile_size=32)
    for run, args in ((run_nms, (boxes, scores)), (run_batched, (boxes, scores, labels))):
        eager = run("eager", *args, **static)
        jitted = run("jit", *args, **static)
        for a, b in zip(eager, jitted):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dynamic_batch_under_tf_function(rng):
    if backend() != "tensorflow":
        pytest.skip("input_signature with an unknown batch is a tf.function feature")
    import tensorflow as tf
    boxes = np.stack([random_boxes(rng, 50) for _ in range(3)])
    scores = rng.uniform(size=(3, 50)).astype(np.float32)
    fn = tf.function(lambda b, s: nms(b, s, 0.5, 20, tile_size=16), jit_compile=True,
                     autograph=False,
                     input_signature=[tf.TensorSpec([None, 50, 4]), tf.TensorSpec([None, 50])])
    idx, count = fn(boxes, scores)
    check_batch(idx, count, [ref_nms(boxes[b], scores[b], 0.5, 20) for b in range(3)])


def test_select_detections(rng):
    boxes = random_boxes(rng, 30)[None]
    scores = rng.uniform(size=(1, 30)).astype(np.float32)
    labels = rng.integers(0, 5, (1, 30)).astype(np.int32)
    idx, count = batched_nms(boxes, scores, labels, 0.5, 40)
    out = select_detections(boxes, scores, labels, idx, count)
    kept = ref_batched_offset(boxes[0], scores[0], labels[0], 0.5, 40)
    k = len(kept)
    assert int(np.asarray(out["num_detections"])[0]) == k
    np.testing.assert_array_equal(np.asarray(out["boxes"])[0, :k], boxes[0, kept])
    np.testing.assert_array_equal(np.asarray(out["scores"])[0, :k], scores[0, kept])
    np.testing.assert_array_equal(np.asarray(out["labels"])[0, :k], labels[0, kept])
    np.testing.assert_array_equal(np.asarray(out["boxes"])[0, k:], 0)
    np.testing.assert_array_equal(np.asarray(out["scores"])[0, k:], 0)
    np.testing.assert_array_equal(np.asarray(out["labels"])[0, k:], -1)
    single = select_detections(boxes[0], scores[0], None, idx[0], count[0])
    assert np.asarray(single["boxes"]).shape == (40, 4)
    np.testing.assert_array_equal(np.asarray(single["labels"])[:k], 0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="boxes must be"):
        nms(np.zeros((3, 5), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="disagree on N"):
        nms(np.zeros((3, 4), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="method"):
        batched_nms(np.zeros((3, 4), np.float32), np.zeros(3, np.float32),
                    np.zeros(3, np.int32), method="nope")


# ---------------------------------------------------------------- torchvision

@needs_torchvision
def test_nms_matches_torchvision(rng):
    import torch
    import torchvision
    for n, thr in ((50, 0.5), (400, 0.3), (1000, 0.7)):
        boxes = random_boxes(rng, n, clusters=6, spread=10)
        scores = rng.uniform(size=n).astype(np.float32)
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr)
        idx, count = run_nms("jit", boxes, scores, iou_threshold=thr, max_output_size=n)
        np.testing.assert_array_equal(kdet_result(idx, count), expected.numpy())


@needs_torchvision
def test_nms_ties_same_kept_set_as_torchvision(rng):
    import torch
    import torchvision
    boxes = random_boxes(rng, 200, integer=True)
    scores = (np.round(rng.uniform(size=200) * 3) / 3).astype(np.float32)
    idx, count = nms(boxes, scores, 0.5, 200)
    kept = kdet_result(idx, count)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    # torchvision's sort need not be stable, so with ties only the scores line up ...
    np.testing.assert_array_equal(scores[kept], scores[expected])
    # ... and the kept set equals the stable reference's
    np.testing.assert_array_equal(kept, ref_nms(boxes, scores, 0.5))


@needs_torchvision
def test_batched_nms_matches_torchvision(rng):
    import torch
    import torchvision
    # n * 4 <= 4000: torchvision uses the coordinate trick; above it, per class.
    for n, method in ((300, "offset"), (1500, "mask")):
        boxes = random_boxes(rng, n, clusters=8, spread=12)
        scores = rng.uniform(size=n).astype(np.float32)
        labels = rng.integers(0, 5, n).astype(np.int32)
        expected = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                               torch.from_numpy(labels.astype(np.int64)), 0.5)
        idx, count = run_batched("jit", boxes, scores, labels, iou_threshold=0.5,
                                 max_output_size=n, method=method, tile_size=256)
        np.testing.assert_array_equal(kdet_result(idx, count), expected.numpy())
