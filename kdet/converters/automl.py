"""automl (google/automl ``efficientdet``) TF checkpoints -> kdet ``EfficientDet``.

The released automl checkpoints (``efficientdet-d0.tar.gz`` ...) are
name-based TF checkpoints read with ``tf.train.load_checkpoint``. Their
variable names follow the TF1 graph of ``efficientdet_arch.py`` and
``backbone/efficientnet_model.py``:

* backbone: ``efficientnet-b0/stem/conv2d/kernel``,
  ``efficientnet-b0/blocks_<flat index>/{conv2d, conv2d_1, depthwise_conv2d,
  se/conv2d, se/conv2d_1, tpu_batch_normalization[_1|_2]}/...``
  (``efficientnet-lite<n>/...`` for lite);
* BiFPN: ``resample_p6/{conv2d,bn}/...``,
  ``fpn_cells/cell_<r>/fnode<i>/resample_<j>_<offset>_<#features>/{conv2d,bn}/...``,
  ``fpn_cells/cell_<r>/fnode<i>/WSM[_k]`` (one scalar per input, fast/softmax
  fusion), ``fpn_cells/cell_<r>/fnode<i>/op_after_combine<#features>/conv/
  {depthwise_kernel, pointwise_kernel, bias}`` and ``.../bn/...``;
* heads: ``class_net/class-<i>/{depthwise_kernel, pointwise_kernel, bias}``,
  ``class_net/class-<i>-bn-<level>/...``, ``class_net/class-predict/...``,
  and the same with ``box_net/box-``.

TF and Keras share kernel layouts, so weights copy unchanged (the ``WSM``
scalars of a node are stacked into kdet's ``edge_weights``). Exponential
moving averages (``<name>/ExponentialMovingAverage``, what automl evaluates)
are used when present.

This mapping is written from the automl source; it has been verified on
checkpoints written with exactly those names (see ``tests/test_converters.py``),
not on a downloaded release checkpoint.

    >>> model = build_automl("efficientdet-d0")                     # doctest: +SKIP
    >>> convert_automl("efficientdet-d0/model", model)              # doctest: +SKIP
"""
import os
import re

import keras
import numpy as np

from kdet.converters._mapping import copy_weights, find_backbone, model_variables, resolve

EMA_SUFFIX = "/ExponentialMovingAverage"

# timm block part -> automl layer name, for blocks with / without expansion.
_IR_PARTS = {"conv_pw": "conv2d", "bn1": "tpu_batch_normalization",
             "conv_dw": "depthwise_conv2d", "bn2": "tpu_batch_normalization_1",
             "se.conv_reduce": "se/conv2d", "se.conv_expand": "se/conv2d_1",
             "conv_pwl": "conv2d_1", "bn3": "tpu_batch_normalization_2"}
_DS_PARTS = {"conv_dw": "depthwise_conv2d", "bn1": "tpu_batch_normalization",
             "se.conv_reduce": "se/conv2d", "se.conv_expand": "se/conv2d_1",
             "conv_pw": "conv2d", "bn2": "tpu_batch_normalization_1"}
_TF_VARIABLE = {"kernel": "kernel", "bias": "bias", "gamma": "gamma", "beta": "beta",
                "moving_mean": "moving_mean", "moving_variance": "moving_variance"}


def _sep(prefix):
    """kdet separable conv parts -> TF ``separable_conv2d`` variables under ``prefix``."""
    return {"conv_dw/kernel": f"{prefix}/depthwise_kernel",
            "conv_pw/kernel": f"{prefix}/pointwise_kernel",
            "conv_pw/bias": f"{prefix}/bias",
            "conv/kernel": f"{prefix}/kernel", "conv/bias": f"{prefix}/bias"}


def _node_name(match, context):
    """``bifpn/cell_r_node_i/...`` -> automl name (str, or list for the fusion weights)."""
    cell, node, rest = int(match[1]), int(match[2]), match[3]
    levels = context["num_levels"]
    offsets = context["nodes"][node][1]
    scope = f"fpn_cells/cell_{cell}/fnode{node}"
    if rest == "combine/edge_weights":
        return [f"{scope}/WSM" + (f"_{k}" if k else "") for k in range(len(offsets))]
    resample = re.fullmatch(r"resample_(\d+)/conv/(conv|bn)/(\w+)", rest)
    if resample:
        j = int(resample[1])
        layer = "conv2d" if resample[2] == "conv" else "bn"
        return f"{scope}/resample_{j}_{offsets[j]}_{levels + node}/{layer}/{resample[3]}"
    after = f"{scope}/op_after_combine{levels + node}"
    if rest.startswith("conv/bn/"):
        return f"{after}/bn/{rest[len('conv/bn/'):]}"
    return _sep(f"{after}/conv").get(rest[len("conv/"):])


