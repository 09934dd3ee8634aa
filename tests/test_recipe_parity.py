"""Step-level parity of kdet's recipes (:mod:`kdet.recipes`) with the reference trainers.

From the same initial weights and the same gradients, N optimizer steps of the optimizer
``kdet.recipes.make_optimizer`` builds and of the reference trainer's optimizer and
schedulers, stepped as its training loop steps them, give the same weights (and EMA
weights) within float tolerance:

* torchvision references/detection: ``torch.optim.SGD(momentum, weight_decay)`` (decay
  coupled through momentum), ``MultiStepLR([16, 22])`` stepped per epoch and engine.py's
  ``LinearLR`` warmup per iteration of epoch 0;
* effdet's train.py: timm ``create_optimizer`` (momentum SGD, no decay on 1-d params),
  ``create_scheduler`` (cosine per epoch with warmup epochs), ``clip_grad_norm_`` before
  the step, ``ModelEmaV2`` after it;
* automl's det_model_fn: ``tf.compat.v1.train.MomentumOptimizer``, an L2 loss over the
  ``kernel`` variables, ``tf.clip_by_norm`` per variable then ``tf.clip_by_global_norm``,
  ``ExponentialMovingAverage(num_updates=global_step)`` and automl's cosine formula.

The gradients depend on the weights (``c_t + 0.5 w``), so a wrong step diverges.
"""
import dataclasses
import re
import types

import numpy as np
import pytest

from conftest import HAVE_TORCHVISION

import keras

from kdet import recipes
from kdet.layers import averaged_batch_norms

needs_torch = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")


def _torch_net():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        torch.nn.Linear(4, 5))
    with torch.no_grad():
        for p in net.parameters():  # BN's gamma/beta away from 1/0, so decay would show
            p.add_(torch.randn_like(p) * 0.5)
    return net


def _gradients(step, weights, scale):
    """``c_t + 0.5 w``: ``c_t`` fixed per step, large enough for clipping to act."""
    rng = np.random.default_rng(100 + step)
    return [(rng.normal(0, scale, w.shape) + 0.5 * w).astype("float32") for w in weights]


def _keras_variables(arrays):
    return [keras.Variable(a, name=f"v{i}") for i, a in enumerate(arrays)]


def _keras_step(optimizer, variables, grads):
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)


def _np(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def _learning_rate(optimizer, step):
    return float(keras.ops.convert_to_numpy(optimizer._learning_rate(step)))


@needs_torch
@pytest.mark.parametrize("name", ["torchvision", "torchvision_retinanet",
                                  "torchvision_tutorial"])
def test_torchvision_sgd_warmup_multistep(name):
    import torch

    net = _torch_net()
    params = [p for p in net.parameters() if p.requires_grad]
    initial = [p.detach().numpy().copy() for p in params]
    tutorial = name == "torchvision_tutorial"
    batch, steps_per_epoch, epochs = 4, 3, 10 if tutorial else 26
    recipe = recipes.RECIPES[name]
    ours = recipes.make_optimizer(recipe, batch_size=batch, steps=epochs * steps_per_epoch,
                                  steps_per_epoch=steps_per_epoch)
    variables = _keras_variables(initial)

    # references/detection/train.py + engine.py (lr 0.02 / 0.01 per 16 images, decay 1e-4,
    # MultiStepLR([16, 22])), or the tutorial (0.005 per 2 images, decay 5e-4 on every
    # parameter, StepLR(3, 0.1)); lr scaled as their docstrings say
    lr = recipe.learning_rate / (2 if tutorial else 16) * batch
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9,
                                weight_decay=5e-4 if tutorial else 1e-4)
    scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1) if tutorial
                 else torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16, 22],
                                                           gamma=0.1))
    step = 0
    for epoch in range(epochs):
        warmup = None
        if epoch == 0:
            warmup = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0 / 1000, total_iters=min(1000, steps_per_epoch - 1))
        for _ in range(steps_per_epoch):
            expected_lr = optimizer.param_groups[0]["lr"]
            assert _learning_rate(ours, step) == pytest.approx(expected_lr, rel=1e-5), step
            grads = _gradients(step, [p.detach().numpy() for p in params], 1.0)
            optimizer.zero_grad()
            for p, g in zip(params, grads):
                p.grad = torch.from_numpy(g)
            optimizer.step()
            if warmup is not None:
                warmup.step()
            _keras_step(ours, variables, _gradients(step, _np(variables), 1.0))
            step += 1
        scheduler.step()
    for mine, theirs in zip(_np(variables), params):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=2e-5, atol=2e-6)
    assert not np.allclose(_np(variables)[0], initial[0], atol=1e-3)  # it did train


