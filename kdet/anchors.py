"""Anchor boxes for every level of a feature pyramid.

Two conventions, each reproducing its reference to the last bit:

* ``convention="torchvision"`` (Faster R-CNN, RetinaNet from torchvision):
  per level, cell anchors ``round([-w/2, -h/2, w/2, h/2])`` with
  ``h = size * sqrt(ratio)``, ``w = size / sqrt(ratio)`` (ratio = h / w),
  ordered ratio-major then size, computed in float32 and rounded half to even
  as ``torch.round`` does; shifted by the *top-left* corner of every cell,
  ``(x, y) = (j * stride_w, i * stride_h)``. The stride torchvision uses is
  ``image_size // feature_size``, so for images that are not a multiple of a
  level's nominal stride the anchors follow that integer division too.
* ``convention="automl"`` (EfficientDet, automl / effdet ``Anchors``): level
  ``l`` has stride ``2**l`` and feature size given by repeated ceil-halving of
  the image; for every ``(octave, aspect)`` in
  ``product(range(num_scales), aspect_ratios)`` the base size is
  ``anchor_scale * stride * 2**(octave / num_scales)``, half extents
  ``base * aspect / 2`` and centres ``stride / 2 + i * stride``.

Both produce ``xyxy`` anchors in absolute pixels, ordered level by level, then
row (y), column (x), anchor — the flattening order of a channels-last head
output ``[B, H_l, W_l, A * k]`` reshaped to ``[B, H_l * W_l * A, k]``.

Anchors depend only on the (static) image size, so they are computed once in
NumPy and handed to the graph as a float32 constant.

    >>> gen = AnchorGenerator(sizes=((32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 2,
    ...                       strides=(8, 16))
    >>> anchors, counts = gen.anchors_for((64, 64))
    >>> tuple(anchors.shape), counts
    ((240, 4), [192, 48])
    >>> anchors[:3].tolist()  # ratio 0.5, 1, 2 at the top-left cell
    [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
"""
import itertools

import keras
import numpy as np
from keras import ops

CONVENTIONS = ("torchvision", "automl")


def retinanet_sizes(base_sizes=(32, 64, 128, 256, 512), num_scales=3):
    """torchvision RetinaNet sizes: ``(x, int(x * 2**(1/3)), int(x * 2**(2/3)))`` per level."""
    return tuple(tuple(int(x * 2 ** (i / num_scales)) for i in range(num_scales))
                 for x in base_sizes)


def automl_feature_sizes(image_size, max_level):
    """Feature sizes ``[(H_l, W_l)]`` for levels ``0..max_level`` (effdet ``get_feat_sizes``).

    Each level halves the previous one rounding up: ``(s - 1) // 2 + 1``.
    """
    height, width = (int(s) for s in image_size)
    sizes = [(height, width)]
    for _ in range(max_level):
        height, width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
        sizes.append((height, width))
    return sizes


def _as_nested(values, num_levels, name):
    """Normalise ``(a, b)`` or ``((a, b), ...)`` to one tuple per level."""
    values = tuple(values)
    if not values:
        raise ValueError(f"AnchorGenerator: {name} must not be empty")
    if not isinstance(values[0], (list, tuple)):
        values = (values,) * num_levels
    values = tuple(tuple(v) for v in values)
    if len(values) != num_levels:
        raise ValueError(f"AnchorGenerator: {name} has {len(values)} levels, expected {num_levels}")
    return values


