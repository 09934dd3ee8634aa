"""TFRecord files in the TensorFlow Object Detection API schema.

Features (one ``tf.train.Example`` per image):

=====================================  =========  ===================================
key                                    type       meaning
=====================================  =========  ===================================
``image/encoded``                      bytes      the image file (JPEG/PNG)
``image/format``                       bytes      ``jpeg`` / ``png``
``image/height``, ``image/width``      int64
``image/filename``                     bytes
``image/source_id``                    bytes      image id as text
``image/object/bbox/xmin`` ``ymin``    float      normalised by width / height
``xmax`` ``ymax``
``image/object/class/label``           int64      category id (``label_to_category_id``;
                                                  COCO ids for COCO, ``label + 1`` else)
``image/object/class/text``            bytes      class name
``image/object/is_crowd``              int64
``image/object/difficult``             int64      when the dataset has it
``image/object/area``                  float      pixels
``image/object/mask``                  bytes      one PNG (0/1) per object, optional
``image/object/keypoint/x`` ``y``      float      normalised, flattened ``[N * K]``
``image/object/keypoint/visibility``   int64      flattened ``[N * K]``
=====================================  =========  ===================================

A ``label_map.pbtxt`` (``item { id: 1 name: 'cat' }``) is written next to the
shards; :class:`TFRecordDataset` reads it to name and order the classes.

    >>> from kdet.data.shapes import ShapesDataset
    >>> paths = write_tfrecord(ShapesDataset(8, seed=0), "/tmp/shapes.tfrecord",
    ...                        num_shards=2)  # doctest: +SKIP
    >>> TFRecordDataset("/tmp/shapes.tfrecord-*").num_classes  # doctest: +SKIP
    3
"""
import glob
import io
import os
import re

import numpy as np

from kdet.data.dataset import (DEFAULT_MAX_PIXELS, OBJECT_KEYS, DetectionDataset,
                               read_image_header, tf_decode_image)
from kdet.data.errors import ProblemLog, sanitize_boxes

LABEL_MAP_NAME = "label_map.pbtxt"


