"""Feature extractors returning multi-scale features (C2..C5 / strides 4..32)."""
from kdet._lazy import lazy_exports

_EXPORTS = {
    "ResNet": ".resnet", "resnet50": ".resnet", "resnet101": ".resnet",
    "EfficientNet": ".efficientnet", "EfficientNetLite": ".efficientnet",
    "MobileNetV2": ".mobilenet",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
