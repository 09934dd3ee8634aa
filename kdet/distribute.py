"""Training on several devices with TensorFlow's and Keras' own engines.

kdet adds no training loop of its own: ``model.fit`` runs under

* ``"mirrored"``: ``tf.distribute.MirroredStrategy`` (TF backend, the devices of one host);
* ``"multiworker"``: ``tf.distribute.MultiWorkerMirroredStrategy`` (TF backend, several
  hosts described by the ``TF_CONFIG`` environment variable);
* ``"dataparallel"``: ``keras.distribution.DataParallel`` (JAX backend, the visible devices);
* ``"modelparallel"``: ``keras.distribution.ModelParallel`` (JAX backend): a
  ``(batch, model)`` mesh of the visible devices, the channels of every big kernel split
  over ``model`` (:func:`model_parallel_layout_map`, made for the largest EfficientDet);
* ``"none"``: one device.

Build, compile and fit inside ``strategy.scope()`` (:func:`make_strategy`). The batch
a dataset yields is the *global* batch: each of the ``R`` replicas gets ``batch / R``.

What must hold for the run to be the same whatever ``R`` (the only thing kdet's losses
need to know): a loss normalised by a count over the batch (positives, sampled anchors,
sampled RoIs, images) must use the count of the *global* batch. Under
``tf.distribute`` each replica computes the loss of its own slice and Keras sums the
replicas' gradients, so each replica returns its share ``local sum / global count``
(:func:`global_mean`); the global count is an all-reduce (:func:`all_replicas_sum`). A
per-replica count would weight an image by how many positives its *neighbours on the
same device* have. Under JAX ``DataParallel`` the loss is one ``jit`` computation on
the sharded global batch, so every sum is already global and these helpers are the
identity; the same holds for batch-norm statistics, which ``tf.distribute`` keeps per
replica unless the layers are synchronised (:func:`synchronize_batch_norm`).

    >>> import keras
    >>> strategy = make_strategy("none")
    >>> with strategy.scope():
    ...     pass  # build, compile and fit the model here
    >>> num_replicas(strategy)
    1
"""
import contextlib
import os

import keras

STRATEGIES = ("none", "mirrored", "multiworker", "dataparallel", "modelparallel")
_BACKEND_OF = {"mirrored": "tensorflow", "multiworker": "tensorflow", "dataparallel": "jax",
               "modelparallel": "jax"}


class _SingleDevice:
    """``strategy.scope()`` of the default placement on a backend without ``tf.distribute``."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def make_strategy(name="none", devices=None):
    """The distribution engine called ``name`` (one of :data:`STRATEGIES`).

    Returns an object with ``scope()``: a ``tf.distribute.Strategy`` on TensorFlow, a
    ``keras.distribution.DataParallel`` on JAX. ``devices``: the devices to use
    (``"mirrored"``: TF device names, ``"dataparallel"``: JAX devices or their
    ``"cpu:0"``-style names); all visible ones by default. ``"multiworker"`` reads the
    cluster from ``TF_CONFIG`` and must be made before any other TF op runs.
    ``"modelparallel"`` needs the model's variables: here it is one device's placement, the
    distribution is :func:`make_model_parallel` of the built model.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {name!r}")
    backend = keras.backend.backend()
    wanted = _BACKEND_OF.get(name)
    if wanted is not None and wanted != backend:
        other = {"tensorflow": "mirrored or multiworker", "jax": "dataparallel"}.get(backend)
        raise ValueError(f"strategy {name!r} needs the {wanted} backend (KERAS_BACKEND="
                         f"{wanted}); this is {backend}" + (f": use {other}" if other else ""))
    if name == "mirrored":
        import tensorflow as tf
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        import tensorflow as tf
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multiworker' reads the cluster from the TF_CONFIG "
                             "environment variable, which is not set (see docs/training.md)")
        return _multi_worker_strategy()
    if name == "dataparallel":
        return keras.distribution.DataParallel(devices=devices)
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.distribute.get_strategy()
    return _SingleDevice()


