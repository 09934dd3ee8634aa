"""Builds the C kernels of the COCO evaluator; every other setting is in pyproject.toml.

``kdet/metrics/_cocoeval.c`` uses no Python C API (kdet.metrics.native loads it with
ctypes), so the library does not depend on the Python version's ABI. Without a C
compiler the build fails; the evaluator itself also runs without the library (numpy).
"""
import sys

from setuptools import Extension, setup

# pycocotools' numbers bit for bit: no fused multiply-add, no fast-math reordering.
_FLAGS = [] if sys.platform == "win32" else [
    "-O2", "-std=c99", "-ffp-contract=off", "-fvisibility=hidden"]

setup(ext_modules=[Extension("kdet.metrics._cocoeval", ["kdet/metrics/_cocoeval.c"],
                             extra_compile_args=_FLAGS)])
