"""Region Proposal Network layers (Ren et al., 2015), torchvision semantics.

* ``RPNHead``: torchvision ``RPNHead`` — ``conv_depth`` shared 3x3 convs + ReLU
  (1 in v1, 2 in torchvision's ``_v2`` builders), then 1x1
  convs for the objectness logit (A per location) and the box deltas (4A),
  applied to every pyramid level with the same weights. Outputs are
  flattened in torchvision's order (level, y, x, anchor): ``objectness
  [B, N]`` and ``box_deltas [B, N, 4]``.
* ``ProposalGenerator``: torchvision ``RegionProposalNetwork.filter_proposals``
  with static shapes: decode (``BoxCoder((1, 1, 1, 1))``, dw/dh clamped at
  log(1000/16)), per-level top-k on the logits (``pre_nms_top_n``), sigmoid,
  clip to the image, drop boxes with a side ``< min_size`` and scores
  ``< score_threshold``, NMS 0.7 per level (``batched_nms`` with the level as
  class), keep the best ``post_nms_top_n``. Training and inference have their
  own top-n (torchvision 2000/2000 and 1000/1000 for FPN), so the number of
  proposal slots depends on ``training``. Proposals do not carry gradients
  (torchvision detaches them).

    >>> import numpy as np
    >>> gen = ProposalGenerator(image_size=64, anchor_sizes=(32,), aspect_ratios=(1.0,),
    ...                         strides=(16,), pre_nms_top_n_test=10, post_nms_top_n_test=5)
    >>> out = gen(np.zeros((1, 16), "float32"), np.zeros((1, 16, 4), "float32"))
    >>> tuple(out["proposals"].shape), int(np.sum(out["valid"]))
    ((1, 5, 4), 5)
"""
import keras
from keras import ops

from kdet.anchors import AnchorGenerator
from kdet.boxes import BoxCoder, clip_boxes
from kdet.layers.conv import Conv2D
from kdet.matching import gather_rows
from kdet.ops.nms import batched_nms


def _normal_001():
    return keras.initializers.RandomNormal(stddev=0.01)


@keras.saving.register_keras_serializable(package="kdet")
class RPNHead(keras.layers.Layer):
    """torchvision ``RPNHead`` on a list of pyramid levels (channels last).

    Args:
        num_anchors: anchors per location (3 for FPN: one size x 3 ratios).
        channels: input (and hidden) channels, 256 for FPN.
        conv_depth: 3x3 conv + ReLU blocks before the 1x1 convs (torchvision
            ``conv_depth``: 1 in v1, 2 in v2). They are named ``conv``,
            ``conv1``, ``conv2``... (torchvision ``conv.0.0``, ``conv.1.0``...).

    Call on ``[P2, ..., P6]`` (a list, or one map) -> ``{"objectness": [B, N],
    "box_deltas": [B, N, 4]}`` with ``N = sum_l H_l * W_l * num_anchors``.

    >>> import numpy as np
    >>> head = RPNHead(num_anchors=3, channels=8)
    >>> out = head([np.zeros((1, 4, 4, 8), "float32"), np.zeros((1, 2, 2, 8), "float32")])
    >>> tuple(out["objectness"].shape), tuple(out["box_deltas"].shape)
    ((1, 60), (1, 60, 4))
    """

    def __init__(self, num_anchors=3, channels=256, conv_depth=1, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.channels = int(channels)
        self.conv_depth = int(conv_depth)
        if self.conv_depth < 1:
            raise ValueError(f"RPNHead: conv_depth must be >= 1, got {conv_depth}")
        common = dict(kernel_initializer=_normal_001(), bias_initializer="zeros",
                      dtype=self.dtype_policy)
        # The first keeps v1's name "conv" so v1 models and their .keras files are unchanged.
        self.convs = [Conv2D(self.channels, 3, padding="same", activation="relu",
                             name="conv" if i == 0 else f"conv{i}", **common)
                      for i in range(self.conv_depth)]
        self.conv = self.convs[0]
        self.cls_logits = keras.layers.Conv2D(self.num_anchors, 1, name="cls_logits", **common)
        self.bbox_pred = keras.layers.Conv2D(4 * self.num_anchors, 1, name="bbox_pred", **common)

    def build(self, input_shape):
        shape = input_shape[0] if isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)) else input_shape
        shape = tuple(shape)
        hidden = shape[:-1] + (self.channels,)
        for i, conv in enumerate(self.convs):
            conv.build(shape if i == 0 else hidden)
        self.cls_logits.build(hidden)
        self.bbox_pred.build(hidden)

    def call(self, features):
        if not isinstance(features, (list, tuple)):
            features = [features]
        objectness, deltas = [], []
        for x in features:
            t = x
            for conv in self.convs:
                t = conv(t)
            logits = self.cls_logits(t)  # [B, H, W, A]: (y, x, anchor) order as torchvision
            boxes = self.bbox_pred(t)    # [B, H, W, 4A], channel = anchor * 4 + coordinate
            height, width = x.shape[1], x.shape[2]
            if height is not None and width is not None:
                # Static anchor count with a dynamic batch (Keras traces predict / a
                # smaller last batch with batch size None).
                count = height * width * self.num_anchors
                objectness.append(ops.reshape(logits, (-1, count)))
                deltas.append(ops.reshape(boxes, (-1, count, 4)))
            else:
                objectness.append(ops.reshape(logits, (ops.shape(x)[0], -1)))
                deltas.append(ops.reshape(boxes, (ops.shape(x)[0], -1, 4)))
        return {"objectness": ops.concatenate(objectness, axis=1),
                "box_deltas": ops.concatenate(deltas, axis=1)}

    def compute_output_spec(self, features):
        if not isinstance(features, (list, tuple)):
            features = [features]
        total = sum(int(f.shape[1]) * int(f.shape[2]) * self.num_anchors for f in features)
        batch = features[0].shape[0]
        return {"objectness": keras.KerasTensor((batch, total), dtype=self.compute_dtype),
                "box_deltas": keras.KerasTensor((batch, total, 4), dtype=self.compute_dtype)}

    def get_config(self):
        config = super().get_config()
        config.update(num_anchors=self.num_anchors, channels=self.channels,
                      conv_depth=self.conv_depth)
        return config


