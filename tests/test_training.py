"""Training workflow: atomic checkpoints, exact resume, EMA handling, epoch-indexed data.

The fit/resume machinery does not depend on the architecture, so most tests
drive :func:`kdet.training.train` with a tiny regression model (a detector's
first trace costs minutes on this CPU); the end-to-end detector run is in
``tests/test_cli.py`` (marked slow).
"""
import csv
import json
import os
import re

import keras
import numpy as np
import pytest
from keras import ops

from kdet.workflow import callbacks as cb
from kdet.workflow import data as wdata


@keras.saving.register_keras_serializable(package="kdet_tests")
class TinyRegressor(keras.Model):
    """Regresses the first box of each image: just enough model for the fit/resume plumbing
    (conv + BatchNorm, so non-trainable state is covered too)."""

    def __init__(self, image_size=64, ema_momentum=0.5, name="tiny", **kwargs):
        inputs = keras.Input((image_size, image_size, 3), name="images")
        x = keras.layers.Rescaling(1 / 255.0)(inputs)
        x = keras.layers.Conv2D(4, 3, strides=4)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(4)(x)
        super().__init__(inputs, outputs, name=name, **kwargs)
        self.image_size = (image_size, image_size)
        self.num_classes = 3
        self.ema_momentum = ema_momentum

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return ops.mean(ops.abs(y_pred - y["boxes"][:, 0] / self.image_size[0]))

    def default_optimizer(self, steps=100, learning_rate=0.05):
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9, use_ema=True,
                                    ema_momentum=self.ema_momentum)

    def get_config(self):
        return {"image_size": self.image_size[0], "ema_momentum": self.ema_momentum,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _settings(out, **extra):
    settings = {"format": "shapes", "num_images": 8, "val_num_images": 0, "image_size": 64,
                "epochs": 3, "steps_per_epoch": 2, "batch_size": 4, "output_dir": str(out),
                "verbose": 0, "seed": 3, "tensorboard": False}
    settings.update(extra)
    return settings


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return TinyRegressor(64)


def _all_state(model):
    """Model weights (trainable and not) and optimizer variables, as numpy."""
    state = [np.asarray(v) for v in model.weights]
    state += [np.asarray(v) for v in model.optimizer.variables]
    return state


# ---- atomic checkpoints -----------------------------------------------------------------------
def _small_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    return model


def _crashing_save(monkeypatch, method):
    """Make ``keras.Model.<method>`` write half a file to its target, then raise."""
    def crash(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(keras.Model, method, crash)


def test_model_checkpoint_crash_while_saving_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.keras"
    model = _small_model()
    checkpoint = cb.AtomicModelCheckpoint(str(path), monitor="val_AP", mode="max",
                                          save_best_only=True, verbose=0)
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    checkpoint.on_epoch_end(0, {"loss": 1.0, "val_AP": 0.1})
    good = [np.asarray(w) for w in model.get_weights()]
    assert json.loads((tmp_path / "best.keras.json").read_text()) == {
        "epoch": 1, "monitor": "val_AP", "best": pytest.approx(0.1)}

    model.set_weights([w + 1 for w in good])
    checkpoint.on_epoch_end(1, {"loss": 1.0})  # not evaluated: no save, no warning-and-save
    checkpoint.on_epoch_end(2, {"loss": 1.0, "val_AP": 0.05})  # worse: no save
    assert cb.read_best(str(path), "val_AP") == pytest.approx(0.1)

    _crashing_save(monkeypatch, "save")
    with pytest.raises(OSError, match="simulated"):
        checkpoint.on_epoch_end(3, {"loss": 1.0, "val_AP": 0.5})
    monkeypatch.undo()
    loaded = keras.saving.load_model(str(path), safe_mode=True)
    for a, b in zip(loaded.get_weights(), good):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["best.keras", "best.keras.json"]  # no temp left
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    # the same crash through Keras' own ModelCheckpoint destroys the last good file:
    # what the atomic one exists for
    plain = keras.callbacks.ModelCheckpoint(str(path), monitor="val_AP", mode="max",
                                            save_best_only=True, verbose=0)
    plain.set_model(model)
    _crashing_save(monkeypatch, "save")
    with pytest.raises(OSError):
        plain.on_epoch_end(0, {"val_AP": 0.9})
    monkeypatch.undo()
    with pytest.raises(Exception):
        keras.saving.load_model(str(path), safe_mode=True)


def test_checkpoint_never_overwritten_by_a_nan_model(tmp_path):
    path = tmp_path / "last.keras"
    model = _small_model()
    checkpoint = cb.FiniteLossCheckpoint(str(path), save_best_only=False, verbose=0)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 0.5})
    before = path.read_bytes()
    model.set_weights([w * np.nan for w in model.get_weights()])
    checkpoint.on_epoch_end(1, {"loss": float("nan")})
    assert path.read_bytes() == before