def _image_hw(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    image_size = tuple(image_size)
    if len(image_size) == 2:
        height, width = image_size
    elif len(image_size) == 3:  # (H, W, C)
        height, width = image_size[:2]
    elif len(image_size) == 4:  # (B, H, W, C)
        height, width = image_size[1:3]
    else:
        raise ValueError(
            "AnchorGenerator: image size must be (H, W), (H, W, C) or (B, H, W, C), "
            f"got {image_size}")
    if height is None or width is None:
        raise ValueError(
            f"AnchorGenerator: image height/width must be static, got {image_size} "
            "(kdet models take fixed-size, padded images)")
    return int(height), int(width)


@keras.saving.register_keras_serializable(package="kdet")
class AnchorGenerator(keras.layers.Layer):
    """Multi-level anchor boxes (``xyxy``, absolute pixels) for an image size.

    Args:
        sizes: torchvision convention: anchor sizes per level, e.g.
            ``((32,), (64,), (128,), (256,), (512,))`` (FPN) or
            :func:`retinanet_sizes` (RetinaNet).
        aspect_ratios: torchvision: ratios ``h / w`` per level (or one tuple
            for all levels), default ``(0.5, 1.0, 2.0)``. automl: ``(x, y)``
            multipliers per anchor (default ``((1, 1), (1.4, 0.7), (0.7, 1.4))``),
            or scalars ``r`` meaning ``(sqrt(r), 1 / sqrt(r))`` as in effdet.
        strides: torchvision: nominal stride per level (e.g. ``(4, 8, 16, 32, 64)``).
            The grid of a level is ``ceil(image / stride)`` (the size of a
            ``same``-padded stride-2 pyramid) unless feature shapes are given.
        convention: ``"torchvision"`` or ``"automl"``.
        min_level, max_level, num_scales, anchor_scale: automl convention
            (``anchor_scale`` may be one number or one per level).

    Calling the layer on images ``[B, H, W, C]`` (or on a shape tuple)
    returns the anchors ``[sum_l H_l * W_l * A_l, 4]`` float32; optional
    ``feature_maps`` (channels-last) give the grid sizes as torchvision does.

        >>> gen = AnchorGenerator(convention="automl", min_level=3, max_level=7,
        ...                       anchor_scale=4.0)
        >>> anchors, counts = gen.anchors_for((512, 512))
        >>> counts[0], anchors[0].tolist()   # level 3, first anchor (1, 1) octave 0
        (36864, [-12.0, -12.0, 20.0, 20.0])
    """

    def __init__(self, sizes=None, aspect_ratios=None, strides=None, convention="torchvision",
                 min_level=3, max_level=7, num_scales=3, anchor_scale=4.0, **kwargs):
        super().__init__(**kwargs)
        if convention not in CONVENTIONS:
            raise ValueError(f"AnchorGenerator: convention must be one of {CONVENTIONS}, "
                             f"got {convention!r}")
        self.convention = convention
        self.min_level = int(min_level)
        self.max_level = int(max_level)
        self.num_scales = int(num_scales)
        if convention == "torchvision":
            if sizes is None or strides is None:
                raise ValueError("AnchorGenerator(convention='torchvision') needs `sizes` and "
                                 "`strides` (one entry per pyramid level)")
            sizes = tuple(sizes)
            if not isinstance(sizes[0], (list, tuple)):
                sizes = tuple((s,) for s in sizes)  # torchvision accepts (32, 64, ...) too
            self.sizes = tuple(tuple(int(s) if float(s).is_integer() else float(s) for s in level)
                               for level in sizes)
            num_levels = len(self.sizes)
            if aspect_ratios is None:
                aspect_ratios = (0.5, 1.0, 2.0)
            self.aspect_ratios = tuple(tuple(float(r) for r in level)
                                       for level in _as_nested(aspect_ratios, num_levels,
                                                               "aspect_ratios"))
            strides = tuple(strides)
            if len(strides) != num_levels:
                raise ValueError(f"AnchorGenerator: {len(strides)} strides for {num_levels} levels")
            self.strides = tuple(int(s) for s in strides)
            if any(s <= 0 for s in self.strides):
                raise ValueError(f"AnchorGenerator: strides must be positive, got {self.strides}")
            self.anchor_scale = None
            self._cell_anchors = [self._torchvision_cell_anchors(s, r)
                                  for s, r in zip(self.sizes, self.aspect_ratios)]
        else:
            if self.max_level < self.min_level or self.min_level < 0:
                raise ValueError(f"AnchorGenerator: bad levels {self.min_level}..{self.max_level}")
            if self.num_scales < 1:
                raise ValueError(f"AnchorGenerator: num_scales must be >= 1, got {num_scales}")
            num_levels = self.max_level - self.min_level + 1
            if aspect_ratios is None:
                aspect_ratios = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
            ratios = []
            for r in aspect_ratios:
                if isinstance(r, (list, tuple)):
                    if len(r) != 2:
                        raise ValueError(
                            f"AnchorGenerator: automl aspect ratio must be (x, y), got {r}")
                    ratios.append((float(r[0]), float(r[1])))
                else:
                    ratios.append(float(r))
            self.aspect_ratios = tuple(ratios)
            if isinstance(anchor_scale, (list, tuple)):
                if len(anchor_scale) != num_levels:
                    raise ValueError(f"AnchorGenerator: {len(anchor_scale)} anchor scales for "
                                     f"{num_levels} levels")
                self.anchor_scale = tuple(float(a) for a in anchor_scale)
            else:
                self.anchor_scale = float(anchor_scale)
            self.sizes = None
            self.strides = tuple(2 ** level for level in range(self.min_level, self.max_level + 1))

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _torchvision_cell_anchors(scales, aspect_ratios):
        # float32 throughout, exactly as torchvision's generate_anchors.
        scales = np.asarray(scales, np.float32)
        ratios = np.asarray(aspect_ratios, np.float32)
        h_ratios = np.sqrt(ratios)
        w_ratios = np.float32(1) / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
        return np.round(base).astype(np.float32)  # half to even, like torch.round

    @property
    def num_levels(self):
        return len(self.strides)

    def num_anchors_per_location(self):
        """Anchors per feature-map cell, one entry per level (torchvision API)."""
        if self.convention == "torchvision":
            return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]
        return [self.num_scales * len(self.aspect_ratios)] * self.num_levels

    def feature_sizes(self, image_size):
        """Grid ``(H_l, W_l)`` of every level for ``image_size=(H, W)``."""
        height, width = _image_hw(image_size)
        if self.convention == "automl":
            return automl_feature_sizes((height, width), self.max_level)[self.min_level:]
        return [(-(-height // s), -(-width // s)) for s in self.strides]

    def anchors_for(self, image_size, feature_shapes=None):
        """Anchors for one image size.

        Args:
            image_size: ``(H, W)`` (or an image shape ``(B, H, W, C)``).
            feature_shapes: optional ``[(H_l, W_l)]`` per level; torchvision
                convention only (its strides are then ``image // feature``).

        Returns:
            ``(anchors, counts)``: float32 NumPy ``[N, 4]`` xyxy and the
            number of anchors of each level.
        """
        height, width = _image_hw(image_size)
        if self.convention == "automl":
            if feature_shapes is not None:
                raise ValueError("AnchorGenerator(convention='automl'): feature sizes follow "
                                 "from the image size; do not pass feature_shapes")
            per_level = self._automl_anchors(height, width)
        else:
            if feature_shapes is None:
                feature_shapes = self.feature_sizes((height, width))
            feature_shapes = [tuple(int(d) for d in shape[-2:]) for shape in feature_shapes]
            if len(feature_shapes) != self.num_levels:
                raise ValueError(f"AnchorGenerator: {len(feature_shapes)} feature maps for "
                                 f"{self.num_levels} levels")
            per_level = self._torchvision_anchors(height, width, feature_shapes)
        counts = [int(a.shape[0]) for a in per_level]
        return np.concatenate(per_level, axis=0).astype(np.float32), counts

    def _torchvision_anchors(self, height, width, feature_shapes):
        out = []
        for (grid_h, grid_w), cell in zip(feature_shapes, self._cell_anchors):
            if grid_h <= 0 or grid_w <= 0:
                raise ValueError(f"AnchorGenerator: empty feature map {grid_h}x{grid_w}")
            stride_h, stride_w = height // grid_h, width // grid_w  # torchvision's rule
            shift_x = np.arange(grid_w, dtype=np.int64) * stride_w
            shift_y = np.arange(grid_h, dtype=np.int64) * stride_h
            sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4).astype(np.float32)
            out.append((shifts + cell[None]).reshape(-1, 4))
        return out

    def _automl_anchors(self, height, width):
        sizes = automl_feature_sizes((height, width), self.max_level)
        out = []
        for index, level in enumerate(range(self.min_level, self.max_level + 1)):
            # effdet: stride = image / feature size as a float, so sizes that are not
            # multiples of 2**max_level (lite0 at 320) get fractional strides.
            stride_h = sizes[0][0] / float(sizes[level][0])
            stride_w = sizes[0][1] / float(sizes[level][1])
            scale = (self.anchor_scale[index] if isinstance(self.anchor_scale, tuple)
                     else self.anchor_scale)
            # float64 like effdet's NumPy code, cast to float32 at the end.
            x = np.arange(stride_w / 2, width, stride_w)
            y = np.arange(stride_h / 2, height, stride_h)
            xv, yv = np.meshgrid(x, y)  # [H_l, W_l], row = y
            xv, yv = xv.reshape(-1), yv.reshape(-1)
            boxes = []
            for octave, aspect in itertools.product(range(self.num_scales), self.aspect_ratios):
                octave_scale = octave / float(self.num_scales)
                if isinstance(aspect, tuple):
                    aspect_x, aspect_y = aspect
                else:
                    aspect_x = np.sqrt(aspect)
                    aspect_y = 1.0 / aspect_x
                half_x = scale * stride_w * 2 ** octave_scale * aspect_x / 2.0
                half_y = scale * stride_h * 2 ** octave_scale * aspect_y / 2.0
                boxes.append(np.stack([xv - half_x, yv - half_y, xv + half_x, yv + half_y], -1))
            out.append(np.stack(boxes, axis=1).reshape(-1, 4))  # (y, x, anchor)
        return out

    # ------------------------------------------------------------- Keras API
    def _image_size_of(self, inputs):
        if isinstance(inputs, (tuple, list)) and all(
                isinstance(d, (int, np.integer)) or d is None for d in inputs):
            return _image_hw(inputs)
        return _image_hw(tuple(inputs.shape))

    def call(self, inputs, feature_maps=None):
        image_size = self._image_size_of(inputs)
        feature_shapes = None
        if feature_maps is not None:
            feature_shapes = [tuple(f.shape[1:3]) for f in feature_maps]  # channels-last
        anchors, _ = self.anchors_for(image_size, feature_shapes)
        return ops.convert_to_tensor(anchors, dtype="float32")

    def __call__(self, inputs, *args, **kwargs):
        # A plain shape tuple is not a tensor input; answer without Keras' tensor plumbing.
        if isinstance(inputs, (tuple, list)) and all(
                isinstance(d, (int, np.integer)) or d is None for d in inputs):
            return self.call(inputs, *args, **kwargs)
        return super().__call__(inputs, *args, **kwargs)

    def compute_output_shape(self, input_shape, feature_maps_shape=None):
        counts = self.anchors_for(self._image_size_of(tuple(input_shape)))[1]
        return (sum(counts), 4)

    def compute_output_spec(self, inputs, feature_maps=None):
        feature_shapes = None
        if feature_maps is not None:
            feature_shapes = [tuple(f.shape[1:3]) for f in feature_maps]
        _, counts = self.anchors_for(self._image_size_of(inputs), feature_shapes)
        return keras.KerasTensor((sum(counts), 4), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({
            "convention": self.convention,
            "sizes": self.sizes,
            "aspect_ratios": self.aspect_ratios,
            "strides": self.strides if self.convention == "torchvision" else None,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "num_scales": self.num_scales,
            "anchor_scale": self.anchor_scale,
        })
        return config


def level_slices(counts):
    """``[slice]`` into the concatenated anchors for each level's ``counts``."""
    bounds = np.cumsum([0] + list(counts))
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
