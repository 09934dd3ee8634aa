"""What every export format shares: the serving graph, labels, metadata, argument checks.

The format modules (:mod:`~kdet.export.saved_model`, :mod:`~kdet.export.litert`,
:mod:`~kdet.export.onnx`) import this module and :mod:`~kdet.export.postprocess`;
:mod:`kdet.export.dispatch` (``kdet.export.export``) sits on top of them all.

Every exported graph takes raw 0-255 RGB images ``[B, H, W, 3]`` at the model's
input size (uint8 or float32) and returns final detections with NMS inside.
See :mod:`kdet.export.postprocess` for the exact decode and NMS semantics.
"""
import os

import numpy as np

from kdet.export import postprocess
from kdet.layers.conv import direct_convolutions

FORMATS = ("saved_model", "litert", "onnx")
_FORMAT_ALIASES = {"saved_model": "saved_model", "tf_saved_model": "saved_model",
                   "savedmodel": "saved_model", "litert": "litert", "tflite": "litert",
                   "onnx": "onnx"}
_EXTENSION_FORMATS = {".tflite": "litert", ".onnx": "onnx"}
QUANTIZATIONS = (None, "fp16", "dynamic", "int8")
INPUT_DTYPES = ("float32", "uint8")


def require_tensorflow_backend(what="kdet.export"):
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"{what} builds TensorFlow graphs and needs the TensorFlow backend "
            f"(KERAS_BACKEND=tensorflow); the current backend is {keras.backend.backend()!r}. "
            "Save the model as .keras and export it from a TensorFlow-backend process.")


def serving_function(model, settings, input_dtype="float32", batch_size=1, runtime="tensorflow",
                     nms="builtin", detections_per_class=None):
    """``(fn, input_signature)``: raw images -> detections, ready for a tf.function.

    Args:
        model: a dense detector (``model(images)`` gives ``cls_logits``, ``box_deltas``).
        settings: :class:`kdet.export.postprocess.PostprocessSettings`.
        input_dtype: "float32" or "uint8" (pixels 0-255 either way).
        batch_size: static batch, or None for a dynamic one.
        runtime: "tensorflow", "litert" or "onnx" (NMS threshold semantics).
        nms: "builtin" or "tflite_postprocess" (see :mod:`kdet.export.postprocess`).
    """
    import tensorflow as tf

    height, width = settings.image_size
    spec = tf.TensorSpec([batch_size, height, width, 3], tf.dtypes.as_dtype(input_dtype),
                         name="images")

    def serve(images):
        with direct_convolutions():  # portable graphs: plain Conv2D ops
            raw = model(tf.cast(images, tf.float32), training=False)
        if nms == "tflite_postprocess":
            return postprocess.ssd_detections(raw["cls_logits"], raw["box_deltas"], settings,
                                              batch_size, detections_per_class)
        return postprocess.detections(raw["cls_logits"], raw["box_deltas"], settings, runtime,
                                      batch_size)

    return serve, [spec]


def read_labels(labels, num_classes):
    """Class names from a list/tuple, a ``{label: name}`` dict or a text file (one per line)."""
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        path = os.fspath(labels)
        if not os.path.isfile(path):
            raise ValueError(f"labels file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            names = [line.rstrip("\r\n") for line in f]
        while names and not names[-1].strip():
            names.pop()
        where = f"labels file {path!r}"
    elif isinstance(labels, dict):
        try:
            names = [str(labels[i]) for i in range(num_classes)]
        except KeyError as e:
            raise ValueError(f"labels dict has no name for class {e.args[0]} "
                             f"(needs 0..{num_classes - 1})") from None
        where = "labels dict"
    else:
        names = [str(n) for n in labels]
        where = "labels"
    if len(names) != num_classes:
        raise ValueError(f"{where} has {len(names)} names but the model has "
                         f"{num_classes} classes")
    if any("\n" in n for n in names):
        raise ValueError(f"{where}: class names must not contain newlines")
    return names


def write_labels_txt(path, names):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))


def format_for_path(format, path):
    """The canonical export format for ``format`` (None: from ``path``'s extension).

    ``.tflite`` means LiteRT, ``.onnx`` ONNX, anything else a SavedModel
    directory. An explicit format that contradicts a ``.tflite``/``.onnx``
    extension is an error (a SavedModel folder named ``x.tflite`` helps nobody).
    """
    ext = os.path.splitext(os.fspath(path))[1].lower()
    implied = _EXTENSION_FORMATS.get(ext)
    if format is None:
        return implied or "saved_model"
    key = str(format).lower()
    if key not in _FORMAT_ALIASES:
        raise ValueError(f"unknown export format {format!r}; use one of {FORMATS}")
    fmt = _FORMAT_ALIASES[key]
    if implied is not None and implied != fmt:
        raise ValueError(f"export path {os.fspath(path)!r} has the extension {ext!r} of "
                         f"format={implied!r} but format={format!r} was asked; drop the format "
                         "argument or change the path")
    return fmt


def write_saved_model(model, path, settings, input_dtype="float32", batch_size=1,
                      runtime="tensorflow", nms="builtin", detections_per_class=None):
    """Write the serving graph as a ``tf.Module`` that tracks the model's ``tf.Variable`` s.

    Shared by the SavedModel export and the LiteRT converter's input. The
    module holds the TF variables under the Keras ones: tracking the Keras
    model itself gives a SavedModel that TF loads but whose weights the LiteRT
    converter does not find (it converted with zero weights), and
    ``keras.export.ExportArchive`` checkpoints every variable twice (measured:
    7.75M values for EfficientDet-D0's 3.88M).
    """
    import tensorflow as tf

    fn, signature = serving_function(model, settings, input_dtype, batch_size, runtime, nms,
                                     detections_per_class)
    module = tf.Module()
    module.model_variables = [getattr(v, "value", v) for v in model.variables]
    module.serve = tf.function(fn, input_signature=signature)
    tf.saved_model.save(module, os.fspath(path), signatures={"serving_default": module.serve})


def model_metadata(settings, fmt, input_dtype, batch_size, nms="builtin", quantization=None,
                   labels=None):
    """The JSON-able description stored with every export (read by :class:`LiteRTDetector`)."""
    return {"producer": "kdet", "version": 1, "format": fmt, "nms": nms,
            "quantization": quantization, "input_dtype": input_dtype,
            "batch_size": batch_size, "image_size": list(settings.image_size),
            "num_classes": settings.num_classes, "max_detections": settings.max_detections,
            "score_threshold": settings.score_threshold,
            "iou_threshold": settings.iou_threshold,
            "clip_to_image": settings.clip_to_image,
            "outputs": list(postprocess.SSD_KEYS if nms == "tflite_postprocess"
                            else postprocess.DETECTION_KEYS),
            "labels": labels}


def as_numpy_images(images):
    """A single image ``[H, W, C]`` or a batch / list of them -> list of arrays."""
    if isinstance(images, np.ndarray) or hasattr(images, "shape"):
        array = np.asarray(images)
        if array.ndim == 3:
            return [array]
        if array.ndim == 2:
            return [array]
        if array.ndim == 4:
            return list(array)
        raise ValueError(f"expected an image [H, W, 3] or a batch [B, H, W, 3], "
                         f"got shape {array.shape}")
    if isinstance(images, (list, tuple)):
        return [np.asarray(im) for im in images]
    raise ValueError(f"expected images as an array or a list of arrays, got "
                     f"{type(images).__name__}")