def test_backup_crash_while_saving_keeps_previous_backup(tmp_path, monkeypatch):
    backup = cb.AtomicBackupAndRestore(str(tmp_path / "backup"))
    model = _small_model()
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    backup.set_model(model)
    backup.on_epoch_end(1)  # two epochs done
    good = [np.asarray(w) for w in model.get_weights()]
    assert cb.backup_epoch(str(tmp_path / "backup")) == 2
    assert cb.read_backup_metadata(str(tmp_path / "backup" / "latest.weights.h5")) == {
        "epoch": 2, "batch": 0}

    model.set_weights([w + 1 for w in good])
    _crashing_save(monkeypatch, "save_weights")
    with pytest.raises(OSError, match="simulated"):
        backup.on_epoch_end(2)
    monkeypatch.undo()
    assert cb.backup_epoch(str(tmp_path / "backup")) == 2
    restored = _small_model()
    restored.compile(optimizer="sgd", loss="mse")
    restored.optimizer.build(restored.trainable_variables)
    restore = cb.AtomicBackupAndRestore(str(tmp_path / "backup"))
    restore.set_model(restored)
    restore.on_train_begin()
    for a, b in zip(restored.get_weights(), good):
        np.testing.assert_array_equal(a, b)
    assert restored._initial_epoch == 2


def test_csv_logger_fixed_columns_and_resume(tmp_path):
    path = tmp_path / "history.csv"
    logger = cb.EpochCSVLogger(str(path), ["loss", "val_AP"])
    logger.on_train_begin()
    logger.on_epoch_end(0, {"loss": 3.0})
    logger.on_epoch_end(1, {"loss": 2.0, "val_AP": 0.25})
    logger.on_epoch_end(2, {"loss": 1.0})
    logger.on_train_end()
    rows = cb.read_csv_log(str(path))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["val_AP"] for r in rows] == [None, 0.25, None]
    resumed = cb.EpochCSVLogger(str(path), ["loss", "val_AP"], resume_from=2)
    resumed.on_train_begin()
    resumed.on_epoch_end(2, {"loss": 0.5})
    resumed.on_train_end()
    rows = cb.read_csv_log(str(path))
    assert [(r["epoch"], r["loss"]) for r in rows] == [(1, 3.0), (2, 2.0), (3, 0.5)]


# ---- data ----------------------------------------------------------------------------------
def test_training_batches_are_epoch_indexed():
    from kdet.data import ShapesDataset

    dataset = ShapesDataset(6, image_size=64, seed=1)
    kwargs = dict(image_size=64, batch_size=2, steps_per_epoch=4, seed=5, epochs=3)
    # a global seed (as train() sets) must not break the pipeline; tf.data's op seeds
    # depend on it, so both runs set the same one
    keras.utils.set_random_seed(123)
    full = list(wdata.training_batches(dataset, first_epoch=0, **kwargs).as_numpy_iterator())
    keras.utils.set_random_seed(123)
    tail = list(wdata.training_batches(dataset, first_epoch=2, **kwargs).as_numpy_iterator())
    assert len(full) == 12 and len(tail) == 4
    for (xa, ya), (xb, yb) in zip(full[8:], tail):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya["boxes"], yb["boxes"])
        assert set(ya) == {"boxes", "labels"}
    # epochs differ from each other (reshuffled, re-augmented)
    assert not np.array_equal(full[0][0], full[4][0])


