"""Keypoint R-CNN second-stage branch, torchvision semantics.

* ``KeypointRCNNHead``: torchvision ``KeypointRCNNHeads`` + ``KeypointRCNNPredictor``:
  8x (3x3 conv 512 + ReLU), 4x4/s2 transposed conv (padding 1) to ``K``
  keypoint logits, bilinear x2 upsampling (``align_corners=False``):
  14 x 14 RoI features -> 56 x 56 heatmaps.
* ``heatmaps_to_keypoints``: torchvision ``heatmaps_to_keypoints`` with static
  shapes (see its docstring).
* ``KeypointRoIHeads``: :class:`kdet.layers.roi_heads.RoIHeads` plus the keypoint
  branch (``MultiLevelRoIAlign(14, sampling 2)`` on the detected boxes) at
  inference. Training targets and the loss live in
  :mod:`kdet.models.keypoint_rcnn`.

    >>> import numpy as np
    >>> head = KeypointRCNNHead(num_keypoints=3, layers=(8,))
    >>> tuple(head(np.zeros((1, 2, 14, 14, 4), "float32")).shape)
    (1, 2, 56, 56, 3)
"""
import keras
import numpy as np
from keras import ops

from kdet.layers.conv import Conv2D
from kdet.layers.roi import MultiLevelRoIAlign
from kdet.layers.roi_heads import (RoIHeads, _build_conv_stack, _kaiming_fan_out,
                                   _run_conv_stack)

# torch's bicubic kernel coefficient (upsample_bicubic2d).
CUBIC_A = -0.75
# Elements of the upsampled heatmaps held at once per image in heatmaps_to_keypoints.
_DECODE_BUDGET = 1 << 25


def bilinear_upsample_matrix(in_size, factor=2):
    """``[in_size * factor, in_size]`` matrix of torch ``interpolate(scale_factor=factor,
    mode="bilinear", align_corners=False, recompute_scale_factor=False)`` on one axis."""
    out_size = in_size * factor
    src = np.maximum((np.arange(out_size, dtype="float64") + 0.5) / factor - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    lam = src - i0
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    matrix = np.zeros((out_size, in_size), "float64")
    np.add.at(matrix, (np.arange(out_size), i0), 1.0 - lam)
    np.add.at(matrix, (np.arange(out_size), i1), lam)
    return matrix.astype("float32")


@keras.saving.register_keras_serializable(package="kdet")
class KeypointRCNNHead(keras.layers.Layer):
    """torchvision ``KeypointRCNNHeads`` + ``KeypointRCNNPredictor`` (channels last).

    ``[B, R, 14, 14, C]`` RoI features -> ``[B, R, 56, 56, K]`` heatmap logits.

    Args:
        num_keypoints: ``K`` (17 for COCO persons).
        layers: channels of the 3x3 convs, default ``(512,) * 8``.
    """

    def __init__(self, num_keypoints=17, layers=(512,) * 8, **kwargs):
        super().__init__(**kwargs)
        self.num_keypoints = int(num_keypoints)
        self.layer_channels = tuple(int(c) for c in layers)
        common = dict(kernel_initializer=_kaiming_fan_out(), bias_initializer="zeros",
                      dtype=self.dtype_policy)
        self.convs = [Conv2D(c, 3, padding="same", activation="relu",
                             name=f"keypoint_fcn{i}", **common)
                      for i, c in enumerate(self.layer_channels)]
        # torch ConvTranspose2d(k=4, s=2, padding=1): 14 -> 28, the same as Keras "same".
        self.kps_score_lowres = keras.layers.Conv2DTranspose(
            self.num_keypoints, 4, strides=2, padding="same", name="kps_score_lowres", **common)

    def build(self, input_shape):
        no_norms = [None] * len(self.convs)
        self.kps_score_lowres.build(_build_conv_stack(self.convs, no_norms, input_shape))

    def call(self, x):
        batch, rois = ops.shape(x)[0], ops.shape(x)[1]
        y = _run_conv_stack(x, self.convs, [None] * len(self.convs), None, None)
        y = self.kps_score_lowres(y)  # [N, 28, 28, K]
        rows = ops.convert_to_tensor(bilinear_upsample_matrix(y.shape[1]), y.dtype)
        cols = ops.convert_to_tensor(bilinear_upsample_matrix(y.shape[2]), y.dtype)
        y = ops.einsum("ay,nyxk->naxk", rows, y)
        y = ops.einsum("bx,naxk->nabk", cols, y)
        return ops.reshape(y, (batch, rois) + tuple(y.shape[1:]))

    def compute_output_shape(self, input_shape):
        h, w = input_shape[2], input_shape[3]
        return (input_shape[0], input_shape[1], 4 * h, 4 * w, self.num_keypoints)

    def get_config(self):
        config = super().get_config()
        config.update(num_keypoints=self.num_keypoints, layers=list(self.layer_channels))
        return config


def _bicubic_weights(length, in_size, grid):
    """``[..., grid, in_size]`` rows of torch's bicubic resize (``align_corners=False``,
    no antialias) of ``in_size`` samples to ``length`` (``[...]`` float, integral) samples;
    rows ``>= length`` are zero."""
    scale = in_size / length[..., None]  # float32, as torch's area_pixel_compute_scale
    pixel = ops.cast(ops.arange(grid), "float32")
    src = scale * (pixel + 0.5) - 0.5  # cubic: no clamp at 0
    base = ops.floor(src)
    t = src - base
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    coefficients = (far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t))
    base = ops.cast(base, "int32")
    weights = 0.0
    for offset, c in zip((-1, 0, 1, 2), coefficients):
        index = ops.clip(base + offset, 0, in_size - 1)
        weights = weights + ops.one_hot(index, in_size) * c[..., None]
    inside = pixel < length[..., None]
    return weights * ops.cast(inside, "float32")[..., None]


