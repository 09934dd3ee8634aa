"""kdet/metrics/_cocoeval.c (the evaluator's C kernels) and its numpy fallback.

Both paths against pycocotools on awkward scenes (empty images, images with only
crowd ground truth, tied scores, maxDets cuts, zero-area boxes, people without
labelled keypoints, categories without ground truth or without detections), the OKS
kernel value by value against pycocotools' computeOks formula, and in CI the library
must be built (a broken build would otherwise only make the evaluator slow).
"""
import numpy as np
import pytest

pytest.importorskip("pycocotools", reason="pycocotools is the reference")

from conftest import once_on_tensorflow  # noqa: E402
from strict_references import references_required  # noqa: E402
from test_metrics_coco import (  # noqa: E402
    assert_same_as_reference, keypoint_detections, keypoint_ground_truth, reference_eval,
    run_kdet)

from kdet.metrics import COCOEvaluator, native  # noqa: E402
from kdet.metrics.coco import COCO_KEYPOINT_SIGMAS  # noqa: E402


def test_native_library_is_built(monkeypatch):
    """CI installs with pip, which builds the library: there it must load."""
    monkeypatch.delenv("KDET_NATIVE", raising=False)
    if native.library() is None:
        message = ("kdet's C evaluation kernels not installed (kdet/metrics/_kernels/"
                   "_cocoeval*.so): `pip install -e .` or `python setup.py build_ext "
                   "--inplace` builds them")
        if references_required():
            pytest.fail(message)
        pytest.skip(message)
    monkeypatch.setenv("KDET_NATIVE", "0")
    assert native.library() is None


def test_ordinary_pages_switches_numpys_huge_page_advice_off_and_back():
    """The evaluator's block without numpy's huge-page advice, restored after (also when
    the block raises); skips where numpy has no such switch (the block then runs as is)."""
    switch = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    if switch is None:
        pytest.skip("this numpy has no _set_madvise_hugepage")
    before = switch(True)
    try:
        with native.ordinary_pages():
            assert switch(False) is False  # off inside (the call returns the setting)
        assert switch(True) is True  # back on after
        with pytest.raises(ValueError):
            with native.ordinary_pages():
                raise ValueError
        assert switch(True) is True
    finally:
        switch(before)


