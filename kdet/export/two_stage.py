"""Export of the two-stage detectors: Faster R-CNN, Mask R-CNN, Keypoint R-CNN.

Their inference forward pass already holds the whole post-processing in
keras.ops (proposal top-k and NMS, box decode and class-aware NMS through
:func:`kdet.ops.nms`, mask paste, keypoint decode), so the exported graph is the
model itself traced at a fixed input signature (raw 0-255 images
``[B, S, S, 3]``, uint8 or float32), keeping only the prediction keys:

* ``boxes`` [B, D, 4] xyxy input pixels, ``scores`` [B, D], ``labels`` [B, D]
  int32 (-1 padding), ``num_detections`` [B] int32 — as the dense exports;
* Mask R-CNN adds ``masks`` [B, D, S, S]: each detection's mask probability
  pasted into the input image (as ``model.predict``; threshold at 0.5);
* Keypoint R-CNN adds ``keypoints`` [B, D, K, 3] (x, y, score).

The same graph goes to every format: a SavedModel (``serving_default``), ONNX
(tf2onnx) and LiteRT (``TFLiteConverter`` builtins only: the NMS is kdet's own
pure-ops greedy NMS, so no ``NON_MAX_SUPPRESSION`` kernel is involved and the
detections equal ``model.predict`` up to float rounding). For LiteRT the gather
RoIAlign is traced in an equivalent rank <= 5 form
(:func:`_litert_gather_roi_align`): kdet's own builds a 7-D tap lattice that
LiteRT's builtin kernels cannot run; for ONNX and LiteRT, Keras' ``argmax`` (the
keypoint decode) is traced with a ``signbit`` without ``Bitcast``
(:func:`_signbit_without_bitcast`). Decoder overrides
(``max_detections``, ``score_threshold``, ``iou_threshold``) and the LiteRT
options that only make sense for the dense post-processing (``nms``,
``quantization="int8"``) are refused: set the thresholds on the model
(``box_score_thresh``, ``box_nms_thresh``, ``box_detections_per_img``, ...).

R-CNN / Fast R-CNN take external proposals as a second input and are not
exported (:func:`check_exportable` says so).
"""
import contextlib
import json
import os
import tempfile

from kdet.export import core
from kdet.layers.conv import direct_convolutions

PREDICTION_KEYS = ("boxes", "scores", "labels", "num_detections", "masks", "keypoints")
INT_KEYS = ("labels", "num_detections")


def is_two_stage(model):
    """True for Faster / Mask / Keypoint R-CNN (anything built on ``FasterRCNN``)."""
    from kdet.models.faster_rcnn import FasterRCNN

    return isinstance(model, FasterRCNN)


def check_exportable(model):
    """Raise a clear ``ValueError`` for the proposal-input detectors (R-CNN, Fast R-CNN)."""
    from kdet.models.fast_rcnn import ProposalDetector

    if isinstance(model, ProposalDetector):
        raise ValueError(
            f"kdet.export: {type(model).__name__} is not exportable: it takes external "
            "proposals ({'images', 'proposals'} inputs, proposals from selective search or "
            "sliding windows outside the graph), so no single image-in, detections-out graph "
            "exists. Export supports dense detectors (RetinaNet, EfficientDet, DenseDetector) "
            "and the two-stage FasterRCNN, MaskRCNN and KeypointRCNN.")


def output_keys(model):
    """The prediction keys ``model`` returns, in :data:`PREDICTION_KEYS` order."""
    keys = ["boxes", "scores", "labels", "num_detections"]
    if getattr(model, "with_masks", False):
        keys.append("masks")
    if getattr(model, "num_keypoints", None):
        keys.append("keypoints")
    return tuple(keys)


def serving_function(model, input_dtype="float32", batch_size=1):
    """``(fn, input_signature)``: raw 0-255 images -> the model's padded predictions."""
    import tensorflow as tf

    height, width = model.image_size
    spec = tf.TensorSpec([batch_size, height, width, 3], tf.dtypes.as_dtype(input_dtype),
                         name="images")
    keys = output_keys(model)

    def serve(images):
        with _mask_rows_without_control_flow(model), direct_convolutions():
            out = model(tf.cast(images, tf.float32), training=False)
        missing = [k for k in keys if k not in out]
        if missing:
            raise ValueError(f"kdet.export: {type(model).__name__} returned no {missing}")
        return {k: tf.cast(out[k], tf.int32) if k in INT_KEYS else tf.cast(out[k], tf.float32)
                for k in keys}

    return serve, [spec]


@contextlib.contextmanager
def _mask_rows_without_control_flow(model):
    """Trace Mask R-CNN's mask head on all ``D`` rows, without the ``cond`` on the number
    of detections that ``predict`` uses (:meth:`kdet.layers.roi_heads.RoIHeads._detection_masks`):
    the exported graph stays one branch-free graph for every format's converter."""
    heads = getattr(model, "roi_heads", None)
    before = getattr(heads, "skip_padded_masks", None)
    if before is None:
        yield
        return
    heads.skip_padded_masks = False
    try:
        yield
    finally:
        heads.skip_padded_masks = before


