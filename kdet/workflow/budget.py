"""Run length from a budget: ``kdet train --max-images N`` and ``--time-budget 30m``.

The learning-rate schedule is a function of the run's total steps (warmup, milestones,
cosine end: :mod:`kdet.recipes`), so the length is fixed *before* training starts and
never changes during the run: a schedule stretched or cut mid-run would not be the
recipe's. For a time budget the step time is measured first: a short probe ``fit`` of
``probe_steps + 1`` steps on the real data pipeline (the first step also pays the graph
trace), after which the weights are put back, so the run starts from the same initial
weights. The fixed cost of an epoch is measured too: the probe runs two epochs (a
new data pipeline starts at each), and the model is saved once (``last.keras`` and
the backup are written every epoch). Then the run is as many whole epochs (one pass
over the data each, as without a budget) as fit into::

    (budget - elapsed) * SAFETY - trace  >=  epochs * (steps_per_epoch * step_seconds
                                                       + epoch_seconds) + evaluations

(``trace`` = the probe's first step minus one step: the real run traces again; an
evaluation costs ``EVAL_COST`` of a training step per image), or one shorter epoch when
not even one pass fits. The chosen
``epochs`` and ``steps_per_epoch`` go into ``config.yaml``; a resumed run reads them
from there instead of measuring again, so its schedule is the interrupted run's.

The plan extrapolates the probe's step time; a machine that slows down later (other jobs
start) would make the run overrun. :func:`deadline_guard` keeps the deadline: after each
epoch it projects the end from the recent epoch times and, when the planned epochs no
longer fit, advances the optimizer's step counter before each remaining epoch so that the
schedule is sampled evenly over the epochs that fit (milestones and cosine come sooner: a
compressed schedule, still completed), and stops ``fit`` at the schedule's last step.

``--max-images`` needs no measurement (:func:`plan_epochs`):

    >>> plan_epochs(total_steps=250, steps_per_epoch=40)
    (6, 41)
    >>> plan_epochs(total_steps=25, steps_per_epoch=40)
    (1, 25)
"""
import math
import time

SAFETY = 0.9          # of the time left; the measured step time varies by a few percent
EVAL_COST = 0.5       # an evaluated image costs this fraction of a trained one (forward only)


