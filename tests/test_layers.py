"""Shared layers: numpy references, torchvision / effdet conformance, Keras contract.

References: formulas written out in numpy here; torchvision's
FeaturePyramidNetwork / LastLevelP6P7 / RetinaNetHead / FrozenBatchNorm2d and
effdet's BiFpn / HeadNet (weights copied) when importable.
"""
import functools

import numpy as np
import pytest

from conftest import HAVE_TORCHVISION, backend

try:  # effdet (timm) needs torch, which conftest imported first
    import effdet
    from effdet.config import get_efficientdet_config, set_config_writeable
    from effdet.efficientdet import BiFpn as EffdetBiFpn, HeadNet as EffdetHeadNet
    HAVE_EFFDET = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_EFFDET = False

if HAVE_TORCHVISION:
    import torch
    import torchvision
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

import keras  # noqa: E402  (after torch, see conftest)
from keras import ops  # noqa: E402

from kdet.layers import (Activation, BiFPN, ConvNormAct, EfficientDetHead, FPN,  # noqa: E402
                         FrozenBatchNormalization, ImageNormalization, ResampleFeature,
                         RetinaNetHead, SeparableConvNormAct, WeightedFusion)
from kdet.layers.bifpn import bifpn_nodes  # noqa: E402
from kdet.layers.fpn import resize_nearest  # noqa: E402
from kdet.utils import count_params  # noqa: E402

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
needs_effdet = pytest.mark.skipif(not HAVE_EFFDET, reason="effdet (timm) not installed")


# --------------------------------------------------------------------------- numpy references

def np_conv2d(x, kernel, bias=None, stride=1, pads=(0, 0, 0, 0)):
    """NHWC conv, kernel (kh, kw, cin, cout), pads (top, bottom, left, right)."""
    x = np.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)))
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride, :]
            out += patch @ kernel[i, j]
    return out if bias is None else out + bias


def np_depthwise(x, kernel, pads):
    """Depthwise conv, kernel (kh, kw, C, 1), stride 1."""
    x = np.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)))
    kh, kw = kernel.shape[:2]
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i:i + out_h, j:j + out_w, :] * kernel[i, j, :, 0]
    return out


def np_batch_norm(x, gamma, beta, mean, var, eps):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def np_max_pool_same(x, k, s):
    """TF SAME max-pool: pad total max((ceil(n/s)-1)*s + k - n, 0), extra at the end."""
    n_h, n_w = x.shape[1:3]
    out_h, out_w = -(-n_h // s), -(-n_w // s)
    pad_h, pad_w = max((out_h - 1) * s + k - n_h, 0), max((out_w - 1) * s + k - n_w, 0)
    xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                    (0, 0)), constant_values=-np.inf)
    out = np.full((x.shape[0], out_h, out_w, x.shape[-1]), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, i:i + s * out_h:s, j:j + s * out_w:s, :])
    return out


def np_nearest(x, out_h, out_w):
    """PyTorch nearest: src = floor(dst * in / out)."""
    rows = np.floor(np.arange(out_h) * x.shape[1] / out_h).astype(int)
    cols = np.floor(np.arange(out_w) * x.shape[2] / out_w).astype(int)
    return x[:, rows][:, :, cols]


def randomize_bn(layer, rng):
    """Non-trivial BN statistics so that a missing or misplaced BN shows."""
    c = layer.gamma.shape[0]
    layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
    layer.beta.assign(rng.normal(0, 0.5, c).astype("float32"))
    layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def build_for(layer, inputs):
    """Build from the inputs' shapes without running the layer eagerly."""
    layer.build(keras.tree.map_structure(lambda x: tuple(x.shape), inputs))
    return layer


def infer(layer, inputs):
    """Inference call; one jax.jit compile on JAX instead of an eager compile per op."""
    if keras.backend.backend() == "jax":
        import jax
        return jax.jit(lambda x: layer(x, training=False))(inputs)
    return layer(inputs, training=False)


# --------------------------------------------------------------------------- torch -> kdet weights

def _t(p):
    return p.detach().cpu().numpy()


def copy_conv(keras_conv, torch_conv):
    """torch Conv2d [out, in, kh, kw] -> keras Conv2D [kh, kw, in, out] (or depthwise)."""
    w = _t(torch_conv.weight)
    if isinstance(keras_conv, keras.layers.DepthwiseConv2D):
        keras_conv.kernel.assign(w.transpose(2, 3, 0, 1))
    else:
        keras_conv.kernel.assign(w.transpose(2, 3, 1, 0))
    assert (torch_conv.bias is None) == (not keras_conv.use_bias)
    if torch_conv.bias is not None:
        keras_conv.bias.assign(_t(torch_conv.bias))


def copy_norm(keras_norm, torch_norm):
    keras_norm.gamma.assign(_t(torch_norm.weight))
    keras_norm.beta.assign(_t(torch_norm.bias))
    if hasattr(keras_norm, "moving_mean"):
        keras_norm.moving_mean.assign(_t(torch_norm.running_mean))
        keras_norm.moving_variance.assign(_t(torch_norm.running_var))


