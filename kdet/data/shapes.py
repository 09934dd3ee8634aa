"""Synthetic shapes: the quickstart's data, generated in numpy, no download.

Each image is a textured background (a colour gradient, a sinusoidal
pattern and noise) with 1..``max_objects`` non-overlapping coloured shapes:

* ``circle``   — keypoints on its inscribed equilateral triangle
  (top, bottom-left, bottom-right);
* ``square``   — top-edge centre, bottom-left corner, bottom-right corner;
* ``triangle`` — its apex, bottom-left and bottom-right vertices.

so every shape has ``K = 3`` keypoints named ``("top", "bottom_left",
"bottom_right")`` and a horizontal flip swaps the last two
(``keypoint_flip_map = (0, 2, 1)``). Shapes are 24..96 px at 256 px images
(``size_range``; scaled down with smaller images),
all visible (visibility 2), boxes are exact in continuous coordinates and
masks mark the pixels whose centre lies inside the shape.

Image ``i`` depends only on ``(seed, i)``: ``ShapesDataset(10, seed=0)[3]``
equals ``ShapesDataset(100, seed=0)[3]``. Pixels are rendered on demand.

    >>> ds = ShapesDataset(num_images=8, image_size=128, seed=0)
    >>> ds.class_names
    ('circle', 'square', 'triangle')
    >>> ex = ds[0]
    >>> ex["image"].shape, ex["masks"].shape[1:], ex["keypoints"].shape[1:]
    ((128, 128, 3), (128, 128), (3, 3))
"""
import numpy as np

from kdet.data.dataset import DetectionDataset

CLASS_NAMES = ("circle", "square", "triangle")
KEYPOINT_NAMES = ("top", "bottom_left", "bottom_right")
KEYPOINT_FLIP_MAP = (0, 2, 1)
_TRIANGLE_HEIGHT = np.sqrt(3) / 2  # equilateral: height / side


def _shape_geometry(kind, x1, y1, size):
    """Box (xyxy) and keypoints ``[3, 2]`` of a shape whose box starts at (x1, y1)."""
    height = size * _TRIANGLE_HEIGHT if kind == 2 else size
    x2, y2, cx = x1 + size, y1 + height, x1 + size / 2
    if kind == 0:  # circle: inscribed equilateral triangle
        r, cy = size / 2, y1 + size / 2
        points = [(cx, y1), (cx - r * np.sqrt(3) / 2, cy + r / 2),
                  (cx + r * np.sqrt(3) / 2, cy + r / 2)]
    else:  # square / triangle: top centre (apex), bottom corners
        points = [(cx, y1), (x1, y2), (x2, y2)]
    return np.array([x1, y1, x2, y2]), np.array(points)


def _shape_mask(kind, box, grid_x, grid_y):
    """Pixels whose centre lies inside the shape."""
    x1, y1, x2, y2 = box
    if kind == 0:
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        return (grid_x - cx) ** 2 + (grid_y - cy) ** 2 <= r ** 2
    inside = (grid_x >= x1) & (grid_x < x2) & (grid_y >= y1) & (grid_y < y2)
    if kind == 1:
        return inside
    # triangle apex (cx, y1), base y2: |x - cx| <= half width at that height
    cx, half = (x1 + x2) / 2, (x2 - x1) / 2
    return inside & (np.abs(grid_x - cx) <= half * (grid_y - y1) / (y2 - y1))


