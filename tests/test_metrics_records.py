"""The C reader of result dicts (``kdet/metrics/_records.c`` via ``kdet.metrics.native``):
the same columns as Python's ``float()`` / ``dict.get`` on plain records, None on every
record that is not plain (Python then reads them and names the bad one), and
``COCOEvaluator.add_detections`` the same stats with and without it."""
import sys

import numpy as np
import pytest

from strict_references import references_required

from kdet.metrics import COCOEvaluator, native


@pytest.fixture
def reader(monkeypatch):
    monkeypatch.delenv("KDET_NATIVE", raising=False)
    if native.records() is None:
        message = ("kdet's C reader of result dicts not built (kdet/metrics/_records*.so): "
                   "`pip install -e .` or `python setup.py build_ext --inplace` builds it")
        if references_required():
            pytest.fail(message)
        pytest.skip(message)
    return native


def plain_records(rng, n, index):
    ids = list(index)
    out = []
    for i in range(n):
        box = [float(v) for v in rng.uniform(0, 100, 4)]
        if i % 5 == 0:  # ints, one beyond a double's 53 bits
            box[0:2] = [int(rng.integers(0, 50)), 2 ** 60 + i]
        if i % 3 == 0:
            box = tuple(box)
        score = float(rng.random()) if i % 4 else int(rng.integers(0, 2))
        out.append({"image_id": ids[i % len(ids)], "category_id": ids[(i * 7) % len(ids)],
                    "bbox": box, "score": score})
    return out


def read(reader, records, index, row_key="bbox", width=4):
    image, category, score, rows, boxes, flags = reader.record_detections(
        records, index, index, row_key, width)
    assert boxes is None and flags == ()  # neither asked for
    return image, category, score, rows


def test_plain_records_read_as_python_reads_them(reader):
    rng = np.random.default_rng(0)
    index = {7: 0, "a": 1, 3.5: 2, 2 ** 70: 3, 9: 4}
    records = plain_records(rng, 200, index)
    image, category, score, rows = read(reader, records, index)
    np.testing.assert_array_equal(image, [index[r["image_id"]] for r in records])
    np.testing.assert_array_equal(category, [index[r["category_id"]] for r in records])
    np.testing.assert_array_equal(score, [float(r["score"]) for r in records])
    assert rows.shape == (200, 4) and rows.dtype == np.float64 and score.dtype == np.float64
    np.testing.assert_array_equal(rows, [[float(v) for v in r["bbox"]] for r in records])
    assert rows[5, 1] == float(2 ** 60 + 5)  # not exactly a double: rounded as float() does
    np.testing.assert_array_equal(reader.record_rows(records, "bbox", 4), rows)
    assert read(reader, records, index, None)[3].shape == (200, 0)  # ids and scores only
    assert [a.shape for a in read(reader, [], index)] == [(0,), (0,), (0,), (0, 4)]
    assert reader.record_rows([], "keypoints", 51).shape == (0, 51)
    # a float id equal to an int key finds it, as dict.get does
    plain = {"image_id": 7.0, "category_id": 9, "score": 1, "bbox": [0, 0, 1, 1]}
    assert read(reader, [plain], index)[0].tolist() == [0]


