"""3 x 3 convolution by Winograd's minimal filtering F(2 x 2, 3 x 3) (TensorFlow).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): each
2 x 2 block of outputs is computed from the 4 x 4 input tile ``d`` around it as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

with the element-wise product taken per (input, output) channel pair and summed over the
input channels. Over all tiles that sum is 16 independent matrix products
``V[k] @ U[k]`` (``[tiles, C] @ [C, C_out]``): 16 multiplications for 4 outputs where a
direct convolution does 36, 2.25x fewer. The transforms (``B``, ``A``) are additions and
subtractions of pixels, cheap beside the products when the channels are many.

Used where it is faster than TensorFlow's oneDNN direct convolution on CPU (see
``kdet.layers.conv``): 256 channels and more, maps of 14 x 14 pixels and more. The result
equals the direct convolution up to float32 rounding (relative 2e-6 for 256 channels,
measured; F(2 x 2, 3 x 3) is the most accurate of the Winograd family).
"""
import numpy as np

# input transform B^T, filter transform G, output transform A^T (Lavin & Gray, F(2 x 2, 3 x 3))
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
# both dimensions at once, on tiles flattened row-major: V = (B^T (x) B^T) vec(d)
_B_T_2D = np.kron(B_T, B_T)  # [16, 16]
_A_T_2D = np.kron(A_T, A_T)  # [4, 16]


def transformed_kernel(kernel):
    """``G g G^T`` of a ``[3, 3, C, C_out]`` kernel, as ``[16, C, C_out]`` (the tile's 4 x 4
    positions row-major)."""
    import tensorflow as tf

    channels, filters = kernel.shape[2], kernel.shape[3]
    g = tf.constant(G, dtype=kernel.dtype)
    rows = tf.matmul(g, tf.reshape(kernel, [3, -1]))  # [4 (a), 3 (j) * C * C_out]
    rows = tf.reshape(tf.transpose(tf.reshape(rows, [4, 3, -1]), [1, 0, 2]), [3, -1])
    both = tf.matmul(g, rows)  # [4 (b), 4 (a) * C * C_out]
    both = tf.transpose(tf.reshape(both, [4, 4, -1]), [1, 0, 2])  # (a, b, C * C_out)
    return tf.reshape(both, [16, channels, filters])


def conv3x3_same(inputs, kernel_16):
    """A stride-1, ``SAME``-padded 3 x 3 convolution of ``[N, H, W, C]`` float32 inputs
    (static ``H``, ``W``, ``C``) by a kernel from :func:`transformed_kernel`."""
    import tensorflow as tf

    products = tf.matmul(_transformed_inputs(inputs), kernel_16)
    return _output_blocks(products, inputs.shape[1], inputs.shape[2])