# ---- label maps --------------------------------------------------------------
def write_label_map(path, class_names, label_to_category_id, keypoint_names=None):
    """Write a TF OD API ``label_map.pbtxt``."""
    lines = []
    for label, name in enumerate(class_names):
        lines += ["item {", f"  id: {int(label_to_category_id[label])}",
                  f"  name: '{_escape(name)}'"]
        for k, kp in enumerate(keypoint_names or ()):
            lines.append(f"  keypoints {{ id: {k} label: '{_escape(kp)}' }}")
        lines.append("}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def read_label_map(path):
    """Parse a ``label_map.pbtxt``: ``({id: name}, keypoint names or None)``."""
    with open(path) as f:
        text = f.read()
    items, keypoints = {}, None
    for body in re.findall(r"item\s*\{((?:[^{}]|\{[^{}]*\})*)\}", text):
        kps = re.findall(r"keypoints\s*\{[^}]*?label:\s*['\"]((?:[^'\"\\]|\\.)*)['\"]", body)
        top = re.sub(r"keypoints\s*\{[^}]*\}", "", body)
        id_match = re.search(r"\bid:\s*(-?\d+)", top)
        name = (re.search(r"\bdisplay_name:\s*['\"]((?:[^'\"\\]|\\.)*)['\"]", top)
                or re.search(r"\bname:\s*['\"]((?:[^'\"\\]|\\.)*)['\"]", top))
        if not id_match or not name:
            raise ValueError(f"{path}: label map item without id or name: {body.strip()!r}")
        items[int(id_match.group(1))] = _unescape(name.group(1))
        keypoints = keypoints or (kps and [_unescape(k) for k in kps]) or None
    if not items:
        raise ValueError(f"{path}: no 'item {{ id: ... name: ... }}' entries")
    return items, keypoints


def _escape(text):
    return str(text).replace("\\", "\\\\").replace("'", "\\'")


def _unescape(text):
    return re.sub(r"\\(.)", r"\1", text)


# ---- writing -----------------------------------------------------------------
def _encoded_image(dataset, index):
    """(bytes, format) of image ``index``: the file itself when TF decodes it the
    same way the dataset does, else a PNG of the decoded pixels."""
    from PIL import Image

    record = dataset.records[index]
    path = record.get("file_name")
    if path and record["orientation"] == 1:
        with Image.open(path) as im:
            fmt = im.format
        if fmt in ("JPEG", "PNG"):
            with open(path, "rb") as f:
                return f.read(), fmt.lower()
    return _png(dataset.load_image(index)), "png"


def _png(array):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _feature(values, kind):
    import tensorflow as tf

    if kind == "bytes":
        values = [v if isinstance(v, bytes) else str(v).encode("utf8") for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if kind == "int":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def example_to_tf_example(dataset, index, include_masks):
    """One record of ``dataset`` as a serialised ``tf.train.Example``."""
    import tensorflow as tf

    record = dataset.records[index]
    height, width = (int(v) for v in record["original_size"])
    encoded, fmt = _encoded_image(dataset, index)
    boxes = record["boxes"].astype(np.float64)
    labels = record["labels"]
    areas = record.get("area")
    if areas is None:
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    feature = {
        "image/encoded": _feature([encoded], "bytes"),
        "image/format": _feature([fmt], "bytes"),
        "image/height": _feature([height], "int"),
        "image/width": _feature([width], "int"),
        "image/filename": _feature([os.path.basename(record.get("file_name") or
                                                     f"{record['image_id']}.png")], "bytes"),
        "image/source_id": _feature([record["image_id"]], "bytes"),
        "image/object/bbox/xmin": _feature(boxes[:, 0] / width, "float"),
        "image/object/bbox/ymin": _feature(boxes[:, 1] / height, "float"),
        "image/object/bbox/xmax": _feature(boxes[:, 2] / width, "float"),
        "image/object/bbox/ymax": _feature(boxes[:, 3] / height, "float"),
        "image/object/class/label": _feature(
            [dataset.label_to_category_id[int(l)] for l in labels], "int"),
        "image/object/class/text": _feature([dataset.class_names[int(l)] for l in labels],
                                            "bytes"),
        "image/object/is_crowd": _feature(record["iscrowd"], "int"),
        "image/object/area": _feature(areas, "float"),
    }
    if "difficult" in record:
        feature["image/object/difficult"] = _feature(record["difficult"], "int")
    if "keypoints" in record:
        kp = record["keypoints"].astype(np.float64)
        feature["image/object/keypoint/x"] = _feature((kp[..., 0] / width).ravel(), "float")
        feature["image/object/keypoint/y"] = _feature((kp[..., 1] / height).ravel(), "float")
        feature["image/object/keypoint/visibility"] = _feature(kp[..., 2].ravel(), "int")
    if include_masks:
        masks = dataset.load_masks(index)
        feature["image/object/mask"] = _feature([_png(m) for m in masks], "bytes")
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


def shard_paths(path, num_shards):
    """``path`` for one shard, else ``path-00000-of-0000N`` (TF OD API naming)."""
    if num_shards == 1:
        return [str(path)]
    return [f"{path}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)]


def write_tfrecord(dataset_or_records, path_pattern, num_shards=1, class_names=None,
                   include_masks=None, label_map_path=None):
    """Write a dataset (or a list of records) as TF OD API TFRecord shards.

    Image ``i`` goes to shard ``i % num_shards``. Also writes
    ``label_map.pbtxt`` (or ``label_map_path``) next to the shards.

    Args:
        dataset_or_records: a :class:`DetectionDataset` or records with
            ``"image"`` or ``"file_name"`` (then ``class_names`` is needed).
        path_pattern: output path; with several shards ``-0000i-of-0000N``
            is appended.
        num_shards: number of files.
        class_names: for raw records.
        include_masks: write ``image/object/mask``; default when the
            dataset has masks.

    Returns:
        The list of shard paths.
    """
    import tensorflow as tf

    dataset = dataset_or_records
    if not isinstance(dataset, DetectionDataset):
        if class_names is None:
            raise ValueError("write_tfrecord on raw records needs class_names")
        dataset = DetectionDataset.from_records(list(dataset_or_records), class_names)
    include_masks = dataset.has_masks if include_masks is None else include_masks
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    paths = shard_paths(path_pattern, num_shards)
    os.makedirs(os.path.dirname(os.path.abspath(paths[0])), exist_ok=True)
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    try:
        for index in range(len(dataset)):
            writers[index % num_shards].write(example_to_tf_example(dataset, index, include_masks))
    finally:
        for w in writers:
            w.close()
    write_label_map(label_map_path or os.path.join(os.path.dirname(os.path.abspath(paths[0])),
                                                   LABEL_MAP_NAME),
                    dataset.class_names, dataset.label_to_category_id, dataset.keypoint_names)
    return paths


# ---- reading -----------------------------------------------------------------
def _annotation_features():
    import tensorflow as tf

    var = tf.io.VarLenFeature
    return {
        "image/height": tf.io.FixedLenFeature([], tf.int64, -1),
        "image/width": tf.io.FixedLenFeature([], tf.int64, -1),
        "image/source_id": tf.io.FixedLenFeature([], tf.string, ""),
        "image/filename": tf.io.FixedLenFeature([], tf.string, ""),
        "image/object/bbox/xmin": var(tf.float32), "image/object/bbox/ymin": var(tf.float32),
        "image/object/bbox/xmax": var(tf.float32), "image/object/bbox/ymax": var(tf.float32),
        "image/object/class/label": var(tf.int64), "image/object/class/text": var(tf.string),
        "image/object/is_crowd": var(tf.int64), "image/object/difficult": var(tf.int64),
        "image/object/area": var(tf.float32),
        "image/object/keypoint/x": var(tf.float32), "image/object/keypoint/y": var(tf.float32),
        "image/object/keypoint/visibility": var(tf.int64),
        "image/object/mask": var(tf.string),
    }


class TFRecordDataset(DetectionDataset):
    """TFRecord shards in the TF OD API schema.

    The files are scanned once (annotations and image headers) to build
    ``records``, validate them (``on_error``) and find the classes; images and
    masks are decoded lazily by ``as_tf_dataset()``, which streams the files.

    Args:
        file_pattern: a glob (``"train-*"``), a path, or a list of paths.
        label_map: ``label_map.pbtxt`` path or ``{category_id: name}``;
            default: ``label_map.pbtxt`` next to the first file if present,
            else the ids and names found in the files.
        include_masks: read ``image/object/mask``; default when present.
        on_error: ``"raise"`` or ``"skip"``.
        check_images: ``"header"`` (read every image header) or ``"none"``.
        max_pixels: images with more pixels are bad input.
        keypoint_flip_map: for keypoint data without named keypoints.
    """

    def __init__(self, file_pattern, label_map=None, include_masks=None, on_error="raise",
                 check_images="header", max_pixels=DEFAULT_MAX_PIXELS, keypoint_flip_map=None):
        import tensorflow as tf

        if isinstance(file_pattern, (list, tuple)):
            files = [str(f) for f in file_pattern]
        else:
            files = sorted(glob.glob(str(file_pattern))) or (
                [str(file_pattern)] if os.path.isfile(str(file_pattern)) else [])
        if not files:
            raise ValueError(f"{file_pattern}: no TFRecord files match")
        self.files = files
        log = ProblemLog(on_error)

        keypoint_names = None
        if label_map is None:
            candidate = os.path.join(os.path.dirname(os.path.abspath(files[0])), LABEL_MAP_NAME)
            label_map = candidate if os.path.isfile(candidate) else None
        if isinstance(label_map, (str, os.PathLike)):
            label_map, keypoint_names = read_label_map(str(label_map))

        features = _annotation_features()
        if check_images != "none":
            features["image/encoded"] = tf.io.FixedLenFeature([], tf.string, b"")
        raw, names_seen = [], {}
        for file_name in files:
            try:
                for k, serialized in enumerate(tf.data.TFRecordDataset(file_name)):
                    where = f"{file_name}: record {k}"
                    try:
                        parsed = tf.io.parse_single_example(serialized, features)
                    except tf.errors.InvalidArgumentError as e:
                        log.error("malformed_annotation", where, f"not a tf.train.Example of "
                                  f"the TF OD API schema ({e.message.splitlines()[0]})")
                        raw.append(None)
                        continue
                    parsed = {key: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor)
                                    else v).numpy() for key, v in parsed.items()}
                    # keep the scan light: image header and mask count, not the bytes
                    header = None
                    if check_images != "none":
                        header = read_image_header(parsed.pop("image/encoded"),
                                                   apply_exif=False, max_pixels=max_pixels,
                                                   check="header", log=log, where=where)
                        if header is None:
                            raw.append(None)
                            continue
                    parsed["num_masks"] = len(parsed.pop("image/object/mask"))
                    raw.append((where, parsed, header))
                    for cid, text in zip(parsed["image/object/class/label"],
                                         parsed["image/object/class/text"]):
                        names_seen.setdefault(int(cid), text.decode("utf8"))
            except tf.errors.DataLossError as e:
                raise ValueError(f"{file_name}: corrupt TFRecord file ({e.message})") from None

        if label_map is None:
            label_map = {cid: names_seen[cid] for cid in sorted(names_seen)}
        category_ids = sorted(label_map)
        label_of = {cid: i for i, cid in enumerate(category_ids)}
        label_of_name = {label_map[cid]: i for i, cid in enumerate(category_ids)}
        has_masks = any(r is not None and r[1]["num_masks"] for r in raw)
        self.has_masks = has_masks if include_masks is None else bool(include_masks)
        num_kp = len(keypoint_names) if keypoint_names else max(
            [_num_keypoints(r[1]) for r in raw if r is not None] or [0])

        records = []
        for position, item in enumerate(raw):
            if item is None:
                continue
            record = self._record(*item, label_of, label_of_name, num_kp, log, max_pixels)
            if record is not None:
                record["stream_index"] = position
                records.append(record)
        self._num_raw = len(raw)
        log.summarize(str(file_pattern))
        if num_kp and not keypoint_names:
            keypoint_names = [f"kp{i}" for i in range(num_kp)]
        super().__init__(records, [label_map[c] for c in category_ids],
                         label_to_category_id={i: c for i, c in enumerate(category_ids)},
                         keypoint_names=keypoint_names, keypoint_flip_map=keypoint_flip_map,
                         problems=log.counts, source=str(file_pattern), on_error=on_error)

    def _record(self, where, p, header, label_of, label_of_name, num_kp, log, max_pixels):
        height, width = int(p["image/height"]), int(p["image/width"])
        if header is not None:  # the encoded image was checked during the scan
            if height <= 0 or width <= 0:
                log.fixed("size_from_image", where, "no image/height or image/width")
            elif (height, width) != header[:2]:
                log.error("size_mismatch", where, f"image/width x height = {width}x{height}, "
                          f"encoded image is {header[1]}x{header[0]}")
                return None
            height, width = header[:2]
        elif height <= 0 or width <= 0:
            log.error("malformed_annotation", where, "no image/height or image/width")
            return None
        elif height * width > max_pixels:
            log.error("image_too_large", where, f"{width}x{height} > max_pixels={max_pixels}")
            return None
        n = len(p["image/object/bbox/xmin"])
        if any(len(p[f"image/object/bbox/{k}"]) != n for k in ("ymin", "xmax", "ymax")):
            log.error("malformed_annotation", where, "bbox lists of different lengths")
            return None
        if self.has_masks and p["num_masks"] != n:
            log.error("bad_mask", where, f"{p['num_masks']} masks for {n} objects")
            return None
        ids, texts = p["image/object/class/label"], p["image/object/class/text"]
        labels = np.full(n, -1, np.int64)
        for i in range(n):
            if len(ids) == n:
                labels[i] = label_of.get(int(ids[i]), -1)
            elif len(texts) == n:
                labels[i] = label_of_name.get(texts[i].decode("utf8"), -1)
            if labels[i] < 0:
                log.error("unknown_class", f"{where}: object {i}", "class "
                          f"{ids[i] if len(ids) == n else texts[i] if len(texts) == n else '?'}"
                          " not in the label map")
        scale = np.array([width, height, width, height], np.float64)
        boxes = np.stack([p[f"image/object/bbox/{k}"] for k in ("xmin", "ymin", "xmax", "ymax")],
                         1).astype(np.float64).reshape(n, 4) * scale
        boxes, keep = sanitize_boxes(boxes, height, width, log, lambda i: f"{where}: object {i}")
        keep &= labels >= 0

        def per_object(key, default, dtype):
            values = p[key]
            return np.asarray(values if len(values) == n else np.full(n, default), dtype)

        source_id = p["image/source_id"].decode("utf8")
        record = {"image_id": int(source_id) if source_id.lstrip("-").isdigit() else -1,
                  "original_size": (height, width), "boxes": boxes[keep],
                  "labels": labels[keep].astype(np.int32),
                  "iscrowd": per_object("image/object/is_crowd", 0, np.int32)[keep],
                  "area": per_object("image/object/area", 0, np.float32)[keep],
                  "object_index": np.flatnonzero(keep).astype(np.int64),
                  "file_name": None, "filename": p["image/filename"].decode("utf8")}
        if len(p["image/object/difficult"]) == n and n:
            record["difficult"] = p["image/object/difficult"].astype(np.int32)[keep]
        if num_kp:
            xs, ys = p["image/object/keypoint/x"], p["image/object/keypoint/y"]
            vis = p["image/object/keypoint/visibility"]
            if len(xs) != n * num_kp or len(ys) != n * num_kp:
                log.error("bad_keypoints", where, f"{len(xs)} keypoints for {n} objects x "
                          f"{num_kp}")
                return None
            if len(vis) != n * num_kp:
                vis = np.full(n * num_kp, 2)
            kp = np.stack([xs * width, ys * height, vis], 1).reshape(n, num_kp, 3)
            record["keypoints"] = kp.astype(np.float32)[keep]
        return record

    @staticmethod
    def _complete(record):
        record = DetectionDataset._complete(record)
        if record["image_id"] < 0:  # non-numeric source_id: the stream position
            record["image_id"] = int(record["stream_index"])
        return record

    def _reads_encoded_images(self):
        return bool(self.records)  # image/encoded bytes, decoded in as_tf_dataset

    def _image_location(self, index):
        record = self.records[index]
        return f"{self.source}: record {record['stream_index']} ({record['filename']})"

    def load_image(self, index):
        return self._load_stream_item(index)[0]

    def load_masks(self, index):
        return self._load_stream_item(index)[1]

    def _load_stream_item(self, index):
        record = self.records[index]
        for example in self.as_tf_dataset().skip(index).take(1):
            masks = example["masks"].numpy() if "masks" in example else None
            assert int(example["image_id"]) == record["image_id"]
            return example["image"].numpy(), masks
        raise IndexError(index)

    def _tf_slices(self):
        import tensorflow as tf

        slices = super()._tf_slices()
        slices["object_index"] = tf.RaggedTensor.from_row_lengths(
            np.concatenate([r["object_index"] for r in self.records] or [np.zeros(0)]).astype(
                np.int64), [len(r["object_index"]) for r in self.records])
        return slices

    def as_tf_dataset(self, include_masks=None, shuffle=False, seed=None, shuffle_buffer=2048):
        """Stream the files (see :meth:`DetectionDataset.as_tf_dataset`); shuffling
        uses a buffer of ``shuffle_buffer`` encoded records."""
        import tensorflow as tf

        include_masks = self.has_masks if include_masks is None else include_masks
        if include_masks and not self.has_masks:
            raise ValueError(f"TFRecordDataset {self.source} has no instance masks")
        features = {"image/encoded": tf.io.FixedLenFeature([], tf.string)}
        if include_masks:
            features["image/object/mask"] = tf.io.VarLenFeature(tf.string)
        positions = np.array([r["stream_index"] for r in self.records], np.int64)
        if np.any(np.diff(positions) <= 0):
            raise ValueError("TFRecordDataset streams its files in order: a subset() must "
                             "keep the records in file order")
        keep = np.zeros(self._num_raw, bool)
        keep[positions] = True  # records that passed validation (and the subset)
        keep = tf.constant(keep)
        stream = (tf.data.TFRecordDataset(self.files).enumerate()
                  .filter(lambda i, _: tf.gather(keep, i)).map(lambda i, s: s))
        annotations = tf.data.Dataset.from_tensor_slices(self._tf_slices())

        def to_example(serialized, element):
            parsed = tf.io.parse_single_example(serialized, features)
            image = tf_decode_image(parsed["image/encoded"])
            example = {"image": image, "image_id": element["image_id"],
                       "original_size": element["original_size"]}
            for key in OBJECT_KEYS:
                if key in element:
                    example[key] = element[key]
            if include_masks:
                pngs = tf.gather(tf.sparse.to_dense(parsed["image/object/mask"]),
                                 element["object_index"])
                size = tf.shape(image)[:2]

                def decode_all():
                    return tf.map_fn(
                        lambda png: tf.cast(tf.io.decode_png(png, channels=1)[..., 0] > 0,
                                            tf.uint8),
                        pngs, fn_output_signature=tf.TensorSpec([None, None], tf.uint8))

                masks = tf.cond(tf.size(pngs) > 0, decode_all,  # map_fn cannot stack 0 items
                                lambda: tf.zeros(tf.concat([[0], size], 0), tf.uint8))
                example["masks"] = tf.reshape(masks, tf.concat([tf.shape(pngs), size], 0))
            return example

        ds = tf.data.Dataset.zip((stream, annotations))
        if shuffle:
            ds = ds.shuffle(min(shuffle_buffer, max(len(self.records), 1)), seed=seed,
                            reshuffle_each_iteration=True)
        return ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)


def _num_keypoints(parsed):
    n = len(parsed["image/object/bbox/xmin"])
    return len(parsed["image/object/keypoint/x"]) // n if n else 0
