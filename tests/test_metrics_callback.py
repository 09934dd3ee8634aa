"""COCOEvalCallback inside model.fit, checked against pycocotools.

The "detector" is a tiny functional model whose input rows are encoded ground
truth ``[x1, y1, x2, y2, label]`` (label -1 = padding) and whose output is the
padded prediction dict with every box moved by one trainable offset: offset 0
reproduces the GT (AP = 1), a non-zero offset lowers AP, and training with an
L2 box loss pulls the offset back towards 0.

Expected numbers come straight from pycocotools' ``COCOeval`` on the model's
own predictions (never from kdet's evaluators). When ``kdet.metrics.coco``
is importable the callback runs with the real ``COCOEvaluator`` built from the
annotation dict; otherwise it is given a pycocotools stand-in with the same API.
"""
import contextlib
import io
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from kdet.metrics import COCOEvalCallback, VOCEvaluator

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
CATEGORY_IDS = [7, 3]  # label 0 -> COCO id 7, label 1 -> 3 (not the sorted default)
MAX_OBJECTS = 5


# --------------------------------------------------------------------------- data
def make_data(num_images=8, seed=0):
    """COCO GT dict, encoded model input [I, N, 5] and padded targets."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    encoded = np.zeros((num_images, MAX_OBJECTS, 5), np.float32)
    encoded[..., 4] = -1
    boxes = np.zeros((num_images, MAX_OBJECTS, 4), np.float32)
    labels = -np.ones((num_images, MAX_OBJECTS), np.int32)
    for i in range(num_images):
        image_id = 100 + i
        images.append({"id": image_id, "width": 320, "height": 320, "file_name": f"{image_id}.jpg"})
        for k in range(rng.integers(1, MAX_OBJECTS + 1)):
            size = float(rng.choice([16, 48, 140]))  # small, medium and large objects
            x1, y1 = rng.uniform(0, 150, 2).round()
            w, h = size * rng.uniform(0.8, 1.2, 2).round(1)
            label = int(rng.integers(2))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORY_IDS[label], "bbox": [x1, y1, w, h],
                                "area": w * h, "iscrowd": 0})
            encoded[i, k] = [x1, y1, x1 + w, y1 + h, label]
            boxes[i, k], labels[i, k] = [x1, y1, x1 + w, y1 + h], label
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]}
    image_ids = np.array([im["id"] for im in images], np.int64)
    return gt, encoded, {"boxes": boxes, "labels": labels, "image_id": image_ids}


def batches(encoded, targets, batch_size=3):
    """A python list of (images, targets) batches, the last one smaller."""
    out = []
    for s in range(0, len(encoded), batch_size):
        out.append((encoded[s:s + batch_size],
                    {k: v[s:s + batch_size] for k, v in targets.items()}))
    return out


# --------------------------------------------------------------------------- model
class EchoDetections(keras.layers.Layer):
    """Encoded GT rows -> padded prediction dict, boxes moved by a trainable offset."""

    def __init__(self, shift=0.0, xywh=False, **kwargs):
        super().__init__(**kwargs)
        self.initial_shift = float(shift)
        self.xywh = bool(xywh)

    def build(self, input_shape):
        self.shift = self.add_weight(shape=(), initializer=keras.initializers.Constant(
            self.initial_shift), name="shift")

    def call(self, x):
        valid = x[..., 4] >= 0
        rows = ops.shape(x)[1]
        boxes = x[..., :4] + self.shift * ops.cast(valid, "float32")[..., None]
        rank_scores = 0.9 - 0.01 * ops.cast(ops.arange(rows), "float32")  # distinct, descending
        scores = ops.where(valid, rank_scores[None, :], 0.0)
        labels = ops.where(valid, ops.cast(x[..., 4], "int32"), -1)
        if self.xywh:
            boxes = ops.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
        return {"boxes": boxes, "scores": scores, "labels": labels,
                "num_detections": ops.sum(ops.cast(valid, "int32"), axis=1)}

    def get_config(self):
        return {**super().get_config(), "shift": self.initial_shift, "xywh": self.xywh}


class TinyDetector(keras.Model):
    """Functional model with a detector-style compute_loss (L2 on valid boxes)."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        valid = ops.cast(y["labels"] >= 0, "float32")[..., None]
        error = ops.square(y_pred["boxes"] - y["boxes"]) * valid
        return ops.sum(error) / ops.maximum(ops.sum(valid), 1.0)