@needs_torch
def test_effdet_timm_momentum_cosine_clip_ema():
    import torch
    timm_optim = pytest.importorskip("timm.optim", reason="timm not installed")
    timm_scheduler = pytest.importorskip("timm.scheduler", reason="timm not installed")
    timm_utils = pytest.importorskip("timm.utils", reason="timm not installed")

    net = _torch_net()
    params = list(net.parameters())
    initial = [p.detach().numpy().copy() for p in params]
    # 31 epochs: timm's cosine over 30 and effdet's cool-down (10 of its 310 epochs) over 1
    batch, steps_per_epoch, epochs = 16, 2, 31
    # the EMA's decay lowered so that 62 steps move it measurably
    recipe = dataclasses.replace(recipes.RECIPES["effdet"], ema_momentum=0.9)
    ours = recipes.make_optimizer(recipe, batch_size=batch, steps=epochs * steps_per_epoch,
                                  steps_per_epoch=steps_per_epoch)
    variables = _keras_variables(initial)

    # effdet train.py's arguments (defaults, README's lr .09 for 64 images, scaled)
    args = types.SimpleNamespace(
        opt="momentum", lr=0.09 / 64 * batch, weight_decay=4e-5, momentum=0.9, sched="cosine",
        epochs=30, warmup_epochs=recipes.schedule_lengths(
            recipe, epochs * steps_per_epoch, steps_per_epoch)[2] // steps_per_epoch,
        warmup_lr=1e-4, min_lr=1e-5, cooldown_epochs=1, decay_rate=0.1, lr_noise=None)
    assert args.warmup_epochs == 5
    optimizer = timm_optim.create_optimizer(args, net)
    scheduler, num_epochs = timm_scheduler.create_scheduler(args, optimizer)
    assert num_epochs == epochs  # train.py: the cosine's epochs + the cool-down's
    ema = timm_utils.ModelEmaV2(net, decay=0.9)
    step = 0
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            expected_lr = optimizer.param_groups[0]["lr"]
            assert _learning_rate(ours, step) == pytest.approx(expected_lr, rel=1e-5), step
            grads = _gradients(step, [p.detach().numpy() for p in params], 3.0)
            optimizer.zero_grad()
            for p, g in zip(params, grads):
                p.grad = torch.from_numpy(g)
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            ema.update(net)
            _keras_step(ours, variables, _gradients(step, _np(variables), 3.0))
            step += 1
        scheduler.step(epoch + 1)
    for mine, theirs in zip(_np(variables), params):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=2e-5, atol=2e-6)
    averages = _np(ours._model_variables_moving_average)
    for mine, theirs in zip(averages, ema.module.parameters()):
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=2e-5, atol=2e-6)
    # the 1-d variables (bias, BN) had no decay, the kernels had: a decay-all optimizer differs
    assert not ours.decays(variables[1]) and ours.decays(variables[0])


