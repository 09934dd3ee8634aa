"""ONNX export (tf2onnx): the SavedModel's serving graph, NMS as ONNX ``NonMaxSuppression``.

    >>> kdet.export.export(model, "d0.onnx", format="onnx", batch_size=None)   # doctest: +SKIP
    >>> import onnxruntime as ort                                              # doctest: +SKIP
    >>> sess = ort.InferenceSession("d0.onnx")                                 # doctest: +SKIP
    >>> boxes, scores, labels, count = sess.run(
    ...     ["boxes", "scores", "labels", "num_detections"], {"images": batch})  # doctest: +SKIP

onnxruntime suppresses when ``IoU > threshold`` as kdet does, so the graph
passes kdet's threshold unchanged. A dynamic batch maps the per-image NMS with
an ONNX ``Loop``. The export's description (``kdet_export``, JSON) and the
class names (``labels``, one per line) are stored in the model's
``metadata_props``.
"""
import json
import os

from kdet.export import core, postprocess

MIN_OPSET = 13


def export_onnx(model, path, settings=None, input_dtype="float32", batch_size=1, labels=None,
                opset=17):
    """ONNX file of ``model`` with decode + class-aware NMS inside; returns ``path``."""
    core.require_tensorflow_backend("kdet.export.export_onnx")
    if int(opset) < MIN_OPSET:
        raise ValueError(f"ONNX opset must be >= {MIN_OPSET}, got {opset}")
    try:
        import onnx
        import tf2onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("ONNX export needs tf2onnx and onnx: pip install tf2onnx onnx") from e
    import tensorflow as tf

    settings = settings or postprocess.settings_from_model(model)
    fn, signature = core.serving_function(model, settings, input_dtype, batch_size, "onnx")
    function = tf.function(fn, input_signature=signature)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    meta = core.model_metadata(settings, "onnx", input_dtype, batch_size, labels=labels)
    metadata = {"kdet_export": json.dumps(meta)}
    if labels:
        metadata["labels"] = "\n".join(labels)
    model_proto, _ = tf2onnx.convert.from_function(function, input_signature=signature,
                                                   opset=int(opset))
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model_proto, path)
    if labels:
        core.write_labels_txt(os.path.join(directory, "labels.txt"), labels)
    return path
