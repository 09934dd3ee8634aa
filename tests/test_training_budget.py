"""``kdet train --time-budget`` / ``--max-images``: the run length is planned before
training (:mod:`kdet.workflow.budget`) and the LR schedule of the recipe spans it.

Driven with ``tests/test_training.py``'s tiny regressor (a detector's trace costs minutes
on this CPU), compiled with a real recipe (``kdet.recipes`` "torchvision": warm-up, then
x0.1 at epochs 16 and 22 of 26), so a schedule that does not end with the run shows in the
learning rate of the last epoch.
"""
import csv
import time

import keras
import pytest
import yaml

from test_training import TinyRegressor, _CrashInEpoch, _settings

import kdet.recipes
from kdet.training import train
from kdet.workflow import budget


@keras.saving.register_keras_serializable(package="kdet_tests")
class RecipeRegressor(TinyRegressor):
    """The tiny regressor with the torchvision recipe; remembers the planned length."""

    RECIPE = "torchvision"  # what kdet train prints
    planned = []

    def default_optimizer(self, steps=100, batch_size=None, steps_per_epoch=None):
        RecipeRegressor.planned.append((steps, steps_per_epoch))
        return kdet.recipes.make_optimizer("torchvision", batch_size=batch_size, steps=steps,
                                           steps_per_epoch=steps_per_epoch)


def _model():
    keras.utils.set_random_seed(0)
    return RecipeRegressor(64)


def _run(tmp_path, **extra):
    RecipeRegressor.planned.clear()
    settings = _settings(tmp_path, steps_per_epoch=None, num_images=16, **extra)
    result = train(settings, model=_model())
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    return result, config, rows


def _schedule_completed(result, config, rows, compressed=False):
    """The optimizer took every planned step and the last epoch ended at the final rate
    (both milestones, epochs 16 and 22 of 26 scaled to the run, lie inside it);
    ``compressed``: the deadline guard may have skipped steps (fewer epochs ran)."""
    epochs, spe = config["epochs"], config["steps_per_epoch"]
    assert RecipeRegressor.planned[-1] == (epochs * spe, spe)
    assert int(keras.ops.convert_to_numpy(result.model.optimizer.iterations)) == epochs * spe
    assert len(rows) <= epochs if compressed else len(rows) == epochs
    peak = kdet.recipes.RECIPES["torchvision"].learning_rate_for(config["batch_size"])
    assert float(rows[-1]["learning_rate"]) == pytest.approx(peak * 0.01, rel=1e-4)


def _fixed_costs(monkeypatch, step=2.0, first=2.5, epoch=1.0):
    """Measured costs replaced by fixed ones, so the plan does not depend on the CPU load."""
    monkeypatch.setattr(budget, "measure_step_seconds", lambda *a, **k: (step, first, 0.0))
    monkeypatch.setattr(budget, "measure_epoch_seconds", lambda *a, **k: epoch)


def test_max_images_sets_the_run_length(tmp_path):
    result, config, rows = _run(tmp_path, max_images=48, epochs=99)
    images = config["epochs"] * config["steps_per_epoch"] * config["batch_size"]
    # 48 images at batch 4: 12 steps in epochs of one pass (16 images = 4 steps)
    assert (config["epochs"], config["steps_per_epoch"]) == (3, 4) and images == 48
    _schedule_completed(result, config, rows)


