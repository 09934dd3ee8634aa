"""effdet (timm, Ross Wightman) EfficientDet checkpoints -> kdet ``EfficientDet``.

effdet's ``tf_efficientdet_*`` models are ports of the automl TF models and
have exactly kdet's structure: ``backbone.*`` is a timm ``tf_efficientnet``
(loaded by ``kdet.backbones.efficientnet.load_timm_state_dict``),
``fpn.*`` the BiFPN, ``class_net.*``/``box_net.*`` the heads. The rule rows
below map the rest. Two details of effdet's naming need the model itself:

* a node's resampling convs are keyed by the *input offset* in effdet
  (``fpn.cell.0.fnode.1.combine.resample.2``) and by the input position in
  kdet (``bifpn/cell_0_node_1/resample_0``): ``kdet.layers.bifpn.bifpn_nodes``
  gives the offsets;
* the head BNs are ``bn_rep.<repeat>.<level>.bn`` in the released weights,
  ``bn_rep.<level>.<repeat>`` after effdet's ``toggle_bn_level_first`` (both
  read).

The heads' channel layout needs no permutation: both frameworks flatten a
level's ``[H, W, A * K]`` output as (y, x, anchor, k), with anchors ordered
octave-major over the aspect ratios, and the box net predicts
``(ty, tx, th, tw)``, the order kdet's EfficientDet ``BoxCoder`` decodes.

    >>> model = build_effdet("tf_efficientdet_d0")                      # doctest: +SKIP
    >>> convert_effdet("tf_efficientdet_d0_34-f153e0cf.pth", model)     # doctest: +SKIP
"""
import re

from kdet.converters._mapping import (check_unused, copy_weights, find_backbone,
                                      model_variables, plan)
from kdet.converters._pth import as_state_dict


def _node_resample(match, context):
    cell, node, position, part = int(match[1]), int(match[2]), int(match[3]), match[4]
    offset = context["nodes"][node][1][position]
    return f"fpn.cell.{cell}.fnode.{node}.combine.resample.{offset}.conv.{part}"


def _extra_resample(match, context):
    return f"fpn.resample.{int(match[1]) - context['min_level']}.conv.{match[2]}"


EFFDET_RULES = (
    (r"bifpn/resample_p(\d+)/conv/(conv|bn)", _extra_resample),
    (r"bifpn/cell_(\d+)_node_(\d+)/resample_(\d+)/conv/(conv|bn)", _node_resample),
    (r"bifpn/cell_(\d+)_node_(\d+)/combine", r"fpn.cell.\1.fnode.\2.combine"),
    (r"bifpn/cell_(\d+)_node_(\d+)/conv/(conv_dw|conv_pw|conv|bn)",
     r"fpn.cell.\1.fnode.\2.after_combine.conv.\3"),
    (r"(class_net|box_net)/conv_rep_(\d+)/(conv_dw|conv_pw|conv)", r"\1.conv_rep.\2.\3"),
    (r"(class_net|box_net)/bn_(\d+)_(\d+)", r"\1.bn_rep.\2.\3.bn"),
    (r"(class_net|box_net)/predict/(conv_dw|conv_pw|conv)", r"\1.predict.\2"),
)

IGNORED = (r"num_batches_tracked$", r"^backbone\.(conv_head|bn2|classifier)\.")

_LEVEL_FIRST_BN = re.compile(r"^(class_net|box_net)\.bn_rep\.(\d+)\.(\d+)\.(\w+)$")


def repeat_first_head_bn(state_dict):
    """Head BNs ``bn_rep.<level>.<repeat>.*`` -> ``bn_rep.<repeat>.<level>.bn.*``."""
    out = {}
    for key, value in state_dict.items():
        match = _LEVEL_FIRST_BN.match(key)
        if match:
            key = f"{match[1]}.bn_rep.{match[3]}.{match[2]}.bn.{match[4]}"
        out[key] = value
    return out


def effdet_variant(name):
    """``"tf_efficientdet_d0"`` / ``"efficientdet-lite0"`` / ``"d7x"`` -> kdet variant ``"d0"``."""
    from kdet.models.efficientdet import EFFICIENTDET_CONFIGS

    text = str(name).lower()
    for prefix in ("tf_efficientdet_", "efficientdet-", "efficientdet_"):
        if text.startswith(prefix):
            if prefix == "efficientdet_":
                raise ValueError(
                    f"{name!r} is an effdet PyTorch-native model (symmetric padding, no "
                    "redundant biases); kdet reproduces the TF-compatible 'tf_efficientdet_*' "
                    "models only")
            text = text[len(prefix):]
    if text.isdigit() or text == "7x":
        text = "d" + text
    if text not in EFFICIENTDET_CONFIGS:
        raise ValueError(f"unknown EfficientDet variant {name!r}; known: "
                         f"{sorted(EFFICIENTDET_CONFIGS)}")
    return text


def build_effdet(name, num_classes=90, image_size=None, **kwargs):
    """kdet ``EfficientDet`` for an effdet name (``"tf_efficientdet_d0"``, ``"..._lite0"``).

    ``num_classes`` defaults to COCO's 90 (effdet/automl); ``image_size``
    defaults to the variant's resolution; other ``kwargs`` go to
    ``EfficientDet``.
    """
    from kdet.models.efficientdet import EfficientDet

    return EfficientDet(phi=effdet_variant(name), num_classes=num_classes,
                        image_size=image_size, **kwargs)


def _context(model):
    from kdet.layers.bifpn import bifpn_nodes

    bifpn = model.get_layer("bifpn")
    return {"min_level": bifpn.min_level,
            "nodes": bifpn_nodes(bifpn.min_level, bifpn.max_level)}


def convert_effdet(source, model, strict=True):
    """Copy an effdet EfficientDet checkpoint into a kdet ``EfficientDet``; returns ``model``.

    Args:
        source: path to an effdet ``.pth`` (read with ``weights_only=True``;
            training checkpoints' ``state_dict`` entry is used) or a state_dict.
        model: ``build_effdet(name, num_classes=...)`` of the same variant.
        strict: also fail on unused checkpoint entries.
    """
    from kdet.backbones.efficientnet import load_timm_state_dict

    state = repeat_first_head_bn(as_state_dict(source))
    owner = f"convert_effdet[{model.name}]"
    backbone = find_backbone(model)
    used = load_timm_state_dict(backbone, state, prefix="backbone.", strict=strict)
    pairs = plan(model_variables(model, skip=[backbone]), EFFDET_RULES, context=_context(model),
                 owner=owner)
    used += copy_weights(pairs, state, owner=owner)
    if strict:
        check_unused(state, used, IGNORED, owner=owner)
    return model
