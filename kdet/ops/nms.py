"""Non-maximum suppression with static shapes (torchvision semantics, exact).

``nms`` and ``batched_nms`` keep the boxes that torchvision's ``nms`` /
``batched_nms`` keep, in the same order, and return them as padded index
tensors so that they run under ``tf.function(jit_compile=True)`` and
``jax.jit``:

    indices [B, max_output_size] int32   (positions in the input, -1 padding)
    valid_count [B] int32

The rule (greedy, as torchvision): sort by score, descending; walk down the
list; a box is kept unless a box already kept has IoU ``> iou_threshold`` with
it (strict). IoU is computed as torchvision does (no +1 pixel), in float32.
Ties in score keep the lower input index first (kdet's sort is stable;
torchvision's CPU sort makes no promise there).

How it stays exact and fast with thousands of candidates: the sorted
candidates are cut into tiles of ``tile_size`` boxes. Each tile is first
suppressed by the boxes kept so far (a ``[tile, max_output_size]`` IoU block,
never the full ``N x N`` matrix), then resolved within itself by iterating
``alive_i = base_i and not any(alive_j and iou_ji > thr for j < i)`` to its
fixed point. The greedy answer is the only fixed point of that map (box ``i``
depends on earlier boxes only), and after ``k`` rounds the first ``k`` boxes
are final, so the loop ends, exactly, in at most ``tile_size`` rounds (a few
in practice). Survivors are appended to a buffer of kept boxes; the loop over
tiles stops as soon as every image has ``max_output_size`` boxes or runs out
of candidates. Cost is about ``N * (max_output_size + tile_size)`` IoUs per
image: a few ms for N=5000 and 100 outputs on one CPU core, compiled.

Called eagerly on JAX, the function compiles itself once per shape and
configuration (a second or two) instead of op by op.

    >>> import numpy as np
    >>> boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], "float32")
    >>> scores = np.array([0.9, 0.8, 0.7], "float32")
    >>> indices, count = nms(boxes, scores, iou_threshold=0.5, max_output_size=4)
    >>> np.asarray(indices).tolist(), int(count)
    ([0, 2, -1, -1], 2)
"""
import functools
import math
import numbers

import keras
import numpy as np
from keras import ops

from kdet.boxes import pairwise_iou

_METHODS = ("offset", "mask")


def nms(boxes, scores, iou_threshold=0.5, max_output_size=100,
        score_threshold=float("-inf"), valid_mask=None, tile_size=256):
    """Greedy NMS (``torchvision.ops.nms``) with padded, static-shape outputs.

    Args:
        boxes: ``[B, N, 4]`` or ``[N, 4]`` ``xyxy`` boxes.
        scores: ``[B, N]`` or ``[N]``.
        iou_threshold: suppress a box whose IoU with a kept, higher-ranked box
            is ``> iou_threshold``. A Python float is compared exactly as
            torchvision compares it (float32 IoU against the float64 value).
        max_output_size: static number of output slots.
        score_threshold: only boxes with ``score > score_threshold`` (compared in
            float32, like ``scores > thresh`` in torch) are candidates.
        valid_mask: optional ``[B, N]`` bool; False rows (padding) are never
            kept. Scores of ``-inf`` or NaN are never kept either.
        tile_size: candidates resolved together; a speed knob only, the result
            does not depend on it.

    Returns:
        ``(indices, valid_count)``: ``indices [B, max_output_size]`` int32
        positions into the input in descending score order, padded with -1;
        ``valid_count [B]`` int32. Unbatched input gives ``[max_output_size]``
        and a scalar.

    >>> import numpy as np
    >>> boxes = np.array([[0, 0, 2, 1], [1, 0, 3, 1]], "float32")  # IoU exactly 1/3
    >>> scores = np.array([0.5, 0.6], "float32")
    >>> np.asarray(nms(boxes, scores, 0.3, max_output_size=3)[0]).tolist()
    [1, -1, -1]
    """
    return _dispatch(boxes, scores, None, iou_threshold, max_output_size,
                     score_threshold, valid_mask, "mask", tile_size)


def batched_nms(boxes, scores, labels, iou_threshold=0.5, max_output_size=100,
                score_threshold=float("-inf"), method="offset", valid_mask=None,
                tile_size=256):
    """Class-aware NMS (``torchvision.ops.batched_nms``): labels never suppress each other.

    ``method="offset"`` is torchvision's coordinate trick: every box is shifted
    by ``label * (max_coordinate + 1)`` (the maximum over this image's
    candidates) before plain NMS, which gives the same result bit for bit as
    torchvision's ``_batched_nms_coordinate_trick``. ``method="mask"`` computes
    IoU on the original coordinates and only lets equal labels suppress each
    other: the result of running ``nms`` class by class (torchvision's
    ``_batched_nms_vanilla``, which it uses on CPU for more than 1000 boxes).
    The two agree for non-negative coordinates up to float32 rounding of the
    shifted boxes (large labels times large coordinates). Like torchvision's,
    the offset trick assumes ``x1, y1 >= 0``: with negative coordinates the
    shifted classes can overlap, so clip boxes first or use ``"mask"``.

    Args:
        labels: ``[B, N]`` or ``[N]`` integer class ids.
        Others as in :func:`nms`.

    Returns:
        ``(indices, valid_count)`` as :func:`nms`, in descending score order
        over all classes.

    >>> import numpy as np
    >>> boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 9]], "float32")
    >>> scores = np.array([0.9, 0.8, 0.7], "float32")
    >>> labels = np.array([0, 1, 0], "int32")
    >>> np.asarray(batched_nms(boxes, scores, labels, 0.5, max_output_size=3)[0]).tolist()
    [0, 1, -1]
    """
    if method not in _METHODS:
        raise ValueError(f"kdet.ops.batched_nms: method must be one of {_METHODS}, got {method!r}")
    return _dispatch(boxes, scores, labels, iou_threshold, max_output_size,
                     score_threshold, valid_mask, method, tile_size)


def select_detections(boxes, scores, labels, indices, valid_count):
    """Gather NMS survivors into kdet's padded prediction dict.

    Args:
        boxes: ``[B, N, 4]`` (or ``[N, 4]``), scores ``[B, N]``, labels ``[B, N]``
            (or None): the tensors NMS ran on.
        indices, valid_count: the outputs of :func:`nms` / :func:`batched_nms`.

    Returns:
        ``{"boxes": [B, D, 4], "scores": [B, D], "labels": [B, D] int32,
        "num_detections": [B] int32}``; padded slots hold zero boxes, score 0
        and label -1 (docs/tensor-contract.md). ``labels`` None gives label 0 to every
        detection.

    >>> import numpy as np
    >>> boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10]], "float32")
    >>> scores = np.array([0.75, 0.5], "float32")
    >>> idx, n = nms(boxes, scores, 0.5, max_output_size=2)
    >>> out = select_detections(boxes, scores, None, idx, n)
    >>> np.asarray(out["scores"]).tolist(), np.asarray(out["labels"]).tolist()
    ([0.75, 0.0], [0, -1])
    """
    boxes = ops.convert_to_tensor(boxes)
    scores = ops.convert_to_tensor(scores)
    indices = ops.convert_to_tensor(indices, "int32")
    valid_count = ops.convert_to_tensor(valid_count, "int32")
    unbatched = len(indices.shape) == 1
    if unbatched:
        boxes, scores, indices = boxes[None], scores[None], indices[None]
        valid_count = valid_count[None]
        labels = None if labels is None else ops.convert_to_tensor(labels)[None]
    valid = indices >= 0
    safe = ops.where(valid, indices, 0)
    out_boxes = ops.take_along_axis(boxes, safe[..., None], axis=1)
    out_boxes = ops.where(valid[..., None], out_boxes, ops.zeros_like(out_boxes))
    out_scores = ops.take_along_axis(scores, safe, axis=1)
    out_scores = ops.where(valid, out_scores, ops.zeros_like(out_scores))
    if labels is None:
        out_labels = ops.zeros_like(safe)
    else:
        out_labels = ops.take_along_axis(ops.cast(labels, "int32"), safe, axis=1)
    out_labels = ops.where(valid, out_labels, -ops.ones_like(out_labels))
    out = {"boxes": out_boxes, "scores": out_scores, "labels": out_labels,
           "num_detections": valid_count}
    if unbatched:
        out = {k: v[0] for k, v in out.items()}
    return out


