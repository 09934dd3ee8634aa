"""Export detectors to SavedModel, LiteRT (TFLite) and ONNX with post-processing inside.

TensorFlow-backend only (the graphs are TF graphs); :class:`LiteRTDetector`
runs the ``.tflite`` files with ``ai_edge_litert`` alone.
"""
from kdet._lazy import lazy_exports

_EXPORTS = {
    "export": ".dispatch", "serving_function": ".core",
    "export_saved_model": ".saved_model",
    "export_litert": ".litert", "LiteRTDetector": ".litert",
    "export_onnx": ".onnx", "match_detections": ".compare",
    "PostprocessSettings": ".postprocess", "settings_from_model": ".postprocess",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
