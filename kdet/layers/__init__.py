"""Keras layers shared by the detectors."""
from kdet._lazy import lazy_exports

_EXPORTS = {
    "Activation": ".activation", "Conv2D": ".conv", "Dense": ".dense",
    "ConvNormAct": ".conv_norm_act", "SeparableConvNormAct": ".conv_norm_act",
    "BatchNormalization": ".normalization", "FrozenBatchNormalization": ".normalization",
    "ImageNormalization": ".normalization", "DepthwiseConv2D": ".depthwise",
    "average_batch_norm_statistics": ".normalization", "averaged_batch_norms": ".normalization",
    "FPN": ".fpn", "BiFPN": ".bifpn", "WeightedFusion": ".bifpn", "ResampleFeature": ".bifpn",
    "EfficientDetHead": ".heads", "RetinaNetHead": ".heads",
    "DetectionDecoder": ".detection_decoder",
    "RoIAlign": ".roi", "RoIPool": ".roi", "MultiLevelRoIAlign": ".roi",
    "RPNHead": ".rpn", "ProposalGenerator": ".rpn",
    "TwoMLPHead": ".roi_heads", "FastRCNNPredictor": ".roi_heads", "MaskRCNNHead": ".roi_heads",
    "RoIHeads": ".roi_heads", "ResNetRoIHead": ".roi_heads",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
