"""Faster / Mask R-CNN v2 against torchvision ``fasterrcnn_resnet50_fpn_v2`` /
``maskrcnn_resnet50_fpn_v2``.

As tests/test_faster_rcnn.py (whose helpers are reused): randomly initialised
torchvision models are converted with ``convert_torchvision`` (strict: every
checkpoint entry used) and both run on the same input. The v2 models have BN
in the FPN and the RoI heads, so every BN gets data-dependent running statistics
and random affine parameters first: a mis-mapped BN entry then changes the outputs.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import HAVE_TORCHVISION, once_on_tensorflow  # noqa: E402
from test_faster_rcnn import (BIG, MEAN, STD, TRAIN_TOP_N, _fit_data, _np,  # noqa: E402
                              check_detections, check_training_losses, detections,
                              run_torch_eval, slow_on_jax, small_model, synthetic_targets,
                              torch_images, torch_targets)

import keras  # noqa: E402

import kdet  # noqa: E402
from kdet.converters import convert_torchvision  # noqa: E402
from kdet.layers.roi_heads import FastRCNNConvFCHead, MaskRCNNHead  # noqa: E402
from kdet.utils import count_params  # noqa: E402

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")

# torchvision's parameter counts with 91 classes (kdet num_classes=90), weights=None
# (trainable BatchNorm2d in the ResNet) and with a FrozenBatchNorm2d ResNet, whose
# 53,120 BN weights and biases are buffers.
FASTER_V2, MASK_V2 = 43_712_278, 46_359_409
FASTER_V2_FROZEN, MASK_V2_FROZEN = 43_659_158, 46_306_289


def torchvision_v2(with_masks, num_classes, frozen_backbone_bn=False, **kwargs):
    """torchvision's ``*_resnet50_fpn_v2`` (weights=None); with ``frozen_backbone_bn`` the same
    model on a ``FrozenBatchNorm2d`` ResNet (the v1 builders' pretrained backbone)."""
    import torchvision
    from torch import nn
    from torchvision.models.detection import faster_rcnn, mask_rcnn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import FrozenBatchNorm2d

    detection = torchvision.models.detection
    if not frozen_backbone_bn:
        builder = detection.maskrcnn_resnet50_fpn_v2 if with_masks else \
            detection.fasterrcnn_resnet50_fpn_v2
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, 3, norm_layer=nn.BatchNorm2d)
    heads = dict(
        rpn_head=RPNHead(256, 3, conv_depth=2),
        box_head=faster_rcnn.FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024],
                                                norm_layer=nn.BatchNorm2d))
    if with_masks:
        heads["mask_head"] = mask_rcnn.MaskRCNNHeads(256, [256] * 4, 1,
                                                     norm_layer=nn.BatchNorm2d)
        return mask_rcnn.MaskRCNN(backbone, num_classes=num_classes, **heads, **kwargs)
    return faster_rcnn.FasterRCNN(backbone, num_classes=num_classes, **heads, **kwargs)


def torch_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ param counts
@once_on_tensorflow("the variables' shapes")
def test_param_counts_match_torchvision_numbers():
    faster = kdet.models.FasterRCNN(num_classes=90, version=2, image_size=128)
    assert count_params(faster) == FASTER_V2
    assert faster.name == "fasterrcnn_resnet50_fpn_v2"
    mask = kdet.models.MaskRCNN(num_classes=90, version=2, image_size=128)
    assert count_params(mask) == MASK_V2
    frozen = kdet.models.FasterRCNN(num_classes=90, version=2, image_size=128,
                                    backbone_norm="frozen_batch")
    assert count_params(frozen) == FASTER_V2_FROZEN


@once_on_tensorflow("the variables' shapes")
@needs_torchvision
@pytest.mark.parametrize("with_masks", [False, True])
def test_param_counts_equal_torchvision_builds(with_masks):
    cls = kdet.models.MaskRCNN if with_masks else kdet.models.FasterRCNN
    full, frozen = MASK_V2 if with_masks else FASTER_V2, \
        MASK_V2_FROZEN if with_masks else FASTER_V2_FROZEN
    assert torch_params(torchvision_v2(with_masks, 91)) == full
    assert torch_params(torchvision_v2(with_masks, 91, frozen_backbone_bn=True)) == frozen
    # another class count, computed by torchvision only
    assert count_params(cls(num_classes=4, version=2, image_size=96)) == torch_params(
        torchvision_v2(with_masks, 5))
    assert count_params(cls(num_classes=4, version=2, image_size=96,
                            backbone_norm="frozen_batch")) == torch_params(
        torchvision_v2(with_masks, 5, frozen_backbone_bn=True))


