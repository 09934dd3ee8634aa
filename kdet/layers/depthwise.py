"""Depthwise convolution whose kernel gradient is fast on TensorFlow's CPU kernels.

TensorFlow's CPU ``DepthwiseConv2dNativeBackpropFilter`` runs a 5 x 5 kernel's
gradient at 4-10x the forward convolution's time (80 x 80 x 144, batch 1: 4.3 ms
against 0.5 ms, 1 thread): the largest op type of an EfficientDet-Lite0 training step
at batch 1. The same gradient is a depthwise convolution *forward*, with the output
gradient as the filter and the batch folded into the channels::

    dK[i, j, c] = sum_{n, y, x} X_pad[n, s y + i, s x + j, c] dY[n, y, x, c]
                = depthwise_conv(X_pad[1, :, :, (n, c)], dY[:, :, (n, c)], dilation s)[i, j]

summed over ``n`` afterwards -- 2-5x faster than the native op for 5 x 5 kernels
(3 x 3 kernels are faster natively, so they keep it). :class:`DepthwiseConv2D` takes
that route when TensorFlow trains a float32, channels-last, undilated layer with a
kernel of 5 or more on CPU; everywhere else (JAX, a GPU, predict, export, 3 x 3) it is
``keras.layers.DepthwiseConv2D``, with the same variables.
"""
import keras
from keras import ops

# 3 x 3 kernels: the native gradient is faster (0.42 vs 0.62 ms, 160 x 160 x 32)
FAST_FILTER_GRADIENT_MIN_KERNEL = 5


def _same_padding(size, kernel, stride):
    """TensorFlow ``SAME``: (before, after), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def depthwise_kernel_gradient(inputs, output_gradient, kernel_size, strides, padding):
    """``dK [kh, kw, C, 1]`` of a depthwise convolution (multiplier 1, no dilation) from its
    inputs ``[N, H, W, C]`` and output gradient ``[N, OH, OW, C]``, by one depthwise
    convolution forward (TensorFlow)."""
    import tensorflow as tf

    kh, kw = kernel_size
    sh, sw = strides
    batch = tf.shape(inputs)[0]
    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    out_h, out_w = output_gradient.shape[1], output_gradient.shape[2]
    if padding == "same":
        pad_h, pad_w = _same_padding(height, kh, sh), _same_padding(width, kw, sw)
        inputs = tf.pad(inputs, [[0, 0], list(pad_h), list(pad_w), [0, 0]])
    # the rows and columns the taps reach
    rows, cols = (out_h - 1) * sh + kh, (out_w - 1) * sw + kw
    inputs = inputs[:, :rows, :cols]
    folded = tf.reshape(tf.transpose(inputs, [1, 2, 0, 3]), [1, rows, cols, -1])
    taps = tf.reshape(tf.transpose(output_gradient, [1, 2, 0, 3]), [out_h, out_w, -1, 1])
    per_image = tf.nn.depthwise_conv2d(folded, taps, [1, 1, 1, 1], "VALID",
                                       dilations=[sh, sw])
    per_image = tf.reshape(per_image, [kh, kw, batch, channels])
    return tf.reduce_sum(per_image, axis=2)[..., None]


def _depthwise_conv_fast_filter_gradient(inputs, kernel, strides, padding):
    import tensorflow as tf

    tf_strides = [1, strides[0], strides[1], 1]
    tf_padding = padding.upper()

    @tf.custom_gradient
    def conv(x, k):
        def gradient(upstream):
            dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                input_sizes=tf.shape(x), filter=k, out_backprop=upstream, strides=tf_strides,
                padding=tf_padding)
            dk = depthwise_kernel_gradient(x, upstream, k.shape[:2], strides, padding)
            return dx, dk

        return tf.nn.depthwise_conv2d(x, k, tf_strides, tf_padding), gradient

    # a tensor, not the variable: custom_gradient would ask for the variable's gradient
    return conv(inputs, tf.identity(kernel))


def _cpu_only():
    """Whether TensorFlow sees no GPU: the measured gain is over its CPU kernel (cuDNN's
    gradient is another matter, not measured here)."""
    import tensorflow as tf

    return not tf.config.list_logical_devices("GPU")


@keras.saving.register_keras_serializable(package="kdet")
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` with a fast kernel gradient when TensorFlow trains
    (see the module doc); the same arguments, variables and results.

        >>> import numpy as np
        >>> layer = DepthwiseConv2D(5, strides=2, padding="same", use_bias=False)
        >>> tuple(layer(np.zeros((1, 16, 16, 8), "float32"), training=True).shape)
        (1, 8, 8, 8)
    """

    def _fast_route(self, inputs, training):
        # the device query last: the layer's own attributes rule out most calls first
        return (training and keras.backend.backend() == "tensorflow"
                and self.data_format == "channels_last" and self.depth_multiplier == 1
                and tuple(self.dilation_rate) == (1, 1) and self.padding in ("same", "valid")
                and min(self.kernel_size) >= FAST_FILTER_GRADIENT_MIN_KERNEL
                and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and keras.backend.standardize_dtype(self.kernel.dtype) == "float32"
                and None not in tuple(inputs.shape[1:]) and _cpu_only())

    def call(self, inputs, training=None):
        if not self._fast_route(inputs, training):
            return super().call(inputs)
        outputs = _depthwise_conv_fast_filter_gradient(
            inputs, ops.convert_to_tensor(self.kernel), self.strides, self.padding)
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, -1)))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs
