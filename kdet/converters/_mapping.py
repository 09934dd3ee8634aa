"""Rule tables that map kdet weights to checkpoint names, and the copy itself.

Every kdet weight has a Keras path (``"fpn/inner_block_0/conv/kernel"``):
the module part (``"fpn/inner_block_0/conv"``) plus the variable name
(``"kernel"``). A converter is a list of rules ``(regex, target)``; the first
regex that matches the module part gives the source module name (``target``
is a ``re`` template such as ``r"backbone.fpn.inner_blocks.\\1.0"`` or a
callable of the match), and a suffix table turns the variable name into the
source's (``kernel -> weight``, ``moving_variance -> running_var``). Adding a
model to a converter means adding rows, not code.

``copy_weights`` then reads every source array, converts its layout
(PyTorch OIHW kernels to Keras HWIO, depthwise ``(C, 1, kh, kw)`` to
``(kh, kw, C, 1)``, linear ``(out, in)`` to ``(in, out)``), checks shapes and
assigns. Missing sources and, in strict mode, unused source entries are
errors that name the weights involved.
"""
import re

import keras
import numpy as np

# Keras variable name -> PyTorch parameter/buffer name.
TORCH_SUFFIX = {
    "kernel": "weight", "bias": "bias",
    "gamma": "weight", "beta": "bias",
    "moving_mean": "running_mean", "moving_variance": "running_var",
    "edge_weights": "edge_weights",
}


def split_path(path):
    """``"fpn/p6/conv/kernel"`` -> ``("fpn/p6/conv", "kernel")``."""
    module, _, name = path.rpartition("/")
    return module, name


def model_variables(model, skip=()):
    """``{Keras path: variable}`` of ``model``, leaving out the layers in ``skip`` and the
    batch norms' statistics averages (kdet's training state, in no checkpoint)."""
    from kdet.layers.normalization import is_statistics_average

    skipped = {id(v) for layer in skip for v in layer.weights}
    out = {}
    for variable in model.weights:
        if id(variable) in skipped or is_statistics_average(variable):
            continue
        if variable.path in out:
            raise ValueError(f"two weights share the Keras path {variable.path!r}; the converter "
                             "cannot tell them apart")
        out[variable.path] = variable
    return out


def find_backbone(model):
    """The one nested ``keras.Model`` of a detector (its feature extractor).

    Looked for among the detector's own layers first, then inside them: R-CNN
    keeps its CNN in its RoI heads (``RCNNHeads.cnn``), since it runs on the
    warped crops rather than on the image.
    """
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not nested:
        nested = [layer for layer in model._flatten_layers(include_self=False, recursive=True)
                  if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"{model.name}: expected exactly one nested backbone model, found "
                         f"{[layer.name for layer in nested]}")
    return nested[0]


def resolve(rules, module, context=None):
    """Source module name for a Keras module path by the first matching rule, or None."""
    for pattern, target in rules:
        match = re.fullmatch(pattern, module)
        if match is None:
            continue
        if callable(target):
            return target(match, context)
        return match.expand(target)
    return None


def plan(variables, rules, suffix=TORCH_SUFFIX, context=None, owner="converter"):
    """``[(variable, source key)]`` for every variable; unmapped variables are errors."""
    pairs, unmapped = [], []
    for path, variable in variables.items():
        module, name = split_path(path)
        source = resolve(rules, module, context)
        if source is None or name not in suffix:
            unmapped.append(path)
            continue
        pairs.append((variable, f"{source}.{suffix[name]}" if suffix[name] else source))
    if unmapped:
        raise ValueError(f"{owner}: no source name for {len(unmapped)} kdet weights, first: "
                         f"{unmapped[:5]} (the model is not the architecture this converter "
                         "maps)")
    return pairs


def torch_to_keras(array, shape, key):
    """Re-lay a PyTorch array for a Keras variable of ``shape``."""
    array = np.asarray(array)
    shape = tuple(shape)
    if array.ndim == 4:
        out_ch, in_ch, kh, kw = array.shape
        if shape == (kh, kw, in_ch, out_ch):
            return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if in_ch == 1 and shape == (kh, kw, out_ch, 1):
            return array.transpose(2, 3, 0, 1)  # depthwise (C, 1, kh, kw) -> (kh, kw, C, 1)
    elif array.ndim == 2 and len(shape) == 2:
        return array.T  # Linear (out, in) -> Dense (in, out)
    elif array.shape == shape:
        return array
    raise ValueError(f"{key}: shape {array.shape} cannot be laid out as the kdet weight's "
                     f"{shape}")


def copy_weights(pairs, source, layout=torch_to_keras, owner="converter"):
    """Assign ``source[key]`` (re-laid by ``layout``) to each variable; returns the used keys."""
    missing = [key for _, key in pairs if key not in source]
    if missing:
        raise ValueError(f"{owner}: {len(missing)} weights missing from the checkpoint, first: "
                         f"{missing[:5]}")
    staged = []
    for variable, key in pairs:
        value = layout(source[key], variable.shape, key)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{owner}: {key} has shape {tuple(value.shape)} but kdet weight "
                             f"{variable.path} has {tuple(variable.shape)}")
        staged.append((variable, value))
    for variable, value in staged:  # only assign once everything matched
        variable.assign(np.asarray(value, dtype=variable.dtype))
    return [key for _, key in pairs]


def check_unused(source, used, ignore=(), owner="converter"):
    """Raise when ``source`` has entries that were not copied and match no ``ignore`` regex."""
    used = set(used)
    unused = [key for key in source if key not in used
              and not any(re.search(pattern, key) for pattern in ignore)]
    if unused:
        raise ValueError(f"{owner}: {len(unused)} checkpoint entries have no kdet weight, "
                         f"first: {unused[:5]} (pass strict=False to ignore them)")