def make_model(shift, xywh=False):
    inputs = keras.Input((MAX_OBJECTS, 5))
    model = TinyDetector(inputs, EchoDetections(shift, xywh)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.02))
    return model


# --------------------------------------------------------------------------- reference
def pycocotools_stats(gt, image_ids, predictions):
    """The 12 COCOeval statistics for padded xyxy predictions (pycocotools itself)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections = []
    for b, image_id in enumerate(image_ids):
        for k in range(int(predictions["num_detections"][b])):
            x1, y1, x2, y2 = (float(v) for v in predictions["boxes"][b, k])
            detections.append({"image_id": int(image_id),
                               "category_id": CATEGORY_IDS[int(predictions["labels"][b, k])],
                               "bbox": [x1, y1, x2 - x1, y2 - y1],
                               "score": float(predictions["scores"][b, k])})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {k: list(v) for k, v in gt.items()}
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(zip(STAT_NAMES, (float(s) for s in coco_eval.stats)))


class PycocotoolsEvaluator:
    """Stand-in with COCOEvaluator's API, used while kdet.metrics.coco is absent."""

    def __init__(self, gt):
        self.gt = gt
        self.reset_detections()

    def reset_detections(self):
        self.ids, self.preds = [], []

    def add_predictions(self, image_ids, predictions, category_ids=None, bounding_box_format="xyxy"):
        assert category_ids == CATEGORY_IDS and bounding_box_format == "xyxy"
        self.ids.extend(image_ids)
        self.preds.append(predictions)

    def evaluate(self):
        merged = {k: np.concatenate([p[k] for p in self.preds]) for k in self.preds[0]}
        return pycocotools_stats(self.gt, self.ids, merged)


def coco_ground_truth(gt, mode="dict"):
    """What the callback gets: the plain dict (kdet's COCOEvaluator), or a factory of the
    pycocotools stand-in."""
    if mode == "dict":
        return {"ground_truth": gt}
    return {"evaluator_factory": lambda: PycocotoolsEvaluator(gt)}


class RecordReference(keras.callbacks.Callback):
    """Placed after the callback: pycocotools on the same weights, same epoch."""

    def __init__(self, gt, encoded, image_ids):
        super().__init__()
        self.gt, self.encoded, self.image_ids, self.stats = gt, encoded, image_ids, {}

    def on_epoch_end(self, epoch, logs=None):
        predictions = self.model.predict(self.encoded, verbose=0)
        self.stats[epoch] = pycocotools_stats(self.gt, self.image_ids, predictions)
        self.stats[epoch]["logged"] = {k: logs[k] for k in logs if k.startswith("val_")}


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["dict", "factory"])
def test_perfect_and_shifted_predictions(mode):
    gt, encoded, targets = make_data()
    data = batches(encoded, targets)
    perfect = COCOEvalCallback(data, category_ids=CATEGORY_IDS, verbose=0,
                               **coco_ground_truth(gt, mode))
    results = perfect.evaluate(make_model(0.0))
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100"):  # AR1: 1 det/image
        assert results[name] == pytest.approx(1.0, abs=1e-12), name
    shifted = COCOEvalCallback(data, category_ids=CATEGORY_IDS, verbose=0,
                               **coco_ground_truth(gt, mode))
    model = make_model(4.0)
    results = shifted.evaluate(model)
    expected = pycocotools_stats(gt, targets["image_id"], model.predict(encoded, verbose=0))
    assert results["AP"] < 0.9
    for name in STAT_NAMES:
        assert results[name] == pytest.approx(expected[name], abs=1e-12), name
    logs = shifted.scalar_logs()
    assert sorted(logs) == sorted("val_" + n for n in STAT_NAMES)


