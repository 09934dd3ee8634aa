"""LiteRT (TFLite) export — float32, fp16, dynamic-range or full-int8 — and a runner.

``export_litert`` writes the serving graph to a temporary SavedModel and
converts it with ``tf.lite.TFLiteConverter.from_saved_model``; the class-aware
NMS becomes the ``NON_MAX_SUPPRESSION_V4`` builtin (``nms="builtin"``) or the
``TFLite_Detection_PostProcess`` custom op (``nms="tflite_postprocess"``, which
``ai_edge_litert``'s interpreter registers by default). Quantization:

* ``"fp16"``: float16 weights (``target_spec.supported_types=[tf.float16]``);
* ``"dynamic"``: int8 weights, activations quantized on the fly;
* ``"int8"``: the network in full integer (int8 weights and activations,
  calibrated on a representative dataset; uint8 input if asked), the
  post-processing (decode, NMS) kept in float: quantizing box coordinates
  costs far more accuracy than it saves time (see ``_quantize_network_only``).

Metadata, without ``tflite_support``: the export's description (input size and
dtype, output layout, thresholds, class names) is stored as JSON in the
flatbuffer's ``metadata`` table under ``"kdet_export"`` and the class names under
``"labels"`` (one per line); ``labels.txt`` is written next to the file.
:class:`LiteRTDetector` reads them back.

    >>> kdet.export.export(model, "d0.tflite")                      # doctest: +SKIP
    >>> detector = kdet.export.LiteRTDetector("d0.tflite")          # doctest: +SKIP
    >>> out = detector.predict(image)   # any size: resized, padded, mapped back  # doctest: +SKIP
    >>> out["boxes"].shape, out["labels"].dtype                      # doctest: +SKIP
    ((1, 100, 4), dtype('int32'))
"""
import json
import os
import tempfile
import warnings

import numpy as np

from kdet.export import core, postprocess

METADATA_KEY = "kdet_export"
LABELS_KEY = "labels"


# ----------------------------------------------------------------- export
def export_litert(model, path, settings=None, quantization=None, representative_dataset=None,
                  input_dtype="float32", batch_size=1, nms="builtin", labels=None,
                  detections_per_class=None, calibration_steps=100):
    """Convert ``model`` (decode + NMS inside) to a ``.tflite`` file; returns ``path``."""
    core.require_tensorflow_backend("kdet.export.export_litert")
    import tensorflow as tf

    settings = settings or postprocess.settings_from_model(model)
    if batch_size is None:
        raise ValueError("LiteRT needs a static batch size (batch_size=1 or N), got None")
    if quantization not in core.QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use one of "
                         f"{core.QUANTIZATIONS}")
    if quantization == "int8" and representative_dataset is None:
        raise ValueError("quantization='int8' needs representative_dataset")
    path = os.fspath(path)
    with tempfile.TemporaryDirectory(prefix="kdet_litert_") as tmp:
        saved = os.path.join(tmp, "saved_model")
        core.write_saved_model(model, saved, settings, input_dtype, batch_size, runtime="litert",
                          nms=nms, detections_per_class=detections_per_class)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        if nms == "tflite_postprocess":
            converter.allow_custom_ops = True
        if quantization == "fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = calibration_batches(
                representative_dataset, settings.image_size, batch_size, input_dtype,
                calibration_steps)
            flatbuffer = _quantize_network_only(converter)
        else:
            flatbuffer = converter.convert()
    meta = core.model_metadata(settings, "litert", input_dtype, batch_size, nms, quantization,
                               labels)
    entries = {METADATA_KEY: json.dumps(meta).encode("utf-8")}
    if labels:
        entries[LABELS_KEY] = "".join(n + "\n" for n in labels).encode("utf-8")
    custom_options = None
    if nms == "tflite_postprocess":
        # The converter drops this attribute (the kernel then uses 100): set it here.
        per_class = settings.max_detections if detections_per_class is None \
            else int(detections_per_class)
        custom_options = {"TFLite_Detection_PostProcess": {"detections_per_class": per_class}}
    flatbuffer = add_metadata(flatbuffer, entries, custom_options)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    if labels:
        core.write_labels_txt(os.path.join(directory, "labels.txt"), labels)
    return path


