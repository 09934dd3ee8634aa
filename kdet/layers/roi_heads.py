"""Second-stage (RoI) heads of Faster / Mask R-CNN, torchvision semantics.

* ``TwoMLPHead``: torchvision ``TwoMLPHead``, flatten the pooled ``7 x 7 x C``
  RoI features in PyTorch's (C, y, x) order, then fc6 + ReLU, fc7 + ReLU.
* ``FastRCNNConvFCHead``: torchvision ``FastRCNNConvFCHead`` (the ``_v2``
  box head): 3x3 convs (+ BN) + ReLU on the pooled features, flatten, FC +
  ReLU layers.
* ``ResNetRoIHead``: the res5 stage of a ResNet as the box head of Faster
  R-CNN C4 (Detectron's R50-C4; torchvision ``nn.Sequential(resnet.layer4,
  AdaptiveAvgPool2d(1), Flatten())``): 3 bottleneck blocks, the first with
  stride 2, on 14 x 14 pooled RoIs -> 7 x 7 x 2048 -> average pool.
* ``FastRCNNPredictor``: class logits (``num_classes`` columns, background
  first) and per-class box deltas (``4 * num_classes``).
* ``MaskRCNNHead``: torchvision ``MaskRCNNHeads`` + ``MaskRCNNPredictor``:
  4x (3x3 conv 256 + ReLU), 2x2/s2 transposed conv 256 + ReLU, 1x1 conv to
  ``num_classes`` mask logits (28 x 28 from 14 x 14 RoIs); with
  ``norm="batch"`` each 3x3 conv has no bias and a BN (torchvision ``_v2``).
* ``postprocess_detections``: torchvision ``RoIHeads.postprocess_detections``
  (softmax, per-class decode with weights (10, 10, 5, 5), clip, drop the
  background column, score > 0.05, side >= 1e-2, class-wise NMS 0.5, top 100)
  on padded tensors.
* ``paste_masks``: torchvision ``paste_masks_in_image`` (pad the 28 x 28 mask
  by one pixel, grow the box by 30/28, truncate it to integers, bilinearly
  resize into it) as two separable interpolation matrices per detection.
* ``RoIHeads``: the inference path of the whole second stage as one layer
  (pool, heads, post-process, masks). Training (target sampling and losses)
  lives in :mod:`kdet.models.faster_rcnn`, which calls the same sub-layers.

Channel layout: every predictor column 0 is background (torchvision); kdet's
user labels ``c = 0..K-1`` are columns ``c + 1``, and ``postprocess_detections``
returns ``c`` again.

    >>> import numpy as np
    >>> head = MaskRCNNHead(num_classes=3, layers=(8,), dim_reduced=8)
    >>> tuple(head(np.zeros((1, 2, 14, 14, 4), "float32")).shape)
    (1, 2, 28, 28, 3)
"""
import keras
import numpy as np
from keras import ops

from kdet.boxes import BoxCoder, clip_boxes
from kdet.layers.conv import Conv2D
from kdet.layers.dense import Dense
from kdet.layers.normalization import BatchNormalization, FrozenBatchNormalization
from kdet.layers.roi import MultiLevelRoIAlign
from kdet.ops.nms import batched_nms


def _torch_linear_kernel():
    # torch.nn.Linear default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    return keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform")


def _build_with_torch_bias(layer, shape, fan_in=None):
    """Build ``layer`` with torch's default bias init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    (``nn.Linear``, ``nn.Conv2d``, ``nn.ConvTranspose2d`` reset_parameters, ``fan_in`` taken
    from the torch weight: the input's channels ``shape[-1]`` for a Linear or a 1 x 1 conv),
    which torchvision keeps in the box head, the box predictor and the mask predictor (its
    own inits there touch the weights only)."""
    bound = 1.0 / float(np.sqrt(shape[-1] if fan_in is None else fan_in))
    layer.bias_initializer = keras.initializers.RandomUniform(-bound, bound)
    layer.build(shape)


def _kaiming_fan_out():
    # torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu").
    return keras.initializers.VarianceScaling(2.0, mode="fan_out",
                                              distribution="untruncated_normal")


def _merge_rois(x):
    """``[B, R, ...]`` -> ``[B * R, ...]`` (static trailing dims)."""
    return ops.reshape(x, (-1,) + tuple(x.shape[2:]))


HEAD_NORMS = (None, "batch")
BOX_HEADS = ("two_mlp", "conv_fc", "res5")


def _head_batch_norm(norm, index, prefix, dtype):
    """The BN after a head conv (torchvision ``nn.BatchNorm2d``: eps 1e-5, momentum 0.1)."""
    if norm not in HEAD_NORMS:
        raise ValueError(f"RoI head norm must be one of {list(HEAD_NORMS)}, got {norm!r}")
    if norm is None:
        return None
    return BatchNormalization(epsilon=1e-5, momentum=0.9, dtype=dtype,
                              name=f"{prefix}{index}")


