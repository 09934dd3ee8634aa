"""Lazy re-exports for package ``__init__`` files.

Each package lists ``name -> module`` once; attributes import on first use, so
importing one part (say ``kdet.ops``) never drags in heavy siblings.
"""
import importlib


def lazy_exports(package, exports):
    """Return ``(__getattr__, __dir__)`` resolving ``exports`` lazily."""

    def __getattr__(name):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(exports)

    return __getattr__, __dir__
