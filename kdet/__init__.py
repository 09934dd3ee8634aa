"""kdet: a Keras 3 model zoo for object detection.

Submodules are imported lazily so that ``import kdet`` stays cheap and so that
TensorFlow-only parts (``kdet.data``, ``kdet.export``) are not pulled in on the
JAX backend unless asked for.

    >>> import kdet
    >>> kdet.boxes.pairwise_iou  # doctest: +ELLIPSIS
    <function pairwise_iou at ...>
"""
import importlib
import os

# TensorFlow's default CPU allocator takes each tensor from malloc, which maps a large one
# fresh and unmaps it when it is freed, so every training step faults its pages in again:
# 45 % of a Mask R-CNN step's CPU time at batch 4, 800 px went to the kernel (29 of 65
# CPU s). The BFC allocator keeps the pages and reuses them (the step: 34 CPU s). TensorFlow
# reads this when it makes its first CPU tensor; a value the user set is kept ("false":
# malloc). docs/training.md, "CPU memory".
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

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