def awkward_box_scene(seed):
    """Images without ground truth or detections, an image with only crowd ground truth,
    zero-area boxes on both sides, tied scores, 120 detections of one (image, category)
    (past maxDets 100), a category without ground truth and one without detections."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "height": 120, "width": 160} for i in range(1, 8)]
    anns, dets = [], []

    def box(x, y, w, h, image_id, cat, crowd=0):
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                     "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": crowd})

    for image_id in (1, 2, 3):
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.uniform(0, 100, 2)
            w, h = np.exp(rng.uniform(np.log(3), np.log(60), 2))
            cat = int(rng.choice([1, 2]))
            box(x, y, w, h, image_id, cat, crowd=int(rng.random() < 0.15))
            for _ in range(int(rng.integers(0, 4))):
                j = rng.normal(0, 0.1, 4) * [w, h, w, h]
                dets.append({"image_id": image_id, "category_id": cat,
                             "bbox": [x + j[0], y + j[1], max(w + j[2], 0), max(h + j[3], 0)],
                             "score": round(float(rng.random()), 1)})  # ties
        box(10, 10, 0, 5, image_id, 1)  # zero-area ground truth
        dets.append({"image_id": image_id, "category_id": 1, "bbox": [10, 10, 0, 5],
                     "score": 0.5})
    box(0, 0, 80, 120, 4, 1, crowd=1)  # image 4: crowd only
    box(80, 0, 80, 60, 4, 2, crowd=1)
    for _ in range(6):
        x, y = rng.uniform(0, 100, 2)
        dets.append({"image_id": 4, "category_id": int(rng.choice([1, 2])),
                     "bbox": [x, y, 20, 20], "score": 0.3})
    for _ in range(120):  # image 5: no ground truth, many detections; category 3 has none
        x, y = rng.uniform(0, 140, 2)
        dets.append({"image_id": 5, "category_id": int(rng.choice([1, 3])),
                     "bbox": [x, y, 10, 10], "score": round(float(rng.random()), 1)})
    box(5, 5, 30, 30, 6, 4)  # category 4: ground truth, no detections; image 7: nothing
    for _ in range(120):  # one (image, category) past maxDets 100
        x, y = rng.uniform(0, 100, 2)
        dets.append({"image_id": 1, "category_id": 2, "bbox": [x, y, 25, 25],
                     "score": round(float(rng.random()), 1)})
    categories = [{"id": c, "name": str(c)} for c in (1, 2, 3, 4)]
    return {"images": images, "annotations": anns, "categories": categories}, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bbox_awkward_scene_matches_pycocotools(evaluator_path, seed):
    gt, dets = awkward_box_scene(seed)
    ev, result = run_kdet(gt, dets, "bbox")
    assert_same_as_reference(ev, result, reference_eval(gt, dets, "bbox"))


@pytest.mark.parametrize("seed", [0, 1])
def test_keypoints_without_labelled_ground_truth_match_pycocotools(evaluator_path, seed):
    """Every person of the even images has no labelled keypoint (OKS then measures the
    distance to the grown box); an image has only crowd people."""
    gt = keypoint_ground_truth(seed + 20, num_images=12)
    for ann in gt["annotations"]:
        if ann["image_id"] % 2 == 0:
            ann["keypoints"], ann["num_keypoints"] = [0] * 51, 0
        if ann["image_id"] == 3:
            ann["iscrowd"] = 1
    dets = keypoint_detections(gt, seed + 30)
    ev, result = run_kdet(gt, dets, "keypoints")
    assert_same_as_reference(ev, result, reference_eval(gt, dets, "keypoints"))


@pytest.mark.parametrize("seed", [0, 1])
def test_keypoints_not_finite_in_the_ground_truth(evaluator_path, seed):
    """A labelled ground-truth keypoint off the finite plane would make pycocotools' OKS
    NaN, which its matching takes (``iou < best`` is false) and after which it takes
    every later ground truth, however far: kdet raises naming the annotation instead. Not
    finite where OKS never looks (an unlabelled keypoint of a person with labelled ones):
    the same stats as pycocotools."""
    gt = keypoint_ground_truth(seed + 40)
    rng = np.random.default_rng(seed)
    dets = keypoint_detections(gt, seed + 50)
    for ann in gt["annotations"]:
        kp = ann["keypoints"]
        if ann["num_keypoints"] and 0 in kp[2::3]:
            kp[3 * kp[2::3].index(0) + int(rng.integers(2))] = float(rng.choice([np.nan, np.inf]))
    ev, result = run_kdet(gt, dets, "keypoints")
    assert_same_as_reference(ev, result, reference_eval(gt, dets, "keypoints"))
    ann = next(a for a in gt["annotations"][5:] if a["num_keypoints"])
    for value, where in ((np.nan, 0), (-np.inf, 1), (np.nan, 2)):
        kp = list(ann["keypoints"])
        kp[3 * kp[2::3].index(next(v for v in kp[2::3] if v > 0)) + where] = value
        bad = {**gt, "annotations": [dict(a, keypoints=kp) if a is ann else a
                                     for a in gt["annotations"]]}
        with pytest.raises(ValueError, match=rf"annotations\[\d+\] \(id={ann['id']}\): a "
                           "labelled keypoint"):
            COCOEvaluator(bad, iou_type="keypoints")


def _evaluate_img_flags(iou, ignore, crowd, id_nonzero, outside, thresholds):
    """pycocotools' evaluateImg matching for one group and area range, line for line:
    ``iou`` [D, G] (detections in score order), then ``dtm & ~dtIg``, ``~dtm & ~dtIg``."""
    gtind = np.argsort(ignore, kind="mergesort")
    iou, ignore, crowd, id_nonzero = iou[:, gtind], ignore[gtind], crowd[gtind], id_nonzero[gtind]
    num_thr, (num_det, num_gt) = len(thresholds), iou.shape
    gtm = np.zeros((num_thr, num_gt))
    dtm = np.zeros((num_thr, num_det), bool)
    dt_ig = np.repeat(outside[None, :], num_thr, 0)
    for tind, t in enumerate(thresholds):
        for dind in range(num_det):
            best, m = min([t, 1 - 1e-10]), -1
            for gind in range(num_gt):
                if gtm[tind, gind] > 0 and not crowd[gind]:
                    continue
                if m > -1 and ignore[m] == 0 and ignore[gind] == 1:
                    break
                if iou[dind, gind] < best:
                    continue
                best, m = iou[dind, gind], gind
            if m == -1:
                continue
            dt_ig[tind, dind] = ignore[m]
            dtm[tind, dind] = id_nonzero[m]
            gtm[tind, m] = 1
    return (dtm & ~dt_ig).T, (~dtm & ~dt_ig).T


def test_matching_kernel_equals_evaluate_img_line_for_line():
    """``kdet_match_detections`` (which searches only the ground truths a detection could
    match) against pycocotools' loop on random groups: IoUs tied, at the thresholds, 0,
    1 and NaN (which pycocotools' ``iou < best`` lets through, and then every ground
    truth after it), crowd, ignored and id-0 ground truths, two area ranges."""
    if native.library() is None:
        pytest.skip("kdet's C evaluation kernels not installed")
    rng = np.random.default_rng(0)
    thresholds = np.linspace(0.5, 0.95, 10)
    values = np.r_[0.0, 0.3, 0.5, 0.55, 0.75, 0.95, 1.0, np.nan, 1 - 1e-11]
    groups, pair_iou, pair_start, num_dets, num_gts = [], [], [], 0, 0
    for _ in range(300):
        num_det, num_gt = int(rng.integers(1, 9)), int(rng.integers(0, 7))
        iou = np.where(rng.random((num_det, num_gt)) < 0.6, rng.choice(values, (num_det, num_gt)),
                       rng.random((num_det, num_gt)))
        if rng.random() < 0.7:
            iou[np.isnan(iou)] = 0.6
        groups.append((num_dets, num_det, num_gts, num_gt, iou))
        for row in iou:
            pair_start.append(len(pair_iou))
            pair_iou.extend(row)
        num_dets, num_gts = num_dets + num_det, num_gts + num_gt
    gt_ignore = rng.random((num_gts, 2)) < 0.3
    gt_crowd, gt_id_nonzero = rng.random(num_gts) < 0.2, rng.random(num_gts) < 0.9
    outside = rng.random((num_dets, 2)) < 0.3
    first, ndet, gt_first, ngt = (np.array([g[i] for g in groups]) for i in range(4))
    true_pos, false_pos = native.match_detections(
        np.array(pair_iou), np.array(pair_start), first, ndet, gt_first, ngt, gt_ignore,
        gt_crowd, gt_id_nonzero, num_dets, thresholds, outside)
    for d0, nd, g0, ng, iou in groups:
        for a in range(2):
            gts, dets = slice(g0, g0 + ng), slice(d0, d0 + nd)
            tp, fp = _evaluate_img_flags(iou, gt_ignore[gts, a], gt_crowd[gts],
                                         gt_id_nonzero[gts], outside[dets, a], thresholds)
            np.testing.assert_array_equal(true_pos[dets, a], tp)
            np.testing.assert_array_equal(false_pos[dets, a], fp)


def _compute_oks(d, g, box, area, sigmas):
    """pycocotools' computeOks for one pair, line for line."""
    variances = (sigmas * 2) ** 2
    xg, yg, vg = g[0::3], g[1::3], g[2::3]
    k1 = np.count_nonzero(vg > 0)
    x0, x1 = box[0] - box[2], box[0] + box[2] * 2
    y0, y1 = box[1] - box[3], box[1] + box[3] * 2
    xd, yd = d[0::3], d[1::3]
    if k1 > 0:
        dx, dy = xd - xg, yd - yg
    else:
        z = np.zeros(len(sigmas))
        dx = np.max((z, x0 - xd), axis=0) + np.max((z, xd - x1), axis=0)
        dy = np.max((z, y0 - yd), axis=0) + np.max((z, yd - y1), axis=0)
    e = (dx ** 2 + dy ** 2) / variances / (area + np.spacing(1)) / 2
    if k1 > 0:
        e = e[vg > 0]
    return np.sum(np.exp(-e)) / e.shape[0]


