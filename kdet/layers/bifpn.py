"""BiFPN (Tan et al., EfficientDet), as effdet's ``BiFpn`` and automl.

Backbone features C3..C5 get extra levels P6, P7 (``ResampleFeature``: 1x1
conv + BN where channels change, then 3x3/s2 SAME max-pool). Each repeat
("cell") runs effdet's ``bifpn`` node list: a top-down path P6'..P3' and a
bottom-up path P4''..P7''. A node resamples each input on its own (1x1 conv +
BN if the channels differ, which only happens for backbone features in the
first cell; nearest upsample; max-pool down), fuses them with
``WeightedFusion`` and applies act -> separable 3x3 conv (with effdet's
"redundant bias") -> BN. The outputs are the last node of every level.
"""
import keras
from keras import ops

from kdet.layers.activation import activation_function
from kdet.layers.conv_norm_act import ACTIVATIONS, ConvNormAct, SeparableConvNormAct
from kdet.layers.fpn import resize_nearest

FUSIONS = {"fast": "fast", "fastattn": "fast", "softmax": "softmax", "attn": "softmax",
           "sum": "sum"}


def bifpn_nodes(min_level, max_level):
    """effdet/automl ``bifpn`` node list: ``[(level, input offsets), ...]``.

    Offsets index the list [inputs of the cell (one per level), node 0,
    node 1, ...]. Top-down node for level i fuses the level's latest feature
    and level i+1's; bottom-up node for level i fuses every feature of level
    i so far and level i-1's latest (effdet ``get_fpn_config("bifpn_*")``).

    >>> bifpn_nodes(3, 5)
    [(4, (1, 2)), (3, (0, 3)), (4, (1, 3, 4)), (5, (2, 5))]
    """
    num_levels = max_level - min_level + 1
    ids = {min_level + i: [i] for i in range(num_levels)}
    next_id = num_levels
    nodes = []
    for level in range(max_level - 1, min_level - 1, -1):
        nodes.append((level, (ids[level][-1], ids[level + 1][-1])))
        ids[level].append(next_id)
        next_id += 1
    for level in range(min_level + 1, max_level + 1):
        nodes.append((level, tuple(ids[level]) + (ids[level - 1][-1],)))
        ids[level].append(next_id)
        next_id += 1
    return nodes


@keras.saving.register_keras_serializable(package="kdet")
class WeightedFusion(keras.layers.Layer):
    """Fuse same-shaped feature maps with learned per-input weights.

    Modes (effdet ``FpnCombine.weight_method``):
    ``"fast"`` (effdet ``fastattn``): ``sum_i relu(w_i) x_i / (sum_j relu(w_j) + epsilon)``;
    ``"softmax"`` (effdet ``attn``; alias ``"attn"``): ``sum_i softmax(w)_i x_i``;
    ``"sum"``: plain sum, no weights. Weights start at 1.

    >>> import numpy as np
    >>> fuse = WeightedFusion("fast")
    >>> x = np.ones((1, 2, 2, 3), "float32")
    >>> round(float(fuse([x, 3 * x])[0, 0, 0, 0]), 3)
    2.0
    """

    def __init__(self, mode="fast", epsilon=1e-4, **kwargs):
        super().__init__(**kwargs)
        if mode not in FUSIONS:
            raise ValueError(f"WeightedFusion: mode must be one of {sorted(FUSIONS)}, got {mode!r}")
        self.mode = mode
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or not input_shape or \
                not isinstance(input_shape[0], (list, tuple)):
            raise ValueError("WeightedFusion: expects a list of feature maps, "
                             f"got input shape {input_shape}")
        self.num_inputs = len(input_shape)
        self.edge_weights = None
        if FUSIONS[self.mode] != "sum":
            # Weights stay float32 under mixed precision; normalised in float32.
            self.edge_weights = self.add_weight(shape=(self.num_inputs,), initializer="ones",
                                                autocast=False, name="edge_weights")

    def call(self, inputs):
        if len(inputs) != self.num_inputs:
            raise ValueError(f"WeightedFusion: built for {self.num_inputs} inputs, "
                             f"got {len(inputs)}")
        mode = FUSIONS[self.mode]
        if mode == "sum":  # adds, not a stack and a reduction: half the memory traffic
            out = inputs[0]
            for x in inputs[1:]:
                out = out + x
            return out
        if mode == "fast":
            weights = ops.relu(self.edge_weights)
            weights = weights / (ops.sum(weights) + self.epsilon)
        else:
            weights = ops.softmax(self.edge_weights, axis=0)
        weights = ops.cast(weights, inputs[0].dtype)
        out = inputs[0] * weights[0]
        for i in range(1, len(inputs)):
            out = out + inputs[i] * weights[i]
        return out

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode, "epsilon": self.epsilon})
        return config


