"""The C reader of result dicts (``kdet/metrics/_records.c`` via ``kdet.metrics.native``):
the same columns as Python's ``float()`` / ``dict.get`` on plain records, None on every
record that is not plain (Python then reads them and names the bad one), and
``COCOEvaluator.add_detections`` the same stats with and without it."""
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
    return reader.record_detections(records, index, index, row_key, width)


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
