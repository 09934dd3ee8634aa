"""R-CNN (Girshick et al. 2014): one CNN pass per warped proposal — for teaching and comparison.

``RCNN`` takes the same inputs as :class:`kdet.models.FastRCNN`,
``{"images": [B, S, S, 3], "proposals": [B, P, 4]}`` (zero-area rows pad),
and for every proposal:

* warps its box, grown by ``context_padding`` pixels of context at the warped
  scale (the paper's 16 px at 227), to ``crop_size x crop_size`` regardless
  of aspect ratio ("warp" in the paper). The warp is
  ``kdet.ops.roi_align(image, box, crop_size, sampling_ratio=1,
  aligned=True)`` on the normalised image: one bilinear sample at the centre
  of each output pixel's cell of the box, i.e. a bilinear
  (``align_corners=False``, no antialias) resize of the box's content;
  outside the image it reads 0, the ImageNet mean after normalisation (R-CNN
  pads with the mean too);
* runs the backbone CNN on all ``B * P`` crops, global-average-pools its
  last map (``C5``);
* a linear ``K + 1`` softmax classifier and class-specific box regression in
  R-CNN's parametrisation ``t = ((gx - px) / pw, (gy - py) / ph,
  log(gw / pw), log(gh / ph))`` (``BoxCoder((1, 1, 1, 1))``).

Simplifications, stated: the paper fine-tunes the CNN with a softmax, then
trains one linear SVM per class (hard-negative mining) and a separate ridge
box regressor on pool5 features of proposals with IoU > 0.6. Here all of it
is one model trained end to end with softmax cross-entropy plus smooth L1
(``beta`` 1) on the GT class's deltas, the common modern simplification,
sampled as in the paper's fine-tuning (foreground IoU >= 0.5, background the
rest, 25 % foreground; 64 RoIs per image, 128 for two images, the paper's
minibatch). BN in the CNN takes its batch statistics over the sampled crops,
padding slots included when an image has fewer than 64 candidates.

Inference: softmax, class-specific decode, clip, score > 0.05, per-class
NMS 0.3 (the paper's), top 100 — the padded dict of every kdet detector.

It is slow by design: the CNN runs ``P`` times per image (memory grows as
``B * P * crop_size**2``), where Fast R-CNN runs it once and pools features
(``examples/rcnn_family.py`` measures the gap).

    >>> import kdet
    >>> model = kdet.models.RCNN(num_classes=20, image_size=512, num_proposals=200)  # doctest: +SKIP
"""
import keras
from keras import ops

from kdet.backbones.factory import backbone_level
from kdet.layers.normalization import ImageNormalization
from kdet.layers.roi_heads import FastRCNNPredictor
from kdet.models.fast_rcnn import ProposalDetector, ProposalHeads
from kdet.ops.roi_align import roi_align


def grow_for_context(rois, crop_size, context_padding):
    """Boxes grown about their centres so that, warped to ``crop_size``, the original box
    covers the central ``crop_size - 2 * context_padding`` pixels (R-CNN's context)."""
    if context_padding == 0:
        return rois
    factor = float(crop_size) / (crop_size - 2.0 * context_padding)
    center_x = (rois[..., 0] + rois[..., 2]) * 0.5
    center_y = (rois[..., 1] + rois[..., 3]) * 0.5
    half_w = (rois[..., 2] - rois[..., 0]) * 0.5 * factor
    half_h = (rois[..., 3] - rois[..., 1]) * 0.5 * factor
    return ops.stack([center_x - half_w, center_y - half_h, center_x + half_w,
                      center_y + half_h], axis=-1)


def warp_proposals(images, rois, crop_size, context_padding=0):
    """R-CNN's warp: ``[B, H, W, C]`` images, ``[B, R, 4]`` boxes -> ``[B, R, S, S, C]`` crops.

    Bilinear, one sample per output pixel at the centre of its cell of the
    (context-grown) box: ``roi_align(sampling_ratio=1, aligned=True)``.
    """
    rois = grow_for_context(ops.cast(rois, "float32"), crop_size, context_padding)
    return roi_align(images, rois, (crop_size, crop_size), spatial_scale=1.0, sampling_ratio=1,
                     aligned=True)


@keras.saving.register_keras_serializable(package="kdet")
class RCNNHeads(ProposalHeads):
    """R-CNN's per-proposal stage: warp -> CNN -> global pool -> ``FastRCNNPredictor``.

    Call ``(images [B, H, W, 3] normalised, proposals [B, P, 4])``. Box deltas
    use ``BoxCoder((1, 1, 1, 1))`` (R-CNN's parametrisation).
    """

    def __init__(self, num_classes, image_size, crop_size=224, context_padding=16,
                 backbone="resnet50", backbone_weights=None, backbone_norm="batch",
                 trainable_backbone_layers=5, backbone_norm_epsilon=1e-5, **kwargs):
        kwargs.setdefault("box_coder_weights", (1.0, 1.0, 1.0, 1.0))
        super().__init__(num_classes, image_size, **kwargs)
        self.crop_size = int(crop_size)
        self.context_padding = int(context_padding)
        if not 0 <= 2 * self.context_padding < self.crop_size:
            raise ValueError(f"RCNN: context_padding must be in [0, crop_size / 2), got "
                             f"{context_padding} for crop_size {crop_size}")
        self.cnn = backbone_level(backbone, self.crop_size, 5, backbone_weights, backbone_norm,
                                  trainable_backbone_layers, backbone_norm_epsilon, "RCNN")
        self.feature_size = int(self.cnn.output.shape[-1])
        self.box_predictor = FastRCNNPredictor(self.num_classes + 1, name="box_predictor",
                                               dtype=self.dtype_policy)

    def build(self, inputs_shape, proposals_shape):
        self.box_predictor.build((None, None, self.feature_size))

    def box_logits(self, images, rois, training=None):
        crops = warp_proposals(images, rois, self.crop_size, self.context_padding)
        batch, num_rois = ops.shape(crops)[0], crops.shape[1]
        crops = ops.reshape(crops, (-1, self.crop_size, self.crop_size, crops.shape[-1]))
        features = ops.mean(self.cnn(crops, training=training), axis=(1, 2))
        features = ops.reshape(features, (batch, num_rois, self.feature_size))
        return self.box_predictor(features)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, image_size=list(self.image_size),
                      crop_size=self.crop_size, context_padding=self.context_padding,
                      box_coder_weights=list(self.box_coder.weights),
                      score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                      detections_per_image=self.detections_per_image, min_size=self.min_size)
        return config


