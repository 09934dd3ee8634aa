"""Builds the C kernels of the COCO evaluator; every other setting is in pyproject.toml.

``kdet/metrics/_cocoeval.c`` uses no Python C API (kdet.metrics.native loads it with
ctypes), so the library does not depend on the Python version's ABI;
``kdet/metrics/_records.c`` (result dicts to columns) uses only Python's stable ABI.
Both extensions are optional: without a C compiler pip warns and installs kdet without
them, and the evaluator runs its numpy / Python fallback (the same numbers, slower). In
CI a missing build fails tests/test_metrics_native.py::test_native_library_is_built and
tests/test_metrics_records.py.
"""
import sys

from setuptools import Extension, setup

# pycocotools' numbers bit for bit: no fused multiply-add, no fast-math reordering.
_FLAGS = [] if sys.platform == "win32" else [
    "-O2", "-std=c99", "-ffp-contract=off", "-fvisibility=hidden"]

setup(ext_modules=[
    Extension("kdet.metrics._kernels._cocoeval", ["kdet/metrics/_cocoeval.c"],
              extra_compile_args=_FLAGS, optional=True),
    # reads result dicts into columns; Python's stable ABI (one build for Python >= 3.10)
    Extension("kdet.metrics._records", ["kdet/metrics/_records.c"], py_limited_api=True,
              extra_compile_args=_FLAGS, optional=True),
])
