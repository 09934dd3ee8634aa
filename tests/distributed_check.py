"""One device vs two, in one process: tests/test_distribute.py runs this script.

The device count must be fixed before TensorFlow / JAX starts, so this runs in a fresh
interpreter with two logical CPU devices (TF: ``set_logical_device_configuration``; JAX:
``XLA_FLAGS=--xla_force_host_platform_device_count=2``). It prints one JSON line:

* ``"loss_shares"`` (TF): each R-CNN / mask / keypoint loss function and both
  ``DenseDetector`` normalisers, run by ``MirroredStrategy.run`` on the two halves of a
  batch whose halves hold different numbers of positives: the replicas' results summed
  (what Keras' gradient all-reduce adds up) and the one-device value on the whole batch;
  ``"loss_shares_local_normalizer"``: the same with the per-replica counts kdet had before
  issue #14.
* ``"fit"``: a tiny ``DenseDetector`` (one conv level, 192 anchors, with batch norm and
  weight regularisation) fitted 3 steps on one device and on two replicas
  (``MirroredStrategy`` / ``keras.distribution.DataParallel``) with the same global
  batch: the largest loss and weight differences, and the weight change for scale.
* ``"batch_norm"`` (TF): kdet's synchronised ``BatchNormalization`` (momentum 0, so the
  moving variance is the batch's unbiased variance) run on the two halves of a batch, one
  device on the whole batch, and numpy's ``var(ddof=1)``; the two-replica layer also
  averages its statistics (``statistics_ema_momentum=0.5``, two calls).
"""
import argparse
import json
import os

parser = argparse.ArgumentParser()
parser.add_argument("--normalizer", default="positives_plus_one")
args = parser.parse_args()

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2"
                               # the host "devices" are threads: on a loaded machine one
                               # reaches a collective long after the other, past XLA's
                               # default 40 s (it then aborts the process)
                               + " --xla_cpu_collective_call_terminate_timeout_seconds=1200"
                               + " --xla_cpu_collective_timeout_seconds=1200")
else:
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from kdet import distribute  # noqa: E402

from tiny_detector import CLASSES, SIZE, targets, tiny_detector  # noqa: E402

RNG = np.random.default_rng(0)


def fit(strategy, data, batch):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tiny_detector(args.normalizer)
        initial = [ops.convert_to_numpy(w) for w in model.trainable_weights]
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), jit_compile=False)
        losses = []
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda step, logs: losses.append(float(logs["loss"])))
        images, y = data
        if BACKEND == "tensorflow":
            dataset = tf.data.Dataset.from_tensor_slices((images, y)).batch(batch)
            model.fit(dataset, epochs=1, verbose=0, callbacks=[record])
        else:
            model.fit(images, y, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                      callbacks=[record])
    final = [ops.convert_to_numpy(w) for w in model.trainable_weights]
    return np.asarray(losses), initial, final


def fit_comparison():
    batch = 4
    images = RNG.uniform(0, 255, (3 * batch, SIZE, SIZE, 3)).astype("float32")
    data = (images, targets(3 * batch, RNG))
    one = fit(distribute.make_strategy("none"), data, batch)
    two = fit(TWO_REPLICAS, data, batch)
    if BACKEND == "jax":
        keras.distribution.set_distribution(None)
    return {"replicas": distribute.num_replicas(TWO_REPLICAS),
            "losses_one": one[0].tolist(), "losses_two": two[0].tolist(),
            "max_loss_diff": float(np.max(np.abs(one[0] - two[0]))),
            "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one[2], two[2])),
            "max_weight_change": max(float(np.max(np.abs(a - b)))
                                     for a, b in zip(one[1], one[2]))}


