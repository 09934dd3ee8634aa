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
import math

import keras
from keras import ops

__all__ = ["SGD", "AdamW", "CoupledDecaySGD", "RecipeSchedule", "EMAWarmupMixin",
           "ema_momentum_at"]


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

    def __init__(self, *args, ema_warmup=True, ema_from_initial=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema_warmup = bool(ema_warmup)
        self.ema_from_initial = bool(ema_from_initial)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        if self.use_ema and self.ema_from_initial:
            # the references' averages start at the initial weights (timm ModelEmaV2 copies the
            # model, tf.train.ExponentialMovingAverage initialises its slots from the variables)
            for var, average in zip(variables, self._model_variables_moving_average):
                if average is not None:
                    # a copy: on JAX, assigning the variable itself shares its buffer, and
                    # the jitted train step (which donates its state) then failed with
                    # "Attempt to donate the same buffer twice"
                    average.assign(ops.copy(var))

    def _backend_apply_gradients(self, grads, trainable_variables):
        if self.use_ema and self.ema_from_initial and keras.backend.backend() == "tensorflow":
            # again before the first update, inside the train step: TensorFlow's model.fit
            # builds the optimizer where the assignment in ``build`` is lost (the averages
            # then started at zero, and fit's final EMA swap shrank the weights to ~0).
            # JAX keeps it (and its fit loses the averages if they are assigned here).
            first = ops.equal(self.iterations, 0)
            for var, average in zip(trainable_variables, self._model_variables_moving_average):
                if average is not None:
                    average.assign(ops.where(first, ops.cast(var, average.dtype), average))
        return super()._backend_apply_gradients(grads, trainable_variables)

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        if self.ema_from_initial:
            # every step averages, the first included; automl's count is the global step
            # after this update (``num_updates = global_step``), hence ``iterations + 1``
            if self.ema_warmup:
                momentum = ema_momentum_at(self.iterations + 1, self.ema_momentum)
            else:
                momentum = ops.cast(self.ema_momentum, "float32")
        elif not self.ema_warmup:
            return super()._update_model_variables_moving_average(trainable_variables)
        else:
            momentum = ema_momentum_at(self.iterations, self.ema_momentum)
            not_first_step = ops.cast(ops.not_equal(self.iterations, 0), "float32")
            momentum = momentum * not_first_step
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is None:
                continue
            m = ops.cast(momentum, var.dtype)
            average.assign(m * average + (1.0 - m) * var)

    def get_config(self):
        return dict(super().get_config(), ema_warmup=self.ema_warmup,
                    ema_from_initial=self.ema_from_initial)


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


@keras.saving.register_keras_serializable("kdet")
class CoupledDecaySGD(SGD):
    """SGD with momentum as torch.optim.SGD / TF1's MomentumOptimizer, and L2 weight decay
    coupled through the momentum (the reference trainers' decay).

    Per decayed variable (all, or with ``decay_variables="kernels"`` only those of rank > 1:
    no biases, no norm scales/offsets, as timm's ``param_groups_weight_decay`` and automl's
    ``.*(kernel|weight):0$`` L2 loss)::

        g = clip(grad) + weight_decay * w          (decay_before_clip=False: torch, timm)
        g = clip(grad + weight_decay * w)          (decay_before_clip=True: automl's L2 loss)
        buf = momentum * buf + g;  w -= lr * buf   (lr_in_momentum=False: torch, TF1)
        buf = momentum * buf + lr * g;  w -= buf   (lr_in_momentum=True: Caffe, Keras)

    The two momentum forms differ only when the learning rate changes. Keras'
    ``weight_decay`` is decoupled (``w -= lr * wd * w`` outside the momentum) and stays off.
    ``variable_clipnorm`` clips each gradient's norm before ``global_clipnorm`` (automl).
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, coupled_weight_decay=0.0,
                 decay_variables="all", decay_before_clip=False, lr_in_momentum=False,
                 variable_clipnorm=None, **kwargs):
        if kwargs.get("weight_decay"):
            raise ValueError("CoupledDecaySGD: pass coupled_weight_decay, not weight_decay")
        if decay_variables not in ("all", "kernels"):
            raise ValueError(f"decay_variables must be 'all' or 'kernels', got {decay_variables!r}")
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)
        self.coupled_weight_decay = float(coupled_weight_decay)
        self.decay_variables = decay_variables
        self.decay_before_clip = bool(decay_before_clip)
        self.lr_in_momentum = bool(lr_in_momentum)
        self.variable_clipnorm = None if variable_clipnorm is None else float(variable_clipnorm)

    def decays(self, variable):
        """Whether ``variable`` gets the weight decay."""
        if not self.coupled_weight_decay:
            return False
        return self.decay_variables == "all" or len(variable.shape) > 1

    def _with_decay(self, gradient, variable):
        if not self.decays(variable):
            return gradient
        return gradient + ops.cast(self.coupled_weight_decay, gradient.dtype) * ops.cast(
            variable, gradient.dtype)

    def _backend_apply_gradients(self, grads, trainable_variables):
        if self.decay_before_clip:
            grads = [g if g is None else self._with_decay(g, v)
                     for g, v in zip(grads, trainable_variables)]
        return super()._backend_apply_gradients(grads, trainable_variables)

    def _clip_gradients(self, grads):
        if self.variable_clipnorm:
            grads = [g if g is None else _clip_by_norm(g, self.variable_clipnorm) for g in grads]
        return super()._clip_gradients(grads)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        if not self.decay_before_clip:
            gradient = self._with_decay(gradient, variable)
        if self.momentum == 0:
            self.assign_sub(variable, gradient * learning_rate)
            return
        buf = self.momentums[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum, variable.dtype)
        if self.lr_in_momentum:
            self.assign(buf, buf * momentum + gradient * learning_rate)
            self.assign_sub(variable, buf)
        else:
            self.assign(buf, buf * momentum + gradient)
            self.assign_sub(variable, buf * learning_rate)

    def get_config(self):
        return dict(super().get_config(), coupled_weight_decay=self.coupled_weight_decay,
                    decay_variables=self.decay_variables,
                    decay_before_clip=self.decay_before_clip,
                    lr_in_momentum=self.lr_in_momentum,
                    variable_clipnorm=self.variable_clipnorm)


def _clip_by_norm(gradient, clip_norm):
    norm = ops.sqrt(ops.sum(ops.square(gradient)))
    clip_norm = ops.cast(clip_norm, gradient.dtype)
    return gradient * (clip_norm / ops.maximum(norm, clip_norm))


@keras.saving.register_keras_serializable("kdet")
class RecipeSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The reference trainers' learning-rate schedules, as functions of the step ``t``.

    ``kind``:

    * ``"torchvision"``: ``lr * gamma ** #{m in milestones: t >= m}``, times the warmup
      factor ``f + (1 - f) * t / warmup_steps`` while ``t < warmup_steps`` (``f =
      warmup_start``; references/detection engine.py's per-iteration warmup of epoch 0,
      ``MultiStepLR`` stepped per epoch: milestones are epoch starts, in steps).
    * ``"automl"``: ``warmup_start + (lr - warmup_start) * t / warmup_steps`` while ``t <
      warmup_steps``, then ``0.5 * lr * (1 + cos(pi * t / (total_steps - warmup_steps)))``
      (automl det_model_fn.cosine_lr_schedule, which uses ``t``, not ``t - warmup``).
    * ``"timm_cosine"``: timm's CosineLRScheduler stepped per epoch ``e = t //
      steps_per_epoch``: ``warmup_start + e * (lr - warmup_start) / warmup_epochs`` during
      the warmup epochs, then ``min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * e /
      cosine_epochs))``, ``min_lr`` after ``cosine_epochs``.
    """

    KINDS = ("torchvision", "automl", "timm_cosine")

    def __init__(self, kind, learning_rate, total_steps, warmup_steps=0, warmup_start=0.0,
                 milestones=(), gamma=0.1, min_learning_rate=0.0, steps_per_epoch=1,
                 cosine_epochs=None):
        if kind not in self.KINDS:
            raise ValueError(f"RecipeSchedule kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = float(warmup_start)
        self.milestones = tuple(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.min_learning_rate = float(min_learning_rate)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.cosine_epochs = None if cosine_epochs is None else float(cosine_epochs)

    def __call__(self, step):
        t = ops.cast(step, "float32")
        lr = self.learning_rate
        if self.kind == "torchvision":
            rate = ops.ones_like(t) * lr
            for milestone in self.milestones:
                rate = ops.where(t >= milestone, rate * self.gamma, rate)
            if self.warmup_steps > 0:
                f = self.warmup_start
                factor = f + (1.0 - f) * ops.minimum(t, self.warmup_steps) / self.warmup_steps
                rate = rate * factor
            return rate
        if self.kind == "automl":
            warmup = max(self.warmup_steps, 1)
            linear = self.warmup_start + t / warmup * (lr - self.warmup_start)
            decay_steps = max(self.total_steps - self.warmup_steps, 1)
            cosine = 0.5 * lr * (1.0 + ops.cos(math.pi * t / decay_steps))
            return ops.where(t < self.warmup_steps, linear, cosine)
        epoch = ops.floor(t / self.steps_per_epoch)
        warmup_epochs = self.warmup_steps / self.steps_per_epoch
        cosine_epochs = self.cosine_epochs or self.total_steps / self.steps_per_epoch
        low = self.min_learning_rate
        cosine = low + 0.5 * (lr - low) * (1.0 + ops.cos(math.pi * epoch / cosine_epochs))
        rate = ops.where(epoch < cosine_epochs, cosine, low * ops.ones_like(t))
        if warmup_epochs > 0:
            linear = self.warmup_start + epoch * (lr - self.warmup_start) / warmup_epochs
            rate = ops.where(epoch < warmup_epochs, linear, rate)
        return rate

    def get_config(self):
        return dict(kind=self.kind, learning_rate=self.learning_rate,
                    total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    warmup_start=self.warmup_start, milestones=list(self.milestones),
                    gamma=self.gamma, min_learning_rate=self.min_learning_rate,
                    steps_per_epoch=self.steps_per_epoch, cosine_epochs=self.cosine_epochs)