def test_automl_momentum_l2_clip_ema():
    tf = pytest.importorskip("tensorflow", reason="tensorflow not installed")

    net_shapes = {"conv/kernel": (3, 3, 3, 4), "conv/bias": (4,), "bn/gamma": (4,),
                  "bn/beta": (4,), "dense/kernel": (4, 5), "dense/bias": (5,)}
    rng = np.random.default_rng(0)
    initial = [rng.normal(0, 1, s).astype("float32") for s in net_shapes.values()]
    batch, steps_per_epoch, epochs = 16, 5, 8
    total = steps_per_epoch * epochs
    ours = recipes.make_optimizer("automl", batch_size=batch, steps=total,
                                  steps_per_epoch=steps_per_epoch)
    variables = _keras_variables(initial)

    # automl det_model_fn: learning rates scaled by batch / 64, warmup of lr_warmup_epoch
    lr, warmup_init = 0.08 * batch / 64, 0.008 * batch / 64
    warmup_steps = int(1.0 * steps_per_epoch)

    def automl_lr(step):  # det_model_fn.cosine_lr_schedule, written out
        if step < warmup_steps:
            return warmup_init + step / warmup_steps * (lr - warmup_init)
        return 0.5 * lr * (1 + np.cos(np.pi * step / (total - warmup_steps)))

    ref_vars = [tf.Variable(w, name=n) for w, n in zip(initial, net_shapes)]
    global_step = tf.Variable(0, dtype=tf.int64)
    optimizer = tf.compat.v1.train.MomentumOptimizer(
        lambda: automl_lr(int(global_step.numpy())), momentum=0.9)
    ema = tf.compat.v1.train.ExponentialMovingAverage(decay=0.9998, num_updates=global_step)
    ema.apply(ref_vars)  # graph mode creates the averages from the initial weights
    decayed = re.compile(r".*(kernel|weight):0$")
    for step in range(total):
        assert _learning_rate(ours, step) == pytest.approx(automl_lr(step), rel=1e-5)
        c = _gradients(step, [np.zeros_like(w) for w in initial], 3.0)
        with tf.GradientTape() as tape:
            det_loss = tf.add_n([tf.reduce_sum(ci * v) + 0.25 * tf.reduce_sum(v * v)
                                 for ci, v in zip(c, ref_vars)])
            reg = 4e-5 * tf.add_n([tf.nn.l2_loss(v) for v in ref_vars if decayed.match(v.name)])
            loss = det_loss + reg
        grads = tape.gradient(loss, ref_vars)
        grads = [tf.clip_by_norm(g, 10.0) for g in grads]
        grads, _ = tf.clip_by_global_norm(grads, 10.0)
        optimizer.apply_gradients(zip(grads, ref_vars), global_step=global_step)
        ema.apply(ref_vars)
        _keras_step(ours, variables, _gradients(step, _np(variables), 3.0))
    for mine, theirs in zip(_np(variables), ref_vars):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=2e-5, atol=2e-6)
    for mine, v in zip(_np(ours._model_variables_moving_average), ref_vars):
        np.testing.assert_allclose(mine, ema.average(v).numpy(), rtol=2e-5, atol=2e-6)
    assert [ours.decays(v) for v in variables] == [bool(decayed.match(v.name)) for v in ref_vars]


def test_learning_rate_scales_with_the_global_batch():
    for recipe in recipes.RECIPES.values():
        for batch in (1, 8, 64):
            optimizer = recipes.make_optimizer(recipe, batch_size=batch, steps=1000,
                                               steps_per_epoch=10)
            peak = max(_learning_rate(optimizer, s) for s in range(0, 1000, 7))
            assert peak == pytest.approx(recipe.learning_rate / recipe.reference_batch * batch,
                                         rel=1e-2), (recipe.name, batch)


