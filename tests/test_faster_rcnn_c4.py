"""Faster R-CNN C4 (``FasterRCNN(fpn=False)``) against a torchvision C4 model.

torchvision has no C4 builder; the reference is ``torchvision.models.detection.FasterRCNN``
built here from a ResNet-50 cut after ``layer3`` (``IntermediateLayerGetter``), anchors
(128, 256, 512) x (0.5, 1, 2) on that stride-16 map, ``MultiScaleRoIAlign(["0"], 14, 2)``,
the box head ``nn.Sequential(resnet.layer4, AdaptiveAvgPool2d(1), Flatten())`` and
``FastRCNNPredictor(2048, K + 1)``. As tests/test_faster_rcnn.py (whose helpers are reused):
the random torchvision model is converted with ``convert_torchvision`` (strict) and both
run on the same images: RPN proposals, detections and the four loss terms must agree.

Time: the res5 head runs on every RoI (14 x 14 -> 7 x 7 x 2048), so the parity models keep
few proposals (600 -> 25 at inference, 300 -> 20 in training) on 256 px images (at 128 px the
large anchors leave only ~12 proposals after NMS).
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import HAVE_TORCHVISION, backend  # noqa: E402
from test_faster_rcnn import (BIG, MEAN, STD, _fit_data, _np,  # noqa: E402
                              check_detections, check_training_losses, detections,
                              run_torch_eval, slow_on_jax)
from test_rcnn_v2 import calibrate_bn  # noqa: E402

import keras  # noqa: E402

import kdet  # noqa: E402
from kdet.converters import convert_torchvision  # noqa: E402
from kdet.layers.roi_heads import ResNetRoIHead  # noqa: E402
from kdet.utils import count_params  # noqa: E402

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")

# torchvision's parameter counts of the C4 model with 91 classes (kdet num_classes=90):
# BatchNorm2d ResNet, and FrozenBatchNorm2d ResNet (53,120 BN weights and biases are buffers).
C4_PARAMS, C4_PARAMS_FROZEN = 33_924_660, 33_871_540
SIZE = 256
TOP_N = dict(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=20,
             rpn_pre_nms_top_n_test=600, rpn_post_nms_top_n_test=25)


def torchvision_c4(num_classes, frozen_bn=False, **kwargs):
    """torchvision's FasterRCNN on C4 with the res5 box head (see the module docstring)."""
    import torchvision
    from torch import nn
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

    norm = dict(norm_layer=FrozenBatchNorm2d) if frozen_bn else {}
    resnet = torchvision.models.resnet50(weights=None, **norm)
    body = IntermediateLayerGetter(resnet, {"layer3": "0"})
    body.out_channels = 1024
    return FasterRCNN(
        body, num_classes=None,
        rpn_anchor_generator=AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=2),
        box_head=nn.Sequential(resnet.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        box_predictor=FastRCNNPredictor(2048, num_classes), **kwargs)


def torch_params(model):
    return sum(p.numel() for p in model.parameters())


def c4(**kwargs):
    return kdet.models.FasterRCNN(fpn=False, **kwargs)


# ------------------------------------------------------------------ param counts
# Counts do not depend on the backend; building the ResNet-50 models takes ~4x longer on JAX.
@slow_on_jax
def test_c4_param_counts_match_torchvision_numbers():
    model = c4(num_classes=90, image_size=128)
    assert model.name == "fasterrcnn_resnet50_c4"
    assert count_params(model) == C4_PARAMS
    assert count_params(c4(num_classes=90, image_size=128,
                           backbone_norm="frozen_batch")) == C4_PARAMS_FROZEN


@slow_on_jax
@needs_torchvision
def test_c4_param_counts_equal_torchvision_builds():
    assert torch_params(torchvision_c4(91)) == C4_PARAMS
    assert torch_params(torchvision_c4(91, frozen_bn=True)) == C4_PARAMS_FROZEN
    for frozen in (False, True):  # another class count, computed by torchvision only
        model = c4(num_classes=4, image_size=96,
                   backbone_norm="frozen_batch" if frozen else "batch")
        assert count_params(model) == torch_params(torchvision_c4(5, frozen_bn=frozen))


