"""Faster R-CNN R50-FPN against torchvision ``fasterrcnn_resnet50_fpn``.

torchvision (imported first by conftest) is the reference: a randomly
initialised torchvision model is converted with ``convert_torchvision`` and
both are run on the same image: RPN proposals, final detections and the four
training loss terms must agree.
"""
import numpy as np
import pytest

from conftest import HAVE_TORCHVISION, backend, once_on_tensorflow

import keras
from keras import ops

import kdet
from kdet.converters import convert_torchvision
from kdet.layers.roi_heads import postprocess_detections
from kdet.layers.rpn import ProposalGenerator, RPNHead
from kdet.utils import count_params

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
BIG = 10 ** 6  # sampler size that keeps every candidate: deterministic sampling
# Fewer train-mode proposals than torchvision's 2000/2000: with ~1400 proposals
# float32 noise (1e-3 px on 512 px anchors) flips an NMS decision at IoU 0.7
# now and then, which changes the sampled count (the loss denominator) by one.
TRAIN_TOP_N = (300, 150)
needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
# Eager JAX compiles every op on first use: the full-model tests take 30-60 s
# there (5-15 s on TF), so they only run with -m slow on JAX.
slow_on_jax = pytest.mark.slow if backend() == "jax" else (lambda test: test)


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def torch_pair(builder, kdet_class, size, num_fg, seed=0, **kdet_kwargs):
    """A random torchvision model (eval) and the kdet model converted from it.

    The RPN objectness weights are scaled down so its probabilities do not
    saturate (ties would make the proposal order arbitrary), the classifier
    scaled up so the detections have distinct scores above 0.05.
    """
    import torch
    import torchvision

    torch.manual_seed(seed)
    tv = getattr(torchvision.models.detection, builder)(
        weights=None, weights_backbone=None, num_classes=num_fg + 1, min_size=size,
        max_size=size, image_mean=MEAN, image_std=STD, rpn_batch_size_per_image=BIG,
        box_batch_size_per_image=BIG, rpn_pre_nms_top_n_train=TRAIN_TOP_N[0],
        rpn_post_nms_top_n_train=TRAIN_TOP_N[1]).eval()
    with torch.no_grad():
        tv.rpn.head.cls_logits.weight.mul_(0.05)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(3.0)
    model = kdet_class(num_classes=num_fg, image_size=size, rpn_batch_size_per_image=BIG,
                       box_batch_size_per_image=BIG, rpn_pre_nms_top_n_train=TRAIN_TOP_N[0],
                       rpn_post_nms_top_n_train=TRAIN_TOP_N[1], **kdet_kwargs)
    convert_torchvision({k: v.numpy() for k, v in tv.state_dict().items()}, model)
    return tv, model


def torch_images(images):
    import torch
    return [torch.from_numpy(im / 255.0).permute(2, 0, 1).float() for im in images]


def run_torch_eval(tv, image):
    import torch

    captured = {}
    handle = tv.rpn.register_forward_hook(lambda mod, inp, out: captured.update(boxes=out[0]))
    with torch.no_grad():
        out = tv(torch_images([image]))[0]
    handle.remove()
    result = {k: v.numpy() for k, v in out.items()}
    result["proposals"] = captured["boxes"][0].numpy()
    return result


def detections(model, images):
    keys = ("boxes", "scores", "labels", "num_detections", "masks")
    return {k: _np(v) for k, v in model(images, training=False).items() if k in keys}


def check_detections(ref, out, min_count=10):
    """Each torchvision detection has a kdet twin: label - 1, box within 1e-2 px, score 1e-4."""
    n = int(out["num_detections"][0])
    assert n == len(ref["boxes"]) >= min_count
    boxes, scores, labels = out["boxes"][0], out["scores"][0], out["labels"][0]
    assert np.all(labels[n:] == -1) and np.all(scores[n:] == 0)
    order = []
    for box, score, label in zip(ref["boxes"], ref["scores"], ref["labels"]):
        err = np.abs(boxes[:n] - box).max(axis=1) + np.where(labels[:n] == label - 1, 0, 1e9)
        j = int(np.argmin(err))
        assert err[j] < 1e-2, (box, label, boxes[j], labels[j])
        assert abs(scores[j] - score) < 1e-4
        order.append(j)
    assert sorted(order) == list(range(n))
    return order