def _litert_gather_roi_align(features_list, num_rows, base, row_stride, height, width,
                             geometry, grid_h, grid_w, max_grid_h, max_grid_w, out_h, out_w):
    """:func:`kdet.ops.roi_align._gather_roi_align` with tensors of rank <= 5, no int ReLU.

    The same taps, weights and sum (kdet.ops.roi_align is the reference), but
    the ``[B, R]`` axes are merged before the tap lattice is built and the taps
    are gathered as ``[B*R*out_h*out_w, taps, C]``: the original's
    ``[B, R, out_h, out_w, 2G, 2G(, 1)]`` lattice needs a 7-D ``STRIDED_SLICE``
    (LiteRT kernels stop at 5-D) and its int32 ``clip`` becomes an int32
    ``RELU`` (no LiteRT builtin): both would need the Flex (Select TF ops)
    delegate, which ``ai_edge_litert`` does not ship.
    """
    from keras import ops

    reference = _roi_align_module()
    rows, cols, wy, wx = reference._bilinear_taps(geometry, height, width, grid_h, grid_w,
                                                  max_grid_h, max_grid_w, out_h, out_w)
    batch_rois = ops.shape(base)
    taps_h, taps_w = 2 * max_grid_h, 2 * max_grid_w
    base = ops.reshape(base, [-1])
    row_stride = ops.reshape(row_stride, [-1])
    rows = ops.reshape(rows, [-1, out_h, taps_h])
    cols = ops.reshape(cols, [-1, out_w, taps_w])
    wy = ops.reshape(wy, [-1, out_h, taps_h])
    wx = ops.reshape(wx, [-1, out_w, taps_w])
    index = (base[:, None, None, None, None]
             + (rows * row_stride[:, None, None])[:, :, None, :, None]
             + cols[:, None, :, None, :])
    last = num_rows - 1
    index = ops.where(index < 0, 0, ops.where(index > last, last, index))
    index = ops.reshape(index, [-1, taps_h * taps_w])
    weight = ops.cast(wy[:, :, None, :, None] * wx[:, None, :, None, :], features_list[0].dtype)
    weight = ops.reshape(weight, [-1, taps_h * taps_w, 1])
    values = ops.take(reference._concat_levels(features_list), index, axis=0)
    pooled = ops.sum(values * weight, axis=1)
    return ops.reshape(pooled, [batch_rois[0], batch_rois[1], out_h, out_w,
                                features_list[0].shape[-1]])


def _roi_align_module():
    # kdet.ops re-exports the function roi_align under the module's name.
    import importlib

    return importlib.import_module("kdet.ops.roi_align")


def _signbit_without_bitcast(original):
    """Keras-TF ``signbit`` (used by ``ops.argmax`` against flush-to-zero) without ``Bitcast``.

    ``x < 0``, or ``x == 0`` with ``1 / x = -inf`` (negative zero): the same
    answer for every non-NaN float. tf2onnx has no ONNX op for ``Bitcast``.
    """
    def signbit(x):
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        if isinstance(x, tf.SparseTensor) or not x.dtype.is_floating:
            return original(x)
        x = tf.cast(x, tf.float32)
        return tf.logical_or(x < 0.0, tf.logical_and(tf.equal(x, 0.0),
                                                     tf.math.reciprocal(x) < 0.0))

    return signbit


@contextlib.contextmanager
def _portable_ops(litert=False):
    """Trace with ops that every runtime has (ONNX: no ``Bitcast``, no ``CropAndResize``:
    RoIAlign gathers; LiteRT: also no rank > 5 strided slice or int32 ReLU, see
    :func:`_litert_gather_roi_align`)."""
    from keras.src.backend.tensorflow import numpy as tf_numpy

    roi_align = _roi_align_module()
    original_gather, original_signbit = roi_align._gather_roi_align, tf_numpy.signbit
    original_crop, original_chunked = roi_align.CROP_AND_RESIZE, roi_align.CHUNKED_GATHER
    tf_numpy.signbit = _signbit_without_bitcast(original_signbit)
    roi_align.CROP_AND_RESIZE = False  # neither runtime has CropAndResize
    roi_align.CHUNKED_GATHER = False  # the plain gather: no custom gradient in the graph
    if litert:
        roi_align._gather_roi_align = _litert_gather_roi_align
    try:
        yield
    finally:
        roi_align._gather_roi_align = original_gather
        roi_align.CROP_AND_RESIZE = original_crop
        roi_align.CHUNKED_GATHER = original_chunked
        tf_numpy.signbit = original_signbit


