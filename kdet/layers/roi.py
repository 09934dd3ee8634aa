"""Keras layers over the RoI ops: ``RoIAlign``, ``RoIPool``, ``MultiLevelRoIAlign``.

Thin wrappers around :mod:`kdet.ops.roi_align` / :mod:`kdet.ops.roi_pool`
(torchvision semantics, channels last). Call as ``layer(features, rois)``
(``MultiLevelRoIAlign``: ``layer([P2, P3, P4, P5], rois)``), features
``[B, H, W, C]``, rois ``[B, R, 4]`` xyxy input-image pixels, output
``[B, R, out_h, out_w, C]``.

The layers never autocast their inputs: RoI coordinates stay float32 under a
mixed-precision policy (float16 cannot hold pixel coordinates), while the
features are cast to the layer's compute dtype.

    >>> import numpy as np
    >>> layer = RoIAlign(output_size=7, spatial_scale=1 / 16, sampling_ratio=2)
    >>> features = np.zeros((2, 32, 32, 8), "float32")
    >>> rois = np.array([[[0, 0, 100, 100]] * 3] * 2, "float32")
    >>> tuple(layer(features, rois).shape)
    (2, 3, 7, 7, 8)
"""
import keras
from keras import ops

from kdet.ops.roi_align import (_check_levels, _check_sampling, _output_pair,
                                multilevel_roi_align, roi_align)
from kdet.ops.roi_pool import roi_pool


def _pooled_shape(features_shape, rois_shape, output_size):
    return (rois_shape[0], rois_shape[1], output_size[0], output_size[1], features_shape[-1])


class _RoILayer(keras.layers.Layer):
    """Shared plumbing: no autocast (float32 RoIs), features to compute dtype."""

    def __init__(self, output_size, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.output_size = _output_pair(output_size, type(self).__name__)

    def _features(self, features):
        return ops.cast(features, self.compute_dtype)

    def compute_output_shape(self, features_shape, rois_shape):
        return _pooled_shape(features_shape, rois_shape, self.output_size)

    def get_config(self):
        config = super().get_config()
        config["output_size"] = list(self.output_size)
        return config


@keras.saving.register_keras_serializable(package="kdet")
class RoIAlign(_RoILayer):
    """``torchvision.ops.RoIAlign`` on ``[B, H, W, C]`` features and ``[B, R, 4]`` RoIs.

    Args:
        output_size: int or ``(out_h, out_w)``.
        spatial_scale: feature pixels per input pixel (``1 / stride``).
        sampling_ratio: samples per bin side, ``<= 0`` adaptive.
        aligned: half-pixel offset (Mask R-CNN / Detectron2 ``aligned=True``).
        max_sampling_ratio: see :func:`kdet.ops.roi_align` (adaptive strategy).
    """

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
                 max_sampling_ratio=None, **kwargs):
        super().__init__(output_size, **kwargs)
        _check_sampling(sampling_ratio, max_sampling_ratio, "RoIAlign")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.max_sampling_ratio = max_sampling_ratio

    def call(self, features, rois):
        return roi_align(self._features(features), rois, self.output_size,
                         spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
                         aligned=self.aligned, max_sampling_ratio=self.max_sampling_ratio)

    def get_config(self):
        config = super().get_config()
        config.update(spatial_scale=self.spatial_scale, sampling_ratio=self.sampling_ratio,
                      aligned=self.aligned, max_sampling_ratio=self.max_sampling_ratio)
        return config


@keras.saving.register_keras_serializable(package="kdet")
class RoIPool(_RoILayer):
    """``torchvision.ops.RoIPool`` on ``[B, H, W, C]`` features (static H, W).

    Args:
        output_size: int or ``(out_h, out_w)``.
        spatial_scale: feature pixels per input pixel (``1 / stride``).
    """

    def __init__(self, output_size, spatial_scale=1.0, **kwargs):
        super().__init__(output_size, **kwargs)
        self.spatial_scale = float(spatial_scale)

    def call(self, features, rois):
        return roi_pool(self._features(features), rois, self.output_size,
                        spatial_scale=self.spatial_scale)

    def get_config(self):
        config = super().get_config()
        config["spatial_scale"] = self.spatial_scale
        return config


@keras.saving.register_keras_serializable(package="kdet")
class MultiLevelRoIAlign(_RoILayer):
    """``torchvision.ops.MultiScaleRoIAlign``: each RoI from its FPN level.

    Call with a list of ``[B, H_l, W_l, C]`` maps in ``levels`` order (or a
    dict keyed ``"P{level}"``) and ``[B, R, 4]`` RoIs. Level ``l`` has stride
    ``2**l``.

    Args:
        output_size: int or ``(out_h, out_w)``.
        levels: consecutive levels, default ``(2, 3, 4, 5)``.
        sampling_ratio: samples per bin side (torchvision's detectors use 2).
        aligned: half-pixel offset (torchvision's pooler uses False).
        canonical_scale, canonical_level: LevelMapper constants (224, 4).
        max_sampling_ratio: see :func:`kdet.ops.roi_align` (adaptive strategy).
    """

    def __init__(self, output_size, levels=(2, 3, 4, 5), sampling_ratio=2, aligned=False,
                 canonical_scale=224, canonical_level=4, max_sampling_ratio=None, **kwargs):
        super().__init__(output_size, **kwargs)
        _check_sampling(sampling_ratio, max_sampling_ratio, "MultiLevelRoIAlign")
        self.levels = _check_levels(levels, "MultiLevelRoIAlign")
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = int(canonical_level)
        self.max_sampling_ratio = max_sampling_ratio

    def call(self, features, rois, training=None, image_index=None):
        if isinstance(features, dict):
            features = {key: self._features(value) for key, value in features.items()}
        else:
            features = [self._features(value) for value in features]
        # the crop-and-resize route (TF) for inference only: see multilevel_roi_align
        return multilevel_roi_align(
            features, rois, self.output_size, levels=self.levels,
            sampling_ratio=self.sampling_ratio, aligned=self.aligned,
            canonical_scale=self.canonical_scale, canonical_level=self.canonical_level,
            max_sampling_ratio=self.max_sampling_ratio, crop_and_resize=not training,
            image_index=image_index)

    def compute_output_shape(self, features_shape, rois_shape):
        first = (list(features_shape.values())[0] if isinstance(features_shape, dict)
                 else features_shape[0])
        return _pooled_shape(first, rois_shape, self.output_size)

    def get_config(self):
        config = super().get_config()
        config.update(levels=list(self.levels), sampling_ratio=self.sampling_ratio,
                      aligned=self.aligned, canonical_scale=self.canonical_scale,
                      canonical_level=self.canonical_level,
                      max_sampling_ratio=self.max_sampling_ratio)
        return config
