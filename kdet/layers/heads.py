"""Dense prediction heads shared across pyramid levels.

``EfficientDetHead`` is effdet's ``HeadNet`` (class or box net);
``RetinaNetHead`` is torchvision's ``RetinaNetHead`` (classification +
regression). Both take the pyramid (a ``{"P3": ..}`` dict or a list in level
order) and return predictions for every anchor concatenated over levels,
``[B, sum_l H_l * W_l * A, K]``, ordered (level, y, x, anchor) like an
``AnchorGenerator`` and like torchvision/effdet's
``permute(0, 2, 3, 1).reshape(B, -1, K)``.
"""
import math

import keras
from keras import ops

from kdet.layers.activation import activation_function
from kdet.layers.conv_norm_act import ACTIVATIONS, ConvNormAct, SeparableConvNormAct
from kdet.layers.normalization import BatchNormalization


def prior_bias(prior_probability):
    """Bias giving sigmoid = prior: ``-log((1 - p) / p)`` (Focal loss paper)."""
    p = float(prior_probability)
    if not 0.0 < p < 1.0:
        raise ValueError(f"prior_probability must be in (0, 1), got {prior_probability}")
    return -math.log((1.0 - p) / p)


def pyramid_list(inputs, owner, num_levels=None):
    """Feature maps in level order from a ``{"P3": ..}`` dict or a list."""
    if isinstance(inputs, dict):
        try:
            keyed = sorted((int(key[1:]), value) for key, value in inputs.items())
        except ValueError as error:
            raise ValueError(f"{owner}: pyramid dict keys must look like 'P3', got "
                             f"{sorted(inputs)}") from error
        features = [value for _, value in keyed]
    else:
        features = list(inputs)
    if num_levels is not None and len(features) != num_levels:
        raise ValueError(f"{owner}: expected {num_levels} pyramid levels, got {len(features)}")
    if not features:
        raise ValueError(f"{owner}: got no pyramid levels")
    return features


def _flatten_level(x, num_outputs):
    """[B, H, W, A * K] -> [B, H * W * A, K] (anchor-major within a location)."""
    return ops.reshape(x, (ops.shape(x)[0], -1, num_outputs))