def _head_name(match, context):
    net, rest = match[1], match[2]
    short = "class" if net == "class_net" else "box"
    bn = re.fullmatch(r"bn_(\d+)_(\d+)/(\w+)", rest)
    if bn:
        level = context["min_level"] + int(bn[2])
        return f"{net}/{short}-{bn[1]}-bn-{level}/{bn[3]}"
    conv = re.fullmatch(r"conv_rep_(\d+)/(.+)", rest)
    if conv:
        return _sep(f"{net}/{short}-{conv[1]}").get(conv[2])
    if rest.startswith("predict/"):
        return _sep(f"{net}/{short}-predict").get(rest[len("predict/"):])
    return None


def _extra_name(match, context):
    layer = "conv2d" if match[2] == "conv" else "bn"
    return f"resample_p{match[1]}/{layer}/{match[3]}"


# Rules over full kdet variable paths (module + variable): the TF names
# depend on both.
AUTOML_RULES = (
    (r"bifpn/resample_p(\d+)/conv/(conv|bn)/(\w+)", _extra_name),
    (r"bifpn/cell_(\d+)_node_(\d+)/(.+)", _node_name),
    (r"(class_net|box_net)/(.+)", _head_name),
)


def _backbone_names(backbone, scope):
    """``{kdet variable path: automl name}`` for an EfficientNet(-Lite) backbone."""
    from kdet.backbones.efficientnet import timm_module_name

    layers = list(backbone._flatten_layers(include_self=False, recursive=True))
    all_names = {layer.name for layer in layers}
    timm = {layer.name: timm_module_name(layer.name, all_names) for layer in layers
            if layer.weights}
    blocks = sorted({tuple(int(x) for x in name.split(".")[1:3])
                     for name in timm.values() if name.startswith("blocks.")})
    flat = {block: index for index, block in enumerate(blocks)}
    expanded = {name.rsplit(".", 1)[0] for name in timm.values() if name.endswith(".conv_pwl")}
    from kdet.layers.normalization import is_statistics_average

    names = {}
    for variable in backbone.weights:
        if is_statistics_average(variable):
            continue  # kdet's training state, in no checkpoint
        layer, _, var = variable.path.rpartition("/")
        module = timm[layer.split("/")[-1]]
        if module in ("conv_stem", "bn1"):
            part = "stem/conv2d" if module == "conv_stem" else "stem/tpu_batch_normalization"
        else:
            stage, index, rest = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", module).groups()
            block = f"blocks.{stage}.{index}"
            parts = _IR_PARTS if block in expanded else _DS_PARTS
            part = f"blocks_{flat[(int(stage), int(index))]}/{parts[rest]}"
        var = _TF_VARIABLE[var]
        if var == "kernel" and part.endswith("depthwise_conv2d"):
            var = "depthwise_kernel"
        names[variable.path] = f"{scope}/{part}/{var}"
    return names


def backbone_scope(model):
    """automl scope of the backbone of a kdet EfficientDet: ``"efficientnet-b0"``, ...."""
    from kdet.models.efficientdet import EFFICIENTDET_CONFIGS

    variant = getattr(model, "variant", None)
    if variant not in EFFICIENTDET_CONFIGS:
        raise ValueError(f"automl converter: {model.name!r} is not a kdet EfficientDet")
    backbone = EFFICIENTDET_CONFIGS[variant]["backbone"]
    return f"efficientnet-{backbone}"


def automl_variable_names(model):
    """``{kdet variable path: automl checkpoint name}`` for a kdet ``EfficientDet``.

    The value is a list of names for the fast/softmax fusion weights (one
    ``WSM`` scalar per node input).
    """
    from kdet.layers.bifpn import bifpn_nodes

    backbone = find_backbone(model)
    bifpn = model.get_layer("bifpn")
    context = {"min_level": bifpn.min_level, "num_levels": len(bifpn.levels),
               "nodes": bifpn_nodes(bifpn.min_level, bifpn.max_level)}
    names = _backbone_names(backbone, backbone_scope(model))
    unmapped = []
    for path in model_variables(model, skip=[backbone]):
        name = resolve(AUTOML_RULES, path, context)
        if name is None:
            unmapped.append(path)
        else:
            names[path] = name
    if unmapped:
        raise ValueError(f"automl converter: no automl name for {len(unmapped)} kdet weights, "
                         f"first: {unmapped[:5]}")
    return names


