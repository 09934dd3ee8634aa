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
import functools

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


# the name scope of the route's ops (tests find the route in a graph by it)
SCOPE = "winograd"


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


def conv3x3_same(inputs, kernel_t, tile=2, slices=None):
    """A stride-1, ``SAME``-padded 3 x 3 convolution of ``[N, H, W, C]`` float32 inputs
    (static ``H``, ``W``, ``C``) by a kernel from :func:`transformed_kernel` (same
    ``tile``); ``slices`` (batch sizes summing to ``N``) runs the batch in those slices one
    after another (:func:`in_turn`)."""
    import tensorflow as tf

    def convolve(part):
        products = tf.matmul(_transformed_inputs(part, tile), kernel_t)
        return _output_blocks(products, inputs.shape[1], inputs.shape[2], tile)

    with tf.name_scope(SCOPE):
        return tf.concat(in_turn(convolve, _split(inputs, slices)), axis=0)


def _split(batch, slices):
    """``batch`` in ``slices`` along its first axis (one part where ``slices`` is None or
    a single size)."""
    import tensorflow as tf

    return [batch] if slices is None or len(slices) < 2 else tf.split(batch, slices)


def in_turn(step, parts):
    """``[step(part) for part in parts]``, one after another: each part (a tensor or a
    tuple of them) reaches ``step`` through identities that wait for the previous step's
    result (all of it, where that is a list), so one part's intermediates are alive at a
    time."""
    import tensorflow as tf

    results = []
    for part in parts:
        if results:
            previous = results[-1]
            with tf.control_dependencies(previous if isinstance(previous, list)
                                         else [previous]):
                part = tf.nest.map_structure(tf.identity, part)
        results.append(step(part))
    return results


def _transformed_inputs(inputs, tile):
    """``B^T d B`` of every input tile: ``V [(tile + 2)^2, tiles, C]``."""
    import tensorflow as tf

    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    size = tile + 2
    layout = _layout(height, width, tile)
    padded = tf.pad(inputs, [[0, 0], [1, layout.padded[0] - 1 - height],
                             [1, layout.padded[1] - 1 - width], [0, 0]])
    pixels = tf.reshape(padded, [-1, channels])
    # each tap of each tile is one row (pixel) of the padded image: one gather writes them
    # in the products' layout, where transposes of shifted views copied the image 4x
    batch = tf.shape(inputs)[0]
    images = tf.range(batch)[None, :, None] * (layout.padded[0] * layout.padded[1])
    taps = tf.gather(pixels, layout.taps[:, None, :] + images)  # [size^2, N, T, C]
    b_t = tf.constant(_transform_2d(TRANSFORMS[tile][0]), dtype=inputs.dtype)
    transformed = tf.matmul(b_t, tf.reshape(taps, [size * size, -1]))
    return tf.reshape(transformed, [size * size, -1, channels])


