"""COCOEvaluator against pycocotools' COCOeval (the reference), bbox / segm / keypoints.

Detections are built deterministically from the ground truth (jittered boxes,
missed objects, duplicates, false positives, detections on crowd regions, images
with no detections, an (image, category) with > 100 detections, categories with
no ground truth, tied scores) and every summary stat, the per-class AP and the
full precision/recall arrays are compared with pycocotools'.
"""
import contextlib
import copy
import functools
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools is the reference")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from kdet.metrics import COCOEvaluator, native  # noqa: E402
from kdet.metrics.coco import COCO_KEYPOINT_SIGMAS, _pair_box_iou  # noqa: E402

# Every test runs twice: on the C kernels and on the numpy fallback (conftest.py).
pytestmark = pytest.mark.usefixtures("evaluator_path")

ATOL = 1e-12
COCO128 = "coco128/annotations/instances_train2017.json"
KEYPOINT_FILES = ("keypoints/coco_mini_val2017/annotations/person_keypoints_val2017.json",
                  "keypoints/mmpose_coco/test_coco.json")


# --------------------------------------------------------------------------- reference
def reference_eval(gt, dets, iou_type, sigmas=None):
    """pycocotools: loadRes + evaluate + accumulate + summarize, prints silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        else:  # loadRes([]) fails on anns[0]: an empty result set is an empty COCO
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"],
                               "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def reference_per_class_ap(ev):
    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, -1]
        out[cat_id] = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
    return out


def assert_same_as_reference(evaluator, result, ref):
    np.testing.assert_allclose(evaluator.stats, ref.stats, rtol=0, atol=ATOL)
    names = list(result)[:-1]
    np.testing.assert_allclose([result[n] for n in names], ref.stats, rtol=0, atol=ATOL)
    expected = reference_per_class_ap(ref)
    assert result["per_class_AP"].keys() == expected.keys()
    np.testing.assert_array_equal(list(result["per_class_AP"].values()),  # bit for bit
                                  list(expected.values()))
    np.testing.assert_allclose(evaluator.precision, ref.eval["precision"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(evaluator.recall, ref.eval["recall"], rtol=0, atol=ATOL)


@functools.lru_cache(maxsize=None)
def _load(path):
    with open(path) as f:
        return json.load(f)


def load_json(path):
    return copy.deepcopy(_load(str(path)))


# --------------------------------------------------------------------------- detections
def box_detections(gt, seed):
    """Seeded detections exercising every rule of COCOeval's matching."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    unused = sorted(set(cat_ids) - {a["category_id"] for a in gt["annotations"]})
    images = {im["id"]: im for im in gt["images"]}
    no_dets = set(sorted(images)[::9])  # images left without any detection
    dets = []

    def add(image_id, cat, box, score):
        dets.append({"image_id": image_id, "category_id": int(cat),
                     "bbox": [float(v) for v in box], "score": float(score)})

    for ann in gt["annotations"]:
        if ann["image_id"] in no_dets:
            continue
        x, y, w, h = ann["bbox"]
        if ann["iscrowd"]:  # several detections inside a crowd region
            for _ in range(4):
                bw, bh = w * rng.uniform(0.1, 0.5), h * rng.uniform(0.1, 0.5)
                add(ann["image_id"], ann["category_id"],
                    [x + rng.uniform(0, w - bw), y + rng.uniform(0, h - bh), bw, bh],
                    round(rng.random(), 2))
            continue
        if rng.random() < 0.15:  # missed
            continue
        for _ in range(int(rng.integers(1, 4))):  # duplicates
            jit = rng.normal(0, 0.12, 4) * [w, h, w, h]
            cat = ann["category_id"] if rng.random() < 0.9 else rng.choice(cat_ids)
            add(ann["image_id"], cat, [x + jit[0], y + jit[1], max(w + jit[2], 0.0),
                                       max(h + jit[3], 0.0)],
                round(rng.random(), 2))  # 2 decimals: many tied scores
    for image_id in sorted(images):  # false positives, also on categories without GT
        if image_id in no_dets:
            continue
        for _ in range(int(rng.integers(0, 4))):
            im = images[image_id]
            bw, bh = rng.uniform(2, im["width"] / 2), rng.uniform(2, im["height"] / 2)
            cat = rng.choice(unused) if unused and rng.random() < 0.3 else rng.choice(cat_ids)
            add(image_id, cat, [rng.uniform(0, im["width"] - bw),
                                rng.uniform(0, im["height"] - bh), bw, bh],
                round(rng.random(), 2))
    # One (image, category) with 150 detections (> maxDets 100), another image with 120
    # detections over several categories.
    crowded = [a for a in gt["annotations"] if a["image_id"] not in no_dets and not a["iscrowd"]]
    ann = crowded[0]
    x, y, w, h = ann["bbox"]
    for _ in range(150):
        jit = rng.normal(0, 0.25, 4) * [w, h, w, h]
        add(ann["image_id"], ann["category_id"],
            [x + jit[0], y + jit[1], abs(w + jit[2]), abs(h + jit[3])], round(rng.random(), 1))
    other = crowded[-1]["image_id"]
    for _ in range(120):
        add(other, rng.choice(cat_ids[:5]), rng.uniform(1, 200, 4), round(rng.random(), 1))
    order = rng.permutation(len(dets))  # arrival order must not matter beyond ties
    return [dets[i] for i in order]


