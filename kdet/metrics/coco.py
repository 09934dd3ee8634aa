"""COCO evaluation (bbox, segm, keypoints) that gives pycocotools' numbers, vectorised.

`COCOEvaluator` reproduces ``pycocotools.cocoeval.COCOeval`` (``evaluate();
accumulate(); summarize()``) including ``COCO.loadRes``: the same IoU/OKS values
bit for bit, the same greedy matching, the same 101-point interpolated
precision. Where pycocotools loops in Python over every (image, category, area
range, IoU threshold, detection, ground truth), this module works on whole
arrays:

* IoU (bbox) and OKS (keypoints) for every (detection, ground truth) pair of
  every (image, category) at once (OKS over per-category keypoint tables, in
  chunks of pairs).
* Masks: compressed RLE strings are decoded and checked in one numpy pass
  (:mod:`kdet.metrics.rle`), polygons converted one ``pycocotools.mask`` call
  per image size; mask IoU (``pycocotools.mask.iou``, one call per image) only
  for pairs whose box-overlap bound reaches the lowest IoU threshold: the others
  can never match, whatever their IoU.
* Greedy matching steps through the detection rank only; each step advances
  every (image, category) group, the 4 area ranges and the 10 IoU thresholds
  together.
* Accumulation sorts all detections of a category once (one stable argsort of a
  combined (category, score rank) key) and
  reads precision at the recall thresholds with integer ``searchsorted``.

With the compiled kernels of :mod:`kdet.metrics.native` (``_cocoeval.c``, built on
install) the matching, the accumulation, OKS and the masks (RLE strings checked and
measured in one pass, polygons rasterised as pycocotools' ``rleFrPoly``, mask
IoU/area/box) run in C, one call per stage over the whole dataset, without
pycocotools; without them (or with ``KDET_NATIVE=0``) the numpy code above runs. Both
give pycocotools' numbers bit for bit.

Detections come as result dicts (:meth:`COCOEvaluator.add_detections`), as a model's
padded outputs (:meth:`COCOEvaluator.add_predictions`) or as columns
(:meth:`COCOEvaluator.add_detection_arrays`, no dict per detection).

Bad input (unknown image/category ids, non-finite or negative-size boxes,
missing keys, malformed JSON) raises ``ValueError`` naming the record.
"""
import itertools
import json
import operator
import os
import sys

import numpy as np

from kdet.metrics import native
from kdet.metrics.rle import check_counts, decode_rle_strings

__all__ = ["COCOEvaluator"]

# pycocotools' Params, built the same way: np.linspace, so index 8 is 0.8999999999999999.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
COCO_KEYPOINT_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62,
                                 1.07, 1.07, .87, .87, .89, .89]) / 10.0