def plan_epochs(total_steps, steps_per_epoch):
    """``(epochs, steps_per_epoch)`` with ``epochs * steps_per_epoch ~= total_steps``, the
    epoch length close to the data's (one pass), at least one step."""
    total_steps = max(1, int(total_steps))
    steps_per_epoch = max(1, int(steps_per_epoch))
    if total_steps <= steps_per_epoch:
        return 1, total_steps
    epochs = max(1, round(total_steps / steps_per_epoch))
    return epochs, max(1, total_steps // epochs)


def steps_for_images(max_images, batch_size):
    """Optimizer steps that show ``max_images`` images at ``batch_size`` (rounded up)."""
    return max(1, math.ceil(int(max_images) / int(batch_size)))


def measure_step_seconds(model, batches, probe_steps=3):
    """``(seconds per step, seconds of the first step, seconds between epochs)`` of
    ``model.fit`` on ``batches``: two epochs of ``probe_steps + 1`` steps.

    The model must be compiled (any optimizer); its weights (BatchNorm statistics too)
    are put back afterwards. The first step includes tracing; the step time is the median
    of the others within an epoch; the time between the last step of epoch 1 and the first
    of epoch 2, less a step, is what an epoch boundary costs (a new data pipeline starts).
    """
    import keras

    weights = model.get_weights()
    stamps = []

    class _Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    model.fit(batches, epochs=2, steps_per_epoch=probe_steps + 1, verbose=0,
              callbacks=[_Clock()], shuffle=False)
    model.set_weights(weights)
    first = stamps[0] - start
    per_epoch = probe_steps + 1
    gaps = sorted(b - a for epoch in (stamps[:per_epoch], stamps[per_epoch:])
                  for a, b in zip(epoch, epoch[1:])) or [first]
    step = gaps[len(gaps) // 2]
    boundary = max(0.0, stamps[per_epoch] - stamps[per_epoch - 1] - step)
    return step, first, boundary


def plan_time_budget(budget_seconds, elapsed_seconds, step_seconds, first_step_seconds,
                     steps_per_epoch, batch_size, val_images=0, eval_every=1, epoch_seconds=0.0):
    """``(epochs, steps_per_epoch, expected seconds)`` of a run that ends within the budget.

    ``epoch_seconds``: the fixed cost of an epoch (checkpoints, a new data pipeline).

    >>> plan_time_budget(600, 60, 0.5, 10.5, steps_per_epoch=100, batch_size=8)
    (9, 100, 460.0)
    """
    trace = max(0.0, first_step_seconds - step_seconds)
    per_eval = val_images * EVAL_COST * step_seconds / batch_size + (trace if val_images else 0)
    left = (budget_seconds - elapsed_seconds) * SAFETY - trace

    def cost(epochs, spe):
        evaluations = math.ceil(epochs / max(1, eval_every)) if val_images else 0
        return epochs * spe * step_seconds + epochs * epoch_seconds + evaluations * per_eval

    spe = max(1, int(steps_per_epoch))
    epochs = max(1, int(left // max(cost(1, spe), 1e-9)))
    while epochs > 1 and cost(epochs, spe) > left:
        epochs -= 1
    if cost(epochs, spe) > left:  # not even one pass: one shorter epoch
        spe = max(1, int((left - cost(1, 0)) // step_seconds))
    return epochs, spe, round(trace + cost(epochs, spe), 1)


def measure_epoch_seconds(model, directory):
    """Seconds of the per-epoch saves of ``kdet train`` (last.keras and the backup's
    weights), measured by saving the model once each way into ``directory``."""
    import os

    start = time.perf_counter()
    model.save(os.path.join(directory, "probe.keras"))
    model.save_weights(os.path.join(directory, "probe.weights.h5"))
    return time.perf_counter() - start


def format_seconds(seconds):
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _steps_done(model):
    import keras
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def _epochs_left(model, epochs, steps_per_epoch, done_epochs):
    """Epochs still to run: from the optimizer's step counter when the epoch length is known
    (a :func:`deadline_guard` may have advanced it), else from the epoch count."""
    if not steps_per_epoch:
        return epochs - done_epochs
    return max(0, math.ceil((epochs * steps_per_epoch - _steps_done(model)) / steps_per_epoch))


def deadline_guard(budget_seconds, start, epochs, steps_per_epoch, margin=0.97, verbose=1):
    """A callback that keeps a time-budget run within ``budget_seconds`` of ``start``.

    After each epoch: ``epoch_time`` = the longer of the last epoch and the mean epoch of
    this ``fit`` (conservative when the machine slows down; the first epoch without its
    first step, which pays the graph trace). An epoch's time runs from the previous epoch's
    end to this one's, so what other callbacks do between epochs (evaluation, checkpoints)
    counts; ``fit`` = the epochs that fit into ``margin``
    x the time left (at least one). When the ``R`` steps left of the schedule need more
    epochs than ``fit``, the optimizer's step counter skips ``(R - fit x steps_per_epoch)
    / fit`` steps before each remaining epoch: the learning-rate schedule of ``epochs x
    steps_per_epoch`` steps is sampled evenly (every phase, warm rate and decays, keeps its
    share) and completes, compressed, by the deadline. ``fit`` stops once the counter
    reaches the schedule's last step. ``epochs_left`` is what the ETA shows.
    """
    import keras

    total = int(epochs) * int(steps_per_epoch)

    class DeadlineGuard(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.durations = []
            self.first_step_end = None
            self.epochs_left = None
            self.last_end = None

        def on_train_batch_end(self, batch, logs=None):
            if self.first_step_end is None:
                self.first_step_end = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            now = time.monotonic()
            last_end, self.last_end = self.last_end, now
            done = _steps_done(self.model)
            steps_left = total - done
            if steps_left <= 0:
                self.model.stop_training = True
                self.epochs_left = 0
                return
            if last_end is not None:
                # end to end: the callbacks that ran after this one last epoch count
                self.durations.append(now - last_end)
            elif steps_per_epoch > 1:
                # the first step of a fit pays the graph trace (the plan counted it once):
                # the epoch's time from its other steps
                self.durations.append((now - self.first_step_end) * steps_per_epoch
                                      / (steps_per_epoch - 1))
            else:
                self.durations.append(0.0)  # decided from the next epoch on
                return
            needed = math.ceil(steps_left / steps_per_epoch)
            epoch_time = max(self.durations[-1], sum(self.durations) / len(self.durations))
            time_left = budget_seconds - (now - start)
            fit = max(1, int(time_left * margin // max(epoch_time, 1e-9)))
            if fit >= needed:
                self.epochs_left = needed
                if steps_left % steps_per_epoch:  # after a compression: end on the last step
                    self.model.optimizer.iterations.assign(done + steps_left % steps_per_epoch)
                return
            skip = steps_left - steps_per_epoch if fit == 1 else \
                (steps_left - fit * steps_per_epoch) // fit
            self.model.optimizer.iterations.assign(done + skip)
            if verbose and self.epochs_left != fit + 1:  # news, not every epoch's step
                print(f"time budget: {epoch_time:.1f} s per epoch now, {needed} epochs of "
                      f"the schedule do not fit into {format_seconds(time_left)}: the "
                      f"schedule is compressed into {fit} more epoch(s) (skips {skip} steps "
                      "before each)", flush=True)
            self.epochs_left = fit

    return DeadlineGuard()


def eta_callback(epochs, first_epoch=0, budget_seconds=None, start=None, verbose=1,
                 steps_per_epoch=None, guard=None):
    """A callback printing, before each epoch after the first and at the end, the elapsed
    time and the ETA of the run (from the mean epoch time so far) against the budget.

    It prints at the start of an epoch, before Keras' ``Epoch n/N`` line, so Keras'
    epoch line and its logs stay together. The epochs left are the ``guard``'s
    (:func:`deadline_guard`) once it has compressed the schedule, else from the
    optimizer's step counter (with ``steps_per_epoch``) or the epoch count.
    """
    import datetime

    import keras

    start = time.monotonic() if start is None else start

    class ETAProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.fit_start = time.monotonic()

        def _report(self, done_epochs):
            done = done_epochs - first_epoch
            elapsed = time.monotonic() - start
            epochs_left = getattr(guard, "epochs_left", None)
            if epochs_left is None:
                epochs_left = _epochs_left(self.model, epochs, steps_per_epoch, done_epochs)
            left = (time.monotonic() - self.fit_start) / max(done, 1) * epochs_left
            end = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=left)
            text = (f"{done_epochs}/{done_epochs + epochs_left} epochs: elapsed "
                    f"{format_seconds(elapsed)}, "
                    f"ETA {format_seconds(left)} (ends ~{end:%H:%M:%S} UTC)")
            if budget_seconds:
                text += f", budget {format_seconds(budget_seconds)}"
            if verbose:
                print(text, flush=True)

        def on_epoch_begin(self, epoch, logs=None):
            if epoch > first_epoch:
                self._report(epoch)

        def on_epoch_end(self, epoch, logs=None):
            self.last_epoch = epoch + 1

        def on_train_end(self, logs=None):
            self._report(getattr(self, "last_epoch", epochs))

    return ETAProgress()