class _CheckpointSource:
    """Dict-like view of a TF checkpoint (or a ``{name: array}`` dict), EMA-aware."""

    def __init__(self, source, use_ema):
        if isinstance(source, dict):
            self._get = lambda name: np.asarray(source[name])
            self.names = set(source)
        else:
            import tensorflow as tf

            path = os.fspath(source)
            if os.path.isdir(path):
                path = tf.train.latest_checkpoint(path) or path
            try:
                reader = tf.train.load_checkpoint(path)
            except Exception as error:  # TF raises several types for bad paths
                raise ValueError(f"convert_automl: cannot read a TF checkpoint at {path!r}: "
                                 f"{type(error).__name__}: {str(error).splitlines()[0]}") from error
            self._get = reader.get_tensor
            self.names = set(reader.get_variable_to_shape_map())
        self.use_ema = use_ema

    def resolve(self, name):
        if self.use_ema and name + EMA_SUFFIX in self.names:
            return name + EMA_SUFFIX
        return name if name in self.names else None

    def read(self, name):
        return np.asarray(self._get(self.resolve(name)))


def build_automl(name, num_classes=90, image_size=None, **kwargs):
    """kdet ``EfficientDet`` for an automl name (``"efficientdet-d0"``, ``"efficientdet-lite0"``).

    automl's COCO checkpoints have 90 classes; ``kwargs`` go to ``EfficientDet``.
    """
    from kdet.converters.effdet import build_effdet

    return build_effdet(name, num_classes=num_classes, image_size=image_size, **kwargs)


def _tf_layout(array, shape, key):
    array = np.asarray(array)
    if array.shape != tuple(shape):
        raise ValueError(f"{key}: shape {array.shape} does not match the kdet weight's "
                         f"{tuple(shape)}")
    return array


def convert_automl(source, model, use_ema=True, strict=True):
    """Copy an automl EfficientDet checkpoint into a kdet ``EfficientDet``; returns ``model``.

    Args:
        source: checkpoint prefix (``.../model.ckpt``), a directory with a
            ``checkpoint`` file, or a ``{name: array}`` dict.
        model: ``build_automl(name, num_classes=...)`` of the same variant.
        use_ema: read ``<name>/ExponentialMovingAverage`` where present (the
            weights automl evaluates and exports).
        strict: fail when checkpoint variables of the mapped scopes (backbone,
            ``resample_p*``, ``fpn_cells``, ``class_net``, ``box_net``) are left
            unused; optimizer slots and ``global_step`` are always ignored.
    """
    ckpt = _CheckpointSource(source, use_ema)
    names = automl_variable_names(model)
    missing = [n for name in names.values() for n in (name if isinstance(name, list) else [name])
               if ckpt.resolve(n) is None]
    if missing:
        raise ValueError(f"convert_automl: {len(missing)} variables missing from the checkpoint, "
                         f"first: {missing[:5]}")
    variables = {v.path: v for v in model.weights}
    values, pairs = {}, []
    for path, name in names.items():
        if isinstance(name, list):
            values[path] = np.stack([np.reshape(ckpt.read(n), ()) for n in name])
        else:
            values[path] = ckpt.read(name)
        pairs.append((variables[path], path))
    copy_weights(pairs, values, layout=_tf_layout, owner="convert_automl")
    if strict:
        used = {n for name in names.values() for n in (name if isinstance(name, list) else [name])}
        scopes = (backbone_scope(model) + "/", "resample_p", "fpn_cells/", "class_net/", "box_net/")
        unused = sorted(n for n in ckpt.names
                        if n.startswith(scopes) and not n.endswith(EMA_SUFFIX)
                        and n not in used and "/Momentum" not in n
                        and not n.startswith(backbone_scope(model) + "/head/"))
        if unused:
            raise ValueError(f"convert_automl: {len(unused)} checkpoint variables have no kdet "
                             f"weight, first: {unused[:5]} (pass strict=False to ignore them)")
    return model


def save_automl_checkpoint(model, prefix):
    """Write ``model``'s weights as an automl-named TF checkpoint at ``prefix``.

    The inverse of ``convert_automl`` (no EMA copies, no optimizer state):
    ``tf.train.load_checkpoint(prefix)`` lists exactly the names automl's
    graph creates. Returns ``prefix``.
    """
    import tensorflow as tf

    values = {}
    variables = {v.path: v for v in model.weights}
    for path, name in automl_variable_names(model).items():
        array = keras.ops.convert_to_numpy(variables[path])
        if isinstance(name, list):
            values.update({n: array[k] for k, n in enumerate(name)})
        else:
            values[name] = array
    names = sorted(values)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tf.raw_ops.SaveV2(prefix=os.fspath(prefix), tensor_names=names,
                      shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[n].astype("float32")) for n in names])
    return prefix
