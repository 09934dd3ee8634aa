"""Faster R-CNN with FPN (Ren et al. 2015; Lin et al. 2017) or on C4, torchvision semantics.

``FasterRCNN`` is torchvision's ``fasterrcnn_resnet50_fpn`` as a Keras
functional model on a fixed square input (kdet trains on padded squares):

* ResNet-50 (torchvision layout) -> FPN P2-P5 + "pool" P6 (max-pool k1 s2 on P5);
* RPN: anchors 32..512 on P2-P6 x ratios (0.5, 1, 2), ``RPNHead``,
  ``ProposalGenerator`` (pre-NMS top 2000/1000 per level in training/test,
  NMS 0.7, post-NMS top 2000/1000);
* RoI heads: ``MultiLevelRoIAlign(7, sampling 2)``, ``TwoMLPHead`` (1024),
  ``FastRCNNPredictor``, post-processing score > 0.05, NMS 0.5, 100 detections.

``version=2`` is torchvision's ``fasterrcnn_resnet50_fpn_v2`` (Li et al. 2021,
"Benchmarking Detection Transfer Learning with Vision Transformers"): the FPN
convs have BN (no bias), the RPN head has two 3x3 convs, and the box head is
``FastRCNNConvFCHead`` (4x 3x3 conv 256 + BN + ReLU, one FC 1024); the mask
head of ``MaskRCNN(version=2)`` has BN after each conv too. In training, the
head BNs take their batch statistics over the sampled RoIs only (padded RoI
slots are masked out), as torchvision's batch of sampled RoIs.

``fpn=False`` is Faster R-CNN C4 (Ren et al. 2015's ResNet variant, Detectron's
``R-50-C4``), with no FPN: the ResNet up to ``layer3`` (C4, stride 16, 1024
channels) feeds an ``RPNHead(1024, 9 anchors)`` with anchors 128, 256, 512 x
ratios (0.5, 1, 2) on that one level; RoIs are pooled from C4 to 14 x 14
(RoIAlign, sampling ratio 2, as torchvision's ``MultiScaleRoIAlign``;
Detectron uses adaptive sampling) and ResNet's ``layer4`` (res5, its first
block with stride 2) is the box head, averaged to 2048 features before
``FastRCNNPredictor``. torchvision has no C4 builder; the reference is
``torchvision.models.detection.FasterRCNN`` built from an
``IntermediateLayerGetter(resnet50(), {"layer3": "0"})`` body with
``AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))``,
``MultiScaleRoIAlign(["0"], 14, 2)``, the box head ``nn.Sequential(
resnet.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())`` and
``FastRCNNPredictor(2048, K + 1)`` (tests/test_faster_rcnn_c4.py). The res5
head uses the backbone's norm; ``backbone_weights`` (a whole-ResNet weights
file) fill both the C4 body and the head's res5.

Training (``compute_loss``, so ``model.fit`` works with ``jit_compile`` on TF
and JAX): RPN targets fg IoU >= 0.7 / bg < 0.3 (+ each GT's best anchors),
256 anchors per image at 50 % positive, BCE objectness and smooth-L1
(beta 1/9) box loss divided by the sampled count; RoI targets: proposals plus
the GT boxes, fg IoU >= 0.5, 512 RoIs per image at 25 % foreground, softmax
cross-entropy and smooth-L1 (beta 1/9) on the GT class's deltas, divided by
the sampled count. The total loss is the sum of the four terms
(``loss_terms`` gives them one by one, named as torchvision's loss dict).

Classes: ``num_classes`` is the number of *foreground* classes; user labels
are ``0..num_classes-1`` as in every kdet detector. The predictors have
``num_classes + 1`` columns with background first (torchvision's layout), so
kdet label ``c`` is torchvision label ``c + 1``: torchvision's COCO model
(``num_classes=91``) is ``FasterRCNN(num_classes=90)``.

The functional graph returns the detections (``"boxes"``, ``"scores"``,
``"labels"``, ``"num_detections"``) together with what the loss needs (RPN
outputs, proposals, the pooled features ``"P2"`` .. ``"P5"`` or ``"C4"``);
``predict`` returns only the detections.

    >>> import kdet
    >>> model = kdet.models.FasterRCNN(num_classes=20, image_size=512)   # doctest: +SKIP
    >>> model.compile()                                                    # doctest: +SKIP
    >>> model.fit(train_ds, epochs=12)                                     # doctest: +SKIP

Faster R-CNN C4 (here on a small input, without the RPN's 1000 test proposals):

    >>> import numpy as np
    >>> c4 = kdet.models.FasterRCNN(num_classes=3, fpn=False, image_size=64,
    ...                             rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    >>> c4.name
    'fasterrcnn_resnet50_c4'
    >>> out = c4(np.zeros((1, 64, 64, 3), "float32"), training=False)
    >>> tuple(out["boxes"].shape), tuple(out["C4"].shape)   # predict() returns the detections
    ((1, 100, 4), (1, 4, 4, 1024))
"""
import keras
import numpy as np
from keras import ops