def loss_share_comparison():
    """Every loss of kdet that averages over a count: replicas' shares vs the whole batch."""
    from kdet import losses
    from kdet.models.faster_rcnn import fastrcnn_loss, rpn_loss

    batch = 4
    anchors_count, rois, columns = 50, 16, CLASSES + 1
    rpn_labels = np.where(RNG.uniform(size=(batch, anchors_count)) < 0.5, -2, -1)
    rpn_labels[2:, :20] = 0  # second half: many positives
    rpn_labels[:2, :2] = 0
    roi_labels = np.full((batch, rois), -1)
    roi_labels[:2, :1] = 1
    roi_labels[2:, :10] = RNG.integers(0, CLASSES, (2, 10))
    roi_labels[:2, -6:] = -2  # padding
    data = {
        "rpn": (RNG.normal(size=(batch, anchors_count)).astype("float32"),
                RNG.normal(size=(batch, anchors_count, 4)).astype("float32"),
                rpn_labels.astype("int32"),
                RNG.normal(size=(batch, anchors_count, 4)).astype("float32")),
        "fastrcnn": (RNG.normal(size=(batch, rois, columns)).astype("float32"),
                     RNG.normal(size=(batch, rois, 4 * columns)).astype("float32"),
                     roi_labels.astype("int32"),
                     RNG.normal(size=(batch, rois, 4)).astype("float32")),
        "mask": (RNG.normal(size=(batch, rois, 7, 7, columns)).astype("float32"),
                 np.maximum(roi_labels, 0).astype("int32") + 1,
                 RNG.uniform(size=(batch, rois, 7, 7)).round().astype("float32"),
                 roi_labels >= 0),
        "keypoint": (RNG.normal(size=(batch, rois, 5, 5, 3)).astype("float32"),
                     RNG.integers(0, 25, (batch, rois, 3)).astype("int32"),
                     np.broadcast_to((roi_labels >= 0)[..., None], (batch, rois, 3)).copy()),
    }
    model = tiny_detector("positives_per_image")
    model_plus_one = tiny_detector("positives_plus_one")
    dense_y = targets(batch, RNG)
    dense_pred = model(RNG.uniform(0, 255, (batch, SIZE, SIZE, 3)).astype("float32"))
    dense_pred = {k: ops.convert_to_numpy(v) for k, v in dense_pred.items()}
    functions = {
        "rpn": lambda *a: sum(rpn_loss(*a).values()),
        "fastrcnn": lambda *a: sum(fastrcnn_loss(*a).values()),
        "mask": lambda lg, lb, t, v: losses.mask_bce_loss(lg, lb, t, valid=v,
                                                          data_format="channels_last"),
        "keypoint": lambda lg, t, v: losses.keypoint_loss(lg, t, v, data_format="channels_last"),
        "dense_positives_per_image": lambda b, lb, c, d: model.compute_loss(
            y={"boxes": b, "labels": lb}, y_pred={"cls_logits": c, "box_deltas": d}),
        "dense_positives_plus_one": lambda b, lb, c, d: model_plus_one.compute_loss(
            y={"boxes": b, "labels": lb}, y_pred={"cls_logits": c, "box_deltas": d}),
    }
    dense = (dense_y["boxes"], dense_y["labels"], dense_pred["cls_logits"],
             dense_pred["box_deltas"])
    data["dense_positives_per_image"] = data["dense_positives_plus_one"] = dense
    strategy = TWO_REPLICAS
    out = {}
    for name, fn in functions.items():
        whole = float(fn(*data[name]))
        halves = strategy.experimental_distribute_values_from_function(
            lambda context, name=name: tuple(
                a[2 * context.replica_id_in_sync_group:2 * context.replica_id_in_sync_group + 2]
                for a in data[name]))
        step = tf.function(lambda args, fn=fn: strategy.reduce(
            "SUM", strategy.run(lambda a: fn(*a), args=(args,)), axis=None))
        total = float(step(halves))
        out[name] = {"one_device": whole, "two_replicas": total}
    return out


def batch_norm_comparison():
    from kdet.layers import BatchNormalization
    x = RNG.normal(1.0, 2.0, (4, 3, 3, 5)).astype("float32")
    one = BatchNormalization(momentum=0.0)
    one(x, training=True)
    strategy = TWO_REPLICAS
    with strategy.scope():
        two = BatchNormalization(momentum=0.0, synchronized=True, statistics_ema_momentum=0.5)
        two.build(x.shape)
    halves = strategy.experimental_distribute_values_from_function(
        lambda context: x[2 * context.replica_id_in_sync_group:
                          2 * context.replica_id_in_sync_group + 2])
    step = tf.function(lambda h: strategy.run(lambda a: two(a, training=True), args=(h,)))
    step(halves)
    step(halves)  # the statistics' average: 0.5 x (0.5 x 1 + 0.5 v) + 0.5 v
    return {"one_device": ops.convert_to_numpy(one.moving_variance).tolist(),
            "two_replicas": ops.convert_to_numpy(two.moving_variance).tolist(),
            "two_replicas_average": ops.convert_to_numpy(two.averaged_moving_variance).tolist(),
            "two_replicas_updates": float(ops.convert_to_numpy(two.statistics_updates)),
            "numpy_unbiased": x.reshape(-1, x.shape[-1]).astype("float64").var(0, ddof=1).tolist()}


# one strategy object for the whole process: a second one would reuse collective keys
TWO_REPLICAS = distribute.make_strategy("dataparallel" if BACKEND == "jax" else "mirrored")
result = {"backend": BACKEND, "fit": fit_comparison()}
if BACKEND == "tensorflow":
    result["loss_shares"] = loss_share_comparison()
    result["batch_norm"] = batch_norm_comparison()
    # what kdet did before issue #14: the counts of the replica's own slice
    # (kdet.losses imports the name: the dense normalisers' sum of positives reads it there)
    import kdet.losses as _losses
    _global_sum = distribute.all_replicas_sum
    distribute.all_replicas_sum = _losses.all_replicas_sum = lambda x: ops.cast(x, "float32")
    result["loss_shares_local_normalizer"] = loss_share_comparison()
    distribute.all_replicas_sum = _losses.all_replicas_sum = _global_sum
print("RESULT " + json.dumps(result), flush=True)
