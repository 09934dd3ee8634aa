"""The ``kdet`` command line: help, config files, inspect, eval, predict, export/convert wiring.

Evaluation and drawing are checked with a duck-typed "oracle" detector (known
boxes, no network) against pycocotools and plain numpy references; the
end-to-end run with a real EfficientDet is marked slow (its first training
step traces for minutes on this CPU).
"""
import collections
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from kdet import cli
from kdet.workflow import config as wconfig

COMMANDS = [["train"], ["eval"], ["predict"], ["export"], ["bench"], ["convert"],
            ["datasets", "inspect"]]


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---- help and settings --------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_of_every_command_lists_its_flags_and_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command + ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--config FILE" in out
    name = "inspect" if command[0] == "datasets" else command[0]
    for option in wconfig.options_for(name):
        if option.name != "inputs":
            assert option.flag in out, option.flag


def test_top_level_help_and_console_script():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    # the installed console script (or python -m kdet.cli) answers without importing TF
    result = subprocess.run([sys.executable, "-c", "import sys; from kdet.cli import main; "
                             "code = main(['--help']) if False else None; "
                             "import kdet.cli; print('tensorflow' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False"
    result = subprocess.run([sys.executable, "-m", "kdet.cli", "datasets", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "inspect" in result.stdout


def test_a_fresh_process_can_load_kdet_models():
    """kdet imports lazily: loading a .keras file must register kdet's classes first."""
    code = ("import keras; from kdet.workflow.models import register_kdet_objects; "
            "print(keras.saving.get_registered_object('kdet>EfficientDet') is None); "
            "register_kdet_objects(); "
            "print(keras.saving.get_registered_object('kdet>EfficientDet') is None, "
            "keras.saving.get_registered_object('kdet>RetinaNet') is None)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600)
    assert result.stdout.split() == ["True", "False", "False"], result.stderr[-2000:]


def test_no_command_prints_help_and_fails(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2


def test_config_file_keys_are_flags_and_flags_win(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("format: shapes\nepochs: 7\nbatch-size: 2\naugment: [flip]\n"
                    "score_threshold: 0.5\n")  # an eval key: ignored by train
    command, settings, where = cli.parse(["train", "--config", str(path), "--epochs", "3",
                                          "--scale-range", "0.5,1.5", "--resume", "false"])
    assert command == "train" and where == str(path)
    resolved = wconfig.resolve(command, file_config=settings, config_path=where)
    assert resolved["epochs"] == 3 and resolved["batch_size"] == 2
    assert resolved["augment"] == ["flip"] and resolved["scale_range"] == (0.5, 1.5)
    assert resolved["resume"] is False and resolved["seed"] == 0
    assert "score_threshold" not in resolved
    json_path = tmp_path / "eval.json"
    json_path.write_text(json.dumps({"format": "coco", "score_threshold": 0.4}))
    command, settings, where = cli.parse(["eval", "--config", str(json_path)])
    assert wconfig.resolve(command, settings, config_path=where)["score_threshold"] == 0.4


def test_bad_settings_give_clear_errors(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("format: shapes\nbatchsize: 4\n")
    code, _, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2 and "unknown setting 'batchsize'" in err and "batch_size" in err
    with pytest.raises(ValueError, match="epochs='many'"):
        wconfig.resolve("train", {"epochs": "many"})
    with pytest.raises(ValueError, match="augment: unknown"):
        wconfig.resolve("train", {"augment": "flip,mosaic"})
    code, _, err = run_cli(["train", "--format", "pascal"], capsys)
    assert code == 2 and "pascal" in err
    path.write_text("[1, 2]")
    code, _, err = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2 and "mapping" in err


# ---- datasets inspect ---------------------------------------------------------------------------
def test_inspect_coco128_counts_match_the_json(shared_data, capsys):
    root = shared_data / "coco128"
    ann = root / "annotations" / "instances_train2017.json"
    code, out, _ = run_cli(["datasets", "inspect", "--format", "coco", "--train-data", str(ann),
                            "--train-images", str(root / "train2017"), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    raw = json.loads(ann.read_text())
    names = {c["id"]: c["name"] for c in raw["categories"]}
    counts = collections.Counter(names[a["category_id"]] for a in raw["annotations"])
    assert report["num_images"] == len(raw["images"]) == 128
    assert report["num_objects"] == len(raw["annotations"])
    assert report["num_crowd"] == sum(a["iscrowd"] for a in raw["annotations"])
    assert report["class_histogram"] == {names[i]: counts.get(names[i], 0) for i in sorted(names)}
    annotated = {a["image_id"] for a in raw["annotations"]}
    assert report["num_negative_images"] == len([i for i in raw["images"]
                                                 if i["id"] not in annotated])
    code, text, _ = run_cli(["datasets", "inspect", "--format", "coco", "--train-data", str(ann),
                             "--train-images", str(root / "train2017")], capsys)
    assert "class histogram:" in text and "person" in text and "problems found:     none" in text


def test_inspect_bad_voc_reports_problems(shared_data, capsys):
    root = shared_data / "bad"
    code, out, _ = run_cli(["datasets", "inspect", "--format", "voc", "--train-data", str(root),
                            "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    names = [obj.find("name").text for xml in sorted((root / "annotations").glob("*.xml"))
             for obj in ET.parse(xml).getroot().iter("object")]
    assert report["num_images"] == 5 and report["num_objects"] == len(names)
    assert report["class_histogram"] == dict(sorted(collections.Counter(names).items()))
    assert report["problems"] == {"size_from_image": 5}  # every XML says 0x0 (README)
    code, text, _ = run_cli(["datasets", "inspect", "--format", "voc", "--train-data",
                             str(root)], capsys)
    assert "size_from_image: 5" in text and "size read from the file" in text


def test_inspect_shapes_and_missing_split(capsys):
    from kdet.data import ShapesDataset

    code, out, _ = run_cli(["datasets", "inspect", "--format", "shapes", "--num-images", "12",
                            "--image-size", "96", "--seed", "4", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    reference = ShapesDataset(12, image_size=96, seed=4)
    labels = np.concatenate([r["labels"] for r in reference.records])
    assert report["num_objects"] == len(labels)
    assert list(report["class_histogram"].values()) == np.bincount(labels, minlength=3).tolist()
    assert report["image_size_hw"] == {"min": [96, 96], "max": [96, 96]}
    code, _, err = run_cli(["datasets", "inspect", "--format", "shapes", "--split", "val",
                            "--val-num-images", "0"], capsys)
    assert code == 2 and "no val data" in err


# ---- an oracle detector for eval/predict --------------------------------------------------------
class OracleDetector:
    """Duck-typed detector with known outputs: for the i-th image it is shown it returns
    that record's ground-truth boxes (in network pixels) jittered, one label swapped and a
    false alarm, with random scores. Evaluation batches come in dataset order, so the
    i-th image is ``records[i]``."""

    def __init__(self, dataset, image_size, seed=0, max_detections=10):
        self.dataset = dataset
        self.image_size = (image_size, image_size)
        self.num_classes = dataset.num_classes
        self.rng = np.random.default_rng(seed)
        self.max_detections = max_detections
        self.seen = 0
        self.outputs = []  # (record index, boxes in network px, labels, scores)

    def _detect(self, record, scale):
        gt = record["boxes"].astype(np.float64) * scale
        boxes = gt + self.rng.normal(0, 1.5, gt.shape)
        labels = record["labels"].astype(np.int64).copy()
        if len(labels) > 1:
            labels[0] = (labels[0] + 1) % self.num_classes
        side = self.image_size[0]
        fp = np.array([[side * 0.05, side * 0.05, side * 0.2, side * 0.25]])
        boxes = np.concatenate([boxes, fp])
        labels = np.concatenate([labels, [int(self.rng.integers(self.num_classes))]])
        scores = self.rng.uniform(0.3, 1.0, len(labels))
        return boxes, labels, scores

    def _pad(self, boxes, labels, scores):
        d = self.max_detections
        out = {"boxes": np.zeros((d, 4), np.float32), "scores": np.zeros(d, np.float32),
               "labels": np.full(d, -1, np.int32), "num_detections": np.int32(len(labels))}
        out["boxes"][:len(boxes)] = boxes
        out["scores"][:len(scores)] = scores
        out["labels"][:len(labels)] = labels
        return out

    def predict_on_batch(self, images):
        rows = []
        for _ in range(len(images)):
            record = self.dataset.records[self.seen]
            scale = self.image_size[0] / max(record["original_size"])
            boxes, labels, scores = self._detect(record, scale)
            self.outputs.append((self.seen, boxes, labels, scores))
            rows.append(self._pad(boxes, labels, scores))
            self.seen += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def predict_images(self, images, batch_size=8):
        rows = []
        for image in images:
            h, w = image.shape[:2]
            boxes = np.array([[w * 0.25, h * 0.3, w * 0.75, h * 0.8]])
            rows.append(self._pad(boxes, np.array([1]), np.array([0.9])))
            self.outputs.append((None, boxes, np.array([1]), np.array([0.9])))
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _pycocotools_stats(ground_truth, detections):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = json.loads(json.dumps(ground_truth))
    gt.createIndex()
    dt = gt.loadRes(detections)
    evaluation = COCOeval(gt, dt, "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation


def test_eval_matches_pycocotools_on_the_same_detections(tmp_path, capsys, monkeypatch):
    from kdet.data import ShapesDataset
    from kdet.workflow import models

    dataset = ShapesDataset(10, image_size=160, seed=1000004)  # = the CLI's val set, seed 1
    oracle = OracleDetector(dataset, image_size=128, seed=3)
    monkeypatch.setattr(models, "load_model", lambda name, weights=None: oracle)
    out = tmp_path / "eval"
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,learning_rate,val_AP\n1,2.0,0.1,\n2,1.5,0.08,0.2\n"
                       "3,1.2,0.05,0.3\n")
    code, stdout, _ = run_cli(["eval", "--model", "oracle", "--format", "shapes", "--seed", "1",
                               "--val-num-images", "10", "--image-size", "160",
                               "--batch-size", "4", "--output-dir", str(out), "--verbose", "0",
                               "--csv-log", str(history),
                               "--detections-out", str(out / "dets.json")], capsys)
    assert code == 0
    assert oracle.seen == 10

    # the reference: the oracle's own boxes mapped back by an independently computed scale
    detections = []
    for index, boxes, labels, scores in oracle.outputs:
        record = dataset.records[index]
        scale = 128 / max(record["original_size"])  # 160 px images -> 0.8
        for box, label, score in zip(boxes / scale, labels, scores):
            detections.append({"image_id": record["image_id"], "category_id": int(label) + 1,
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                               "score": float(score)})
    reference = _pycocotools_stats(dataset.coco_ground_truth(), detections)
    results = json.loads((out / "eval_results.json").read_text())
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
             "ARl")
    np.testing.assert_allclose([results["stats"][n] for n in names], reference.stats,
                               atol=1e-12)
    assert 0.2 < results["stats"]["AP50"] < 1.0  # a non-trivial case
    assert f"] = {reference.stats[0]:0.3f}" in stdout.splitlines()[0]
    assert f"AP={reference.stats[0]:.4f}" in stdout
    written = json.loads((out / "dets.json").read_text())
    assert len(written) == len(detections)

    # PNGs: decodable, sensible sizes
    for name in ("pr_curves.png", "confusion_matrix.png", "training_curves.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) >= 300

    # the confusion matrix equals a plain-loop reference on the same boxes
    matrix = np.array(json.loads((out / "confusion_matrix.json").read_text())["matrix"])
    gt = [(r["boxes"], r["labels"]) for r in dataset.records]
    det = [(boxes / (128 / max(dataset.records[i]["original_size"])), labels, scores)
           for i, boxes, labels, scores in oracle.outputs]
    np.testing.assert_array_equal(matrix, _reference_confusion(gt, det, 3, 0.5, 0.25))
    assert matrix.sum(axis=1)[:3].tolist() == np.bincount(
        np.concatenate([r["labels"] for r in dataset.records]), minlength=3).tolist()


def test_eval_needs_validation_data(capsys, monkeypatch):
    from kdet.workflow import models

    import types

    fake = types.SimpleNamespace(image_size=(64, 64), num_classes=3)
    monkeypatch.setattr(models, "load_model", lambda name, weights=None: fake)
    code, _, err = run_cli(["eval", "--model", "x.keras", "--format", "coco"], capsys)
    assert code == 2 and "needs validation data" in err and "--val-data" in err


# ---- confusion matrix and PR curves against independent references ------------------------------
def _iou_pair(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_confusion(ground_truth, detections, num_classes, iou_thr, score_thr):
    """Plain loops: repeatedly take the highest-IoU unused (gt, det) pair >= iou_thr."""
    matrix = np.zeros((num_classes + 1, num_classes + 1), int)
    for (gt_boxes, gt_labels, *crowd), (boxes, labels, scores) in zip(ground_truth, detections):
        crowd = list(crowd[0]) if crowd else [0] * len(gt_labels)
        gts = [(list(b), int(l)) for b, l, c in zip(gt_boxes, gt_labels, crowd) if not c]
        crowds = [list(b) for b, c in zip(gt_boxes, crowd) if c]
        dets = [(list(b), int(l)) for b, l, s in zip(boxes, labels, scores)
                if s >= score_thr and l >= 0]
        free_g, free_d = set(range(len(gts))), set(range(len(dets)))
        while True:
            best = None
            for g in sorted(free_g):
                for d in sorted(free_d):
                    iou = _iou_pair(gts[g][0], dets[d][0])
                    if iou >= iou_thr and (best is None or iou > best[0]):
                        best = (iou, g, d)
            if best is None:
                break
            _, g, d = best
            matrix[gts[g][1], dets[d][1]] += 1
            free_g.discard(g)
            free_d.discard(d)
        for g in free_g:
            matrix[gts[g][1], num_classes] += 1
        for d in free_d:
            if not any(_iou_pair(c, dets[d][0]) >= iou_thr for c in crowds):
                matrix[num_classes, dets[d][1]] += 1
    return matrix


def _random_boxes(rng, n, size=100):
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(3, size * 0.4, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def test_confusion_matrix_matches_plain_loop_reference(rng):
    from kdet.workflow.evaluation import confusion_matrix

    for trial in range(30):
        ground_truth, detections = [], []
        for _ in range(int(rng.integers(1, 4))):
            g = int(rng.integers(0, 6))
            gt_boxes = _random_boxes(rng, g)
            gt_labels = rng.integers(0, 4, g)
            crowd = (rng.uniform(size=g) < 0.15).astype(int)
            # detections near the GT (so matches happen) plus random ones
            near = gt_boxes + rng.normal(0, 4, gt_boxes.shape) if g else np.zeros((0, 4))
            near[:, 2:] = np.maximum(near[:, 2:], near[:, :2] + 1)
            boxes = np.concatenate([near, _random_boxes(rng, int(rng.integers(0, 4)))])
            labels = np.where(rng.uniform(size=len(boxes)) < 0.7,
                              np.concatenate([gt_labels, rng.integers(0, 4, len(boxes) - g)]),
                              rng.integers(0, 4, len(boxes)))
            scores = rng.uniform(0, 1, len(boxes))
            ground_truth.append((gt_boxes, gt_labels, crowd))
            detections.append((boxes, labels, scores))
        got = confusion_matrix(ground_truth, detections, 4, iou_threshold=0.4,
                               score_threshold=0.3)
        np.testing.assert_array_equal(got, _reference_confusion(ground_truth, detections, 4,
                                                                0.4, 0.3), err_msg=str(trial))


def test_confusion_matrix_rejects_bad_labels():
    from kdet.workflow.evaluation import confusion_matrix

    with pytest.raises(ValueError, match="label outside"):
        confusion_matrix([(np.array([[0, 0, 5, 5]]), np.array([3]))],
                         [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))], num_classes=3)


def test_pr_curves_are_pycocotools_precision_at_iou_50_all_100(rng, tmp_path):
    from kdet.metrics import COCOEvaluator
    from kdet.visualize import plot_precision_recall, precision_recall_curves

    images = [{"id": i, "width": 100, "height": 100} for i in range(1, 6)]
    categories = [{"id": c, "name": f"c{c}"} for c in (1, 2, 5)]
    annotations, detections = [], []
    for image in images:
        for box in _random_boxes(rng, 4):
            cat = int(rng.choice([1, 2]))  # class 5 has no ground truth: -1 curve
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"],
                                "category_id": cat, "iscrowd": 0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": float((box[2] - box[0]) * (box[3] - box[1]))})
            jitter = box + rng.normal(0, 6, 4)
            jitter[2:] = np.maximum(jitter[2:], jitter[:2] + 1)
            detections.append({"image_id": image["id"], "category_id": cat,
                               "score": float(rng.uniform()),
                               "bbox": [jitter[0], jitter[1], jitter[2] - jitter[0],
                                        jitter[3] - jitter[1]]})
    ground_truth = {"images": images, "annotations": annotations, "categories": categories}
    evaluator = COCOEvaluator(ground_truth)
    evaluator.add_detections(detections)
    evaluator.evaluate()
    reference = _pycocotools_stats(ground_truth, detections).eval["precision"][0, :, :, 0, 2]
    curves = precision_recall_curves(evaluator.precision)
    np.testing.assert_allclose(curves, reference.T, atol=1e-12)
    assert (curves[2] == -1).all() and (curves[:2] >= 0).any()
    path = plot_precision_recall(evaluator.precision, ["a", "b", "c"], tmp_path / "pr.png")
    with Image.open(path) as image:
        assert image.format == "PNG"


# ---- predict ------------------------------------------------------------------------------------
def test_predict_draws_boxes_on_a_same_size_png(tmp_path, capsys, monkeypatch):
    from kdet.data import ShapesDataset
    from kdet.workflow import models

    image = ShapesDataset(1, image_size=120, seed=2).load_image(0)
    image = np.ascontiguousarray(image[:, :100])  # 120 x 100, not square
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(image).save(source / "scene.png")
    oracle = OracleDetector(ShapesDataset(1, image_size=120), image_size=64)
    monkeypatch.setattr(models, "load_model", lambda name, weights=None: oracle)
    out = tmp_path / "out"
    code, _, _ = run_cli(["predict", "--model", "oracle.keras", str(source), "--output-dir",
                          str(out), "--class-names", "circle,square,triangle",
                          "--score-threshold", "0.5", "--verbose", "0"], capsys)
    assert code == 0
    with Image.open(out / "scene.png") as drawn_file:
        assert drawn_file.size == (100, 120)
        drawn = np.asarray(drawn_file.convert("RGB"))
    x1, y1, x2, y2 = (int(round(v)) for v in oracle.outputs[0][1][0])  # 25, 36, 75, 96
    changed = np.any(drawn != image, axis=-1)
    assert changed[(y1 + y2) // 2, x1] and changed[(y1 + y2) // 2, x2]  # left/right edges
    assert changed[y2, (x1 + x2) // 2]  # bottom edge
    assert not changed[y2 + 5:, :].any() and not changed[:, :x1 - 3].any()  # far away: untouched
    assert not changed[y1 + 5:y2 - 5, x1 + 5:x2 - 5].any()  # inside the box: untouched
    record = json.loads((out / "predictions.json").read_text())["images"][0]
    assert record["detections"][0]["name"] == "square"


def test_draw_detections_masks_and_keypoints():
    from kdet.visualize import draw_detections

    image = np.full((50, 60, 3), 100, np.uint8)
    masks = np.zeros((1, 50, 60))
    masks[0, 10:20, 10:30] = 1
    keypoints = np.array([[[45.0, 40.0, 2.0], [5.0, 45.0, 0.0]]])
    drawn = draw_detections(image, [[8, 8, 32, 22]], [0], masks=masks, keypoints=keypoints,
                            line_width=1)
    assert (drawn[15, 20] != 100).any()  # inside the mask: tinted
    assert (drawn[40, 45] != 100).any()  # visible keypoint drawn
    assert (drawn[45, 5] == 100).all()  # invisible keypoint not drawn
    with pytest.raises(ValueError, match="masks"):
        draw_detections(image, [[0, 0, 5, 5]], [0], masks=np.zeros((1, 10, 10)))


def test_training_curves_png(tmp_path):
    from kdet.visualize import plot_training_curves

    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,learning_rate,val_AP,val_AP50\n1,3,0.1,,\n2,2,0.05,0.1,0.3\n")
    with Image.open(plot_training_curves(str(path), tmp_path / "curves.png")) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]
    (tmp_path / "empty.csv").write_text("epoch,loss\n")
    with pytest.raises(ValueError, match="no rows"):
        plot_training_curves(str(tmp_path / "empty.csv"), tmp_path / "x.png")


# ---- export / convert / bench wiring ------------------------------------------------------------
def test_export_passes_settings_to_kdet_export(tmp_path, capsys, monkeypatch):
    import kdet.export
    from kdet.workflow import models

    model_path = tmp_path / "run" / "best.keras"
    model_path.parent.mkdir()
    (model_path.parent / "labels.txt").write_text("a\nb\n")
    sentinel = object()
    monkeypatch.setattr(models, "load_model", lambda name, weights=None: sentinel)
    calls = []

    def fake_export(model, path, **kwargs):
        calls.append((model, path, kwargs))
        return path

    monkeypatch.setattr(kdet.export, "export", fake_export)
    code, out, _ = run_cli(["export", "--model", str(model_path), "--output",
                            str(tmp_path / "m.tflite"), "--quantization", "fp16",
                            "--input-dtype", "uint8"], capsys)
    assert code == 0 and "exported:" in out
    model, path, kwargs = calls[0]
    assert model is sentinel and path == str(tmp_path / "m.tflite")
    assert kwargs["format"] is None and kwargs["quantization"] == "fp16"
    assert kwargs["input_dtype"] == "uint8" and kwargs["batch_size"] == 1
    assert kwargs["labels"] == str(model_path.parent / "labels.txt")
    code, _, err = run_cli(["export", "--model", str(model_path)], capsys)
    assert code == 2 and "--output" in err
    code, _, err = run_cli(["export", "--model", str(model_path), "--output", "x.tflite",
                            "--quantization", "int8"], capsys)
    assert code == 2 and "calibrat" in err


def test_convert_builds_converts_and_saves_atomically(tmp_path, capsys, monkeypatch):
    import keras

    import kdet.converters

    checkpoint = tmp_path / "d0.pth"
    checkpoint.write_bytes(b"not read by the fake converter")
    seen = {}

    def build(name, **kwargs):
        seen["build"] = (name, kwargs)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])

    def convert(source, model, strict=True):
        seen["convert"] = (source, strict)
        model.set_weights([np.ones_like(w) for w in model.get_weights()])
        return model

    monkeypatch.setattr(kdet.converters, "build_effdet", build)
    monkeypatch.setattr(kdet.converters, "convert_effdet", convert)
    output = tmp_path / "d0.keras"
    code, out, _ = run_cli(["convert", "--source", "effdet", "--arch", "tf_efficientdet_d0",
                            "--checkpoint", str(checkpoint), "--output", str(output),
                            "--num-classes", "3", "--strict", "false"], capsys)
    assert code == 0 and "converted:" in out
    assert seen["build"] == ("tf_efficientdet_d0", {"num_classes": 3})
    assert seen["convert"] == (str(checkpoint), False)
    loaded = keras.saving.load_model(str(output))
    assert all((w == 1).all() for w in loaded.get_weights())
    code, _, err = run_cli(["convert", "--source", "effdet"], capsys)
    assert code == 2 and "--arch" in err and "--checkpoint" in err


def test_bench_prints_a_table(capsys):
    import keras

    from kdet.workflow.benchmark import benchmark

    @keras.saving.register_keras_serializable(package="kdet_tests")
    class BenchToy(keras.Model):
        def __init__(self, **kwargs):
            inputs = keras.Input((32, 32, 3))
            x = keras.layers.GlobalAveragePooling2D()(inputs)
            super().__init__(inputs, keras.layers.Dense(4)(x), **kwargs)
            self.image_size = (32, 32)
            self.num_classes = 2

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return keras.ops.mean((y_pred - y["boxes"][:, 0]) ** 2)

    row = benchmark({"batch_size": 2, "bench_steps": 2, "warmup": 1, "verbose": 0},
                    model=BenchToy())
    out = capsys.readouterr().out
    assert row["predict_images_per_s"] > 0 and row["train_images_per_s"] > 0
    assert "predict img/s" in out and "train img/s" in out and row["image_size"] == 32


# ---- end to end with a real detector ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """kdet train on tiny shapes with EfficientDet-D0 at 128 px: 2 epochs x 2 steps."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    code = cli.main(["train", "--format", "shapes", "--num-images", "8", "--val-num-images", "4",
                     "--image-size", "128", "--model", "efficientdet", "--phi", "0",
                     "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4",
                     "--output-dir", str(out), "--verbose", "2", "--seed", "0"])
    assert code == 0
    return out


@pytest.mark.slow
def test_end_to_end_train_eval_predict(trained_run, tmp_path, capsys):
    import keras

    from kdet.data import ShapesDataset
    from kdet.workflow.callbacks import read_csv_log

    out = trained_run
    for name in ("best.keras", "last.keras", "history.csv", "labels.txt", "config.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "backup").exists()
    rows = read_csv_log(str(out / "history.csv"))
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["val_AP"] is not None and np.isfinite(r["loss"]) for r in rows)
    best = json.loads((out / "best.keras.json").read_text())
    assert best["best"] == max(r["val_AP"] for r in rows)

    capsys.readouterr()
    eval_dir = tmp_path / "eval"
    code, stdout, _ = run_cli(["eval", "--model", str(out / "best.keras"), "--format", "shapes",
                               "--val-num-images", "4", "--seed", "0", "--output-dir",
                               str(eval_dir), "--verbose", "0"], capsys)
    assert code == 0
    for name in ("pr_curves.png", "confusion_matrix.png", "training_curves.png"):
        assert (eval_dir / name).is_file()
    # the same model and images, predicted directly (128 px images: scale 1)
    model = keras.saving.load_model(str(out / "best.keras"), safe_mode=True)
    val = ShapesDataset(4, image_size=128, seed=1_000_003)
    images = np.stack([val.load_image(i) for i in range(4)]).astype("float32")
    raw = model.predict_on_batch(images)
    detections = []
    for b, record in enumerate(val.records):
        for i in range(int(raw["num_detections"][b])):
            x1, y1, x2, y2 = (float(v) for v in np.asarray(raw["boxes"][b, i]))
            detections.append({"image_id": record["image_id"],
                               "category_id": int(raw["labels"][b, i]) + 1,
                               "bbox": [x1, y1, x2 - x1, y2 - y1],
                               "score": float(raw["scores"][b, i])})
    reference = _pycocotools_stats(val.coco_ground_truth(), detections)
    results = json.loads((eval_dir / "eval_results.json").read_text())["stats"]
    np.testing.assert_allclose(results["AP"], reference.stats[0], atol=1e-6)
    np.testing.assert_allclose(results["AR100"], reference.stats[8], atol=1e-6)

    Image.fromarray(val.load_image(0)).save(tmp_path / "val0.png")
    code, _, _ = run_cli(["predict", "--model", str(out / "best.keras"),
                          str(tmp_path / "val0.png"), "--output-dir", str(tmp_path / "drawn"),
                          "--score-threshold", "0", "--verbose", "0"], capsys)
    assert code == 0
    with Image.open(tmp_path / "drawn" / "val0.png") as drawn:
        assert drawn.size == (128, 128)
        assert np.any(np.asarray(drawn.convert("RGB")) != val.load_image(0))


# ---- TensorFlow's start-up noise (issue #10 item 9) ---------------------------------------------
_TF_NOISE = ("oneDNN custom operations", "Unable to register", "absl::InitializeLog", "cuInit",
             "cuda", "cpu_feature_guard", "rebuild TensorFlow")


def _env_without_tf_log_level():
    import os
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _noise_lines(stderr):
    """C++ log lines (absl's ``I0000 ...`` or TF's dated format) or any line naming the usual
    start-up topics."""
    import re
    log_line = re.compile(r"[IWE]\d{4} \d\d:|\d{4}-\d\d-\d\d [\d:.]+: [IWE] ")
    return [line for line in stderr.splitlines()
            if log_line.match(line) or any(word.lower() in line.lower() for word in _TF_NOISE)]


def test_tensorflow_commands_print_no_tensorflow_startup_noise(tmp_path):
    """A command that loads TensorFlow (and queries its devices) prints only its own message."""
    result = subprocess.run(
        [sys.executable, "-m", "kdet.cli", "eval", "--model", str(tmp_path / "missing.keras")],
        capture_output=True, text=True, timeout=300, env=_env_without_tf_log_level(),
        cwd=str(tmp_path))
    assert result.returncode == 2
    assert _noise_lines(result.stderr) == [], result.stderr
    assert result.stderr.strip().splitlines() == [
        f"kdet eval: error: --model {tmp_path / 'missing.keras'}: file not found"]


def test_startup_noise_filter_keeps_what_is_not_tensorflow_logging():
    from kdet.tf_startup import is_startup_noise

    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796429631.968800    7222 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1796429634.912867    7222 cuda_platform.cc:52] failed call to cuInit: X",
        "W0000 00:00:1796429634.912867    7222 x.cc:1] anything",
        "2024-05-01 10:00:00.123456: E external/local_xla/xla/stream_executor/cuda/"
        "cuda_fft.cc:467] Unable to register cuFFT factory",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
    ]
    kept = [
        "F0000 00:00:1796429634.912867    7222 x.cc:1] Check failed: fatal stays visible",
        "Traceback (most recent call last):",
        "/a/b.py:3: UserWarning: something a user should read",
        "I0000 but not a log line",
    ]
    assert [is_startup_noise(line) for line in noise] == [True] * len(noise)
    assert [is_startup_noise(line) for line in kept] == [False] * len(kept)


def test_an_existing_tf_log_level_is_respected():
    """TF_CPP_MIN_LOG_LEVEL set by the user: left as it is and nothing captured (the helper
    does not even import TensorFlow)."""
    code = ("import os, sys; from kdet.tf_startup import import_tensorflow_quietly; "
            "import_tensorflow_quietly(); "
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], 'tensorflow' in sys.modules)")
    env = dict(_env_without_tf_log_level(), TF_CPP_MIN_LOG_LEVEL="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "False"]


@pytest.mark.slow
def test_tf_log_level_zero_shows_tensorflow_startup_lines(tmp_path):
    """The same command with TF_CPP_MIN_LOG_LEVEL=0 prints what plain TensorFlow prints."""
    env = dict(_env_without_tf_log_level(), TF_CPP_MIN_LOG_LEVEL="0")
    plain = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True,
                           text=True, timeout=300, env=env)
    if not _noise_lines(plain.stderr):
        pytest.skip("this TensorFlow prints nothing at import")
    result = subprocess.run(
        [sys.executable, "-m", "kdet.cli", "eval", "--model", str(tmp_path / "missing.keras")],
        capture_output=True, text=True, timeout=300, env=env)
    assert _noise_lines(result.stderr), result.stderr


def test_quickstart_quiets_tensorflow_before_importing_it():
    """examples/quickstart.py calls import_tensorflow_quietly after torch (which must come
    first) and before anything imports Keras/TensorFlow."""
    import ast
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    tree = ast.parse(path.read_text())
    order = []
    for node in tree.body:
        if isinstance(node, ast.Try):
            node = node.body[0]
        if isinstance(node, ast.Import):
            order += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            order.append(node.module)
        elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
              and getattr(node.value.func, "id", None) == "import_tensorflow_quietly"):
            order.append("<quiet>")
    assert "<quiet>" in order
    quiet = order.index("<quiet>")
    assert order.index("torch") < quiet < order.index("keras")
    assert not [m for m in order[:quiet] if m.split(".")[0] in ("keras", "tensorflow", "_common")]


@pytest.mark.slow
def test_quickstart_prints_no_tensorflow_startup_noise():
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    result = subprocess.run([sys.executable, str(path), "--help"], capture_output=True,
                            text=True, timeout=300, env=_env_without_tf_log_level())
    assert result.returncode == 0, result.stderr
    assert _noise_lines(result.stderr) == [], result.stderr


# ---- packaging: what kdet eval needs is installed by the README's install line ------------------
def test_matplotlib_is_a_core_dependency_for_eval_plots():
    """``pip install -e ".[jax,export]"`` (README) must bring matplotlib: kdet eval plots."""
    import pathlib
    import re
    import tomllib

    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    names = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower(): spec
             for spec in project["dependencies"]}
    assert "matplotlib" in names
    assert "<" not in names["matplotlib"] and "==" not in names["matplotlib"]  # lower bound only