from kdet import losses
from kdet.backbones.factory import build_backbone, copy_layer_weights, truncate_backbone
from kdet.distribute import global_mean, synchronize_batch_norm
from kdet.layers.fpn import FPN
from kdet.layers.normalization import ImageNormalization
from kdet.layers.roi_heads import RoIHeads
from kdet.layers.rpn import ProposalGenerator, RPNHead
from kdet.matching import (BalancedSampler, Matcher, encode_roi_targets, encode_rpn_targets,
                           gather_rows)
from kdet.models.detector import DetectorMixin, LossTermsMixin
from kdet.ops.roi_align import roi_align_maps

ANCHOR_SIZES = (32, 64, 128, 256, 512)
C4_ANCHOR_SIZES = ((128, 256, 512),)  # 3 scales x 3 ratios on the stride-16 map
ASPECT_RATIOS = (0.5, 1.0, 2.0)
C4_BACKBONES = ("resnet50", "resnet101")
# Row counts the mask branch of a training step may run on: the foreground RoIs of the
# whole batch, packed (see mask_rcnn_loss). Each bucket is a branch of the training graph.
# The step's memory once grew with the branches (R50-FPN Mask R-CNN, 800 px, batch 2: peak
# 6.91 GiB with no bucket, 8.69 with these six, 9.86 with ten of 16-192): each held a graph
# constant, its RoIAlign gradient's buffer folded by grappler, now made when the step runs
# (kdet.ops.roi_align._chunked_weighted_gather). Ten cost as much a step as these six on a
# trained MobileNetV2-FPN at 224 px (4.00 vs 4.01 CPU s median, 1 thread).
MASK_TRAIN_ROW_BUCKETS = (16, 32, 64, 96, 128, 192)

PREDICTION_KEYS = ("boxes", "scores", "labels", "num_detections", "masks", "keypoints")


@keras.saving.register_keras_serializable(package="kdet")
class FasterRCNN(LossTermsMixin, DetectorMixin, keras.Model):
    """Faster R-CNN R50-FPN (torchvision ``fasterrcnn_resnet50_fpn`` / ``_v2``) or R50-C4.

    Args:
        num_classes: foreground classes (labels ``0..num_classes-1``).
        backbone: "resnet50" | "resnet101" | "mobilenet_v2" | "efficientnet_b0".."b7" (or a
            Keras model returning C2..C5).
        version: 1 (torchvision ``fasterrcnn_resnet50_fpn``) or 2 (``_v2``: BN in
            the FPN and heads, two RPN convs, conv-FC box head; see module docstring).
        fpn: True (FPN, the torchvision builders) or False (Faster R-CNN C4:
            RPN and RoIAlign 14 x 14 on C4, ResNet's res5 as the box head; a
            ResNet backbone, version 1, no masks; see the module docstring).
            Parameters with ``num_classes=90`` (torchvision's 91):
            33,924,660 with BN (``backbone_norm="batch"``), 33,871,540 with
            frozen BN (its 53,120 BN weights and biases are buffers, as
            torchvision's ``FrozenBatchNorm2d``).
        image_size: square input size, a multiple of 32.
        backbone_weights, backbone_norm ("batch" as torchvision ``weights=None``,
            or "frozen_batch"), trainable_backbone_layers (0..5),
            backbone_norm_epsilon: as :class:`kdet.models.RetinaNet`.
        rpn_*: torchvision ``RegionProposalNetwork`` settings.
        box_*: torchvision ``RoIHeads`` settings (``box_batch_size_per_image``
            512, ``box_positive_fraction`` 0.25, thresholds 0.5/0.5,
            ``box_score_thresh`` 0.05, ``box_nms_thresh`` 0.5,
            ``box_detections_per_img`` 100).
        seed: seed of the two random samplers.
        sync_batch_norm: batch-norm statistics (backbone with ``backbone_norm="batch"``,
            version 2's FPN and heads) over all replicas of a ``tf.distribute`` run
            (:func:`kdet.distribute.synchronize_batch_norm`); JAX ``DataParallel`` does
            this anyway.
    """

    with_masks = False
    prediction_keys = PREDICTION_KEYS

    RECIPE = "torchvision"  # kdet.recipes

    def __init__(self, num_classes=90, backbone="resnet50", version=1, image_size=800, fpn=True,
                 backbone_weights=None, backbone_norm="batch", trainable_backbone_layers=5,
                 backbone_norm_epsilon=1e-5,
                 rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
                 rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000,
                 rpn_nms_thresh=0.7, rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3,
                 rpn_batch_size_per_image=256, rpn_positive_fraction=0.5, rpn_score_thresh=0.0,
                 box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
                 box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=512,
                 box_positive_fraction=0.25, mask_batch_size_per_image=None,
                 bounding_box_format="xyxy", seed=None, sync_batch_norm=False, **kwargs):
        if version not in (1, 2):
            raise ValueError(f"{type(self).__name__}: version must be 1 or 2 (torchvision "
                             f"v1 / _v2), got {version!r}")
        size = int(image_size)
        if size % 32:
            raise ValueError(f"{type(self).__name__}: image_size {size} must be a multiple of 32")
        if int(num_classes) < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
        fpn = bool(fpn)
        extra_heads = self.with_masks or type(self)._make_roi_heads is not \
            FasterRCNN._make_roi_heads
        if not fpn and (version != 1 or extra_heads or backbone not in C4_BACKBONES):
            raise ValueError(f"{type(self).__name__}: fpn=False (Faster R-CNN C4) is version 1, "
                             f"box head only (no mask or keypoint head), on a backbone of "
                             f"{C4_BACKBONES}; got version={version!r}, backbone={backbone!r}")
        images = keras.Input((size, size, 3), name="images")
        x = ImageNormalization(name="normalize")(images)
        full_body = build_backbone(backbone, size, backbone_weights, backbone_norm,
                                   trainable_backbone_layers, backbone_norm_epsilon,
                                   levels=(2, 3, 4, 5) if fpn else (4,),
                                   owner=type(self).__name__)
        v2 = version == 2
        if fpn:
            features = full_body(x)
            features = {k: features[k] for k in ("C2", "C3", "C4", "C5")}
            pyramid = FPN(out_channels=256, in_levels=(2, 3, 4, 5), extra_blocks="maxpool",
                          norm="batch" if v2 else None, bn_epsilon=1e-5, bn_momentum=0.9,
                          name="fpn")(features)
            levels = [pyramid[f"P{level}"] for level in range(2, 7)]
            pooled = {f"P{level}": pyramid[f"P{level}"] for level in range(2, 6)}
            anchor_sizes, strides, channels = ANCHOR_SIZES, (4, 8, 16, 32, 64), 256
        else:
            # res5 becomes the box head: the backbone stops at C4 (layer3)
            c4 = truncate_backbone(full_body, 4, owner=type(self).__name__)(x)
            levels, pooled = [c4], {"C4": c4}
            anchor_sizes, strides, channels = C4_ANCHOR_SIZES, (16,), c4.shape[-1]
        proposal_layer = ProposalGenerator(
            image_size=size, anchor_sizes=anchor_sizes, aspect_ratios=ASPECT_RATIOS,
            strides=strides, pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            post_nms_top_n_train=rpn_post_nms_top_n_train,
            post_nms_top_n_test=rpn_post_nms_top_n_test, nms_threshold=rpn_nms_thresh,
            score_threshold=rpn_score_thresh, name="proposals")
        rpn = RPNHead(num_anchors=proposal_layer.num_anchors_per_location, channels=channels,
                      conv_depth=2 if v2 else 1, name="rpn_head")(levels)
        proposals = proposal_layer(rpn["objectness"], rpn["box_deltas"])
        head_kwargs = (dict(box_head="conv_fc" if v2 else "two_mlp",
                            head_norm="batch" if v2 else None) if fpn else
                       dict(box_head="res5", head_norm=backbone_norm, pool_size=14,
                            head_norm_epsilon=backbone_norm_epsilon, levels=(4,)))
        roi_heads = self._make_roi_heads(
            num_classes=num_classes, image_size=(size, size), score_threshold=box_score_thresh,
            nms_threshold=box_nms_thresh, detections_per_image=box_detections_per_img,
            with_masks=self.with_masks, name="roi_heads", **head_kwargs)
        detections = roi_heads(list(pooled.values()), proposals["proposals"], proposals["valid"])
        if not fpn and backbone_weights is not None:
            copy_layer_weights(full_body, roi_heads.box_head)
        outputs = dict(detections)
        outputs.update({
            "rpn_objectness": rpn["objectness"], "rpn_box_deltas": rpn["box_deltas"],
            "proposals": proposals["proposals"], "proposals_valid": proposals["valid"],
            **pooled})
        name = kwargs.pop("name", None) or (
            f"{'mask' if self.with_masks else 'faster'}rcnn_"
            f"{backbone if isinstance(backbone, str) else 'custom'}_"
            f"{'fpn' if fpn else 'c4'}{'_v2' if v2 else ''}")
        super().__init__(inputs=images, outputs=outputs, name=name, **kwargs)

        self.num_classes = int(num_classes)
        self.image_size = (size, size)
        self.fpn = fpn
        self.pooled_feature_keys = tuple(pooled)
        self.bounding_box_format = bounding_box_format
        self.anchors = proposal_layer.anchors
        self.roi_heads = roi_heads
        self.rpn_matcher = Matcher(rpn_fg_iou_thresh, rpn_bg_iou_thresh,
                                   allow_low_quality_matches=True)
        self.box_matcher = Matcher(box_fg_iou_thresh, box_bg_iou_thresh)
        self.rpn_sampler = BalancedSampler(rpn_batch_size_per_image, rpn_positive_fraction,
                                           seed=seed, name="rpn_sampler")
        self.box_sampler = BalancedSampler(box_batch_size_per_image, box_positive_fraction,
                                           seed=None if seed is None else seed + 1,
                                           name="box_sampler")
        # Mask RoIs per image: the sampler keeps at most this many positives.
        self.mask_batch_size_per_image = int(
            mask_batch_size_per_image
            or max(1, int(box_batch_size_per_image * box_positive_fraction)))
        self._config = dict(
            num_classes=num_classes, backbone=backbone, version=version, image_size=size,
            fpn=fpn,
            # the file's weights are the model's own from here on: a saved model must load
            # without the file
            backbone_weights=None, backbone_norm=backbone_norm,
            trainable_backbone_layers=trainable_backbone_layers,
            backbone_norm_epsilon=backbone_norm_epsilon,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test, rpn_nms_thresh=rpn_nms_thresh,
            rpn_fg_iou_thresh=rpn_fg_iou_thresh, rpn_bg_iou_thresh=rpn_bg_iou_thresh,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            rpn_positive_fraction=rpn_positive_fraction, rpn_score_thresh=rpn_score_thresh,
            box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
            box_fg_iou_thresh=box_fg_iou_thresh, box_bg_iou_thresh=box_bg_iou_thresh,
            box_batch_size_per_image=box_batch_size_per_image,
            box_positive_fraction=box_positive_fraction,
            mask_batch_size_per_image=mask_batch_size_per_image,
            bounding_box_format=bounding_box_format, seed=seed,
            sync_batch_norm=bool(sync_batch_norm))
        if sync_batch_norm:
            synchronize_batch_norm(self)

    # ------------------------------------------------------------------ loss
    def loss_terms(self, y, y_pred, training=True):
        """The loss terms, named as torchvision's training loss dict.

        ``loss_objectness``, ``loss_rpn_box_reg``, ``loss_classifier``,
        ``loss_box_reg`` (+ ``loss_mask`` for Mask R-CNN), each a scalar.
        ``training``: BN mode of the RoI heads, which run here on the sampled
        RoIs (version 2 has BN there; ``evaluate`` passes False).
        """
        gt_boxes, gt_labels = self._box_targets(y, needs_masks=self.with_masks)
        terms = self._rpn_loss(y_pred, gt_boxes, gt_labels)
        roi = encode_roi_targets(
            ops.stop_gradient(ops.cast(y_pred["proposals"], "float32")), gt_boxes, gt_labels,
            sampler=self.box_sampler, proposals_valid=y_pred["proposals_valid"],
            matcher=self.box_matcher, box_coder=self.roi_heads.box_coder)
        features = [y_pred[key] for key in self.pooled_feature_keys]
        head = self.roi_heads.box_logits(features, roi["rois"], training=training,
                                         roi_mask=roi["valid"])
        terms.update(fastrcnn_loss(head["class_logits"], head["box_regression"], roi["labels"],
                                   roi["box_targets"]))
        if self.with_masks:
            terms["loss_mask"] = self._mask_loss(features, roi, y, training)
        terms.update(self._extra_roi_losses(features, roi, y))
        return terms

    # Hooks for subclasses with more RoI branches (Keypoint R-CNN). _make_roi_heads runs
    # before keras.Model.__init__, so it may read only plain attributes set before it.
    def _make_roi_heads(self, **kwargs):
        return RoIHeads(**kwargs)

    def _extra_roi_losses(self, features, roi, y):
        return {}

    def _rpn_loss(self, y_pred, gt_boxes, gt_labels):
        targets = encode_rpn_targets(self.anchors, gt_boxes, gt_labels, sampler=self.rpn_sampler,
                                     matcher=self.rpn_matcher)
        return rpn_loss(y_pred["rpn_objectness"], y_pred["rpn_box_deltas"], targets["labels"],
                        targets["box_targets"])

    def _mask_loss(self, features, roi, y, training=True):
        return mask_rcnn_loss(self.roi_heads, features, roi, y["masks"], self.image_size,
                              self.mask_batch_size_per_image, training=training)

    # ------------------------------------------------------------ prediction

    def _predict_resized(self, batch, scales):
        """Masks (Mask R-CNN) stay in the resized-and-padded model input space;
        ``"scale"`` [N] maps original pixels to it (``new = old * scale``)."""
        out = self(batch, training=False)
        out = {k: ops.convert_to_numpy(v) for k, v in out.items() if k in PREDICTION_KEYS}
        out["boxes"] = out["boxes"] / scales[:, None, None]
        out["scale"] = scales
        return out


# ---------------------------------------------------------------- loss functions
def rpn_loss(objectness, box_deltas, labels, box_targets, beta=1.0 / 9):
    """torchvision ``RegionProposalNetwork.compute_loss`` on kdet's encoded RPN targets.

    ``labels [B, A]``: 0 object, -1 background, -2 not sampled. Objectness BCE
    is the mean over the sampled anchors of the batch; the box loss is the
    smooth-L1 sum over the positive anchors divided by the sampled count.
    """
    objectness = ops.cast(objectness, "float32")
    sampled = ops.cast(labels >= -1, "float32")
    positive = ops.cast(labels == 0, "float32")
    num_sampled = ops.sum(sampled)  # of the global batch in global_mean (kdet.distribute)
    bce = losses.sigmoid_cross_entropy(positive, objectness)
    box = losses.smooth_l1_loss(box_deltas, box_targets, beta=beta)
    return {"loss_objectness": global_mean(ops.sum(bce * sampled), num_sampled),
            "loss_rpn_box_reg": global_mean(ops.sum(box * positive[..., None]), num_sampled)}


def fastrcnn_loss(class_logits, box_regression, labels, box_targets, beta=1.0 / 9):
    """torchvision ``fastrcnn_loss`` on kdet's encoded RoI targets.

    ``labels [B, S]``: class ``c >= 0`` (column ``c + 1``), -1 background, -2
    padding. Cross-entropy is the mean over the sampled RoIs; the smooth-L1
    loss of the GT class's deltas is summed over foreground RoIs and divided
    by the sampled count.
    """
    labels = ops.cast(labels, "int32")
    sampled = ops.cast(labels >= -1, "float32")
    num_sampled = ops.sum(sampled)  # of the global batch in global_mean (kdet.distribute)
    ce = losses.softmax_cross_entropy_with_background(labels, class_logits)
    num_columns = class_logits.shape[-1]
    deltas = ops.reshape(ops.cast(box_regression, "float32"),
                         tuple(ops.shape(labels)) + (num_columns, 4))
    column = ops.maximum(labels, 0) + 1
    index = ops.broadcast_to(column[..., None, None], tuple(ops.shape(labels)) + (1, 4))
    picked = ops.take_along_axis(deltas, index, axis=-2)[..., 0, :]
    foreground = ops.cast(labels >= 0, "float32")
    box = losses.smooth_l1_loss(picked, box_targets, beta=beta)
    return {"loss_classifier": global_mean(ops.sum(ce), num_sampled),
            "loss_box_reg": global_mean(ops.sum(box * foreground[..., None]), num_sampled)}


