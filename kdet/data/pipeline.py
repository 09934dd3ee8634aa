"""tf.data input pipeline: decode, augment, resize-with-pad, pad, batch.

``build_pipeline`` turns a kdet dataset (or a ``tf.data.Dataset`` of the
example schema of :mod:`kdet.data.dataset`) into ``(images, targets)``
batches for ``model.fit`` / ``model.evaluate``:

* ``images``: float32 ``[B, S, S, 3]``, RGB 0..255, image placed top-left,
  zero padding right/bottom;
* ``targets``: ``"boxes"`` float32 ``[B, M, 4]`` (``bounding_box_format``,
  padded rows 0), ``"labels"`` int32 ``[B, M]`` (padded -1), ``"image_id"``
  int64 ``[B]``, ``"scale"`` float32 ``[B]``, ``"original_size"`` int32
  ``[B, 2]``, and when the data has them ``"masks"`` uint8 ``[B, M, Hm, Wm]``
  (0/1) and ``"keypoints"`` float32 ``[B, M, K, 3]`` (x, y, visibility;
  0 for padding and for points that left the image).

Geometry: every transform maps a point ``p`` of the original image to
``p * scale - offset``. Evaluation uses ``scale = S / max(H, W)``, offset 0,
so predictions map back with ``original = resized / scale``. Training
(``augment`` has ``"scale_jitter"``) follows automl's EfficientDet
``resize_and_crop_image``: draw ``r`` in ``scale_range``, ``scale = r * S /
max(H, W)``, resize, take a random ``S x S`` crop (offset uniform in
``[0, max(0, scaled - S)]``), pad. Boxes are clipped to the visible image and
those left with zero width or height are removed (their slots become padding).
``"flip"`` mirrors image, boxes (``x -> W - x``), masks and keypoints (and
swaps left/right keypoints with ``keypoint_flip_map``) with probability 0.5;
``"color"`` jitters brightness, contrast, saturation and hue.

Why plain tf ops and not Keras' box-aware layers (``keras.layers.RandomFlip``
with a ``bounding_boxes`` dict): those layers transform images, boxes and
(some) masks, but not keypoints, and draw their randomness from a stateful
``SeedGenerator``, whose order under a parallel ``map`` is not reproducible.
Here every example gets its own stateless seed (``tf.data.Dataset.random``
zipped to the stream), so masks, keypoints and boxes share one draw and a
``seed`` reproduces the batches exactly.

    >>> from kdet.data.shapes import ShapesDataset
    >>> ds = build_pipeline(ShapesDataset(8, image_size=128, seed=0), image_size=128,
    ...                     batch_size=4, training=True, seed=0)
    >>> images, targets = next(iter(ds))
    >>> images.shape, targets["boxes"].shape, targets["masks"].shape
    (TensorShape([4, 128, 128, 3]), TensorShape([4, 100, 4]), TensorShape([4, 100, 128, 128]))
"""
import logging

logger = logging.getLogger("kdet.data")

AUGMENTATIONS = ("scale_jitter", "flip", "color")
# automl's / effdet's jitter: the image resized by a random factor in this range
SCALE_RANGE = (0.1, 2.0)
BOX_FORMATS = ("xyxy", "yxyx", "xywh", "center_xywh", "center_yxhw",
               "rel_xyxy", "rel_yxyx", "rel_xywh", "rel_center_xywh")


# ---- geometry ------------------------------------------------------------------
def flip_horizontal(image, objects, keypoint_flip_map=None):
    """Mirror an image ``[H, W, C]`` and its objects left-right.

    ``objects``: dict with ``"boxes"`` ``[N, 4]`` xyxy and optionally
    ``"masks"`` ``[N, H, W]`` and ``"keypoints"`` ``[N, K, 3]``; other keys
    pass through. Boxes map to ``[W - x2, y1, W - x1, y2]``; keypoints
    ``x -> W - x`` (unlabelled ones stay 0) and are reordered with
    ``keypoint_flip_map`` (torchvision's reference convention).
    """
    import tensorflow as tf

    width = tf.cast(tf.shape(image)[1], tf.float32)
    out = dict(objects)
    x1, y1, x2, y2 = tf.unstack(objects["boxes"], 4, axis=-1)
    out["boxes"] = tf.stack([width - x2, y1, width - x1, y2], axis=-1)
    if "masks" in objects:
        out["masks"] = objects["masks"][:, :, ::-1]
    if "keypoints" in objects:
        kp = objects["keypoints"]
        labelled = kp[..., 2] > 0
        x = tf.where(labelled, width - kp[..., 0], tf.zeros_like(kp[..., 0]))
        kp = tf.stack([x, kp[..., 1], kp[..., 2]], axis=-1)
        if keypoint_flip_map is not None:
            kp = tf.gather(kp, list(keypoint_flip_map), axis=1)
        out["keypoints"] = kp
    return image[:, ::-1], out


