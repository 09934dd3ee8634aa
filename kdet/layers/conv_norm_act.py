"""Convolution -> normalisation -> activation blocks.

``ConvNormAct`` is torchvision's ``Conv2dNormActivation`` (and effdet's
``ConvBnAct2d``); ``SeparableConvNormAct`` is effdet's ``SeparableConv2d``: a
depthwise 3x3 conv, a pointwise 1x1 conv, then norm and activation. The
depthwise and pointwise kernels are separate variables so checkpoints of
either framework map onto them one to one.
"""
import keras

from kdet.layers.activation import activation_function
from kdet.layers.conv import Conv2D
from kdet.layers.normalization import BatchNormalization, FrozenBatchNormalization

NORMS = (None, "batch", "group", "frozen_batch")
ACTIVATIONS = {None: None, "relu": "relu", "relu6": "relu6", "swish": "silu", "silu": "silu",
               "sigmoid": "sigmoid"}
PADDINGS = ("same", "torch", "valid")


def _check_choice(owner, name, value, choices):
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def make_norm(norm, *, bn_epsilon, bn_momentum, groups, group_epsilon, dtype, name):
    """The normalisation layer for ``norm`` (see ``NORMS``), or None."""
    if norm is None:
        return None
    if norm == "batch":
        return BatchNormalization(epsilon=bn_epsilon, momentum=bn_momentum,
                                  dtype=dtype, name=name)
    if norm == "frozen_batch":
        return FrozenBatchNormalization(epsilon=bn_epsilon, dtype=dtype, name=name)
    if norm == "group":
        return keras.layers.GroupNormalization(groups=groups, epsilon=group_epsilon, dtype=dtype,
                                               name=name)
    raise ValueError(f"unknown norm {norm!r}, expected one of {list(NORMS)}")