def _conv_norm_relu(x, conv, norm, training, roi_mask):
    """conv -> BN -> ReLU on ``[N, h, w, C]`` merged RoIs (conv + fused ReLU without BN).

    In training BN statistics come from the RoIs where ``roi_mask [N]`` is
    True only: padded or unsampled RoI slots do not exist in torchvision's
    batch, so they must not move the batch statistics.
    """
    x = conv(x)
    if norm is None:
        return x
    return ops.relu(_masked_norm(x, norm, training, roi_mask))


def _masked_norm(x, norm, training, roi_mask):
    """``norm`` on ``[N, h, w, C]`` merged RoIs, batch statistics over ``roi_mask [N]`` only
    (a ``FrozenBatchNormalization`` has no statistics to take)."""
    if isinstance(norm, FrozenBatchNormalization):
        return norm(x)
    mask = None
    if roi_mask is not None and training:
        mask = ops.broadcast_to(ops.reshape(ops.cast(roi_mask, "bool"), (-1, 1, 1)),
                                tuple(ops.shape(x)[:3]))
    return norm(x, training=training, mask=mask)


def _build_conv_stack(convs, norms, roi_shape):
    """Build the conv (+ BN) layers for RoIs of ``roi_shape [B, R, h, w, C]``; returns the
    merged-RoI output shape ``(None, h', w', C')``."""
    shape = (None,) + tuple(roi_shape[2:])
    for conv, norm in zip(convs, norms):
        conv.build(shape)
        shape = conv.compute_output_shape(shape)
        if norm is not None:
            norm.build(shape)
    return shape


def _run_conv_stack(x, convs, norms, training, roi_mask):
    """``[B, R, h, w, C]`` RoIs through the conv -> BN -> ReLU stack (:func:`_conv_norm_relu`);
    returns the merged ``[B * R, h', w', C']`` output."""
    y = _merge_rois(x)
    mask = None if roi_mask is None else ops.reshape(roi_mask, (-1,))
    for conv, norm in zip(convs, norms):
        y = _conv_norm_relu(y, conv, norm, training, mask)
    return y


@keras.saving.register_keras_serializable(package="kdet")
class TwoMLPHead(keras.layers.Layer):
    """torchvision ``TwoMLPHead``: ``[B, R, h, w, C]`` -> ``[B, R, representation_size]``.

    The pooled features are flattened channels-first, as PyTorch does, so
    torchvision's ``fc6`` weight copies over unchanged.

    >>> import numpy as np
    >>> tuple(TwoMLPHead(16)(np.zeros((2, 3, 7, 7, 4), "float32")).shape)
    (2, 3, 16)
    """

    def __init__(self, representation_size=1024, **kwargs):
        super().__init__(**kwargs)
        self.representation_size = int(representation_size)
        common = dict(activation="relu", kernel_initializer=_torch_linear_kernel(),
                      dtype=self.dtype_policy)
        self.fc6 = Dense(self.representation_size, name="fc6", **common)
        self.fc7 = keras.layers.Dense(self.representation_size, name="fc7", **common)

    def build(self, input_shape):
        flat = int(np.prod(input_shape[2:]))
        _build_with_torch_bias(self.fc6, (None, flat))
        _build_with_torch_bias(self.fc7, (None, self.representation_size))

    def call(self, x):
        x = ops.transpose(x, (0, 1, 4, 2, 3))  # (C, y, x) like torch's flatten of NCHW
        x = ops.reshape(x, (ops.shape(x)[0], ops.shape(x)[1], int(np.prod(x.shape[2:]))))
        return self.fc7(self.fc6(x))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:2]) + (self.representation_size,)

    def get_config(self):
        config = super().get_config()
        config["representation_size"] = self.representation_size
        return config