def project_masks_on_boxes(gt_masks, rois, matches, image_size, output_size=28,
                           image_index=None):
    """torchvision ``project_masks_on_boxes``: ``roi_align`` (adaptive sampling,
    ``aligned=False``) of each RoI's matched GT mask, ``[B, R, M, M]``.

    Each RoI reads its own GT mask by index (``kdet.ops.roi_align_maps``), never
    a full-resolution copy per RoI. Masks ``[B, N, Hm, Wm]`` stored at another
    size than the image (a reduced resolution, see ``build_pipeline``'s
    ``mask_size``) are read with the RoIs scaled to the mask grid. ``image_index
    [B', R]``: the image of each RoI where ``rois [B', R, 4]`` packs several
    images' RoIs (``kdet.ops.roi_align_maps``).
    """
    mask_h, mask_w = gt_masks.shape[2], gt_masks.shape[3]
    rois = ops.cast(rois, "float32")
    if (mask_h, mask_w) != tuple(image_size):
        scale = ops.convert_to_tensor(np.array(
            [mask_w / image_size[1], mask_h / image_size[0]] * 2, "float32"))
        rois = rois * scale
    return roi_align_maps(gt_masks, rois, ops.maximum(matches, 0), output_size,
                          spatial_scale=1.0, sampling_ratio=-1, aligned=False,
                          image_index=image_index)


