"""RetinaNet / EfficientDet: parameter counts, losses and decoding against the references.

* counts: DESIGN.md table (PyTorch ``parameters()`` convention);
* losses: torchvision ``RetinaNet.compute_loss`` and effdet ``DetectionLoss`` +
  ``AnchorLabeler`` on the same head outputs, anchors and targets (when importable);
* decoding: a NumPy transcription of torchvision ``postprocess_detections`` /
  effdet ``_post_process`` + ``generate_detections``.
"""
import numpy as np
import pytest

from conftest import HAVE_TORCHVISION

import keras

import kdet
from kdet.utils import count_params

EFFICIENTDET_COUNTS = {
    "d0": 3_880_067, "d1": 6_625_898, "d2": 8_097_039, "d3": 12_032_296, "d4": 20_723_675,
    "d5": 33_653_315, "d6": 51_871_782, "d7": 51_871_782, "d7x": 77_147_166,
    "lite0": 3_243_470, "lite1": 4_248_318, "lite2": 5_252_334, "lite3": 8_350_862,
    "lite3x": 9_280_862, "lite4": 15_130_894,
}
FAST = ("d0", "lite0")


@pytest.mark.parametrize("variant", [
    pytest.param(v, marks=() if v in FAST else pytest.mark.slow) for v in EFFICIENTDET_COUNTS])
def test_efficientdet_parameter_count(variant):
    # The count does not depend on the input size; a small one builds faster.
    model = kdet.models.EfficientDet(phi=variant, num_classes=90, image_size=128)
    assert count_params(model) == EFFICIENTDET_COUNTS[variant]
    keras.backend.clear_session()


@pytest.mark.parametrize("version,norm,expected", [
    (1, "batch", 34_068_119), (2, "batch", 38_198_935), (1, "frozen_batch", 34_014_999)])
def test_retinanet_parameter_count(version, norm, expected):
    model = kdet.models.RetinaNet(num_classes=91, version=version, image_size=128,
                                  backbone_norm=norm)
    assert count_params(model) == expected
    keras.backend.clear_session()


def test_variant_names_and_errors():
    assert kdet.models.EfficientDet(phi="lite0", num_classes=2, image_size=128).variant == "lite0"
    with pytest.raises(ValueError, match="unknown EfficientDet variant"):
        kdet.models.EfficientDet(phi=9)
    with pytest.raises(ValueError, match="multiple of 32"):
        kdet.models.RetinaNet(num_classes=2, image_size=300)
    with pytest.raises(ValueError, match="version"):
        kdet.models.RetinaNet(num_classes=2, version=3)


# ----------------------------------------------------------------- targets
def _random_targets(rng, batch, max_boxes, image_size, num_classes, empty_image=None):
    boxes = np.zeros((batch, max_boxes, 4), "float32")
    labels = -np.ones((batch, max_boxes), "int32")
    for b in range(batch):
        if b == empty_image:
            continue
        n = rng.integers(1, max_boxes + 1)
        xy = rng.uniform(0, image_size * 0.7, (n, 2))
        wh = rng.uniform(8, image_size * 0.5, (n, 2))
        boxes[b, :n] = np.concatenate([xy, np.minimum(xy + wh, image_size)], -1)
        labels[b, :n] = rng.integers(0, num_classes, n)
    return boxes, labels


