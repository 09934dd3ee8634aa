"""RoIAlign (Mask R-CNN), FPN level mapping and multi-level RoIAlign.

Exact torchvision semantics (``torchvision.ops.roi_align``, its CPU kernel
``roi_align_forward_kernel_impl``; ``poolers.LevelMapper`` and
``MultiScaleRoIAlign``), channels-last and with static shapes:

    features [B, H, W, C], rois [B, R, 4] xyxy input-image pixels
    -> [B, R, out_h, out_w, C]

For RoI ``(x1, y1, x2, y2)`` (one axis shown): ``start = y1 * scale - offset``
(``offset = 0.5`` if ``aligned``), ``size = (y2 - y1) * scale`` (at least 1
unless ``aligned``), ``bin = size / out``; the bin ``p`` is the mean of a grid
of ``g`` samples ``y = start + p * bin + (i + 0.5) * bin / g``, where
``g = sampling_ratio`` if it is positive, else ``ceil(size / out)`` for that
RoI (adaptive), and the mean divides by ``max(g_h * g_w, 1)``. A sample with
``y < -1`` or ``y > H`` (or x likewise) contributes 0; otherwise ``y`` is
clamped to ``[0, H - 1]`` and read bilinearly. All coordinate arithmetic is
float32 in torchvision's order, so the sample positions agree to the bit
(XLA may fuse a multiply-add into one FMA and move a sample by an ulp: ~5e-6
on unit-variance features in the tests; divisions are kept exact, see
``_exact_divide``, because ``ceil(size / out)`` is discontinuous).

Two evaluation strategies, both exact:

* **gather** (``sampling_ratio > 0``, the detection heads' setting): one gather
  of the 4 bilinear neighbours of every sample from the flattened features
  and a weighted sum; memory ``4 * g_h * g_w`` times the output. On the
  TensorFlow backend (not under XLA), a tap lattice larger than
  ``_LATTICE_CHUNK_ELEMENTS`` an image is gathered a chunk of RoIs at a time
  and its gradient scatter-added chunk by chunk (:func:`_chunked_weighted_gather`),
  with the same results to the bit: Mask R-CNN's training RoIs would otherwise
  hold ~0.8 GB an image per pooler, three times over.
* **separable** (adaptive ``sampling_ratio <= 0``): the per-RoI sample count
  is data dependent and unbounded (a RoI as large as the map on a 200 x 200
  map needs 29 x 29 samples per bin), so no static sample grid is exact.
  Bilinear sampling, the validity test and the clamping are all separable in
  y and x, hence the bin means are ``A_y @ F @ A_x^T / count`` with
  interpolation matrices ``A_y [out_h, H]``, ``A_x [out_w, W]`` per RoI. With
  ``g = ceil(bin)`` the samples are more than half a pixel apart, so at most a
  handful of samples touch any row: ``A`` is built from a fixed window of
  ``_SEPARABLE_CANDIDATES`` candidate samples per (bin, row), with no cap on
  ``g``. Cost ``O(R * out_h * H * W * C)`` matmul FLOPs. Where float32
  matmuls run in TF32 (TensorFlow's default on Ampere and newer GPUs; JAX's
  default matmul precision on GPU may too), this path inherits TF32
  precision; disable TF32 (or use ``max_sampling_ratio``) for float32
  agreement.

On the TensorFlow backend, a fixed ``sampling_ratio > 0`` on float32 features
takes a third, faster route, **crop-and-resize** (:func:`_crop_and_resize_path`):
the bin samples of a RoI form one evenly spaced ``out * g`` grid per axis, which
is exactly what ``tf.image.crop_and_resize`` samples bilinearly; every level is
edge-padded by one pixel (torchvision clamps samples in ``[-1, 0]`` and
``[H - 1, H]`` onto the border) and the ``g x g`` samples of a bin are averaged.
It reads the 4 neighbours of each sample in one fused kernel instead of
materialising the ``4 * g_h * g_w`` tap lattice (about half the CPU time for
1000 RoIs on P2-P5). Its gradient is the gather route's scatter-add
(TensorFlow's ``CropAndResizeGradImage`` races between CPU threads). The
forward's sample positions go through crop-and-resize's normalised box
arithmetic, so they may move by a few ulps (~1e-5 on unit-variance features,
as torchvision's own loop against another summation order). It is not taken
under XLA (``jit_compile``: no XLA kernel for ``CropAndResize``), nor where
:data:`CROP_AND_RESIZE` is False (the ONNX / LiteRT exports, which lack the op).

Pass ``max_sampling_ratio=k`` to evaluate the adaptive mode by gathering on a
static ``k x k`` grid instead (masked to each RoI's own grid): exact whenever
``ceil(size / out) <= k``; larger RoIs are sampled on a ``k``-wide grid (the
grid is clamped to ``k`` and the mean is over the clamped grid).

Gradients flow to ``features`` (gathers / matmuls) and, like torchvision, not
to ``rois``.

    >>> import numpy as np
    >>> features = np.arange(16, dtype="float32").reshape(1, 4, 4, 1)
    >>> rois = np.array([[[0.0, 0.0, 2.0, 2.0]]], "float32")
    >>> out = roi_align(features, rois, output_size=1, sampling_ratio=1)
    >>> float(np.asarray(out)[0, 0, 0, 0, 0])  # bilinear value at (1, 1)
    5.0
"""
import numbers

import numpy as np
from keras import ops

# Candidate samples tried per (bin, row) by the separable adaptive path. With
# g = ceil(bin) >= 2 the sample spacing bin/g exceeds 1/2 px, and only samples
# within 2 px of a row can touch it (bilinear support 1 px plus the clamping of
# [-1, 0] onto row 0 and [H-1, H] onto row H-1): at most 8 samples, plus a
# margin of 2 for the float rounding of the window start and 1 more for luck.
_SEPARABLE_CANDIDATES = 12

# Whether the TensorFlow backend may evaluate fixed-grid RoIAlign with
# ``tf.image.crop_and_resize`` (see the module docstring). The ONNX and LiteRT
# exports switch it off while tracing: neither runtime has ``CropAndResize``.
CROP_AND_RESIZE = True