@keras.saving.register_keras_serializable(package="kdet")
class EfficientDetHead(keras.layers.Layer):
    """effdet ``HeadNet``: shared convs with per-level BN, then a shared predictor.

    For each level: ``depth`` x (separable 3x3 conv [bias if redundant_bias]
    -> BN of this level and repeat -> act), then a separable 3x3 predict conv
    with bias giving ``num_anchors * num_outputs_per_anchor`` channels. Convs
    are shared across levels; BN layers are not (``bn_{repeat}_{level}``).

    Args:
        num_outputs_per_anchor: classes for the class net, 4 for the box net.
        num_anchors: anchors per location (3 scales x 3 ratios = 9).
        num_channels: width of the convs; None uses the input's channels
            (effdet: the BiFPN width).
        depth: convs before the predictor (D_head: 3 for D0).
        num_levels: pyramid levels (5 for P3-P7).
        activation: ``"swish"`` or ``"relu6"`` (lite) or ``"relu"``.
        separable: separable convs (effdet: True) or plain 3x3 convs.
        prior_probability: None (predict bias 0, box net) or the prior whose
            logit the predict bias starts at (0.01 for the class net).
        redundant_bias: conv bias before each BN, as the TF checkpoints.
        bn_epsilon, bn_momentum: Keras BN settings (1e-3, 0.99).

    >>> import numpy as np
    >>> head = EfficientDetHead(4, num_anchors=9, depth=2, num_levels=2)
    >>> feats = [np.zeros((1, 8, 8, 16), "float32"), np.zeros((1, 4, 4, 16), "float32")]
    >>> tuple(head(feats).shape)
    (1, 720, 4)
    """

    def __init__(self, num_outputs_per_anchor, num_anchors=9, num_channels=None, depth=3,
                 num_levels=5, activation="swish", separable=True, prior_probability=None,
                 redundant_bias=True, bn_epsilon=1e-3, bn_momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        if activation not in ACTIVATIONS or activation is None:
            raise ValueError(f"EfficientDetHead: activation must be one of "
                             f"{[a for a in ACTIVATIONS if a]}, got {activation!r}")
        self.num_outputs_per_anchor = int(num_outputs_per_anchor)
        self.num_anchors = int(num_anchors)
        self.num_channels = None if num_channels is None else int(num_channels)
        self.depth = int(depth)
        self.num_levels = int(num_levels)
        self.activation = activation
        self.separable = bool(separable)
        self.prior_probability = None if prior_probability is None else float(prior_probability)
        self.redundant_bias = bool(redundant_bias)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self._activation_fn = activation_function(ACTIVATIONS[activation])
        self.bias_initializer = keras.initializers.Constant(
            0.0 if self.prior_probability is None else prior_bias(self.prior_probability))
        self.conv_rep = []
        self.bn_rep = []
        self.predict = None

    def _conv(self, filters, use_bias, name, bias_initializer="zeros"):
        if self.separable:
            # effdet _init_weight for head SeparableConv2d: normal(std=sqrt(1/fan_in))
            # with PyTorch fans: kh*kw for the depthwise (Keras fan_out), C for pointwise.
            return SeparableConvNormAct(
                filters, 3, use_bias=use_bias,
                depthwise_initializer=keras.initializers.VarianceScaling(
                    1.0, mode="fan_out", distribution="untruncated_normal"),
                pointwise_initializer=keras.initializers.VarianceScaling(
                    1.0, mode="fan_in", distribution="untruncated_normal"),
                bias_initializer=bias_initializer, dtype=self.dtype_policy, name=name)
        return ConvNormAct(filters, 3, use_bias=use_bias,
                           kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                           bias_initializer=bias_initializer, dtype=self.dtype_policy, name=name)

    def build(self, input_shape):
        shapes = pyramid_list(input_shape, "EfficientDetHead", self.num_levels)
        channels = shapes[0][-1]
        if self.num_channels is not None and channels != self.num_channels:
            raise ValueError(f"EfficientDetHead: num_channels={self.num_channels} but the "
                             f"inputs have {channels} channels")
        width = self.num_channels or channels
        shape = (None, None, None, width)
        self.conv_rep = [self._conv(width, self.redundant_bias, f"conv_rep_{i}")
                         for i in range(self.depth)]
        # One BN per (repeat, level), effdet bn_rep[repeat][level].
        self.bn_rep = [[BatchNormalization(
            epsilon=self.bn_epsilon, momentum=self.bn_momentum, dtype=self.dtype_policy,
            name=f"bn_{i}_{level}") for level in range(self.num_levels)]
            for i in range(self.depth)]
        for conv, bns in zip(self.conv_rep, self.bn_rep):
            conv.build(shape)
            for bn in bns:
                bn.build(shape)
        self.predict = self._conv(self.num_anchors * self.num_outputs_per_anchor, True, "predict",
                                  bias_initializer=self.bias_initializer)
        self.predict.build(shape)

    def call(self, inputs, training=None):
        features = pyramid_list(inputs, "EfficientDetHead", self.num_levels)
        outputs = []
        for level, x in enumerate(features):
            for conv, bns in zip(self.conv_rep, self.bn_rep):
                x = self._activation_fn(bns[level](conv(x), training=training), training=training)
            outputs.append(_flatten_level(self.predict(x), self.num_outputs_per_anchor))
        return ops.concatenate(outputs, axis=1)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_outputs_per_anchor": self.num_outputs_per_anchor,
            "num_anchors": self.num_anchors, "num_channels": self.num_channels,
            "depth": self.depth, "num_levels": self.num_levels, "activation": self.activation,
            "separable": self.separable, "prior_probability": self.prior_probability,
            "redundant_bias": self.redundant_bias, "bn_epsilon": self.bn_epsilon,
            "bn_momentum": self.bn_momentum})
        return config


