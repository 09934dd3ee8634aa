"""Training callbacks that never lose a finished epoch.

* :func:`atomic_save` writes a model (or its weights) to a temporary file in
  the target's folder, flushes it to disk and ``os.replace``-s it over the
  target: a crash while saving leaves the previous file whole.
* :class:`AtomicModelCheckpoint` is ``keras.callbacks.ModelCheckpoint`` saving
  that way; with ``save_best_only`` it skips (silently) epochs whose logs lack
  the monitored value (not evaluated that epoch) instead of Keras' "warn and
  save", and records the best value beside the file (``<file>.json``) so a
  resumed run keeps comparing against it.
* :class:`AtomicBackupAndRestore` is ``keras.callbacks.BackupAndRestore``
  (weights *and* optimizer state, so a killed run resumes at its last
  finished epoch) with atomic writes and the epoch and the history rows
  stored inside the weights file, so weights, epoch and ``history.csv`` can
  never disagree (the epoch's row and its backup are committed together).
* :class:`EMAWeightsAtEpochEnd` puts the optimizer's EMA weights in the
  model at every epoch end, so the evaluation and checkpoint callbacks that
  follow it see (and save) the EMA weights; ``fit`` ends with the EMA weights
  in the model (Keras' ``finalize_variable_values``), also when stopped early.
* :class:`LearningRateLogger` and :class:`EpochCSVLogger` log the learning
  rate and a CSV with a fixed set of columns (empty cells for values not
  measured that epoch); the logger commits each row with the backup.

Order matters (Keras calls callbacks in list order with one shared ``logs``):
``[TerminateOnNaN, AtomicBackupAndRestore, EMAWeightsAtEpochEnd,
COCOEvalCallback, AtomicModelCheckpoint(s), LearningRateLogger,
EpochCSVLogger, TensorBoard]``: the backup holds the raw weights (resuming
swaps nothing back), evaluation and checkpoints see EMA weights and the loggers
see ``val_AP``; the CSV logger, last of kdet's, commits the epoch's backup.
:func:`kdet.training.default_callbacks` builds that list.
``model.fit`` appends its progress bar and ``History`` last.

    >>> import keras, numpy as np, tempfile, os
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> atomic_save(model, path) == path, os.listdir(os.path.dirname(path))
    (True, ['m.keras'])
"""
import json
import math
import os
import tempfile

import keras
import numpy as np

from kdet.history import format_csv, read_csv_log  # noqa: F401 (read_csv_log: re-exported)

_SUFFIXES = (".weights.h5", ".keras", ".h5")
METADATA_ATTRIBUTE = "kdet_training_metadata"
HISTORY_DATASET = "kdet_history"
_UMASK = os.umask(0o022)  # read the process umask (set it back at once)
os.umask(_UMASK)


def _suffix(path):
    for suffix in _SUFFIXES:
        if path.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: a checkpoint must end in .keras or .weights.h5")


def _fsync(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Call ``write(tmp_path)`` then move ``tmp_path`` over ``path`` atomically.

    The temporary file lies in ``path``'s folder (same file system, so
    ``os.replace`` is atomic) and keeps ``path``'s suffix (Keras picks the
    format from it). On any error the temporary file is removed and the error
    re-raised; ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    suffix = next((s for s in _SUFFIXES + (".json", ".csv", ".txt", ".yaml") if base.endswith(s)),
                  "")
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a checkpoint is an ordinary file
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    return path


def atomic_save(model, path, weights_only=None):
    """Save ``model`` to ``path`` (``.keras``: whole model; ``.weights.h5``: weights) atomically."""
    path = os.fspath(path)
    suffix = _suffix(path)
    if weights_only is None:
        weights_only = suffix == ".weights.h5"
    if weights_only and suffix != ".weights.h5":
        raise ValueError(f"{path}: weights-only checkpoints must end in .weights.h5")

    def write(tmp):
        if weights_only:
            model.save_weights(tmp, overwrite=True)
        else:
            model.save(tmp, overwrite=True)

    return atomic_write(path, write)


