"""The compiled COCO evaluation kernels (``_cocoeval.c``), loaded with ctypes.

``setup.py`` builds ``kdet/metrics/_cocoeval.c`` into a shared library in
``kdet/metrics/_kernels/`` (``pip install`` / ``pip install -e .``, or ``python setup.py
build_ext --inplace`` in a checkout): a folder that is no package, so that tools
walking kdet's modules do not take the library for a Python extension module.
:mod:`kdet.metrics.coco` calls it for the matching, the accumulation, keypoint OKS and
the masks (RLE strings checked and measured, polygons rasterised, IoU) when it is
there, and falls back to its numpy code (and pycocotools' mask API) when it is not;
both give pycocotools' numbers bit for bit. ``KDET_NATIVE=0`` forces the numpy code
(the tests run both).

The C code takes plain arrays (no Python or numpy headers): each function here
converts its arguments to contiguous arrays of the C types and passes pointers.
"""
import contextlib
import ctypes
import functools
import importlib.machinery
import mmap
import operator
import os
import pathlib

import numpy as np

__all__ = ["library", "library_path", "records", "record_detections", "record_rows", "Rles",
           "DecodedRles", "decode_rle_spans", "rle_areas_boxes", "rle_pair_iou",
           "read_segmentations", "check_rle_strings", "check_rle_text",
           "polygons_to_rles", "encode_rles", "pair_box_iou", "pair_oks", "match_detections",
           "accumulate", "ordinary_pages"]

_ABI = 10  # kdet_cocoeval_abi() of the C source this file was written for
_LIBRARY_DIR = pathlib.Path(__file__).resolve().parent / "_kernels"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "kdet_cocoeval_abi": [],
    "kdet_match_detections": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,
                              _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR],
    "kdet_rle_count": [_I64, _PTR, _PTR, _PTR],
    "kdet_rle_decode": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "kdet_rle_area_bbox": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "kdet_rle_check": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "kdet_rle_encode": [_I64, _PTR, _PTR, _PTR, _PTR],
    "kdet_polygon_bounds": [_I64, _PTR, _PTR, _PTR],
    "kdet_polygons_to_rle": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "kdet_rle_union": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "kdet_rle_pair_iou": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "kdet_pair_box_iou": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "kdet_keypoint_reach": [_I64, _PTR, _I64, _PTR, _PTR],
    "kdet_oks_exponents": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64,
                           ctypes.c_double, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
    "kdet_oks_means": [_I64, _I64, _PTR, _PTR, _PTR],
    "kdet_accumulate": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64, _PTR,
                        _I64, _PTR, _PTR],
}


