"""kdet.ops.nms / batched_nms against a numpy transcription of torchvision's kernel.

The reference below is torchvision's CPU ``nms_kernel`` written out in numpy:
float32 box arithmetic in the kernel's order, ``ovr > iou_threshold`` with the
threshold as float64, a stable descending sort (kdet's defined tie order).
When torchvision is importable the tests also hold both against it.

Compiling the NMS loops costs seconds on a busy CPU, so the hard cases are
stacked as the images of one batch (``scenario_bank``) and each configuration
compiles once.
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
N = 64  # boxes per scenario image
MODES = ["eager", "jit"]


# ----------------------------------------------------------------- reference

def ref_nms(boxes, scores, iou_threshold, max_output_size=None,
            score_threshold=-np.inf, valid=None):
    """torchvision ``nms`` on one image; kept indices, best first."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    cand = scores > np.float32(score_threshold)  # torch compares in float32
    if valid is not None:
        cand &= np.asarray(valid, bool)
    order = np.array([i for i in np.argsort(-scores, kind="stable") if cand[i]], np.int64)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)  # the kernel does not clamp
    zero = np.float32(0)
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(i)
            rest = order[pos + 1:]
            w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = w * h
            ovr = inter / (areas[i] + areas[rest] - inter)
            assert ovr.dtype == np.float32
            # C++: float ovr > double iou_threshold
            suppressed[rest[ovr.astype(np.float64) > float(iou_threshold)]] = True
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


# ----------------------------------------------------------------- scenarios

def random_boxes(rng, n, clusters=4, spread=6.0, integer=False):
    """Boxes bunched around a few centres: many overlaps, chains, near-duplicates."""
    centres = rng.uniform(20, 100, (clusters, 2))
    c = centres[rng.integers(0, clusters, n)] + rng.normal(0, spread, (n, 2))
    wh = rng.uniform(2, 40, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], -1)
    return (np.round(boxes) if integer else boxes).astype(np.float32)


def padded(boxes, scores, valid=None):
    """One scenario image of N rows; missing rows are zero boxes with score -inf."""
    k = len(boxes)
    b = np.zeros((N, 4), np.float32)
    s = np.full(N, -np.inf, np.float32)
    v = np.ones(N, bool)
    b[:k], s[:k] = boxes, scores
    if valid is not None:
        v[:k] = valid
    return b, s, v


def row_boxes(x, width=10.0, height=10.0):
    x = np.asarray(x, np.float32)
    return np.stack([x, np.zeros_like(x), x + width, np.full_like(x, height)], -1)