def write_json_atomic(path, data):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    return atomic_write(path, write)


def _require_private(cls, names):
    missing = [n for n in names if not callable(getattr(cls, n, None))]
    if missing:  # fail loudly rather than silently fall back to non-atomic saving
        raise RuntimeError(f"kdet's atomic {cls.__name__} overrides {missing}, which this Keras "
                           f"version ({keras.__version__}) no longer has")


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that writes atomically (see the module docstring).

    Same arguments as ``keras.callbacks.ModelCheckpoint``. With
    ``save_best_only=True`` each save also writes ``<filepath>.json``:
    ``{"epoch": 1-based, "monitor": name, "best": value}``; pass the stored
    value back as ``initial_value_threshold`` when resuming
    (:func:`read_best`).
    """

    def __init__(self, filepath, *args, **kwargs):
        _require_private(keras.callbacks.ModelCheckpoint,
                         ("_save_model", "_should_save_model", "_get_file_path"))
        super().__init__(filepath, *args, **kwargs)

    def _save_model(self, epoch, batch, logs):
        logs = logs or {}
        if self.save_best_only and self.monitor not in logs:
            return  # not evaluated this epoch: nothing to compare
        filepath = self._get_file_path(epoch, batch, logs)
        if not self._should_save_model(epoch, batch, logs, filepath):
            return
        atomic_save(self.model, filepath, weights_only=self.save_weights_only)
        if self.save_best_only:
            write_json_atomic(filepath + ".json", {
                "epoch": int(epoch) + 1, "monitor": self.monitor,
                "best": float(np.asarray(self.best))})


class FiniteLossCheckpoint(AtomicModelCheckpoint):
    """An :class:`AtomicModelCheckpoint` never overwritten by a diverged model (NaN loss)."""

    def _save_model(self, epoch, batch, logs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(np.asarray(loss))):
            return
        super()._save_model(epoch, batch, logs)


class ChiefEvaluation(keras.callbacks.Callback):
    """Evaluation (and the best checkpoint) of a ``MultiWorkerMirroredStrategy`` run, on the
    chief alone.

    ``evaluation``: a :class:`kdet.metrics.COCOEvalCallback`; ``checkpoint``: the
    best-model checkpoint monitoring its result (after it, as in the plain list). On the
    chief both run at each epoch end outside the strategy
    (:func:`kdet.distribute.outside_strategy`): the evaluation predicts with a
    single-device twin of the model (built once from its config, given the model's
    current weights, so no collective op runs) and the checkpoint saves the training model
    locally. The other workers do neither and log no validation metrics; they wait for the
    chief at the next collective op of the step or the epoch-end saves, i.e. as long as
    the evaluation takes.
    """

    def __init__(self, evaluation, checkpoint=None, chief=True):
        super().__init__()
        self.evaluation = evaluation
        self.checkpoint = checkpoint
        self.chief = bool(chief)
        self._twin = None

    def set_model(self, model):
        super().set_model(model)
        if self.checkpoint is not None:
            self.checkpoint.set_model(model)

    def on_train_begin(self, logs=None):
        if self.chief and self.checkpoint is not None:
            self.checkpoint.on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.chief:
            from kdet import distribute
            distribute.outside_strategy(self._chief_epoch_end, epoch, logs)

    def _chief_epoch_end(self, epoch, logs):
        from kdet import distribute
        if (epoch + 1) % self.evaluation.every_n_epochs == 0:
            if self._twin is None:
                self._twin = distribute.rebuild(self.model)
            else:
                self._twin.set_weights(self.model.get_weights())
            self.evaluation.set_model(self._twin)
        self.evaluation.on_epoch_end(epoch, logs)
        if self.checkpoint is not None:
            self.checkpoint.on_epoch_end(epoch, logs)


def read_best(path, monitor):
    """The best value stored beside checkpoint ``path`` for ``monitor``, or ``None``."""
    sidecar = os.fspath(path) + ".json"
    if not (os.path.isfile(sidecar) and os.path.isfile(path)):
        return None
    try:
        with open(sidecar, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if data.get("monitor") != monitor or not isinstance(data.get("best"), (int, float)):
        return None
    return float(data["best"])


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` with atomic writes, the epoch kept in the weights file and,
    with an :class:`EpochCSVLogger`, the history rows committed together with the epoch.

    Same arguments as ``keras.callbacks.BackupAndRestore``. The backup
    (``<backup_dir>/latest.weights.h5``) holds the model and optimizer
    variables (EMA averages, step counter, momenta), as an HDF5 attribute the
    training metadata ``{"epoch", "batch"}`` and, as a dataset, the history
    rows of the finished epochs (:attr:`history`, restored by
    ``on_train_begin``); ``training_metadata.json`` is still written for
    Keras. :func:`backup_epoch` reads the epoch before ``fit``.

    An epoch's history row (its ``val_AP`` included) is only known after the
    evaluation that follows this callback, while the backup must be written
    here, before :class:`EMAWeightsAtEpochEnd` puts the EMA weights in the
    model. So when an :class:`EpochCSVLogger` later in the list was given
    ``backup=this``, the epoch-end save only *stages* the backup
    (``staged.weights.h5``); the logger writes ``history.csv`` and then calls
    :meth:`commit_epoch`, which adds the row to the staged file and moves it
    over ``latest.weights.h5`` in one ``os.replace``. A process killed before
    that move redoes the epoch when resumed, and a resumed run rewrites
    ``history.csv`` from the rows in the backup: the backup and the history
    always count the same finished epochs.
    """

    def __init__(self, backup_dir, *args, **kwargs):
        _require_private(keras.callbacks.BackupAndRestore, ("_save_model", "_load_model"))
        super().__init__(backup_dir, *args, **kwargs)
        self.history = None  # rows of the finished epochs; None: a backup without them
        self.restored_epoch = 0  # finished epochs found in the backup by on_train_begin
        self.stage_epoch_saves = False  # set for the run by EpochCSVLogger(backup=self)
        self._staged_path = os.path.join(self.backup_dir, "staged.weights.h5")
        self._staged_epoch = None
        self._in_epoch_end = False

    def on_train_begin(self, logs=None):
        self.history, self.restored_epoch, self._staged_epoch = [], 0, None
        super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._in_epoch_end = True  # _save_model stages instead of saving (see the docstring)
        try:
            super().on_epoch_end(epoch, logs)
        finally:
            self._in_epoch_end = False

    def _metadata(self):
        return {"epoch": int(self._current_epoch), "batch": int(self._last_batch_seen)}

    def _write_state(self, path):
        """Model and optimizer variables, metadata and history rows to ``path``."""
        self.model.save_weights(path, overwrite=True)
        _write_backup_attributes(path, self._metadata(), self.history or [])

    def _keep_previous(self):
        if self.double_checkpoint:  # keep the previous backup too (Keras' fallback)
            for current, previous in ((self._weights_path, self._prev_weights_path),
                                      (self._training_metadata_path,
                                       self._prev_training_metadata_path)):
                if os.path.exists(current):
                    atomic_write(previous, lambda tmp, source=current: _copy(source, tmp))

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        if self._in_epoch_end and self.stage_epoch_saves:
            self._write_state(self._staged_path)  # not the backup until commit_epoch
            self._staged_epoch = int(self._current_epoch)
            return
        self._keep_previous()
        atomic_write(self._weights_path, self._write_state)
        write_json_atomic(self._training_metadata_path, self._metadata())

    def commit_epoch(self, row):
        """Add history ``row`` (``row["epoch"]``: 1-based) to the backup of that epoch.

        With staged epoch-end saves the staged file, with the row added, becomes
        the backup (one ``os.replace``). With ``save_freq=<batches>`` the row
        rides with the next save (a backup taken inside the next epoch).
        """
        epoch = int(row["epoch"])
        history = list(self.history or []) + [dict(row)]
        if self.save_freq != "epoch":
            self.history = history
            return
        if self._staged_epoch != epoch:
            raise RuntimeError(
                f"no staged backup of epoch {epoch} to commit its history row with: the "
                "EpochCSVLogger(backup=...) must come after its AtomicBackupAndRestore in the "
                "callbacks list")
        metadata = {"epoch": epoch, "batch": 0}
        _write_backup_attributes(self._staged_path, metadata, history)
        _fsync(self._staged_path)
        self._keep_previous()
        os.replace(self._staged_path, self._weights_path)  # the commit point
        _fsync_dir(self.backup_dir)
        write_json_atomic(self._training_metadata_path, metadata)
        self.history, self._staged_epoch = history, None

    def _load_model(self):
        super()._load_model()
        metadata = read_backup_metadata(self._weights_path)
        if metadata is not None:  # the weights file is the authority
            self.restored_epoch = int(metadata["epoch"])
            self.model._initial_epoch = self.restored_epoch
            self.history = read_backup_history(self._weights_path)