@pytest.fixture(scope="module")
def small_retinanets():
    return {v: kdet.models.RetinaNet(num_classes=4, version=v, image_size=128) for v in (1, 2)}


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed: no reference loss")
@pytest.mark.parametrize("version", [1, 2])
def test_retinanet_loss_equals_torchvision(version, small_retinanets, rng):
    import torch
    from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

    model = small_retinanets[version]
    builder = retinanet_resnet50_fpn if version == 1 else retinanet_resnet50_fpn_v2
    reference = builder(weights=None, weights_backbone=None, num_classes=4)
    num_anchors = model.anchors.shape[0]
    boxes, labels = _random_targets(rng, 3, 5, 128, 4, empty_image=2)
    cls_logits = rng.normal(0, 2, (3, num_anchors, 4)).astype("float32")
    box_deltas = rng.normal(0, 0.3, (3, num_anchors, 4)).astype("float32")

    ours = model.compute_loss(y={"boxes": boxes, "labels": labels},
                              y_pred={"cls_logits": cls_logits, "box_deltas": box_deltas})
    targets = [{"boxes": torch.from_numpy(boxes[b][labels[b] >= 0]),
                "labels": torch.from_numpy(labels[b][labels[b] >= 0]).long()} for b in range(3)]
    anchors = [torch.from_numpy(model.anchors)] * 3
    ref = reference.compute_loss(
        targets, {"cls_logits": torch.from_numpy(cls_logits),
                  "bbox_regression": torch.from_numpy(box_deltas)}, anchors)
    expected = float(ref["classification"] + ref["bbox_regression"])
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(ours)), expected, rtol=2e-5)


@pytest.fixture(scope="module")
def small_efficientdet():
    return kdet.models.EfficientDet(phi=0, num_classes=5, image_size=256)


def test_efficientdet_loss_equals_effdet(small_efficientdet, rng):
    torch = pytest.importorskip("torch", reason="torch not installed: no effdet reference")
    effdet_anchors = pytest.importorskip("effdet.anchors", reason="effdet not installed")
    effdet_loss = pytest.importorskip("effdet.loss", reason="effdet not installed")
    model = small_efficientdet
    num_classes, size = 5, 256
    boxes, labels = _random_targets(rng, 2, 6, size, num_classes, empty_image=1)
    num_anchors = model.anchors.shape[0]
    cls_logits = rng.normal(0, 2, (2, num_anchors, num_classes)).astype("float32")
    box_deltas = rng.normal(0, 0.3, (2, num_anchors, 4)).astype("float32")
    ours = model.compute_loss(y={"boxes": boxes, "labels": labels},
                              y_pred={"cls_logits": cls_logits, "box_deltas": box_deltas})

    anchors = effdet_anchors.Anchors(3, 7, 3, [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)], 4.0, (size, size))
    labeler = effdet_anchors.AnchorLabeler(anchors, num_classes, match_threshold=0.5)
    cls_t, box_t, num_pos = [], [], []
    for b in range(2):
        keep = labels[b] >= 0
        yxyx = torch.from_numpy(boxes[b][keep][:, [1, 0, 3, 2]])
        c, bx, n = labeler.label_anchors(yxyx, torch.from_numpy(labels[b][keep] + 1).float())
        cls_t.append(c)
        box_t.append(bx)
        num_pos.append(n)
    counts = model.level_counts
    cls_outputs, box_outputs, level_cls_t, level_box_t = [], [], [], []
    start = 0
    for level, count in enumerate(counts):
        side = int(round((count / 9) ** 0.5))
        sl = slice(start, start + count)
        start += count
        cls_outputs.append(torch.from_numpy(
            cls_logits[:, sl].reshape(2, side, side, 9 * num_classes)).permute(0, 3, 1, 2))
        box_outputs.append(torch.from_numpy(
            box_deltas[:, sl].reshape(2, side, side, 36)).permute(0, 3, 1, 2))
        level_cls_t.append(torch.stack([c[level] for c in cls_t]))
        level_box_t.append(torch.stack([bx[level] for bx in box_t]))

    class Config:
        alpha, gamma, delta, box_loss_weight = 0.25, 1.5, 0.1, 50.0
        label_smoothing, legacy_focal, jit_loss = 0.0, False, False
        num_classes = 5
    total, _, _ = effdet_loss.DetectionLoss(Config)(
        cls_outputs, box_outputs, level_cls_t, level_box_t, torch.stack(num_pos))
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(ours)), float(total), rtol=2e-5)


