"""COCO run-length masks as flat numpy arrays: many masks decoded and compared at once.

A COCO RLE lists run lengths of a column-major mask, starting with a background
run. pycocotools decodes the compressed strings and intersects runs in C, one
mask (pair) per call; here every string of a batch is decoded in one array pass
(:func:`decode_rle_strings`) and the intersection areas of many (mask, mask)
pairs come from one ``searchsorted`` (:func:`pair_intersections`).
"""
import numpy as np

from kdet.data.coco import rle_string_counts

# Numbers of at most 8 characters (40 bits) and strings of at most 2**20 numbers keep
# every partial sum below 2**61: int64 arithmetic is exact. Longer ones (no real mask
# has them) are decoded one at a time with Python integers.
_MAX_DIGITS = 8
_MAX_NUMBERS = 1 << 20


def decode_rle_strings(texts):
    """Run lengths of many compressed COCO RLE strings, as pycocotools' ``rleFrString``.

    Args:
        texts: ``str`` or ``bytes`` strings.

    Returns:
        ``(counts, offsets, ok)``: string ``i``'s run lengths are
        ``counts[offsets[i]:offsets[i + 1]]`` (int64); ``ok[i]`` is False where
        :func:`kdet.data.coco.rle_string_counts` gives ``None`` (a character outside
        the alphabet, or the string ends inside a number); those have no counts.
    """
    texts = [t.decode("latin-1") if isinstance(t, bytes) else t for t in texts]
    n = len(texts)
    lengths = np.fromiter(map(len, texts), np.int64, n)
    joined = "".join(texts)
    try:  # one byte a character; 48 below '0' wraps around to >= 208: outside the alphabet
        chars = np.frombuffer(joined.encode("latin-1"), np.uint8) - np.uint8(48)
    except UnicodeEncodeError:
        chars = np.minimum(np.frombuffer(joined.encode("utf-32-le"), np.uint32) - 48, 255)
        chars = chars.astype(np.uint8)
    if len(chars) == 0:
        return np.zeros(0, np.int64), np.zeros(n + 1, np.int64), np.ones(n, bool)
    char_end = np.cumsum(lengths)
    nonempty = lengths > 0
    ok = np.ones(n, bool)
    bad = np.flatnonzero(chars >= 64)
    if len(bad):
        ok[np.searchsorted(char_end, bad, side="right")] = False
    ends = (chars & 0x20) == 0  # the last 5-bit group of a number
    last_char = char_end[nonempty] - 1
    ok[np.flatnonzero(nonempty)[~ends[last_char]]] = False  # the string ends inside a number
    ends[last_char] = True  # a number never runs into the next string
    # Most numbers are one character: x from each number's last character (5 bits, sign
    # extended, in int8); the numbers with more characters are redone in int64 below.
    # Few large temporaries: fresh memory is slow to touch.
    number_end = np.flatnonzero(ends)
    last = chars[number_end]
    x = last & 0x1F
    x ^= 0x10
    x = x.view(np.int8)
    x -= 0x10
    x = x.astype(np.int64)
    numbers_per_string = np.diff(np.r_[0, np.searchsorted(number_end, char_end, side="left")])
    continued = np.flatnonzero(~ends)  # characters with more of their number after them
    slow = np.zeros(n, bool)
    if len(continued):
        # numbers of more than one character: their last one follows a continued one
        long = np.searchsorted(number_end, np.flatnonzero(~ends[:-1] & ends[1:]) + 1)
        start = np.where(long > 0, number_end[np.maximum(long - 1, 0)] + 1, 0)
        length = number_end[long] - start + 1
        value = np.zeros(len(long), np.int64)
        for digit in range(min(int(length.max()), _MAX_DIGITS)):
            here = length > digit
            value[here] |= (chars[start[here] + digit] & 0x1F).astype(np.int64) << (5 * digit)
        negative = (last[long] & 0x10) != 0
        value[negative] -= np.int64(1) << (5 * np.minimum(length[negative], _MAX_DIGITS))
        x[long] = value
        slow[np.searchsorted(char_end, start[length > _MAX_DIGITS], side="right")] = True
    slow |= numbers_per_string > _MAX_NUMBERS
    slow &= ok
    # counts[i] = x[i] + counts[i - 2] for i > 2: running sums along the chains i = 1, 3, 5,
    # ... and i = 2, 4, 6, ... of each string. A string's numbers at even (odd) global
    # positions are one chain (and its i = 0, taken out here and put back after): one
    # cumulative sum per parity, restarted at each string by subtracting, at its first
    # element, the previous strings' total.
    first = np.cumsum(numbers_per_string) - numbers_per_string
    has_numbers = np.flatnonzero(numbers_per_string)
    zero_first = x[first[has_numbers]]
    x[first[has_numbers]] = 0
    for parity in (0, 1):
        stream = x[parity::2]
        lo = (first - parity + 1) // 2  # the stream's elements of each string: lo .. hi - 1
        hi = (first + numbers_per_string - parity + 1) // 2
        lo = lo[hi > lo]
        if len(lo) == 0:
            continue
        totals = np.add.reduceat(stream, lo)  # the runs lo .. hi - 1 are back to back
        stream[lo[1:]] -= totals[:-1]
        np.cumsum(stream, out=stream)
    x[first[has_numbers]] = zero_first
    counts = x
    # Keep the strings decoded here; the others get their counts from Python integers.
    fast = ok & ~slow
    if not fast.all():
        counts = counts[np.repeat(fast, numbers_per_string)]
        numbers_per_string = np.where(fast, numbers_per_string, 0)
    if slow.any():
        pieces, sizes = [], numbers_per_string.copy()
        for i in np.flatnonzero(slow):
            values = rle_string_counts(texts[i])
            fits = max(map(abs, values), default=0) < 1 << 62
            ok[i] = fits  # a run past 2**62 is no mask kdet can hold
            pieces.append(np.array(values if fits else [], np.int64))
            sizes[i] = len(pieces[-1])
        counts = _insert_runs(counts, numbers_per_string, np.flatnonzero(slow), pieces)
        numbers_per_string = sizes
    offsets = np.r_[0, np.cumsum(numbers_per_string)]
    return counts, offsets, ok


