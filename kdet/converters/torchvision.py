"""torchvision detection checkpoints -> kdet models.

torchvision's detectors share one layout: ``backbone.body.*`` (a ResNet,
loaded by ``kdet.backbones.resnet.load_torchvision_state_dict``),
``backbone.fpn.*`` (``FeaturePyramidNetwork``) and a model-specific head
(``head.*`` for RetinaNet; ``rpn.*`` and ``roi_heads.*`` for Faster/Mask/
Keypoint R-CNN). ``TORCHVISION_ARCHITECTURES`` holds one entry per
torchvision builder: the kdet builder and its arguments, the rule rows
for the non-backbone parts, and the backbone's key prefix (``backbone.body.``
unless ``backbone_prefix`` says otherwise). A new detector is a new entry (its FPN rows are
shared), not new code.

    >>> import kdet.converters as C                                      # doctest: +SKIP
    >>> model = C.build_torchvision("retinanet_resnet50_fpn_v2")          # doctest: +SKIP
    >>> C.convert_torchvision("retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
    ...                       model)                                       # doctest: +SKIP

Checkpoints saved before torchvision 0.13 (``retinanet_resnet50_fpn_coco``
among them) use older module names; ``upgrade_legacy_keys`` renames them the
way torchvision's own ``_load_from_state_dict`` hooks do.
"""
import re

from kdet.converters._mapping import (check_unused, copy_weights, find_backbone,
                                      model_variables, plan)
from kdet.converters._pth import as_state_dict

# backbone.fpn.*: torchvision FeaturePyramidNetwork (Conv2dNormActivation
# blocks: ".0" conv, ".1" norm when the FPN has one) and LastLevelP6P7.
FPN_RULES = (
    (r"fpn/inner_block_(\d+)/conv", r"backbone.fpn.inner_blocks.\1.0"),
    (r"fpn/inner_block_(\d+)/(?:bn|gn)", r"backbone.fpn.inner_blocks.\1.1"),
    (r"fpn/layer_block_(\d+)/conv", r"backbone.fpn.layer_blocks.\1.0"),
    (r"fpn/layer_block_(\d+)/(?:bn|gn)", r"backbone.fpn.layer_blocks.\1.1"),
    (r"fpn/(p6|p7)/conv", r"backbone.fpn.extra_blocks.\1"),
)

# head.*: torchvision RetinaNetHead (v1: conv + bias; v2: conv + GroupNorm).
RETINANET_HEAD_RULES = (
    (r"head/classification_conv_(\d+)/conv", r"head.classification_head.conv.\1.0"),
    (r"head/classification_conv_(\d+)/(?:gn|bn)", r"head.classification_head.conv.\1.1"),
    (r"head/cls_logits/conv", r"head.classification_head.cls_logits"),
    (r"head/regression_conv_(\d+)/conv", r"head.regression_head.conv.\1.0"),
    (r"head/regression_conv_(\d+)/(?:gn|bn)", r"head.regression_head.conv.\1.1"),
    (r"head/bbox_reg/conv", r"head.regression_head.bbox_reg"),
)

# rpn.* and roi_heads.*: torchvision RPNHead (conv is a Conv2dNormActivation
# without norm: ".0.0"), TwoMLPHead, FastRCNNPredictor, MaskRCNNHeads
# (Conv2dNormActivation blocks ".i.0") and MaskRCNNPredictor.
RCNN_RULES = (
    (r"rpn_head/conv", r"rpn.head.conv.0.0"),
    (r"rpn_head/(cls_logits|bbox_pred)", r"rpn.head.\1"),
    (r"roi_heads/box_head/(fc6|fc7)", r"roi_heads.box_head.\1"),
    (r"roi_heads/box_predictor/(cls_score|bbox_pred)", r"roi_heads.box_predictor.\1"),
)
MASK_RCNN_RULES = (
    (r"roi_heads/mask_head/mask_fcn(\d+)", r"roi_heads.mask_head.\1.0"),
    (r"roi_heads/mask_head/mask_bn(\d+)", r"roi_heads.mask_head.\1.1"),
    (r"roi_heads/mask_head/(conv5_mask|mask_fcn_logits)", r"roi_heads.mask_predictor.\1"),
)