def randomize_torch(module, seed=0):
    """Random weights and BN/GN statistics so every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.3)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / np.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return module.eval()


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


# --------------------------------------------------------------------------- normalisation

def test_frozen_batch_norm_formula(rng):
    layer = FrozenBatchNormalization(epsilon=1e-5)
    x = rng.normal(size=(2, 5, 6, 7)).astype("float32")
    layer.build(x.shape)
    randomize_bn(layer, rng)
    statistics = (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)
    want = np_batch_norm(x, *(to_np(v) for v in statistics), 1e-5)
    for training in (False, True):  # frozen: identical in training
        np.testing.assert_allclose(to_np(layer(x, training=training)), want, atol=1e-5)
    assert [v.name for v in layer.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert not layer.trainable_weights
    assert FrozenBatchNormalization.is_buffer_only
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 1, use_bias=False),
                              FrozenBatchNormalization()])
    assert count_params(model) == 6  # only the conv kernel, as FrozenBatchNorm2d buffers


def test_frozen_batch_norm_eps_zero_and_bn_weights_load_by_name(rng):
    bn = keras.layers.BatchNormalization(epsilon=0.0)
    bn.build((None, 3))
    randomize_bn(bn, rng)
    frozen = FrozenBatchNormalization(epsilon=0.0)
    frozen.build((None, 3))
    for v in frozen.weights:  # by name
        v.assign(getattr(bn, v.name))
    x = rng.normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(to_np(frozen(x)), to_np(bn(x, training=False)), atol=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        FrozenBatchNormalization(epsilon=-1)


@needs_torchvision
def test_frozen_batch_norm_matches_torchvision(rng):
    ref = torchvision.ops.FrozenBatchNorm2d(6, eps=0.0)
    ref.weight.copy_(torch.rand(6) + 0.5)
    ref.bias.copy_(torch.randn(6))
    ref.running_mean.copy_(torch.randn(6))
    ref.running_var.copy_(torch.rand(6) + 0.5)
    layer = FrozenBatchNormalization(epsilon=0.0)
    layer.build((None, None, None, 6))
    copy_norm(layer, ref)
    x = rng.normal(size=(2, 3, 4, 6)).astype("float32")
    got = to_np(layer(x))
    np.testing.assert_allclose(got, nhwc(ref(nchw(x))), atol=1e-5)


def test_image_normalization_real_image(shared_data):
    from PIL import Image
    path = sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[0]
    image = np.asarray(Image.open(path).convert("RGB").resize((40, 30)), "float32")[None]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    got = to_np(ImageNormalization()(image))
    np.testing.assert_allclose(got, (image / 255.0 - mean) / std, atol=1e-5)
    lite = to_np(ImageNormalization.for_mode("lite")(image))
    np.testing.assert_allclose(lite, image / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_allclose(to_np(ImageNormalization(mean=0.5, std=0.5)(image)), lite,
                               atol=1e-6)
    layer = ImageNormalization()
    layer(image)
    assert not layer.weights  # constants are config, not weights


def test_image_normalization_rejects_bad_arguments():
    with pytest.raises(ValueError, match="std"):
        ImageNormalization(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="lengths"):
        ImageNormalization(mean=(0.1, 0.2), std=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="channels"):
        ImageNormalization()(np.zeros((1, 2, 2, 4), "float32"))
    with pytest.raises(ValueError, match="mode"):
        ImageNormalization.for_mode("caffe")


# --------------------------------------------------------------------------- conv blocks

@pytest.mark.parametrize("stride,padding,size", [(1, "torch", 7), (2, "torch", 7), (2, "torch", 8),
                                                 (2, "same", 8), (2, "same", 7), (1, "valid", 6)])
def test_conv_norm_act_padding_matches_numpy(rng, stride, padding, size):
    layer = ConvNormAct(5, 3, strides=stride, padding=padding, norm="batch", activation="relu",
                        bn_epsilon=1e-3)
    x = rng.normal(size=(2, size, size + 1, 4)).astype("float32")
    layer(x)
    randomize_bn(layer.norm_layer, rng)
    if padding == "torch":
        pads = (1, 1, 1, 1)
    elif padding == "same":  # TF SAME: extra pixel at the end
        def total(n):
            return max((-(-n // stride) - 1) * stride + 3 - n, 0)
        th, tw = total(size), total(size + 1)
        pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        pads = (0, 0, 0, 0)
    bn = layer.norm_layer
    want = np_conv2d(x, to_np(layer.conv.kernel), None, stride, pads)
    want = np.maximum(np_batch_norm(want, *(to_np(v) for v in (
        bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)), 1e-3), 0)
    np.testing.assert_allclose(to_np(layer(x, training=False)), want, atol=1e-4)


def test_conv_norm_act_bias_rule_and_counts():
    def built(**kw):
        layer = ConvNormAct(8, 3, **kw)
        layer.build((None, None, None, 4))
        return layer
    assert count_params(built()) == 3 * 3 * 4 * 8 + 8  # no norm: bias
    assert count_params(built(norm="batch")) == 3 * 3 * 4 * 8 + 2 * 8  # BN: no bias, gamma/beta
    assert count_params(built(norm="batch", use_bias=True)) == 3 * 3 * 4 * 8 + 8 + 2 * 8
    assert count_params(built(norm="frozen_batch")) == 3 * 3 * 4 * 8
    assert count_params(built(norm="group", groups=4)) == 3 * 3 * 4 * 8 + 2 * 8
    sep = SeparableConvNormAct(8, 3, norm="batch", use_bias=True)
    sep.build((None, None, None, 4))
    assert count_params(sep) == 9 * 4 + 4 * 8 + 8 + 2 * 8  # dw, pw + redundant bias, BN
    with pytest.raises(ValueError, match="norm"):
        ConvNormAct(8, 3, norm="layer")
    with pytest.raises(ValueError, match="activation"):
        ConvNormAct(8, 3, activation="gelu")
    with pytest.raises(ValueError, match="padding"):
        SeparableConvNormAct(8, 3, padding="reflect")


@pytest.mark.parametrize("activation", ["swish", "relu6", None])
def test_separable_conv_norm_act_matches_numpy(rng, activation):
    layer = SeparableConvNormAct(6, 3, norm="batch", use_bias=True, activation=activation)
    x = rng.normal(size=(2, 5, 7, 4)).astype("float32") * 3
    layer(x)
    layer.conv_pw.bias.assign(rng.normal(size=6).astype("float32"))
    randomize_bn(layer.norm_layer, rng)
    bn = layer.norm_layer
    y = np_depthwise(x, to_np(layer.conv_dw.kernel), (1, 1, 1, 1))
    y = np_conv2d(y, to_np(layer.conv_pw.kernel), to_np(layer.conv_pw.bias))
    y = np_batch_norm(y, *(to_np(v) for v in (bn.gamma, bn.beta, bn.moving_mean,
                                              bn.moving_variance)), 1e-3)
    if activation == "swish":
        y = y / (1 + np.exp(-y))
    elif activation == "relu6":
        y = np.clip(y, 0, 6)
    np.testing.assert_allclose(to_np(layer(x, training=False)), y, atol=1e-4)


@needs_torchvision
def test_conv_norm_act_group_norm_matches_torchvision(rng):
    ref = randomize_torch(torchvision.ops.Conv2dNormActivation(
        4, 8, kernel_size=3, stride=2, norm_layer=functools.partial(torch.nn.GroupNorm, 2)))
    layer = ConvNormAct(8, 3, strides=2, padding="torch", norm="group", groups=2,
                        activation="relu")
    x = rng.normal(size=(2, 9, 10, 4)).astype("float32")
    layer(x)
    copy_conv(layer.conv, ref[0])
    copy_norm(layer.norm_layer, ref[1])
    with torch.no_grad():
        want = nhwc(ref(nchw(x)))
    np.testing.assert_allclose(to_np(layer(x)), want, atol=1e-4)
    assert count_params(layer) == sum(p.numel() for p in ref.parameters())


# --------------------------------------------------------------------------- FPN

@pytest.mark.parametrize("size", [(3, 5), (4, 4), (5, 9)])
def test_resize_nearest_is_torch_rule(rng, size):
    x = rng.normal(size=(1, 3, 4, 2)).astype("float32")
    out_h, out_w = size[0] * 2 - 1, size[1] + 3
    np.testing.assert_array_equal(to_np(resize_nearest(x, (out_h, out_w))),
                                  np_nearest(x, out_h, out_w))
    if HAVE_TORCHVISION:
        want = torch.nn.functional.interpolate(nchw(x), size=(out_h, out_w), mode="nearest")
        np.testing.assert_array_equal(to_np(resize_nearest(x, (out_h, out_w))), nhwc(want))


def fpn_param_formula(in_channels, out, norm, extra, p6_in):
    """Count of torchvision FeaturePyramidNetwork (+ extra block), written out."""
    bias_or_bn = 2 * out if norm else out
    count = sum(c * out + bias_or_bn for c in in_channels)
    count += len(in_channels) * (9 * out * out + bias_or_bn)
    if extra and extra.startswith("p6p7"):
        count += (9 * p6_in * out + out) + (9 * out * out + out)
    return count


@pytest.mark.parametrize("extra,norm", [("p6p7_from_p5", None), ("p6p7_from_c5", None),
                                        ("maxpool", "batch")])
def test_fpn_param_count_real_config(extra, norm):
    """RetinaNet v1 (P6 from P5) / v2 (from C5) and Faster R-CNN v2 (BN) FPNs."""
    levels = (2, 3, 4, 5) if extra == "maxpool" else (3, 4, 5)
    chans = [256, 512, 1024, 2048][-len(levels):]
    layer = FPN(256, in_levels=levels, extra_blocks=extra, norm=norm)
    layer.build({f"C{lv}": (None, None, None, c) for lv, c in zip(levels, chans)})
    p6_in = 2048 if extra == "p6p7_from_c5" else 256
    assert count_params(layer) == fpn_param_formula(chans, 256, norm, extra, p6_in)
    if HAVE_TORCHVISION:
        blocks = {"p6p7_from_p5": LastLevelP6P7(256, 256), "p6p7_from_c5": LastLevelP6P7(2048, 256),
                  "maxpool": LastLevelMaxPool()}
        ref = FeaturePyramidNetwork(chans, 256, extra_blocks=blocks[extra],
                                    norm_layer=torch.nn.BatchNorm2d if norm else None)
        assert count_params(layer) == sum(p.numel() for p in ref.parameters())
    # DESIGN.md totals minus ResNet-50 without fc (23,508,032) minus the heads
    # (test_retinanet_head_param_count_real_config): v1 uses P5, v2 uses C5.
    if extra == "p6p7_from_p5":
        assert count_params(layer) == 34_068_119 - 23_508_032 - 6_691_415
    if extra == "p6p7_from_c5":
        assert count_params(layer) == 38_198_935 - 23_508_032 - 6_693_463


def copy_fpn(layer, ref, norm):
    for k_blocks, t_blocks in ((layer.inner_blocks, ref.inner_blocks),
                               (layer.layer_blocks, ref.layer_blocks)):
        for k, t in zip(k_blocks, t_blocks):
            copy_conv(k.conv, t[0])
            if norm:
                copy_norm(k.norm_layer, t[1])
    if isinstance(ref.extra_blocks, LastLevelP6P7):
        copy_conv(layer.p6.conv, ref.extra_blocks.p6)
        copy_conv(layer.p7.conv, ref.extra_blocks.p7)


@needs_torchvision
@pytest.mark.parametrize("extra,norm", [("p6p7_from_p5", None), ("p6p7_from_c5", "batch"),
                                        ("maxpool", None)])
def test_fpn_matches_torchvision(rng, extra, norm):
    levels = (2, 3, 4, 5) if extra == "maxpool" else (3, 4, 5)
    chans = [4, 8, 16, 32][-len(levels):]
    # Odd sizes (an 148x199 image): top-down upsampling is not an exact x2.
    sizes = [(37, 50), (19, 25), (10, 13), (5, 7)][-len(levels):]
    blocks = {"p6p7_from_p5": LastLevelP6P7(16, 16), "p6p7_from_c5": LastLevelP6P7(32, 16),
              "maxpool": LastLevelMaxPool()}
    ref = randomize_torch(FeaturePyramidNetwork(
        chans, 16, extra_blocks=blocks[extra], norm_layer=torch.nn.BatchNorm2d if norm else None))
    layer = FPN(16, in_levels=levels, extra_blocks=extra, norm=norm)
    feats = {f"C{lv}": rng.normal(size=(2, h, w, c)).astype("float32")
             for lv, (h, w), c in zip(levels, sizes, chans)}
    feats["C1"] = np.zeros((2, 3, 3, 3), "float32")  # extra keys are ignored
    build_for(layer, feats)
    copy_fpn(layer, ref, norm)
    out = infer(layer, feats)
    with torch.no_grad():
        want = list(ref({k: nchw(feats[f"C{lv}"]) for k, lv in zip("abcd", levels)}).values())
    assert list(out) == [f"P{lv}" for lv in layer.out_levels]
    assert len(out) == len(want)
    for got, w in zip(out.values(), want):
        np.testing.assert_allclose(to_np(got), nhwc(w), atol=1e-4)
    assert count_params(layer) == sum(p.numel() for p in ref.parameters())


def test_fpn_rejects_bad_input():
    with pytest.raises(ValueError, match="extra_blocks"):
        FPN(8, extra_blocks="p6")
    with pytest.raises(ValueError, match="consecutive"):
        FPN(8, in_levels=(3, 5))
    with pytest.raises(ValueError, match="C5"):
        FPN(8, in_levels=(3, 4, 5))({"C3": np.zeros((1, 4, 4, 2), "float32"),
                                     "C4": np.zeros((1, 2, 2, 2), "float32")})


# --------------------------------------------------------------------------- BiFPN

def test_bifpn_nodes_follow_effdet_config():
    nodes = bifpn_nodes(3, 7)
    # inputs P3..P7 are 0..4; top-down P6'(5) P5'(6) P4'(7) P3'(8); bottom-up 9..12
    assert nodes == [(6, (3, 4)), (5, (2, 5)), (4, (1, 6)), (3, (0, 7)),
                     (4, (1, 7, 8)), (5, (2, 6, 9)), (6, (3, 5, 10)), (7, (4, 11))]
    if HAVE_EFFDET:
        from effdet.config import get_fpn_config
        for name in ("bifpn_fa", "bifpn_sum"):
            for max_level in (7, 8):
                ref = get_fpn_config(name, min_level=3, max_level=max_level)
                assert bifpn_nodes(3, max_level) == [
                    (n["feat_level"], tuple(n["inputs_offsets"])) for n in ref.nodes]


@pytest.mark.parametrize("mode", ["fast", "softmax", "attn", "sum"])
def test_weighted_fusion_formula(rng, mode):
    xs = [rng.normal(size=(2, 3, 3, 4)).astype("float32") for _ in range(3)]
    layer = WeightedFusion(mode)
    layer(xs)
    if mode == "sum":
        assert not layer.weights
        want = sum(xs)
    else:
        w = np.array([0.7, -0.4, 2.0], "float32")
        layer.edge_weights.assign(w)
        norm = (np.maximum(w, 0) / (np.maximum(w, 0).sum() + 1e-4) if mode == "fast"
                else np.exp(w) / np.exp(w).sum())
        want = sum(n * x for n, x in zip(norm, xs))
    np.testing.assert_allclose(to_np(layer(xs)), want, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        WeightedFusion("mean")


def test_resample_feature_matches_numpy(rng):
    x = rng.normal(size=(2, 9, 7, 6)).astype("float32")
    layer = ResampleFeature(4, apply_bn=True, redundant_bias=True)
    y = layer(x)  # no target: one level down (3x3/s2 SAME)
    randomize_bn(layer.conv.norm_layer, rng)
    layer.conv.conv.bias.assign(rng.normal(size=4).astype("float32"))
    bn = layer.conv.norm_layer
    conv = np_conv2d(x, to_np(layer.conv.conv.kernel), to_np(layer.conv.conv.bias))
    conv = np_batch_norm(conv, *(to_np(v) for v in (bn.gamma, bn.beta, bn.moving_mean,
                                                    bn.moving_variance)), 1e-3)
    np.testing.assert_allclose(to_np(layer(x, training=False)), np_max_pool_same(conv, 3, 2),
                               atol=1e-4)
    assert tuple(y.shape) == (2, 5, 4, 4)
    assert count_params(layer) == 6 * 4 + 4 + 2 * 4
    # same channels: no conv; resample to a target's size up (nearest) or down
    same = ResampleFeature(6)
    up_target, down_target = np.zeros((1, 17, 13, 1)), np.zeros((1, 5, 4, 1))
    np.testing.assert_array_equal(to_np(same(x, target=up_target)), np_nearest(x, 17, 13))
    np.testing.assert_allclose(to_np(same(x, target=down_target)), np_max_pool_same(x, 3, 2))
    assert not same.weights


def effdet_small_config(fusion="fast", act="swish", channels=16, repeats=2, box_repeats=2,
                        image_size=(80, 80), separable=True):
    cfg = get_efficientdet_config("tf_efficientdet_d0")
    set_config_writeable(cfg)
    cfg.fpn_channels, cfg.fpn_cell_repeats, cfg.box_class_repeats = channels, repeats, box_repeats
    cfg.image_size = image_size
    cfg.fpn_name = {"fast": "bifpn_fa", "sum": "bifpn_sum", "softmax": "bifpn_attn"}[fusion]
    cfg.act_type = act
    cfg.separable_conv = separable
    return cfg


def copy_effdet_conv_block(block, ref):
    """effdet ConvBnAct2d / SeparableConv2d -> kdet ConvNormAct / SeparableConvNormAct."""
    if hasattr(ref, "conv_dw"):
        copy_conv(block.conv_dw, ref.conv_dw)
        copy_conv(block.conv_pw, ref.conv_pw)
    else:
        copy_conv(block.conv, ref.conv)
    assert (ref.bn is None) == (block.norm_layer is None)
    if ref.bn is not None:
        copy_norm(block.norm_layer, ref.bn)


def copy_effdet_resample(layer, ref):
    assert hasattr(ref, "conv") == (layer.conv is not None)
    if layer.conv is not None:
        copy_effdet_conv_block(layer.conv, ref.conv)


def copy_effdet_bifpn(layer, ref):
    for k, t in zip(layer.extra_resample, ref.resample.values(), strict=True):
        copy_effdet_resample(k, t)
    for cell, ref_cell in zip(layer.cells, ref.cell, strict=True):
        for node, fnode in zip(cell, ref_cell.fnode, strict=True):
            for k, t in zip(node.resample, fnode.combine.resample.values(), strict=True):
                copy_effdet_resample(k, t)
            if fnode.combine.edge_weights is not None:
                node.combine.edge_weights.assign(_t(fnode.combine.edge_weights))
            copy_effdet_conv_block(node.conv, fnode.after_combine.conv)


@needs_effdet
@pytest.mark.parametrize("fusion,act,separable", [("fast", "swish", True),
                                                  ("sum", "relu6", False),
                                                  ("softmax", "swish", True)])
def test_bifpn_matches_effdet(rng, fusion, act, separable):
    """80x80 image: levels 10, 5, 3, 2, 1 (odd sizes, non-x2 upsampling)."""
    cfg = effdet_small_config(fusion, act, separable=separable)
    chans = [6, 10, 12]
    ref = EffdetBiFpn(cfg, [dict(num_chs=c, reduction=2 ** lv) for c, lv in zip(chans, (3, 4, 5))])
    ref = randomize_torch(ref, seed=1)
    with torch.no_grad():
        for m in ref.modules():
            if getattr(m, "edge_weights", None) is not None:
                m.edge_weights.copy_(torch.rand(m.edge_weights.shape) + 0.2)
    layer = BiFPN(16, 2, fusion=fusion, activation=act, separable=separable)
    feats = {f"C{lv}": rng.normal(size=(2, s, s, c)).astype("float32")
             for lv, s, c in zip((3, 4, 5), (10, 5, 3), chans)}
    build_for(layer, feats)
    copy_effdet_bifpn(layer, ref)
    out = infer(layer, feats)
    with torch.no_grad():
        want = ref([nchw(feats[f"C{lv}"]) for lv in (3, 4, 5)])
    assert list(out) == ["P3", "P4", "P5", "P6", "P7"]
    for got, w in zip(out.values(), want):
        assert tuple(got.shape) == nhwc(w).shape
        np.testing.assert_allclose(to_np(got), nhwc(w), atol=2e-4, rtol=1e-4)
    assert count_params(layer) == sum(p.numel() for p in ref.parameters())


# Backbone C3..C5 channels (timm tf_efficientnet_b0..b3 / lite0) and the effdet
# BiFPN / class net / box net parameter counts (90 classes); from effdet when it
# is importable, else these values from effdet's `create_model(...).fpn` etc.
EFFDET_CASES = {
    "tf_efficientdet_d0": ((40, 112, 320), 64, 3, 3, "fast", "swish", (196281, 69354, 19044)),
    "tf_efficientdet_d1": ((40, 112, 320), 88, 4, 3, "fast", "swish", (390972, 101394, 32508)),
    "tf_efficientdet_d2": ((48, 120, 352), 112, 5, 3, "fast", "swish", (708159, 136890, 49428)),
    "tf_efficientdet_d3": ((48, 136, 384), 160, 6, 4, "fast", "swish", (1559474, 247050, 122436)),
    "tf_efficientdet_lite0": ((40, 112, 320), 64, 3, 3, "sum", "relu6", (196224, 69354, 19044)),
}


@functools.lru_cache(maxsize=None)
def effdet_counts(name):
    model = effdet.create_model(name, pretrained=False, pretrained_backbone=False)
    chans = tuple(f["num_chs"] for f in model.backbone.feature_info.get_dicts())
    counts = tuple(sum(p.numel() for p in m.parameters())
                   for m in (model.fpn, model.class_net, model.box_net))
    return chans, counts


@pytest.mark.parametrize("name", [
    "tf_efficientdet_d0", "tf_efficientdet_lite0",
    pytest.param("tf_efficientdet_d1", marks=pytest.mark.slow),
    pytest.param("tf_efficientdet_d2", marks=pytest.mark.slow),
    pytest.param("tf_efficientdet_d3", marks=pytest.mark.slow)])
def test_bifpn_and_head_param_counts_match_effdet(name):
    chans, width, d_bifpn, d_head, fusion, act, counts = EFFDET_CASES[name]
    if HAVE_EFFDET:
        assert effdet_counts(name) == (chans, counts)
    bifpn = BiFPN(width, d_bifpn, fusion=fusion, activation=act)
    bifpn.build({f"C{lv}": (None, None, None, c) for lv, c in zip((3, 4, 5), chans)})
    shapes = [(None, None, None, width)] * 5
    class_net = EfficientDetHead(90, depth=d_head, activation=act, prior_probability=0.01)
    box_net = EfficientDetHead(4, depth=d_head, activation=act)
    class_net.build(shapes)
    box_net.build(shapes)
    assert (count_params(bifpn), count_params(class_net), count_params(box_net)) == counts
    if name == "tf_efficientdet_d0":  # DESIGN.md: full D0 = 3,880,067 with the B0 backbone
        assert 3_880_067 - sum(counts) == 3_595_388  # timm tf_efficientnet_b0 features


def test_bifpn_d7x_levels_and_input_errors():
    bifpn = BiFPN(8, 1, max_level=8, fusion="sum")
    feats = {"C3": np.zeros((1, 16, 16, 4), "float32"), "C4": np.zeros((1, 8, 8, 4), "float32"),
             "C5": np.zeros((1, 4, 4, 4), "float32")}
    out = infer(build_for(bifpn, feats), feats)
    assert [(k, tuple(v.shape)[1:3]) for k, v in out.items()] == [
        ("P3", (16, 16)), ("P4", (8, 8)), ("P5", (4, 4)), ("P6", (2, 2)), ("P7", (1, 1)),
        ("P8", (1, 1))]
    with pytest.raises(ValueError, match="C3"):
        BiFPN(8, 1)({"C4": feats["C4"]})
    with pytest.raises(ValueError, match="fusion"):
        BiFPN(8, 1, fusion="mean")


# --------------------------------------------------------------------------- heads

def test_retinanet_head_order_matches_numpy(rng):
    """num_convs=0: one conv; output rows must be (level, y, x, anchor) with K per row."""
    head = RetinaNetHead(3, num_anchors=2, num_convs=0)
    feats = [rng.normal(size=(2, 4, 5, 6)).astype("float32"),
             rng.normal(size=(2, 2, 3, 6)).astype("float32")]
    out = head(feats)
    cls_kernel, cls_bias = to_np(head.cls_logits.conv.kernel), to_np(head.cls_logits.conv.bias)
    np.testing.assert_allclose(cls_bias, -np.log(0.99 / 0.01), rtol=1e-6)
    want = []
    for x in feats:
        y = np_conv2d(x, cls_kernel, cls_bias, pads=(1, 1, 1, 1))  # [B, H, W, A*K]
        b, h, w, _ = y.shape
        want.append(y.reshape(b, h, w, 2, 3).reshape(b, h * w * 2, 3))
    np.testing.assert_allclose(to_np(out["cls_logits"]), np.concatenate(want, 1), atol=1e-5)
    assert tuple(out["bbox_regression"].shape) == (2, (20 + 6) * 2, 4)


@needs_torchvision
@pytest.mark.parametrize("norm", [None, "group"])
def test_retinanet_head_matches_torchvision(rng, norm):
    from torchvision.models.detection.retinanet import RetinaNetHead as TorchRetinaNetHead
    ref = randomize_torch(TorchRetinaNetHead(
        16, 3, 5, norm_layer=functools.partial(torch.nn.GroupNorm, 4) if norm else None))
    head = RetinaNetHead(5, num_anchors=3, norm=norm, groups=4)
    feats = {f"P{lv}": rng.normal(size=(2, s, s + 1, 16)).astype("float32")
             for lv, s in zip((3, 4, 5), (8, 4, 2))}
    build_for(head, feats)
    for k_convs, t_branch in ((head.classification_convs, ref.classification_head),
                              (head.regression_convs, ref.regression_head)):
        for k, t in zip(k_convs, t_branch.conv, strict=True):
            copy_conv(k.conv, t[0])
            if norm:
                copy_norm(k.norm_layer, t[1])
    copy_conv(head.cls_logits.conv, ref.classification_head.cls_logits)
    copy_conv(head.bbox_reg.conv, ref.regression_head.bbox_reg)
    out = infer(head, feats)
    with torch.no_grad():
        want = ref([nchw(feats[f"P{lv}"]) for lv in (3, 4, 5)])
    for key in ("cls_logits", "bbox_regression"):
        np.testing.assert_allclose(to_np(out[key]), want[key].numpy(), atol=1e-4)
    assert count_params(head) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("norm,want", [(None, 6_691_415), ("group", 6_693_463)])
def test_retinanet_head_param_count_real_config(norm, want):
    """torchvision RetinaNetHead(256, 9, 91), v1 (no norm) and v2 (GroupNorm(32))."""
    head = RetinaNetHead(91, norm=norm)
    head.build([(None, None, None, 256)] * 5)
    conv = 9 * 256 * 256 + (2 * 256 if norm else 256)
    formula = 8 * conv + (9 * 256 * 9 * 91 + 9 * 91) + (9 * 256 * 9 * 4 + 9 * 4)
    assert count_params(head) == formula == want
    if HAVE_TORCHVISION:
        from torchvision.models.detection.retinanet import RetinaNetHead as TorchRetinaNetHead
        ref = TorchRetinaNetHead(256, 9, 91, norm_layer=functools.partial(
            torch.nn.GroupNorm, 32) if norm else None)
        assert count_params(head) == sum(p.numel() for p in ref.parameters())


@needs_effdet
@pytest.mark.parametrize("num_outputs,separable,act", [(5, True, "swish"), (4, False, "relu6")])
def test_efficientdet_head_matches_effdet(rng, num_outputs, separable, act):
    cfg = effdet_small_config(act=act, separable=separable)
    ref = randomize_torch(EffdetHeadNet(cfg, num_outputs), seed=2)
    head = EfficientDetHead(num_outputs, num_anchors=9, depth=2, activation=act,
                            separable=separable, prior_probability=0.01)
    feats = [rng.normal(size=(2, s, s, 16)).astype("float32") for s in (10, 5, 3, 2, 1)]
    build_for(head, feats)
    for k, t in zip(head.conv_rep, ref.conv_rep, strict=True):
        copy_effdet_conv_block(k, t)
    for k_bns, t_bns in zip(head.bn_rep, ref.bn_rep, strict=True):
        for k, t in zip(k_bns, t_bns, strict=True):
            copy_norm(k, t.bn)
    copy_effdet_conv_block(head.predict, ref.predict)
    out = infer(head, {f"P{lv}": x for lv, x in zip(range(3, 8), feats)})
    with torch.no_grad():
        levels = ref([nchw(x) for x in feats])
    want = np.concatenate([t.permute(0, 2, 3, 1).reshape(2, -1, num_outputs).numpy()
                           for t in levels], axis=1)
    np.testing.assert_allclose(to_np(out), want, atol=2e-4, rtol=1e-4)
    assert count_params(head) == sum(p.numel() for p in ref.parameters())


def test_efficientdet_head_prior_bias_and_errors():
    head = EfficientDetHead(3, num_anchors=2, depth=1, num_levels=2, prior_probability=0.01)
    head.build([(None, None, None, 8)] * 2)
    np.testing.assert_allclose(to_np(head.predict.conv_pw.bias), -np.log(99.0), rtol=1e-6)
    assert [bn.name for bn in head.bn_rep[0]] == ["bn_0_0", "bn_0_1"]
    with pytest.raises(ValueError, match="levels"):
        head([np.zeros((1, 2, 2, 8), "float32")])
    with pytest.raises(ValueError, match="num_channels"):
        EfficientDetHead(3, num_channels=16, num_levels=1)([np.zeros((1, 2, 2, 8), "float32")])


# --------------------------------------------------------------------------- Keras contract

def _pyramid(batch=2, channels=8, sizes=(8, 4, 2), prefix="P", first=3):
    rng = np.random.default_rng(1)
    return {f"{prefix}{first + i}": rng.normal(size=(batch, s, s, channels)).astype("float32")
            for i, s in enumerate(sizes)}


def _backbone(batch=2):
    rng = np.random.default_rng(2)
    return {f"C{lv}": rng.normal(size=(batch, s, s, c)).astype("float32")
            for lv, s, c in zip((3, 4, 5), (8, 4, 2), (6, 10, 12))}


def _image(batch=2):
    return np.random.default_rng(3).uniform(0, 255, (batch, 8, 8, 3)).astype("float32")


CASES = {
    "activation": (lambda: Activation("swish"), _image),
    "frozen_bn": (lambda: FrozenBatchNormalization(), _image),
    "image_norm": (lambda: ImageNormalization.for_mode("lite"), _image),
    "conv_norm_act": (lambda: ConvNormAct(8, 3, strides=2, padding="torch", norm="group",
                                          groups=4, activation="relu"), _image),
    "separable": (lambda: SeparableConvNormAct(8, 3, norm="batch", use_bias=True,
                                               activation="swish"), _image),
    "fpn": (lambda: FPN(8, in_levels=(3, 4, 5), extra_blocks="p6p7_from_c5", norm="batch"),
            _backbone),
    "bifpn": (lambda: BiFPN(8, 1, max_level=6, fusion="fast"), _backbone),
    "fusion": (lambda: WeightedFusion("softmax"),
               lambda: list(_pyramid(sizes=(4, 4, 4)).values())),
    "resample": (lambda: ResampleFeature(8), _image),
    "effdet_head": (lambda: EfficientDetHead(4, num_anchors=3, depth=2, num_levels=3,
                                             prior_probability=0.01),
                    _pyramid),
    "retinanet_head": (lambda: RetinaNetHead(3, num_anchors=3, num_convs=1, norm="group",
                                             groups=4), _pyramid),
}


def _symbolic(inputs):
    if isinstance(inputs, dict):
        return {k: keras.Input(v.shape[1:], name=k) for k, v in inputs.items()}
    if isinstance(inputs, list):
        return [keras.Input(v.shape[1:]) for v in inputs]
    return keras.Input(inputs.shape[1:])


def _flat(outputs):
    return [to_np(v) for v in keras.tree.flatten(outputs)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_keras_file_round_trip(case, tmp_path):
    make, make_inputs = CASES[case]
    inputs = make_inputs()
    symbolic = _symbolic(inputs)
    layer = make()
    model = keras.Model(symbolic, layer(symbolic))
    assert type(layer).from_config(layer.get_config()).get_config() == layer.get_config()
    # perturb every float weight so a weight that is not restored shows
    for i, v in enumerate(model.weights):
        if "float" in str(v.dtype):
            v.assign(v + ops.cast(0.01 * (i + 1), v.dtype))
    path = tmp_path / f"{case}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for got, want in zip(_flat(infer(loaded, inputs)), _flat(infer(model, inputs))):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert count_params(loaded) == count_params(model)


@pytest.fixture
def policy():
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_precision(case, name, policy):
    make, make_inputs = CASES[case]
    reference = _flat(_run_fresh(make, make_inputs, seed=7))
    policy(name)
    got = _run_fresh(make, make_inputs, seed=7)
    compute = name.split("_")[1]
    for x, want in zip(keras.tree.flatten(got), reference):
        assert keras.backend.standardize_dtype(x.dtype) == compute
        x = to_np(x)
        assert np.isfinite(x).all()
        tol = 0.05 if compute == "float16" else 0.3  # relative to the output's scale
        assert np.abs(x - want).max() <= tol * max(1.0, np.abs(want).max())
    layer = make()
    assert layer.dtype_policy.name == name


def _run_fresh(make, make_inputs, seed):
    keras.utils.set_random_seed(seed)
    inputs = make_inputs()
    return infer(build_for(make(), inputs), inputs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_jit_compile(case):
    make, make_inputs = CASES[case]
    layer = make()
    inputs = make_inputs()
    eager = _flat(layer(inputs, training=False))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        compiled = tf.function(lambda x: layer(x, training=False), jit_compile=True)
    elif keras.backend.backend() == "jax":
        import jax
        compiled = jax.jit(lambda x: layer(x, training=False))
    else:
        pytest.skip(f"no jit test for backend {keras.backend.backend()}")
    for got, want in zip(_flat(compiled(inputs)), eager):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_fpn_and_head_with_unknown_spatial_size(rng):
    """keras.Input((None, None, C)): the top-down resize takes its size at run time."""
    symbolic = {f"C{lv}": keras.Input((None, None, c), name=f"C{lv}")
                for lv, c in zip((3, 4, 5), (4, 6, 8))}
    fpn = FPN(8, in_levels=(3, 4, 5), extra_blocks="p6p7_from_p5")
    head = RetinaNetHead(3, num_anchors=2, num_convs=1)
    pyramid = fpn(symbolic)
    model = keras.Model(symbolic, [pyramid, head(pyramid)])
    feats = {f"C{lv}": rng.normal(size=(2, h, w, c)).astype("float32")
             for lv, (h, w), c in zip((3, 4, 5), [(19, 25), (10, 13), (5, 7)], (4, 6, 8))}
    got = model.predict(feats, verbose=0)
    static = fpn(feats)
    want = [static, head(static)]
    for g, w in zip(keras.tree.flatten(got), keras.tree.flatten(want)):
        np.testing.assert_allclose(to_np(g), to_np(w), atol=1e-5)


def test_resample_feature_with_target_round_trip(tmp_path, rng):
    x, target = keras.Input((9, 7, 6)), keras.Input((17, 13, 1))
    model = keras.Model([x, target], ResampleFeature(4)(x, target=target))
    model.save(tmp_path / "resample.keras")
    loaded = keras.saving.load_model(tmp_path / "resample.keras", safe_mode=True)
    data = [rng.normal(size=(1, 9, 7, 6)).astype("float32"), np.zeros((1, 17, 13, 1), "float32")]
    np.testing.assert_array_equal(to_np(loaded(data)), to_np(model(data)))
    assert tuple(loaded(data).shape) == (1, 17, 13, 4)


def test_layers_are_registered():
    for cls in (ConvNormAct, SeparableConvNormAct, FrozenBatchNormalization, ImageNormalization,
                FPN, BiFPN, WeightedFusion, ResampleFeature, EfficientDetHead, RetinaNetHead):
        assert keras.saving.get_registered_object(f"kdet>{cls.__name__}") is cls


# --------------------------------------------------------------------------- BatchNormalization
def _torch_batch_norm_steps(batches, momentum, epsilon, masks=None):
    """torch.nn.BatchNorm2d in training mode over NHWC numpy batches (rows where
    ``masks`` is False left out, as torchvision's RoI batch has no padded rows)."""
    bn = torch.nn.BatchNorm2d(batches[0].shape[-1], momentum=1.0 - momentum, eps=epsilon)
    outputs = []
    for i, x in enumerate(batches):
        if masks is not None:
            x = x[masks[i]]
        outputs.append(bn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                       .detach().numpy())
    return bn.running_mean.numpy(), bn.running_var.numpy(), outputs


@needs_torchvision
@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_moving_statistics_equal_torch_batch_norm(masked):
    """kdet's BatchNormalization: the output and, after 4 training calls (a batch of 1 on a
    1 x 2 map among them: n = 2, where biased and unbiased variances differ 2x), the moving
    mean and variance of torch.nn.BatchNorm2d (momentum 0.1 = Keras 0.9). Masked: the
    statistics of the kept rows only, with n their count (kdet's RoI heads mask padding)."""
    from kdet.layers import BatchNormalization
    rng = np.random.default_rng(0)
    shapes = [(4, 3, 3, 5), (1, 1, 2, 5), (3, 2, 2, 5), (2, 4, 1, 5)]
    batches = [rng.normal(1.0, 2.0, s).astype("float32") for s in shapes]
    masks = None
    if masked:  # a mask over rows, as kdet's RoI heads pass it (>= 1 kept row; 2 in the n=2 case)
        masks = [np.array([True, False, True, True]), np.array([True]),
                 np.array([False, True, False]), np.array([True, True])]
    layer = BatchNormalization(momentum=0.9, epsilon=1e-5)
    outputs = []
    for i, x in enumerate(batches):
        mask = None
        if masked:
            mask = np.broadcast_to(masks[i][:, None, None], x.shape[:3])
        y = to_np(layer(x, training=True, mask=mask))
        outputs.append(y[masks[i]] if masked else y)
    mean, var, torch_outputs = _torch_batch_norm_steps(batches, 0.9, 1e-5, masks)
    np.testing.assert_allclose(to_np(layer.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(layer.moving_variance), var, rtol=1e-5, atol=1e-6)
    for y, t in zip(outputs, torch_outputs):
        np.testing.assert_allclose(y, t, rtol=1e-4, atol=1e-4)
    # Keras' own layer keeps the biased variance: a different moving variance.
    keras_layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
    for i, x in enumerate(batches):
        mask = np.broadcast_to(masks[i][:, None, None], x.shape[:3]) if masked else None
        keras_layer(x, training=True, mask=mask)
    assert np.max(np.abs(to_np(keras_layer.moving_variance) - var)) > 1e-3


def test_batch_norm_keras_update_on_request_and_config_roundtrip():
    """``unbiased_moving_variance=False`` is Keras' layer exactly; the flag survives
    get_config / from_config; inference uses the moving statistics as Keras does."""
    from kdet.layers import BatchNormalization
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (2, 2, 2, 3)).astype("float32")
    ours = BatchNormalization(unbiased_moving_variance=False, momentum=0.5)
    theirs = keras.layers.BatchNormalization(momentum=0.5)
    np.testing.assert_allclose(to_np(ours(x, training=True)), to_np(theirs(x, training=True)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_np(ours.moving_variance), to_np(theirs.moving_variance),
                               rtol=1e-6)
    np.testing.assert_allclose(to_np(ours(x, training=False)), to_np(theirs(x, training=False)),
                               rtol=1e-6, atol=1e-6)
    clone = BatchNormalization.from_config(BatchNormalization(momentum=0.5).get_config())
    assert clone.unbiased_moving_variance is True and clone.momentum == 0.5
    assert BatchNormalization.from_config(ours.get_config()).unbiased_moving_variance is False


@pytest.mark.skipif(not HAVE_EFFDET, reason="effdet/timm not installed")
def test_batch_norm_statistics_average_equals_timm_model_ema():
    """effdet's trainer averages the whole state dict with timm's ``ModelEmaV2`` (decay
    fixed, from a copy of the model before training), BN buffers included. kdet's
    BatchNormalization(statistics_ema_momentum=d) after 4 training calls: the average of
    the moving mean and variance equals ModelEmaV2's copy of BatchNorm2d's buffers."""
    from timm.utils import ModelEmaV2

    from kdet.layers import BatchNormalization
    rng = np.random.default_rng(2)
    batches = [rng.normal(1.0, 2.0, s).astype("float32")
               for s in [(4, 3, 3, 5), (1, 1, 2, 5), (3, 2, 2, 5), (2, 4, 1, 5)]]
    layer = BatchNormalization(momentum=0.9, epsilon=1e-5, statistics_ema_momentum=0.7)
    bn = torch.nn.BatchNorm2d(5, momentum=0.1, eps=1e-5)
    ema = ModelEmaV2(bn, decay=0.7)
    for x in batches:
        layer(x, training=True)
        bn(torch.from_numpy(x).permute(0, 3, 1, 2))
        ema.update(bn)
    np.testing.assert_allclose(to_np(layer.averaged_moving_mean),
                               ema.module.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(layer.averaged_moving_variance),
                               ema.module.running_var.numpy(), rtol=1e-5, atol=1e-6)
    # the average is not the moving statistics themselves
    assert np.max(np.abs(to_np(layer.averaged_moving_variance) - bn.running_var.numpy())) > 0.1


def test_batch_norm_statistics_average_in_fit_with_ema_warmup(tmp_path):
    """Through ``fit`` with an EMA optimizer (kdet.optimizers.SGD, automl's warm-up and
    averages from the initial values) and ``EMAWeightsAtEpochEnd``: after each epoch the
    model holds the average of the moving statistics, written out here: ``a_0`` = the
    statistics before training, ``a_t = m_t a_(t-1) + (1 - m_t) v_t`` with ``m_t =
    min(M, (1 + t) / (10 + t))``; the raw statistics are back at the next epoch's start;
    the average survives saving; the optimizer's own EMA stays trainable-only."""
    from kdet.layers import BatchNormalization, average_batch_norm_statistics
    from kdet.optimizers import SGD
    from kdet.workflow.callbacks import EMAWeightsAtEpochEnd

    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (12, 4)).astype("float32")
    y = rng.normal(size=(12, 1)).astype("float32")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(1)(BatchNormalization(momentum=0.8, name="bn")(inputs))
    model = keras.Model(inputs, outputs)
    model.get_layer("bn").moving_mean.assign(np.full(4, 0.5, "float32"))  # "loaded" statistics
    layers = average_batch_norm_statistics(model, 0.9, warmup=True)
    assert [layer.name for layer in layers] == ["bn"]
    model.compile(optimizer=SGD(0.01, use_ema=True, ema_momentum=0.9, ema_from_initial=True),
                  loss="mse")
    seen = []

    class Watch(keras.callbacks.Callback):  # after EMAWeightsAtEpochEnd
        def on_epoch_end(self, epoch, logs=None):
            seen.append(to_np(self.model.get_layer("bn").moving_mean).copy())

        def on_epoch_begin(self, epoch, logs=None):
            seen.append(to_np(self.model.get_layer("bn").moving_mean).copy())

    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0,
              callbacks=[EMAWeightsAtEpochEnd(), Watch()])
    moving, average = np.full(4, 0.5), np.full(4, 0.5)
    expected_average, expected_raw = [], []
    for t in range(1, 7):
        batch = x[(t - 1) % 3 * 4:(t - 1) % 3 * 4 + 4].astype("float64")
        moving = 0.8 * moving + 0.2 * batch.mean(0)
        m = min(0.9, (1 + t) / (10 + t))
        average = m * average + (1 - m) * moving
        if t % 3 == 0:
            expected_average.append(average.copy())
            expected_raw.append(moving.copy())
    # epoch 1 begins (raw, 0.5), ends (average), epoch 2 begins (raw), ends (average)
    np.testing.assert_allclose(seen[0], 0.5)
    np.testing.assert_allclose(seen[1], expected_average[0], rtol=1e-5)
    np.testing.assert_allclose(seen[2], expected_raw[0], rtol=1e-5)
    np.testing.assert_allclose(seen[3], expected_average[1], rtol=1e-5)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(to_np(bn.moving_mean), expected_average[1], rtol=1e-5)
    assert float(to_np(bn.statistics_updates)) == 6
    assert not any("averaged" in v.path for v in model.trainable_variables)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(to_np(loaded.get_layer("bn").averaged_moving_mean),
                               to_np(bn.averaged_moving_mean))
    assert loaded.get_layer("bn").statistics_ema_warmup is True