def _copy(source, target):
    import shutil
    shutil.copyfile(source, target)


def _write_backup_attributes(path, metadata, history):
    import h5py
    with h5py.File(path, "a") as f:
        f.attrs[METADATA_ATTRIBUTE] = json.dumps(metadata)
        if HISTORY_DATASET in f:
            del f[HISTORY_DATASET]
        # a dataset, not an attribute: HDF5 attributes stop at 64 KiB (some 300 epochs)
        f.create_dataset(HISTORY_DATASET, data=json.dumps(history))


def _read_backup_entry(weights_path, read):
    if not os.path.isfile(weights_path):
        return None
    import h5py
    try:
        with h5py.File(weights_path, "r") as f:
            raw = read(f)
    except OSError:
        return None
    if raw is None:
        return None
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def read_backup_metadata(weights_path):
    """``{"epoch", "batch"}`` stored in a backup weights file, or ``None``."""
    return _read_backup_entry(weights_path, lambda f: f.attrs.get(METADATA_ATTRIBUTE))


def read_backup_history(weights_path):
    """History rows of the finished epochs stored in a backup weights file, or ``None``
    (no file, or a backup written before kdet kept them)."""
    return _read_backup_entry(
        weights_path, lambda f: f[HISTORY_DATASET][()] if HISTORY_DATASET in f else None)