@functools.lru_cache(maxsize=None)
def scenario_bank():
    """name -> image index, and the stacked [S, N, 4] boxes, [S, N] scores, [S, N] valid."""
    rng = np.random.default_rng(0)
    images = {}
    images["clustered"] = padded(random_boxes(rng, N), rng.uniform(size=N))
    images["integer_ties"] = padded(random_boxes(rng, N, integer=True),
                                    np.round(rng.uniform(size=N) * 4) / 4)
    degenerate = random_boxes(rng, N)
    degenerate[::4, 2] = degenerate[::4, 0]                  # zero width
    degenerate[1::9] = 0                                     # all-zero rows
    degenerate[2::11, 2:] = degenerate[2::11, :2] - 3        # inverted
    degenerate[3] = degenerate[5]                            # duplicates
    images["degenerate"] = padded(degenerate, rng.uniform(size=N))
    # IoU exactly 0.5 (2/4 and 50/100 in float32) and 0.501.
    images["exact_half"] = padded(
        np.array([[0, 0, 3, 1], [1, 0, 4, 1], [10, 10, 20, 20], [10, 10, 20, 15],
                  [30, 30, 40, 40], [30, 30, 40, 35.01]]),
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # inter 3 / union 10: IoU is float32(0.3) = 0.30000001..., which is > 0.3 (double).
    images["float32_0.3"] = padded(np.array([[0, 0, 6.5, 1], [3.5, 0, 10, 1]]), [0.9, 0.8])
    # box i overlaps i+1 (IoU 7/13) and i+2 (4/16) only: at thresholds 0.3-0.5
    # greedy keeps every other box, and the fixed point needs many rounds.
    images["chain"] = padded(row_boxes(np.arange(N) * 3), np.linspace(1, 0.1, N))
    images["all_padding"] = padded(np.zeros((0, 4)), np.zeros(0))
    masked_scores = rng.uniform(size=N)
    masked_scores[7] = np.nan
    images["mask_and_nan"] = padded(random_boxes(rng, N), masked_scores, rng.uniform(size=N) < 0.7)
    tie_scores = np.full(N, 0.5)
    tie_scores[::7] = 0.75
    images["disjoint_ties"] = padded(row_boxes(np.arange(N) * 20), tie_scores)
    images["identical"] = padded(np.tile([[5, 5, 15, 15]], (5, 1)), np.ones(5))
    # Negative coordinates: torchvision's offset trick then lets labels overlap
    # (it assumes 0 <= x1); method="offset" reproduces that, "mask" does not.
    negative = random_boxes(rng, N, spread=15) - 150
    negative[1::2] = negative[0::2] + 0.5  # near-duplicate pairs
    images["negative_coords"] = padded(negative, rng.uniform(size=N))
    names = {name: i for i, name in enumerate(images)}
    boxes, scores, valid = (np.stack(parts) for parts in zip(*images.values()))
    return names, boxes.astype(np.float32), scores.astype(np.float32), valid


# ------------------------------------------------------------------- helpers

def kdet_result(indices, count):
    """Kept indices of one image as numpy, after checking the padding."""
    indices, count = np.asarray(indices), int(np.asarray(count))
    assert indices.dtype == np.int32
    assert np.all(indices[count:] == -1)
    assert np.all(indices[:count] >= 0)
    return indices[:count].astype(np.int64)


def check_batch(indices, counts, expected, names=None):
    indices, counts = np.asarray(indices), np.asarray(counts)
    assert counts.dtype == np.int32
    assert indices.shape[0] == len(expected)
    for b, exp in enumerate(expected):
        label = names[b] if names else f"image {b}"
        np.testing.assert_array_equal(kdet_result(indices[b], counts[b]), exp, err_msg=label)


def _jit(fn):
    if backend() == "jax":
        import jax
        return jax.jit(fn)
    if backend() == "tensorflow":
        import tensorflow as tf
        return tf.function(fn, jit_compile=True, autograph=False)
    pytest.skip(f"no jit for backend {backend()}")


@functools.lru_cache(maxsize=None)
def compiled(fn_name, with_valid=False, **static):
    """``nms``/``batched_nms`` jit-compiled, static arguments baked in."""
    fn = {"nms": nms, "batched_nms": batched_nms}[fn_name]
    if with_valid:
        return _jit(lambda b, s, v: fn(b, s, valid_mask=v, **static))
    return _jit(lambda *arrays: fn(*arrays, **static))


def run_nms(mode, boxes, scores, valid=None, **static):
    if mode == "eager":
        return nms(boxes, scores, valid_mask=valid, **static)
    if valid is None:
        return compiled("nms", **static)(boxes, scores)
    return compiled("nms", with_valid=True, **static)(boxes, scores, valid)


def run_batched(mode, *arrays, **static):
    if mode == "eager":
        return batched_nms(*arrays, **static)
    return compiled("batched_nms", **static)(*arrays)


# --------------------------------------------------------------------- tests

CONFIGS = {  # iou_threshold, max_output_size, score_threshold, tile_size
    "thr0.5_tile16": (0.5, N, float("-inf"), 16),
    "thr0.3_top10_score0.05": (0.3, 10, 0.05, 64),   # fewer slots than survivors
    "thr0.4_slots>N_tile7": (0.4, N + 16, 0.0, 7),   # more slots than boxes, ragged tiles
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_nms_scenarios_match_reference(mode, config):
    thr, max_out, score_thr, tile = CONFIGS[config]
    names, boxes, scores, valid = scenario_bank()
    indices, counts = run_nms(mode, boxes, scores, valid, iou_threshold=thr,
                              max_output_size=max_out, score_threshold=score_thr, tile_size=tile)
    assert np.asarray(indices).shape == (len(names), max_out)
    expected = [ref_nms(boxes[b], scores[b], thr, max_out, score_thr, valid[b])
                for b in range(len(names))]
    check_batch(indices, counts, expected, list(names))


@pytest.mark.parametrize("mode", MODES)
def test_nms_known_answers(mode):
    """Hand-derived results, independent of the reference."""
    names, boxes, scores, valid = scenario_bank()
    thr, max_out, score_thr, tile = CONFIGS["thr0.5_tile16"]
    indices, counts = run_nms(mode, boxes, scores, valid, iou_threshold=thr,
                              max_output_size=max_out, score_threshold=score_thr, tile_size=tile)
    kept = {name: kdet_result(indices[i], counts[i]) for name, i in names.items()}
    np.testing.assert_array_equal(kept["exact_half"], [0, 1, 2, 3, 4])  # IoU 0.5 is not > 0.5
    np.testing.assert_array_equal(kept["float32_0.3"], [0, 1])
    np.testing.assert_array_equal(kept["chain"], np.arange(0, N, 2))
    np.testing.assert_array_equal(kept["all_padding"], [])
    np.testing.assert_array_equal(kept["identical"], [0])
    sevens = np.arange(0, N, 7)
    np.testing.assert_array_equal(kept["disjoint_ties"],
                                  np.concatenate([sevens, np.setdiff1d(np.arange(N), sevens)]))
    assert 7 not in kept["mask_and_nan"]  # NaN score
    assert np.all(valid[names["mask_and_nan"]][kept["mask_and_nan"]])

    thr, max_out, score_thr, tile = CONFIGS["thr0.3_top10_score0.05"]
    indices, counts = run_nms(mode, boxes, scores, valid, iou_threshold=thr,
                              max_output_size=max_out, score_threshold=score_thr, tile_size=tile)
    # float32 IoU 0.30000001 > 0.3 as torchvision compares it
    np.testing.assert_array_equal(kdet_result(indices[names["float32_0.3"]],
                                              counts[names["float32_0.3"]]), [0])
    assert np.all(np.asarray(counts) <= 10)


def test_threshold_given_as_float32_value():
    # threshold = float32(0.3) itself: IoU 0.30000001 is not > it, both kept
    boxes = np.array([[0, 0, 6.5, 1], [3.5, 0, 10, 1]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    idx, count = nms(boxes, scores, float(np.float32(0.3)), max_output_size=2)
    np.testing.assert_array_equal(kdet_result(idx, count), [0, 1])
    np.testing.assert_array_equal(kdet_result(idx, count),
                                  ref_nms(boxes, scores, float(np.float32(0.3))))


@functools.lru_cache(maxsize=None)
def _threshold_as_input():
    return _jit(lambda b, s, t: nms(b, s, t, max_output_size=16, score_threshold=0.1,
                                    tile_size=8))


@settings(max_examples=25, deadline=None)
@given(data=st.data(), thr=st.sampled_from([0.0, 0.25, 0.5, 0.75]))
def test_nms_property_against_reference(data, thr):
    """Integer boxes and coarse scores: exact ties and exact-threshold IoUs are common.

    The threshold goes in as a tensor (values exact in float32).
    """
    n = 24
    coords = data.draw(st.lists(st.integers(0, 12), min_size=4 * n, max_size=4 * n))
    boxes = np.array(coords, np.float32).reshape(1, n, 4)
    boxes[..., 2:] = boxes[..., :2] + boxes[..., 2:] / 2  # w, h in [0, 6], some zero
    score_ints = data.draw(st.lists(st.integers(-1, 5), min_size=n, max_size=n))
    scores = np.array(score_ints, np.float32).reshape(1, n) / 5
    scores[scores < 0] = -np.inf  # padding
    indices, counts = _threshold_as_input()(boxes, scores, np.float32(thr))
    check_batch(indices, counts, [ref_nms(boxes[0], scores[0], thr, 16, 0.1)])


@pytest.mark.parametrize("mode", MODES)
def test_ties_across_many_tiles_keep_lower_index_first(mode):
    # 600 disjoint boxes, two score values: kept in index order within each score
    n = 600
    boxes = row_boxes(np.arange(n) * 20)
    scores = np.full(n, 0.5, np.float32)
    scores[::7] = 0.75
    idx, count = run_nms(mode, boxes, scores, iou_threshold=0.5, max_output_size=n, tile_size=128)
    sevens = np.arange(0, n, 7)
    expected = np.concatenate([sevens, np.setdiff1d(np.arange(n), sevens)])
    np.testing.assert_array_equal(kdet_result(idx, count), expected)


def test_unbatched_shapes_and_zero_slots(rng):
    boxes = random_boxes(rng, 30)
    scores = rng.uniform(size=30).astype(np.float32)
    idx, count = nms(boxes, scores, 0.5, max_output_size=40)
    assert np.asarray(idx).shape == (40,) and np.asarray(count).shape == ()
    np.testing.assert_array_equal(kdet_result(idx, count), ref_nms(boxes, scores, 0.5))
    idx, count = nms(boxes, scores, 0.5, max_output_size=0)
    assert np.asarray(idx).shape == (0,) and int(count) == 0
    idx, count = nms(boxes[:0], scores[:0], 0.5, max_output_size=3)
    np.testing.assert_array_equal(np.asarray(idx), [-1, -1, -1])


@functools.lru_cache(maxsize=None)
def labelled_bank():
    rng = np.random.default_rng(1)
    names, boxes, scores, valid = scenario_bank()
    labels = rng.integers(0, 4, scores.shape).astype(np.int32)
    labels[names["identical"], :5] = [0, 1, 2, 0, 1]
    return names, boxes, scores, valid, labels


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["offset", "mask"])
def test_batched_nms_matches_references(mode, method):
    names, boxes, scores, valid, labels = labelled_bank()
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    static = dict(iou_threshold=0.5, max_output_size=48, score_threshold=0.05, tile_size=32)
    idx, count = run_batched(mode, boxes, scores, labels, method=method, **static)
    reference = ref_batched_offset if method == "offset" else ref_per_class
    expected = [reference(boxes[b], scores[b], labels[b], 0.5, 48, 0.05) for b in range(len(names))]
    check_batch(idx, count, expected, list(names))
    # identical boxes, labels 0 1 2 0 1: one per label survives
    np.testing.assert_array_equal(expected[names["identical"]], [0, 1, 2])
    # moderate, non-negative coordinates: the offset trick and per-class NMS agree
    for name in ("clustered", "integer_ties", "chain"):
        b = names[name]
        np.testing.assert_array_equal(
            ref_batched_offset(boxes[b], scores[b], labels[b], 0.5, 48, 0.05),
            ref_per_class(boxes[b], scores[b], labels[b], 0.5, 48, 0.05))
    b = names["negative_coords"]  # ... and differ where torchvision's trick breaks down
    assert not np.array_equal(
        ref_batched_offset(boxes[b], scores[b], labels[b], 0.5, 48, 0.05),
        ref_per_class(boxes[b], scores[b], labels[b], 0.5, 48, 0.05))


def test_offset_method_is_torchvision_trick_with_negative_coordinates():
    """Max coordinate 10: label 1 shifts by 11, B lands on (-1,-1,9,9), IoU 0.68 with A."""
    boxes = np.array([[0, 0, 10, 10], [-12, -12, -2, -2]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    labels = np.array([0, 1], np.int32)
    idx, count = batched_nms(boxes, scores, labels, 0.5, 2, method="offset")
    np.testing.assert_array_equal(kdet_result(idx, count), [0])  # shifted by 10 it would be kept
    np.testing.assert_array_equal(kdet_result(idx, count),
                                  ref_batched_offset(boxes, scores, labels, 0.5))
    idx, count = batched_nms(boxes, scores, labels, 0.5, 2, method="mask")
    np.testing.assert_array_equal(kdet_result(idx, count), [0, 1])
    if HAVE_TORCHVISION:
        import torch
        import torchvision
        tv = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                         torch.from_numpy(labels.astype(np.int64)), 0.5)
        np.testing.assert_array_equal(tv.numpy(), [0])


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


def test_select_detections():
    names, boxes, scores, valid, labels = labelled_bank()
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    idx, count = batched_nms(boxes, scores, labels, iou_threshold=0.5, max_output_size=48,
                             score_threshold=0.05, tile_size=32)
    out = select_detections(boxes, scores, labels, idx, count)
    for b in range(len(names)):
        kept = ref_batched_offset(boxes[b], scores[b], labels[b], 0.5, 48, 0.05)
        k = len(kept)
        assert int(np.asarray(out["num_detections"])[b]) == k
        np.testing.assert_array_equal(np.asarray(out["boxes"])[b, :k], boxes[b, kept])
        np.testing.assert_array_equal(np.asarray(out["scores"])[b, :k], scores[b, kept])
        np.testing.assert_array_equal(np.asarray(out["labels"])[b, :k], labels[b, kept])
        np.testing.assert_array_equal(np.asarray(out["boxes"])[b, k:], 0)
        np.testing.assert_array_equal(np.asarray(out["scores"])[b, k:], 0)
        np.testing.assert_array_equal(np.asarray(out["labels"])[b, k:], -1)
    b = names["clustered"]
    single = select_detections(boxes[b], scores[b], None, idx[b], count[b])
    assert np.asarray(single["boxes"]).shape == (48, 4)
    k = int(np.asarray(count)[b])
    np.testing.assert_array_equal(np.asarray(single["labels"])[:k], 0)
    np.testing.assert_array_equal(np.asarray(single["labels"])[k:], -1)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="boxes must be"):
        nms(np.zeros((3, 5), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="disagree on N"):
        nms(np.zeros((3, 4), np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="method"):
        batched_nms(np.zeros((3, 4), np.float32), np.zeros(3, np.float32),
                    np.zeros(3, np.int32), method="nope")
    with pytest.raises(ValueError, match="tile_size"):
        nms(np.zeros((3, 4), np.float32), np.zeros(3, np.float32), tile_size=0)


# ---------------------------------------------------------------- torchvision

@needs_torchvision
@pytest.mark.parametrize("config", list(CONFIGS))
def test_reference_and_kdet_match_torchvision_on_scenarios(config):
    import torch
    import torchvision
    thr, max_out, score_thr, tile = CONFIGS[config]
    names, boxes, scores, valid = scenario_bank()
    indices, counts = run_nms("jit", boxes, scores, valid, iou_threshold=thr,
                              max_output_size=max_out, score_threshold=score_thr, tile_size=tile)
    for name, b in names.items():
        keep = np.flatnonzero((scores[b] > np.float32(score_thr)) & valid[b])
        tv = keep[torchvision.ops.nms(torch.from_numpy(boxes[b, keep]),
                                      torch.from_numpy(scores[b, keep]), thr).numpy()][:max_out]
        kept = kdet_result(indices[b], counts[b])
        if len(np.unique(scores[b, keep])) == len(keep):
            np.testing.assert_array_equal(kept, tv, err_msg=name)
        else:  # torchvision's sort is not stable: same scores in order, same set
            np.testing.assert_array_equal(scores[b, kept], scores[b, tv], err_msg=name)
            if len(tv) < max_out:
                np.testing.assert_array_equal(np.sort(kept), np.sort(tv), err_msg=name)
        np.testing.assert_array_equal(
            ref_nms(boxes[b], scores[b], thr, max_out, score_thr, valid[b]), kept, err_msg=name)


@needs_torchvision
def test_nms_matches_torchvision_large(rng):
    import torch
    import torchvision
    n = 1000
    boxes = random_boxes(rng, n, clusters=6, spread=10)
    scores = rng.uniform(size=n).astype(np.float32)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5)
    idx, count = run_nms("jit", boxes, scores, iou_threshold=0.5, max_output_size=n)
    np.testing.assert_array_equal(kdet_result(idx, count), expected.numpy())


@needs_torchvision
def test_batched_nms_matches_torchvision():
    import torch
    import torchvision
    names, boxes, scores, valid, labels = labelled_bank()
    idx, count = run_batched("jit", boxes, np.where(valid, scores, -np.inf).astype(np.float32),
                             labels, method="offset", iou_threshold=0.5, max_output_size=48,
                             score_threshold=0.05, tile_size=32)
    for name in ("clustered", "degenerate", "chain", "identical", "negative_coords"):
        b = names[name]
        keep = np.flatnonzero((scores[b] > np.float32(0.05)) & valid[b])
        # few boxes: torchvision takes its coordinate-trick path
        tv = torchvision.ops.batched_nms(torch.from_numpy(boxes[b, keep]),
                                         torch.from_numpy(scores[b, keep]),
                                         torch.from_numpy(labels[b, keep].astype(np.int64)), 0.5)
        np.testing.assert_array_equal(kdet_result(idx[b], count[b]), keep[tv.numpy()][:48],
                                      err_msg=name)


@needs_torchvision
def test_batched_nms_mask_matches_torchvision_per_class_path():
    import torch
    import torchvision
    rng = np.random.default_rng(2)
    n = 1200  # n * 4 > 4000: torchvision runs NMS class by class
    boxes = random_boxes(rng, n, clusters=8, spread=12)
    scores = rng.uniform(size=n).astype(np.float32)
    labels = rng.integers(0, 5, n).astype(np.int32)
    expected = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                           torch.from_numpy(labels.astype(np.int64)), 0.5)
    idx, count = run_batched("jit", boxes, scores, labels, method="mask", iou_threshold=0.5,
                             max_output_size=n, tile_size=256)
    np.testing.assert_array_equal(kdet_result(idx, count), expected.numpy())
