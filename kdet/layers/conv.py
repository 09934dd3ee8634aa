"""Conv2D whose wide 3 x 3 convolutions run by Winograd's algorithm on TensorFlow's CPU.

The heads of RetinaNet, the RPN, the FPN outputs, the mask and keypoint heads and ResNet's
later stages spend most of their time in 3 x 3 convolutions of 128-819 channels. On CPU,
TensorFlow runs those as oneDNN direct convolutions (as PyTorch does); Winograd's
F(4 x 4, 3 x 3) and F(2 x 2, 3 x 3) (:mod:`kdet.ops.winograd`) do 4x and 2.25x fewer
multiplications, in the forward pass and in both gradients, at the price of input and
output transforms whose cost is per pixel, not per channel pair.

Measured, 1 thread, CPU ms, direct / F(2 x 2, 3 x 3) / F(4 x 4, 3 x 3), forward and
(forward + backward) where measured, as many channels out as in (benchmarks/RESULTS.md,
session 12, has the full table):

- ``[1, 200, 200, 256]`` (an FPN's P2 at 800 px): 451 / 302 / 192 (1458 / 889 / 576)
- ``[1, 80, 80, 256]``: 70 / 50 / 29 (247 / - / 93)
- ``[1, 20, 20, 256]``: 5.0 / 4.5 / 4.2; ``[1, 24, 24, 256]``: 6.7 / 5.3 / 5.7
- ``[1, 14, 14, 256]``: 2.7 / 2.9 / 3.7; ``[1, 13, 13, 256]``: 2.5 / 3.1 / 3.5
- ``[100, 14, 14, 256]`` (a mask head): 191 / 148 / 122 (614 / 440 / 359)
- ``[1, 100, 100, 128]`` (ResNet's layer2 at 800 px): 27.2 / - / 17.3 (94.6 / - / 45.8)
- ``[1, 28, 28, 128]``: 2.6 / 2.5 / 2.0 (7.5 / 6.5 / 4.7)
- ``[1, 200, 200, 64]`` (layer1): 27.0 / 34.7 / 24.1 (86.1 / 104.0 / 76.1)
- ``[1, 56, 56, 64]``: 2.3 / 2.2 / 1.6; ``[1, 28, 28, 64]``: 0.8 / 0.9 / 0.8;
  ``[1, 25, 25, 64]``: 0.8 / 0.9 / 1.0

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

# (tile, input channels, output tiles of the call: an image's times the batch where the
# batch is static, as the RoI heads' rows are) from which the route pays, the first rule
# that holds wins: F(4 x 4, 3 x 3) from 256 channels and 49 of its tiles (maps of 25 x 25
# and more), or 128 channels and 169 tiles (49 x 49); F(2 x 2, 3 x 3) from 256 channels
# and 49 of its tiles (13 x 13). The rest keeps the direct convolution. Alone, F(4 x 4,
# 3 x 3) also beats it at 128 channels from 28 x 28 and 64 channels from 40 x 40 (above),
# but in whole models (ResNet-50's layer1 / layer2, where the direct convolution fuses its
# batch norm and ReLU) those lower bounds cost 3% (RetinaNet @ 640, Faster R-CNN @ 800
# predict; benchmarks/RESULTS.md, session 12).
TILE_RULES = ((4, 256, 49), (4, 128, 169), (2, 256, 49))
# The transformed inputs V ([(tile + 2)^2, tiles, C] float32: 4x the input's size for
# F(2 x 2, 3 x 3), 2.25x for F(4 x 4, 3 x 3)) and the products are alive for one
# convolution (forward, and again in the backward pass): an FPN's P2 at 800 px holds up
# to 164 MB an image, where the direct convolution holds none. A batch whose V would pass
# this size (batch or RoI rows, where static) runs in slices that each stay within it
# (:func:`batch_slices`), in inference and in training (whose backward pass runs the
# slices in turn too), so large batches do not grow the peak memory by gigabytes; an
# image that alone passes the cap keeps the direct convolution. Mask R-CNN at 800 px, 1
# thread, F(2 x 2, 3 x 3) only, peak RSS against the direct convolutions' 6.51 GiB
# (batch 2) and 11.21 GiB (batch 4): this cap (then as a whole-batch limit, falling back
# to the direct convolution) 6.96 and 11.29 GiB; no cap at batch 2, 7.52 GiB; a 512 MB
# cap at batch 4, 12.56 GiB. Batch 8 training in slices (session 14): 21.47 GiB against
# 21.58 with the direct convolution over the cap, 85.3 against 112.2 CPU s a step.
# (Step times: benchmarks/RESULTS.md.)
MAX_TRANSFORMED_BYTES = 256 * 2 ** 20
# the CPU routes (this module's Winograd convolutions, kdet.layers.dense's long products),
# switched off while an export traces (see :func:`direct_convolutions`)
WINOGRAD = True


@contextlib.contextmanager
def direct_convolutions():
    """Trace with plain convolutions and products: exported graphs (SavedModel, LiteRT,
    ONNX) hold ``Conv2D`` / ``MatMul`` ops that every runtime and quantizer knows."""
    global WINOGRAD
    previous, WINOGRAD = WINOGRAD, False
    try:
        yield
    finally:
        WINOGRAD = previous


def _tiles(shape, tile):
    """``tile x tile`` output blocks of one ``[N, H, W, C]`` image."""
    return (-(-shape[1] // tile)) * (-(-shape[2] // tile))


def _transformed_bytes(shape, tile):
    """Bytes of one image's transformed input ``V`` (float32)."""
    return _tiles(shape, tile) * shape[3] * 4 * (tile + 2) ** 2