def test_read_datasets_val_fraction_is_a_fixed_disjoint_split():
    settings = {"format": "shapes", "num_images": 20, "val_num_images": 0, "image_size": 64,
                "val_fraction": 0.25, "seed": 7}
    train, val = wdata.read_datasets(settings)
    again_train, again_val = wdata.read_datasets(settings)
    ids = lambda d: [r["image_id"] for r in d.records]  # noqa: E731
    assert len(val) == 5 and len(train) == 15
    assert not set(ids(train)) & set(ids(val))
    assert ids(val) == ids(again_val) and ids(train) == ids(again_train)


# ---- EMA ---------------------------------------------------------------------------------------
class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.after_batch, self.at_epoch_end, self.at_epoch_begin = [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.at_epoch_begin.append([np.asarray(v) for v in self.model.trainable_variables])

    def on_train_batch_end(self, batch, logs=None):
        self.after_batch.append([np.asarray(v) for v in self.model.trainable_variables])

    def on_epoch_end(self, epoch, logs=None):
        self.at_epoch_end.append([np.asarray(v) for v in self.model.trainable_variables])


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.stop_training = True


@pytest.mark.parametrize("stop_early", [False, True])
def test_ema_weights_are_what_callbacks_see_and_what_fit_leaves(stop_early):
    """Reference EMA from the raw weights after each step (Keras: avg = w after the first
    step, then avg = m * avg + (1 - m) * w)."""
    keras.utils.set_random_seed(0)
    model = TinyRegressor(32, ema_momentum=0.6)
    model.compile(optimizer=model.default_optimizer())
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = {"boxes": rng.uniform(0, 32, (8, 2, 4)).astype("float32"),
         "labels": np.zeros((8, 2), "int32")}
    raw, seen = _Recorder(), _Recorder()
    callbacks = [raw, cb.EMAWeightsAtEpochEnd(), seen]
    if stop_early:
        callbacks.append(_StopAfter(0))
    model.fit(x, y, batch_size=4, epochs=3, callbacks=callbacks, verbose=0, shuffle=False)
    momentum = 0.6
    ema, per_epoch = None, []
    for step, weights in enumerate(raw.after_batch):
        ema = weights if ema is None else [momentum * a + (1 - momentum) * w
                                           for a, w in zip(ema, weights)]
        if step % 2 == 1:
            per_epoch.append(ema)
    assert len(seen.at_epoch_end) == (1 if stop_early else 3)
    for epoch, weights in enumerate(seen.at_epoch_end):
        for a, b in zip(weights, per_epoch[epoch]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # training went on from the raw weights, not from the EMA
    if not stop_early:
        assert not np.allclose(raw.at_epoch_end[1][0], seen.at_epoch_end[1][0])
        for epoch in (1, 2):
            for a, b in zip(seen.at_epoch_begin[epoch], raw.at_epoch_end[epoch - 1]):
                np.testing.assert_array_equal(a, b)
    # fit ends with the EMA weights in the model
    for a, b in zip(model.trainable_variables, per_epoch[len(seen.at_epoch_end) - 1]):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)


# ---- train(): resume ---------------------------------------------------------------------------
class _CrashInEpoch(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == self.batch:
            raise RuntimeError("killed (simulated)")


def test_interrupted_run_resumes_and_matches_uninterrupted_run(tmp_path):
    from kdet.training import train

    straight = train(_settings(tmp_path / "straight"), model=_tiny_model())
    assert straight.history.epoch == [0, 1, 2]

    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated"):  # dies in epoch 3, after its 1st step
        train(_settings(out), model=_tiny_model(), extra_callbacks=[_CrashInEpoch(2, 0)])
    assert cb.backup_epoch(str(out / "backup")) == 2
    assert [r["epoch"] for r in cb.read_csv_log(str(out / "history.csv"))] == [1, 2]

    resumed = train(_settings(out), model=_tiny_model(seed=99))  # other init: must be restored
    assert resumed.first_epoch == 2
    assert resumed.history.epoch == [2]
    assert not (out / "backup").exists()  # removed when the run finished
    for a, b in zip(_all_state(resumed.model), _all_state(straight.model)):
        np.testing.assert_array_equal(a, b)
    rows_straight = cb.read_csv_log(str(tmp_path / "straight" / "history.csv"))
    rows_resumed = cb.read_csv_log(str(out / "history.csv"))
    assert [r["epoch"] for r in rows_resumed] == [1, 2, 3]
    assert [r["loss"] for r in rows_resumed] == [r["loss"] for r in rows_straight]
    last = keras.saving.load_model(str(out / "last.keras"), safe_mode=True)
    for a, b in zip(last.weights, resumed.model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_refuses_a_finished_backup_and_bad_settings(tmp_path):
    from kdet.training import train

    backup = tmp_path / "run" / "backup"
    backup.mkdir(parents=True)
    model = _small_model()
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    saver = cb.AtomicBackupAndRestore(str(backup))
    saver.set_model(model)
    saver.on_epoch_end(2)  # 3 epochs done
    with pytest.raises(ValueError, match="3 finished epochs"):
        train(_settings(tmp_path / "run"), model=_tiny_model())
    with pytest.raises(ValueError, match="unknown setting 'epoch'.*'epochs'"):
        train({"format": "shapes", "epoch": 3})
    with pytest.raises(ValueError, match="format"):
        train({"format": "pascal"})


def test_train_writes_labels_config_and_csv(tmp_path):
    """One short tiny-model run: the files kdet train promises (minus eval, see test_cli)."""
    from kdet.training import train
    from kdet.workflow.config import load_config_file

    out = tmp_path / "run"
    result = train(_settings(out, epochs=1, steps_per_epoch=1), model=_tiny_model())
    assert (out / "labels.txt").read_text().split() == ["circle", "square", "triangle"]
    saved = load_config_file(str(out / "config.yaml"))
    assert saved["epochs"] == 1 and saved["image_size"] == 64 and saved["num_classes"] == 3
    with open(out / "history.csv") as f:
        header = next(csv.reader(f))
    assert header == ["epoch", "loss", "learning_rate"]
    rows = cb.read_csv_log(str(out / "history.csv"))
    assert rows[0]["learning_rate"] == pytest.approx(0.05)
    assert result.best_checkpoint is None and os.path.isfile(result.last_checkpoint)


# ---- train(): a kill at the end of an epoch --------------------------------------------------
@pytest.fixture(scope="module")
def straight_history(tmp_path_factory):
    """history.csv rows of an uninterrupted 3-epoch run (the reference of the resumed runs)."""
    from kdet.training import train

    out = tmp_path_factory.mktemp("straight")
    train(_settings(out), model=_tiny_model())
    return cb.read_csv_log(str(out / "history.csv"))


def _kill_after(callbacks, class_name, epoch):
    """Make the ``class_name`` callback raise right after its ``on_epoch_end`` of ``epoch``."""
    target = next(c for c in callbacks if type(c).__name__ == class_name)
    inner = target.on_epoch_end

    def on_epoch_end(index, logs=None):
        inner(index, logs)
        if index == epoch:
            raise RuntimeError("killed (simulated)")
    target.on_epoch_end = on_epoch_end


# (where, epoch index): killed right after that callback's on_epoch_end, or in the logger
# between writing history.csv and committing the backup
KILL_POINTS = {
    "after the backup is staged": ("AtomicBackupAndRestore", 1),
    "after last.keras": ("FiniteLossCheckpoint", 1),
    "between history.csv and the backup commit": ("commit", 1),
    "after the commit": ("EpochCSVLogger", 1),
    "after the last epoch's commit": ("EpochCSVLogger", 2),
}


@pytest.mark.parametrize("kill_point", [
    "after the backup is staged", pytest.param("after last.keras", marks=pytest.mark.slow),
    "between history.csv and the backup commit",
    pytest.param("after the commit", marks=pytest.mark.slow),
    pytest.param("after the last epoch's commit", marks=pytest.mark.slow)])
def test_kill_at_the_end_of_an_epoch_keeps_backup_and_history_together(
        tmp_path, monkeypatch, kill_point, straight_history):
    """The issue: a kill between the backup and the history row left epoch 3 in the backup
    but not in history.csv (the rerun then wrote 1, 2, 4), and rows came back as 1.0, 2.0."""
    from kdet import training

    where, epoch = KILL_POINTS[kill_point]
    default_callbacks = training.default_callbacks

    def with_kill(model, output_dir, **kwargs):
        callbacks = default_callbacks(model, output_dir, **kwargs)
        if where != "commit":
            _kill_after(callbacks, where, epoch)
        return callbacks

    monkeypatch.setattr(training, "default_callbacks", with_kill)
    if where == "commit":
        commit = cb.AtomicBackupAndRestore.commit_epoch

        def killed_before_commit(self, row):
            if row["epoch"] == epoch + 1:
                raise RuntimeError("killed (simulated)")
            return commit(self, row)
        monkeypatch.setattr(cb.AtomicBackupAndRestore, "commit_epoch", killed_before_commit)

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        training.train(_settings(out), model=_tiny_model())
    monkeypatch.undo()
    committed = cb.backup_epoch(str(out / "backup"))
    # the backup counts an epoch only once its history row is committed with it
    assert committed == (epoch + 1 if where == "EpochCSVLogger" else epoch)

    if committed == 3:  # all done: nothing to resume, and history.csv is complete
        with pytest.raises(ValueError, match="3 finished epochs"):
            training.train(_settings(out), model=_tiny_model(seed=99))
    else:
        resumed = training.train(_settings(out), model=_tiny_model(seed=99))
        assert resumed.first_epoch == committed
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0] == "epoch,loss,learning_rate"
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]  # each once, integers
    rows = cb.read_csv_log(str(out / "history.csv"))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_history]
    assert [r["learning_rate"] for r in rows] == [r["learning_rate"] for r in straight_history]


