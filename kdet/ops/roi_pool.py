"""RoIPool (Fast R-CNN), exactly ``torchvision.ops.roi_pool``, with static shapes.

torchvision's CPU kernel, per RoI and axis (float32 arithmetic as there):
``start = round(x1 * scale)``, ``end = round(x2 * scale)`` (C ``round``: half
away from zero), ``size = max(end - start + 1, 1)``, ``bin = size / out``;
bin ``p`` covers ``[floor(p * bin), ceil((p + 1) * bin))`` shifted by
``start`` and clipped to ``[0, H]``; the output is the max over the bin's
window, 0 for an empty window.

How it stays static and cheap: a bin's window can be anything from one pixel
to the whole map, so instead of masking the map per bin (``R * out * H * W``
work) the max over any rectangle is read from a 2-D sparse table
(range-maximum query): ``T[kh][kw][h, w] = max F[h : h + 2**kh, w : w + 2**kw]``
for all powers of two up to the map size. A window of height ``n`` is covered
by two (possibly overlapping) rows of height ``2**floor(log2 n)``, likewise in
width, so every bin is the max of 4 table entries: 4 gathers of ``[B, R,
out_h, out_w, C]``. Entry ``(kh, kw)`` only holds the windows that fit, so
the table is ``sum_kh (H - 2**kh + 1) * sum_kw (W - 2**kw + 1)`` pixels: 22x
the map for a 38 x 50 VGG conv5 map, independent of the number of RoIs.
Gradients reach ``features`` through the maxima (to the argmax element, as
torchvision's backward does); none reach ``rois``.

    >>> import numpy as np
    >>> features = np.arange(16, dtype="float32").reshape(1, 4, 4, 1)
    >>> rois = np.array([[[0.0, 0.0, 3.0, 3.0]]], "float32")
    >>> np.asarray(roi_pool(features, rois, output_size=2))[0, 0, :, :, 0].tolist()
    [[5.0, 7.0], [13.0, 15.0]]
"""
import numpy as np
from keras import ops

from kdet.ops.roi_align import _check_inputs, _exact_divide, _f32, _output_pair


def _round_half_away(value):
    """C/C++ ``round`` (half away from zero), exact for every float32."""
    magnitude = ops.abs(value)
    whole = ops.floor(magnitude)
    rounded = whole + ops.cast(magnitude - whole >= 0.5, value.dtype)
    return ops.sign(value) * rounded


def _num_levels(size):
    """Number of power-of-two window sizes ``1, 2, 4, ... <= size``."""
    return max(int(size).bit_length(), 1)


def _sparse_table(features, num_h, num_w):
    """Flattened 2-D sparse table of ``features`` ``[B, H, W, C]``.

    Entry ``(kh, kw)`` is ``[B, H - 2**kh + 1, W - 2**kw + 1, C]`` with
    ``T[h, w] = max F[h : h + 2**kh, w : w + 2**kw]`` (windows inside the map
    only), built by doubling. Returns ``(table [N, C], sizes)`` where
    ``sizes[kh * num_w + kw] = (rows, cols)`` and the entries are concatenated
    in that order.
    """
    flats, sizes = [], []
    row_table = features
    for kh in range(num_h):
        if kh:
            shift = 2 ** (kh - 1)
            row_table = ops.maximum(row_table[:, :-shift], row_table[:, shift:])
        table = row_table
        for kw in range(num_w):
            if kw:
                shift = 2 ** (kw - 1)
                table = ops.maximum(table[:, :, :-shift], table[:, :, shift:])
            sizes.append((table.shape[1], table.shape[2]))
            flats.append(ops.reshape(table, [-1, features.shape[-1]]))
    return ops.concatenate(flats, axis=0), sizes


def _bin_windows(start, end, out_size, size):
    """Clipped integer windows ``[lo, hi)`` of each bin, ``[B, R, out]`` float32."""
    roi_size = ops.maximum(end - start + 1.0, 1.0)
    bin_size = _exact_divide(roi_size, _f32(out_size))
    p = ops.cast(ops.arange(out_size), "float32")
    lo = ops.floor(p * bin_size[..., None]) + start[..., None]
    hi = ops.ceil((p + 1.0) * bin_size[..., None]) + start[..., None]
    lo = ops.minimum(ops.maximum(lo, 0.0), float(size))
    hi = ops.minimum(ops.maximum(hi, 0.0), float(size))
    return lo, hi


