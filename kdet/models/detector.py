"""Shared base of the single-stage (dense, anchor-based) detectors.

A ``DenseDetector`` is a functional Keras model whose ``call`` returns the raw
head outputs ``{"cls_logits": [B, A, K], "box_deltas": [B, A, 4]}``. Three
things are added on top, so a model file (RetinaNet, EfficientDet) only says
how its graph is built and which loss it uses:

* ``compute_loss`` matches anchors to the padded targets
  ``{"boxes": [B, N, 4], "labels": [B, N]}`` (label -1 = padding) and applies
  the model's classification and box losses — so ``model.fit`` works on a
  ``tf.data`` pipeline with no custom loop, with ``jit_compile=True``, on TF and JAX;
* ``predict_step`` decodes with :class:`kdet.layers.DetectionDecoder`, so
  ``model.predict(images)`` returns the padded detection dict of docs/tensor-contract.md;
* ``predict_images`` accepts images of any size: resize-and-pad in, boxes
  mapped back to each image's own pixels out.
"""
import numpy as np
import keras
from keras import ops

from kdet import boxes as box_ops
from kdet import losses
from kdet.distribute import replica_share
from kdet.layers.detection_decoder import DetectionDecoder
from kdet.matching import Matcher, encode_dense_targets


def _as_rgb(image):
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3]


def torchvision_resized_size(height, width, min_size=800, max_size=1333):
    """torchvision ``GeneralizedRCNNTransform`` resize rule: scale so the short side is
    ``min_size`` unless the long side would pass ``max_size``; the size is then
    ``floor(side * scale)`` (``F.interpolate(scale_factor=, recompute_scale_factor=True)``).

    >>> torchvision_resized_size(480, 640)
    (800, 1066)
    >>> torchvision_resized_size(300, 1500)
    (266, 1333)
    """
    scale = min(float(min_size) / min(height, width), float(max_size) / max(height, width))
    return int(np.floor(height * scale)), int(np.floor(width * scale))


def resize_and_pad(image, size, min_size=None, max_size=1333):
    """Resize ``image`` [H, W, 3] keeping its aspect ratio; pad bottom/right to ``size``.

    By default the long side becomes ``size``. With ``min_size`` the torchvision
    rule applies instead (:func:`torchvision_resized_size`: short side
    ``min_size``, long side at most ``max_size``), and the result must fit in
    the ``size x size`` input (e.g. ``size=1344`` for 800 / 1333).

    Returns ``(padded [size, size, 3] float32, scale)`` where ``scale`` maps
    original pixels to padded-image pixels (``new = old * scale``): a float, or
    with ``min_size`` the per-axis ``(x_scale, y_scale)`` = new / old size, which
    is how torchvision maps its boxes back.
    """
    image = _as_rgb(image)
    height, width = image.shape[:2]
    if min_size is None:
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    else:
        new_h, new_w = torchvision_resized_size(height, width, min_size, max_size)
        if max(new_h, new_w) > size:
            raise ValueError(f"image {height}x{width} resized by the torchvision rule "
                             f"(min_size={min_size}, max_size={max_size}) is {new_h}x{new_w}: "
                             f"larger than the model's {size}x{size} input")
        scale = (new_w / width, new_h / height)
    resized = ops.image.resize(ops.convert_to_tensor(image.astype("float32")), (new_h, new_w),
                               interpolation="bilinear", antialias=False)
    padded = np.zeros((size, size, 3), "float32")
    padded[:new_h, :new_w] = ops.convert_to_numpy(resized)
    return padded, scale


