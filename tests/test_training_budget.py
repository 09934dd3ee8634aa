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


def _schedule_completed(result, config, rows):
    """The optimizer took every planned step and the last epoch ran at the final rate."""
    epochs, spe = config["epochs"], config["steps_per_epoch"]
    assert RecipeRegressor.planned[-1] == (epochs * spe, spe)
    assert int(keras.ops.convert_to_numpy(result.model.optimizer.iterations)) == epochs * spe
    assert len(rows) == epochs
    peak = kdet.recipes.RECIPES["torchvision"].learning_rate_for(config["batch_size"])
    if epochs >= 26:  # both milestones inside the run: the last epoch is at 1% of the peak
        assert float(rows[-1]["learning_rate"]) == pytest.approx(peak * 0.01, rel=1e-4)


def test_max_images_sets_the_run_length(tmp_path):
    result, config, rows = _run(tmp_path, max_images=400, epochs=99)
    images = config["epochs"] * config["steps_per_epoch"] * config["batch_size"]
    # 400 images at batch 4: 100 steps in epochs of one pass (16 images = 4 steps)
    assert (config["epochs"], config["steps_per_epoch"]) == (25, 4) and images == 400
    _schedule_completed(result, config, rows)


def test_time_budget_run_ends_on_time(tmp_path, capsys):
    budget_seconds = 12.0
    start = time.monotonic()
    result, config, rows = _run(tmp_path, time_budget="12s", epochs=1, verbose=2)
    took = time.monotonic() - start
    out = capsys.readouterr().out
    _schedule_completed(result, config, rows)
    assert config["epochs"] * config["steps_per_epoch"] > 20  # the budget was used for steps
    # on time, within the noise of a shared CPU; and most of the budget used
    assert 0.4 * budget_seconds < took < 1.25 * budget_seconds, took
    assert "time budget 0m12s" in out and "s/step measured" in out
    assert "recipe torchvision:" in out and "lr 0.005 = 0.02 / 16 images x batch 4" in out
    assert f"1/{config['epochs']} epochs: elapsed" in out and "ETA" in out
    assert f"{config['epochs']}/{config['epochs']} epochs: elapsed" in out


def test_resumed_budget_run_keeps_its_planned_length(tmp_path, capsys):
    RecipeRegressor.planned.clear()
    settings = _settings(tmp_path, steps_per_epoch=None, num_images=16, time_budget="6s",
                         epochs=1, verbose=2)
    with pytest.raises(RuntimeError, match="simulated"):  # dies in epoch 2
        train(settings, model=_model(), extra_callbacks=[_CrashInEpoch(1, 0)])
    planned = RecipeRegressor.planned[-1]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert planned == (config["epochs"] * config["steps_per_epoch"], config["steps_per_epoch"])
    capsys.readouterr()
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
