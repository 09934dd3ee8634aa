"""Train a detector from a settings dict: what ``kdet train`` runs.

    >>> import kdet.training
    >>> result = kdet.training.train({                                 # doctest: +SKIP
    ...     "format": "coco", "train_data": "annotations/instances_train2017.json",
    ...     "train_images": "train2017", "val_fraction": 0.1,
    ...     "model": "efficientdet", "phi": 0, "image_size": 512,
    ...     "epochs": 50, "batch_size": 8, "output_dir": "runs/d0"})
    >>> result.best_checkpoint                                          # doctest: +SKIP
    'runs/d0/best.keras'

Settings are those of :mod:`kdet.workflow.config` (``kdet train --help``
lists them). ``train`` reads the data (:mod:`kdet.workflow.data`), builds the
model (:mod:`kdet.workflow.models`), compiles it with the model's reference recipe
(:mod:`kdet.recipes`: ``model.default_optimizer(steps=epochs * steps_per_epoch,
batch_size=..., steps_per_epoch=...)``, or ``recipe``), prints the recipe, and fits with
:func:`default_callbacks`. ``time_budget`` / ``max_images`` choose ``epochs`` and
``steps_per_epoch`` before training (:mod:`kdet.workflow.budget`). ``<output_dir>`` then holds:

================  ===================================================================
``best.keras``    best ``val_AP`` so far (with a validation set), EMA weights if used
``last.keras``    the model after the last finished epoch (EMA weights if used)
``history.csv``   loss, learning rate and the 12 COCO numbers per epoch (evaluated ones)
``logs/``         TensorBoard
``backup/``       training state of an unfinished run (removed when ``fit`` ends)
``labels.txt``    class names, one per line (``kdet predict`` / ``export`` read it)
``config.yaml``   the resolved settings
================  ===================================================================

Every checkpoint is written atomically. If the process dies, running the same
command again resumes at the last finished epoch, with the same data order
and augmentation as an uninterrupted run (epoch-indexed pipeline, see
:mod:`kdet.workflow.data`).
"""
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time

from kdet.workflow.budget import deadline_guard, eta_callback
from kdet.workflow.config import load_config_file, resolve
from kdet.workflow.models import make_optimizer  # noqa: F401 (kdet.training.make_optimizer)

