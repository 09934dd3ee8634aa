"""Every example in kdet's docstrings runs and prints what it says (doctest)."""
import doctest
import importlib
import pkgutil

import keras
import pytest

import kdet

# Modules whose examples build TensorFlow graphs or tf.data pipelines.
TF_ONLY = ("kdet.data", "kdet.export", "kdet.workflow", "kdet.training", "kdet.metrics.callbacks")


def _modules():
    return sorted(m.name for m in pkgutil.walk_packages(kdet.__path__, "kdet.")
                  if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    if keras.backend.backend() != "tensorflow" and name.startswith(TF_ONLY):
        pytest.skip(f"{name}: its examples use TensorFlow (tf.data / TF graphs)")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