def test_bad_version_raises():
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        kdet.models.FasterRCNN(num_classes=3, image_size=96, version=3)


# ------------------------------------------------------------------ head layers
@pytest.mark.parametrize("head", ["box", "mask"])
def test_head_batch_norm_statistics_ignore_masked_rois(head):
    """Training-mode BN statistics come from the RoIs marked in ``roi_mask`` only: the real
    RoIs of a padded batch give the outputs of those RoIs alone in an unpadded batch."""
    rng = np.random.default_rng(0)
    if head == "box":
        layer = FastRCNNConvFCHead((8, 8), (16,), norm="batch")
        x = rng.normal(size=(2, 5, 7, 7, 4)).astype("float32")
    else:
        layer = MaskRCNNHead(num_classes=3, layers=(8, 8), dim_reduced=8, norm="batch")
        x = rng.normal(size=(2, 5, 6, 6, 4)).astype("float32")
    roi_mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], bool)
    x[~roi_mask] = 50.0  # padding far off the data: it would dominate the statistics
    padded = _np(layer(x, training=True, roi_mask=roi_mask))
    compact = _np(layer(x[roi_mask][None], training=True))[0]
    np.testing.assert_allclose(padded[roi_mask], compact, rtol=1e-4, atol=1e-4)
    unmasked = _np(layer(x, training=True))
    assert np.abs(unmasked[roi_mask] - compact).max() > 1e-2  # the mask matters
    # Inference uses the moving statistics: the mask is irrelevant there.
    np.testing.assert_allclose(_np(layer(x, training=False, roi_mask=roi_mask)),
                               _np(layer(x, training=False)), atol=1e-6)


@needs_torchvision
def test_conv_fc_head_matches_torchvision_layer():
    import torch
    from torch import nn
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead as Reference

    torch.manual_seed(0)
    ref = Reference((4, 7, 7), [8, 8], [16], norm_layer=nn.BatchNorm2d)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, nn.BatchNorm2d):
                _randomise_bn(module)
    layer = FastRCNNConvFCHead((8, 8), (16,), norm="batch")
    x = np.random.default_rng(1).normal(size=(1, 6, 7, 7, 4)).astype("float32")
    layer(x)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    for i in range(2):
        layer.convs[i].kernel.assign(state[f"{i}.0.weight"].transpose(2, 3, 1, 0))
        bn = layer.norms[i]
        bn.gamma.assign(state[f"{i}.1.weight"])
        bn.beta.assign(state[f"{i}.1.bias"])
        bn.moving_mean.assign(state[f"{i}.1.running_mean"])
        bn.moving_variance.assign(state[f"{i}.1.running_var"])
    layer.fcs[0].kernel.assign(state["3.weight"].T)  # Flatten is module 2
    layer.fcs[0].bias.assign(state["3.bias"])
    torch_x = torch.from_numpy(x[0].transpose(0, 3, 1, 2).copy())
    for training in (False, True):
        ref.train(training)
        with torch.no_grad():
            expected = ref(torch_x).numpy()
        np.testing.assert_allclose(_np(layer(x, training=training))[0], expected, rtol=1e-4,
                                   atol=1e-4, err_msg=f"training={training}")


# ------------------------------------------------------------------ torchvision parity
def _randomise_bn(module):
    """Random affine parameters and running statistics (near the identity)."""
    import torch

    count = module.num_features
    module.weight.copy_(torch.empty(count).uniform_(0.7, 1.3))
    module.bias.copy_(torch.empty(count).normal_(0, 0.1))
    module.running_mean.copy_(torch.empty(count).normal_(0, 0.1))
    module.running_var.copy_(torch.empty(count).uniform_(0.7, 1.3))


def calibrate_bn(tv, size, with_masks):
    """Running statistics = the batch statistics of one train-mode step on random images, then
    random BN affine parameters: distinct per-channel values everywhere, and activations of
    unit scale (with unit running statistics a random ResNet's features reach ~1e3, and
    float32 noise then moves boxes by more than the tolerances)."""
    import torch
    from torch import nn

    norms = [m for m in tv.modules() if isinstance(m, nn.BatchNorm2d)]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average: this one batch
    images = np.random.default_rng(5).uniform(0, 255, (2, size, size, 3)).astype("float32")
    tv.train()
    with torch.no_grad():
        tv(torch_images(images), torch_targets(synthetic_targets(size, with_masks)))
    tv.eval()
    with torch.no_grad():
        for module in norms:
            module.momentum = 0.1
            count = module.num_features
            module.weight.copy_(torch.empty(count).uniform_(0.7, 1.3))
            module.bias.copy_(torch.empty(count).normal_(0, 0.1))


