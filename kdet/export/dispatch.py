"""``kdet.export.export``: one entry for SavedModel, LiteRT and ONNX, post-processing inside.

Every exported graph takes raw 0-255 RGB images ``[B, H, W, 3]`` at the model's
input size (uint8 or float32) and returns final detections with NMS inside,
so a phone, a browser or a server needs nothing from kdet to use it:

    >>> import kdet
    >>> model = kdet.models.EfficientDet(phi=0, num_classes=3, image_size=256)  # doctest: +SKIP
    >>> kdet.export.export(model, "d0.tflite", input_dtype="uint8",             # LiteRT
    ...                    labels=["circle", "square", "triangle"])           # doctest: +SKIP
    >>> kdet.export.LiteRTDetector("d0.tflite").predict(image)["boxes"]      # doctest: +SKIP

This module sits on top: it imports the format modules, which import only
:mod:`kdet.export.core` and :mod:`kdet.export.postprocess` below them. See
:mod:`kdet.export.postprocess` for the exact decode and NMS semantics.
"""
import os

from kdet.export import core, postprocess, two_stage
from kdet.export.litert import export_litert
from kdet.export.onnx import export_onnx
from kdet.export.saved_model import export_saved_model


def export(model, path, format=None, quantization=None, representative_dataset=None,
           input_dtype="float32", batch_size=1, max_detections=None, score_threshold=None,
           iou_threshold=None, nms="builtin", labels=None, detections_per_class=None,
           calibration_steps=100, opset=17):
    """Export a detector with its post-processing inside; returns the written path.

    Args:
        model: a kdet dense detector (RetinaNet, EfficientDet, DenseDetector), a
            two-stage one (FasterRCNN, MaskRCNN, KeypointRCNN: its own inference
            graph, masks / keypoints included, see :mod:`kdet.export.two_stage`)
            or the path of a ``.keras`` file holding one.
        path: output: a directory (SavedModel), a ``.tflite`` or an ``.onnx`` file.
        format: "saved_model" | "litert" (alias "tflite") | "onnx"; None (the
            default) picks it from ``path``'s extension: ``.tflite`` LiteRT,
            ``.onnx`` ONNX, anything else a SavedModel directory. A format that
            contradicts a ``.tflite``/``.onnx`` extension is an error.
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
    core.require_tensorflow_backend()
    fmt = core.format_for_path(format, path)
    if isinstance(model, (str, os.PathLike)):
        model = _load_keras_model(os.fspath(model))
    if quantization not in core.QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of {core.QUANTIZATIONS}")
    if quantization is not None and fmt != "litert":
        raise ValueError(f"quantization={quantization!r} applies to format='litert' only "
                         f"(got format={fmt!r})")
    if quantization == "int8" and representative_dataset is None:
        raise ValueError("quantization='int8' needs representative_dataset: ~100 training "
                         "images (0-255) to calibrate activation ranges")
    if input_dtype not in core.INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {core.INPUT_DTYPES}, got {input_dtype!r}")
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
    two_stage.check_exportable(model)
    if two_stage.is_two_stage(model):
        return _export_two_stage(model, path, fmt, quantization, representative_dataset,
                                 input_dtype, batch_size, max_detections, score_threshold,
                                 iou_threshold, nms, labels, detections_per_class, opset)
    settings = postprocess.settings_from_model(model, max_detections, score_threshold,
                                               iou_threshold)
    names = core.read_labels(labels, settings.num_classes)
    common = dict(input_dtype=input_dtype, batch_size=batch_size, labels=names)
    if fmt == "saved_model":
        return export_saved_model(model, path, settings=settings, **common)
    if fmt == "onnx":
        return export_onnx(model, path, settings=settings, opset=opset, **common)
    return export_litert(model, path, settings=settings, quantization=quantization,
                         representative_dataset=representative_dataset, nms=nms,
                         detections_per_class=detections_per_class,
                         calibration_steps=calibration_steps, **common)


def _export_two_stage(model, path, fmt, quantization, representative_dataset, input_dtype,
                      batch_size, max_detections, score_threshold, iou_threshold, nms, labels,
                      detections_per_class, opset):
    """Faster / Mask / Keypoint R-CNN: the model's own inference graph, post-processing inside."""
    name = type(model).__name__
    overrides = {"max_detections": max_detections, "score_threshold": score_threshold,
                 "iou_threshold": iou_threshold, "detections_per_class": detections_per_class}
    given = sorted(k for k, v in overrides.items() if v is not None)
    if given:
        raise ValueError(
            f"kdet.export: {name} keeps its post-processing settings inside the model; "
            f"{', '.join(given)} cannot be overridden at export. Build the model with "
            "box_detections_per_img / box_score_thresh / box_nms_thresh instead.")
    if nms != "builtin":
        raise ValueError(f"kdet.export: nms={nms!r} is the dense detectors' SSD layout; "
                         f"{name} exports its own NMS (kdet.ops.nms), use nms='builtin'")
    if quantization == "int8":
        raise ValueError(
            f"kdet.export: quantization='int8' is not supported for {name} (format "
            f"{fmt!r}): the full-integer path keeps only the dense post-processing in float; "
            "use quantization=None, 'fp16' or 'dynamic'")
    if representative_dataset is not None:
        raise ValueError("representative_dataset applies to quantization='int8' only")
    names = core.read_labels(labels, model.num_classes)
    return two_stage.export_two_stage(model, path, fmt, input_dtype=input_dtype,
                                      batch_size=batch_size, labels=names, opset=opset,
                                      quantization=quantization)


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