def test_batch_norm_fused_training_path_equals_the_composite_one():
    """On TensorFlow a 4-D unmasked batch trains through ``FusedBatchNormV3`` (its gradient
    one kernel); output, moving statistics and gradients equal the composite ops'
    (an all-true mask takes them), batch 1 on a 1 x 1 map (n = 1) included."""
    if backend() != "tensorflow":
        pytest.skip("TensorFlow's fused kernel")
    import tensorflow as tf

    from kdet.layers import BatchNormalization
    rng = np.random.default_rng(4)
    for shape in [(3, 5, 4, 6), (1, 1, 1, 6), (2, 1, 1, 6)]:
        x = tf.constant(rng.normal(1.0, 2.0, shape).astype("float32"))
        gamma = rng.uniform(0.5, 1.5, shape[-1]).astype("float32")
        results = []
        for mask in (None, tf.ones(shape[:3], "bool")):
            layer = BatchNormalization(momentum=0.7, statistics_ema_momentum=0.5)
            layer.build(shape)
            layer.gamma.assign(gamma)

            @tf.function
            def step(layer=layer, mask=mask):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x, training=True, mask=mask)
                    loss = tf.reduce_sum(y * tf.range(1.0, 1.0 + y.shape[-1]) * y)
                return y, tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
            ops_used = {op.type for op in step.get_concrete_function().graph.get_operations()}
            assert ("FusedBatchNormV3" in ops_used) == (mask is None)
            y, grads = step()
            results.append([to_np(y)] + [to_np(g) for g in grads] + [
                to_np(v) for v in (layer.moving_mean, layer.moving_variance,
                                   layer.averaged_moving_variance)])
        for fused, composite in zip(*results):
            # atol: where n = 1 the gamma gradient is 0, the composite ops' rounding 1.5e-4
            np.testing.assert_allclose(fused, composite, rtol=1e-4, atol=5e-4)


