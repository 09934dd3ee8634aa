"""Fast R-CNN (Girshick 2015): a detector that classifies and refines *given* proposals.

``FastRCNN`` takes ``{"images": [B, S, S, 3], "proposals": [B, P, 4]}`` (xyxy
input pixels, zero-area rows are padding) and runs:

* the backbone's stride-16 map (``C4``: ResNet ``layer3``, MobileNetV2
  ``features.13``); the paper's VGG16 conv5 is not among kdet's backbones;
* ``RoIPool`` 7 x 7 at ``spatial_scale=1/16`` (torchvision ``roi_pool``,
  the paper's layer);
* ``TwoMLPHead`` (fc6, fc7 + ReLU; ``representation_size`` 1024, the
  paper's VGG16 has 4096) and ``FastRCNNPredictor``: ``K + 1`` class logits
  (background first) and class-specific box deltas.

Training (``compute_loss``, so ``model.fit`` works on tf.data, with
``jit_compile`` on TF and JAX), the paper's recipe: the GT boxes join the
proposals, ``box_batch_size_per_image`` (64) RoIs per image, 25 % foreground
at IoU >= 0.5, background from IoU in ``[0.1, 0.5)`` (``box_bg_iou_low``,
py-faster-rcnn's ``BG_THRESH_LO``); two images per batch give the paper's
128-RoI minibatch. The loss is the paper's multi-task loss: softmax
cross-entropy plus smooth L1 (``beta`` 1) of the GT class's deltas on the
foreground RoIs, both summed and divided by the number of sampled RoIs
(:func:`kdet.models.faster_rcnn.fastrcnn_loss`). Box targets use
``BoxCoder((10, 10, 5, 5))``: py-faster-rcnn's targets normalised by the
stds ``(0.1, 0.1, 0.2, 0.2)``, which are torchvision's weights too. An image
without ground truth has no background in ``[0.1, 0.5)`` and so adds nothing
to the loss (set ``box_bg_iou_low=0`` to sample it as background).

Inference: softmax, class-specific decode, clip, drop boxes with a side below
1e-2, score > 0.05, per-class NMS at **0.3** (the paper's test setting;
torchvision's Faster R-CNN uses 0.5), top 100 — the padded dict
``{"boxes", "scores", "labels", "num_detections"}`` (score 0, label -1 rows).

Proposals come from the user (selective search, EdgeBoxes, another model) or
from :mod:`kdet.ops.proposals`: ``predict_images`` without proposals uses
:func:`kdet.ops.proposals.default_proposals` (sliding windows);
:func:`kdet.ops.proposals.selective_search_proposals` needs
``opencv-contrib-python``.

    >>> import kdet
    >>> model = kdet.models.FastRCNN(num_classes=20, image_size=512)       # doctest: +SKIP
    >>> model.compile()                                                     # doctest: +SKIP
    >>> model.fit(train_ds, epochs=12)   # x = {"images", "proposals"}       # doctest: +SKIP
"""
import keras
import numpy as np
from keras import ops

from kdet.backbones.factory import backbone_level
from kdet.boxes import BoxCoder, nonempty_box_mask
from kdet.layers.normalization import ImageNormalization
from kdet.layers.roi import RoIPool
from kdet.layers.roi_heads import FastRCNNPredictor, TwoMLPHead, postprocess_detections
from kdet.matching import BalancedSampler, Matcher, encode_roi_targets
from kdet.models.detector import DetectorMixin, LossTermsMixin, resize_and_pad
from kdet.models.faster_rcnn import fastrcnn_loss
from kdet.ops.proposals import default_proposals, pad_proposals

PREDICTION_KEYS = ("boxes", "scores", "labels", "num_detections")


