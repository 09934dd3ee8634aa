"""A few training steps of a small detector under a distribution strategy, in its own process.

tests/test_distribute.py runs this script: the number of devices must be fixed before
TensorFlow or JAX starts (TF logical CPU devices, ``XLA_FLAGS`` for JAX), so each
setting gets a fresh interpreter. It writes the per-step losses and the final weights
to an ``.npz`` file.

    python tests/distributed_run.py --model efficientdet --replicas 2 --out /tmp/r2.npz

The data are fixed arrays: 12 images of 128 px in batches of 4, where the first two
images of each batch hold one box and the last two hold four, so the two replicas of a
batch see different numbers of positives (a per-replica loss normaliser then gives a
different run than one device). ``--local-normalizer`` restores that per-replica
normaliser, to show the comparison catches it.
"""
import argparse
import json
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--model", choices=("efficientdet", "fasterrcnn", "tiny"), required=True)
parser.add_argument("--replicas", type=int, default=1)
parser.add_argument("--strategy", default=None,
                    help="mirrored | multiworker | dataparallel | none (default: by replicas)")
parser.add_argument("--model-axis", type=int, default=2,
                    help="modelparallel: devices on the mesh's 'model' axis")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--jit-compile", type=int, default=None,
                    help="default: on for JAX (eager JAX runs every op on the sharded arrays "
                         "as its own program; on 2 host devices their all-reduces can hang), "
                         "off for TF")
parser.add_argument("--learning-rate", type=float, default=0.01)
parser.add_argument("--local-normalizer", action="store_true")
parser.add_argument("--freeze-bn", type=int, default=0,
                    help="BN layers not trainable (Keras: inference mode, moving statistics)")
parser.add_argument("--backup-dir", default=None)
parser.add_argument("--exit-after-epoch", type=int, default=None,
                    help="os._exit(3) at the end of this epoch (after the backup): a crash")
parser.add_argument("--out", required=True)
args = parser.parse_args()

backend = os.environ.get("KERAS_BACKEND", "tensorflow")
if backend == "jax":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.replicas}"
                               # the host "devices" are threads: on a loaded machine one
                               # reaches a collective long after the other, past XLA's
                               # default 40 s (it then aborts the process)
                               + " --xla_cpu_collective_call_terminate_timeout_seconds=1200"
                               + " --xla_cpu_collective_timeout_seconds=1200")
    import jax
    jax.config.update("jax_threefry_partitionable", False)  # as tests/conftest.py
else:
    import tensorflow as tf
    if args.strategy != "multiworker":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * max(args.replicas, 1))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kdet import distribute  # noqa: E402

SIZE = 128


def make_data(num_images, batch_size):
    rng = np.random.default_rng(0)
    if args.model == "tiny":
        import tiny_detector
        images = rng.uniform(0, 255, (num_images, tiny_detector.SIZE, tiny_detector.SIZE, 3))
        return images.astype("float32"), tiny_detector.targets(num_images, rng)
    images = rng.uniform(0, 255, (num_images, SIZE, SIZE, 3)).astype("float32")
    boxes = np.zeros((num_images, 4, 4), "float32")
    labels = np.full((num_images, 4), -1, "int32")
    for i in range(num_images):
        count = 1 if (i % batch_size) < batch_size // 2 else 4
        x0, y0 = rng.uniform(0, 70, (2, count))
        w, h = rng.uniform(24, 56, (2, count))
        boxes[i, :count] = np.stack([x0, y0, np.minimum(x0 + w, SIZE - 1),
                                     np.minimum(y0 + h, SIZE - 1)], -1)
        labels[i, :count] = rng.integers(0, 3, count)
    return images, {"boxes": boxes, "labels": labels}


