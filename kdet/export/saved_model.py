"""TensorFlow SavedModel export: a ``serving_default`` signature, raw images in, detections out.

    >>> import tensorflow as tf
    >>> kdet.export.export(model, "d0_saved", batch_size=None)                 # doctest: +SKIP
    >>> serve = tf.saved_model.load("d0_saved").signatures["serving_default"]  # doctest: +SKIP
    >>> serve(images=tf.zeros([2, 256, 256, 3]))["boxes"].shape                # doctest: +SKIP
    TensorShape([2, 100, 4])

The directory also holds ``kdet_export.json`` (input size, dtype, output
layout, thresholds, labels) and ``labels.txt`` when labels are given.
"""
import json
import os

from kdet.export import core, postprocess


def export_saved_model(model, path, settings=None, input_dtype="float32", batch_size=1,
                       labels=None):
    """SavedModel of ``model`` with decode + class-aware NMS in ``serving_default``.

    Outputs ``boxes`` [B, D, 4] xyxy pixels, ``scores`` [B, D], ``labels`` [B, D]
    int32 (-1 padding), ``num_detections`` [B] int32; ``batch_size=None`` gives
    a dynamic batch. Returns ``path``.
    """
    core.require_tensorflow_backend("kdet.export.export_saved_model")
    settings = settings or postprocess.settings_from_model(model)
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"SavedModel path {path!r} is a file; give a directory")
    core.write_saved_model(model, path, settings, input_dtype, batch_size, "tensorflow")
    meta = core.model_metadata(settings, "saved_model", input_dtype, batch_size, labels=labels)
    with open(os.path.join(path, "kdet_export.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    if labels:
        core.write_labels_txt(os.path.join(path, "labels.txt"), labels)
    return path