# The _v2 builders: RPNHead(conv_depth=2) ("conv", "conv1" -> conv.0.0, conv.1.0) and
# FastRCNNConvFCHead, an nn.Sequential of 4 Conv2dNormActivation (".i.0" conv,
# ".i.1" BN), Flatten (index 4), then Linear/ReLU pairs (Linear j at 5 + 2 j).
RCNN_V2_RULES = (
    (r"rpn_head/conv(\d+)", r"rpn.head.conv.\1.0"),
    (r"roi_heads/box_head/conv(\d+)", r"roi_heads.box_head.\1.0"),
    (r"roi_heads/box_head/bn(\d+)", r"roi_heads.box_head.\1.1"),
    (r"roi_heads/box_head/fc(\d+)", lambda m, _: f"roi_heads.box_head.{5 + 2 * int(m[1])}"),
)

# Faster R-CNN C4: the box head is nn.Sequential(resnet.layer4, AdaptiveAvgPool2d, Flatten),
# so res5's blocks are roi_heads.box_head.0.{i}.* (kdet's ResNetRoIHead names them layer4.{i}.*).
RES5_HEAD_RULES = (
    (r"roi_heads/box_head/layer4\.(\d+)\.(.+)", r"roi_heads.box_head.0.\1.\2"),
)

# roi_heads.keypoint_head is a Sequential(conv, ReLU, conv, ReLU, ...): conv i is entry 2i.
KEYPOINT_RCNN_RULES = (
    (r"roi_heads/keypoint_head/keypoint_fcn(\d+)",
     lambda match, _: f"roi_heads.keypoint_head.{2 * int(match[1])}"),
    (r"roi_heads/keypoint_head/kps_score_lowres", r"roi_heads.keypoint_predictor.kps_score_lowres"),
)

# torchvision builder -> kdet builder, its arguments, and the rule rows.
# "backbone_eps" reproduces torchvision's overwrite_eps(model, 0.0), which its
# v1 COCO weights were trained and evaluated with (FrozenBatchNorm2d, eps 0).
TORCHVISION_ARCHITECTURES = {
    "retinanet_resnet50_fpn": dict(
        builder="kdet.models.RetinaNet",
        kwargs=dict(backbone="resnet50", version=1, num_classes=91, backbone_norm="frozen_batch"),
        backbone_eps=0.0, rules=FPN_RULES + RETINANET_HEAD_RULES),
    "retinanet_resnet50_fpn_v2": dict(
        builder="kdet.models.RetinaNet",
        kwargs=dict(backbone="resnet50", version=2, num_classes=91, backbone_norm="batch"),
        backbone_eps=None, rules=FPN_RULES + RETINANET_HEAD_RULES),
    # kdet counts foreground classes: torchvision's 91 (background + 90) is 90.
    "fasterrcnn_resnet50_fpn": dict(
        builder="kdet.models.FasterRCNN",
        kwargs=dict(backbone="resnet50", version=1, num_classes=90, backbone_norm="frozen_batch",
                    trainable_backbone_layers=3),
        backbone_eps=0.0, rules=FPN_RULES + RCNN_RULES),
    "maskrcnn_resnet50_fpn": dict(
        builder="kdet.models.MaskRCNN",
        kwargs=dict(backbone="resnet50", version=1, num_classes=90, backbone_norm="frozen_batch",
                    trainable_backbone_layers=3),
        backbone_eps=0.0, rules=FPN_RULES + RCNN_RULES + MASK_RCNN_RULES),
    # torchvision's num_classes=2 (background + person) is kdet's 1.
    "keypointrcnn_resnet50_fpn": dict(
        builder="kdet.models.KeypointRCNN",
        kwargs=dict(backbone="resnet50", version=1, num_classes=1, num_keypoints=17,
                    backbone_norm="frozen_batch", trainable_backbone_layers=3),
        backbone_eps=0.0, rules=FPN_RULES + RCNN_RULES + KEYPOINT_RCNN_RULES),
    # _v2: the ResNet keeps BatchNorm2d even in the pretrained builders.
    "fasterrcnn_resnet50_fpn_v2": dict(
        builder="kdet.models.FasterRCNN",
        kwargs=dict(backbone="resnet50", version=2, num_classes=90, backbone_norm="batch",
                    trainable_backbone_layers=3),
        backbone_eps=None, rules=FPN_RULES + RCNN_RULES + RCNN_V2_RULES),
    "maskrcnn_resnet50_fpn_v2": dict(
        builder="kdet.models.MaskRCNN",
        kwargs=dict(backbone="resnet50", version=2, num_classes=90, backbone_norm="batch",
                    trainable_backbone_layers=3),
        backbone_eps=None, rules=FPN_RULES + RCNN_RULES + RCNN_V2_RULES + MASK_RCNN_RULES),
    # torchvision has no C4 builder: this is torchvision.models.detection.FasterRCNN on an
    # IntermediateLayerGetter(resnet50(norm_layer=FrozenBatchNorm2d), {"layer3": "0"}) body
    # (keys "backbone.*", no ".body"), anchors ((128, 256, 512),) x (0.5, 1, 2),
    # MultiScaleRoIAlign(["0"], 14, 2), box head nn.Sequential(resnet.layer4,
    # AdaptiveAvgPool2d(1), Flatten()) and FastRCNNPredictor(2048, 91): see
    # kdet.models.FasterRCNN(fpn=False) and tests/test_faster_rcnn_c4.py.
    # backbone_norm="batch" maps the BatchNorm2d variant.
    "fasterrcnn_resnet50_c4": dict(
        builder="kdet.models.FasterRCNN",
        kwargs=dict(backbone="resnet50", fpn=False, num_classes=90,
                    backbone_norm="frozen_batch", trainable_backbone_layers=3),
        backbone_eps=None, backbone_prefix="backbone.", rules=RCNN_RULES + RES5_HEAD_RULES),
}

