"""Fast R-CNN: proposal generators, the [0.1, 0.5) background band, the multi-task loss,
post-processing and the Keras model contract (fit on tf.data, predict, .keras).

References: written-out numpy formulas (sliding windows, IoU sampling, the loss),
torchvision's ``BoxCoder`` / ``box_iou`` / ``batched_nms`` for post-processing.
"""
import importlib.util
import inspect

import numpy as np
import pytest

from conftest import HAVE_TORCHVISION, backend

import keras
from keras import ops

import kdet
from kdet.matching import BalancedSampler, Matcher, encode_roi_targets
from kdet.ops.proposals import (default_proposals, pad_proposals, selective_search_proposals,
                                sliding_window_proposals)

BIG = 10 ** 6  # a sampler size that keeps every candidate: deterministic sampling
# Eager JAX compiles every op on first use: the model tests take 20-70 s each there
# (1-10 s on TF), so on JAX they only run with -m slow.
slow_on_jax = pytest.mark.slow if backend() == "jax" else (lambda test: test)
SIZE = 64
NUM_PROPOSALS = 12


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


# ------------------------------------------------------------------ numpy references
def np_iou(a, b):
    """IoU matrix ``[len(a), len(b)]`` of xyxy boxes (written out)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), -1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), -1)
    union = area_a[:, None] + area_b[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def np_encode(gt, rois, weights):
    """R-CNN box parametrisation times ``weights``: (dx, dy, dw, dh)."""
    wx, wy, ww, wh = weights
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    px, py = rois[:, 0] + pw / 2, rois[:, 1] + ph / 2
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + gw / 2, gt[:, 1] + gh / 2
    return np.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * np.log(gw / pw),
                     wh * np.log(gh / ph)], -1)


def np_training_rois(proposals, gt_boxes, gt_labels, fg_thresh, bg_range, weights):
    """Every candidate (non-empty proposals + GT) with its label (class / -1) and box target,
    as the paper's sampling with no subsampling: fg IoU >= fg_thresh, bg IoU in bg_range."""
    valid = (proposals[:, 2] > proposals[:, 0]) & (proposals[:, 3] > proposals[:, 1])
    gt_valid = gt_labels >= 0
    candidates = np.concatenate([proposals[valid], gt_boxes[gt_valid]])
    gts, labels_gt = gt_boxes[gt_valid], gt_labels[gt_valid]
    if len(gts):
        iou = np_iou(candidates, gts)
        best, match = iou.max(1), iou.argmax(1)
    else:
        best, match = np.zeros(len(candidates)), np.zeros(len(candidates), int)
    fg = best >= fg_thresh
    bg = (best >= bg_range[0]) & (best < bg_range[1])
    keep = fg | bg
    rois = candidates[keep]
    labels = np.where(fg, labels_gt[match] if len(gts) else -1, -1)[keep]
    targets = np.zeros((len(rois), 4))
    if fg.any():
        targets[fg[keep]] = np_encode(gts[match[fg]], candidates[fg], weights)
    return rois, labels, targets


def np_multitask_loss(class_logits, box_regression, labels, targets, beta=1.0):
    """Fast R-CNN's loss over the sampled RoIs of the batch (concatenated):
    sum of CE + sum of smooth L1 on the GT class's deltas (foreground), both / #RoIs."""
    shifted = class_logits - class_logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    column = np.where(labels >= 0, labels + 1, 0)
    ce = -log_probs[np.arange(len(labels)), column]
    deltas = box_regression.reshape(len(labels), -1, 4)[np.arange(len(labels)), column]
    diff = np.abs(deltas - targets)
    smooth = np.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta).sum(-1)
    count = len(labels)
    return ce.sum() / count, (smooth * (labels >= 0)).sum() / count