@pytest.mark.parametrize("layer_kind", ["bn", "bn_no_affine", "frozen_eps0", "frozen"])
def test_batch_norm_fused_inference_equals_the_composite_ops(layer_kind, monkeypatch):
    """On TensorFlow a 4-D float32 batch in inference runs as one ``FusedBatchNormV3``
    (mean 0, variance 1, epsilon 0: the folded scale and shift), which grappler folds into
    the convolution before it; output and input gradient equal the multiply-add form
    (``FUSED_INFERENCE`` off), at batch 1 and with zero-variance channels. Training (a
    frozen or non-trainable batch norm's too), float16 and 2-D inputs keep the composite
    ops."""
    if backend() != "tensorflow":
        pytest.skip("TensorFlow's fused kernel")
    import tensorflow as tf

    from kdet.layers import BatchNormalization
    from kdet.layers import normalization
    rng = np.random.default_rng(5)

    def make():
        if layer_kind.startswith("frozen"):
            layer = FrozenBatchNormalization(epsilon=0.0 if layer_kind == "frozen_eps0" else 1e-5)
        else:
            affine = layer_kind == "bn"
            layer = BatchNormalization(epsilon=1e-3, scale=affine, center=affine)
            layer.trainable = False  # a frozen BN inside a trained model: inference form
        layer.build((None, None, None, 6))
        keras.utils.set_random_seed(1)
        for v in layer.weights:
            values = rng.uniform(0.5, 2.0, v.shape).astype("float32")
            if "variance" in v.name and layer_kind != "frozen_eps0":
                values[0] = 0.0  # a dead channel: only epsilon keeps it finite
            v.assign(values)
        return layer

    layer = make()
    for shape in [(2, 5, 4, 6), (1, 1, 1, 6)]:
        x = tf.constant(rng.normal(1.0, 2.0, shape).astype("float32"))
        results = []
        for fused in (True, False):
            monkeypatch.setattr(normalization, "FUSED_INFERENCE", fused)

            @tf.function
            def step(training):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = layer(x, training=training)
                    loss = tf.reduce_sum(y * tf.range(1.0, 1.0 + y.shape[-1]) * y)
                return y, tape.gradient(loss, x)
            for training in (False, True):
                graph = step.get_concrete_function(training).graph
                ops_used = {op.type for op in graph.get_operations()}
                assert ("FusedBatchNormV3" in ops_used) == (fused and not training)
                results.append([to_np(t) for t in step(training)])
        for got, want in zip(results[:2], results[2:]):
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(normalization, "FUSED_INFERENCE", True)
    kind = FrozenBatchNormalization if layer_kind.startswith("frozen") else BatchNormalization
    flat, half = kind(), kind(dtype="mixed_float16")
    flat.build((None, 6))
    half.build((None, None, None, 6))
    for x, target in ((np.ones((2, 6), "float32"), flat),
                      (np.ones((1, 2, 2, 6), "float16"), half)):
        graph = tf.function(lambda t: target(t, training=False)).get_concrete_function(
            tf.constant(x)).graph
        assert "FusedBatchNormV3" not in {op.type for op in graph.get_operations()}
