"""Evaluate a detector on a dataset: what ``kdet eval`` runs.

:func:`evaluate` predicts over the validation set (resize-with-pad batches,
boxes mapped back to original pixels with ``targets["scale"]``), scores them
with :class:`kdet.metrics.COCOEvaluator` against the dataset's ground truth
in original pixels, prints the pycocotools-style summary and writes into
``output_dir``:

* ``eval_results.json``: the 12 COCO numbers and AP per class (by name), and the
  same under ``"segm"`` (mask AP) and ``"keypoints"`` (keypoint AP, 10 numbers) when
  the model predicts masks / keypoints and the data has them (masks are mapped
  from the model input to each image's pixels before scoring);
* ``pr_curves.png``: per-class precision-recall at IoU 0.5, all areas,
  100 detections (``COCOEvaluator.precision[0, :, k, 0, -1]``);
* ``confusion_matrix.png`` (and ``.json``): :func:`confusion_matrix`;
* ``training_curves.png`` from a ``history.csv`` when there is one.

The confusion matrix follows the common detection convention (ultralytics,
TF OD API tools): detections with ``score >= score_threshold`` are matched
one-to-one to ground-truth boxes, *whatever their classes*, greedily by
decreasing IoU among pairs with ``IoU >= iou_threshold``. A matched pair adds
1 at ``[gt class, predicted class]``; an unmatched ground truth adds 1 at
``[gt class, background]`` (missed); an unmatched detection adds 1 at
``[background, predicted class]`` (false alarm). Crowd regions take no part,
and a detection whose IoU with a crowd region reaches the threshold is not
counted as a false alarm.

    >>> import numpy as np
    >>> m = confusion_matrix([(np.array([[0, 0, 10, 10.]]), np.array([1]))],
    ...                      [(np.array([[0, 0, 10, 9.]]), np.array([0]), np.array([0.9]))],
    ...                      num_classes=2)
    >>> m.tolist()   # a class-1 object detected as class 0
    [[0, 0, 0], [1, 0, 0], [0, 0, 0]]
"""
import dataclasses
import os

import numpy as np

from kdet.utils import box_iou_numpy
from kdet.workflow.config import resolve

PR_CURVES = "pr_curves.png"
CONFUSION = "confusion_matrix.png"
CURVES = "training_curves.png"
RESULTS = "eval_results.json"


def match_greedy(iou, threshold):
    """One-to-one ``(gt, det)`` pairs, greedy by decreasing IoU among ``iou >= threshold``.

    Ties keep the lower (gt, det) index first (a stable sort of the flat pairs).
    """
    if iou.size == 0:
        return []
    gt_index, det_index = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[gt_index, det_index], kind="stable")
    used_gt, used_det, pairs = set(), set(), []
    for g, d in zip(gt_index[order], det_index[order]):
        if g not in used_gt and d not in used_det:
            used_gt.add(g)
            used_det.add(d)
            pairs.append((int(g), int(d)))
    return pairs


def confusion_matrix(ground_truth, detections, num_classes, iou_threshold=0.5,
                     score_threshold=0.25):
    """``[C + 1, C + 1]`` int counts (rows GT class + background, columns predicted + background).

    Args:
        ground_truth: per image ``(boxes [G, 4] xyxy, labels [G])`` or
            ``(boxes, labels, iscrowd [G])``.
        detections: per image ``(boxes [D, 4], labels [D], scores [D])``, same order.
        num_classes: ``C``; labels are ``0 .. C-1``.
    See the module docstring for the matching rule.
    """
    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} "
                         "detection images")
    background = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for image_gt, image_det in zip(ground_truth, detections):
        gt_boxes = np.asarray(image_gt[0], np.float64).reshape(-1, 4)
        gt_labels = np.asarray(image_gt[1], np.int64).reshape(-1)
        crowd = (np.asarray(image_gt[2]).reshape(-1).astype(bool) if len(image_gt) > 2
                 else np.zeros(len(gt_labels), bool))
        det_boxes = np.asarray(image_det[0], np.float64).reshape(-1, 4)
        det_labels = np.asarray(image_det[1], np.int64).reshape(-1)
        det_scores = np.asarray(image_det[2], np.float64).reshape(-1)
        keep = (det_scores >= score_threshold) & (det_labels >= 0)
        det_boxes, det_labels = det_boxes[keep], det_labels[keep]
        for labels, what in ((gt_labels, "ground-truth"), (det_labels, "detection")):
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"{what} label outside 0..{num_classes - 1}: "
                                 f"{labels[(labels < 0) | (labels >= num_classes)][:5]}")
        real_boxes, real_labels = gt_boxes[~crowd], gt_labels[~crowd]
        pairs = match_greedy(box_iou_numpy(real_boxes, det_boxes), iou_threshold)
        matched_gt = {g for g, _ in pairs}
        matched_det = {d for _, d in pairs}
        for g, d in pairs:
            matrix[real_labels[g], det_labels[d]] += 1
        for g in range(len(real_labels)):
            if g not in matched_gt:
                matrix[real_labels[g], background] += 1
        on_crowd = np.zeros(len(det_labels), bool)
        if crowd.any() and len(det_labels):
            on_crowd = (box_iou_numpy(gt_boxes[crowd], det_boxes) >= iou_threshold).any(axis=0)
        for d in range(len(det_labels)):
            if d not in matched_det and not on_crowd[d]:
                matrix[background, det_labels[d]] += 1
    return matrix


