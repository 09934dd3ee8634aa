"""Feature Pyramid Network (Lin et al. 2017), torchvision semantics.

``FPN`` is torchvision's ``FeaturePyramidNetwork`` with its extra blocks
``LastLevelMaxPool`` (Faster/Mask R-CNN: P6 by stride-2 subsampling of P5) and
``LastLevelP6P7`` (RetinaNet: P6 = 3x3/s2 conv on C5 or P5, P7 = 3x3/s2 conv
on relu(P6)). Convolutions pad explicitly and symmetrically like PyTorch, and
the top-down path upsamples with PyTorch's nearest rule to the lateral's exact
size, so the outputs match torchvision for any input size.
"""
import keras
import numpy as np
from keras import ops

from kdet.layers.conv_norm_act import ConvNormAct

EXTRA_BLOCKS = (None, "maxpool", "p6p7_from_c5", "p6p7_from_p5")


def _nearest_indices(in_size, out_size):
    """Source index of each output row: ``floor(i * in / out)`` in float32.

    This is PyTorch's ``F.interpolate(mode="nearest", size=...)`` rule (not
    TensorFlow's half-pixel one), computed the way PyTorch computes it.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype("int32")
    return np.minimum(index, in_size - 1)


def resize_nearest(x, size):
    """Nearest-neighbour resize of NHWC ``x`` to ``size=(h, w)``, PyTorch rule.

    Static sizes give a gather with constant indices (a plain ``repeat`` when
    the indices are one), dynamic sizes compute the same indices with ops.

    >>> import numpy as np
    >>> x = np.arange(3, dtype="float32").reshape(1, 3, 1, 1)
    >>> np.asarray(resize_nearest(x, (5, 1)))[0, :, 0, 0].tolist()
    [0.0, 0.0, 1.0, 1.0, 2.0]
    """
    for axis, out_size in ((1, size[0]), (2, size[1])):
        in_size = x.shape[axis]
        if isinstance(in_size, int) and isinstance(out_size, int):
            if in_size == out_size:
                continue
            index = _nearest_indices(in_size, out_size)
            factor = out_size // in_size
            if factor * in_size == out_size and np.array_equal(
                    index, np.arange(out_size) // factor):
                x = ops.repeat(x, factor, axis=axis)
            else:
                x = ops.take(x, index, axis=axis)
        else:
            in_size = ops.cast(ops.shape(x)[axis], "float32")
            out_float = ops.cast(out_size, "float32")
            index = ops.floor(ops.cast(ops.arange(out_size), "float32") * (in_size / out_float))
            index = ops.minimum(ops.cast(index, "int32"), ops.cast(in_size, "int32") - 1)
            x = ops.take(x, index, axis=axis)
    return x


def _torch_kaiming_uniform_a1():
    # torch.nn.init.kaiming_uniform_(w, a=1): bound = sqrt(3 / fan_in).
    return keras.initializers.VarianceScaling(1.0, mode="fan_in", distribution="uniform")


def _feature_list(inputs, levels, prefix, owner):
    """Pick ``prefix{level}`` entries of a dict (or a list in level order)."""
    if isinstance(inputs, dict):
        missing = [f"{prefix}{level}" for level in levels if f"{prefix}{level}" not in inputs]
        if missing:
            raise ValueError(f"{owner}: input dict lacks {missing} (has {sorted(inputs)}); "
                             f"expected keys {[f'{prefix}{level}' for level in levels]}")
        return [inputs[f"{prefix}{level}"] for level in levels]
    inputs = list(inputs)
    if len(inputs) != len(levels):
        raise ValueError(f"{owner}: expected {len(levels)} feature maps for levels "
                         f"{list(levels)}, got {len(inputs)}")
    return inputs


@keras.saving.register_keras_serializable(package="kdet")
class FPN(keras.layers.Layer):
    """Feature pyramid over backbone features ``{"C3": ..}`` -> ``{"P3": ..}``.

    Each input level gets a lateral 1x1 conv; from the top, the running sum is
    upsampled (nearest, to the lateral's exact size), added to the next
    lateral, and every level gets a 3x3 output conv.

    Args:
        out_channels: channels of every output level (256 in torchvision).
        in_levels: backbone levels used, e.g. ``(2, 3, 4, 5)`` (Faster R-CNN)
            or ``(3, 4, 5)`` (RetinaNet); input keys are ``"C{level}"``
            (other keys are ignored), or pass a list in this order.
        extra_blocks: None; ``"maxpool"`` (P6 = P5[::2, ::2], torchvision
            ``LastLevelMaxPool``); ``"p6p7_from_c5"`` (P6 = conv3x3/s2 on C5,
            the paper and torchvision RetinaNet v2) or ``"p6p7_from_p5"``
            (on P5, torchvision RetinaNet v1); then P7 = conv3x3/s2(relu(P6)).
        norm: None (convs with bias, torchvision v1) or ``"batch"`` (conv
            without bias + BN, torchvision v2 ``Conv2dNormActivation``); also
            ``"group"`` or ``"frozen_batch"``. P6/P7 convs never have a norm.
        bn_epsilon, bn_momentum: BN settings (PyTorch defaults 1e-5 and 0.1,
            which is Keras momentum 0.9).
        kernel_initializer: conv kernels (default PyTorch's
            ``kaiming_uniform_(a=1)``, as torchvision); biases start at 0.

    >>> import numpy as np
    >>> fpn = FPN(16, in_levels=(3, 4, 5), extra_blocks="p6p7_from_c5")
    >>> feats = {f"C{l}": np.zeros((1, 64 // 2**l, 64 // 2**l, 8), "float32") for l in (3, 4, 5)}
    >>> {k: tuple(v.shape) for k, v in fpn(feats).items()}["P7"]
    (1, 1, 1, 16)
    """

    def __init__(self, out_channels=256, in_levels=(2, 3, 4, 5), extra_blocks=None, norm=None,
                 bn_epsilon=1e-5, bn_momentum=0.9, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        if extra_blocks not in EXTRA_BLOCKS:
            raise ValueError(f"FPN: extra_blocks must be one of {list(EXTRA_BLOCKS)}, "
                             f"got {extra_blocks!r}")
        in_levels = tuple(int(level) for level in in_levels)
        if not in_levels or list(in_levels) != list(range(in_levels[0], in_levels[-1] + 1)):
            raise ValueError(f"FPN: in_levels must be consecutive increasing levels, "
                             f"got {in_levels}")
        self.out_channels = int(out_channels)
        self.in_levels = in_levels
        self.extra_blocks = extra_blocks
        self.norm = norm
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or _torch_kaiming_uniform_a1())
        common = dict(norm=norm, bn_epsilon=self.bn_epsilon, bn_momentum=self.bn_momentum,
                      kernel_initializer=self.kernel_initializer, dtype=self.dtype_policy)
        # Names follow torchvision (inner_blocks.i, layer_blocks.i, p6, p7).
        self.inner_blocks = [
            ConvNormAct(self.out_channels, 1, padding="valid", name=f"inner_block_{i}", **common)
            for i in range(len(in_levels))]
        self.layer_blocks = [
            ConvNormAct(self.out_channels, 3, padding="torch", name=f"layer_block_{i}", **common)
            for i in range(len(in_levels))]
        self.p6 = self.p7 = self.pool = None
        if extra_blocks == "maxpool":
            self.pool = keras.layers.MaxPooling2D(1, strides=2, dtype=self.dtype_policy,
                                                  name="pool")
        elif extra_blocks is not None:
            extra = dict(strides=2, padding="torch", kernel_initializer=self.kernel_initializer,
                         dtype=self.dtype_policy)
            self.p6 = ConvNormAct(self.out_channels, 3, name="p6", **extra)
            self.p7 = ConvNormAct(self.out_channels, 3, name="p7", **extra)

    @property
    def out_levels(self):
        """Output levels, e.g. ``(3, 4, 5, 6, 7)``."""
        extra = {None: 0, "maxpool": 1}.get(self.extra_blocks, 2)
        return tuple(range(self.in_levels[0], self.in_levels[-1] + 1 + extra))

    def build(self, input_shape):
        shapes = _feature_list(input_shape, self.in_levels, "C", "FPN")
        for shape, inner, layer in zip(shapes, self.inner_blocks, self.layer_blocks):
            inner.build(shape)
            out_shape = inner.compute_output_shape(shape)
            layer.build(out_shape)
        p5_shape = self.layer_blocks[-1].compute_output_shape(out_shape)
        if self.p6 is not None:
            p6_input = shapes[-1] if self.extra_blocks == "p6p7_from_c5" else p5_shape
            self.p6.build(p6_input)
            self.p7.build(self.p6.compute_output_shape(p6_input))

    def call(self, inputs, training=None):
        features = _feature_list(inputs, self.in_levels, "C", "FPN")
        last_inner = self.inner_blocks[-1](features[-1], training=training)
        results = [self.layer_blocks[-1](last_inner, training=training)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[i](features[i], training=training)
            size = _spatial_size(lateral)
            last_inner = lateral + resize_nearest(last_inner, size)
            results.insert(0, self.layer_blocks[i](last_inner, training=training))
        if self.pool is not None:
            results.append(self.pool(results[-1]))
        elif self.p6 is not None:
            source = features[-1] if self.extra_blocks == "p6p7_from_c5" else results[-1]
            p6 = self.p6(source)
            results.extend([p6, self.p7(ops.relu(p6))])
        return {f"P{level}": x for level, x in zip(self.out_levels, results)}

    def get_config(self):
        config = super().get_config()
        config.update({
            "out_channels": self.out_channels, "in_levels": list(self.in_levels),
            "extra_blocks": self.extra_blocks, "norm": self.norm, "bn_epsilon": self.bn_epsilon,
            "bn_momentum": self.bn_momentum,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)})
        return config


def _spatial_size(x):
    """(h, w) as Python ints when static, else as scalar tensors."""
    h, w = x.shape[1], x.shape[2]
    if h is None or w is None:
        dynamic = ops.shape(x)
        h = dynamic[1] if h is None else h
        w = dynamic[2] if w is None else w
    return h, w