def test_backup_keeps_history_rows_beyond_an_hdf5_attribute(tmp_path):
    """300 epochs x 15 columns of history (> 64 KiB, where HDF5 attributes stop) fit in the
    backup and come back exactly, NaN and empty cells included."""
    model = _small_model()
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    keys = [f"k{i}" for i in range(14)]
    backup = cb.AtomicBackupAndRestore(str(tmp_path / "backup"))
    logger = cb.EpochCSVLogger(str(tmp_path / "history.csv"), keys, backup=backup)
    for callback in (backup, logger):
        callback.set_model(model)
        callback.on_train_begin()
    rng = np.random.default_rng(0)
    earlier = [{"epoch": e + 1, **{k: (float(rng.normal()) if (e + i) % 3 else None)
                                   for i, k in enumerate(keys)}} for e in range(299)]
    earlier[5]["k1"] = float("nan")  # a diverged loss is a value too
    backup.history, logger.rows = list(earlier), list(earlier)  # as restored after 299 epochs
    backup.on_epoch_end(299)
    logger.on_epoch_end(299, {"k0": 0.5})
    written = cb.read_csv_log(str(tmp_path / "history.csv"))
    assert len(json.dumps(written)) > 65536
    restored = cb.AtomicBackupAndRestore(str(tmp_path / "backup"))
    restored.set_model(model)
    restored.on_train_begin()
    assert restored.restored_epoch == 300
    assert [r["epoch"] for r in written] == list(range(1, 301))
    assert np.isnan(written[5]["k1"]) and np.isnan(restored.history[5]["k1"])
    written[5]["k1"] = restored.history[5]["k1"] = None  # nan != nan
    assert restored.history == written
    assert written[-1] == {"epoch": 300, "k0": 0.5, **{k: None for k in keys[1:]}}
    assert written[0]["k0"] is None and written[1]["k2"] is None  # not logged: empty