def _float32_threshold(iou_threshold):
    """The float32 ``t`` with ``iou > t`` iff ``float64(iou) > iou_threshold``.

    torchvision's kernel compares the float IoU with a double threshold, so
    with 0.3 an IoU of exactly float32(0.3) (= 0.30000001...) is suppressed.
    Rounding the threshold down to float32 reproduces that in float32.
    """
    if not isinstance(iou_threshold, numbers.Real):
        return ops.cast(iou_threshold, "float32")  # a tensor: compared as given
    value = float(iou_threshold)
    t = np.float32(value)
    if math.isfinite(value) and float(t) > value:
        t = np.nextafter(t, np.float32(-np.inf))
    return ops.convert_to_tensor(t, "float32")


def _dispatch(boxes, scores, labels, iou_threshold, max_output_size, score_threshold,
              valid_mask, method, tile_size):
    """Run :func:`_nms`; on eager JAX through one cached compilation per configuration.

    Eager JAX compiles every op for every new shape (seconds under load for the
    ~100 ops here) and would compile ``while_loop`` bodies on every call; one
    ``jax.jit`` per (shapes, static arguments) costs about as much once and then
    runs in milliseconds. Traced calls (jit, tf.function) and eager TF run
    :func:`_nms` directly.
    """
    static_numbers = (isinstance(iou_threshold, numbers.Real)
                      and isinstance(score_threshold, numbers.Real))
    if (keras.backend.backend() == "jax" and static_numbers
            and _is_eager(ops.convert_to_tensor(boxes))):
        compiled = _jax_compiled(float(iou_threshold), int(max_output_size),
                                 float(score_threshold), method, int(tile_size))
        return compiled(boxes, scores, labels, valid_mask)
    return _nms(boxes, scores, labels, iou_threshold, max_output_size,
                score_threshold, valid_mask, method, tile_size)


@functools.lru_cache(maxsize=32)
def _jax_compiled(iou_threshold, max_output_size, score_threshold, method, tile_size):
    import jax  # dispatch only: the math is _nms, in keras.ops

    def run(boxes, scores, labels, valid_mask):
        return _nms(boxes, scores, labels, iou_threshold, max_output_size,
                    score_threshold, valid_mask, method, tile_size)

    return jax.jit(run)


