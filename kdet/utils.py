"""Small helpers with no better home."""
import keras

# Variables that PyTorch keeps as buffers, not parameters: BatchNorm running
# statistics and the statistics of keras.layers.Normalization.
_STATISTIC_NAMES = frozenset({"moving_mean", "moving_variance"})
_NORMALIZATION_NAMES = frozenset({"mean", "variance", "count"})


def _own_variables(layer):
    seen = set()
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        seen.update(id(v) for v in sub.weights)
    return [v for v in layer.weights if id(v) not in seen]


def count_params(model):
    """Count parameters the way PyTorch's ``model.parameters()`` does.

    Every weight is counted, trainable or frozen, except buffers: BatchNorm
    moving statistics, ``keras.layers.Normalization`` statistics and every
    variable of a layer that declares ``is_buffer_only = True`` (such as
    ``FrozenBatchNormalization``, torchvision's ``FrozenBatchNorm2d``).

    >>> import keras
    >>> m = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
    ...                       keras.layers.BatchNormalization()])
    >>> count_params(m)  # 3*3*3*4 + 4 (conv) + 2*4 (gamma, beta)
    120
    """
    total = 0
    seen = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        buffer_only = getattr(layer, "is_buffer_only", False)
        for v in _own_variables(layer):
            if id(v) in seen:
                continue
            seen.add(id(v))
            if buffer_only:
                continue
            if isinstance(layer, keras.layers.BatchNormalization) and v.name in _STATISTIC_NAMES:
                continue
            if isinstance(layer, keras.layers.Normalization) and v.name in _NORMALIZATION_NAMES:
                continue
            total += int(v.numpy().size) if hasattr(v, "numpy") else int(keras.ops.size(v))
    return total


def box_iou_numpy(a, b):
    """``[N, M]`` IoU of xyxy boxes in numpy float64 (0 where the union is empty).

    For host-side checks (comparing exported and Keras detections, confusion
    matrices); model code uses ``kdet.boxes.pairwise_iou``.

    >>> import numpy as np
    >>> box_iou_numpy([[0, 0, 2, 2]], [[1, 1, 3, 3], [5, 5, 5, 5]]).round(4).tolist()
    [[0.1429, 0.0]]
    """
    import numpy as np

    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
