"""Dense whose long inner products (8,192+ inputs) run in full-speed pieces on TensorFlow's CPU.

The R-CNN box heads' first fully connected layer takes the pooled RoI's 12,544 values
(256 x 7 x 7): TensorFlow's CPU ``MatMul`` runs that product at half speed where its
oneDNN rewrites are off (:mod:`kdet.ops.long_matmul`), so the layer runs it through
:func:`kdet.ops.long_matmul.long_matmul` there. JAX, a GPU, XLA, the exports
(:func:`kdet.layers.conv.direct_convolutions`), other dtypes and quantized or LoRA layers
keep ``keras.layers.Dense``. Same arguments, variables and results (to float32 rounding).
"""
import keras
from keras import ops

from kdet.layers.conv import tensorflow_cpu_route
from kdet.ops.long_matmul import MIN_INNER, long_matmul


@keras.saving.register_keras_serializable(package="kdet")
class Dense(keras.layers.Dense):
    """``keras.layers.Dense`` (module doc).

        >>> import numpy as np
        >>> layer = Dense(4, activation="relu")
        >>> tuple(layer(np.ones((2, 3, 9000), "float32")).shape)
        (2, 3, 4)
    """

    def _long_route(self, inputs):
        """Whether this call takes :func:`~kdet.ops.long_matmul.long_matmul`."""
        # the route first: on JAX the shapes may be symbolic
        return (tensorflow_cpu_route()
                and inputs.shape[-1] is not None and inputs.shape[-1] >= MIN_INNER
                and self.quantization_mode is None and not self.lora_enabled
                and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and keras.backend.standardize_dtype(self.kernel.dtype) == "float32")

    def call(self, inputs, training=None):
        if not self._long_route(inputs):
            return super().call(inputs, training=training)
        import tensorflow as tf

        rows = tf.reshape(inputs, (-1, inputs.shape[-1]))
        x = long_matmul(rows, tf.convert_to_tensor(self.kernel))
        # static sizes stay static (the heads after it reshape by them)
        lead = [size if size is not None else tf.shape(inputs)[axis]
                for axis, size in enumerate(inputs.shape[:-1])]
        x = tf.reshape(x, [*lead, self.units])
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x