DETECTION_AREA_RANGES = {"all": (0 ** 2, 1e5 ** 2), "small": (0 ** 2, 32 ** 2),
                         "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e5 ** 2)}
KEYPOINT_AREA_RANGES = {"all": (0 ** 2, 1e5 ** 2), "medium": (32 ** 2, 96 ** 2),
                        "large": (96 ** 2, 1e5 ** 2)}

# (name, is AP, IoU threshold or None for all, area label, max detections). A max
# detections of ("index", i) means params.maxDets[i], as pycocotools' summarize does;
# an int is a literal (pycocotools' AP uses maxDets=100, keypoints use 20).
_DETECTION_STATS = (
    ("AP", 1, None, "all", 100), ("AP50", 1, .5, "all", ("index", 2)),
    ("AP75", 1, .75, "all", ("index", 2)), ("APs", 1, None, "small", ("index", 2)),
    ("APm", 1, None, "medium", ("index", 2)), ("APl", 1, None, "large", ("index", 2)),
    ("AR1", 0, None, "all", ("index", 0)), ("AR10", 0, None, "all", ("index", 1)),
    ("AR100", 0, None, "all", ("index", 2)), ("ARs", 0, None, "small", ("index", 2)),
    ("ARm", 0, None, "medium", ("index", 2)), ("ARl", 0, None, "large", ("index", 2)),
)
_KEYPOINT_STATS = (
    ("AP", 1, None, "all", 20), ("AP50", 1, .5, "all", 20), ("AP75", 1, .75, "all", 20),
    ("APm", 1, None, "medium", 20), ("APl", 1, None, "large", 20),
    ("AR", 0, None, "all", 20), ("AR50", 0, .5, "all", 20), ("AR75", 0, .75, "all", 20),
    ("ARm", 0, None, "medium", 20), ("ARl", 0, None, "large", 20),
)
_IOU_TYPES = ("bbox", "segm", "keypoints")
_BOX_FORMATS = ("xyxy", "yxyx", "xywh", "center_xywh", "center_yxhw",
                "rel_xyxy", "rel_yxyx", "rel_xywh", "rel_center_xywh", "rel_center_yxhw")


def _mask_api():
    try:
        from pycocotools import mask
    except ImportError as err:  # pragma: no cover - pycocotools is a dependency
        raise ImportError("iou_type='segm' needs pycocotools (pip install pycocotools)") from err
    return mask


# --------------------------------------------------------------------------- ground truth
def _read_ground_truth(ground_truth):
    """Return the COCO dict of ``ground_truth`` (a dict or a path to a JSON file)."""
    if isinstance(ground_truth, (str, os.PathLike)):
        path = os.fspath(ground_truth)
        try:
            with open(path, encoding="utf-8") as f:
                dataset = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: malformed JSON: {err}") from err
        except OSError as err:
            raise ValueError(f"{path}: cannot read ground truth: {err}") from err
        where = path
    elif isinstance(ground_truth, dict):
        dataset, where = ground_truth, "ground truth"
    else:
        raise ValueError("ground_truth must be a COCO-format dict or a path to a JSON file, "
                         f"got {type(ground_truth).__name__}")
    if not isinstance(dataset, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"{where}: missing '{key}' (a COCO ground truth needs "
                             "'images', 'annotations' and 'categories')")
        if not isinstance(dataset[key], list):
            raise ValueError(f"{where}: '{key}' must be a list, got {type(dataset[key]).__name__}")
    return dataset, where


def _column(records, key, what):
    """``[r[key] for r in records]`` with an error naming the first record without it."""
    try:
        return list(map(operator.itemgetter(key), records))  # the loop in C
    except (KeyError, TypeError):
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise ValueError(f"{what(i)}: expected a dict, got {type(r).__name__}") from None
            if key not in r:
                raise ValueError(f"{what(i)}: missing key '{key}'") from None
        raise


# np.asarray(..., float64) also converts True, None (to NaN) and numeric strings ("0.5"):
# a record holding those is a caller's bug, not a number.
_NUMBER_TYPES = frozenset({int, float, np.float64, np.float32, np.float16, np.int64, np.int32,
                           np.int16, np.int8, np.uint64, np.uint32, np.uint16, np.uint8})


_PLAIN_NUMBERS = frozenset({int, float})


def _show(value, limit=80):
    """``repr(value)`` for messages: shortened, and safe for ints too long to print."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than sys.get_int_max_str_digits()
        return f"<{type(value).__name__} with an integer too long to print>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _text(value):
    """``str(value)``, or :func:`_show`'s text for an int too long to print."""
    try:
        return str(value)
    except ValueError:
        return _show(value)


def _get(index, key):
    """``index.get(key, -1)``, also -1 for an unhashable key (an id that is a list)."""
    return index.get(key, -1) if _hashable(key) else -1


_PLAIN_IDS = {int, str, float}


def _plain_lookup(index, keys):
    """``index.get(k, -1)`` of every key as int64 in one ``map`` when every key is a plain
    int / str / float (the usual ids), else None (the caller looks them up one by one)."""
    if set(map(type, keys)) <= _PLAIN_IDS:
        return np.fromiter(map(index.get, keys, itertools.repeat(-1)), np.int64, len(keys))
    return None


def _lookup(index, keys):
    """``[_get(index, k) for k in keys]`` as int64."""
    out = _plain_lookup(index, keys)
    return np.array([_get(index, k) for k in keys], np.int64) if out is None else out


def _hashable(value):
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _is_number(v):
    return type(v) in _NUMBER_TYPES or (isinstance(v, (int, float, np.integer, np.floating))
                                        and not isinstance(v, bool))


def _all_numbers(row):
    if isinstance(row, np.ndarray):
        return row.dtype.kind in "iuf"
    # set(map(type, ...)) runs in C: the common all-int/float row skips the Python loop
    return isinstance(row, (list, tuple)) and (set(map(type, row)) <= _NUMBER_TYPES
                                               or all(map(_is_number, row)))


def _all_rows_numbers(rows):
    """``all(map(_all_numbers, rows))``, one set of element types for lists of lists."""
    if set(map(type, rows)) <= {list, tuple} and set(
            map(type, itertools.chain.from_iterable(rows))) <= _NUMBER_TYPES:
        return True
    return all(map(_all_numbers, rows))


def _float_rows(values, width, key, what):
    """Stack ``values`` into a float64 ``[N, width]`` array, naming the first bad record."""
    # The usual input, lists of `width` Python numbers: checked by type and length sets
    # (loops in C) and read by one fromiter, ~3x cheaper than np.asarray of the lists.
    try:
        if (set(map(type, values)) <= {list, tuple} and set(map(len, values)) == {width}
                and set(map(type, itertools.chain.from_iterable(values))) <= _PLAIN_NUMBERS):
            return np.fromiter(itertools.chain.from_iterable(values), np.float64,
                               len(values) * width).reshape(len(values), width)
    except (TypeError, OverflowError):
        pass
    try:
        arr = np.asarray(values, dtype=np.float64)
        if (arr.ndim == 2 and arr.shape[1] == width and _all_rows_numbers(values)
                or len(values) == 0):
            return arr.reshape(len(values), width)
    except (ValueError, TypeError, OverflowError):
        pass
    for i, v in enumerate(values):
        try:
            ok = np.asarray(v, dtype=np.float64).shape == (width,) and _all_numbers(v)
        except (ValueError, TypeError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"{what(i)}: '{key}' must be {width} numbers, got {_show(v)}")
    raise ValueError(f"'{key}' values are not {width} numbers")  # pragma: no cover


def _float_values(values, key, what):
    """``values`` as a float64 vector, naming the first record that is not a number."""
    try:
        if set(map(type, values)) <= _PLAIN_NUMBERS:  # the usual input: no Python loop
            return np.fromiter(values, np.float64, len(values))
    except (TypeError, OverflowError):
        pass
    try:
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape == (len(values),) and all(map(_is_number, values)):
            return arr
    except (ValueError, TypeError, OverflowError):
        pass
    for i, v in enumerate(values):
        # an int past float range is no usable number; NaN and inf are reported later
        if not _is_number(v) or isinstance(v, int) and abs(v) > sys.float_info.max:
            raise ValueError(f"{what(i)}: '{key}' must be a number, got {_show(v)}")
    raise ValueError(f"'{key}' values are not numbers")  # pragma: no cover


def _check_boxes(boxes, what, valid=None):
    """Reject NaN/inf and negative width/height in ``[N, 4]`` xywh ``boxes``."""
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if valid is not None:
        bad &= valid
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        problem = "is not finite" if not np.isfinite(boxes[i]).all() else "has negative size"
        raise ValueError(f"{what(i)}: bbox {boxes[i].tolist()} {problem}")


def _to_rle(segmentation, height, width, what):
    """COCO.annToRLE: polygons and uncompressed RLE -> compressed RLE of ``height x width``."""
    mask_api = _mask_api()
    problem = _segmentation_crash(segmentation, height, width)
    if problem:
        raise ValueError(f"{what}: bad segmentation: {problem}")
    try:
        if isinstance(segmentation, list):
            rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            if isinstance(segmentation["counts"], list):
                rle = mask_api.frPyObjects(segmentation, height, width)
            else:
                rle = segmentation
        else:
            raise ValueError("expected polygons or an RLE dict with 'size' and 'counts'")
        size = [int(s) for s in rle["size"]]
    except ValueError as err:
        raise ValueError(f"{what}: bad segmentation: {err}") from err
    except Exception as err:  # pycocotools also raises bare Exception('input type ...')
        raise ValueError(f"{what}: bad segmentation ({type(err).__name__}: {err})") from err
    if size != [height, width]:
        raise ValueError(f"{what}: segmentation size {size} differs from the image size "
                         f"[{height}, {width}]")
    return rle


_ABSENT = object()  # a record without 'segmentation'


def _to_rles(segmentations, heights, widths, what):
    """:func:`_to_rle` of every segmentation (``_ABSENT`` becomes ``None``) in batches:
    compressed RLE dicts checked together, polygons converted one pycocotools call per
    image size. The others, and any that fail a check, go one at a time (which raises
    the error naming the first bad record).

    With the C kernels (:func:`_read_masks`) also the masks' areas and boxes (NaN where
    not measured) and the checked strings as read (:class:`_Masks`' ``text``): returns
    ``(rles, area, box, text)``; without them ``(rles, None, None, None)``.
    """
    if native.library() is not None:
        masks = _read_masks(segmentations, heights, widths, what)
        out = masks.rles
        if len(masks.polygons):  # polygons rasterised in C: their compressed strings
            for i, text in zip(masks.polygons.tolist(), native.encode_rles(masks.polygon_rles)):
                out[i] = {"size": [int(heights[i]), int(widths[i])], "counts": text}
        return out, masks.area, masks.box, masks.text
    return _to_rles_numpy(segmentations, heights, widths, what), None, None, None


class _Masks:
    """What :func:`_read_masks` found: ``rles`` (the checked compressed RLE dicts, the
    input's; ``None`` for polygons and absent ones), ``polygons`` (indices) and their
    :class:`kdet.metrics.native.Rles` ``polygon_rles``, ``area`` / ``box`` (NaN where
    not measured), ``text``: None, or ``(text, spans)``, the strings read in C back to
    back (uint8) and ``[N, 2]`` (start, end) of each segmentation's there, -1 for those
    not among them (polygons, strings checked in Python), so that they are decoded later
    without reading the dicts again."""


def _read_masks(segmentations, heights, widths, what):
    """Checks and measures segmentations with the C kernels, without pycocotools.

    Compressed RLE strings: checked (the same verdict as :func:`decode_rle_strings` and
    :func:`check_counts`) and measured in one C pass; polygons: rasterised in C as
    pycocotools' ``frPyObjects`` + ``merge``, bit for bit. Anything else, or any
    segmentation that fails a check, goes through :func:`_to_rle` one at a time (which
    raises naming the record, or converts odd input as pycocotools does).
    """
    n = len(segmentations)
    masks = _Masks()
    masks.rles = list(segmentations)
    masks.area, masks.box = np.full(n, np.nan), np.full((n, 4), np.nan)
    good = np.zeros(n, bool)
    strings, checked, polygons, text = _mask_columns(masks.rles, heights, widths)
    masks.text = None
    if len(strings):
        h, w = heights[strings].astype(np.int64), widths[strings].astype(np.int64)
        status, masks.area[strings], masks.box[strings] = checked
        exact = np.flatnonzero(status == 2)  # numbers too long for C's int64 reading
        ok = status == 0
        if len(exact):
            counts, offsets, decoded = decode_rle_strings(
                [segmentations[i]["counts"] for i in strings[exact].tolist()])
            ok[exact] = decoded & check_counts(counts, offsets, h[exact] * w[exact])
            masks.area[strings[exact]] = np.nan  # measured later, from the dicts
        good[strings] = ok
        if text is not None:
            text, text_offsets = text
            spans = np.full((n, 2), -1, np.int64)
            read = status == 0
            spans[strings[read], 0] = text_offsets[:-1][read]
            spans[strings[read], 1] = text_offsets[1:][read]
            masks.text = text, spans
    masks.polygons = np.zeros(0, np.int64)
    if polygons is not None:
        indices, coords, offsets, per_mask = polygons
        rles = native.polygons_to_rles(coords, offsets, per_mask, heights[indices],
                                       widths[indices])
        masks.polygons, masks.polygon_rles = indices, rles
        masks.area[indices], masks.box[indices] = rles.areas(), rles.boxes()
        good[indices] = True
        for i in indices.tolist():
            masks.rles[i] = None
    for i in np.flatnonzero(~good):
        masks.rles[i] = None if masks.rles[i] is _ABSENT else _to_rle(
            masks.rles[i], int(heights[i]), int(widths[i]), what(i))
    return masks


def _mask_columns(segmentations, heights, widths):
    """What :func:`_read_masks` checks, read from the list: ``(strings, checked,
    polygons, text)``. ``strings``: indices of the compressed RLEs whose size is the image's;
    ``checked``: their :func:`kdet.metrics.native.check_rle_strings` (status 2 for all
    when a string holds a character past latin-1); ``polygons``: None, or the plain
    polygons within :func:`_segmentation_crash`'s range as ``(indices, coordinates,
    offsets, polygons per mask)``; ``text``: the strings back to back and their offsets
    (uint8, int64) when read in C (``_records.c``, when it is built), else None."""
    read = native.read_segmentations(segmentations, heights, widths)
    if read is not None:
        kinds, text, text_offsets, coords, coord_offsets, per_mask = read
        strings, polygons = np.flatnonzero(kinds == 0), np.flatnonzero(kinds == 1)
        checked = native.check_rle_text(text, text_offsets, heights[strings], widths[strings]) \
            if len(strings) else None
        return strings, checked, (polygons, coords, coord_offsets, per_mask) \
            if len(polygons) else None, (text, text_offsets)
    strings, polygons = _mask_kinds(segmentations)
    checked = None
    if len(strings):
        h, w = heights[strings].astype(np.int64), widths[strings].astype(np.int64)
        sizes = _sizes_are(list(map(operator.itemgetter("size"), map(
            segmentations.__getitem__, strings.tolist()))), h, w)
        strings, h, w = strings[sizes], h[sizes], w[sizes]
        texts = [segmentations[i]["counts"] for i in strings.tolist()]
        checked = native.check_rle_strings(texts, h, w)
        if checked is None:  # a character past latin-1: the exact (numpy) check
            checked = np.full(len(strings), 2, np.uint8), np.full(len(strings), np.nan), \
                np.full((len(strings), 4), np.nan)
    if len(polygons):
        candidates = [segmentations[i] for i in polygons.tolist()]
        if not (set(map(type, itertools.chain.from_iterable(candidates))) == {list}
                and set(map(type, itertools.chain.from_iterable(
                    itertools.chain.from_iterable(candidates)))) <= _PLAIN_NUMBERS
                and all(len(c) > 0 and len(c[0]) > 4 for c in candidates)):
            polygons = polygons[[_plain_polygons(c) for c in candidates]]
    found = _polygon_coordinates(segmentations, polygons, heights, widths) \
        if len(polygons) else None
    return strings, checked, found, None


def _mask_kinds(segmentations):
    """Indices of the RLE dicts with string counts and a size, and of the lists (polygon
    candidates). Exact types: subclasses go one at a time. All RLE strings (detections)
    or all lists are told by a few passes in C; a mix by one Python loop."""
    n = len(segmentations)
    kinds = set(map(type, segmentations))
    if kinds == {dict}:
        try:
            counts = list(map(operator.itemgetter("counts"), segmentations))
            if set(map(type, counts)) <= {str, bytes} and all(
                    map(operator.contains, segmentations, itertools.repeat("size"))):
                return np.arange(n), np.zeros(0, np.int64)
        except KeyError:
            pass
    if kinds == {list}:
        return np.zeros(0, np.int64), np.arange(n)
    strings, polygons = [], []
    for i, s in enumerate(segmentations):
        kind = type(s)
        if kind is dict:
            if type(s.get("counts")) in (str, bytes) and "size" in s:
                strings.append(i)
        elif kind is list:
            polygons.append(i)  # checked by the caller, all at once
    return np.array(strings, np.int64), np.array(polygons, np.int64)


def _sizes_are(sizes, heights, widths):
    """``[_size_is(s, h, w) ...]``; two ints each (the usual) compared in one pass."""
    if set(map(type, sizes)) <= {list, tuple} and set(map(len, sizes)) == {2} and set(
            map(type, itertools.chain.from_iterable(sizes))) == {int}:
        try:
            flat = np.fromiter(itertools.chain.from_iterable(sizes), np.int64, 2 * len(sizes))
        except OverflowError:
            flat = None
        if flat is not None:
            return (flat[0::2] == heights) & (flat[1::2] == widths)
    return np.array([_size_is(s, hi, wi) for s, hi, wi in
                     zip(sizes, heights.tolist(), widths.tolist())], bool)


def _polygon_coordinates(segmentations, indices, heights, widths):
    """The plain polygons of ``segmentations[indices]`` whose coordinates are within
    :func:`_segmentation_crash`'s range, flat: ``(kept indices, coordinates, offsets,
    polygons per mask)``; None when a value is no float (an int past float range)."""
    indices = np.asarray(indices)
    num_polygons = np.fromiter(map(len, (segmentations[i] for i in indices.tolist())),
                               np.int64, len(indices))
    flat = [p for i in indices.tolist() for p in segmentations[i]]
    lengths = np.fromiter(map(len, flat), np.int64, len(flat))
    try:
        values = np.fromiter(itertools.chain.from_iterable(flat), np.float64,
                             int(lengths.sum()))
    except OverflowError:
        return None
    owner = np.repeat(np.repeat(np.arange(len(indices)), num_polygons), lengths)
    limit = 4 * np.maximum(heights[indices], widths[indices]) + 1000
    ok = np.ones(len(indices), bool)
    ok[owner[~(np.abs(values) <= limit[owner])]] = False  # NaN too
    offsets = np.r_[0, np.cumsum(lengths)]
    if not ok.all():
        keep_poly = np.repeat(ok, num_polygons)
        values = values[np.repeat(keep_poly, lengths)]
        lengths, num_polygons, indices = lengths[keep_poly], num_polygons[ok], indices[ok]
        offsets = np.r_[0, np.cumsum(lengths)]
    return indices, values, offsets, num_polygons


def _to_rles_numpy(segmentations, heights, widths, what):
    """:func:`_to_rles` without the C kernels: numpy checks, pycocotools' conversions."""
    out = list(segmentations)
    good = np.zeros(len(out), bool)
    strings, polygons = [], []
    for i, s in enumerate(segmentations):
        if isinstance(s, dict):
            if isinstance(s.get("counts"), (str, bytes)) and "size" in s:
                strings.append(i)
        elif _plain_polygons(s):
            polygons.append(i)
    # In chunks: temporaries of a few MB are reused, larger ones are fresh memory (slow).
    for begin in range(0, len(strings), 4096):
        chunk = strings[begin:begin + 4096]
        counts, offsets, ok = decode_rle_strings([segmentations[i]["counts"] for i in chunk])
        h, w = heights[chunk].astype(np.int64), widths[chunk].astype(np.int64)
        ok &= check_counts(counts, offsets, h * w)
        good[chunk] = ok & [_size_is(segmentations[i]["size"], hi, wi)
                            for i, hi, wi in zip(chunk, h.tolist(), w.tolist())]
    if polygons:
        good[polygons] = _polygons_to_rles(segmentations, polygons, heights, widths, out)
    for i in np.flatnonzero(~good):
        out[i] = None if out[i] is _ABSENT else _to_rle(out[i], int(heights[i]),
                                                        int(widths[i]), what(i))
    return out


def _plain_polygons(segmentation):
    """A non-empty list of lists of ints/floats, the first longer than 4 (pycocotools
    reads a first polygon of 4 values as a box)."""
    return (type(segmentation) is list and len(segmentation) > 0
            and type(segmentation[0]) is list and len(segmentation[0]) > 4
            and all(type(p) is list and set(map(type, p)) <= _PLAIN_NUMBERS
                    for p in segmentation))


def _polygons_to_rles(segmentations, indices, heights, widths, out):
    """Polygons of ``segmentations[indices]`` to RLE in ``out``; False where a coordinate
    is out of :func:`_segmentation_crash`'s range (left for the one-at-a-time path)."""
    mask_api = _mask_api()
    indices = np.asarray(indices)
    num_polygons = np.array([len(segmentations[i]) for i in indices])
    flat = [p for i in indices for p in segmentations[i]]
    lengths = np.fromiter(map(len, flat), np.int64, len(flat))
    try:
        values = np.abs(np.fromiter(itertools.chain.from_iterable(flat), np.float64,
                                    int(lengths.sum())))
    except OverflowError:  # an int past float range
        return np.zeros(len(indices), bool)
    owner = np.repeat(np.repeat(np.arange(len(indices)), num_polygons), lengths)
    limit = 4 * np.maximum(heights[indices], widths[indices]) + 1000
    ok = np.ones(len(indices), bool)
    ok[owner[~(values <= limit[owner])]] = False  # NaN too
    sizes = heights[indices] * (1 << 32) + widths[indices]
    members = np.flatnonzero(ok)
    members = members[np.argsort(sizes[members], kind="stable")]
    bounds = np.flatnonzero(np.r_[True, np.diff(sizes[members]) != 0, True]) if len(members) \
        else np.zeros(1, np.int64)
    for begin, end in zip(bounds[:-1], bounds[1:]):
        group = members[begin:end]
        h, w = divmod(int(sizes[group[0]]), 1 << 32)
        rles = mask_api.frPyObjects([p for m in group for p in segmentations[indices[m]]], h, w)
        for m, k in zip(group, np.cumsum(num_polygons[group]) - num_polygons[group]):
            n = num_polygons[m]
            out[indices[m]] = rles[k] if n == 1 else mask_api.merge(rles[k:k + n])
    return ok


def _size_is(size, height, width):
    try:
        return [int(s) for s in size] == [height, width]
    except (TypeError, ValueError, OverflowError):
        return False


def _segmentation_crash(segmentation, height, width):
    """Input pycocotools' C code would crash on (SIGSEGV, not an exception), or ``None``.

    Polygon coordinates past ~4e8 overflow an int; RLE runs that do not add up to
    ``height * width`` write past the mask. Anything else goes to pycocotools as is
    (its own reading of odd input, e.g. 4-value "polygons" as boxes, is kept).
    """
    from kdet.data.coco import rle_string_counts

    if isinstance(segmentation, list):
        limit = 4 * max(height, width) + 1000
        for polygon in segmentation:
            if not (isinstance(polygon, (list, tuple)) and all(
                    _is_number(v) and abs(v) <= limit for v in polygon)):
                return (f"polygon {_show(polygon)} is not a list of numbers within +-{limit} "
                        "(4 x the image size + 1000)")
        return None
    if isinstance(segmentation, dict) and "counts" in segmentation:
        counts = segmentation["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("latin-1")
        if isinstance(counts, str):
            counts = rle_string_counts(counts)
        elif not (isinstance(counts, list) and all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in counts)):
            counts = None
        if counts is None or min(counts, default=0) < 0 or sum(counts) != height * width:
            return (f"RLE counts do not decode to {height} x {width} = {height * width} pixels")
    return None


def _unmeasurable_keypoints(rows):
    """Which keypoint rows (float64 ``[N, 3 K]``) have a visibility that is not finite or a
    labelled keypoint (v > 0) whose x or y is not."""
    x, y, v = rows[:, 0::3], rows[:, 1::3], rows[:, 2::3]
    off = (v > 0) & ~(np.isfinite(x) & np.isfinite(y))
    return ~np.isfinite(v).all(1) | off.any(1)


class _GroundTruth:
    """The ground truth as arrays, annotations sorted by (image, category, file order).

    That order is pycocotools' ``_gts[img, cat]`` order (``getAnnIds`` walks images
    in sorted id order, each image's annotations in file order).
    """

    def __init__(self, ground_truth, iou_type):
        dataset, where = _read_ground_truth(ground_truth)
        images, categories, anns = dataset["images"], dataset["categories"], dataset["annotations"]

        image_ids = _column(images, "id", lambda i: f"{where}: images[{i}]")
        self.image_ids = self._sorted_unique(image_ids, f"{where}: image")
        self.image_index = {img_id: i for i, img_id in enumerate(self.image_ids)}
        self.heights = np.zeros(len(images), np.int64)
        self.widths = np.zeros(len(images), np.int64)
        self.has_size = np.zeros(len(images), bool)
        for k, img in enumerate(images):
            if "height" in img and "width" in img:
                size = [img["height"], img["width"]]
                if not all(_is_number(v) and 0 < v < 2 ** 31 and v == int(v) for v in size):
                    raise ValueError(f"{where}: images[{k}] (id={_show(img['id'])}): height/"
                                     f"width {_show(size)} are not positive integers")
                i = self.image_index[img["id"]]
                self.heights[i], self.widths[i] = int(size[0]), int(size[1])
                self.has_size[i] = True

        cat_ids = _column(categories, "id", lambda i: f"{where}: categories[{i}]")
        self.category_ids = self._sorted_unique(cat_ids, f"{where}: category")
        self.category_index = {cat_id: k for k, cat_id in enumerate(self.category_ids)}
        names = {c["id"]: _text(c.get("name", c["id"])) for c in categories}
        self.category_names = [names[c] for c in self.category_ids]

        def what(i):  # names annotation i (file order) in error messages
            ann_id = f" (id={_show(anns[i].get('id'))})" if isinstance(anns[i], dict) else ""
            return f"{where}: annotations[{i}]{ann_id}"

        needed = ["id", "image_id", "category_id", "area", "iscrowd"]
        needed += {"bbox": ["bbox"], "segm": ["segmentation"],
                   "keypoints": ["bbox", "keypoints", "num_keypoints"]}[iou_type]
        columns = {key: _column(anns, key, what) for key in needed}
        img = _lookup(self.image_index, columns["image_id"])
        cat = _lookup(self.category_index, columns["category_id"])
        for arr, key in ((img, "image_id"), (cat, "category_id")):
            if (arr < 0).any():
                i = int(np.flatnonzero(arr < 0)[0])
                raise ValueError(f"{what(i)}: {key} {_show(columns[key][i])} is not in "
                                 f"'{'images' if key == 'image_id' else 'categories'}'")
        ids = columns["id"]
        if not set(map(type, ids)) <= _PLAIN_IDS:  # else every id is hashable
            for i, ann_id in enumerate(ids):
                if not _hashable(ann_id):
                    raise ValueError(f"{what(i)}: annotation id {_show(ann_id)} is unhashable")
        if len(set(ids)) != len(ids):
            seen = set()
            for i, ann_id in enumerate(ids):
                if ann_id in seen:
                    raise ValueError(f"{what(i)}: duplicate annotation id {_show(ann_id)}")
                seen.add(ann_id)
        area = _float_values(columns["area"], "area", what)
        if not np.isfinite(area).all():
            i = int(np.flatnonzero(~np.isfinite(area))[0])
            raise ValueError(f"{what(i)}: area {columns['area'][i]!r} is not finite")

        # Stable sort into (image, category, file order) groups.
        order = np.lexsort((np.arange(len(anns)), cat, img))
        self.image = img[order]
        self.category = cat[order]
        self.area = area[order]
        # pycocotools: gt['ignore'] = iscrowd (any 'ignore' field is overwritten) and
        # maskUtils.iou gets int(iscrowd).
        self.crowd = np.array([bool(c) for c in columns["iscrowd"]], bool)[order]
        # dtMatches stores the matched ground truth's id and accumulate tests it for
        # truth, so a match to an annotation with id 0 counts as no match.
        self.id_nonzero = np.array([a != 0 for a in ids], bool)[order]
        self.ignore = self.crowd.copy()
        self.describe = lambda i: what(order[i])  # names sorted annotation i
        if "bbox" in columns:
            self.bbox = _float_rows(columns["bbox"], 4, "bbox", what)[order]
            _check_boxes(self.bbox, self.describe)
        if iou_type == "segm":
            no_size = ~self.has_size[self.image]
            if no_size.any():
                i = int(order[np.flatnonzero(no_size)[0]])
                raise ValueError(f"{what(i)}: its image has no 'height'/'width' (needed for masks)")
            self.segmentation = [columns["segmentation"][i] for i in order]
            self._rles = {}

        if iou_type == "keypoints":
            num_keypoints = np.array(columns["num_keypoints"])[order]
            self.ignore = (num_keypoints == 0) | self.ignore
            self.keypoints = [columns["keypoints"][i] for i in order]
            self._keypoint_tables = {}
            self.all_keypoints = None  # read_keypoint_table's
        self.num_categories = len(self.category_ids)
        self.group_key = self.image * self.num_categories + self.category

    def read_keypoint_table(self, width):
        """Reads every annotation's keypoints as one float64 table (in C) when all are
        plain lists / tuples of ``width`` numbers; returns whether they were."""
        self.all_keypoints = native.record_rows(self.keypoints, None, width)
        return self.all_keypoints is not None

    def keypoint_table(self, category, rows):
        """The keypoints of category ``category``'s annotations ``rows`` (all of them, in
        order) as one float64 table, built once."""
        if category not in self._keypoint_tables and self.all_keypoints is not None:
            whole = len(rows) == len(self.all_keypoints)  # rows are sorted and unique
            self._keypoint_tables[category] = self.all_keypoints if whole else \
                self.all_keypoints[rows]
        if category not in self._keypoint_tables:
            keypoints = [self.keypoints[g] for g in rows.tolist()]
            first = keypoints[0] if keypoints else None  # plain rows of one width: read in C
            table = native.record_rows(keypoints, None, len(first)) \
                if type(first) in (list, tuple) else None
            self._keypoint_tables[category] = np.array(keypoints, np.float64) \
                if table is None else table
        return self._keypoint_tables[category]

    @staticmethod
    def _sorted_unique(ids, what):
        try:
            unique = sorted(set(ids))
        except TypeError as err:
            raise ValueError(f"{what} ids must be mutually comparable: {err}") from err
        if len(unique) != len(ids):
            seen = set()
            for i in ids:
                if i in seen:
                    raise ValueError(f"{what} id {_show(i)} appears twice")
                seen.add(i)
        return unique

    def rles(self, indices):
        """Compressed RLEs of (sorted) annotations ``indices``, converted on first use."""
        missing = np.setdiff1d(indices, np.fromiter(self._rles, np.int64, len(self._rles)))
        if len(missing):
            img = self.image[missing]
            converted = _to_rles_numpy([self.segmentation[i] for i in missing],
                                       self.heights[img], self.widths[img],
                                       lambda k: self.describe(missing[k]))
            self._rles.update(zip(missing.tolist(), converted))
        return [self._rles[i] for i in np.asarray(indices).tolist()]

    def decoded_masks(self, indices):
        """The masks of (sorted) annotations ``indices`` decoded (C kernels only): polygons
        rasterised and RLE strings decoded in C, odd input through :func:`_to_rle`.

        Returns ``[(rows, rles)]``: ``rles`` (:class:`kdet.metrics.native.Rles`) holds the
        masks of ``indices[rows]``; the rasterised polygons are one part, the rest
        another (no copy of the polygons' runs into one array).
        """
        indices = np.asarray(indices, np.int64)
        img = self.image[indices]
        heights, widths = self.heights[img], self.widths[img]
        masks = _read_masks([self.segmentation[i] for i in indices.tolist()], heights, widths,
                            lambda k: self.describe(indices[k]))
        parts = []
        if len(masks.polygons):
            parts.append((masks.polygons, masks.polygon_rles))
        others = np.ones(len(indices), bool)
        others[masks.polygons] = False
        others = np.flatnonzero(others)  # checked strings and _to_rle's conversions
        if len(others):
            parts.append((others, _decode_strings(masks.text, masks.rles, others,
                                                  heights[others], widths[others])))
        return parts


# --------------------------------------------------------------------------- detections
class _Rows:
    """The rows of a table as a read-only sequence, without an array object per row
    (100k row views are ~11 MB of small objects: fresh memory on every evaluation)."""

    def __init__(self, table):
        self.table = table

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return self.table[i]

    def __iter__(self):
        return iter(self.table)


class _Detections:
    """Detections in arrival order (pycocotools' ``loadRes`` order)."""

    def __init__(self, image, category, score, bbox=None, segmentation=None, keypoints=None):
        n = len(image)
        self.image = np.asarray(image, np.int64)
        self.category = np.asarray(category, np.int64)
        self.score = np.asarray(score, np.float64)
        self.has_bbox = np.zeros(n, bool) if bbox is None else ~np.isnan(bbox[:, 0])
        self.bbox = np.full((n, 4), np.nan) if bbox is None else bbox
        self.segmentation = [None] * n if segmentation is None else segmentation
        self.keypoints = [None] * n if keypoints is None else keypoints
        # maskUtils.area / toBbox of every segmentation (C path: measured when read, NaN
        # where not: those are measured on first use)
        self.mask_area = None
        self.mask_box = None
        # [n, 3K] when every detection's keypoints are rows of it (one width)
        self.keypoint_table = None
        # (text, spans): the checked RLE strings as read in C (_Masks.text), or None
        self.mask_text = None

    def __len__(self):
        return len(self.image)

    def keypoint_rows(self, indices):
        """``np.stack`` of the keypoints of detections ``indices``."""
        if self.keypoint_table is not None:
            return self.keypoint_table[indices]
        return np.stack([self.keypoints[i] for i in np.asarray(indices).tolist()])

    @classmethod
    def concatenate(cls, chunks):
        if not chunks:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        if len(chunks) == 1:  # no copy (a copy of a large table is fresh memory: slow)
            return chunks[0]
        out = cls.__new__(cls)
        for name in ("image", "category", "score", "has_bbox", "bbox"):
            setattr(out, name, np.concatenate([getattr(c, name) for c in chunks]))
        out.segmentation = [s for c in chunks for s in c.segmentation]
        tables = [c.keypoint_table for c in chunks]
        out.mask_area = out.mask_box = None
        if any(c.mask_area is not None for c in chunks):
            out.mask_area = np.concatenate([np.full(len(c), np.nan) if c.mask_area is None
                                            else c.mask_area for c in chunks])
            out.mask_box = np.concatenate([np.full((len(c), 4), np.nan) if c.mask_box is None
                                           else c.mask_box for c in chunks])
        out.mask_text = None
        if any(c.mask_text is not None for c in chunks):
            texts = [np.zeros(0, np.uint8) if c.mask_text is None else c.mask_text[0]
                     for c in chunks]
            shift = np.cumsum([0] + [len(t) for t in texts[:-1]])
            spans = [np.full((len(c), 2), -1, np.int64) if c.mask_text is None else
                     np.where(c.mask_text[1] >= 0, c.mask_text[1] + k, -1)
                     for c, k in zip(chunks, shift)]
            out.mask_text = np.concatenate(texts), np.concatenate(spans)
        out.keypoint_table = None if any(t is None for t in tables) or len(
            {t.shape[1] for t in tables}) > 1 else np.concatenate(tables)
        out.keypoints = _Rows(out.keypoint_table) if out.keypoint_table is not None else [
            k for c in chunks for k in c.keypoints]
        return out


def _convert_boxes(boxes, source_format, heights, widths):
    """``[B, D, 4]`` boxes in a Keras box format -> absolute COCO xywh (float64)."""
    boxes = np.asarray(boxes, np.float64)
    relative = source_format.startswith("rel_")
    fmt = source_format[4:] if relative else source_format
    a, b, c, d = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    if fmt == "yxyx":
        a, b, c, d = b, a, d, c
    elif fmt == "center_yxhw":
        a, b, c, d = b, a, d, c
    if relative:
        w, h = widths[:, None].astype(np.float64), heights[:, None].astype(np.float64)
        a, b, c, d = a * w, b * h, c * w, d * h
    if fmt in ("xyxy", "yxyx"):
        return np.stack([a, b, c - a, d - b], axis=-1)
    if fmt == "xywh":
        return np.stack([a, b, c, d], axis=-1)
    return np.stack([a - c / 2, b - d / 2, c, d], axis=-1)  # center formats


# --------------------------------------------------------------------------- IoU / OKS
def _pair_box_iou(det_boxes, gt_boxes, gt_crowd):
    """IoU of aligned (detection, ground truth) xywh pairs, in maskApi.c ``bbIou``'s
    operation order so every value is bit-identical to ``maskUtils.iou``."""
    dx, dy, dw, dh = det_boxes.T
    gx, gy, gw, gh = gt_boxes.T
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    with np.errstate(over="ignore", invalid="ignore"):  # huge finite boxes: as C does
        inter = w * h
        det_area = dw * dh
        union = np.where(gt_crowd, det_area, det_area + gw * gh - inter)
    overlap = (w > 0) & (h > 0)
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


def _pair_oks(det_kpts, gt_kpts, gt_boxes, gt_area, sigmas, pair_det, pair_gt,
              chunk=1 << 14):
    """Object keypoint similarity of (detection, ground truth) pairs, as pycocotools'
    ``computeOks``.

    det_kpts ``[D, 3K]``; gt_kpts ``[G, 3K]``, gt_boxes ``[G, 4]``, gt_area ``[G]``;
    pair ``p`` is (``pair_det[p]``, ``pair_gt[p]``). Sums run over compacted rows of the
    used keypoints so they add in numpy's order for a 1-D array. Pairs go in chunks:
    temporaries of a few MB are reused, larger ones are fresh memory (slow to touch).
    """
    variances = (sigmas * 2) ** 2
    k = len(sigmas)
    xd, yd = det_kpts[:, 0::3].copy(), det_kpts[:, 1::3].copy()
    xg, yg, vg = gt_kpts[:, 0::3], gt_kpts[:, 1::3], gt_kpts[:, 2::3]
    visible = vg > 0
    k1 = np.count_nonzero(visible, axis=1)
    labelled = k1 > 0
    bx, by, bw, bh = (gt_boxes[:, i:i + 1] for i in range(4))
    x0, x1 = bx - bw, bx + bw * 2
    y0, y1 = by - bh, by + bh * 2
    # Per ground truth: the keypoints used (the labelled ones, or all) moved to the front.
    used = np.where(labelled[:, None], visible, True)
    order = np.argsort(~used, axis=1, kind="stable")
    count = np.where(labelled, k1, k)
    oks = np.zeros(len(pair_det))
    # A pair whose keypoints are far apart stays 0: every used keypoint is at least the
    # gap between the detection's keypoint box and the ground truth's (its labelled
    # keypoints' box, or the grown box) away, so e >= gap**2 / max variance / area / 2
    # (the same float operations, all monotone). OKS <= exp(-that) < 0.5: no match.
    g_lo = np.where(labelled[:, None],
                    np.stack([np.where(used, c, np.inf).min(1) for c in (xg, yg)], 1),
                    np.c_[x0, y0])
    g_hi = np.where(labelled[:, None],
                    np.stack([np.where(used, c, -np.inf).max(1) for c in (xg, yg)], 1),
                    np.c_[x1, y1])
    d_lo = np.stack([xd.min(1), yd.min(1)], 1)
    d_hi = np.stack([xd.max(1), yd.max(1)], 1)
    gap = np.maximum(np.maximum(g_lo[pair_gt] - d_hi[pair_det], d_lo[pair_det] - g_hi[pair_gt]),
                     0)
    low_e = (gap[:, 0] ** 2 + gap[:, 1] ** 2) / variances.max() / (
        gt_area[pair_gt] + np.spacing(1)) / 2
    near = np.flatnonzero(low_e <= np.log(2) + 1e-6)
    pair_det, pair_gt = pair_det[near], pair_gt[near]
    for begin in range(0, len(pair_det), chunk):
        d, g = pair_det[begin:begin + chunk], pair_gt[begin:begin + chunk]
        xdp, ydp, lab = xd[d], yd[d], labelled[g][:, None]
        # No labelled keypoint: distance to the ground truth box grown to twice its size.
        dx = np.where(lab, xdp - xg[g], np.maximum(0, x0[g] - xdp) + np.maximum(0, xdp - x1[g]))
        dy = np.where(lab, ydp - yg[g], np.maximum(0, y0[g] - ydp) + np.maximum(0, ydp - y1[g]))
        e = (dx ** 2 + dy ** 2) / variances / (gt_area[g][:, None] + np.spacing(1)) / 2
        e = np.take_along_axis(e, order[g], axis=1)
        n_used = count[g]
        for n in np.unique(n_used).tolist():
            rows = np.flatnonzero(n_used == n)
            part = e if len(rows) == len(e) and n == k else np.ascontiguousarray(e[rows, :n])
            oks[near[begin + rows]] = np.sum(np.exp(-part), axis=1) / n
    return oks


def _mask_api_chunks(function_name, rles, shape):
    """``maskUtils.<function_name>`` of compressed RLEs as float64 ``[N, *shape]``, called
    on chunks of 255 (``area`` overflows on lists of more masks)."""
    function = getattr(_mask_api(), function_name)
    return np.concatenate([np.zeros((0,) + shape)] + [
        np.asarray(function(rles[i:i + 255]), np.float64).reshape((-1,) + shape)
        for i in range(0, len(rles), 255)])


def _decode_strings(text, rles, indices, heights, widths):
    """The checked compressed RLE dicts ``rles[i]`` of ``indices`` decoded in C: from the
    strings as :func:`_read_masks` read them (``text``: its ``(text, spans)``) where all
    are there, else (or ``text`` None) read from the dicts again."""
    if text is not None:
        text, spans = text
        spans = spans[indices]
        if (spans[:, 0] >= 0).all():
            return native.decode_rle_spans(text, spans[:, 0], spans[:, 1], heights, widths)
    return native.DecodedRles([rles[i] for i in np.asarray(indices).tolist()], heights, widths)


def _mask_boxes(rles):
    """``maskUtils.toBbox`` of compressed RLEs, float64 ``[N, 4]``."""
    return _mask_api_chunks("toBbox", rles, (4,))


def _mask_areas(rles):
    """``maskUtils.area`` of compressed RLEs, float64 ``[N]``."""
    return _mask_api_chunks("area", rles, ())


# --------------------------------------------------------------------------- matching
def _greedy_match(pair_iou, pair_start, group_first, group_ndet, group_gt_first, group_ngt,
                  gt_ignore, gt_crowd, gt_id_nonzero, num_dets, thresholds):
    """pycocotools' ``evaluateImg`` matching for every group, area range and threshold.

    Each detection (in score order) takes, among ground truths not yet matched (crowd
    ones stay available), the best IoU >= threshold, ties going to the later ground
    truth; an ignored ground truth only when no regular one qualifies. Groups are
    bucketed by ground-truth count (padded to a power of two) and advanced one
    detection rank at a time, all groups, area ranges and thresholds together.

    Returns ``matched[num_dets, A, T]`` (matched to a ground truth whose id is not 0)
    and ``matched_ignored[num_dets, A, T]`` (matched to an ignored ground truth).
    """
    num_areas, num_thr = gt_ignore.shape[1], len(thresholds)
    matched_out = np.zeros((num_dets, num_areas, num_thr), bool)
    ignored_out = np.zeros((num_dets, num_areas, num_thr), bool)
    # Groups with one ground truth need no steps: at each threshold the first detection
    # at or above it takes it (every such detection, if it is crowd).
    single = group_ngt == 1
    if single.any():
        ndet = group_ndet[single]
        det_group = np.repeat(np.arange(len(ndet)), ndet)
        group_start = np.cumsum(ndet) - ndet
        dets = group_first[single][det_group] + np.arange(len(det_group)) - group_start[det_group]
        gt = group_gt_first[single][det_group]
        above = pair_iou[pair_start[dets]][:, None] >= thresholds[None, :]  # [n, T]
        seen = np.cumsum(above, axis=0, dtype=np.int32)  # above so far, less earlier groups'
        seen -= np.r_[np.zeros((1, num_thr), np.int32), seen][group_start][det_group]
        match = above & (gt_crowd[gt][:, None] | (seen == 1))
        matched_out[dets] = (match & gt_id_nonzero[gt][:, None])[:, None, :]
        ignored_out[dets] = match[:, None, :] & gt_ignore[gt][:, :, None]
        keep = ~single
        group_first, group_ndet = group_first[keep], group_ndet[keep]
        group_gt_first, group_ngt = group_gt_first[keep], group_ngt[keep]
    if len(group_first) == 0:
        return matched_out, ignored_out
    padded = 1 << np.ceil(np.log2(group_ngt)).astype(np.int64)
    for width in np.unique(padded):
        sel = np.flatnonzero(padded == width)
        sel = sel[np.argsort(-group_ndet[sel], kind="stable")]  # active groups form a prefix
        first, ndet = group_first[sel], group_ndet[sel]
        gt_first, ngt = group_gt_first[sel], group_ngt[sel]
        num_groups, max_det = len(sel), int(ndet[0])
        # Ground-truth tables [groups, width], padded slots point at a real annotation
        # but get IoU -inf, so they never qualify.
        slot = np.arange(width)
        real = slot[None, :] < ngt[:, None]
        gt_index = np.where(real, gt_first[:, None] + slot[None, :], gt_first[:, None])
        crowd = gt_crowd[gt_index]
        ignore = np.transpose(gt_ignore[gt_index], (0, 2, 1))[:, :, None, :]  # [g, A, 1, W]
        id_nonzero = gt_id_nonzero[gt_index]
        # IoU rows in step order: rank 0 of every group, then rank 1 of groups with >1 ...
        active = np.array([np.count_nonzero(ndet > r) for r in range(max_det)])
        offsets = np.concatenate([[0], np.cumsum(active)])
        det_group = np.repeat(np.arange(num_groups), ndet)
        det_rank = np.arange(len(det_group)) - np.repeat(np.cumsum(ndet) - ndet, ndet)
        det_index = first[det_group] + det_rank
        rows = np.full((len(det_index), width), -np.inf)
        row_of_det = offsets[det_rank] + det_group
        pair_rows = np.repeat(row_of_det, ngt[det_group])
        pair_slots = np.arange(len(pair_rows)) - np.repeat(
            np.cumsum(ngt[det_group]) - ngt[det_group], ngt[det_group])
        pair_index = np.repeat(pair_start[det_index], ngt[det_group]) + pair_slots
        rows[pair_rows, pair_slots] = pair_iou[pair_index]
        step_dets = np.empty(len(det_index), np.int64)
        step_dets[row_of_det] = det_index

        taken = np.zeros((num_groups, num_areas, num_thr, width), bool)
        for r in range(max_det):
            c = active[r]
            iou = rows[offsets[r]:offsets[r] + c]  # [c, W]
            above = iou[:, None, :] >= thresholds[None, :, None]  # [c, T, W]
            qualifies = (~taken[:c] | crowd[:c, None, None, :]) & above[:, None]  # [c, A, T, W]
            regular = qualifies & ~ignore[:c]
            candidates = np.where(regular.any(-1, keepdims=True), regular, qualifies)
            found = candidates.any(-1)
            score = np.where(candidates, iou[:, None, None, :], -np.inf)
            best = width - 1 - np.argmax(score[..., ::-1], axis=-1)  # last of the maxima
            g, a, t = np.nonzero(found)
            b = best[g, a, t]
            taken[g, a, t, b] = True
            dets = step_dets[offsets[r] + g]
            matched_out[dets, a, t] = id_nonzero[g, b]
            ignored_out[dets, a, t] = ignore[g, a, 0, b]
    return matched_out, ignored_out


# --------------------------------------------------------------------------- accumulate
def _score_rank(score):
    """Each score's place among the distinct scores, highest first (ties share one):
    sorting by it is sorting by ``-score``."""
    ordered = np.argsort(-score)  # any order of ties: they get one rank
    rank = np.empty(len(score), np.int64)
    if len(score):
        descending = score[ordered]
        rank[ordered] = np.cumsum(np.r_[0, descending[1:] != descending[:-1]])
    return rank


def _stable_order(major, minor):
    """``np.lexsort((minor, major))`` of non-negative int keys, by one sort where the
    keys fit: ``major * (minor.max() + 1) + minor`` with each one's position in the low
    bits, sorted as values (unique, so any sort is stable; numpy sorts int64 values
    several times faster than it argsorts them stably), the positions read back; else a
    stable argsort of the combined key, or the lexsort where even that does not fit."""
    n = len(major)
    if n == 0:
        return np.zeros(0, np.int64)
    span, major_max = int(minor.max()) + 1, int(major.max())
    if major_max >= (1 << 62) // span:
        return np.lexsort((minor, major))
    key = np.asarray(major, np.int64) * span + minor
    shift = n.bit_length()
    if (major_max * span + span) >> (62 - shift):  # no room for the positions
        return np.argsort(key, kind="stable")
    packed = (key << shift) | np.arange(n)
    packed.sort()
    return packed & ((1 << shift) - 1)


def _accumulate(category, rank, score_rank, true_pos, false_pos, num_positives, max_dets,
                num_categories, use_native=False):
    """pycocotools' ``accumulate``: precision ``[T, R, K, A, M]`` and recall ``[T, K, A, M]``.

    The evaluated detections come in (image, category, rank) order; ``score_rank``:
    :func:`_score_rank` of their scores.
    ``true_pos``/``false_pos``: ``[N, A, T]`` per evaluated detection; ``num_positives``:
    ``[K, A]`` non-ignored ground truths. Detections past a max-detections limit stay
    in the arrays as zero increments: that repeats earlier (recall, precision) points,
    which changes neither the interpolated precision nor the final recall.
    """
    # pycocotools concatenates images in id order, each in rank order, then mergesorts
    # by descending score: i.e. order by (score desc, image, rank). Sorting by category
    # first makes every category a contiguous run. The detections come in (image,
    # category, rank) order, so a stable sort by (category, score desc) keeps ties in
    # (image, rank) order: two keys instead of four, combined into one.
    order = _stable_order(category, score_rank)
    bounds = np.searchsorted(category[order], np.arange(num_categories + 1))
    if use_native:  # the same steps in C, one call for every category
        return native.accumulate(order, bounds, rank, true_pos, false_pos, num_positives,
                                 max_dets, RECALL_THRESHOLDS)
    num_areas, num_thr = num_positives.shape[1], true_pos.shape[2]
    num_rec, num_m = len(RECALL_THRESHOLDS), len(max_dets)
    precision = np.full((num_thr, num_rec, num_categories, num_areas, num_m), -1.0)
    recall = np.full((num_thr, num_categories, num_areas, num_m), -1.0)
    # Detections on the first axis: cumsum and the running max then run down columns,
    # vectorised over the (area, max-dets, threshold) rows.
    true_pos, false_pos = true_pos[order], false_pos[order]  # [N, A, T]
    sorted_rank = rank[order]
    max_dets = np.asarray(max_dets)
    for k in range(num_categories):
        npig = num_positives[k]  # [A]
        has_gt = npig > 0
        if not has_gt.any():
            continue  # -1: no ground truth for this category
        start, stop = bounds[k], bounds[k + 1]
        n = stop - start
        if n == 0:
            precision[:, :, k, has_gt, :] = 0
            recall[:, k, has_gt, :] = 0
            continue
        # Max-dets limits above every rank of the category cut nothing: those give
        # equal results, computed once (the M' distinct cuts), then copied.
        ranks = sorted_rank[start:stop]
        limits, expand = np.unique(np.minimum(max_dets, ranks.max() + 1), return_inverse=True)
        num_cuts = len(limits)
        rows = np.arange(num_areas * num_cuts * num_thr)
        row_area = rows // (num_cuts * num_thr)
        valid = (ranks[:, None] < limits[None, :])[:, None, :, None]  # [n, 1, M', 1]
        # int32 counts: half the memory traffic of int64 (n < 2**31 detections)
        tp = np.cumsum(true_pos[start:stop, :, None, :] & valid, axis=0, dtype=np.int32)
        fp = np.cumsum(false_pos[start:stop, :, None, :] & valid, axis=0, dtype=np.int32)
        tp_f = tp.astype(np.float64)
        pr = fp.astype(np.float64)
        pr += tp_f
        pr += np.spacing(1)
        np.divide(tp_f, pr, out=pr)  # tp / (fp + tp + eps), pycocotools' operation order
        pr = np.maximum.accumulate(pr[::-1], axis=0)[::-1]  # monotone from the right
        with np.errstate(divide="ignore", invalid="ignore"):
            rc_last = tp_f[-1][:, expand] / npig[:, None, None]  # [A, M, T]
        recall[:, k, has_gt, :] = rc_last[has_gt].transpose(2, 0, 1)
        # searchsorted(rc, recThrs, 'left') with rc = tp / npig, done exactly on the
        # integer tp: the least count whose float tp / npig reaches each threshold.
        needed = np.zeros((num_areas, num_rec), np.int64)
        for a in np.flatnonzero(has_gt):
            needed[a] = np.searchsorted(np.arange(npig[a] + 1) / npig[a], RECALL_THRESHOLDS,
                                        side="left")
        needed = np.minimum(needed, n + 1)
        # One searchsorted over all rows: row r's counts are shifted by r * (n + 2).
        keys = (tp.reshape(n, -1).T + (rows * (n + 2))[:, None]).ravel()
        queries = needed[row_area] + (rows * (n + 2))[:, None]  # [A*M*T, R]
        pos = np.searchsorted(keys, queries.ravel(), side="left").reshape(queries.shape)
        pos -= (rows * n)[:, None]
        q = np.where(pos < n, pr.reshape(n, -1)[np.minimum(pos, n - 1), rows[:, None]], 0.0)
        q = q.reshape(num_areas, num_cuts, num_thr, num_rec)[:, expand]
        q = q.transpose(2, 3, 0, 1)  # [T, R, A, M]
        precision[:, :, k, has_gt, :] = q[:, :, has_gt, :]
    return precision, recall


def _summarize_one(precision, recall, iou_thrs, area_labels, max_dets, ap, iou_thr, area,
                   max_det):
    """pycocotools' ``_summarize``: mean of the selected entries > -1, else -1."""
    aind = [i for i, label in enumerate(area_labels) if label == area]
    mind = [i for i, m in enumerate(max_dets) if m == max_det]
    s = precision if ap == 1 else recall
    if iou_thr is not None:
        s = s[np.where(iou_thr == iou_thrs)[0]]
    if len(aind) == 1 and len(mind) == 1:  # the usual: a view, not a copy (same order)
        s = s[..., aind[0], mind[0]]
    else:
        s = s[:, :, :, aind, mind] if ap == 1 else s[:, :, aind, mind]
    values = s[s > -1]
    return -1 if len(values) == 0 else np.mean(values)


# --------------------------------------------------------------------------- evaluator
class COCOEvaluator:
    """COCO detection, instance-mask and keypoint metrics equal to pycocotools.

    Args:
        ground_truth: COCO-format dict, or the path of a COCO JSON file.
        iou_type: ``"bbox"``, ``"segm"`` or ``"keypoints"``.
        kpt_oks_sigmas: keypoint OKS sigmas: one array for every category, or a
            dict ``{category_id: sigmas}``. Default: the 17 COCO person sigmas.
        max_dets: max detections per image and category, pycocotools' ``maxDets``.
            Default ``(1, 10, 100)``, or ``(20,)`` for keypoints.
        area_ranges: ``{label: (min_area, max_area)}``, pycocotools' ``areaRng`` and
            ``areaRngLbl``. Default all/small/medium/large (all/medium/large for
            keypoints).

    Example:
    >>> gt = {"images": [{"id": 1, "height": 100, "width": 100}],
    ...       "categories": [{"id": 3, "name": "car"}],
    ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0,
    ...                        "bbox": [10, 10, 40, 40], "area": 1600}]}
    >>> ev = COCOEvaluator(gt)
    >>> ev.add_detections([{"image_id": 1, "category_id": 3, "bbox": [12, 10, 40, 40],
    ...                     "score": 0.9}])
    >>> round(ev.evaluate()["AP50"], 3), ev.evaluate()["per_class_AP"][3] > 0
    (1.0, True)
    """

    def __init__(self, ground_truth, iou_type="bbox", kpt_oks_sigmas=None, max_dets=None,
                 area_ranges=None):
        if iou_type not in _IOU_TYPES:
            raise ValueError(f"iou_type must be one of {_IOU_TYPES}, got {iou_type!r}")
        self.iou_type = iou_type
        keypoints = iou_type == "keypoints"
        if max_dets is None:
            max_dets = (20,) if keypoints else (1, 10, 100)
        self.max_dets = sorted(int(m) for m in max_dets)
        if not self.max_dets or min(self.max_dets) < 1:
            raise ValueError(f"max_dets must be positive integers, got {max_dets!r}")
        if not keypoints and len(self.max_dets) < 3:
            raise ValueError("bbox/segm summaries read max_dets[0..2] (as pycocotools): "
                             f"give 3 values, got {max_dets!r}")
        if area_ranges is None:
            area_ranges = KEYPOINT_AREA_RANGES if keypoints else DETECTION_AREA_RANGES
        self.area_labels = list(area_ranges)
        self.area_ranges = np.array([area_ranges[k] for k in self.area_labels], np.float64)
        if self.area_ranges.ndim != 2 or self.area_ranges.shape[1] != 2:
            raise ValueError(f"area_ranges must map labels to (min, max), got {area_ranges!r}")
        self.kpt_oks_sigmas = COCO_KEYPOINT_SIGMAS if kpt_oks_sigmas is None else kpt_oks_sigmas
        self._gt = _GroundTruth(ground_truth, iou_type)
        if keypoints:
            self._check_ground_truth_keypoints()
        self._chunks = []
        self._num_detections = 0
        self._stats = None
        self.precision = self.recall = None

    # ------------------------------------------------------------------ input
    def _check_ground_truth_keypoints(self):
        """Every annotation's keypoints: 3 values per sigma of its category, numbers, and
        each labelled one (v > 0) at finite x, y with a finite v (pycocotools would make
        an OKS of NaN, which then matches whatever follows it); raises naming the first
        annotation that is not."""
        gt, width = self._gt, self._keypoint_width()
        if width and gt.read_keypoint_table(width):  # plain rows of one width, read in C
            bad = np.flatnonzero(_unmeasurable_keypoints(gt.all_keypoints))
        else:
            bad = []
            for i, kp in enumerate(gt.keypoints):
                n = 3 * len(self._sigmas(gt.category[i]))
                if len(kp) != n:
                    raise ValueError(f"{gt.describe(i)}: keypoints has {len(kp)} values, "
                                     f"expected {n} (3 per sigma)")
                try:
                    row = np.asarray(kp, np.float64).reshape(1, n)
                except (TypeError, ValueError):
                    raise ValueError(f"{gt.describe(i)}: keypoints {_show(kp)} are not all "
                                     "numbers") from None
                if _unmeasurable_keypoints(row)[0]:
                    bad.append(i)
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{gt.describe(i)}: a labelled keypoint (v > 0) is not at finite "
                             f"x, y, or a visibility is not finite: {_show(gt.keypoints[i])}")

    def _sigmas(self, category_index):
        sigmas = self.kpt_oks_sigmas
        if isinstance(sigmas, dict):
            cat_id = self._gt.category_ids[category_index]
            if cat_id not in sigmas:
                raise ValueError(f"kpt_oks_sigmas has no entry for category {cat_id!r}")
            sigmas = sigmas[cat_id]
        return np.asarray(sigmas, np.float64)

    def reset_detections(self):
        """Forget every detection added so far (the ground truth stays)."""
        self._chunks = []
        self._num_detections = 0
        self._stats = None

    def add_detections(self, detections):
        """Add COCO result dicts ``{"image_id", "category_id", "bbox" | "segmentation" |
        "keypoints", "score"}`` (the list ``COCO.loadRes`` takes)."""
        with native.ordinary_pages():
            self._add_detections(detections)

    def _add_detections(self, detections):
        if not isinstance(detections, (list, tuple)):
            raise ValueError(f"detections must be a list of dicts, got {type(detections).__name__}")
        if len(detections) == 0:
            return
        start = self._num_detections
        what = lambda i: f"detection #{start + i}" + (  # noqa: E731
            f" (image_id={_show(detections[i].get('image_id'))}, "
            f"category_id={_show(detections[i].get('category_id'))})"
            if isinstance(detections[i], dict) else "")
        gt = self._gt
        if not isinstance(detections, list):
            detections = list(detections)  # the C reader takes lists
        needed = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[self.iou_type]
        # the C reader reads plain records in one pass (ids, score, the boxes, keypoint
        # rows of the one width every category has, whether any record holds a box and
        # any keypoint record a mask); on anything else it returns None and the Python
        # code below reads them, naming the first bad record
        keypoint_width = self._keypoint_width() if needed == "keypoints" else None
        flag_keys = {"bbox": (), "segmentation": ("bbox",),
                     "keypoints": ("bbox", "segmentation")}[needed]
        fast = native.record_detections(
            detections, gt.image_index, gt.category_index,
            "keypoints" if keypoint_width else "bbox" if needed == "bbox" else None,
            keypoint_width or 4, None if needed == "bbox" else "bbox", flag_keys)
        keypoint_block = any_bbox = has_segmentation = None
        if fast is not None:
            image, category, score, rows, bbox, flags = fast
            any_bbox, has_segmentation = (flags + (None, None))[:2]
            if needed == "bbox":
                bbox = rows
            elif keypoint_width:
                keypoint_block = rows
        else:
            bbox = None
            image = self._indices(_column(detections, "image_id", what), gt.image_index,
                                  "image_id", "ground truth images", what)
            category = self._indices(_column(detections, "category_id", what),
                                     gt.category_index, "category_id",
                                     "ground truth categories", what)
            score = _float_values(_column(detections, "score", what), "score", what)
        if not np.isfinite(score).all():
            i = int(np.flatnonzero(~np.isfinite(score))[0])
            value = detections[i]["score"]
            problem = "is not finite" if isinstance(value, (int, float, np.number)) else \
                "must be a number"
            raise ValueError(f"{what(i)}: score {_show(value)} {problem}")
        # raises naming the first record without the key (the C reader saw them all)
        column = None if bbox is not None and needed == "bbox" or keypoint_block is not None \
            else _column(detections, needed, what)
        if bbox is not None:
            _check_boxes(bbox, what)
        else:
            if needed == "bbox":
                has_bbox = np.ones(len(detections), bool)
            elif any_bbox is False:  # the C reader saw no record with a box
                has_bbox = np.zeros(len(detections), bool)
            else:
                has_bbox = np.array(["bbox" in d for d in detections])
            bbox = np.full((len(detections), 4), np.nan)
            if has_bbox.any():
                rows = np.flatnonzero(has_bbox)
                values = column if needed == "bbox" else [detections[i]["bbox"] for i in rows]
                bbox[rows] = _float_rows(values, 4, "bbox", lambda j: what(rows[j]))
                _check_boxes(bbox, what, valid=has_bbox)
        segmentation = keypoints = None
        mask_area = mask_box = None
        if has_segmentation is None and self.iou_type == "keypoints":
            has_segmentation = any("segmentation" in d for d in detections)
        if self.iou_type == "segm" or has_segmentation:
            segmentation, mask_area, mask_box, mask_text = _to_rles(
                column if needed == "segmentation" else
                [d.get("segmentation", _ABSENT) for d in detections], gt.heights[image],
                gt.widths[image], what)
        table = None
        if self.iou_type == "keypoints":
            keypoints = self._keypoint_rows(detections, category, what, keypoint_block)
            if isinstance(keypoints, np.ndarray):
                table, keypoints = keypoints, _Rows(keypoints)
        chunk = _Detections(image, category, score, bbox, segmentation, keypoints)
        chunk.keypoint_table = table
        chunk.mask_area, chunk.mask_box = mask_area, mask_box
        if self.iou_type == "segm":  # kept to decode the masks in evaluate
            chunk.mask_text = mask_text
        self._append(chunk)

    def add_detection_arrays(self, image_ids, category_ids, scores, boxes=None, keypoints=None):
        """Add detections given as columns: the result list of :meth:`add_detections`
        without building a dict per detection (what a model's predict loop already holds).

        Args:
            image_ids: ``[N]`` COCO image id of each detection.
            category_ids: ``[N]`` COCO category id of each detection.
            scores: ``[N]`` scores.
            boxes: ``[N, 4]`` COCO ``[x, y, w, h]`` boxes (needed for ``bbox``; for
                ``keypoints`` optional: they then set the areas, as ``COCO.loadRes``).
            keypoints: ``[N, 3K]`` (or ``[N, K, 3]``) ``x, y, v`` rows, for ``keypoints``.

        The same stats as :meth:`add_detections` of the equivalent records. A float64
        ``keypoints`` array is kept as it is (no copy): do not change it before
        :meth:`evaluate`.
        """
        gt = self._gt
        image_ids, category_ids = np.asarray(image_ids), np.asarray(category_ids)
        score = np.array(scores, np.float64)  # a copy: the caller's array may change
        n = len(score) if score.ndim == 1 else -1
        if n < 0 or image_ids.shape != (n,) or category_ids.shape != (n,):
            raise ValueError(f"image_ids, category_ids and scores must be [N] alike, got "
                             f"{image_ids.shape}, {category_ids.shape} and {score.shape}")
        if n == 0:
            return
        start = self._num_detections

        def what(i):
            return (f"detection #{start + i} (image_id={_show(image_ids[i].item())}, "
                    f"category_id={_show(category_ids[i].item())})")
        image = self._id_indices(image_ids, gt.image_ids, gt.image_index, "image_id",
                                 "ground truth images", what)
        category = self._id_indices(category_ids, gt.category_ids, gt.category_index,
                                    "category_id", "ground truth categories", what)
        if not np.isfinite(score).all():
            i = int(np.flatnonzero(~np.isfinite(score))[0])
            raise ValueError(f"{what(i)}: score {score[i]} is not finite")
        bbox = None
        if boxes is not None:
            bbox = np.array(boxes, np.float64)  # a copy: the caller's array may change
            if bbox.shape != (n, 4):
                raise ValueError(f"boxes must be [N, 4] = {(n, 4)}, got {bbox.shape}")
            _check_boxes(bbox, what)
        elif self.iou_type == "bbox":
            raise ValueError("iou_type='bbox' needs boxes")
        rows = None
        if self.iou_type == "keypoints":
            if keypoints is None:
                raise ValueError("iou_type='keypoints' needs keypoints")
            rows = np.ascontiguousarray(keypoints, np.float64).reshape(n, -1)  # kept, no copy
            if not np.isfinite(rows).all():
                i = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
                raise ValueError(f"{what(i)}: keypoints are not all finite")
            for k in np.unique(category).tolist():
                if rows.shape[1] != 3 * len(self._sigmas(k)):
                    i = int(np.flatnonzero(category == k)[0])
                    raise ValueError(f"{what(i)}: {rows.shape[1]} keypoint values, expected "
                                     f"{3 * len(self._sigmas(k))} (3 per sigma)")
        elif self.iou_type == "segm":
            raise ValueError("add_detection_arrays takes boxes and keypoints; masks go "
                             "through add_detections or add_predictions")
        chunk = _Detections(image, category, score, bbox, None,
                            None if rows is None else _Rows(rows))
        chunk.keypoint_table = rows
        self._append(chunk)

    @staticmethod
    def _id_indices(ids, sorted_ids, index, key, where, what):
        """Positions of the ``ids`` array in ``sorted_ids``: one searchsorted for integer
        ids (the usual), else a dict lookup each; raises naming the first unknown one."""
        if ids.dtype.kind in "iu" and sorted_ids and set(map(type, sorted_ids)) == {int}:
            try:
                table = np.array(sorted_ids, np.int64)
            except OverflowError:  # ids past int64: looked up one by one
                table = None
            if table is not None:
                out = np.searchsorted(table, ids.astype(np.int64))
                out = np.minimum(out, len(table) - 1)
                out[table[out] != ids] = -1
                if (out < 0).any():
                    i = int(np.flatnonzero(out < 0)[0])
                    raise ValueError(f"{what(i)}: {key} {_show(ids[i].item())} is not in the "
                                     f"{where}")
                return out
        return COCOEvaluator._indices(ids.tolist(), index, key, where, what)

    def _keypoint_width(self):
        """The length of every keypoint row when all categories share one set of sigmas'
        length (a list of sigmas, the usual), else None."""
        sigmas = self.kpt_oks_sigmas
        return None if isinstance(sigmas, dict) else 3 * len(np.asarray(sigmas, np.float64))

    def _keypoint_rows(self, detections, category, what, block=None):
        """Each detection's keypoints as a float64 row, checked against its sigmas:
        one array per row width (``block``: the rows the C reader read already); on any
        problem one record at a time (which raises naming the first bad record)."""
        try:
            width = {k: 3 * len(self._sigmas(k)) for k in np.unique(category).tolist()}
            keypoints = [None] * len(detections)
            if len(width) == 1:  # one width: one table
                (n,) = width.values()
                if block is None or block.shape[1] != n:
                    block = native.record_rows(detections, "keypoints", n)
                if block is None:
                    block = _float_rows([d["keypoints"] for d in detections], n,
                                        "keypoints", what)
                if not np.isfinite(block).all():
                    raise ValueError("not finite")
                return block
            row_width = np.array([width[k] for k in category.tolist()])
            for n in np.unique(row_width).tolist():
                rows = np.flatnonzero(row_width == n)
                block = _float_rows([detections[i]["keypoints"] for i in rows], n,
                                    "keypoints", what)
                if not np.isfinite(block).all():
                    raise ValueError("not finite")
                for i, row in zip(rows.tolist(), block):
                    keypoints[i] = row
            return keypoints
        except ValueError:
            pass
        keypoints = []
        for i, d in enumerate(detections):
            n = 3 * len(self._sigmas(category[i]))
            kp = _float_rows([d["keypoints"]], n, "keypoints", lambda _: what(i))[0]
            if not np.isfinite(kp).all():
                raise ValueError(f"{what(i)}: keypoints are not all finite")
            keypoints.append(kp)
        return keypoints

    @staticmethod
    def _indices(values, index, key, where, what):
        # True == 1 and hashes alike, but a bool is no id; lists are unhashable
        out = _plain_lookup(index, values)
        if out is None:
            out = np.array([index.get(v, -1) if isinstance(v, (int, str, float, np.number))
                            and not isinstance(v, (bool, np.bool_)) else -1 for v in values],
                           np.int64)
        if (out < 0).any():
            i = int(np.flatnonzero(out < 0)[0])
            raise ValueError(f"{what(i)}: {key} {_show(values[i])} is not in the {where}")
        return out

    def _append(self, chunk):
        if len(chunk):
            self._chunks.append(chunk)
            self._num_detections += len(chunk)
            self._stats = None

    def add_predictions(self, image_ids, predictions, category_ids=None,
                        bounding_box_format="xyxy", scale=None):
        """Add padded model outputs for the images ``image_ids``.

        Args:
            image_ids: ``B`` ground-truth image ids, one per batch row.
            predictions: dict of ``"boxes" [B, D, 4]``, ``"scores" [B, D]``,
                ``"labels" [B, D]`` and optionally ``"num_detections" [B]``;
                ``"masks" [B, D, H, W]`` (image space, cut to each image's size and
                thresholded at 0.5) for ``segm``, ``"keypoints" [B, D, K, 3]`` for
                ``keypoints``. NumPy arrays or backend tensors.
            category_ids: COCO category id of each contiguous label ``0..C-1``.
                Default: the sorted ground-truth category ids.
            bounding_box_format: Keras box format of ``"boxes"`` (``rel_*`` formats
                use the ground-truth image width/height).
            scale: multiplies absolute coordinates (boxes after conversion to xywh,
                keypoint x/y): a number, ``[B]``, or ``[B, 2]`` as (x scale, y scale),
                e.g. original size / network input size.

        Rows with label -1 or index >= ``num_detections`` are skipped. Records are
        built as torchvision's COCO converters do: ``bbox`` for bbox, only
        ``segmentation`` for segm, only ``keypoints`` for keypoints.
        """
        gt = self._gt
        if not isinstance(predictions, dict):
            raise ValueError(f"predictions must be a dict, got {type(predictions).__name__}")
        needed = ["scores", "labels"] + {"bbox": ["boxes"], "segm": ["masks"],
                                         "keypoints": ["keypoints"]}[self.iou_type]
        for key in needed:
            if key not in predictions:
                raise ValueError(f"predictions: missing key '{key}' (iou_type={self.iou_type!r})")
        scores = np.asarray(predictions["scores"], np.float64)
        labels = np.asarray(predictions["labels"])
        if scores.ndim != 2 or labels.shape != scores.shape:
            raise ValueError(f"predictions: 'scores' and 'labels' must both be [B, D], got "
                             f"{scores.shape} and {labels.shape}")
        batch, max_det = scores.shape
        image_ids = list(np.asarray(image_ids).tolist()) if not isinstance(image_ids, list) \
            else image_ids
        if len(image_ids) != batch:
            raise ValueError(f"predictions: {len(image_ids)} image ids for a batch of {batch}")
        image = self._indices(image_ids, gt.image_index, "image_id", "ground truth images",
                              lambda i: f"predictions row {i}")
        if not np.issubdtype(labels.dtype, np.number) or labels.dtype == bool:
            raise ValueError(f"predictions: 'labels' must be integers, got dtype {labels.dtype}")
        # compared as floats: a NaN, inf or 1e300 label cast to int64 becomes a garbage id
        labels = labels.astype(np.float64)
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            b, d = (int(x[0]) for x in np.nonzero(bad))
            raise ValueError(f"predictions row {b}, detection {d}: label {labels[b, d]} is not "
                             "an integer")
        if category_ids is None:
            category_ids = gt.category_ids
        category_ids = list(category_ids)
        valid = labels >= 0
        if "num_detections" in predictions:
            counts = np.asarray(predictions["num_detections"])
            if not np.issubdtype(counts.dtype, np.number) or counts.dtype == bool:
                raise ValueError("predictions: 'num_detections' must be integers, got dtype "
                                 f"{counts.dtype}")
            counts = counts.reshape(-1).astype(np.float64)
            if counts.shape != (batch,):
                raise ValueError(f"predictions: 'num_detections' must be [B]={batch}, "
                                 f"got {counts.shape}")
            if not (np.isfinite(counts) & (counts == np.round(counts))).all():
                raise ValueError(f"predictions: 'num_detections' {counts.tolist()} are not "
                                 "all integers")
            valid &= np.arange(max_det)[None, :] < counts[:, None]
        if (labels[valid] >= len(category_ids)).any():
            b, d = (int(x[0]) for x in np.nonzero(valid & (labels >= len(category_ids))))
            raise ValueError(f"predictions row {b}, detection {d}: label {labels[b, d]:g} "
                             f">= {len(category_ids)} category ids")
        labels = np.where(valid, labels, -1).astype(np.int64)
        label_category = self._indices(category_ids, gt.category_index, "category_id",
                                       "ground truth categories",
                                       lambda i: f"category_ids[{i}]")
        if scale is None:
            scale_xy = np.ones((batch, 2))
        else:
            scale_xy = np.asarray(scale, np.float64)
            if scale_xy.ndim == 0:
                scale_xy = np.full((batch, 2), float(scale_xy))
            elif scale_xy.shape == (batch,):
                scale_xy = np.repeat(scale_xy[:, None], 2, axis=1)
            elif scale_xy.shape != (batch, 2):
                raise ValueError(f"scale must be a number, [B] or [B, 2], got {scale_xy.shape}")
            if bounding_box_format.startswith("rel_") and self.iou_type == "bbox":
                raise ValueError("scale makes no sense with a relative box format")
        b_idx, d_idx = np.nonzero(valid)
        what = lambda i: (f"predictions row {b_idx[i]}, detection {d_idx[i]} "  # noqa: E731
                          f"(image_id={_show(image_ids[b_idx[i]])})")
        det_image = image[b_idx]
        det_category = label_category[labels[b_idx, d_idx]]
        det_score = scores[b_idx, d_idx]
        if not np.isfinite(det_score).all():
            i = int(np.flatnonzero(~np.isfinite(det_score))[0])
            raise ValueError(f"{what(i)}: score {det_score[i]} is not finite")
        bbox = segmentation = keypoints = None
        if self.iou_type == "bbox":
            if bounding_box_format not in _BOX_FORMATS:
                raise ValueError(f"bounding_box_format must be one of {_BOX_FORMATS}, "
                                 f"got {bounding_box_format!r}")
            boxes = np.asarray(predictions["boxes"])
            if boxes.shape != (batch, max_det, 4):
                raise ValueError(f"predictions: 'boxes' must be [B, D, 4]={batch, max_det, 4}, "
                                 f"got {boxes.shape}")
            xywh = _convert_boxes(boxes, bounding_box_format, gt.heights[image], gt.widths[image])
            xywh = xywh * np.tile(scale_xy, 2)[:, None, :]
            bbox = xywh[b_idx, d_idx]
            _check_boxes(bbox, what)
        elif self.iou_type == "segm":
            masks = np.asarray(predictions["masks"])
            if masks.ndim != 4 or masks.shape[:2] != (batch, max_det):
                raise ValueError(f"predictions: 'masks' must be [B, D, H, W], got {masks.shape}")
            mask_api = _mask_api()
            segmentation = []
            for i, (b, d) in enumerate(zip(b_idx, d_idx)):
                h, w = int(gt.heights[image[b]]), int(gt.widths[image[b]])
                if masks.shape[2] < h or masks.shape[3] < w:
                    raise ValueError(f"{what(i)}: mask {masks.shape[2:]} is smaller than the "
                                     f"image ({h}, {w})")
                m = np.asfortranarray(masks[b, d, :h, :w] > 0.5, dtype=np.uint8)
                segmentation.append(mask_api.encode(m))
        else:
            kpts = np.asarray(predictions["keypoints"], np.float64)
            if kpts.ndim != 4 or kpts.shape[:2] != (batch, max_det) or kpts.shape[3] != 3:
                raise ValueError(f"predictions: 'keypoints' must be [B, D, K, 3], got {kpts.shape}")
            kpts = kpts.copy()
            kpts[..., 0] *= scale_xy[:, 0, None, None]
            kpts[..., 1] *= scale_xy[:, 1, None, None]
            flat = kpts[b_idx, d_idx].reshape(len(b_idx), -1)
            if not np.isfinite(flat).all():
                i = int(np.flatnonzero(~np.isfinite(flat).all(axis=1))[0])
                raise ValueError(f"{what(i)}: keypoints are not all finite")
            for k in np.unique(det_category).tolist():  # one check per category
                if flat.shape[1] != 3 * len(self._sigmas(k)):
                    i = int(np.flatnonzero(det_category == k)[0])
                    raise ValueError(f"{what(i)}: {flat.shape[1] // 3} keypoints, but "
                                     f"{len(self._sigmas(k))} sigmas")
            keypoints = _Rows(flat)
        chunk = _Detections(det_image, det_category, det_score, bbox, segmentation, keypoints)
        if keypoints is not None:
            chunk.keypoint_table = flat
        self._append(chunk)

    # ------------------------------------------------------------------ evaluation
    def _detection_areas(self, det):
        """``COCO.loadRes``: the first result decides how every result's area is set."""
        n = len(det)
        if n == 0:
            return np.zeros(0)
        if det.has_bbox[0]:  # bbox branch: area = w * h
            if not det.has_bbox.all():
                i = int(np.flatnonzero(~det.has_bbox)[0])
                raise ValueError(f"detection #{i} has no 'bbox' but the first one has: "
                                 "COCO.loadRes then takes every area from 'bbox'")
            with np.errstate(over="ignore"):  # a huge finite box: inf, as in pycocotools
                return det.bbox[:, 2] * det.bbox[:, 3]
        if det.segmentation[0] is not None:  # segmentation branch: mask area
            # `None in` first: a C-level scan (a dict == None is False)
            missing = [i for i, s in enumerate(det.segmentation) if s is None] \
                if None in det.segmentation else []
            if missing:
                raise ValueError(f"detection #{missing[0]} has no 'segmentation' but the first "
                                 "one has: COCO.loadRes then takes every area from the mask")
            if native.library() is not None:  # the boxes too, for the IoU bound
                self._measure_masks(det)
            else:
                det.mask_area = _mask_areas(det.segmentation)
            return det.mask_area
        if det.keypoints[0] is not None:  # keypoints branch: extent of the keypoints
            if det.keypoint_table is not None:  # one width: one table
                x, y = det.keypoint_table[:, 0::3], det.keypoint_table[:, 1::3]
                return (x.max(1) - x.min(1)) * (y.max(1) - y.min(1))
            areas = np.empty(n)
            widths = np.fromiter(map(len, det.keypoints), np.int64, n)
            for width in np.unique(widths):  # categories may have their own keypoint counts
                rows = np.flatnonzero(widths == width)
                kp = det.keypoint_rows(rows)
                x, y = kp[:, 0::3], kp[:, 1::3]
                areas[rows] = (x.max(1) - x.min(1)) * (y.max(1) - y.min(1))
            return areas
        raise ValueError("detection #0 has no 'bbox', 'segmentation' or 'keypoints'")

    @staticmethod
    def _measure_masks(det):
        """Areas and boxes of the detections' masks not measured when read (C path)."""
        if det.mask_area is None:
            det.mask_area, det.mask_box = np.full(len(det), np.nan), np.full((len(det), 4), np.nan)
        todo = np.flatnonzero(np.isnan(det.mask_area))
        todo = todo[[det.segmentation[i] is not None for i in todo.tolist()]]
        if len(todo):
            det.mask_area[todo], det.mask_box[todo] = native.rle_areas_boxes(
                [det.segmentation[i] for i in todo.tolist()])

    def _pair_ious(self, det, ev, pair_det, pair_gt, pair_start, pair_count):
        """IoU/OKS of every (evaluated detection, ground truth) pair."""
        gt = self._gt
        if len(pair_det) == 0:
            return np.zeros(0)
        det_index = ev[pair_det]
        if self.iou_type == "bbox":
            if native.library() is not None:
                return native.pair_box_iou(det.bbox, det_index, gt.bbox, pair_gt, gt.crowd)
            return _pair_box_iou(det.bbox[det_index], gt.bbox[pair_gt], gt.crowd[pair_gt])
        out = np.empty(len(pair_det))
        if self.iou_type == "segm":
            return self._pair_mask_ious(det, det_index, pair_gt)
        # One ground truth and detection table per category (rows differ in length
        # between categories with their own sigmas); pairs index into them.
        categories = np.unique(det.category[ev[pair_count > 0]])
        if len(categories) == 1 and native.library() is not None:  # one table (people)
            return self._pair_oks_native(det, det_index, pair_gt, categories[0])
        categories = gt.category[pair_gt]
        for k in np.unique(categories):
            sel = np.flatnonzero(categories == k)
            if native.library() is not None:
                out[sel] = self._pair_oks_native(det, det_index[sel], pair_gt[sel], k)
                continue
            dets, pair_d = np.unique(det_index[sel], return_inverse=True)
            gts, pair_g = np.unique(pair_gt[sel], return_inverse=True)
            d_kp = det.keypoint_rows(dets)
            g_kp = np.array([gt.keypoints[g] for g in gts.tolist()], np.float64)
            out[sel] = _pair_oks(d_kp, g_kp, gt.bbox[gts], gt.area[gts], self._sigmas(k),
                                 pair_d, pair_g)
        return out

    def _pair_oks_native(self, det, det_index, pair_gt, category):
        """OKS of the pairs of one category in C, read from whole keypoint tables."""
        gt, sigmas = self._gt, self._sigmas(category)
        table = det.keypoint_table
        if table is None or table.shape[1] != 3 * len(sigmas):
            dets, det_index = np.unique(det_index, return_inverse=True)
            table = det.keypoint_rows(dets)
        rows = np.flatnonzero(gt.category == category)  # this category's ground truths
        g_kp = gt.keypoint_table(category, rows)
        contiguous = len(rows) and rows[-1] - rows[0] + 1 == len(rows)  # e.g. one category
        pair_row = pair_gt - rows[0] if contiguous else np.searchsorted(rows, pair_gt)
        return native.pair_oks(table, g_kp, gt.bbox[rows], gt.area[rows], sigmas, det_index,
                               pair_row, IOU_THRESHOLDS.min())

    def _pair_mask_ious(self, det, det_index, pair_gt, chunk_dets=8192):
        """Mask IoU (``maskUtils.iou``) of aligned pairs, left 0 where it is certainly
        below the lowest threshold: such a pair never matches, whatever its value.

        The bound: the intersection is at most the overlap of the masks' boxes, the union
        at least the larger mask (the detection's mask for a crowd ground truth).
        The pairs left go to ``maskUtils.iou`` one call per image.
        """
        gt, mask_api = self._gt, _mask_api()
        out = np.zeros(len(pair_gt))
        dets, det_of_pair = np.unique(det_index, return_inverse=True)
        gts, gt_of_pair = np.unique(pair_gt, return_inverse=True)
        if native.library() is not None:  # boxes, areas and IoU in C
            self._measure_masks(det)
            det_box, det_area = det.mask_box, det.mask_area  # every detection's
            gt_parts = gt.decoded_masks(gts)
            gt_area, gt_box = np.empty(len(gts)), np.empty((len(gts), 4))
            gt_part, gt_row = np.empty(len(gts), np.int64), np.empty(len(gts), np.int64)
            for p, (rows, rles) in enumerate(gt_parts):
                gt_area[rows], gt_box[rows] = rles.areas(), rles.boxes()
                gt_part[rows], gt_row[rows] = p, np.arange(len(rows))
            det_of_pair = dets[det_of_pair]
        else:
            gt_rles = gt.rles(gts)
            det_rles = [det.segmentation[i] for i in dets]
            det_box = _mask_boxes(det_rles)
            det_area = _mask_areas(det_rles) if det.mask_area is None else det.mask_area[dets]
            gt_box, gt_area = _mask_boxes(gt_rles), _mask_areas(gt_rles)
        d_box, g_box = det_box[det_of_pair], gt_box[gt_of_pair]
        far = np.minimum(d_box[:, :2] + d_box[:, 2:], g_box[:, :2] + g_box[:, 2:])
        overlap = np.prod(np.clip(far - np.maximum(d_box[:, :2], g_box[:, :2]), 0, None), axis=1)
        crowd = gt.crowd[pair_gt]
        union_low = np.where(crowd, det_area[det_of_pair],
                             np.maximum(det_area[det_of_pair], gt_area[gt_of_pair]))
        bound = np.divide(overlap, union_low, out=np.zeros(len(out)), where=union_low > 0)
        todo = np.flatnonzero(bound >= IOU_THRESHOLDS.min())
        if len(todo) == 0:
            return out
        if native.library() is not None:
            # Only the masks of pairs left are decoded, a chunk of detections at a time:
            # buffers of a few MB are reused, one of every run at once is fresh memory
            # (page faults cost more than the decoding).
            todo = todo[np.argsort(det_of_pair[todo], kind="stable")]
            pair_det, pair_gt = det_of_pair[todo], gt_of_pair[todo]
            first = np.r_[True, pair_det[1:] != pair_det[:-1]]  # sorted: each detection's
            bounds = np.flatnonzero(first)[::chunk_dets]  # first pair
            for begin, end in zip(bounds, np.r_[bounds[1:], len(todo)]):
                d_row = np.cumsum(first[begin:end]) - 1
                d_used = pair_det[begin:end][first[begin:end]]
                image = det.image[d_used]  # the sizes were checked to be the image's
                decoded = _decode_strings(det.mask_text, det.segmentation, d_used,
                                          gt.heights[image], gt.widths[image])
                g = pair_gt[begin:end]
                for p, (_, rles) in enumerate(gt_parts):
                    sel = np.flatnonzero(gt_part[g] == p)
                    out[todo[begin + sel]] = native.rle_pair_iou(
                        decoded, d_row[sel], rles, gt_row[g[sel]], crowd[todo[begin + sel]])
            return out
        # One call per image: its detections (rows) and ground truths (columns) with pairs
        # left; each pair reads its entry.
        todo = todo[np.argsort(gt.image[pair_gt[todo]], kind="stable")]
        image = gt.image[pair_gt[todo]]
        bounds = np.flatnonzero(np.r_[True, image[1:] != image[:-1], True])

        def rows_of(member, size):
            unique, position = np.unique(image * size + member, return_inverse=True)
            first = np.r_[np.searchsorted(unique, image[bounds[:-1]] * size), len(unique)]
            return unique % size, first, position

        d_unique, d_first, d_pos = rows_of(det_of_pair[todo], len(dets))
        g_unique, g_first, g_pos = rows_of(gt_of_pair[todo], len(gts))
        crowd = gt.crowd[gts].astype(np.uint8)
        for k in range(len(bounds) - 1):
            d = d_unique[d_first[k]:d_first[k + 1]]
            g = g_unique[g_first[k]:g_first[k + 1]]
            pairs = slice(bounds[k], bounds[k + 1])
            iou = mask_api.iou([det_rles[i] for i in d], [gt_rles[j] for j in g],
                               crowd[g].tolist())
            iou = np.asarray(iou).reshape(len(d), len(g))
            out[todo[pairs]] = iou[d_pos[pairs] - d_first[k], g_pos[pairs] - g_first[k]]
        return out

    def evaluate(self):
        """Run the evaluation; returns the summary stats and ``"per_class_AP"``."""
        with native.ordinary_pages():  # short-lived large temporaries: no huge-page stalls
            return self._evaluate()

    def _evaluate(self):
        gt = self._gt
        det = _Detections.concatenate(self._chunks)
        num_cat = gt.num_categories
        areas = self._detection_areas(det)
        lo, hi = self.area_ranges[:, 0], self.area_ranges[:, 1]

        # Detections per (image, category) group in descending score order (stable),
        # the first max(max_dets) of each are evaluated (computeIoU / evaluateImg).
        n = len(det)
        score_rank = _score_rank(det.score)
        # by (image, category, score desc), stable: ties in arrival order
        order = _stable_order(det.image * num_cat + det.category, score_rank)
        key = det.image[order] * num_cat + det.category[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if n else np.zeros(0, int)
        rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        keep = rank < self.max_dets[-1]
        ev, ev_rank, ev_key = order[keep], rank[keep], key[keep]
        num_ev = len(ev)

        # Pairs with every ground truth of the same group (det-major, gt in file order);
        # the ground truths looked up once per group.
        group_first = np.flatnonzero(np.r_[True, ev_key[1:] != ev_key[:-1]]) if num_ev \
            else np.zeros(0, int)
        group_ndet = np.diff(np.r_[group_first, num_ev])
        group_gt_first = np.searchsorted(gt.group_key, ev_key[group_first], side="left")
        group_gt_count = np.searchsorted(gt.group_key, ev_key[group_first],
                                         side="right") - group_gt_first
        gt_first = np.repeat(group_gt_first, group_ndet)
        pair_count = np.repeat(group_gt_count, group_ndet)
        pair_start = np.cumsum(pair_count) - pair_count
        pair_det = np.repeat(np.arange(num_ev), pair_count)
        pair_gt = (np.repeat(gt_first, pair_count) + np.arange(len(pair_det))
                   - np.repeat(pair_start, pair_count))
        pair_iou = self._pair_ious(det, ev, pair_det, pair_gt, pair_start, pair_count)

        gt_ignore = gt.ignore[:, None] | (gt.area[:, None] < lo) | (gt.area[:, None] > hi)
        with_gt = group_gt_count > 0
        groups = (pair_iou, pair_start, group_first[with_gt], group_ndet[with_gt],
                  group_gt_first[with_gt], group_gt_count[with_gt],
                  gt_ignore, gt.crowd, gt.id_nonzero, num_ev, IOU_THRESHOLDS)
        # evaluateImg: unmatched detections outside the area range are ignored.
        ev_area = areas[ev]
        outside = (ev_area[:, None] < lo) | (ev_area[:, None] > hi)  # [N, A]
        if native.library() is not None:  # matching and flags in one C pass
            true_pos, false_pos = native.match_detections(*groups, outside)
        else:
            matched, matched_ignored = _greedy_match(*groups)
            ignored = matched_ignored | (~matched & outside[:, :, None])
            true_pos = matched & ~ignored
            false_pos = ~matched & ~ignored
        num_positives = np.stack([np.bincount(gt.category[~ignored], minlength=num_cat)
                                  for ignored in gt_ignore.T], axis=1).astype(np.int64)
        self.precision, self.recall = _accumulate(
            det.category[ev], ev_rank, score_rank[ev], true_pos, false_pos, num_positives,
            self.max_dets, num_cat, use_native=native.library() is not None)

        stats_spec = _KEYPOINT_STATS if self.iou_type == "keypoints" else _DETECTION_STATS
        results, stats = {}, []
        for name, ap, iou_thr, area, max_det in stats_spec:
            if isinstance(max_det, tuple):
                max_det = self.max_dets[max_det[1]]
            value = _summarize_one(self.precision, self.recall, IOU_THRESHOLDS,
                                   self.area_labels, self.max_dets, ap, iou_thr, area, max_det)
            stats.append(value)
            results[name] = float(value)
        self._stats = np.array(stats, dtype=np.float64)
        self._stat_names = [s[0] for s in stats_spec]
        results["per_class_AP"] = self._per_class_ap()
        self._results = results
        return results

    def _per_class_ap(self):
        """AP per category over IoU 0.50:0.95, area 'all', the largest max-detections."""
        area = self.area_labels.index("all") if "all" in self.area_labels else 0
        # [K, T * R], each category's values in the order p[p > -1] lists them: a row's
        # sum is numpy's pairwise sum of that 1-D array, so the mean is np.mean's
        rows = np.moveaxis(self.precision[:, :, :, area, -1], 2, 0).reshape(
            len(self._gt.category_ids), -1)
        valid = rows > -1
        full = valid.all(1)  # a category with ground truth: every entry set
        ap = np.full(len(rows), -1.0)
        ap[full] = rows[full].sum(1) / rows.shape[1]
        for k in np.flatnonzero(~full & valid.any(1)):  # not seen from pycocotools' loops
            ap[k] = np.mean(rows[k][valid[k]])
        return dict(zip(self._gt.category_ids, ap.tolist()))

    def results(self):
        """Every detection added so far as COCO result dicts (the list ``COCO.loadRes``
        takes, e.g. to save as a ``results.json`` or to score with pycocotools), in
        arrival order. Boxes are COCO ``[x, y, w, h]`` floats, masks compressed RLE
        (``counts`` as ``str``), keypoints flat ``[x1, y1, v1, ...]``."""
        det = _Detections.concatenate(self._chunks)
        image_ids, category_ids = self._gt.image_ids, self._gt.category_ids
        out = []
        for i in range(len(det)):
            record = {"image_id": image_ids[det.image[i]],
                      "category_id": category_ids[det.category[i]],
                      "score": float(det.score[i])}
            if det.has_bbox[i]:
                record["bbox"] = [float(v) for v in det.bbox[i]]
            if det.segmentation[i] is not None:
                rle = dict(det.segmentation[i])
                if isinstance(rle.get("counts"), bytes):
                    rle["counts"] = rle["counts"].decode("ascii")
                record["segmentation"] = rle
            if det.keypoints[i] is not None:
                record["keypoints"] = [float(v) for v in np.asarray(det.keypoints[i]).ravel()]
            out.append(record)
        return out

    @property
    def stats(self):
        """The summary numbers in pycocotools' ``COCOeval.stats`` order."""
        if self._stats is None:
            raise RuntimeError("call evaluate() first")
        return self._stats

    def summary(self):
        """pycocotools-style summary lines and a per-category AP table."""
        if self._stats is None:
            self.evaluate()
        spec = _KEYPOINT_STATS if self.iou_type == "keypoints" else _DETECTION_STATS
        lines = []
        for value, (name, ap, iou_thr, area, max_det) in zip(self._stats, spec):
            if isinstance(max_det, tuple):
                max_det = self.max_dets[max_det[1]]
            title = "Average Precision  (AP)" if ap else "Average Recall     (AR)"
            iou = (f"{IOU_THRESHOLDS[0]:0.2f}:{IOU_THRESHOLDS[-1]:0.2f}" if iou_thr is None
                   else f"{iou_thr:0.2f}")
            lines.append(f" {title} @[ IoU={iou:<9} | area={area:>6s} | "
                         f"maxDets={max_det:>3d} ] = {value:0.3f}")
        names = self._gt.category_names
        width = max([len("category")] + [len(n) for n in names])
        lines.append("")
        lines.append(f" {'category':<{width}}  {'id':>5}  {'AP':>6}")
        for name, (cat_id, ap) in zip(names, self._results["per_class_AP"].items()):
            value = f"{ap:6.3f}" if ap > -1 else "   n/a"
            lines.append(f" {name:<{width}}  {str(cat_id):>5}  {value}")
        return "\n".join(lines)