def heatmaps_to_keypoints(heatmaps, boxes, max_size):
    """torchvision ``heatmaps_to_keypoints`` on padded tensors.

    torchvision resizes each box's ``S x S`` heatmaps (bicubic,
    ``align_corners=False``) to ``ceil(h) x ceil(w)`` pixels (``w, h`` the box
    size, at least 1), takes the first maximum of each keypoint's map in
    row-major order, and maps cell ``(i, j)`` to ``x0 + (j + 0.5) * w / ceil(w)``
    (same for y); the score is the resized map's value there. Here the resize
    is two interpolation matrices evaluated on a fixed ``max_size`` grid, with
    the cells beyond each box's own size masked out: the same values, argmax
    and score with static shapes.

    Args:
        heatmaps: ``[B, D, S, S, K]`` logits (channels last).
        boxes: ``[B, D, 4]`` xyxy; boxes larger than ``max_size`` pixels (not
            possible for boxes clipped to a ``max_size`` image) are resized
            to ``max_size``.
        max_size: static grid size, the image size.

    Returns:
        ``[B, D, K, 3]``: ``x``, ``y`` and the score (heatmap value at the argmax).
    """
    heatmaps = ops.cast(heatmaps, "float32")
    boxes = ops.cast(boxes, "float32")
    size_h, size_w, num_keypoints = heatmaps.shape[2], heatmaps.shape[3], heatmaps.shape[4]
    grid = int(max_size)
    num_boxes = boxes.shape[1]
    widths = ops.maximum(boxes[..., 2] - boxes[..., 0], 1.0)
    heights = ops.maximum(boxes[..., 3] - boxes[..., 1], 1.0)
    map_w = ops.minimum(ops.ceil(widths), float(grid))
    map_h = ops.minimum(ops.ceil(heights), float(grid))

    # Chunks of boxes bound the memory of the [chunk, K, grid, grid] resized maps.
    per_box = num_keypoints * grid * grid
    chunk = max(c for c in range(1, num_boxes + 1)
                if num_boxes % c == 0 and (c * per_box <= _DECODE_BUDGET or c == 1))

    def decode(args):
        maps, h, w = args  # [B, c, S, S, K], [B, c], [B, c]
        weights_y = _bicubic_weights(h, size_h, grid)  # [B, c, G, S]
        weights_x = _bicubic_weights(w, size_w, grid)
        rows = ops.einsum("bciy,bcyxk->bckix", weights_y, maps)
        resized = ops.einsum("bckix,bcjx->bckij", rows, weights_x)  # [B, c, K, G, G]
        inside = ((ops.arange(grid)[:, None] < ops.cast(h, "int32")[..., None, None, None])
                  & (ops.arange(grid)[None, :] < ops.cast(w, "int32")[..., None, None, None]))
        resized = ops.where(inside, resized, -np.inf)
        flat = ops.reshape(resized, tuple(ops.shape(resized)[:3]) + (grid * grid,))
        position = ops.argmax(flat, axis=-1)
        score = ops.max(flat, axis=-1)
        return ops.cast(position, "int32"), score

    if chunk == num_boxes:
        position, score = decode((heatmaps, map_h, map_w))
    else:
        def split(x):  # [B, D, ...] -> [D / c, B, c, ...]
            x = ops.reshape(x, (ops.shape(x)[0], num_boxes // chunk, chunk) + tuple(x.shape[2:]))
            return ops.moveaxis(x, 1, 0)

        def merge(x):  # [D / c, B, c, K] -> [B, D, K]
            x = ops.moveaxis(x, 0, 1)
            return ops.reshape(x, (ops.shape(x)[0], num_boxes) + tuple(x.shape[3:]))

        position, score = ops.map(decode, (split(heatmaps), split(map_h), split(map_w)))
        position, score = merge(position), merge(score)
    cell_x = ops.cast(position % grid, "float32")
    cell_y = ops.cast(position // grid, "float32")
    x = (cell_x + 0.5) * (widths / map_w)[..., None] + boxes[..., 0:1]
    y = (cell_y + 0.5) * (heights / map_h)[..., None] + boxes[..., 1:2]
    return ops.stack([x, y, score], axis=-1)


@keras.saving.register_keras_serializable(package="kdet")
class KeypointRoIHeads(RoIHeads):
    """:class:`RoIHeads` plus the Keypoint R-CNN branch on the detected boxes.

    Args:
        num_keypoints: ``K`` (17); keypoint_layers: the head's conv channels
            (``(512,) * 8``); other arguments as :class:`RoIHeads`.

    Adds ``"keypoints" [B, D, K, 3]`` (x, y, heatmap score; zeros for padded
    detections) to the detection dict.
    """

    def __init__(self, num_keypoints=17, keypoint_layers=(512,) * 8, **kwargs):
        super().__init__(**kwargs)
        self.num_keypoints = int(num_keypoints)
        self.keypoint_layers = tuple(int(c) for c in keypoint_layers)
        self.keypoint_roi_pool = MultiLevelRoIAlign(14, levels=self.levels, sampling_ratio=2,
                                                    name="keypoint_roi_pool")
        self.keypoint_head = KeypointRCNNHead(self.num_keypoints, self.keypoint_layers,
                                              name="keypoint_head", dtype=self.dtype_policy)

    def build(self, features_shape, proposals_shape, proposals_valid_shape=None):
        super().build(features_shape, proposals_shape, proposals_valid_shape)
        self.keypoint_head.build((None, None, 14, 14, features_shape[0][-1]))

    def keypoint_logits(self, features, rois):
        """Heatmap logits ``[B, R, 56, 56, K]`` for ``rois [B, R, 4]``."""
        return self.keypoint_head(self.keypoint_roi_pool(features, rois))

    def call(self, features, proposals, proposals_valid, training=None):
        features = list(features)
        out = super().call(features, proposals, proposals_valid, training=training)
        if training:
            out["keypoints"] = ops.zeros(tuple(ops.shape(out["boxes"])[:2])
                                         + (self.num_keypoints, 3))
            return out
        logits = self.keypoint_logits(features, out["boxes"])
        keypoints = heatmaps_to_keypoints(logits, out["boxes"], max(self.image_size))
        detected = ops.cast(out["labels"] >= 0, "float32")[:, :, None, None]
        out["keypoints"] = keypoints * detected
        return out

    def compute_output_spec(self, features, proposals, proposals_valid, training=None):
        out = super().compute_output_spec(features, proposals, proposals_valid, training)
        out["keypoints"] = keras.KerasTensor(
            (proposals.shape[0], self.detections_per_image, self.num_keypoints, 3), "float32")
        return out

    def get_config(self):
        config = super().get_config()
        config.update(num_keypoints=self.num_keypoints,
                      keypoint_layers=list(self.keypoint_layers))
        return config