# Whether the TensorFlow backend may gather a large tap lattice a chunk of RoIs
# at a time (:func:`_chunked_weighted_gather`). The exports switch it off while
# tracing, so their graphs hold the plain ops (no custom gradient to serialise).
CHUNKED_GATHER = True


def _output_pair(output_size, owner="roi_align"):
    if isinstance(output_size, numbers.Integral):
        output_size = (int(output_size), int(output_size))
    try:
        out_h, out_w = (int(v) for v in output_size)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: output_size must be an int or (height, width), "
                         f"got {output_size!r}") from None
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{owner}: output_size must be positive, got {output_size!r}")
    return out_h, out_w


def _check_inputs(features, rois, owner, check_batch=True):
    if len(features.shape) != 4:
        raise ValueError(f"{owner}: features must be [B, H, W, C] (channels last), "
                         f"got shape {tuple(features.shape)}")
    if len(rois.shape) != 3 or rois.shape[-1] != 4:
        raise ValueError(f"{owner}: rois must be [B, R, 4] xyxy boxes, "
                         f"got shape {tuple(rois.shape)}")
    fb, rb = features.shape[0], rois.shape[0]
    if check_batch and fb is not None and rb is not None and fb != rb:
        raise ValueError(f"{owner}: features batch {fb} != rois batch {rb}")


def _check_sampling(sampling_ratio, max_sampling_ratio, owner):
    if not isinstance(sampling_ratio, numbers.Integral):
        raise ValueError(f"{owner}: sampling_ratio must be an int, got {sampling_ratio!r}")
    if max_sampling_ratio is not None and (
            not isinstance(max_sampling_ratio, numbers.Integral) or max_sampling_ratio < 1):
        raise ValueError(f"{owner}: max_sampling_ratio must be None or a positive int, "
                         f"got {max_sampling_ratio!r}")


def _f32(value):
    return ops.convert_to_tensor(np.float32(value))


def _exact_divide(numerator, denominator):
    """``numerator / denominator`` correctly rounded, also under XLA.

    XLA (always on JAX, and TensorFlow with ``jit_compile``) and TensorFlow's
    graph optimizer turn a division by a constant or by a broadcast tensor into
    a multiplication by its reciprocal, which is one ulp off for most
    quotients: enough to turn ``ceil(14 / 7)`` into 3. Adding a zero that has
    the numerator's shape and is opaque to the compiler makes the divisor a
    full tensor, which they divide exactly (IEEE).
    """
    zero = ops.minimum(ops.cast(ops.isnan(numerator), numerator.dtype), 0.0)
    return numerator / (denominator + zero)


def _roi_geometry(rois, spatial_scale, aligned, out_h, out_w):
    """Start, size and bin size per RoI and axis, float32 as torchvision computes them.

    ``spatial_scale`` may be a Python float or a ``[B, R]`` tensor (per-RoI
    level scale). Returns dict of ``[B, R]`` tensors.
    """
    rois = ops.cast(ops.stop_gradient(rois), "float32")
    if not hasattr(spatial_scale, "shape"):
        spatial_scale = _f32(spatial_scale)
    offset = _f32(0.5 if aligned else 0.0)
    x1 = rois[..., 0] * spatial_scale - offset
    y1 = rois[..., 1] * spatial_scale - offset
    x2 = rois[..., 2] * spatial_scale - offset
    y2 = rois[..., 3] * spatial_scale - offset
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # torchvision forces malformed RoIs to 1 x 1
        roi_w = ops.maximum(roi_w, 1.0)
        roi_h = ops.maximum(roi_h, 1.0)
    return {"start_y": y1, "start_x": x1, "size_h": roi_h, "size_w": roi_w,
            "bin_h": _exact_divide(roi_h, _f32(out_h)),
            "bin_w": _exact_divide(roi_w, _f32(out_w))}


def _sample_coordinates(start, bin_size, grid, out_size, num_samples):
    """``start + p * bin + (i + 0.5) * bin / grid`` as ``[B, R, out, num_samples]``.

    ``grid`` is float ``[B, R]`` (must be >= 1 where used; callers mask the
    rest). The operation order is torchvision's, so values agree bitwise.
    """
    p = ops.cast(ops.arange(out_size), "float32")[:, None]
    i = ops.cast(ops.arange(num_samples), "float32")[None, :]
    start, bin_size, grid = (v[..., None, None] for v in (start, bin_size, grid))
    return (start + p * bin_size) + _exact_divide((i + 0.5) * bin_size, grid)


def _bilinear_axis(coord, size):
    """torchvision's ``bilinear_interpolate`` along one axis.

    Returns ``(valid, low, l)``: validity (``-1 <= coord <= size``; NaN is
    invalid), the low neighbour (float, integer valued, ``<= size - 1``) and the
    fractional weight ``l`` of the high neighbour ``low + 1`` (0 when clamped
    to the last row, where torchvision sets ``high = low``).
    """
    valid = ops.logical_and(coord >= -1.0, coord <= size)
    coord = ops.where(valid, ops.maximum(coord, 0.0), 0.0)
    low = ops.floor(coord)
    at_edge = low >= size - 1.0
    low = ops.where(at_edge, size - 1.0, low)
    coord = ops.where(at_edge, low, coord)
    return valid, low, coord - low


def _adaptive_grid(size, out_size):
    """``ceil(roi_size / out)`` as torchvision (float; <= 0 or NaN means no samples)."""
    return ops.ceil(_exact_divide(size, _f32(out_size)))