BEST = "best.keras"
LAST = "last.keras"
CSV = "history.csv"
BACKUP = "backup"
LOGS = "logs"
LABELS = "labels.txt"
CONFIG = "config.yaml"


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` made: the fitted model (EMA weights if used) and its files."""

    model: object
    history: object
    output_dir: str
    best_checkpoint: str
    last_checkpoint: str
    csv_log: str
    first_epoch: int


def coco_stat_names():
    from kdet.metrics.callbacks import COCO_STAT_NAMES
    return COCO_STAT_NAMES


def default_callbacks(model, output_dir, *, val_dataset=None, val_batches=None, eval_every=1,
                      resume_epoch=0, tensorboard=True, verbose=1, use_ema=None,
                      multi_worker=False):
    """The callbacks ``kdet train`` uses, in the order they must run.

    ``[TerminateOnNaN, AtomicBackupAndRestore(<out>/backup), EMAWeightsAtEpochEnd
    (when the optimizer keeps an EMA), COCOEvalCallback (with a validation set),
    AtomicModelCheckpoint(best.keras, val_AP, max), AtomicModelCheckpoint(last.keras),
    LearningRateLogger, EpochCSVLogger(history.csv), TensorBoard(<out>/logs)]``.

    Args:
        model: the compiled model (its optimizer decides ``use_ema``).
        output_dir: where the files go.
        val_dataset: a kdet dataset whose ``coco_ground_truth()`` (original
            pixels) scores ``val_batches``; predicted boxes are divided by
            ``targets["scale"]`` to match.
        val_batches: evaluation batches (:func:`kdet.workflow.data.evaluation_batches`).
        eval_every: evaluate every N epochs; the other epochs have no validation
            metrics (empty cells in ``history.csv``, nothing printed) and leave
            ``best.keras`` alone.
        resume_epoch: epochs already finished (from the backup): keeps the best
            value of ``best.keras`` (``history.csv`` is rewritten from the backup).
        multi_worker: a ``MultiWorkerMirroredStrategy`` run: the evaluation and
            ``best.keras`` happen on the chief only (:class:`kdet.workflow.callbacks.
            ChiefEvaluation`); the other workers log no validation metrics.
    """
    import keras

    from kdet.metrics import COCOEvalCallback
    from kdet.workflow import callbacks as cb

    if use_ema is None:
        use_ema = cb.optimizer_uses_ema(model.optimizer)
    best_path = os.path.join(output_dir, BEST)
    backup = cb.AtomicBackupAndRestore(os.path.join(output_dir, BACKUP), double_checkpoint=True)
    callbacks = [keras.callbacks.TerminateOnNaN(), backup]
    if use_ema:
        callbacks.append(cb.EMAWeightsAtEpochEnd())
    keys = ["loss", "learning_rate"]
    if val_dataset is not None:
        if val_batches is None:
            raise ValueError("val_dataset needs val_batches (evaluation_batches(val_dataset, ...))")
        evaluation = COCOEvalCallback(
            val_batches, val_dataset.coco_ground_truth(), every_n_epochs=eval_every,
            category_ids=val_dataset.category_ids, scale_key="scale",
            verbose=1 if verbose else 0)
        best = cb.read_best(best_path, "val_AP") if resume_epoch else None
        best_checkpoint = cb.AtomicModelCheckpoint(
            best_path, monitor="val_AP", mode="max", save_best_only=True,
            initial_value_threshold=best, verbose=0)
        if multi_worker:
            from kdet import distribute
            callbacks.append(cb.ChiefEvaluation(evaluation, best_checkpoint,
                                                chief=distribute.is_chief()))
        else:
            callbacks += [evaluation, best_checkpoint]
        keys += ["val_" + name for name in coco_stat_names()]
    callbacks += [
        cb.FiniteLossCheckpoint(os.path.join(output_dir, LAST), save_best_only=False, verbose=0),
        cb.LearningRateLogger(),
        cb.EpochCSVLogger(os.path.join(output_dir, CSV), keys, backup=backup),  # commits it
    ]
    if tensorboard == "auto":
        tensorboard = _tensorboard_installed()
    elif tensorboard and not _tensorboard_installed():
        raise ValueError("tensorboard=true but the tensorboard package is not installed "
                         "(pip install tensorboard), or pass --tensorboard false")
    if tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(output_dir, LOGS),
                                                     write_graph=False, profile_batch=0))
    return callbacks


def _tensorboard_installed():
    import importlib.util
    return importlib.util.find_spec("tensorboard") is not None


def _write_labels(path, names):
    from kdet.workflow import callbacks as cb

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(f"{n}\n" for n in names))
    cb.atomic_write(path, write)


def train(config, *, model=None, datasets=None, extra_callbacks=(), config_path="config"):
    """Train as ``kdet train`` does; returns a :class:`TrainResult`.

    Args:
        config: settings (``kdet train`` flags as keys); missing ones take
            their defaults, unknown ones raise ``ValueError``.
        model: use this (compiled or not) model instead of building one, or a function
            of no arguments returning it, called inside the strategy's scope (a
            ``multiworker`` or ``mirrored`` model must be built there).
        datasets: ``(train, val)`` kdet datasets instead of reading them.
        extra_callbacks: appended after the defaults.
    """
    started = time.monotonic()
    settings = resolve("train", file_config=config, config_path=config_path)
    from kdet import distribute  # after the settings check: a typo fails without TensorFlow

    # made before any other TF op (MultiWorkerMirroredStrategy requires it); the model is
    # built, compiled and fitted in its scope (docs/training.md, "Several devices")
    strategy = distribute.make_strategy(settings["strategy"])
    distribute.check_global_batch(settings["batch_size"], strategy)
    with strategy.scope():
        with contextlib.ExitStack() as scopes:
            return _train_in_scope(settings, model, datasets, extra_callbacks, started, scopes)


def _train_in_scope(settings, model, datasets, extra_callbacks, started, scopes):
    import keras

    from kdet import distribute
    from kdet.workflow import callbacks as cb
    from kdet.workflow import data as wdata
    from kdet.workflow.config import dump
    from kdet.workflow.models import (build_model, model_annotations, model_image_size,
                                      model_recipe, required_annotations, resolve_augmentation,
                                      resolve_jit_compile)

    seed = int(settings["seed"])
    if model is not None and not isinstance(model, keras.Model):
        keras.utils.set_random_seed(seed)  # initial weights
        model = model()  # a factory: the model's variables belong to the strategy
    # masks / keypoints: read when the named model trains on them (a .keras or zoo model:
    # known once loaded, the data is then read again below)
    annotations = required_annotations(settings["model"]) if model is None else \
        model_annotations(model)
    train_ds, val_ds = datasets if datasets is not None else wdata.read_datasets(
        settings, annotations=annotations or ())
    if train_ds is None or len(train_ds) == 0:
        raise ValueError("no training images")
    num_classes = settings["num_classes"] or train_ds.num_classes
    if num_classes < train_ds.num_classes:
        raise ValueError(f"num_classes={num_classes} but the data has {train_ds.num_classes} "
                         f"classes {list(train_ds.class_names)}")
    image_size = settings["image_size"]
    if image_size is None and settings["format"] == "shapes":
        image_size = wdata.SHAPES_IMAGE_SIZE
    if model is None:
        keras.utils.set_random_seed(seed)  # initial weights
        model = build_model(settings, num_classes, image_size,
                            num_keypoints=train_ds.num_keypoints or None)
    if settings["sync_batch_norm"]:
        distribute.synchronize_batch_norm(model)
    if settings["strategy"] == "modelparallel":
        # the layout map names the built model's variables: split them in a rebuilt copy
        distribution = distribute.make_model_parallel(model, settings["model_parallel_size"])
        distribute.check_global_batch(settings["batch_size"], distribution)
        scopes.enter_context(distribution.scope())
        model = distribute.rebuild(model)
    if model_annotations(model) != (annotations or ()) and datasets is None:
        annotations = model_annotations(model)
        train_ds, val_ds = wdata.read_datasets(settings, annotations=annotations)
    annotations = model_annotations(model)
    image_size = model_image_size(model)
    settings.update(num_classes=int(num_classes), image_size=int(image_size))
    resolve_augmentation(model, settings)  # the recipe's, where the user set none

    output_dir = settings["output_dir"]
    multiworker = settings["strategy"] == "multiworker"
    if multiworker and not distribute.is_chief():
        # every worker saves the backup and last.keras (in the strategy's scope the saves are
        # collective), the chief into output_dir, the others into their own folder (their
        # backup lets them resume with the chief); best.keras: the chief alone
        output_dir = os.path.join(output_dir, f"worker{distribute.worker_index()}")
    os.makedirs(output_dir, exist_ok=True)
    backup_dir = os.path.join(output_dir, BACKUP)
    if not settings["resume"] and os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    first_epoch = cb.backup_epoch(backup_dir) if settings["resume"] else 0
    epochs = int(settings["epochs"])
    if first_epoch and (settings["time_budget"] or settings["max_images"]):
        # the interrupted run's length (config.yaml), so the schedule stays the same
        saved = load_config_file(os.path.join(output_dir, CONFIG))
        epochs = int(saved["epochs"])
        settings["steps_per_epoch"] = saved["steps_per_epoch"]
    if first_epoch >= epochs:
        raise ValueError(f"{backup_dir} records {first_epoch} finished epochs, as many as "
                         f"epochs={epochs}: raise --epochs, or pass --resume false to start over")

    batch_size = int(settings["batch_size"])
    steps = settings["steps_per_epoch"] or wdata.default_steps_per_epoch(train_ds, batch_size)
    jit_compile = resolve_jit_compile(settings["jit_compile"], settings["strategy"])
    epochs, steps = _plan_length(settings, model, train_ds, val_ds, epochs, steps, first_epoch,
                                 jit_compile, started)
    settings.update(epochs=epochs, steps_per_epoch=steps)  # config.yaml: a resume reuses them
    optimizer = make_optimizer(model, settings, total_steps=epochs * steps, steps_per_epoch=steps)
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    if settings["preset"] and settings["verbose"]:
        from kdet.workflow.presets import PRESETS, describe as describe_preset
        print("\n".join(describe_preset(PRESETS[settings["preset"]])), flush=True)
    recipe = model_recipe(model, settings)
    if recipe is not None and settings["verbose"]:
        from kdet.recipes import describe
        print("\n".join(describe(recipe, batch_size, epochs * steps, steps)), flush=True)
    if settings["verbose"]:
        from kdet.recipes import describe_augmentation
        print("augmentation applied: "
              + describe_augmentation(settings["augment"], settings["scale_range"]), flush=True)

    # tf.data resolves its op seeds against TF's global seed when a pipeline is built: fix it
    # here, so an interrupted run and its resumption build identical epochs
    keras.utils.set_random_seed(seed)
    batches = wdata.training_batches(
        train_ds, image_size, batch_size, steps, first_epoch, epochs, seed=seed,
        augment=settings["augment"], scale_range=settings["scale_range"],
        max_boxes=settings["max_boxes"], deterministic=settings["deterministic"],
        annotations=annotations)
    val_batches = None
    if val_ds is not None:
        val_batches = wdata.evaluation_batches(val_ds, image_size, batch_size,
                                               max_boxes=settings["max_boxes"])
    callbacks = default_callbacks(
        model, output_dir, val_dataset=val_ds, val_batches=val_batches,
        eval_every=settings["eval_every"], resume_epoch=first_epoch,
        tensorboard=settings["tensorboard"], verbose=settings["verbose"],
        multi_worker=multiworker) + list(extra_callbacks)
    guard = None
    if settings["time_budget"] and not multiworker:
        # keeps the deadline when the machine slows down after the plan (a resumed run too);
        # not across workers: each would judge its own clock and their step counters split
        guard = deadline_guard(settings["time_budget"], started, epochs, steps,
                               verbose=settings["verbose"])
        callbacks.append(guard)
    if settings["verbose"]:
        callbacks.append(eta_callback(epochs, first_epoch, settings["time_budget"], started,
                                      steps_per_epoch=steps, guard=guard))

    _write_labels(os.path.join(output_dir, LABELS), train_ds.class_names)
    cb.atomic_write(os.path.join(output_dir, CONFIG), lambda tmp: dump(settings, tmp))
    if first_epoch and settings["verbose"]:
        print(f"Resuming from {backup_dir}: {first_epoch} of {epochs} epochs done", flush=True)
    history = model.fit(batches, epochs=epochs, initial_epoch=first_epoch, steps_per_epoch=steps,
                        callbacks=callbacks, verbose=settings["verbose"], shuffle=False)
    best = os.path.join(output_dir, BEST)
    return TrainResult(model=model, history=history, output_dir=output_dir,
                       best_checkpoint=best if os.path.isfile(best) else None,
                       last_checkpoint=os.path.join(output_dir, LAST),
                       csv_log=os.path.join(output_dir, CSV), first_epoch=first_epoch)


def _plan_length(settings, model, train_ds, val_ds, epochs, steps, first_epoch, jit_compile,
                 started):
    """``(epochs, steps_per_epoch)``: as set, or from ``max_images`` / ``time_budget``
    (:mod:`kdet.workflow.budget`; a resumed run keeps its planned length)."""
    from kdet.workflow import budget
    from kdet.workflow import data as wdata
    from kdet.workflow.models import make_optimizer

    batch_size = int(settings["batch_size"])
    if first_epoch or not (settings["time_budget"] or settings["max_images"]):
        return epochs, steps
    if settings["max_images"]:
        total = budget.steps_for_images(settings["max_images"], batch_size)
        if settings["time_budget"] is None:
            return budget.plan_epochs(total, steps)
    # measure the step time with the data pipeline and the optimizer of the real run
    probe_steps = 3
    model.compile(optimizer=make_optimizer(model, settings, total_steps=1000),
                  jit_compile=jit_compile)
    batches = wdata.training_batches(
        train_ds, int(settings["image_size"]), batch_size, probe_steps + 1, 0, 2,
        seed=int(settings["seed"]), augment=settings["augment"],
        scale_range=settings["scale_range"], max_boxes=settings["max_boxes"],
        deterministic=settings["deterministic"])
    step_seconds, first, boundary = budget.measure_step_seconds(model, batches, probe_steps)
    with tempfile.TemporaryDirectory() as scratch:
        epoch_seconds = boundary + budget.measure_epoch_seconds(model, scratch)
    val_images = 0 if val_ds is None else len(val_ds)
    planned, spe, expected = budget.plan_time_budget(
        settings["time_budget"], time.monotonic() - started, step_seconds, first, steps,
        batch_size, val_images=val_images, eval_every=settings["eval_every"],
        epoch_seconds=epoch_seconds)
    if settings["max_images"] and planned * spe > total:
        planned, spe = budget.plan_epochs(total, steps)  # the fewer of the two
    if settings["verbose"]:
        print(f"time budget {budget.format_seconds(settings['time_budget'])}: "
              f"{step_seconds:.3f} s/step measured (first step {first:.1f} s, "
              f"{epoch_seconds:.2f} s per epoch), "
              f"{planned} epochs x {spe} steps = {planned * spe * batch_size} images, "
              f"expected {budget.format_seconds(time.monotonic() - started + expected)} "
              "in all", flush=True)
    return planned, spe
