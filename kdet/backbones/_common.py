"""Pieces shared by the backbones: norm choice, feature-dict models, weight loading.

Every backbone is a functional ``keras.Model`` whose output is a dict of
feature maps keyed ``"C1"`` .. ``"C5"``, ``"Cn"`` having stride ``2**n``.
Layers carry the names of the reference implementation's modules
(``"layer1.0.conv1"`` for torchvision, ``"blocks.1.0.conv_pw"`` for timm), so
a PyTorch ``state_dict`` maps onto them by name: ``load_torch_state_dict``.
"""
import os

import keras
import numpy as np

NORMS = ("batch", "frozen_batch")


def conv_initializer():
    """He-normal over fan-out, as torchvision and timm initialise their convs."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out",
                                              distribution="untruncated_normal")


def check_norm(norm, owner):
    if norm not in NORMS:
        raise ValueError(f"{owner}: norm must be one of {NORMS}, got {norm!r}")
    return norm


def make_norm(norm, epsilon, momentum, name):
    """``"batch"`` -> ``BatchNormalization``; ``"frozen_batch"`` -> constants only
    (:func:`kdet.layers.conv_norm_act.make_norm` with the backbones' choices).

    ``momentum`` is in Keras terms (PyTorch's 0.1 is Keras' 0.9).
    """
    from kdet.layers.conv_norm_act import make_norm as make_layer_norm

    check_norm(norm, name)
    return make_layer_norm(norm, bn_epsilon=epsilon, bn_momentum=momentum, groups=None,
                           group_epsilon=None, dtype=None, name=name)


def check_return_levels(return_levels, available, owner):
    """Validate ``return_levels`` (ints, a subset of ``available``); sorted tuple."""
    try:
        levels = tuple(sorted({int(level) for level in return_levels}))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{owner}: return_levels must be a sequence of ints, "
                         f"got {return_levels!r}") from error
    if not levels:
        raise ValueError(f"{owner}: return_levels must not be empty")
    unknown = [level for level in levels if level not in available]
    if unknown:
        raise ValueError(f"{owner}: return_levels {unknown} not available; choose from "
                         f"{tuple(available)}")
    return levels


def feature_model(inputs, features, return_levels, name):
    """Functional model returning ``{"C<n>": features[n]}`` for the requested levels."""
    outputs = {f"C{level}": features[level] for level in return_levels}
    return keras.Model(inputs, outputs, name=name)


def load_weights_file(model, weights, owner):
    """``weights=None`` leaves the initialisation; a path loads a Keras ``.weights.h5``."""
    if weights is None:
        return model
    path = os.fspath(weights)
    if not path.endswith(".weights.h5"):
        raise ValueError(f"{owner}: weights must be None or a path to a Keras '.weights.h5' "
                         f"file (nothing is downloaded), got {weights!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{owner}: weights file {path!r} does not exist")
    model.load_weights(path)
    return model


# --- PyTorch state_dict -> Keras -------------------------------------------

# Keras variable name -> PyTorch parameter/buffer suffix.
_TORCH_SUFFIX = {
    "kernel": "weight", "bias": "bias",
    "gamma": "weight", "beta": "bias",
    "moving_mean": "running_mean", "moving_variance": "running_var",
}


def _as_numpy(value):
    if hasattr(value, "detach"):  # a torch.Tensor; no torch import needed here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _to_keras_layout(layer, var_name, array):
    if var_name != "kernel":
        return array
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return array.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, keras.layers.Conv2D):
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if isinstance(layer, keras.layers.Dense):
        return array.T  # (out, in) -> (in, out)
    raise ValueError(f"load_torch_state_dict: no kernel layout rule for layer "
                     f"{layer.name!r} ({type(layer).__name__})")


def load_torch_state_dict(model, state_dict, torch_name=None, prefix="", strict=True):
    """Copy a PyTorch ``state_dict`` into ``model``, matching layers by name.

    Args:
        model: a Keras model whose weighted layers are named like the PyTorch
            modules (after ``torch_name``).
        state_dict: mapping ``name -> array`` (numpy arrays or CPU torch
            tensors), e.g. ``torchvision.models.resnet50().state_dict()``.
        torch_name: maps a Keras layer name to its PyTorch module name, or
            ``None`` to skip the layer; identity when omitted.
        prefix: prepended to every PyTorch name (``"backbone.body."`` for a
            torchvision detector checkpoint).
        strict: raise when a Keras weight has no entry or when an entry under
            ``prefix`` for a mapped module is left unused (``num_batches_tracked``
            and modules the model does not build, such as ``fc``, are fine).

    Returns:
        The list of ``state_dict`` keys that were copied.
    """
    from kdet.layers.normalization import is_statistics_average

    torch_name = torch_name or (lambda name: name)
    state = {key: value for key, value in state_dict.items()}
    used, missing = [], []
    modules = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not layer.weights or isinstance(layer, keras.Model):
            continue
        module = torch_name(layer.name)
        if module is None:
            continue
        modules.add(prefix + module)
        for variable in layer.weights:
            var_name = variable.name.split("/")[-1]
            if is_statistics_average(variable):
                continue  # kdet's training state (the EMA of the BN statistics)
            if var_name not in _TORCH_SUFFIX:
                raise ValueError(f"load_torch_state_dict: layer {layer.name!r} has variable "
                                 f"{var_name!r} with no PyTorch counterpart")
            key = f"{prefix}{module}.{_TORCH_SUFFIX[var_name]}"
            if key not in state:
                missing.append(key)
                continue
            array = _to_keras_layout(layer, var_name, _as_numpy(state[key]))
            if tuple(array.shape) != tuple(variable.shape):
                raise ValueError(f"load_torch_state_dict: {key} has shape {array.shape} "
                                 f"(Keras layout) but {layer.name}/{var_name} expects "
                                 f"{tuple(variable.shape)}")
            variable.assign(array.astype(variable.dtype))
            used.append(key)
    if strict:
        if missing:
            raise ValueError(f"load_torch_state_dict: {len(missing)} weights missing from the "
                             f"state_dict, first: {missing[:5]}")
        used_set = set(used)
        unused = [key for key in state
                  if key.rsplit(".", 1)[0] in modules and key not in used_set
                  and not key.endswith("num_batches_tracked")]
        if unused:
            raise ValueError(f"load_torch_state_dict: {len(unused)} state_dict entries of "
                             f"loaded modules were not used, first: {unused[:5]}")
    return used