def _pair(image_size):
    if isinstance(image_size, (list, tuple)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


@keras.saving.register_keras_serializable(package="kdet")
class ProposalGenerator(keras.layers.Layer):
    """RPN outputs -> padded proposals (torchvision ``filter_proposals``).

    The anchors are torchvision's ``AnchorGenerator(sizes, aspect_ratios)`` on
    the fixed ``image_size`` (levels of stride ``strides``), in the order
    ``RPNHead`` flattens its outputs.

    Args:
        image_size: ``(H, W)`` or an int (square input).
        anchor_sizes: the anchor sizes of each level: one int per level (FPN,
            default ``(32, 64, 128, 256, 512)``) or a tuple per level
            (Faster R-CNN C4: ``((128, 256, 512),)`` on one stride-16 level,
            ``len(sizes) * len(aspect_ratios)`` anchors per location).
        aspect_ratios: ratios ``h / w``, default ``(0.5, 1.0, 2.0)``.
        strides: level strides, default ``(4, 8, 16, 32, 64)`` (P2-P6).
        pre_nms_top_n_train/test: candidates kept per level before NMS.
        post_nms_top_n_train/test: proposals kept per image after NMS.
        nms_threshold: 0.7; score_threshold: 0.0 (on sigmoid probabilities);
        min_size: 1e-3 (boxes with a side below it are dropped).

    Call ``(objectness [B, N], box_deltas [B, N, 4], training=None)`` ->
    ``{"proposals": [B, P, 4], "scores": [B, P], "valid": [B, P] bool}``;
    ``P = min(post_nms_top_n, candidates)``, proposals in descending score,
    padded rows zero with score 0.
    """

    def __init__(self, image_size, anchor_sizes=(32, 64, 128, 256, 512),
                 aspect_ratios=(0.5, 1.0, 2.0), strides=(4, 8, 16, 32, 64),
                 pre_nms_top_n_train=2000, pre_nms_top_n_test=1000,
                 post_nms_top_n_train=2000, post_nms_top_n_test=1000,
                 nms_threshold=0.7, score_threshold=0.0, min_size=1e-3, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.image_size = _pair(image_size)
        # one size per level is kept flat (the FPN config); several per level nest
        self.anchor_sizes = tuple(tuple(int(s) for s in level) if isinstance(level, (list, tuple))
                                  else int(level) for level in anchor_sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.strides = tuple(int(s) for s in strides)
        if len(self.anchor_sizes) != len(self.strides):
            raise ValueError(f"ProposalGenerator: {len(self.anchor_sizes)} anchor sizes for "
                             f"{len(self.strides)} strides")
        for name in ("pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train",
                     "post_nms_top_n_test"):
            value = int(locals()[name])
            if value < 1:
                raise ValueError(f"ProposalGenerator: {name} must be >= 1, got {value}")
            setattr(self, name, value)
        self.nms_threshold = float(nms_threshold)
        self.score_threshold = float(score_threshold)
        self.min_size = float(min_size)
        sizes_per_level = tuple(s if isinstance(s, tuple) else (s,) for s in self.anchor_sizes)
        generator = AnchorGenerator(sizes=sizes_per_level,
                                    aspect_ratios=(self.aspect_ratios,) * len(self.strides),
                                    strides=self.strides, convention="torchvision")
        self.anchors, self.level_counts = generator.anchors_for(self.image_size)
        self.num_anchors_per_location = len(sizes_per_level[0]) * len(self.aspect_ratios)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def _counts(self, training):
        pre = self.pre_nms_top_n_train if training else self.pre_nms_top_n_test
        post = self.post_nms_top_n_train if training else self.post_nms_top_n_test
        per_level = [min(pre, n) for n in self.level_counts]
        return per_level, min(post, sum(per_level))

    def call(self, objectness, box_deltas, training=None):
        objectness = ops.stop_gradient(ops.cast(objectness, "float32"))
        box_deltas = ops.stop_gradient(ops.cast(box_deltas, "float32"))
        if objectness.shape[1] != self.anchors.shape[0]:
            raise ValueError(f"ProposalGenerator: {objectness.shape[1]} RPN outputs per image "
                             f"but {self.anchors.shape[0]} anchors for image size "
                             f"{self.image_size}")
        per_level, num_out = self._counts(bool(training))
        anchors = ops.convert_to_tensor(self.anchors)
        logits, boxes, levels = [], [], []
        start = 0
        for level, (count, k) in enumerate(zip(self.level_counts, per_level)):
            level_logits = objectness[:, start:start + count]
            top_logits, index = ops.top_k(level_logits, k)
            level_deltas = gather_rows(box_deltas, index + start)
            level_anchors = ops.take(anchors[start:start + count], index, axis=0)
            logits.append(top_logits)
            boxes.append(self.box_coder.decode(level_deltas, level_anchors))
            levels.append(ops.full(ops.shape(index), level, "int32"))
            start += count
        logits = ops.concatenate(logits, axis=1)
        boxes = clip_boxes(ops.concatenate(boxes, axis=1), *self.image_size)
        levels = ops.concatenate(levels, axis=1)
        scores = ops.sigmoid(logits)
        width = boxes[..., 2] - boxes[..., 0]
        height = boxes[..., 3] - boxes[..., 1]
        valid = (width >= self.min_size) & (height >= self.min_size) & (
            scores >= self.score_threshold)
        index, _ = batched_nms(boxes, scores, levels, iou_threshold=self.nms_threshold,
                               max_output_size=num_out, method="mask", valid_mask=valid)
        keep = index >= 0
        safe = ops.where(keep, index, 0)
        proposals = ops.take_along_axis(boxes, safe[..., None], axis=1)
        proposals = ops.where(keep[..., None], proposals, 0.0)
        kept_scores = ops.where(keep, ops.take_along_axis(scores, safe, axis=1), 0.0)
        return {"proposals": proposals, "scores": kept_scores, "valid": keep}

    def compute_output_spec(self, objectness, box_deltas, training=None):
        _, num_out = self._counts(bool(training))
        batch = objectness.shape[0]
        return {"proposals": keras.KerasTensor((batch, num_out, 4), dtype="float32"),
                "scores": keras.KerasTensor((batch, num_out), dtype="float32"),
                "valid": keras.KerasTensor((batch, num_out), dtype="bool")}

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=list(self.image_size),
            anchor_sizes=[list(s) if isinstance(s, tuple) else s for s in self.anchor_sizes],
            aspect_ratios=list(self.aspect_ratios), strides=list(self.strides),
            pre_nms_top_n_train=self.pre_nms_top_n_train,
            pre_nms_top_n_test=self.pre_nms_top_n_test,
            post_nms_top_n_train=self.post_nms_top_n_train,
            post_nms_top_n_test=self.post_nms_top_n_test,
            nms_threshold=self.nms_threshold, score_threshold=self.score_threshold,
            min_size=self.min_size)
        return config