def test_time_budget_plans_from_the_measured_costs(tmp_path, capsys, monkeypatch):
    _fixed_costs(monkeypatch)
    start = time.monotonic()
    result, config, rows = _run(tmp_path, time_budget="60s", epochs=1, verbose=2)
    took = time.monotonic() - start
    out = capsys.readouterr().out
    # 9 s an epoch (4 steps of 2 s + 1 s): as many as fit into 0.9 x (60 s - setup) - 0.5 s
    left = 0.9 * (60 - took) - 0.5
    assert config["steps_per_epoch"] == 4 and left // 9 <= config["epochs"] <= 0.9 * 60 // 9
    _schedule_completed(result, config, rows)
    assert "time budget 1m00s: 2.000 s/step measured (first step 2.5 s, 1.00 s per epoch)" in out
    assert "recipe torchvision:" in out and "lr 0.005 = 0.02 / 16 images x batch 4" in out
    # the recipe's augmentation (torchvision's references: hflip only) where none was set
    assert "augmentation applied: flip\n" in out and config["augment"] == ["flip"]
    assert f"1/{config['epochs']} epochs: elapsed" in out and "ETA" in out
    assert f"{config['epochs']}/{config['epochs']} epochs: elapsed" in out


@pytest.mark.slow
def test_time_budget_run_ends_on_time(tmp_path, capsys):
    """The real measurement: a 45 s budget ends within it (with the noise of a shared CPU)
    and is mostly used. Slow: it takes the budget."""
    budget_seconds = 45.0
    start = time.monotonic()
    result, config, rows = _run(tmp_path, time_budget="45s", epochs=1, verbose=2)
    took = time.monotonic() - start
    # on a machine whose load changes, the deadline guard may compress the schedule
    _schedule_completed(result, config, rows, compressed=True)
    assert 0.5 * budget_seconds < took < 1.15 * budget_seconds, (took, capsys.readouterr().out)


