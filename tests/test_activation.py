"""kdet's swish (``kdet.layers.activation``): its TensorFlow training route (one
compiled kernel each way) against the formula in float64, on awkward values, and where
the route is taken."""
import keras
import numpy as np
import pytest
from conftest import backend
from test_losses import _value_and_gradient, np_

from kdet.layers import activation as A


def _silu_reference(x):
    """``x * sigmoid(x)`` and its derivative ``s + x s (1 - s)`` in float64."""
    x = x.astype(np.float64)
    with np.errstate(invalid="ignore"):  # the NaN input
        # 1 / (1 + exp(-x)) without overflow at -100 (and not 0.5 (1 + tanh(x / 2)), which
        # cancels to 1e-4 relative at x = -30)
        s = np.exp(-np.logaddexp(0.0, -x))
    return x * s, s + x * s * (1.0 - s)


def _awkward_map(rng, shape):
    x = rng.normal(0, 4, shape).astype("float32")
    flat = x.reshape(-1)
    flat[:12] = [0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 88.0, -88.0, 100.0, -100.0, 1.0, 1.0]
    flat[12] = np.nan
    return x


@pytest.mark.parametrize("shape", [(2, 64, 64, 16), (1, 33, 47, 64), (3, 8, 8, 4)])
def test_silu_training_route_matches_the_formula(rng, shape):
    """Value and gradient of ``silu(x, training=True)`` (the compiled route on TensorFlow
    for the two large maps, Keras' silu for the small one and on JAX) against float64:
    saturated, signed-zero and tiny inputs, a NaN (stays in its own position)."""
    x = _awkward_map(rng, shape)
    upstream = rng.normal(size=shape).astype("float32")
    value, gradient = _value_and_gradient(lambda v: A.silu(v, training=True), x, upstream)
    want_value, want_slope = _silu_reference(x)
    nan = np.isnan(x)
    assert np.isnan(value[nan]).all() and np.isnan(gradient[nan]).all()
    assert not np.isnan(value[~nan]).any() and not np.isnan(gradient[~nan]).any()
    np.testing.assert_allclose(value[~nan], want_value[~nan], rtol=2e-6, atol=1e-30)
    np.testing.assert_allclose(gradient[~nan], (upstream * want_slope)[~nan],
                               rtol=2e-6, atol=1e-6)


def test_silu_route_only_where_it_pays():
    """The compiled route: TensorFlow training of float32 maps of 65,536+ values with
    static sizes; inference, small maps, other dtypes and JAX keep Keras' silu (inference
    bit for bit)."""
    big = np.linspace(-8, 8, 2 * 64 * 64 * 8, dtype="float32").reshape(2, 64, 64, 8)
    takes = A._takes_compiled_route
    assert takes(keras.ops.convert_to_tensor(big), True) is (backend() == "tensorflow")
    assert not takes(keras.ops.convert_to_tensor(big), None)
    assert not takes(keras.ops.convert_to_tensor(big[:1, :32]), True)     # 16,384 values
    assert not takes(keras.ops.convert_to_tensor(big.astype("float16")), True)
    np.testing.assert_array_equal(np_(A.silu(big)), np_(keras.activations.silu(big)))
    if backend() == "tensorflow":
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec((None, 64, 64, 8), tf.float32)])
        def unknown_batch(x):
            # an unknown batch counts as 1: 32,768 values an image keep Keras' silu
            assert not takes(x, True)
            return x

        unknown_batch(big)


def test_activation_layer_is_keras_activation(rng):
    """``kdet.layers.Activation`` equals Keras' layer for each name the models use, in
    training and inference, and EfficientNet's swish layers are it."""
    x = rng.normal(0, 3, (2, 64, 64, 8)).astype("float32")
    for name in ("swish", "relu", "relu6", "sigmoid"):
        ours, keras_layer = A.Activation(name), keras.layers.Activation(name)
        for training in (True, False):
            np.testing.assert_allclose(np_(ours(x, training=training)), np_(keras_layer(x)),
                                       rtol=1e-6, atol=1e-7)
    assert A.activation_function("swish") is A.silu
    assert A.activation_function(None) is None

    import kdet

    body = kdet.backbones.EfficientNet("b0", input_shape=(64, 64, 3))
    swishes = [layer for layer in body.layers if type(layer).__name__ == "Activation"]
    assert len(swishes) == 32 and all(isinstance(layer, A.Activation) for layer in swishes)


