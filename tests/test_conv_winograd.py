"""Winograd F(2 x 2, 3 x 3) and F(4 x 4, 3 x 3) convolutions (``kdet.ops.winograd``) and the
``Conv2D`` layer that routes TensorFlow inference and training through them
(``kdet.layers.conv``).

Reference: the convolution written out in float64 numpy (sum over the 3 x 3 taps of the
zero-padded input times the kernel); the direct ``tf.nn.conv2d`` and ``keras.layers.Conv2D``
for the layer's contract.
"""
import functools

import numpy as np
import pytest

from conftest import backend

import keras  # noqa: E402  (after torch, see conftest)

from kdet.layers import conv as conv_module  # noqa: E402
from kdet.layers.conv import Conv2D, direct_convolutions  # noqa: E402

pytestmark = pytest.mark.skipif(backend() != "tensorflow",
                                reason="the Winograd route is TensorFlow's (JAX keeps the "
                                       "direct convolution, covered by the doctest)")


def conv3x3_reference(x, kernel):
    """SAME, stride 1, in float64: out[n, y, x, o] = sum_ijc xpad[n, y+i, x+j, c] k[i, j, c, o]."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _ = x.shape
    padded = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i:i + h, j:j + w] @ kernel[i, j]
    return out


# float32 error against the float64 convolution, relative to the output's largest value:
# F(2 x 2, 3 x 3) is within a few times the direct convolution's; F(4 x 4, 3 x 3), whose
# transforms hold 4, 5 and 8, measured 5-17x the direct op's and at most 1.0e-5 (256 -> 819
# channels). A wrong transform entry or pad errs by 1e-2 and more.
RELATIVE_TOLERANCE = {2: 3e-6, 4: 2e-5}
TILES = pytest.mark.parametrize("tile", [2, 4])


def _op_types(fn, *specs):
    return [op.type for op in fn.get_concrete_function(*specs).graph.get_operations()]


def _on_route(fn, *specs):
    """Whether ``fn``'s graph holds the Winograd route's ops (its name scope)."""
    from kdet.ops.winograd import SCOPE
    return any(SCOPE + "/" in op.name
               for op in fn.get_concrete_function(*specs).graph.get_operations())


def _pair(filters, shape, rng, activation="relu", use_bias=True):
    """kdet's Conv2D and keras' built for ``shape``, with the same random weights."""
    layer = Conv2D(filters, 3, padding="same", activation=activation, use_bias=use_bias)
    plain = keras.layers.Conv2D(filters, 3, padding="same", activation=activation,
                                use_bias=use_bias)
    layer.build(shape)
    plain.build(shape)
    weights = [rng.normal(0, 0.05, w.shape).astype("float32") for w in plain.weights]
    layer.set_weights(weights)
    plain.set_weights(weights)
    return layer, plain


@pytest.mark.parametrize("shape,filters", [
    ((1, 16, 16, 8), 5),      # even sizes, batch 1
    ((3, 15, 17, 6), 4),      # odd height and width: the last tile row / column is cropped
    ((2, 1, 1, 3), 2),        # one pixel: a single tile, three sides padding
    ((1, 2, 5, 4), 3),        # thinner than a tile
    ((1, 6, 10, 3), 2),       # F(4 x 4, 3 x 3)'s tile: the second block of its taps cropped
])
@TILES
def test_winograd_conv_equals_the_written_out_convolution(shape, filters, tile):
    import tensorflow as tf

    from kdet.ops.winograd import conv3x3_same, transformed_kernel
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(0, 2, shape).astype("float32")
    kernel = rng.normal(0, 0.5, (3, 3, shape[-1], filters)).astype("float32")
    expected = conv3x3_reference(x, kernel)
    got = conv3x3_same(tf.constant(x), transformed_kernel(tf.constant(kernel), tile),
                       tile).numpy()
    direct = tf.nn.conv2d(x, kernel, 1, "SAME").numpy()
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    if tile == 2:  # float32 rounding of the direct convolution's size (a few ulps)
        assert np.abs(got - expected).max() <= max(4 * np.abs(direct - expected).max(),
                                                   1e-6 * scale)
    np.testing.assert_allclose(got, expected, rtol=0, atol=RELATIVE_TOLERANCE[tile] * scale)


@TILES
def test_winograd_conv_at_width_stays_near_float32_rounding(tile):
    """256 channels in, 819 out (RetinaNet's class logits): the error against float64 stays
    within a few float32 roundings of the largest output's sum of |terms| (``eps * S``):
    3 for F(2 x 2, 3 x 3), 32 for F(4 x 4, 3 x 3), whose transforms amplify rounding.

    Measured 0.68 and 11.7 on an AVX2 VM, where the direct convolution's own error is
    0.29 (oneDNN's AVX2 kernels); an earlier bound of 16 times the direct convolution's
    error held on AVX-512 VMs and failed there, so the scale is the CPU-independent one.
    """
    import tensorflow as tf

    from kdet.ops.winograd import conv3x3_same, transformed_kernel
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (1, 9, 10, 256)).astype("float32")
    kernel = rng.normal(0, 0.03, (3, 3, 256, 819)).astype("float32")
    expected = conv3x3_reference(x, kernel)
    got = conv3x3_same(tf.constant(x), transformed_kernel(tf.constant(kernel), tile),
                       tile).numpy()
    rounding = np.finfo(np.float32).eps * conv3x3_reference(np.abs(x), np.abs(kernel)).max()
    winograd_error = np.abs(got - expected).max()
    assert winograd_error <= {2: 3, 4: 32}[tile] * rounding, winograd_error / rounding
    assert winograd_error <= RELATIVE_TOLERANCE[tile] * np.abs(expected).max()


@pytest.mark.parametrize("shape,filters", [
    ((2, 7, 9, 5), 3), ((1, 1, 1, 4), 2), ((3, 6, 6, 8), 8), ((1, 12, 10, 64), 96)])
@TILES
def test_winograd_conv_gradients_equal_the_float64_ones(shape, filters, tile):
    """The hand-written gradient (transposed transforms, ``dV = dM U^T``, ``dU = V^T dM``)
    against TensorFlow's float64 convolution gradients, odd sizes and batch 1 included."""
    import tensorflow as tf

    from kdet.ops.winograd import conv3x3_same_trainable
    rng = np.random.default_rng(sum(shape) + filters)
    x = rng.normal(0, 1, shape)
    kernel = rng.normal(0, 0.3, (3, 3, shape[-1], filters))
    weights = rng.normal(0, 1, shape[:3] + (filters,))

    def gradients(conv, dtype):
        xs, ks = tf.constant(x, dtype), tf.constant(kernel, dtype)
        with tf.GradientTape() as tape:
            tape.watch([xs, ks])
            loss = tf.reduce_sum(conv(xs, ks) * tf.constant(weights, dtype))
        return [g.numpy() for g in tape.gradient(loss, [xs, ks])]

    expected = gradients(lambda a, b: tf.nn.conv2d(a, b, 1, "SAME"), tf.float64)
    got = gradients(functools.partial(conv3x3_same_trainable, tile=tile), tf.float32)
    direct = gradients(lambda a, b: tf.nn.conv2d(a, b, 1, "SAME"), tf.float32)
    for g, d, e in zip(got, direct, expected):
        scale = np.abs(e).max()
        if tile == 2:
            assert np.abs(g - e).max() <= max(4 * np.abs(d - e).max(), 1e-6 * scale)
        np.testing.assert_allclose(g, e, rtol=0, atol=RELATIVE_TOLERANCE[tile] * scale)


def _output_and_gradients(conv, t, upstream, training=True):
    """``[conv(t), d/dt, d/d variables]`` of the loss ``sum(conv(t) * upstream)``."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(t)
        out = conv(t, training=training)
        loss = tf.reduce_sum(out * upstream)
    return [out] + tape.gradient(loss, [t] + list(conv.trainable_variables))


def _assert_close(got, expected, tile):
    for g, e in zip(got, expected):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(g), e, rtol=0,
                                   atol=RELATIVE_TOLERANCE[tile] * np.abs(e).max())


def _product_tiles(fn, spec):
    """The tile positions (the batch of the products ``V[k] @ U[k]``) in ``fn``'s graph:
    16 for F(2 x 2, 3 x 3), 36 for F(4 x 4, 3 x 3)."""
    graph = fn.get_concrete_function(spec).graph
    return {op.outputs[0].shape[0] for op in graph.get_operations()
            if op.type == "BatchMatMulV2"}


@pytest.mark.parametrize("shape,tile", [((2, 14, 15, 256), 2), ((2, 28, 29, 256), 4),
                                        ((1, 52, 50, 128), 4)])
def test_conv2d_layer_training_route_gradients_equal_keras_conv2d(shape, tile):
    """In training the layer runs the hand-written gradient (no convolution op or its
    backprop in the graph); the variables' and input's gradients equal keras' Conv2D's,
    with an unknown batch size."""
    import tensorflow as tf

    rng = np.random.default_rng(4)
    layer, plain = _pair(24, shape, rng)
    x = tf.constant(rng.normal(0, 1, shape).astype("float32"))
    upstream = tf.constant(rng.normal(0, 1, shape[:3] + (24,)).astype("float32"))
    fn = tf.function(functools.partial(_output_and_gradients, layer, upstream=upstream))
    types = _op_types(fn, tf.TensorSpec((None,) + shape[1:]))
    assert not [t for t in types if t.startswith("Conv2D")], types
    assert _product_tiles(fn, tf.TensorSpec((None,) + shape[1:])) == {(tile + 2) ** 2}
    _assert_close(fn(x), _output_and_gradients(plain, x, upstream), tile)


@pytest.mark.parametrize("use_bias,activation,shape,tile", [
    (True, "relu", (2, 15, 14, 256), 2), (False, None, (2, 15, 14, 256), 2),
    (True, "relu", (1, 30, 28, 256), 4), (True, None, (1, 50, 52, 128), 4)])
def test_conv2d_layer_route_equals_keras_conv2d(use_bias, activation, shape, tile):
    """Inference on the route (no ``Conv2D`` op in the graph, the products of ``tile``)
    gives keras' ``Conv2D`` results, with an unknown batch size too."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    layer, plain = _pair(32, shape, rng, activation, use_bias)
    x = rng.normal(0, 1, shape).astype("float32")
    fn = tf.function(lambda t: layer(t, training=False))
    spec = tf.TensorSpec((None,) + shape[1:])
    types = _op_types(fn, spec)
    assert "Conv2D" not in types and _product_tiles(fn, spec) == {(tile + 2) ** 2}
    expected = plain(x).numpy()
    tolerance = RELATIVE_TOLERANCE[tile] * np.abs(expected).max()
    np.testing.assert_allclose(fn(x).numpy(), expected, rtol=0, atol=tolerance)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=0,  # eager, outside a trace
                               atol=tolerance)


@pytest.mark.parametrize("shape,tile", [
    ((1, 200, 200, 256), 4), ((1, 28, 28, 256), 4), ((1, 25, 25, 512), 4),
    ((1, 24, 24, 256), 2), ((1, 13, 13, 256), 2), ((1, 12, 12, 256), 0),
    # the tiles of a static batch count: 100 mask-head RoIs of 14 x 14 take F(4 x 4, 3 x 3)
    ((100, 14, 14, 256), 4), ((1, 14, 14, 256), 2), ((None, 14, 14, 256), 2),
    ((5, 10, 10, 256), 2), ((4, 6, 6, 256), 0),
    ((1, 100, 100, 128), 4), ((1, 49, 52, 128), 4), ((1, 48, 52, 128), 0),
    ((1, 200, 200, 64), 0), ((None, 80, 80, 256), 4),
    # a batch over the 256 MB cap runs in slices (below): 48 x 169 tiles x 36 x 256 x 4 B
    ((48, 50, 50, 256), 4),
    # one image over it: 10,000 tiles x 36 positions x 256 channels x 4 B = 369 MB
    ((1, 400, 400, 256), 0), ((1, 400, 400, 128), 4)])
def test_winograd_tile_rule(shape, tile):
    """The tile each map takes by ``TILE_RULES`` (the measured break-even points)."""
    assert conv_module.winograd_tile(shape) == tile


@pytest.mark.parametrize("shape,tile,cap,sizes", [
    ((8, 200, 200, 256), 4, 256 * 2 ** 20, [2, 2, 2, 2]),  # 92.2 MB an image
    ((800, 14, 14, 256), 2, 256 * 2 ** 20, [267, 267, 266]),  # 0.80 MB a RoI: 334 a slice
    ((8, 100, 100, 256), 4, 256 * 2 ** 20, [8]),  # 184 MB: one slice
    ((None, 200, 200, 256), 4, 256 * 2 ** 20, [None]),  # unknown when traced
    ((7, 4, 4, 8), 2, 5000, [2, 2, 2, 1]),  # 4 tiles x 16 x 8 x 4 B = 2048 B an image
    ((9, 4, 4, 8), 2, 6144, [3, 3, 3]),  # exactly 3 images a slice
    ((3, 4, 4, 8), 2, 6143, [2, 1]),  # a byte short of 3
])
def test_batch_slices_hold_the_cap(shape, tile, cap, sizes, monkeypatch):
    """Slices as even as they come, each within the cap, summing to the batch."""
    monkeypatch.setattr(conv_module, "MAX_TRANSFORMED_BYTES", cap)
    got = conv_module.batch_slices(shape, tile)
    assert got == sizes
    if shape[0] is not None:
        per_image = -(-shape[1] // tile) * -(-shape[2] // tile) * shape[3] * 4 * (tile + 2) ** 2
        assert sum(got) == shape[0] and max(got) - min(got) <= 1
        assert max(got) == 1 or max(got) * per_image <= cap


@pytest.mark.parametrize("training", [False, True])
def test_conv2d_layer_runs_a_batch_over_the_cap_in_slices(training, monkeypatch):
    """Over the cap, the batch runs in slices (one product group each, each after the
    previous one's output), in inference and in training, where the backward pass runs
    the slices in turn too; the outputs and gradients equal keras' Conv2D's."""
    import tensorflow as tf

    shape = (5, 20, 20, 256)  # F(4 x 4, 3 x 3): 25 tiles x 36 x 256 x 4 B = 0.92 MB an image
    monkeypatch.setattr(conv_module, "MAX_TRANSFORMED_BYTES", 2 * 921600)  # 2 images a slice
    rng = np.random.default_rng(7)
    layer, plain = _pair(16, shape, rng)
    x = tf.constant(rng.normal(0, 1, shape).astype("float32"))
    upstream = tf.constant(rng.normal(0, 1, shape[:3] + (16,)).astype("float32"))
    forward = tf.function(lambda t: layer(t, training=training))
    operations = forward.get_concrete_function(tf.TensorSpec(shape)).graph.get_operations()
    products = [op for op in operations if op.type == "BatchMatMulV2"]
    assert "Conv2D" not in [op.type for op in operations]
    assert sorted(op.outputs[0].shape[1] for op in products) == [25, 50, 50]  # tiles
    # slices 2 and 3 start from the previous slice's output
    assert _ordered_slices(operations) == 2
    fn = tf.function(functools.partial(_output_and_gradients, layer, upstream=upstream,
                                       training=training))
    graph = fn.get_concrete_function(tf.TensorSpec(shape)).graph
    assert not [op for op in graph.get_operations() if op.type.startswith("Conv2D")]
    # the backward slices too: slices 2 and 3 of the input (V recomputed) and of the
    # upstream gradient wait for the previous slice's gradients
    assert _ordered_slices(graph.get_operations()) == 2 + 4 * training
    if training:  # V's gradient products dM U^T, one per slice: [36, tiles, C]
        assert sorted(op.outputs[0].shape[1] for op in graph.get_operations()
                      if op.type == "BatchMatMulV2" and op.outputs[0].shape[-1] == 256
                      ) == [25, 50, 50]
    _assert_close(fn(x), _output_and_gradients(plain, x, upstream, training), 4)


def _ordered_slices(operations):
    """Batch slices that start only after a control dependency (the previous slice)."""
    return sum(1 for op in operations if op.type == "Identity" and op.control_inputs
               and op.inputs[0].op.type == "SplitV")


@pytest.mark.parametrize("case", ["few_channels", "small_map", "too_large", "float16",
                                  "strided", "valid", "dilated", "5x5", "xla", "export"])
def test_conv2d_layer_keeps_the_direct_convolution(case, monkeypatch):
    """Where the route does not pay or does not belong, the graph holds the plain op."""
    import tensorflow as tf

    kwargs = dict(padding="same")
    shape, jit, dtype = (1, 20, 20, 256), False, "float32"
    if case == "few_channels":
        shape = (1, 20, 20, 128)
    elif case == "small_map":
        shape = (1, 12, 12, 256)  # 6 x 6 = 36 tiles of 2 x 2, under 49
    elif case == "too_large":
        # V of one image, 25 tiles x 36 x 256 floats: 0.92 MB, over a cap lowered to 0.5 MB
        shape = (3, 20, 20, 256)
        monkeypatch.setattr(conv_module, "MAX_TRANSFORMED_BYTES", 2 ** 19)
    elif case == "float16":
        dtype = "float16"
    elif case == "strided":
        kwargs["strides"] = 2
    elif case == "valid":
        kwargs["padding"] = "valid"
    elif case == "dilated":
        kwargs["dilation_rate"] = 2
    elif case == "xla":
        jit = True
    size = 5 if case == "5x5" else 3
    layer = Conv2D(8, size, dtype=dtype, **kwargs)
    layer.build(shape)

    def call(t, training):
        if case == "export":
            with direct_convolutions():
                return layer(t, training=training)
        return layer(t, training=training)

    for training in (False, True):
        fn = tf.function(functools.partial(call, training=training), jit_compile=jit)
        types = _op_types(fn, tf.TensorSpec(shape, dtype))
        assert "BatchMatMulV2" not in types and not _on_route(fn, tf.TensorSpec(shape, dtype))
    assert conv_module.WINOGRAD  # the context manager restores the switch


def test_conv2d_layer_transforms_a_shared_kernel_once_per_graph():
    """A head applied to several pyramid levels in one trace transforms its kernel once."""
    import tensorflow as tf

    layer = Conv2D(16, 3, padding="same")
    layer.build((None, None, None, 256))

    def two_levels(a, b):
        return layer(a), layer(b)

    def matmuls(fn):
        types = _op_types(tf.function(fn), tf.TensorSpec((1, 20, 20, 256)),
                          tf.TensorSpec((1, 14, 16, 256)))
        return types.count("MatMul")

    # each call: 2 transform products (B, A); the kernel: 2 more (G on both sides)
    assert matmuls(two_levels) == 2 * 2 + 2
    assert matmuls(lambda a, b: layer(a)) == 2 + 2


def test_retinanet_predict_with_and_without_winograd(monkeypatch):
    """A whole RetinaNet (ResNet-50 layer3/4, FPN, heads on the route at 224 px: P3 28 x 28)
    predicts the same detections with the switch on and off."""
    import kdet
    from kdet.export.compare import match_detections
    keras.utils.set_random_seed(3)
    model = kdet.models.RetinaNet(num_classes=5, image_size=224, score_threshold=0.0)
    images = np.random.default_rng(3).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    outputs = {}
    for flag in (True, False):
        monkeypatch.setattr(conv_module, "WINOGRAD", flag)
        model.predict_function = None
        outputs[flag] = {k: np.asarray(v) for k, v in model.predict_on_batch(images).items()}
    assert outputs[False]["num_detections"].min() > 0
    fraction, score_diff, iou, unmatched = match_detections(
        outputs[False], outputs[True], iou_min=0.999, score_tol=1e-4, nms_iou=0.5)
    assert fraction == 1.0 and score_diff <= 1e-4 and iou >= 0.999, unmatched


def test_export_serving_graphs_hold_plain_convolutions():
    """The dense and the two-stage exports trace the direct convolutions: no Winograd
    op in the serving graph, while the Keras predict graph of the same model has them."""
    import tensorflow as tf

    import kdet
    from kdet.export import core, postprocess, two_stage
    keras.utils.set_random_seed(0)
    dense = kdet.models.RetinaNet(num_classes=3, image_size=128)
    two = kdet.models.FasterRCNN(num_classes=3, image_size=128)
    serving = [core.serving_function(dense, postprocess.settings_from_model(dense)),
               two_stage.serving_function(two)]
    for fn, signature in serving:
        types = _op_types(tf.function(fn), *signature)
        assert not _on_route(tf.function(fn), *signature) and "Conv2D" in " ".join(types)
    predict = tf.function(lambda x: dense(x, training=False))
    assert _on_route(predict, tf.TensorSpec((1, 128, 128, 3)))


def test_conv2d_layer_traces_a_static_batch_of_unknown_size_maps():
    """A static batch with unknown height and width keeps the direct convolution, in
    training and inference (the slice sizes are not asked for)."""
    import tensorflow as tf

    layer = Conv2D(8, 3, padding="same")
    layer.build((None, None, None, 256))
    for training in (False, True):
        fn = tf.function(functools.partial(layer, training=training))
        spec = tf.TensorSpec((2, None, None, 256))
        assert "Conv2D" in _op_types(fn, spec) and not _on_route(fn, spec)
