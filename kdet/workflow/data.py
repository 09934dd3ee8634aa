"""Datasets and batches from workflow settings (see :mod:`kdet.workflow.config`).

``read_datasets(config)`` opens the training and validation sets of any
reader kdet has; ``training_batches`` and ``evaluation_batches`` turn them
into ``tf.data`` pipelines.

Training batches are *epoch-indexed*: epoch ``e`` is built from its own seed
(``seed * 100003 + e``). So epoch 3 sees the same images in the same order with the same
augmentation whether the run started at epoch 1 or resumed at epoch 3 after a
crash; an ordinary reshuffling ``tf.data`` pipeline would replay epoch 1's
order after a restart.

    >>> from kdet.workflow.data import read_datasets
    >>> train, val = read_datasets({"format": "shapes", "num_images": 8,
    ...                             "val_num_images": 4, "image_size": 64, "seed": 0})
    >>> len(train), len(val), train.class_names
    (8, 4, ('circle', 'square', 'triangle'))
"""
import os

import numpy as np

from kdet.data.pipeline import AUGMENTATIONS, SCALE_RANGE
from kdet.workflow.config import DATA_FORMATS

EPOCH_SEED_STRIDE = 100003
SHAPES_IMAGE_SIZE = 128


def _require(config, key, what):
    value = config.get(key)
    if not value:
        raise ValueError(f"format={config.get('format')!r}: {what} needs --{key.replace('_', '-')}")
    return value


def _path_exists(path, key):
    if not os.path.exists(path):
        raise ValueError(f"--{key.replace('_', '-')} {path}: no such file or folder")
    return path


def read_dataset(config, which, like=None, annotations=(), required=True):
    """The ``which`` (``"train"`` or ``"val"``) dataset of ``config``, or ``None``.

    ``like``: a dataset whose classes this one must use (the training set when
    reading the validation set), so labels mean the same in both.
    ``annotations``: what the model needs besides boxes, ``"masks"`` and/or
    ``"keypoints"`` (COCO JSON reads them only when asked); a dataset without
    them is an error that names it (``required=False``: read them where the data
    has them, as ``kdet eval`` does).

    Every image is decoded once here (:meth:`kdet.data.DetectionDataset.check_pixels`):
    with ``on_error="skip"`` files that do not decode are dropped and counted
    before the set is used (so ``len``, ``steps_per_epoch`` and the COCO ground
    truth agree with what training and evaluation see); with ``"raise"`` the
    first one raises a ``ValueError`` naming it, before any training.
    """
    annotations = tuple(annotations or ())
    try:
        dataset = _open_dataset(config, which, like, annotations)
    except ValueError as error:
        # a COCO instances JSON asked for keypoints it does not name: fine for evaluation
        if required or "keypoints" not in annotations or "keypoints" not in str(error):
            raise
        annotations = tuple(a for a in annotations if a != "keypoints")
        dataset = _open_dataset(config, which, like, annotations)
    if dataset is not None and required:
        check_annotations(dataset, annotations, config.get("model"))
        dataset.check_pixels(config.get("on_error", "raise"))
    return dataset


def check_annotations(dataset, annotations, model_name=None):
    """A ``ValueError`` naming ``dataset`` when it lacks an annotation in ``annotations``."""
    have = {"masks": dataset.has_masks, "keypoints": dataset.has_keypoints}
    missing = [a for a in annotations or () if not have[a]]
    if missing:
        model = f"--model {model_name}" if model_name else "the model"
        hint = {"masks": "COCO JSON with segmentation, or --format masks (PNG instance masks)",
                "keypoints": "COCO person-keypoints JSON"}
        raise ValueError(f"{model} trains on {' and '.join(missing)}, but the dataset "
                         f"{dataset.source} has none; give data that has them ("
                         f"{'; '.join(hint[a] for a in missing)})")