def predict_batches(model, batches, verbose=1, total=None, mask_evaluator=None,
                    category_ids=None):
    """Predict over evaluation batches; boxes divided by ``targets["scale"]`` (original pixels).

    Returns ``(image_ids [N], predictions)``: the padded prediction dict
    stacked over all images (numpy), without ``masks``. Masks (model-input
    space) are instead mapped to each image's original pixels
    (:func:`kdet.workflow.prediction.masks_in_image`) and added to
    ``mask_evaluator`` (a ``segm`` :class:`kdet.metrics.COCOEvaluator`) image by
    image, so full-resolution masks of the whole set are never held at once.
    """
    from tqdm.auto import tqdm

    image_ids, chunks = [], []
    iterator = batches.as_numpy_iterator() if hasattr(batches, "as_numpy_iterator") else batches
    for images, targets in tqdm(iterator, total=total, desc="predict", unit="batch",
                                disable=not verbose):
        ids = [i.item() if isinstance(i, np.generic) else i
               for i in np.asarray(targets["image_id"]).reshape(-1)]
        raw = model.predict_on_batch(images)
        if not isinstance(raw, dict) or not {"boxes", "scores", "labels"} <= set(raw):
            raise ValueError("model.predict_on_batch must return the padded detection dict "
                             "{'boxes','scores','labels','num_detections'}")
        out = {k: np.asarray(v) for k, v in raw.items()}
        scale = np.asarray(targets["scale"], np.float64).reshape(len(ids), -1)
        scale_xy = np.broadcast_to(scale, (len(ids), 2))
        if mask_evaluator is not None and "masks" in out:
            _add_masks(mask_evaluator, ids, out, scale_xy,
                       np.asarray(targets["original_size"]), category_ids)
        out["boxes"] = out["boxes"].astype(np.float64) / np.concatenate(
            [scale_xy, scale_xy], axis=1)[:, None, :]
        if "keypoints" in out:
            kp = out["keypoints"].astype(np.float64)
            kp[..., :2] /= scale_xy[:, None, None, :]
            out["keypoints"] = kp
        image_ids.extend(ids)
        chunks.append(out)
    if not chunks:
        raise ValueError("the evaluation data yielded no batches")
    keys = [k for k in chunks[0] if k != "masks"]  # masks: resized-image space, not mapped
    return image_ids, {k: np.concatenate([c[k] for c in chunks]) for k in keys}


def _add_masks(evaluator, image_ids, out, scale_xy, original_sizes, category_ids):
    from kdet.workflow.prediction import masks_in_image

    counts = out.get("num_detections")
    for b, image_id in enumerate(image_ids):
        n = int(counts[b]) if counts is not None else out["scores"].shape[1]
        height, width = (int(v) for v in original_sizes[b])
        masks = masks_in_image(out["masks"][b, :n], scale_xy[b], height, width)
        evaluator.add_predictions([image_id], {
            "masks": masks[None], "scores": out["scores"][b:b + 1, :n],
            "labels": out["labels"][b:b + 1, :n]}, category_ids=category_ids)


