"""Datasets and tf.data input pipelines (the TensorFlow-only part of kdet).

Every reader returns a :class:`DetectionDataset`: ``.records``, ``.class_names``,
``dataset[i]`` (numpy), ``.as_tf_dataset()``, ``.coco_ground_truth()``,
``.inspect()`` and ``.problems``. ``build_pipeline`` turns one into batches for
``model.fit``. tf.data always runs on TensorFlow, whatever ``KERAS_BACKEND`` is.

    >>> import kdet
    >>> ds = kdet.data.ShapesDataset(num_images=16, image_size=128, seed=0)
    >>> train = kdet.data.build_pipeline(ds, image_size=128, batch_size=4, training=True,
    ...                                  seed=0)  # doctest: +SKIP
"""
from kdet._lazy import lazy_exports

__all__ = ["DetectionDataset", "COCODataset", "VOCDataset", "VOC_CLASSES", "YOLODataset",
           "write_yolo", "MaskFolderDataset", "TFRecordDataset", "write_tfrecord",
           "ShapesDataset", "build_pipeline", "ProblemLog", "PROBLEM_KINDS"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "DetectionDataset": ".dataset",
    "COCODataset": ".coco",
    "VOCDataset": ".voc", "VOC_CLASSES": ".voc",
    "YOLODataset": ".yolo", "write_yolo": ".yolo",
    "MaskFolderDataset": ".masks",
    "TFRecordDataset": ".tfrecord", "write_tfrecord": ".tfrecord",
    "ShapesDataset": ".shapes",
    "build_pipeline": ".pipeline",
    "ProblemLog": ".errors", "PROBLEM_KINDS": ".errors",
})