def build_model():
    from kdet.models import EfficientDet, FasterRCNN
    if args.model == "tiny":
        import tiny_detector
        return tiny_detector.tiny_detector("positives_plus_one")
    if args.model == "efficientdet":
        # BN everywhere: synchronised over the replicas on TF (global on JAX anyway)
        model = EfficientDet(phi="lite0", num_classes=3, image_size=SIZE,
                             sync_batch_norm=not args.freeze_bn)
    else:
        # Samplers that keep every anchor / RoI (4092 anchors, 64 proposals + 4 GT per
        # image): the random subsets of the default sampler differ with the replica count.
        model = FasterRCNN(num_classes=3, backbone="resnet50", backbone_norm="frozen_batch",
                           trainable_backbone_layers=0, image_size=SIZE,
                           rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=64,
                           rpn_batch_size_per_image=8192, rpn_positive_fraction=0.5,
                           box_batch_size_per_image=1024, box_positive_fraction=1.0, seed=0)
    return adjust(model)


def adjust(model):
    for layer in model._flatten_layers():
        if args.freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0  # stochastic depth draws per replica: off for an exact comparison
    return model


def main():
    name = args.strategy or ("none" if args.replicas == 1 else
                             "dataparallel" if backend == "jax" else "mirrored")
    strategy = distribute.make_strategy(name)
    if args.local_normalizer:  # the per-replica normaliser kdet had before issue #14
        distribute.all_replicas_sum = lambda x: keras.ops.cast(x, "float32")
        import kdet.models.detector as detector
        detector.all_replicas_sum = distribute.all_replicas_sum
    num_images = args.steps * args.batch_size
    images, targets = make_data(num_images, args.batch_size)
    template = None
    if name == "modelparallel":
        # the layout map needs the variables' paths: build on one device first
        keras.utils.set_random_seed(0)
        template = build_model()
        strategy = distribute.make_model_parallel(template, args.model_axis)
    distribute.check_global_batch(args.batch_size, strategy)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = build_model() if template is None else adjust(distribute.rebuild(template))
        initial = [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.weights]
        model.compile(optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9),
                      jit_compile=bool(backend == "jax" if args.jit_compile is None
                                       else args.jit_compile))
        losses, batch_ends, cpu_ends = [], [], []

        def record(batch, logs):
            losses.append(float(logs["loss"]))
            batch_ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())  # all threads of this process
        callbacks = [keras.callbacks.LambdaCallback(on_train_batch_end=record)]
        if args.backup_dir:
            from kdet.workflow.callbacks import AtomicBackupAndRestore
            callbacks.insert(0, AtomicBackupAndRestore(args.backup_dir))
        if args.exit_after_epoch is not None:
            def crash(epoch, logs):
                if epoch + 1 == args.exit_after_epoch:
                    os._exit(3)
            callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=crash))
        if backend == "tensorflow":
            import tensorflow as tf
            data = tf.data.Dataset.from_tensor_slices((images, targets)).batch(args.batch_size)
            start = time.perf_counter()
            history = model.fit(data, epochs=args.epochs, callbacks=callbacks, verbose=0)
        else:
            start = time.perf_counter()
            history = model.fit(images, targets, batch_size=args.batch_size, epochs=args.epochs,
                                shuffle=False, callbacks=callbacks, verbose=0)
        seconds = time.perf_counter() - start
    weights = {f"w{i}": np.asarray(keras.ops.convert_to_numpy(w))
               for i, w in enumerate(model.weights)}
    weights.update({f"initial{i}": w for i, w in enumerate(initial)})
    np.savez(args.out, losses=np.asarray(losses, "float64"),
             epochs_run=len(history.epoch), replicas=distribute.num_replicas(strategy),
             **weights)
    # steps/s after the first step (which traces / compiles)
    steady = ((len(batch_ends) - 1) / (batch_ends[-1] - batch_ends[0])
              if len(batch_ends) > 1 else None)
    cpu_per_step = ((cpu_ends[-1] - cpu_ends[0]) / (len(cpu_ends) - 1)
                    if len(cpu_ends) > 1 else None)
    # variables split over devices: each device holds a slice of the array
    sharded = [v.path for v in model.weights if backend == "jax"
               and tuple(v.value.addressable_shards[0].data.shape) != tuple(v.shape)]
    print(json.dumps({"fit_seconds": seconds, "steps_per_second": steady,
                      "cpu_seconds_per_step": cpu_per_step, "batch_size": args.batch_size,
                      "sharded": sharded, "num_weights": len(model.weights),
                      "losses": losses, "epochs": history.epoch,
                      "replicas": distribute.num_replicas(strategy)}))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