def detections_to_coco(image_ids, predictions, category_ids):
    """COCO results records ``{"image_id", "category_id", "bbox" (xywh), "score"}``."""
    records = []
    counts = predictions.get("num_detections")
    for b, image_id in enumerate(image_ids):
        n = int(counts[b]) if counts is not None else len(predictions["scores"][b])
        for i in range(n):
            label = int(predictions["labels"][b, i])
            if label < 0:
                continue
            x1, y1, x2, y2 = (float(v) for v in predictions["boxes"][b, i])
            records.append({"image_id": image_id, "category_id": int(category_ids[label]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(predictions["scores"][b, i])})
    return records


@dataclasses.dataclass
class EvalResult:
    """What :func:`evaluate` computed and wrote."""

    results: dict
    evaluator: object
    confusion: np.ndarray
    class_names: tuple
    files: dict
    #: ``{"segm": results, "keypoints": results}``: what the model and the data had
    more: dict = dataclasses.field(default_factory=dict)
    more_evaluators: dict = dataclasses.field(default_factory=dict)


def _labels_beside(model_path):
    if not isinstance(model_path, str):
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "labels.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            names = [line.rstrip("\n") for line in f if line.strip()]
        return names or None
    return None


def evaluate(config, *, model=None, dataset=None, config_path="config"):
    """Evaluate as ``kdet eval`` does; returns an :class:`EvalResult`.

    Args:
        config: settings (``kdet eval`` flags as keys).
        model: use this model instead of loading ``config["model"]``.
        dataset: evaluate on this kdet dataset instead of the configured
            validation data.
    """
    from kdet.metrics import COCOEvaluator
    from kdet.workflow import data as wdata
    from kdet.workflow.models import (load_model, model_annotations, model_image_size,
                                      resolve_jit_compile)

    settings = resolve("eval", file_config=config, config_path=config_path)
    if settings["class_names"] is None and settings["format"] in ("voc", "yolo"):
        settings["class_names"] = _labels_beside(settings["model"])
    if model is None:
        model = load_model(settings["model"])
        if resolve_jit_compile(settings["jit_compile"]):
            model.jit_compile = True
    image_size = model_image_size(model)
    predicts = model_annotations(model)  # masks / keypoints, scored when the data has them
    if dataset is None:
        if settings["format"] == "shapes" and settings["image_size"] is None:
            settings["image_size"] = image_size
        _, dataset = wdata.read_datasets(settings, need_train=False, annotations=predicts,
                                         required=False)
        if dataset is None:
            raise ValueError("kdet eval needs validation data: --val-data (and --val-images), "
                             "--val-fraction with --train-data, or --val-num-images for shapes")
    num_classes = getattr(model, "num_classes", dataset.num_classes)
    if dataset.num_classes > num_classes:
        raise ValueError(f"the data has {dataset.num_classes} classes, the model predicts "
                         f"{num_classes}")

    batch_size = int(settings["batch_size"])
    batches = wdata.evaluation_batches(dataset, image_size, batch_size,
                                       max_boxes=settings["max_boxes"])
    total = -(-len(dataset) // batch_size)
    more_evaluators = {}
    if "masks" in predicts and dataset.has_masks:
        more_evaluators["segm"] = COCOEvaluator(dataset.coco_ground_truth(include_masks=True),
                                                iou_type="segm")
    if "keypoints" in predicts and dataset.has_keypoints:
        if int(model.num_keypoints) == 17:
            more_evaluators["keypoints"] = COCOEvaluator(dataset.coco_ground_truth(),
                                                         iou_type="keypoints")
        else:  # the OKS sigmas kdet knows are COCO's 17
            print(f"keypoints AP: skipped, COCO OKS sigmas are for 17 keypoints, the model has "
                  f"{model.num_keypoints}", flush=True)
    image_ids, predictions = predict_batches(
        model, batches, verbose=settings["verbose"], total=total,
        mask_evaluator=more_evaluators.get("segm"), category_ids=dataset.category_ids)

    evaluator = COCOEvaluator(dataset.coco_ground_truth())
    evaluator.add_predictions(image_ids, predictions, category_ids=dataset.category_ids)
    results = evaluator.evaluate()
    names = tuple(dataset.class_names)
    print(evaluator.summary(), flush=True)
    if "keypoints" in more_evaluators:
        more_evaluators["keypoints"].add_predictions(image_ids, predictions,
                                                     category_ids=dataset.category_ids)
    more = {}
    for kind, extra in more_evaluators.items():
        more[kind] = extra.evaluate()
        print(f"\n{kind}:\n{extra.summary()}", flush=True)

    out = settings["output_dir"]
    os.makedirs(out, exist_ok=True)
    files = {}
    by_id = {r["image_id"]: r for r in dataset.records}
    ground_truth, detections = [], []
    for b, image_id in enumerate(image_ids):
        record = by_id[image_id]
        ground_truth.append((record["boxes"], record["labels"], record["iscrowd"]))
        n = int(predictions["num_detections"][b]) if "num_detections" in predictions else None
        detections.append((predictions["boxes"][b][:n], predictions["labels"][b][:n],
                           predictions["scores"][b][:n]))
    matrix = confusion_matrix(ground_truth, detections, dataset.num_classes,
                              iou_threshold=settings["iou_threshold"],
                              score_threshold=settings["score_threshold"])

    from kdet import visualize
    from kdet.workflow.callbacks import write_json_atomic

    per_class = {name: results["per_class_AP"][cat]
                 for name, cat in zip(names, dataset.category_ids)}
    summary = {k: v for k, v in results.items() if k != "per_class_AP"}
    record = {"model": str(settings["model"]), "images": len(image_ids), "stats": summary,
              "per_class_AP": per_class}
    for kind, stats in more.items():  # "segm", "keypoints": the same layout
        record[kind] = {"stats": {k: v for k, v in stats.items() if k != "per_class_AP"},
                        "per_class_AP": {name: stats["per_class_AP"][cat]
                                         for name, cat in zip(names, dataset.category_ids)}}
    files["results"] = write_json_atomic(os.path.join(out, RESULTS), record)
    files["pr_curves"] = visualize.plot_precision_recall(
        evaluator.precision, names, os.path.join(out, PR_CURVES))
    files["confusion_matrix"] = visualize.plot_confusion_matrix(
        matrix, names, os.path.join(out, CONFUSION),
        title=f"Confusion matrix (IoU >= {settings['iou_threshold']}, "
              f"score >= {settings['score_threshold']})")
    write_json_atomic(os.path.join(out, "confusion_matrix.json"),
                      {"labels": list(names) + ["background"], "rows": "ground truth",
                       "columns": "predicted", "matrix": matrix.tolist(),
                       "iou_threshold": settings["iou_threshold"],
                       "score_threshold": settings["score_threshold"]})
    csv_log = settings["csv_log"]
    if csv_log is None and isinstance(settings["model"], str):
        beside = os.path.join(os.path.dirname(os.path.abspath(settings["model"])), "history.csv")
        csv_log = beside if os.path.isfile(beside) else None
    if csv_log is not None:
        if not os.path.isfile(csv_log):
            raise ValueError(f"--csv-log {csv_log}: file not found")
        files["training_curves"] = visualize.plot_training_curves(csv_log,
                                                                  os.path.join(out, CURVES))
    if settings["detections_out"]:
        files["detections"] = write_json_atomic(
            settings["detections_out"],
            detections_to_coco(image_ids, predictions, dataset.category_ids))
        root, ext = os.path.splitext(settings["detections_out"])
        for kind, extra in more_evaluators.items():  # COCO results of that iou type
            files[f"detections_{kind}"] = write_json_atomic(f"{root}_{kind}{ext or '.json'}",
                                                            extra.results())
    if settings["verbose"]:
        for key, path in files.items():
            print(f"wrote {key}: {path}", flush=True)
    return EvalResult(results=results, evaluator=evaluator, confusion=matrix, class_names=names,
                      files=files, more=more, more_evaluators=more_evaluators)


def format_stats(results, more=None):
    """One line with the headline numbers (bbox, then ``segm`` / ``keypoints`` if given)."""
    def line(stats):
        return ", ".join(f"{k}={stats[k]:.4f}" for k in ("AP", "AP50", "AP75", "AR100", "AR")
                         if k in stats)
    text = line(results)
    for kind, stats in (more or {}).items():
        text += f"; {kind}: {line(stats)}"
    return text
