"""What the example scripts share: a timed log line, a progress callback for fit, a seeded
train/validation split and the learning-rate schedule."""
import os
import time

import keras


def _process_start():
    """Wall-clock time the process started (Linux /proc), else now."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


_T0_WALL = _process_start()


def log(message):
    """Print with wall and CPU time since the process started (a loaded machine distorts CPU
    time least)."""
    wall, cpu = time.time() - _T0_WALL, time.process_time()
    print(f"[{wall:6.0f}s wall {cpu:6.0f}s cpu] {message}", flush=True)


class Progress(keras.callbacks.Callback):
    """Log the first step (it traces the graph), then each Keras epoch's mean loss and the lr.

    The examples fit a repeated stream in ``epochs`` chunks, so an "epoch" here
    is a block of steps, not a pass over the data.
    """

    def __init__(self, total):
        super().__init__()
        self.total, self.step, self.epoch_start = total, 0, 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == 1:
            log(f"step 1/{self.total} loss {logs['loss']:.3f} (the first step traces the graph)")

    def on_epoch_end(self, epoch, logs=None):
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        log(f"step {self.step}/{self.total} loss {logs['loss']:.3f} (mean of steps "
            f"{self.epoch_start + 1}-{self.step}) lr {lr:.2e}")
        self.epoch_start = self.step


def chunked_cosine_schedule(steps, learning_rate, max_chunks=20):
    """``(epochs, steps_per_epoch, total, schedule)`` for fitting ``steps`` steps of a repeated
    stream in at most ``max_chunks`` Keras epochs: linear warmup (10%, at most 50 steps) to
    ``learning_rate``, then cosine decay to 1% of it."""
    epochs = min(max_chunks, steps)
    steps_per_epoch = -(-steps // epochs)
    total = epochs * steps_per_epoch
    warmup = max(1, min(50, total // 10))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=max(1, total - warmup), alpha=0.01,
        warmup_target=learning_rate, warmup_steps=warmup)
    return epochs, steps_per_epoch, total, schedule


def split(dataset, num_val, seed):
    """``(train, val)`` subsets of a kdet dataset: a seeded permutation, ``num_val`` held out."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(dataset))
    return dataset.subset(sorted(order[num_val:])), dataset.subset(sorted(order[:num_val]))
