"""RetinaNet (Lin et al., 2017) in torchvision's two flavours.

* ``version=1``: the paper / torchvision ``retinanet_resnet50_fpn``: FPN P3-P7
  with P6 from P5 (torchvision v1), plain conv heads, focal loss + L1 box loss.
* ``version=2``: torchvision ``retinanet_resnet50_fpn_v2``: P6 from C5,
  GroupNorm(32) heads, GIoU box loss.

Both: 9 anchors per location (sizes 32..512 x octaves 2^(0, 1/3, 2/3), ratios
0.5/1/2, torchvision rounding), matcher fg >= 0.5, bg < 0.4 with low-quality
matches, focal alpha 0.25 gamma 2 normalised by positives per image;
post-processing: score > 0.05, top-1000 per level, NMS 0.5, 100 detections.

    >>> import kdet
    >>> model = kdet.models.RetinaNet(num_classes=91, version=2)    # doctest: +SKIP
    >>> model.compile()                                             # doctest: +SKIP
"""
import keras

from kdet.anchors import AnchorGenerator
from kdet.backbones.factory import build_backbone
from kdet.boxes import BoxCoder
from kdet.layers.fpn import FPN
from kdet.layers.heads import RetinaNetHead
from kdet.layers.normalization import ImageNormalization
from kdet.models.detector import DenseDetector, make_decoder, make_matcher

ANCHOR_BASE_SIZES = (32, 64, 128, 256, 512)


@keras.saving.register_keras_serializable(package="kdet")
class RetinaNet(DenseDetector):
    """RetinaNet as a Keras functional model.

    Args:
        num_classes: foreground classes (torchvision COCO: 91).
        backbone: "resnet50" | "resnet101" | "efficientnet_b0".."b7" | "mobilenet_v2".
        version: 1 or 2 (see module docstring).
        image_size: square input size, a multiple of 32 (torchvision resizes
            to 800-1333 and pads to 32; kdet trains on fixed padded squares). Where
            it is not a multiple of 128, P6 / P7 round up (800: 13 and 7 cells) and
            their anchors step by ``image_size // cells`` (61 and 114), torchvision's
            rule.
        backbone_norm: "batch" (torchvision with ``weights=None``) or
            "frozen_batch" (torchvision's pretrained builders).
        trainable_backbone_layers: 0..5, torchvision semantics.
        backbone_norm_epsilon: BN epsilon of the ResNet (torchvision's pretrained
            v1 weights are evaluated with frozen BN and epsilon 0.0).
    """

    def __init__(self, num_classes=91, backbone="resnet50", version=1, image_size=640,
                 backbone_weights=None, backbone_norm="batch", trainable_backbone_layers=5,
                 backbone_norm_epsilon=1e-5,
                 score_threshold=0.05, iou_threshold=0.5, max_detections=100, pre_nms_topk=1000,
                 bounding_box_format="xyxy", **kwargs):
        if version not in (1, 2):
            raise ValueError(f"RetinaNet version must be 1 or 2, got {version!r}")
        size = int(image_size)
        if size % 32:
            raise ValueError(f"image_size {size} must be a multiple of 32 (C5 has stride 32)")
        images = keras.Input((size, size, 3), name="images")
        x = ImageNormalization(name="normalize")(images)  # ImageNet mean/std
        body = build_backbone(backbone, size, backbone_weights, backbone_norm,
                              trainable_backbone_layers, backbone_norm_epsilon, levels=(3, 4, 5),
                              owner="RetinaNet")
        features = body(x)
        features = {k: features[k] for k in ("C3", "C4", "C5")}
        pyramid = FPN(out_channels=256, in_levels=(3, 4, 5),
                      extra_blocks="p6p7_from_p5" if version == 1 else "p6p7_from_c5",
                      name="fpn")(features)
        levels = [pyramid[f"P{l}"] for l in range(3, 8)]
        anchor_generator = AnchorGenerator(
            convention="torchvision",
            sizes=tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in ANCHOR_BASE_SIZES),
            aspect_ratios=((0.5, 1.0, 2.0),) * 5, strides=(8, 16, 32, 64, 128))
        head = RetinaNetHead(num_classes=num_classes,
                             num_anchors=anchor_generator.num_anchors_per_location()[0],
                             norm="group" if version == 2 else None, name="head")
        head_outputs = head(levels)
        outputs = {"cls_logits": head_outputs["cls_logits"],
                   "box_deltas": head_outputs["bbox_regression"]}
        anchors, level_counts = anchor_generator.anchors_for((size, size))
        box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        super().__init__(
            inputs=images, outputs=outputs, num_classes=num_classes, image_size=(size, size),
            anchors=anchors, level_counts=level_counts, box_coder=box_coder,
            matcher=make_matcher(0.5, 0.4, True),
            classification_loss=dict(alpha=0.25, gamma=2.0),
            box_loss=dict(type="giou" if version == 2 else "l1"), box_loss_weight=1.0,
            normalizer="positives_per_image",
            decoder=make_decoder(num_classes, score_threshold, iou_threshold, max_detections,
                                 pre_nms_topk, per_level_topk=True, box_coder=box_coder),
            bounding_box_format=bounding_box_format,
            name=kwargs.pop("name", f"retinanet_{backbone if isinstance(backbone, str) else 'custom'}_v{version}"),
            **kwargs)
        self._config = dict(num_classes=num_classes, backbone=backbone, version=version,
                            # the file's weights are the model's own from here on: a
                            # saved model must load without the file
                            image_size=size, backbone_weights=None,
                            backbone_norm=backbone_norm,
                            trainable_backbone_layers=trainable_backbone_layers,
                            backbone_norm_epsilon=backbone_norm_epsilon,
                            score_threshold=score_threshold, iou_threshold=iou_threshold,
                            max_detections=max_detections, pre_nms_topk=pre_nms_topk,
                            bounding_box_format=bounding_box_format)

    RECIPE = "torchvision_retinanet"  # kdet.recipes

    def learning_rate_schedule(self, steps=90000, batch_size=None, learning_rate=None,
                               warmup_steps=None, steps_per_epoch=None):
        """torchvision: epoch-0 warmup, x0.1 at epochs 16 and 22 of 26 (kdet.recipes)."""
        from kdet.recipes import RECIPES, make_schedule
        return make_schedule(RECIPES[self.RECIPE], batch_size, steps, steps_per_epoch,
                             learning_rate, warmup_steps)

    def get_config(self):
        if not isinstance(self._config["backbone"], str):
            raise ValueError("a RetinaNet with a custom backbone model cannot be serialised by config")
        return dict(self._config, name=self.name)