def scale_and_crop(image, objects, output_size, scale, offset_y=0, offset_x=0,
                   mask_size=None, size_rounding="round"):
    """Resize by ``scale``, crop an ``S x S`` window at the offset, pad top-left.

    Points map as ``p * scale - (offset_x, offset_y)``. Returns ``(image float32
    [S, S, C], objects)`` where boxes are clipped to the visible image (their
    removal, when empty, is :func:`remove_empty_boxes`'s job), masks are
    resized nearest-neighbour to ``[N, S, S]`` (then to ``mask_size``), and
    keypoints outside the visible image get visibility 0 and coordinates 0.
    ``size_rounding="floor"`` sizes the resized image ``floor(side * scale)``
    as torchvision's ``F.interpolate(scale_factor=...)`` does.
    """
    import tensorflow as tf

    size = output_size
    round_size = tf.floor if size_rounding == "floor" else tf.round
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.cast(scale, tf.float32)
    new_h = tf.maximum(tf.cast(round_size(h * scale), tf.int32), 1)
    new_w = tf.maximum(tf.cast(round_size(w * scale), tf.int32), 1)
    oy, ox = tf.cast(offset_y, tf.int32), tf.cast(offset_x, tf.int32)

    def crop_pad(x):
        x = x[oy:oy + size, ox:ox + size]
        return tf.image.pad_to_bounding_box(x, 0, 0, size, size)

    resized = tf.image.resize(tf.cast(image, tf.float32), [new_h, new_w], method="bilinear")
    image = tf.ensure_shape(crop_pad(resized), [size, size, image.shape[-1]])

    offset = tf.cast(tf.stack([ox, oy, ox, oy]), tf.float32)
    # the visible part of the resized image inside the S x S canvas
    limit_x = tf.minimum(float(size), w * scale - tf.cast(ox, tf.float32))
    limit_y = tf.minimum(float(size), h * scale - tf.cast(oy, tf.float32))
    limit = tf.stack([limit_x, limit_y, limit_x, limit_y])
    out = dict(objects)
    out["boxes"] = tf.clip_by_value(objects["boxes"] * scale - offset, 0.0, limit)
    if "masks" in objects:
        # [H, W, N + 1] for tf.image: one spare channel so N = 0 still resizes
        masks = tf.transpose(objects["masks"], [1, 2, 0])
        spare = tf.zeros(tf.concat([tf.shape(masks)[:2], [1]], 0), masks.dtype)
        masks = tf.concat([masks, spare], axis=-1)
        masks = tf.image.resize(masks, [new_h, new_w], method="nearest")
        masks = crop_pad(masks)
        if mask_size is not None and tuple(mask_size) != (size, size):
            masks = tf.image.resize(masks, mask_size, method="nearest")
        out["masks"] = tf.transpose(masks[..., :-1], [2, 0, 1])
    if "keypoints" in objects:
        kp = objects["keypoints"]
        xy = kp[..., :2] * scale - offset[:2]
        inside = ((kp[..., 2] > 0) & (xy[..., 0] >= 0) & (xy[..., 1] >= 0)
                  & (xy[..., 0] < limit_x) & (xy[..., 1] < limit_y))
        vis = tf.where(inside, kp[..., 2], 0.0)
        xy = tf.where(inside[..., None], xy, 0.0)
        out["keypoints"] = tf.concat([xy, vis[..., None]], axis=-1)
    return image, out


def eval_scale(height, width, output_size):
    """``S / max(H, W)``: the resize factor of resize-with-pad."""
    import tensorflow as tf

    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    return float(output_size) / tf.maximum(h, w)


def torchvision_scale(height, width, output_size, min_size=800, max_size=1333):
    """torchvision ``GeneralizedRCNNTransform``'s resize factor, ``min(min_size / short
    side, max_size / long side)``; the resized image must fit the ``S x S`` output
    (e.g. ``S = 1344`` for 800 / 1333), else the map fails naming the sizes."""
    import tensorflow as tf

    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    scale = tf.minimum(float(min_size) / tf.minimum(h, w), float(max_size) / tf.maximum(h, w))
    longest = tf.floor(tf.maximum(h, w) * scale)
    check = tf.debugging.assert_less_equal(
        longest, float(output_size),
        message=f"build_pipeline: the torchvision resize rule (min_size={min_size}, "
                f"max_size={max_size}) makes an image larger than image_size={output_size}")
    with tf.control_dependencies([check]):
        return tf.identity(scale)


def random_scale_crop_params(height, width, output_size, scale_range, seed):
    """automl's scale jitter: ``(scale, offset_y, offset_x)`` from a stateless seed [2]."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 3)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ratio = tf.random.stateless_uniform([], seeds[0], scale_range[0], scale_range[1])
    scale = ratio * float(output_size) / tf.maximum(h, w)
    room_y = tf.maximum(0.0, tf.round(h * scale) - float(output_size))
    room_x = tf.maximum(0.0, tf.round(w * scale) - float(output_size))
    offset_y = tf.cast(tf.floor(room_y * tf.random.stateless_uniform([], seeds[1])), tf.int32)
    offset_x = tf.cast(tf.floor(room_x * tf.random.stateless_uniform([], seeds[2])), tf.int32)
    return scale, offset_y, offset_x


def color_jitter(image, seed, brightness=0.1, contrast=0.2, saturation=0.2, hue=0.02):
    """Random brightness / contrast / saturation / hue on a 0..255 float image."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 4)
    x = image / 255.0
    x = tf.image.stateless_random_brightness(x, brightness, seeds[0])
    x = tf.image.stateless_random_contrast(x, 1 - contrast, 1 + contrast, seeds[1])
    x = tf.clip_by_value(x, 0.0, 1.0)
    x = tf.image.stateless_random_saturation(x, 1 - saturation, 1 + saturation, seeds[2])
    x = tf.image.stateless_random_hue(x, hue, seeds[3])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def remove_empty_boxes(objects, min_size=0.0):
    """Drop objects whose box width or height is ``<= min_size``."""
    import tensorflow as tf

    boxes = objects["boxes"]
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
    return {k: tf.boolean_mask(v, keep) for k, v in objects.items()}


def pad_objects(objects, max_boxes):
    """Truncate/pad every per-object tensor to ``max_boxes`` rows (labels pad -1)."""
    import tensorflow as tf

    out = {}
    for key, value in objects.items():
        inner = value.shape[1:].as_list()
        value = value[:max_boxes]
        pad = max_boxes - tf.shape(value)[0]
        paddings = tf.concat([[[0, pad]], tf.zeros([tf.rank(value) - 1, 2], tf.int32)], 0)
        value = tf.pad(value, paddings, constant_values=-1 if key == "labels" else 0)
        out[key] = tf.ensure_shape(value, [max_boxes] + inner)
    return out


def convert_boxes(boxes, target, image_size):
    """xyxy pixels -> a Keras box format (``rel_*`` divide by ``image_size``)."""
    import tensorflow as tf

    if target not in BOX_FORMATS:
        raise ValueError(f"bounding_box_format must be one of {BOX_FORMATS}, got {target!r}")
    x1, y1, x2, y2 = tf.unstack(boxes, 4, axis=-1)
    if target.startswith("rel_"):
        x1, y1, x2, y2 = (v / float(image_size) for v in (x1, y1, x2, y2))
        target = target[4:]
    parts = {"xyxy": (x1, y1, x2, y2), "yxyx": (y1, x1, y2, x2),
             "xywh": (x1, y1, x2 - x1, y2 - y1),
             "center_xywh": ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1),
             "center_yxhw": ((y1 + y2) / 2, (x1 + x2) / 2, y2 - y1, x2 - x1)}[target]
    return tf.stack(parts, axis=-1)


# ---- the pipeline ----------------------------------------------------------------
def warn_objects_beyond(dataset, max_boxes, keep_crowd=False):
    """Log (once per dataset and limit) how many objects ``max_boxes`` drops.

    Counted before augmentation (:meth:`~kdet.data.DetectionDataset.objects_beyond`):
    exact for evaluation, an upper bound for training crops. Returns the count.
    """
    dropped, images = dataset.objects_beyond(max_boxes, keep_crowd)
    warned = dataset.__dict__.setdefault("_warned_beyond_max_boxes", set())
    key = (int(max_boxes), bool(keep_crowd), dropped, images)
    if dropped and key not in warned:
        warned.add(key)
        most = int(dataset.objects_per_image(keep_crowd).max())
        logger.warning("%s: %d object(s) in %d image(s) lie beyond max_boxes=%d and are dropped "
                       "(most objects in one image: %d; pass max_boxes=%d, or None, to keep "
                       "them)", dataset.source, dropped, images, max_boxes, most, most)
    return dropped


def build_pipeline(dataset, image_size, batch_size, training, max_boxes=100,
                   augment=AUGMENTATIONS, seed=None, deterministic=False,
                   bounding_box_format="xyxy", scale_range=SCALE_RANGE, keypoint_flip_map=None,
                   include_masks=None, mask_size=None, keep_crowd=False, shuffle=None,
                   shuffle_buffer=2048, drop_remainder=None, repeat=False, check_pixels=True,
                   min_size=None, max_size=1333):
    """Batches of ``(images, targets)`` for ``model.fit`` (see the module docstring).

    Args:
        dataset: a kdet dataset (``as_tf_dataset``) or a ``tf.data.Dataset``
            of the example schema.
        image_size: output side ``S``.
        batch_size: images per batch.
        training: augment and shuffle (evaluation: resize-with-pad only).
        max_boxes: objects per image after padding. Objects beyond it are
            dropped (in annotation order), and a warning with their count is
            logged once per dataset. ``None``: the most objects in one image
            of ``dataset`` (a kdet dataset), so none are dropped.
        augment: subset of ``("scale_jitter", "flip", "color")`` used when
            training; without ``"scale_jitter"`` training resizes with pad.
        seed: makes shuffling and augmentation reproducible.
        deterministic: keep element order under parallelism (set it with
            ``seed`` for bit-identical epochs).
        bounding_box_format: format of ``targets["boxes"]`` (Keras names).
        scale_range: scale jitter range (automl: 0.1 .. 2.0).
        keypoint_flip_map: left/right keypoint permutation for ``"flip"``;
            default the dataset's.
        include_masks: add masks (default: when the dataset has them).
        mask_size: ``(Hm, Wm)`` of target masks; default ``(S, S)``.
        keep_crowd: keep ``iscrowd`` objects (default: drop them, as
            torchvision's reference training does).
        shuffle: shuffle the images (default: ``training``).
        shuffle_buffer: buffer for ``tf.data.Dataset`` input (kdet datasets
            shuffle their whole index before decoding).
        drop_remainder: default ``training`` (static batch dimension).
        repeat: repeat forever (then give ``steps_per_epoch`` to ``fit``).
        check_pixels: first decode every image of a kdet dataset once
            (:meth:`~kdet.data.DetectionDataset.check_pixels`, once per
            dataset), so a file that does not decode is skipped and counted,
            or raises a ``ValueError`` naming it, per the dataset's
            ``on_error``, instead of stopping ``fit`` mid-epoch.
        min_size, max_size: with ``min_size`` (e.g. 800), images are resized by
            torchvision's rule instead of to a long side of ``S`` (short side
            ``min_size``, long side at most ``max_size``, sizes floored as
            torchvision does) and padded bottom/right into the ``S x S`` output,
            which must hold them (``S = 1344`` for 800 / 1333): COCO-style
            training and evaluation at the reference resolution. Scale jitter,
            when in ``augment``, replaces it in training.
    """
    import tensorflow as tf

    unknown = set(augment) - set(AUGMENTATIONS)
    if unknown:
        raise ValueError(f"unknown augment {sorted(unknown)}; choose from {AUGMENTATIONS}")
    if bounding_box_format not in BOX_FORMATS:
        raise ValueError(f"bounding_box_format must be one of {BOX_FORMATS}, "
                         f"got {bounding_box_format!r}")
    is_tf_data = isinstance(dataset, tf.data.Dataset)
    if max_boxes is None:
        if is_tf_data:
            raise ValueError("max_boxes=None (from the data) needs a kdet dataset, "
                             "not a tf.data.Dataset")
        from kdet.data.dataset import auto_max_boxes
        max_boxes = auto_max_boxes(dataset, keep_crowd=keep_crowd)
    if image_size < 1 or batch_size < 1 or max_boxes < 1:
        raise ValueError("image_size, batch_size and max_boxes must be positive")
    augment = tuple(augment) if training else ()
    shuffle = training if shuffle is None else shuffle
    drop_remainder = training if drop_remainder is None else drop_remainder
    size = int(image_size)
    mask_size = (size, size) if mask_size is None else tuple(int(v) for v in mask_size)

    if not is_tf_data:
        if check_pixels:
            dataset.check_pixels()
        warn_objects_beyond(dataset, max_boxes, keep_crowd)
    if is_tf_data:
        ds = dataset
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        flip_map_default = None
    else:
        ds = dataset.as_tf_dataset(include_masks=include_masks, shuffle=shuffle, seed=seed)
        flip_map_default = getattr(dataset, "keypoint_flip_map", None)
    spec = ds.element_spec
    with_masks = "masks" in spec and include_masks is not False
    with_keypoints = "keypoints" in spec
    with_difficult = "difficult" in spec
    flip_map = keypoint_flip_map if keypoint_flip_map is not None else flip_map_default
    if with_keypoints and "flip" in augment and flip_map is None:
        raise ValueError("flipping keypoints needs keypoint_flip_map (which keypoint becomes "
                         "which); pass it or leave 'flip' out of augment")

    def prepare(example, element_seed):
        image = example["image"]
        objects = {"boxes": tf.cast(example["boxes"], tf.float32),
                   "labels": tf.cast(example["labels"], tf.int32)}
        if with_masks:
            objects["masks"] = tf.cast(example["masks"], tf.uint8)
        if with_keypoints:
            objects["keypoints"] = tf.cast(example["keypoints"], tf.float32)
        if with_difficult:
            objects["difficult"] = tf.cast(example["difficult"], tf.int32)
        if not keep_crowd and "iscrowd" in example:
            objects = {k: tf.boolean_mask(v, tf.equal(example["iscrowd"], 0))
                       for k, v in objects.items()}
        seeds = tf.random.experimental.stateless_split(
            tf.stack([element_seed, tf.constant(0, tf.int64)]), 3)
        if "flip" in augment:
            do_flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
            image, objects = tf.cond(
                do_flip, lambda: flip_horizontal(image, objects, flip_map),
                lambda: (image, objects))
        if "color" in augment:  # before the resize, so the padding stays 0
            image = color_jitter(tf.cast(image, tf.float32), seeds[2])
        shape = tf.shape(image)
        if "scale_jitter" in augment:
            scale, oy, ox = random_scale_crop_params(shape[0], shape[1], size, scale_range,
                                                     seeds[1])
        elif min_size is not None:
            scale, oy, ox = torchvision_scale(shape[0], shape[1], size, min_size, max_size), 0, 0
        else:
            scale, oy, ox = eval_scale(shape[0], shape[1], size), 0, 0
        image, objects = scale_and_crop(
            image, objects, size, scale, oy, ox, mask_size,
            size_rounding="floor" if min_size is not None and "scale_jitter" not in augment
            else "round")
        objects = pad_objects(remove_empty_boxes(objects), max_boxes)
        targets = {"boxes": convert_boxes(objects["boxes"], bounding_box_format, size),
                   "labels": objects["labels"],
                   "image_id": tf.cast(example["image_id"], tf.int64),
                   "scale": tf.cast(scale, tf.float32),
                   "original_size": tf.cast(example["original_size"], tf.int32)}
        if with_masks:
            targets["masks"] = objects["masks"]
        if with_keypoints:
            targets["keypoints"] = objects["keypoints"]
        if with_difficult:
            targets["difficult"] = objects["difficult"]
        return image, targets

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, seeds)).map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    # evaluation keeps the order; training may trade it for speed unless asked not to
    options.deterministic = bool(deterministic) or not training
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE)