def test_loss_finite_without_objects_and_batch_of_one(small_efficientdet, rng):
    model = small_efficientdet
    num_anchors = model.anchors.shape[0]
    y_pred = {"cls_logits": rng.normal(0, 1, (1, num_anchors, 5)).astype("float32"),
              "box_deltas": rng.normal(0, 1, (1, num_anchors, 4)).astype("float32")}
    empty = {"boxes": np.zeros((1, 4, 4), "float32"), "labels": -np.ones((1, 4), "int32")}
    loss = float(keras.ops.convert_to_numpy(model.compute_loss(y=empty, y_pred=y_pred)))
    assert np.isfinite(loss) and loss > 0


def test_targets_in_other_box_format(small_efficientdet, rng):
    model = small_efficientdet
    num_anchors = model.anchors.shape[0]
    boxes, labels = _random_targets(rng, 2, 3, 256, 5)
    y_pred = {"cls_logits": rng.normal(0, 1, (2, num_anchors, 5)).astype("float32"),
              "box_deltas": rng.normal(0, 1, (2, num_anchors, 4)).astype("float32")}
    xyxy = model.compute_loss(y={"boxes": boxes, "labels": labels}, y_pred=y_pred)
    xywh_boxes = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], -1)
    model.bounding_box_format = "xywh"
    try:
        xywh = model.compute_loss(y={"boxes": xywh_boxes, "labels": labels}, y_pred=y_pred)
    finally:
        model.bounding_box_format = "xyxy"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(xywh), keras.ops.convert_to_numpy(xyxy),
                               rtol=1e-5)


# ---------------------------------------------------------------- decoding
def _np_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)
    union = area(a)[:, None] + area(b)[None] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def _np_nms(boxes, scores, thr):
    order = np.argsort(-scores, kind="stable")
    keep, suppressed = [], np.zeros(len(boxes), bool)
    iou = _np_iou(boxes, boxes)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > thr
    return np.array(keep, int)


def _np_decode(deltas, anchors, order, clip):
    if order == "yx":
        deltas = deltas[:, [1, 0, 3, 2]]
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    xa, ya = anchors[:, 0] + 0.5 * wa, anchors[:, 1] + 0.5 * ha
    dw, dh = deltas[:, 2], deltas[:, 3]
    if clip is not None:
        dw, dh = np.minimum(dw, clip), np.minimum(dh, clip)
    cx, cy = deltas[:, 0] * wa + xa, deltas[:, 1] * ha + ya
    w, h = np.exp(dw) * wa, np.exp(dh) * ha
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _reference_postprocess(model, cls_logits, box_deltas):
    """torchvision postprocess_detections (per-level top-k) / effdet (global top-k)."""
    dec = model.decoder
    k = model.num_classes
    size = model.image_size
    counts = model.level_counts if dec.per_level_topk else (model.anchors.shape[0],)
    scores_all, boxes_all, labels_all = [], [], []
    start = 0
    for count in counts:
        probs = 1 / (1 + np.exp(-cls_logits[start:start + count].astype(np.float64)))
        flat = probs.reshape(-1)
        topk = np.argsort(-flat, kind="stable")[:min(dec.pre_nms_topk, flat.size)]
        anchor_idx, labels = topk // k + start, topk % k
        boxes = _np_decode(box_deltas[anchor_idx], model.anchors[anchor_idx],
                           dec.box_coder.order, dec.box_coder.clip)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, size[1])
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, size[0])
        scores_all.append(flat[topk])
        boxes_all.append(boxes)
        labels_all.append(labels)
        start += count
    scores, boxes, labels = map(np.concatenate, (scores_all, boxes_all, labels_all))
    # kdet departs from torchvision RetinaNet / effdet on purpose here (issue #10): a box
    # empty after clipping can match no object, so it is dropped before NMS, as
    # torchvision's remove_small_boxes does in its R-CNN heads.
    nonempty = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    keep_thr = (scores > dec.score_threshold) & nonempty
    scores, boxes, labels = scores[keep_thr], boxes[keep_thr], labels[keep_thr]
    kept = []
    for c in np.unique(labels):  # batched_nms == per-class NMS
        idx = np.nonzero(labels == c)[0]
        kept.extend(idx[_np_nms(boxes[idx], scores[idx], dec.iou_threshold)])
    kept = np.array(kept, int)
    kept = kept[np.argsort(-scores[kept], kind="stable")][:dec.max_detections]
    return boxes[kept], scores[kept], labels[kept]