def test_boxes_and_flag_read_in_the_same_pass(reader):
    """``box_key``: every record's box when all are plain, else None with the other columns
    still read (Python then reads the boxes and names a bad one); ``flag_keys``: whether any
    record holds each key (a keypoint result with a mask, any box at all)."""
    rng = np.random.default_rng(3)
    index = {7: 0, "a": 1, 3.5: 2, 9: 4}
    records = [dict(r, keypoints=[float(v) for v in rng.uniform(0, 50, 6)])
               for r in plain_records(rng, 60, index)]
    image, category, score, rows, boxes, flags = reader.record_detections(
        records, index, index, "keypoints", 6, "bbox", ("segmentation", "bbox"))
    np.testing.assert_array_equal(rows, [r["keypoints"] for r in records])
    np.testing.assert_array_equal(boxes, [[float(v) for v in r["bbox"]] for r in records])
    np.testing.assert_array_equal(score, [float(r["score"]) for r in records])
    assert boxes.shape == (60, 4) and flags == (False, True)
    for bad in ("missing", [1.0, 2.0, 3.0], [1, 2, 3, "4"], np.ones(4), None):
        odd = [dict(r) for r in records]
        if isinstance(bad, str):
            del odd[59]["bbox"]
        else:
            odd[17]["bbox"] = bad
        out = reader.record_detections(odd, index, index, "keypoints", 6, "bbox")
        assert out[4] is None, bad
        np.testing.assert_array_equal(out[3], rows)  # the rest still read
        np.testing.assert_array_equal(out[0], image)
    for where in (0, 30, 59):
        flagged_records = [dict(r) for r in records]
        flagged_records[where]["segmentation"] = None
        assert reader.record_detections(flagged_records, index, index, None, 0, None,
                                        ("segmentation", "keypoints"))[5] == (True, True)
    no_boxes = [{k: v for k, v in r.items() if k != "bbox"} for r in records]
    out = reader.record_detections(no_boxes, index, index, None, 0, "bbox", ("bbox",))
    assert out[4] is None and out[5] == (False,)
    empty = reader.record_detections([], index, index, "keypoints", 6, "bbox", ("bbox",))
    assert empty[4].shape == (0, 4) and empty[5] == (False,)
    with pytest.raises(TypeError, match="flag_keys"):
        reader.records().detections(records, index, index, None, 0, None, "bbox")


def test_rows_of_a_list_of_rows(reader):
    """``record_rows(rows, None, width)``: the rows themselves (the ground truth's keypoint
    table), as numpy reads plain rows; None for any row not plain."""
    rng = np.random.default_rng(2)
    rows = [[float(v) if j % 3 else int(v) for j, v in enumerate(rng.uniform(0, 500, 6))]
            for _ in range(40)]
    rows[3] = tuple(rows[3])
    np.testing.assert_array_equal(reader.record_rows(rows, None, 6), np.array(rows, np.float64))
    for bad in ([1.0] * 5, [1.0] * 5 + [True], np.ones(6), [1.0] * 5 + [np.float64(1)], None):
        assert reader.record_rows(rows[:5] + [bad] + rows[5:], None, 6) is None


@pytest.mark.parametrize("bad", [
    {"image_id": True}, {"image_id": np.int64(7)}, {"image_id": [7]}, {"image_id": 6},
    {"image_id": None}, {"category_id": 7}, {"category_id": False}, {"score": np.float32(0.5)},
    {"score": "0.5"}, {"score": True}, {"score": None}, {"score": 10 ** 400},
    {"bbox": [1.0, 2.0, 3.0]}, {"bbox": [1.0, 2.0, 3.0, 4.0, 5.0]}, {"bbox": np.ones(4)},
    {"bbox": [1, 2, 3, "4"]}, {"bbox": [1, 2, 3, [4]]}, {"bbox": [1, 2, 3, False]},
    {"bbox": [1, 2, 3, 10 ** 400]}, {"bbox": "1 2 3 4"},
    "missing image_id", "missing category_id", "missing score", "missing bbox",
    "not a dict", "dict subclass"])
def test_any_record_not_plain_gives_none(reader, bad):
    images, categories = {7: 0, 8: 1}, {9: 0}
    records = [{"image_id": 7, "category_id": 9, "bbox": [1, 2, 3, 4], "score": 0.5}
               for _ in range(5)]
    assert reader.record_detections(records, images, categories, "bbox", 4) is not None
    if isinstance(bad, dict):
        records[2] = dict(records[2], **bad)
    elif bad.startswith("missing"):
        del records[2][bad.split()[1]]
    elif bad == "not a dict":
        records[2] = list(records[2].items())
    else:
        records[2] = type("Record", (dict,), {})(records[2])
    assert reader.record_detections(records, images, categories, "bbox", 4) is None
    bbox_only = isinstance(bad, dict) and "bbox" in bad or bad == "missing bbox"
    # without rows the bbox does not matter
    assert (reader.record_detections(records, images, categories, None, 0) is None) \
        == (not bbox_only)
    if bbox_only or bad in ("not a dict", "dict subclass"):
        assert reader.record_rows(records, "bbox", 4) is None


