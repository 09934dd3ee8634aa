"""Backbones by name, for the detectors' ``backbone=`` argument (one place for all of them).

    >>> from kdet.backbones.factory import build_backbone
    >>> model = build_backbone("mobilenet_v2", 64, levels=(3, 4, 5))
    >>> sorted(model.output)
    ['C3', 'C4', 'C5']
"""
import keras

from kdet.backbones.efficientnet import EfficientNet
from kdet.backbones.mobilenet import MobileNetV2
from kdet.backbones.resnet import ResNet
from kdet.layers.normalization import is_statistics_average

NAMES = ("resnet50", "resnet101", "efficientnet_b0..efficientnet_b7", "mobilenet_v2")


def build_backbone(name, image_size, weights=None, norm="batch", trainable_layers=5,
                   norm_epsilon=1e-5, levels=(3, 4, 5), owner="detector"):
    """The feature extractor ``name`` for square ``image_size`` inputs, returning ``C<level>``.

    ``name`` may also be a Keras model returning those levels (used as it is;
    such a detector cannot be rebuilt from its config). ``norm``,
    ``trainable_layers`` and ``norm_epsilon`` apply to ResNets (torchvision
    semantics); MobileNetV2 takes ``norm``.
    """
    if isinstance(name, keras.Model):
        return name
    shape = (int(image_size), int(image_size), 3)
    levels = tuple(levels)
    if name in ("resnet50", "resnet101"):
        return ResNet(depth=int(name[6:]), input_shape=shape, weights=weights, norm=norm,
                      trainable_layers=trainable_layers, norm_epsilon=norm_epsilon)
    if isinstance(name, str) and name.startswith("efficientnet_b"):
        return EfficientNet(name[len("efficientnet_"):], input_shape=shape, weights=weights,
                            return_levels=levels)
    if name == "mobilenet_v2":
        return MobileNetV2(input_shape=shape, weights=weights, norm=norm, return_levels=levels)
    raise ValueError(f"unknown {owner} backbone {name!r}: use one of {', '.join(NAMES)} or a "
                     f"Keras model returning a dict with {', '.join(f'C{i}' for i in levels)}")


def truncate_backbone(body, level, owner="detector"):
    """The ``C<level>`` map of a dict-returning backbone as a one-output model.

    The deeper stages are left out of the graph (their layers, and weights,
    stay with ``body`` only): Fast R-CNN and Faster R-CNN C4 read C4 alone.
    """
    key = f"C{level}"
    output = body.output
    if not isinstance(output, dict) or key not in output:
        raise ValueError(f"{owner}: the backbone must return a dict with {key!r}")
    return keras.Model(body.input, output[key], name=f"{body.name}_{key.lower()}")


def backbone_level(backbone, size, level, weights, norm, trainable_layers, norm_epsilon, owner):
    """``truncate_backbone(build_backbone(backbone, ...), level)``."""
    body = build_backbone(backbone, size, weights, norm, trainable_layers, norm_epsilon,
                          levels=(level,), owner=owner)
    return truncate_backbone(body, level, owner)


def copy_layer_weights(source, target):
    """Assign the weights of ``source``'s layers to the same-named layers inside ``target``.

    Faster R-CNN C4 takes res5 out of the backbone into its box head
    (``layer4.*`` layers in both): a whole-ResNet weights file loaded into the
    backbone gives the head its res5 this way. Returns the names copied.
    """
    layers = source._flatten_layers(include_self=False, recursive=True)
    by_name = {layer.name: layer for layer in layers}
    copied = []
    for layer in target._flatten_layers(include_self=False, recursive=True):
        if not layer.weights or layer.name not in by_name:
            continue
        # by variable name, leaving out the BN statistics averages (training state either
        # side may keep); every other variable must match, as set_weights required
        values = {v.name: v for v in by_name[layer.name].weights if not is_statistics_average(v)}
        targets = [v for v in layer.weights if not is_statistics_average(v)]
        if sorted(values) != sorted(v.name for v in targets):
            raise ValueError(f"copy_layer_weights: layer {layer.name!r} has variables "
                             f"{sorted(v.name for v in targets)}, the source {sorted(values)}")
        for variable in targets:
            variable.assign(values[variable.name])
        copied.append(layer.name)
    return copied
