"""Shared fixtures.

torch/torchvision must be imported before TensorFlow/Keras in the same process
(the other order segfaults on the first torchvision op), so do it here first.
"""
import os
import pathlib

try:  # optional reference implementation
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    HAVE_TORCHVISION = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TORCHVISION = False

import numpy as np
import pytest

# In CI, a conformance test skipped for a missing reference fails the run.
from strict_references import (  # noqa: F401,E402  (pytest hooks)
    pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary)

if os.environ.get("KERAS_BACKEND") == "jax":
    # JAX 0.10 on CPU compiles each random initialiser shape in ~5 s with the
    # partitionable threefry; the classic one takes ~0.25 s. Tests never rely on
    # particular random draws, so the cheaper generator is safe here.
    import jax
    jax.config.update("jax_threefry_partitionable", False)

SHARED_DATA = pathlib.Path(
    os.environ.get("KDET_SHARED_DATA",
                   pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips when absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} "
                    "(set KDET_SHARED_DATA to run these tests)")
    return SHARED_DATA


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def load_benchmark(name):
    """``benchmarks/<name>.py`` imported as a module (benchmarks/ is no package)."""
    import importlib.util
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backend():
    import keras
    return keras.backend.backend()


def once_on_tensorflow(what):
    """Skip under any backend but TensorFlow a test whose result does not depend on the
    backend (``what`` says why): CI runs the suite on both, and the JAX copy would only
    repeat it, at XLA's compile cost."""
    return pytest.mark.skipif(
        os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow",
        reason=f"backend-independent ({what}): runs once, under TensorFlow")


@pytest.fixture(params=["native", "numpy"])
def evaluator_path(request, monkeypatch):
    """Runs a COCO evaluator test on the C kernels (kdet/metrics/_cocoeval.c) and on the
    numpy fallback (``KDET_NATIVE=0``). Without the built library the native run skips
    with "not installed", which CI (strict_references.py) turns into a failure."""
    from kdet.metrics import native
    if request.param == "native":
        monkeypatch.setenv("KDET_NATIVE", "1")
        if native.library() is None:
            pytest.skip("kdet's C evaluation kernels not installed: build them with "
                        "`pip install -e .` or `python setup.py build_ext --inplace`")
    else:
        monkeypatch.setenv("KDET_NATIVE", "0")
        assert native.library() is None
    return request.param
