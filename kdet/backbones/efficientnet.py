"""EfficientNet B0-B7 and EfficientNet-Lite 0-4 feature extractors.

Both return ``{"C1": ..., "C5": ...}``, ``"Cn"`` at stride ``2**n``: the
ends of stages 1, 2, 3, 5 and 7 (the features timm's ``features_only``
models give; EfficientDet uses C3..C5). Neither includes the 1x1 head conv
(``top_conv`` / ``conv_head``) and neither normalises its input: kdet
detectors put ``kdet.layers.ImageNormalization`` in front (ImageNet mean/std
for B0-B7, [-1, 1] for Lite).

``EfficientNet`` reuses ``keras.applications.EfficientNetB*`` (built with
``weights=None``, nothing downloads) from its stem onwards: the application's
``Rescaling`` + ``Normalization`` preprocessing is skipped by calling its
layers again on a fresh input (then rebuilding from that model's config, so
every layer belongs to one graph and ``get_layer(name).output`` works). Its
stride-2 convs pad like TF ``SAME`` on even-sized inputs (``correct_pad``),
as the automl/timm ``tf_`` models do.

``EfficientNetLite`` is built here after timm's ``tf_efficientnet_lite*``:
ReLU6, no squeeze-excite, 32-channel stem, first and last stage depth not
scaled, TF ``SAME`` padding, BN epsilon 1e-3. Its layers carry timm's module
names (``"conv_stem"``, ``"blocks.1.0.conv_pw"``).

``load_timm_state_dict`` copies a timm ``tf_efficientnet_b*`` /
``tf_efficientnet_lite*`` state_dict (or the ``backbone.`` part of an effdet
checkpoint) into either model.
"""
import math
import re

import keras

from kdet.backbones._common import (check_return_levels, conv_initializer, feature_model,
                                    load_torch_state_dict, load_weights_file)
from kdet.layers.activation import Activation  # noqa: F401 (registers kdet>Activation)
from kdet.layers.depthwise import DepthwiseConv2D
from kdet.layers.normalization import BatchNormalization

_LEVELS = (1, 2, 3, 4, 5)
# Stage index (0-based, of 7) whose output is level C<n>.
_STAGE_OF_LEVEL = {1: 0, 2: 1, 3: 2, 4: 4, 5: 6}


def _variant_index(variant, prefix, count, owner):
    text = str(variant).lower()
    if text.startswith(prefix):
        text = text[len(prefix):]
    if not text.isdigit() or not 0 <= int(text) < count:
        raise ValueError(f"{owner}: variant must be one of "
                         f"{[f'{prefix}{i}' for i in range(count)]} (or 0..{count - 1}), "
                         f"got {variant!r}")
    return int(text)


# --- EfficientNet B0-B7 on keras.applications --------------------------------

def _rebuild_without_preprocessing(app, first_layer, inputs, stop_prefix):
    """Call ``app``'s layers from ``first_layer`` on ``inputs``; returns {layer name: output}.

    The application's layers are topologically sorted; each was called once,
    so ``layer.input`` names the tensors to feed it.
    """
    names = [layer.name for layer in app.layers]
    start = names.index(first_layer)
    new = {id(app.get_layer(first_layer).input): inputs}
    outputs = {}
    for layer in app.layers[start:]:
        if layer.name.startswith(stop_prefix):
            break
        source = layer.input
        args = [new[id(t)] for t in source] if isinstance(source, list) else new[id(source)]
        y = layer(args)
        new[id(layer.output)] = y
        outputs[layer.name] = y
    return outputs