def test_c4_bad_settings_raise():
    with pytest.raises(ValueError, match="fpn=False"):
        c4(num_classes=3, image_size=96, version=2)
    with pytest.raises(ValueError, match="fpn=False"):
        c4(num_classes=3, image_size=96, backbone="mobilenet_v2")
    with pytest.raises(ValueError, match="fpn=False"):
        kdet.models.MaskRCNN(num_classes=3, image_size=96, fpn=False)


# ------------------------------------------------------------------ converter
@needs_torchvision
def test_build_torchvision_c4_and_strict_conversion_of_frozen_layout():
    from kdet.converters.torchvision import architecture_of, build_torchvision

    model = build_torchvision("fasterrcnn_resnet50_c4", num_classes=4, image_size=96)
    assert architecture_of(model) == "fasterrcnn_resnet50_c4" and not model.fpn
    tv = torchvision_c4(5, frozen_bn=True)
    assert count_params(model) == torch_params(tv)
    state = {k: v.numpy() for k, v in tv.state_dict().items()}
    convert_torchvision(state, model, strict=True)  # every entry used, every weight set
    head = model.get_layer("roi_heads").box_head
    layer = next(la for la in head._flatten_layers() if la.name == "layer4.2.bn3")
    np.testing.assert_allclose(_np(layer.moving_variance),
                               state["roi_heads.box_head.0.2.bn3.running_var"])
    np.testing.assert_allclose(_np(model.get_layer("roi_heads").box_predictor.cls_score.kernel),
                               state["roi_heads.box_predictor.cls_score.weight"].T)
    del state["roi_heads.box_head.0.0.downsample.0.weight"]
    with pytest.raises(ValueError, match="missing"):
        convert_torchvision(state, model)


# ------------------------------------------------------------------ res5 head layer
def test_res5_head_batch_norm_statistics_ignore_masked_rois():
    """Training-mode BN statistics come from the RoIs of ``roi_mask`` only (torchvision's
    batch holds the sampled RoIs alone), with the shortcut's BN too."""
    rng = np.random.default_rng(0)
    layer = ResNetRoIHead(blocks=1, width=4, norm="batch")
    x = rng.normal(size=(2, 5, 14, 14, 8)).astype("float32")
    roi_mask = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], bool)
    x[~roi_mask] = 50.0  # padding far off the data: it would dominate the statistics
    padded = _np(layer(x, training=True, roi_mask=roi_mask))
    compact = _np(layer(x[roi_mask][None], training=True))[0]
    assert padded.shape == (2, 5, 16)
    np.testing.assert_allclose(padded[roi_mask], compact, rtol=1e-4, atol=1e-4)
    frozen = ResNetRoIHead(blocks=1, width=4, norm="frozen_batch")
    np.testing.assert_allclose(_np(frozen(x, training=True, roi_mask=roi_mask)),
                               _np(frozen(x, training=False)), atol=1e-6)


