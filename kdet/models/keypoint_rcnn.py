"""Keypoint R-CNN with FPN (He et al. 2017), torchvision ``keypointrcnn_resnet50_fpn`` semantics.

Faster R-CNN (:mod:`kdet.models.faster_rcnn`, same RPN and box settings)
plus the keypoint branch (:mod:`kdet.layers.keypoint_head`):
``MultiLevelRoIAlign(14, sampling 2)`` on P2-P5, 8x (3x3 conv 512 + ReLU),
4x4/s2 transposed conv to ``num_keypoints`` logits, bilinear x2 -> 56 x 56
heatmaps. The default is torchvision's: one foreground class (person, kdet
label 0; torchvision's ``num_classes=2``) and 17 keypoints.

Training adds ``loss_keypoint``: each foreground RoI's matched GT keypoints
become one-hot 56 x 56 targets (torchvision ``keypoints_to_heatmap``:
:func:`kdet.matching.encode_keypoint_targets`), and the loss is the softmax
cross-entropy over the 56 * 56 positions, averaged over the labelled
keypoints that fall inside their RoI (:func:`kdet.losses.keypoint_loss`).
Targets need ``"keypoints" [B, N, K, 3]`` (x, y, visibility; visibility 0 =
unlabelled) in model-input pixels next to ``"boxes"`` and ``"labels"``.

Predictions add ``"keypoints" [B, D, K, 3]``: x, y in input-image pixels and
the heatmap score at the argmax (torchvision's ``keypoints_scores``; its
``keypoints[..., 2]`` is a constant 1), decoded as torchvision
``heatmaps_to_keypoints``; zeros for padded detections.

    >>> import kdet
    >>> model = kdet.models.KeypointRCNN(num_keypoints=17, image_size=512)   # doctest: +SKIP
    >>> model.compile()                                                      # doctest: +SKIP
"""
import keras
from keras import ops

from kdet import losses
from kdet.layers.keypoint_head import KeypointRoIHeads
from kdet.matching import encode_keypoint_targets, gather_rows
from kdet.models.faster_rcnn import FasterRCNN, select_foreground_rois


@keras.saving.register_keras_serializable(package="kdet")
class KeypointRCNN(FasterRCNN):
    """Keypoint R-CNN R50-FPN (torchvision v1) as a Keras model.

    Args:
        num_classes: foreground classes, 1 (person) as torchvision's builder.
        num_keypoints: keypoints per object, 17 (COCO persons).
        keypoint_batch_size_per_image: foreground RoIs per image that train the
            keypoint head (default ``int(box_batch_size_per_image *
            box_positive_fraction)``, the most the RoI sampler can pick, so
            all of them as in torchvision).
        Other arguments as :class:`kdet.models.FasterRCNN`.
    """

    def __init__(self, num_classes=1, num_keypoints=17, keypoint_batch_size_per_image=None,
                 **kwargs):
        if int(num_keypoints) < 1:
            raise ValueError(f"KeypointRCNN: num_keypoints must be >= 1, got {num_keypoints}")
        # Read by _make_roi_heads inside FasterRCNN.__init__ (before keras.Model.__init__).
        self._num_keypoints = int(num_keypoints)
        backbone = kwargs.get("backbone", "resnet50")
        kwargs["name"] = kwargs.get("name") or (
            f"keypointrcnn_{backbone if isinstance(backbone, str) else 'custom'}_fpn")
        super().__init__(num_classes=num_classes, **kwargs)
        self.num_keypoints = self._num_keypoints
        self.keypoint_batch_size_per_image = int(
            keypoint_batch_size_per_image
            or max(1, int(self._config["box_batch_size_per_image"]
                          * self._config["box_positive_fraction"])))
        self._config.update({"num_keypoints": self.num_keypoints,
                             "keypoint_batch_size_per_image": keypoint_batch_size_per_image})

    def _make_roi_heads(self, **kwargs):
        return KeypointRoIHeads(num_keypoints=self._num_keypoints, **kwargs)

    def _box_targets(self, y, needs_masks=False):
        # Checked first, before any loss is computed.
        if isinstance(y, dict) and "labels" in y:
            if "keypoints" not in y:
                raise ValueError('KeypointRCNN: targets lack "keypoints" [B, N, K, 3] '
                                 "(x, y, visibility)")
            keypoints = y["keypoints"]
            expected = tuple(y["labels"].shape[1:2]) + (self.num_keypoints, 3)
            if len(keypoints.shape) != 4 or tuple(keypoints.shape[1:]) != expected:
                raise ValueError(f'KeypointRCNN: targets "keypoints" must be [B, N, K, 3] = '
                                 f"[B, {expected[0]}, {expected[1]}, 3], "
                                 f"got {tuple(keypoints.shape)}")
        return super()._box_targets(y, needs_masks)

    def _extra_roi_losses(self, features, roi, y):
        return {"loss_keypoint": keypoint_rcnn_loss(self.roi_heads, features, roi, y["keypoints"],
                                                    self.keypoint_batch_size_per_image)}

    def _predict_resized(self, batch, scales):
        """Keypoint x, y mapped back to the original pixels as the boxes are."""
        out = super()._predict_resized(batch, scales)
        keypoints = out["keypoints"].copy()
        keypoints[..., :2] = keypoints[..., :2] / scales[:, None, None, None]
        out["keypoints"] = keypoints
        return out


def keypoint_rcnn_loss(roi_heads, features, roi, gt_keypoints, max_rois):
    """torchvision ``keypointrcnn_loss`` over the foreground RoIs of ``encode_roi_targets``.

    Every foreground RoI (up to ``max_rois`` per image) runs the keypoint
    head; its matched GT's keypoints are encoded on the RoI's heatmap grid and
    the cross-entropy is averaged over the valid keypoints of the batch (0
    when there is none).
    """
    rois, matches, _, selected = select_foreground_rois(roi, max_rois)
    keypoints = gather_rows(ops.cast(gt_keypoints, "float32"), matches)  # [B, k, K, 3]
    logits = roi_heads.keypoint_logits(features, rois)  # [B, k, S, S, K]
    targets, valid = encode_keypoint_targets(keypoints, rois, heatmap_size=logits.shape[2])
    valid = valid & selected[..., None]
    return losses.keypoint_loss(logits, ops.stop_gradient(targets), valid,
                                data_format="channels_last")