def _multi_worker_strategy():
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` takes a nested structure.

    Two mismatches of Keras 3.15 and TF 2.21 that stop ``fit`` otherwise: Keras reduces the
    first distributed batch ``(x, y)`` (a tuple holding the target dict) with one
    ``strategy.reduce`` call to build the metrics, which TF's collective strategy takes only
    for a single value (``Attempt to convert a value (PerReplica...)``); and it reduces the
    step's scalar logs with ``axis=0`` (``Invalid reduction dimension 0 for input with 0
    dimensions``). So each leaf is reduced on its own, a scalar over the replicas.
    """
    import tensorflow as tf

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            parent = super().reduce

            def one(v):
                rank = getattr(self.experimental_local_results(v)[0], "shape", None)
                scalar = rank is not None and len(rank) == 0
                return parent(reduce_op, v, None if scalar else axis)
            return tf.nest.map_structure(one, value)

    return MultiWorkerMirroredStrategy()


def num_replicas(strategy):
    """Replicas (devices, all workers together) a global batch is split over."""
    if isinstance(strategy, keras.distribution.DataParallel):
        return int(strategy.device_mesh.devices.size)
    if isinstance(strategy, keras.distribution.ModelParallel):
        mesh = strategy.device_mesh
        return int(mesh.shape[mesh.axis_names.index(strategy.batch_dim_name)])
    return int(strategy.num_replicas_in_sync)


def _channel_axis(shape):
    """The output-channel axis of a variable of ``shape``: the last one of a conv or dense
    kernel and of a vector (bias, batch-norm scale / offset / statistics), the input one of
    a depthwise kernel ``[kh, kw, C, 1]``; None for the rest (scalars)."""
    if len(shape) == 4:
        return 2 if shape[3] == 1 else 3
    if len(shape) in (1, 2):
        return len(shape) - 1
    return None


def model_parallel_layout_map(model, device_mesh, axis="model", min_size=64):
    """A ``keras.distribution.LayoutMap`` splitting ``model``'s variables over the ``axis``
    of ``device_mesh`` along their output channels; the rest is replicated.

    Made for EfficientDet (D7x: 77 M parameters): every conv, separable-conv (depthwise on
    its channels, pointwise on its outputs) and head kernel and every batch-norm vector of
    the backbone, BiFPN and heads whose channel count the axis size divides (and is at
    least ``min_size``: small vectors are not worth a collective); a channel count that
    does not divide stays whole. A conv followed by its batch norm is split the same way,
    so the norm needs no communication. Every variable has its entry (replicated:
    all ``None``) under its exact path, so each look-up is a dict hit (a missing key would
    be matched against every key as a regular expression); the paths are known once the
    model is built, so build it once without the distribution to read them, then again in
    its scope (:func:`make_model_parallel`, :func:`rebuild`). That needs paths that do not
    change from one build to the next (kdet's models name their layers; a layer named
    ``conv2d_3`` by Keras' counter gets another name in the second build and stays whole).
    """
    size = int(device_mesh.shape[device_mesh.axis_names.index(axis)])
    layout_map = keras.distribution.LayoutMap(device_mesh)
    for variable in model.weights:
        shape = tuple(variable.shape)
        channel = _channel_axis(shape)
        spec = [None] * len(shape)
        if channel is not None and shape[channel] >= min_size and shape[channel] % size == 0:
            spec[channel] = axis
        layout_map[variable.path] = tuple(spec)
    return layout_map


def make_model_parallel(model, model_axis_size=2, devices=None):
    """``keras.distribution.ModelParallel`` over a ``(batch, model)`` mesh of ``devices``
    (all visible ones by default) with ``model_axis_size`` devices on ``model``: each
    batch is split over the ``len(devices) / model_axis_size`` rows, each row holds
    one copy of the model split over its ``model_axis_size`` devices
    (:func:`model_parallel_layout_map` of ``model``). Build the model again in the
    distribution's ``scope()`` (:func:`rebuild`) and fit there.
    """
    import numpy as np

    devices = list(devices if devices is not None else keras.distribution.list_devices())
    size = int(model_axis_size)
    if size < 1 or len(devices) % size:
        raise ValueError(f"model_axis_size={model_axis_size} must divide the "
                         f"{len(devices)} devices")
    mesh = keras.distribution.DeviceMesh(
        shape=(len(devices) // size, size), axis_names=("batch", "model"),
        devices=np.asarray(devices).reshape(len(devices) // size, size))
    return keras.distribution.ModelParallel(
        layout_map=model_parallel_layout_map(model, mesh), batch_dim_name="batch")


def rebuild(model):
    """A new ``model`` of the same class and config with its weights, its variables made
    where the current ``tf.distribute`` / ``keras.distribution`` scope puts them."""
    twin = type(model).from_config(model.get_config())
    twin.set_weights(model.get_weights())
    return twin


def check_global_batch(batch_size, strategy):
    """``batch_size`` is the global batch: it must split evenly over the replicas."""
    replicas = num_replicas(strategy)
    if int(batch_size) % replicas:
        raise ValueError(f"the global batch size {batch_size} does not split over "
                         f"{replicas} replicas: use a multiple of {replicas}")
    return int(batch_size) // replicas


def is_chief():
    """True on the worker that writes files and evaluates (always, without ``TF_CONFIG``).

    The chief of ``MultiWorkerMirroredStrategy`` is task 0 of type ``"chief"`` or, when the
    cluster has no chief, ``"worker"`` 0 (TF's own rule).
    """
    import json
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    if not task:
        return True
    kind, index = task.get("type"), int(task.get("index", 0))
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in config.get("cluster", {})


def outside_strategy(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with no ``tf.distribute`` strategy in effect; returns
    its result (raises its exception).

    For what the chief of a ``MultiWorkerMirroredStrategy`` run does alone (evaluation,
    the best checkpoint): inside the strategy's scope, saving a model and predicting are
    collective (a save broadcasts from the chief, ``predict`` gathers over the workers:
    a worker that does not take part blocks both), outside it they are local. TensorFlow
    keeps the strategy scope per thread, so the function runs in a thread of its own; the
    caller waits for it. Reading a mirrored variable there gives this worker's copy.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="kdet-outside-strategy") as pool:
        return pool.submit(function, *args, **kwargs).result()  # re-raises its exception


def worker_index():
    """This worker's task index in ``TF_CONFIG`` (0 without it)."""
    import json
    task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task") or {}
    return int(task.get("index", 0))


def _replica_context():
    """The TF replica context of a multi-replica step, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def all_replicas_sum(x):
    """``x`` summed over the replicas of a ``tf.distribute`` step (the identity elsewhere,
    JAX included: there the step already sees the global batch). For counts: no gradient
    flows through."""
    x = keras.ops.stop_gradient(keras.ops.cast(x, "float32"))
    context = _replica_context()
    if context is None:
        return x
    import tensorflow as tf
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def global_mean(total, count, minimum=1.0):
    """This replica's share of ``sum over the global batch / max(global count, minimum)``.

    ``total``: the replica's sum of a loss; ``count``: the replica's count of what the
    loss averages over. The shares of all replicas add up to the mean over the global
    batch, which is what ``tf.distribute`` needs (it sums the replicas' gradients); on
    one device or under JAX ``DataParallel`` this is ``total / max(count, minimum)``.
    """
    return keras.ops.cast(total, "float32") / keras.ops.maximum(all_replicas_sum(count),
                                                                minimum)


def replica_share(value):
    """``value / R`` under a ``tf.distribute`` strategy with ``R`` replicas: for a loss every
    replica computes whole (the layers' weight regularisation), so the replicas' sum
    counts it once (what Keras' own ``compute_loss`` does for ``model.losses``)."""
    context = _replica_context()
    if context is None:
        return value
    return value / float(context.num_replicas_in_sync)


def synchronize_batch_norm(model, synchronized=True):
    """Make every ``keras.layers.BatchNormalization`` of ``model`` take its batch statistics
    over the global batch (all replicas) in training; returns how many layers it set.

    On TensorFlow this is the layers' ``synchronized`` mode (an all-reduce of the moments per
    step), for small per-device batches (EfficientDet, Mask R-CNN at 1-2 images per GPU).
    On JAX it changes nothing: under ``DataParallel`` the statistics are computed on the
    sharded global batch already. A functional model runs its layers' ``call`` again when
    ``fit`` traces, so setting the flag after building is enough.
    """
    if keras.backend.backend() != "tensorflow":
        return 0
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = bool(synchronized)
            count += 1
    return count