def _check_decoding(model, rng, num_classes, logit_scale=3.0):
    num_anchors = model.anchors.shape[0]
    cls_logits = (rng.normal(-4, logit_scale, (2, num_anchors, num_classes))).astype("float32")
    box_deltas = rng.normal(0, 0.5, (2, num_anchors, 4)).astype("float32")
    out = model.decode_predictions({"cls_logits": cls_logits, "box_deltas": box_deltas})
    out = {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}
    d = model.decoder.max_detections
    assert out["boxes"].shape == (2, d, 4) and out["labels"].shape == (2, d)
    for b in range(2):
        boxes, scores, labels = _reference_postprocess(model, cls_logits[b], box_deltas[b])
        n = int(out["num_detections"][b])
        assert n == len(scores)
        np.testing.assert_allclose(out["scores"][b, :n], scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["labels"][b, :n], labels)
        np.testing.assert_allclose(out["boxes"][b, :n], boxes, rtol=1e-4, atol=1e-3)
        # Padding: score 0, label -1, zero boxes.
        assert np.all(out["scores"][b, n:] == 0) and np.all(out["labels"][b, n:] == -1)
        assert np.all(out["boxes"][b, n:] == 0)


def test_retinanet_decoding_matches_reference(small_retinanets, rng):
    _check_decoding(small_retinanets[1], rng, 4)


def test_efficientdet_decoding_matches_reference(small_efficientdet, rng):
    _check_decoding(small_efficientdet, rng, 5)


def test_predict_returns_padded_detections_and_scale_maps_back(small_efficientdet, rng):
    model = small_efficientdet
    images = rng.uniform(0, 255, (2, 256, 256, 3)).astype("float32")
    out = model.predict(images, verbose=0)
    assert set(out) == {"boxes", "scores", "labels", "num_detections"}
    assert out["boxes"].shape == (2, 100, 4)
    assert np.all(out["boxes"] >= 0) and np.all(out["boxes"] <= 256)
    # predict_images on a non-square image: boxes come back in its own pixels.
    image = rng.uniform(0, 255, (100, 200, 3)).astype("float32")
    got = model.predict_images([image])
    padded, scale = kdet.models.resize_and_pad(image, 256)
    direct = model.decode_predictions(model(padded[None], training=False))
    direct_boxes = keras.ops.convert_to_numpy(direct["boxes"])[0]
    n = int(got["num_detections"][0])
    np.testing.assert_allclose(got["boxes"][0, :n] * scale, direct_boxes[:n], rtol=1e-4, atol=1e-3)
    assert scale == pytest.approx(256 / 200)


