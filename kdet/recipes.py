"""The reference training recipes, as data, and the optimizer each one gives.

Each :class:`Recipe` states one reference trainer's optimizer, weight decay (coupled
through the momentum, and which variables it skips), learning rate *per image* (scaled
linearly to the global batch), warmup, schedule, gradient clipping and EMA, with the file
and commit it was read from. :func:`make_optimizer` turns a recipe, a global batch and a
number of steps into the Keras optimizer; each detector's ``default_optimizer()`` (and so
``compile()`` and ``kdet train``) calls it with the recipe of its family (``RECIPE``).

    >>> import kdet.recipes as recipes
    >>> r = recipes.RECIPES["torchvision"]
    >>> r.learning_rate_for(batch_size=4)          # 0.02 for 16 images
    0.005
    >>> opt = recipes.make_optimizer(r, batch_size=4, steps=2600)
    >>> type(opt).__name__, opt.coupled_weight_decay, opt.momentum
    ('CoupledDecaySGD', 0.0001, 0.9)
    >>> opt._learning_rate.milestones                # epochs 16 and 22 of 26
    (1600, 2200)

Like timm's ModelEmaV2 and automl's EMA, kdet averages the BatchNorm moving statistics
beside the weights (``kdet.layers.BatchNormalization(statistics_ema_momentum=)``, set by
:func:`kdet.workflow.models.make_optimizer`). What kdet does not reproduce (the recipes'
``notes`` say it per recipe): data augmentation is kdet's pipeline's (``augmentation``
names the reference's, ``augment`` what kdet applies for it).
"""
import dataclasses
import math

__all__ = ["Recipe", "RECIPES", "make_optimizer", "describe", "describe_augmentation",
           "schedule_lengths", "apply_to_model"]

