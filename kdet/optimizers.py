"""Optimizers whose weight EMA warms up, as automl's EfficientDet recipe.

Keras' ``use_ema`` keeps ``average = m * average + (1 - m) * weights`` with a
fixed momentum ``m`` from the second step on. With automl's ``m = 0.9998`` the
average of a run of 1,000 steps still holds 82% of the step-1 weights, so
evaluating or exporting it after a short fine-tune gives an almost untrained
model. automl (``tf.train.ExponentialMovingAverage(decay, num_updates=step)``)
and timm's ``ModelEmaV2`` with warm-up use the momentum

    m_t = min(ema_momentum, (1 + t) / (10 + t))        t = steps taken

which follows the weights closely early on and reaches ``ema_momentum`` after
``9 / (1 - ema_momentum)`` steps (45,000 for 0.9998). :class:`SGD` and
:class:`AdamW` are the Keras optimizers with that schedule; ``ema_warmup=False``
gives Keras' fixed momentum back.

Example:

>>> import keras, kdet
>>> optimizer = kdet.optimizers.SGD(0.01, momentum=0.9, use_ema=True, ema_momentum=0.9998)
>>> [round(float(kdet.optimizers.ema_momentum_at(t, 0.9998)), 4) for t in (0, 90, 10 ** 6)]
[0.1, 0.91, 0.9998]
"""
import keras
from keras import ops

__all__ = ["SGD", "AdamW", "EMAWarmupMixin", "ema_momentum_at"]


def ema_momentum_at(step, ema_momentum):
    """EMA momentum after ``step`` optimizer steps: ``min(ema_momentum, (1 + t) / (10 + t))``."""
    step = ops.cast(step, "float32")
    return ops.minimum(ops.cast(ema_momentum, "float32"), (1.0 + step) / (10.0 + step))


class EMAWarmupMixin:
    """Replaces Keras' fixed EMA momentum with :func:`ema_momentum_at` (see the module doc).

    Keras keeps the averages at zero until the first step copies the weights
    into them; that first copy is unchanged. The step count ``t`` is the
    number of updates before this one (``optimizer.iterations``).
    """

    def __init__(self, *args, ema_warmup=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema_warmup = bool(ema_warmup)

    def _update_model_variables_moving_average(self, trainable_variables):
        if not (self.use_ema and self.ema_warmup):
            return super()._update_model_variables_moving_average(trainable_variables)
        momentum = ema_momentum_at(self.iterations, self.ema_momentum)
        not_first_step = ops.cast(ops.not_equal(self.iterations, 0), "float32")
        momentum = momentum * not_first_step
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is None:
                continue
            m = ops.cast(momentum, var.dtype)
            average.assign(m * average + (1.0 - m) * var)

    def get_config(self):
        return dict(super().get_config(), ema_warmup=self.ema_warmup)


@keras.saving.register_keras_serializable("kdet")
class SGD(EMAWarmupMixin, keras.optimizers.SGD):
    """``keras.optimizers.SGD`` with automl's EMA warm-up (``ema_warmup=True``)."""


@keras.saving.register_keras_serializable("kdet")
class AdamW(EMAWarmupMixin, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with automl's EMA warm-up (``ema_warmup=True``)."""


def step_decay_sgd(learning_rate, milestones, weight_decay, momentum=0.9, global_clipnorm=10.0):
    """SGD with momentum whose rate drops x0.1 at each of ``milestones`` (steps), the
    torchvision detection references' and the Fast R-CNN paper's schedule.

    >>> opt = step_decay_sgd(0.02, (60000, 80000), weight_decay=1e-4)
    >>> schedule = opt._learning_rate  # the schedule (``opt.learning_rate`` is its value now)
    >>> [round(float(schedule(s)), 6) for s in (0, 60001, 80001)]
    [0.02, 0.002, 0.0002]
    """
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[int(m) for m in milestones],
        values=[learning_rate * 0.1 ** i for i in range(len(milestones) + 1)])
    return keras.optimizers.SGD(learning_rate=schedule, momentum=momentum,
                                weight_decay=weight_decay, global_clipnorm=global_clipnorm)
