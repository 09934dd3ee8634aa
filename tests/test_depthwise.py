"""kdet.layers.DepthwiseConv2D: the fast kernel gradient (TensorFlow training) equals
Keras' DepthwiseConv2D's, the layer is Keras' everywhere else."""
import numpy as np
import pytest

import keras

from conftest import backend
from kdet.layers import DepthwiseConv2D

CASES = [  # (batch, size, channels, kernel, stride, padding)
    (1, 20, 8, 5, 1, "same"),
    (3, 17, 6, 5, 2, "same"),    # odd size, stride 2: TF SAME pads the odd pixel after
    (2, 16, 5, 5, 2, "same"),
    (2, 15, 4, 5, 1, "valid"),
    (1, 9, 3, 7, 2, "valid"),
    (1, 1, 4, 5, 1, "same"),     # a 1 x 1 map: every tap but the centre reads padding
]


def _pair(kernel, stride, padding, use_bias, activation, input_shape):
    """kdet's layer and Keras', built for ``input_shape`` with the same (random) weights."""
    kwargs = dict(strides=stride, padding=padding, use_bias=use_bias, activation=activation,
                  depthwise_initializer="glorot_uniform", bias_initializer="glorot_uniform")
    ours, theirs = DepthwiseConv2D(kernel, **kwargs), keras.layers.DepthwiseConv2D(kernel,
                                                                                  **kwargs)
    ours.build(input_shape)
    theirs.build(input_shape)
    theirs.set_weights(ours.get_weights())
    return ours, theirs


@pytest.mark.skipif(backend() != "tensorflow", reason="the fast route is TensorFlow's")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_bias,activation", [(False, None), (True, "relu6")])
def test_fast_kernel_gradient_equals_keras(case, use_bias, activation):
    import tensorflow as tf

    batch, size, channels, kernel, stride, padding = case
    rng = np.random.default_rng(size * kernel + stride)
    x = tf.constant(rng.normal(size=(batch, size, size, channels)).astype("float32"))
    ours, theirs = _pair(kernel, stride, padding, use_bias, activation, x.shape)
    assert ours._fast_route(x, True) and not ours._fast_route(x, False)

    def grads(layer, training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training) if layer is ours else layer(x)
            weights = tf.reshape(tf.cos(tf.range(tf.size(y), dtype=tf.float32)), tf.shape(y))
            loss = tf.reduce_sum(y * weights)
        return [y] + tape.gradient(loss, [x] + layer.trainable_variables)

    expected = grads(theirs, None)
    for got in (grads(ours, True), tf.function(lambda: grads(ours, True))()):
        for g, e, what in zip(got, expected, ["output", "input", "kernel", "bias"]):
            scale = max(1.0, float(np.abs(e).max()))
            np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=2e-5 * scale,
                                       rtol=0, err_msg=what)


@pytest.mark.skipif(backend() != "tensorflow", reason="the fast route is TensorFlow's")
def test_fast_kernel_gradient_with_an_unknown_batch():
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(3, 12, 12, 4)).astype("float32")
    ours, theirs = _pair(5, 2, "same", False, None, x.shape)

    @tf.function(input_signature=[tf.TensorSpec([None, 12, 12, 4], tf.float32)])
    def kernel_gradient(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(ours(images, training=True)))
        return tape.gradient(loss, ours.kernel)

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(theirs(x)))
    np.testing.assert_allclose(kernel_gradient(x), tape.gradient(loss, theirs.kernel),
                               rtol=1e-5, atol=1e-5)


def test_same_layer_and_variables_as_keras_elsewhere():
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    ours, theirs = _pair(5, 1, "same", True, None, x.shape)
    assert [v.path.split("/")[-1] for v in ours.weights] == \
        [v.path.split("/")[-1] for v in theirs.weights]
    for training in (False, None):  # predict / export: Keras' own call
        assert not ours._fast_route(keras.ops.convert_to_tensor(x), training)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x, training=training)),
                                   keras.ops.convert_to_numpy(theirs(x)), rtol=1e-6, atol=1e-6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(ours))
    assert type(restored) is DepthwiseConv2D and restored.get_config() == ours.get_config()
