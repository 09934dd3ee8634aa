"""R-CNN: the warp against a written-out bilinear crop and torchvision ``roi_align``, the loss
against the numpy multi-task formula (R-CNN box parametrisation), post-processing (per-class
NMS 0.3) against torchvision, and the Keras model contract."""
import numpy as np
import pytest

import inspect

from conftest import HAVE_TORCHVISION

from keras import ops

import kdet
from kdet.models.rcnn import grow_for_context, warp_proposals
from test_fast_rcnn import (BIG, NUM_PROPOSALS, SIZE, check_fit, check_loss_against_numpy,
                            check_postprocess_against_torchvision, check_predict_and_roundtrip,
                            check_predict_images, slow_on_jax, tiny_backbone)

CROP = 32


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def np_warp(image, box, size):
    """Bilinear crop written out: output pixel (i, j) reads the image at the centre of its
    cell of the box, (x1 + (j + 0.5) w / S - 0.5, ...) in pixel-index coordinates, clamped
    to the border."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = box
    ys = y1 + (np.arange(size) + 0.5) * (y2 - y1) / size - 0.5
    xs = x1 + (np.arange(size) + 0.5) * (x2 - x1) / size - 0.5
    out = np.zeros((size, size, image.shape[2]))
    for i, y in enumerate(np.clip(ys, 0, height - 1)):
        for j, x in enumerate(np.clip(xs, 0, width - 1)):
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1_, x1_ = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            ly, lx = y - y0, x - x0
            out[i, j] = ((1 - ly) * (1 - lx) * image[y0, x0] + (1 - ly) * lx * image[y0, x1_]
                         + ly * (1 - lx) * image[y1_, x0] + ly * lx * image[y1_, x1_])
    return out


def test_warp_is_a_bilinear_crop():
    rng = np.random.default_rng(0)
    image = rng.uniform(-2, 2, (1, 40, 48, 3)).astype("float32")
    boxes = np.array([[[8, 4, 40, 36],           # integer box of the crop's size: a plain copy
                       [3.3, 5.1, 20.7, 39.2],   # anisotropic stretch
                       [10, 10, 12, 11],         # tiny box: upsampling
                       [10, 10, 10, 10]]], "float32")  # degenerate: one pixel repeated
    crops = _np(warp_proposals(image, boxes, 32))
    assert crops.shape == (1, 4, 32, 32, 3)
    # atol: on TF, roi_align's crop-and-resize route places samples a few float32 ulps
    # from the pixel centres (kdet.ops.roi_align); on values in [-2, 2] that is <= ~2e-5
    np.testing.assert_allclose(crops[0, 0], image[0, 4:36, 8:40], atol=3e-5)
    for k in range(1, 4):
        np.testing.assert_allclose(crops[0, k], np_warp(image[0], boxes[0, k], 32), atol=1e-4)


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_warp_matches_torchvision_roi_align_with_context():
    import torch
    from torchvision.ops import roi_align

    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (2, 48, 40, 3)).astype("float32")
    boxes = np.array([[[2, 3, 30, 20], [0, 0, 40, 48]], [[5, 5, 15, 40], [-4, 30, 44, 52]]],
                     "float32")
    crops = _np(warp_proposals(image, boxes, 16, context_padding=2))
    grown = boxes.copy()
    factor = 16 / (16 - 4)  # the box covers the central 12 of 16 pixels
    centre, half = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]) / 2
    grown[..., :2], grown[..., 2:] = centre - half * factor, centre + half * factor
    np.testing.assert_allclose(_np(grow_for_context(boxes, 16, 2)), grown, rtol=1e-6)
    rois = torch.cat([torch.cat([torch.full((2, 1), float(b)), torch.from_numpy(grown[b])], 1)
                      for b in range(2)])
    expected = roi_align(torch.from_numpy(image).permute(0, 3, 1, 2), rois, (16, 16),
                         spatial_scale=1.0, sampling_ratio=1, aligned=True)
    np.testing.assert_allclose(crops.reshape(4, 16, 16, 3),
                               expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def small_rcnn(**kwargs):
    settings = dict(num_classes=3, backbone="mobilenet_v2", image_size=SIZE,
                    num_proposals=NUM_PROPOSALS, crop_size=CROP, context_padding=4, seed=0)
    settings.update(kwargs)
    return kdet.models.RCNN(**settings)


@pytest.fixture(scope="module")
def exact_model():
    model = small_rcnn(box_batch_size_per_image=BIG, box_score_thresh=0.0)
    kernel = model.heads.box_predictor.cls_score.kernel
    kernel.assign(kernel * 20.0)
    return model


@slow_on_jax
def test_defaults_are_the_papers(exact_model):
    defaults = inspect.signature(kdet.models.RCNN).parameters
    assert defaults["box_batch_size_per_image"].default == 64
    assert defaults["box_positive_fraction"].default == 0.25
    assert defaults["box_bg_iou_low"].default == 0.0  # fine-tuning: bg is everything below 0.5
    assert defaults["box_nms_thresh"].default == 0.3
    assert defaults["crop_size"].default == 224 and defaults["context_padding"].default == 16
    assert exact_model.heads.nms_threshold == 0.3
    assert exact_model.heads.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="context_padding"):
        small_rcnn(context_padding=16)
    with pytest.raises(ValueError, match="crop_size"):
        small_rcnn(crop_size=40)


@slow_on_jax
def test_loss_matches_numpy_formula(exact_model):
    check_loss_against_numpy(exact_model, np.random.default_rng(1), (0.0, 0.5),
                             (1.0, 1.0, 1.0, 1.0))


@slow_on_jax
@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_postprocess_matches_torchvision(exact_model):
    check_postprocess_against_torchvision(exact_model, np.random.default_rng(2),
                                          (1.0, 1.0, 1.0, 1.0))


@slow_on_jax
def test_fit_on_tf_data(rng):
    check_fit(small_rcnn(backbone=tiny_backbone(CROP, 5)), rng)


@slow_on_jax
def test_predict_and_keras_roundtrip(exact_model, rng, tmp_path):
    check_predict_and_roundtrip(exact_model, rng, tmp_path, "rcnn")


@slow_on_jax
def test_predict_images_maps_boxes_back(exact_model, rng):
    check_predict_images(exact_model, rng)


@pytest.mark.slow
def test_rcnn_family_example_smoke(tmp_path, shared_data):
    """examples/rcnn_family.py trains and evaluates all three models (~2-3 min on 2 cores)."""
    import os
    import pathlib
    import re
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "rcnn_family.py"
    result = subprocess.run(
        [sys.executable, str(script), "--data", str(shared_data / "pennfudan"), "--steps", "2",
         "--val-images", "4", "--image-size", "128", "--proposals", "40", "--crop-size", "32"],
        cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
        text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("rcnn", "fast_rcnn", "faster_rcnn"):
        assert re.search(rf"\| {name} \| [\d.]+ \| [\d.]+ \| [\d.]+ \([\d.]+\) "
                         rf"\| [\d.]+ \([\d.]+\) \|", result.stdout)


@pytest.mark.slow
@pytest.mark.skipif(__import__("keras").backend.backend() != "tensorflow",
                    reason="jit_compile on the TF backend (JAX fit always compiles)")
def test_fit_jit_compile_tensorflow(rng):
    import keras

    from test_fast_rcnn import random_batch

    images, proposals, y = random_batch(rng)
    model = small_rcnn(backbone=tiny_backbone(CROP, 5))
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=True)
    history = model.fit({"images": images, "proposals": proposals}, y, batch_size=2, epochs=2,
                        verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