@keras.saving.register_keras_serializable(package="kdet")
class FastRCNNConvFCHead(keras.layers.Layer):
    """torchvision ``FastRCNNConvFCHead``: ``[B, R, h, w, C]`` -> ``[B, R, fc_layers[-1]]``.

    ``conv{i}``: 3x3 conv (no bias with ``norm="batch"``) -> ``bn{i}`` -> ReLU;
    then the features are flattened channels-first as PyTorch does and go
    through ``fc{j}`` + ReLU. torchvision's ``_v2`` box head is
    ``conv_layers=(256,) * 4, fc_layers=(1024,), norm="batch"``.

    Call ``(x, training=None, roi_mask=None)``; ``roi_mask [B, R]`` marks the
    RoIs whose features make the BN batch statistics in training.

    >>> import numpy as np
    >>> tuple(FastRCNNConvFCHead((4, 4), (16,))(np.zeros((2, 3, 7, 7, 4), "float32")).shape)
    (2, 3, 16)
    """

    def __init__(self, conv_layers=(256, 256, 256, 256), fc_layers=(1024,), norm="batch",
                 **kwargs):
        super().__init__(**kwargs)
        self.conv_layers = tuple(int(c) for c in conv_layers)
        self.fc_layers = tuple(int(c) for c in fc_layers)
        if not self.fc_layers:
            raise ValueError("FastRCNNConvFCHead: fc_layers must not be empty")
        self.norm = norm
        self.norms = [_head_batch_norm(norm, i, "bn", self.dtype_policy)
                      for i in range(len(self.conv_layers))]
        self.convs = [Conv2D(c, 3, padding="same", use_bias=norm is None,
                             activation="relu" if norm is None else None,
                             kernel_initializer=_kaiming_fan_out(),
                             bias_initializer="zeros", dtype=self.dtype_policy,
                             name=f"conv{i}")
                      for i, c in enumerate(self.conv_layers)]
        self.fcs = [Dense(c, activation="relu", kernel_initializer=_torch_linear_kernel(),
                          dtype=self.dtype_policy, name=f"fc{j}")
                    for j, c in enumerate(self.fc_layers)]

    @property
    def representation_size(self):
        return self.fc_layers[-1]

    def build(self, input_shape):
        shape = _build_conv_stack(self.convs, self.norms, input_shape)
        flat = int(np.prod(shape[1:]))
        for fc in self.fcs:
            _build_with_torch_bias(fc, (None, flat))
            flat = fc.units

    def call(self, x, training=None, roi_mask=None):
        batch, rois = ops.shape(x)[0], ops.shape(x)[1]
        y = _run_conv_stack(x, self.convs, self.norms, training, roi_mask)
        y = ops.transpose(y, (0, 3, 1, 2))  # (C, y, x) like torch's flatten of NCHW
        y = ops.reshape(y, (-1, int(np.prod(y.shape[1:]))))
        for fc in self.fcs:
            y = fc(y)
        return ops.reshape(y, (batch, rois, self.fc_layers[-1]))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:2]) + (self.fc_layers[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(conv_layers=list(self.conv_layers), fc_layers=list(self.fc_layers),
                      norm=self.norm)
        return config


RESNET_HEAD_NORMS = ("batch", "frozen_batch")


@keras.saving.register_keras_serializable(package="kdet")
class ResNetRoIHead(keras.layers.Layer):
    """A ResNet stage of bottleneck blocks as a box head: ``[B, R, h, w, C]`` -> ``[B, R, 4w]``.

    Faster R-CNN C4 (Detectron's R50-C4) runs ResNet-50's ``layer4`` (res5)
    on 14 x 14 RoIs pooled from C4, then averages the 7 x 7 x 2048 output:
    torchvision ``nn.Sequential(resnet.layer4, nn.AdaptiveAvgPool2d(1),
    nn.Flatten())``. The blocks are torchvision's ``Bottleneck`` (v1.5: the
    stride on the 3x3 conv, 1x1 conv + norm shortcut in the first block, no
    conv biases), named ``layer4.{i}.conv1`` .. ``layer4.{i}.downsample.1`` as
    the backbone's layers. They are built here rather than taken from
    :mod:`kdet.backbones.resnet` because the RoI batch needs masked BN
    statistics: in training only the RoIs marked in ``roi_mask`` (the sampled
    ones torchvision's batch holds) make a ``"batch"`` norm's statistics.

    Args:
        blocks: bottleneck blocks (3 for ResNet-50/101 res5).
        width: bottleneck width (512; the output has ``4 * width`` channels).
        strides: stride of the first block (2: 14 x 14 -> 7 x 7).
        norm: ``"batch"`` or ``"frozen_batch"`` (the backbone's norm).
        norm_epsilon: BN epsilon, 1e-5.
        stage_name: name prefix of the blocks, ``"layer4"``.

    Call ``(x, training=None, roi_mask=None)``.

    >>> import numpy as np
    >>> head = ResNetRoIHead(blocks=1, width=4)
    >>> tuple(head(np.zeros((2, 3, 14, 14, 8), "float32")).shape)
    (2, 3, 16)
    """

    def __init__(self, blocks=3, width=512, strides=2, norm="batch", norm_epsilon=1e-5,
                 stage_name="layer4", **kwargs):
        super().__init__(**kwargs)
        if norm not in RESNET_HEAD_NORMS:
            raise ValueError(f"ResNetRoIHead: norm must be one of {RESNET_HEAD_NORMS}, "
                             f"got {norm!r}")
        self.blocks = int(blocks)
        self.width = int(width)
        self.strides = int(strides)
        self.norm = norm
        self.norm_epsilon = float(norm_epsilon)
        self.stage_name = stage_name
        self.units = []  # per block: {name: layer}
        for index in range(self.blocks):
            prefix = f"{stage_name}.{index}"
            stride = self.strides if index == 0 else 1
            unit = {}
            for k, (filters, size) in enumerate(((self.width, 1), (self.width, 3),
                                                 (4 * self.width, 1)), start=1):
                unit[f"conv{k}"] = self._conv(filters, size, stride if k == 2 else 1,
                                              f"{prefix}.conv{k}")
                unit[f"bn{k}"] = self._norm(f"{prefix}.bn{k}")
            if index == 0:
                unit["downsample"] = self._conv(4 * self.width, 1, self.strides,
                                                f"{prefix}.downsample.0")
                unit["downsample_norm"] = self._norm(f"{prefix}.downsample.1")
            self.units.append(unit)

    def _conv(self, filters, size, strides, name):
        return keras.layers.Conv2D(filters, size, strides=strides, use_bias=False,
                                   kernel_initializer=_kaiming_fan_out(),
                                   dtype=self.dtype_policy, name=name)

    def _norm(self, name):
        if self.norm == "frozen_batch":
            return FrozenBatchNormalization(epsilon=self.norm_epsilon, dtype=self.dtype_policy,
                                            name=name)
        return BatchNormalization(epsilon=self.norm_epsilon, momentum=0.9,
                                  dtype=self.dtype_policy, name=name)

    def build(self, input_shape):
        shape = (None,) + tuple(input_shape[2:])
        for unit in self.units:
            block_in = shape
            for k in (1, 2, 3):
                conv = unit[f"conv{k}"]
                if k == 2:  # explicit symmetric padding 1, as torchvision
                    shape = (shape[0], shape[1] + 2, shape[2] + 2, shape[3])
                conv.build(shape)
                shape = conv.compute_output_shape(shape)
                unit[f"bn{k}"].build(shape)
            if "downsample" in unit:
                unit["downsample"].build(block_in)
                unit["downsample_norm"].build(unit["downsample"].compute_output_shape(block_in))

    def call(self, x, training=None, roi_mask=None):
        batch, rois = ops.shape(x)[0], ops.shape(x)[1]
        y = _merge_rois(x)
        mask = None if roi_mask is None else ops.reshape(roi_mask, (-1,))

        def norm(layer, value):
            return _masked_norm(value, layer, training, mask)

        for unit in self.units:
            shortcut = y
            if "downsample" in unit:
                shortcut = norm(unit["downsample_norm"], unit["downsample"](y))
            z = ops.relu(norm(unit["bn1"], unit["conv1"](y)))
            z = ops.pad(z, [(0, 0), (1, 1), (1, 1), (0, 0)])
            z = ops.relu(norm(unit["bn2"], unit["conv2"](z)))
            z = norm(unit["bn3"], unit["conv3"](z))
            y = ops.relu(z + shortcut)
        y = ops.mean(y, axis=(1, 2))
        return ops.reshape(y, (batch, rois, 4 * self.width))

    @property
    def representation_size(self):
        return 4 * self.width

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:2]) + (4 * self.width,)

    def get_config(self):
        config = super().get_config()
        config.update(blocks=self.blocks, width=self.width, strides=self.strides,
                      norm=self.norm, norm_epsilon=self.norm_epsilon,
                      stage_name=self.stage_name)
        return config


