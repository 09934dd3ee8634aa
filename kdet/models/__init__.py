"""Detection models: functional Keras models with loss and decoding built in."""
from kdet._lazy import lazy_exports

_EXPORTS = {
    "DenseDetector": ".detector", "resize_and_pad": ".detector",
    "EfficientDet": ".efficientdet", "EfficientDetLite": ".efficientdet",
    "EFFICIENTDET_CONFIGS": ".efficientdet",
    "RetinaNet": ".retinanet",
    "FasterRCNN": ".faster_rcnn", "MaskRCNN": ".mask_rcnn",
    "FastRCNN": ".fast_rcnn", "RCNN": ".rcnn",
    "KeypointRCNN": ".keypoint_rcnn",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