_TV = "pytorch/vision references/detection"
_TV_COMMIT = "3ceb056d4c4a2d79ccdc65cbd2342b0e89a7ae47"
_EFFDET_COMMIT = "c6dff775a36cea0bf9b76c58e59f936411c5ce01"
_AUTOML_COMMIT = "6a54c8741e7c3265d4547c4f35f47a0391122dc5"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One reference trainer's recipe (see the module doc).

    ``learning_rate`` is the reference's for ``reference_batch`` images; epochs-based
    quantities (``milestones``, ``warmup_epochs``) are fractions of ``reference_epochs``
    so that a run of any length keeps the schedule's shape.
    """

    name: str
    source: str
    reference_batch: int
    learning_rate: float
    reference_epochs: float
    schedule: str                      # a RecipeSchedule kind
    momentum: float = 0.9
    weight_decay: float = 0.0          # coupled L2 (added to the gradient)
    decay_variables: str = "all"       # "all" | "kernels" (rank > 1: no bias, no BN)
    decay_before_clip: bool = False    # automl: L2 in the loss, clipped with the gradient
    lr_in_momentum: bool = False       # Caffe's momentum form (Fast R-CNN)
    milestones: tuple = ()             # epochs (of reference_epochs) where lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0         # timm/automl: warmup length in epochs
    warmup_max_steps: int = 0          # torchvision: min(1000, steps_per_epoch - 1) steps
    warmup_start: float = 0.0          # a factor (torchvision) or a rate at reference_batch
    scale_warmup_start: bool = True    # automl scales lr_warmup_init; timm's warmup_lr is fixed
    min_learning_rate: float = 0.0
    cosine_epochs: float = None        # timm: cosine length in epochs (then min_lr)
    global_clipnorm: float = None
    variable_clipnorm: float = None
    ema_momentum: float = None
    ema_warmup: bool = False           # automl: min(decay, (1 + t) / (10 + t))
    augmentation: str = ""             # the reference's, in its words
    # what kdet's pipeline applies for it (kdet train's --augment / --scale-range default)
    augment: tuple = ("flip",)
    scale_range: tuple = None
    batch_norm: str = ""
    # What the reference sets in the model itself (apply_to_model): the backbone's BN
    # momentum in Keras terms (None: the model's own) and the backbones (nested model
    # name prefixes) whose stochastic depth the reference turns off.
    backbone_batch_norm_momentum: float = None
    drop_path_off_for: tuple = ()
    notes: str = ""

    def learning_rate_for(self, batch_size=None):
        """The peak learning rate for a global batch of ``batch_size`` images."""
        batch = self.reference_batch if batch_size is None else int(batch_size)
        return self.learning_rate / self.reference_batch * batch

    @property
    def learning_rate_per_image(self):
        return self.learning_rate / self.reference_batch


RECIPES = {r.name: r for r in (
    Recipe(
        name="torchvision",
        source=f"{_TV}/train.py@{_TV_COMMIT} (argparse defaults: --lr 0.02 for 8 GPUs x 2 "
               "images, --momentum 0.9, --wd 1e-4 into torch.optim.SGD, MultiStepLR "
               "--lr-steps 16 22 --lr-gamma 0.1, --epochs 26, --data-augmentation hflip, "
               "norm weight decay = wd) + engine.py train_one_epoch (epoch 0: linear warmup "
               "from 1/1000 over min(1000, len(loader) - 1) iterations)",
        reference_batch=16, learning_rate=0.02, reference_epochs=26, schedule="torchvision",
        weight_decay=1e-4, milestones=(16, 22), warmup_max_steps=1000, warmup_start=1e-3,
        augmentation="hflip (p=0.5)",
        batch_norm="backbone BN frozen (FrozenBatchNorm2d); v2 heads GroupNorm/BN train",
        notes="no gradient clipping, no EMA; Faster/Mask/Keypoint R-CNN"),
    Recipe(
        name="torchvision_retinanet",
        source=f"{_TV}/README.md@{_TV_COMMIT} (RetinaNet: --lr 0.01, otherwise train.py's "
               "defaults as 'torchvision')",
        reference_batch=16, learning_rate=0.01, reference_epochs=26, schedule="torchvision",
        weight_decay=1e-4, milestones=(16, 22), warmup_max_steps=1000, warmup_start=1e-3,
        augmentation="hflip (p=0.5)", batch_norm="backbone BN frozen",
        notes="no gradient clipping, no EMA"),
    Recipe(
        name="torchvision_tutorial",
        source="pytorch/tutorials intermediate_source/torchvision_tutorial.py (SGD lr 0.005, "
               "momentum 0.9, weight_decay 5e-4, StepLR(step_size=3, gamma=0.1), 10 epochs, "
               f"batch 2) with {_TV}/engine.py's epoch-0 warmup",
        reference_batch=2, learning_rate=0.005, reference_epochs=10, schedule="torchvision",
        weight_decay=5e-4, milestones=(3, 6, 9), warmup_max_steps=1000, warmup_start=1e-3,
        augmentation="hflip (p=0.5)", batch_norm="backbone BN frozen",
        notes="the Penn-Fudan fine-tuning recipe (benchmarks/train_parity.py)"),
    Recipe(
        name="automl",
        source=f"google/automl efficientdet/hparams_config.py@{_AUTOML_COMMIT} (optimizer sgd, "
               "momentum 0.9, learning_rate 0.08 and lr_warmup_init 0.008 for batch 64, "
               "lr_warmup_epoch 1.0, lr_decay_method cosine, num_epochs 300, weight_decay "
               "4e-5, clip_gradients_norm 10.0, moving_average_decay 0.9998, jitter 0.1-2.0) + "
               "det_model_fn.py (update_learning_rate_schedule_parameters scales by batch/64, "
               "cosine_lr_schedule, reg_l2_loss over '.*(kernel|weight):0$', tf.clip_by_norm "
               "per variable then clip_by_global_norm, ExponentialMovingAverage(num_updates="
               "global_step), MomentumOptimizer)",
        reference_batch=64, learning_rate=0.08, reference_epochs=300, schedule="automl",
        weight_decay=4e-5, decay_variables="kernels", decay_before_clip=True,
        warmup_epochs=1.0, warmup_start=0.008, global_clipnorm=10.0, variable_clipnorm=10.0,
        ema_momentum=0.9998, ema_warmup=True,
        augmentation="hflip + scale jitter 0.1-2.0",
        augment=("scale_jitter", "flip"), scale_range=(0.1, 2.0),
        batch_norm="momentum 0.99, epsilon 1e-3; moving variance from the unbiased batch "
                   "variance (TF fused batch norm; kdet.layers.BatchNormalization)",
        notes="its EMA averages the BN statistics too (kdet: statistics_ema_momentum)"),
    Recipe(
        name="effdet",
        source=f"rwightman/efficientdet-pytorch train.py@{_EFFDET_COMMIT} (--opt momentum 0.9, "
               "--weight-decay 4e-5 via timm create_optimizer: no decay on biases and 1-d "
               "params, --clip-grad 10 norm before optimizer.step, --sched cosine per epoch, "
               "--warmup-lr 1e-4, --min-lr 1e-5, --epochs 300, --cooldown-epochs 10 (then "
               "at min_lr: 310 epochs in all), --model-ema-decay 0.9998 (ModelEmaV2) + "
               "README's COCO D0 command: 4 GPUs x -b 16, --lr .09, --warmup-epochs 5, "
               "--model-ema)",
        # the cosine spans 300 of the 310 epochs, so a run of any length ends with the
        # same 1/31 at min_lr as effdet's cool-down
        reference_batch=64, learning_rate=0.09, reference_epochs=310, schedule="timm_cosine",
        weight_decay=4e-5, decay_variables="kernels", warmup_epochs=5, warmup_start=1e-4,
        scale_warmup_start=False, min_learning_rate=1e-5, cosine_epochs=300,
        global_clipnorm=10.0, ema_momentum=0.9998, ema_warmup=False,
        augmentation="hflip + random resize-crop (scale 0.1-2.0)",
        augment=("scale_jitter", "flip"), scale_range=(0.1, 2.0),
        batch_norm="BiFPN and heads momentum 0.99, epsilon 1e-3 (effdet norm_kwargs "
                   "momentum .01); backbone momentum 0.9 (timm's BatchNorm2d default 0.1, "
                   "epsilon 1e-3 for tf_ models); moving variance from the unbiased batch "
                   "variance (torch BatchNorm2d; kdet.layers.BatchNormalization)",
        backbone_batch_norm_momentum=0.9,
        # effdet/config/model_config.py: tf_efficientdet_lite* backbone_args drop_path_rate
        # 0.0 (its D-models' 0.2 is kdet's / automl's)
        drop_path_off_for=("efficientnet_lite",),
        notes="the cool-down is a fraction of the run (10 of 310 epochs), not 10 epochs "
              "whatever its length; ModelEmaV2 averages the BN buffers too (kdet: "
              "statistics_ema_momentum)"),
    Recipe(
        name="fast_rcnn_paper",
        source="rbgirshick/fast-rcnn models/*/solver.prototxt (base_lr 0.001, momentum 0.9, "
               "weight_decay 0.0005, lr_policy step x0.1 at 30k of 40k iterations, 2 images "
               "per batch; Caffe SGD: L2 in the gradient, lr inside the momentum)",
        reference_batch=2, learning_rate=0.001, reference_epochs=4, schedule="torchvision",
        weight_decay=5e-4, milestones=(3,), lr_in_momentum=True,
        augmentation="hflip", batch_norm="none (VGG16)",
        notes="epochs stand for the 40k iterations: milestone at 3/4 of the run"),
)}


def schedule_lengths(recipe, steps, steps_per_epoch=None):
    """``(steps_per_epoch, milestones, warmup_steps)`` of ``recipe`` for a run of ``steps``.

    Without ``steps_per_epoch`` the run is taken as the reference's epoch count, so a run
    of any length keeps the schedule's shape. Milestones are epoch starts (the references
    step their schedules per epoch).
    """
    steps = max(1, int(steps))
    if steps_per_epoch is None:
        steps_per_epoch = max(1, round(steps / recipe.reference_epochs))
    steps_per_epoch = max(1, int(steps_per_epoch))
    epochs = steps / steps_per_epoch
    scale = epochs / recipe.reference_epochs
    milestones = tuple(max(1, round(m * scale)) * steps_per_epoch for m in recipe.milestones)
    if recipe.warmup_max_steps:
        warmup = min(recipe.warmup_max_steps, steps_per_epoch - 1)
    else:
        # the references warm up for a number of epochs whatever the run's length; a short
        # fine-tune keeps that, up to half of its epochs
        warmup_epochs = min(recipe.warmup_epochs, epochs / 2)
        if recipe.schedule == "timm_cosine":  # whole epochs: timm steps per epoch
            warmup_epochs = math.floor(warmup_epochs)
        warmup = int(warmup_epochs * steps_per_epoch)
    return steps_per_epoch, milestones, max(0, warmup)


def make_schedule(recipe, batch_size=None, steps=10000, steps_per_epoch=None,
                  learning_rate=None, warmup_steps=None):
    """The recipe's :class:`kdet.optimizers.RecipeSchedule` for ``steps`` steps."""
    from kdet.optimizers import RecipeSchedule

    steps = max(1, int(steps))
    peak = recipe.learning_rate_for(batch_size) if learning_rate is None else float(learning_rate)
    spe, milestones, warmup = schedule_lengths(recipe, steps, steps_per_epoch)
    if warmup_steps is not None:
        warmup = int(warmup_steps)
    start = recipe.warmup_start
    if recipe.schedule != "torchvision" and recipe.scale_warmup_start:
        start = start * peak / recipe.learning_rate  # automl scales lr_warmup_init like lr
    cosine_epochs = None
    if recipe.cosine_epochs:
        cosine_epochs = recipe.cosine_epochs * (steps / spe) / recipe.reference_epochs
    return RecipeSchedule(recipe.schedule, peak, steps, warmup_steps=warmup, warmup_start=start,
                          milestones=milestones, gamma=recipe.gamma,
                          min_learning_rate=recipe.min_learning_rate, steps_per_epoch=spe,
                          cosine_epochs=cosine_epochs)


