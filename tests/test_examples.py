"""The examples run: the quickstart end to end (the README's first command), the
building-blocks example builds a working detector (its graph, loss and decoding)."""
import json
import os
import pathlib
import re
import runpy
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import once_on_tensorflow

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def test_blocks_example_builds_a_trainable_detector():
    namespace = runpy.run_path(str(EXAMPLES / "blocks.py"), run_name="blocks_example")
    model, size, classes = namespace["model"], namespace["SIZE"], namespace["CLASSES"]
    images = np.zeros((2, size, size, 3), "float32")
    raw = model(images, training=False)
    num_anchors = model.anchors.shape[0]
    assert tuple(raw["cls_logits"].shape) == (2, num_anchors, classes)
    boxes = np.array([[[10, 10, 60, 60]], [[0, 0, 0, 0]]], "float32")
    labels = np.array([[1], [-1]], "int32")
    loss = model.compute_loss(y={"boxes": boxes, "labels": labels}, y_pred=raw)
    assert np.isfinite(float(np.asarray(loss)))
    out = model.decode_predictions(raw)
    assert tuple(out["boxes"].shape) == (2, 50, 4)


@once_on_tensorflow("Keras' registry of kdet's classes")
def test_kdet_load_model_in_a_fresh_process(tmp_path):
    """A .keras file loads with kdet.load_model without importing kdet.models first."""
    import subprocess
    import sys
    import textwrap
    path = tmp_path / "m.keras"
    save = textwrap.dedent(f"""
        import kdet
        kdet.models.EfficientDet(phi="lite0", num_classes=2, image_size=128).save({str(path)!r})
    """)
    load = textwrap.dedent(f"""
        import kdet
        m = kdet.load_model({str(path)!r})
        print(type(m).__name__, m.num_classes)
    """)
    subprocess.run([sys.executable, "-c", save], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, text=True)
    assert out.stdout.split()[-2:] == ["EfficientDet", "2"]


def _run_example(script, *args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _pycocotools_stats(gt_path, det_path):
    import contextlib
    import io
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(det_path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_quickstart_fast_runs_end_to_end(tmp_path):
    """``python examples/quickstart.py --fast`` from another folder: trains, prints COCO AP,
    draws, exports a .tflite and finds it agrees with the Keras model."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the README's quickstart runs on TensorFlow, the default backend. On JAX "
                    "XLA's CPU depthwise convolutions make its 10 Lite0 steps take ~10 min "
                    "(628 s: 123 s compiling, ~40 s a step); JAX's fit on kdet's tf.data "
                    "pipelines is run by tests/test_training.py")
    out = _run_example("quickstart.py", "--fast", "--out", "qs", cwd=tmp_path)
    ap = re.search(r"COCO box AP on 16 held-out images: AP ([\d.]+)  AP50 ([\d.]+)", out)
    assert ap, out
    # The printed AP is pycocotools' AP of the written detections (not a number the
    # evaluator merely agrees with itself on) ...
    stats = _pycocotools_stats(tmp_path / "qs" / "val_ground_truth.json",
                               tmp_path / "qs" / "val_detections.json")
    assert abs(float(ap[1]) - stats[0]) <= 5e-4 and abs(float(ap[2]) - stats[1]) <= 5e-4, \
        (ap.group(0), stats[:2])
    # ... and the written detections are the model's: 16 images x up to 100 each, scored.
    detections = json.loads((tmp_path / "qs" / "val_detections.json").read_text())
    assert 16 <= len(detections) <= 1600
    assert {d["image_id"] for d in detections} <= {
        im["id"] for im in json.loads((tmp_path / "qs" / "val_ground_truth.json").read_text())[
            "images"]}
    assert (tmp_path / "qs" / "predictions.png").stat().st_size > 10_000
    assert (tmp_path / "qs" / "shapes_lite0.tflite").stat().st_size > 1_000_000
    assert "100% found" in out and "-> they agree" in out, out


@pytest.mark.slow
def test_pennfudan_boxes_example_smoke(tmp_path, shared_data):
    out = _run_example("train_pennfudan_boxes.py", "--data", str(shared_data / "pennfudan"),
                       "--steps", "3", "--image-size", "128", "--val-images", "4",
                       "--out", "pf", cwd=tmp_path)
    assert re.search(r"COCO box AP on 4 validation images: AP [\d.]+", out), out
    assert (tmp_path / "pf" / "pennfudan_lite0.keras").stat().st_size > 0


@pytest.mark.slow
def test_pennfudan_mask_rcnn_example_smoke(tmp_path, shared_data):
    out = _run_example("finetune_pennfudan.py", "--data", str(shared_data / "pennfudan"),
                       "--steps", "3", "--image-size", "128", "--val-images", "4",
                       "--out", "pfm", cwd=tmp_path)
    assert re.search(r"COCO mask AP on 4 validation images: AP [\d.]+", out), out
    assert (tmp_path / "pfm" / "pennfudan_maskrcnn.keras").stat().st_size > 0