def _bright_colour(rng):
    hue = rng.uniform(0, 6)
    sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0)
    c = val * sat
    x = c * (1 - abs(hue % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(hue) % 6]
    return (np.array(rgb) + (val - c)) * 255


class ShapesDataset(DetectionDataset):
    """Deterministic synthetic detection / segmentation / keypoint data.

    Args:
        num_images: number of images.
        image_size: side of the square images.
        seed: images depend only on ``(seed, index)``.
        max_objects: at most this many shapes per image (at least one).
        size_range: shape size range in pixels; default ``(24, 96)`` times
            ``min(1, image_size / 256)``.
    """

    has_masks = True

    def __init__(self, num_images, image_size=256, seed=0, max_objects=4, size_range=None):
        if size_range is None:
            factor = min(1.0, image_size / 256)
            size_range = (24 * factor, 96 * factor)
        if not 0 < size_range[0] <= size_range[1] <= image_size:
            raise ValueError(f"size_range {size_range} must lie in (0, image_size={image_size}]")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.image_size, self.seed = int(image_size), int(seed)
        self.max_objects, self.size_range = int(max_objects), tuple(size_range)
        records = [self._layout(i) for i in range(int(num_images))]
        super().__init__(records, CLASS_NAMES, keypoint_names=KEYPOINT_NAMES,
                         keypoint_flip_map=KEYPOINT_FLIP_MAP,
                         skeleton=((1, 2), (2, 3), (3, 1)), source=f"shapes(seed={seed})")

    def _layout(self, index):
        """Objects of image ``index``: classes, boxes, keypoints, colours."""
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        boxes, labels, keypoints, colours = [], [], [], []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            kind = int(rng.integers(len(CLASS_NAMES)))
            size = rng.uniform(*self.size_range)
            height = size * _TRIANGLE_HEIGHT if kind == 2 else size
            for _attempt in range(30):  # rejection sampling: no overlap, 2 px apart
                x1, y1 = rng.uniform(0, s - size), rng.uniform(0, s - height)
                box, points = _shape_geometry(kind, x1, y1, size)
                if all(box[0] > b[2] + 2 or b[0] > box[2] + 2 or box[1] > b[3] + 2
                       or b[1] > box[3] + 2 for b in boxes):
                    break
            else:
                continue
            boxes.append(box)
            labels.append(kind)
            keypoints.append(np.concatenate([points, np.full((3, 1), 2.0)], 1))
            colours.append(_bright_colour(rng))
        return {"image_id": index, "original_size": (s, s),
                "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "labels": np.asarray(labels, np.int32),
                "keypoints": np.asarray(keypoints, np.float32).reshape(-1, 3, 3),
                "colours": np.asarray(colours, np.float32).reshape(-1, 3)}

    def render(self, index):
        """``(image uint8 [S, S, 3], masks uint8 [N, S, S])`` of image ``index``."""
        record = self.records[index]
        s = self.image_size
        rng = np.random.default_rng([self.seed, int(record["image_id"]), 1])
        yy, xx = np.mgrid[0:s, 0:s] + 0.5
        low, high = rng.uniform(20, 110, 3), rng.uniform(20, 110, 3)
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3), rng.uniform(0, 6.3)
        ramp = (xx * np.cos(angle) + yy * np.sin(angle)) / (s * 1.5) + 0.25
        pattern = np.sin(freq * (xx * np.sin(angle) - yy * np.cos(angle)) + phase)
        image = (low + (high - low) * ramp[..., None] + 12 * pattern[..., None]
                 + rng.normal(0, 6, (s, s, 3)))
        masks = np.zeros((len(record["labels"]), s, s), np.uint8)
        for i, (kind, box, colour) in enumerate(zip(record["labels"], record["boxes"],
                                                    record["colours"])):
            mask = _shape_mask(kind, box.astype(np.float64), xx, yy)
            shade = colour * (0.9 + 0.1 * pattern[..., None])  # a little texture on shapes too
            image = np.where(mask[..., None], shade, image)
            masks[i] = mask
        return np.clip(image, 0, 255).astype(np.uint8), masks

    def load_image(self, index):
        return self.render(index)[0]

    def load_masks(self, index):
        return self.render(index)[1]

    def load_pixels(self, index, include_masks):
        image, masks = self.render(index)
        return image, (masks if include_masks else None)

    def _tf_pixels(self, element, include_masks):
        import tensorflow as tf

        s = self.image_size
        image, masks = tf.numpy_function(self.render, [element["index"]],
                                         (tf.uint8, tf.uint8), stateful=False)
        image = tf.ensure_shape(image, [s, s, 3])
        return image, (tf.ensure_shape(masks, [None, s, s]) if include_masks else None)