def backup_epoch(backup_dir):
    """Number of finished epochs recorded in ``backup_dir`` (0 when there is no backup)."""
    weights = os.path.join(backup_dir, "latest.weights.h5")
    metadata = read_backup_metadata(weights)
    if metadata is None:
        json_path = os.path.join(backup_dir, "training_metadata.json")
        if not (os.path.isfile(weights) and os.path.isfile(json_path)):
            return 0
        with open(json_path, encoding="utf-8") as f:
            metadata = json.load(f)
    return int(metadata.get("epoch", 0))


class EMAWeightsAtEpochEnd(keras.callbacks.Callback):
    """Put the optimizer's EMA weights in the model at every epoch end, the raw ones back
    at the next epoch's start.

    Callbacks after it (evaluation, checkpoints) see and save the EMA weights;
    callbacks before it (the training backup) the raw ones. Unlike
    ``keras.callbacks.SwapEMAWeights(swap_on_epoch=True)``, which swaps the
    averages and the weights in place, this keeps the raw weights in a host
    copy and leaves the averages alone, so ``fit`` (whose
    ``finalize_variable_values`` copies the averages into the model) ends with
    the EMA weights however it ends: after the last epoch or stopped early by
    a later callback (where ``SwapEMAWeights`` leaves the raw weights).
    Only public optimizer API is used. Does nothing without ``use_ema``. The batch
    norms that average their statistics
    (:func:`kdet.layers.normalization.average_batch_norm_statistics`, as the references'
    EMA does) get those averages in their moving statistics at the same times.
    """

    def __init__(self):
        super().__init__()
        self._raw = None

    def _enabled(self):
        optimizer = getattr(self.model, "optimizer", None)
        return optimizer is not None and optimizer_uses_ema(optimizer)

    def _averaged_statistics(self):
        """(moving, its average) of the batch norms that average their statistics."""
        from kdet.layers.normalization import averaged_batch_norms

        return [pair for layer in averaged_batch_norms(self.model)
                for pair in ((layer.moving_mean, layer.averaged_moving_mean),
                             (layer.moving_variance, layer.averaged_moving_variance))]

    def on_epoch_end(self, epoch, logs=None):
        if not self._enabled():
            return
        variables = self.model.trainable_variables
        statistics = self._averaged_statistics()
        targets = list(variables) + [moving for moving, _ in statistics]
        self._raw = [(v, keras.ops.convert_to_numpy(v)) for v in targets]
        self.model.optimizer.finalize_variable_values(variables)
        for moving, average in statistics:
            moving.assign(average)

    def on_epoch_begin(self, epoch, logs=None):
        self._restore()

    def on_train_end(self, logs=None):
        # fit has put the EMA weights in the model, the epoch end the statistics' average
        self._raw = None

    def _restore(self):
        if self._raw is not None:
            for variable, value in self._raw:
                variable.assign(value)
            self._raw = None