def torch_pair_v2(cls, size, num_fg, seed=0, **kdet_kwargs):
    """A random torchvision v2 model (eval, BNs randomised) and the kdet model converted from it
    (as ``test_faster_rcnn.torch_pair``)."""
    import torch

    torch.manual_seed(seed)
    tv = torchvision_v2(cls is kdet.models.MaskRCNN, num_fg + 1, min_size=size, max_size=size,
                        image_mean=MEAN, image_std=STD, rpn_batch_size_per_image=BIG,
                        box_batch_size_per_image=BIG, rpn_pre_nms_top_n_train=TRAIN_TOP_N[0],
                        rpn_post_nms_top_n_train=TRAIN_TOP_N[1]).eval()
    calibrate_bn(tv, size, cls is kdet.models.MaskRCNN)
    with torch.no_grad():
        # v2's two RPN convs give logits of std ~3e-3 here: near ties would make the
        # proposal order arbitrary. Spread them (std ~0.3; v1's single conv needs x0.05).
        tv.rpn.head.cls_logits.weight.mul_(5.0)
        tv.roi_heads.box_predictor.cls_score.weight.mul_(3.0)
    model = cls(num_classes=num_fg, version=2, image_size=size, rpn_batch_size_per_image=BIG,
                box_batch_size_per_image=BIG, rpn_pre_nms_top_n_train=TRAIN_TOP_N[0],
                rpn_post_nms_top_n_train=TRAIN_TOP_N[1], **kdet_kwargs)
    # strict (the default): every torchvision entry has a kdet weight and vice versa
    convert_torchvision({k: v.numpy() for k, v in tv.state_dict().items()}, model)
    return tv, model


@pytest.fixture(scope="module")
def faster_v2_pair():
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision not installed")
    return torch_pair_v2(kdet.models.FasterRCNN, 160, 4)


@pytest.fixture(scope="module")
def mask_v2_pair():
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision not installed")
    return torch_pair_v2(kdet.models.MaskRCNN, 160, 4, mask_batch_size_per_image=64)


def check_proposals(ref, out):
    """Same proposals (1e-2 px) in the same score order, up to swaps of neighbours (with a few
    hundred proposals some scores differ by less than float32 noise)."""
    valid = out["proposals_valid"][0]
    proposals = out["proposals"][0][valid]
    assert len(proposals) == len(ref["proposals"]) > 100
    assert np.all(valid[:len(proposals)])
    dist = np.abs(proposals[None] - ref["proposals"][:, None]).max(-1)  # [ref, kdet]
    used = set()
    for i in range(len(proposals)):  # (boxes clipped to the image repeat across levels)
        near = [j for j in range(max(0, i - 2), min(len(proposals), i + 3))
                if j not in used and dist[i, j] < 1e-2]
        assert near, (i, ref["proposals"][i])
        used.add(min(near, key=lambda j: abs(j - i)))


# The inference tests run before the training ones: a train-mode forward moves the BN
# running statistics of both models (by different rules: torch's unbiased variance).
@slow_on_jax
def test_faster_v2_inference_matches_torchvision(faster_v2_pair):
    tv, model = faster_v2_pair
    image = np.random.default_rng(0).uniform(0, 255, (160, 160, 3)).astype("float32")
    ref = run_torch_eval(tv, image)
    out = {k: _np(v) for k, v in model(image[None], training=False).items()}
    check_proposals(ref, out)
    check_detections(ref, out)


@slow_on_jax
def test_faster_v2_training_losses_match_torchvision(faster_v2_pair):
    tv, model = faster_v2_pair
    check_training_losses(tv, model, 160, with_masks=False)


