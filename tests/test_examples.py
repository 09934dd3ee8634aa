"""The building-blocks example builds a working detector (its graph, loss and decoding)."""
import pathlib
import runpy

import numpy as np

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
