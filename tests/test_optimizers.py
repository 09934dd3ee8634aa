"""EMA warm-up optimizers vs the written-out automl / tf.train.ExponentialMovingAverage rule."""
import keras
import numpy as np
import pytest

import kdet
from kdet.optimizers import AdamW, SGD, CoupledDecaySGD, ema_momentum_at


def _run(optimizer, steps, seed=0):
    """Apply ``steps`` random gradients to two variables; weights after each step and the EMA."""
    rng = np.random.default_rng(seed)
    variables = [keras.Variable(rng.normal(size=(3, 2)).astype("float32")),
                 keras.Variable(rng.normal(size=(4,)).astype("float32"))]
    optimizer.build(variables)
    history = []
    for _ in range(steps):
        grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
                 for v in variables]
        optimizer.apply(grads, variables)
        history.append([keras.ops.convert_to_numpy(v) for v in variables])
    averages = [keras.ops.convert_to_numpy(a) for a in optimizer._model_variables_moving_average]
    return history, averages


def _reference_ema(history, ema_momentum, warmup):
    """avg_0 = w_0; avg_t = m_t avg_{t-1} + (1 - m_t) w_t, m_t = min(m, (1 + t) / (10 + t))."""
    average = [w.astype(np.float64) for w in history[0]]
    for t, weights in enumerate(history[1:], start=1):
        m = min(ema_momentum, (1 + t) / (10 + t)) if warmup else ema_momentum
        average = [m * a + (1 - m) * w for a, w in zip(average, weights)]
    return average


def test_momentum_schedule_formula():
    for t in [0, 1, 5, 90, 1000, 44990, 45000, 10 ** 6]:
        expected = min(0.9998, (1 + t) / (10 + t))
        np.testing.assert_allclose(float(ema_momentum_at(t, 0.9998)), expected, rtol=1e-6)


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_ema_follows_warmup_rule(cls):
    optimizer = cls(learning_rate=0.1, use_ema=True, ema_momentum=0.9998)
    history, averages = _run(optimizer, 25)
    expected = _reference_ema(history, 0.9998, warmup=True)
    for got, want in zip(averages, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without warm-up the average would still sit next to the first weights.
    fixed = _reference_ema(history, 0.9998, warmup=False)
    assert np.abs(averages[0] - fixed[0]).max() > 1e-2


def test_warmup_off_equals_keras():
    _, ours = _run(SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.99, ema_warmup=False), 12)
    _, theirs = _run(keras.optimizers.SGD(0.1, momentum=0.9, use_ema=True, ema_momentum=0.99), 12)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_efficientdet_default_optimizer_warms_up_and_round_trips(tmp_path):
    model = kdet.models.EfficientDet(phi="lite0", num_classes=2, image_size=64,
                                     backbone_weights=None)
    optimizer = model.default_optimizer(steps=100)
    assert isinstance(optimizer, SGD) and optimizer.use_ema and optimizer.ema_warmup
    config = keras.optimizers.serialize(optimizer)
    restored = keras.optimizers.deserialize(config)
    assert type(restored) is CoupledDecaySGD and restored.ema_warmup
    assert restored.ema_momentum == 0.9998 and restored.ema_from_initial
    assert restored.get_config() == optimizer.get_config()  # decay, clipping, schedule


@pytest.mark.parametrize("recipe,jit_compile", [("effdet", False), ("automl", False),
                                                ("effdet", True)])
def test_recipe_ema_starts_from_the_initial_weights_in_fit(recipe, jit_compile):
    """The recipes' EMA (``ema_from_initial``) through ``model.fit``: after one step the
    averages are ``m * w0 + (1 - m) * w1`` and fit's final swap leaves them in the model.
    On TensorFlow the averages once started at zero: one step of effdet's 0.9998 left
    the model at 2e-4 of its weights. Compiled on JAX (as ``kdet train`` on an accelerator
    or with --strategy dataparallel) the averages once shared the weights' buffers and the
    jitted step failed ("Attempt to donate the same buffer twice")."""
    from kdet import recipes

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    initial = [w.copy() for w in model.get_weights()]
    optimizer = recipes.make_optimizer(recipe, batch_size=2, steps=12, steps_per_epoch=1)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    x, y = np.ones((2, 3), "float32"), np.ones((2, 2), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    # replay the one step: plain SGD at the first rate (no momentum yet, decay is tiny)
    rate = float(keras.ops.convert_to_numpy(optimizer._learning_rate(0)))
    kernel, bias = initial
    error = x @ kernel + bias - y                     # d mse / d out = 2 error / 4
    grad_kernel, grad_bias = x.T @ error / 2, error.sum(0) / 2
    trained = [kernel - rate * grad_kernel, bias - rate * grad_bias]
    m = 0.9998 if recipe == "effdet" else float(ema_momentum_at(1, 0.9998))
    for got, w0, w1 in zip(model.get_weights(), initial, trained):
        np.testing.assert_allclose(got, m * w0 + (1 - m) * w1, rtol=1e-3, atol=1e-5)