def coco_scene(rng):
    images = [{"id": i, "width": 200, "height": 150} for i in range(1, 31)]
    categories = [{"id": c, "name": str(c)} for c in (1, 3, 8)]
    annotations = []
    for i in range(1, 31):
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 150), rng.uniform(0, 100)
            w, h = rng.uniform(1, 50), rng.uniform(1, 50)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "bbox": [x, y, w, h],
                                "category_id": int(rng.choice([1, 3, 8])), "area": w * h,
                                "iscrowd": int(rng.random() < 0.1)})
    return {"images": images, "categories": categories, "annotations": annotations}


def test_add_detections_same_stats_and_errors_with_and_without_the_reader(reader, monkeypatch):
    rng = np.random.default_rng(3)
    gt = coco_scene(rng)
    detections = []
    for a in gt["annotations"]:
        box = [float(v + rng.normal(0, 3)) for v in a["bbox"]]
        box[2:] = [abs(v) for v in box[2:]]
        detections.append({"image_id": a["image_id"], "category_id": a["category_id"],
                           "bbox": box, "score": float(rng.random())})
    detections += [{"image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1},
                   {"image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 1}]
    stats = []
    for flag in ("1", "0"):
        monkeypatch.setenv("KDET_NATIVE", flag)
        evaluator = COCOEvaluator(gt)
        evaluator.add_detections(detections)
        evaluator.add_detections(tuple(detections[:3]))
        evaluator.evaluate()
        stats.append(np.asarray(evaluator.stats, np.float64))
    np.testing.assert_array_equal(stats[0], stats[1])
    assert stats[0][0] > 0.1
    # a bad record: the same message either way (the C reader hands over to Python)
    bad = [dict(d) for d in detections[:4]]
    bad[2]["image_id"] = 99
    messages = []
    for flag in ("1", "0"):
        monkeypatch.setenv("KDET_NATIVE", flag)
        with pytest.raises(ValueError) as error:
            COCOEvaluator(gt).add_detections(bad)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "detection #2" in messages[0] and "99" in messages[0]


# ------------------------------------------------------------------ segmentations
def _python_kinds(segmentations, heights, widths):
    """What kdet.metrics.coco's Python reader makes of each mask: 0 a compressed RLE of
    the image's size, 1 plain polygons within range, 2 anything else."""
    from kdet.metrics.coco import _plain_polygons, _segmentation_crash, _size_is

    kinds = []
    for s, h, w in zip(segmentations, heights.tolist(), widths.tolist()):
        if type(s) is dict and type(s.get("counts")) in (str, bytes) and "size" in s:
            size = s["size"]
            plain_size = type(size) in (list, tuple) and len(size) == 2 and all(
                type(v) is int for v in size)
            kinds.append(0 if plain_size and _size_is(size, h, w) else 2)
        elif _plain_polygons(s):
            try:
                crash = _segmentation_crash(s, h, w)
                [float(v) for p in s for v in p]
            except OverflowError:
                crash = "past float range"
            kinds.append(1 if crash is None else 2)
        else:
            kinds.append(2)
    return np.array(kinds, np.uint8)


def test_segmentations_read_as_python_reads_them(reader):
    rng = np.random.default_rng(5)
    segmentations, heights, widths = [], [], []
    for i in range(300):
        h, w = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        kind = i % 3
        if kind == 0:  # an RLE string (the reader does not judge the string itself)
            counts = "".join(chr(c) for c in rng.integers(48, 112, int(rng.integers(0, 30))))
            size = [h, w] if i % 4 else (h, w)
            segmentations.append({"size": size, "counts": counts.encode() if i % 5 == 0
                                  else counts})
        elif kind == 1:  # 1-3 polygons of ints and floats, some past the image
            polygons = []
            for _ in range(int(rng.integers(1, 4))):
                values = rng.uniform(-50, max(h, w) + 50, 2 * int(rng.integers(3, 9)))
                polygons.append([int(v) if j % 3 == 0 else float(v)
                                 for j, v in enumerate(values)])
            segmentations.append(polygons)
        else:
            segmentations.append({"size": [h, w], "counts": [h * w]})  # uncompressed
        heights.append(h)
        widths.append(w)
    heights, widths = np.array(heights), np.array(widths)
    kinds, text, text_offsets, coords, coord_offsets, per_mask = reader.read_segmentations(
        segmentations, heights, widths)
    np.testing.assert_array_equal(kinds, _python_kinds(segmentations, heights, widths))
    strings = [segmentations[i]["counts"] for i in np.flatnonzero(kinds == 0)]
    as_bytes = [s if isinstance(s, bytes) else s.encode() for s in strings]
    assert text[:text_offsets[-1]].tobytes() == b"".join(as_bytes)
    np.testing.assert_array_equal(np.diff(text_offsets), [len(s) for s in as_bytes])
    polygons = [segmentations[i] for i in np.flatnonzero(kinds == 1)]
    np.testing.assert_array_equal(per_mask, [len(p) for p in polygons])
    flat = [p for mask in polygons for p in mask]
    np.testing.assert_array_equal(np.diff(coord_offsets), [len(p) for p in flat])
    np.testing.assert_array_equal(coords, [float(v) for p in flat for v in p])
    # read from records by key: the same
    records = [{"segmentation": s, "score": 1.0} for s in segmentations]
    again = reader.read_segmentations(records, heights, widths, key="segmentation")
    for a, b in zip(again, (kinds, text, text_offsets, coords, coord_offsets, per_mask)):
        np.testing.assert_array_equal(a, b)
    # the strings are held while read and copied after: every reference given back
    before = [sys.getrefcount(s) for s in strings]
    for _ in range(3):
        reader.read_segmentations(segmentations, heights, widths)
    assert [sys.getrefcount(s) for s in strings] == before


_POLYGON = [1.0, 2.0, 30.0, 2.0, 30.0, 20.0]


@pytest.mark.parametrize("odd", [
    {"size": [40, 50], "counts": [2000]}, {"size": [40, 51], "counts": "PP"},
    {"size": [40.0, 50], "counts": "PP"}, {"size": [40, 50, 1], "counts": "PP"},
    {"size": [True, 50], "counts": "PP"}, {"size": np.array([40, 50]), "counts": "PP"},
    {"size": [40, 2 ** 70], "counts": "PP"}, {"counts": "PP"}, {"size": [40, 50]},
    {"size": [40, 50], "counts": bytearray(b"PP")}, "PP", None, 5, [], [[]],
    [[1.0, 2.0, 3.0, 4.0]], [_POLYGON, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)],
    [_POLYGON[:-1] + [True]], [_POLYGON[:-1] + [np.float64(20)]],
    [_POLYGON[:-1] + ["20"]], [_POLYGON[:-1] + [float("nan")]],
    [_POLYGON[:-1] + [1e9]], [_POLYGON[:-1] + [2 ** 1100]], [np.array(_POLYGON)],
    "dict subclass", "list subclass"])
def test_segmentations_not_plain_are_left_to_python(reader, odd):
    if odd == "dict subclass":
        odd = type("Mask", (dict,), {})({"size": [40, 50], "counts": "PP"})
    elif odd == "list subclass":
        odd = type("Polygons", (list,), {})([_POLYGON])
    plain = [{"size": [40, 50], "counts": "PP"}, [_POLYGON]]
    items = plain + [odd] + plain
    h, w = np.full(5, 40), np.full(5, 50)
    kinds, text, text_offsets, coords, coord_offsets, per_mask = reader.read_segmentations(
        items, h, w)
    assert kinds.tolist() == [0, 1, 2, 0, 1]
    assert text[:text_offsets[-1]].tobytes() == b"PPPP"
    np.testing.assert_array_equal(coords, _POLYGON * 2)  # nothing of the odd one kept
    assert per_mask.tolist() == [1, 1]
    # by key: a record that is no exact dict, or lacks the key, is left to Python too
    records = [{"segmentation": s} for s in items] + [{}, [("segmentation", plain[0])]]
    h, w = np.full(7, 40), np.full(7, 50)
    kinds = reader.read_segmentations(records, h, w, key="segmentation")[0]
    assert kinds.tolist() == [0, 1, 2, 0, 1, 2, 2]


def test_segm_same_stats_and_errors_with_and_without_the_segmentation_reader(
        reader, monkeypatch):
    """The C kernels with the masks read in C or in Python (``_records.c`` absent): equal
    stats on an awkward scene, odd masks included, and the same error for a bad one."""
    from test_metrics_coco import awkward_mask_scene, reference_eval

    gt, dets = awkward_mask_scene(1)
    dets[3] = dict(dets[3], segmentation=dict(dets[3]["segmentation"]))
    dets[3]["segmentation"]["counts"] = dets[3]["segmentation"]["counts"].encode()
    dets[5] = dict(dets[5], segmentation=dict(dets[5]["segmentation"]))
    dets[5]["segmentation"]["size"] = tuple(float(v) for v in dets[5]["segmentation"]["size"])
    dets[7] = dict(dets[7], segmentation=[[1, 1, 9.5, 1, 9.5, 7, 1, 7]])
    image = {i["id"]: i for i in gt["images"]}[dets[7]["image_id"]]
    assert dets[8]["image_id"] == dets[7]["image_id"]
    with_reader = native.read_segmentations
    stats, messages = [], []
    for read in (with_reader, lambda *args, **kwargs: None):
        monkeypatch.setattr(native, "read_segmentations", read)
        evaluator = COCOEvaluator(gt, iou_type="segm")
        evaluator.add_detections(dets)
        evaluator.evaluate()
        stats.append(np.asarray(evaluator.stats, np.float64))
        bad = [dict(d) for d in dets[:9]]
        bad[8]["segmentation"] = {"size": [image["height"], image["width"]], "counts": "PPPP"}
        with pytest.raises(ValueError) as error:
            COCOEvaluator(gt, iou_type="segm").add_detections(bad)
        messages.append(str(error.value))
    np.testing.assert_array_equal(stats[0], stats[1])
    from pycocotools import mask as mask_utils  # loadRes takes no polygon: its RLE there
    as_rle = mask_utils.merge(mask_utils.frPyObjects(dets[7]["segmentation"], image["height"],
                                                     image["width"]))
    reference = reference_eval(gt, dets[:7] + [dict(dets[7], segmentation=as_rle)] + dets[8:],
                               "segm")
    np.testing.assert_allclose(stats[0], reference.stats, rtol=0, atol=1e-12)
    assert stats[0][0] > 0.01
    assert messages[0] == messages[1] and "detection #8" in messages[0]


def test_keypoint_results_with_masks_on_some_name_the_first_without(reader):
    """COCO.loadRes takes every area from the mask when the first result has one: a
    later result without one is an error naming it."""
    from test_metrics_coco import keypoint_detections, keypoint_ground_truth

    gt = keypoint_ground_truth(2, num_images=3)
    dets = keypoint_detections(gt, 3)
    image = {i["id"]: i for i in gt["images"]}[dets[0]["image_id"]]
    dets[0] = dict(dets[0], segmentation=[[1.0, 1.0, 9.0, 1.0, 9.0, 7.0]])
    dets[2] = dict(dets[2], segmentation=[[1.0, 1.0, 9.0, 1.0, 9.0, 7.0]])
    assert image["height"] > 7 and "segmentation" not in dets[1]
    evaluator = COCOEvaluator(gt, iou_type="keypoints")
    evaluator.add_detections(dets)
    with pytest.raises(ValueError, match=r"detection #1 has no 'segmentation' but the first"):
        evaluator.evaluate()