class ProposalHeads(keras.layers.Layer):
    """Shared second stage of R-CNN and Fast R-CNN: given RoIs -> logits -> detections.

    Subclasses implement ``box_logits(inputs, rois, training=None)`` returning
    ``{"class_logits": [B, R, K+1], "box_regression": [B, R, 4(K+1)]}``.
    ``call(inputs, proposals, training=None)`` returns the padded detections
    (zeros in training: the loss samples its own RoIs and calls
    ``box_logits``) and ``"proposals_valid"`` (the non-empty proposals).
    """

    def __init__(self, num_classes, image_size, box_coder_weights, score_threshold=0.05,
                 nms_threshold=0.3, detections_per_image=100, min_size=1e-2, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.image_size = tuple(int(s) for s in image_size)
        self.box_coder = BoxCoder(tuple(box_coder_weights))
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = int(detections_per_image)
        self.min_size = float(min_size)

    def box_logits(self, inputs, rois, training=None):
        raise NotImplementedError

    def call(self, inputs, proposals, training=None):
        proposals = ops.cast(proposals, "float32")
        valid = nonempty_box_mask(proposals)
        if training:
            batch, d = ops.shape(proposals)[0], self.detections_per_image
            out = {"boxes": ops.zeros((batch, d, 4)), "scores": ops.zeros((batch, d)),
                   "labels": ops.full((batch, d), -1, "int32"),
                   "num_detections": ops.zeros((batch,), "int32")}
        else:
            head = self.box_logits(inputs, proposals, training=False)
            out = postprocess_detections(
                head["class_logits"], head["box_regression"], proposals, valid, self.image_size,
                self.score_threshold, self.nms_threshold, self.detections_per_image,
                self.min_size, self.box_coder)
        out["proposals_valid"] = valid
        return out

    def compute_output_spec(self, inputs, proposals, training=None):
        batch, d = proposals.shape[0], self.detections_per_image
        return {"boxes": keras.KerasTensor((batch, d, 4), "float32"),
                "scores": keras.KerasTensor((batch, d), "float32"),
                "labels": keras.KerasTensor((batch, d), "int32"),
                "num_detections": keras.KerasTensor((batch,), "int32"),
                "proposals_valid": keras.KerasTensor(tuple(proposals.shape[:2]), "bool")}


@keras.saving.register_keras_serializable(package="kdet")
class FastRCNNHeads(ProposalHeads):
    """Fast R-CNN's RoI stage: ``RoIPool`` -> ``TwoMLPHead`` -> ``FastRCNNPredictor``.

    Call ``(features [B, h, w, C], proposals [B, P, 4])``. Box deltas use
    ``BoxCoder((10, 10, 5, 5))``.
    """

    def __init__(self, num_classes, image_size, pool_size=7, spatial_scale=1.0 / 16,
                 representation_size=1024, **kwargs):
        kwargs.setdefault("box_coder_weights", (10.0, 10.0, 5.0, 5.0))
        super().__init__(num_classes, image_size, **kwargs)
        self.pool_size = int(pool_size)
        self.spatial_scale = float(spatial_scale)
        self.representation_size = int(representation_size)
        self.box_roi_pool = RoIPool(self.pool_size, spatial_scale=self.spatial_scale,
                                    name="box_roi_pool")
        self.box_head = TwoMLPHead(self.representation_size, name="box_head",
                                   dtype=self.dtype_policy)
        self.box_predictor = FastRCNNPredictor(self.num_classes + 1, name="box_predictor",
                                               dtype=self.dtype_policy)

    def build(self, inputs_shape, proposals_shape):
        self.box_head.build((None, None, self.pool_size, self.pool_size, inputs_shape[-1]))
        self.box_predictor.build((None, None, self.representation_size))

    def box_logits(self, features, rois, training=None):
        return self.box_predictor(self.box_head(self.box_roi_pool(features, rois)))

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, image_size=list(self.image_size),
                      pool_size=self.pool_size, spatial_scale=self.spatial_scale,
                      representation_size=self.representation_size,
                      box_coder_weights=list(self.box_coder.weights),
                      score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                      detections_per_image=self.detections_per_image, min_size=self.min_size)
        return config