@keras.saving.register_keras_serializable(package="kdet")
class RCNN(ProposalDetector):
    """R-CNN on given proposals (see the module docstring).

    Args:
        num_classes: foreground classes (labels ``0..num_classes-1``).
        backbone: "resnet50" | "resnet101" | "mobilenet_v2" | "efficientnet_b0".."b7";
            run on every warped crop, its ``C5`` global-average-pooled.
        image_size: square input size, a multiple of 32.
        num_proposals: ``P``, proposals per image in the input (zero-area rows pad).
        crop_size: warped crop side, a multiple of 32 (224; the paper's AlexNet 227).
        context_padding: context pixels at the warped scale (16, the paper's).
        backbone_weights, backbone_norm, trainable_backbone_layers,
            backbone_norm_epsilon: as :class:`kdet.models.FasterRCNN`.
        box_fg_iou_thresh 0.5, box_bg_iou_thresh 0.5, box_bg_iou_low 0.0:
            foreground IoU >= 0.5, background below 0.5 (the paper's fine-tuning).
        box_batch_size_per_image 64, box_positive_fraction 0.25: crops per image.
        box_loss_beta: smooth-L1 transition, 1.
        box_score_thresh 0.05, box_nms_thresh 0.3, box_detections_per_img 100.
        seed: seed of the RoI sampler.
    """

    head_input_key = "images_normalized"

    def __init__(self, num_classes=20, backbone="resnet50", image_size=512, num_proposals=200,
                 crop_size=224, context_padding=16, backbone_weights=None,
                 backbone_norm="batch", trainable_backbone_layers=5, backbone_norm_epsilon=1e-5,
                 box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_bg_iou_low=0.0,
                 box_batch_size_per_image=64, box_positive_fraction=0.25, box_loss_beta=1.0,
                 box_score_thresh=0.05, box_nms_thresh=0.3, box_detections_per_img=100,
                 bounding_box_format="xyxy", seed=None, **kwargs):
        owner = type(self).__name__
        size = int(image_size)
        self._check_arguments(owner, num_classes, size, num_proposals)
        if int(crop_size) % 32:
            raise ValueError(f"{owner}: crop_size {crop_size} must be a multiple of 32")
        images = keras.Input((size, size, 3), name="images")
        proposals = keras.Input((int(num_proposals), 4), name="proposals")
        x = ImageNormalization(name="normalize")(images)
        heads = RCNNHeads(num_classes, (size, size), crop_size=crop_size,
                          context_padding=context_padding, backbone=backbone,
                          backbone_weights=backbone_weights, backbone_norm=backbone_norm,
                          trainable_backbone_layers=trainable_backbone_layers,
                          backbone_norm_epsilon=backbone_norm_epsilon,
                          score_threshold=box_score_thresh, nms_threshold=box_nms_thresh,
                          detections_per_image=box_detections_per_img, name="roi_heads")
        detections = heads(x, proposals)
        outputs = dict(detections, proposals=proposals, images_normalized=x)
        name = kwargs.pop("name", None) or (
            f"rcnn_{backbone if isinstance(backbone, str) else 'custom'}")
        super().__init__(inputs={"images": images, "proposals": proposals}, outputs=outputs,
                         name=name, **kwargs)
        self.crop_size = int(crop_size)
        self._setup(
            num_classes=num_classes, image_size=size, num_proposals=num_proposals, heads=heads,
            box_fg_iou_thresh=box_fg_iou_thresh, box_bg_iou_thresh=box_bg_iou_thresh,
            box_bg_iou_low=box_bg_iou_low, box_batch_size_per_image=box_batch_size_per_image,
            box_positive_fraction=box_positive_fraction, box_loss_beta=box_loss_beta,
            bounding_box_format=bounding_box_format, seed=seed,
            config=dict(
                num_classes=num_classes, backbone=backbone, image_size=size,
                num_proposals=num_proposals, crop_size=crop_size,
                context_padding=context_padding,
                # the file's weights are the model's own from here on
                backbone_weights=None, backbone_norm=backbone_norm,
                trainable_backbone_layers=trainable_backbone_layers,
                backbone_norm_epsilon=backbone_norm_epsilon,
                box_fg_iou_thresh=box_fg_iou_thresh, box_bg_iou_thresh=box_bg_iou_thresh,
                box_bg_iou_low=box_bg_iou_low, box_batch_size_per_image=box_batch_size_per_image,
                box_positive_fraction=box_positive_fraction, box_loss_beta=box_loss_beta,
                box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
                box_detections_per_img=box_detections_per_img,
                bounding_box_format=bounding_box_format, seed=seed))
