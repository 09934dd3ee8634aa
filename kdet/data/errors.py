"""Bad-input policy shared by every reader: raise, or skip/fix and count.

Readers meet two sorts of problems:

* **errors** make an image or an object unusable (missing file, inverted box,
  unknown class...). With ``on_error="raise"`` the reader stops with a
  ``ValueError`` naming the file, the record and the problem; with
  ``on_error="skip"`` it drops the image or the object and counts the kind.
* **fixes** are repaired in place in both modes and counted (a box reaching
  past the image border is clipped; a VOC ``<size>`` of 0x0 is read from the
  image file).

The counts end up in ``dataset.problems`` (a ``collections.Counter`` keyed by
the kinds below) and one warning line summarises them after loading.

    >>> log = ProblemLog("skip")
    >>> log.error("degenerate_box", "a.xml: object 0", "xmax <= xmin")
    >>> log.counts
    Counter({'degenerate_box': 1})
"""
import collections
import logging

import numpy as np

logger = logging.getLogger("kdet.data")

#: kind -> what it means; the keys of ``dataset.problems``.
PROBLEM_KINDS = {
    # errors: raise, or skip the image / object
    "malformed_annotation": "annotation file or entry that does not parse",
    "missing_image": "image file not found",
    "corrupt_image": "image file that does not decode",
    "image_too_large": "image with more pixels than max_pixels",
    "size_mismatch": "annotation width/height differ from the image file",
    "duplicate_image_id": "two images share one id",
    "non_finite_box": "box with NaN or infinite coordinates",
    "degenerate_box": "box with zero area or xmax < xmin / ymax < ymin",
    "box_outside_image": "box with no overlap with the image",
    "unknown_class": "label or category outside the class list",
    "bad_mask": "instance mask that does not decode or is empty",
    "bad_keypoints": "keypoints with the wrong length",
    # fixes: applied in both modes, counted
    "box_clipped": "box reaching past the image border, clipped to it",
    "size_from_image": "annotation without image size, size read from the file",
}

ON_ERROR = ("raise", "skip")


class ProblemLog:
    """Counts problems and applies the ``on_error`` policy.

    Args:
        on_error: ``"raise"`` (first error raises ``ValueError``) or
            ``"skip"`` (drop and count).
    """

    def __init__(self, on_error="raise"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.counts = collections.Counter()
        self.first = {}  # kind -> first message, shown in the summary

    def error(self, kind, where, message):
        """Record an error: raise in ``"raise"`` mode, else count it."""
        assert kind in PROBLEM_KINDS, kind
        text = f"{where}: {message}"
        if self.on_error == "raise":
            raise ValueError(f"{text} [{kind}]; pass on_error='skip' to skip and count "
                             "such records instead")
        self.counts[kind] += 1
        self.first.setdefault(kind, text)

    def fixed(self, kind, where, message):
        """Record a problem that was repaired in place (both modes)."""
        assert kind in PROBLEM_KINDS, kind
        self.counts[kind] += 1
        self.first.setdefault(kind, f"{where}: {message}")

    def summarize(self, source):
        """Log one warning with the counts (nothing when clean)."""
        if not self.counts:
            return
        parts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))
        examples = "; ".join(f"e.g. {self.first[k]}" for k in sorted(self.counts))
        logger.warning("%s: %s (%s)", source, parts, examples)


def sanitize_boxes(boxes, height, width, log, where, tolerance=0.0):
    """Validate xyxy pixel boxes of one image; clip what reaches outside.

    Args:
        boxes: float array ``[N, 4]`` xyxy in absolute pixels.
        height, width: image size in pixels.
        log: a :class:`ProblemLog`.
        where: callable ``i -> str`` naming object ``i`` in messages.
        tolerance: pixels (a scalar, or per coordinate ``[4]`` xyxy) a box
            may reach past the border without counting as ``box_clipped``:
            what the rounding of the annotation format explains (see
            :data:`kdet.data.yolo.ROUNDING_TOLERANCE`). Such boxes are still
            clipped, silently.

    Returns:
        ``(boxes, keep)``: float32 ``[N, 4]`` clipped to the image and a bool
        ``[N]`` mask of the objects to keep. Raises through ``log`` in
        ``"raise"`` mode.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    proper = finite & (safe[:, 2] > safe[:, 0]) & (safe[:, 3] > safe[:, 1])
    clipped = np.clip(safe, 0.0, [width, height, width, height])
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    # boxes leave as float32: one thinner than float32 resolution (x2 = 1e-30) collapses
    clipped32 = clipped.astype(np.float32)
    thick = (clipped32[:, 2] > clipped32[:, 0]) & (clipped32[:, 3] > clipped32[:, 1])
    overlaps = proper & inside & thick
    past = np.maximum(clipped - safe, safe - clipped)  # how far past the border
    moved = overlaps & np.any(past > np.asarray(tolerance, np.float64), axis=1)
    # only the few bad boxes go through the (slow) per-object messages
    for i in np.flatnonzero(~overlaps | moved):
        box = boxes[i].tolist()
        if not finite[i]:
            log.error("non_finite_box", where(i), f"box {box} is not finite")
        elif not proper[i]:
            log.error("degenerate_box", where(i), f"box xyxy {box} has zero area or is inverted")
        elif not inside[i]:
            log.error("box_outside_image", where(i),
                      f"box xyxy {box} lies outside the {width}x{height} image")
        elif not thick[i]:
            log.error("degenerate_box", where(i), f"box xyxy {box} has zero area in float32")
        else:
            log.fixed("box_clipped", where(i),
                      f"box xyxy {box} clipped to the {width}x{height} image")
    return clipped32, overlaps