@pytest.mark.parametrize("num_kpts", [17, 5, 140])  # 140: numpy's sum splits past 128
def test_pair_oks_is_bit_identical_to_compute_oks(num_kpts):
    if native.library() is None:
        pytest.skip("kdet's C evaluation kernels not installed")
    rng = np.random.default_rng(num_kpts)
    sigmas = COCO_KEYPOINT_SIGMAS[np.arange(num_kpts) % 17] if num_kpts != 5 else \
        np.array([.05, .07, .09, .11, .13])
    num_gt, num_det = 40, 60
    boxes = np.c_[rng.uniform(0, 200, (num_gt, 2)), rng.uniform(0.5, 80, (num_gt, 2))]
    gt_kpts = np.zeros((num_gt, num_kpts, 3))
    gt_kpts[..., 0] = boxes[:, :1] + rng.random((num_gt, num_kpts)) * boxes[:, 2:3]
    gt_kpts[..., 1] = boxes[:, 1:2] + rng.random((num_gt, num_kpts)) * boxes[:, 3:4]
    gt_kpts[..., 2] = rng.choice([0, 1, 2], (num_gt, num_kpts))
    gt_kpts[::4, :, 2] = 0  # no labelled keypoint
    gt_kpts[1, :, 2] = 2  # all labelled
    area = boxes[:, 2] * boxes[:, 3] * rng.uniform(0.3, 1, num_gt)
    area[2] = 0  # zero area: only eps in the denominator
    area[3] = -40.0  # negative (only checked finite): e < 0, OKS > 1, no bound may drop it
    det_kpts = gt_kpts[rng.integers(num_gt, size=num_det)].copy()
    det_kpts[..., :2] += rng.normal(0, rng.choice([0.5, 3, 30], (num_det, 1, 1)),
                                    (num_det, num_kpts, 2))
    det_kpts[..., 2] = 1
    det_kpts[0] = gt_kpts[1]  # an exact hit: OKS 1
    pair_det = np.repeat(np.arange(num_det), num_gt)
    pair_gt = np.tile(np.arange(num_gt), num_det)
    with np.errstate(over="ignore"):  # the negative area: exp(-e) overflows, as in pycocotools
        oks = native.pair_oks(det_kpts.reshape(num_det, -1), gt_kpts.reshape(num_gt, -1),
                              boxes, area, sigmas, pair_det, pair_gt, 0.5, chunk=333)
        expected = np.array([_compute_oks(det_kpts[d].ravel(), gt_kpts[g].ravel(), boxes[g],
                                          area[g], sigmas) for d, g in zip(pair_det, pair_gt)])
    near = oks != 0
    assert (expected[~near] < 0.5).all()  # left 0 only where it never matches
    assert np.array_equal(oks[near], expected[near])  # bit for bit
    assert (oks[pair_gt == 3] > 1).any()
    assert (expected >= 0.5).sum() > 20 and near.sum() > (expected >= 0.5).sum()
    assert oks[0 * num_gt + 1] == 1.0


def test_rle_area_box_and_iou_equal_mask_utils():
    """Decoded in C: areas, boxes and pair IoUs (crowd and not) equal pycocotools' on
    random, empty, full, one-pixel and striped masks, string and bytes counts."""
    if native.library() is None:
        pytest.skip("kdet's C evaluation kernels not installed")
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 3), (40, 50), (64, 1)]:
        masks = [np.zeros((h, w)), np.ones((h, w))]
        masks += [rng.random((h, w)) < p for p in (0.02, 0.3, 0.7, 0.97) for _ in range(4)]
        stripes = np.zeros((h, w))
        stripes[:, ::2] = 1
        masks.append(stripes)
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
        for i, r in enumerate(rles[::2]):  # half as str, as in result files
            r["counts"] = r["counts"].decode("ascii")
        decoded = native.DecodedRles(rles)
        as_bytes = [dict(r, counts=r["counts"].encode() if isinstance(r["counts"], str)
                         else r["counts"]) for r in rles]
        np.testing.assert_array_equal(decoded.areas(), mask_utils.area(as_bytes))
        np.testing.assert_array_equal(decoded.boxes(), mask_utils.toBbox(as_bytes))
        n = len(rles)
        crowd = rng.random(n) < 0.3
        a, b = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)
        expected = np.asarray(mask_utils.iou(as_bytes, as_bytes, crowd.astype(np.uint8)))
        got = native.rle_pair_iou(decoded, a, decoded, b, crowd[b])
        np.testing.assert_array_equal(got, expected.reshape(n, n)[a, b])


def _awkward_polygon_masks(rng, num):
    """Masks of 1-3 polygons: convex, random (self-intersecting, partly or wholly outside
    the image), integer / half-integer vertices with a repeated one, zero-area lines,
    the image border, and fewer than 3 points or an odd number of values."""
    masks = []
    for _ in range(num):
        h, w = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        polygons = []
        for _ in range(int(rng.integers(1, 4))):
            kind, k = int(rng.integers(6)), int(rng.integers(3, 12))
            if kind == 0:
                t, r = np.sort(rng.uniform(0, 2 * np.pi, k)), rng.uniform(1, 30)
                p = np.stack([w / 2 + r * np.cos(t), h / 2 + r * np.sin(t)], 1)
            elif kind == 1:
                p = rng.uniform(-20, max(h, w) + 20, (k, 2))
            elif kind == 2:
                p = rng.integers(0, max(h, w) + 1, (k, 2)) / rng.choice([1, 2])
                p[1] = p[0]
            elif kind == 3:
                p = np.stack([np.full(k, rng.uniform(0, w)), rng.uniform(-5, h + 5, k)], 1)
            elif kind == 4:
                p = np.array([[0, 0], [w, 0], [w, h], [0, h]], float) + rng.choice([0, .5, -.5])
            else:
                p = rng.uniform(0, max(h, w), (int(rng.integers(1, 3)), 2))
            flat = [round(float(v), int(rng.integers(0, 3))) for v in p.ravel()]
            if kind == 5 and rng.random() < 0.5:
                flat.append(1.5)
            polygons.append(flat)
        if len(polygons[0]) <= 4:  # pycocotools reads a first polygon of 4 values as a box
            polygons[0] = polygons[0] + [0.0, 0.0, 1.0]
        masks.append((polygons, h, w))
    return masks


def _steep_and_large_polygons(rng, num):
    """Polygons whose edges are steep (|dx| < |dy|: the outline's column crossings are
    searched for, not stepped to) at every slope, in images up to 900 px, with vertices
    outside the image and around 0 (C's truncation toward zero), plus a few past the
    search's size limit (stepped): 10**6 px out, or 250,000 px tall."""
    masks = []
    for j in range(num):
        h, w = int(rng.integers(1, 900)), int(rng.integers(1, 900))
        k, kind = int(rng.integers(3, 14)), j % 5
        if kind == 0:  # thin and tall: every edge steep
            x = rng.uniform(-50, w + 50, k)
            x = x.mean() + (x - x.mean()) * rng.uniform(0, 0.2)
            y = rng.uniform(-50, h + 50, k)
        elif kind == 1:  # near 45 degrees both ways
            t, r = rng.uniform(0, 2 * np.pi, k), rng.uniform(1, 400)
            x, y = w / 2 + r * np.cos(t) + rng.normal(0, 0.01, k), h / 2 + r * np.sin(t)
        elif kind == 2:  # an octagon (eval_speed's ground truth), tall or wide
            bx, by, bw, bh = rng.uniform(-10, w), rng.uniform(-10, h), *rng.uniform(1, 400, 2)
            x = bx + bw * np.array([.3, .7, 1, 1, .7, .3, 0, 0])
            y = by + bh * np.array([0, 0, .3, .7, 1, 1, .7, .3])
        elif kind == 3:  # around 0
            x, y = rng.uniform(-3, 3, k), rng.uniform(-30, 30, k)
        else:
            x, y = rng.uniform(-50, w + 50, k), rng.uniform(-50, h + 50, k)
        if j % 500 == 499:  # far out, or edges 250,000 px tall
            x, y = (x + 1e6, y) if j % 1000 == 999 else (x, y * 250)
        masks.append(([[round(float(v), int(rng.integers(0, 4)))
                        for v in np.stack([x, y], 1).ravel()]], h, w))
    return masks


@pytest.mark.parametrize("kind", ["awkward", "steep"])
def test_polygons_rasterised_in_c_equal_pycocotools(kind):
    """kdet_polygons_to_rle + kdet_rle_union + kdet_rle_encode: the same RLE strings as
    pycocotools' frPyObjects + merge, and the same areas / boxes."""
    if native.library() is None:
        pytest.skip("kdet's C evaluation kernels not installed")
    from pycocotools import mask as mask_utils
    masks = _awkward_polygon_masks(np.random.default_rng(0), 1500) if kind == "awkward" \
        else _steep_and_large_polygons(np.random.default_rng(1), 3000)
    masks.append(([[0.0, 0.0, 639.6, 0.0, 639.6, 479.4, 0.0, 479.4]], 480, 640))  # large
    flat = [p for polygons, _, _ in masks for p in polygons]
    rles = native.polygons_to_rles(
        np.fromiter((v for p in flat for v in p), float),
        np.r_[0, np.cumsum([len(p) for p in flat])],
        [len(m[0]) for m in masks], [m[1] for m in masks], [m[2] for m in masks])
    expected = []
    for polygons, h, w in masks:
        parts = mask_utils.frPyObjects(polygons, h, w)
        expected.append(mask_utils.merge(parts) if len(parts) > 1 else parts[0])
    assert native.encode_rles(rles) == [e["counts"].decode() for e in expected]
    for i in range(0, len(expected), 255):  # maskUtils.area overflows on longer lists
        np.testing.assert_array_equal(rles.areas()[i:i + 255], mask_utils.area(expected[i:i + 255]))
        np.testing.assert_array_equal(rles.boxes()[i:i + 255],
                                      mask_utils.toBbox(expected[i:i + 255]))


def test_rle_areas_and_boxes_with_empty_runs_equal_mask_utils():
    """kdet_rle_check and kdet_rle_area_bbox measure RLEs a (background, foreground) pair
    at a time: runs of 0 anywhere (an empty foreground at a column's start or end moves
    rleToBbox's box), the first two empty (pycocotools' uint32 t = 0 - 1), an odd last
    run, runs across columns: maskUtils.area / toBbox on the same RLEs."""
    if native.library() is None:
        pytest.skip("kdet's C evaluation kernels not installed")
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(5)
    rles = []
    for i in range(600):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        k = int(rng.integers(0, 2 * h * w + 3))
        if i % 3 == 0:  # cuts on column starts and ends: empty runs there
            cuts = rng.choice(np.r_[np.arange(0, h * w + 1, h), np.arange(h - 1, h * w, h)], k)
        else:
            cuts = rng.integers(0, h * w + 1, k)
        counts = np.diff(np.r_[0, np.sort(cuts), h * w]).tolist()
        if i % 7 == 0:
            counts = [0, 0] + counts
        rles.append(mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w))
    assert sum(b"0" in r["counts"] for r in rles) > 100
    texts = [r["counts"].decode() for r in rles]
    h, w = np.array([r["size"] for r in rles]).T
    status, area, box = native.check_rle_strings(texts, h, w)
    decoded = native.DecodedRles(rles)
    assert (status == 0).all()
    for i in range(0, len(rles), 255):  # maskUtils.area overflows on longer lists
        part = rles[i:i + 255]
        for got_area, got_box in ((area, box), (decoded.areas(), decoded.boxes())):
            np.testing.assert_array_equal(got_area[i:i + 255], mask_utils.area(part))
            np.testing.assert_array_equal(got_box[i:i + 255], mask_utils.toBbox(part))


def test_rle_strings_checked_in_c_as_the_numpy_reader():
    """kdet_rle_check: the same verdict as decode_rle_strings + check_counts on awkward
    strings (outside the alphabet, unfinished, long numbers, negative runs, wrong sums),
    and maskUtils' area and box of the valid ones."""
    if native.library() is None:
        pytest.skip("kdet's C evaluation kernels not installed")
    from pycocotools import mask as mask_utils
    from test_metrics_rle import _awkward_strings

    from kdet.metrics.rle import check_counts, decode_rle_strings
    rng = np.random.default_rng(3)
    texts = [t for t in _awkward_strings(rng) if not any(ord(c) > 255 for c in
                                                         (t if isinstance(t, str) else ""))]
    sizes = [(int(rng.integers(1, 40)), int(rng.integers(1, 40))) for _ in texts]
    for i in range(0, len(texts), 3):  # real masks of the sizes given
        h, w = sizes[i]
        m = (rng.random((h, w)) < rng.choice([0.0, 0.3, 1.0])).astype(np.uint8)
        texts[i] = mask_utils.encode(np.asfortranarray(m))["counts"].decode()
    h, w = np.array(sizes).T
    status, area, box = native.check_rle_strings(texts, h, w)
    counts, offsets, ok = decode_rle_strings(texts)
    ok &= check_counts(counts, offsets, h * w)
    exact = status == 2
    assert exact.sum() >= 1 and (status == 0).sum() > 100
    assert ((status == 0) == ok)[~exact].all()
    valid = np.flatnonzero(status == 0)
    rles = [{"size": [int(h[i]), int(w[i])], "counts": texts[i]} for i in valid[:255]]
    np.testing.assert_array_equal(area[valid[:255]], mask_utils.area(rles))
    np.testing.assert_array_equal(box[valid[:255]], mask_utils.toBbox(rles))


def _columns(dets, keys):
    out = {"image_ids": np.array([d["image_id"] for d in dets], np.int64),
           "category_ids": np.array([d["category_id"] for d in dets], np.int64),
           "scores": np.array([d["score"] for d in dets])}
    for key, name in keys:
        out[name] = np.array([d[key] for d in dets], np.float64)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_detection_arrays_equal_the_dicts_and_pycocotools(evaluator_path, seed):
    """add_detection_arrays on the awkward box scene (empty images, crowd-only image, ties,
    zero-area boxes, a maxDets cut) and on keypoints with and without boxes: the stats
    and precision of pycocotools, and of the same detections as dicts."""
    from kdet.metrics.coco import COCOEvaluator
    gt, dets = awkward_box_scene(seed)
    ref = reference_eval(gt, dets, "bbox")
    ev = COCOEvaluator(gt)
    cols = _columns(dets, [("bbox", "boxes")])
    half = len(dets) // 2  # in two calls, the ids as int32
    ev.add_detection_arrays(**{k: v[:half] for k, v in cols.items()})
    ev.add_detection_arrays(**{k: (v[half:].astype(np.int32) if k.endswith("ids") else v[half:])
                               for k, v in cols.items()})
    assert_same_as_reference(ev, ev.evaluate(), ref)
    dict_ev, _ = run_kdet(gt, dets, "bbox")
    np.testing.assert_array_equal(ev.precision, dict_ev.precision)
    gt = keypoint_ground_truth(seed + 40, num_images=12)
    for with_bbox in (False, True):
        dets = keypoint_detections(gt, seed + 50, with_bbox=with_bbox)
        ev = COCOEvaluator(gt, iou_type="keypoints")
        keys = [("keypoints", "keypoints")] + [("bbox", "boxes")] * with_bbox
        ev.add_detection_arrays(**_columns(dets, keys))
        assert_same_as_reference(ev, ev.evaluate(), reference_eval(gt, dets, "keypoints"))


def test_detection_arrays_reject_bad_input():
    from kdet.metrics.coco import COCOEvaluator
    gt, dets = awkward_box_scene(0)
    cols = _columns(dets[:3], [("bbox", "boxes")])
    ev = COCOEvaluator(gt)
    for change, message in [
            (dict(image_ids=np.array([1, 2, 99])), "image_id 99 is not in the ground truth"),
            (dict(category_ids=np.array([1, 7, 1])), "category_id 7 is not in the ground"),
            (dict(scores=np.array([0.5, np.nan, 1])), "score nan is not finite"),
            (dict(boxes=np.array([[0, 0, 1, 1], [0, 0, -1, 1], [0, 0, 1, 1]])), "negative size"),
            (dict(boxes=np.zeros((3, 3))), "boxes must be"),
            (dict(scores=np.zeros(2)), "must be [N] alike"),
            (dict(boxes=None), "needs boxes")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            ev.add_detection_arrays(**{**cols, **change})
    ev.add_detection_arrays(np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.zeros((0, 4)))
    assert ev.results() == []  # nothing added
    ev = COCOEvaluator(keypoint_ground_truth(0, num_images=2), iou_type="keypoints")
    with pytest.raises(ValueError, match="3 per sigma"):
        ev.add_detection_arrays([1], [1], [0.5], keypoints=np.zeros((1, 15)))


def test_coco128_polygons_rasterised_in_c_equal_pycocotools(shared_data):
    """Real COCO polygons (several per object, every image size of coco128): the C
    rasteriser's strings equal pycocotools' frPyObjects + merge."""
    if native.library() is None:
        pytest.skip("kdet's C evaluation kernels not installed")
    from pycocotools import mask as mask_utils
    from test_metrics_coco import COCO128, load_json
    gt = load_json(shared_data / COCO128)
    size = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    anns = [a for a in gt["annotations"] if isinstance(a["segmentation"], list)]
    assert len(anns) > 500 and any(len(a["segmentation"]) > 1 for a in anns)
    h, w = np.array([size[a["image_id"]] for a in anns]).T
    flat = [p for a in anns for p in a["segmentation"]]
    rles = native.polygons_to_rles(
        np.fromiter((v for p in flat for v in p), float),
        np.r_[0, np.cumsum([len(p) for p in flat])],
        [len(a["segmentation"]) for a in anns], h, w)
    expected = [mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], int(hi), int(wi)))
                for a, hi, wi in zip(anns, h, w)]
    assert native.encode_rles(rles) == [e["counts"].decode() for e in expected]


@once_on_tensorflow("NumPy and C evaluators")
def test_eval_speed_runs_every_kdet_input_against_pycocotools(capsys):
    """benchmarks/eval_speed.py on a small synthetic set: kdet from dicts and from
    columns (kdet-arrays) and the numpy fallback, every iou type, stats asserted equal to
    pycocotools' inside the harness."""
    from conftest import load_benchmark
    eval_speed = load_benchmark("eval_speed")
    eval_speed.main(["--images", "25", "--dets-per-image", "6", "--iou-types",
                     "bbox,segm,keypoints", "--no-write", "--evaluators",
                     "kdet,kdet-arrays,kdet-numpy"])
    out = capsys.readouterr().out
    assert out.count("| kdet-arrays") == 3 and out.count("| kdet-numpy") == 3


def test_large_outputs_in_mapped_memory_match_pycocotools(evaluator_path):
    """60 categories make the precision array 5.8 MB: from 4 MB on the C path takes it
    from an anonymous mapping (native._empty), which must behave as numpy memory."""
    rng = np.random.default_rng(7)
    images = [{"id": i, "height": 100, "width": 100} for i in range(1, 31)]
    anns, dets = [], []
    for image in images:
        for _ in range(4):
            x, y, w, h = *rng.uniform(0, 60, 2), *rng.uniform(5, 40, 2)
            cat = int(rng.integers(1, 61))
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": cat,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            dets.append({"image_id": image["id"], "category_id": cat, "score": float(rng.random()),
                         "bbox": [x + rng.normal(0, 3), y + rng.normal(0, 3), w, h]})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": str(c)} for c in range(1, 61)]}
    ev, result = run_kdet(gt, dets, "bbox")
    assert ev.precision.nbytes >= 1 << 22
    assert_same_as_reference(ev, result, reference_eval(gt, dets, "bbox"))
    big = native._empty((1 << 20, 2), np.float64)
    big[:] = 1.5
    assert big.shape == (1 << 20, 2) and big.dtype == np.float64 and big.sum() == 3 << 20