def test_fit_with_model_checkpoint(tmp_path):
    gt, encoded, targets = make_data()
    callback = COCOEvalCallback(batches(encoded, targets), category_ids=CATEGORY_IDS, verbose=0,
                                **coco_ground_truth(gt))
    reference = RecordReference(gt, encoded, targets["image_id"])
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best-{epoch}.weights.h5"), monitor="val_AP", mode="max",
        save_best_only=True, save_weights_only=True)
    model = make_model(6.0)
    history = model.fit(encoded, {"boxes": targets["boxes"], "labels": targets["labels"]},
                        batch_size=4, epochs=2, verbose=0,
                        callbacks=[callback, checkpoint, reference])
    assert len(history.history["val_AP"]) == 2
    assert callback.evaluated_epochs == [0, 1]
    for epoch in (0, 1):
        for name in STAT_NAMES:  # logged value == pycocotools on the weights of that epoch
            assert history.history["val_" + name][epoch] == pytest.approx(
                reference.stats[epoch][name], abs=1e-12)
        assert set(reference.stats[epoch]["logged"]) == {"val_" + n for n in STAT_NAMES}
    aps = history.history["val_AP"]
    assert aps[1] > aps[0]  # training pulled the boxes back towards the GT
    saved = sorted(p.name for p in tmp_path.glob("best-*.weights.h5"))
    assert saved == ["best-1.weights.h5", "best-2.weights.h5"]  # each epoch improved val_AP