def _swish_layers():
    import kdet
    from kdet.layers import BiFPN, EfficientDetHead, SeparableConvNormAct

    rng = np.random.default_rng(5)

    def maps(*shapes):
        return [rng.normal(0, 2, shape).astype("float32") for shape in shapes]
    return {
        "separable_conv": (lambda: SeparableConvNormAct(16, 3, norm="batch",
                                                        activation="swish"),
                           maps((2, 64, 64, 16))),
        "bifpn": (lambda: BiFPN(64, 1, min_level=3, max_level=5, fusion="fast"),
                  [dict(zip(("C3", "C4", "C5"), maps((2, 32, 32, 40), (2, 16, 16, 112),
                                                     (2, 8, 8, 320))))]),
        "effdet_head": (lambda: EfficientDetHead(3, num_anchors=9, depth=2, num_levels=2),
                        [maps((2, 32, 32, 64), (2, 16, 16, 64))]),
        "efficientnet_b0": (lambda: kdet.backbones.EfficientNet(
            "b0", input_shape=(64, 64, 3), return_levels=(3, 4, 5)), maps((2, 64, 64, 3))),
    }


@pytest.mark.parametrize("case", ["separable_conv", "bifpn", "effdet_head", "efficientnet_b0"])
def test_swish_layers_take_the_route_in_training(monkeypatch, case):
    """Each layer with a swish (EfficientDet's separable conv block, BiFPN, head and the
    EfficientNet backbone) in training: the compiled route serves its large maps, and
    its outputs and gradients (variables and inputs) equal those with Keras' silu to
    float32 rounding."""
    if backend() != "tensorflow":
        pytest.skip("the compiled route is TensorFlow's (JAX runs Keras' silu)")
    import tensorflow as tf

    make, inputs = _swish_layers()[case]
    keras.utils.set_random_seed(0)
    layer = make()
    layer(*inputs)
    for sublayer in layer._flatten_layers():
        if isinstance(sublayer, keras.layers.Dropout):
            sublayer.rate = 0.0  # stochastic depth would draw other paths in each call
    flat_inputs = [tf.constant(x) for x in keras.tree.flatten(inputs)]
    upstream = [np.random.default_rng(i).normal(size=o.shape).astype("float32")
                for i, o in enumerate(keras.tree.flatten(layer(*inputs)))]
    served = []
    compiled = A._compiled_silu

    def counted():
        served.append(1)
        return compiled()
    monkeypatch.setattr(A, "_compiled_silu", counted)

    def run():
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(flat_inputs)
                outputs = keras.tree.flatten(layer(
                    *keras.tree.pack_sequence_as(inputs, flat_inputs), training=True))
                total = tf.add_n([tf.reduce_sum(u * o) for u, o in zip(upstream, outputs)])
            return outputs, tape.gradient(total, flat_inputs + layer.trainable_variables)
        outputs, gradients = step()
        return [np_(v) for v in outputs + gradients]

    with_route = run()
    assert served, "the route served no map"
    monkeypatch.setattr(A, "MIN_VALUES", 2 ** 62)
    served.clear()
    without = run()
    assert not served
    # gradients that vanish exactly (a bias before a training batch norm) are float32
    # rounding either way: measured against the median array's scale
    floor = np.median([np.abs(want).max() for want in without])
    for got, want in zip(with_route, without):
        np.testing.assert_allclose(got, want, rtol=1e-4,
                                   atol=1e-4 * max(np.abs(want).max(), floor))