def write_saved_model(model, path, input_dtype="float32", batch_size=1):
    """The serving graph as a ``tf.Module`` tracking the model's TF variables (as core's)."""
    import tensorflow as tf

    fn, signature = serving_function(model, input_dtype, batch_size)
    module = tf.Module()
    module.model_variables = [getattr(v, "value", v) for v in model.variables]
    module.serve = tf.function(fn, input_signature=signature)
    tf.saved_model.save(module, os.fspath(path), signatures={"serving_default": module.serve})


def model_metadata(model, fmt, input_dtype, batch_size, quantization=None, labels=None):
    """The JSON-able description stored with a two-stage export."""
    config = getattr(model, "_config", {})
    heads = getattr(model, "roi_heads", None)
    return {"producer": "kdet", "version": 1, "format": fmt, "nms": "kdet_ops",
            "model": type(model).__name__, "two_stage": True,
            "quantization": quantization, "input_dtype": input_dtype,
            "batch_size": batch_size, "image_size": list(model.image_size),
            "num_classes": int(model.num_classes),
            "max_detections": int(getattr(heads, "detections_per_image",
                                          config.get("box_detections_per_img", 0))),
            "score_threshold": float(getattr(heads, "score_threshold",
                                             config.get("box_score_thresh", 0.0))),
            "iou_threshold": float(getattr(heads, "nms_threshold",
                                           config.get("box_nms_thresh", 0.0))),
            "rpn_pre_nms_top_n_test": config.get("rpn_pre_nms_top_n_test"),
            "rpn_post_nms_top_n_test": config.get("rpn_post_nms_top_n_test"),
            "rpn_nms_thresh": config.get("rpn_nms_thresh"),
            "clip_to_image": True, "masks": "image" if "masks" in output_keys(model) else None,
            "num_keypoints": getattr(model, "num_keypoints", None),
            "outputs": list(output_keys(model)), "labels": labels}


def export_two_stage(model, path, fmt, input_dtype="float32", batch_size=1, labels=None,
                     opset=17, quantization=None):
    """Write ``model`` (a Faster/Mask/Keypoint R-CNN) as ``fmt``; returns ``path``."""
    core.require_tensorflow_backend("kdet.export")
    path = os.fspath(path)
    name = type(model).__name__
    if fmt == "saved_model":
        if os.path.isfile(path):
            raise ValueError(f"SavedModel path {path!r} is a file; give a directory")
        write_saved_model(model, path, input_dtype, batch_size)
        _write_json(os.path.join(path, "kdet_export.json"),
                    model_metadata(model, fmt, input_dtype, batch_size, labels=labels))
        if labels:
            core.write_labels_txt(os.path.join(path, "labels.txt"), labels)
        return path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    meta = model_metadata(model, fmt, input_dtype, batch_size, quantization, labels)
    if fmt == "onnx":
        _write_onnx(model, path, input_dtype, batch_size, opset, meta, labels, name)
    elif fmt == "litert":
        _write_litert(model, path, input_dtype, batch_size, quantization, meta, labels, name)
    else:  # pragma: no cover - format_for_path only gives the three
        raise ValueError(f"unknown export format {fmt!r}")
    if labels:
        core.write_labels_txt(os.path.join(directory, "labels.txt"), labels)
    return path


def _write_json(path, meta):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)


def _write_onnx(model, path, input_dtype, batch_size, opset, meta, labels, name):
    try:
        import onnx
        import tf2onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("ONNX export needs tf2onnx and onnx: pip install tf2onnx onnx") from e
    import tensorflow as tf

    from kdet.export.onnx import MIN_OPSET

    if int(opset) < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    fn, signature = serving_function(model, input_dtype, batch_size)
    function = tf.function(fn, input_signature=signature)
    with _portable_ops():
        model_proto, _ = tf2onnx.convert.from_function(function, input_signature=signature,
                                                       opset=int(opset))
    metadata = {"kdet_export": json.dumps(meta)}
    if labels:
        metadata["labels"] = "\n".join(labels)
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model_proto, path)


def _write_litert(model, path, input_dtype, batch_size, quantization, meta, labels, name):
    import tensorflow as tf

    from kdet.export.litert import LABELS_KEY, METADATA_KEY, add_metadata

    if batch_size is None:
        raise ValueError("LiteRT needs a static batch size (batch_size=1 or N), got None")
    with tempfile.TemporaryDirectory(prefix="kdet_litert_") as tmp:
        saved = os.path.join(tmp, "saved_model")
        with _portable_ops(litert=True):
            write_saved_model(model, saved, input_dtype, batch_size)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if quantization in ("fp16", "dynamic"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            if quantization == "fp16":
                converter.target_spec.supported_types = [tf.float16]
        flatbuffer = converter.convert()
    entries = {METADATA_KEY: json.dumps(meta).encode("utf-8")}
    if labels:
        entries[LABELS_KEY] = "".join(n + "\n" for n in labels).encode("utf-8")
    flatbuffer = add_metadata(flatbuffer, entries)
    with open(path, "wb") as f:
        f.write(flatbuffer)
