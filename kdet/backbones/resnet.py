"""ResNet feature extractor in torchvision's layout (ResNet v1.5).

Stem: 7x7/2 conv (padding 3), BN, ReLU, 3x3/2 max-pool (padding 1); then
``layer1`` .. ``layer4`` of basic (ResNet-18/34) or bottleneck (50/101/152)
blocks, the stride on the 3x3 conv (v1.5), 1x1-stride conv + BN shortcut where
the shape changes, no conv biases, BN epsilon 1e-5 and momentum 0.1 (PyTorch
terms). Padding is explicit and symmetric (``ZeroPadding2D`` + ``"valid"``)
because TensorFlow's ``"same"`` pads stride-2 convs asymmetrically.

Layers are named after torchvision's modules (``"conv1"``, ``"bn1"``,
``"layer2.0.conv2"``, ``"layer2.0.downsample.0"``), so
``load_torchvision_state_dict`` copies a torchvision checkpoint by name.

The model returns a dict ``{"C2": ..., "C5": ...}``: ``"Cn"`` has stride
``2**n`` (``"C1"`` is the stem's ReLU output, before the max-pool). It takes
already-normalised images; kdet detectors normalise inside the model.
"""
import keras

from kdet.backbones._common import (check_norm, check_return_levels, conv_initializer,
                                    feature_model, load_torch_state_dict, load_weights_file,
                                    make_norm)
from kdet.layers.conv import Conv2D

# depth -> (block kind, blocks per layer)
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_WIDTHS = (64, 128, 256, 512)
_BN_MOMENTUM = 0.9  # PyTorch momentum 0.1


def _conv(filters, kernel_size, strides, name):
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, use_bias=False,
                               kernel_initializer=conv_initializer(), name=name)


def _conv3x3(x, filters, strides, name):
    # torchvision pads 1 on every side; "same" would pad (0, 1) at stride 2.
    if strides == 1:
        return Conv2D(filters, 3, padding="same", use_bias=False,
                      kernel_initializer=conv_initializer(), name=name)(x)
    x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
    return _conv(filters, 3, strides, name)(x)


def _shortcut(x, filters, strides, norm, epsilon, name):
    if strides == 1 and x.shape[-1] == filters:
        return x
    x = _conv(filters, 1, strides, f"{name}.downsample.0")(x)
    return make_norm(norm, epsilon, _BN_MOMENTUM, f"{name}.downsample.1")(x)


def _basic_block(x, width, strides, norm, epsilon, name):
    shortcut = _shortcut(x, width, strides, norm, epsilon, name)
    y = _conv3x3(x, width, strides, f"{name}.conv1")
    y = make_norm(norm, epsilon, _BN_MOMENTUM, f"{name}.bn1")(y)
    y = keras.layers.ReLU(name=f"{name}.relu1")(y)
    y = _conv3x3(y, width, 1, f"{name}.conv2")
    y = make_norm(norm, epsilon, _BN_MOMENTUM, f"{name}.bn2")(y)
    y = keras.layers.Add(name=f"{name}.add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}.relu")(y)


def _bottleneck_block(x, width, strides, norm, epsilon, name):
    shortcut = _shortcut(x, width * 4, strides, norm, epsilon, name)
    y = _conv(width, 1, 1, f"{name}.conv1")(x)
    y = make_norm(norm, epsilon, _BN_MOMENTUM, f"{name}.bn1")(y)
    y = keras.layers.ReLU(name=f"{name}.relu1")(y)
    y = _conv3x3(y, width, strides, f"{name}.conv2")  # v1.5: stride on the 3x3
    y = make_norm(norm, epsilon, _BN_MOMENTUM, f"{name}.bn2")(y)
    y = keras.layers.ReLU(name=f"{name}.relu2")(y)
    y = _conv(width * 4, 1, 1, f"{name}.conv3")(y)
    y = make_norm(norm, epsilon, _BN_MOMENTUM, f"{name}.bn3")(y)
    y = keras.layers.Add(name=f"{name}.add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}.relu")(y)


def _trainable_modules(trainable_layers):
    """torchvision ``_resnet_fpn_extractor``: the last k of conv1, layer1..layer4."""
    modules = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        modules.append("bn1")
    return set(modules)


def set_trainable_layers(model, trainable_layers):
    """Freeze all but the last ``trainable_layers`` of (conv1, layer1, ..., layer4).

    Same selection as torchvision's ``trainable_backbone_layers``: 5 trains
    everything, 3 trains layer2..layer4 (torchvision's detection default with a
    pretrained backbone), 0 freezes the whole backbone; the stem BN ``bn1``
    trains only with 5. Keras then runs frozen BatchNormalization layers in
    inference mode (moving statistics), where torchvision would still use batch
    statistics for a plain ``BatchNorm2d`` whose parameters are frozen.
    """
    if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"ResNet: trainable_layers must be an int in 0..5, "
                         f"got {trainable_layers!r}")
    trainable = _trainable_modules(trainable_layers)
    for layer in model.layers:
        if layer.weights:
            layer.trainable = layer.name.split(".")[0] in trainable
    return model