def _bilinear_taps(geometry, height, width, grid_h, grid_w, max_grid_h, max_grid_w,
                   out_h, out_w):
    """Per-axis taps ``[B, R, out, 2G]`` of every bin's samples: the low and high
    neighbour rows / columns (int32) and their weights, ``wy`` already divided by
    the RoI's sample count; weights are zero for invalid samples (which then read
    a harmless pixel) and for static slots beyond the RoI's own grid.

    ``height``/``width``: float32 ``[B, R]`` (the RoI's level); ``grid_h``/``grid_w``:
    float sample counts ``[B, R]``, masked to ``max_grid_*`` static slots.
    """
    safe_gh = ops.where(grid_h >= 1.0, grid_h, 1.0)
    safe_gw = ops.where(grid_w >= 1.0, grid_w, 1.0)
    ys = _sample_coordinates(geometry["start_y"], geometry["bin_h"], safe_gh, out_h, max_grid_h)
    xs = _sample_coordinates(geometry["start_x"], geometry["bin_w"], safe_gw, out_w, max_grid_w)
    valid_y, y_low, ly = _bilinear_axis(ys, height[..., None, None])
    valid_x, x_low, lx = _bilinear_axis(xs, width[..., None, None])
    slot_h = ops.cast(ops.arange(max_grid_h), "float32")
    slot_w = ops.cast(ops.arange(max_grid_w), "float32")
    valid_y = ops.logical_and(valid_y, slot_h < grid_h[..., None, None])
    valid_x = ops.logical_and(valid_x, slot_w < grid_w[..., None, None])
    count = ops.maximum(grid_h * grid_w, 1.0)
    y_low_i = ops.cast(y_low, "int32")
    x_low_i = ops.cast(x_low, "int32")
    y_max = ops.cast(height, "int32")[..., None, None] - 1
    x_max = ops.cast(width, "int32")[..., None, None] - 1
    rows = ops.concatenate([y_low_i, ops.minimum(y_low_i + 1, y_max)], axis=-1)
    cols = ops.concatenate([x_low_i, ops.minimum(x_low_i + 1, x_max)], axis=-1)
    wy = ops.concatenate([ops.where(valid_y, 1.0 - ly, 0.0), ops.where(valid_y, ly, 0.0)], axis=-1)
    wx = ops.concatenate([ops.where(valid_x, 1.0 - lx, 0.0), ops.where(valid_x, lx, 0.0)], axis=-1)
    return rows, cols, wy / count[..., None, None], wx


def _gather_roi_align(features_list, num_rows, base, row_stride, height, width, geometry,
                      grid_h, grid_w, max_grid_h, max_grid_w, out_h, out_w):
    """Bin means by gathering the 4 neighbours of every sample.

    The levels are read as their row concatenation (``num_rows`` rows of ``C``,
    :func:`_level_layout`); per RoI ``[B, R]``: ``base`` (flat index of pixel
    (0, 0) of the RoI's image/level), ``row_stride`` (its width, int32), and
    :func:`_bilinear_taps`' arguments.
    """
    rows, cols, wy, wx = _bilinear_taps(geometry, height, width, grid_h, grid_w,
                                        max_grid_h, max_grid_w, out_h, out_w)
    # Lattice of taps [B, R, out_h, out_w, 2G_h, 2G_w]: one gather, then the
    # weighted sum over the taps (tap axes next to C for a fast reduction).
    # Elementwise, not a matmul: float32 exact even where matmuls use TF32.
    index = (base[..., None, None, None, None]
             + (rows * row_stride[..., None, None])[..., :, None, :, None]
             + cols[..., None, :, None, :])
    index = ops.clip(index, 0, num_rows - 1)
    weight = ops.cast(wy[..., :, None, :, None] * wx[..., None, :, None, :],
                      features_list[0].dtype)
    return _weighted_gather(features_list, index, weight)


def _weighted_gather(features_list, index, weight):
    """``sum over the tap axes of flat[index] * weight``: ``[B, R, out_h, out_w, C]``,
    ``flat`` being the levels' row concatenation (:func:`_concat_levels`).

    ``index`` and ``weight`` are ``[B, R, out_h, out_w, taps_h, taps_w]``. The tap
    lattice ``[..., taps_h, taps_w, C]`` is 16 times the output (2 x 2 samples x 4
    neighbours); see :func:`_chunked_weighted_gather` for where it is not built whole.
    """
    bounds = _lattice_chunks(features_list, index)
    if bounds is not None:
        return _chunked_weighted_gather(features_list, index, weight, bounds)
    values = ops.take(_concat_levels(features_list), index, axis=0)
    return ops.sum(values * weight[..., None], axis=(4, 5))


# Elements of the tap lattice one chunk of ``_chunked_weighted_gather`` builds per
# image (~32 MB of float32), forward and backward.
_LATTICE_CHUNK_ELEMENTS = 1 << 23