def test_every_n_epochs_skips_and_checkpoint_warns(tmp_path):
    gt, encoded, targets = make_data(num_images=5, seed=1)
    callback = COCOEvalCallback(batches(encoded, targets), every_n_epochs=2,
                                category_ids=CATEGORY_IDS, verbose=0, **coco_ground_truth(gt))
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best-{epoch}.weights.h5"), monitor="val_AP", mode="max",
        save_best_only=True, save_weights_only=True)
    model = make_model(3.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(encoded, {"boxes": targets["boxes"], "labels": targets["labels"]},
                            batch_size=5, epochs=4, verbose=0, callbacks=[callback, checkpoint])
    assert callback.evaluated_epochs == [1, 3]  # epochs 2 and 4, 1-based
    assert len(history.history["val_AP"]) == 2 and len(history.history["loss"]) == 4
    missing = [w for w in caught if "val_AP" in str(w.message)]
    assert len(missing) == 2  # ModelCheckpoint on the skipped epochs 1 and 3
    assert (tmp_path / "best-2.weights.h5").exists()


def test_fill_skipped_epochs_stops_checkpoint_saving_unevaluated_models(tmp_path):
    gt, encoded, targets = make_data(num_images=5, seed=1)
    callback = COCOEvalCallback(batches(encoded, targets), every_n_epochs=2, fill_skipped_epochs=True,
                                category_ids=CATEGORY_IDS, verbose=0, **coco_ground_truth(gt))
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best-{epoch}.weights.h5"), monitor="val_AP", mode="max",
        save_best_only=True, save_weights_only=True)
    model = make_model(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # epoch 1 has no value yet
        history = model.fit(encoded, {"boxes": targets["boxes"], "labels": targets["labels"]},
                            batch_size=5, epochs=4, verbose=0, callbacks=[callback, checkpoint])
    assert callback.evaluated_epochs == [1, 3]
    aps = history.history["val_AP"]  # epochs 2, 3 (repeated), 4
    assert len(aps) == 3 and aps[1] == aps[0]
    assert (tmp_path / "best-2.weights.h5").exists()
    assert not (tmp_path / "best-3.weights.h5").exists()  # not evaluated -> not saved


def test_scale_key_maps_predictions_back_to_original_pixels():
    gt, encoded, targets = make_data(num_images=6, seed=4)
    scale = np.array([0.5, 2.0, 0.75, 1.0, 0.5, 1.5], np.float32)
    resized = encoded.copy()
    resized[..., :4] *= scale[:, None, None]  # what the network sees after resizing
    targets = dict(targets, scale=scale)
    data = batches(resized, targets)
    model = make_model(0.0)
    kwargs = dict(category_ids=CATEGORY_IDS, verbose=0, **coco_ground_truth(gt))
    assert COCOEvalCallback(data, scale_key="scale", **kwargs).evaluate(model)["AP"] == \
        pytest.approx(1.0, abs=1e-12)
    assert COCOEvalCallback(data, **kwargs).evaluate(model)["AP"] < 0.9
    # a model answering in xywh: the division applies to widths and heights too
    xywh = COCOEvalCallback(data, scale_key="scale", bounding_box_format="xywh", **kwargs)
    assert xywh.evaluate(make_model(0.0, xywh=True))["AP"] == pytest.approx(1.0, abs=1e-12)
    # VOC ground truth read from (resized) targets is divided like the predictions
    voc = COCOEvalCallback(batches(resized, dict(targets, boxes=targets["boxes"] * scale[:, None, None])),
                           metric="voc", scale_key="scale", verbose=0)
    assert voc.evaluate(model)["mAP"] == 1.0


def test_voc_mode_reads_ground_truth_from_targets(capsys):
    tf = pytest.importorskip("tensorflow")
    gt, encoded, targets = make_data(num_images=7, seed=2)
    dataset = tf.data.Dataset.from_tensor_slices((encoded, targets)).batch(3)
    callback = COCOEvalCallback(dataset, metric="voc", verbose=1)
    model = make_model(0.0)
    history = model.fit(encoded, {"boxes": targets["boxes"], "labels": targets["labels"]},
                        batch_size=7, epochs=1, verbose=0, callbacks=[callback])
    assert history.history["val_mAP"] == [1.0]
    assert "Epoch 1: VOC evaluation" in capsys.readouterr().out
    callback.verbose = 0
    # shifted: equals VOCEvaluator fed by hand (GT in the same 0-based continuous frame)
    model = make_model(7.0)
    results = callback.evaluate(model)
    predictions = model.predict(encoded, verbose=0)
    by_hand = VOCEvaluator(pixel_convention="continuous")
    for i, image_id in enumerate(targets["image_id"]):
        keep = targets["labels"][i] >= 0
        by_hand.add_ground_truth(int(image_id), targets["boxes"][i][keep], targets["labels"][i][keep])
    by_hand.add_predictions(targets["image_id"], predictions)
    expected = by_hand.evaluate()
    assert 0 < results["mAP"] < 1
    assert results["mAP"] == pytest.approx(expected["mAP"], abs=1e-12)
    assert callback.scalar_logs() == {"val_mAP": results["mAP"]}


def test_voc_mode_with_prepared_evaluator_and_dict_elements():
    gt, encoded, targets = make_data(num_images=4, seed=3)
    evaluator = VOCEvaluator(class_names=["a", "b"], use_07_metric=False,
                             pixel_convention="continuous")
    for i, image_id in enumerate(targets["image_id"]):
        keep = targets["labels"][i] >= 0
        evaluator.add_ground_truth(f"im{image_id}", targets["boxes"][i][keep],
                                   targets["labels"][i][keep])
    data = [{"images": encoded[s:s + 2], "image_ids": np.array([f"im{i}".encode() for i in
                                                                 targets["image_id"][s:s + 2]])}
            for s in (0, 2)]
    callback = COCOEvalCallback(data, evaluator, metric="voc", prefix="eval_", verbose=0)
    assert callback.evaluate(make_model(0.0))["mAP"] == 1.0
    shifted = callback.evaluate(make_model(5.0))["mAP"]  # old detections were dropped
    assert shifted < 1.0 and evaluator.num_images == 4
    assert callback.evaluate(make_model(0.0))["mAP"] == 1.0
    assert list(callback.scalar_logs()) == ["eval_mAP"]


class Batches(keras.utils.PyDataset):
    def __init__(self, items):
        super().__init__()
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_pydataset_and_steps():
    gt, encoded, targets = make_data(num_images=6, seed=5)
    data = Batches(batches(encoded, targets, batch_size=2))
    model = make_model(0.0)
    assert COCOEvalCallback(data, metric="voc", verbose=0).evaluate(model)["mAP"] == 1.0
    # steps=1: only the first 2 images are scored (GT from targets, so still perfect)
    limited = COCOEvalCallback(data, metric="voc", steps=1, verbose=0)
    limited.evaluate(model)
    assert limited.last_evaluator.num_images == 2


def test_bad_input():
    gt, encoded, targets = make_data(num_images=2)
    with pytest.raises(ValueError, match="one-shot"):
        COCOEvalCallback((b for b in batches(encoded, targets)), gt)
    with pytest.raises(ValueError, match="needs ground_truth"):
        COCOEvalCallback(batches(encoded, targets))
    with pytest.raises(ValueError, match="every_n_epochs"):
        COCOEvalCallback(batches(encoded, targets), gt, every_n_epochs=0)
    no_ids = [(encoded, {"boxes": targets["boxes"]})]
    callback = COCOEvalCallback(no_ids, metric="voc", verbose=0)
    with pytest.raises(ValueError, match=r"no image ids.*targets\['image_id'\]"):
        callback.evaluate(make_model(0.0))
    plain = keras.Sequential([keras.Input((MAX_OBJECTS, 5)), keras.layers.Flatten()])
    callback = COCOEvalCallback(batches(encoded, targets), metric="voc", verbose=0)
    with pytest.raises(ValueError, match="padded detection dict"):
        callback.evaluate(plain)
