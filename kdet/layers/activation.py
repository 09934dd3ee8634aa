"""Activations, with a cheaper swish (SiLU) for TensorFlow's CPU training.

TensorFlow's ``silu`` is two kernels forward (``Sigmoid``, ``Mul``) and, as its
gradient recomputes the sigmoid, six backward: each a pass over the activations.
EfficientDet D0-D7's backbone, BiFPN and heads apply it to every batch-normed map,
and on a 1-thread CPU those passes were 14-18 % of a D0 training step's op time at 512 px
(``benchmarks/RESULTS.md``, sessions 19-20). Where :func:`silu` takes its route, the
forward and the gradient are each one XLA-compiled kernel (the gradient recomputes
the sigmoid inside it). Forward + backward, 1 thread, milliseconds (``tf.nn.silu`` /
this route): ``[1, 256, 256, 32]`` 6.0 / 2.0, ``[1, 128, 128, 96]`` 4.4 / 1.9,
``[1, 64, 64, 144]`` 1.6 / 0.8, ``[8, 40, 40, 64]`` 2.1 / 1.0; at 65,536 values (``[1,
32, 32, 64]``) 0.49 / 0.42 and below it the launch of the compiled kernel costs more
than it saves (``[1, 16, 16, 64]`` 0.35 / 0.40), so smaller maps keep ``silu``.

The route runs only in training (``training=True``), on TensorFlow's CPU outside XLA,
for float32 maps of :data:`MIN_VALUES` values or more with static sizes; inference,
the exports, JAX and XLA-compiled training keep Keras' ``silu`` (in an XLA program the
compiler fuses it anyway).
"""
import functools
import math

import keras

from kdet.layers.conv import _outside_xla
from kdet.layers.depthwise import _cpu_only

# values of one call from which the compiled kernels pay (module doc)
MIN_VALUES = 65536


def _takes_compiled_route(x, training):
    shape = tuple(x.shape)
    if not (training and keras.backend.backend() == "tensorflow"
            and keras.backend.standardize_dtype(x.dtype) == "float32"
            and len(shape) >= 2 and None not in shape[1:]):
        return False
    values = (shape[0] or 1) * math.prod(shape[1:])
    return values >= MIN_VALUES and _outside_xla() and _cpu_only()


@functools.cache
def _compiled_silu():
    """``tf.custom_gradient`` SiLU whose forward and gradient are XLA-compiled kernels."""
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False)
    def forward(x):
        return x * tf.sigmoid(x)

    @tf.function(jit_compile=True, autograph=False)
    def backward(x, upstream):
        # d/dx x s(x) = s + x s (1 - s), with the sigmoid recomputed in the kernel:
        # cheaper than saving it (one more map to write and read back)
        s = tf.sigmoid(x)
        return upstream * (s * (1.0 + x * (1.0 - s)))

    @tf.custom_gradient
    def silu(x):
        return forward(x), lambda upstream: backward(x, upstream)

    return silu


def silu(x, training=None):
    """``x * sigmoid(x)`` (swish), Keras' ``silu``; in TensorFlow's CPU training of large
    maps by one compiled kernel each way (module doc). The same values to float32
    rounding.

    >>> import numpy as np
    >>> x = np.array([-2.0, 0.0, 3.0], "float32")
    >>> [round(float(v), 4) for v in silu(x)]
    [-0.2384, 0.0, 2.8577]
    """
    if _takes_compiled_route(x, training):
        return _compiled_silu()(x)
    return keras.activations.silu(x)


def activation_function(name):
    """The function ``(x, training=None) -> y`` of an activation named as Keras names it
    (``"relu"``, ``"relu6"``, ``"silu"`` (``"swish"``), ``"sigmoid"``), or None for None."""
    return None if name is None else _taking_training(keras.activations.get(name))


def _taking_training(function):
    """A Keras activation function as ``(x, training=None) -> y``: :func:`silu` for
    Keras' ``silu``."""
    if function is keras.activations.silu:
        return silu
    return lambda x, training=None: function(x)


@keras.saving.register_keras_serializable(package="kdet")
class Activation(keras.layers.Activation):
    """``keras.layers.Activation`` whose swish takes :func:`silu`'s training route; the
    same arguments and results (EfficientNet's backbone: ``kdet.backbones``).

    >>> import numpy as np
    >>> layer = Activation("swish")
    >>> [round(float(v), 4) for v in layer(np.array([1.0], "float32"), training=True)]
    [0.7311]
    """

    def call(self, inputs, training=None):
        return _taking_training(self.activation)(inputs, training=training)
