"""VOCEvaluator against a loop-by-loop port of the devkit's voc_eval.py.

The reference below is written from the py-faster-rcnn ``voc_eval.py``
pseudo-code on purpose in its sequential form (one detection at a time, a
``det`` flag list per image) so that it shares nothing with the vectorised
implementation except the rules.
"""
import pathlib
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kdet.metrics import VOCEvaluator


# --------------------------------------------------------------------------- reference
def reference_voc_ap(rec, prec, use_07_metric):
    """devkit ``voc_ap``: written as loops."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = [p for r, p in zip(rec, prec) if r >= t]
            ap += (max(above) if above else 0.0) / 11.0
        return ap
    mrec = [0.0] + list(rec) + [1.0]
    mpre = [0.0] + list(prec) + [0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    ap = 0.0
    for i in range(len(mrec) - 1):
        if mrec[i + 1] != mrec[i]:
            ap += (mrec[i + 1] - mrec[i]) * mpre[i + 1]
    return ap


def reference_voc_eval(gt, dets, class_index, iou_threshold=0.5, use_07_metric=True):
    """devkit ``voc_eval`` for one class.

    gt: {image_id: list of (box, label, difficult)}; dets: list of (image_id, box, score, label).
    Returns AP, or nan when the class has no non-difficult GT.
    """
    class_recs, npos = {}, 0
    for image_id, objects in gt.items():
        R = [o for o in objects if o[1] == class_index]
        class_recs[image_id] = {"bbox": [o[0] for o in R], "difficult": [o[2] for o in R],
                                "det": [False] * len(R)}
        npos += sum(1 for o in R if not o[2])
    mine = [d for d in dets if d[3] == class_index]
    order = sorted(range(len(mine)), key=lambda i: -mine[i][2])  # python sort is stable
    tp, fp = [], []
    for i in order:
        image_id, bb, _, _ = mine[i]
        R = class_recs[image_id]
        ovmax, jmax = -np.inf, -1
        for j, g in enumerate(R["bbox"]):
            iw = max(min(g[2], bb[2]) - max(g[0], bb[0]) + 1.0, 0.0)
            ih = max(min(g[3], bb[3]) - max(g[1], bb[1]) + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0) - inters)
            if inters / uni > ovmax:  # strict: the first maximum wins, as np.argmax
                ovmax, jmax = inters / uni, j
        if ovmax > iou_threshold:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp.append(1.0), fp.append(0.0)
                    R["det"][jmax] = True
                else:
                    tp.append(0.0), fp.append(1.0)
            else:
                tp.append(0.0), fp.append(0.0)
        else:
            tp.append(0.0), fp.append(1.0)
    if npos == 0:
        return float("nan")
    rec, prec, ctp, cfp = [], [], 0.0, 0.0
    for t, f in zip(tp, fp):
        ctp += t
        cfp += f
        rec.append(ctp / npos)
        prec.append(ctp / max(ctp + cfp, np.finfo(np.float64).eps))
    return reference_voc_ap(rec, prec, use_07_metric)


def evaluate_both(gt, dets, num_classes, iou_threshold, use_07_metric):
    # The reference works on the XML's inclusive pixels: feed the same frame.
    evaluator = VOCEvaluator(num_classes=num_classes, use_07_metric=use_07_metric,
                             iou_threshold=iou_threshold, pixel_convention="inclusive")
    for image_id, objects in gt.items():
        evaluator.add_ground_truth(image_id, [o[0] for o in objects], [o[1] for o in objects],
                                   [o[2] for o in objects])
    for image_id, box, score, label in dets:
        evaluator.add_detections(image_id, [box], [score], [label])
    got = evaluator.evaluate()
    expected = [reference_voc_eval(gt, dets, c, iou_threshold, use_07_metric)
                for c in range(num_classes)]
    return got, expected


def assert_matches(got, expected):
    aps = np.array([got["per_class_AP"][c] for c in range(len(expected))])
    np.testing.assert_allclose(aps, expected, rtol=0, atol=1e-12, equal_nan=True)
    finite = [e for e in expected if not np.isnan(e)]
    if finite:
        assert got["mAP"] == pytest.approx(np.mean(finite), abs=1e-12)
    else:
        assert np.isnan(got["mAP"])


# --------------------------------------------------------------------------- random data
def random_case(seed, num_images=10, num_classes=3):
    """GT with difficult flags and empty images; dets = jittered GT, duplicates,
    pure false positives (also on images without GT), tied scores."""
    rng = np.random.default_rng(seed)
    gt, dets = {}, []
    for i in range(num_images):
        image_id = f"img{i}"
        objects = []
        for _ in range(rng.integers(0, 5) if i % 4 else 0):  # every 4th image: no objects
            x1, y1 = rng.uniform(0, 200, 2).round()
            w, h = rng.uniform(5, 120, 2).round()
            objects.append(([x1, y1, x1 + w, y1 + h], int(rng.integers(num_classes)),
                            bool(rng.random() < 0.25)))
        gt[image_id] = objects
        for box, label, _ in objects:
            for _ in range(rng.integers(0, 3)):  # 0 (missed), 1 or 2 (duplicate) detections
                w, h = box[2] - box[0], box[3] - box[1]
                jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
                x1, y1, x2, y2 = np.array(box) + jitter
                d = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
                wrong_class = rng.random() < 0.1
                dets.append((image_id, d, float(rng.integers(0, 10)) / 10,  # ties on purpose
                             int(rng.integers(num_classes)) if wrong_class else label))
        for _ in range(rng.integers(0, 3)):
            x1, y1 = rng.uniform(0, 250, 2)
            w, h = rng.uniform(1, 80, 2)
            dets.append((image_id, [x1, y1, x1 + w, y1 + h], float(rng.random()),
                         int(rng.integers(num_classes))))
    return gt, dets


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), use_07_metric=st.booleans(),
       iou_threshold=st.sampled_from([0.5, 0.3, 0.7]))
def test_random_matches_devkit_reference(seed, use_07_metric, iou_threshold):
    gt, dets = random_case(seed)
    got, expected = evaluate_both(gt, dets, 3, iou_threshold, use_07_metric)
    assert_matches(got, expected)


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_random_larger_matches_reference(use_07_metric):
    gt, dets = random_case(12345, num_images=60, num_classes=5)
    got, expected = evaluate_both(gt, dets, 5, 0.5, use_07_metric)
    assert sum(len(v) for v in gt.values()) > 50 and len(dets) > 100
    assert not np.isnan(expected).all() and 0 < np.nanmean(expected) < 1
    assert_matches(got, expected)


# --------------------------------------------------------------------------- hand-computed
def hand_case():
    """One class (0), 3 non-difficult GT (A, B, C) and one difficult GT (D);
    class 1 has a detection but no GT."""
    ev_gt = {
        "a": ([[0, 0, 99, 99], [200, 200, 299, 299]], [0, 0], [False, True]),  # A, D (difficult)
        "b": ([[0, 0, 49, 49], [100, 100, 149, 149]], [0, 0], [False, False]),  # B, C
    }
    dets = [  # image, box, score, label
        ("a", [0, 0, 99, 99], 0.9, 0),  # d1: A, IoU 1 -> TP
        ("a", [5, 5, 99, 99], 0.8, 0),  # d2: A again, IoU 95*95/100^2 = 0.9025 -> duplicate, FP
        ("a", [200, 200, 299, 299], 0.7, 0),  # d3: difficult D -> ignored (neither)
        ("b", [0, 0, 49, 49], 0.6, 0),  # d4: B -> TP
        ("b", [300, 300, 320, 320], 0.5, 0),  # d5: nothing -> FP
        ("b", [0, 0, 10, 10], 0.4, 1),  # class 1 has no GT -> nan
    ]
    return ev_gt, dets


@pytest.mark.parametrize("use_07_metric,expected", [
    # After d1..d5: (tp, fp) = (1,0) (1,1) (1,1) (2,1) (2,2); npos = 3.
    # recall    = 1/3, 1/3, 1/3, 2/3, 2/3
    # precision = 1,   1/2, 1/2, 2/3, 1/2
    # VOC07: t = 0, .1, .2, .3 -> max precision at recall >= t is 1 (4 points);
    #        t = .4, .5, .6   -> 2/3 (3 points); t = .7 .. 1 -> no such recall, 0.
    #        AP = (4 * 1 + 3 * 2/3) / 11 = 6/11.
    (True, 6 / 11),
    # Area: envelope from the right at the recall steps 0 -> 1/3 (precision 1)
    #       and 1/3 -> 2/3 (precision 2/3); recall never reaches 1.
    #       AP = 1/3 * 1 + 1/3 * 2/3 = 5/9.
    (False, 5 / 9),
])
def test_hand_computed_ap(use_07_metric, expected):
    ev_gt, dets = hand_case()
    evaluator = VOCEvaluator(class_names=["thing", "ghost"], use_07_metric=use_07_metric,
                             pixel_convention="inclusive")
    for image_id, (boxes, labels, difficult) in ev_gt.items():
        evaluator.add_ground_truth(image_id, boxes, labels, difficult)
    for image_id, box, score, label in dets:
        evaluator.add_detections(image_id, [box], [score], [label])
    result = evaluator.evaluate()
    assert result["per_class_AP"]["thing"] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(result["per_class_AP"]["ghost"])
    assert result["mAP"] == pytest.approx(expected, abs=1e-12)  # nan class left out
    table = evaluator.summary()
    assert "thing" in table and "ghost" in table and f"{expected:.4f}" in table


def test_plus_one_pixel_convention_and_strict_threshold():
    # GT [0,0,2,2] and det [0,0,2,1]: with +1 pixels the areas are 9 and 6 and the
    # intersection 6 -> IoU 2/3 (TP); without the +1 it would be 2/4 = 0.5, not > 0.5.
    evaluator = VOCEvaluator(num_classes=1, pixel_convention="inclusive")
    evaluator.add_ground_truth(0, [[0, 0, 2, 2]], [0])
    evaluator.add_detections(0, [[0, 0, 2, 1]], [1.0], [0])
    assert evaluator.evaluate()["mAP"] == 1.0
    # GT [0,0,9,9] (area 100) and det [0,0,9,4] (area 50, inside): IoU exactly 0.5 -> FP.
    evaluator = VOCEvaluator(num_classes=1, pixel_convention="inclusive")
    evaluator.add_ground_truth(0, [[0, 0, 9, 9]], [0])
    evaluator.add_detections(0, [[0, 0, 9, 4]], [1.0], [0])
    assert evaluator.evaluate()["mAP"] == 0.0
    evaluator = VOCEvaluator(num_classes=1, iou_threshold=0.49, pixel_convention="inclusive")
    evaluator.add_ground_truth(0, [[0, 0, 9, 9]], [0])
    evaluator.add_detections(0, [[0, 0, 9, 4]], [1.0], [0])
    assert evaluator.evaluate()["mAP"] == 1.0
    # Continuous frame: GT [0,0,2,2] is XML [1,1,2,2] (2x2 pixels), det [0,0,2,1] is
    # XML [1,1,2,1] (2x1): IoU 2/4 = 0.5 -> FP. Read as inclusive pixels it would be 6/9.
    for convention, expected in (("continuous", 0.0), ("inclusive", 1.0)):
        evaluator = VOCEvaluator(num_classes=1, pixel_convention=convention)
        evaluator.add_ground_truth(0, [[0, 0, 2, 2]], [0])
        evaluator.add_detections(0, [[0, 0, 2, 1]], [1.0], [0])
        assert evaluator.evaluate()["mAP"] == expected, convention


def test_class_without_detections_is_zero_and_no_gt_is_nan():
    evaluator = VOCEvaluator(num_classes=3)
    evaluator.add_ground_truth("x", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [False, True])
    evaluator.add_detections("x", [[0, 0, 10, 10]], [0.5], [0])
    result = evaluator.evaluate()
    assert result["per_class_AP"][0] == 1.0
    assert np.isnan(result["per_class_AP"][1])  # only a difficult object: no GT to find
    assert np.isnan(result["per_class_AP"][2])
    assert result["mAP"] == 1.0
    evaluator.reset_detections()
    assert evaluator.evaluate()["per_class_AP"][0] == 0.0
    evaluator.reset()
    assert evaluator.num_images == 0 and np.isnan(evaluator.evaluate()["mAP"])


# --------------------------------------------------------------------------- padded batches
def test_add_predictions_equals_add_detections(rng):
    gt, dets = random_case(7, num_images=6)
    per_image = {image_id: [d for d in dets if d[0] == image_id] for image_id in gt}
    width = max(len(v) for v in per_image.values()) + 2
    batch = {"boxes": np.zeros((len(gt), width, 4), np.float32) + 3.0,  # padding must be ignored
             "scores": np.zeros((len(gt), width), np.float32),
             "labels": -np.ones((len(gt), width), np.int32),
             "num_detections": np.zeros(len(gt), np.int32)}
    ids = list(gt)
    for b, image_id in enumerate(ids):
        for k, (_, box, score, label) in enumerate(per_image[image_id]):
            batch["boxes"][b, k], batch["scores"][b, k], batch["labels"][b, k] = box, score, label
        batch["num_detections"][b] = len(per_image[image_id])
    # boxes in xywh to exercise the format conversion
    xywh = batch["boxes"].copy()
    xywh[..., 2:] -= xywh[..., :2]
    evaluators = []
    for fmt, boxes in (("xyxy", batch["boxes"]), ("xywh", xywh)):
        ev = VOCEvaluator(num_classes=3, pixel_convention="inclusive")
        for image_id, objects in gt.items():
            ev.add_ground_truth(image_id, [o[0] for o in objects], [o[1] for o in objects],
                                [o[2] for o in objects])
        ids_bytes = np.array([i.encode() for i in ids])  # tf.data yields bytes ids
        ev.add_predictions(ids_bytes, dict(batch, boxes=boxes), bounding_box_format=fmt)
        evaluators.append(ev.evaluate())
    _, expected = evaluate_both(gt, [(i, list(np.float32(b)), float(np.float32(s)), l)
                                     for i, b, s, l in dets], 3, 0.5, True)
    for got in evaluators:
        assert_matches(got, expected)


# --------------------------------------------------------------------------- real data
def parse_voc_xml(path):
    root = ET.parse(path).getroot()
    objects = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        box = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((box, obj.find("name").text, int(obj.find("difficult").text)))
    size = root.find("size")
    return objects, float(size.find("width").text), float(size.find("height").text)


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_raccoon_xml_matches_reference(shared_data, use_07_metric):
    folder = pathlib.Path(shared_data) / "raccoon" / "annotations"
    files = sorted(folder.glob("raccoon-*.xml"), key=lambda p: int(p.stem.split("-")[1]))[:40]
    assert len(files) == 40
    rng = np.random.default_rng(3)
    gt, dets, count = {}, [], 0
    for path in files:
        objects, width, height = parse_voc_xml(path)
        gt[path.stem] = []
        for box, name, difficult in objects:
            assert name == "raccoon"
            # the set has no difficult objects: flag every 5th so the rule is exercised
            gt[path.stem].append((box, 0, bool(difficult) or count % 5 == 4))
            count += 1
            w, h = box[2] - box[0], box[3] - box[1]
            for _ in range(rng.integers(0, 3)):
                jittered = np.array(box) + rng.normal(0, 0.12, 4) * [w, h, w, h]
                x1, x2 = np.clip(np.sort(jittered[[0, 2]]), 1, width)
                y1, y2 = np.clip(np.sort(jittered[[1, 3]]), 1, height)
                dets.append((path.stem, [x1, y1, x2, y2], float(rng.random()), 0))
        for _ in range(rng.integers(0, 2)):  # background false positives
            x1, y1 = rng.uniform(1, width / 2), rng.uniform(1, height / 2)
            dets.append((path.stem, [x1, y1, x1 + width / 4, y1 + height / 4], float(rng.random()), 0))
    gt["no-objects"] = []  # an image without GT that still gets a detection
    dets.append(("no-objects", [10, 10, 50, 50], 0.99, 0))
    got, expected = evaluate_both(gt, dets, 1, 0.5, use_07_metric)
    assert 0.2 < expected[0] < 0.95  # a meaningful, non-trivial AP
    assert_matches(got, expected)


def test_default_convention_is_kdets_continuous_frame():
    """kdet models predict, and kdet readers give, 0-based continuous boxes: the default
    must read them so. A 2x2-pixel GT (XML [1,1,2,2] = kdet [0,0,2,2]) and a 2x1
    detection (kdet [0,0,2,1]) overlap 2/4 = 0.5, not > 0.5: a false positive. Read as
    inclusive pixels (the old default) they would be 3x3 and 3x2 boxes, IoU 6/9: a TP."""
    assert VOCEvaluator().pixel_convention == "continuous"
    evaluator = VOCEvaluator(num_classes=1)
    evaluator.add_ground_truth(0, [[0, 0, 2, 2]], [0])
    evaluator.add_detections(0, [[0, 0, 2, 1]], [1.0], [0])
    assert evaluator.evaluate()["mAP"] == 0.0
    # A kdet box equal to the GT is found whatever its size, including a one-pixel object.
    evaluator = VOCEvaluator(num_classes=1)
    evaluator.add_ground_truth(0, [[4, 4, 5, 5]], [0])
    evaluator.add_detections(0, [[4, 4, 5, 5], [4.4, 4, 5.4, 5]], [1.0, 0.9], [0, 0])
    assert evaluator.evaluate()["mAP"] == 1.0


def test_continuous_convention_reproduces_devkit_on_xml(shared_data):
    """kdet loaders store VOC boxes as x1 = xmin - 1, x2 = xmax (0-based, continuous);
    the default pixel_convention="continuous" must give the devkit's AP on the original
    XML boxes."""
    folder = pathlib.Path(shared_data) / "raccoon" / "annotations"
    rng = np.random.default_rng(11)
    gt, dets = {}, []
    for path in sorted(folder.glob("raccoon-1*.xml"))[:25]:
        objects, _, _ = parse_voc_xml(path)
        gt[path.stem] = [(box, 0, False) for box, _, _ in objects]
        for box, _, _ in objects:
            w, h = box[2] - box[0], box[3] - box[1]
            for _ in range(2):  # integer jitter so small +-1 pixel differences decide matches
                d = np.round(np.array(box) + rng.normal(0, 0.2, 4) * [w, h, w, h])
                dets.append((path.stem, [min(d[0], d[2]), min(d[1], d[3]), max(d[0], d[2]),
                                         max(d[1], d[3])], float(rng.random()), 0))
    shift = np.array([-1.0, -1.0, 0.0, 0.0])  # XML -> kdet continuous frame
    for use_07_metric in (True, False):
        expected = reference_voc_eval(gt, dets, 0, 0.5, use_07_metric)
        evaluator = VOCEvaluator(num_classes=1, use_07_metric=use_07_metric)
        for image_id, objects in gt.items():
            evaluator.add_ground_truth(image_id, np.array([o[0] for o in objects]) + shift,
                                       [0] * len(objects))
        for image_id, box, score, label in dets:
            evaluator.add_detections(image_id, [np.array(box) + shift], [score], [label])
        assert 0 < expected < 1
        assert evaluator.evaluate()["mAP"] == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_the_image():
    evaluator = VOCEvaluator(class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"'img7'.*label 2 is outside the class list"):
        evaluator.add_ground_truth("img7", [[0, 0, 5, 5]], [2])
    with pytest.raises(ValueError, match=r"'img8'.*label -1"):
        evaluator.add_detections("img8", [[0, 0, 5, 5]], [0.5], [-1])
    with pytest.raises(ValueError, match=r"'img9'.*not finite"):
        evaluator.add_ground_truth("img9", [[0, 0, np.nan, 5]], [0])
    with pytest.raises(ValueError, match=r"'img10'.*not finite"):
        evaluator.add_detections("img10", [[0, np.inf, 3, 5]], [0.5], [0])
    with pytest.raises(ValueError, match=r"'img11'.*scores must be finite"):
        evaluator.add_detections("img11", [[0, 0, 3, 5]], [np.nan], [0])
    with pytest.raises(ValueError, match=r"'img12'.*shape"):
        evaluator.add_ground_truth("img12", [[0, 0, 3]], [0])
    with pytest.raises(ValueError, match=r"'img13'.*x2 < x1"):
        evaluator.add_ground_truth("img13", [[5, 0, 3, 5]], [0])
    with pytest.raises(ValueError, match=r"'img14'.*labels must have shape"):
        evaluator.add_ground_truth("img14", [[0, 0, 3, 5]], [0, 1])
    with pytest.raises(ValueError, match="num_classes=3 but 2 class_names"):
        VOCEvaluator(class_names=["a", "b"], num_classes=3)
    evaluator = VOCEvaluator(num_classes=1)
    evaluator.add_ground_truth("known", [[0, 0, 5, 5]], [0])
    evaluator.add_detections("unknown", [[0, 0, 5, 5]], [0.5], [0])
    with pytest.raises(ValueError, match=r"no registered ground truth.*'unknown'"):
        evaluator.evaluate()