class DetectorMixin:
    """What every kdet detector adds to ``keras.Model``: ``predict_images`` on images of any
    size and ``compile()`` with the model's own recipe (``default_optimizer``) and no Keras
    loss (``compute_loss`` is the model's). A detector implements
    ``_predict_resized(batch, scales)``: numpy predictions for a resized-and-padded batch,
    boxes mapped back with ``scales`` (``new = old * scale``)."""

    def predict_images(self, images, batch_size=8, min_size=None, max_size=1333):
        """Detect on a list of images of any size; boxes in each image's pixels.

        By default each image is resized so its long side is the model's input
        size. ``min_size=800, max_size=1333`` applies torchvision's rule instead
        (short side 800, long side at most 1333, padded into the square input,
        which must hold it: e.g. ``image_size=1344``), for COCO-style evaluation
        at the reference resolution; boxes and keypoints are then mapped back per
        axis as torchvision does, and ``"scale"`` (two-stage models) is ``[N, 2]``.

        >>> # detections = model.predict_images([np.asarray(PIL.Image.open(p)) for p in paths])
        """
        size = self.image_size[0]
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            padded, scales = zip(*(resize_and_pad(im, size, min_size, max_size)
                                   for im in chunk))
            if min_size is None:
                results.append(self._predict_resized(np.stack(padded),
                                                     np.asarray(scales, "float32")))
                continue
            scales = np.asarray(scales, "float32")  # [N, 2] (x, y)
            out = self._predict_resized(np.stack(padded), np.ones(len(chunk), "float32"))
            out["boxes"] = out["boxes"] / np.tile(scales, 2)[:, None, :]
            if "keypoints" in out:
                out["keypoints"] = out["keypoints"].copy()
                out["keypoints"][..., :2] /= scales[:, None, None, :]
            if "scale" in out:
                out["scale"] = scales
            results.append(out)
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}

    def _box_targets(self, y, needs_masks=False):
        """``(gt_boxes [B, N, 4] xyxy float32, gt_labels [B, N] int32)`` of the fit targets
        ``{"boxes", "labels"(, "masks")}``, boxes converted from the model's
        ``bounding_box_format``; a clear error when keys are missing."""
        masks = ' and "masks" [B, N, H, W]' if needs_masks else ""
        if not isinstance(y, dict) or "boxes" not in y or "labels" not in y:
            raise ValueError(f'{type(self).__name__}: targets must be a dict with "boxes" '
                             f'[B, N, 4] and "labels" [B, N] (label -1 for padding){masks}; '
                             f"got {type(y).__name__}")
        if needs_masks and "masks" not in y:
            raise ValueError(f'{type(self).__name__}: targets lack "masks" [B, N, H, W]')
        gt_boxes = ops.cast(y["boxes"], "float32")
        gt_labels = ops.cast(y["labels"], "int32")
        if self.bounding_box_format != "xyxy":
            gt_boxes = box_ops.convert_format(gt_boxes, self.bounding_box_format, "xyxy",
                                              height=self.image_size[0], width=self.image_size[1])
        return gt_boxes, gt_labels

    def get_config(self):
        """The constructor arguments the model keeps in ``self._config` (a named backbone
        only: a custom backbone model is not serialisable by config)."""
        if not isinstance(self._config["backbone"], str):
            raise ValueError(f"a {type(self).__name__} with a custom backbone model cannot be "
                             "serialised by config")
        return dict(self._config, name=self.name)

    @classmethod
    def from_config(cls, config):
        if config.get("backbone_weights") is not None:
            # a file named by an older saved model: its weights are in the saved model already
            config = dict(config, backbone_weights=None)
        return cls(**config)

    RECIPE = None  # the family's kdet.recipes.RECIPES name

    def default_optimizer(self, steps=10000, batch_size=None, steps_per_epoch=None,
                          learning_rate=None, warmup_steps=None, recipe=None):
        """The reference trainer's optimizer (:mod:`kdet.recipes`, ``RECIPE`` of the class).

        Args:
            steps: optimizer steps of the whole run (the schedule's length).
            batch_size: global batch; the reference's rate per image is scaled to it
                (None: the reference's batch and rate).
            steps_per_epoch: where per-epoch schedules step (None: the reference's epochs).
            learning_rate: peak rate at this batch instead of the scaled reference's.
            warmup_steps: warmup length instead of the recipe's.
            recipe: another recipe (a :class:`kdet.recipes.Recipe` or its name).
        """
        from kdet.recipes import make_optimizer

        recipe = recipe or self.RECIPE
        if recipe is None:
            raise NotImplementedError(f"{type(self).__name__} names no training recipe")
        return make_optimizer(recipe, batch_size=batch_size, steps=steps,
                              steps_per_epoch=steps_per_epoch, learning_rate=learning_rate,
                              warmup_steps=warmup_steps)

    def compile(self, optimizer="default", **kwargs):
        if isinstance(optimizer, str) and optimizer == "default":
            optimizer = self.default_optimizer()
        kwargs.setdefault("loss", None)
        super().compile(optimizer=optimizer, **kwargs)

    def predict_on_batch(self, x):
        """``keras.Model.predict_on_batch``, the outputs as read-only numpy views of
        TensorFlow's result buffers instead of copies (``.copy()`` one to write into it).

        Mask R-CNN's masks are ``[B, D, H, W]`` float32: 256 MB an image at 800 px. Keras
        copies each output into fresh memory, which on a 2-core VM cost 0-2 s a call at
        batch 1 (median ~1.2 s against a 2.7 s prediction) and 11 s at batch 8
        (benchmarks/RESULTS.md, session 13). Other backends keep Keras' copies.
        """
        if keras.backend.backend() != "tensorflow":
            return super().predict_on_batch(x)
        self.make_predict_function()
        outputs = self.predict_function([(x,)])  # dense tensors (the padded dict)
        return keras.tree.map_structure(np.asarray, outputs)  # views of their buffers