@keras.saving.register_keras_serializable(package="kdet")
class RetinaNetHead(keras.layers.Layer):
    """torchvision ``RetinaNetHead``: classification and box-regression subnets.

    Each subnet: ``num_convs`` x (3x3 conv, C -> C, + norm + ReLU), then a 3x3
    conv to ``A * K`` (``cls_logits``, bias at the prior's logit) or ``A * 4``
    (``bbox_reg``). v1: no norm, convs with bias; v2: ``norm="group"``
    (GroupNorm(32), convs without bias). Weights start normal(std=0.01),
    biases 0, as torchvision. Shared across levels.

    Returns ``{"cls_logits": [B, N, num_classes], "bbox_regression": [B, N, 4]}``
    with ``N = sum_l H_l * W_l * num_anchors``.

    Args:
        num_classes: K (torchvision counts background too: 91 for COCO).
        num_anchors: anchors per location (9).
        num_convs: convs per subnet (4).
        norm: None (v1), ``"group"`` (v2) or ``"batch"``.
        groups, group_epsilon: GroupNorm settings (32, 1e-5 as torch).
        prior_probability: initial foreground probability (0.01).

    >>> import numpy as np
    >>> head = RetinaNetHead(3, num_anchors=2, num_convs=1)
    >>> out = head({"P3": np.zeros((1, 4, 4, 8), "float32"),
    ...             "P4": np.zeros((1, 2, 2, 8), "float32")})
    >>> tuple(out["cls_logits"].shape), tuple(out["bbox_regression"].shape)
    ((1, 40, 3), (1, 40, 4))
    """

    def __init__(self, num_classes, num_anchors=9, num_convs=4, norm=None, groups=32,
                 group_epsilon=1e-5, bn_epsilon=1e-5, bn_momentum=0.9, prior_probability=0.01,
                 **kwargs):
        super().__init__(**kwargs)
        if norm not in (None, "group", "batch", "frozen_batch"):
            raise ValueError(f"RetinaNetHead: norm must be None, 'group', 'batch' or "
                             f"'frozen_batch', got {norm!r}")
        self.num_classes = int(num_classes)
        self.num_anchors = int(num_anchors)
        self.num_convs = int(num_convs)
        self.norm = norm
        self.groups = int(groups)
        self.group_epsilon = float(group_epsilon)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.prior_probability = float(prior_probability)
        self._prior_bias = prior_bias(self.prior_probability)
        self.classification_convs = []
        self.regression_convs = []
        self.cls_logits = None
        self.bbox_reg = None

    def _conv(self, filters, name, norm=None, activation=None, bias_initializer="zeros"):
        return ConvNormAct(
            filters, 3, padding="same", norm=norm, activation=activation, groups=self.groups,
            group_epsilon=self.group_epsilon, bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            bias_initializer=bias_initializer, dtype=self.dtype_policy, name=name)

    def build(self, input_shape):
        shapes = pyramid_list(input_shape, "RetinaNetHead")
        channels = shapes[0][-1]
        shape = (None, None, None, channels)
        self.classification_convs = [
            self._conv(channels, f"classification_conv_{i}", self.norm, "relu")
            for i in range(self.num_convs)]
        self.regression_convs = [
            self._conv(channels, f"regression_conv_{i}", self.norm, "relu")
            for i in range(self.num_convs)]
        self.cls_logits = self._conv(self.num_anchors * self.num_classes, "cls_logits",
                                     bias_initializer=keras.initializers.Constant(
                                         self._prior_bias))
        self.bbox_reg = self._conv(self.num_anchors * 4, "bbox_reg")
        for layer in self.classification_convs + self.regression_convs + [self.cls_logits,
                                                                          self.bbox_reg]:
            layer.build(shape)

    def call(self, inputs, training=None):
        features = pyramid_list(inputs, "RetinaNetHead")
        logits, deltas = [], []
        for x in features:
            c = x
            for conv in self.classification_convs:
                c = conv(c, training=training)
            logits.append(_flatten_level(self.cls_logits(c), self.num_classes))
            r = x
            for conv in self.regression_convs:
                r = conv(r, training=training)
            deltas.append(_flatten_level(self.bbox_reg(r), 4))
        return {"cls_logits": ops.concatenate(logits, axis=1),
                "bbox_regression": ops.concatenate(deltas, axis=1)}

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_classes": self.num_classes, "num_anchors": self.num_anchors,
            "num_convs": self.num_convs, "norm": self.norm, "groups": self.groups,
            "group_epsilon": self.group_epsilon, "bn_epsilon": self.bn_epsilon,
            "bn_momentum": self.bn_momentum, "prior_probability": self.prior_probability})
        return config