def test_history_logger_must_follow_its_backup(tmp_path):
    model = _small_model()
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    backup = cb.AtomicBackupAndRestore(str(tmp_path / "backup"))
    logger = cb.EpochCSVLogger(str(tmp_path / "history.csv"), ["loss"], backup=backup)
    for callback in (backup, logger):
        callback.set_model(model)
        callback.on_train_begin()
    with pytest.raises(RuntimeError, match="must come after its AtomicBackupAndRestore"):
        logger.on_epoch_end(0, {"loss": 1.0})  # before the backup's on_epoch_end


# ---- train(): epochs without evaluation -------------------------------------------------------
@keras.saving.register_keras_serializable(package="kdet_tests")
class TinyDetector(TinyRegressor):
    """TinyRegressor whose predictions are one detection per image (its regressed box, class
    0, score 0.9): enough for the COCO evaluation callback."""

    def predict_on_batch(self, x):
        raw = np.asarray(self(x, training=False)) * self.image_size[0]
        boxes = np.concatenate([np.minimum(raw[:, :2], raw[:, 2:]),
                                np.maximum(raw[:, :2], raw[:, 2:])], axis=1)
        batch = len(boxes)
        return {"boxes": boxes[:, None, :], "scores": np.full((batch, 1), 0.9, "float32"),
                "labels": np.zeros((batch, 1), "int32"),
                "num_detections": np.ones((batch,), "int32")}