# torchvision has no MobileNetV2-FPN builders either: these are its detector classes over
# BackboneWithFPN(mobilenet_v2().features, {"3", "6", "13", "18"} -> C2..C5 (RetinaNet: C3..C5,
# LastLevelP6P7(256, 256)), 256 channels), with its default anchors and RoIAlign -- the
# models of the torchvision tutorial with an FPN, which kdet's backbone="mobilenet_v2" builds
# (benchmarks/train_parity.py trains both). IntermediateLayerGetter keeps the children's
# names, so torchvision's features.N is backbone.body.N; BatchNorm2d trains (eps 1e-5).
TORCHVISION_ARCHITECTURES.update({
    f"{model.lower()}_mobilenet_v2_fpn": dict(
        builder=f"kdet.models.{model}",
        kwargs=dict(backbone="mobilenet_v2", version=1, backbone_norm="batch",
                    num_classes=91 if model == "RetinaNet" else 90),
        backbone_eps=None, rules=rules)
    for model, rules in (("RetinaNet", FPN_RULES + RETINANET_HEAD_RULES),
                         ("FasterRCNN", FPN_RULES + RCNN_RULES),
                         ("MaskRCNN", FPN_RULES + RCNN_RULES + MASK_RCNN_RULES))})


def _known_models():
    """kdet model class -> {(backbone, version or "c4" for fpn=False): architecture}."""
    known = {}
    for name, spec in TORCHVISION_ARCHITECTURES.items():
        kwargs = spec["kwargs"]
        key = kwargs.get("version", 1) if kwargs.get("fpn", True) else "c4"
        known.setdefault(spec["builder"].rsplit(".", 1)[1], {})[(kwargs["backbone"], key)] = name
    return known


_KNOWN_MODELS = _known_models()

# Entries a torchvision checkpoint may hold that no kdet weight takes.
IGNORED = (r"num_batches_tracked$", r"^backbone\.body\.fc\.")

# torchvision < 0.13 names -> current names (FeaturePyramidNetwork and
# RetinaNet heads gained Conv2dNormActivation wrappers: ".i" -> ".i.0";
# the RetinaNet heads' Sequential(conv, relu, conv, relu, ...) -> ".i.0").
_LEGACY = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$"),
     lambda m: f"{m[1]}.{int(m[2]) // 2}.0.{m[3]}"),
)


