"""Backbones: parameter counts, feature shapes, parity with torchvision / timm.

References: torchvision ``resnet*`` / ``mobilenet_v2`` and timm
``tf_efficientnet_b*`` / ``tf_efficientnet_lite*`` (random init, BN
statistics calibrated on a random batch so features stay O(1)); without them,
parameter counts from closed-form formulas over the published architecture
tables, and the counts torchvision 0.29 / timm 1.0 report.
"""
import functools
import math

import numpy as np
import pytest
from conftest import HAVE_TORCHVISION, once_on_tensorflow

try:
    import timm  # after torch (conftest), before keras
    HAVE_TIMM = HAVE_TORCHVISION
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TIMM = False

import keras

from kdet.backbones import (EfficientNet, EfficientNetLite, MobileNetV2, ResNet, resnet50,
                            resnet101)
from kdet.backbones.efficientnet import load_timm_state_dict, timm_module_name
from kdet.backbones.mobilenet import load_torchvision_state_dict as load_mobilenet
from kdet.backbones.resnet import load_torchvision_state_dict as load_resnet
from kdet.layers import FrozenBatchNormalization
from kdet.utils import count_params

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="timm not installed")

# parameters() of the references, fc/classifier/conv_head excluded
# (torchvision 0.29, timm 1.0.31 features_only).
TORCHVISION_RESNET = {18: 11_176_512, 34: 21_284_672, 50: 23_508_032, 101: 42_500_160,
                      152: 58_143_808}
TIMM_EFFICIENTNET = {0: 3_595_388, 1: 6_101_024, 2: 7_202_562, 3: 10_103_336, 4: 16_742_216,
                     5: 27_288_112, 6: 39_403_992, 7: 62_143_440}
TIMM_LITE = {0: 2_958_848, 1: 3_723_520, 2: 4_357_952, 3: 6_422_016, 4: 11_149_568}
TORCHVISION_MOBILENET_V2_FEATURES = 2_223_872


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _shapes(model):
    """Static output shapes of a functional backbone (no forward pass: cheap on JAX)."""
    return {key: tuple(tensor.shape) for key, tensor in model.output.items()}


@functools.lru_cache(maxsize=None)
def _count(builder, *args, **kwargs):
    """count_params of a freshly built backbone, cached across tests (builds are slow)."""
    return count_params(builder(*args, **kwargs))


# --- closed-form parameter counts -------------------------------------------

def _bn(c):
    return 2 * c


def resnet_formula(depth):
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
              152: (3, 8, 36, 3)}[depth]
    bottleneck = depth >= 50
    total = 7 * 7 * 3 * 64 + _bn(64)
    cin = 64
    for stage, n in enumerate(blocks):
        width = 64 * 2 ** stage
        out = width * 4 if bottleneck else width
        for i in range(n):
            if bottleneck:
                total += cin * width + _bn(width) + 9 * width * width + _bn(width)
                total += width * out + _bn(out)
            else:
                total += 9 * cin * width + _bn(width) + 9 * width * width + _bn(width)
            if i == 0 and (stage > 0 or cin != out):
                total += cin * out + _bn(out)
            cin = out
    return total


def _divisible(v, d=8):
    r = max(d, int(v + d / 2) // d * d)
    return r + d if r < 0.9 * v else r


# (kernel, repeats, out, expand) of the EfficientNet/Lite stages
_EFFNET_STAGES = ((3, 1, 16, 1), (3, 2, 24, 6), (5, 2, 40, 6), (3, 3, 80, 6), (5, 3, 112, 6),
                  (5, 4, 192, 6), (3, 1, 320, 6))


def efficientnet_formula(width, depth, lite):
    """TF EfficientNet (swish, SE 0.25 of the block input) or Lite (no SE, fixed stem/ends)."""
    stem = 32 if lite else _divisible(32 * width)
    total = 27 * stem + _bn(stem)
    cin = stem
    for s, (k, repeats, out, expand) in enumerate(_EFFNET_STAGES):
        fixed = lite and s in (0, len(_EFFNET_STAGES) - 1)
        n = repeats if fixed else math.ceil(repeats * depth)
        cout = _divisible(out * width)
        for _ in range(n):
            mid = cin * expand
            if expand != 1:
                total += cin * mid + _bn(mid)
            total += k * k * mid + _bn(mid)
            if not lite:
                rd = max(1, int(cin * 0.25))
                total += mid * rd + rd + rd * mid + mid
            total += mid * cout + _bn(cout)
            cin = cout
    return total


_B_SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8),
              5: (1.6, 2.2), 6: (1.8, 2.6), 7: (2.0, 3.1)}