def synthetic_targets(size, with_masks=False):
    boxes = np.array([[[10, 12, 60, 70], [50, 40, 120, 110], [0, 0, 0, 0]],
                      [[30, 20, 90, 100], [0, 0, 0, 0], [0, 0, 0, 0]]], "float32")
    labels = np.array([[0, 2, -1], [1, -1, -1]], "int32")
    y = {"boxes": boxes, "labels": labels}
    if with_masks:
        masks = np.zeros((2, 3, size, size), "float32")
        for b in range(2):
            for n in range(3):
                if labels[b, n] >= 0:
                    x0, y0, x1, y1 = boxes[b, n].astype(int)
                    masks[b, n, y0 + 3:y1 - 2, x0 + 2:x1 - 4] = 1
                    masks[b, n, y0 + 5:y0 + 9, x0 + 5:x1 - 9] = 0  # a hole: not box-shaped
        y["masks"] = masks
    return y


def torch_targets(y):
    import torch

    out = []
    for b in range(len(y["boxes"])):
        keep = y["labels"][b] >= 0
        t = {"boxes": torch.from_numpy(y["boxes"][b][keep]),
             "labels": torch.from_numpy(y["labels"][b][keep] + 1).long()}
        if "masks" in y:
            t["masks"] = torch.from_numpy(y["masks"][b][keep]).to(torch.uint8)
        out.append(t)
    return out


def check_training_losses(tv, model, size, with_masks):
    """kdet ``loss_terms`` vs torchvision's train-mode loss dict (samplers keep everything)."""
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (2, size, size, 3)).astype("float32")
    y = synthetic_targets(size, with_masks)
    tv.train()
    ref = {k: float(v.detach()) for k, v in tv(torch_images(images), torch_targets(y)).items()}
    tv.eval()
    terms = model.loss_terms(y, model(images, training=True))
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    if with_masks:
        expected.add("loss_mask")
    assert set(terms) == set(ref) == expected
    for key, value in ref.items():
        assert value > 0
        np.testing.assert_allclose(float(terms[key]), value, rtol=2e-4, err_msg=key)
    # compute_loss is the plain sum of the terms.
    total = float(model.compute_loss(images, y, model(images, training=True)))
    np.testing.assert_allclose(total, sum(ref.values()), rtol=2e-4)


# ------------------------------------------------------------------ param counts
@once_on_tensorflow("the variables' shapes")
def test_param_counts_match_torchvision():
    # kdet counts foreground classes: torchvision's num_classes=91 is kdet's 90.
    model = kdet.models.FasterRCNN(num_classes=90, image_size=128)
    assert count_params(model) == 41_808_406
    frozen = kdet.models.FasterRCNN(num_classes=90, image_size=128, backbone_norm="frozen_batch")
    assert count_params(frozen) == 41_755_286


@once_on_tensorflow("the variables' shapes")
@needs_torchvision
def test_param_count_equals_torchvision_build():
    import torchvision
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5)
    model = kdet.models.FasterRCNN(num_classes=4, image_size=128)
    assert count_params(model) == sum(p.numel() for p in tv.parameters())


@needs_torchvision
def test_build_torchvision_and_strict_conversion_of_coco_layout():
    import torchvision
    from kdet.converters.torchvision import architecture_of, build_torchvision

    model = build_torchvision("fasterrcnn_resnet50_fpn", image_size=128)
    assert model.num_classes == 90 and architecture_of(model) == "fasterrcnn_resnet50_fpn"
    assert count_params(model) == 41_755_286  # frozen BN, as the pretrained builder
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    convert_torchvision(state, model, strict=True)  # every entry used, every weight set
    np.testing.assert_allclose(_np(model.get_layer("roi_heads").box_predictor.bbox_pred.kernel),
                               state["roi_heads.box_predictor.bbox_pred.weight"].T)
    del state["rpn.head.conv.0.0.bias"]
    with pytest.raises(ValueError, match="missing"):
        convert_torchvision(state, model)


# ------------------------------------------------------------------ torchvision parity
@pytest.fixture(scope="module")
def faster_pair():
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision not installed")
    return torch_pair("fasterrcnn_resnet50_fpn", kdet.models.FasterRCNN, 160, 4)