def optimizer_uses_ema(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if hasattr(inner, "optimizers"):
        return any(getattr(o, "use_ema", False) for o in inner.optimizers)
    return bool(getattr(inner, "use_ema", False))


def current_learning_rate(optimizer):
    """The optimizer's learning rate now (schedules evaluated at ``iterations``)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    value = inner.learning_rate
    return float(np.asarray(keras.ops.convert_to_numpy(value)))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds ``learning_rate`` (after the epoch's last step) to the epoch logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.model.optimizer is not None:
            logs["learning_rate"] = current_learning_rate(self.model.optimizer)


class EpochCSVLogger(keras.callbacks.Callback):
    """One CSV row per epoch: columns ``epoch`` (1-based integer) + ``keys``
    (:mod:`kdet.history` format).

    Unlike ``keras.callbacks.CSVLogger`` the columns do not depend on the
    first epoch's logs (``val_AP`` may first appear at epoch 5); a key missing
    from an epoch's logs (``val_AP`` of an epoch without evaluation) is an
    empty cell. The file is rewritten atomically after every epoch.

    ``backup``: an :class:`AtomicBackupAndRestore` earlier in the callbacks
    list. Each row is then committed together with its epoch's backup, and a
    resumed run rewrites the file from the rows stored in the backup, so the
    file lists the backup's finished epochs, each once. ``resume_from=E``
    (or, with a ``backup`` written before backups kept the rows, the backup's
    epoch) keeps the rows of epochs ``<= E`` of an existing file instead.
    """

    def __init__(self, filename, keys, resume_from=None, backup=None):
        super().__init__()
        self.filename = os.fspath(filename)
        self.keys = list(keys)
        self.resume_from = resume_from
        self.backup = backup
        self.rows = []

    def on_train_begin(self, logs=None):
        rows = None
        resume_from = self.resume_from
        if self.backup is not None:
            # the backup restored its state in its own on_train_begin, earlier in the list
            self.backup.stage_epoch_saves = True
            rows = self.backup.history
            if resume_from is None and self.backup.restored_epoch:
                resume_from = self.backup.restored_epoch
        if rows is None:
            rows = []
            if resume_from is not None and os.path.isfile(self.filename):
                rows = [r for r in read_csv_log(self.filename)
                        if r.get("epoch") is not None and r["epoch"] <= int(resume_from)]
            if self.backup is not None:
                self.backup.history = [dict(r) for r in rows]
        self.rows = [dict(r) for r in rows]
        self._write()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": int(epoch) + 1}
        for key in self.keys:
            value = logs.get(key)
            row[key] = None if value is None else float(np.asarray(value))
        self.rows.append(row)
        # history.csv first, then the backup: killed in between, the resumed run rewrites
        # the file from the backup and redoes the epoch; killed after the last epoch's
        # commit, the file is already complete
        self._write()
        if self.backup is not None and self.backup.stage_epoch_saves:
            self.backup.commit_epoch(row)

    def _write(self):
        text = format_csv(self.rows, self.keys)

        def write(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                f.write(text)
        atomic_write(self.filename, write)