def winograd_tile(shape):
    """The output tile (4 or 2) of the Winograd algorithm :data:`TILE_RULES` pick for a
    3 x 3 convolution of ``[N, H, W, C]`` inputs, or 0 for the direct convolution."""
    for tile, channels, tiles in TILE_RULES:
        if shape[3] >= channels and (shape[0] or 1) * _tiles(shape, tile) >= tiles:
            return tile if _transformed_bytes(shape, tile) <= MAX_TRANSFORMED_BYTES else 0
    return 0


def batch_slices(shape, tile):
    """Sizes of the batch slices the route runs one after another, each holding at most
    :data:`MAX_TRANSFORMED_BYTES` of transformed input, as even as they come:
    ``[N]`` where the batch fits, or ``N`` is unknown when the graph is traced.

    >>> batch_slices((8, 200, 200, 256), 4)  # 92 MB an image: 2 a slice
    [2, 2, 2, 2]
    >>> batch_slices((800, 14, 14, 256), 2), batch_slices((None, 200, 200, 256), 4)
    ([267, 267, 266], [None])
    """
    if shape[0] is None:
        return [None]
    per_slice = max(1, MAX_TRANSFORMED_BYTES // _transformed_bytes(shape, tile))
    count = -(-shape[0] // per_slice)
    size, larger = divmod(shape[0], count)
    return [size + 1] * larger + [size] * (count - larger)


def tensorflow_cpu_route():
    """Whether a call traced now may take a TensorFlow CPU route (the Winograd convolution,
    :func:`kdet.ops.long_matmul.long_matmul`): TensorFlow, on CPU, outside XLA, not while an
    export traces."""
    return (WINOGRAD and keras.backend.backend() == "tensorflow" and _outside_xla()
            and _cpu_only())


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
        # the route first: on JAX the shapes may be symbolic, which winograd_tile's
        # comparisons cannot decide
        if not (tensorflow_cpu_route() and len(shape) == 4
                and tuple(self.kernel_size) == (3, 3)
                and tuple(self.strides) == (1, 1)
                and tuple(self.dilation_rate) == (1, 1) and self.padding == "same"
                and self.groups == 1 and self.data_format == "channels_last"
                and None not in shape[1:]
                and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and keras.backend.standardize_dtype(self.kernel.dtype) == "float32"):
            return 0
        return winograd_tile(shape)

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

        slices = batch_slices(tuple(inputs.shape), tile)
        if training:
            outputs = conv3x3_same_trainable(inputs, ops.convert_to_tensor(self.kernel),
                                             tile, slices)
        else:
            outputs = conv3x3_same(inputs, self._transformed_kernel(tile), tile, slices)
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, -1)))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs
