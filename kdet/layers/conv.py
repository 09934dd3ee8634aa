"""Conv2D whose wide 3 x 3 convolutions run by Winograd's algorithm on TensorFlow's CPU.

The heads of RetinaNet, the RPN, the FPN outputs, the mask and keypoint heads and ResNet's
later stages spend most of their time in 3 x 3 convolutions of 128-819 channels. On CPU,
TensorFlow runs those as oneDNN direct convolutions (as PyTorch does); Winograd's
F(4 x 4, 3 x 3) and F(2 x 2, 3 x 3) (:mod:`kdet.ops.winograd`) do 4x and 2.25x fewer
multiplications, in the forward pass and in both gradients, at the price of input and
output transforms whose cost is per pixel, not per channel pair.

Measured, 1 thread, CPU ms, direct / F(2 x 2, 3 x 3) / F(4 x 4, 3 x 3), forward and
(forward + backward), 256 channels in and out unless said:

- ``[1, 200, 200, 256]`` (an FPN's P2 at 800 px): 451 / 338 / 241 (1458 / 1000 / 701)
- ``[1, 80, 80, 256]``: 70 / 52 / 39 (247 / 150 / 112)
- ``[1, 40, 40, 256]``: 17.8 / 13.6 / 11.4 (54.6 / 36.4 / 27.5)
- ``[2, 28, 28, 256]``: 17.4 / 13.1 / 10.6 (51.8 / 36.1 / 27.9)
- ``[1, 24, 24, 256]``: 6.8 / 5.5 / 5.9 (20.5 / 15.8 / 14.6)
- ``[1, 14, 14, 256]``: 2.8 / 3.1 / 3.7 (7.6 / 6.3 / 7.8)
- ``[1, 25, 25, 512]``: 29.6 / 27.0 / 26.6 (88.3 / 60.0 / 59.2)
- ``[100, 14, 14, 256]`` (a mask head): 190 / 159 / 152 (614 / 479 / 467)
- ``[1, 100, 100, 128]`` (ResNet's layer2 at 800 px): 27.2 / 30.6 / 22.2 (94.6 / 88.2 / 63.0)
- ``[1, 50, 50, 128]``: 7.6 / 8.6 / 6.9 (22.0 / 18.9 / 14.2)
- ``[1, 100, 100, 64]``: 7.5 / 11.5 / 8.6; ``[1, 200, 200, 64]``: 28.1 / 62.2 / 52.0
- ``[1, 10, 10, 512]``: 6.2 / 9.2 / 14.3

So each map takes the cheaper of the two where either beats the direct convolution
(:data:`TILE_RULES`), and narrow or small ones keep it. The layer keeps
``keras.layers.Conv2D``'s arguments and variables (checkpoints load either way); JAX, a
GPU, XLA and the exports (:func:`direct_convolutions`) use the direct op.
"""
import contextlib
import weakref

import keras
from keras import ops

from kdet.layers.depthwise import _cpu_only

# From which input channels and output tiles per image the route pays (measured above,
# forward and training): F(4 x 4, 3 x 3) from 256 channels and 49 of its tiles (maps of
# 25 x 25 and more), or 128 channels and 169 tiles (49 x 49); F(2 x 2, 3 x 3) from 256
# channels and 49 of its tiles (13 x 13). Fewer channels (64: 0.54-0.87x) never pay.
TILE_RULES = ((4, 256, 49), (4, 128, 169), (2, 256, 49))
# The transformed inputs V ([(tile + 2)^2, tiles, C] float32: 4x the input's size for
# F(2 x 2, 3 x 3), 2.25x for F(4 x 4, 3 x 3)) and the products are alive for one
# convolution (forward, and again in the backward pass): an FPN's P2 at 800 px holds up
# to 164 MB an image, where the direct convolution holds none. Past this size (batch or
# RoI rows included, where static) a call keeps the direct convolution, so large
# training batches do not grow their peak memory by gigabytes. Mask R-CNN at 800 px, 1
# thread, F(2 x 2, 3 x 3) only, peak RSS against the direct convolutions' 6.51 GiB
# (batch 2) and 11.21 GiB (batch 4): this cap 6.96 and 11.29 GiB; no cap at batch 2,
# 7.52 GiB; a 512 MB cap at batch 4, 12.56 GiB. (Step times: benchmarks/RESULTS.md.)
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


def _tiles(shape, tile):
    """``tile x tile`` output blocks of one ``[N, H, W, C]`` image."""
    return (-(-shape[1] // tile)) * (-(-shape[2] // tile))


def winograd_tile(shape):
    """The output tile (4 or 2) of the Winograd algorithm :data:`TILE_RULES` pick for a
    3 x 3 convolution of ``[N, H, W, C]`` inputs, or 0 for the direct convolution."""
    for tile, channels, tiles in TILE_RULES:
        if shape[3] >= channels and _tiles(shape, tile) >= tiles:
            transformed_bytes = (shape[0] or 1) * _tiles(shape, tile) * shape[3] * 4 * (
                tile + 2) ** 2
            return tile if transformed_bytes <= MAX_TRANSFORMED_BYTES else 0
    return 0


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
        # (graph, {tile: tensor}): the transformed kernels of one trace
        self._kernels_t = None

    def _winograd_tile(self, inputs):
        """The Winograd output tile this call takes (4 or 2), or 0 for the direct op."""
        shape = tuple(inputs.shape)
        if not (WINOGRAD and keras.backend.backend() == "tensorflow"
                and len(shape) == 4 and tuple(self.kernel_size) == (3, 3)
                and tuple(self.strides) == (1, 1)
                and tuple(self.dilation_rate) == (1, 1) and self.padding == "same"
                and self.groups == 1 and self.data_format == "channels_last"
                and None not in shape[1:]
                and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and keras.backend.standardize_dtype(self.kernel.dtype) == "float32"):
            return 0
        tile = winograd_tile(shape)
        return tile if tile and _outside_xla() and _cpu_only() else 0

    def _transformed_kernel(self, tile):
        """The kernel in the Winograd domain, computed once per traced graph: a head shared
        by five pyramid levels transforms its kernels once, not five times. (Inference:
        the variable does not change within a graph's call.)"""
        import tensorflow as tf

        from kdet.ops.winograd import transformed_kernel

        if tf.executing_eagerly():
            return transformed_kernel(ops.convert_to_tensor(self.kernel), tile)
        graph = tf.compat.v1.get_default_graph()
        if self._kernels_t is None or self._kernels_t[0]() is not graph:
            self._kernels_t = (weakref.ref(graph), {})
        kernels = self._kernels_t[1]
        if tile not in kernels:
            kernels[tile] = transformed_kernel(ops.convert_to_tensor(self.kernel), tile)
        return kernels[tile]

    def call(self, inputs, training=None):
        tile = self._winograd_tile(inputs)
        if not tile:
            return super().call(inputs)
        from kdet.ops.winograd import conv3x3_same, conv3x3_same_trainable

        if training:
            outputs = conv3x3_same_trainable(inputs, ops.convert_to_tensor(self.kernel), tile)
        else:
            outputs = conv3x3_same(inputs, self._transformed_kernel(tile), tile)
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, -1)))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs
