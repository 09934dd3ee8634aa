"""The one dataset interface every reader returns.

A reader (COCO, VOC, YOLO, mask folders, TFRecord, synthetic shapes) parses
its annotations once, in Python, into ``records``: one dict per image holding
everything except pixels. Pixels (and masks) are decoded lazily, either in
numpy (``dataset[i]``) or in ``tf.data`` (``dataset.as_tf_dataset()``).

Example schema (the same for every reader, numpy and tf.data):

==================  =======================  ==================================
key                 dtype / shape            meaning
==================  =======================  ==================================
``image``           uint8 ``[H, W, 3]``      RGB, EXIF orientation applied
                                             where the reader asks for it
``image_id``        int64 ``[]``
``boxes``           float32 ``[N, 4]``       xyxy, absolute pixels, 0-based
                                             continuous coordinates (a pixel
                                             ``i`` spans ``[i, i + 1)``)
``labels``          int32 ``[N]``            contiguous ``0 .. C-1``
``iscrowd``         int32 ``[N]``            1 for COCO crowd regions
``masks``           uint8 ``[N, H, W]``      optional, 0/1
``keypoints``       float32 ``[N, K, 3]``    optional, (x, y, visibility)
``difficult``       int32 ``[N]``            VOC (and TFRecord when present)
``original_size``   int32 ``[2]``            (H, W)
==================  =======================  ==================================

    >>> from kdet.data.shapes import ShapesDataset
    >>> ds = ShapesDataset(num_images=2, image_size=64, seed=0)
    >>> example = ds[0]
    >>> example["image"].shape, example["boxes"].dtype
    ((64, 64, 3), dtype('float32'))
"""
import collections
import concurrent.futures
import copy
import io
import os
import re
import warnings

import numpy as np

from kdet.data.errors import ON_ERROR, ProblemLog, logger, sanitize_boxes

#: Default ``max_pixels``: 8192 x 8192. Larger images are rejected as bad input.
DEFAULT_MAX_PIXELS = 8192 * 8192

#: Formats that ``tf.io.decode_image`` decodes (PIL's names; MPO is a JPEG).
TF_DECODABLE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")

# EXIF orientation -> PIL transpose, exactly as PIL.ImageOps.exif_transpose.
_EXIF_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM",
                   5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}

CHECK_IMAGES = ("header", "full", "none")

# Per-object keys: arrays whose first axis is the object axis.
OBJECT_KEYS = ("boxes", "labels", "iscrowd", "keypoints", "difficult")
_OBJECT_DTYPES = {"boxes": np.float32, "labels": np.int32, "iscrowd": np.int32,
                  "keypoints": np.float32, "difficult": np.int32}


def read_image_header(path, *, apply_exif, max_pixels, check, log, where):
    """Open an image header (cheap) and return ``(height, width, orientation, format)``.

    ``path`` is a file path or the encoded bytes.
    ``height``/``width`` are after the EXIF rotation when ``apply_exif``;
    ``orientation`` is the EXIF tag (1 when not applied). Returns ``None`` when
    the file is missing, unreadable, too large or not decodable by TF; the
    problem goes to ``log`` (which raises in ``"raise"`` mode).
    ``check="full"`` also decodes the pixels to catch truncated files
    (``"header"`` and ``"none"`` read the header only: readers that need the
    size always read it).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(path, bytes):
        source, path = io.BytesIO(path), "(encoded bytes)"
    elif not os.path.isfile(path):
        log.error("missing_image", where, f"image file {path} not found")
        return None
    else:
        source = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                width, height = im.size
                fmt = im.format
                orientation = 1
                if apply_exif:
                    orientation = int(im.getexif().get(0x0112, 1) or 1)
                    if orientation not in _EXIF_TRANSPOSE:
                        orientation = 1
                if width * height > max_pixels:
                    log.error("image_too_large", where,
                              f"image {path} is {width}x{height} = {width * height} pixels, "
                              f"more than max_pixels={max_pixels}")
                    return None
                if check == "full":
                    im.load()
    except Image.DecompressionBombError as e:
        log.error("image_too_large", where, f"image {path}: {e}")
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        log.error("corrupt_image", where, f"image {path} does not decode ({e})")
        return None
    if fmt not in TF_DECODABLE_FORMATS:
        log.error("corrupt_image", where,
                  f"image {path} is {fmt}, which tf.io.decode_image cannot decode "
                  f"(supported: {', '.join(TF_DECODABLE_FORMATS)})")
        return None
    if orientation in (5, 6, 7, 8):  # these swap the axes
        width, height = height, width
    return height, width, orientation, fmt


def load_image_file(path, orientation=1):
    """Decode an image file to uint8 RGB ``[H, W, 3]`` with PIL.

    Grayscale, RGBA (alpha dropped, as ``tf.io.decode_image(channels=3)``
    does) and palette images all become RGB; ``orientation`` is the EXIF
    transpose to apply (1 = none).
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette-with-transparency notice
        with Image.open(path) as im:
            if orientation != 1:
                im = im.transpose(getattr(Image.Transpose, _EXIF_TRANSPOSE[orientation]))
            return np.asarray(im.convert("RGB"))


def tf_decode_image(data):
    """Decode image bytes to uint8 RGB ``[H, W, 3]`` in ``tf`` (format sniffed).

    Grayscale, RGBA and palette images become RGB (``channels=3``), GIFs give
    their first frame. JPEGs use the accurate integer DCT, so the pixels equal
    PIL's (``load_image_file``); TF's default fast DCT differs by ~1 level.
    """
    import tensorflow as tf

    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    return tf.ensure_shape(image, [None, None, 3])


def tf_apply_exif_orientation(image, orientation):
    """``tf`` twin of ``PIL.ImageOps.exif_transpose`` for a decoded ``[H, W, C]`` image."""
    import tensorflow as tf

    image = tf.convert_to_tensor(image)

    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: image,                               # 1 as stored
        lambda: image[:, ::-1],                      # 2 FLIP_LEFT_RIGHT
        lambda: image[::-1, ::-1],                   # 3 ROTATE_180
        lambda: image[::-1],                         # 4 FLIP_TOP_BOTTOM
        lambda: transpose(image),                    # 5 TRANSPOSE
        lambda: transpose(image)[:, ::-1],           # 6 ROTATE_270 (clockwise 90)
        lambda: transpose(image)[::-1, ::-1],        # 7 TRANSVERSE
        lambda: transpose(image)[::-1],              # 8 ROTATE_90 (counter-clockwise)
    ]
    index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
    return tf.switch_case(index, branches)


def keypoint_flip_map_from_names(names):
    """Index permutation swapping ``left*``/``right*`` keypoint names.

    >>> keypoint_flip_map_from_names(["nose", "left_eye", "right_eye"])
    (0, 2, 1)
    """
    names = list(names)
    flip = []
    for i, name in enumerate(names):
        for a, b in (("left", "right"), ("right", "left")):
            if a in name:
                other = name.replace(a, b)
                if other in names:
                    flip.append(names.index(other))
                    break
        else:
            flip.append(i)
    return tuple(flip)


def resized_size(height, width, image_size):
    """Scale and size of the resize-with-pad used by the pipeline.

    ``scale = image_size / max(height, width)``; the resized image is
    ``round(height * scale) x round(width * scale)``, placed top-left.
    """
    scale = image_size / max(height, width)
    return scale, max(1, int(round(height * scale))), max(1, int(round(width * scale)))


class DetectionDataset:
    """Records, class names and the two views (numpy and tf.data).

    Readers subclass it; it is also usable directly on records built by hand,
    either with ``"file_name"`` (an image path) or ``"image"`` (an array):

    >>> import numpy as np
    >>> rec = {"image_id": 7, "image": np.zeros((32, 48, 3), np.uint8),
    ...        "boxes": np.array([[4, 4, 20, 30]], np.float32), "labels": np.array([0])}
    >>> ds = DetectionDataset([rec], class_names=["cat"])
    >>> ds[0]["original_size"].tolist(), ds.num_classes
    ([32, 48], 1)

    Args:
        records: list of per-image dicts (see the module docstring); missing
            ``iscrowd``/``original_size``/``orientation`` are filled in.
        class_names: names of labels ``0 .. C-1``.
        label_to_category_id: label -> dataset category id (COCO ids);
            defaults to ``label + 1``.
        keypoint_names, keypoint_flip_map, skeleton: keypoint metadata.
        problems: ``collections.Counter`` of problem kinds met while reading.
        source: what was read (a path), for messages.
        on_error: the reader's policy, also applied by :meth:`check_pixels`
            (``build_pipeline`` runs it before the first batch).
    """

    has_masks = False

    def __init__(self, records, class_names, *, label_to_category_id=None,
                 keypoint_names=None, keypoint_flip_map=None, skeleton=None,
                 problems=None, source="records", on_error="raise"):
        self.records = [self._complete(r) for r in records]
        self.class_names = tuple(str(c) for c in class_names)
        if label_to_category_id is None:
            label_to_category_id = {i: i + 1 for i in range(len(self.class_names))}
        self.label_to_category_id = dict(label_to_category_id)
        self.category_id_to_label = {c: l for l, c in self.label_to_category_id.items()}
        self.keypoint_names = tuple(keypoint_names) if keypoint_names else None
        if keypoint_flip_map is None and self.keypoint_names:
            keypoint_flip_map = keypoint_flip_map_from_names(self.keypoint_names)
        self.keypoint_flip_map = tuple(keypoint_flip_map) if keypoint_flip_map else None
        self.skeleton = skeleton
        self.problems = problems if problems is not None else collections.Counter()
        self.source = str(source)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.pixels_checked = False  # set by check_pixels

    @staticmethod
    def _complete(record):
        r = dict(record)
        n = len(np.asarray(r.get("labels", [])))
        r["boxes"] = np.asarray(r.get("boxes", np.zeros((0, 4))), np.float32).reshape(n, 4)
        r["labels"] = np.asarray(r.get("labels", []), np.int32).reshape(n)
        r["iscrowd"] = np.asarray(r.get("iscrowd", np.zeros(n)), np.int32).reshape(n)
        for key in ("keypoints", "difficult"):
            if key in r:
                r[key] = np.asarray(r[key], _OBJECT_DTYPES[key])
        if "original_size" not in r:
            if "image" not in r:
                raise ValueError(f"record {r.get('image_id')!r} has neither 'original_size' "
                                 "nor an in-memory 'image'")
            r["original_size"] = np.shape(r["image"])[:2]
        r["original_size"] = np.asarray(r["original_size"], np.int32).reshape(2)
        r["image_id"] = int(r["image_id"])
        r.setdefault("orientation", 1)
        r.setdefault("file_name", None)
        return r

    @classmethod
    def from_records(cls, records, class_names, on_error="raise", **kwargs):
        """A dataset of hand-built records, validated like a reader's input.

        Boxes are checked and clipped (:func:`kdet.data.errors.sanitize_boxes`)
        and labels must lie in ``0 .. len(class_names) - 1``; ``on_error``
        as for the readers. Other keyword arguments go to the constructor.
        """
        log = ProblemLog(on_error)
        clean = []
        for k, record in enumerate(records):
            r = cls._complete(record)
            where = f"record {k} (image_id {r['image_id']})"
            height, width = (int(v) for v in r["original_size"])
            boxes, keep = sanitize_boxes(r["boxes"], height, width, log,
                                         lambda i: f"{where}: object {i}")
            bad_label = (r["labels"] < 0) | (r["labels"] >= len(class_names))
            for i in np.flatnonzero(bad_label & keep):
                log.error("unknown_class", f"{where}: object {i}",
                          f"label {r['labels'][i]} outside 0..{len(class_names) - 1}")
            keep &= ~bad_label
            r["boxes"] = boxes
            for key in [key for key, v in r.items() if isinstance(v, np.ndarray)
                        and key in OBJECT_KEYS + ("area", "annotation_ids")]:
                r[key] = r[key][keep]
            clean.append(r)
        log.summarize("records")
        return cls(clean, class_names, problems=log.counts, on_error=on_error, **kwargs)

    # ---- metadata -------------------------------------------------------
    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def category_ids(self):
        """Dataset category id of each label ``0..C-1`` (for the COCO evaluator)."""
        return [self.label_to_category_id[i] for i in range(self.num_classes)]

    @property
    def num_keypoints(self):
        return len(self.keypoint_names) if self.keypoint_names else 0

    @property
    def has_keypoints(self):
        return bool(self.records) and "keypoints" in self.records[0]

    @property
    def has_difficult(self):
        return bool(self.records) and "difficult" in self.records[0]

    def __len__(self):
        return len(self.records)

    def __repr__(self):
        return (f"{type(self).__name__}({self.source!r}, images={len(self)}, "
                f"classes={self.num_classes}, masks={self.has_masks}, "
                f"keypoints={self.has_keypoints})")

    def subset(self, indices):
        """A dataset of the same kind over ``records[indices]`` (e.g. a split).

        >>> from kdet.data.shapes import ShapesDataset
        >>> len(ShapesDataset(num_images=10, seed=0).subset(range(8)))
        8
        """
        other = copy.copy(self)
        other.records = [self.records[i] for i in indices]
        return other

    # ---- numpy view -----------------------------------------------------
    def load_image(self, index):
        """uint8 RGB ``[H, W, 3]`` of image ``index``."""
        record = self.records[index]
        if "image" in record:
            return np.asarray(record["image"], np.uint8)
        return load_image_file(record["file_name"], record["orientation"])

    def load_masks(self, index):
        """uint8 ``[N, H, W]`` instance masks of image ``index``."""
        record = self.records[index]
        if "masks" in record:
            return np.asarray(record["masks"], np.uint8)
        raise ValueError(f"{type(self).__name__} has no instance masks")

    def load_pixels(self, index, include_masks):
        """``(image, masks or None)`` of image ``index``; readers that make both
        in one go (synthetic data) override this."""
        return self.load_image(index), (self.load_masks(index) if include_masks else None)

    def __getitem__(self, index):
        """The full example of image ``index`` as numpy arrays (schema above)."""
        record = self.records[index]
        image, masks = self.load_pixels(index, self.has_masks)
        example = {"image": image, "image_id": np.int64(record["image_id"]),
                   "original_size": record["original_size"].copy()}
        for key in OBJECT_KEYS:
            if key in record:
                example[key] = record[key].copy()
        if masks is not None:
            example["masks"] = masks
        return example

    # ---- tf.data view ---------------------------------------------------
    def _tf_slices(self):
        """Per-image tensors sliced by ``from_tensor_slices`` (objects ragged)."""
        import tensorflow as tf

        lengths = np.array([len(r["labels"]) for r in self.records], np.int64)
        slices = {
            "index": np.arange(len(self.records), dtype=np.int64),
            "image_id": np.array([r["image_id"] for r in self.records], np.int64),
            "file_name": np.array([r["file_name"] or "" for r in self.records], object),
            "orientation": np.array([r["orientation"] for r in self.records], np.int32),
            "original_size": np.array([r["original_size"] for r in self.records],
                                      np.int32).reshape(-1, 2),
        }
        for key in OBJECT_KEYS:
            if self.records and key in self.records[0]:
                inner = self.records[0][key].shape[1:]
                values = [r[key] for r in self.records]
                flat = (np.concatenate(values) if values else np.zeros((0,) + inner))
                slices[key] = tf.RaggedTensor.from_row_lengths(
                    flat.astype(_OBJECT_DTYPES[key]), lengths)
        return slices

    def _tf_pixels(self, element, include_masks):
        """``(image, masks or None)`` of one tf.data element; readers may override."""
        import tensorflow as tf

        if self.records and "image" in self.records[0]:
            image = tf.numpy_function(self.load_image, [element["index"]], tf.uint8,
                                      stateful=False)
        else:
            image = tf_decode_image(tf.io.read_file(element["file_name"]))
            image = tf_apply_exif_orientation(image, element["orientation"])
        image = tf.ensure_shape(image, [None, None, 3])
        with tf.control_dependencies([tf.debugging.assert_equal(
                tf.shape(image)[:2], element["original_size"],
                message="decoded image size differs from the size read at load time")]):
            image = tf.identity(image)
        masks = None
        if include_masks:
            masks = tf.numpy_function(self.load_masks, [element["index"]], tf.uint8,
                                      stateful=False)
            masks = tf.ensure_shape(masks, [None, None, None])
        return image, masks

    def as_tf_dataset(self, include_masks=None, shuffle=False, seed=None):
        """``tf.data.Dataset`` of examples (schema above), images decoded lazily.

        Args:
            include_masks: add ``"masks"``; default: when the dataset has them.
            shuffle: shuffle the image order (before decoding, whole dataset,
                reshuffled every epoch).
            seed: shuffle seed.
        """
        import tensorflow as tf

        include_masks = self.has_masks if include_masks is None else include_masks
        if include_masks and not self.has_masks:
            raise ValueError(f"{type(self).__name__} {self.source} has no instance masks")

        def to_example(element):
            image, masks = self._tf_pixels(element, include_masks)
            example = {"image": image, "image_id": element["image_id"],
                       "original_size": element["original_size"]}
            for key in OBJECT_KEYS:
                if key in element:
                    example[key] = element[key]
            if include_masks:
                example["masks"] = masks
            return example

        ds = tf.data.Dataset.from_tensor_slices(self._tf_slices())
        if shuffle:
            ds = ds.shuffle(max(len(self.records), 1), seed=seed, reshuffle_each_iteration=True)
        return ds.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)

    # ---- full pixel check ---------------------------------------------------
    def _reads_encoded_images(self):
        """True when pixels come from encoded files or bytes (which may not decode)."""
        return any(r.get("file_name") for r in self.records)

    def _image_location(self, index):
        record = self.records[index]
        return record.get("file_name") or f"{self.source}: image id {record['image_id']}"

    def check_pixels(self, on_error=None, include_masks=None):
        """Decode every image once, as training will, and drop or reject the bad ones.

        The readers' default ``check_images="header"`` opens headers only, so
        a truncated file passes it and would stop ``model.fit`` mid-epoch.
        Here an image is *bad* when either of kdet's decoders fails on it:
        the ``tf.data`` view (:meth:`as_tf_dataset`: ``tf.io.decode_*``, the
        size check and, with ``include_masks``, the masks) or the numpy view
        (PIL's full decode, :func:`load_image_file`). They disagree on some
        truncations (PIL accepts a PNG cut inside its end chunk, TF does not),
        and kdet uses both.

        ``on_error="raise"`` (default: the dataset's ``on_error``) raises a
        ``ValueError`` naming the first bad file; ``"skip"`` removes the bad
        images from ``records``, adds them to ``problems["corrupt_image"]``
        and logs one warning listing them. Runs once per dataset (later calls
        return at once); returns the list of bad image locations.

        >>> from kdet.data.shapes import ShapesDataset
        >>> ShapesDataset(2, image_size=64, seed=0).check_pixels()  # nothing encoded
        []
        """
        if self.pixels_checked:
            return []
        on_error = on_error or self.on_error
        include_masks = self.has_masks if include_masks is None else include_masks
        if not self._reads_encoded_images():
            self.pixels_checked = True
            return []
        reasons = self._pil_decode_failures()
        rest = [i for i in range(len(self.records)) if i not in reasons]
        for k, reason in self.subset(rest)._tf_decode_failures(include_masks).items():
            reasons[rest[k]] = reason
        log = ProblemLog(on_error)
        for index in sorted(reasons):  # raises at the first one in "raise" mode
            where = self._image_location(index)
            log.error("corrupt_image", where, f"image does not decode ({reasons[index]})")
        bad = [self._image_location(i) for i in sorted(reasons)]
        if bad:
            self.records = [r for i, r in enumerate(self.records) if i not in reasons]
            self.problems = collections.Counter(self.problems)
            self.problems.update(log.counts)
            shown = "; ".join(f"{where} ({reasons[i]})"
                              for where, i in zip(bad[:20], sorted(reasons)))
            logger.warning("%s: skipped %d image(s) that do not decode [corrupt_image]: %s%s",
                           self.source, len(bad), shown, "; ..." if len(bad) > 20 else "")
        self.pixels_checked = True
        return bad

    def _pil_decode_failures(self):
        """``{index: reason}`` of the file images PIL cannot fully decode."""
        from PIL import Image

        def failure(path):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with Image.open(path) as im:
                        im.load()
            except Exception as e:  # noqa: BLE001 - any failure makes the file unusable
                return f"PIL: {e}"
            return None

        files = [(i, r["file_name"]) for i, r in enumerate(self.records) if r.get("file_name")]
        # PIL releases the GIL while decoding: threads decode in parallel
        with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(failure, [path for _, path in files])
            return {i: reason for (i, _), reason in zip(files, results) if reason}

    def _tf_decode_failures(self, include_masks):
        """``{index: reason}`` of the images whose ``as_tf_dataset`` element fails.

        A failing element of a ``tf.data`` map raises once and the iterator
        moves on, so (unshuffled) element ``k`` is record ``k``.
        """
        import tensorflow as tf

        failures = {}
        iterator = iter(self.as_tf_dataset(include_masks=include_masks))
        for index in range(len(self.records)):
            try:
                next(iterator)
            except StopIteration:  # the stream ended early: the rest never decoded
                failures.update({i: "TF: the stream ended before this image"
                                 for i in range(index, len(self.records))})
                break
            except tf.errors.OpError as e:
                failures[index] = "TF: " + _short_tf_message(e.message)
        return failures

    # ---- objects per image ---------------------------------------------------
    def objects_per_image(self, keep_crowd=False):
        """int ``[num_images]``: objects of each image the pipeline keeps
        (crowd objects count only with ``keep_crowd``, as in ``build_pipeline``)."""
        return np.array([len(r["labels"]) if keep_crowd else int((r["iscrowd"] == 0).sum())
                         for r in self.records], np.int64)

    def objects_beyond(self, max_boxes, keep_crowd=False):
        """``(objects, images)``: how many objects ``build_pipeline(max_boxes=...)``
        drops because their image has more than ``max_boxes``, and in how many images.

        Before augmentation: a training crop may remove some objects first, so
        for training this is an upper bound; for evaluation it is exact.
        """
        counts = self.objects_per_image(keep_crowd)
        over = np.maximum(counts - int(max_boxes), 0)
        return int(over.sum()), int((over > 0).sum())

    # ---- evaluation / inspection ----------------------------------------
    def coco_ground_truth(self, image_size=None, include_masks=False):
        """Ground truth as a COCO-format dict (for ``kdet.metrics.COCOEvaluator``).

        Category ids are mapped back with ``label_to_category_id``; image ids
        are the records' ids. With ``image_size`` the boxes, areas, keypoints
        and masks are scaled the way ``build_pipeline`` resizes for
        evaluation (``scale = image_size / max(H, W)``), so predictions made on
        resized images can be scored without mapping them back.
        ``difficult`` objects (VOC) carry ``"ignore": 1``; note that
        pycocotools only honours ``iscrowd``.

        Args:
            image_size: evaluation resolution, or ``None`` for original pixels.
            include_masks: add RLE ``"segmentation"`` from ``load_masks``.
        """
        from pycocotools import mask as mask_utils

        if include_masks and not self.has_masks:
            raise ValueError(f"{type(self).__name__} {self.source} has no instance masks")
        images, annotations = [], []
        ann_id = 0
        for index, r in enumerate(self.records):
            height, width = (int(v) for v in r["original_size"])
            scale = 1.0
            if image_size is not None:
                scale, height, width = resized_size(height, width, image_size)
            images.append({"id": r["image_id"], "width": width, "height": height,
                           "file_name": os.path.basename(r["file_name"] or "")})
            boxes = r["boxes"].astype(np.float64) * scale
            areas = r.get("area")
            areas = (np.asarray(areas, np.float64) * scale ** 2 if areas is not None
                     else (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
            masks = None
            if include_masks:
                masks = self.load_masks(index)
                if image_size is not None:
                    masks = _resize_masks_nearest(masks, height, width)
            ids = r.get("annotation_ids")
            for i in range(len(r["labels"])):
                ann_id += 1
                x1, y1, x2, y2 = boxes[i]
                ann = {"id": int(ids[i]) if ids is not None else ann_id,
                       "image_id": r["image_id"],
                       "category_id": int(self.label_to_category_id[int(r["labels"][i])]),
                       "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                       "area": float(areas[i]), "iscrowd": int(r["iscrowd"][i])}
                if "keypoints" in r:
                    kp = r["keypoints"][i].astype(np.float64).copy()
                    kp[:, :2] *= scale
                    ann["keypoints"] = kp.reshape(-1).tolist()
                    ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
                if "difficult" in r:
                    ann["ignore"] = int(r["difficult"][i])
                if masks is not None:
                    rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    ann["segmentation"] = rle
                annotations.append(ann)
        categories = []
        for label, name in enumerate(self.class_names):
            cat = {"id": int(self.label_to_category_id[label]), "name": name}
            if self.keypoint_names:
                cat["keypoints"] = list(self.keypoint_names)
                if self.skeleton:
                    cat["skeleton"] = [list(e) for e in self.skeleton]
            categories.append(cat)
        return {"images": images, "annotations": annotations, "categories": categories}

    def inspect(self, max_boxes=None):
        """Counts, class histogram, sizes and problems (for ``kdet inspect``).

        ``max_boxes``: also count the objects ``build_pipeline`` would drop
        at that limit (default: the most objects in one image, so none).
        """
        labels = (np.concatenate([r["labels"] for r in self.records])
                  if self.records else np.zeros(0, np.int32))
        crowd = sum(int(r["iscrowd"].sum()) for r in self.records)
        per_image = np.array([len(r["labels"]) for r in self.records] or [0])
        sizes = np.array([r["original_size"] for r in self.records] or [[0, 0]])
        boxes = (np.concatenate([r["boxes"] for r in self.records])
                 if self.records else np.zeros((0, 4), np.float32))
        wh = boxes[:, 2:] - boxes[:, :2]
        hist = np.bincount(labels, minlength=self.num_classes) if len(labels) else \
            np.zeros(self.num_classes, int)
        needed = auto_max_boxes(self)
        limit = needed if max_boxes is None else int(max_boxes)
        beyond, beyond_images = self.objects_beyond(limit)
        return {
            "source": self.source,
            "num_images": len(self.records),
            "num_objects": int(len(labels)),
            "num_crowd": crowd,
            "num_negative_images": int(sum(len(r["labels"]) == 0 for r in self.records)),
            "num_classes": self.num_classes,
            "class_histogram": {name: int(hist[i]) for i, name in enumerate(self.class_names)},
            "objects_per_image": {"min": int(per_image.min()), "max": int(per_image.max()),
                                  "mean": float(per_image.mean())},
            "image_size_hw": {"min": sizes.min(0).tolist(), "max": sizes.max(0).tolist()},
            "box_size_wh": ({"min": wh.min(0).tolist(), "median": np.median(wh, 0).tolist(),
                             "max": wh.max(0).tolist()} if len(wh) else None),
            "has_masks": self.has_masks,
            "num_keypoints": self.num_keypoints,
            "max_boxes": limit,
            "max_boxes_auto": max_boxes is None,
            "max_boxes_needed": needed,
            "objects_beyond_max_boxes": beyond,
            "images_beyond_max_boxes": beyond_images,
            "problems": dict(self.problems),
        }


def auto_max_boxes(*datasets, keep_crowd=False):
    """The most objects one image of ``datasets`` has (at least 1): the
    ``max_boxes`` that makes ``build_pipeline`` drop nothing."""
    counts = [int(ds.objects_per_image(keep_crowd).max(initial=0)) for ds in datasets
              if ds is not None]
    return max(counts + [1])


def _short_tf_message(message):
    """A TF error message without the ``{{function_node ...}}`` and ``[[...]]`` noise."""
    text = re.sub(r"\{\{[^}]*\}\}", "", message)
    text = re.sub(r"\s*\[\[.*", "", text, flags=re.S)
    return " ".join(text.split())[:200] or "decoding failed"


def _resize_masks_nearest(masks, height, width):
    """Nearest-neighbour resize of ``[N, h, w]`` masks, as ``tf.image.resize`` does."""
    n, h, w = masks.shape
    rows = np.minimum(np.floor((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
    cols = np.minimum(np.floor((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
    return masks[:, rows][:, :, cols]
