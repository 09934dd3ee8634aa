"""Mask R-CNN with FPN (He et al. 2017), torchvision ``maskrcnn_resnet50_fpn`` semantics.

``version=2`` is ``maskrcnn_resnet50_fpn_v2``: Faster R-CNN v2 plus BN after
each 3x3 conv of the mask head.

Faster R-CNN (:mod:`kdet.models.faster_rcnn`) plus the mask branch:
``MultiLevelRoIAlign(14, sampling 2)`` on P2-P5, 4x (3x3 conv 256 + ReLU),
2x2/s2 transposed conv 256 + ReLU, 1x1 conv to ``num_classes + 1`` logits
(28 x 28, background column first).

Training adds ``loss_mask``: the 28 x 28 targets are ``roi_align`` (adaptive
sampling, not aligned) of each foreground RoI's matched GT mask, and the
loss is the binary cross-entropy of the GT class's channel, averaged over
foreground RoIs and pixels. Targets need ``"masks" [B, N, H, W]`` (image
size, values in [0, 1]) next to ``"boxes"`` and ``"labels"``.

Predictions add ``"masks" [B, D, H, W]``: the sigmoid of each detection's own
class channel pasted into its box in input-image space (torchvision
``paste_masks_in_image``), probabilities (threshold at 0.5 for binary masks),
zero for padded detections.

    >>> import kdet
    >>> model = kdet.models.MaskRCNN(num_classes=1, image_size=512)   # doctest: +SKIP
    >>> model.compile()                                               # doctest: +SKIP
"""
import keras

from kdet.models.faster_rcnn import FasterRCNN


@keras.saving.register_keras_serializable(package="kdet")
class MaskRCNN(FasterRCNN):
    """Mask R-CNN R50-FPN (torchvision ``maskrcnn_resnet50_fpn`` / ``_v2``) as a Keras model.

    Arguments as :class:`FasterRCNN`; ``version=2`` adds BN (no bias) to the
    four mask-head convs (torchvision ``MaskRCNNHeads(norm_layer=BatchNorm2d)``).

    ``mask_batch_size_per_image``: foreground RoIs per image that train the
    mask head (default ``int(box_batch_size_per_image * box_positive_fraction)``,
    the most the RoI sampler can pick).
    """

    with_masks = True