def _transformed_inputs(inputs):
    """``B^T d B`` of every 4 x 4 input tile: ``V [16, tiles, C]``."""
    import tensorflow as tf

    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    taps = _input_taps(inputs, -(-height // 2), -(-width // 2))
    transformed = tf.matmul(tf.constant(_B_T_2D, dtype=inputs.dtype), taps)
    return tf.reshape(transformed, [16, -1, channels])


def _output_blocks(products, height, width):
    """``A^T M A`` of every tile's ``[16, tiles, C_out]`` products, placed as the 2 x 2
    output block of its tile: ``[N, H, W, C_out]``."""
    import tensorflow as tf

    tiles_h, tiles_w = -(-height // 2), -(-width // 2)
    filters = products.shape[-1]
    outputs = tf.matmul(tf.constant(_A_T_2D, dtype=products.dtype),
                        tf.reshape(products, [16, -1]))  # [(r, s), tiles * C_out]
    outputs = tf.reshape(outputs, [2, 2, -1, tiles_h, tiles_w, filters])
    outputs = tf.reshape(tf.transpose(outputs, [2, 3, 0, 4, 1, 5]),
                         [-1, 2 * tiles_h, 2 * tiles_w, filters])
    if (2 * tiles_h, 2 * tiles_w) != (height, width):
        outputs = outputs[:, :height, :width]
    return outputs


def _input_taps(inputs, tiles_h, tiles_w):
    """``[16, tiles * C]``: the 4 x 4 input tile of every 2 x 2 output block, row-major."""
    import tensorflow as tf

    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    # one pixel of SAME padding on each side, and one more where H or W is odd, so the
    # 4 x 4 tiles at stride 2 cover every output
    padded = tf.pad(inputs, [[0, 0], [1, 2 * tiles_h + 1 - height],
                             [1, 2 * tiles_w + 1 - width], [0, 0]])
    # tile (y, x) row i = 2 a + i2, column j = 2 b + j2 is block (y + a, x + b), sub-pixel
    # (i2, j2) of the 2 x 2 blocks: four shifted views of space_to_depth hold all 16 taps
    blocks = tf.nn.space_to_depth(padded, 2)  # [N, th + 1, tw + 1, (i2, j2, C)]
    shifted = tf.stack([blocks[:, a:a + tiles_h, b:b + tiles_w] for a in (0, 1)
                        for b in (0, 1)])  # [(a, b), N, th, tw, (i2, j2, C)]
    taps = tf.transpose(tf.reshape(shifted, [2, 2, -1, 2, 2, channels]), [0, 3, 1, 4, 2, 5])
    return tf.reshape(taps, [16, -1])


def _input_taps_transposed(tap_gradient, batch, height, width, channels):
    """The adjoint of :func:`_input_taps`: ``[16, tiles * C]`` -> ``[N, H, W, C]``, each
    pixel summing the taps that read it."""
    import tensorflow as tf

    tiles_h, tiles_w = -(-height // 2), -(-width // 2)
    taps = tf.reshape(tap_gradient, [2, 2, 2, 2, -1, channels])  # (a, i2, b, j2, tiles, C)
    shifted = tf.reshape(tf.transpose(taps, [0, 2, 4, 1, 3, 5]),
                         [4, batch, tiles_h, tiles_w, 4 * channels])
    blocks = (tf.pad(shifted[0], [[0, 0], [0, 1], [0, 1], [0, 0]])
              + tf.pad(shifted[1], [[0, 0], [0, 1], [1, 0], [0, 0]])
              + tf.pad(shifted[2], [[0, 0], [1, 0], [0, 1], [0, 0]])
              + tf.pad(shifted[3], [[0, 0], [1, 0], [1, 0], [0, 0]]))
    padded = tf.nn.depth_to_space(blocks, 2)
    return padded[:, 1:1 + height, 1:1 + width]


def _output_blocks_transposed(output_gradient, tiles_h, tiles_w):
    """The adjoint of :func:`_output_blocks`: ``[N, H, W, C_out]`` -> ``[16, tiles, C_out]``."""
    import tensorflow as tf

    height, width, filters = output_gradient.shape[1:]
    if (2 * tiles_h, 2 * tiles_w) != (height, width):
        output_gradient = tf.pad(output_gradient, [[0, 0], [0, 2 * tiles_h - height],
                                                   [0, 2 * tiles_w - width], [0, 0]])
    blocks = tf.reshape(output_gradient, [-1, tiles_h, 2, tiles_w, 2, filters])
    blocks = tf.reshape(tf.transpose(blocks, [2, 4, 0, 1, 3, 5]), [4, -1])
    products = tf.matmul(tf.constant(_A_T_2D, dtype=blocks.dtype), blocks, transpose_a=True)
    return tf.reshape(products, [16, -1, filters])


def _kernel_gradient(kernel_16_gradient):
    """The adjoint of :func:`transformed_kernel`: ``[16, C, C_out]`` -> ``[3, 3, C, C_out]``
    (``G^T dU G``)."""
    import tensorflow as tf

    channels, filters = kernel_16_gradient.shape[1], kernel_16_gradient.shape[2]
    g = tf.constant(G, dtype=kernel_16_gradient.dtype)
    rows = tf.matmul(g, tf.reshape(kernel_16_gradient, [4, -1]), transpose_a=True)  # (i; b..)
    rows = tf.reshape(tf.transpose(tf.reshape(rows, [3, 4, -1]), [1, 0, 2]), [4, -1])
    both = tf.matmul(g, rows, transpose_a=True)  # (j; i, C, C_out)
    both = tf.transpose(tf.reshape(both, [3, 3, -1]), [1, 0, 2])
    return tf.reshape(both, [3, 3, channels, filters])


def conv3x3_same_trainable(inputs, kernel):
    """:func:`conv3x3_same` from the ``[3, 3, C, C_out]`` kernel, differentiable in both
    by the transposed transforms and two more products per tile position (``dV = dM U^T``,
    ``dU = V^T dM``), each again 2.25x fewer multiplications than a direct convolution's
    input and kernel gradients. (TensorFlow's own gradient of the forward ops gets there
    through strided-slice gradients that cost what the products save.) The backward pass
    recomputes ``V`` from the inputs rather than keeping it: it is 4x the inputs' size
    (0.16 GB for an FPN's P2 at 800 px), and recomputing costs one input transform."""
    import tensorflow as tf

    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    tiles_h, tiles_w = -(-height // 2), -(-width // 2)
    b_t = tf.constant(_B_T_2D, dtype=inputs.dtype)

    @tf.custom_gradient
    def conv(x, k):
        kernel_16 = transformed_kernel(k)
        products = tf.matmul(_transformed_inputs(x), kernel_16)

        def gradient(upstream):
            d_products = _output_blocks_transposed(upstream, tiles_h, tiles_w)
            d_transformed = tf.matmul(d_products, kernel_16, transpose_b=True)
            # recompute V only once this layer's gradient arrives: without the dependency
            # the executor may recompute every layer's V at the start of the backward
            # pass and hold them all (measured +1.9 GB at Mask R-CNN batch 2)
            with tf.control_dependencies([d_products]):
                transformed = _transformed_inputs(x)
            d_kernel_16 = tf.matmul(transformed, d_products, transpose_a=True)
            d_taps = tf.matmul(b_t, tf.reshape(d_transformed, [16, -1]), transpose_a=True)
            d_x = _input_taps_transposed(d_taps, tf.shape(x)[0], height, width, channels)
            return d_x, _kernel_gradient(d_kernel_16)

        return _output_blocks(products, height, width), gradient

    return conv(inputs, tf.identity(kernel))