@keras.saving.register_keras_serializable(package="kdet")
class FastRCNNPredictor(keras.layers.Layer):
    """torchvision ``FastRCNNPredictor``: class logits ``[..., K+1]``, box deltas ``[..., 4(K+1)]``.

    Returns ``{"class_logits", "box_regression"}``.

    Args:
        num_classes: columns including background (torchvision's count).

    >>> import numpy as np
    >>> out = FastRCNNPredictor(3)(np.zeros((1, 2, 8), "float32"))
    >>> tuple(out["class_logits"].shape), tuple(out["box_regression"].shape)
    ((1, 2, 3), (1, 2, 12))
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        common = dict(kernel_initializer=_torch_linear_kernel(), dtype=self.dtype_policy)
        self.cls_score = keras.layers.Dense(self.num_classes, name="cls_score", **common)
        self.bbox_pred = keras.layers.Dense(4 * self.num_classes, name="bbox_pred", **common)

    def build(self, input_shape):
        _build_with_torch_bias(self.cls_score, input_shape)
        _build_with_torch_bias(self.bbox_pred, input_shape)

    def call(self, x):
        return {"class_logits": self.cls_score(x), "box_regression": self.bbox_pred(x)}

    def compute_output_spec(self, x):
        lead = tuple(x.shape[:-1])
        return {"class_logits": keras.KerasTensor(lead + (self.num_classes,), self.compute_dtype),
                "box_regression": keras.KerasTensor(lead + (4 * self.num_classes,),
                                                    self.compute_dtype)}

    def get_config(self):
        config = super().get_config()
        config["num_classes"] = self.num_classes
        return config


@keras.saving.register_keras_serializable(package="kdet")
class MaskRCNNHead(keras.layers.Layer):
    """torchvision ``MaskRCNNHeads`` + ``MaskRCNNPredictor`` (channels last).

    ``[B, R, 14, 14, C]`` RoI features -> ``[B, R, 28, 28, K+1]`` mask logits.

    Args:
        num_classes: output channels including background (torchvision's count).
        layers: channels of the 3x3 convs, default ``(256,) * 4``.
        dim_reduced: channels of the 2x2/s2 transposed conv, 256.
        norm: None (v1: conv + bias + ReLU) or ``"batch"`` (torchvision
            ``_v2``: conv without bias -> BN ``mask_bn{i}`` -> ReLU).

    Call ``(x, training=None, roi_mask=None)``; ``roi_mask [B, R]`` marks the
    RoIs whose features make the BN batch statistics in training.
    """

    def __init__(self, num_classes, layers=(256, 256, 256, 256), dim_reduced=256, norm=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.layer_channels = tuple(int(c) for c in layers)
        self.dim_reduced = int(dim_reduced)
        self.norm = norm
        common = dict(kernel_initializer=_kaiming_fan_out(), bias_initializer="zeros",
                      dtype=self.dtype_policy)
        self.norms = [_head_batch_norm(norm, i, "mask_bn", self.dtype_policy)
                      for i in range(len(self.layer_channels))]
        self.convs = [Conv2D(c, 3, padding="same", use_bias=norm is None,
                             activation="relu" if norm is None else None,
                             name=f"mask_fcn{i}", **common)
                      for i, c in enumerate(self.layer_channels)]
        self.conv5_mask = keras.layers.Conv2DTranspose(self.dim_reduced, 2, strides=2,
                                                       activation="relu", name="conv5_mask",
                                                       **common)
        self.mask_fcn_logits = keras.layers.Conv2D(self.num_classes, 1, name="mask_fcn_logits",
                                                   **common)

    def build(self, input_shape):
        shape = _build_conv_stack(self.convs, self.norms, input_shape)
        # torch's fan_in of ConvTranspose2d(in, out, 2) is out x 2 x 2 (weight [in, out, 2, 2])
        _build_with_torch_bias(self.conv5_mask, shape, 4 * self.dim_reduced)
        shape = self.conv5_mask.compute_output_shape(shape)
        _build_with_torch_bias(self.mask_fcn_logits, shape)

    def call(self, x, training=None, roi_mask=None):
        batch, rois = ops.shape(x)[0], ops.shape(x)[1]
        y = self.mask_fcn_logits(self._upsampled(x, training, roi_mask))
        return ops.reshape(y, (batch, rois) + tuple(y.shape[1:]))

    def _upsampled(self, x, training, roi_mask):
        """``[B R, 28, 28, dim_reduced]``: the convs, then the transposed conv (+ ReLU)."""
        return self.conv5_mask(_run_conv_stack(x, self.convs, self.norms, training, roi_mask))

    def column_logits(self, x, columns):
        """Inference logits ``[B, R, 28, 28]`` of one column per RoI (``columns [B, R]``
        int): ``call(x)[..., column]`` with the 1 x 1 predictor run for that column alone.

        At inference only the detected class's mask is read, so the other ``K`` columns'
        products (90 of 91 on COCO: 1.8 GMAC for 100 RoIs) are skipped: one
        ``[784, C] @ [C, 1]`` product per RoI.
        """
        batch, rois = ops.shape(x)[0], ops.shape(x)[1]
        y = self._upsampled(x, False, None)
        size = tuple(y.shape[1:3])
        columns = ops.reshape(columns, (-1,))
        kernel = ops.cast(self.mask_fcn_logits.kernel[0, 0], y.dtype)  # [C, K+1]
        weights = ops.take(ops.transpose(kernel), columns, axis=0)  # [B R, C]
        logits = ops.matmul(ops.reshape(y, (-1, size[0] * size[1], y.shape[-1])),
                            weights[:, :, None])[..., 0]
        logits = logits + ops.take(ops.cast(self.mask_fcn_logits.bias, y.dtype),
                                   columns)[:, None]
        return ops.reshape(logits, (batch, rois) + size)

    def compute_output_shape(self, input_shape):
        h, w = input_shape[2], input_shape[3]
        return (input_shape[0], input_shape[1], 2 * h, 2 * w, self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, layers=list(self.layer_channels),
                      dim_reduced=self.dim_reduced, norm=self.norm)
        return config


def postprocess_detections(class_logits, box_regression, proposals, proposals_valid, image_size,
                           score_threshold=0.05, nms_threshold=0.5, detections_per_image=100,
                           min_size=1e-2, box_coder=None):
    """torchvision ``RoIHeads.postprocess_detections`` with static shapes.

    Args:
        class_logits: ``[B, R, K+1]`` (column 0 background).
        box_regression: ``[B, R, 4(K+1)]`` deltas per class.
        proposals: ``[B, R, 4]`` xyxy; proposals_valid: ``[B, R]`` bool.
        image_size: ``(H, W)`` for clipping.

    Returns:
        ``{"boxes": [B, D, 4], "scores": [B, D], "labels": [B, D], "num_detections": [B]}``
        with kdet labels ``0..K-1`` (torchvision's label minus one), padded
        with zero boxes, score 0 and label -1, in descending score order.
    """
    box_coder = box_coder or BoxCoder((10.0, 10.0, 5.0, 5.0))
    class_logits = ops.cast(class_logits, "float32")
    box_regression = ops.cast(box_regression, "float32")
    num_columns = class_logits.shape[-1]
    num_rois = class_logits.shape[1]
    deltas = ops.reshape(box_regression, (-1, num_rois, num_columns, 4))
    boxes = box_coder.decode(deltas, proposals[:, :, None, :])
    boxes = clip_boxes(boxes, image_size[0], image_size[1])[:, :, 1:]  # drop background
    scores = ops.softmax(class_logits, axis=-1)[:, :, 1:]
    num_fg = num_columns - 1
    boxes = ops.reshape(boxes, (-1, num_rois * num_fg, 4))
    scores = ops.reshape(scores, (-1, num_rois * num_fg))
    labels = ops.convert_to_tensor(np.tile(np.arange(num_fg, dtype="int32"), num_rois))
    labels = ops.broadcast_to(labels[None], ops.shape(scores))
    valid = ops.reshape(ops.repeat(ops.cast(proposals_valid, "bool")[:, :, None], num_fg, axis=2),
                        (-1, num_rois * num_fg))
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    valid = valid & (scores > score_threshold) & (width >= min_size) & (height >= min_size)
    index, count = batched_nms(boxes, scores, labels, iou_threshold=nms_threshold,
                               max_output_size=detections_per_image, method="mask",
                               valid_mask=valid)
    keep = index >= 0
    safe = ops.where(keep, index, 0)
    out_boxes = ops.where(keep[..., None], ops.take_along_axis(boxes, safe[..., None], axis=1), 0.0)
    out_scores = ops.where(keep, ops.take_along_axis(scores, safe, axis=1), 0.0)
    out_labels = ops.where(keep, ops.take_along_axis(labels, safe, axis=1), -1)
    return {"boxes": out_boxes, "scores": out_scores, "labels": ops.cast(out_labels, "int32"),
            "num_detections": ops.cast(count, "int32")}


def _trunc(x):
    # torch's float -> int64 conversion rounds toward zero.
    return ops.sign(x) * ops.floor(ops.abs(x))


def _paste_weights(start, end, mask_size, out_size):
    """Interpolation matrix ``[B, D, out_size, mask_size]`` of one axis.

    Pixel ``p`` of the image lies in the integer box ``[start, end]`` and
    reads column ``j = p - start`` of the mask resized (bilinear,
    ``align_corners=False``) to ``end - start + 1`` pixels.
    """
    length = ops.maximum(end - start + 1.0, 1.0)[..., None]  # [B, D, 1]
    pixel = ops.cast(ops.arange(out_size), "float32")[None, None, :]
    j = pixel - start[..., None]
    scale = float(mask_size) / length
    src = ops.maximum(scale * (j + 0.5) - 0.5, 0.0)
    i0 = ops.floor(src)
    lam = src - i0
    i0 = ops.cast(ops.minimum(i0, mask_size - 1), "int32")
    i1 = ops.minimum(i0 + 1, mask_size - 1)
    weights = (ops.one_hot(i0, mask_size) * (1.0 - lam)[..., None]
               + ops.one_hot(i1, mask_size) * lam[..., None])
    inside = (pixel >= start[..., None]) & (pixel <= end[..., None])
    return weights * ops.cast(inside, "float32")[..., None]


def paste_masks(masks, boxes, image_size, padding=1):
    """torchvision ``paste_masks_in_image``: ``[B, D, M, M]`` masks into ``[B, D, H, W]``.

    Each mask is zero-padded by ``padding`` pixels, its box grown by
    ``(M + 2 padding) / M`` about the centre and truncated to integers
    ``(x0, y0, x1, y1)``; the mask is bilinearly resized
    (``align_corners=False``) to ``(y1 - y0 + 1, x1 - x0 + 1)`` and written at
    ``[y0:y1 + 1, x0:x1 + 1]`` (clipped to the image), zeros elsewhere.

    >>> import numpy as np
    >>> out = paste_masks(np.ones((1, 1, 28, 28), "float32"),
    ...                   np.array([[[2, 2, 9, 9]]], "float32"), (12, 12))
    >>> tuple(out.shape), float(np.asarray(out)[0, 0, 5, 5]), float(np.asarray(out)[0, 0, 0, 0])
    ((1, 1, 12, 12), 1.0, 0.0)
    """
    masks = ops.cast(masks, "float32")
    boxes = ops.cast(boxes, "float32")
    size = masks.shape[-1]
    padded_size = size + 2 * padding
    masks = ops.pad(masks, [(0, 0), (0, 0), (padding, padding), (padding, padding)])
    scale = padded_size / size
    half_w = (boxes[..., 2] - boxes[..., 0]) * 0.5 * scale
    half_h = (boxes[..., 3] - boxes[..., 1]) * 0.5 * scale
    center_x = (boxes[..., 2] + boxes[..., 0]) * 0.5
    center_y = (boxes[..., 3] + boxes[..., 1]) * 0.5
    x0, x1 = _trunc(center_x - half_w), _trunc(center_x + half_w)
    y0, y1 = _trunc(center_y - half_h), _trunc(center_y + half_h)
    weights_y = _paste_weights(y0, y1, padded_size, int(image_size[0]))
    weights_x = _paste_weights(x0, x1, padded_size, int(image_size[1]))
    rows = ops.einsum("bdyi,bdij->bdyj", weights_y, masks)
    return ops.einsum("bdyj,bdxj->bdyx", rows, weights_x)


# Mask rows computed at inference: the smallest bucket holding every image's detections
# (RoIHeads._detection_masks), else all D.
MASK_ROW_BUCKETS = (0, 8, 32)


@keras.saving.register_keras_serializable(package="kdet")
class RoIHeads(keras.layers.Layer):
    """The second stage at inference: proposals -> detections (+ pasted masks).

    Args:
        num_classes: foreground classes ``K`` (predictors get ``K + 1`` columns).
        image_size: ``(H, W)`` of the model input.
        levels: pyramid levels pooled, ``(2, 3, 4, 5)`` (``(4,)``: C4 alone, stride 16).
        representation_size: 1024; score_threshold 0.05; nms_threshold 0.5;
        detections_per_image 100; min_size 1e-2 (torchvision defaults).
        with_masks: add the Mask R-CNN head (RoIAlign 14, sampling 2).
        box_head: ``"two_mlp"`` (``TwoMLPHead``, torchvision v1),
            ``"conv_fc"`` (``FastRCNNConvFCHead`` with 4 convs 256 and one FC
            ``representation_size``, torchvision ``_v2``) or ``"res5"``
            (``ResNetRoIHead``: ResNet-50's res5 on 14 x 14 RoIs, Faster R-CNN
            C4; ``representation_size`` is then its 2048 channels).
        head_norm: None or ``"batch"``: the norm of the conv-FC box head and
            the mask head convs (``"batch"`` in torchvision ``_v2``); for
            ``"res5"`` the backbone's norm, ``"batch"`` or ``"frozen_batch"``.
        head_norm_epsilon: BN epsilon of the res5 head (the backbone's).
        pool_size: side of the pooled box RoIs (7; 14 for ``"res5"``).

    Call ``(features [P2..P5], proposals [B, P, 4], proposals_valid [B, P],
    training=None)`` -> the padded detection dict (``"masks" [B, D, H, W]``
    probabilities with ``with_masks``). With ``training=True`` the heads are
    skipped and the dict holds zeros (the model's loss samples its own RoIs
    and calls ``box_roi_pool``, ``box_head``, ``box_predictor``,
    ``mask_roi_pool`` and ``mask_head`` directly).
    """

    def __init__(self, num_classes, image_size, levels=(2, 3, 4, 5), representation_size=1024,
                 score_threshold=0.05, nms_threshold=0.5, detections_per_image=100,
                 min_size=1e-2, with_masks=False, box_head="two_mlp", head_norm=None,
                 head_norm_epsilon=1e-5, pool_size=7, **kwargs):
        super().__init__(**kwargs)
        if box_head not in BOX_HEADS:
            raise ValueError(f"RoIHeads: box_head must be one of {BOX_HEADS}, got {box_head!r}")
        norms = RESNET_HEAD_NORMS if box_head == "res5" else HEAD_NORMS
        if head_norm not in norms:
            raise ValueError(f"RoIHeads: head_norm of box_head {box_head!r} must be one of "
                             f"{list(norms)}, got {head_norm!r}")
        if box_head == "res5" and with_masks:
            raise ValueError("RoIHeads: box_head 'res5' (C4) has no mask head")
        self.box_head_type = box_head
        self.head_norm_epsilon = float(head_norm_epsilon)
        self.pool_size = int(pool_size)
        self.head_norm = head_norm
        self.num_classes = int(num_classes)
        self.image_size = tuple(int(s) for s in (
            image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)))
        self.levels = tuple(int(level) for level in levels)
        self.representation_size = int(representation_size)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = int(detections_per_image)
        self.min_size = float(min_size)
        self.with_masks = bool(with_masks)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.box_roi_pool = MultiLevelRoIAlign(self.pool_size, levels=self.levels,
                                               sampling_ratio=2, name="box_roi_pool")
        if box_head == "res5":
            self.box_head = ResNetRoIHead(norm=head_norm, norm_epsilon=self.head_norm_epsilon,
                                          name="box_head", dtype=self.dtype_policy)
            self.representation_size = self.box_head.representation_size
        elif box_head == "conv_fc":
            self.box_head = FastRCNNConvFCHead((256, 256, 256, 256), (self.representation_size,),
                                               norm=head_norm, name="box_head",
                                               dtype=self.dtype_policy)
        else:
            self.box_head = TwoMLPHead(self.representation_size, name="box_head",
                                       dtype=self.dtype_policy)
        self.box_predictor = FastRCNNPredictor(self.num_classes + 1, name="box_predictor",
                                               dtype=self.dtype_policy)
        self.mask_roi_pool = self.mask_head = None
        # not config: an export sets it off for a graph without control flow
        self.skip_padded_masks = True
        if self.with_masks:
            self.mask_roi_pool = MultiLevelRoIAlign(14, levels=self.levels, sampling_ratio=2,
                                                    name="mask_roi_pool")
            self.mask_head = MaskRCNNHead(self.num_classes + 1, norm=head_norm, name="mask_head",
                                          dtype=self.dtype_policy)

    def build(self, features_shape, proposals_shape, proposals_valid_shape=None):
        channels = features_shape[0][-1]
        self.box_head.build((None, None, self.pool_size, self.pool_size, channels))
        self.box_predictor.build((None, None, self.representation_size))
        if self.with_masks:
            self.mask_head.build((None, None, 14, 14, channels))

    def box_logits(self, features, rois, training=None, roi_mask=None):
        """Box-head outputs for ``rois [B, R, 4]``: class logits and box regression.

        ``training`` and ``roi_mask [B, R]`` (the real RoIs, which alone make
        BN batch statistics) matter for heads with BN only.
        """
        pooled = self.box_roi_pool(features, rois)
        if isinstance(self.box_head, (FastRCNNConvFCHead, ResNetRoIHead)):
            hidden = self.box_head(pooled, training=training, roi_mask=roi_mask)
        else:
            hidden = self.box_head(pooled)
        return self.box_predictor(hidden)

    def mask_logits(self, features, rois, training=None, roi_mask=None, image_index=None):
        """Mask logits ``[B, R, 28, 28, K+1]`` for ``rois [B, R, 4]`` (arguments as
        ``box_logits``; ``image_index [B', R]``: the image of each RoI, for ``rois
        [B', R, 4]`` packed from several images, see ``MultiLevelRoIAlign``)."""
        pooled = (self.mask_roi_pool(features, rois) if image_index is None else
                  self.mask_roi_pool(features, rois, image_index=image_index))
        return self.mask_head(pooled, training=training, roi_mask=roi_mask)

    def _zeros(self, batch):
        d = self.detections_per_image
        out = {"boxes": ops.zeros((batch, d, 4)), "scores": ops.zeros((batch, d)),
               "labels": ops.full((batch, d), -1, "int32"),
               "num_detections": ops.zeros((batch,), "int32")}
        if self.with_masks:
            out["masks"] = ops.zeros((batch, d) + self.image_size)
        return out

    def call(self, features, proposals, proposals_valid, training=None):
        features = list(features)
        if training:
            return self._zeros(ops.shape(proposals)[0])
        head = self.box_logits(features, proposals, training=False)
        out = postprocess_detections(
            head["class_logits"], head["box_regression"], proposals, proposals_valid,
            self.image_size, self.score_threshold, self.nms_threshold,
            self.detections_per_image, self.min_size, self.box_coder)
        if self.with_masks:
            out["masks"] = self._detection_masks(features, out)
        return out

    def _masks_of_first_rows(self, features, out, rows):
        """Pasted masks of detection rows ``[0, rows)``, zeros for the others."""
        batch, d = ops.shape(out["boxes"])[0], self.detections_per_image
        if rows == 0:
            return ops.zeros((batch, d) + self.image_size)
        boxes, labels = out["boxes"][:, :rows], out["labels"][:, :rows]
        column = ops.maximum(labels, 0) + 1  # the detected class's (0 is the background)
        logits = self.mask_head.column_logits(self.mask_roi_pool(features, boxes), column)
        probs = ops.sigmoid(ops.cast(logits, "float32"))
        # Padded rows are zeroed before the paste, which is linear in the mask: the same
        # result as zeroing the pasted [B, rows, H, W] maps, without another pass over them.
        probs = probs * ops.cast(labels >= 0, "float32")[:, :, None, None]
        pasted = paste_masks(probs, boxes, self.image_size)
        if rows == d:
            return pasted
        return ops.pad(pasted, [(0, 0), (0, d - rows), (0, 0), (0, 0)])

    def _detection_masks(self, features, out):
        """``[B, D, H, W]`` mask probabilities of the detections, zero on padded rows.

        The mask head (4 convs at 14 x 14 per row: ~0.5 GMAC) and the paste cost
        as much as the ResNet-50 body at 800 px when run on all ``D`` = 100
        rows, yet the detections come sorted with the padded rows last (the NMS
        pads with -1): so they run on the first ``k`` rows only, ``k`` the
        smallest of ``MASK_ROW_BUCKETS`` (then ``D``) that holds every image's
        detections, chosen at run time by ``ops.cond`` (static shapes in each
        branch: XLA and JAX jit keep working). The result is the same as
        running all ``D`` rows: a row's mask depends on that row alone.
        ``skip_padded_masks = False`` runs all ``D`` rows in one branch-free graph.
        """
        d = self.detections_per_image
        if not self.skip_padded_masks:
            return self._masks_of_first_rows(features, out, d)
        buckets = [k for k in MASK_ROW_BUCKETS if k < d] + [d]
        most = ops.max(out["num_detections"])

        def from_bucket(i):
            if i == len(buckets) - 1:
                return self._masks_of_first_rows(features, out, buckets[i])
            return ops.cond(most <= buckets[i],
                            lambda: self._masks_of_first_rows(features, out, buckets[i]),
                            lambda: from_bucket(i + 1))

        return from_bucket(0)

    def compute_output_spec(self, features, proposals, proposals_valid, training=None):
        batch, d = proposals.shape[0], self.detections_per_image
        out = {"boxes": keras.KerasTensor((batch, d, 4), "float32"),
               "scores": keras.KerasTensor((batch, d), "float32"),
               "labels": keras.KerasTensor((batch, d), "int32"),
               "num_detections": keras.KerasTensor((batch,), "int32")}
        if self.with_masks:
            out["masks"] = keras.KerasTensor((batch, d) + self.image_size, "float32")
        return out

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, image_size=list(self.image_size),
                      levels=list(self.levels), representation_size=self.representation_size,
                      score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                      detections_per_image=self.detections_per_image, min_size=self.min_size,
                      with_masks=self.with_masks, box_head=self.box_head_type,
                      head_norm=self.head_norm, head_norm_epsilon=self.head_norm_epsilon,
                      pool_size=self.pool_size)
        return config