def library_path():
    """Path of the built library (``_cocoeval<extension suffix>``), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _LIBRARY_DIR / f"_cocoeval{suffix}"
        if path.is_file():
            return path
    return None


def library():
    """The loaded kernels (a ``ctypes.CDLL``), or None: not built, or ``KDET_NATIVE=0``."""
    return None if _disabled() else _load()


def _disabled():
    return os.environ.get("KDET_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _load():
    """The library, looked for and loaded once per process (None when not built)."""
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    if not hasattr(lib, "kdet_cocoeval_abi") or lib.kdet_cocoeval_abi() != _ABI:
        return None  # a stale build of an older source: rebuild
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, _I64
    return lib


def records():
    """The compiled reader of result dicts (``kdet/metrics/_records.c``), or None: not
    built, or ``KDET_NATIVE=0``."""
    return None if _disabled() else _load_records()


@functools.lru_cache(maxsize=None)
def _load_records():
    try:
        from kdet.metrics import _records
    except ImportError:
        return None
    return _records


def record_detections(detections, image_index, category_index, row_key=None, width=0,
                      box_key=None, flag_keys=()):
    """``(image, category, score, rows, boxes, flags)`` of result dicts, each record read
    once in C: ``image_index[d["image_id"]]``, ``category_index[d["category_id"]]`` (int64),
    ``float(d["score"])`` and ``d[row_key]`` as ``[N, width]`` float64 (``[N, 0]`` without
    ``row_key``); ``boxes``: each ``d[box_key]`` as ``[N, 4]`` float64 when every record
    holds a plain one, else (or without ``box_key``) None; ``flags``: for each of the (at
    most 4) ``flag_keys``, whether any record holds it. Or None: the reader is not built, or
    a record is not of the plain form (exact dicts, ids int / str / float in the index,
    plain int / float numbers, rows lists or tuples of ``width``); then read them in
    Python, which names the bad one."""
    reader = records()
    width = int(width) if row_key is not None else 0
    out = None if reader is None else reader.detections(
        detections, image_index, category_index, row_key, width, box_key, tuple(flag_keys))
    if out is None:
        return None
    image, category, score, rows, boxes, flags = out
    return (np.frombuffer(image, np.int64), np.frombuffer(category, np.int64),
            np.frombuffer(score, np.float64),
            np.frombuffer(rows, np.float64).reshape(len(detections), width),
            None if boxes is None else np.frombuffer(boxes, np.float64).reshape(-1, 4),
            flags)


def record_rows(detections, key, width):
    """``[N, width]`` float64 of each ``d[key]`` (``key`` None: each ``d`` itself), a list /
    tuple of ``width`` plain numbers, or None as :func:`record_detections`."""
    reader = records()
    out = None if reader is None else reader.rows(detections, key, int(width))
    if out is None:
        return None
    return np.frombuffer(out, np.float64).reshape(len(detections), int(width))


def _array(values, dtype):
    values = np.asarray(values)
    if values.dtype == bool and dtype == np.uint8:  # the same bytes: no copy
        values = values.view(np.uint8)
    return np.ascontiguousarray(values, dtype=dtype)


def _empty(shape, dtype):
    """``np.empty(shape, dtype)``; from 4 MB on, memory mapped with ordinary pages.

    numpy asks the kernel for transparent huge pages for arrays of 4 MB and more; on a
    host whose memory is fragmented a huge-page fault can stall on compaction (the LVIS
    precision array, 97 MB: 0.01 s or 0.8 s of system time from one run to the next),
    while 4 KB faults cost a steady few microseconds each. An anonymous mapping gets
    ordinary pages; the array keeps it alive and it is unmapped with the array.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < 1 << 22:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, size), dtype).reshape(shape)