def _output_blocks(products, height, width, tile):
    """``A^T M A`` of every tile's ``[(tile + 2)^2, tiles, C_out]`` products, placed as the
    ``tile x tile`` output block of its tile: ``[N, H, W, C_out]``."""
    import tensorflow as tf

    filters = products.shape[-1]
    layout = _layout(height, width, tile)
    a_t = tf.constant(_transform_2d(TRANSFORMS[tile][2]), dtype=products.dtype)
    blocks = tf.matmul(a_t, tf.reshape(products, [(tile + 2) ** 2, -1]))
    rows = tf.reshape(blocks, [-1, filters])  # (block pixel, image, tile) row-major
    tiles = tf.shape(products)[1]
    per_image = layout.tiles_h * layout.tiles_w
    images = tf.range(tiles // per_image)[:, None] * per_image
    index = layout.block_pixel[None, :] * tiles + images + layout.block_tile[None, :]
    return tf.reshape(tf.gather(rows, index), [-1, height, width, filters])


def _input_taps_transposed(tap_gradient, height, width, channels, tile):
    """The adjoint of the taps' gather in :func:`_transformed_inputs`: ``[(tile + 2)^2,
    tiles * C]`` -> ``[N, H, W, C]``, each pixel summing the (at most 4) taps that read it."""
    import tensorflow as tf

    layout = _layout(height, width, tile)
    tiles = tf.shape(tap_gradient)[1] // channels
    per_image = layout.tiles_h * layout.tiles_w
    images = tf.range(tiles // per_image)[None, :, None] * per_image
    index = layout.reader_tap[:, None, :] * tiles + images + layout.reader_tile[:, None, :]
    gathered = _gather_or_zero(tf.reshape(tap_gradient, [-1, channels]), index,
                               layout.reader_tap[:, None, :] >= 0)  # [4, N, H * W, C]
    return tf.reshape(tf.reduce_sum(gathered, 0), [-1, height, width, channels])


def _output_blocks_transposed(output_gradient, tile):
    """The adjoint of :func:`_output_blocks`: ``[N, H, W, C_out]`` ->
    ``[(tile + 2)^2, tiles, C_out]``."""
    import tensorflow as tf

    height, width, filters = output_gradient.shape[1:]
    layout = _layout(height, width, tile)
    batch = tf.shape(output_gradient)[0]
    images = tf.range(batch)[None, :, None] * (height * width)
    blocks = _gather_or_zero(tf.reshape(output_gradient, [-1, filters]),
                             layout.pixel_of_block[:, None, :] + images,
                             layout.pixel_of_block[:, None, :] >= 0)  # cropped: zeros
    blocks = tf.reshape(blocks, [tile * tile, -1])  # [tile^2, N T C_out]
    a_t = tf.constant(_transform_2d(TRANSFORMS[tile][2]), dtype=blocks.dtype)
    products = tf.matmul(a_t, blocks, transpose_a=True)
    return tf.reshape(products, [(tile + 2) ** 2, -1, filters])


def _gather_or_zero(rows, index, valid):
    """``rows[index]`` where ``valid``, a zero row elsewhere."""
    import tensorflow as tf

    rows = tf.concat([rows, tf.zeros_like(rows[:1])], 0)
    return tf.gather(rows, tf.where(valid, index, tf.shape(rows)[0] - 1))


class _Layout:
    """Static row indices of one image's tiles (numpy int32), for the gathers above.

    ``taps [(tile + 2)^2, T]``: the padded-image pixel of tap ``k`` of tile ``t``;
    ``block_pixel``, ``block_tile [H * W]``: the output block pixel and tile of each
    output pixel; ``pixel_of_block [tile^2, T]``: the output pixel of each block pixel, -1
    where cropped; ``reader_tap``, ``reader_tile [4, H * W]``: the taps reading each input
    pixel, -1 where fewer than 4 do (a tile of ``tile + 2`` at stride ``tile`` overlaps
    its neighbours by 2 pixels, so a pixel lies in at most 2 x 2 tiles).
    """

    def __init__(self, height, width, tile):
        size = tile + 2
        self.tiles_h, self.tiles_w = _tiles(height, tile), _tiles(width, tile)
        self.padded = (tile * self.tiles_h + 2, tile * self.tiles_w + 2)
        ty, tx, i, j = np.meshgrid(np.arange(self.tiles_h), np.arange(self.tiles_w),
                                   np.arange(size), np.arange(size), indexing="ij")
        pixel = (tile * ty + i) * self.padded[1] + tile * tx + j  # [th, tw, size, size]
        self.taps = pixel.transpose(2, 3, 0, 1).reshape(size * size, -1).astype(np.int32)
        y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        self.block_pixel = ((y % tile) * tile + x % tile).reshape(-1).astype(np.int32)
        self.block_tile = ((y // tile) * self.tiles_w + x // tile).reshape(-1).astype(np.int32)
        by, bx, r, c = np.meshgrid(np.arange(self.tiles_h), np.arange(self.tiles_w),
                                   np.arange(tile), np.arange(tile), indexing="ij")
        out_y, out_x = tile * by + r, tile * bx + c
        of_block = np.where((out_y < height) & (out_x < width), out_y * width + out_x, -1)
        self.pixel_of_block = of_block.transpose(2, 3, 0, 1).reshape(tile * tile, -1)
        self.pixel_of_block = self.pixel_of_block.astype(np.int32)
        # the taps reading interior pixel (y, x): along each axis, padded position p = y + 1
        # lies in tile p // tile at offset p % tile, and in the tile before it at offset
        # p % tile + tile when that is within the tile's size
        (tile_y, offset_y, valid_y), (tile_x, offset_x, valid_x) = (
            _axis_readers(height, self.tiles_h, tile), _axis_readers(width, self.tiles_w, tile))
        tap = offset_y[:, None, :, None] * size + offset_x[None, :, None, :]
        tile_index = tile_y[:, None, :, None] * self.tiles_w + tile_x[None, :, None, :]
        valid = valid_y[:, None, :, None] & valid_x[None, :, None, :]  # [2, 2, H, W]
        self.reader_tap = np.where(valid, tap, -1).reshape(4, -1).astype(np.int32)
        self.reader_tile = np.where(valid, tile_index, 0).reshape(4, -1).astype(np.int32)


def _axis_readers(length, tiles, tile):
    """Along one axis, ``(tile index, offset in the tile, valid) [2, length]`` of the two
    tiles that may read each interior position."""
    position = np.arange(length) + 1  # in the padded image
    first = position // tile
    tile_index = np.stack([first, first - 1])
    offset = np.stack([position % tile, position % tile + tile])
    valid = (tile_index >= 0) & (tile_index < tiles) & (offset < tile + 2)
    return tile_index, offset, valid


@functools.lru_cache(maxsize=64)
def _layout(height, width, tile):
    return _Layout(height, width, tile)


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


def conv3x3_same_trainable(inputs, kernel, tile=2, slices=None):
    """:func:`conv3x3_same` from the ``[3, 3, C, C_out]`` kernel, differentiable in both
    by the transposed transforms and two more products per tile position (``dV = dM U^T``,
    ``dU = V^T dM``), each again 2.25x (``tile`` 2) or 4x (4) fewer multiplications than
    a direct convolution's input and kernel gradients; the gathers' adjoints are gathers
    too. (TensorFlow's own gradient of the forward ops gets there through scatters that
    cost what the products save.) The backward pass recomputes ``V`` from the inputs
    rather than keeping it: it is 4x the inputs' size for ``tile`` 2, 2.25x for 4
    (0.09-0.16 GB for an FPN's P2 at 800 px), and recomputing costs one input
    transform. ``slices`` runs the batch in those slices one after another in both passes,
    so one slice's ``V`` and product gradients are alive at a time."""
    import tensorflow as tf

    height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
    size = tile + 2
    b_t = tf.constant(_transform_2d(TRANSFORMS[tile][0]), dtype=inputs.dtype)

    @tf.custom_gradient
    def conv(x, k):
        kernel_t = transformed_kernel(k, tile)

        def backward(part_and_upstream):
            part, upstream = part_and_upstream
            d_products = _output_blocks_transposed(upstream, tile)
            d_transformed = tf.matmul(d_products, kernel_t, transpose_b=True)
            # recompute V only once this layer's (slice's) gradient arrives: without the
            # dependency the executor may recompute every layer's V at the start of the
            # backward pass and hold them all (measured +1.9 GB at Mask R-CNN batch 2)
            with tf.control_dependencies([d_products]):
                transformed = _transformed_inputs(part, tile)
            d_kernel_t = tf.matmul(transformed, d_products, transpose_a=True)
            d_taps = tf.matmul(b_t, tf.reshape(d_transformed, [size * size, -1]),
                               transpose_a=True)
            return [_input_taps_transposed(d_taps, height, width, channels, tile),
                    d_kernel_t]

        def gradient(upstream):
            grads = in_turn(backward, list(zip(_split(x, slices), _split(upstream, slices))))
            d_kernel_t = tf.add_n([g[1] for g in grads])
            return (tf.concat([g[0] for g in grads], axis=0),
                    _kernel_gradient(d_kernel_t, tile))

        return conv3x3_same(x, kernel_t, tile, slices), gradient

    with tf.name_scope(SCOPE):
        return conv(inputs, tf.identity(kernel))
