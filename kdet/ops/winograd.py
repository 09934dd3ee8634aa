"""3 x 3 convolution by Winograd's minimal filtering F(m x m, 3 x 3), m = 2 or 4 (TensorFlow).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): each
m x m block of outputs is computed from the (m + 2) x (m + 2) input tile ``d`` around it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

with the element-wise product taken per (input, output) channel pair and summed over the
input channels. Over all tiles that sum is (m + 2)^2 independent matrix products
``V[k] @ U[k]`` (``[tiles, C] @ [C, C_out]``): F(2 x 2, 3 x 3) does 16 multiplications for
4 outputs where a direct convolution does 36 (2.25x fewer); F(4 x 4, 3 x 3) 36 for 16
where it does 144 (4x fewer). The transforms (``B``, ``A``) are small sums of pixels,
cheap beside the products when the channels are many.

Used where it is faster than TensorFlow's oneDNN direct convolution on CPU (the rules and
the measurements are in ``kdet.layers.conv``). The result equals the direct convolution up
to float32 rounding: relative 2e-6 for 256 channels with m = 2, the most accurate of the
family; 1e-5 with m = 4, whose transforms hold larger constants (measured,
``tests/test_conv_winograd.py``).
"""
import numpy as np

# Per output tile m (F(m x m, 3 x 3), input tiles of m + 2): the input transform B^T, the
# filter transform G and the output transform A^T (Lavin & Gray; F(4 x 4, 3 x 3) on the
# points 0, +-1, +-2 and infinity)
TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])),
}


def _transform_2d(matrix):
    """Both dimensions of a tile at once, on tiles flattened row-major:
    ``(M (x) M) vec(d)`` (float32)."""
    return np.kron(matrix, matrix).astype(np.float32)


