"""EfficientDet D0-D7x and EfficientDet-Lite0-4 (Tan et al., 2020; automl / effdet).

One table, ``EFFICIENTDET_CONFIGS``, drives every size, as effdet's
``tf_efficientdet_*`` configs do (the released models, not the paper's
formulas). The graph: raw 0-255 image -> normalisation -> EfficientNet(-Lite)
C3-C5 -> BiFPN (P3-P7, P3-P8 for D7x) -> class and box heads shared across
levels with per-level BN.

    >>> import kdet
    >>> model = kdet.models.EfficientDet(phi=0, num_classes=20)   # doctest: +SKIP
    >>> model.compile()                                           # doctest: +SKIP
    >>> model.fit(train_ds, epochs=10)                            # doctest: +SKIP
    >>> model.predict(images)["boxes"]                            # doctest: +SKIP
"""

import keras

from kdet.anchors import AnchorGenerator
from kdet.backbones.efficientnet import EfficientNet as EfficientNetBackbone
from kdet.backbones.efficientnet import EfficientNetLite as EfficientNetLiteBackbone
from kdet.boxes import BoxCoder
from kdet.distribute import synchronize_batch_norm
from kdet.layers.bifpn import BiFPN
from kdet.layers.heads import EfficientDetHead
from kdet.layers.normalization import ImageNormalization
from kdet.models.detector import DenseDetector, make_decoder, make_matcher


# effdet `tf_efficientdet_*` configs (the table in docs/reference-semantics.md).
EFFICIENTDET_CONFIGS = {
    "d0": dict(backbone="b0", image_size=512, fpn_channels=64, fpn_repeats=3, head_repeats=3, anchor_scale=4.0, fusion="fast"),
    "d1": dict(backbone="b1", image_size=640, fpn_channels=88, fpn_repeats=4, head_repeats=3, anchor_scale=4.0, fusion="fast"),
    "d2": dict(backbone="b2", image_size=768, fpn_channels=112, fpn_repeats=5, head_repeats=3, anchor_scale=4.0, fusion="fast"),
    "d3": dict(backbone="b3", image_size=896, fpn_channels=160, fpn_repeats=6, head_repeats=4, anchor_scale=4.0, fusion="fast"),
    "d4": dict(backbone="b4", image_size=1024, fpn_channels=224, fpn_repeats=7, head_repeats=4, anchor_scale=4.0, fusion="fast"),
    "d5": dict(backbone="b5", image_size=1280, fpn_channels=288, fpn_repeats=7, head_repeats=4, anchor_scale=4.0, fusion="fast"),
    "d6": dict(backbone="b6", image_size=1280, fpn_channels=384, fpn_repeats=8, head_repeats=5, anchor_scale=4.0, fusion="sum"),
    "d7": dict(backbone="b6", image_size=1536, fpn_channels=384, fpn_repeats=8, head_repeats=5, anchor_scale=5.0, fusion="sum"),
    "d7x": dict(backbone="b7", image_size=1536, fpn_channels=384, fpn_repeats=8, head_repeats=5, anchor_scale=4.0, fusion="sum", max_level=8),
    "lite0": dict(backbone="lite0", image_size=320, fpn_channels=64, fpn_repeats=3, head_repeats=3, anchor_scale=3.0, fusion="sum"),
    "lite1": dict(backbone="lite1", image_size=384, fpn_channels=88, fpn_repeats=4, head_repeats=3, anchor_scale=3.0, fusion="sum"),
    "lite2": dict(backbone="lite2", image_size=448, fpn_channels=112, fpn_repeats=5, head_repeats=3, anchor_scale=3.0, fusion="sum"),
    "lite3": dict(backbone="lite3", image_size=512, fpn_channels=160, fpn_repeats=6, head_repeats=4, anchor_scale=4.0, fusion="sum"),
    "lite3x": dict(backbone="lite3", image_size=640, fpn_channels=200, fpn_repeats=6, head_repeats=4, anchor_scale=3.0, fusion="sum"),
    "lite4": dict(backbone="lite4", image_size=640, fpn_channels=224, fpn_repeats=7, head_repeats=4, anchor_scale=4.0, fusion="sum"),
}

NUM_SCALES = 3
ASPECT_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


def _variant_name(phi):
    name = str(phi).lower()
    if name.startswith("efficientdet-"):
        name = name[len("efficientdet-"):]
    if name.isdigit() or name == "7x":
        name = "d" + name
    if name not in EFFICIENTDET_CONFIGS:
        raise ValueError(f"unknown EfficientDet variant {phi!r}; choose one of "
                         f"{sorted(EFFICIENTDET_CONFIGS)} (or phi=0..7, '7x', 'lite0'..'lite4')")
    return name