class _ConvNormActBase(keras.layers.Layer):
    """What the two conv blocks share: padding, norm, activation, build and call.

    A subclass creates its convolutions in ``self.convs`` (applied in order)
    between ``_init_conv_geometry`` and ``_make_norm_layer``.
    """

    def _init_conv_geometry(self, filters, kernel_size, strides, padding, dilation_rate):
        _check_choice(type(self).__name__, "padding", padding, PADDINGS)
        self.filters = int(filters)
        self.kernel_size = _pair(kernel_size)
        self.strides = _pair(strides)
        self.dilation_rate = _pair(dilation_rate)
        self.padding = padding
        self.pad = None
        self._conv_padding = "same" if padding == "same" else "valid"
        if padding == "torch":
            spans = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation_rate)]
            if self.strides == (1, 1) and all(span % 2 == 0 for span in spans):
                # "same" pads span // 2 on both sides here, as torch does, inside the
                # convolution: no padded copy of the input, which training would keep
                # for the kernel's gradient (~0.1 GB for an FPN's P2 at 800 px, batch 2).
                self._conv_padding = "same"
            elif any(spans):
                pads = tuple(span // 2 for span in spans)
                self.pad = keras.layers.ZeroPadding2D(pads, dtype=self.dtype_policy, name="pad")

    def _init_norm_act(self, norm, activation, use_bias, groups, bn_epsilon, bn_momentum,
                       group_epsilon):
        owner = type(self).__name__
        _check_choice(owner, "norm", norm, NORMS)
        _check_choice(owner, "activation", activation, ACTIVATIONS)
        self.norm = norm
        self.activation = activation
        # torchvision Conv2dNormActivation: bias only when there is no norm.
        self.use_bias = (norm is None) if use_bias is None else bool(use_bias)
        self.groups = int(groups)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.group_epsilon = float(group_epsilon)
        self._activation_fn = activation_function(ACTIVATIONS[activation])

    def _make_norm_layer(self):
        # Created after the convs so the weights list reads conv, then norm.
        norm = self.norm
        self.norm_layer = make_norm(norm, bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                                    groups=self.groups, group_epsilon=self.group_epsilon,
                                    dtype=self.dtype_policy, name="bn" if "batch" in str(norm)
                                    else "gn")

    def _layers_in_order(self):
        return ([] if self.pad is None else [self.pad]) + list(self.convs)

    def build(self, input_shape):
        shape = input_shape
        for layer in self._layers_in_order():
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        if self.norm_layer is not None:
            self.norm_layer.build(shape)

    def call(self, inputs, training=None):
        x = inputs
        for layer in self._layers_in_order():
            x = layer(x)
        if self.norm_layer is not None:
            if isinstance(self.norm_layer, keras.layers.BatchNormalization):
                x = self.norm_layer(x, training=training)
            else:
                x = self.norm_layer(x)
        if self._activation_fn is not None:
            x = self._activation_fn(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        shape = input_shape
        for layer in self._layers_in_order():
            shape = layer.compute_output_shape(shape)
        return shape

    def get_config(self):
        config = super().get_config()
        config.update({
            "filters": self.filters, "kernel_size": self.kernel_size, "strides": self.strides,
            "padding": self.padding, "dilation_rate": self.dilation_rate,
            "norm": self.norm, "activation": self.activation, "use_bias": self.use_bias,
            "groups": self.groups, "bn_epsilon": self.bn_epsilon,
            "bn_momentum": self.bn_momentum, "group_epsilon": self.group_epsilon})
        return config


@keras.saving.register_keras_serializable(package="kdet")
class ConvNormAct(_ConvNormActBase):
    """Conv2D, optional normalisation, optional activation.

    Args:
        filters, kernel_size, strides, dilation_rate: as ``keras.layers.Conv2D``.
        padding: ``"same"`` (TensorFlow SAME: for stride 2 the extra pixel is
            padded at the bottom/right, as the TF EfficientDet models),
            ``"torch"`` (symmetric zero padding of ``dilation * (k - 1) // 2``,
            as PyTorch's ``padding=k//2``; results match torchvision for any
            stride: at stride 1 the convolution pads itself, otherwise an
            explicit ``ZeroPadding2D`` precedes a valid conv) or
            ``"valid"``.
        norm: None, ``"batch"``, ``"group"`` (``GroupNormalization(groups)``,
            epsilon ``group_epsilon``) or ``"frozen_batch"``
            (``FrozenBatchNormalization``).
        activation: None, ``"relu"``, ``"relu6"``, ``"swish"`` (= ``"silu"``)
            or ``"sigmoid"``.
        use_bias: None means True iff ``norm`` is None (torchvision's rule).
        bn_epsilon, bn_momentum: for ``"batch"``/``"frozen_batch"`` (Keras
            momentum: torch momentum 0.1 is Keras 0.9).
        kernel_initializer, bias_initializer: for the conv.

    >>> import numpy as np
    >>> block = ConvNormAct(8, 3, strides=2, padding="torch", norm="batch", activation="relu")
    >>> tuple(block(np.zeros((1, 9, 9, 3), "float32")).shape)
    (1, 5, 5, 8)
    """

    def __init__(self, filters, kernel_size, strides=1, padding="same", norm=None,
                 activation=None, use_bias=None, groups=32, bn_epsilon=1e-3, bn_momentum=0.99,
                 group_epsilon=1e-5, dilation_rate=1, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self._init_conv_geometry(filters, kernel_size, strides, padding, dilation_rate)
        self._init_norm_act(norm, activation, use_bias, groups, bn_epsilon, bn_momentum,
                            group_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.conv = Conv2D(
            self.filters, self.kernel_size, strides=self.strides, padding=self._conv_padding,
            dilation_rate=self.dilation_rate, use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer, bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy, name="conv")
        self._make_norm_layer()

    @property
    def convs(self):
        return (self.conv,)

    def get_config(self):
        return dict(super().get_config(),
                    kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                    bias_initializer=keras.initializers.serialize(self.bias_initializer))


@keras.saving.register_keras_serializable(package="kdet")
class SeparableConvNormAct(_ConvNormActBase):
    """Depthwise conv, pointwise 1x1 conv, optional norm, optional activation.

    effdet's ``SeparableConv2d``: the depthwise conv has no bias; the pointwise
    conv has one when ``use_bias`` (None: True iff no norm). The TF EfficientDet
    models keep a "redundant bias" on the pointwise conv even when BN follows:
    pass ``use_bias=True`` with ``norm="batch"``.

    Args:
        filters: pointwise output channels.
        kernel_size, strides, padding, dilation_rate: of the depthwise conv
            (padding as in ``ConvNormAct``).
        depthwise_initializer, pointwise_initializer, bias_initializer: the
            default initialisers are effdet's BiFPN ones (glorot uniform with
            PyTorch's depthwise fan, which is ``kh * kw``, Keras' fan_out).
        norm, activation, groups, bn_epsilon, bn_momentum, group_epsilon: as
            ``ConvNormAct``.

    >>> import numpy as np
    >>> block = SeparableConvNormAct(16, 3, norm="batch", use_bias=True)
    >>> tuple(block(np.zeros((2, 8, 8, 4), "float32")).shape)
    (2, 8, 8, 16)
    """

    def __init__(self, filters, kernel_size=3, strides=1, padding="same", norm=None,
                 activation=None, use_bias=None, groups=32, bn_epsilon=1e-3, bn_momentum=0.99,
                 group_epsilon=1e-5, dilation_rate=1, depthwise_initializer=None,
                 pointwise_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self._init_conv_geometry(filters, kernel_size, strides, padding, dilation_rate)
        self._init_norm_act(norm, activation, use_bias, groups, bn_epsilon, bn_momentum,
                            group_epsilon)
        if depthwise_initializer is None:
            # Keras' fan_in of a (kh, kw, C, 1) depthwise kernel is kh*kw*C;
            # PyTorch's (and effdet's glorot) is kh*kw, which is Keras' fan_out.
            depthwise_initializer = keras.initializers.VarianceScaling(
                1.0, mode="fan_out", distribution="uniform")
        self.depthwise_initializer = keras.initializers.get(depthwise_initializer)
        self.pointwise_initializer = keras.initializers.get(pointwise_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.conv_dw = keras.layers.DepthwiseConv2D(
            self.kernel_size, strides=self.strides, padding=self._conv_padding,
            dilation_rate=self.dilation_rate, use_bias=False,
            depthwise_initializer=self.depthwise_initializer, dtype=self.dtype_policy,
            name="conv_dw")
        self.conv_pw = keras.layers.Conv2D(
            self.filters, 1, use_bias=self.use_bias, kernel_initializer=self.pointwise_initializer,
            bias_initializer=self.bias_initializer, dtype=self.dtype_policy, name="conv_pw")
        self._make_norm_layer()

    @property
    def convs(self):
        return (self.conv_dw, self.conv_pw)

    def get_config(self):
        return dict(super().get_config(),
                    depthwise_initializer=keras.initializers.serialize(self.depthwise_initializer),
                    pointwise_initializer=keras.initializers.serialize(self.pointwise_initializer),
                    bias_initializer=keras.initializers.serialize(self.bias_initializer))