class _VirtualClock:
    """Stands for the ``time`` module of :mod:`kdet.workflow.budget` and
    :mod:`kdet.training`: its seconds pass only when a :class:`_VirtualCosts` says so,
    so the guard's decisions and the run's length do not depend on the machine's load (on
    real time, stalls outside the run, such as another test's threads or a garbage
    collection, once made a 12 s run last 14.8 s in CI)."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    perf_counter = monotonic


class _VirtualCosts(keras.callbacks.Callback):
    """Each step costs ``step`` seconds of the virtual clock (the first ``first``), each
    epoch ``epoch`` more at its end: listed before the guard, so the guard sees them."""

    def __init__(self, clock, step, first, epoch):
        super().__init__()
        self.clock, self.step, self.first, self.epoch = clock, step, first, epoch
        self.stepped = False

    def on_train_batch_end(self, batch, logs=None):
        self.clock.now += self.step if self.stepped else self.first
        self.stepped = True

    def on_epoch_end(self, epoch, logs=None):
        self.clock.now += self.epoch


def test_run_that_slows_down_still_ends_on_time_with_the_schedule_completed(
        tmp_path, capsys, monkeypatch):
    """Planned from fast costs (0.01 s/step, 0.05 s/epoch: ~100 epochs in 12 s), the
    epochs then take 0.4 s more each (~40 s in all): the deadline guard skips the steps
    of the epochs that no longer fit, the run ends within the budget plus at most one
    epoch, and the schedule still reaches its final rate on its last step. Timed on a
    virtual clock (:class:`_VirtualClock`); ``test_time_budget_run_ends_on_time`` (slow)
    is the real-time run."""
    import kdet.training

    _fixed_costs(monkeypatch, step=0.01, first=0.02, epoch=0.05)
    clock = _VirtualClock()
    monkeypatch.setattr(budget, "time", clock)
    monkeypatch.setattr(kdet.training, "time", clock)
    RecipeRegressor.planned.clear()
    settings = _settings(tmp_path, steps_per_epoch=None, num_images=16, time_budget="12s",
                         epochs=1, verbose=2)
    costs = _VirtualCosts(clock, step=0.01, first=0.02, epoch=0.05 + 0.4)
    start = clock.now
    result = train(settings, model=_model(), extra_callbacks=[costs])
    took = clock.now - start
    out = capsys.readouterr().out
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    epochs, spe = config["epochs"], config["steps_per_epoch"]
    epoch_seconds = spe * 0.01 + 0.45
    assert epochs * epoch_seconds > 24, config  # without the guard: twice the budget at least
    assert took <= 12 + epoch_seconds + 1e-6, (took, out)  # >= 1 epoch is kept: + one epoch
    assert took > 12 - 2 * epoch_seconds, (took, out)  # and the budget is used
    assert 3 <= len(rows) < epochs, out
    peak = kdet.recipes.RECIPES["torchvision"].learning_rate_for(config["batch_size"])
    assert "the schedule is compressed into" in out
    # sampled evenly: the last epochs see the warm rate, the x0.1 and the x0.01 phases
    rates = sorted({round(float(r["learning_rate"]) / peak, 6) for r in rows})
    assert rates[-1] == 1.0 and 0.01 in rates and len(rates) >= 2
    assert int(keras.ops.convert_to_numpy(result.model.optimizer.iterations)) == epochs * spe
    assert float(rows[-1]["learning_rate"]) == pytest.approx(peak * 0.01, rel=1e-4)
    assert f"{len(rows)}/{len(rows)} epochs: elapsed" in out


def test_resumed_budget_run_keeps_its_planned_length(tmp_path, capsys, monkeypatch):
    _fixed_costs(monkeypatch)
    RecipeRegressor.planned.clear()
    settings = _settings(tmp_path, steps_per_epoch=None, num_images=16, time_budget="60s",
                         epochs=1, verbose=2)
    with pytest.raises(RuntimeError, match="simulated"):  # dies in epoch 2
        train(settings, model=_model(), extra_callbacks=[_CrashInEpoch(1, 0)])
    planned = RecipeRegressor.planned[-1]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert planned == (config["epochs"] * config["steps_per_epoch"], config["steps_per_epoch"])
    capsys.readouterr()
    _fixed_costs(monkeypatch, step=0.5, first=1.0)  # a new measurement would plan otherwise
    resumed = train(settings, model=_model())
    assert resumed.first_epoch == 1
    assert RecipeRegressor.planned[-1] == planned  # the same schedule, not a new plan
    assert "s/step measured" not in capsys.readouterr().out
    assert int(keras.ops.convert_to_numpy(resumed.model.optimizer.iterations)) == planned[0]


def test_plan_time_budget_fits_the_costs():
    # 100 s budget, 10 s spent, 0.1 s/step, 2 s trace, 0.5 s per epoch, 50 steps per pass
    epochs, spe, expected = budget.plan_time_budget(100, 10, 0.1, 2.1, 50, 8, epoch_seconds=0.5)
    assert expected <= (100 - 10) * budget.SAFETY
    assert expected > 0.9 * (100 - 10) * budget.SAFETY - 50 * 0.1  # within one epoch of it
    assert spe in range(40, 61)
    # evaluations of 200 images every epoch cost their share
    with_eval = budget.plan_time_budget(100, 10, 0.1, 2.1, 50, 8, val_images=200,
                                        epoch_seconds=0.5)
    assert with_eval[0] * with_eval[1] < epochs * spe and with_eval[2] <= 81


def test_deadline_guard_counts_the_time_between_epochs():
    """An epoch's cost is end to end: what runs after the guard's epoch end (callbacks
    listed after it, Keras' own bookkeeping, the next epoch's set-up) counts. Epochs of no
    time with 0.1 s between them, 1 s left, 100 epochs of 2 steps planned: the guard must
    plan <= ~10 epochs (it planned them all when it timed only epoch begin to end)."""
    import types

    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=keras.Variable(0)),
                                  stop_training=False)
    guard = budget.deadline_guard(1.0, time.monotonic(), epochs=100, steps_per_epoch=2,
                                  verbose=0)
    guard.set_model(model)
    guard.on_train_begin()
    for epoch in range(3):
        guard.on_epoch_begin(epoch)
        for step in range(2):
            model.optimizer.iterations.assign(model.optimizer.iterations + 1)
            guard.on_train_batch_end(step)
        guard.on_epoch_end(epoch)
        time.sleep(0.1)  # a later callback, outside the guard's epoch
    assert guard.epochs_left is not None and guard.epochs_left <= 10, guard.epochs_left