def _window_query(lo, hi, num_levels, size):
    """Table level and the two start rows covering ``[lo, hi)`` (int32)."""
    length = ops.cast(ops.maximum(hi - lo, 1.0), "int32")
    level = ops.zeros_like(length)
    for k in range(1, num_levels):
        level = level + ops.cast(length >= 2 ** k, "int32")
    span = ops.take(ops.convert_to_tensor(np.array([2 ** k for k in range(num_levels)],
                                                   "int32")), level)
    # Both starts lie in [0, size - span] (the entry's row count) for
    # non-empty windows; clipping only tames empty ones.
    limit = size - span
    first = ops.minimum(ops.maximum(ops.cast(lo, "int32"), 0), limit)
    second = ops.minimum(ops.maximum(ops.cast(hi, "int32") - span, 0), limit)
    return level, first, second


def roi_pool(features, rois, output_size, spatial_scale=1.0):
    """RoIPool, exactly ``torchvision.ops.roi_pool`` (channels last, batched RoIs).

    Args:
        features: ``[B, H, W, C]`` with static ``H`` and ``W`` (they size the
            sparse table).
        rois: ``[B, R, 4]`` xyxy in input-image pixels; padding rows give
            finite outputs.
        output_size: int or ``(out_h, out_w)``.
        spatial_scale: feature pixels per input pixel (``1 / stride``).

    Returns:
        ``[B, R, out_h, out_w, C]`` in ``features.dtype``.
    """
    out_h, out_w = _output_pair(output_size, "roi_pool")
    features = ops.convert_to_tensor(features)
    rois = ops.convert_to_tensor(rois)
    _check_inputs(features, rois, "roi_pool")
    height, width = features.shape[1], features.shape[2]
    if height is None or width is None:
        raise ValueError(f"roi_pool: needs a static feature height and width, "
                         f"got shape {tuple(features.shape)}")
    rois = ops.cast(ops.stop_gradient(rois), "float32")
    scale = _f32(spatial_scale)
    corners = _round_half_away(rois * scale)
    # NaN/inf corners (garbage padding): any finite value, the output stays finite.
    corners = ops.where(ops.isfinite(corners), corners, 0.0)
    y_lo, y_hi = _bin_windows(corners[..., 1], corners[..., 3], out_h, height)
    x_lo, x_hi = _bin_windows(corners[..., 0], corners[..., 2], out_w, width)
    empty = ops.logical_or(
        ops.logical_not(y_hi > y_lo)[..., :, None], ops.logical_not(x_hi > x_lo)[..., None, :])

    num_h, num_w = _num_levels(height), _num_levels(width)
    table, sizes = _sparse_table(features, num_h, num_w)
    level_h, row_a, row_b = _window_query(y_lo, y_hi, num_h, height)
    level_w, col_a, col_b = _window_query(x_lo, x_hi, num_w, width)
    # Entry (kh, kw) of bin [B, R, out_h, out_w]: its first row in the table
    # (entries are stacked per image: offset * batch) and its shape.
    entry = level_h[..., :, None] * num_w + level_w[..., None, :]
    areas = [rows * cols for rows, cols in sizes]
    starts = np.cumsum([0] + areas[:-1]).astype("int32")
    batch = ops.shape(features)[0]
    image = ops.arange(batch, dtype="int32")[:, None, None, None]
    entry_rows = ops.take(np.array([r for r, _ in sizes], "int32"), entry)
    entry_cols = ops.take(np.array([c for _, c in sizes], "int32"), entry)
    base = ops.take(starts, entry) * batch + image * entry_rows * entry_cols
    result = None
    for rows in (row_a, row_b):
        for cols in (col_a, col_b):
            # row_* / col_* are < H - 2**k + 1 by construction (clipped for empty bins)
            index = base + (rows[..., :, None] * entry_cols) + cols[..., None, :]
            values = ops.take(table, index, axis=0)
            result = values if result is None else ops.maximum(result, values)
    return ops.where(empty[..., None], ops.zeros_like(result), result)