def select_foreground_rois(roi, max_rois):
    """The first ``max_rois`` foreground RoIs of ``encode_roi_targets`` per image (the
    RoIs the mask and keypoint heads train on; all of them under the default sampler,
    which keeps at most 25 % of 512).

    Returns ``(rois [B, k, 4], matches [B, k], labels [B, k], selected [B, k])``:
    RoIs packed first in sampled order, zero boxes / match 0 / label 0 where
    ``selected`` is False.
    """
    labels = roi["labels"]
    foreground = labels >= 0
    num_rois = labels.shape[1]
    k = min(int(max_rois), num_rois)
    order_key = ops.where(foreground, num_rois - ops.arange(num_rois, dtype="int32"), 0)
    key, index = ops.top_k(ops.cast(order_key, "int32"), k)
    selected = key > 0
    rois = ops.where(selected[..., None], gather_rows(roi["rois"], index), 0.0)
    matches = ops.where(selected, ops.take_along_axis(roi["matches"], index, axis=1), 0)
    picked_labels = ops.where(selected, ops.take_along_axis(labels, index, axis=1), 0)
    return rois, matches, picked_labels, selected


def pack_selected_rows(selected, size):
    """The first ``size`` selected slots of ``selected [B, k]`` packed across the batch.

    Returns ``(index [size], valid [size])``: flat positions ``b * k + j`` of the
    selected slots in (image, slot) order, then 0 with ``valid`` False once they run
    out (more than ``size`` selected slots: the first ``size`` only).
    """
    flat = ops.reshape(ops.cast(selected, "bool"), (-1,))
    position = ops.cumsum(ops.cast(flat, "int32")) - 1
    # slot ``size`` takes every slot that is not packed, and is dropped
    slot = ops.where(flat & (position < size), position, size)
    index = ops.scatter(slot[:, None], ops.arange(ops.shape(flat)[0], dtype="int32"),
                        (size + 1,))[:size]
    count = ops.sum(ops.cast(flat, "int32"))
    return index, ops.arange(size, dtype="int32") < count