@keras.saving.register_keras_serializable(package="kdet")
class EfficientDet(DenseDetector):
    """EfficientDet as a Keras functional model.

    Args:
        phi: 0..7, "7x", or "lite0".."lite4" (also "d3", "lite3x").
        num_classes: foreground classes (COCO: 90 as automl).
        image_size: input resolution (default: the variant's table value).
        backbone_weights: path to backbone ``.weights.h5`` (nothing downloads).
        score_threshold, iou_threshold, max_detections, pre_nms_topk: decoding
            (effdet: no threshold, NMS 0.5, 100 detections, top 5000 candidates).
        fusion: override the table's BiFPN fusion ("fast", "softmax", "sum").
        bounding_box_format: format of training targets (converted to xyxy).
        sync_batch_norm: batch-norm statistics over all replicas of a ``tf.distribute``
            run (:func:`kdet.distribute.synchronize_batch_norm`), for small per-device
            batches; JAX ``DataParallel`` does this anyway.
    """

    def __init__(self, phi=0, num_classes=90, image_size=None, backbone_weights=None,
                 score_threshold=0.0, iou_threshold=0.5, max_detections=100,
                 pre_nms_topk=5000, fusion=None, bounding_box_format="xyxy",
                 sync_batch_norm=False, **kwargs):
        variant = _variant_name(phi)
        cfg = dict(EFFICIENTDET_CONFIGS[variant])
        lite = variant.startswith("lite")
        size = int(image_size or cfg["image_size"])
        min_level, max_level = 3, cfg.get("max_level", 7)
        activation = "relu6" if lite else "swish"
        fusion_mode = fusion or cfg["fusion"]

        images = keras.Input((size, size, 3), name="images")
        if lite:  # effdet lite: mean = std = 0.5 on [0, 1], i.e. [-1, 1]
            x = ImageNormalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), name="normalize")(images)
            backbone = EfficientNetLiteBackbone(int(cfg["backbone"][-1]), input_shape=(size, size, 3),
                                                weights=backbone_weights)
        else:
            x = ImageNormalization(name="normalize")(images)  # ImageNet mean/std
            backbone = EfficientNetBackbone(cfg["backbone"], input_shape=(size, size, 3),
                                            weights=backbone_weights)
        features = backbone(x)
        features = {k: features[k] for k in ("C3", "C4", "C5")}
        pyramid = BiFPN(num_channels=cfg["fpn_channels"], num_repeats=cfg["fpn_repeats"],
                        min_level=min_level, max_level=max_level, fusion=fusion_mode,
                        activation=activation, name="bifpn")(features)
        levels = [pyramid[f"P{l}"] for l in range(min_level, max_level + 1)]
        num_anchors = NUM_SCALES * len(ASPECT_RATIOS)
        head_args = dict(num_anchors=num_anchors, num_channels=cfg["fpn_channels"],
                         depth=cfg["head_repeats"], num_levels=len(levels), activation=activation)
        cls_logits = EfficientDetHead(num_outputs_per_anchor=num_classes, prior_probability=0.01,
                                      name="class_net", **head_args)(levels)
        box_deltas = EfficientDetHead(num_outputs_per_anchor=4, name="box_net", **head_args)(levels)
        outputs = {"cls_logits": cls_logits, "box_deltas": box_deltas}

        anchor_generator = AnchorGenerator(
            convention="automl", min_level=min_level, max_level=max_level, num_scales=NUM_SCALES,
            aspect_ratios=ASPECT_RATIOS, anchor_scale=cfg["anchor_scale"])
        anchors, level_counts = anchor_generator.anchors_for((size, size))
        # automl/effdet FasterRcnnBoxCoder: (ty, tx, th, tw), no weights, no clamp.
        box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0), clip=None, order="yx")
        super().__init__(
            inputs=images, outputs=outputs, num_classes=num_classes, image_size=(size, size),
            anchors=anchors, level_counts=level_counts, box_coder=box_coder,
            # effdet ArgMaxMatcher(0.5, 0.5, force_match_for_each_row=True): no ignore band.
            matcher=make_matcher(0.5, 0.5, force_match_for_each_gt=True),
            classification_loss=dict(alpha=0.25, gamma=1.5),
            box_loss=dict(type="huber", delta=0.1), box_loss_weight=50.0,
            normalizer="positives_plus_one",
            decoder=make_decoder(num_classes, score_threshold, iou_threshold, max_detections,
                                 pre_nms_topk, per_level_topk=False, box_coder=box_coder),
            bounding_box_format=bounding_box_format,
            name=kwargs.pop("name", f"efficientdet_{variant}"), **kwargs)
        self.variant = variant
        # backbone_weights=None: the file's weights are the model's own from here on, so a
        # saved model must load without the file (it stays out of the config)
        self._config = dict(phi=variant, num_classes=num_classes, image_size=size,
                            backbone_weights=None, score_threshold=score_threshold,
                            iou_threshold=iou_threshold, max_detections=max_detections,
                            pre_nms_topk=pre_nms_topk, fusion=fusion,
                            bounding_box_format=bounding_box_format,
                            sync_batch_norm=bool(sync_batch_norm))
        if sync_batch_norm:
            synchronize_batch_norm(self)

    RECIPE = "automl"  # kdet.recipes: automl's EfficientDet trainer ("effdet": timm's)

    def learning_rate_schedule(self, steps=10000, batch_size=None, learning_rate=None,
                               warmup_steps=None, steps_per_epoch=None):
        """automl: linear warmup from lr_warmup_init, then automl's cosine (kdet.recipes)."""
        from kdet.recipes import RECIPES, make_schedule
        return make_schedule(RECIPES[self.RECIPE], batch_size, steps, steps_per_epoch,
                             learning_rate, warmup_steps)

    def get_config(self):
        return dict(self._config, name=self.name)


def EfficientDetLite(variant=0, **kwargs):
    """EfficientDet-Lite0..4 (and "3x"): ``EfficientDet(phi=f"lite{variant}")``."""
    return EfficientDet(phi=f"lite{variant}", **kwargs)