def _open_dataset(config, which, like, annotations=()):
    from kdet import data

    fmt = config.get("format")
    if fmt not in DATA_FORMATS:
        raise ValueError(f"--format must be one of {DATA_FORMATS}, got {fmt!r}")
    seed = int(config.get("seed", 0))
    on_error = config.get("on_error", "raise")
    class_names = config.get("class_names")
    if like is not None and class_names is None and fmt in ("voc", "yolo", "masks"):
        class_names = list(like.class_names)

    if fmt == "shapes":
        count = int(config.get("num_images", 64) if which == "train"
                    else config.get("val_num_images", 16))
        if count <= 0:
            return None
        size = int(config.get("image_size") or SHAPES_IMAGE_SIZE)
        # validation images come from another seed, so they never equal training ones
        return data.ShapesDataset(count, image_size=size, seed=seed if which == "train"
                                  else seed + 1_000_003)

    location = config.get(f"{which}_data")
    images = config.get(f"{which}_images")
    split = config.get(f"{which}_split")
    if location is None:
        if which == "val" and fmt == "yolo" and config.get("train_data"):
            location = config["train_data"]  # the same data.yaml, its 'val' entry
            split = split or "val"
            if not _yaml_has(location, split):
                return None
        elif which == "val":
            return None
        else:
            _require(config, "train_data", "training")
    if fmt != "tfrecord":  # a TFRecord location may be a glob
        _path_exists(location, f"{which}_data")

    if fmt == "coco":
        if not images:
            raise ValueError(f"format='coco' needs --{which}-images (the folder the JSON's "
                             "file_name entries are relative to)")
        category_ids = like.category_ids if like is not None else None
        return data.COCODataset(location, _path_exists(images, f"{which}_images"),
                                on_error=on_error, category_ids=category_ids,
                                include_masks="masks" in annotations,
                                include_keypoints="keypoints" in annotations)
    if fmt == "voc":
        if any(os.path.isdir(os.path.join(location, d)) for d in ("Annotations", "annotations")):
            return data.VOCDataset(location, image_dir=images, split=split,
                                   class_names=class_names, on_error=on_error)
        if not images:
            raise ValueError(f"{location} holds no Annotations/ or annotations/ folder: treat it "
                             f"as the XML folder and give --{which}-images")
        return data.VOCDataset(annotation_dir=location, image_dir=images, split=split,
                               class_names=class_names, on_error=on_error)
    if fmt == "yolo":
        if os.path.isdir(location):
            if not class_names:
                raise ValueError(f"{location} is a folder of images: give --class-names "
                                 f"(or point --{which}-data at a data.yaml)")
            return data.YOLODataset(images_dir=location, labels_dir=images,
                                    class_names=class_names, on_error=on_error)
        return data.YOLODataset(location, split=split or which, class_names=class_names,
                                on_error=on_error)
    if fmt == "tfrecord":
        label_map = config.get("label_map")
        if label_map is None and like is not None:
            label_map = {like.label_to_category_id[i]: n for i, n in enumerate(like.class_names)}
        return data.TFRecordDataset(location, label_map=label_map, on_error=on_error)
    # masks
    name = class_names[0] if class_names else "pedestrian"
    if class_names and len(class_names) != 1:
        raise ValueError(f"format='masks' has one class, got class_names={class_names}")
    return data.MaskFolderDataset(location, class_name=name, on_error=on_error)


def _yaml_has(path, key):
    from kdet.data.yolo import load_data_yaml
    return bool(load_data_yaml(path).get(key))


def split_off(dataset, fraction, seed):
    """``(rest, held_out)``: a fixed random ``fraction`` of the images held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {fraction}")
    count = len(dataset)
    held = int(round(count * fraction))
    if held < 1 or held >= count:
        raise ValueError(f"val_fraction={fraction} of {count} images leaves an empty split")
    order = np.random.default_rng(seed).permutation(count)
    return dataset.subset(sorted(order[held:])), dataset.subset(sorted(order[:held]))


def read_datasets(config, need_train=True, need_val=True, annotations=(), required=True):
    """``(train, val)`` datasets of ``config`` (either may be ``None``), each with the
    ``annotations`` (``"masks"``, ``"keypoints"``) the model needs (see :func:`read_dataset`).

    ``val_fraction`` splits the training set when no validation data is given.
    ``need_train=False`` / ``need_val=False`` skip reading a set that is not
    needed (its problems would be reported too, e.g. a YOLO ``val`` entry
    naming the training images would print every warning twice).
    """
    train = (read_dataset(config, "train", annotations=annotations, required=required)
             if need_train or config.get("val_fraction") else None)
    val = (read_dataset(config, "val", like=train, annotations=annotations, required=required)
           if need_val else None)
    fraction = float(config.get("val_fraction") or 0.0)
    if need_val and val is None and fraction > 0 and train is not None:
        train, val = split_off(train, fraction, int(config.get("seed", 0)))
    if train is not None and val is not None and val.num_classes != train.num_classes:
        raise ValueError(f"the validation set has {val.num_classes} classes "
                         f"{list(val.class_names)}, the training set {train.num_classes} "
                         f"{list(train.class_names)}")
    return train, val


def _fit_targets(annotations):
    import tensorflow as tf

    def keep(images, targets):
        # only what compute_loss reads: less host->device traffic, no int64/uint8 extras
        out = {"boxes": targets["boxes"], "labels": targets["labels"]}
        if "masks" in annotations:
            out["masks"] = tf.cast(targets["masks"], tf.float32)
        if "keypoints" in annotations:
            out["keypoints"] = targets["keypoints"]
        return images, out
    return keep


def training_batches(dataset, image_size, batch_size, steps_per_epoch, first_epoch, epochs,
                     seed=0, augment=AUGMENTATIONS, scale_range=SCALE_RANGE,
                     max_boxes=None, deterministic=True, annotations=()):
    """``(images, {"boxes", "labels"})`` batches of epochs ``first_epoch .. epochs - 1``.

    ``annotations``: ``"masks"`` (``[B, N, S, S]`` float 0/1, Mask R-CNN) and/or
    ``"keypoints"`` (``[B, N, K, 3]``, Keypoint R-CNN) join the targets.

    Exactly ``steps_per_epoch`` batches per epoch (the images repeat as
    needed), epoch ``e`` drawn from seed ``seed * 100003 + e`` (see the module
    docstring), so pass ``steps_per_epoch`` to ``fit`` too.

    Each epoch is its own ``build_pipeline`` (parallel decoding and
    augmentation in tf.data), made when the previous one is used up and
    chained by ``Dataset.from_generator``. ``max_boxes=None``: the most objects in
    one training image (see :func:`resolve_max_boxes`). Why not one graph
    (``Dataset.range(first, epochs).flat_map(...)``): the epoch would enter
    ``shuffle``/``Dataset.random`` as a tensor seed, which TF rejects once a
    global seed is set (``keras.utils.set_random_seed``).
    """
    import tensorflow as tf

    from kdet.data import build_pipeline

    if epochs <= first_epoch:
        raise ValueError(f"no epochs left to train: first_epoch={first_epoch}, epochs={epochs}")
    base_seed = int(seed) * EPOCH_SEED_STRIDE
    augment = tuple(augment or ())
    max_boxes = resolve_max_boxes(dataset, max_boxes, "training")
    annotations = tuple(annotations or ())
    check_annotations(dataset, annotations)

    def one_epoch(epoch):
        batches = build_pipeline(
            dataset, image_size=image_size, batch_size=batch_size, training=True,
            max_boxes=max_boxes, augment=augment, seed=base_seed + int(epoch),
            deterministic=deterministic, scale_range=tuple(scale_range),
            include_masks="masks" in annotations, repeat=True)
        return batches.map(_fit_targets(annotations)).take(steps_per_epoch)

    spec = one_epoch(first_epoch).element_spec

    def generate():
        for epoch in range(first_epoch, epochs):
            yield from one_epoch(epoch).as_numpy_iterator()

    batches = tf.data.Dataset.from_generator(generate, output_signature=spec)
    return batches.prefetch(2)


def evaluation_batches(dataset, image_size, batch_size, max_boxes=None):
    """Resize-with-pad batches in dataset order, targets with ``image_id`` and ``scale``
    (predicted boxes / ``scale`` = original pixels); ``max_boxes=None``: from the data."""
    from kdet.data import build_pipeline

    max_boxes = resolve_max_boxes(dataset, max_boxes, "evaluation")

    keep = ("boxes", "labels", "image_id", "scale", "original_size", "difficult")

    def slim(images, targets):
        return images, {k: v for k, v in targets.items() if k in keep}

    return build_pipeline(dataset, image_size=image_size, batch_size=batch_size, training=False,
                          max_boxes=max_boxes, include_masks=False).map(slim)


def resolve_max_boxes(dataset, max_boxes, purpose):
    """``max_boxes`` as given, or (``None``) the most objects in one image of
    ``dataset``, so the pipeline drops none; the choice is logged."""
    import logging

    from kdet.data.dataset import auto_max_boxes

    if max_boxes is not None:
        return int(max_boxes)
    max_boxes = auto_max_boxes(dataset)
    logging.getLogger("kdet.data").info(
        "%s: max_boxes=%d (the most objects in one %s image)", dataset.source, max_boxes,
        purpose)
    return max_boxes


def default_steps_per_epoch(dataset, batch_size):
    return max(1, len(dataset) // int(batch_size))