def _tiles(size, tile):
    return -(-size // tile)


def transformed_kernel(kernel, tile=2):
    """``G g G^T`` of a ``[3, 3, C, C_out]`` kernel, as ``[(tile + 2)^2, C, C_out]`` (the
    input tile's positions row-major)."""
    import tensorflow as tf

    channels, filters = kernel.shape[2], kernel.shape[3]
    size = tile + 2
    g = tf.constant(TRANSFORMS[tile][1], dtype=kernel.dtype)
    rows = tf.matmul(g, tf.reshape(kernel, [3, -1]))  # [size (a), 3 (j) * C * C_out]
    rows = tf.reshape(tf.transpose(tf.reshape(rows, [size, 3, -1]), [1, 0, 2]), [3, -1])
    both = tf.matmul(g, rows)  # [size (b), size (a) * C * C_out]
    both = tf.transpose(tf.reshape(both, [size, size, -1]), [1, 0, 2])  # (a, b, C * C_out)
    return tf.reshape(both, [size * size, channels, filters])


def conv3x3_same(inputs, kernel_t, tile=2):
    """A stride-1, ``SAME``-padded 3 x 3 convolution of ``[N, H, W, C]`` float32 inputs
    (static ``H``, ``W``, ``C``) by a kernel from :func:`transformed_kernel` (same
    ``tile``)."""
    import tensorflow as tf

    products = tf.matmul(_transformed_inputs(inputs, tile), kernel_t)
    return _output_blocks(products, inputs.shape[1], inputs.shape[2], tile)


def _transformed_inputs(inputs, tile):
    """``B^T d B`` of every input tile: ``V [(tile + 2)^2, tiles, C]``."""
    import tensorflow as tf

    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    taps = _input_taps(inputs, _tiles(height, tile), _tiles(width, tile), tile)
    b_t = tf.constant(_transform_2d(TRANSFORMS[tile][0]), dtype=inputs.dtype)
    return tf.reshape(tf.matmul(b_t, taps), [(tile + 2) ** 2, -1, channels])


def _output_blocks(products, height, width, tile):
    """``A^T M A`` of every tile's ``[(tile + 2)^2, tiles, C_out]`` products, placed as the
    ``tile x tile`` output block of its tile: ``[N, H, W, C_out]``."""
    import tensorflow as tf

    tiles_h, tiles_w = _tiles(height, tile), _tiles(width, tile)
    filters = products.shape[-1]
    a_t = tf.constant(_transform_2d(TRANSFORMS[tile][2]), dtype=products.dtype)
    outputs = tf.matmul(a_t, tf.reshape(products, [(tile + 2) ** 2, -1]))
    outputs = tf.reshape(outputs, [tile, tile, -1, tiles_h, tiles_w, filters])
    outputs = tf.reshape(tf.transpose(outputs, [2, 3, 0, 4, 1, 5]),
                         [-1, tile * tiles_h, tile * tiles_w, filters])
    if (tile * tiles_h, tile * tiles_w) != (height, width):
        outputs = outputs[:, :height, :width]
    return outputs


def _input_taps(inputs, tiles_h, tiles_w, tile):
    """``[(tile + 2)^2, tiles * C]``: the input tile of every output block, row-major."""
    import tensorflow as tf

    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    # one pixel of SAME padding before, and after it enough that the blocks of
    # space_to_depth below number one more than the tiles
    padded = tf.pad(inputs, [[0, 0], [1, tile * (tiles_h + 1) - 1 - height],
                             [1, tile * (tiles_w + 1) - 1 - width], [0, 0]])
    # tile (y, x) row i = tile * a + i2 (a = 0, 1), column j = tile * b + j2, is block
    # (y + a, x + b), sub-pixel (i2, j2): four shifted views of space_to_depth hold every
    # tap; of the second block only the first two rows / columns are the tile's
    blocks = tf.nn.space_to_depth(padded, tile)  # [N, th + 1, tw + 1, (i2, j2, C)]
    shifted = tf.stack([blocks[:, a:a + tiles_h, b:b + tiles_w] for a in (0, 1)
                        for b in (0, 1)])  # [(a, b), N, th, tw, (i2, j2, C)]
    taps = tf.transpose(tf.reshape(shifted, [2, 2, -1, tile, tile, channels]),
                        [0, 3, 1, 4, 2, 5])  # (a, i2, b, j2, tiles, C)
    size = tile + 2
    taps = tf.reshape(taps, [2 * tile, 2 * tile, -1])
    if size < 2 * tile:
        taps = taps[:size, :size]
    return tf.reshape(taps, [size * size, -1])


def _input_taps_transposed(tap_gradient, batch, height, width, channels, tile):
    """The adjoint of :func:`_input_taps`: ``[(tile + 2)^2, tiles * C]`` -> ``[N, H, W, C]``,
    each pixel summing the taps that read it."""
    import tensorflow as tf

    tiles_h, tiles_w = _tiles(height, tile), _tiles(width, tile)
    size = tile + 2
    taps = tf.reshape(tap_gradient, [size, size, -1])
    if size < 2 * tile:
        taps = tf.pad(taps, [[0, 2 * tile - size], [0, 2 * tile - size], [0, 0]])
    taps = tf.reshape(taps, [2, tile, 2, tile, -1, channels])  # (a, i2, b, j2, tiles, C)
    shifted = tf.reshape(tf.transpose(taps, [0, 2, 4, 1, 3, 5]),
                         [4, batch, tiles_h, tiles_w, tile * tile * channels])
    blocks = (tf.pad(shifted[0], [[0, 0], [0, 1], [0, 1], [0, 0]])
              + tf.pad(shifted[1], [[0, 0], [0, 1], [1, 0], [0, 0]])
              + tf.pad(shifted[2], [[0, 0], [1, 0], [0, 1], [0, 0]])
              + tf.pad(shifted[3], [[0, 0], [1, 0], [1, 0], [0, 0]]))
    padded = tf.nn.depth_to_space(blocks, tile)
    return padded[:, 1:1 + height, 1:1 + width]


def _output_blocks_transposed(output_gradient, tiles_h, tiles_w, tile):
    """The adjoint of :func:`_output_blocks`: ``[N, H, W, C_out]`` ->
    ``[(tile + 2)^2, tiles, C_out]``."""
    import tensorflow as tf

    height, width, filters = output_gradient.shape[1:]
    if (tile * tiles_h, tile * tiles_w) != (height, width):
        output_gradient = tf.pad(output_gradient, [[0, 0], [0, tile * tiles_h - height],
                                                   [0, tile * tiles_w - width], [0, 0]])
    blocks = tf.reshape(output_gradient, [-1, tiles_h, tile, tiles_w, tile, filters])
    blocks = tf.reshape(tf.transpose(blocks, [2, 4, 0, 1, 3, 5]), [tile * tile, -1])
    a_t = tf.constant(_transform_2d(TRANSFORMS[tile][2]), dtype=blocks.dtype)
    products = tf.matmul(a_t, blocks, transpose_a=True)
    return tf.reshape(products, [(tile + 2) ** 2, -1, filters])


def _kernel_gradient(kernel_t_gradient, tile):
    """The adjoint of :func:`transformed_kernel`: ``[(tile + 2)^2, C, C_out]`` ->
    ``[3, 3, C, C_out]`` (``G^T dU G``)."""
    import tensorflow as tf

    channels, filters = kernel_t_gradient.shape[1], kernel_t_gradient.shape[2]
    size = tile + 2
    g = tf.constant(TRANSFORMS[tile][1], dtype=kernel_t_gradient.dtype)
    rows = tf.matmul(g, tf.reshape(kernel_t_gradient, [size, -1]), transpose_a=True)
    rows = tf.reshape(tf.transpose(tf.reshape(rows, [3, size, -1]), [1, 0, 2]), [size, -1])
    both = tf.matmul(g, rows, transpose_a=True)  # (j; i, C, C_out)
    both = tf.transpose(tf.reshape(both, [3, 3, -1]), [1, 0, 2])
    return tf.reshape(both, [3, 3, channels, filters])


def conv3x3_same_trainable(inputs, kernel, tile=2):
    """:func:`conv3x3_same` from the ``[3, 3, C, C_out]`` kernel, differentiable in both
    by the transposed transforms and two more products per tile position (``dV = dM U^T``,
    ``dU = V^T dM``), each again 2.25x (``tile`` 2) or 4x (4) fewer multiplications than
    a direct convolution's input and kernel gradients. (TensorFlow's own gradient of the
    forward ops gets there through strided-slice gradients that cost what the products
    save.) The backward pass
    recomputes ``V`` from the inputs rather than keeping it: it is 4x the inputs' size for
    ``tile`` 2, 2.25x for 4 (0.09-0.16 GB for an FPN's P2 at 800 px), and recomputing
    costs one input transform."""
    import tensorflow as tf

    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    tiles_h, tiles_w = _tiles(height, tile), _tiles(width, tile)
    size = tile + 2
    b_t = tf.constant(_transform_2d(TRANSFORMS[tile][0]), dtype=inputs.dtype)

    @tf.custom_gradient
    def conv(x, k):
        kernel_t = transformed_kernel(k, tile)
        products = tf.matmul(_transformed_inputs(x, tile), kernel_t)

        def gradient(upstream):
            d_products = _output_blocks_transposed(upstream, tiles_h, tiles_w, tile)
            d_transformed = tf.matmul(d_products, kernel_t, transpose_b=True)
            # recompute V only once this layer's gradient arrives: without the dependency
            # the executor may recompute every layer's V at the start of the backward
            # pass and hold them all (measured +1.9 GB at Mask R-CNN batch 2)
            with tf.control_dependencies([d_products]):
                transformed = _transformed_inputs(x, tile)
            d_kernel_t = tf.matmul(transformed, d_products, transpose_a=True)
            d_taps = tf.matmul(b_t, tf.reshape(d_transformed, [size * size, -1]), transpose_a=True)
            d_x = _input_taps_transposed(d_taps, tf.shape(x)[0], height, width, channels,
                                         tile)
            return d_x, _kernel_gradient(d_kernel_t, tile)

        return _output_blocks(products, height, width, tile), gradient

    return conv(inputs, tf.identity(kernel))