_LITE_SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8)}


def mobilenet_v2_formula(alpha, last_conv=True):
    setting = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))
    cin = _divisible(32 * alpha)
    total = 27 * cin + _bn(cin)
    for t, c, n, _ in setting:
        cout = _divisible(c * alpha)
        for _ in range(n):
            mid = cin * t
            if t != 1:
                total += cin * mid + _bn(mid)
            total += 9 * mid + _bn(mid) + mid * cout + _bn(cout)
            cin = cout
    if last_conv:
        last = _divisible(1280 * max(1.0, alpha))
        total += cin * last + _bn(last)
    return total


def test_formulas_agree_with_published_counts():
    # The formulas are the fallback reference when torchvision/timm are absent.
    assert {d: resnet_formula(d) for d in TORCHVISION_RESNET} == TORCHVISION_RESNET
    assert {v: efficientnet_formula(*_B_SCALING[v], lite=False)
            for v in TIMM_EFFICIENTNET} == TIMM_EFFICIENTNET
    assert {v: efficientnet_formula(*_LITE_SCALING[v], lite=True)
            for v in TIMM_LITE} == TIMM_LITE
    assert mobilenet_v2_formula(1.0) == TORCHVISION_MOBILENET_V2_FEATURES


# --- helpers for parity ------------------------------------------------------