def test_effdet_recipe_sets_timm_backbone_batch_norm_and_lite_stochastic_depth():
    """What effdet sets in the model itself: timm builds the backbone with BatchNorm2d's
    default momentum 0.1 (Keras 0.9; effdet's BiFPN and heads use 0.01 = Keras 0.99), and
    its tf_efficientdet_lite configs have drop_path_rate 0. ``make_optimizer`` (what
    ``kdet train`` calls) applies it; the automl recipe keeps automl's 0.99 and 0.2."""
    from kdet.models import EfficientDet
    from kdet.workflow.models import make_optimizer

    def settings_of(model):
        backbone = model.get_layer("efficientnet_lite0")
        momenta = {layer.momentum for layer in backbone._flatten_layers()
                   if isinstance(layer, keras.layers.BatchNormalization)}
        head = {layer.momentum for layer in model.get_layer("class_net")._flatten_layers()
                if isinstance(layer, keras.layers.BatchNormalization)}
        drops = [layer.rate for layer in backbone._flatten_layers()
                 if isinstance(layer, keras.layers.Dropout)]
        return momenta, head, max(drops)

    # automl's drop rate: block 14 of 16 is the last with a skip
    for recipe, want in (("automl", ({0.99}, {0.99}, 0.2 * 14 / 16)),
                         ("effdet", ({0.9}, {0.99}, 0.0))):
        model = EfficientDet(phi="lite0", num_classes=2, image_size=64)
        assert settings_of(model)[2] > 0.1  # kdet's default: automl's stochastic depth
        make_optimizer(model, {"recipe": recipe, "batch_size": 2}, total_steps=10)
        momenta, head, drop = settings_of(model)
        assert momenta == want[0] and head == want[1]
        assert drop == pytest.approx(want[2])
        # both EMAs average the BN statistics with the weights' momentum and warm-up
        # (timm ModelEmaV2's state dict; automl's moving_mean/variance)
        norms = [layer for layer in model._flatten_layers()
                 if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
        assert norms and {(layer.statistics_ema_momentum, layer.statistics_ema_warmup)
                          for layer in norms} == {(0.9998, recipe == "automl")}
    model = EfficientDet(phi="lite0", num_classes=2, image_size=64)
    make_optimizer(model, {"recipe": "effdet", "batch_size": 2, "ema": False}, total_steps=10)
    assert not averaged_batch_norms(model)  # no EMA: no statistics average
    lines = recipes.describe("effdet")
    assert any("backbone BN momentum 0.9" in line and "stochastic depth off" in line
               for line in lines)


def test_kdet_train_applies_the_recipes_augmentation():
    """Where the user sets none, ``kdet train`` augments as the model's reference trainer:
    torchvision's references hflip only (``--data-augmentation hflip``), automl and
    effdet hflip + scale jitter 0.1-2.0 (no colour); a user's choice stays."""
    from kdet.workflow.models import resolve_augmentation

    for name, recipe in recipes.RECIPES.items():
        assert "flip" in recipe.augment and "hflip" in recipe.augmentation, name
        jitter = "scale" in recipe.augmentation
        assert ("scale_jitter" in recipe.augment) == jitter, name
        assert recipe.scale_range == ((0.1, 2.0) if jitter else None), name
        assert "color" not in recipe.augment, name
    stand_in = types.SimpleNamespace(RECIPE="torchvision")
    assert resolve_augmentation(stand_in, {"augment": None, "scale_range": None}) == \
        {"augment": ["flip"], "scale_range": (0.1, 2.0)}
    stand_in = types.SimpleNamespace(RECIPE="automl")
    assert resolve_augmentation(stand_in, {"augment": None, "scale_range": None}) == \
        {"augment": ["scale_jitter", "flip"], "scale_range": (0.1, 2.0)}
    chosen = {"augment": ["color"], "scale_range": (0.5, 1.5)}
    assert resolve_augmentation(stand_in, dict(chosen)) == chosen
    assert resolve_augmentation(stand_in, {"augment": [], "scale_range": None})["augment"] == []
    lines = "\n".join(recipes.describe("automl"))
    assert "augmentation: scale_jitter, flip 0.1-2 (reference: hflip + scale jitter" in lines
