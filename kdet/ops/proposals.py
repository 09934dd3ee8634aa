"""Region proposals without an RPN, for :class:`kdet.models.FastRCNN` and :class:`kdet.models.RCNN`.

Fast R-CNN and R-CNN score *given* regions. Where none come from the user,
kdet offers two generators (numpy, outside the model graph):

* :func:`sliding_window_proposals` — static and deterministic: boxes of each
  ``scale`` and aspect ``ratio`` centred on a regular grid, clipped to the
  image. Always available; what the models use when no proposals are given.
* :func:`selective_search_proposals` — Uijlings et al.'s selective search
  (the proposals of the R-CNN and Fast R-CNN papers) through
  ``cv2.ximgproc.segmentation``; only with ``opencv-contrib-python``
  installed (kdet does not depend on it).

:func:`pad_proposals` packs per-image lists into the static ``[B, P, 4]``
input of the models (zero-area rows are padding).

    >>> boxes = sliding_window_proposals(64, scales=(32,), ratios=(1.0,), stride=32)
    >>> boxes.tolist()
    [[0.0, 0.0, 32.0, 32.0], [32.0, 0.0, 64.0, 32.0], [0.0, 32.0, 32.0, 64.0], [32.0, 32.0, 64.0, 64.0]]
"""
import numpy as np


def _pair(size):
    if isinstance(size, (list, tuple)):
        height, width = (int(s) for s in size)
    else:
        height = width = int(size)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return height, width


def sliding_window_proposals(image_size, scales=(32, 64, 128), ratios=(0.5, 1.0, 2.0),
                             stride=16):
    """Boxes of every scale and ratio on a regular grid, clipped to the image: ``[N, 4]`` xyxy.

    Centres are ``(stride / 2 + i * stride, stride / 2 + j * stride)`` inside
    the image (``i, j >= 0``). A window of scale ``s`` and ratio ``r``
    (height / width, torchvision's anchor convention) has width
    ``s / sqrt(r)`` and height ``s * sqrt(r)``. Windows are clipped to the
    image and duplicates after clipping are dropped (first kept). Order:
    centre row-major (y, then x), then scale, then ratio.

    Args:
        image_size: int or ``(height, width)``.
        scales: window sides (pixels) at ratio 1.
        ratios: height / width.
        stride: grid step in pixels.
    """
    height, width = _pair(image_size)
    if stride <= 0:
        raise ValueError(f"sliding_window_proposals: stride must be > 0, got {stride}")
    if not scales or min(scales) <= 0 or not ratios or min(ratios) <= 0:
        raise ValueError("sliding_window_proposals: scales and ratios must be non-empty and "
                         f"positive, got scales={scales!r} ratios={ratios!r}")
    cy = np.arange(stride / 2.0, height, stride, dtype="float64")
    cx = np.arange(stride / 2.0, width, stride, dtype="float64")
    sizes = np.array([(s / np.sqrt(r), s * np.sqrt(r)) for s in scales for r in ratios])
    centers = np.stack(np.meshgrid(cx, cy, indexing="xy"), -1).reshape(-1, 1, 2)
    half = sizes[None] / 2.0
    boxes = np.concatenate([centers - half, centers + half], -1).reshape(-1, 4)
    boxes = np.clip(boxes, 0.0, [width, height, width, height])
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])].astype("float32")
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def default_proposals(image_size, num_proposals, scales=None, ratios=(0.5, 1.0, 2.0)):
    """The sliding-window proposals the models use when none are given.

    Scales are 1/8, 1/4 and 1/2 of the image's short side; the stride is the
    smallest multiple of 1/32 of the short side (at least 1 pixel) whose
    windows number at most ``num_proposals``. Returns ``[N <= num_proposals, 4]``.
    """
    height, width = _pair(image_size)
    short = min(height, width)
    scales = scales or (short / 8.0, short / 4.0, short / 2.0)
    step = max(short / 32.0, 1.0)
    stride = step
    while True:
        boxes = sliding_window_proposals((height, width), scales, ratios, stride)
        if len(boxes) <= num_proposals:
            return boxes
        stride += step


def selective_search_proposals(image, mode="fast", max_proposals=2000):
    """Selective search (``cv2.ximgproc.segmentation``) boxes ``[N, 4]`` xyxy, float32.

    ``image`` is ``[H, W, 3]`` RGB uint8 (or float in 0..255); ``mode`` is
    ``"fast"`` or ``"quality"`` (OpenCV's two strategies; R-CNN used the
    fast mode). Raises ``ImportError`` without ``opencv-contrib-python``.
    """
    try:
        import cv2
        segmentation = cv2.ximgproc.segmentation
    except (ImportError, AttributeError) as error:
        raise ImportError("selective_search_proposals needs opencv-contrib-python "
                          "(cv2.ximgproc); use sliding_window_proposals otherwise") from error
    if mode not in ("fast", "quality"):
        raise ValueError(f"selective_search_proposals: mode must be 'fast' or 'quality', "
                         f"got {mode!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"selective_search_proposals: expected [H, W, 3], got {image.shape}")
    search = segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image[..., ::-1]).astype("uint8"))  # OpenCV is BGR
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    rects = np.asarray(search.process(), "float32").reshape(-1, 4)[:max_proposals]  # x, y, w, h
    return np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], -1)


def pad_proposals(proposals, num_proposals):
    """Per-image proposal lists -> ``[B, num_proposals, 4]`` float32, zero rows as padding.

    Each image keeps its first ``num_proposals`` boxes (generators list them
    best first). ``proposals`` is a list of ``[P_i, 4]`` arrays (or one
    ``[B, P, 4]`` array).
    """
    out = np.zeros((len(proposals), int(num_proposals), 4), "float32")
    for i, boxes in enumerate(proposals):
        boxes = np.asarray(boxes, "float32").reshape(-1, 4)[:num_proposals]
        out[i, :len(boxes)] = boxes
    return out