@needs_torchvision
def test_res5_head_matches_torchvision_layer4_on_rois():
    """The head alone against torchvision's ``Sequential(layer4, pool, flatten)`` in eval mode
    (random BN statistics), weights copied by the converter's rule rows."""
    import torch
    import torchvision
    from torch import nn

    from kdet.converters._mapping import copy_weights, model_variables, plan
    from kdet.converters.torchvision import RES5_HEAD_RULES

    torch.manual_seed(0)
    # ResNet-18's layer4 is basic blocks; build bottlenecks of width 8 via the torchvision class.
    block = torchvision.models.resnet.Bottleneck
    resnet = torchvision.models.resnet.ResNet(block, [1, 1, 1, 2], width_per_group=64)
    layer4 = resnet.layer4
    with torch.no_grad():
        for module in layer4.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.7, 1.3)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.7, 1.3)
    torch_head = nn.Sequential(layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = np.random.default_rng(1).normal(size=(2, 3, 14, 14, 1024)).astype("float32")
    with torch.no_grad():
        ref = torch_head(torch.from_numpy(x.reshape(6, 14, 14, 1024)).permute(0, 3, 1, 2))
    head = ResNetRoIHead(blocks=2, width=512, name="box_head")
    head.build(x.shape)
    state = {f"roi_heads.box_head.{k}": v.numpy() for k, v in torch_head.state_dict().items()}
    variables = {f"roi_heads/{path}": v for path, v in model_variables(head).items()}
    used = copy_weights(plan(variables, RES5_HEAD_RULES), state)
    assert len(used) == len([k for k in state if "num_batches" not in k])
    out = _np(head(x, training=False))
    np.testing.assert_allclose(out.reshape(6, 2048), ref.numpy(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ torchvision parity
@pytest.fixture(scope="module")
def c4_pair():
    """A random torchvision C4 model (eval; BN statistics calibrated as the v2 tests do) and
    the kdet model converted from it."""
    if not HAVE_TORCHVISION:
        pytest.skip("torchvision not installed")
    import torch

    torch.manual_seed(0)
    tv = torchvision_c4(5, min_size=SIZE, max_size=SIZE, image_mean=MEAN, image_std=STD,
                        rpn_batch_size_per_image=BIG, box_batch_size_per_image=BIG,
                        rpn_pre_nms_top_n_train=TOP_N["rpn_pre_nms_top_n_train"],
                        rpn_post_nms_top_n_train=TOP_N["rpn_post_nms_top_n_train"],
                        rpn_pre_nms_top_n_test=TOP_N["rpn_pre_nms_top_n_test"],
                        rpn_post_nms_top_n_test=TOP_N["rpn_post_nms_top_n_test"]).eval()
    calibrate_bn(tv, SIZE, with_masks=False)
    with torch.no_grad():
        tv.rpn.head.cls_logits.weight.mul_(0.05)
        # C4's 1024 RPN channels give deltas up to ~4 (a box 50x its anchor), where float32
        # noise of 1e-4 in dw moves a box edge by 3e-2 px: keep them in a trained RPN's range.
        tv.rpn.head.bbox_pred.weight.mul_(0.1)
        # the res5 features average ~6 (FPN's fc7 ~0.1): class logits of std ~20 and box
        # deltas of std ~5 otherwise; scaled to logits of std ~2 and deltas of std ~0.25
        tv.roi_heads.box_predictor.cls_score.weight.mul_(0.3)
        tv.roi_heads.box_predictor.bbox_pred.weight.mul_(0.05)
    model = c4(num_classes=4, image_size=SIZE, rpn_batch_size_per_image=BIG,
               box_batch_size_per_image=BIG, **TOP_N)
    convert_torchvision({k: v.numpy() for k, v in tv.state_dict().items()}, model)
    return tv, model


@slow_on_jax
def test_c4_inference_matches_torchvision(c4_pair):
    tv, model = c4_pair
    image = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype("float32")
    ref = run_torch_eval(tv, image)
    out = {k: _np(v) for k, v in model(image[None], training=False).items()}
    valid = out["proposals_valid"][0]
    proposals = out["proposals"][0][valid]
    assert len(proposals) == len(ref["proposals"]) == 25
    np.testing.assert_allclose(proposals, ref["proposals"], atol=1e-2)
    check_detections(ref, out)
    predicted = model.predict(image[None], verbose=0)
    assert set(predicted) == {"boxes", "scores", "labels", "num_detections"}
    np.testing.assert_allclose(predicted["scores"], out["scores"], atol=1e-5)


@pytest.mark.slow  # ~27 s on TF: with the inference test the file would pass its 60 s budget
def test_c4_training_losses_match_torchvision(c4_pair):
    tv, model = c4_pair
    check_training_losses(tv, model, SIZE, with_masks=False)


# ------------------------------------------------------------------ training and saving
def small_c4(**kwargs):
    settings = dict(num_classes=3, image_size=96, rpn_pre_nms_top_n_train=100,
                    rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
                    rpn_post_nms_top_n_test=30, box_batch_size_per_image=32, seed=1)
    settings.update(kwargs)
    return c4(**settings)


@pytest.mark.slow  # ~100 s on TF with a shared CPU
def test_c4_fit_predict_images_and_keras_roundtrip(rng, tmp_path):
    """fit (batch 1, one image without objects), predict_images, .keras with safe_mode."""
    images, y = _fit_data(96, rng)
    model = small_c4(box_score_thresh=0.0)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    history = model.fit(images, y, batch_size=1, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    before = detections(model, images)
    assert set(before) == {"boxes", "scores", "labels", "num_detections"}
    assert before["num_detections"].min() > 0
    out = model.predict_images([images[0][:48]])  # 48 x 96 -> scale 1, padded
    assert out["boxes"].shape == (1, 100, 4) and out["num_detections"][0] > 0
    path = str(tmp_path / "c4.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is kdet.models.FasterRCNN and not loaded.fpn
    assert loaded.get_config() == model.get_config()
    after = detections(loaded, images)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-4, err_msg=key)


def _tf_data(images, y):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((images, y)).batch(2, drop_remainder=True)


@pytest.mark.slow
def test_c4_fit_tf_data_jit_compile(rng):
    """model.fit on tf.data with jit_compile=True (XLA on TF; JAX always jits)."""
    images, y = _fit_data(96, rng)
    model = small_c4()
    model.compile(optimizer=keras.optimizers.SGD(1e-3), jit_compile=True)
    history = model.fit(_tf_data(images, y), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


@pytest.mark.slow  # minutes on a small CPU: the SavedModel traces ResNet-50 and res5
@pytest.mark.skipif(backend() != "tensorflow", reason="kdet.export builds TensorFlow graphs")
@pytest.mark.parametrize("fmt", ["saved_model", "onnx", "litert"])
def test_c4_export_matches_predict(fmt, rng, tmp_path):
    from test_export_two_stage import (_litert_outputs, _onnx_outputs, _saved_model_outputs,
                                       assert_same_predictions)

    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
        pytest.importorskip("onnxruntime")
    if fmt == "litert":
        pytest.importorskip("ai_edge_litert")
    keras.utils.set_random_seed(0)
    model = c4(num_classes=3, image_size=64, rpn_pre_nms_top_n_test=50,
               rpn_post_nms_top_n_test=20, box_detections_per_img=10, box_score_thresh=0.0)
    # random res5 features average ~6: box deltas of std ~5 would blow every box up to the
    # clipped, zero-width image border; scaled to a trained model's range
    predictor = model.get_layer("roi_heads").box_predictor
    predictor.bbox_pred.kernel.assign(predictor.bbox_pred.kernel * 0.05)
    images = rng.uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    reference = model.predict(images, verbose=0)
    suffix = {"saved_model": "", "onnx": ".onnx", "litert": ".tflite"}[fmt]
    path = kdet.export.export(model, str(tmp_path / f"c4{suffix}"), batch_size=1)
    run = {"saved_model": _saved_model_outputs, "onnx": _onnx_outputs,
           "litert": _litert_outputs}[fmt]
    assert_same_predictions(reference, run(path, images),
                            ("boxes", "scores", "labels", "num_detections"))


@pytest.mark.slow  # ~13 s: writes and reads a ResNet-50 weights file
def test_c4_backbone_weights_fill_the_res5_head(tmp_path):
    """A whole-ResNet weights file gives the C4 body layer1..layer3 and the box head its res5."""
    from kdet.backbones.resnet import ResNet

    resnet = ResNet(50, input_shape=(64, 64, 3))
    path = str(tmp_path / "resnet50.weights.h5")
    resnet.save_weights(path)
    model = c4(num_classes=2, image_size=64, backbone_weights=path)
    head = model.get_layer("roi_heads").box_head
    for name in ("layer4.0.downsample.0", "layer4.2.conv3", "layer4.1.bn2"):
        layer = next(la for la in head._flatten_layers() if la.name == name)
        for got, want in zip(layer.get_weights(), resnet.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)
    body = [la for la in model.layers if isinstance(la, keras.Model)][0]
    np.testing.assert_array_equal(body.get_layer("layer3.5.conv3").get_weights()[0],
                                  resnet.get_layer("layer3.5.conv3").get_weights()[0])
    assert model.get_config()["backbone_weights"] is None  # saved models carry the weights


@needs_torchvision
def test_c4_proposal_anchors_equal_torchvision_and_survive_config():
    """3 sizes x 3 ratios on one stride-16 level: torchvision's anchors, in its order."""
    import torch
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from kdet.layers.rpn import ProposalGenerator

    gen = ProposalGenerator(image_size=96, anchor_sizes=((128, 256, 512),), strides=(16,))
    assert gen.num_anchors_per_location == 9
    again = ProposalGenerator.from_config(gen.get_config())
    np.testing.assert_array_equal(again.anchors, gen.anchors)
    ref = AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))(
        ImageList(torch.zeros(1, 3, 96, 96), [(96, 96)]), [torch.zeros(1, 1024, 6, 6)])[0]
    np.testing.assert_allclose(gen.anchors, ref.numpy())
