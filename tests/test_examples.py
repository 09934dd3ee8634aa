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
