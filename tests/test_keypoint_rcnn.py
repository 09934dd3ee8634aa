"""Keypoint R-CNN R50-FPN against torchvision ``keypointrcnn_resnet50_fpn``.

Same approach as tests/test_faster_rcnn.py (whose helpers are reused): a
random torchvision model is converted and both run on the same input; the
keypoint branch adds keypoint parity, ``loss_keypoint``, and the pieces
(target encoding, heatmap decoding, the head, the loss) against torchvision's own.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import HAVE_TORCHVISION, backend, once_on_tensorflow  # noqa: E402
from test_faster_rcnn import (_fit_data, _np, check_detections, detections,  # noqa: E402
                              run_torch_eval, slow_on_jax, small_model, synthetic_targets,
                              torch_images, torch_pair, torch_targets)

import keras  # noqa: E402

import kdet  # noqa: E402
import kdet.layers.keypoint_head as keypoint_head_module  # noqa: E402
from kdet import losses  # noqa: E402
from kdet.layers.keypoint_head import KeypointRCNNHead, heatmaps_to_keypoints  # noqa: E402
from kdet.matching import encode_keypoint_targets  # noqa: E402
from kdet.utils import count_params  # noqa: E402

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
NUM_KEYPOINTS = 17
SCORE_THRESH = 0.68  # of the torchvision parity tests
DETECTIONS = 20
# Detection slots of the small training / I/O models: each runs the 3.7 GMAC keypoint head.
SLOTS = 8


# ------------------------------------------------------------------ param counts
@once_on_tensorflow("the variables' shapes")
def test_param_counts_match_torchvision():
    # torchvision's num_classes=2 (background + person) is kdet's 1.
    model = kdet.models.KeypointRCNN(num_classes=1, num_keypoints=17, image_size=128)
    assert count_params(model) == 59_190_378
    frozen = kdet.models.KeypointRCNN(image_size=128, backbone_norm="frozen_batch")
    assert count_params(frozen) == 59_137_258


@once_on_tensorflow("the variables' shapes")
@needs_torchvision
def test_param_count_equals_torchvision_build():
    import torchvision
    tv = torchvision.models.detection.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, num_keypoints=5)
    model = kdet.models.KeypointRCNN(num_classes=2, num_keypoints=5, image_size=128)
    assert count_params(model) == sum(p.numel() for p in tv.parameters())


@needs_torchvision
def test_build_torchvision_and_strict_conversion_of_coco_layout():
    import torchvision
    from kdet.converters import convert_torchvision
    from kdet.converters.torchvision import architecture_of, build_torchvision

    model = build_torchvision("keypointrcnn_resnet50_fpn", image_size=128)
    assert type(model) is kdet.models.KeypointRCNN
    assert model.num_classes == 1 and model.num_keypoints == 17
    assert architecture_of(model) == "keypointrcnn_resnet50_fpn"
    assert count_params(model) == 59_137_258  # frozen BN, as the pretrained builder
    tv = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None,
                                                                weights_backbone=None)
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    convert_torchvision(state, model, strict=True)  # every entry used, every weight set
    head = model.get_layer("roi_heads").keypoint_head
    # conv i of the head is entry 2 i of torchvision's Sequential(conv, ReLU, ...)
    np.testing.assert_allclose(_np(head.convs[3].kernel),
                               state["roi_heads.keypoint_head.6.weight"].transpose(2, 3, 1, 0))
    del state["roi_heads.keypoint_predictor.kps_score_lowres.bias"]
    with pytest.raises(ValueError, match="missing"):
        convert_torchvision(state, model)


# ------------------------------------------------------------------ the pieces
def _random_rois(rng, num, limit=90.0):
    xy = rng.uniform(0, limit - 10, (num, 2))
    wh = np.concatenate([rng.uniform(0.2, 3, (num // 5, 2)),
                         rng.uniform(3, limit, (num - num // 5, 2))])
    return np.concatenate([xy, np.minimum(xy + wh, limit)], 1).astype("float32")


def _random_keypoints(rng, rois, num_keypoints):
    """Keypoints inside, outside and exactly on the edges of their RoI; some unlabelled."""
    num = len(rois)
    x0, y0, x1, y1 = (rois[:, i:i + 1] for i in range(4))
    u = rng.uniform(-0.3, 1.3, (num, num_keypoints, 2))
    x = x0 + u[..., 0] * (x1 - x0)
    y = y0 + u[..., 1] * (y1 - y0)
    edge = rng.integers(0, 6, (num, num_keypoints))
    x = np.where(edge == 0, x1, np.where(edge == 1, x0, x))
    y = np.where(edge == 2, y1, np.where(edge == 3, y0, y))
    visibility = rng.integers(0, 3, (num, num_keypoints)).astype("float32")
    return np.stack([x, y, visibility], -1).astype("float32")


@needs_torchvision
def test_keypoint_targets_match_torchvision(rng):
    import torch
    from torchvision.models.detection.roi_heads import keypoints_to_heatmap

    rois = _random_rois(rng, 200)
    keypoints = _random_keypoints(rng, rois, NUM_KEYPOINTS)
    ref_targets, ref_valid = keypoints_to_heatmap(torch.from_numpy(keypoints),
                                                  torch.from_numpy(rois), 56)
    targets, valid = encode_keypoint_targets(keypoints, rois, 56)
    ref_valid = ref_valid.numpy().astype(bool)
    np.testing.assert_array_equal(_np(valid), ref_valid)
    np.testing.assert_array_equal(_np(targets), ref_targets.numpy())
    # every case is exercised: on-edge, outside, unlabelled
    assert 0.2 < ref_valid.mean() < 0.8
    on_edge = keypoints[..., 0] == rois[:, None, 2]
    assert np.any(ref_valid & on_edge) and np.all(_np(targets)[ref_valid & on_edge] % 56 == 55)
    # A degenerate RoI (torchvision divides by zero) and NaN keypoints give no target.
    degenerate = np.array([[10, 10, 10, 30], [5, 5, 20, 20]], "float32")
    points = np.array([[[10, 20, 2]], [[np.nan, 10, 2]]], "float32")
    targets, valid = encode_keypoint_targets(points, degenerate, 56)
    assert not np.any(_np(valid)) and np.all(_np(targets) == 0)


@needs_torchvision
@pytest.mark.parametrize("chunked", [False, True])
def test_heatmaps_to_keypoints_matches_torchvision(rng, monkeypatch, chunked):
    """Bicubic resize to ceil(box size), first argmax, +0.5 cell centres, score at the argmax:
    positions exact, scores to float rounding; boxes under one pixel included."""
    import torch
    from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as reference

    if chunked:  # several boxes at a time through keras.ops.map, as for large images
        monkeypatch.setattr(keypoint_head_module, "_DECODE_BUDGET", 3 * 5 * 96 * 96)
    boxes = _random_rois(rng, 30, limit=96.0)
    maps = rng.normal(size=(30, 5, 56, 56)).astype("float32")
    ref_xy, ref_scores = reference(torch.from_numpy(maps), torch.from_numpy(boxes))
    out = _np(heatmaps_to_keypoints(maps.transpose(0, 2, 3, 1)[None], boxes[None], 96))[0]
    assert out.shape == (30, 5, 3)
    np.testing.assert_allclose(out[..., :2], ref_xy.numpy()[..., :2], atol=1e-4)
    np.testing.assert_allclose(out[..., 2], ref_scores.numpy(), atol=1e-4)


@needs_torchvision
def test_keypoint_head_matches_torchvision(rng):
    """8 conv + 4x4/s2 transposed conv (padding 1) + bilinear x2, on copied weights."""
    import torch
    from torchvision.models.detection.keypoint_rcnn import (KeypointRCNNHeads,
                                                            KeypointRCNNPredictor)
    from kdet.converters._mapping import torch_to_keras

    torch.manual_seed(0)
    tv_head, tv_predictor = KeypointRCNNHeads(6, (8, 8)), KeypointRCNNPredictor(8, 3)
    with torch.no_grad():
        tv_predictor.kps_score_lowres.bias.normal_()
    head = KeypointRCNNHead(num_keypoints=3, layers=(8, 8))
    x = rng.normal(size=(2, 3, 14, 14, 6)).astype("float32")
    head(x)
    state = {**{f"h.{k}": v for k, v in tv_head.state_dict().items()},
             **{f"p.{k}": v for k, v in tv_predictor.state_dict().items()}}
    for i, conv in enumerate(head.convs):
        conv.kernel.assign(torch_to_keras(state[f"h.{2 * i}.weight"].numpy(), conv.kernel.shape,
                                          "conv"))
        conv.bias.assign(state[f"h.{2 * i}.bias"].numpy())
    deconv = head.kps_score_lowres
    deconv.kernel.assign(torch_to_keras(state["p.kps_score_lowres.weight"].numpy(),
                                        deconv.kernel.shape, "deconv"))
    deconv.bias.assign(state["p.kps_score_lowres.bias"].numpy())
    with torch.no_grad():
        ref = tv_predictor(tv_head(torch.from_numpy(x.reshape(6, 14, 14, 6)).permute(0, 3, 1, 2)))
    out = _np(head(x))
    assert out.shape == (2, 3, 56, 56, 3)
    np.testing.assert_allclose(out.reshape(6, 56, 56, 3), ref.permute(0, 2, 3, 1).numpy(),
                               atol=1e-4)


@needs_torchvision
def test_keypoint_loss_matches_torchvision(rng):
    import torch
    from torchvision.models.detection.roi_heads import keypointrcnn_loss

    rois = _random_rois(rng, 12)
    gt = _random_keypoints(rng, rois[:4], 5)  # 4 GT, each RoI matched to one of them
    matches = rng.integers(0, 4, 12)
    logits = rng.normal(0, 3, (12, 5, 56, 56)).astype("float32")
    ref = keypointrcnn_loss(torch.from_numpy(logits), [torch.from_numpy(rois)],
                            [torch.from_numpy(gt)], [torch.from_numpy(matches).long()])
    targets, valid = encode_keypoint_targets(gt[matches], rois, 56)
    out = losses.keypoint_loss(logits.transpose(0, 2, 3, 1), targets, valid,
                               data_format="channels_last")
    np.testing.assert_allclose(float(out), float(ref), rtol=1e-5)
    # No labelled keypoint: 0, as torchvision.
    gt[..., 2] = 0
    targets, valid = encode_keypoint_targets(gt[matches], rois, 56)
    assert float(losses.keypoint_loss(logits.transpose(0, 2, 3, 1), targets, valid,
                                      data_format="channels_last")) == 0.0


# ------------------------------------------------------------------ torchvision parity
@pytest.fixture(scope="module")
def keypoint_pair():
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision not installed")
    import torch

    # 4 classes as the Faster R-CNN parity test (the keypoint branch is class-agnostic). This
    # random model's box logits are larger than Faster R-CNN's: the classifier is scaled by
    # 0.3 rather than 3 so the scores do not saturate at 1 (ties make the top 100 arbitrary),
    # and a score threshold of 0.68 keeps ~15 detections with no score within 1e-3 of it.
    # The keypoint head costs 3.7 GMAC per RoI, and kdet runs it on every (padded) slot: 20
    # detection slots and 24 keypoint-training RoIs per image (more than the positives here,
    # or loss_keypoint would differ from torchvision's, which takes all of them).
    tv, model = torch_pair("keypointrcnn_resnet50_fpn", kdet.models.KeypointRCNN, 160, 4, seed=1,
                           box_score_thresh=SCORE_THRESH, box_detections_per_img=DETECTIONS,
                           keypoint_batch_size_per_image=24)
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.mul_(0.1)
    tv.roi_heads.score_thresh = SCORE_THRESH
    tv.roi_heads.detections_per_img = DETECTIONS
    kernel = model.get_layer("roi_heads").box_predictor.cls_score.kernel
    kernel.assign(_np(kernel) * np.float32(0.1))
    return tv, model


def keypoint_targets(y, rng):
    """Keypoints for the synthetic GT boxes: inside, outside, on the edge, unlabelled."""
    boxes, labels = y["boxes"], y["labels"]
    out = np.zeros(labels.shape + (NUM_KEYPOINTS, 3), "float32")
    for b in range(len(boxes)):
        keep = labels[b] >= 0
        out[b, keep] = _random_keypoints(rng, boxes[b, keep], NUM_KEYPOINTS)
    return out


@slow_on_jax
def test_inference_with_keypoints_matches_torchvision(keypoint_pair):
    tv, model = keypoint_pair
    image = np.random.default_rng(0).uniform(0, 255, (160, 160, 3)).astype("float32")
    ref = run_torch_eval(tv, image)
    out = {k: _np(v) for k, v in model(image[None], training=False).items()}
    valid = out["proposals_valid"][0]
    proposals = out["proposals"][0][valid]
    assert len(proposals) == len(ref["proposals"]) > 100
    np.testing.assert_allclose(proposals, ref["proposals"], atol=1e-2)
    order = check_detections(ref, out)
    n = int(out["num_detections"][0])
    keypoints = out["keypoints"][0]
    assert keypoints.shape == (DETECTIONS, NUM_KEYPOINTS, 3)
    assert n < DETECTIONS  # the score threshold, not the cap, decides which boxes are kept
    assert np.all(keypoints[n:] == 0)
    mine = keypoints[order]
    # x, y: the same heatmap cell; 1e-3 px box noise moves x0 + (j + 0.5) w / ceil(w) by ~1e-3.
    xy_err = np.abs(mine[..., :2] - ref["keypoints"][..., :2]).max(-1)
    score_err = np.abs(mine[..., 2] - ref["keypoints_scores"])
    assert np.mean(xy_err < 1e-2) > 0.99, np.sort(xy_err.ravel())[-10:]
    assert np.median(score_err) < 1e-3
    same_cell = xy_err < 1e-2
    np.testing.assert_allclose(mine[..., 2][same_cell], ref["keypoints_scores"][same_cell],
                               atol=2e-2)
    # predict returns the detection dict with the keypoints.
    predicted = model.predict(image[None], verbose=0)
    assert set(predicted) == {"boxes", "scores", "labels", "num_detections", "keypoints"}
    np.testing.assert_allclose(predicted["keypoints"], out["keypoints"], atol=1e-3)


@slow_on_jax
def test_training_losses_match_torchvision(keypoint_pair):
    import torch

    tv, model = keypoint_pair
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (2, 160, 160, 3)).astype("float32")
    y = synthetic_targets(160)
    y["keypoints"] = keypoint_targets(y, rng)
    targets = torch_targets(y)
    for b, t in enumerate(targets):
        t["keypoints"] = torch.from_numpy(y["keypoints"][b][y["labels"][b] >= 0])
    tv.train()
    ref = {k: float(v.detach()) for k, v in tv(torch_images(images), targets).items()}
    tv.eval()
    terms = model.loss_terms(y, model(images, training=True))
    assert set(terms) == set(ref) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
                                      "loss_box_reg", "loss_keypoint"}
    for key, value in ref.items():
        assert value > 0
        np.testing.assert_allclose(float(terms[key]), value, rtol=2e-4, err_msg=key)
    total = float(model.compute_loss(images, y, model(images, training=True)))
    np.testing.assert_allclose(total, sum(ref.values()), rtol=2e-4)


# ------------------------------------------------------------------ training and I/O
def _keypoint_fit_data(size, rng):
    images, y = _fit_data(size, rng)
    y["labels"] = np.minimum(y["labels"], 0)
    y["keypoints"] = keypoint_targets(y, rng)
    return images, y


@slow_on_jax  # 60-120 s of eager JAX op compiles
def test_missing_or_misshapen_keypoints_raise(rng):
    model = small_model(kdet.models.KeypointRCNN, num_classes=1, image_size=96,
                        box_detections_per_img=SLOTS)
    images, y = _fit_data(96, rng)
    y["labels"] = np.minimum(y["labels"], 0)
    y_pred = model(images, training=True)
    with pytest.raises(ValueError, match="keypoints"):
        model.compute_loss(images, y, y_pred)
    y["keypoints"] = np.zeros((2, 2, 5, 3), "float32")
    with pytest.raises(ValueError, match=r"\[B, 2, 17, 3\]"):
        model.compute_loss(images, y, y_pred)
    with pytest.raises(ValueError, match="num_keypoints"):
        kdet.models.KeypointRCNN(num_keypoints=0, image_size=96)


@pytest.mark.slow  # ~40 s on TF: traced fit + a 240 MB .keras file
def test_fit_finite_and_keras_roundtrip(rng, tmp_path):
    images, y = _keypoint_fit_data(96, rng)  # the second image has no objects
    model = small_model(kdet.models.KeypointRCNN, num_classes=1, image_size=96,
                        box_detections_per_img=SLOTS)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    history = model.fit(images, y, batch_size=1, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    before = detections(model, images)
    before["keypoints"] = _np(model(images, training=False)["keypoints"])
    assert before["keypoints"].shape == (2, SLOTS, NUM_KEYPOINTS, 3)
    assert np.all(np.isfinite(before["keypoints"]))
    path = str(tmp_path / "keypoint.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is kdet.models.KeypointRCNN
    assert loaded.get_config() == model.get_config()
    after = detections(loaded, images)
    after["keypoints"] = _np(loaded(images, training=False)["keypoints"])
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-4, err_msg=key)


@pytest.mark.slow
@pytest.mark.skipif(backend() != "tensorflow", reason="jit_compile on the TF backend")
def test_fit_jit_compile_tensorflow_on_tf_data(rng):
    import tensorflow as tf

    images, y = _keypoint_fit_data(96, rng)
    model = small_model(kdet.models.KeypointRCNN, num_classes=1, image_size=96,
                        box_detections_per_img=SLOTS)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=True)
    ds = tf.data.Dataset.from_tensor_slices((images, y)).batch(2, drop_remainder=True).repeat(2)
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@slow_on_jax  # 60-120 s of eager JAX op compiles
def test_predict_images_maps_keypoints_back(rng):
    from kdet.models.detector import resize_and_pad

    model = small_model(kdet.models.KeypointRCNN, num_classes=1, image_size=96,
                        box_detections_per_img=SLOTS,
                        box_score_thresh=0.0)
    small = rng.uniform(0, 255, (48, 72, 3)).astype("float32")  # scale 96 / 72
    out = model.predict_images([small])
    padded, scale = resize_and_pad(small, 96)
    direct = _np(model(padded[None], training=False)["keypoints"])
    n = int(out["num_detections"][0])
    assert out["keypoints"].shape == (1, SLOTS, NUM_KEYPOINTS, 3) and n > 0
    np.testing.assert_allclose(out["keypoints"][..., :2], direct[..., :2] / scale, atol=1e-3)
    np.testing.assert_allclose(out["keypoints"][..., 2], direct[..., 2], atol=1e-4)
    # keypoints of a detection lie in its box, at least one pixel wide (cell centres)
    boxes = out["boxes"][0, :n]
    kp = out["keypoints"][0, :n]
    right = boxes[:, 0] + np.maximum(boxes[:, 2] - boxes[:, 0], 1 / scale)
    assert np.all((kp[..., 0] >= boxes[:, None, 0] - 1e-3) & (kp[..., 0] <= right[:, None] + 1e-3))


def test_zoo_card_builds_the_torchvision_architecture():
    from kdet import zoo
    from kdet.converters.torchvision import build_torchvision

    card = zoo.get_card("keypointrcnn_resnet50_fpn")
    kwargs = dict(card["architecture"]["kwargs"], image_size=128)
    model = build_torchvision(**kwargs)
    assert type(model) is kdet.models.KeypointRCNN and model.num_keypoints == 17
    assert count_params(model) == card["metrics"]["num_params"] == 59_137_258