@slow_on_jax
def test_inference_matches_torchvision(faster_pair):
    tv, model = faster_pair
    image = np.random.default_rng(0).uniform(0, 255, (160, 160, 3)).astype("float32")
    ref = run_torch_eval(tv, image)
    out = {k: _np(v) for k, v in model(image[None], training=False).items()}
    # RPN proposals: same count, same order, coordinates within 1e-2 px.
    valid = out["proposals_valid"][0]
    proposals = out["proposals"][0][valid]
    assert len(proposals) == len(ref["proposals"]) > 100
    assert np.all(valid[:len(proposals)])  # kept proposals are packed first
    np.testing.assert_allclose(proposals, ref["proposals"], atol=1e-2)
    check_detections(ref, out)
    # predict returns only the detection dict.
    predicted = model.predict(image[None], verbose=0)
    assert set(predicted) == {"boxes", "scores", "labels", "num_detections"}
    np.testing.assert_allclose(predicted["scores"], out["scores"], atol=1e-5)


@slow_on_jax
def test_training_losses_match_torchvision(faster_pair):
    tv, model = faster_pair
    check_training_losses(tv, model, 160, with_masks=False)


@needs_torchvision
def test_postprocess_matches_torchvision_on_random_heads():
    import torch
    from torchvision.models.detection.roi_heads import RoIHeads as TorchRoIHeads

    rng = np.random.default_rng(3)
    num_rois, columns, size = 60, 4, 96
    xy = rng.uniform(0, 80, (num_rois, 2))
    proposals = np.concatenate([xy, xy + rng.uniform(4, 40, (num_rois, 2))], 1).astype("float32")
    logits = rng.normal(0, 2, (num_rois, columns)).astype("float32")
    deltas = rng.normal(0, 0.5, (num_rois, 4 * columns)).astype("float32")
    heads = TorchRoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    ref_boxes, ref_scores, ref_labels = heads.postprocess_detections(
        torch.from_numpy(logits), torch.from_numpy(deltas), [torch.from_numpy(proposals)],
        [(size, size)])
    valid = np.ones((1, num_rois), bool)
    out = postprocess_detections(logits[None], deltas[None], proposals[None], valid,
                                 (size, size))
    out = {k: _np(v) for k, v in out.items()}
    n = int(out["num_detections"][0])
    assert n == len(ref_boxes[0]) > 10
    np.testing.assert_allclose(out["boxes"][0][:n], ref_boxes[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(out["scores"][0][:n], ref_scores[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["labels"][0][:n], ref_labels[0].numpy() - 1)
    # Padded proposals never produce detections.
    half = np.arange(num_rois)[None] < num_rois // 2
    masked = {k: _np(v) for k, v in postprocess_detections(
        logits[None], deltas[None], proposals[None], half, (size, size)).items()}
    n = int(masked["num_detections"][0])
    assert n > 0 and np.all(np.isfinite(masked["boxes"]))


def test_proposal_generator_against_numpy_reference():
    """Decode + per-level top-k + clip + small-box removal + per-level NMS, in numpy."""
    rng = np.random.default_rng(4)
    size = 64
    gen = ProposalGenerator(image_size=size, anchor_sizes=(16, 32), aspect_ratios=(0.5, 1.0, 2.0),
                            strides=(8, 16), pre_nms_top_n_test=50, post_nms_top_n_test=40,
                            nms_threshold=0.7)
    num = gen.anchors.shape[0]
    logits = rng.normal(0, 2, (1, num)).astype("float32")
    deltas = rng.normal(0, 0.3, (1, num, 4)).astype("float32")
    out = {k: _np(v) for k, v in gen(logits, deltas).items()}

    anchors = gen.anchors
    cand_boxes, cand_scores, cand_levels = [], [], []
    start = 0
    for level, count in enumerate(gen.level_counts):
        sl = slice(start, start + count)
        top = np.argsort(-logits[0, sl], kind="stable")[:min(50, count)]
        a = anchors[sl][top]
        d = deltas[0, sl][top]
        wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        cx, cy = a[:, 0] + 0.5 * wa + d[:, 0] * wa, a[:, 1] + 0.5 * ha + d[:, 1] * ha
        w = np.exp(np.minimum(d[:, 2], np.log(1000 / 16))) * wa
        h = np.exp(np.minimum(d[:, 3], np.log(1000 / 16))) * ha
        b = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).clip(0, size)
        cand_boxes.append(b)
        cand_scores.append(1 / (1 + np.exp(-logits[0, sl][top])))
        cand_levels.append(np.full(len(top), level))
        start += count
    b, s, lv = map(np.concatenate, (cand_boxes, cand_scores, cand_levels))
    keep_ok = ((b[:, 2] - b[:, 0]) >= 1e-3) & ((b[:, 3] - b[:, 1]) >= 1e-3)
    order = [i for i in np.argsort(-s, kind="stable") if keep_ok[i]]
    kept = []
    for i in order:
        ok = True
        for j in kept:
            if lv[j] != lv[i]:
                continue
            iw = max(0, min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]))
            ih = max(0, min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]))
            inter = iw * ih
            union = ((b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1])
                     + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - inter)
            if inter / union > 0.7:
                ok = False
                break
        if ok:
            kept.append(i)
    kept = kept[:40]
    assert int(out["valid"][0].sum()) == len(kept)
    np.testing.assert_allclose(out["proposals"][0][:len(kept)], b[kept], atol=1e-3)
    np.testing.assert_allclose(out["scores"][0][:len(kept)], s[kept], atol=1e-6)
    assert np.all(out["proposals"][0][len(kept):] == 0)