def make_optimizer(recipe, batch_size=None, steps=10000, steps_per_epoch=None,
                   learning_rate=None, warmup_steps=None):
    """The Keras optimizer of ``recipe`` for a global batch of ``batch_size`` images.

    Args:
        recipe: a :class:`Recipe` or a name in :data:`RECIPES`.
        batch_size: global batch (None: the reference's, i.e. the reference's rate).
        steps: optimizer steps of the whole run (the schedule's length).
        steps_per_epoch: where the per-epoch schedules step (None: ``steps`` / the
            reference's epochs).
        learning_rate: the peak rate at this batch, instead of the scaled reference's.
        warmup_steps: warmup length instead of the recipe's.
    """
    from kdet.optimizers import CoupledDecaySGD

    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    schedule = make_schedule(recipe, batch_size, steps, steps_per_epoch, learning_rate,
                             warmup_steps)
    ema = recipe.ema_momentum is not None
    return CoupledDecaySGD(
        learning_rate=schedule, momentum=recipe.momentum,
        coupled_weight_decay=recipe.weight_decay, decay_variables=recipe.decay_variables,
        decay_before_clip=recipe.decay_before_clip, lr_in_momentum=recipe.lr_in_momentum,
        variable_clipnorm=recipe.variable_clipnorm, global_clipnorm=recipe.global_clipnorm,
        use_ema=ema, ema_momentum=recipe.ema_momentum if ema else 0.99,
        ema_warmup=recipe.ema_warmup, ema_from_initial=True)


