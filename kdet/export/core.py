"""``kdet.export.export``: one entry for SavedModel, LiteRT and ONNX, post-processing inside.

Every exported graph takes raw 0-255 RGB images ``[B, H, W, 3]`` at the model's
input size (uint8 or float32) and returns final detections with NMS inside,
so a phone, a browser or a server needs nothing from kdet to use it:

    >>> import kdet
    >>> model = kdet.models.EfficientDet(phi=0, num_classes=3, image_size=256)  # doctest: +SKIP
    >>> kdet.export.export(model, "d0.tflite", format="litert", input_dtype="uint8",
    ...                    labels=["circle", "square", "triangle"])           # doctest: +SKIP
    >>> kdet.export.LiteRTDetector("d0.tflite").predict(image)["boxes"]      # doctest: +SKIP

See :mod:`kdet.export.postprocess` for the exact decode and NMS semantics.
"""
import os

import numpy as np

from kdet.export import postprocess

FORMATS = ("saved_model", "litert", "onnx")
_FORMAT_ALIASES = {"saved_model": "saved_model", "tf_saved_model": "saved_model",
                   "savedmodel": "saved_model", "litert": "litert", "tflite": "litert",
                   "onnx": "onnx"}
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


def _format_of(format, path):
    if format is None:
        ext = os.path.splitext(os.fspath(path))[1].lower()
        return {".tflite": "litert", ".onnx": "onnx"}.get(ext, "saved_model")
    key = str(format).lower()
    if key not in _FORMAT_ALIASES:
        raise ValueError(f"unknown export format {format!r}; use one of {FORMATS}")
    return _FORMAT_ALIASES[key]


def export(model, path, format="saved_model", quantization=None, representative_dataset=None,
           input_dtype="float32", batch_size=1, max_detections=None, score_threshold=None,
           iou_threshold=None, nms="builtin", labels=None, detections_per_class=None,
           calibration_steps=100, opset=17):
    """Export a dense detector with its post-processing inside; returns the written path.

    Args:
        model: a kdet dense detector (RetinaNet, EfficientDet, DenseDetector) or
            the path of a ``.keras`` file holding one.
        path: output: a directory (SavedModel), a ``.tflite`` or an ``.onnx`` file.
        format: "saved_model" | "litert" (alias "tflite") | "onnx"; None picks
            it from ``path``'s extension.
        quantization: LiteRT only: None (float32), "fp16" (float16 weights),
            "dynamic" (int8 weights, dynamic-range activations) or "int8" (the
            network in full integer, calibrated on ``representative_dataset``;
            the post-processing stays float, see :mod:`kdet.export.litert`).
        representative_dataset: int8 calibration images (0-255): an iterable or
            a callable returning one, of images ``[H, W, 3]``, batches
            ``[B, H, W, 3]``, ``(images, targets)`` pairs or dicts with
            ``"images"``; a ``tf.data.Dataset`` works. Resized and padded to
            the model size when needed; at most ``calibration_steps`` images.
        input_dtype: "float32" or "uint8" input pixels (0-255 either way).
        batch_size: static batch size; None = dynamic (SavedModel and ONNX only).
        max_detections, score_threshold, iou_threshold: override the model's
            decoder settings.
        nms: "builtin" (kdet's decode + class-aware NMS on the NMS builtin,
            same detections as ``model.predict``) or "tflite_postprocess"
            (LiteRT only: the ``TFLite_Detection_PostProcess`` custom op and
            its SSD output layout; see :mod:`kdet.export.postprocess`).
        labels: class names (list, ``{label: name}`` dict or a text file);
            written next to the export (``labels.txt``) and into its metadata.
        detections_per_class: "tflite_postprocess" only; default ``max_detections``.
        calibration_steps: int8 only: calibration images used at most.
        opset: ONNX opset (>= 13).

    Returns:
        The path written (str).

    Raises:
        ValueError: unknown format/quantization/dtype, options that do not
            apply to the format, a model that is not a dense detector, a
            non-TensorFlow backend, labels that do not match the classes.
    """
    require_tensorflow_backend()
    fmt = _format_of(format, path)
    if isinstance(model, (str, os.PathLike)):
        model = _load_keras_model(os.fspath(model))
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {QUANTIZATIONS}")
    if quantization is not None and fmt != "litert":
        raise ValueError(f"quantization={quantization!r} applies to format='litert' only "
                         f"(got format={fmt!r})")
    if quantization == "int8" and representative_dataset is None:
        raise ValueError("quantization='int8' needs representative_dataset: ~100 training "
                         "images (0-255) to calibrate activation ranges")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    if nms not in postprocess.NMS_MODES:
        raise ValueError(f"nms must be one of {postprocess.NMS_MODES}, got {nms!r}")
    if nms == "tflite_postprocess" and fmt != "litert":
        raise ValueError("nms='tflite_postprocess' is a LiteRT custom op: use format='litert'")
    if batch_size is not None:
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        batch_size = int(batch_size)
    elif fmt == "litert":
        raise ValueError("LiteRT needs a static batch size (batch_size=1 or N), got None")
    settings = postprocess.settings_from_model(model, max_detections, score_threshold,
                                               iou_threshold)
    names = read_labels(labels, settings.num_classes)
    common = dict(input_dtype=input_dtype, batch_size=batch_size, labels=names)
    if fmt == "saved_model":
        from kdet.export.saved_model import export_saved_model
        return export_saved_model(model, path, settings=settings, **common)
    if fmt == "onnx":
        from kdet.export.onnx import export_onnx
        return export_onnx(model, path, settings=settings, opset=opset, **common)
    from kdet.export.litert import export_litert
    return export_litert(model, path, settings=settings, quantization=quantization,
                         representative_dataset=representative_dataset, nms=nms,
                         detections_per_class=detections_per_class,
                         calibration_steps=calibration_steps, **common)


def _load_keras_model(path):
    import keras

    import kdet.models

    if not os.path.exists(path):
        raise ValueError(f"model file {path!r} does not exist")
    if not path.endswith(".keras"):
        raise ValueError(f"expected a .keras model file, got {path!r}")
    # kdet.models exports lazily; a model class is registered with Keras only
    # once its module is imported, so import them all before deserialising.
    for name in kdet.models.__all__:
        getattr(kdet.models, name)
    return keras.saving.load_model(path, safe_mode=True)


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