class ProposalDetector(LossTermsMixin, DetectorMixin, keras.Model):
    """What R-CNN and Fast R-CNN share: ``{"images", "proposals"}`` inputs, RoI sampling and
    the multi-task loss, prediction with given or generated proposals.

    A subclass builds ``inputs``, the ``heads`` (a :class:`ProposalHeads`) and
    ``outputs`` holding the detections, ``"proposals"``, ``"proposals_valid"``
    and under ``head_input_key`` what ``heads.box_logits`` reads.
    """

    head_input_key = "features"
    prediction_keys = PREDICTION_KEYS

    RECIPE = "fast_rcnn_paper"  # kdet.recipes

    def _setup(self, *, num_classes, image_size, num_proposals, heads, box_fg_iou_thresh,
               box_bg_iou_thresh, box_bg_iou_low, box_batch_size_per_image,
               box_positive_fraction, box_loss_beta, bounding_box_format, seed, config):
        self.num_classes = int(num_classes)
        self.image_size = (int(image_size), int(image_size))
        self.num_proposals = int(num_proposals)
        self.heads = heads
        self.box_matcher = Matcher(box_fg_iou_thresh, box_bg_iou_thresh)
        self.box_bg_iou_low = float(box_bg_iou_low)
        self.box_sampler = BalancedSampler(box_batch_size_per_image, box_positive_fraction,
                                           seed=seed, name="box_sampler")
        self.box_loss_beta = float(box_loss_beta)
        self.bounding_box_format = bounding_box_format
        self._config = dict(config)

    @staticmethod
    def _check_arguments(owner, num_classes, size, num_proposals, multiple=32):
        if size % multiple:
            raise ValueError(f"{owner}: image size {size} must be a multiple of {multiple}")
        if int(num_classes) < 1:
            raise ValueError(f"{owner}: num_classes must be >= 1, got {num_classes}")
        if int(num_proposals) < 1:
            raise ValueError(f"{owner}: num_proposals must be >= 1, got {num_proposals}")

    # ------------------------------------------------------------------ loss
    def sample_rois(self, proposals, proposals_valid, gt_boxes, gt_labels):
        """The training RoIs of :func:`kdet.matching.encode_roi_targets` with this model's
        matcher, sampler, background band and box coder."""
        return encode_roi_targets(
            ops.stop_gradient(ops.cast(proposals, "float32")), gt_boxes, gt_labels,
            sampler=self.box_sampler, proposals_valid=proposals_valid, matcher=self.box_matcher,
            box_coder=self.heads.box_coder, bg_iou_low_threshold=self.box_bg_iou_low)

    def loss_terms(self, y, y_pred, training=True):
        """``{"loss_classifier", "loss_box_reg"}``: the multi-task loss on sampled RoIs."""
        gt_boxes, gt_labels = self._box_targets(y)
        roi = self.sample_rois(y_pred["proposals"], y_pred["proposals_valid"], gt_boxes,
                               gt_labels)
        head = self.heads.box_logits(y_pred[self.head_input_key], roi["rois"], training=training)
        return fastrcnn_loss(head["class_logits"], head["box_regression"], roi["labels"],
                             roi["box_targets"], beta=self.box_loss_beta)

    # ------------------------------------------------------------ prediction

    def predict_images(self, images, proposals=None, batch_size=8):
        """Detect on a list of images of any size; boxes in each image's pixels.

        Each image is resized so its long side is the model's input size and
        padded. ``proposals``: one ``[P_i, 4]`` xyxy array per image in that
        image's pixels (the first ``num_proposals`` are kept), or None for
        :func:`kdet.ops.proposals.default_proposals` on the model input.
        Returns the padded detection dict plus ``"scale"`` [N] (new = old * scale).
        """
        if proposals is not None and len(proposals) != len(images):
            raise ValueError(f"{type(self).__name__}.predict_images: {len(images)} images but "
                             f"{len(proposals)} proposal arrays")
        size = self.image_size[0]
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            padded, scales = zip(*(resize_and_pad(im, size) for im in chunk))
            scales = np.asarray(scales, "float32")
            if proposals is None:
                boxes = [default_proposals(size, self.num_proposals)] * len(chunk)
            else:
                boxes = [np.asarray(p, "float32").reshape(-1, 4) * s
                         for p, s in zip(proposals[start:start + batch_size], scales)]
            batch = {"images": np.stack(padded), "proposals": pad_proposals(boxes,
                                                                            self.num_proposals)}
            out = self(batch, training=False)
            out = {k: ops.convert_to_numpy(v) for k, v in out.items() if k in PREDICTION_KEYS}
            out["boxes"] = out["boxes"] / scales[:, None, None]
            out["scale"] = scales
            results.append(out)
        return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