def test_epochs_without_evaluation_have_no_validation_metrics(tmp_path, capsys, monkeypatch):
    """--eval-every 2: epochs 1 and 3 are not evaluated, so history.csv leaves their val_*
    cells empty (not epoch 2's values), the epoch line shows no val_AP and the training-curve
    plot draws epoch 2's AP only."""
    from kdet import visualize
    from kdet.training import train

    out = tmp_path / "run"
    keras.utils.set_random_seed(0)
    train(_settings(out, val_num_images=4, eval_every=2, verbose=2), model=TinyDetector(64))
    printed = capsys.readouterr().out
    rows = cb.read_csv_log(str(out / "history.csv"))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in (rows[0], rows[2]):
        assert all(row[k] is None for k in row if k.startswith("val_")), row
    assert all(rows[1][k] is not None for k in rows[1] if k.startswith("val_"))
    assert json.loads((out / "best.keras.json").read_text())["epoch"] == 2
    # verbose=2: Keras prints "Epoch 3/3" then the epoch's logs on one line
    lines = [line for line in printed.splitlines() if line.strip()]
    epoch_logs = {int(line.split()[1].split("/")[0]): lines[i + 1]
                  for i, line in enumerate(lines) if re.fullmatch(r"Epoch \d+/3", line)}
    assert "loss" in epoch_logs[3] and "val_AP" not in epoch_logs[3], printed
    assert "val_AP" in epoch_logs[2] and "val_AP" not in epoch_logs[1]
    assert printed.count("COCO evaluation") == 1

    figures = []
    figure = visualize._figure
    monkeypatch.setattr(visualize, "_figure", lambda *a: figures.append(figure(*a)) or figures[-1])
    visualize.plot_training_curves(str(out / "history.csv"), str(tmp_path / "curves.png"))
    ap_axes = [ax for ax in figures[0].axes if ax.get_title() == "validation AP"][0]
    ap_line = [line for line in ap_axes.get_lines() if line.get_label() == "val_AP"][0]
    assert list(ap_line.get_xdata()) == [2]
    assert list(ap_line.get_ydata()) == [rows[1]["val_AP"]]


@pytest.mark.slow
def test_process_killed_after_staging_the_backup_resumes_with_history_once(tmp_path):
    """A real process death (``os._exit``: no ``finally``, no clean-up) right after the
    backup of epoch 2 is staged, then the same command again."""
    import subprocess
    import sys
    import textwrap

    from kdet.training import train

    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import test_training as t
        from kdet import training
        from kdet.workflow import callbacks as cb

        stage = cb.AtomicBackupAndRestore._save_model

        def save_then_die(self):
            stage(self)
            if self._current_epoch == 2:  # epoch 2 finished: its backup written
                os._exit(9)
        cb.AtomicBackupAndRestore._save_model = save_then_die
        training.train(t._settings({str(out)!r}), model=t._tiny_model())
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert cb.backup_epoch(str(out / "backup")) == 1
    resumed = train(_settings(out), model=_tiny_model(seed=99))
    assert resumed.first_epoch == 1
    lines = (out / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]
