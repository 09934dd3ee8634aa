"""Detection metrics: COCO (equal to pycocotools) and Pascal VOC, plus a Keras callback."""
from kdet._lazy import lazy_exports

_EXPORTS = {
    "COCOEvaluator": ".coco", "VOCEvaluator": ".voc", "COCOEvalCallback": ".callbacks",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