def _pool_geometry(in_size, out_size):
    """effdet ``ResampleFeatureMap``: stride = (in-1)//out + 1, kernel = stride + 1."""
    stride = (in_size - 1) // out_size + 1
    return stride + 1, stride


@keras.saving.register_keras_serializable(package="kdet")
class ResampleFeature(keras.layers.Layer):
    """Bring a feature map to ``num_channels`` and to a target's spatial size.

    effdet ``ResampleFeatureMap``: a 1x1 conv (+ BN when ``apply_bn``; the
    conv keeps its bias when there is no BN or ``redundant_bias``) only if the
    input's channels differ from ``num_channels``, then a SAME max-pool when the
    target is smaller (kernel stride+1, stride ``(in-1)//out+1``: 3x3/s2 for one
    level), or a nearest upsample (PyTorch rule) to the target's exact size when
    larger. Without ``target`` it downsamples one level (3x3/s2 SAME), which is
    how P6 and P7 are made from C5.

    Call: ``layer(x, target=None)``; ``target`` is any tensor with the wanted
    spatial size (its channels are ignored). Spatial sizes must be static when
    ``target`` is given.

    >>> import numpy as np
    >>> resample = ResampleFeature(16)
    >>> tuple(resample(np.zeros((1, 9, 9, 40), "float32")).shape)
    (1, 5, 5, 16)
    """

    def __init__(self, num_channels, apply_bn=True, redundant_bias=True, downsample="max",
                 bn_epsilon=1e-3, bn_momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        if downsample not in ("max", "avg"):
            raise ValueError(f"ResampleFeature: downsample must be 'max' or 'avg', "
                             f"got {downsample!r}")
        self.num_channels = int(num_channels)
        self.apply_bn = bool(apply_bn)
        self.redundant_bias = bool(redundant_bias)
        self.downsample = downsample
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.conv = None

    def build(self, inputs_shape, target_shape=None):
        if inputs_shape[-1] is None:
            raise ValueError(f"ResampleFeature: channels of input shape {inputs_shape} unknown")
        if inputs_shape[-1] != self.num_channels:
            self.conv = ConvNormAct(
                self.num_channels, 1, norm="batch" if self.apply_bn else None, activation=None,
                use_bias=(not self.apply_bn) or self.redundant_bias, bn_epsilon=self.bn_epsilon,
                bn_momentum=self.bn_momentum, dtype=self.dtype_policy, name="conv")
            self.conv.build(inputs_shape)

    def _resample_size(self, x, target):
        """Resample spatially; ``target`` is a tensor or a static shape."""
        if target is None:
            return self._pool(x, (3, 3), (2, 2))
        target_shape = tuple(target) if isinstance(target, (tuple, list)) else tuple(target.shape)
        in_h, in_w, out_h, out_w = x.shape[1], x.shape[2], target_shape[1], target_shape[2]
        if None in (in_h, in_w, out_h, out_w):
            raise ValueError("ResampleFeature: spatial sizes must be static to resample to a "
                             f"target, got input {tuple(x.shape)} and target {target_shape}")
        if in_h > out_h and in_w > out_w:
            (kh, sh), (kw, sw) = _pool_geometry(in_h, out_h), _pool_geometry(in_w, out_w)
            return self._pool(x, (kh, kw), (sh, sw))
        if in_h < out_h or in_w < out_w:
            return resize_nearest(x, (out_h, out_w))
        return x

    def _pool(self, x, pool_size, strides):
        pool = ops.max_pool if self.downsample == "max" else ops.average_pool
        return pool(x, pool_size, strides=strides, padding="same")

    def call(self, inputs, target=None, training=None):
        x = inputs if self.conv is None else self.conv(inputs, training=training)
        return self._resample_size(x, target)

    def compute_output_shape(self, inputs_shape, target_shape=None):
        if target_shape is None:
            h, w = ((None if s is None else (s - 1) // 2 + 1) for s in inputs_shape[1:3])
        else:
            h, w = target_shape[1:3]
        return (inputs_shape[0], h, w, self.num_channels)

    def get_config(self):
        config = super().get_config()
        config.update({"num_channels": self.num_channels, "apply_bn": self.apply_bn,
                       "redundant_bias": self.redundant_bias, "downsample": self.downsample,
                       "bn_epsilon": self.bn_epsilon, "bn_momentum": self.bn_momentum})
        return config


@keras.saving.register_keras_serializable(package="kdet")
class BiFPNNode(keras.layers.Layer):
    """One BiFPN node (effdet ``Fnode``): resample each input, fuse, act, conv, BN.

    Part of ``BiFPN``; call ``node(inputs, target)`` with the list of input
    features and a tensor of the node's spatial size.
    """

    def __init__(self, num_channels, num_inputs, fusion="fast", activation="swish",
                 separable=True, redundant_bias=True, apply_resample_bn=True, bn_epsilon=1e-3,
                 bn_momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        if activation not in ACTIVATIONS or activation is None:
            raise ValueError(f"BiFPNNode: activation must be one of "
                             f"{[a for a in ACTIVATIONS if a]}, got {activation!r}")
        self.num_channels = int(num_channels)
        self.num_inputs = int(num_inputs)
        self.fusion = fusion
        self.activation = activation
        self.separable = bool(separable)
        self.redundant_bias = bool(redundant_bias)
        self.apply_resample_bn = bool(apply_resample_bn)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.resample = [
            ResampleFeature(num_channels, apply_bn=apply_resample_bn, redundant_bias=redundant_bias,
                            bn_epsilon=bn_epsilon, bn_momentum=bn_momentum,
                            dtype=self.dtype_policy, name=f"resample_{i}")
            for i in range(self.num_inputs)]
        self.combine = WeightedFusion(fusion, dtype=self.dtype_policy, name="combine")
        self._activation_fn = activation_function(ACTIVATIONS[activation])
        conv_cls = SeparableConvNormAct if self.separable else ConvNormAct
        self.conv = conv_cls(num_channels, 3, padding="same", norm="batch", activation=None,
                             use_bias=redundant_bias, bn_epsilon=bn_epsilon,
                             bn_momentum=bn_momentum, dtype=self.dtype_policy, name="conv")

    def build(self, inputs_shape, target_shape):
        if len(inputs_shape) != self.num_inputs:
            raise ValueError(f"BiFPNNode: built for {self.num_inputs} inputs, got "
                             f"{len(inputs_shape)}")
        out_shape = tuple(target_shape[:3]) + (self.num_channels,)
        for resample, shape in zip(self.resample, inputs_shape):
            resample.build(shape, target_shape)
        self.combine.build([out_shape] * self.num_inputs)
        self.conv.build(out_shape)

    def call(self, inputs, target, training=None):
        nodes = [resample(x, target=target, training=training)
                 for resample, x in zip(self.resample, inputs)]
        x = self._activation_fn(self.combine(nodes), training=training)
        return self.conv(x, training=training)

    def compute_output_shape(self, inputs_shape, target_shape):
        return tuple(target_shape[:3]) + (self.num_channels,)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_channels": self.num_channels, "num_inputs": self.num_inputs,
            "fusion": self.fusion, "activation": self.activation, "separable": self.separable,
            "redundant_bias": self.redundant_bias, "apply_resample_bn": self.apply_resample_bn,
            "bn_epsilon": self.bn_epsilon, "bn_momentum": self.bn_momentum})
        return config


@keras.saving.register_keras_serializable(package="kdet")
class BiFPN(keras.layers.Layer):
    """Bidirectional feature pyramid: ``{"C3", "C4", "C5"}`` -> ``{"P3", .., "P7"}``.

    Args:
        num_channels: BiFPN width (W_bifpn: 64 for D0).
        num_repeats: number of cells (D_bifpn: 3 for D0).
        min_level, max_level: output levels (3..7; D7x uses 3..8). Inputs are
            ``"C{min_level}"`` and the following levels present in the dict
            (or a list in level order); missing top levels are made by
            ``ResampleFeature`` from the level below.
        fusion: ``"fast"`` (D0-D5), ``"sum"`` (D6+, lite), ``"softmax"``/``"attn"``.
        activation: ``"swish"`` (D-models) or ``"relu6"`` (lite) or ``"relu"``.
        separable: separable 3x3 convs in the nodes (effdet: True).
        redundant_bias: keep conv biases before BN, as the TF checkpoints do.
        apply_resample_bn: BN after the 1x1 resampling convs (effdet: True).
        bn_epsilon, bn_momentum: Keras BN settings (effdet: 1e-3, 0.99).

    >>> import numpy as np
    >>> bifpn = BiFPN(16, 2)
    >>> feats = {"C3": np.zeros((1, 8, 8, 24), "float32"), "C4": np.zeros((1, 4, 4, 40), "float32"),
    ...          "C5": np.zeros((1, 2, 2, 80), "float32")}
    >>> [tuple(v.shape)[1:3] for v in bifpn(feats).values()]
    [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    """

    def __init__(self, num_channels, num_repeats, min_level=3, max_level=7, fusion="fast",
                 activation="swish", separable=True, redundant_bias=True, apply_resample_bn=True,
                 bn_epsilon=1e-3, bn_momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        if fusion not in FUSIONS:
            raise ValueError(f"BiFPN: fusion must be one of {sorted(FUSIONS)}, got {fusion!r}")
        if activation not in ACTIVATIONS or activation is None:
            raise ValueError(f"BiFPN: activation must be one of "
                             f"{[a for a in ACTIVATIONS if a]}, got {activation!r}")
        if not int(min_level) < int(max_level):
            raise ValueError(f"BiFPN: min_level ({min_level}) must be below max_level "
                             f"({max_level})")
        if int(num_repeats) < 1:
            raise ValueError(f"BiFPN: num_repeats must be >= 1, got {num_repeats}")
        self.num_channels = int(num_channels)
        self.num_repeats = int(num_repeats)
        self.min_level = int(min_level)
        self.max_level = int(max_level)
        self.fusion = fusion
        self.activation = activation
        self.separable = bool(separable)
        self.redundant_bias = bool(redundant_bias)
        self.apply_resample_bn = bool(apply_resample_bn)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.levels = tuple(range(self.min_level, self.max_level + 1))
        self.nodes_config = bifpn_nodes(self.min_level, self.max_level)
        common = dict(fusion=fusion, activation=activation, separable=separable,
                      redundant_bias=redundant_bias, apply_resample_bn=apply_resample_bn,
                      bn_epsilon=bn_epsilon, bn_momentum=bn_momentum, dtype=self.dtype_policy)
        self.cells = [
            [BiFPNNode(self.num_channels, len(offsets), name=f"cell_{r}_node_{i}", **common)
             for i, (_, offsets) in enumerate(self.nodes_config)]
            for r in range(self.num_repeats)]
        self.extra_resample = []

    def _input_levels(self, inputs):
        """Backbone levels present: ``min_level`` and the consecutive ones above it."""
        if isinstance(inputs, dict):
            levels = []
            for level in self.levels:
                if f"C{level}" not in inputs:
                    break
                levels.append(level)
            if not levels:
                raise ValueError(f"BiFPN: input dict needs key 'C{self.min_level}' (and the "
                                 f"levels above it), got {sorted(inputs)}")
            return levels, [inputs[f"C{level}"] for level in levels]
        inputs = list(inputs)
        if not 1 <= len(inputs) <= len(self.levels):
            raise ValueError(f"BiFPN: expected 1..{len(self.levels)} feature maps from level "
                             f"{self.min_level}, got {len(inputs)}")
        return list(self.levels[:len(inputs)]), inputs

    def build(self, input_shape):
        levels, shapes = self._input_levels(input_shape)
        shapes = [tuple(s) for s in shapes]
        self.extra_resample = []
        for level in self.levels[len(levels):]:
            resample = ResampleFeature(
                self.num_channels, apply_bn=self.apply_resample_bn,
                redundant_bias=self.redundant_bias, bn_epsilon=self.bn_epsilon,
                bn_momentum=self.bn_momentum, dtype=self.dtype_policy, name=f"resample_p{level}")
            resample.build(shapes[-1])
            shapes.append(resample.compute_output_shape(shapes[-1]))
            self.extra_resample.append(resample)
        for cell in self.cells:
            nodes = list(shapes)
            for node, (level, offsets) in zip(cell, self.nodes_config):
                target = shapes[level - self.min_level]
                node.build([nodes[i] for i in offsets], target)
                nodes.append(node.compute_output_shape(None, target))
            shapes = nodes[-len(self.levels):]

    def call(self, inputs, training=None):
        _, features = self._input_levels(inputs)
        features = list(features)
        for resample in self.extra_resample:
            features.append(resample(features[-1], training=training))
        for cell in self.cells:
            nodes = list(features)
            for node, (level, offsets) in zip(cell, self.nodes_config):
                target = features[level - self.min_level]
                nodes.append(node([nodes[i] for i in offsets], target=target, training=training))
            features = nodes[-len(self.levels):]
        return {f"P{level}": x for level, x in zip(self.levels, features)}

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_channels": self.num_channels, "num_repeats": self.num_repeats,
            "min_level": self.min_level, "max_level": self.max_level, "fusion": self.fusion,
            "activation": self.activation, "separable": self.separable,
            "redundant_bias": self.redundant_bias, "apply_resample_bn": self.apply_resample_bn,
            "bn_epsilon": self.bn_epsilon, "bn_momentum": self.bn_momentum})
        return config