def _insert_runs(counts, sizes, where, pieces):
    """Splice ``pieces`` (arrays) in as the runs of strings ``where`` (which have none)."""
    parts, begin = [], 0
    ends = np.cumsum(sizes)
    for i, piece in zip(where, pieces):
        stop = ends[i]
        parts += [counts[begin:stop], piece]
        begin = stop
    parts.append(counts[begin:])
    return np.concatenate(parts)


def check_counts(counts, offsets, num_pixels):
    """Per mask: True where its runs are all >= 0 and add up to ``num_pixels`` (an array).

    pycocotools' C code writes past the mask on runs that do not add up.
    """
    n = len(offsets) - 1
    num_pixels = np.broadcast_to(np.asarray(num_pixels, np.int64), (n,))
    sizes = np.diff(offsets)
    ok = sizes >= 0
    some = np.flatnonzero(sizes > 0)
    ok[sizes == 0] = num_pixels[sizes == 0] == 0
    if len(some):
        at = offsets[some]
        low = np.minimum.reduceat(counts, at)
        high = np.maximum.reduceat(counts, at)
        # runs within [0, num_pixels]: a sum fits int64 while num_pixels < 2**42;
        # larger masks add in Python
        total = np.add.reduceat(counts, at)
        ok[some] = (low >= 0) & (high <= num_pixels[some]) & (total == num_pixels[some])
        for i in some[num_pixels[some] >= 1 << 42]:
            runs = counts[offsets[i]:offsets[i + 1]].tolist()
            ok[i] = min(runs) >= 0 and sum(runs) == int(num_pixels[i])
    return ok
