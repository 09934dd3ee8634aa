"""Keras callback that runs COCO (or Pascal VOC) evaluation during ``fit``.

The callback predicts over a held-out dataset every ``every_n_epochs`` epochs,
feeds the padded predictions to an evaluator and writes the scalar results
into the epoch ``logs`` (``val_AP``, ``val_AP50``, ... or ``val_mAP``), where
``History``, ``ModelCheckpoint``, ``EarlyStopping`` and ``ReduceLROnPlateau``
see them, provided they come AFTER this callback in the ``callbacks`` list
(Keras calls the callbacks in list order with one shared ``logs`` dict;
``History`` and the progress bar are appended last by Keras).

Example (``val_ds`` batches are ``(images, targets)`` with ``targets["image_id"]``,
as ``kdet.data.build_pipeline`` makes them):

>>> import numpy as np, keras
>>> from kdet.metrics import COCOEvalCallback
>>> gt = {"images": [{"id": 1, "width": 64, "height": 64}],
...       "categories": [{"id": 1, "name": "thing"}],
...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
...                        "bbox": [8, 8, 20, 20], "area": 400, "iscrowd": 0}]}
>>> data = [(np.zeros((1, 64, 64, 3), "float32"), {"image_id": np.array([1])})]
>>> callback = COCOEvalCallback(data, gt, category_ids=[1], verbose=0)
>>> callback.every_n_epochs, callback.prefix
(1, 'val_')
>>> # model.fit(train_ds, epochs=10, callbacks=[
>>> #     COCOEvalCallback(val_ds, "instances_val2017.json", scale_key="scale"),
>>> #     keras.callbacks.ModelCheckpoint("best.keras", monitor="val_AP", mode="max",
>>> #                                     save_best_only=True)])
"""
import time

import keras
import numpy as np

from kdet.metrics.voc import VOCEvaluator, _to_xyxy

__all__ = ["COCOEvalCallback"]

#: Names of the 12 COCO summary statistics, in pycocotools' order.
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                   "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

_IMAGE_ID_KEYS = ("image_id", "image_ids")


def _to_numpy(tree):
    return keras.tree.map_structure(
        lambda x: x if isinstance(x, (str, bytes)) else np.asarray(x), tree)


def _iterate_batches(dataset, steps):
    """Yield numpy elements of a tf.data.Dataset, keras PyDataset or python iterable."""
    if isinstance(dataset, keras.utils.PyDataset):
        count = dataset.num_batches if steps is None else min(steps, dataset.num_batches or steps)
        if count is None:
            raise ValueError("the PyDataset has no length (num_batches is None); pass steps=")
        batches = (dataset[i] for i in range(count))
    elif hasattr(dataset, "as_numpy_iterator"):  # tf.data.Dataset
        if steps is None and int(dataset.cardinality()) == -1:  # tf.data.INFINITE_CARDINALITY
            raise ValueError("the evaluation dataset repeats forever; drop .repeat() or pass steps=")
        batches = dataset.as_numpy_iterator()
    else:
        batches = iter(dataset)
    for step, element in enumerate(batches):
        if steps is not None and step >= steps:
            break
        yield _to_numpy(element)


def _split_element(element):
    """``(images, targets, image_ids)`` from one dataset element (see the class docs)."""
    if isinstance(element, dict):
        if "images" not in element:
            raise ValueError(f"a dict dataset element needs an 'images' key, got keys {sorted(element)}")
        images, targets = element["images"], element
    elif isinstance(element, (tuple, list)) and len(element) in (2, 3):
        images, targets = element[0], element[1]  # (x, y) or (x, y, sample_weight)
    else:
        raise ValueError("each dataset element must be (images, targets), (images, targets, "
                         "sample_weight) or a dict with 'images' and 'image_ids'; got "
                         f"{type(element).__name__}")
    image_ids = None
    if isinstance(targets, dict):
        for key in _IMAGE_ID_KEYS:
            if key in targets:
                image_ids = targets[key]
                break
    if image_ids is None:
        keys = sorted(targets) if isinstance(targets, dict) else type(targets).__name__
        raise ValueError("a dataset element carries no image ids: put them in targets['image_id'] "
                         f"(or element['image_ids'] for dict elements); found {keys}")
    image_ids = np.asarray(image_ids).reshape(-1)
    return images, targets, [_plain_id(i) for i in image_ids]


def _plain_id(image_id):
    image_id = image_id.item() if isinstance(image_id, np.generic) else image_id
    return image_id.decode("utf-8") if isinstance(image_id, bytes) else image_id


class COCOEvalCallback(keras.callbacks.Callback):
    """Evaluate detection AP every ``every_n_epochs`` epochs and log it.

    Args:
        dataset: re-iterable evaluation data, a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset`` or a python sequence (e.g. a list) of
            batches (a one-shot generator is refused: it would be empty at the
            second evaluation). Each element is ``(images, targets)`` or
            ``(images, targets, sample_weight)`` as for ``fit``, or a dict
            with ``"images"`` and ``"image_ids"`` (or ``"image_id"``).
            ``images`` is passed as is to ``model.predict_on_batch``; the
            image ids (``[B]``, matching the ground truth's ids) come from
            ``targets["image_id"]`` (or ``"image_ids"``). In ``metric="voc"``
            mode without a prepared evaluator the ground truth is read from
            the same targets: ``"boxes" [B, N, 4]`` (in
            ``bounding_box_format``), ``"labels" [B, N]`` padded with ``-1``
            and optionally ``"difficult" [B, N]``. Keep it deterministic (no
            shuffling needed, no random augmentation).
        ground_truth: what the evaluator is built from:
            ``metric="coco"``: a COCO annotation dict or JSON path
            (``COCOEvaluator(ground_truth)``), an evaluator instance (reused,
            ``reset_detections()`` before each run) or a zero-argument
            callable returning a fresh evaluator (a factory).
            ``metric="voc"``: ``None`` (``VOCEvaluator(pixel_convention=
            "continuous")``, VOC07 11-point AP on kdet's 0-based boxes), a factory
            (e.g. ``lambda: VOCEvaluator(class_names, use_07_metric=False)``)
            or an instance; the GT comes from the dataset targets unless the
            instance already holds ground truth.
        evaluator_factory: keyword alias for a factory ``ground_truth``.
        every_n_epochs: evaluate at the end of epochs N, 2N, ... (1-based).
            On the other epochs nothing is written to ``logs`` (unless
            ``fill_skipped_epochs``), so callbacks monitoring ``val_AP`` warn
            that it is missing: ``EarlyStopping`` then skips the epoch, but
            Keras 3's ``ModelCheckpoint(save_best_only=True)`` warns *and
            saves* the un-evaluated model (with a fixed ``filepath`` it
            overwrites the best one); use kdet's ``AtomicModelCheckpoint``
            (skips epochs without the monitored value; what ``kdet train``
            does), ``fill_skipped_epochs=True`` or a ``{epoch}`` in the file
            name.
        fill_skipped_epochs: on skipped epochs after the first evaluation,
            repeat the last evaluated values, so ``ModelCheckpoint(
            save_best_only=True)`` sees no improvement and does not save
            (``EarlyStopping`` then counts those epochs as not improving;
            scale ``patience`` accordingly). The repeated values then also
            reach the progress bar and CSV/TensorBoard logs as if measured.
        prefix: prepended to the result names (``"val_"`` -> ``val_AP``).
        bounding_box_format: format of the predicted (and, for VOC targets,
            ground-truth) boxes, converted to ``xyxy`` pixels.
        category_ids: COCO mode: the COCO category id of each contiguous label
            ``0..C-1`` (``COCOEvaluator.add_predictions(category_ids=)``).
        metric: ``"coco"`` (writes the 12 COCO statistics ``AP``, ``AP50``,
            ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1``, ``AR10``, ``AR100``,
            ``ARs``, ``ARm``, ``ARl``) or ``"voc"`` (writes ``mAP``).
        steps: evaluate only the first ``steps`` batches (needed for
            repeating datasets).
        scale_key: name of a targets entry, ``[B]`` or ``[B, 2]`` (x, y), by
            which predicted boxes (and VOC ground truth read from targets)
            are divided before evaluation. ``kdet.data.build_pipeline``
            resizes images by ``targets["scale"]`` (``resized = original *
            scale``): pass ``scale_key="scale"`` to score against ground truth
            in original pixels, or leave ``None`` when the ground truth was
            made at the network resolution
            (``dataset.coco_ground_truth(image_size=S)``).
        verbose: 0 silent, 1 one line per evaluation, 2 also the evaluator's
            summary table when it has one.

    After each evaluation ``callback.last_results`` holds the evaluator's full
    result dict (including ``per_class_AP``), ``callback.last_evaluator`` the
    evaluator itself (e.g. for ``summary()``) and ``callback.evaluated_epochs``
    the 0-based epochs evaluated so far. ``callback.evaluate(model)`` runs one
    evaluation outside ``fit``.
    """

    def __init__(self, dataset, ground_truth=None, every_n_epochs=1, prefix="val_",
                 bounding_box_format="xyxy", category_ids=None, verbose=1, *,
                 metric="coco", evaluator_factory=None, steps=None, fill_skipped_epochs=False,
                 scale_key=None):
        super().__init__()
        if metric not in ("coco", "voc"):
            raise ValueError(f"metric must be 'coco' or 'voc', got {metric!r}")
        if evaluator_factory is not None:
            if ground_truth is not None:
                raise ValueError("pass either ground_truth or evaluator_factory, not both")
            if not callable(evaluator_factory):
                raise ValueError("evaluator_factory must be a callable returning an evaluator")
            ground_truth = evaluator_factory
        if metric == "coco" and ground_truth is None:
            raise ValueError("metric='coco' needs ground_truth: a COCO annotation dict or JSON path, "
                             "a COCOEvaluator or a factory returning one")
        if (metric == "voc" and ground_truth is not None and not callable(ground_truth)
                and not self._is_evaluator(ground_truth)):
            raise ValueError("metric='voc' takes a VOCEvaluator, a factory or None (ground truth "
                             f"from the dataset targets), got {type(ground_truth).__name__}")
        if metric == "voc" and category_ids is not None:
            raise ValueError("category_ids is for metric='coco'; VOC labels are 0..C-1")
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be >= 1 or None, got {steps}")
        if not hasattr(dataset, "as_numpy_iterator") and not isinstance(dataset, keras.utils.PyDataset):
            try:
                one_shot = iter(dataset) is dataset
            except TypeError as error:
                raise ValueError(f"dataset of type {type(dataset).__name__} is not iterable") from error
            if one_shot:
                raise ValueError("dataset is a one-shot iterator/generator; pass a tf.data.Dataset, "
                                 "a PyDataset or a list so it can be evaluated every epoch")
        self.dataset = dataset
        self.ground_truth = ground_truth
        self.every_n_epochs = int(every_n_epochs)
        self.prefix = str(prefix)
        self.bounding_box_format = bounding_box_format
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        self.metric = metric
        self.steps = None if steps is None else int(steps)
        self.verbose = int(verbose)
        self.fill_skipped_epochs = bool(fill_skipped_epochs)
        if scale_key is not None and str(bounding_box_format).startswith("rel_"):
            raise ValueError("scale_key rescales absolute pixels; bounding_box_format="
                             f"{bounding_box_format!r} is relative")
        self.scale_key = scale_key
        self.last_results = None
        self.evaluated_epochs = []
        self._evaluator = None  # persistent evaluator (instance or built from a dict/path)
        self._voc_gt_from_targets = None
        self.last_evaluator = None

    # ------------------------------------------------------------ evaluator
    def _is_evaluator(self, obj):
        return hasattr(obj, "add_predictions") and hasattr(obj, "evaluate")

    def _fresh_evaluator(self):
        """The evaluator for one run, with old detections gone; and whether to add VOC GT."""
        gt = self.ground_truth
        if self._is_evaluator(gt) or (gt is not None and not callable(gt)):
            if self._evaluator is None:
                if self._is_evaluator(gt):
                    self._evaluator = gt
                else:  # a COCO dict or path
                    from kdet.metrics.coco import COCOEvaluator
                    self._evaluator = COCOEvaluator(gt)
                if self.metric == "voc":
                    self._voc_gt_from_targets = getattr(self._evaluator, "num_images", 0) == 0
            evaluator = self._evaluator
            if self.metric == "voc" and self._voc_gt_from_targets:
                evaluator.reset()
            else:
                evaluator.reset_detections()
            return evaluator, bool(self.metric == "voc" and self._voc_gt_from_targets)
        # kdet targets hold VOC boxes as 0-based continuous pixels (x1 = xmin - 1).
        evaluator = gt() if gt is not None else VOCEvaluator(pixel_convention="continuous")
        if not self._is_evaluator(evaluator):
            raise ValueError(f"the evaluator factory returned {type(evaluator).__name__}, which has "
                             "no add_predictions/evaluate")
        from_targets = self.metric == "voc" and getattr(evaluator, "num_images", 0) == 0
        return evaluator, from_targets

    def _add_voc_ground_truth(self, evaluator, targets, image_ids):
        if not isinstance(targets, dict) or "boxes" not in targets or "labels" not in targets:
            keys = sorted(targets) if isinstance(targets, dict) else type(targets).__name__
            raise ValueError("metric='voc' without a prepared VOCEvaluator reads the ground truth from "
                             f"targets['boxes'] and targets['labels']; found {keys}")
        boxes = np.asarray(targets["boxes"], np.float64)
        labels = np.asarray(targets["labels"])
        difficult = targets.get("difficult")
        if boxes.ndim != 3 or boxes.shape[0] != len(image_ids) or labels.shape != boxes.shape[:2]:
            raise ValueError(f"targets['boxes'] {boxes.shape} / ['labels'] {labels.shape} must be "
                             f"[B, N, 4] / [B, N] for B={len(image_ids)} image ids")
        for b, image_id in enumerate(image_ids):
            keep = labels[b] >= 0
            image_boxes = boxes[b][keep]
            if len(image_boxes):
                if not np.all(np.isfinite(image_boxes)):
                    raise ValueError(f"image {image_id!r}: ground-truth boxes are not finite")
                image_boxes = _to_xyxy(image_boxes, self.bounding_box_format)
            evaluator.add_ground_truth(
                image_id, image_boxes, labels[b][keep],
                None if difficult is None else np.asarray(difficult)[b][keep])

    def _unscale(self, boxes, targets, batch):
        """``boxes [B, N, 4]`` divided by ``targets[scale_key]`` (per image, x/y)."""
        if not isinstance(targets, dict) or self.scale_key not in targets:
            keys = sorted(targets) if isinstance(targets, dict) else type(targets).__name__
            raise ValueError(f"scale_key={self.scale_key!r} is not in the dataset targets {keys}")
        scale = np.asarray(targets[self.scale_key], np.float64).reshape(batch, -1)
        if scale.shape[1] not in (1, 2) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise ValueError(f"targets[{self.scale_key!r}] must be positive [B] or [B, 2] (x, y), "
                             f"got {scale.tolist()}")
        scale_xy = np.broadcast_to(scale, (batch, 2))
        if self.bounding_box_format in ("yxyx", "center_yxhw"):
            scale_xy = scale_xy[:, ::-1]
        per_coordinate = np.concatenate([scale_xy, scale_xy], axis=1)  # x, y, x|w, y|h
        return np.asarray(boxes, np.float64) / per_coordinate[:, None, :]

    # ------------------------------------------------------------ running
    def evaluate(self, model=None):
        """Predict over ``dataset`` with ``model`` (default: the fitted model) and evaluate.

        Returns the evaluator's result dict (also kept in ``last_results``).
        """
        model = self.model if model is None else model
        if model is None:
            raise ValueError("no model: call evaluate(model) or use the callback inside fit")
        evaluator, gt_from_targets = self._fresh_evaluator()
        batches = 0
        for element in _iterate_batches(self.dataset, self.steps):
            images, targets, image_ids = _split_element(element)
            if gt_from_targets:
                gt_targets = targets
                if self.scale_key is not None and isinstance(targets, dict) and "boxes" in targets:
                    gt_targets = dict(targets, boxes=self._unscale(targets["boxes"], targets,
                                                                   len(image_ids)))
                self._add_voc_ground_truth(evaluator, gt_targets, image_ids)
            predictions = model.predict_on_batch(images)
            if not isinstance(predictions, dict) or not {"boxes", "scores", "labels"} <= set(predictions):
                got = sorted(predictions) if isinstance(predictions, dict) else type(predictions).__name__
                raise ValueError("model.predict_on_batch must return the padded detection dict "
                                 f"{{'boxes','scores','labels','num_detections'}}; got {got}")
            predictions = _to_numpy(predictions)
            if self.scale_key is not None:
                predictions = dict(predictions, boxes=self._unscale(
                    predictions["boxes"], targets, len(image_ids)))
            if self.metric == "coco":
                evaluator.add_predictions(image_ids, predictions, category_ids=self.category_ids,
                                          bounding_box_format=self.bounding_box_format)
            else:
                evaluator.add_predictions(image_ids, predictions,
                                          bounding_box_format=self.bounding_box_format)
            batches += 1
        if batches == 0:
            raise ValueError("the evaluation dataset yielded no batches")
        self.last_results = evaluator.evaluate()
        self.last_evaluator = evaluator
        return self.last_results

    def scalar_logs(self, results=None):
        """The ``{prefix + name: float}`` entries written to the epoch logs."""
        results = self.last_results if results is None else results
        names = COCO_STAT_NAMES if self.metric == "coco" else ("mAP",)
        missing = [name for name in names if name not in results]
        if missing:
            raise ValueError(f"the evaluator's results lack {missing}; got {sorted(results)}")
        return {self.prefix + name: float(results[name]) for name in names}

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs != 0:
            if self.fill_skipped_epochs and self.evaluated_epochs and logs is not None:
                logs.update(self.scalar_logs())
            return
        start = time.perf_counter()
        results = self.evaluate()
        scalars = self.scalar_logs(results)
        self.evaluated_epochs.append(epoch)
        if logs is not None:
            logs.update(scalars)
        if self.verbose:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in scalars.items())
            # leading newline as Keras' own callbacks: the progress bar line is still open
            print(f"\nEpoch {epoch + 1}: {self.metric.upper()} evaluation "
                  f"({time.perf_counter() - start:.1f} s): {shown}", flush=True)
            summary = getattr(self.last_evaluator, "summary", None)
            if self.verbose >= 2 and callable(summary):
                print(summary(), flush=True)
