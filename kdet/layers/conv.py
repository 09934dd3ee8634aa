"""Conv2D whose wide 3 x 3 convolutions run by Winograd's algorithm on TensorFlow's CPU.

The heads of RetinaNet, the RPN, the FPN outputs, the mask and keypoint heads and ResNet's
later stages spend most of their time in 3 x 3 convolutions of 256-819 channels. On CPU,
TensorFlow runs those as oneDNN direct convolutions (as PyTorch does); F(2 x 2, 3 x 3)
(:mod:`kdet.ops.winograd`) does 2.25x fewer multiplications, in the forward pass and in
both gradients. Measured, 1 thread, direct -> Winograd, forward: ``[1, 80, 80, 256]`` to
256 channels 68 -> 48 ms, to 819 (RetinaNet's class logits) 227 -> 127 ms; ``[1, 25, 25,
512]`` 26 -> 21 ms; ``[100, 14, 14, 256]`` (a mask head) 187 -> 151 ms. Forward and
backward: ``[1, 80, 80, 256]`` 148 -> 94 ms, to 819 491 -> 246 ms, ``[1, 25, 25, 512]``
58 -> 41 ms, ``[100, 14, 14, 256]`` 387 -> 292 ms. With fewer channels or smaller maps the
transforms cost more than they save (forward ``[1, 100, 100, 128]`` 0.92x, ``[1, 10, 10,
256]`` 0.81x, ``[512, 7, 7, 256]`` 0.84x; ``[1, 14, 14, 256]`` breaks even), so those keep
the direct convolution.

The layer keeps ``keras.layers.Conv2D``'s arguments and variables (checkpoints load either
way); JAX, a GPU, XLA and the exports (:func:`direct_convolutions`) use the direct op.
"""
import contextlib
import weakref

import keras
from keras import ops

from kdet.layers.depthwise import _cpu_only

# input channels and 2 x 2 output tiles per image from which the route pays (measured
# above): 256 channels and 14 x 14 maps (49 tiles) or more
MIN_CHANNELS = 256
MIN_TILES = 49
# The transformed inputs V ([16, tiles, C] float32) and the products are 4x the input's
# size, alive for one convolution (forward, and again in the backward pass): an FPN's P2
# at 800 px holds 164 MB an image, where the direct convolution holds none. Past this
# size (batch or RoI rows included, where static) a call keeps the direct convolution,
# so large training batches do not grow their peak memory by gigabytes. Mask R-CNN at
# 800 px, 1 thread, peak RSS against the direct convolutions' 6.51 GiB (batch 2) and
# 11.21 GiB (batch 4): this cap 6.96 and 11.29 GiB; no cap at batch 2, 7.52 GiB; a
# 512 MB cap at batch 4, 12.56 GiB. (Step times: benchmarks/RESULTS.md.)
MAX_TRANSFORMED_BYTES = 256 * 2 ** 20
# switched off while an export traces (see :func:`direct_convolutions`)
WINOGRAD = True


@contextlib.contextmanager
def direct_convolutions():
    """Trace with plain convolutions: exported graphs (SavedModel, LiteRT, ONNX) hold
    ``Conv2D`` ops that every runtime and quantizer knows."""
    global WINOGRAD
    previous, WINOGRAD = WINOGRAD, False
    try:
        yield
    finally:
        WINOGRAD = previous


def _tiles(shape):
    """2 x 2 output tiles of one ``[N, H, W, C]`` image."""
    return (-(-shape[1] // 2)) * (-(-shape[2] // 2))


def _outside_xla():
    from tensorflow.python.ops import control_flow_util

    import tensorflow as tf

    graph = tf.compat.v1.get_default_graph()
    return not control_flow_util.GraphOrParentsInXlaContext(graph)


@keras.saving.register_keras_serializable(package="kdet")
class Conv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D``; on TensorFlow's CPU its wide 3 x 3 ``same`` convolutions
    run by Winograd's F(2 x 2, 3 x 3) (module doc). Same arguments, variables
    and results (to float32 rounding).

        >>> import numpy as np
        >>> layer = Conv2D(256, 3, padding="same")
        >>> tuple(layer(np.zeros((1, 16, 16, 256), "float32")).shape)
        (1, 16, 16, 256)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kernel_16 = None  # (graph, tensor): the transformed kernel of one trace

    def _winograd_route(self, inputs):
        shape = tuple(inputs.shape)
        if not (WINOGRAD and keras.backend.backend() == "tensorflow"
                and len(shape) == 4 and tuple(self.kernel_size) == (3, 3)
                and tuple(self.strides) == (1, 1)
                and tuple(self.dilation_rate) == (1, 1) and self.padding == "same"
                and self.groups == 1 and self.data_format == "channels_last"
                and None not in shape[1:] and shape[3] >= MIN_CHANNELS
                and _tiles(shape) >= MIN_TILES
                and (shape[0] or 1) * _tiles(shape) * shape[3] * 64 <= MAX_TRANSFORMED_BYTES
                and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and keras.backend.standardize_dtype(self.kernel.dtype) == "float32"):
            return False
        return _outside_xla() and _cpu_only()

    def _transformed_kernel(self):
        """The kernel in the Winograd domain, computed once per traced graph: a head shared
        by five pyramid levels transforms its kernels once, not five times. (Inference:
        the variable does not change within a graph's call.)"""
        import tensorflow as tf

        from kdet.ops.winograd import transformed_kernel

        if tf.executing_eagerly():
            return transformed_kernel(ops.convert_to_tensor(self.kernel))
        graph = tf.compat.v1.get_default_graph()
        cached = self._kernel_16
        if cached is not None and cached[0]() is graph:
            return cached[1]
        kernel_16 = transformed_kernel(ops.convert_to_tensor(self.kernel))
        self._kernel_16 = (weakref.ref(graph), kernel_16)
        return kernel_16

    def call(self, inputs, training=None):
        if not self._winograd_route(inputs):
            return super().call(inputs)
        from kdet.ops.winograd import conv3x3_same, conv3x3_same_trainable

        if training:
            outputs = conv3x3_same_trainable(inputs, ops.convert_to_tensor(self.kernel))
        else:
            outputs = conv3x3_same(inputs, self._transformed_kernel())
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, -1)))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs
