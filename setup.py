"""Builds the C kernels of the COCO evaluator; every other setting is in pyproject.toml.

``kdet/metrics/_cocoeval.c`` uses no Python C API (kdet.metrics.native loads it with
ctypes), so the library does not depend on the Python version's ABI. The extension is
optional: without a C compiler pip warns and installs kdet without it, and the
evaluator runs its numpy fallback (the same numbers, slower). In CI a missing library
fails tests/test_metrics_native.py::test_native_library_is_built.
"""
import sys

from setuptools import Extension, setup

# pycocotools' numbers bit for bit: no fused multiply-add, no fast-math reordering.
_FLAGS = [] if sys.platform == "win32" else [
    "-O2", "-std=c99", "-ffp-contract=off", "-fvisibility=hidden"]

setup(ext_modules=[Extension("kdet.metrics._kernels._cocoeval", ["kdet/metrics/_cocoeval.c"],
                             extra_compile_args=_FLAGS, optional=True)])
