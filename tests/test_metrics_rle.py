"""kdet.metrics.rle: many COCO RLE strings decoded at once, as pycocotools' rleFrString.

The reference is kdet.data.coco.rle_string_counts (a line-by-line port of the C
decoder) and pycocotools' own encoder.
"""
import numpy as np
import pytest

from kdet.data.coco import rle_string_counts
from kdet.metrics.rle import check_counts, decode_rle_strings

mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools is the reference")


def _awkward_strings(rng):
    texts = ["", "0", "1", "P", "o", "é", "\x00", "Ā", "o" * 15 + "0", "O" * 22 + "1",
             "oooooooo1", "ooooooo1", b"52203", b"", "0" * 3]
    for _ in range(400):
        kind = rng.integers(5)
        if kind == 0:  # real masks, empty and full ones too
            h, w = rng.integers(1, 40, 2)
            m = (rng.random((h, w)) < rng.choice([0.0, 0.05, 0.5, 1.0])).astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(m))["counts"]
            texts.append(rle if rng.random() < 0.5 else rle.decode("ascii"))
        elif kind == 1:  # any characters, some outside the alphabet
            texts.append("".join(map(chr, rng.integers(30, 130, rng.integers(0, 30)))))
        elif kind == 2:  # inside the alphabet: long numbers, signs, an unfinished last one
            texts.append("".join(map(chr, rng.integers(48, 112, rng.integers(0, 60)))))
        elif kind == 3:  # numbers of 9-13 characters (the Python-integer path)
            texts.append("".join(map(chr, rng.integers(80, 112, rng.integers(8, 13)))) + "1")
        else:
            texts.append("".join(map(chr, rng.integers(48, 80, rng.integers(0, 8)))))
    return texts


@pytest.mark.parametrize("seed", [0, 1])
def test_decode_rle_strings_equals_the_one_string_decoder(seed):
    texts = _awkward_strings(np.random.default_rng(seed))
    counts, offsets, ok = decode_rle_strings(texts)
    assert len(offsets) == len(texts) + 1 and counts.dtype == np.int64
    for i, text in enumerate(texts):
        expected = rle_string_counts(text.decode("latin-1") if isinstance(text, bytes) else text)
        if expected is None or max(map(abs, expected), default=0) >= 1 << 62:
            assert not ok[i], text
            assert offsets[i] == offsets[i + 1]
        else:
            assert ok[i], text
            assert counts[offsets[i]:offsets[i + 1]].tolist() == expected, text


def test_decode_rle_strings_of_nothing():
    counts, offsets, ok = decode_rle_strings([])
    assert counts.shape == (0,) and offsets.tolist() == [0] and ok.shape == (0,)
    counts, offsets, ok = decode_rle_strings(["", ""])
    assert offsets.tolist() == [0, 0, 0] and ok.all()


def test_check_counts_wants_runs_that_add_up_to_the_mask():
    runs = [[3, 2, 7], [12], [], [5, -1, 8], [13], [0, 12], [1 << 40, 5]]
    counts = np.array([c for r in runs for c in r], np.int64)
    offsets = np.r_[0, np.cumsum([len(r) for r in runs])]
    pixels = np.array([12, 12, 12, 12, 12, 12, (1 << 40) + 5])
    expected = [min(r, default=0) >= 0 and sum(r) == p for r, p in zip(runs, pixels)]
    assert check_counts(counts, offsets, pixels).tolist() == expected
    assert check_counts(np.zeros(0, np.int64), np.zeros(1, np.int64), 4).shape == (0,)