def test_config_round_trip_and_keras_file(tmp_path, rng):
    model = kdet.models.EfficientDet(phi="lite0", num_classes=3, image_size=128,
                                     score_threshold=0.2, max_detections=7)
    config = model.get_config()
    assert config["phi"] == "lite0" and config["max_detections"] == 7
    path = tmp_path / "lite0.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, kdet.models.EfficientDet)
    images = rng.uniform(0, 255, (1, 128, 128, 3)).astype("float32")
    a = keras.ops.convert_to_numpy(model(images, training=False)["cls_logits"])
    b = keras.ops.convert_to_numpy(loaded(images, training=False)["cls_logits"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert loaded.decoder.max_detections == 7 and loaded.decoder.score_threshold == 0.2


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_b0"])
def test_retinanet_other_backbones_build_and_run(backbone, rng):
    model = kdet.models.RetinaNet(num_classes=3, backbone=backbone, image_size=128, version=2)
    raw = model(rng.uniform(0, 255, (1, 128, 128, 3)).astype("float32"), training=False)
    assert tuple(raw["cls_logits"].shape) == (1, model.anchors.shape[0], 3)
    assert tuple(raw["box_deltas"].shape) == (1, model.anchors.shape[0], 4)
    keras.backend.clear_session()


def test_default_optimizers_follow_the_recipes(small_efficientdet, small_retinanets):
    # kdet.recipes "automl": coupled L2 on kernels, clip 10, EMA 0.9998, lr 0.08 per 64 images
    effdet_opt = small_efficientdet.default_optimizer(steps=1000, batch_size=32,
                                                      steps_per_epoch=100)
    assert isinstance(effdet_opt, kdet.optimizers.CoupledDecaySGD)
    assert effdet_opt.use_ema and effdet_opt.ema_momentum == 0.9998
    assert effdet_opt.global_clipnorm == 10.0 and effdet_opt.variable_clipnorm == 10.0
    assert effdet_opt.coupled_weight_decay == pytest.approx(4e-5)
    assert effdet_opt.decay_variables == "kernels" and effdet_opt.momentum == 0.9
    assert not effdet_opt.weight_decay  # no decoupled Keras decay on top
    schedule = small_efficientdet.learning_rate_schedule(steps=1000, batch_size=32,
                                                         steps_per_epoch=100)
    lr = [float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 50, 100, 550)]
    # automl: warmup from 0.004 to 0.04 over one epoch, then 0.5 lr (1 + cos(pi t / 900))
    np.testing.assert_allclose(lr[:2], [0.004, 0.022], rtol=1e-5)
    np.testing.assert_allclose(lr[2:], [0.02 * (1 + np.cos(np.pi * t / 900)) for t in (100, 550)],
                               rtol=1e-4)

    # kdet.recipes "torchvision_retinanet": 0.01 per 16 images, x0.1 at epochs 16 and 22 of 26
    retina_opt = small_retinanets[1].default_optimizer(steps=2600, batch_size=8)
    schedule = small_retinanets[1].learning_rate_schedule(steps=2600, batch_size=8)
    lr = [float(keras.ops.convert_to_numpy(schedule(s))) for s in (0, 99, 1599, 1600, 2200)]
    np.testing.assert_allclose(lr, [5e-6, 0.005, 0.005, 0.0005, 0.00005], rtol=1e-5)
    assert retina_opt.momentum == 0.9 and retina_opt.coupled_weight_decay == 1e-4
    assert retina_opt.decay_variables == "all" and not retina_opt.global_clipnorm
    assert not retina_opt.use_ema


@pytest.mark.parametrize("count,classes,k", [(300, 7, 40), (300, 7, 300), (50, 7, 100),
                                             (300, 1, 40), (9, 3, 5)])
def test_topk_candidates_equal_the_flat_top_k_ties_included(rng, count, classes, k):
    """The two-stage top-k (best class per anchor, then the pairs of those anchors) gives
    the flat top-k's values and indices, ties broken at the lower flat index, -inf
    (a NaN logit) included, at batch 2."""
    from kdet.layers.detection_decoder import _topk_candidates
    scores = rng.integers(0, 6, (2, count, classes)).astype("float32") / 5  # many ties
    scores[0, 3] = -np.inf
    scores[1, :count // 2] = -np.inf  # fewer finite pairs than k in some cases
    # equal scores on anchors of different best class: anchor 1 ranks first by its best
    # class, anchor 0's 0.5 first among the pairs
    tie = np.array([[[0.5, 0.6], [0.5, 0.9], [0.1, 0.1], [0.1, 0.1], [0.0, 0.0]]], "float32")
    for batch_scores, top in ((scores, k), (tie, 4)):
        values, index = _topk_candidates(keras.ops.convert_to_tensor(batch_scores), top,
                                         *batch_scores.shape[1:])
        values, index = keras.ops.convert_to_numpy(values), keras.ops.convert_to_numpy(index)
        take = min(top, batch_scores.shape[1] * batch_scores.shape[2])
        for b in range(len(batch_scores)):
            flat = batch_scores[b].reshape(-1)
            expected = np.argsort(-flat, kind="stable")[:take]  # ties: lower index first
            np.testing.assert_array_equal(index[b], expected)
            np.testing.assert_array_equal(values[b], flat[expected])