def erode(mask):
    inner = mask.copy()
    for axis in (0, 1):
        for shift in (1, -1):
            inner &= np.roll(mask, shift, axis)
    return inner


def mask_detections(gt, seed, with_bbox):
    rng = np.random.default_rng(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    cat_ids = [c["id"] for c in gt["categories"]]
    dets = []

    def add(image_id, cat, mask, score):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        if rng.random() < 0.5:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-style str counts
        det = {"image_id": image_id, "category_id": int(cat), "segmentation": rle,
               "score": float(score)}
        if with_bbox:
            det["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
        dets.append(det)

    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        mask = coco.annToMask(ann).astype(bool)
        if ann["iscrowd"]:  # detections on crowd regions: pieces of the crowd mask
            for _ in range(3):
                piece = mask & (rng.random(mask.shape) < 0.3)
                add(ann["image_id"], ann["category_id"], piece, round(rng.random(), 2))
            continue
        for _ in range(int(rng.integers(1, 3))):
            m = np.roll(mask, tuple(rng.integers(-4, 5, 2)), (0, 1))
            if rng.random() < 0.5:
                m = erode(m)
            cat = ann["category_id"] if rng.random() < 0.9 else rng.choice(cat_ids)
            add(ann["image_id"], cat, m, round(rng.random(), 2))
    for im in gt["images"][::3]:  # random masks: rectangles and blobs
        h, w = im["height"], im["width"]
        m = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        m[y0:y0 + rng.integers(2, 150), x0:x0 + rng.integers(2, 150)] = True
        add(im["id"], rng.choice(cat_ids), m, round(rng.random(), 2))
        add(im["id"], rng.choice(cat_ids), rng.random((h, w)) < 0.01, round(rng.random(), 2))
    return dets


def keypoint_ground_truth(seed, num_images=30):
    """A generated COCO person-keypoints set: small to large people, crowd, no keypoints."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480})
        for _ in range(int(rng.integers(0, 5))):
            w, h = np.exp(rng.uniform(np.log(15), np.log(300), 2))
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            kp = np.c_[rng.uniform(x, x + w, 17), rng.uniform(y, y + h, 17),
                       rng.choice([0, 1, 2], 17, p=[0.3, 0.2, 0.5])]
            kp[kp[:, 2] == 0, :2] = 0
            crowd = rng.random() < 0.05
            if crowd or rng.random() < 0.1:
                kp[:] = 0
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1,
                         "bbox": [x, y, w, h], "area": w * h * rng.uniform(0.5, 0.9),
                         "iscrowd": int(crowd), "keypoints": kp.ravel().tolist(),
                         "num_keypoints": int((kp[:, 2] > 0).sum())})
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}


def keypoint_detections(gt, seed, with_bbox=False):
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        if rng.random() < 0.1:
            continue
        x, y, w, h = ann["bbox"]
        kp = np.array(ann["keypoints"], float).reshape(-1, 3)
        if ann["num_keypoints"] == 0:
            kp[:, 0], kp[:, 1] = rng.uniform(x, x + w, 17), rng.uniform(y, y + h, 17)
        for _ in range(int(rng.integers(1, 3))):
            noisy = kp.copy()
            noisy[:, :2] += rng.normal(0, max(2.0, np.sqrt(max(ann["area"], 1)) * 0.06), (17, 2))
            noisy[:, 2] = rng.random(17)
            dets.append({"image_id": ann["image_id"], "category_id": 1,
                         "keypoints": noisy.ravel().tolist(), "score": round(rng.random(), 2)})
    for im in gt["images"][::2]:
        kp = np.c_[rng.uniform(0, im["width"], 17), rng.uniform(0, im["height"], 17),
                   np.ones(17)]
        dets.append({"image_id": im["id"], "category_id": 1, "keypoints": kp.ravel().tolist(),
                     "score": round(rng.random(), 2)})
    if with_bbox:  # COCO.loadRes then takes the area from the box
        for d in dets:
            kp = np.array(d["keypoints"]).reshape(-1, 3)
            d["bbox"] = [kp[:, 0].min(), kp[:, 1].min(), np.ptp(kp[:, 0]) * 1.2,
                         np.ptp(kp[:, 1]) * 1.2]
    return dets


def run_kdet(gt, dets, iou_type, **kwargs):
    ev = COCOEvaluator(gt, iou_type=iou_type, **kwargs)
    ev.add_detections(copy.deepcopy(dets))
    return ev, ev.evaluate()


# --------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("seed", [0, 1])
def test_bbox_matches_pycocotools_on_coco128(shared_data, seed):
    gt = load_json(shared_data / COCO128)
    dets = box_detections(gt, seed)
    ev, result = run_kdet(gt, dets, "bbox")
    ref = reference_eval(gt, dets, "bbox")
    assert 0.05 < ref.stats[0] < 0.95  # a meaningful, non-degenerate score
    assert_same_as_reference(ev, result, ref)


def test_bbox_from_json_path_and_in_chunks(shared_data):
    gt = load_json(shared_data / COCO128)
    dets = box_detections(gt, 2)
    ev = COCOEvaluator(str(shared_data / COCO128))
    for i in range(0, len(dets), 333):  # several add_detections calls = one result list
        ev.add_detections(dets[i:i + 333])
    assert_same_as_reference(ev, ev.evaluate(), reference_eval(gt, dets, "bbox"))


@pytest.mark.parametrize("with_bbox", [False, True], ids=["mask-area", "box-area"])
def test_segm_matches_pycocotools_on_coco128(shared_data, with_bbox):
    gt = load_json(shared_data / COCO128)
    dets = mask_detections(gt, 3, with_bbox)
    ev, result = run_kdet(gt, dets, "segm")
    ref = reference_eval(gt, dets, "segm")
    assert 0.05 < ref.stats[0] < 0.95
    assert_same_as_reference(ev, result, ref)


def _check_keypoints_against_pycocotools(gt, with_bbox):
    dets = keypoint_detections(gt, 5, with_bbox)
    ev, result = run_kdet(gt, dets, "keypoints")
    ref = reference_eval(gt, dets, "keypoints")
    assert len(ev.stats) == 10 and list(result)[:10] == [
        "AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]
    assert 0.05 < ref.stats[0] < 0.95
    assert_same_as_reference(ev, result, ref)


@pytest.mark.parametrize("with_bbox", [False, True], ids=["kpt-area", "box-area"])
def test_keypoints_match_pycocotools_on_generated_data(with_bbox):
    """Needs no files: runs (never skips) on a fresh clone."""
    _check_keypoints_against_pycocotools(keypoint_ground_truth(4), with_bbox)


@pytest.mark.parametrize("source", KEYPOINT_FILES)
@pytest.mark.parametrize("with_bbox", [False, True], ids=["kpt-area", "box-area"])
def test_keypoints_match_pycocotools_on_real_files(shared_data, source, with_bbox):
    _check_keypoints_against_pycocotools(load_json(shared_data / source), with_bbox)


def test_keypoints_custom_sigmas():
    gt = keypoint_ground_truth(6)
    dets = keypoint_detections(gt, 7)
    sigmas = np.linspace(0.02, 0.12, 17)
    ev, result = run_kdet(gt, dets, "keypoints", kpt_oks_sigmas=sigmas)
    assert_same_as_reference(ev, result, reference_eval(gt, dets, "keypoints", sigmas))
    ev_dict, result_dict = run_kdet(gt, dets, "keypoints", kpt_oks_sigmas={1: sigmas})
    np.testing.assert_array_equal(ev_dict.stats, ev.stats)


def _scene(draw):
    """A tiny random COCO scene: boxes on a coarse grid so IoU ties happen."""
    num_images = draw(st.integers(1, 3))
    images = [{"id": i + 1, "width": 64, "height": 64} for i in range(num_images)]
    box = st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 10),
                    st.integers(0, 10)).map(lambda b: [4.0 * b[0], 4.0 * b[1], 4.0 * b[2],
                                                       4.0 * b[3]])
    anns = []
    for i in range(draw(st.integers(0, 8))):
        b = draw(box)
        anns.append({"id": i + 1, "image_id": draw(st.integers(1, num_images)),
                     "category_id": draw(st.integers(1, 2)), "bbox": b,
                     "area": draw(st.sampled_from([b[2] * b[3], 500.0, 1500.0, 10000.0])),
                     "iscrowd": int(draw(st.integers(0, 5)) == 0)})
    dets = [{"image_id": draw(st.integers(1, num_images)), "category_id": draw(st.integers(1, 3)),
             "bbox": draw(box), "score": draw(st.sampled_from([0.1, 0.5, 0.5, 0.9, 1.0]))}
            for _ in range(draw(st.integers(1, 12)))]
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    return gt, dets


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_bbox_random_scenes_match_pycocotools(data):
    gt, dets = _scene(data.draw)
    ev, result = run_kdet(gt, dets, "bbox", max_dets=(1, 2, 100))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ref = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ref.params.maxDets = [1, 2, 100]  # small maxDets: truncation is exercised
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    assert_same_as_reference(ev, result, ref)


def test_box_iou_is_bit_identical_to_mask_utils(rng):
    dets = np.round(rng.uniform(0, 50, (40, 4)), 1)
    gts = np.round(rng.uniform(0, 50, (30, 4)), 1)
    gts[:5, 2:] = 0  # degenerate
    dets[:3] = gts[5:8]  # identical boxes
    dets[3] = [gts[9, 0] + gts[9, 2], gts[9, 1], 5, 5]  # touching edge
    dets[4], gts[10] = [1e200, 1e200, 1e200, 1e200], [1e200, 1e200, 2e200, 1e200]  # overflow
    dets[5] = [-1e300, -1e300, 1e300, 1e300]
    crowd = rng.random(30) < 0.3
    with np.errstate(over="ignore", invalid="ignore"):
        expected = mask_utils.iou(dets.tolist(), gts.tolist(), crowd.astype(int).tolist())
    d, g = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")
    got = _pair_box_iou(dets[d.ravel()], gts[g.ravel()], crowd[g.ravel()]).reshape(40, 30)
    np.testing.assert_array_equal(got, expected)
    if native.library() is not None:  # the C kernel (the "native" run), boxes indexed in place
        in_c = native.pair_box_iou(dets, d.ravel(), gts, g.ravel(), crowd).reshape(40, 30)
        np.testing.assert_array_equal(in_c, expected)


def test_one_combined_sort_orders_as_lexsort(rng):
    """The evaluator's sorts: one sort of a combined key equals ``np.lexsort`` of
    (image, category, score desc) and (category, score desc), ties in arrival order;
    scores tied, at -0.0 / 0.0; keys with the positions packed in (values sorted), keys
    too large for the positions (a stable argsort) and too large to combine (lexsort)."""
    from kdet.metrics.coco import _score_rank, _stable_order
    score = np.round(rng.random(3000), 2)
    score[:50], score[50:60], score[60:70] = 0.5, 0.0, -0.0
    group = rng.integers(0, 40, 3000)
    rank = _score_rank(score)
    np.testing.assert_array_equal(_stable_order(group, rank), np.lexsort((-score, group)))
    for shift in (45, 55):  # no room for the positions; major * span overflows int64
        big = group.astype(np.int64) << shift
        np.testing.assert_array_equal(_stable_order(big, rank), np.lexsort((-score, big)))
    assert len(set(rank[:50].tolist())) == 1 and rank[50:60].tolist() == rank[60:70].tolist() == \
        [rank.max()] * 10
    assert len(_stable_order(np.zeros(0, np.int64), _score_rank(np.zeros(0)))) == 0


def test_annotation_id_zero_quirk_is_reproduced():
    # pycocotools stores the matched ground truth's id and tests it for truth, so a
    # detection matched to an annotation with id 0 counts as a false positive.
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": i, "image_id": 1, "category_id": 1, "iscrowd": 0,
                           "bbox": [10.0 * i, 10.0 * i, 20.0, 20.0], "area": 400.0}
                          for i in range(3)]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [10.0 * i, 10.0 * i, 20.0, 20.0],
             "score": 0.5 + 0.1 * i} for i in range(3)]
    ev, result = run_kdet(gt, dets, "bbox")
    ref = reference_eval(gt, dets, "bbox")
    assert ref.stats[0] < 1.0
    assert_same_as_reference(ev, result, ref)


# --------------------------------------------------------------------------- padded inputs
def test_add_predictions_equals_result_list(shared_data):
    gt = load_json(shared_data / COCO128)
    rng = np.random.default_rng(8)
    cat_ids = sorted(c["id"] for c in gt["categories"])
    image_ids = [im["id"] for im in gt["images"]][:40]
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    batch, max_det = len(image_ids), 30
    boxes = np.zeros((batch, max_det, 4), np.float32)
    scores = np.zeros((batch, max_det), np.float32)
    labels = -np.ones((batch, max_det), np.int64)
    counts = np.zeros(batch, np.int64)
    scale = rng.uniform(0.5, 2.0, batch)
    for b, image_id in enumerate(image_ids):
        anns = by_image.get(image_id, [])
        n = min(max_det, len(anns) + int(rng.integers(0, 5)))
        counts[b] = n
        for d in range(max_det):
            if d < len(anns):
                x, y, w, h = np.array(anns[d]["bbox"]) * (1 + rng.normal(0, 0.05, 4))
                label = cat_ids.index(anns[d]["category_id"])
            else:
                x, y, w, h = rng.uniform(0, 200, 4)
                label = int(rng.integers(len(cat_ids)))
            boxes[b, d] = np.array([x, y, x + w, y + h]) / scale[b]  # model-space xyxy
            scores[b, d] = rng.random()
            labels[b, d] = label if rng.random() > 0.1 else -1  # some padded rows
    predictions = {"boxes": boxes, "scores": scores, "labels": labels, "num_detections": counts}

    # The equivalent COCO result list, built independently.
    dets = []
    for b, image_id in enumerate(image_ids):
        for d in range(counts[b]):
            if labels[b, d] < 0:
                continue
            x1, y1, x2, y2 = boxes[b, d].astype(np.float64)
            dets.append({"image_id": image_id, "category_id": cat_ids[labels[b, d]],
                         "bbox": [x1 * scale[b], y1 * scale[b], (x2 - x1) * scale[b],
                                  (y2 - y1) * scale[b]],
                         "score": float(scores[b, d])})
    ev = COCOEvaluator(gt)
    ev.add_predictions(image_ids[:20], {k: v[:20] for k, v in predictions.items()},
                       scale=scale[:20])
    ev.add_predictions(np.array(image_ids[20:]), {k: v[20:] for k, v in predictions.items()},
                       category_ids=cat_ids, scale=scale[20:])
    assert_same_as_reference(ev, ev.evaluate(), reference_eval(gt, dets, "bbox"))


@pytest.mark.parametrize("fmt", ["xyxy", "yxyx", "xywh", "center_xywh", "center_yxhw",
                                 "rel_xyxy", "rel_center_xywh"])
def test_add_predictions_box_formats_and_backend_tensors(fmt):
    import keras
    gt = keypoint_ground_truth(9)  # any ground truth with boxes will do
    for a in gt["annotations"]:
        a["bbox"] = [float(np.round(v)) for v in a["bbox"]]
    rng = np.random.default_rng(10)
    image_ids = [im["id"] for im in gt["images"]]
    # Boxes on a 1/4-pixel grid and image sizes of 640 x 480 keep every conversion exact.
    xywh = np.round(rng.uniform(0, 200, (len(image_ids), 6, 4)) * 4) / 4
    x, y, w, h = np.moveaxis(xywh, -1, 0)
    encoded = {"xyxy": (x, y, x + w, y + h), "yxyx": (y, x, y + h, x + w), "xywh": (x, y, w, h),
               "center_xywh": (x + w / 2, y + h / 2, w, h),
               "center_yxhw": (y + h / 2, x + w / 2, h, w),
               "rel_xyxy": (x / 640, y / 480, (x + w) / 640, (y + h) / 480),
               "rel_center_xywh": ((x + w / 2) / 640, (y + h / 2) / 480, w / 640, h / 480)}[fmt]
    boxes = np.stack(encoded, axis=-1)
    scores = np.round(rng.random(x.shape), 3)
    labels = np.zeros(x.shape, np.int32)
    dets = [{"image_id": image_ids[b], "category_id": 1, "bbox": xywh[b, d].tolist(),
             "score": float(scores[b, d])} for b in range(len(image_ids)) for d in range(6)]
    ev = COCOEvaluator(gt)
    ev.add_predictions(image_ids, {"boxes": keras.ops.convert_to_tensor(boxes),
                                   "scores": keras.ops.convert_to_tensor(scores),
                                   "labels": keras.ops.convert_to_tensor(labels)},
                       bounding_box_format=fmt)
    assert_same_as_reference(ev, ev.evaluate(), reference_eval(gt, dets, "bbox"))


def test_add_predictions_masks_and_keypoints():
    gt = keypoint_ground_truth(11, num_images=8)
    rng = np.random.default_rng(12)
    image_ids = [im["id"] for im in gt["images"]]
    # Masks: padded to a larger canvas, cut back to 480 x 640 inside.
    masks = np.zeros((len(image_ids), 3, 500, 660), np.float32)
    for b in range(len(image_ids)):
        for d in range(3):
            y0, x0 = rng.integers(0, 400), rng.integers(0, 560)
            masks[b, d, y0:y0 + rng.integers(5, 80), x0:x0 + rng.integers(5, 80)] = 0.9
    scores = np.round(rng.random((len(image_ids), 3)), 2)
    labels = np.zeros((len(image_ids), 3), np.int64)
    for a in gt["annotations"]:  # segm ground truth: the person boxes as polygons
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    mask_dets = [{"image_id": image_ids[b], "category_id": 1, "score": float(scores[b, d]),
                  "segmentation": mask_utils.encode(np.asfortranarray(
                      (masks[b, d, :480, :640] > 0.5).astype(np.uint8)))}
                 for b in range(len(image_ids)) for d in range(3)]
    ev = COCOEvaluator(gt, iou_type="segm")
    ev.add_predictions(image_ids, {"masks": masks, "scores": scores, "labels": labels})
    assert_same_as_reference(ev, ev.evaluate(), reference_eval(gt, mask_dets, "segm"))
    # results(): the same detections as a loadRes list (JSON-serialisable) score the same.
    saved = json.loads(json.dumps(ev.results()))
    assert len(saved) == len(mask_dets)
    assert_same_as_reference(ev, ev.evaluate(),
                             reference_eval(gt, saved, "segm"))

    kpts = np.concatenate([rng.uniform(0, 320, (len(image_ids), 3, 17, 2)),
                           rng.random((len(image_ids), 3, 17, 1))], axis=-1)
    kp_dets = [{"image_id": image_ids[b], "category_id": 1, "score": float(scores[b, d]),
                "keypoints": (kpts[b, d] * [2.0, 1.5, 1.0]).ravel().tolist()}
               for b in range(len(image_ids)) for d in range(3)]
    ev = COCOEvaluator(gt, iou_type="keypoints")
    ev.add_predictions(image_ids, {"keypoints": kpts, "scores": scores, "labels": labels},
                       scale=np.tile([2.0, 1.5], (len(image_ids), 1)))
    assert_same_as_reference(ev, ev.evaluate(), reference_eval(gt, kp_dets, "keypoints"))
    saved = json.loads(json.dumps(ev.results()))
    np.testing.assert_allclose([d["keypoints"] for d in saved],
                               [d["keypoints"] for d in kp_dets], rtol=1e-12)
    assert_same_as_reference(ev, ev.evaluate(), reference_eval(gt, saved, "keypoints"))


def test_results_round_trip_through_pycocotools():
    """results() of padded box predictions (xyxy, scaled) is what loadRes scores the same."""
    gt = keypoint_ground_truth(13, num_images=10)
    rng = np.random.default_rng(14)
    image_ids = [im["id"] for im in gt["images"]]
    xy = rng.uniform(0, 300, (len(image_ids), 5, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 150, (len(image_ids), 5, 2))], -1)
    for a in gt["annotations"]:  # first rows: jittered GT (in the half-size input frame)
        b, (x, y, w, h) = image_ids.index(a["image_id"]), a["bbox"]
        row = sum(1 for o in gt["annotations"][:gt["annotations"].index(a)]
                  if o["image_id"] == a["image_id"])
        if row < 4:
            boxes[b, row] = (np.array([x, y, x + w, y + h]) + rng.normal(0, 0.05 * w, 4)) / 2
    scores = np.round(rng.random((len(image_ids), 5)), 2)
    labels = np.zeros((len(image_ids), 5), np.int64)
    labels[:, -1] = -1  # padding rows are not results
    ev = COCOEvaluator(gt)
    ev.add_predictions(image_ids, {"boxes": boxes, "scores": scores, "labels": labels},
                       scale=2.0)
    saved = json.loads(json.dumps(ev.results()))
    assert len(saved) == len(image_ids) * 4
    first = saved[0]
    x1, y1, x2, y2 = boxes[0, 0] * 2.0
    np.testing.assert_allclose(first["bbox"], [x1, y1, x2 - x1, y2 - y1], rtol=1e-12)
    assert first["image_id"] == image_ids[0] and first["category_id"] == 1
    ref = reference_eval(gt, saved, "bbox")
    assert ref.stats[1] > 0.0  # some boxes land on people: a non-trivial check
    assert_same_as_reference(ev, ev.evaluate(), ref)


# --------------------------------------------------------------------------- edge cases
def test_empty_detections_and_reset(shared_data):
    gt = load_json(shared_data / COCO128)
    ev = COCOEvaluator(gt)
    ref_empty = reference_eval(gt, [], "bbox")
    assert_same_as_reference(ev, ev.evaluate(), ref_empty)
    dets = box_detections(gt, 0)
    ev.add_detections(dets)
    assert ev.evaluate()["AP"] > 0
    ev.reset_detections()
    ev.add_detections([])
    assert_same_as_reference(ev, ev.evaluate(), ref_empty)


def test_summary_lists_stats_and_category_names(shared_data):
    gt = load_json(shared_data / COCO128)
    ev = COCOEvaluator(gt)
    with pytest.raises(RuntimeError):
        ev.stats
    ev.add_detections(box_detections(gt, 0))
    ev.evaluate()
    text = ev.summary()
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = " \
           f"{ev.stats[0]:0.3f}" in text
    assert "toothbrush" in text and "traffic light" in text
    person = ev.evaluate()["per_class_AP"][1]
    assert any(line.split()[0] == "person" and line.endswith(f"{person:6.3f}")
               for line in text.splitlines() if line.strip())


GOOD_GT = {"images": [{"id": 1, "width": 50, "height": 50}],
           "categories": [{"id": 7, "name": "x"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10],
                            "area": 100, "iscrowd": 0}]}
GOOD_DET = {"image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10], "score": 0.5}


@pytest.mark.parametrize("change, message", [
    ({"image_id": 99}, "image_id 99"),
    ({"category_id": 3}, "category_id 3"),
    ({"bbox": [1, float("nan"), 2, 2]}, "not finite"),
    ({"bbox": [1, 1, float("inf"), 2]}, "not finite"),
    ({"bbox": [1, 1, -2, 2]}, "negative size"),
    ({"bbox": [1, 1, 2]}, "4 numbers"),
    ({"score": float("nan")}, "not finite"),
    ({"score": None}, "'score' must be a number, got None"),
    ({"score": "high"}, "'score' must be a number"),
    ({"score": "drop"}, "missing key 'score'"),
    ({"bbox": "drop"}, "missing key 'bbox'"),
])
def test_bad_detections_raise_naming_the_record(change, message):
    ev = COCOEvaluator(GOOD_GT)
    bad = dict(GOOD_DET)
    for key, value in change.items():
        if value == "drop":
            del bad[key]
        else:
            bad[key] = value
    with pytest.raises(ValueError, match="detection #1") as info:
        ev.add_detections([GOOD_DET, bad])
    assert message in str(info.value)


def test_bad_ground_truth_and_predictions_raise(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [}')
    with pytest.raises(ValueError, match="broken.json: malformed JSON"):
        COCOEvaluator(broken)
    for key in ("images", "annotations", "categories"):
        gt = copy.deepcopy(GOOD_GT)
        del gt[key]
        with pytest.raises(ValueError, match=f"missing '{key}'"):
            COCOEvaluator(gt)
    gt = copy.deepcopy(GOOD_GT)
    del gt["annotations"][0]["area"]
    with pytest.raises(ValueError, match=r"annotations\[0\].*missing key 'area'"):
        COCOEvaluator(gt)
    gt = copy.deepcopy(GOOD_GT)
    gt["annotations"][0]["image_id"] = 5
    with pytest.raises(ValueError, match="image_id 5 is not in 'images'"):
        COCOEvaluator(gt)
    with pytest.raises(ValueError, match="iou_type"):
        COCOEvaluator(GOOD_GT, iou_type="mask")
    with pytest.raises(ValueError, match="missing key 'keypoints'"):
        COCOEvaluator(GOOD_GT, iou_type="keypoints")

    ev = COCOEvaluator(GOOD_GT)
    preds = {"boxes": np.zeros((1, 2, 4)), "scores": np.ones((1, 2)),
             "labels": np.array([[0, 1]])}
    with pytest.raises(ValueError, match="label 1 >= 1 category ids"):
        ev.add_predictions([1], preds)
    with pytest.raises(ValueError, match="image_id 2 is not in"):
        ev.add_predictions([2], {**preds, "labels": np.zeros((1, 2))})
    with pytest.raises(ValueError, match="missing key 'boxes'"):
        ev.add_predictions([1], {"scores": preds["scores"], "labels": preds["labels"]})
    bad_boxes = np.array([[[1, 1, 11, 11], [5, 5, 0, 0]]], np.float32)  # 2nd: x2 < x1
    with pytest.raises(ValueError, match="detection 1.*negative size"):
        ev.add_predictions([1], {**preds, "boxes": bad_boxes, "labels": np.zeros((1, 2))})
    # Rows past num_detections are never read, whatever they hold.
    ev.add_predictions([1], {**preds, "boxes": bad_boxes, "labels": np.zeros((1, 2)),
                             "num_detections": np.array([1])})
    assert ev.evaluate()["AP"] == pytest.approx(1.0)


# ------------------------------------------------------------- batched paths, awkward input
def _runs(mask):
    """Uncompressed COCO RLE counts of a binary mask (column-major, background first)."""
    flat = np.asarray(mask, np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]])) if len(flat) else []
    return np.diff(np.r_[0, change]).tolist()[:len(change)] if len(flat) else []


def _string_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _box_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    return m


def awkward_mask_scene(seed):
    """Three image sizes; an image without ground truth and one without detections;
    multi-part polygons, a triangle, a zero-area line;
    crowd RLEs compressed and uncompressed; zero-area and full-image detections; tied
    scores; 130 detections of one class in one image (past maxDets 100)."""
    rng = np.random.default_rng(seed)
    sizes = {1: (40, 50), 2: (40, 60), 3: (33, 50), 4: (40, 50), 5: (33, 50)}
    images = [{"id": i, "height": h, "width": w} for i, (h, w) in sizes.items()]
    anns, dets = [], []

    def gt(image_id, cat, segmentation, mask, crowd=0):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                     "segmentation": segmentation, "area": float(mask.sum()),
                     "bbox": [0, 0, 1, 1], "iscrowd": crowd})

    for image_id in (1, 2, 3, 5):
        h, w = sizes[image_id]
        for _ in range(4):
            x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
            x1, y1 = x0 + rng.integers(3, w - x0), y0 + rng.integers(3, h - y0)
            poly = [x0, y0, x1, y0, x1, y1, x0, y1]
            cat = int(rng.integers(1, 3))
            gt(image_id, cat, [[float(v) for v in poly]], _box_mask(h, w, x0, y0, x1, y1))
            for _ in range(int(rng.integers(1, 4))):  # jittered detections
                j = rng.integers(-3, 4, 4)
                m = _box_mask(h, w, x0 + j[0], y0 + j[1], x1 + j[2], y1 + j[3])
                dets.append({"image_id": image_id, "category_id": cat if rng.random() < 0.9
                             else 3 - cat, "segmentation": _string_rle(m),
                             "score": round(float(rng.random()), 1)})  # ties
        two_parts = _box_mask(h, w, 2, 2, 8, 8) | _box_mask(h, w, 20, 10, 30, 20)
        gt(image_id, 1, [[2, 2, 8, 2, 8, 8, 2, 8], [20, 10, 30, 10, 30, 20, 20, 20]], two_parts)
        gt(image_id, 2, [[5.5, 5, 12, 5, 9, 11.5]], _box_mask(h, w, 5, 5, 12, 12))  # area: any
        gt(image_id, 1, [[5, 5, 10, 5, 15, 5]], np.zeros((h, w)))  # a line: zero area
        crowd = _box_mask(h, w, 0, 0, w // 2, h)
        gt(image_id, 2, _string_rle(crowd), crowd, crowd=1)
        crowd = _box_mask(h, w, w // 2, 0, w, h // 2)
        gt(image_id, 1, {"size": [h, w], "counts": _runs(crowd)}, crowd, crowd=1)
    for image_id in (1, 2, 3, 4):
        h, w = sizes[image_id]
        for mask in (np.zeros((h, w)), np.ones((h, w))):
            dets.append({"image_id": image_id, "category_id": 1,
                         "segmentation": _string_rle(mask), "score": 0.5})
    h, w = sizes[1]
    for _ in range(130):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        m = _box_mask(h, w, x0, y0, x0 + rng.integers(2, 20), y0 + rng.integers(2, 20))
        dets.append({"image_id": 1, "category_id": 1, "segmentation": _string_rle(m),
                     "score": round(float(rng.random()), 1)})
    dets = [d for d in dets if d["image_id"] != 5]  # image 5: ground truth only
    return ({"images": images, "annotations": anns,
             "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, dets)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segm_awkward_scene_matches_pycocotools(seed):
    gt, dets = awkward_mask_scene(seed)
    assert _runs(np.array([[0, 1], [1, 1]])) == [1, 3]
    ev, result = run_kdet(gt, dets, "segm")
    assert_same_as_reference(ev, result, reference_eval(gt, dets, "segm"))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("uncompressed", [False, True], ids=["strings", "with-uncompressed"])
def test_segm_in_chunks_of_mixed_forms_matches_pycocotools(seed, uncompressed):
    """Detections added in three calls: str counts; str counts, some uncompressed RLEs
    (read in Python) among them; bytes counts. The strings kept from each call are decoded
    in evaluate (their places shifted as the calls are joined), or, where an uncompressed
    one is among them, all from the dicts: pycocotools' stats on the same masks as one
    result list. The ground truth's crowd RLEs likewise: all strings (decoded as read), or
    some uncompressed among them (read from the dicts)."""
    gt, dets = awkward_mask_scene(seed)
    for ann in gt["annotations"] if not uncompressed else []:
        rle = ann["segmentation"]
        if isinstance(rle, dict) and isinstance(rle["counts"], list):
            h, w = rle["size"]
            ann["segmentation"] = mask_utils.frPyObjects(rle, h, w)
            ann["segmentation"]["counts"] = ann["segmentation"]["counts"].decode()
    assert any(isinstance(a["segmentation"], dict) for a in gt["annotations"])
    mine = copy.deepcopy(dets)
    third = len(mine) // 3
    for d in mine[third:2 * third:3] if uncompressed else []:
        rle = d["segmentation"]
        d["segmentation"] = {"size": rle["size"], "counts": _runs(
            mask_utils.decode(dict(rle, counts=rle["counts"].encode())))}
    for d in mine[2 * third:]:
        d["segmentation"]["counts"] = d["segmentation"]["counts"].encode()
    ev = COCOEvaluator(gt, iou_type="segm")
    for begin, end in ((0, third), (third, 2 * third), (2 * third, len(mine))):
        ev.add_detections(mine[begin:end])
    assert_same_as_reference(ev, ev.evaluate(), reference_eval(gt, dets, "segm"))


def test_keypoints_max_dets_cut_and_ties_match_pycocotools():
    """30 tied-score detections per image (keypoints' maxDets is 20) near people with
    and without labelled keypoints."""
    gt = keypoint_ground_truth(11, num_images=8)
    rng = np.random.default_rng(3)
    dets = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(30 // max(1, sum(a["image_id"] == ann["image_id"]
                                        for a in gt["annotations"]))):
            kp = np.c_[rng.normal(x + w / 2, w / 4, 17), rng.normal(y + h / 2, h / 4, 17),
                       np.ones(17)]
            dets.append({"image_id": ann["image_id"], "category_id": 1,
                         "keypoints": kp.ravel().tolist(), "score": round(rng.random(), 1)})
    assert max(np.unique([d["image_id"] for d in dets], return_counts=True)[1]) > 20
    ev, result = run_kdet(gt, dets, "keypoints")
    assert_same_as_reference(ev, result, reference_eval(gt, dets, "keypoints"))


def test_keypoints_of_two_widths_match_pycocotools_per_category():
    """Categories with 17 and 5 keypoints (dict sigmas): each category's precision and
    recall equal pycocotools' run on that category alone with its sigmas."""
    people = keypoint_ground_truth(5, num_images=10)
    people_dets = keypoint_detections(people, 6)
    rng = np.random.default_rng(7)
    hands, hand_dets = [], []
    for ann in people["annotations"]:
        kp = np.array(ann["keypoints"], float).reshape(17, 3)[:5]
        x, y, w, h = ann["bbox"]
        hands.append(dict(ann, id=ann["id"] + 10000, category_id=2,
                          keypoints=kp.ravel().tolist(),
                          num_keypoints=int((kp[:, 2] > 0).sum())))
        noisy = kp.copy()
        noisy[:, :2] += rng.normal(0, 3, (5, 2))
        noisy[:, 2] = 1
        hand_dets.append({"image_id": ann["image_id"], "category_id": 2,
                          "keypoints": noisy.ravel().tolist(), "score": round(rng.random(), 2)})
    sigmas = {1: COCO_KEYPOINT_SIGMAS, 2: np.array([.05, .07, .09, .11, .13])}
    both = dict(people, annotations=people["annotations"] + hands,
                categories=[{"id": 1, "name": "person"}, {"id": 2, "name": "hand"}])
    mixed = [d for pair in zip(people_dets, hand_dets) for d in pair]  # interleaved widths
    mixed += people_dets[len(hand_dets):] + hand_dets[len(people_dets):]
    ev, _ = run_kdet(both, mixed, "keypoints", kpt_oks_sigmas=sigmas)
    for k, (anns, dets) in enumerate([(people["annotations"], people_dets), (hands, hand_dets)]):
        alone = dict(people, annotations=anns, categories=[both["categories"][k]])
        ref = reference_eval(alone, dets, "keypoints", sigmas=sigmas[k + 1])
        np.testing.assert_allclose(ev.precision[:, :, k], ref.eval["precision"][:, :, 0],
                                   rtol=0, atol=ATOL)
        np.testing.assert_allclose(ev.recall[:, k], ref.eval["recall"][:, 0], rtol=0, atol=ATOL)


def test_bbox_dense_images_cut_at_every_max_dets_match_pycocotools():
    """Images with 1, 5, 15 and 150 detections of a class: maxDets 1 / 10 / 100 cut
    some categories and not others (accumulate shares the cuts that cut nothing)."""
    rng = np.random.default_rng(4)
    images = [{"id": i, "height": 100, "width": 100} for i in range(1, 5)]
    anns, dets = [], []
    for image_id, n_det in zip(range(1, 5), (1, 5, 15, 150)):
        for cat in (1, 2, 3):
            boxes = rng.uniform(0, 60, (6, 2))
            for x, y in boxes:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                             "bbox": [x, y, 20, 25], "area": 500.0, "iscrowd": 0})
            for _ in range(n_det if cat == 1 else min(n_det, 8)):
                x, y = boxes[rng.integers(6)] + rng.normal(0, 4, 2)
                dets.append({"image_id": image_id, "category_id": cat,
                             "bbox": [x, y, 20, 25], "score": round(rng.random(), 1)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3, 4)]}
    ev, result = run_kdet(gt, dets, "bbox")
    assert_same_as_reference(ev, result, reference_eval(gt, dets, "bbox"))