class LossTermsMixin:
    """For detectors whose ``loss_terms(y, y_pred, training)`` returns named scalar losses
    (torchvision's loss dict; the R-CNN family): the training loss is their sum plus the
    layers' regularisation, and ``predict`` keeps only ``prediction_keys`` of the
    model's outputs (the rest feed the losses)."""

    prediction_keys = ("boxes", "scores", "labels", "num_detections")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        terms = self.loss_terms(y, y_pred, training=training)
        total = ops.sum(ops.stack([ops.cast(v, "float32") for v in terms.values()]))
        if self.losses:  # regularisation added by layers, counted once over the replicas
            total = total + replica_share(
                ops.sum(ops.stack([ops.cast(v, "float32") for v in self.losses])))
        return total

    def predict_step(self, *args):
        outputs = super().predict_step(*args)
        keys = self.prediction_keys
        if isinstance(outputs, tuple):  # JAX: (outputs, non_trainable_variables)
            return {k: v for k, v in outputs[0].items() if k in keys}, outputs[1]
        return {k: v for k, v in outputs.items() if k in keys}


class DenseDetector(DetectorMixin, keras.Model):
    """Functional single-stage detector with loss and decoding built in.

    Subclasses build ``inputs`` / ``outputs`` and pass them here together with
    the anchors of their fixed input size and their loss settings.
    """

    def __init__(self, inputs, outputs, *, num_classes, image_size, anchors, level_counts,
                 box_coder, matcher, classification_loss, box_loss, box_loss_weight,
                 normalizer, decoder, bounding_box_format="xyxy", **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.num_classes = int(num_classes)
        self.image_size = tuple(int(s) for s in image_size)
        self.anchors = np.asarray(anchors, "float32")
        self.level_counts = tuple(int(c) for c in level_counts)
        self.box_coder = box_coder
        self.matcher = matcher
        self.classification_loss = dict(classification_loss)
        self.box_loss = dict(box_loss)
        self.box_loss_weight = float(box_loss_weight)
        if normalizer not in ("positives_per_image", "positives_plus_one"):
            raise ValueError(f"unknown loss normalizer {normalizer!r}")
        self.normalizer = normalizer
        self.decoder = decoder
        self.bounding_box_format = bounding_box_format

    # ------------------------------------------------------------------ loss
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        gt_boxes, gt_labels = self._box_targets(y)
        cls_logits = ops.cast(y_pred["cls_logits"], "float32")
        box_deltas = ops.cast(y_pred["box_deltas"], "float32")
        anchors = ops.convert_to_tensor(self.anchors)
        targets = encode_dense_targets(anchors, gt_boxes, gt_labels, self.matcher, self.box_coder)
        cls_targets = targets["labels"]
        box_targets, matched_boxes = targets["box_targets"], targets["matched_boxes"]
        foreground = cls_targets >= 0
        fg = ops.cast(foreground, "float32")
        num_fg = ops.sum(fg, axis=1)  # [B]

        cls_per_image = losses.focal_loss_per_image(cls_targets, cls_logits,
                                                    **self.classification_loss)

        box_per_image = self._box_loss_per_image(box_deltas, box_targets, matched_boxes,
                                                 anchors, fg)

        # torchvision RetinaNet: per image by its positives; automl/effdet: one normaliser,
        # sum(positives) + 1. Both count over the global batch under tf.distribute.
        convention = "torchvision" if self.normalizer == "positives_per_image" else "automl"
        cls_loss = losses.reduce_by_num_positives(cls_per_image, num_fg, convention)
        box_loss = losses.reduce_by_num_positives(box_per_image, num_fg, convention)
        total = cls_loss + self.box_loss_weight * box_loss
        # Regularisation losses added by layers (weight decay via kernel_regularizer), counted
        # once over the replicas.
        if self.losses:
            total = total + replica_share(
                ops.sum(ops.stack([ops.cast(v, "float32") for v in self.losses])))
        return total

    def _box_loss_per_image(self, box_deltas, box_targets, matched_boxes, anchors, fg):
        kind = self.box_loss.get("type", "l1")
        if kind == "giou":
            pred_boxes = self.box_coder.decode(box_deltas, anchors[None])
            elem = losses.giou_loss(pred_boxes, matched_boxes)  # [B, A]
            return ops.sum(elem * fg, axis=1)
        if kind == "l1":
            elem = ops.abs(box_deltas - box_targets)
        elif kind == "smooth_l1":
            elem = losses.smooth_l1_loss(box_deltas, box_targets,
                                         beta=self.box_loss.get("beta", 1.0 / 9))
        elif kind == "huber":
            # automl divides the box loss by 4 * normaliser (mean over coordinates).
            elem = losses.huber_loss(box_deltas, box_targets,
                                     delta=self.box_loss.get("delta", 0.1)) / 4.0
        else:
            raise ValueError(f"unknown box loss {kind!r}")
        return ops.sum(elem * fg[..., None], axis=(1, 2))

    # ------------------------------------------------------------ prediction
    def decode_predictions(self, raw, scale=None):
        """Raw head outputs -> padded detections (boxes in input pixels / ``scale``)."""
        return self.decoder(raw["cls_logits"], raw["box_deltas"], self.anchors,
                            level_counts=self.level_counts, image_size=self.image_size,
                            scale=scale)

    def predict_step(self, *args):
        outputs = super().predict_step(*args)
        if isinstance(outputs, tuple):  # JAX: (outputs, non_trainable_variables)
            return self.decode_predictions(outputs[0]), outputs[1]
        return self.decode_predictions(outputs)

    def _predict_resized(self, batch, scales):
        raw = self(batch, training=False)
        out = self.decode_predictions(raw, scale=scales)
        return {k: ops.convert_to_numpy(v) for k, v in out.items()}

    # -------------------------------------------------------------- defaults
    def get_config(self):
        raise NotImplementedError  # subclasses return their constructor arguments


def make_matcher(high, low, allow_low_quality=False, force_match_for_each_gt=False):
    return Matcher(high_threshold=high, low_threshold=low,
                   allow_low_quality_matches=allow_low_quality,
                   force_match_for_each_gt=force_match_for_each_gt)


def make_decoder(num_classes, score_threshold, iou_threshold, max_detections, pre_nms_topk,
                 per_level_topk, box_coder):
    return DetectionDecoder(num_classes=num_classes, score_threshold=score_threshold,
                            iou_threshold=iou_threshold, max_detections=max_detections,
                            pre_nms_topk=pre_nms_topk, per_level_topk=per_level_topk,
                            box_coder=box_coder.get_config())
