"""Read PyTorch ``.pth`` checkpoints without executing pickled code.

A ``.pth`` file is a pickle; unpickling an untrusted one can run arbitrary
code. ``read_pth`` therefore only ever calls
``torch.load(path, weights_only=True, map_location="cpu")``, whose restricted
unpickler accepts tensors, plain containers and numbers and nothing else. This
works for both on-disk formats: the zip format (torch >= 1.6) and the legacy
one (a bare pickle stream, e.g. torchvision's ``mobilenet_v2-b0353104.pth``).
A file that needs more (a pickled ``nn.Module``, a training state with custom
classes) is refused with an explanation instead of being loaded unsafely.

    >>> sd = read_pth("mobilenet_v2-b0353104.pth")  # doctest: +SKIP
    >>> sd["features.0.0.weight"].shape             # doctest: +SKIP
    (32, 3, 3, 3)
"""
import os
import pickle

import numpy as np

# Where training scripts nest the weights inside a checkpoint dict.
NESTED_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")


def _to_numpy(value):
    import torch  # noqa: F401  (only reached when torch is installed)

    if value.dtype.is_floating_point and value.dtype not in (torch.float32, torch.float64):
        value = value.float()  # bfloat16/float16 have no (exact) numpy twin
    return value.detach().cpu().numpy()


def _is_tensor(value):
    return hasattr(value, "detach") and hasattr(value, "dtype")


def _is_array(value):
    return _is_tensor(value) or isinstance(value, (np.ndarray, np.generic))


def unwrap_state_dict(obj, key=None, source="checkpoint"):
    """The ``{name: tensor}`` mapping inside a loaded checkpoint object.

    ``key`` picks a nested entry explicitly (``"state_dict_ema"``); otherwise
    a flat mapping of tensors is used as is, else the first of
    ``NESTED_KEYS`` present. A ``module.`` prefix (DataParallel) is removed.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a state_dict (a dict of tensors), got "
                         f"{type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise ValueError(f"{source}: no entry {key!r}; top-level keys: {sorted(obj)[:10]}")
        obj = obj[key]
    elif not any(_is_array(v) for v in obj.values()):
        nested = [k for k in NESTED_KEYS if isinstance(obj.get(k), dict)]
        if not nested:
            raise ValueError(f"{source}: holds no tensors and none of {NESTED_KEYS}; "
                             f"top-level keys: {sorted(obj)[:10]}")
        obj = obj[nested[0]]
    tensors = {k: v for k, v in obj.items() if _is_array(v)}
    if not tensors:
        raise ValueError(f"{source}: the selected entry holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def read_pth(path, key=None):
    """Load a ``.pth``/``.pt`` state_dict safely as ``{name: numpy array}``.

    Args:
        path: the checkpoint file.
        key: optional nested entry to use (``"state_dict_ema"`` of an effdet
            training checkpoint); by default the tensors at the top level, or
            under ``"state_dict"``/``"model"``.

    Raises:
        ValueError: the file is missing, is not a PyTorch checkpoint, or holds
            pickled objects other than tensors (then nothing is executed).
        ImportError: torch is not installed (any CPU wheel will do).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"read_pth: checkpoint file {path!r} does not exist")
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the machine
        raise ImportError(f"read_pth: reading {path!r} needs PyTorch (pip install torch; "
                          "the CPU wheel is enough). kdet never unpickles .pth files "
                          "itself.") from error
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"read_pth: {path!r} was refused by torch.load(weights_only=True): it pickles "
            "Python objects other than tensors (for example a whole nn.Module or a training "
            "state with custom classes), and loading it would execute code from the file. "
            "If you trust the file, re-save only its weights in an environment you trust: "
            "torch.save(obj.state_dict() or obj['model'], 'clean.pth'). "
            f"torch said: {str(error).splitlines()[0]}") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"read_pth: {path!r} is not a readable PyTorch checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0]})") from error
    tensors = unwrap_state_dict(obj, key=key, source=path)
    return {name: (_to_numpy(v) if _is_tensor(v) else np.asarray(v)) for name, v in tensors.items()}


def as_state_dict(source, key=None):
    """A path to a ``.pth`` file or an in-memory state_dict -> ``{name: numpy array}``."""
    if isinstance(source, (str, os.PathLike)):
        return read_pth(source, key=key)
    tensors = unwrap_state_dict(dict(source), key=key, source="state_dict")
    return {name: (_to_numpy(v) if _is_tensor(v) else np.asarray(v)) for name, v in tensors.items()}