@slow_on_jax
def test_mask_v2_inference_matches_torchvision(mask_v2_pair):
    tv, model = mask_v2_pair
    image = np.random.default_rng(2).uniform(0, 255, (160, 160, 3)).astype("float32")
    ref = run_torch_eval(tv, image)
    out = {k: _np(v) for k, v in model(image[None], training=False).items()}
    check_proposals(ref, out)
    order = check_detections(ref, out)
    n = int(out["num_detections"][0])
    ref_masks = ref["masks"][:, 0]
    diff = np.abs(out["masks"][0][order] - ref_masks)
    assert diff.mean() < 1e-3, diff.mean()
    assert np.quantile(diff, 0.999) < 1e-2
    assert np.all(out["masks"][0][n:] == 0)
    assert ref_masks.max() > 0.5


@slow_on_jax
def test_mask_v2_training_losses_match_torchvision(mask_v2_pair):
    tv, model = mask_v2_pair
    check_training_losses(tv, model, 160, with_masks=True)


@needs_torchvision
def test_build_torchvision_v2_is_the_coco_layout():
    from kdet.converters.torchvision import architecture_of, build_torchvision

    for name, cls, count in (("fasterrcnn_resnet50_fpn_v2", kdet.models.FasterRCNN, FASTER_V2),
                             ("maskrcnn_resnet50_fpn_v2", kdet.models.MaskRCNN, MASK_V2)):
        model = build_torchvision(name, image_size=96)
        assert type(model) is cls and model.num_classes == 90
        assert architecture_of(model) == name
        assert count_params(model) == count  # v2 keeps trainable BN in the ResNet


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
                                  "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_zoo_cards_build_torchvision_architectures(name):
    from kdet import zoo
    from kdet.converters.torchvision import architecture_of

    card = zoo.get_card(name)
    model = zoo.build(name, image_size=96)
    assert architecture_of(model) == name and model.num_classes == 90
    # the card's count is torchvision's weights meta (frozen BN in v1, trainable in v2)
    assert count_params(model) == card["metrics"]["num_params"]
    assert card["source"]["url"].rsplit("-", 1)[1].startswith(card["sha256_prefix"])


# ------------------------------------------------------------------ training and saving
def _bn_state(model):
    return _np(model.get_layer("roi_heads").box_head.norms[0].moving_mean).copy()


@slow_on_jax
def test_v2_fit_updates_head_batch_norm_and_keras_roundtrip(rng, tmp_path):
    images, y = _fit_data(96, rng)
    model = small_model(version=2, image_size=96, box_score_thresh=0.0)
    before_bn = _bn_state(model)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    history = model.fit(images, y, batch_size=1, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # The box head runs in the loss, outside the model call: it must still train its BN.
    assert np.abs(_bn_state(model) - before_bn).max() > 1e-6
    before = detections(model, images)
    assert before["num_detections"].min() > 0
    path = str(tmp_path / "faster_v2.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is kdet.models.FasterRCNN and loaded.get_config() == model.get_config()
    after = detections(loaded, images)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-4, err_msg=key)
    # evaluate runs the heads' BN in inference mode: the statistics stay put.
    state = _bn_state(loaded)
    loaded.compile(optimizer=keras.optimizers.SGD(1e-3))
    assert np.isfinite(loaded.evaluate(images, y, batch_size=2, verbose=0))
    np.testing.assert_array_equal(_bn_state(loaded), state)


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["FasterRCNN", "MaskRCNN"])
def test_v2_fit_tf_data_jit_compile(cls, rng):
    import tensorflow as tf

    images, y = _fit_data(96, rng)
    if cls == "MaskRCNN":
        y["masks"] = np.zeros((2, 2, 96, 96), "float32")
        y["masks"][0, 0, 12:70, 10:60] = 1
        y["masks"][0, 1, 40:95, 50:90] = 1
    model = small_model(getattr(kdet.models, cls), version=2, image_size=96)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=True)
    data = tf.data.Dataset.from_tensor_slices((images, y)).batch(2, drop_remainder=True)
    history = model.fit(data, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    out = model.predict_images([images[0].astype("uint8")])
    assert out["boxes"].shape == (1, 100, 4)
    if cls == "MaskRCNN":
        assert out["masks"].shape == (1, 100, 96, 96)


@slow_on_jax  # ~2.5 min on JAX: predict_images compiles the whole Mask R-CNN
def test_v2_predict_images_shapes(rng):
    model = small_model(kdet.models.MaskRCNN, version=2, image_size=96, box_score_thresh=0.0)
    out = model.predict_images([rng.uniform(0, 255, (48, 72, 3)).astype("float32")])
    assert out["boxes"].shape == (1, 100, 4) and out["masks"].shape == (1, 100, 96, 96)
    assert out["num_detections"][0] > 0
