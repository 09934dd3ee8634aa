"""``kdet datasets inspect`` and reader counts that must neither hide nor invent problems
(issue #10, item 6): objects beyond ``max_boxes`` are reported, and YOLO labels written
with 6-decimal normalised coordinates are not ``box_clipped``."""
import json
import logging
import os

import numpy as np
import pytest
import yaml

from kdet import cli
from kdet.data import COCODataset, YOLODataset
from kdet.data.errors import ProblemLog, sanitize_boxes


def _coco128(shared_data):
    root = shared_data / "coco128"
    return root / "annotations/instances_train2017.json", root / "train2017"


def _non_crowd_per_image(ann):
    raw = json.loads(ann.read_text())
    counts = {im["id"]: 0 for im in raw["images"]}
    for a in raw["annotations"]:
        counts[a["image_id"]] += a["iscrowd"] == 0
    return np.array(list(counts.values()))


def test_inspect_reports_objects_beyond_max_boxes(shared_data, capsys):
    ann, images = _coco128(shared_data)
    counts = _non_crowd_per_image(ann)  # written out from the raw JSON
    dropped, beyond = int(np.maximum(counts - 10, 0).sum()), int((counts > 10).sum())
    argv = ["datasets", "inspect", "--format", "coco", "--train-data", str(ann),
            "--train-images", str(images)]
    assert cli.main(argv + ["--max-boxes", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["max_boxes"], report["max_boxes_auto"]) == (10, False)
    assert report["objects_beyond_max_boxes"] == dropped > 0
    assert report["images_beyond_max_boxes"] == beyond
    assert report["max_boxes_needed"] == counts.max()
    assert cli.main(argv + ["--max-boxes", "10"]) == 0
    text = capsys.readouterr().out
    assert (f"max_boxes:          10: {dropped} objects in {beyond} images beyond it are "
            f"DROPPED by the pipeline (--max-boxes {counts.max()} keeps them)") in text
    assert cli.main(argv) == 0  # not given: what training would pick, nothing dropped
    text = capsys.readouterr().out
    assert f"max_boxes:          {counts.max()} (auto" in text


# ---- YOLO labels with 6-decimal coordinates ------------------------------------------
def _write_yolo_6_decimals(dataset, root):
    """ultralytics-style labels: ``class cx cy w h`` normalised, printed with ``%.6f``."""
    for split in ("images", "labels"):
        os.makedirs(root / split / "train", exist_ok=True)
    overshoot = 0.0
    for record in dataset.records:
        name = os.path.basename(record["file_name"])
        os.symlink(record["file_name"], root / "images/train" / name)
        h, w = (float(v) for v in record["original_size"])
        lines = []
        for (x1, y1, x2, y2), label, crowd in zip(record["boxes"].astype(np.float64),
                                                  record["labels"], record["iscrowd"]):
            if crowd:
                continue
            values = [f"{v:.6f}" for v in ((x1 + x2) / 2 / w, (y1 + y2) / 2 / h,
                                           (x2 - x1) / w, (y2 - y1) / h)]
            cx, cy, bw, bh = (float(v) for v in values)
            # how far the printed box reaches past the border (the reader's arithmetic)
            overshoot = max(overshoot, (cx + bw / 2) * w - w, (cy + bh / 2) * h - h,
                            -(cx - bw / 2) * w, -(cy - bh / 2) * h)
            lines.append(f"{label} " + " ".join(values))
        (root / "labels/train" / (os.path.splitext(name)[0] + ".txt")).write_text(
            "\n".join(lines) + "\n")
    # train and val name the same images, as coco128.yaml does
    (root / "data.yaml").write_text(yaml.safe_dump(
        {"path": ".", "train": "images/train", "val": "images/train",
         "names": list(dataset.class_names)}))
    return root / "data.yaml", overshoot


@pytest.fixture(scope="module")
def coco128_yolo(shared_data_module, tmp_path_factory):
    ann, images = _coco128(shared_data_module)
    coco = COCODataset(ann, images)
    root = tmp_path_factory.mktemp("coco128_yolo")
    path, overshoot = _write_yolo_6_decimals(coco, root)
    return coco, path, overshoot


@pytest.fixture(scope="module")
def shared_data_module():
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


def test_yolo_6_decimal_rounding_is_not_box_clipped(coco128_yolo):
    coco, path, overshoot = coco128_yolo
    # the printed labels do reach past the border (old code: box_clipped for each of them),
    # but by less than 6-decimal rounding explains: 0.75e-6 of the side at most
    assert 0 < overshoot <= 0.75e-6 * 640 + 1e-9
    ds = YOLODataset(path)
    assert dict(ds.problems) == {}
    assert len(ds) == len(coco)
    for mine, ref in zip(ds.records, coco.records):  # still clipped into the image
        h, w = mine["original_size"]
        assert (mine["boxes"] >= 0).all() and (mine["boxes"][:, [0, 2]] <= w).all()
        assert (mine["boxes"][:, [1, 3]] <= h).all()
        np.testing.assert_allclose(mine["boxes"], ref["boxes"][ref["iscrowd"] == 0], atol=1e-3)


def test_yolo_real_overshoot_still_counted_and_warned_once(coco128_yolo, tmp_path, caplog,
                                                           capsys):
    coco, path, _ = coco128_yolo
    root = tmp_path / "yolo"
    (root / "labels/train").mkdir(parents=True)
    os.symlink(path.parent / "images", root / "images")
    for label in (path.parent / "labels/train").iterdir():
        (root / "labels/train" / label.name).write_text(label.read_text())
    (root / "data.yaml").write_text(path.read_text())
    first = sorted((root / "labels/train").iterdir())[0]
    # one box 0.1% of the width past the right border: a real fault, not rounding
    first.write_text(first.read_text() + "0 0.951000 0.500000 0.100000 0.100000\n")
    assert YOLODataset(root / "data.yaml").problems == {"box_clipped": 1}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdet.data"):
        assert cli.main(["datasets", "inspect", "--format", "yolo",
                         "--train-data", str(root / "data.yaml")]) == 0
    assert "box_clipped: 1 " in capsys.readouterr().out
    assert [r.getMessage().count("box_clipped") for r in caplog.records] == [1]


def test_sanitize_boxes_tolerance():
    from kdet.data.yolo import ROUNDING_TOLERANCE

    boxes = [[0, 0, 640.0004, 10], [0, 0, 640.01, 10], [-0.0004, 5, 20, 10]]
    log = ProblemLog("raise")
    tolerance = ROUNDING_TOLERANCE * np.array([640, 480, 640, 480])
    clipped, keep = sanitize_boxes(boxes, 480, 640, log, str, tolerance=tolerance)
    assert keep.all() and log.counts == {"box_clipped": 1}  # only the 0.01 px one
    np.testing.assert_allclose(clipped, [[0, 0, 640, 10], [0, 0, 640, 10], [0, 5, 20, 10]])
    log = ProblemLog("raise")
    sanitize_boxes(boxes, 480, 640, log, str)  # no tolerance: every overshoot counts
    assert log.counts == {"box_clipped": 3}