def _quantize_network_only(converter):
    """Full-integer network, float post-processing.

    Quantizing the post-processing too costs a lot of accuracy (measured: AP
    0.50 -> 0.25 on the shapes model): int8 box coordinates, and worse the
    class-shifted boxes fed to NMS, lose pixels. So the model is calibrated,
    then quantized with every op of the ``kdet_postprocess`` name scope on the
    deny-list (``tf.lite.experimental.QuantizationDebugger``, the public
    selective-quantization API); those run in float after one DEQUANTIZE of
    the head outputs.
    """
    import tensorflow as tf

    with warnings.catch_warnings():  # the debugger itself uses the deprecated tf.lite.Interpreter
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=converter.representative_dataset)
        names = [n for n in tensor_names(debugger.calibrated_model) if postprocess.SCOPE in n]
        if not names:
            raise ValueError("int8 export: no post-processing ops found to keep in float "
                             f"(name scope {postprocess.SCOPE!r})")
        debugger.calibrated_model = _without_postprocess_statistics(debugger.calibrated_model)
        debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=names)
        return debugger.get_nondebug_quantized_model()


def _without_postprocess_statistics(calibrated_model):
    """The calibrated flatbuffer without the ranges of post-processing and output tensors.

    The deny-list keeps those ops in float, but the quantizer still places
    quantize/dequantize pairs (and runs same-scale ops such as TOPK_V2 in
    int8) wherever a tensor carries calibrated min/max. NMS masks invalid
    candidates with -inf, so those ranges reach the float limits: the pre-NMS
    top-k then ran at a scale of 1e36 and every score became 0 (AP 0.060 ->
    0.000 on a Penn-Fudan Lite0, tests/test_export.py::
    test_int8_keeps_detections_when_most_scores_are_below_threshold). Without
    ranges there, only the sigmoid's fixed int8 output scale (1/256) remains.
    """
    fb = _flatbuffer_utils()
    model = fb.convert_bytearray_to_object(bytearray(calibrated_model))
    for graph in model.subgraphs:
        outputs = set(int(i) for i in graph.outputs)
        for index, tensor in enumerate(graph.tensors):
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
            if postprocess.SCOPE in name or index in outputs:
                tensor.quantization = None
    return bytes(fb.convert_object_to_bytearray(model))


def tensor_names(flatbuffer):
    """Names of every tensor in a ``.tflite`` flatbuffer (all subgraphs)."""
    schema = _schema()
    model = schema.Model.GetRootAsModel(bytearray(flatbuffer), 0)
    names = []
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        names += [graph.Tensors(t).Name().decode("utf-8") for t in range(graph.TensorsLength())]
    return names


def _schema():
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover
        from tensorflow.lite.python import schema_py_generated as schema
    return schema


def calibration_batches(dataset, image_size, batch_size, input_dtype, max_images=100):
    """A ``representative_dataset`` callable yielding ``[images]`` batches for the converter.

    Accepts images ``[H, W, 3]``, batches ``[B, H, W, 3]``, ``(images, targets)``
    pairs, dicts with ``"images"``/``"image"``, from an iterable, a callable or a
    ``tf.data.Dataset``. Images of another size are resized and padded as in
    training (:func:`kdet.models.detector.resize_and_pad`).
    """
    from kdet.models.detector import resize_and_pad

    height, width = image_size
    if int(max_images) < 1:
        raise ValueError(f"calibration_steps must be >= 1, got {max_images}")

    def images_of(element):
        if isinstance(element, dict):
            for key in ("images", "image"):
                if key in element:
                    return images_of(element[key])
            raise ValueError("representative_dataset: dict elements need an 'images' key, got "
                             f"{sorted(element)}")
        if isinstance(element, (tuple, list)) and element and not np.isscalar(element[0]) \
                and np.ndim(element[0]) >= 3:
            return images_of(element[0])  # (images, targets)
        array = np.asarray(element)
        if array.ndim == 3:
            return [array]
        if array.ndim == 4:
            return list(array)
        raise ValueError("representative_dataset: expected images [H, W, 3] or batches "
                         f"[B, H, W, 3], got shape {array.shape}")

    def prepare(image):
        if image.shape[:2] != (height, width):
            if height != width:
                raise ValueError(f"calibration image of shape {image.shape} does not match "
                                 f"the model input {height}x{width}")
            image, _ = resize_and_pad(image, height)
        image = np.asarray(image, np.float32)
        if image.shape[-1] != 3:
            raise ValueError(f"calibration images need 3 channels, got shape {image.shape}")
        if input_dtype == "uint8":
            return np.clip(np.round(image), 0, 255).astype(np.uint8)
        return image

    def generator():
        source = dataset() if callable(dataset) and not hasattr(dataset, "__iter__") else dataset
        pending, seen = [], 0
        for element in source:
            for image in images_of(element):
                pending.append(prepare(np.asarray(image)))
                seen += 1
                if len(pending) == batch_size:
                    yield [np.stack(pending)]
                    pending = []
                if seen >= max_images:
                    break
            if seen >= max_images:
                break
        if pending:  # last partial batch: repeat its images to fill it
            have = len(pending)
            while len(pending) < batch_size:
                pending.append(pending[len(pending) % have])
            yield [np.stack(pending)]
        if seen == 0:
            raise ValueError("representative_dataset yielded no images")

    return generator