@keras.saving.register_keras_serializable(package="kdet")
class FastRCNN(ProposalDetector):
    """Fast R-CNN on given proposals (see the module docstring).

    Args:
        num_classes: foreground classes (labels ``0..num_classes-1``).
        backbone: "resnet50" | "resnet101" | "mobilenet_v2" | "efficientnet_b0".."b7";
            its stride-16 map ``C4`` is pooled.
        image_size: square input size, a multiple of 32.
        num_proposals: ``P``, proposals per image in the input (zero-area rows pad).
        backbone_weights, backbone_norm, trainable_backbone_layers,
            backbone_norm_epsilon: as :class:`kdet.models.FasterRCNN`.
        representation_size: fc6 / fc7 width (1024; the paper's VGG16 4096).
        box_fg_iou_thresh 0.5, box_bg_iou_thresh 0.5, box_bg_iou_low 0.1:
            foreground IoU >= 0.5, background IoU in ``[0.1, 0.5)``.
        box_batch_size_per_image 64, box_positive_fraction 0.25: RoIs per image.
        box_loss_beta: smooth-L1 transition, 1 (the paper).
        box_score_thresh 0.05, box_nms_thresh 0.3, box_detections_per_img 100.
        seed: seed of the RoI sampler.
    """

    def __init__(self, num_classes=20, backbone="resnet50", image_size=512, num_proposals=2000,
                 backbone_weights=None, backbone_norm="batch", trainable_backbone_layers=5,
                 backbone_norm_epsilon=1e-5, representation_size=1024,
                 box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_bg_iou_low=0.1,
                 box_batch_size_per_image=64, box_positive_fraction=0.25, box_loss_beta=1.0,
                 box_score_thresh=0.05, box_nms_thresh=0.3, box_detections_per_img=100,
                 bounding_box_format="xyxy", seed=None, **kwargs):
        owner = type(self).__name__
        size = int(image_size)
        self._check_arguments(owner, num_classes, size, num_proposals)
        images = keras.Input((size, size, 3), name="images")
        proposals = keras.Input((int(num_proposals), 4), name="proposals")
        x = ImageNormalization(name="normalize")(images)
        c4 = backbone_level(backbone, size, 4, backbone_weights, backbone_norm,
                            trainable_backbone_layers, backbone_norm_epsilon, owner)
        features = c4(x)
        heads = FastRCNNHeads(num_classes, (size, size), pool_size=7, spatial_scale=1.0 / 16,
                              representation_size=representation_size,
                              score_threshold=box_score_thresh, nms_threshold=box_nms_thresh,
                              detections_per_image=box_detections_per_img, name="roi_heads")
        detections = heads(features, proposals)
        outputs = dict(detections, proposals=proposals, features=features)
        name = kwargs.pop("name", None) or (
            f"fastrcnn_{backbone if isinstance(backbone, str) else 'custom'}_c4")
        super().__init__(inputs={"images": images, "proposals": proposals}, outputs=outputs,
                         name=name, **kwargs)
        self._setup(
            num_classes=num_classes, image_size=size, num_proposals=num_proposals, heads=heads,
            box_fg_iou_thresh=box_fg_iou_thresh, box_bg_iou_thresh=box_bg_iou_thresh,
            box_bg_iou_low=box_bg_iou_low, box_batch_size_per_image=box_batch_size_per_image,
            box_positive_fraction=box_positive_fraction, box_loss_beta=box_loss_beta,
            bounding_box_format=bounding_box_format, seed=seed,
            config=dict(
                num_classes=num_classes, backbone=backbone, image_size=size,
                num_proposals=num_proposals,
                # the file's weights are the model's own from here on
                backbone_weights=None, backbone_norm=backbone_norm,
                trainable_backbone_layers=trainable_backbone_layers,
                backbone_norm_epsilon=backbone_norm_epsilon,
                representation_size=representation_size,
                box_fg_iou_thresh=box_fg_iou_thresh, box_bg_iou_thresh=box_bg_iou_thresh,
                box_bg_iou_low=box_bg_iou_low, box_batch_size_per_image=box_batch_size_per_image,
                box_positive_fraction=box_positive_fraction, box_loss_beta=box_loss_beta,
                box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
                box_detections_per_img=box_detections_per_img,
                bounding_box_format=bounding_box_format, seed=seed))