def test_rpn_head_layout():
    head = RPNHead(num_anchors=3, channels=8)
    maps = [np.random.default_rng(0).normal(size=(2, 4, 5, 8)).astype("float32"),
            np.zeros((2, 2, 3, 8), "float32")]
    out = head(maps)
    assert tuple(out["objectness"].shape) == (2, (20 + 6) * 3)
    assert tuple(out["box_deltas"].shape) == (2, (20 + 6) * 3, 4)
    # Anchor index (y, x, a) of level 0: objectness channel a at (y, x).
    hidden = np.maximum(_np(head.conv(maps[0])), 0)
    logits = _np(head.cls_logits(hidden))
    np.testing.assert_allclose(_np(out["objectness"])[:, :60].reshape(2, 4, 5, 3), logits,
                               atol=1e-5)


# ------------------------------------------------------------------ training
def _fit_data(size, rng):
    images = rng.uniform(0, 255, (2, size, size, 3)).astype("float32")
    boxes = np.array([[[10, 12, 60, 70], [50, 40, 90, 95]], [[0, 0, 0, 0], [0, 0, 0, 0]]],
                     "float32")
    labels = np.array([[0, 2], [-1, -1]], "int32")  # the second image has no objects
    return images, {"boxes": boxes, "labels": labels}


def small_model(cls=None, **kwargs):
    cls = cls or kdet.models.FasterRCNN
    settings = dict(num_classes=3, image_size=128, rpn_pre_nms_top_n_train=300,
                    rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                    rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, seed=1)
    settings.update(kwargs)
    return cls(**settings)


