"""Checkpoint converters: torchvision, effdet (timm) and automl weights -> kdet models.

Each source has a builder that makes the matching kdet model and a
``convert_<source>(checkpoint, model) -> model`` that copies the weights name
by name (the only place in kdet that maps foreign names):

    >>> import kdet.converters as C                                          # doctest: +SKIP
    >>> model = C.build_effdet("tf_efficientdet_d0")                         # doctest: +SKIP
    >>> C.convert_effdet("tf_efficientdet_d0_34-f153e0cf.pth", model)        # doctest: +SKIP

``.pth`` files are read with ``torch.load(weights_only=True)`` only
(``read_pth``); automl checkpoints with ``tf.train.load_checkpoint``.
``kdet.zoo.load`` wraps all this with model cards, hashes and a cache.
"""
from kdet._lazy import lazy_exports

_EXPORTS = {
    "read_pth": "._pth",
    "TORCHVISION_ARCHITECTURES": ".torchvision", "build_torchvision": ".torchvision",
    "convert_torchvision": ".torchvision", "upgrade_legacy_keys": ".torchvision",
    "build_effdet": ".effdet", "convert_effdet": ".effdet",
    "build_automl": ".automl", "convert_automl": ".automl",
    "automl_variable_names": ".automl", "save_automl_checkpoint": ".automl",
    "convert_mobilenet_v2": ".backbones", "convert_efficientnet_lite": ".backbones",
    "lukemelas_to_timm": ".backbones", "installed_imagenet_checkpoint": ".backbones",
    "load_installed_imagenet_backbone": ".backbones",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