def _in_xla_cond_or_loop(cond=True):
    """Whether TensorFlow is tracing for XLA or inside a while-loop body (or, with
    ``cond``, an ``ops.cond`` branch), where a ``tf.custom_gradient`` route is not
    taken: XLA fuses the plain ops anyway, and cond_v2 rejects the tensors the
    crop-and-resize route's gradient reads (its tape re-runs the gather route)."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util, control_flow_v2_func_graphs

    graph = tf.compat.v1.get_default_graph()
    if control_flow_util.GraphOrParentsInXlaContext(graph):
        return True
    kinds = (control_flow_v2_func_graphs.WhileBodyFuncGraph,
             *((control_flow_v2_func_graphs.CondBranchFuncGraph,) if cond else ()))
    while graph is not None:
        if isinstance(graph, kinds):
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def _lattice_chunks(features_list, index):
    """``[(start, stop)]`` RoI ranges of :func:`_chunked_weighted_gather`, or None where
    the plain ops run: not TensorFlow, not float32, dynamic sizes, one chunk, XLA, a
    while-loop body, or :data:`CHUNKED_GATHER` off (the exports)."""
    import keras

    channels = features_list[0].shape[-1]
    if (not CHUNKED_GATHER or keras.backend.backend() != "tensorflow"
            or features_list[0].dtype != "float32"):
        return None
    num_rois, per_roi = index.shape[1], index.shape[2:]
    if num_rois is None or None in per_roi or channels is None:
        return None
    chunk = max(1, _LATTICE_CHUNK_ELEMENTS // (int(np.prod(per_roi)) * int(channels)))
    # cond branches are fine: Mask R-CNN's training mask head runs in one (row buckets)
    if chunk >= num_rois or _in_xla_cond_or_loop(cond=False):
        return None
    return [(start, min(start + chunk, num_rois)) for start in range(0, num_rois, chunk)]


def _chunked_weighted_gather(features_list, index, weight, bounds):
    """:func:`_weighted_gather` a chunk of RoIs at a time (TensorFlow graph / eager).

    The plain ops build the whole tap lattice in the forward, and their gradient
    (the gather's ``IndexedSlices``, converted to a dense sum) builds it twice more:
    for Mask R-CNN's 512 box RoIs and 128 mask RoIs an image on P2-P5 that is
    ~0.8 GB each, held at once, where torchvision's kernel scatters into the map
    directly (``benchmarks/RESULTS.md``, "Mask R-CNN training-step memory").
    Here the forward gathers ~``_LATTICE_CHUNK_ELEMENTS`` lattice elements an image
    per chunk (``bounds``: :func:`_lattice_chunks`), and the gradient adds each
    chunk's weighted taps into one buffer of the levels' rows (the first chunk's
    ``scatter_nd`` makes it, the others ``tensor_scatter_nd_add``). Control
    dependencies make each chunk wait for the previous one, so the graph cannot run
    them all at once. The taps add up in the order the plain gradient adds them (RoI
    by RoI), and both are serial on the CPU, so the results are the same to the bit.

    The levels, not their concatenation, are the custom gradient's inputs: the
    concatenation is freed after the forward (inside ``ops.cond``, the mask head's
    case, the gradient machinery would otherwise keep every input until backward).
    """
    import tensorflow as tf

    channels = features_list[0].shape[-1]

    @tf.custom_gradient
    def pooled(*levels):
        shapes = [tf.shape(level) for level in levels]
        flat = _concat_levels(levels)
        outputs = []
        for start, stop in bounds:
            with tf.control_dependencies(outputs[-1:]):
                values = tf.gather(flat, index[:, start:stop])
            outputs.append(tf.reduce_sum(values * weight[:, start:stop, ..., None],
                                         axis=(4, 5)))

        def gradient(upstream):
            sizes = [tf.reduce_prod(shape[:-1]) for shape in shapes]

            def chunk(start, stop):
                """A chunk's buffer rows and weighted taps, flattened for the scatter."""
                taps = (upstream[:, start:stop, :, :, None, None, :]
                        * weight[:, start:stop, ..., None])
                return (tf.reshape(index[:, start:stop], [-1, 1]),
                        tf.reshape(taps, [-1, channels]))

            (start, stop), *rest = bounds
            # scatter_nd zeroes its buffer when it runs. A tf.zeros buffer of these static
            # sizes is folded by grappler into a graph constant, held as long as the step's
            # graph: one per copy of this gradient (Mask R-CNN's step has eight: the box
            # head's, six mask-row buckets', the every-row fallback's; 3.5 GB at batch 8,
            # 800 px, where the step then no longer fit 23 GB).
            total = tf.scatter_nd(*chunk(start, stop), tf.stack([tf.add_n(sizes), channels]))
            for start, stop in rest:
                with tf.control_dependencies([total]):
                    rows, values = chunk(start, stop)
                total = tf.tensor_scatter_nd_add(total, rows, values)
            parts = tf.split(total, sizes) if len(levels) > 1 else [total]
            return [tf.reshape(part, shape) for part, shape in zip(parts, shapes)]

        return tf.concat(outputs, axis=1), gradient

    return pooled(*features_list)


def _interpolation_matrix(start, bin_size, grid, out_size, size):
    """``A [B, R, out, size]``: summed bilinear weights of bin samples on each row.

    ``A[p, h] = sum_i valid_i * tent(clamp(y_i) - h)`` over the ``grid``
    samples of bin ``p`` (adaptive mode: ``grid = ceil(bin)``, so consecutive
    samples are > 1/2 px apart unless grid is 1). Each (bin, row) looks at
    ``_SEPARABLE_CANDIDATES`` candidate samples starting just below the first
    sample that can reach the row.
    """
    usable = grid >= 1.0  # False for empty (aligned, size <= 0) and NaN RoIs
    safe_grid = ops.where(usable, grid, 1.0)
    safe_bin = ops.where(usable, bin_size, 1.0)
    spacing = (safe_bin / safe_grid)[..., None, None]
    p = ops.cast(ops.arange(out_size), "float32")[:, None]
    rows = ops.cast(ops.arange(size), "float32")
    bin_start = (ops.where(usable, start, 0.0)[..., None, None] + p * safe_bin[..., None, None])
    first = ops.floor((rows - 2.0 - bin_start) / spacing - 0.5) - 1.0
    last_slot = (safe_grid - 1.0)[..., None, None]
    first = ops.minimum(ops.maximum(first, 0.0), last_slot)
    first = ops.where(ops.isnan(first), 0.0, first)
    size_f = _f32(size) if isinstance(size, int) else ops.cast(size, "float32")
    # Candidate axis last: [B, R, out, size, K] (one op each, not K of them).
    slot = first[..., None] + ops.cast(ops.arange(_SEPARABLE_CANDIDATES), "float32")
    grid_k = grid[..., None, None, None]
    coord = bin_start[..., None] + _exact_divide((slot + 0.5) * safe_bin[..., None, None, None],
                                                 safe_grid[..., None, None, None])
    valid, low, frac = _bilinear_axis(coord, size_f)
    valid = ops.logical_and(ops.logical_and(valid, slot < grid_k), usable[..., None, None, None])
    rows_k = rows[:, None]
    term = (ops.where(ops.logical_and(valid, low == rows_k), 1.0 - frac, 0.0)
            + ops.where(ops.logical_and(valid, low + 1.0 == rows_k), frac, 0.0))
    return ops.sum(term, axis=-1)


def _separable_roi_align(features, geometry, out_h, out_w):
    """Adaptive RoIAlign of one level as ``A_y @ F @ A_x^T / count`` (exact, no cap)."""
    height, width = features.shape[1], features.shape[2]
    if height is None or width is None:
        height, width = ops.shape(features)[1], ops.shape(features)[2]
    grid_h = _adaptive_grid(geometry["size_h"], out_h)
    grid_w = _adaptive_grid(geometry["size_w"], out_w)
    count = ops.maximum(ops.where(ops.isnan(grid_h * grid_w), 1.0, grid_h * grid_w), 1.0)
    a_y = _interpolation_matrix(geometry["start_y"], geometry["bin_h"], grid_h, out_h, height)
    a_x = _interpolation_matrix(geometry["start_x"], geometry["bin_w"], grid_w, out_w, width)
    a_y = ops.cast(a_y / count[..., None, None], features.dtype)
    a_x = ops.cast(a_x, features.dtype)
    # Contract the larger spatial axis first when sizes are static.
    if (isinstance(height, int) and isinstance(width, int)
            and out_w * height * (width + out_h) < out_h * width * (height + out_w)):
        partial = ops.einsum("brqw,bhwc->brqhc", a_x, features)
        return ops.einsum("brqhc,brph->brpqc", partial, a_y)
    partial = ops.einsum("brph,bhwc->brpwc", a_y, features)
    return ops.einsum("brpwc,brqw->brpqc", partial, a_x)


def _level_layout(features_list):
    """Where each ``[B, H_l, W_l, C]`` map sits in their row concatenation
    ``[sum_l B*H_l*W_l, C]`` (:func:`_concat_levels`).

    Returns ``(offsets, heights, widths, rows)``: per-level start offsets and
    (possibly dynamic) sizes, and the concatenation's row count.
    """
    offsets, heights, widths = [], [], []
    offset = 0
    for features in features_list:
        shape = ops.shape(features)
        height = features.shape[1] if features.shape[1] is not None else shape[1]
        width = features.shape[2] if features.shape[2] is not None else shape[2]
        offsets.append(offset)
        heights.append(height)
        widths.append(width)
        offset = offset + shape[0] * height * width
    return offsets, heights, widths, offset


def _concat_levels(features_list):
    flats = [ops.reshape(features, [-1, features.shape[-1]]) for features in features_list]
    return flats[0] if len(flats) == 1 else ops.concatenate(flats, axis=0)


def _gather_path(features_list, level_index, rois, geometry, sampling_ratio,
                 max_sampling_ratio, out_h, out_w, image_index=None):
    """Gather strategy over one or several levels (``level_index [B, R]`` picks;
    ``image_index [B, R]``: the image of each RoI, default its row)."""
    offsets, heights, widths, num_rows = _level_layout(features_list)
    if image_index is None:
        batch = ops.shape(rois)[0]
        image = ops.arange(batch, dtype="int32")[:, None]
    else:
        image = ops.cast(image_index, "int32")

    def per_roi(values, dtype):
        values = ops.stack([ops.cast(v, dtype) for v in values])
        if len(features_list) == 1:
            return ops.zeros_like(level_index, dtype=dtype) + values[0]
        return ops.take(values, level_index)

    height = per_roi(heights, "float32")
    width = per_roi(widths, "float32")
    stride = per_roi(widths, "int32")
    base = per_roi(offsets, "int32") + image * per_roi(
        [h * w for h, w in zip(heights, widths)], "int32")
    if sampling_ratio > 0:
        grid_h = ops.full_like(geometry["size_h"], float(sampling_ratio))
        grid_w = ops.full_like(geometry["size_w"], float(sampling_ratio))
        max_h = max_w = int(sampling_ratio)
    else:
        cap = float(max_sampling_ratio)
        grid_h = ops.minimum(_adaptive_grid(geometry["size_h"], out_h), cap)
        grid_w = ops.minimum(_adaptive_grid(geometry["size_w"], out_w), cap)
        grid_h = ops.where(ops.isnan(grid_h), 0.0, grid_h)
        grid_w = ops.where(ops.isnan(grid_w), 0.0, grid_w)
        max_h = max_w = int(max_sampling_ratio)
    return _gather_roi_align(features_list, num_rows, base, stride, height, width, geometry,
                             grid_h, grid_w, max_h, max_w, out_h, out_w)


def _crop_and_resize_enabled(features_list, sampling_ratio, max_sampling_ratio):
    """True where :func:`_crop_and_resize_path` may run: TF backend, fixed grid,
    float32 maps of static size, not traced for XLA nor inside a cond / loop
    branch, not switched off."""
    import keras

    if not CROP_AND_RESIZE or keras.backend.backend() != "tensorflow":
        return False
    if sampling_ratio <= 0 or max_sampling_ratio is not None:
        return False
    if any(f.dtype != "float32" or None in tuple(f.shape[1:3]) for f in features_list):
        return False
    # Inside ops.cond / while_loop (the mask branch's row buckets): gather.
    return not _in_xla_cond_or_loop()


def _canvas_layout(sizes):
    """Where each edge-padded level ``(H + 2, W + 2)`` sits on one canvas.

    The first (largest) level fills the left column, the others are stacked
    in a second column: for a 2x pyramid the canvas is about 1.5 first levels
    (one canvas image per level would be 4, all copied every call).
    Returns ``(offsets [(row, col)], canvas_h, canvas_w)``.
    """
    first_h, first_w = sizes[0][0] + 2, sizes[0][1] + 2
    offsets, row = [(0, 0)], 0
    for height, _ in sizes[1:]:
        offsets.append((row, first_w))
        row += height + 2
    column_w = max([w + 2 for _, w in sizes[1:]], default=0)
    return offsets, max(first_h, row), first_w + column_w


def _edge_padded_canvas(features_list, sizes, offsets, canvas_h, canvas_w):
    """The levels, each edge-padded by one pixel, on one ``[B, canvas_h, canvas_w, C]``."""
    import tensorflow as tf

    blocks = [tf.pad(f, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
              for f in features_list]
    if len(blocks) == 1:
        return blocks[0]
    first = tf.pad(blocks[0], [[0, 0], [0, canvas_h - blocks[0].shape[1]], [0, 0], [0, 0]])
    column_w = canvas_w - offsets[1][1]
    column = tf.concat([tf.pad(b, [[0, 0], [0, 0], [0, column_w - b.shape[2]], [0, 0]])
                        for b in blocks[1:]], axis=1)
    column = tf.pad(column, [[0, 0], [0, canvas_h - column.shape[1]], [0, 0], [0, 0]])
    return tf.concat([first, column], axis=2)


def _crop_and_resize_path(features_list, level_index, rois, geometry, grid, out_h, out_w):
    """Forward by :func:`_crop_and_resize_forward`, gradient by the gather route's.

    TensorFlow's CPU ``CropAndResizeGradImage`` adds the boxes' contributions
    from several threads without synchronisation: with more than one intra-op
    thread, RoIs that overlap lose updates (gradients off by ~0.5 from one run
    to the next on 512 RoIs). The gradient is therefore the gather route's
    (a scatter-add; its forward gather is not needed and not run).
    """
    import tensorflow as tf

    @tf.custom_gradient
    def pooled(*features):
        def gradient(upstream):
            with tf.GradientTape() as tape:
                tape.watch(features)
                reference = _gather_path(list(features), level_index, rois, geometry, grid,
                                         None, out_h, out_w)
            return tape.gradient(reference, list(features), output_gradients=upstream)

        return _crop_and_resize_forward(list(features), level_index, geometry, grid,
                                        out_h, out_w), gradient

    return pooled(*features_list)


def _crop_and_resize_forward(features_list, level_index, geometry, grid, out_h, out_w):
    """Fixed-grid RoIAlign by ``tf.image.crop_and_resize`` (TensorFlow only).

    RoI ``r``'s samples along y are ``start + (k + 0.5) * bin / g`` for
    ``k < out_h * g``: a crop of ``out_h * g`` rows from the first sample to the
    last, on the canvas where the level sits one pixel in from its block's
    corner. Bilinear reads of the edge-padded block equal torchvision's
    clamped reads for ``-1 <= y <= H``; crop-and-resize gives 0 off the canvas,
    and samples that fall outside their level's block but inside the canvas
    (other levels) are zeroed by the validity mask, computed only when some
    sample is outside (RoIs clipped to the image never are).
    """
    import tensorflow as tf

    sizes = [tuple(int(v) for v in f.shape[1:3]) for f in features_list]
    offsets, canvas_h, canvas_w = _canvas_layout(sizes)
    canvas = _edge_padded_canvas(features_list, sizes, offsets, canvas_h, canvas_w)
    batch, rois = tf.shape(level_index)[0], tf.shape(level_index)[1]

    def per_roi(values):
        return tf.gather(tf.constant(values, tf.float32), level_index)

    rows_h, rows_w = out_h * grid, out_w * grid
    g = _f32(grid)
    spacing_h = geometry["bin_h"] / g
    spacing_w = geometry["bin_w"] / g
    first_y = per_roi([row + 1.0 for row, _ in offsets]) + geometry["start_y"] + 0.5 * spacing_h
    first_x = per_roi([col + 1.0 for _, col in offsets]) + geometry["start_x"] + 0.5 * spacing_w
    last_y = first_y + (rows_h - 1) * spacing_h
    last_x = first_x + (rows_w - 1) * spacing_w
    span_h, span_w = float(canvas_h - 1), float(canvas_w - 1)
    boxes = tf.stack([first_y / span_h, first_x / span_w, last_y / span_h, last_x / span_w], -1)
    boxes = tf.where(tf.math.is_finite(boxes), boxes, -2.0)  # NaN/inf RoIs: all off-canvas
    image = tf.repeat(tf.range(batch), rois)
    samples = tf.image.crop_and_resize(canvas, tf.reshape(boxes, [-1, 4]), image,
                                       [rows_h, rows_w], extrapolation_value=0.0)
    if len(features_list) > 1:
        samples = _zero_samples_off_level(samples, geometry, level_index, sizes, grid,
                                          out_h, out_w)
    pooled = tf.nn.avg_pool2d(samples, grid, grid, "VALID")
    return tf.reshape(pooled, [batch, rois, out_h, out_w, canvas.shape[-1]])


def _zero_samples_off_level(samples, geometry, level_index, sizes, grid, out_h, out_w):
    """Zero the samples torchvision drops (``y < -1`` or ``y > H`` of their own level),
    which on the shared canvas would read a neighbouring level."""
    import tensorflow as tf

    g = ops.full_like(geometry["bin_h"], float(grid))
    height = tf.gather(tf.constant([float(h) for h, _ in sizes]), level_index)[..., None, None]
    width = tf.gather(tf.constant([float(w) for _, w in sizes]), level_index)[..., None, None]
    ys = _sample_coordinates(geometry["start_y"], geometry["bin_h"], g, out_h, grid)
    xs = _sample_coordinates(geometry["start_x"], geometry["bin_w"], g, out_w, grid)
    valid_y = tf.reshape(tf.logical_and(ys >= -1.0, ys <= height), [-1, out_h * grid, 1, 1])
    valid_x = tf.reshape(tf.logical_and(xs >= -1.0, xs <= width), [-1, 1, out_w * grid, 1])
    inside = tf.reduce_all(valid_y) & tf.reduce_all(valid_x)
    return tf.cond(inside, lambda: samples,
                   lambda: samples * tf.cast(valid_y & valid_x, samples.dtype))


def roi_align(features, rois, output_size, spatial_scale=1.0, sampling_ratio=-1,
              aligned=False, max_sampling_ratio=None):
    """RoIAlign, exactly ``torchvision.ops.roi_align`` (channels last, batched RoIs).

    Args:
        features: ``[B, H, W, C]`` feature map.
        rois: ``[B, R, 4]`` xyxy boxes in input-image pixels; RoI ``r`` of
            image ``b`` pools from ``features[b]``. Padding rows give finite
            (meaningless) outputs.
        output_size: int or ``(out_h, out_w)``.
        spatial_scale: feature pixels per input pixel (``1 / stride``).
        sampling_ratio: samples per bin side; ``<= 0`` is adaptive,
            ``ceil(roi_size / output_size)`` per RoI (torchvision's default -1).
        aligned: subtract half a pixel (Detectron2 / Mask R-CNN ``aligned=True``).
        max_sampling_ratio: adaptive mode only. ``None`` (default) evaluates
            it exactly with the separable matmul strategy (no cap); an int
            ``k`` gathers on a static ``k x k`` grid instead (exact for RoIs
            whose adaptive grid is ``<= k``, grid clamped to ``k`` above).

    Returns:
        ``[B, R, out_h, out_w, C]`` in ``features.dtype``.
    """
    out_h, out_w = _output_pair(output_size)
    _check_sampling(sampling_ratio, max_sampling_ratio, "roi_align")
    features = ops.convert_to_tensor(features)
    rois = ops.convert_to_tensor(rois)
    _check_inputs(features, rois, "roi_align")
    geometry = _roi_geometry(rois, spatial_scale, aligned, out_h, out_w)
    if sampling_ratio <= 0 and max_sampling_ratio is None:
        return _separable_roi_align(features, geometry, out_h, out_w)
    level_index = ops.zeros(ops.shape(rois)[:2], dtype="int32")
    if _crop_and_resize_enabled([features], sampling_ratio, max_sampling_ratio):
        return _crop_and_resize_path([features], level_index, rois, geometry, sampling_ratio,
                                     out_h, out_w)
    return _gather_path([features], level_index, rois, geometry, sampling_ratio,
                        max_sampling_ratio, out_h, out_w)


def map_roi_levels(rois, k_min=2, k_max=5, canonical_scale=224, canonical_level=4, eps=1e-6):
    """FPN level of each RoI: torchvision ``LevelMapper`` (FPN paper eq. 1).

    ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``
    clamped to ``[k_min, k_max]``, ``area = (x2 - x1) * (y2 - y1)`` (no +1),
    in float32 like torchvision. Returns the level number itself (``k_min`` ..
    ``k_max``, int32, shape ``rois.shape[:-1]``), not torchvision's offset
    ``level - k_min``. Degenerate RoIs (area ``<= 0``, e.g. padding) map to
    ``k_min`` (torchvision gives ``k_min`` for area 0 and undefined for < 0).

    >>> import numpy as np
    >>> rois = np.array([[0, 0, 224, 224], [0, 0, 32, 32], [0, 0, 2000, 2000]], "float32")
    >>> np.asarray(map_roi_levels(rois)).tolist()
    [4, 2, 5]
    """
    if k_min > k_max:
        raise ValueError(f"map_roi_levels: k_min {k_min} > k_max {k_max}")
    rois = ops.cast(ops.stop_gradient(ops.convert_to_tensor(rois)), "float32")
    if rois.shape[-1] != 4:
        raise ValueError(f"map_roi_levels: rois must end in 4 xyxy coordinates, "
                         f"got shape {tuple(rois.shape)}")
    area = (rois[..., 2] - rois[..., 0]) * (rois[..., 3] - rois[..., 1])
    positive = area > 0.0
    relative = _exact_divide(ops.sqrt(ops.where(positive, area, 1.0)), _f32(canonical_scale))
    level = ops.floor((_f32(canonical_level) + ops.log2(relative)) + _f32(eps))
    level = ops.where(positive, level, float(k_min))
    return ops.cast(ops.clip(level, float(k_min), float(k_max)), "int32")


def _level_features(features_by_level, levels, owner):
    if isinstance(features_by_level, dict):
        out = []
        for level in levels:
            keys = [key for key in (level, f"P{level}", f"p{level}", str(level))
                    if key in features_by_level]
            if not keys:
                raise ValueError(f"{owner}: no feature map for level {level} in dict keys "
                                 f"{sorted(map(str, features_by_level))} (use {level} or "
                                 f"'P{level}')")
            out.append(features_by_level[keys[0]])
        return out
    out = list(features_by_level)
    if len(out) != len(levels):
        raise ValueError(f"{owner}: got {len(out)} feature maps for levels {list(levels)}")
    return out


def _check_levels(levels, owner):
    levels = tuple(int(level) for level in levels)
    if not levels or list(levels) != list(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"{owner}: levels must be consecutive and increasing "
                         f"(like torchvision's LevelMapper), got {levels}")
    return levels


def multilevel_roi_align(features_by_level, rois, output_size, levels=(2, 3, 4, 5),
                         sampling_ratio=2, aligned=False, canonical_scale=224,
                         canonical_level=4, max_sampling_ratio=None, crop_and_resize=True,
                         image_index=None):
    """``torchvision.ops.MultiScaleRoIAlign``: each RoI pooled from its FPN level.

    The level of a RoI is ``map_roi_levels(rois, levels[0], levels[-1], ...)``
    and level ``l`` is read with ``spatial_scale = 2 ** -l`` (torchvision infers
    the same power of two from feature and image sizes).

    With ``sampling_ratio > 0`` (torchvision's Faster/Mask R-CNN use 2) all
    levels are flattened into one table and every RoI gathers from its own
    level only, so the cost is that of a single ``roi_align``. Adaptive
    sampling computes each level for all RoIs and selects.

    Args:
        features_by_level: list of ``[B, H_l, W_l, C]`` in ``levels`` order, or
            a dict keyed by level number or ``"P{level}"``.
        rois: ``[B, R, 4]`` xyxy in input-image pixels.
        output_size, sampling_ratio, aligned, max_sampling_ratio: as ``roi_align``.
        levels: consecutive pyramid levels present, e.g. ``(2, 3, 4, 5)``.
        canonical_scale, canonical_level: LevelMapper constants (224, 4).
        crop_and_resize: False keeps the gather route even where the crop-and-resize
            one could run (:data:`CROP_AND_RESIZE`). ``MultiLevelRoIAlign`` passes False
            in training: the two routes differ by float32 ulps, enough to flip a
            training run's discrete choices (RPN top-n, RoI sampling) within a few steps
            against the reference trainer, and training gains little (the gradient is the
            gather route's either way).
        image_index: optional ``[B', R]`` int, the image of ``features_by_level`` each
            RoI reads (default: RoI ``[b, r]`` reads image ``b``), so that ``rois
            [B', R, 4]`` may pack the RoIs of several images in one row (Mask
            R-CNN's training mask rows, ``kdet.models.faster_rcnn.mask_rcnn_loss``).
            A fixed ``sampling_ratio`` or ``max_sampling_ratio`` only; it takes the
            gather route.

    Returns:
        ``[B, R, out_h, out_w, C]`` (``[B', R, ...]`` with ``image_index``).

    >>> import numpy as np
    >>> feats = [np.ones((1, 64 // 2 ** l, 64 // 2 ** l, 8), "float32") for l in (2, 3, 4, 5)]
    >>> rois = np.array([[[0, 0, 10, 10], [0, 0, 60, 60]]], "float32")
    >>> tuple(multilevel_roi_align(feats, rois, 7).shape)
    (1, 2, 7, 7, 8)
    """
    owner = "multilevel_roi_align"
    out_h, out_w = _output_pair(output_size, owner)
    _check_sampling(sampling_ratio, max_sampling_ratio, owner)
    levels = _check_levels(levels, owner)
    features_list = [ops.convert_to_tensor(f) for f in _level_features(
        features_by_level, levels, owner)]
    rois = ops.convert_to_tensor(rois)
    channels = {f.shape[-1] for f in features_list}
    if len(channels) != 1:
        raise ValueError(f"{owner}: all levels need the same channel count, got {channels}")
    for features in features_list:
        _check_inputs(features, rois, owner, check_batch=image_index is None)
    level = map_roi_levels(rois, levels[0], levels[-1], canonical_scale, canonical_level)
    level_index = level - levels[0]
    scales = ops.convert_to_tensor(np.array([2.0 ** -lv for lv in levels], "float32"))
    if image_index is not None and not (sampling_ratio > 0 or max_sampling_ratio is not None):
        raise ValueError(f"{owner}: image_index needs a fixed sampling_ratio or "
                         f"max_sampling_ratio")
    if sampling_ratio > 0 or max_sampling_ratio is not None:
        scale = ops.take(scales, level_index)
        geometry = _roi_geometry(rois, scale, aligned, out_h, out_w)
        crop_and_resize = crop_and_resize and image_index is None
        if crop_and_resize and _crop_and_resize_enabled(features_list, sampling_ratio,
                                                        max_sampling_ratio):
            return _crop_and_resize_path(features_list, level_index, rois, geometry,
                                         sampling_ratio, out_h, out_w)
        return _gather_path(features_list, level_index, rois, geometry, sampling_ratio,
                            max_sampling_ratio, out_h, out_w, image_index=image_index)
    result = None
    for index, (features, lv) in enumerate(zip(features_list, levels)):
        geometry = _roi_geometry(rois, 2.0 ** -lv, aligned, out_h, out_w)
        pooled = _separable_roi_align(features, geometry, out_h, out_w)
        if result is None:
            result = pooled
        else:
            chosen = (level_index == index)[..., None, None, None]
            result = ops.where(chosen, pooled, result)
    return result


# Elements of the maps one chunk of ``roi_align_maps`` gathers per image (~16 MB
# of float32): bounds the memory whatever the map size and RoI count.
_MAPS_CHUNK_ELEMENTS = 1 << 22


def roi_align_maps(maps, rois, map_indices, output_size, spatial_scale=1.0, sampling_ratio=-1,
                   aligned=False, chunk_elements=None, image_index=None):
    """RoIAlign where each RoI reads its own one-channel map (torchvision ``roi_align``
    with a box index per RoI, as ``project_masks_on_boxes`` calls it).

    RoI ``r`` of image ``b`` pools ``maps[b, map_indices[b, r]]``; the result equals
    ``roi_align`` of that map alone, to the bit (same code path). Mask R-CNN's mask
    targets are this with the matched GT masks. Gathering a full map per RoI
    (``[B, R, H, W]``) costs ~0.7 GB at 800 x 800 with 128 RoIs per image, and the
    exact adaptive evaluation as much again, so RoIs go in chunks of about
    ``chunk_elements`` map pixels per image, each chunk waiting for the previous one
    (a data dependency, so the graph cannot run them all at once).

    Args:
        maps: ``[B, N, H, W]`` (e.g. GT masks, any float or bool dtype).
        rois: ``[B, R, 4]`` xyxy in input-image pixels.
        map_indices: ``[B, R]`` int, ``0..N-1`` (clip padding rows to 0).
        output_size, spatial_scale, sampling_ratio, aligned: as ``roi_align``.
        image_index: optional ``[B', R]`` int, the image of ``maps`` each RoI reads
            (default: RoI ``[b, r]`` reads image ``b``), so that ``rois [B', R, 4]``
            may pack the RoIs of several images in one row.

    Returns:
        ``[B, R, out_h, out_w]`` float32 (``[B', R, ...]`` with ``image_index``).

    >>> import numpy as np
    >>> maps = np.stack([np.zeros((8, 8)), np.ones((8, 8))])[None].astype("float32")
    >>> rois = np.array([[[0, 0, 4, 4], [0, 0, 4, 4]]], "float32")
    >>> out = np.asarray(roi_align_maps(maps, rois, np.array([[1, 0]]), 2))
    >>> out[0, :, 0, 0].tolist()
    [1.0, 0.0]
    """
    out_h, out_w = _output_pair(output_size, "roi_align_maps")
    maps = ops.convert_to_tensor(maps)
    rois = ops.cast(ops.convert_to_tensor(rois), "float32")
    map_indices = ops.cast(ops.convert_to_tensor(map_indices), "int32")
    if len(maps.shape) != 4 or len(rois.shape) != 3 or rois.shape[-1] != 4:
        raise ValueError(f"roi_align_maps: maps must be [B, N, H, W] and rois [B, R, 4], got "
                         f"{tuple(maps.shape)} and {tuple(rois.shape)}")
    num_maps, height, width = maps.shape[1], maps.shape[2], maps.shape[3]
    num_rois = rois.shape[1]
    if None in (num_maps, height, width, num_rois):
        raise ValueError("roi_align_maps: N, H, W and R must be static")
    batch = ops.shape(rois)[0]
    flat_maps = ops.reshape(maps, (-1, height, width))  # [B * N, H, W]
    if image_index is None:
        image = ops.arange(batch, dtype="int32")[:, None] * num_maps
    else:
        image = ops.cast(ops.convert_to_tensor(image_index), "int32") * num_maps
    budget = int(chunk_elements or _MAPS_CHUNK_ELEMENTS)
    chunk = max(1, min(num_rois, budget // (height * width)))
    outputs, dependency = [], None
    for start in range(0, num_rois, chunk):
        stop = min(start + chunk, num_rois)
        first = image if image_index is None else image[:, start:stop]
        index = ops.reshape(first + map_indices[:, start:stop], (-1,))
        if dependency is not None:  # 0, computed from the previous chunk's output
            index = index + dependency
        per_roi = ops.cast(ops.take(flat_maps, index, axis=0), "float32")[..., None]
        pooled = roi_align(per_roi, ops.reshape(rois[:, start:stop], (-1, 1, 4)),
                           (out_h, out_w), spatial_scale=spatial_scale,
                           sampling_ratio=sampling_ratio, aligned=aligned)
        pooled = ops.reshape(pooled, (batch, stop - start, out_h, out_w))
        outputs.append(pooled)
        # min(|finite|, 0) is 0 for any finite sum: orders the chunks, changes nothing.
        total = ops.sum(pooled)
        total = ops.where(ops.isfinite(total), total, 0.0)
        dependency = ops.cast(ops.minimum(ops.abs(total), 0.0), "int32")
    return outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=1)