def mask_rcnn_loss(roi_heads, features, roi, gt_masks, image_size, max_rois, training=True):
    """torchvision ``maskrcnn_loss`` over the foreground RoIs of ``encode_roi_targets``
    (:func:`select_foreground_rois`: the first ``max_rois`` of each image run the mask
    head).

    torchvision runs the mask head on the foreground RoIs of the batch alone: a
    handful per image early in training, tens to ``max_rois`` once the RPN finds the
    objects. Here the foreground RoIs of all images are packed into one row
    (:func:`pack_selected_rows`, each RoI reading its own image's features and GT
    mask through ``image_index``) and the mask targets, RoIAlign and mask head run
    on the smallest of ``MASK_TRAIN_ROW_BUCKETS`` rows that holds the batch's
    count, picked at run time by one ``ops.switch`` (static shapes in each branch, like
    the predict path's ``MASK_ROW_BUCKETS``; a chain of nested ``ops.cond`` held 1.4x the
    step's memory, 13.4 against 9.9 GiB with ten buckets at 800 px, batch 2, and traced
    1.4x longer); past the last bucket on all
    ``B x max_rois`` slots. The loss is the same: the rows left out are not
    selected and weigh 0. (Per-image buckets of the largest image's count ran
    ~1.9x the foreground rows: 160 rows a batch for 86 foreground RoIs of a
    trained MobileNetV2-FPN Mask R-CNN at 224 px, batch 2, on Penn-Fudan, at ~22
    CPU ms a row forward and backward.)
    Heads with batch norm run all rows (a statistics update inside a branch is
    not portable to JAX), as does ``max_rois`` below every bucket.
    """
    rois, matches, mask_labels, selected = select_foreground_rois(roi, max_rois)
    rows = rois.shape[1]
    batch = rois.shape[0]

    def loss_sum(rois, matches, labels, valid, image=None):
        """The loss sum and pixel count of these RoIs (``image``: each one's image)."""
        targets = ops.stop_gradient(project_masks_on_boxes(
            gt_masks, rois, matches, image_size, output_size=28, image_index=image))
        logits = roi_heads.mask_logits(features, rois, training=training, roi_mask=valid,
                                       image_index=image)
        return losses.mask_bce_sum(logits, labels + 1, targets, valid=valid,
                                   data_format="channels_last")

    def every_row():
        """On all ``[B, rows]`` slots."""
        return loss_sum(rois, matches, mask_labels, selected)

    def packed(size):
        """On the first ``size`` foreground RoIs of the batch, packed into one row."""
        index, valid = pack_selected_rows(selected, size)

        def pick(values):
            flat = ops.reshape(values, (-1,) + tuple(values.shape[2:]))
            return ops.take(flat, index, axis=0)[None]

        return loss_sum(pick(rois), pick(matches), pick(mask_labels), valid[None],
                        image=(index // rows)[None])

    slots = None if batch is None else batch * rows
    buckets = [b for b in MASK_TRAIN_ROW_BUCKETS if slots is None or b < slots]
    if getattr(roi_heads.mask_head, "norm", None) is not None:
        buckets = []
    if buckets:
        count = ops.sum(ops.cast(selected, "int32"))
        # the first bucket holding the count (len(buckets): none, every row)
        branch = ops.sum(ops.cast(count > ops.array(buckets, "int32"), "int32"))
        total, pixels = ops.switch(
            branch, [lambda size=size: packed(size) for size in buckets] + [every_row])
    else:
        total, pixels = every_row()
    # Outside the branches: under tf.distribute the mean's all-reduce runs on every replica.
    return global_mean(total, pixels)