@slow_on_jax
def test_fit_finite_with_empty_image_and_batch_size_one(rng):
    images, y = _fit_data(96, rng)
    model = small_model(image_size=96)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    history = model.fit(images, y, batch_size=1, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    out = detections(model, images)
    assert set(out) == {"boxes", "scores", "labels", "num_detections"}
    assert all(np.all(np.isfinite(v)) for v in out.values())


@slow_on_jax
def test_keras_roundtrip(rng, tmp_path):
    images, _ = _fit_data(96, rng)
    model = small_model(image_size=96, box_score_thresh=0.0)
    before = detections(model, images)
    assert before["num_detections"].min() > 0
    path = str(tmp_path / "faster.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is kdet.models.FasterRCNN
    assert loaded.get_config() == model.get_config()
    after = detections(loaded, images)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-4, err_msg=key)


def test_predict_images_maps_boxes_back(rng):
    from kdet.models.detector import resize_and_pad

    model = small_model(image_size=96, box_score_thresh=0.0)
    small = rng.uniform(0, 255, (48, 72, 3)).astype("float32")  # scale 96 / 72
    out = model.predict_images([small])
    padded, scale = resize_and_pad(small, 96)
    direct = detections(model, padded[None])
    assert out["boxes"].shape == (1, 100, 4) and out["num_detections"][0] > 0
    np.testing.assert_allclose(out["boxes"], direct["boxes"] / scale, atol=1e-3)
    np.testing.assert_allclose(out["scale"], [scale])


@pytest.mark.slow
@pytest.mark.skipif(backend() != "tensorflow", reason="jit_compile on the TF backend")
def test_fit_jit_compile_tensorflow(rng):
    images, y = _fit_data(128, rng)
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=True)
    history = model.fit(images, y, batch_size=2, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_bad_targets_raise(rng):
    model = small_model(image_size=96)
    images, _ = _fit_data(96, rng)
    y_pred = model(images, training=True)
    with pytest.raises(ValueError, match="boxes"):
        model.compute_loss(images, {"labels": np.zeros((2, 1), "int32")}, y_pred)
    with pytest.raises(ValueError, match="multiple of 32"):
        kdet.models.FasterRCNN(num_classes=3, image_size=100)
    with pytest.raises(ValueError, match="version"):
        kdet.models.FasterRCNN(num_classes=3, image_size=128, version=3)


@slow_on_jax
@pytest.mark.parametrize("cls", ["FasterRCNN", "MaskRCNN"])
def test_predict_and_evaluate_with_a_dynamic_batch(cls, rng):
    """Keras traces predict / evaluate with batch size None (a smaller last batch): the RPN's
    anchor count must stay static, and the results must equal a call image by image."""
    model = small_model(getattr(kdet.models, cls), image_size=96, box_score_thresh=0.0)
    images = rng.uniform(0, 255, (3, 96, 96, 3)).astype("float32")
    out = model.predict(images, batch_size=2, verbose=0)
    one = detections(model, images[2:])
    for key in one:
        # batch 2 vs batch 1 changes float rounding (XLA on JAX): ~3e-3 px on boxes, which
        # moves pasted mask edges by that much (a few pixels differ by up to ~1e-2)
        if key == "masks":
            diff = np.abs(out[key][2:] - one[key])
            assert diff.mean() < 1e-5 and diff.max() < 0.05, (diff.mean(), diff.max())
            continue
        np.testing.assert_allclose(out[key][2:], one[key], atol=1e-2 if key == "boxes" else 1e-3,
                                   err_msg=key)
    y = {"boxes": np.tile(np.array([[[10., 12, 60, 70]]], "float32"), (3, 1, 1)),
         "labels": np.zeros((3, 1), "int32")}
    if cls == "MaskRCNN":
        y["masks"] = np.zeros((3, 1, 96, 96), "float32")
        y["masks"][:, 0, 12:70, 10:60] = 1
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    assert np.isfinite(model.evaluate(images, y, batch_size=2, verbose=0))


@pytest.mark.skipif(backend() != "tensorflow", reason="TensorFlow's predict_on_batch only (the "
                    "other backends keep Keras' copies)")
def test_predict_on_batch_returns_read_only_views_equal_to_predict(rng):
    """No copy of the outputs: read-only arrays (writing raises), equal to ``predict``'s,
    and still valid once the graph's tensors are gone and the model predicts again."""
    import gc

    model = small_model(kdet.models.MaskRCNN, image_size=96, box_score_thresh=0.0)
    images = rng.uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    out = model.predict_on_batch(images)
    expected = model.predict(images, batch_size=2, verbose=0)
    assert set(out) == set(expected) and out["masks"].shape == (2, 100, 96, 96)
    kept = {k: v.copy() for k, v in out.items()}
    gc.collect()
    model.predict_on_batch(images[::-1])  # fresh buffers in between
    for key, value in out.items():
        assert isinstance(value, np.ndarray) and not value.flags.writeable, key
        np.testing.assert_array_equal(value, kept[key], err_msg=key)
        np.testing.assert_allclose(value, expected[key], atol=1e-5, err_msg=key)
    with pytest.raises(ValueError, match="read-only"):
        out["boxes"][0, 0, 0] = 1.0
    writable = out["masks"].copy()
    writable[0] = 0.0  # a copy writes