@contextlib.contextmanager
def ordinary_pages():
    """numpy's arrays of 4 MB and more allocated without its transparent-huge-page advice
    while the block runs (the evaluator's temporaries live milliseconds; see
    :func:`_empty`), restored after. Measured on the 2-core VM, COCO keypoints: with the
    advice an evaluation's system time swung 0.02-0.23 s from one call to the next,
    without it 0.02-0.03. numpy's switch is private (``_set_madvise_hugepage``): where it
    is missing the block runs as is."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / 1
    switch = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if switch is None:
        yield
        return
    before = switch(False)
    try:
        yield
    finally:
        switch(before)


def _call(function, *args):
    """Call ``function`` with numpy arrays as pointers (kept alive by ``args``)."""
    c_args = [a.ctypes.data if isinstance(a, np.ndarray) else a for a in args]
    if function(*c_args) != 0:
        raise MemoryError(f"{function.__name__}: out of memory")


def _joined_text(texts):
    """``texts`` (``str`` / ``bytes``) back to back as uint8 and their int64 offsets;
    None when a ``str`` holds a character past latin-1 (no byte of the alphabet)."""
    if set(map(type, texts)) <= {str}:  # one join; a character is a byte
        try:
            data = "".join(texts).encode("latin-1")
        except UnicodeEncodeError:
            return None
    else:
        try:
            texts = [t.encode("latin-1") if isinstance(t, str) else bytes(t) for t in texts]
        except UnicodeEncodeError:
            return None
        data = b"".join(texts)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, texts), np.int64, len(texts)), out=offsets[1:])
    return np.frombuffer(data or bytes(1), np.uint8), offsets


class Rles:
    """Decoded COCO RLEs: RLE i's runs are ``counts[offsets[i]:offsets[i + 1]]`` (uint32),
    of ``heights[i] x widths[i]`` pixels; ``areas()`` and ``boxes()`` as
    ``maskUtils.area`` and ``maskUtils.toBbox``."""

    def __init__(self, counts, offsets, heights, widths):
        self.counts = np.ascontiguousarray(counts, np.uint32)
        if len(self.counts) == 0:
            self.counts = np.zeros(1, np.uint32)  # a valid pointer
        self.offsets = _array(offsets, np.int64)
        self.heights, self.widths = _array(heights, np.int64), _array(widths, np.int64)
        self._area = self._box = None

    def __len__(self):
        return len(self.heights)

    def _area_bbox(self):
        if self._area is None:
            self._area, self._box = np.empty(len(self)), np.empty((len(self), 4))
            _call(library().kdet_rle_area_bbox, len(self), self.counts, self.offsets,
                  self.heights, self.widths, self._area, self._box)
        return self._area, self._box

    def areas(self):
        return self._area_bbox()[0]

    def boxes(self):
        return self._area_bbox()[1]


class DecodedRles(Rles):
    """Compressed COCO RLEs (dicts with ``size`` and string ``counts``) decoded in C, as
    pycocotools' ``rleFrString``. The strings must be valid (checked when the detections
    and ground truths were read: :func:`check_rle_strings`)."""

    def __init__(self, rles, heights=None, widths=None):
        num = len(rles)
        if heights is None:
            heights = np.fromiter((r["size"][0] for r in rles), np.int64, num)
            widths = np.fromiter((r["size"][1] for r in rles), np.int64, num)
        read = read_segmentations(rles, heights, widths) if type(rles) is list else None
        if read is not None and (read[0] == 0).all():  # the strings read in one C pass
            text, text_offsets = read[1], read[2]
        else:
            text, text_offsets = _joined_text(list(map(operator.itemgetter("counts"), rles)))
        counts, offsets = _decode_spans(text, text_offsets[:-1], text_offsets[1:])
        super().__init__(counts, offsets, heights, widths)


def decode_rle_spans(text, starts, ends, heights, widths):
    """:class:`Rles` of checked compressed RLE strings ``text[starts[i]:ends[i]]`` (uint8,
    as :func:`read_segmentations` gives them), decoded without reading the dicts again."""
    return Rles(*_decode_spans(text, starts, ends), heights, widths)


def _decode_spans(text, starts, ends):
    """``(counts, offsets)`` of the strings ``text[starts[i]:ends[i]]`` (kdet_rle_decode)."""
    starts, ends = _array(starts, np.int64), _array(ends, np.int64)
    num = len(starts)
    size = library().kdet_rle_count(num, text.ctypes.data, starts.ctypes.data,
                                    ends.ctypes.data)
    counts = np.empty(max(size, 1), np.uint32)
    offsets = np.empty(num + 1, np.int64)
    _call(library().kdet_rle_decode, num, text, starts, ends, counts, offsets)
    return counts, offsets


def read_segmentations(items, heights, widths, key=None):
    """The masks of a list read in C (``kdet/metrics/_records.c``), each ``items[i][key]``
    (``key`` None: ``items[i]``) of ``heights[i] x widths[i]`` pixels; None when the reader
    is not built.

    Returns ``(kinds, text, text_offsets, coordinates, coordinate_offsets,
    polygons_per_mask)``: ``kinds[i]`` 0 for a compressed RLE (an exact dict, ``str`` /
    ``bytes`` counts, a size of two ints equal to the image's; string j is
    ``text[text_offsets[j]:text_offsets[j + 1]]``), 1 for plain polygons within
    ``kdet.metrics.coco._segmentation_crash``'s range (as :func:`polygons_to_rles` takes
    them), 2 for anything else (read in Python).
    """
    reader = records()
    if reader is None:
        return None
    heights = np.ascontiguousarray(heights, np.int64).tobytes()
    widths = np.ascontiguousarray(widths, np.int64).tobytes()
    kinds, text, text_ends, coords, polygon_ends, per_mask = reader.segmentations(
        items, key, heights, widths)
    starts = np.zeros(1, np.int64)
    return (np.frombuffer(kinds, np.uint8), np.frombuffer(text or bytes(1), np.uint8),
            np.concatenate([starts, np.frombuffer(text_ends, np.int64)]),
            np.frombuffer(coords, np.float64),
            np.concatenate([starts, np.frombuffer(polygon_ends, np.int64)]),
            np.frombuffer(per_mask, np.int64))


def check_rle_strings(texts, heights, widths):
    """Compressed RLE strings checked and measured in one C pass, without keeping their runs.

    Returns ``(status, area, box)``: ``status[i]`` 0 where string i decodes (as
    :func:`kdet.metrics.rle.decode_rle_strings`) to runs that are all >= 0 and add up to
    ``heights[i] * widths[i]`` (:func:`kdet.metrics.rle.check_counts`), 1 where not, 2
    where a number is longer than 12 characters (for the caller's exact reading); for
    status 0 ``area[i]`` and ``box[i]`` are ``maskUtils.area`` and ``maskUtils.toBbox``.
    None when a string holds a character past latin-1.
    """
    joined = _joined_text(texts)
    if joined is None:
        return None
    return check_rle_text(*joined, heights, widths)


def check_rle_text(text, text_offsets, heights, widths):
    """:func:`check_rle_strings` of strings back to back: string i is
    ``text[text_offsets[i]:text_offsets[i + 1]]`` (uint8)."""
    num = len(text_offsets) - 1
    status, area, box = np.empty(num, np.uint8), np.empty(num), np.empty((num, 4))
    _call(library().kdet_rle_check, num, text, text_offsets, _array(heights, np.int64),
          _array(widths, np.int64), status, area, box)
    return status, area, box


def polygons_to_rles(coordinates, coordinate_offsets, polygons_per_mask, heights, widths):
    """pycocotools' ``frPyObjects`` of polygons and ``merge`` of each mask's polygons, in C.

    ``coordinates``: every polygon's x, y values back to back (float64), polygon j's
    being ``coordinates[coordinate_offsets[j]:coordinate_offsets[j + 1]]``; mask i is the
    union of the next ``polygons_per_mask[i]`` (>= 1) polygons, of ``heights[i] x
    widths[i]`` pixels. Returns the masks' :class:`Rles`.
    """
    lib = library()
    xy = _array(coordinates, np.float64)
    if len(xy) == 0:
        xy = np.zeros(1)
    xy_offsets = _array(coordinate_offsets, np.int64)
    per_mask = _array(polygons_per_mask, np.int64)
    num_polys = len(xy_offsets) - 1
    poly_h = np.repeat(_array(heights, np.int64), per_mask)
    poly_w = np.repeat(_array(widths, np.int64), per_mask)
    bound = np.empty(num_polys, np.int64)
    total = lib.kdet_polygon_bounds(num_polys, xy.ctypes.data, xy_offsets.ctypes.data,
                                    bound.ctypes.data)
    if total < 0:
        raise MemoryError("kdet_polygon_bounds: out of memory")
    counts = _empty(max(total, 1), np.uint32)  # LVIS-scale ground truth: ~100 MB
    offsets = np.empty(num_polys + 1, np.int64)
    _call(lib.kdet_polygons_to_rle, num_polys, xy, xy_offsets, poly_h, poly_w, counts, offsets)
    if len(per_mask) == num_polys:  # one polygon a mask: nothing to unite
        return Rles(counts, offsets, heights, widths)
    united = _empty(max(int(offsets[-1]), 1), np.uint32)
    united_offsets = np.empty(len(per_mask) + 1, np.int64)
    _call(lib.kdet_rle_union, len(per_mask), per_mask, counts, offsets, united, united_offsets)
    return Rles(united, united_offsets, heights, widths)


def encode_rles(rles):
    """pycocotools' ``rleToString`` of every RLE of an :class:`Rles`: ``str`` counts."""
    num = len(rles)
    text = np.empty(max(7 * int(rles.offsets[-1]), 1), np.uint8)
    text_offsets = np.empty(num + 1, np.int64)
    _call(library().kdet_rle_encode, num, rles.counts, rles.offsets, text, text_offsets)
    joined = text[:text_offsets[-1]].tobytes().decode("ascii")
    bounds = text_offsets.tolist()
    return [joined[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def rle_areas_boxes(rles, chunk=1 << 15):
    """``maskUtils.area`` and ``maskUtils.toBbox`` of compressed RLEs, decoded in chunks
    (the decoded counts of 400k masks would take ~300 MB)."""
    area, box = np.empty(len(rles)), np.empty((len(rles), 4))
    for begin in range(0, len(rles), chunk):
        decoded = DecodedRles(rles[begin:begin + chunk])
        area[begin:begin + chunk], box[begin:begin + chunk] = decoded.areas(), decoded.boxes()
    return area, box


def pair_box_iou(det_boxes, det_index, gt_boxes, gt_index, gt_crowd):
    """``kdet.metrics.coco._pair_box_iou`` of pairs (``det_boxes[det_index[p]]``,
    ``gt_boxes[gt_index[p]]``), crowd per ground truth, in C (maskApi.c's ``bbIou``) without
    gathering the boxes."""
    out = np.empty(len(det_index))
    _call(library().kdet_pair_box_iou, len(out), _array(det_boxes, np.float64),
          _array(det_index, np.int64), _array(gt_boxes, np.float64),
          _array(gt_index, np.int64), _array(gt_crowd, np.uint8), out)
    return out


def rle_pair_iou(dets, det_index, gts, gt_index, crowd):
    """``maskUtils.iou`` of aligned (``dets[det_index[p]]``, ``gts[gt_index[p]]``) pairs of
    :class:`DecodedRles` of equal sizes; ``crowd[p]``: the ground truth is a crowd."""
    out = np.empty(len(det_index))
    _call(library().kdet_rle_pair_iou, len(out), _array(det_index, np.int64),
          _array(gt_index, np.int64), dets.counts, dets.offsets, gts.counts, gts.offsets,
          _array(crowd, np.uint8), out)
    return out


def pair_oks(det_kpts, gt_kpts, gt_boxes, gt_area, sigmas, pair_det, pair_gt, min_oks,
             chunk=1 << 16):
    """``kdet.metrics.coco._pair_oks`` in C (the same arguments, and the lowest threshold
    ``min_oks``): pycocotools' ``computeOks`` of every (detection, ground truth) pair,
    0 for pairs whose OKS is certainly below ``min_oks``.

    The exponents and the means are C; the exponentials stay numpy's ``np.exp`` (as in
    pycocotools: C's ``exp`` may differ in the last bit). In chunks of pairs, so the
    exponent buffer stays a few MB.
    """
    num_kpts = len(sigmas)
    lib = library()
    det_kpts, gt_kpts = _array(det_kpts, np.float64), _array(gt_kpts, np.float64)
    gt_boxes, gt_area = _array(gt_boxes, np.float64), _array(gt_area, np.float64)
    variances = _array((np.asarray(sigmas, np.float64) * 2) ** 2, np.float64)
    pair_det, pair_gt = _array(pair_det, np.int64), _array(pair_gt, np.int64)
    # every exp(-e) < min_oks once the least e exceeds this (1e-6: margin for rounding)
    max_exponent = -np.log(min_oks) + 1e-6
    det_reach, gt_reach = _keypoint_reach(det_kpts), _keypoint_reach(gt_kpts, gt_boxes)
    oks = np.zeros(len(pair_det))
    exponents = np.zeros((min(chunk, len(pair_det)), num_kpts))
    count = np.zeros(len(exponents), np.int64)
    near = np.zeros(len(exponents), np.int64)
    num_near = np.zeros(1, np.int64)
    means = np.zeros(len(exponents))
    for begin in range(0, len(pair_det), chunk):
        d, g = pair_det[begin:begin + chunk], pair_gt[begin:begin + chunk]
        _call(lib.kdet_oks_exponents, len(d), d, g, det_kpts, gt_kpts, gt_boxes, gt_area,
              variances, num_kpts, float(max_exponent), det_reach, gt_reach, exponents, count,
              near, num_near)
        n = int(num_near[0])  # the pairs that may match: rows 0 .. n - 1
        np.negative(exponents[:n], out=exponents[:n])
        np.exp(exponents[:n], out=exponents[:n])
        _call(lib.kdet_oks_means, n, num_kpts, exponents, count, means)
        oks[begin + near[:n]] = means[:n]
    return oks


def _keypoint_reach(keypoints, boxes=None):
    """``[N, 4]`` (x min, x max, y min, y max) of where ``kdet_oks_exponents`` measures from
    (``kdet_keypoint_reach``): all keypoints of a detection (``boxes`` None); a ground
    truth's labelled keypoints, or its box grown to 3x when none is labelled. A row with a
    NaN spans everything, so no pair of it is dropped on the bound. In C: numpy's
    temporaries of [N, K] would be fresh memory, slower to touch than the loop."""
    out = np.empty((len(keypoints), 4))
    _call(library().kdet_keypoint_reach, len(out), keypoints, keypoints.shape[1] // 3,
          None if boxes is None else boxes, out)
    return out


def match_detections(pair_iou, pair_start, group_first, group_ndet, group_gt_first,
                     group_ngt, gt_ignore, gt_crowd, gt_id_nonzero, num_dets, thresholds,
                     det_outside):
    """``kdet.metrics.coco._greedy_match`` (same arguments) and the flags that follow it:
    returns ``true_pos`` and ``false_pos``, bool ``[num_dets, A, T]``, where a detection
    matched to an ignored ground truth, or unmatched and outside the area range
    (``det_outside [num_dets, A]``) is neither."""
    num_areas, num_thr = gt_ignore.shape[1], len(thresholds)
    true_pos = _empty((num_dets, num_areas, num_thr), np.uint8)
    false_pos = _empty((num_dets, num_areas, num_thr), np.uint8)
    i64, u8 = np.int64, np.uint8
    _call(library().kdet_match_detections, len(group_first), _array(group_first, i64),
          _array(group_ndet, i64), _array(group_gt_first, i64), _array(group_ngt, i64),
          _array(pair_start, i64), _array(pair_iou, np.float64), _array(gt_ignore, u8),
          _array(gt_crowd, u8), _array(gt_id_nonzero, u8), num_areas,
          _array(thresholds, np.float64), num_thr, num_dets, _array(det_outside, u8),
          true_pos, false_pos)
    return true_pos.view(bool), false_pos.view(bool)


def accumulate(order, category_bounds, rank, true_pos, false_pos, num_positives, max_dets,
               recall_thresholds):
    """pycocotools' ``accumulate`` in C: precision ``[T, R, K, A, M]``, recall ``[T, K, A, M]``.

    ``order``: the evaluated detections sorted by (category, score descending, image,
    rank); category k's are ``order[category_bounds[k]:category_bounds[k + 1]]``.
    """
    num_cats, num_areas = num_positives.shape
    num_thr, num_rec, num_m = true_pos.shape[2], len(recall_thresholds), len(max_dets)
    precision = _empty((num_thr, num_rec, num_cats, num_areas, num_m), np.float64)
    recall = _empty((num_thr, num_cats, num_areas, num_m), np.float64)
    i64, u8 = np.int64, np.uint8
    _call(library().kdet_accumulate, num_cats, _array(order, i64), _array(category_bounds, i64),
          _array(rank, i64), _array(true_pos, u8), _array(false_pos, u8),
          _array(num_positives, i64), num_areas, num_thr, _array(max_dets, i64), num_m,
          _array(recall_thresholds, np.float64), num_rec, precision, recall)
    return precision, recall