def upgrade_legacy_keys(state_dict):
    """Rename pre-0.13 torchvision keys to today's (a no-op on current checkpoints)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _LEGACY:
            if pattern.match(key):
                key = pattern.sub(replacement, key)
                break
        out[key] = value
    return out


def architecture_of(model):
    """The ``TORCHVISION_ARCHITECTURES`` name that fits a kdet model."""
    config = getattr(model, "_config", {})
    names = _KNOWN_MODELS.get(type(model).__name__, {})
    key = (config.get("backbone"), config.get("version") if config.get("fpn", True) else "c4")
    if key in names:
        return names[key]
    raise ValueError(f"convert_torchvision: no torchvision mapping for model {model.name!r} "
                     f"({type(model).__name__}); known: {sorted(TORCHVISION_ARCHITECTURES)}")


def build_torchvision(name, num_classes=None, image_size=640, **kwargs):
    """The kdet model of torchvision builder ``name``, ready for ``convert_torchvision``.

    ``num_classes`` defaults to torchvision's COCO 91; ``image_size`` is
    kdet's fixed square input; other ``kwargs`` go to the kdet builder
    (score threshold, ...). The defaults reproduce the pretrained COCO
    builder; ``backbone_norm="batch"`` gives the ``weights=None`` one
    (``BatchNorm2d``, eps 1e-5) for v1.

    >>> model = build_torchvision("retinanet_resnet50_fpn_v2", num_classes=3,
    ...                           image_size=256)                          # doctest: +SKIP
    """
    from kdet.zoo import resolve_builder

    if name not in TORCHVISION_ARCHITECTURES:
        raise ValueError(f"build_torchvision: unknown architecture {name!r}; known: "
                         f"{sorted(TORCHVISION_ARCHITECTURES)}")
    spec = TORCHVISION_ARCHITECTURES[name]
    args = dict(spec["kwargs"], image_size=image_size, **kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = resolve_builder(spec["builder"])(**args)
    if spec["backbone_eps"] is not None and args.get("backbone_norm") == "frozen_batch":
        set_backbone_epsilon(model, spec["backbone_eps"])
    return model


def set_backbone_epsilon(model, epsilon):
    """Set the epsilon of every frozen BN of the backbone (torchvision ``overwrite_eps``).

    The value lives on the layers only: a model rebuilt from its config has
    the builder's default again (``kdet.zoo.load`` rebuilds through here).
    """
    from kdet.layers.normalization import FrozenBatchNormalization

    for layer in find_backbone(model)._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, FrozenBatchNormalization):
            layer.epsilon = float(epsilon)
    return model


def convert_torchvision(source, model, strict=True):
    """Copy a torchvision checkpoint into ``model`` name by name; returns ``model``.

    Args:
        source: path to a ``.pth`` file (read with ``weights_only=True``) or a
            state_dict (tensors or arrays), e.g. ``retinanet.state_dict()``.
        model: a kdet model built for the same architecture and class count
            (``build_torchvision``), or a kdet ``MobileNetV2``/``ResNet``
            backbone for a torchvision classification checkpoint.
        strict: also fail when checkpoint entries are left unused (other than
            BN counters and a classifier's ``fc``).

    Detector outputs match torchvision's head outputs
    (``head(backbone(x))``) on the same normalised input.
    """
    state = upgrade_legacy_keys(as_state_dict(source))
    if type(model).__name__ not in _KNOWN_MODELS:  # a classification backbone
        from kdet.converters.backbones import convert_torchvision_backbone
        return convert_torchvision_backbone(state, model, strict=strict)
    name = architecture_of(model)
    spec = TORCHVISION_ARCHITECTURES[name]
    backbone = find_backbone(model)
    used = _load_backbone(backbone, state, spec, strict)
    # Sampler seed states (Faster/Mask R-CNN) are not weights.
    variables = {path: v for path, v in model_variables(model, skip=[backbone]).items()
                 if not path.split("/")[-1].startswith("seed_generator_state")}
    pairs = plan(variables, spec["rules"],
                 owner=f"convert_torchvision[{name}]")
    used += copy_weights(pairs, state, owner=f"convert_torchvision[{name}]")
    if strict:
        check_unused(state, used, IGNORED, owner=f"convert_torchvision[{name}]")
    return model


def _load_backbone(backbone, state, spec, strict):
    """The body's entries of ``state`` into ``backbone``; returns the keys used."""
    from kdet.backbones._common import load_torch_state_dict

    # backbone.body.N is mobilenet_v2().features.N (see the MobileNetV2-FPN entries)
    mobilenet = spec["kwargs"]["backbone"] == "mobilenet_v2"
    return load_torch_state_dict(backbone, state,
                                 torch_name=(lambda name: name.removeprefix("features."))
                                 if mobilenet else None,
                                 prefix=spec.get("backbone_prefix", "backbone.body."),
                                 strict=strict)