def EfficientNet(variant="b0", input_shape=(None, None, 3), weights=None,
                 return_levels=(1, 2, 3, 4, 5), name=None):
    """EfficientNet-B0..B7 feature extractor (``keras.applications`` layers).

    Args:
        variant: ``"b0"`` .. ``"b7"`` (or 0..7).
        input_shape: ``(H, W, 3)`` of the already-normalised input (even sizes
            down to stride 32 give TF ``SAME`` padding exactly).
        weights: ``None`` or a path to a Keras ``.weights.h5`` file.
        return_levels: which of ``C1`` .. ``C5`` (strides 2..32) to return.
        name: model name, ``"efficientnet_b<n>"`` by default.

    Returns:
        A functional ``keras.Model``: images ``[B, H, W, 3]`` ->
        ``{"C1": [B, H/2, W/2, 16], ..., "C5": [B, H/32, W/32, 320]}`` (B0).
        Layers keep the Keras application names (``"block2a_expand_conv"``);
        BN epsilon 1e-3 (``kdet.layers.BatchNormalization``), swish,
        squeeze-excite, stochastic depth 0.2.

    >>> import numpy as np
    >>> backbone = EfficientNet("b0", input_shape=(64, 64, 3), return_levels=(3, 4, 5))
    >>> {k: tuple(v.shape) for k, v in backbone(np.zeros((1, 64, 64, 3), "float32")).items()}
    {'C3': (1, 8, 8, 40), 'C4': (1, 4, 4, 112), 'C5': (1, 2, 2, 320)}
    """
    index = _variant_index(variant, "b", 8, "EfficientNet")
    levels = check_return_levels(return_levels, _LEVELS, "EfficientNet")
    application = getattr(keras.applications, f"EfficientNetB{index}")
    app = application(include_top=False, weights=None, input_shape=tuple(input_shape))
    inputs = keras.Input(shape=input_shape, name="images")
    outputs = _rebuild_without_preprocessing(app, "stem_conv_pad", inputs, stop_prefix="top_")
    features = {}
    for level in levels:
        prefix = f"block{_STAGE_OF_LEVEL[level] + 1}"
        last = [layer_name for layer_name in outputs if layer_name.startswith(prefix)][-1]
        features[level] = outputs[last]
    model = feature_model(inputs, features, levels, name or f"efficientnet_b{index}")
    # The re-called layers still remember their first call inside the
    # application, so `layer.output` would point into a graph that includes the
    # preprocessing. Rebuilding from the config gives fresh layers called once
    # (the initialisation is random either way), with kdet's batch norm in place of
    # Keras' (the same variables; the references' unbiased moving variance, TF's fused
    # kernel in training, the EMA of the statistics: kdet.layers.BatchNormalization) and
    # kdet's depthwise convolution (the same variables; a fast kernel gradient on TF) and
    # kdet's activation layer (the same swish; one compiled kernel each way in TF's CPU
    # training, kdet.layers.activation).
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] in ("BatchNormalization", "DepthwiseConv2D", "Activation"):
            layer.update(module=None, registered_name=f"kdet>{layer['class_name']}")
    model = keras.Model.from_config(config)
    return load_weights_file(model, weights, "EfficientNet")


# --- EfficientNet-Lite 0-4, timm layout -------------------------------------

# timm ``_gen_efficientnet_lite`` arch_def, one row a stage:
# (block, repeats, kernel, stride, expand ratio, channels); "ds" = depthwise-
# separable (dw conv, pw conv), "ir" = inverted residual (pw, dw, pw-linear).
_LITE_ARCH = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
# lite<n>: (channel multiplier, depth multiplier)
LITE_SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8)}
_LITE_STEM = 32
_BN_EPSILON = 1e-3  # TF default, timm tf_ models
_BN_MOMENTUM = 0.99