# --------------------------------------------------------------- metadata
def _flatbuffer_utils():
    try:
        from ai_edge_litert.tools import flatbuffer_utils
    except ImportError:  # pragma: no cover - older installs
        from tensorflow.lite.tools import flatbuffer_utils
    return flatbuffer_utils


def add_metadata(flatbuffer, entries, custom_options=None):
    """Return the ``.tflite`` bytes with ``{name: bytes}`` added to its metadata table.

    ``custom_options`` ``{custom op name: {key: value}}`` adds or replaces keys
    in the flexbuffer options of every such custom op.
    """
    fb = _flatbuffer_utils()
    schema = fb.schema_fb
    model = fb.convert_bytearray_to_object(bytearray(flatbuffer))
    for op_name, extra in (custom_options or {}).items():
        _update_custom_options(model, op_name, extra)

    def name_of(entry):
        return entry.name.decode() if isinstance(entry.name, bytes) else entry.name

    model.metadata = [m for m in (model.metadata or []) if name_of(m) not in entries]
    for name, data in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data, np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(model.buffers) - 1
        model.metadata.append(entry)
    return bytes(fb.convert_object_to_bytearray(model))


def _update_custom_options(model, op_name, extra):
    from flatbuffers import flexbuffers

    codes = [i for i, code in enumerate(model.operatorCodes)
             if code.customCode is not None and
             (code.customCode.decode() if isinstance(code.customCode, bytes)
              else code.customCode) == op_name]
    found = 0
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if op.opcodeIndex in codes:
                options = flexbuffers.Loads(bytes(bytearray(op.customOptions)))
                options.update(extra)
                op.customOptions = np.frombuffer(bytes(flexbuffers.Dumps(options)), np.uint8)
                found += 1
    if not found:
        raise ValueError(f"converted model has no {op_name} op to configure")


def read_metadata(path_or_bytes):
    """``{name: bytes}`` of a ``.tflite`` file's metadata table (no tensors are read)."""
    schema = _schema()
    data = path_or_bytes
    if isinstance(path_or_bytes, (str, os.PathLike)):
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    model = schema.Model.GetRootAsModel(bytearray(data), 0)
    out = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        name = entry.Name().decode("utf-8")
        buffer = model.Buffers(entry.Buffer())
        out[name] = bytes(buffer.DataAsNumpy().tobytes()) if buffer.DataLength() else b""
    return out