def ResNet(depth=50, input_shape=(None, None, 3), weights=None, norm="batch",
           trainable_layers=5, return_levels=(2, 3, 4, 5), norm_epsilon=1e-5, name=None):
    """ResNet-18/34/50/101/152 feature extractor, torchvision layout.

    Args:
        depth: 18, 34, 50, 101 or 152.
        input_shape: ``(H, W, 3)`` of the already-normalised input.
        weights: ``None`` or a path to a Keras ``.weights.h5`` file.
        norm: ``"batch"`` (``BatchNormalization``) or ``"frozen_batch"``
            (``kdet.layers.FrozenBatchNormalization``, torchvision's
            ``FrozenBatchNorm2d``: constants, the same in training and inference).
        trainable_layers: 0..5, how many of (layer4, layer3, layer2, layer1,
            conv1) train, as torchvision's ``trainable_backbone_layers``.
        return_levels: which of ``C1`` .. ``C5`` (strides 2..32) to return;
            only the stages up to the deepest one are built, like torchvision's
            ``IntermediateLayerGetter``.
        norm_epsilon: BN epsilon (torchvision 1e-5; its v1 detection
            checkpoints with ``FrozenBatchNorm2d`` used 0.0).
        name: model name, ``"resnet{depth}"`` by default.

    Returns:
        A functional ``keras.Model`` mapping images ``[B, H, W, 3]`` to
        ``{"C2": [B, H/4, W/4, 256], ..., "C5": [B, H/32, W/32, 2048]}``
        (64/128/256/512 channels for ResNet-18/34).

    >>> import numpy as np
    >>> backbone = ResNet(18, input_shape=(64, 64, 3))
    >>> {k: tuple(v.shape) for k, v in backbone(np.zeros((1, 64, 64, 3), "float32")).items()}
    {'C2': (1, 16, 16, 64), 'C3': (1, 8, 8, 128), 'C4': (1, 4, 4, 256), 'C5': (1, 2, 2, 512)}
    """
    if depth not in RESNET_SPECS:
        raise ValueError(f"ResNet: depth must be one of {sorted(RESNET_SPECS)}, got {depth!r}")
    check_norm(norm, "ResNet")
    levels = check_return_levels(return_levels, (1, 2, 3, 4, 5), "ResNet")
    kind, blocks = RESNET_SPECS[depth]
    block_fn = _basic_block if kind == "basic" else _bottleneck_block

    inputs = keras.Input(shape=input_shape, name="images")
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = _conv(64, 7, 2, "conv1")(x)
    x = make_norm(norm, norm_epsilon, _BN_MOMENTUM, "bn1")(x)
    x = keras.layers.ReLU(name="relu")(x)
    features = {1: x}
    # torchvision pads the max-pool with -inf; after the ReLU, zeros are equal.
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    for stage, (num_blocks, width) in enumerate(zip(blocks, _WIDTHS)):
        level = stage + 2
        if level > levels[-1]:
            break
        for index in range(num_blocks):
            strides = 2 if stage > 0 and index == 0 else 1
            x = block_fn(x, width, strides, norm, norm_epsilon, f"layer{stage + 1}.{index}")
        features[level] = x

    model = feature_model(inputs, features, levels, name or f"resnet{depth}")
    set_trainable_layers(model, trainable_layers)
    return load_weights_file(model, weights, "ResNet")


def resnet50(**kwargs):
    """``ResNet(depth=50, **kwargs)``: 23,508,032 parameters up to C5."""
    return ResNet(depth=50, **kwargs)


def resnet101(**kwargs):
    """``ResNet(depth=101, **kwargs)``: 42,500,160 parameters up to C5."""
    return ResNet(depth=101, **kwargs)


def load_torchvision_state_dict(model, state_dict, prefix="", strict=True):
    """Load a torchvision ResNet ``state_dict`` (numpy arrays or tensors) into ``model``.

    Convolution kernels go from OIHW to HWIO; BN ``weight/bias/running_mean/
    running_var`` become ``gamma/beta/moving_mean/moving_variance`` (of
    ``BatchNormalization`` or ``FrozenBatchNormalization``). ``fc`` and
    stages the model does not build are ignored. Use
    ``prefix="backbone.body."`` for a torchvision detector checkpoint.

    >>> import torch, torchvision  # doctest: +SKIP
    >>> sd = torchvision.models.resnet50().state_dict()  # doctest: +SKIP
    >>> load_torchvision_state_dict(resnet50(), sd)  # doctest: +SKIP
    """
    return load_torch_state_dict(model, state_dict, prefix=prefix, strict=strict)