def make_divisible(value, divisor=8, round_limit=0.9):
    """timm/TF channel rounding: nearest multiple of ``divisor``, never below 90%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def _lite_stages(width, depth):
    """Scaled (block, repeats, kernel, stride, expand, channels) per stage."""
    stages = []
    last = len(_LITE_ARCH) - 1
    for i, (block, repeats, kernel, stride, expand, channels) in enumerate(_LITE_ARCH):
        if 0 < i < last:  # fix_first_last: first and last stage keep their depth
            repeats = int(math.ceil(repeats * depth))
        stages.append((block, repeats, kernel, stride, expand,
                       make_divisible(channels * width)))
    return stages


def _lite_conv(filters, kernel_size, strides, name):
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same",
                               use_bias=False, kernel_initializer=conv_initializer(), name=name)


def _lite_dwconv(kernel_size, strides, name):
    return DepthwiseConv2D(kernel_size, strides=strides, padding="same", use_bias=False,
                           depthwise_initializer=conv_initializer(), name=name)


def _bn(name):
    return BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM,
                              name=name)


def _relu6(name):
    return keras.layers.ReLU(max_value=6.0, name=name)


def _lite_block(x, block, kernel, stride, expand, channels, drop_rate, name):
    inputs = x
    if block == "ds":
        x = _lite_dwconv(kernel, stride, f"{name}.conv_dw")(x)
        x = _relu6(f"{name}.act1")(_bn(f"{name}.bn1")(x))
        x = _lite_conv(channels, 1, 1, f"{name}.conv_pw")(x)
        x = _bn(f"{name}.bn2")(x)
    else:
        mid = make_divisible(x.shape[-1] * expand)
        x = _lite_conv(mid, 1, 1, f"{name}.conv_pw")(x)
        x = _relu6(f"{name}.act1")(_bn(f"{name}.bn1")(x))
        x = _lite_dwconv(kernel, stride, f"{name}.conv_dw")(x)
        x = _relu6(f"{name}.act2")(_bn(f"{name}.bn2")(x))
        x = _lite_conv(channels, 1, 1, f"{name}.conv_pwl")(x)
        x = _bn(f"{name}.bn3")(x)
    if stride == 1 and inputs.shape[-1] == channels:
        if drop_rate > 0:  # stochastic depth: drop the whole residual branch per sample
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1),
                                     name=f"{name}.drop_path")(x)
        x = keras.layers.Add(name=f"{name}.add")([x, inputs])
    return x


def EfficientNetLite(variant=0, input_shape=(None, None, 3), weights=None,
                     return_levels=(1, 2, 3, 4, 5), drop_path_rate=0.2, name=None):
    """EfficientNet-Lite0..4 feature extractor, timm ``tf_efficientnet_lite*`` layout.

    Args:
        variant: 0..4 (or ``"lite0"`` .. ``"lite4"``).
        input_shape: ``(H, W, 3)`` of the input, already scaled to [-1, 1].
        weights: ``None`` or a path to a Keras ``.weights.h5`` file.
        return_levels: which of ``C1`` .. ``C5`` (strides 2..32) to return.
        drop_path_rate: stochastic-depth rate of the last block, growing
            linearly from 0 over the blocks (timm/effdet ``drop_path_rate``).
        name: model name, ``"efficientnet_lite<n>"`` by default.

    Returns:
        A functional ``keras.Model``: images ``[B, H, W, 3]`` ->
        ``{"C1": [B, H/2, W/2, 16], ..., "C5": [B, H/32, W/32, 320]}`` (lite0).

    >>> import numpy as np
    >>> backbone = EfficientNetLite(0, input_shape=(64, 64, 3), return_levels=(3, 4, 5))
    >>> {k: tuple(v.shape) for k, v in backbone(np.zeros((1, 64, 64, 3), "float32")).items()}
    {'C3': (1, 8, 8, 40), 'C4': (1, 4, 4, 112), 'C5': (1, 2, 2, 320)}
    """
    index = _variant_index(variant, "lite", 5, "EfficientNetLite")
    levels = check_return_levels(return_levels, _LEVELS, "EfficientNetLite")
    if not 0.0 <= float(drop_path_rate) < 1.0:
        raise ValueError(f"EfficientNetLite: drop_path_rate must be in [0, 1), "
                         f"got {drop_path_rate!r}")
    stages = _lite_stages(*LITE_SCALING[index])
    total_blocks = sum(stage[1] for stage in stages)

    inputs = keras.Input(shape=input_shape, name="images")
    x = _lite_conv(_LITE_STEM, 3, 2, "conv_stem")(inputs)  # fix_stem: 32 at every width
    x = _relu6("act1")(_bn("bn1")(x))
    features, block_index = {}, 0
    last_stage = _STAGE_OF_LEVEL[levels[-1]]
    for s, (block, repeats, kernel, stride, expand, channels) in enumerate(stages):
        if s > last_stage:
            break
        for i in range(repeats):
            drop_rate = float(drop_path_rate) * block_index / total_blocks
            x = _lite_block(x, block, kernel, stride if i == 0 else 1, expand, channels,
                            drop_rate, f"blocks.{s}.{i}")
            block_index += 1
        features.update({level: x for level, stage in _STAGE_OF_LEVEL.items() if stage == s})
    model = feature_model(inputs, features, levels, name or f"efficientnet_lite{index}")
    return load_weights_file(model, weights, "EfficientNetLite")


# --- timm state_dict -> Keras -----------------------------------------------

_KERAS_APP_LAYER = re.compile(r"block(\d+)([a-z])_(\w+)")
_DS_PARTS = {"dwconv": "conv_dw", "bn": "bn1", "se_reduce": "se.conv_reduce",
             "se_expand": "se.conv_expand", "project_conv": "conv_pw", "project_bn": "bn2"}
_IR_PARTS = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dwconv": "conv_dw", "bn": "bn2",
             "se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand",
             "project_conv": "conv_pwl", "project_bn": "bn3"}


def timm_module_name(layer_name, layer_names=()):
    """timm module name of a kdet EfficientNet / EfficientNet-Lite layer.

    Lite layers already carry timm names; ``keras.applications`` names map as
    ``stem_conv -> conv_stem``, ``block2b_expand_conv -> blocks.1.1.conv_pw``
    (blocks without an ``expand_conv`` in ``layer_names`` are timm's
    depthwise-separable blocks).
    """
    if layer_name == "stem_conv":
        return "conv_stem"
    if layer_name == "stem_bn":
        return "bn1"
    match = _KERAS_APP_LAYER.fullmatch(layer_name)
    if not match:
        return layer_name
    stage, letter, part = int(match[1]), match[2], match[3]
    expanded = f"block{stage}{letter}_expand_conv" in layer_names
    parts = _IR_PARTS if expanded else _DS_PARTS
    if part not in parts:
        raise ValueError(f"timm_module_name: no timm counterpart for layer {layer_name!r}")
    return f"blocks.{stage - 1}.{ord(letter) - ord('a')}.{parts[part]}"


def load_timm_state_dict(model, state_dict, prefix="", strict=True):
    """Load a timm ``tf_efficientnet_b*`` / ``tf_efficientnet_lite*`` state_dict.

    Works for ``EfficientNet`` (keras.applications names, mapped by
    ``timm_module_name``) and ``EfficientNetLite`` (timm names). Kernels go
    from OIHW to HWIO (depthwise ``(C, 1, kh, kw)`` to ``(kh, kw, C, 1)``),
    BN to gamma/beta/moving stats; ``conv_head``/``classifier`` are ignored.
    Use ``prefix="backbone."`` for an effdet EfficientDet checkpoint.

    >>> import timm  # doctest: +SKIP
    >>> sd = timm.create_model("tf_efficientnet_lite0").state_dict()  # doctest: +SKIP
    >>> load_timm_state_dict(EfficientNetLite(0), sd)  # doctest: +SKIP
    """
    names = {layer.name for layer in model._flatten_layers(include_self=False, recursive=True)}
    return load_torch_state_dict(model, state_dict,
                                 torch_name=lambda name: timm_module_name(name, names),
                                 prefix=prefix, strict=strict)