# ----------------------------------------------------------------- runner
class LiteRTDetector:
    """Run an exported ``.tflite`` detector on images of any size.

    Each image is resized keeping its aspect ratio so its long side is the
    model's input size, padded bottom/right (as in training,
    :func:`kdet.models.detector.resize_and_pad`), run in batches of the file's
    batch size (the last one padded), and its boxes are mapped back to the
    image's own pixels. Works for both output layouts (``nms="builtin"`` and
    ``"tflite_postprocess"``).

    Args:
        path: the ``.tflite`` file.
        num_threads: interpreter threads (None: LiteRT's default).

    Attributes: ``image_size`` (H, W), ``batch_size``, ``input_dtype``,
    ``labels`` (class names or None), ``metadata`` (dict, {} for files not
    written by kdet).

    >>> detector = LiteRTDetector("d0.tflite")                 # doctest: +SKIP
    >>> out = detector.predict([image_a, image_b])             # doctest: +SKIP
    >>> out["boxes"].shape                                      # doctest: +SKIP
    (2, 100, 4)
    """

    def __init__(self, path, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"LiteRT model {path!r} does not exist")
        self.path = path
        try:
            self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
        except ValueError as e:
            raise ValueError(f"{path}: not a loadable LiteRT model ({e})") from None
        raw_meta = read_metadata(path)
        self.metadata = json.loads(raw_meta[METADATA_KEY]) if METADATA_KEY in raw_meta else {}
        self.labels = self._labels(raw_meta)
        signatures = self.interpreter.get_signature_list()
        if "serving_default" in signatures:
            self._runner = self.interpreter.get_signature_runner("serving_default")
            (input_name,) = signatures["serving_default"]["inputs"]
            details = self._runner.get_input_details()[input_name]
            self._input_name = input_name
        else:
            self.interpreter.allocate_tensors()
            self._runner = None
            details = self.interpreter.get_input_details()[0]
        shape = tuple(int(s) for s in details["shape"])
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{path}: expected one image input [B, H, W, 3], got {shape}")
        self.batch_size, height, width = shape[0], shape[1], shape[2]
        self.image_size = (height, width)
        self.input_dtype = np.dtype(details["dtype"]).name
        self._clip = bool(self.metadata.get("clip_to_image", True))

    def _labels(self, raw_meta):
        if LABELS_KEY in raw_meta:
            return raw_meta[LABELS_KEY].decode("utf-8").splitlines()
        sibling = os.path.join(os.path.dirname(os.path.abspath(self.path)), "labels.txt")
        if os.path.isfile(sibling):
            with open(sibling, encoding="utf-8") as f:
                return f.read().splitlines()
        return None

    def _invoke(self, batch):
        if self._runner is not None:
            outputs = self._runner(**{self._input_name: batch})
        else:
            self.interpreter.set_tensor(self.interpreter.get_input_details()[0]["index"], batch)
            self.interpreter.invoke()
            outputs = {d["name"]: self.interpreter.get_tensor(d["index"])
                       for d in self.interpreter.get_output_details()}
        if all(k in outputs for k in postprocess.SSD_KEYS):
            return postprocess.ssd_to_detections(outputs, self.image_size, self._clip)
        missing = [k for k in postprocess.DETECTION_KEYS if k not in outputs]
        if missing:
            raise ValueError(f"{self.path}: outputs {sorted(outputs)} are neither kdet's "
                             f"{postprocess.DETECTION_KEYS} nor the SSD layout "
                             f"{postprocess.SSD_KEYS}")
        # Two-stage exports (kdet.export.two_stage) add masks / keypoints.
        keys = postprocess.DETECTION_KEYS + tuple(k for k in ("masks", "keypoints")
                                                  if k in outputs)
        return {k: np.asarray(outputs[k]) for k in keys}

    def _prepare(self, image):
        from kdet.models.detector import resize_and_pad

        height, width = self.image_size
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
        if image.shape[-1] != 3:
            image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        if image.shape[:2] == (height, width):
            padded, scale = image.astype(np.float32), 1.0
        else:
            if height != width:
                raise ValueError(f"{self.path}: resizing needs a square model input, "
                                 f"got {height}x{width}")
            padded, scale = resize_and_pad(image, height)
        if self.input_dtype == "uint8":
            padded = np.clip(np.round(padded), 0, 255)
        return padded.astype(self.input_dtype), scale

    def predict(self, images):
        """Detections for one image ``[H, W, 3]``, a batch ``[N, H, W, 3]`` or a list of images.

        Returns numpy ``{"boxes" [N, D, 4] xyxy in each image's pixels,
        "scores" [N, D], "labels" [N, D] int32, "num_detections" [N] int32}``
        (``N = 1`` for a single image), padded with zero boxes, score 0, label -1.
        Two-stage exports add ``"masks"`` [N, D, S, S] (model input space) with
        ``"scale"`` [N] (``model_pixel = image_pixel * scale``), or
        ``"keypoints"`` [N, D, K, 3] in each image's pixels.
        """
        items = core.as_numpy_images(images)
        if not items:
            raise ValueError("predict() got no images")
        results = []
        for start in range(0, len(items), self.batch_size):
            chunk = [self._prepare(im) for im in items[start:start + self.batch_size]]
            batch = np.stack([c[0] for c in chunk])
            scales = np.array([c[1] for c in chunk], np.float32)
            if len(chunk) < self.batch_size:  # pad the last batch with blank images
                blank = np.zeros((self.batch_size - len(chunk),) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, blank])
            out = self._invoke(batch)
            out = {k: np.asarray(v)[:len(chunk)] for k, v in out.items()}
            valid = out["labels"] >= 0
            out["boxes"] = np.where(valid[..., None], out["boxes"] / scales[:, None, None],
                                    0.0).astype(np.float32)
            if "keypoints" in out:  # x, y back to each image's pixels, as the boxes
                keypoints = out["keypoints"].astype(np.float32).copy()
                keypoints[..., :2] /= scales[:, None, None, None]
                out["keypoints"] = keypoints
            if "masks" in out:  # masks stay in the model input space, as model.predict_images
                out["scale"] = scales
            results.append(out)
        merged = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
        merged["labels"] = merged["labels"].astype(np.int32)
        merged["num_detections"] = merged["num_detections"].reshape(-1).astype(np.int32)
        return merged

    def __repr__(self):
        return (f"LiteRTDetector({self.path!r}, image_size={self.image_size}, "
                f"batch_size={self.batch_size}, input_dtype={self.input_dtype!r})")
