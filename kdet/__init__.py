"""kdet: a Keras 3 model zoo for object detection.

Submodules are imported lazily so that ``import kdet`` stays cheap and so that
TensorFlow-only parts (``kdet.data``, ``kdet.export``) are not pulled in on the
JAX backend unless asked for.

    >>> import kdet
    >>> kdet.boxes.pairwise_iou  # doctest: +ELLIPSIS
    <function pairwise_iou at ...>
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "anchors", "backbones", "boxes", "converters", "data", "export", "layers", "losses",
    "matching", "metrics", "models", "ops", "optimizers", "utils", "zoo", "cli",
)


def load_model(path, safe_mode=True, **kwargs):
    """Load a kdet ``.keras`` file (registers kdet's classes first).

    ``keras.saving.load_model`` only finds kdet's models and layers once their
    modules are imported; this imports them, then loads.
    """
    import keras
    for package in ("kdet.models", "kdet.layers"):
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", ()):
            getattr(module, name)
    importlib.import_module("kdet.anchors")
    importlib.import_module("kdet.optimizers")
    return keras.saving.load_model(path, safe_mode=safe_mode, **kwargs)


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"kdet.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'kdet' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
