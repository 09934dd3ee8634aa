"""Mask R-CNN R50-FPN against torchvision ``maskrcnn_resnet50_fpn``.

Same approach as tests/test_faster_rcnn.py (whose helpers are reused): a
random torchvision model is converted and both run on the same input; the
mask branch adds pasted-mask parity, the mask loss, and the pieces
(``paste_masks``, ``project_masks_on_boxes``) against torchvision's own.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import HAVE_TORCHVISION, once_on_tensorflow  # noqa: E402
from test_faster_rcnn import (_fit_data, _np, check_detections, check_training_losses,  # noqa: E402
                              detections, run_torch_eval, slow_on_jax, small_model, torch_pair)

import keras  # noqa: E402

import kdet  # noqa: E402
from kdet.layers.roi_heads import MaskRCNNHead, paste_masks  # noqa: E402
from kdet.models.faster_rcnn import project_masks_on_boxes  # noqa: E402
from kdet.utils import count_params  # noqa: E402

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")


@once_on_tensorflow("the variables' shapes")
def test_param_counts_match_torchvision():
    model = kdet.models.MaskRCNN(num_classes=90, image_size=128)  # torchvision's 91
    assert count_params(model) == 44_454_513
    frozen = kdet.models.MaskRCNN(num_classes=90, image_size=128, backbone_norm="frozen_batch")
    assert count_params(frozen) == 44_401_393


@pytest.fixture(scope="module")
def mask_pair():
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision not installed")
    return torch_pair("maskrcnn_resnet50_fpn", kdet.models.MaskRCNN, 160, 4,
                      mask_batch_size_per_image=64)


@slow_on_jax
def test_inference_with_masks_matches_torchvision(mask_pair):
    tv, model = mask_pair
    image = np.random.default_rng(2).uniform(0, 255, (160, 160, 3)).astype("float32")
    ref = run_torch_eval(tv, image)
    out = {k: _np(v) for k, v in model(image[None], training=False).items()}
    order = check_detections(ref, out)
    n = int(out["num_detections"][0])
    masks = out["masks"][0]
    assert masks.shape == (100, 160, 160)
    ref_masks = ref["masks"][:, 0]  # [D, 1, H, W] probabilities in torchvision
    diff = np.abs(masks[order] - ref_masks)
    assert diff.mean() < 1e-3, diff.mean()
    assert np.quantile(diff, 0.999) < 1e-2  # rare box-edge pixels move by one on 1e-3 px box noise
    assert np.all(masks[n:] == 0)
    assert ref_masks.max() > 0.5  # the masks are not trivially empty


@slow_on_jax
def test_training_losses_match_torchvision(mask_pair):
    tv, model = mask_pair
    check_training_losses(tv, model, 160, with_masks=True)


@needs_torchvision
def test_paste_masks_matches_torchvision(rng):
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    height, width = 50, 70
    # Detections are clipped to the image (torchvision's paste fails on boxes
    # outside it); the 30/28 growth still pushes boxes at the border outside.
    xy = rng.uniform(0, 48, (40, 2))
    wh = np.concatenate([rng.uniform(0.2, 3, (8, 2)), rng.uniform(3, 60, (32, 2))])
    boxes = np.concatenate([xy, xy + wh], 1).clip(0, [width, height, width, height])
    boxes = boxes.astype("float32")
    masks = rng.uniform(0, 1, (40, 28, 28)).astype("float32")
    ref = paste_masks_in_image(torch.from_numpy(masks[:, None]), torch.from_numpy(boxes),
                               (height, width)).numpy()[:, 0]
    out = _np(paste_masks(masks[None], boxes[None], (height, width)))[0]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5)


@needs_torchvision
def test_project_masks_matches_torchvision(rng):
    import torch
    from torchvision.models.detection.roi_heads import project_masks_on_boxes as reference

    size = 64
    gt = (rng.uniform(0, 1, (2, 3, size, size)) > 0.5).astype("float32")
    xy = rng.uniform(0, 40, (2, 5, 2))
    rois = np.concatenate([xy, xy + rng.uniform(2, 30, (2, 5, 2))], -1).astype("float32")
    matches = rng.integers(0, 3, (2, 5)).astype("int32")
    out = _np(project_masks_on_boxes(gt, rois, matches, (size, size), 28))
    for b in range(2):
        ref = reference(torch.from_numpy(gt[b]), torch.from_numpy(rois[b]),
                        torch.from_numpy(matches[b]).long(), 28).numpy()
        np.testing.assert_allclose(out[b], ref, atol=1e-5)
    # Masks stored at half resolution: RoIs are scaled to the mask grid.
    half = gt[:, :, ::2, ::2]
    out_half = _np(project_masks_on_boxes(half, rois, matches, (size, size), 28))
    ref_half = reference(torch.from_numpy(half[0]), torch.from_numpy(rois[0] / 2),
                         torch.from_numpy(matches[0]).long(), 28).numpy()
    np.testing.assert_allclose(out_half[0], ref_half, atol=1e-5)


def test_mask_head_shapes_and_transposed_conv_layout():
    head = MaskRCNNHead(num_classes=3, layers=(4,), dim_reduced=5)
    x = np.random.default_rng(0).normal(size=(1, 2, 14, 14, 6)).astype("float32")
    out = _np(head(x))
    assert out.shape == (1, 2, 28, 28, 3)
    # 2x2/s2 transposed conv: output pixel (2i + a, 2j + b) reads input (i, j) with kernel (a, b).
    hidden = np.maximum(_np(head.convs[0](x[0])), 0)
    kernel = _np(head.conv5_mask.kernel)  # (2, 2, out, in)
    bias = _np(head.conv5_mask.bias)
    up = np.einsum("rijc,abdc->riajbd", hidden, kernel).reshape(2, 28, 28, 5) + bias
    logits = np.maximum(up, 0) @ _np(head.mask_fcn_logits.kernel)[0, 0] + _np(
        head.mask_fcn_logits.bias)
    np.testing.assert_allclose(out[0], logits, atol=1e-4)


@pytest.mark.parametrize("norm", [None, "batch"])
def test_mask_head_column_logits_equal_the_full_logits_column(norm):
    """Inference reads one column per RoI (the detected class): ``column_logits`` equals
    that column of the full logits, for each RoI's own column (repeats, the background's
    and the last included), batch 2, v1 and v2 heads (with non-trivial BN statistics)."""
    rng = np.random.default_rng(3)
    head = MaskRCNNHead(num_classes=6, layers=(8, 8), dim_reduced=7, norm=norm)
    x = rng.normal(size=(2, 4, 14, 14, 5)).astype("float32")
    head.build(x.shape)
    head.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") + (
        1.0 if "variance" in w.path else 0.0) for w in head.weights])
    head.mask_fcn_logits.bias.assign(rng.normal(0, 1, (6,)).astype("float32"))
    columns = np.array([[0, 5, 5, 2], [3, 1, 0, 4]], "int32")
    full = _np(head(x, training=False))
    got = _np(head.column_logits(x, columns))
    assert got.shape == (2, 4, 28, 28)
    expected = np.take_along_axis(full, columns[:, :, None, None, None], axis=-1)[..., 0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def _mask_fit_data(size, rng):
    images, y = _fit_data(size, rng)
    masks = np.zeros((2, 2, size, size), "float32")
    for n in range(2):
        x0, y0, x1, y1 = y["boxes"][0, n].astype(int)
        masks[0, n, y0:y1, x0:x1] = 1
    y["masks"] = masks
    return images, y


@pytest.mark.slow  # ~40 s on TF: traced fit + a 180 MB .keras file
def test_fit_finite_and_keras_roundtrip(rng, tmp_path):
    images, y = _mask_fit_data(96, rng)
    model = small_model(kdet.models.MaskRCNN, image_size=96)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    history = model.fit(images, y, batch_size=1, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # Eager calls (model.predict is covered by the parity test; tracing it twice costs 10 s).
    before = detections(model, images)
    assert before["masks"].shape == (2, 100, 96, 96)
    assert np.all((before["masks"] >= 0) & (before["masks"] <= 1))
    path = str(tmp_path / "mask.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is kdet.models.MaskRCNN
    after = detections(loaded, images)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-4, err_msg=key)


def test_missing_masks_raise(rng):
    model = small_model(kdet.models.MaskRCNN, image_size=96)
    images, y = _fit_data(96, rng)
    with pytest.raises(ValueError, match="masks"):
        model.compute_loss(images, y, model(images, training=True))


@pytest.mark.slow
def test_overfits_two_pennfudan_images(shared_data):
    from kdet.data.masks import MaskFolderDataset
    from kdet.models.detector import resize_and_pad

    size = 128
    ds = MaskFolderDataset(shared_data / "pennfudan")
    images, boxes, labels, masks = [], [], [], []
    num = 4
    for index in range(2):
        ex = ds[index]
        image, scale = resize_and_pad(ex["image"], size)
        n = min(len(ex["boxes"]), num)
        b = np.zeros((num, 4), "float32")
        b[:n] = ex["boxes"][:n] * scale
        lab = np.full((num,), -1, "int32")
        lab[:n] = ex["labels"][:n]
        m = np.zeros((num, size, size), "float32")
        for k in range(n):
            resized, _ = resize_and_pad(np.repeat(ex["masks"][k][..., None] * 255.0, 3, -1), size)
            m[k] = resized[..., 0] / 255.0 > 0.5
        images.append(image), boxes.append(b), labels.append(lab), masks.append(m)
    x = np.stack(images)
    y = {"boxes": np.stack(boxes), "labels": np.stack(labels), "masks": np.stack(masks)}
    model = small_model(kdet.models.MaskRCNN, num_classes=1, image_size=size)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    history = model.fit(x, y, batch_size=2, epochs=40, verbose=0)
    losses = history.history["loss"]
    print("pennfudan overfit losses", losses[0], losses[-1])
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] / 4, losses


def test_named_backbones_rebuild_from_config():
    """backbone="mobilenet_v2" (what examples/finetune_pennfudan.py trains) is config-serialisable;
    unknown names are refused with the choices."""
    model = kdet.models.MaskRCNN(num_classes=1, backbone="mobilenet_v2", image_size=128)
    clone = kdet.models.MaskRCNN.from_config(model.get_config())
    assert count_params(clone) == count_params(model)
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    assert sorted(backbone.output) == ["C2", "C3", "C4", "C5"]
    with pytest.raises(ValueError, match="unknown MaskRCNN backbone 'vgg16'.*mobilenet_v2"):
        kdet.models.MaskRCNN(num_classes=1, backbone="vgg16", image_size=128)


@slow_on_jax
def test_mask_head_on_the_detected_rows_only_gives_the_same_masks():
    # RoIHeads runs the mask head and the paste on the smallest bucket of leading rows
    # holding every image's detections; the masks must equal those of all D rows.
    keras.utils.set_random_seed(0)
    model = kdet.models.MaskRCNN(num_classes=3, image_size=128, box_score_thresh=0.0,
                                 box_detections_per_img=40)
    images = np.random.default_rng(0).uniform(0, 255, (1, 128, 128, 3)).astype("float32")
    heads = model.roi_heads
    heads.skip_padded_masks = False
    full = {k: _np(v) for k, v in model(images, training=False).items()}
    assert full["num_detections"].min() == 40  # threshold 0: every row is a detection
    scores = np.sort(full["scores"].ravel())[::-1]
    counts = []
    # thresholds giving 40 (all D), ~20 (bucket 32), ~5 (bucket 8) and 0 detections
    for threshold in (0.0, float(scores[19]), float(scores[4]), 1.0):
        heads.score_threshold = threshold
        heads.skip_padded_masks = False
        every_row = {k: _np(v) for k, v in model(images, training=False).items()}
        heads.skip_padded_masks = True
        fast = {k: _np(v) for k, v in model(images, training=False).items()}
        counts.append(int(fast["num_detections"].max()))
        np.testing.assert_array_equal(fast["labels"], every_row["labels"])
        # float rounding only: fewer rows (another conv batch), or XLA fusing inside a cond
        np.testing.assert_allclose(fast["masks"], every_row["masks"], atol=2e-4)
        for b, n in enumerate(fast["num_detections"]):
            assert np.all(fast["masks"][b, n:] == 0)
    assert counts[0] == 40 and 8 < counts[1] <= 32 and 0 < counts[2] <= 8 and counts[3] == 0
    assert fast["masks"].shape == (1, 40, 128, 128)


def _mask_loss_scene(seed):
    """A 64 px Mask R-CNN, its pyramid (2 images), 64 RoI corners and 2 GT masks an image."""
    keras.utils.set_random_seed(0)
    model = kdet.models.MaskRCNN(num_classes=3, image_size=64)
    rng = np.random.default_rng(seed)
    features = [rng.normal(size=(2, 64 // 2 ** lv, 64 // 2 ** lv, 256)).astype("float32")
                for lv in (2, 3, 4, 5)]
    xy = rng.uniform(0, 40, size=(2, 64, 2))
    gt_masks = (rng.uniform(size=(2, 2, 64, 64)) > 0.5).astype("float32")
    return model, rng, features, xy, gt_masks


def _foreground_roi(rng, xy, foreground):
    """``encode_roi_targets``-like RoIs of 2 images with ``foreground[b]`` labelled RoIs."""
    labels = np.full((2, 64), -1, "int32")
    for b, count in enumerate(foreground):
        labels[b, rng.choice(64, size=count, replace=False)] = rng.integers(0, 3, count)
    return {"labels": labels, "matches": rng.integers(0, 2, size=(2, 64)).astype("int32"),
            "rois": np.concatenate([xy, xy + rng.uniform(4, 24, (2, 64, 2))], -1)
            .astype("float32")}


@slow_on_jax
def test_mask_loss_on_the_foreground_rows_only_gives_the_same_loss(monkeypatch):
    # mask_rcnn_loss packs the foreground RoIs of the batch into the smallest bucket of
    # rows holding them all and runs targets, RoIAlign and the mask head there: loss and
    # gradient must equal those of all B x max_rois rows (buckets off), whichever bucket
    # the counts pick. Buckets (2, 4, 8, 16) of 2 x 16 slots stand in for
    # (16, 32, ..., 192) of 2 x 128 (the same code). The packed rows read the features
    # by the gather route (as in any cond branch of a graph) and their row counts pick
    # other Winograd tiles: both routes fixed, so that only the packing is compared.
    from kdet.layers import conv
    from kdet.models import faster_rcnn

    monkeypatch.setattr(sys.modules["kdet.ops.roi_align"], "CROP_AND_RESIZE", False)
    monkeypatch.setattr(conv, "WINOGRAD", False)

    model, rng, features, xy, gt_masks = _mask_loss_scene(0)

    def loss_and_grad(roi):
        weights = model.roi_heads.mask_head.trainable_variables
        if keras.backend.backend() != "tensorflow":
            return _np(faster_rcnn.mask_rcnn_loss(model.roi_heads, features, roi, gt_masks,
                                                  (64, 64), 16)), []
        import tensorflow as tf
        with tf.GradientTape() as tape:
            loss = faster_rcnn.mask_rcnn_loss(model.roi_heads, features, roi, gt_masks,
                                              (64, 64), 16)
        return _np(loss), [_np(g) for g in tape.gradient(loss, weights)]

    # foreground RoIs per image: bucket 2, 4, 8, 16 and all 2 x 16 slots
    for foreground in ((0, 0), (1, 1), (3, 1), (7, 1), (2, 7), (16, 12)):
        roi = _foreground_roi(rng, xy, foreground)
        monkeypatch.setattr(faster_rcnn, "MASK_TRAIN_ROW_BUCKETS", (2, 4, 8, 16))
        loss, grads = loss_and_grad(roi)
        monkeypatch.setattr(faster_rcnn, "MASK_TRAIN_ROW_BUCKETS", ())
        every_row_loss, every_row_grads = loss_and_grad(roi)
        np.testing.assert_allclose(loss, every_row_loss, rtol=1e-5, atol=1e-6)
        assert (loss > 0) == (max(foreground) > 0)
        for got, expected in zip(grads, every_row_grads):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="counts the rows of the branch that runs (eager tf.cond)")
def test_mask_loss_runs_the_mask_head_on_the_batch_foreground_count_bucket(monkeypatch):
    # torchvision runs the mask head on the batch's foreground RoIs alone. The rows kdet
    # runs come from the batch's total count, not B x the largest image's count: with
    # 7 + 1 foreground RoIs and buckets (2, 4, 8, 16) the head sees 8 rows (per-image
    # buckets of the largest count ran 2 x 8 = 16), with 3 + 1 it sees 4.
    from kdet.models import faster_rcnn

    model, rng, features, xy, gt_masks = _mask_loss_scene(1)
    heads = model.roi_heads
    seen = []
    original = heads.mask_logits

    def counting(features, rois, **kwargs):
        seen.append(int(np.prod(rois.shape[:2])))
        return original(features, rois, **kwargs)

    monkeypatch.setattr(heads, "mask_logits", counting)
    monkeypatch.setattr(faster_rcnn, "MASK_TRAIN_ROW_BUCKETS", (2, 4, 8, 16))
    for foreground, rows in (((7, 1), 8), ((3, 1), 4), ((0, 9), 16), ((16, 12), 32)):
        roi = _foreground_roi(rng, xy, foreground)
        seen.clear()
        faster_rcnn.mask_rcnn_loss(heads, features, roi, gt_masks, (64, 64), 16)
        assert seen == [rows], (foreground, seen)


def test_pack_selected_rows_packs_the_batch_in_image_order():
    from kdet.models.faster_rcnn import pack_selected_rows

    selected = np.array([[False, True, True, False], [True, False, False, True]])
    index, valid = pack_selected_rows(selected, 6)
    assert _np(index).tolist() == [1, 2, 4, 7, 0, 0]
    assert _np(valid).tolist() == [True] * 4 + [False] * 2
    index, valid = pack_selected_rows(selected, 3)
    assert _np(index).tolist() == [1, 2, 4] and _np(valid).all()


@pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
def test_head_biases_start_as_torchvisions():
    """torchvision leaves the box head's and predictors' biases at torch's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (its own inits touch the weights only); kdet draws
    them the same way (it had zeros). Compared per variable with torchvision's modules: the
    same bound (the largest |value| within 10% of it) and a uniform's std (bound / sqrt(3))."""
    import torch
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    from kdet.layers.roi_heads import FastRCNNPredictor as KPredictor
    from kdet.layers.roi_heads import TwoMLPHead as KTwoMLP

    torch.manual_seed(0)
    keras.utils.set_random_seed(0)
    box_head, predictor = KTwoMLP(1024), KPredictor(91)
    box_head.build((2, 3, 7, 7, 256))
    predictor.build((2, 3, 1024))
    mask_head = MaskRCNNHead(91)
    mask_head.build((2, 3, 14, 14, 256))
    pairs = [
        (box_head.fc6.bias, TwoMLPHead(256 * 49, 1024).fc6.bias),
        (box_head.fc7.bias, TwoMLPHead(256 * 49, 1024).fc7.bias),
        (predictor.cls_score.bias, FastRCNNPredictor(1024, 91).cls_score.bias),
        (predictor.bbox_pred.bias, FastRCNNPredictor(1024, 91).bbox_pred.bias),
        (mask_head.conv5_mask.bias, MaskRCNNPredictor(256, 256, 91).conv5_mask.bias),
        (mask_head.mask_fcn_logits.bias, MaskRCNNPredictor(256, 256, 91).mask_fcn_logits.bias),
    ]
    for mine, theirs in pairs:
        mine, theirs = _np(mine), theirs.detach().numpy()
        assert mine.shape == theirs.shape
        bound = np.abs(theirs).max()
        assert 0.9 * bound <= np.abs(mine).max() <= bound / 0.9, (mine.shape, bound)
        assert mine.std() == pytest.approx(theirs.std(), rel=0.2), mine.shape
