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
  finished epoch) with atomic writes and the epoch stored inside the weights
  file, so weights and epoch can never disagree.
* :class:`EMAWeightsAtEpochEnd` puts the optimizer's EMA weights in the
  model at every epoch end, so the evaluation and checkpoint callbacks that
  follow it see (and save) the EMA weights; ``fit`` ends with the EMA weights
  in the model (Keras' ``finalize_variable_values``), also when stopped early.
* :class:`LearningRateLogger` and :class:`EpochCSVLogger` log the learning
  rate and a CSV with a fixed set of columns.

Order matters (Keras calls callbacks in list order with one shared ``logs``):
``[TerminateOnNaN, AtomicBackupAndRestore, EMAWeightsAtEpochEnd,
COCOEvalCallback, AtomicModelCheckpoint(s), LearningRateLogger,
EpochCSVLogger, TensorBoard]``: the backup holds the raw weights (resuming
swaps nothing back), evaluation and checkpoints see EMA weights and the loggers
see ``val_AP``. :func:`kdet.training.default_callbacks` builds that list.
``model.fit`` appends its progress bar and ``History`` last.

    >>> import keras, numpy as np, tempfile, os
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> atomic_save(model, path) == path, os.listdir(os.path.dirname(path))
    (True, ['m.keras'])
"""
import csv
import json
import math
import os
import tempfile

import keras
import numpy as np

_SUFFIXES = (".weights.h5", ".keras", ".h5")
METADATA_ATTRIBUTE = "kdet_training_metadata"
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
    """``BackupAndRestore`` with atomic writes and the epoch kept in the weights file.

    Same arguments as ``keras.callbacks.BackupAndRestore``. The backup
    (``<backup_dir>/latest.weights.h5``) holds the model and optimizer
    variables (EMA averages, step counter, momenta) and, as an HDF5 attribute,
    the training metadata ``{"epoch", "batch"}``; ``training_metadata.json``
    is still written for Keras. :func:`backup_epoch` reads it before ``fit``.
    """

    def __init__(self, backup_dir, *args, **kwargs):
        _require_private(keras.callbacks.BackupAndRestore, ("_save_model", "_load_model"))
        super().__init__(backup_dir, *args, **kwargs)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        metadata = {"epoch": int(self._current_epoch), "batch": int(self._last_batch_seen)}
        if self.double_checkpoint:  # keep the previous backup too (Keras' fallback)
            for current, previous in ((self._weights_path, self._prev_weights_path),
                                      (self._training_metadata_path,
                                       self._prev_training_metadata_path)):
                if os.path.exists(current):
                    atomic_write(previous, lambda tmp, source=current: _copy(source, tmp))

        def write(tmp):
            import h5py
            self.model.save_weights(tmp, overwrite=True)
            with h5py.File(tmp, "a") as f:
                f.attrs[METADATA_ATTRIBUTE] = json.dumps(metadata)

        atomic_write(self._weights_path, write)
        write_json_atomic(self._training_metadata_path, metadata)

    def _load_model(self):
        super()._load_model()
        metadata = read_backup_metadata(self._weights_path)
        if metadata is not None:  # the weights file is the authority
            self.model._initial_epoch = int(metadata["epoch"])


def _copy(source, target):
    import shutil
    shutil.copyfile(source, target)


def read_backup_metadata(weights_path):
    """``{"epoch", "batch"}`` stored in a backup weights file, or ``None``."""
    if not os.path.isfile(weights_path):
        return None
    import h5py
    try:
        with h5py.File(weights_path, "r") as f:
            raw = f.attrs.get(METADATA_ATTRIBUTE)
    except OSError:
        return None
    if raw is None:
        return None
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


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
    Only public optimizer API is used. Does nothing without ``use_ema``.
    """

    def __init__(self):
        super().__init__()
        self._raw = None

    def _enabled(self):
        optimizer = getattr(self.model, "optimizer", None)
        return optimizer is not None and optimizer_uses_ema(optimizer)

    def on_epoch_end(self, epoch, logs=None):
        if not self._enabled():
            return
        variables = self.model.trainable_variables
        self._raw = [keras.ops.convert_to_numpy(v) for v in variables]
        self.model.optimizer.finalize_variable_values(variables)

    def on_epoch_begin(self, epoch, logs=None):
        self._restore()

    def on_train_end(self, logs=None):
        self._raw = None  # fit has put the EMA weights in the model

    def _restore(self):
        if self._raw is not None:
            for variable, value in zip(self.model.trainable_variables, self._raw):
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
    """One CSV row per epoch with fixed columns ``epoch`` (1-based) + ``keys``.

    Unlike ``keras.callbacks.CSVLogger`` the columns do not depend on the
    first epoch's logs (``val_AP`` may first appear at epoch 5); missing
    values are left empty. ``resume_from=E`` keeps the rows of epochs
    ``<= E`` of an existing file and appends after them.
    """

    def __init__(self, filename, keys, resume_from=None):
        super().__init__()
        self.filename = os.fspath(filename)
        self.keys = list(keys)
        self.resume_from = resume_from
        self._file = None
        self._writer = None

    def on_train_begin(self, logs=None):
        directory = os.path.dirname(os.path.abspath(self.filename))
        os.makedirs(directory, exist_ok=True)
        rows = []
        if self.resume_from is not None and os.path.isfile(self.filename):
            rows = [r for r in read_csv_log(self.filename)
                    if int(r["epoch"]) <= int(self.resume_from)]
        self._file = open(self.filename, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=["epoch"] + self.keys,
                                      extrasaction="ignore")
        self._writer.writeheader()
        for row in rows:
            self._writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v))
                                       else v) for k, v in row.items()})
        self._file.flush()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1}
        for key in self.keys:
            value = logs.get(key)
            row[key] = "" if value is None else float(np.asarray(value))
        self._writer.writerow(row)
        self._file.flush()
        os.fsync(self._file.fileno())

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_csv_log(path):
    """Rows of a training CSV as dicts of floats (``None`` for empty/NA cells)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                if key is None:
                    continue
                try:
                    parsed[key] = float(value) if value not in ("", "NA", None) else None
                except ValueError:
                    parsed[key] = None
            rows.append(parsed)
    return rows
