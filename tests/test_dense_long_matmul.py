"""The long inner products of ``kdet.ops.long_matmul`` and the ``Dense`` layer that routes
TensorFlow's CPU calls through them (``kdet.layers.dense``).

Reference: the product and its gradients written out in float64 numpy
(``y = x w``, ``dx = dy w^T``, ``dw = x^T dy``); ``keras.layers.Dense`` with the same weights
for the layer's contract.
"""
import numpy as np
import pytest

from conftest import backend

import keras  # noqa: E402  (after torch, see conftest)

from kdet.layers.conv import direct_convolutions  # noqa: E402
from kdet.layers.dense import Dense  # noqa: E402

pytestmark = pytest.mark.skipif(backend() != "tensorflow",
                                reason="the route is TensorFlow's (JAX keeps keras' Dense, "
                                       "covered by the doctest)")

# float32 against float64, relative to the largest value: one float32 product over
# K = 12544 measures 3e-7-6e-7 either way; a piece dropped or doubled, a wrong slice or a
# transposed gradient errs by 1e-2 and more
RELATIVE_TOLERANCE = 5e-6


def _close(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30) if expected.size else 1.0
    assert np.abs(actual - expected).max(initial=0.0) <= RELATIVE_TOLERANCE * scale


def _on_route(fn, *specs):
    from kdet.ops.long_matmul import SCOPE
    return any(SCOPE + "/" in op.name
               for op in fn.get_concrete_function(*specs).graph.get_operations())


@pytest.mark.parametrize("rows, inner, units", [
    (300, 12544, 64),  # fc6's inner size: three whole pieces and a 256-wide one
    (7, 9000, 33),     # pieces of 4096, 4096, 808
    (1, 4096, 5),      # one piece
    (0, 12544, 8),     # no RoI
])
def test_long_matmul_value_and_gradients_equal_float64(rows, inner, units):
    import tensorflow as tf

    from kdet.ops.long_matmul import long_matmul

    rng = np.random.default_rng(rows + inner)
    x = rng.normal(size=(rows, inner)).astype("float32")
    w = rng.normal(size=(inner, units)).astype("float32")
    dy = rng.normal(size=(rows, units)).astype("float32")
    x[:, :3] = 0.0  # exact zeros and a repeated column
    if inner > 4100:
        x[:, 4096] = x[:, 4095]
    xt, wt = tf.constant(x), tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch([xt, wt])
        y = long_matmul(xt, wt)
    dx, dw = tape.gradient(y, [xt, wt], output_gradients=tf.constant(dy))
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    _close(y, x64 @ w64)
    _close(dx, dy64 @ w64.T)
    _close(dw, x64.T @ dy64)


def _pair(units, inner, rng, activation="relu", use_bias=True):
    """kdet's Dense and keras' built for ``inner`` inputs, with the same random weights."""
    layer = Dense(units, activation=activation, use_bias=use_bias)
    reference = keras.layers.Dense(units, activation=activation, use_bias=use_bias)
    for item in (layer, reference):
        item.build((None, inner))
    weights = [rng.normal(scale=inner ** -0.5, size=v.shape).astype("float32")
               for v in reference.weights]
    layer.set_weights(weights)
    reference.set_weights(weights)
    return layer, reference


@pytest.mark.parametrize("use_bias, activation", [(True, "relu"), (False, None)])
@pytest.mark.parametrize("shape", [(2, 150, 12544), (1, 12544), (1, 1, 8192)])
def test_dense_route_equals_keras_dense_with_gradients(use_bias, activation, shape):
    """Outputs and gradients (inputs, kernel, bias) against keras' Dense in float64 with the
    same weights; keras' float32 layer sums in its own order, so it is not the reference.
    The loss weighs each output by a fixed random factor: the gradients vary per output
    without feeding the forward's rounding back into them. A ``y cos y`` loss did (with one
    row ``dw`` is the outer product of ``x`` and that rounding): on an AVX-512 VNNI CPU,
    whose oneDNN sgemm sums in another order than Eigen's, the kernel gradient lay 1.4e-5
    (relative) from float64 for this layer and 5.5e-6 for keras' float32 one, 8.9e-6 apart."""
    import tensorflow as tf

    rng = np.random.default_rng(len(shape))
    layer, reference = _pair(48, shape[-1], rng, activation, use_bias)
    truth = keras.layers.Dense(48, activation=activation, use_bias=use_bias, dtype="float64")
    truth.build((None, shape[-1]))
    truth.set_weights([w.astype("float64") for w in reference.get_weights()])
    x = rng.normal(size=shape).astype("float32")
    factors = rng.normal(size=(*shape[:-1], 48))

    def run(item):
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = item(x, training=True)
                loss = tf.reduce_sum(y * tf.constant(factors, y.dtype))
            return (y, *tape.gradient(loss, [x, *item.trainable_variables]))
        return tf.function(step)

    x32 = tf.constant(x)
    assert _on_route(run(layer), x32) and not _on_route(run(reference), x32)
    for ours, exact in zip(run(layer)(x32), run(truth)(tf.constant(x, tf.float64))):
        _close(ours, exact)


@pytest.mark.parametrize("case", ["narrow", "export", "xla", "float16"])
def test_dense_keeps_keras_dense(case):
    import tensorflow as tf

    rng = np.random.default_rng(3)
    inner = 8191 if case == "narrow" else 12544
    layer, reference = _pair(16, inner, rng)
    dtype = "float16" if case == "float16" else "float32"
    if case == "float16":
        layer = Dense(16, activation="relu", dtype="float16")
        layer.build((None, inner))
    x = tf.constant(rng.normal(size=(3, inner)).astype(dtype))
    fn = tf.function(lambda x: layer(x), jit_compile=case == "xla")
    if case == "export":
        with direct_convolutions():
            assert not _on_route(fn, x)
    else:
        assert not _on_route(fn, x)
    if case in ("narrow", "xla"):
        _close(fn(x), reference(x))


def test_dense_traces_unknown_leading_sizes():
    import tensorflow as tf

    rng = np.random.default_rng(4)
    layer, reference = _pair(8, 12544, rng)
    for spec, out in [((None, None, 12544), [None, None, 8]), ((None, 5, 12544), [None, 5, 8])]:
        fn, spec = tf.function(lambda x: layer(x)), tf.TensorSpec(spec, tf.float32)
        assert _on_route(fn, spec)
        assert fn.get_concrete_function(spec).structured_outputs.shape.as_list() == out
    x = rng.normal(size=(2, 5, 12544)).astype("float32")
    _close(fn(x), reference(x))


def test_box_heads_take_the_route():
    """Faster / Mask R-CNN's fc6 (v1) and the conv-FC head's fc (v2): 12,544 inputs."""
    import tensorflow as tf

    from kdet.layers.roi_heads import FastRCNNConvFCHead, TwoMLPHead

    pooled = tf.zeros((1, 4, 7, 7, 256))
    for head in (TwoMLPHead(32), FastRCNNConvFCHead((256,), (32,))):
        head.build(pooled.shape)
        assert _on_route(tf.function(lambda x, head=head: head(x)), pooled)