def _is_eager(x):
    """True when ``x`` holds a value now, False while tracing for a graph or jit.

    Only a type check (no math): it picks the loop driver in :func:`_while`.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return not isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.executing_eagerly()
    return True


def _while(cond, body, state, eager):
    """``ops.while_loop``, or the same loop driven from Python when eager.

    Eager TF runs ``tf.while_loop`` from Python anyway; driving it here lets
    the tile loop stop as soon as the answer is known.
    """
    if not eager:
        return ops.while_loop(cond, body, state)
    state = tuple(state)
    while bool(ops.convert_to_numpy(cond(*state))):
        state = tuple(body(*state))
    return state


def _nms(boxes, scores, labels, iou_threshold, max_output_size, score_threshold,
         valid_mask, method, tile_size):
    boxes = ops.cast(ops.convert_to_tensor(boxes), "float32")
    scores = ops.cast(ops.convert_to_tensor(scores), "float32")
    unbatched = len(boxes.shape) == 2
    if unbatched:
        boxes, scores = boxes[None], scores[None]
        labels = None if labels is None else ops.convert_to_tensor(labels)[None]
        valid_mask = None if valid_mask is None else ops.convert_to_tensor(valid_mask)[None]
    if len(boxes.shape) != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"kdet.ops.nms: boxes must be [B, N, 4] or [N, 4], got {boxes.shape}")
    if len(scores.shape) != 2:
        raise ValueError(f"kdet.ops.nms: scores must be [B, N] or [N], got {scores.shape}")
    num_boxes = boxes.shape[1]
    if num_boxes is None:
        raise ValueError("kdet.ops.nms: the number of boxes N must be static")
    if scores.shape[1] is not None and scores.shape[1] != num_boxes:
        raise ValueError(f"kdet.ops.nms: boxes {boxes.shape} and scores {scores.shape} "
                         "disagree on N")
    max_output_size = int(max_output_size)
    if max_output_size < 0:
        raise ValueError(f"kdet.ops.nms: max_output_size must be >= 0, got {max_output_size}")
    if int(tile_size) < 1:
        raise ValueError(f"kdet.ops.nms: tile_size must be >= 1, got {tile_size}")

    # Candidates: score > threshold (float32 compare, as torch does), finite
    # rows the caller did not mask out.
    valid = scores > ops.cast(score_threshold, "float32")
    if valid_mask is not None:
        valid = ops.logical_and(valid, ops.cast(valid_mask, "bool"))
    batch = ops.shape(boxes)[0]
    eager = _is_eager(boxes)
    if num_boxes == 0 or max_output_size == 0:
        indices = -ops.ones((batch, max_output_size), "int32")
        count = ops.zeros((batch,), "int32")
        return (indices[0], count[0]) if unbatched else (indices, count)

    if labels is not None:
        labels = ops.convert_to_tensor(labels)
        if method == "offset":
            # torchvision: boxes + label * (boxes.max() + 1), over the candidates.
            coords = ops.where(valid[..., None], boxes, float("-inf"))
            max_coordinate = ops.max(coords, axis=(1, 2), keepdims=True)
            max_coordinate = ops.where(ops.isfinite(max_coordinate), max_coordinate, 0.0)
            offsets = ops.cast(labels, "float32")[..., None] * (max_coordinate + 1.0)
            boxes = boxes + offsets
            labels = None
        else:
            labels = ops.cast(labels, "int32")

    # Stable descending sort: top_k puts the lower index first among equal values.
    keys = ops.where(valid, scores, float("-inf"))
    _, order = ops.top_k(keys, k=num_boxes, sorted=True)
    order = ops.cast(order, "int32")
    sorted_boxes = ops.take_along_axis(boxes, order[..., None], axis=1)
    sorted_valid = ops.take_along_axis(valid, order, axis=1)
    sorted_labels = None if labels is None else ops.take_along_axis(labels, order, axis=1)
    num_valid = ops.sum(ops.cast(valid, "int32"), axis=1)

    tile = min(int(tile_size), num_boxes)
    num_tiles = -(-num_boxes // tile)
    pad = num_tiles * tile - num_boxes

    def tiles_of(x, fill):
        if pad:
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (len(x.shape) - 2)
            x = ops.pad(x, widths, constant_values=fill)
        x = ops.reshape(x, (-1, num_tiles, tile) + tuple(x.shape[2:]))
        return ops.moveaxis(x, 1, 0)  # [num_tiles, B, tile, ...]

    box_tiles = tiles_of(sorted_boxes, 0.0)
    valid_tiles = tiles_of(sorted_valid, False)
    index_tiles = tiles_of(order, -1)
    label_tiles = None if sorted_labels is None else tiles_of(sorted_labels, -1)

    threshold = _float32_threshold(iou_threshold)
    capacity = max_output_size
    buffer_size = capacity + tile + 1  # room for one whole tile + a dump slot
    dump = capacity + tile
    slots = ops.arange(capacity, dtype="int32")
    tile_positions = ops.arange(tile, dtype="int32")
    # earlier[j, i]: j ranks before i inside a tile, so j may suppress i.
    earlier = tile_positions[:, None] < tile_positions[None, :]
    batch_index = ops.broadcast_to(ops.arange(batch, dtype="int32")[:, None],
                                   ops.shape(valid_tiles)[1:])

    def overlaps(iou, labels_a, labels_b):
        over = iou > threshold
        if labels_a is not None:
            over = ops.logical_and(over, labels_a[..., :, None] == labels_b[..., None, :])
        return over

    def tile_step(t, count, kept_boxes, kept_index, kept_labels):
        t_boxes = ops.take(box_tiles, t, axis=0)  # [B, tile, 4]
        t_valid = ops.take(valid_tiles, t, axis=0)
        t_index = ops.take(index_tiles, t, axis=0)
        t_labels = None if label_tiles is None else ops.take(label_tiles, t, axis=0)

        # 1. Suppression by boxes kept in earlier tiles.
        prev_labels = None if kept_labels is None else kept_labels[:, :capacity]
        by_kept = overlaps(pairwise_iou(t_boxes, kept_boxes[:, :capacity]), t_labels, prev_labels)
        by_kept = ops.logical_and(by_kept, (slots[None, :] < count[:, None])[:, None, :])
        base = ops.logical_and(t_valid, ops.logical_not(ops.any(by_kept, axis=2)))
        base = ops.logical_and(base, (count < capacity)[:, None])

        # 2. Greedy inside the tile, as the fixed point of the suppression map.
        within = overlaps(pairwise_iou(t_boxes, t_boxes), t_labels, t_labels)
        within = ops.cast(ops.logical_and(within, earlier), "float32")  # [B, j, i]

        def suppress(alive):
            hits = ops.matmul(ops.cast(alive, "float32")[:, None, :], within)[:, 0, :]
            return ops.logical_and(base, hits == 0)

        def not_converged(alive, previous):
            return ops.any(ops.not_equal(alive, previous))

        def refine(alive, previous):
            return suppress(alive), alive

        # At most tile + 1 rounds (after k rounds the first k boxes are final).
        alive, _ = _while(not_converged, refine, (suppress(base), base), eager)

        # 3. Append the survivors after the ``count`` boxes kept so far.
        alive_int = ops.cast(alive, "int32")
        position = count[:, None] + ops.cumsum(alive_int, axis=1) - 1
        position = ops.where(alive, position, dump)
        where = ops.reshape(ops.stack([batch_index, position], axis=-1), (-1, 2))
        kept_boxes = ops.scatter_update(kept_boxes, where, ops.reshape(t_boxes, (-1, 4)))
        kept_index = ops.scatter_update(kept_index, where, ops.reshape(t_index, (-1,)))
        if kept_labels is not None:
            kept_labels = ops.scatter_update(kept_labels, where, ops.reshape(t_labels, (-1,)))
        count = count + ops.sum(alive_int, axis=1)
        return t + 1, count, kept_boxes, kept_index, kept_labels

    most_candidates = ops.max(num_valid)

    def more_tiles(t, count, *_):
        return ops.logical_and(ops.logical_and(t < num_tiles, t * tile < most_candidates),
                               ops.any(count < capacity))

    state = (ops.convert_to_tensor(0, "int32"),
             ops.zeros((batch,), "int32"),
             ops.zeros((batch, buffer_size, 4), "float32"),
             -ops.ones((batch, buffer_size), "int32"))
    if label_tiles is None:
        def body(t, count, kept_boxes, kept_index):
            return tile_step(t, count, kept_boxes, kept_index, None)[:4]
    else:
        state = state + (-ops.ones((batch, buffer_size), "int32"),)
        body = tile_step
    state = _while(more_tiles, body, state, eager)
    count, kept_index = state[1], state[3]

    valid_count = ops.minimum(count, capacity)
    indices = ops.where(slots[None, :] < valid_count[:, None], kept_index[:, :capacity], -1)
    if unbatched:
        return indices[0], valid_count[0]
    return indices, valid_count