def _calibrated(module, shape, seed=0):
    """Random BN affine + running stats measured on a random batch, then eval()."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: running stats = batch stats
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.normal_(0.0, 0.1, generator=generator)
    module.train()
    with torch.no_grad():
        module(torch.randn(*shape, generator=generator))
    return module.eval()


def _assert_close(actual, expected, what):
    """Equal up to float32 rounding: 1e-4 of the feature's magnitude (at least 1e-4).

    A 50-layer float32 network drifts ~5e-5 relative from a float64 reference
    (measured: ResNet-50 C5 5e-4 at magnitude 10); a layout error (padding,
    kernel transpose, BN mapping) is O(1).
    """
    scale = max(1.0, float(np.abs(expected).max()))
    assert 0.1 < np.abs(expected).max() < 100, what  # BN calibration kept features O(1)
    error = float(np.abs(np.asarray(actual) - expected).max())
    assert error <= 1e-4 * scale, f"{what}: max abs error {error:.3g} at magnitude {scale:.3g}"


def _nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


# --- ResNet -----------------------------------------------------------------

@once_on_tensorflow("the variables' shapes")
def test_resnet_param_counts():
    assert _count(resnet50) == TORCHVISION_RESNET[50] == 23_508_032
    assert _count(ResNet, 18) == TORCHVISION_RESNET[18]


@pytest.mark.slow
def test_resnet101_and_152_param_counts():
    assert count_params(resnet101()) == TORCHVISION_RESNET[101]
    assert count_params(ResNet(152)) == TORCHVISION_RESNET[152]
    assert count_params(ResNet(34)) == TORCHVISION_RESNET[34]


@once_on_tensorflow("the variables' shapes")
@needs_torchvision
def test_resnet_param_counts_match_torchvision():
    import torchvision
    for depth in (18, 50):
        ref = torchvision.models.get_model(f"resnet{depth}", weights=None)
        expected = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
        assert _count(ResNet, depth) == expected


def test_resnet_shapes_and_strides():
    assert _shapes(resnet50(input_shape=(256, 256, 3))) == {
        "C2": (None, 64, 64, 256), "C3": (None, 32, 32, 512),
        "C4": (None, 16, 16, 1024), "C5": (None, 8, 8, 2048)}
    assert _shapes(ResNet(18, input_shape=(256, 256, 3), return_levels=(1, 3))) == {
        "C1": (None, 128, 128, 64), "C3": (None, 32, 32, 128)}


def test_resnet_return_levels_build_only_needed_stages():
    model = resnet50(return_levels=(2, 3, 4))
    assert sorted(model.output) == ["C2", "C3", "C4"]
    layer4 = 3 * (512 * 2048 + 2 * 2048 + 512 * 9 * 512 + 2 * 512) + 2 * (2048 * 512 + 2 * 512)
    layer4 += 1024 * 512 + 2 * 512 + 1024 * 2048 + 2 * 2048
    assert count_params(model) == TORCHVISION_RESNET[50] - layer4
    assert not any(layer.name.startswith("layer4") for layer in model.layers)


@pytest.mark.parametrize("bad", [dict(depth=42), dict(norm="group"), dict(trainable_layers=6),
                                 dict(return_levels=(6,)), dict(return_levels=()),
                                 dict(weights="resnet50.h5")])
def test_resnet_bad_arguments(bad):
    with pytest.raises(ValueError):
        ResNet(**{"depth": 18, **bad})


@needs_torchvision
def test_resnet50_parity_with_torchvision(rng):
    import torch
    import torchvision
    ref = _calibrated(torchvision.models.resnet50(weights=None), (2, 3, 96, 96))
    model = resnet50(input_shape=(64, 64, 3))
    used = load_resnet(model, ref.state_dict())
    assert len(used) == sum(1 for k in ref.state_dict()
                            if not k.startswith("fc.") and "num_batches" not in k)
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    out = model(x, training=False)
    with torch.no_grad():
        t = ref.maxpool(ref.relu(ref.bn1(ref.conv1(_nchw(x)))))
        for level in (2, 3, 4, 5):
            t = getattr(ref, f"layer{level - 1}")(t)
            _assert_close(_np(out[f"C{level}"]), _nhwc(t), f"resnet50 C{level}")


@needs_torchvision
def test_resnet18_frozen_bn_parity_and_detector_prefix(rng):
    import torch
    import torchvision
    ref = _calibrated(torchvision.models.resnet18(weights=None), (4, 3, 64, 64))
    state = {f"backbone.body.{k}": v for k, v in ref.state_dict().items()}
    model = ResNet(18, input_shape=(32, 32, 3), norm="frozen_batch", return_levels=(3,))
    load_resnet(model, state, prefix="backbone.body.")
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    with torch.no_grad():
        t = ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(_nchw(x)))))))
    _assert_close(_np(model(x)["C3"]), _nhwc(t), "resnet18 frozen BN C3")
    with pytest.raises(ValueError, match="missing"):
        load_resnet(ResNet(18, input_shape=(32, 32, 3)), state)  # prefix forgotten


def _torchvision_trainable(trainable_layers):
    """Which module prefixes train per torchvision ``_resnet_fpn_extractor``."""
    import torchvision
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    body = _resnet_fpn_extractor(torchvision.models.resnet18(weights=None), trainable_layers)
    return {name.rsplit(".", 1)[0][len("body."):]: p.requires_grad
            for name, p in body.named_parameters() if name.startswith("body.")}


@pytest.mark.parametrize("trainable_layers", [0, 1, 3, 5])
def test_resnet_trainable_layers(trainable_layers):
    model = ResNet(18, trainable_layers=trainable_layers)
    keras_trainable = {layer.name: layer.trainable for layer in model.layers if layer.weights}
    if HAVE_TORCHVISION:
        expected = _torchvision_trainable(trainable_layers)
    else:  # torchvision's rule written out
        modules = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        modules += ["bn1"] if trainable_layers == 5 else []
        expected = {name: name.split(".")[0] in modules for name in keras_trainable}
    assert keras_trainable == expected
    n_trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    stage_params = {0: 0, 1: 8_393_728, 3: 8_393_728 + 2_099_712 + 525_568, 5: 11_176_512}
    assert n_trainable == stage_params[trainable_layers]


def test_frozen_batch_norm_is_constant_in_training(rng):
    model = ResNet(18, input_shape=(32, 32, 3), norm="frozen_batch", return_levels=(2, 3))
    frozen = [layer for layer in model.layers if isinstance(layer, FrozenBatchNormalization)]
    assert len(frozen) == 10  # bn1 + layer1 (2 x 2) + layer2 (2 x 2 + downsample)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    for layer in frozen:  # non-trivial statistics
        for variable in layer.weights:
            variable.assign(rng.uniform(0.5, 1.5, size=variable.shape).astype("float32"))
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    train, infer = model(x, training=True), model(x, training=False)
    for key in train:
        # equal up to rounding: on TensorFlow inference applies the scale and shift in one
        # fused kernel (kdet.layers.normalization._fused_scale_shift), training as two ops
        np.testing.assert_allclose(_np(train[key]), _np(infer[key]), rtol=1e-5, atol=1e-5)
    assert not any(v.name in ("gamma", "beta") for v in model.trainable_weights)
    # Plain BN does differ between the modes, so the check above means something.
    plain = ResNet(18, input_shape=(32, 32, 3), return_levels=(2,))
    assert not np.allclose(_np(plain(x, training=True)["C2"]),
                           _np(plain(x, training=False)["C2"]), atol=1e-3)


def test_frozen_batch_norm_param_count():
    # FrozenBatchNorm2d holds buffers only: the R50 body loses its 53,120 BN params.
    assert count_params(resnet50(norm="frozen_batch")) == TORCHVISION_RESNET[50] - 53_120


def test_weights_path_round_trip(tmp_path, rng):
    model = ResNet(18, return_levels=(2,))  # dynamic input size
    x = rng.normal(size=(1, 48, 32, 3)).astype("float32")
    path = str(tmp_path / "r18.weights.h5")
    model.save_weights(path)
    again = ResNet(18, return_levels=(2,), weights=path)
    expected = _np(model(x)["C2"])
    assert expected.shape == (1, 12, 8, 64)
    np.testing.assert_array_equal(_np(again(x)["C2"]), expected)
    with pytest.raises(ValueError, match="does not exist"):
        ResNet(18, weights=str(tmp_path / "missing.weights.h5"))


# --- EfficientNet -----------------------------------------------------------

def _slow(*values):
    return [pytest.param(value, marks=pytest.mark.slow) for value in values]


# Each new architecture costs ~1 s of builds on TF but tens of seconds on JAX
# (one XLA compile per new weight shape for the random initialisers), so the
# default run builds B0 / Lite0 only.
@once_on_tensorflow("the variables' shapes")
@pytest.mark.parametrize("variant", [0] + _slow(1, 2, 3, 4, 5, 6, 7))
def test_efficientnet_param_counts(variant):
    assert _count(EfficientNet, f"b{variant}") == TIMM_EFFICIENTNET[variant]


@once_on_tensorflow("the variables' shapes")
@pytest.mark.parametrize("variant", [0] + _slow(1, 2, 3, 4))
def test_efficientnet_lite_param_counts(variant):
    assert _count(EfficientNetLite, variant) == TIMM_LITE[variant]


@once_on_tensorflow("the variables' shapes")
@needs_timm
@pytest.mark.parametrize("name,builder,variant", [("tf_efficientnet_b0", EfficientNet, "b0"),
                                                  ("tf_efficientnet_lite0", EfficientNetLite, 0)])
def test_efficientnet_counts_match_timm(name, builder, variant):
    # effdet's backbones: features_only with out_indices (2, 3, 4).
    ref = timm.create_model(name, features_only=True, out_indices=(2, 3, 4), pretrained=False)
    assert _count(builder, variant) == sum(p.numel() for p in ref.parameters())


def test_efficientnet_shapes_and_strides():
    model = EfficientNet("b0", input_shape=(256, 256, 3))
    # The application's Rescaling + Normalization and top conv are left out.
    assert not {type(layer).__name__ for layer in model.layers} & {"Rescaling", "Normalization"}
    assert model.layers[1].name == "stem_conv_pad"
    assert not any(layer.name.startswith("top_") for layer in model.layers)
    # Intermediate layers belong to the backbone's own graph.
    inner = keras.Model(model.input, model.get_layer("block6a_expand_activation").output)
    assert tuple(inner.output.shape) == (None, 16, 16, 672)
    expected = {"C1": (None, 128, 128, 16), "C2": (None, 64, 64, 24),
                "C3": (None, 32, 32, 40), "C4": (None, 16, 16, 112), "C5": (None, 8, 8, 320)}
    assert _shapes(model) == expected
    assert _shapes(EfficientNetLite(0, input_shape=(256, 256, 3))) == expected


@pytest.mark.slow
def test_efficientnet_scaled_channels():
    channels = {"C1": 24, "C2": 32, "C3": 48, "C4": 136, "C5": 384}
    for model in (EfficientNetLite(3), EfficientNet("b3")):
        assert {key: shape[-1] for key, shape in _shapes(model).items()} == channels


def test_efficientnet_bad_arguments():
    for bad in ("b8", "lite0", -1):
        with pytest.raises(ValueError, match="variant"):
            EfficientNet(bad)
    for bad in (5, "b0"):
        with pytest.raises(ValueError, match="variant"):
            EfficientNetLite(bad)
    with pytest.raises(ValueError, match="drop_path_rate"):
        EfficientNetLite(0, drop_path_rate=1.0)


def test_timm_module_names():
    names = {"block2a_expand_conv"}
    assert timm_module_name("stem_conv") == "conv_stem"
    assert timm_module_name("block1b_project_bn", names) == "blocks.0.1.bn2"
    assert timm_module_name("block2a_project_bn", names) == "blocks.1.0.bn3"
    assert timm_module_name("block2a_se_reduce", names) == "blocks.1.0.se.conv_reduce"
    assert timm_module_name("blocks.3.2.conv_pwl") == "blocks.3.2.conv_pwl"


@needs_timm
@pytest.mark.parametrize("name,builder", [
    ("tf_efficientnet_b0", lambda: EfficientNet("b0", input_shape=(64, 64, 3))),
    ("tf_efficientnet_lite0", lambda: EfficientNetLite(0, input_shape=(64, 64, 3))),
])
def test_efficientnet_parity_with_timm(name, builder, rng):
    import torch
    ref = _calibrated(timm.create_model(name, features_only=True, pretrained=False),
                      (2, 3, 96, 96))
    model = builder()
    load_timm_state_dict(model, ref.state_dict())
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    out = model(x, training=False)
    with torch.no_grad():
        expected = [_nhwc(t) for t in ref(_nchw(x))]
    for level, feature in enumerate(expected, start=1):
        _assert_close(_np(out[f"C{level}"]), feature, f"{name} C{level}")


@pytest.mark.parametrize("builder", [
    # re-called keras.applications layers; FrozenBatchNormalization inside a backbone
    lambda: EfficientNet("b0", input_shape=(128, 128, 3), return_levels=(3, 4, 5)),
    lambda: ResNet(18, input_shape=(128, 128, 3), norm="frozen_batch", return_levels=(2, 3)),
])
def test_keras_file_round_trip(builder, tmp_path, rng):
    model = builder()
    for variable in model.non_trainable_weights:  # distinguishable from a fresh init
        variable.assign(rng.uniform(0.5, 1.5, size=variable.shape).astype("float32"))
    x = rng.normal(size=(1, 128, 128, 3)).astype("float32")
    path = str(tmp_path / "backbone.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    expected, got = model(x), loaded(x)
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(_np(got[key]), _np(expected[key]), atol=1e-5)


@once_on_tensorflow("the layers' classes")
@pytest.mark.parametrize("builder", [
    lambda: EfficientNet("b0", input_shape=(64, 64, 3)),
    lambda: EfficientNetLite(0, input_shape=(64, 64, 3)),
    lambda: MobileNetV2(input_shape=(64, 64, 3)),
    lambda: ResNet(18, input_shape=(64, 64, 3), norm="batch"),
])
def test_every_backbone_batch_norm_is_kdets(builder):
    """Each trainable batch norm is kdet's (the references' unbiased moving variance,
    the EMA of the statistics): the B0-B7 backbone re-uses keras.applications layers,
    whose Keras batch norms it once kept (D0's backbone then updated with the biased
    variance, and its training step ran Keras' composite ops)."""
    from kdet.layers import BatchNormalization

    norms = [layer for layer in builder()._flatten_layers()
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(type(layer) is BatchNormalization for layer in norms)


# --- MobileNetV2 ------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0] + _slow(0.5, 1.4))
def test_mobilenet_v2_param_counts(alpha):
    assert _count(MobileNetV2, alpha) == mobilenet_v2_formula(alpha)


def test_mobilenet_v2_without_last_conv():
    model = MobileNetV2(include_last_conv=False, return_levels=(5,))
    assert count_params(model) == mobilenet_v2_formula(1.0, last_conv=False)
    assert model.output["C5"].shape[-1] == 320


@pytest.mark.slow
@needs_torchvision
def test_mobilenet_v2_counts_match_torchvision():
    import torchvision
    ref = torchvision.models.mobilenet_v2(weights=None, width_mult=0.75).features
    assert count_params(MobileNetV2(0.75)) == sum(p.numel() for p in ref.parameters())
    assert _count(MobileNetV2, 1.0) == TORCHVISION_MOBILENET_V2_FEATURES


def test_mobilenet_v2_shapes_and_strides():
    assert _shapes(MobileNetV2(input_shape=(256, 256, 3))) == {
        "C1": (None, 128, 128, 16), "C2": (None, 64, 64, 24), "C3": (None, 32, 32, 32),
        "C4": (None, 16, 16, 96), "C5": (None, 8, 8, 1280)}


@needs_torchvision
def test_mobilenet_v2_parity_with_torchvision(rng):
    import torch
    import torchvision
    ref = _calibrated(torchvision.models.mobilenet_v2(weights=None), (4, 3, 128, 128))
    model = MobileNetV2(input_shape=(64, 64, 3), norm="frozen_batch")
    load_mobilenet(model, ref.state_dict())
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    out = model(x, training=True)  # frozen BN: the same as inference
    with torch.no_grad():
        t, expected = _nchw(x), {}
        for index, module in enumerate(ref.features):
            t = module(t)
            expected[index] = _nhwc(t)
    for level, index in {1: 1, 2: 3, 3: 6, 4: 13, 5: 18}.items():
        _assert_close(_np(out[f"C{level}"]), expected[index], f"mobilenet_v2 C{level}")