def torch_postprocess(class_logits, box_regression, proposals, image_size, weights, score=0.05,
                      nms=0.3, detections=100, min_size=1e-2):
    """torchvision ``RoIHeads.postprocess_detections`` for one image (kdet labels = tv - 1)."""
    import torch
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops

    coder = det_utils.BoxCoder(weights)
    logits, regression = torch.from_numpy(class_logits), torch.from_numpy(box_regression)
    boxes = coder.decode(regression, [torch.from_numpy(proposals)])
    scores = torch.softmax(logits, -1)
    # TensorFlow's CPU kernels flush subnormal floats to zero (FTZ/DAZ): a 3e-41
    # probability is 0 there and fails "> 0". Do the same here; normal floats agree.
    scores = torch.where(scores < torch.finfo(torch.float32).tiny, torch.zeros_like(scores),
                         scores)
    boxes = box_ops.clip_boxes_to_image(boxes, image_size)
    num_columns = logits.shape[-1]
    labels = torch.arange(num_columns).view(1, -1).expand_as(scores)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), \
        labels[:, 1:].reshape(-1)
    keep = torch.where(scores > score)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = box_ops.remove_small_boxes(boxes, min_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = box_ops.batched_nms(boxes, scores, labels, nms)[:detections]
    return boxes[keep].numpy(), scores[keep].numpy(), labels[keep].numpy() - 1


# ------------------------------------------------------------------ shared checks
def random_batch(rng, size=SIZE, num_proposals=NUM_PROPOSALS):
    """Two images; image 0 has two GT boxes, image 1 none. Proposals include jittered GT
    boxes, a duplicate, a degenerate (zero-width) box and zero padding rows."""
    images = rng.uniform(0, 255, (2, size, size, 3)).astype("float32")
    gt = np.array([[[4, 6, 38, 41], [30, 28, 60, 62]], [[0, 0, 0, 0], [0, 0, 0, 0]]], "float32")
    labels = np.array([[1, 0], [-1, -1]], "int32")
    proposals = np.zeros((2, num_proposals, 4), "float32")
    for i in range(2):
        x0 = rng.uniform(0, size * 0.5, (num_proposals - 4, 2))
        wh = rng.uniform(8, size * 0.5, (num_proposals - 4, 2))
        proposals[i, :num_proposals - 4] = np.concatenate([x0, x0 + wh], -1)
    proposals[0, 0] = gt[0, 0] + [1, -2, 2, 1]
    proposals[0, 1] = proposals[0, 0]                   # duplicate
    proposals[0, 2] = gt[0, 1] + [-3, 2, 0, -1]
    proposals[:, num_proposals - 4] = [10, 10, 10, 30]  # zero width: padding / degenerate
    return images, proposals, {"boxes": gt, "labels": labels}


def check_loss_against_numpy(model, rng, bg_range, weights):
    """``model.loss_terms`` (a sampler that keeps every candidate) against the numpy loss
    over the candidates the paper's rule keeps; the head runs on those RoIs."""
    images, proposals, y = random_batch(rng, model.image_size[0], model.num_proposals)
    x = {"images": images, "proposals": proposals}
    y_pred = model(x, training=True)
    terms = {k: float(_np(v)) for k, v in model.loss_terms(y, y_pred, training=False).items()}
    logits, regression, labels, targets = [], [], [], []
    for i in range(2):
        rois, lab, tgt = np_training_rois(proposals[i], y["boxes"][i], y["labels"][i], 0.5,
                                          bg_range, weights)
        head_input = y_pred[model.head_input_key][i:i + 1]
        head = model.heads.box_logits(head_input, rois[None].astype("float32"), training=False)
        logits.append(_np(head["class_logits"])[0])
        regression.append(_np(head["box_regression"])[0])
        labels.append(lab)
        targets.append(tgt)
    ce, box = np_multitask_loss(np.concatenate(logits), np.concatenate(regression),
                                np.concatenate(labels), np.concatenate(targets))
    assert box > 0 and ce > 0
    np.testing.assert_allclose(terms["loss_classifier"], ce, rtol=1e-4)
    np.testing.assert_allclose(terms["loss_box_reg"], box, rtol=1e-4)


def check_postprocess_against_torchvision(model, rng, weights):
    images, proposals, _ = random_batch(rng, model.image_size[0], model.num_proposals)
    x = {"images": images, "proposals": proposals}
    out = {k: _np(v) for k, v in model(x, training=False).items()}
    y_pred = model(x, training=False)
    head = model.heads.box_logits(y_pred[model.head_input_key], proposals, training=False)
    logits, regression = _np(head["class_logits"]), _np(head["box_regression"])
    for i in range(2):
        valid = (proposals[i, :, 2] > proposals[i, :, 0]) & (proposals[i, :, 3] >
                                                              proposals[i, :, 1])
        boxes, scores, labels = torch_postprocess(
            logits[i][valid], regression[i][valid], proposals[i][valid], model.image_size,
            weights, score=model.heads.score_threshold, nms=model.heads.nms_threshold)
        n = int(out["num_detections"][i])
        assert n == len(scores) > 0
        np.testing.assert_allclose(out["scores"][i, :n], scores, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(out["labels"][i, :n], labels)
        np.testing.assert_allclose(out["boxes"][i, :n], boxes, atol=1e-3)
        check_padding(out, i)


def check_padding(out, i):
    n = int(out["num_detections"][i])
    assert np.all(out["scores"][i, n:] == 0) and np.all(out["labels"][i, n:] == -1)
    assert np.all(out["boxes"][i, n:] == 0)


def tiny_backbone(size, level):
    """Two strided convs to stride ``2**level`` returning ``{"C<level>": ...}``: the training
    graph of a real backbone takes ~30 s to trace on two CPU cores."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2 ** (level // 2), padding="same",
                            activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2 ** (level - level // 2), padding="same",
                            use_bias=False)(x)  # a bias before BN gets no gradient
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, {f"C{level}": keras.layers.ReLU()(x)})


def check_fit(model, rng):
    """fit on a tf.data dataset of dicts (an image without GT, a smaller last batch)."""
    import tensorflow as tf

    images, proposals, y = random_batch(rng, model.image_size[0], model.num_proposals)
    dataset = tf.data.Dataset.from_tensor_slices(
        ({"images": images, "proposals": proposals}, y)).repeat(2).batch(3)
    model.compile(optimizer=keras.optimizers.SGD(1e-2, momentum=0.9))
    before = [np.array(w) for w in model.trainable_weights]
    history = model.fit(dataset, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    changed = [not np.allclose(a, np.array(w)) for a, w in zip(before, model.trainable_weights)]
    unchanged = [w.path for w, c in zip(model.trainable_weights, changed) if not c]
    assert not unchanged, f"weights without a gradient: {unchanged}"


def check_predict_and_roundtrip(model, rng, tmp_path, name):
    """predict's padded dict (also on all-padding proposals) and the .keras round trip."""
    images, proposals, _ = random_batch(rng, model.image_size[0], model.num_proposals)
    x = {"images": np.concatenate([images, images[:1]]),
         "proposals": np.concatenate([proposals, np.zeros_like(proposals[:1])])}
    before = model.predict(x, batch_size=3, verbose=0)
    assert set(before) == {"boxes", "scores", "labels", "num_detections"}
    d = model.heads.detections_per_image
    assert before["boxes"].shape == (3, d, 4) and before["labels"].shape == (3, d)
    assert before["num_detections"][0] > 0 and before["num_detections"][2] == 0
    for i in range(3):
        check_padding(before, i)

    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    after = {k: _np(v) for k, v in loaded(x, training=False).items()}
    for key in before:  # graph vs eager: float noise of ~1e-4 px on the boxes
        np.testing.assert_allclose(after[key], before[key], atol=1e-3 if key == "boxes" else 1e-4,
                                   err_msg=key)


def check_predict_images(model, rng):
    from kdet.models.detector import resize_and_pad

    size = model.image_size[0]
    small = rng.uniform(0, 255, (size // 2, size * 3 // 4, 3)).astype("float32")
    boxes = np.array([[2, 3, 30, 20], [10, 5, 40, 30], [0, 0, 47, 31]], "float32")
    out = model.predict_images([small], proposals=[boxes])
    padded, scale = resize_and_pad(small, size)
    direct = model({"images": padded[None],
                    "proposals": pad_proposals([boxes * scale], model.num_proposals)})
    assert out["boxes"].shape == (1, model.heads.detections_per_image, 4)
    assert out["num_detections"][0] > 0
    np.testing.assert_allclose(out["boxes"], _np(direct["boxes"]) / scale, atol=1e-3)
    np.testing.assert_allclose(out["scores"], _np(direct["scores"]), atol=1e-5)
    np.testing.assert_allclose(out["scale"], [scale])
    generated = model.predict_images([small, small])  # default sliding-window proposals
    assert generated["boxes"].shape[0] == 2
    with pytest.raises(ValueError, match="proposal arrays"):
        model.predict_images([small], proposals=[boxes, boxes])


# ------------------------------------------------------------------ proposal generators
def test_sliding_window_proposals_formula():
    size, scales, ratios, stride = (48, 80), (16, 40), (0.5, 2.0), 12
    expected = []
    for cy in np.arange(stride / 2, 48, stride):
        for cx in np.arange(stride / 2, 80, stride):
            for s in scales:
                for r in ratios:
                    w, h = s / np.sqrt(r), s * np.sqrt(r)
                    box = [max(cx - w / 2, 0), max(cy - h / 2, 0), min(cx + w / 2, 80),
                           min(cy + h / 2, 48)]
                    if not any(np.allclose(box, e) for e in expected):
                        expected.append(box)
    boxes = sliding_window_proposals(size, scales, ratios, stride)
    assert boxes.dtype == np.float32
    np.testing.assert_allclose(boxes, np.array(expected), atol=1e-4)
    np.testing.assert_array_equal(boxes, sliding_window_proposals(size, scales, ratios, stride))


def test_default_proposals_and_padding():
    boxes = default_proposals(64, 50)
    assert 0 < len(boxes) <= 50 and np.all(boxes[:, 2:] > boxes[:, :2])
    assert np.all(boxes >= 0) and np.all(boxes <= 64)
    padded = pad_proposals([boxes[:3], boxes], 20)
    assert padded.shape == (2, 20, 4) and len(boxes) > 20
    np.testing.assert_array_equal(padded[0, :3], boxes[:3])
    assert np.all(padded[0, 3:] == 0)
    np.testing.assert_array_equal(padded[1], boxes[:20])  # the first 20 kept
    with pytest.raises(ValueError, match="stride"):
        sliding_window_proposals(64, stride=0)


def test_selective_search_is_optional():
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3)).astype("uint8")
    has_ximgproc = (importlib.util.find_spec("cv2") is not None
                    and hasattr(__import__("cv2"), "ximgproc"))
    if not has_ximgproc:
        with pytest.raises(ImportError, match="opencv-contrib"):
            selective_search_proposals(image)
        return
    boxes = selective_search_proposals(image, max_proposals=50)
    assert boxes.shape[1] == 4 and 0 < len(boxes) <= 50
    assert np.all(boxes[:, 2:] >= boxes[:, :2]) and np.all(boxes[:, 2:] <= [64, 48])


# ------------------------------------------------------------------ sampling
def _band_candidates():
    """GT [0, 0, 100, 100]; proposals [0, 0, w, 100] have IoU w / 100."""
    widths = np.concatenate([np.linspace(55, 99, 40),    # IoU >= 0.5: 40 fg
                             np.linspace(12, 48, 100),   # [0.1, 0.5): 100 bg
                             np.linspace(1, 9, 60)])     # < 0.1: 60 never sampled
    proposals = np.zeros((1, len(widths) + 3, 4), "float32")
    proposals[0, :len(widths), 2] = widths
    proposals[0, :len(widths), 3] = 100
    gt = np.array([[[0, 0, 100, 100]]], "float32")
    return proposals, gt, np.array([[2]], "int32"), widths


@slow_on_jax
def test_sampler_fractions_and_background_band():
    proposals, gt, labels, _ = _band_candidates()
    sampler = BalancedSampler(64, 0.25, seed=3)
    roi = {k: _np(v) for k, v in encode_roi_targets(
        proposals, gt, labels, sampler=sampler, matcher=Matcher(0.5, 0.5),
        bg_iou_low_threshold=0.1).items()}
    valid = roi["valid"][0]
    iou = np_iou(roi["rois"][0][valid], gt[0])[:, 0]
    fg = roi["labels"][0][valid] >= 0
    assert valid.sum() == 64 and fg.sum() == 16  # 25 % of 64 foreground
    assert np.all(iou[fg] >= 0.5) and np.all(roi["labels"][0][valid][fg] == 2)
    assert np.all((iou[~fg] >= 0.1) & (iou[~fg] < 0.5))  # background only from the band

    # few candidates: every fg and every band bg, nothing below 0.1 (no subsampling)
    roi = encode_roi_targets(proposals, gt, labels, sampler=BalancedSampler(BIG, 0.25),
                             bg_iou_low_threshold=0.1)
    lab = _np(roi["labels"])[0]
    assert (lab >= 0).sum() == 41 and (lab == -1).sum() == 100  # 40 + the GT box itself

    # bg_iou_low_threshold=0 (default) keeps torchvision's behaviour: below 0.1 is bg too
    roi = encode_roi_targets(proposals, gt, labels, sampler=BalancedSampler(BIG, 0.25),
                             proposals_valid=proposals[..., 2] > 0)  # padding rows left out
    assert (_np(roi["labels"])[0] == -1).sum() == 160

    # an image without GT has no background in the band: nothing sampled
    roi = encode_roi_targets(proposals, np.zeros((1, 1, 4), "float32"),
                             np.array([[-1]], "int32"), sampler=sampler,
                             bg_iou_low_threshold=0.1)
    assert not _np(roi["valid"]).any()


# ------------------------------------------------------------------ the model
def small_fast_rcnn(**kwargs):
    settings = dict(num_classes=3, backbone="mobilenet_v2", image_size=SIZE,
                    num_proposals=NUM_PROPOSALS, representation_size=32, seed=0)
    settings.update(kwargs)
    return kdet.models.FastRCNN(**settings)


@pytest.fixture(scope="module")
def exact_model():
    """A sampler that keeps every candidate; box_score_thresh 0 for many detections."""
    model = small_fast_rcnn(box_batch_size_per_image=BIG, box_score_thresh=0.0)
    # larger classifier weights: distinct, non-uniform scores
    kernel = model.heads.box_predictor.cls_score.kernel
    kernel.assign(kernel * 20.0)
    return model


@slow_on_jax
def test_defaults_are_the_papers(exact_model):
    defaults = inspect.signature(kdet.models.FastRCNN).parameters
    assert defaults["box_batch_size_per_image"].default == 64
    assert defaults["box_positive_fraction"].default == 0.25
    assert defaults["box_bg_iou_low"].default == 0.1 and defaults["box_loss_beta"].default == 1.0
    assert defaults["box_nms_thresh"].default == 0.3
    assert exact_model.box_bg_iou_low == 0.1 and exact_model.box_loss_beta == 1.0
    assert exact_model.box_matcher.high_threshold == 0.5 == exact_model.box_matcher.low_threshold
    assert exact_model.heads.nms_threshold == 0.3
    assert exact_model.heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert exact_model.heads.box_roi_pool.spatial_scale == 1 / 16
    assert exact_model.heads.box_roi_pool.output_size == (7, 7)


@slow_on_jax
def test_loss_matches_numpy_formula(exact_model):
    check_loss_against_numpy(exact_model, np.random.default_rng(1), (0.1, 0.5),
                             (10.0, 10.0, 5.0, 5.0))


@slow_on_jax
@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_postprocess_matches_torchvision(exact_model):
    check_postprocess_against_torchvision(exact_model, np.random.default_rng(2),
                                          (10.0, 10.0, 5.0, 5.0))


@slow_on_jax
def test_fit_on_tf_data(rng):
    check_fit(small_fast_rcnn(backbone=tiny_backbone(SIZE, 4)), rng)


@slow_on_jax
def test_predict_and_keras_roundtrip(exact_model, rng, tmp_path):
    check_predict_and_roundtrip(exact_model, rng, tmp_path, "fast")


@slow_on_jax
def test_predict_images_maps_boxes_back(exact_model, rng):
    check_predict_images(exact_model, rng)


@slow_on_jax
def test_bad_input_raises(exact_model):
    with pytest.raises(ValueError, match="multiple of 32"):
        small_fast_rcnn(image_size=80)
    with pytest.raises(ValueError, match="num_classes"):
        small_fast_rcnn(num_classes=0)
    with pytest.raises(ValueError, match="num_proposals"):
        small_fast_rcnn(num_proposals=0)
    images, proposals, _ = random_batch(np.random.default_rng(0))
    y_pred = exact_model({"images": images, "proposals": proposals}, training=True)
    with pytest.raises(ValueError, match="boxes"):
        exact_model.compute_loss(None, {"labels": np.zeros((2, 1), "int32")}, y_pred)


@pytest.mark.slow
@pytest.mark.skipif(backend() != "tensorflow", reason="jit_compile on the TF backend")
def test_fit_jit_compile_tensorflow(rng):
    images, proposals, y = random_batch(rng)
    model = small_fast_rcnn()
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=True)
    history = model.fit({"images": images, "proposals": proposals}, y, batch_size=2, epochs=2,
                        verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