def apply_to_model(recipe, model):
    """Set what ``recipe`` fixes in the model itself (:func:`describe` states it).

    ``backbone_batch_norm_momentum``: the momentum of every trainable batch norm of the
    backbone (the detector's nested backbone model); ``drop_path_off_for``: stochastic
    depth off (its dropout layers at rate 0) in backbones whose name starts so.
    """
    import keras

    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    for backbone in (layer for layer in model.layers if isinstance(layer, keras.Model)):
        drop_path_off = backbone.name.startswith(tuple(recipe.drop_path_off_for))
        for layer in backbone._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization) and \
                    recipe.backbone_batch_norm_momentum is not None:
                layer.momentum = float(recipe.backbone_batch_norm_momentum)
            elif isinstance(layer, keras.layers.Dropout) and drop_path_off:
                layer.rate = 0.0


def describe_augmentation(augment, scale_range):
    """``"scale_jitter, flip 0.1-2"``: the augmentations, the jitter's range with it.

    >>> describe_augmentation(("scale_jitter", "flip"), (0.1, 2.0)), describe_augmentation((), None)
    ('scale_jitter, flip 0.1-2', 'none')
    """
    text = ", ".join(augment) or "none"
    if "scale_jitter" in augment and scale_range:
        text += " {:g}-{:g}".format(*scale_range)
    return text


def describe(recipe, batch_size=None, steps=None, steps_per_epoch=None):
    """Lines stating ``recipe`` (what ``kdet train`` prints at the start)."""
    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    batch = recipe.reference_batch if batch_size is None else int(batch_size)
    lines = [f"recipe {recipe.name}: {recipe.source}",
             f"  lr {recipe.learning_rate_for(batch):.6g} = {recipe.learning_rate} / "
             f"{recipe.reference_batch} images x batch {batch}; momentum {recipe.momentum}; "
             f"coupled L2 decay {recipe.weight_decay} on "
             f"{'all variables' if recipe.decay_variables == 'all' else 'kernels only'}"
             f"{' (before clipping)' if recipe.decay_before_clip else ''}"]
    clip = ", ".join(f"{k} {v}" for k, v in (("per-variable clip", recipe.variable_clipnorm),
                                             ("global clip", recipe.global_clipnorm)) if v)
    ema = (f"EMA {recipe.ema_momentum}{' (warmup)' if recipe.ema_warmup else ''}"
           if recipe.ema_momentum else "no EMA")
    lines.append(f"  schedule {recipe.schedule}; {clip or 'no clipping'}; {ema}")
    if steps:
        spe, milestones, warmup = schedule_lengths(recipe, steps, steps_per_epoch)
        lines.append(f"  {steps} steps ({steps / spe:g} epochs of {spe}); warmup {warmup} steps"
                     + (f"; lr x{recipe.gamma} at steps {list(milestones)}" if milestones
                        else ""))
    lines.append(f"  augmentation: {describe_augmentation(recipe.augment, recipe.scale_range)}"
                 f" (reference: {recipe.augmentation}); BN: {recipe.batch_norm}")
    model_settings = []
    if recipe.backbone_batch_norm_momentum is not None:
        model_settings.append(f"backbone BN momentum {recipe.backbone_batch_norm_momentum}")
    if recipe.drop_path_off_for:
        model_settings.append("stochastic depth off in " + ", ".join(recipe.drop_path_off_for)
                              + " backbones")
    if model_settings:
        lines.append("  set on the model: " + "; ".join(model_settings))
    if recipe.notes:
        lines.append(f"  notes: {recipe.notes}")
    return lines
