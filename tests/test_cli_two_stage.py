"""The ``kdet`` command line with the two-stage models (issue #11): ``--model fasterrcnn |
maskrcnn | keypointrcnn``, ``--version``, ``--backbone``; ``kdet eval`` reports ``segm`` and
``keypoints`` AP next to ``bbox``; ``kdet predict`` draws masks and keypoints.

Default run: settings, the builder table, clear errors for bad combinations, and
evaluation / drawing with a duck-typed "oracle" detector (known masks and keypoints,
no network) on real data (Penn-Fudan, mmpose's COCO keypoints), checked against
pycocotools and against the ground truth. ``slow``: real Mask R-CNN and Keypoint R-CNN
trained for two steps by ``kdet train`` at 128 px, then ``kdet eval`` (numbers equal
pycocotools on predictions recomputed from the saved model), ``predict``, ``export``
and ``bench`` (minutes on a shared CPU).
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from kdet import cli
from kdet.workflow import config as wconfig

PENNFUDAN_IMAGES = 6


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pennfudan_subset(shared_data, tmp_path):
    """The first Penn-Fudan images as a mask folder of their own (links, no copies)."""
    source = shared_data / "pennfudan"
    root = tmp_path / "pennfudan"
    (root / "PNGImages").mkdir(parents=True)
    (root / "PedMasks").mkdir()
    for name in sorted(os.listdir(source / "PNGImages"))[:PENNFUDAN_IMAGES]:
        stem = os.path.splitext(name)[0]
        os.symlink(source / "PNGImages" / name, root / "PNGImages" / name)
        os.symlink(source / "PedMasks" / f"{stem}_mask.png",
                   root / "PedMasks" / f"{stem}_mask.png")
    return root


@pytest.fixture
def mmpose_keypoints(shared_data):
    root = shared_data / "keypoints" / "mmpose_coco"
    return root / "test_coco.json", root


def _pycocotools(ground_truth, results, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = json.loads(json.dumps(ground_truth))
    gt.createIndex()
    evaluation = COCOeval(gt, gt.loadRes(json.loads(json.dumps(results))), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return evaluation.stats


DETECTION_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                   "ARm", "ARl")
KEYPOINT_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


# ---- settings and the builder table -------------------------------------------------------------
def test_version_serves_retinanet_and_rcnn_and_the_old_flag_still_works(capsys):
    from kdet.workflow.models import model_version

    settings = wconfig.resolve("train", overrides={"model": "maskrcnn", "version": "2",
                                                   "backbone": "mobilenet_v2"})
    assert settings["version"] == 2 and model_version(settings) == 2
    old = wconfig.resolve("bench", file_config={"retinanet_version": 2})
    assert model_version(old) == 2  # the RetinaNet-only name of before
    assert model_version(wconfig.resolve("eval")) == 1
    for command in ("train", "eval", "predict", "export", "bench"):
        names = [o.name for o in wconfig.options_for(command)]
        assert {"model", "version", "backbone", "backbone_weights"} <= set(names), command
    assert {"fasterrcnn", "maskrcnn", "keypointrcnn"} <= set(wconfig.MODEL_NAMES)

    code, _, err = run_cli(["train", "--format", "shapes", "--model", "maskrcnn",
                            "--version", "3"], capsys)
    assert code == 2 and "version='3' is not one of (1, 2)" in err
    with pytest.raises(SystemExit) as exit_info:  # the program's --version is unchanged
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("kdet ")


def test_build_model_passes_the_settings_to_each_rcnn(monkeypatch):
    import kdet
    from kdet.workflow.models import TWO_STAGE_MODELS, build_model

    assert set(TWO_STAGE_MODELS) == {"fasterrcnn", "fasterrcnn_c4", "maskrcnn", "keypointrcnn"}
    # the real Keypoint R-CNN: version, backbone, size and the data's keypoint count arrive
    keypoint = build_model({"model": "keypointrcnn", "backbone": "mobilenet_v2",
                            "version": 2}, 1, 64, num_keypoints=5)
    assert type(keypoint) is kdet.models.KeypointRCNN and keypoint.num_keypoints == 5
    config = keypoint.get_config()
    assert (config["version"], config["backbone"], config["image_size"]) == (2, "mobilenet_v2",
                                                                             64)
    # the others get the same arguments (each is built for real in the slow tests)
    made = {}
    for class_name in ("FasterRCNN", "MaskRCNN"):
        def record(class_name=class_name, **kwargs):
            made[class_name] = kwargs
            return keypoint
        monkeypatch.setattr(kdet.models, class_name, record)
    build_model({"model": "fasterrcnn", "backbone": "resnet101", "retinanet_version": 2}, 3, 96)
    build_model({"model": "maskrcnn"}, 2, None)
    assert made["FasterRCNN"] == {"num_classes": 3, "backbone": "resnet101", "version": 2,
                                  "backbone_weights": None, "image_size": 96}
    assert made["MaskRCNN"] == {"num_classes": 2, "backbone": "resnet50", "version": 1,
                                "backbone_weights": None}  # the model's default size
    build_model({"model": "fasterrcnn_c4"}, 4, 128)
    assert made["FasterRCNN"] == {"num_classes": 4, "backbone": "resnet50", "version": 1,
                                  "backbone_weights": None, "fpn": False, "image_size": 128}
    with pytest.raises(ValueError, match="--model keypointrcnn: .*multiple of 32"):
        build_model({"model": "keypointrcnn", "backbone": "mobilenet_v2"}, 1, 100)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn", "maskrcnn"])
def test_build_model_builds_faster_and_mask_rcnn(name):
    import kdet
    from kdet.workflow.models import build_model

    model = build_model({"model": name, "backbone": "mobilenet_v2", "version": 2}, 3, 64)
    expected = {"fasterrcnn": kdet.models.FasterRCNN, "maskrcnn": kdet.models.MaskRCNN}[name]
    assert type(model) is expected and model.num_classes == 3
    assert model.get_config()["version"] == 2 and model.image_size == (64, 64)


def test_models_that_need_masks_or_keypoints_name_the_dataset_without_them(shared_data,
                                                                           pennfudan_subset,
                                                                           capsys):
    raccoon = shared_data / "raccoon"
    code, _, err = run_cli(["train", "--format", "voc", "--train-data", str(raccoon),
                            "--model", "maskrcnn", "--output-dir", "unused"], capsys)
    assert code == 2
    assert "--model maskrcnn trains on masks" in err and str(raccoon) in err
    code, _, err = run_cli(["train", "--format", "masks", "--train-data", str(pennfudan_subset),
                            "--model", "keypointrcnn", "--output-dir", "unused"], capsys)
    assert code == 2
    assert "--model keypointrcnn trains on keypoints" in err and str(pennfudan_subset) in err


def test_masks_in_image_undoes_resize_with_pad():
    from kdet.workflow.prediction import masks_in_image

    # a 60 x 90 image in a 64 px input: scale 64 / 90, resized to 43 x 64, top-left
    scale = 64 / 90
    masks = np.zeros((2, 64, 64), np.float32)
    x1, y1, x2, y2 = 18, 12, 45, 30  # original pixels
    masks[0, round(y1 * scale):round(y2 * scale), round(x1 * scale):round(x2 * scale)] = 1
    masks[1, 43:, :] = 1  # padding only: nothing of the image
    out = masks_in_image(masks, scale, 60, 90)
    assert out.shape == (2, 60, 90)
    got = out[0] > 0.5
    inner = np.zeros((60, 90), bool)  # the rectangle, 2 px in: a 64 / 90 grid rounds edges
    inner[y1 + 2:y2 - 2, x1 + 2:x2 - 2] = True
    outer = np.zeros((60, 90), bool)
    outer[y1 - 2:y2 + 2, x1 - 2:x2 + 2] = True
    assert got[inner].all() and not got[~outer].any()
    assert not (out[1] > 0.5).any()
    # per-axis scales (torchvision's rule) are (x, y)
    both = masks_in_image(masks[:1], (scale, scale), 60, 90)
    np.testing.assert_allclose(both, out[:1])


def test_bench_targets_have_masks_and_keypoints_inside_the_boxes():
    from kdet.workflow.benchmark import _random_batch

    _, targets = _random_batch(2, 64, 3, 0, max_boxes=4, annotations=("masks", "keypoints"),
                               num_keypoints=5)
    assert targets["masks"].shape == (2, 4, 64, 64)
    assert targets["keypoints"].shape == (2, 4, 5, 3)
    boxes = targets["boxes"]
    for b in range(2):
        for n in range(4):
            ys, xs = np.nonzero(targets["masks"][b, n])
            x1, y1, x2, y2 = boxes[b, n]
            assert xs.min() >= np.floor(x1) and xs.max() <= np.ceil(x2)
            assert ys.min() >= np.floor(y1) and ys.max() <= np.ceil(y2)
            kp = targets["keypoints"][b, n]
            assert (kp[:, 0] >= x1).all() and (kp[:, 0] <= x2).all() and (kp[:, 2] == 2).all()


# ---- eval and predict with an oracle two-stage detector -----------------------------------------
class TwoStageOracle:
    """Duck-typed Mask / Keypoint R-CNN with known outputs in model-input pixels: for the
    i-th image it is shown, the ground-truth boxes (jittered), masks (the GT mask resized
    as the pipeline resizes the image, one eroded) and keypoints (jittered), plus a false
    alarm, with random scores."""

    def __init__(self, dataset, image_size, with_masks=False, num_keypoints=None, seed=0,
                 max_detections=12):
        self.dataset = dataset
        self.image_size = (image_size, image_size)
        self.num_classes = dataset.num_classes
        self.with_masks = with_masks
        if num_keypoints:
            self.num_keypoints = num_keypoints
        self.rng = np.random.default_rng(seed)
        self.max_detections = max_detections
        self.seen = 0

    def _masks(self, index, scale):
        side = self.image_size[0]
        masks = self.dataset.load_masks(index)
        h, w = masks.shape[1:]
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        out = np.zeros((len(masks) + 1, side, side), np.float32)
        for i, mask in enumerate(masks):
            resized = Image.fromarray(mask * 255).resize((new_w, new_h), Image.NEAREST)
            out[i, :new_h, :new_w] = np.asarray(resized) / 255.0
        if len(masks) > 1:  # a worse mask for the first object
            out[0] = out[0] * (self.rng.uniform(size=out[0].shape) < 0.6)
        out[-1, 2:10, 2:14] = 0.9  # the false alarm's mask
        return out

    def predict_on_batch(self, images):
        d, side = self.max_detections, self.image_size[0]
        out = {"boxes": np.zeros((len(images), d, 4), np.float32),
               "scores": np.zeros((len(images), d), np.float32),
               "labels": np.full((len(images), d), -1, np.int32),
               "num_detections": np.zeros(len(images), np.int32)}
        if self.with_masks:
            out["masks"] = np.zeros((len(images), d, side, side), np.float32)
        if getattr(self, "num_keypoints", None):
            out["keypoints"] = np.zeros((len(images), d, self.num_keypoints, 3), np.float32)
        for b in range(len(images)):
            index = self.seen
            record = self.dataset.records[index]
            scale = side / max(record["original_size"])
            boxes = record["boxes"] * scale + self.rng.normal(0, 1.0, record["boxes"].shape)
            boxes = np.concatenate([boxes, [[2, 2, 14, 10]]])
            n = len(boxes)
            out["boxes"][b, :n] = boxes
            out["labels"][b, :n] = np.concatenate([record["labels"], [0]])
            out["scores"][b, :n] = self.rng.uniform(0.3, 1.0, n)
            out["num_detections"][b] = n
            if self.with_masks:
                out["masks"][b, :n] = self._masks(index, scale)
            if "keypoints" in out:
                kp = record["keypoints"].astype(np.float64).copy()
                kp[..., :2] = kp[..., :2] * scale + self.rng.normal(0, 0.7, kp[..., :2].shape)
                kp[..., 2] = 1.0
                out["keypoints"][b, :n - 1] = kp
                out["keypoints"][b, n - 1, :, :2] = [6, 6]
            self.seen += 1
        return out


def test_eval_reports_segm_next_to_bbox_as_pycocotools(pennfudan_subset, tmp_path, capsys,
                                                       monkeypatch):
    from pycocotools import mask as mask_utils

    from kdet.data import MaskFolderDataset
    from kdet.workflow import models

    dataset = MaskFolderDataset(pennfudan_subset)
    oracle = TwoStageOracle(dataset, image_size=128, with_masks=True, seed=1)
    monkeypatch.setattr(models, "load_model", lambda name, weights=None: oracle)
    out = tmp_path / "eval"
    code, stdout, _ = run_cli(["eval", "--model", "oracle", "--format", "masks",
                               "--val-data", str(pennfudan_subset), "--batch-size", "4",
                               "--output-dir", str(out), "--verbose", "0",
                               "--detections-out", str(out / "dets.json")], capsys)
    assert code == 0 and oracle.seen == PENNFUDAN_IMAGES
    results = json.loads((out / "eval_results.json").read_text())
    gt_boxes = dataset.coco_ground_truth()
    gt_masks = dataset.coco_ground_truth(include_masks=True)
    bbox = _pycocotools(gt_boxes, json.loads((out / "dets.json").read_text()), "bbox")
    segm_results = json.loads((out / "dets_segm.json").read_text())
    segm = _pycocotools(gt_masks, segm_results, "segm")
    np.testing.assert_allclose([results["stats"][n] for n in DETECTION_STATS], bbox, atol=1e-12)
    np.testing.assert_allclose([results["segm"]["stats"][n] for n in DETECTION_STATS], segm,
                               atol=1e-12)
    assert 0.3 < results["segm"]["stats"]["AP"] < 1.0  # a non-trivial case
    assert f"segm: AP={segm[0]:.4f}" in stdout and f"AP={bbox[0]:.4f}" in stdout

    # the masks scored are the oracle's mapped back to each image: the unspoilt ones
    # (every object but the first of an image) overlap their ground truth almost exactly
    by_image = {}
    for ann in gt_masks["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["segmentation"])
    for record in dataset.records:
        mine = [r["segmentation"] for r in segm_results if r["image_id"] == record["image_id"]]
        truth = by_image[record["image_id"]]
        assert len(mine) == len(truth) + 1
        h, w = record["original_size"]
        for det, gt in list(zip(mine, truth))[1:]:
            assert mask_utils.iou([det], [gt], [0])[0, 0] > 0.85
            assert tuple(det["size"]) == (h, w)


def test_eval_reports_keypoint_ap_as_pycocotools(mmpose_keypoints, tmp_path, capsys,
                                                 monkeypatch):
    from kdet.data import COCODataset
    from kdet.workflow import models

    annotations, images = mmpose_keypoints
    dataset = COCODataset(annotations, images, include_keypoints=True)
    oracle = TwoStageOracle(dataset, image_size=160, num_keypoints=17, seed=2)
    monkeypatch.setattr(models, "load_model", lambda name, weights=None: oracle)
    out = tmp_path / "eval"
    code, stdout, _ = run_cli(["eval", "--model", "oracle", "--format", "coco",
                               "--val-data", str(annotations), "--val-images", str(images),
                               "--batch-size", "3", "--output-dir", str(out), "--verbose", "0",
                               "--detections-out", str(out / "dets.json")], capsys)
    assert code == 0 and oracle.seen == len(dataset)
    # the reference: the same images and oracle, keypoints mapped back here
    reference_oracle = TwoStageOracle(dataset, image_size=160, num_keypoints=17, seed=2)
    results = []
    for index, record in enumerate(dataset.records):
        raw = reference_oracle.predict_on_batch(np.zeros((1,)))
        scale = 160 / max(record["original_size"])
        for i in range(int(raw["num_detections"][0])):
            kp = raw["keypoints"][0, i].astype(np.float64).copy()
            kp[:, :2] /= scale
            results.append({"image_id": record["image_id"], "category_id": 1,
                            "keypoints": kp.reshape(-1).tolist(),
                            "score": float(raw["scores"][0, i])})
    reference = _pycocotools(dataset.coco_ground_truth(), results, "keypoints")
    written = json.loads((out / "eval_results.json").read_text())["keypoints"]["stats"]
    np.testing.assert_allclose([written[n] for n in KEYPOINT_STATS], reference, atol=1e-12)
    assert 0.3 < written["AP"] < 1.0
    assert f"keypoints: AP={reference[0]:.4f}" in stdout
    assert len(json.loads((out / "dets_keypoints.json").read_text())) == len(results)


def test_predict_draws_masks_and_keypoints_in_image_pixels(shared_data, tmp_path, capsys,
                                                           monkeypatch):
    from kdet.workflow import models

    source = shared_data / "pennfudan" / "PNGImages"
    name = sorted(os.listdir(source))[0]
    image = np.asarray(Image.open(source / name).convert("RGB"))
    h, w = image.shape[:2]
    side = 128
    scale = side / max(h, w)
    x1, y1, x2, y2 = 0.3 * w, 0.2 * h, 0.6 * w, 0.7 * h  # box and mask, original pixels
    keypoints = np.zeros((1, 17, 3), np.float32)
    keypoints[0, :, 0] = np.linspace(0.35 * w, 0.55 * w, 17)
    keypoints[0, :, 1] = 0.85 * h
    keypoints[0, 5, 1] = keypoints[0, 6, 1] = 0.1 * h  # shoulders, joined by the skeleton

    class Drawn:  # predict_images as the R-CNNs: boxes / keypoints in image pixels,
        num_classes = 1  # masks in model-input space with the "scale" that maps them

        def predict_images(self, images, batch_size=8):
            mask = np.zeros((1, 1, side, side), np.float32)
            mask[0, 0, round(y1 * scale):round(y2 * scale), round(x1 * scale):round(x2 * scale)] = 1
            return {"boxes": np.array([[[x1, y1, x2, y2]]], np.float32),
                    "scores": np.array([[0.9]], np.float32), "labels": np.array([[0]]),
                    "num_detections": np.array([1]), "masks": mask,
                    "keypoints": keypoints[None], "scale": np.array([scale], np.float32)}

    monkeypatch.setattr(models, "load_model", lambda name, weights=None: Drawn())
    out = tmp_path / "drawn"
    code, _, _ = run_cli(["predict", "--model", "x.keras", str(source / name), "--output-dir",
                          str(out), "--class-names", "pedestrian", "--verbose", "0"], capsys)
    assert code == 0
    drawn = np.asarray(Image.open(out / (os.path.splitext(name)[0] + ".png")).convert("RGB"))
    assert drawn.shape == image.shape
    changed = np.any(drawn != image, axis=-1)
    inner = changed[int(y1) + 15:int(y2) - 15, int(x1) + 15:int(x2) - 15]
    assert inner.mean() > 0.99  # the mask's alpha overlay covers the inside of the box
    assert not changed[int(y2) + 10:, :int(x1) - 10].any()  # below and left of the box
    assert not changed[:, int(x2) + 10:].any()  # right of everything: untouched
    for x, y, _ in keypoints[0]:
        assert changed[int(round(y)), int(round(x))]
    middle = keypoints[0, 5:7, :2].mean(axis=0)  # on the shoulder line, between the points
    assert changed[int(round(middle[1])), int(round(middle[0]))]
    record = json.loads((out / "predictions.json").read_text())["images"][0]
    assert len(record["detections"][0]["keypoints"]) == 17


# ---- real models, end to end (slow) -------------------------------------------------------------
def _eval_inputs(dataset, image_size):
    from kdet.workflow.data import evaluation_batches
    return list(evaluation_batches(dataset, image_size, 2).as_numpy_iterator())


@pytest.mark.slow
def test_maskrcnn_train_eval_predict_export_bench(pennfudan_subset, tmp_path, capsys):
    import keras
    from pycocotools import mask as mask_utils

    from kdet.data import MaskFolderDataset
    from kdet.workflow.data import split_off
    from kdet.workflow.prediction import masks_in_image

    run = tmp_path / "run"
    data = ["--format", "masks", "--train-data", str(pennfudan_subset), "--val-fraction", "0.5"]
    code, _, err = run_cli(["train", *data, "--model", "maskrcnn", "--backbone", "mobilenet_v2",
                            "--version", "2", "--image-size", "128", "--epochs", "1",
                            "--steps-per-epoch", "2", "--batch-size", "2", "--output-dir",
                            str(run), "--verbose", "0", "--tensorboard", "false",
                            "--eval-every", "2"], capsys)  # no evaluation while training
    assert code == 0, err
    model = keras.saving.load_model(str(run / "last.keras"), safe_mode=True)
    assert type(model).__name__ == "MaskRCNN" and model.get_config()["version"] == 2

    out = tmp_path / "eval"
    code, stdout, err = run_cli(["eval", "--model", str(run / "last.keras"), *data,
                                 "--batch-size", "2", "--output-dir", str(out), "--verbose", "0"],
                                capsys)
    assert code == 0, err
    written = json.loads((out / "eval_results.json").read_text())
    # the reference: the saved model on the same inputs, masks mapped and scored here
    _, val = split_off(MaskFolderDataset(pennfudan_subset), 0.5, 0)
    boxes, segms = [], []
    for images, targets in _eval_inputs(val, 128):
        raw = model.predict_on_batch(images)
        for b, image_id in enumerate(targets["image_id"]):
            scale = float(targets["scale"][b])
            h, w = (int(v) for v in targets["original_size"][b])
            n = int(raw["num_detections"][b])
            masks = masks_in_image(np.asarray(raw["masks"][b, :n]), scale, h, w)
            for i in range(n):
                x1, y1, x2, y2 = (float(v) / scale for v in np.asarray(raw["boxes"][b, i]))
                common = {"image_id": int(image_id), "category_id": 1,
                          "score": float(raw["scores"][b, i])}
                boxes.append(dict(common, bbox=[x1, y1, x2 - x1, y2 - y1]))
                rle = mask_utils.encode(np.asfortranarray(masks[i] > 0.5, dtype=np.uint8))
                segms.append(dict(common, segmentation=dict(rle, counts=rle["counts"].decode())))
    assert boxes, "the model detected nothing: no evidence either way"
    bbox = _pycocotools(val.coco_ground_truth(), boxes, "bbox")
    segm = _pycocotools(val.coco_ground_truth(include_masks=True), segms, "segm")
    np.testing.assert_allclose([written["stats"][n] for n in DETECTION_STATS], bbox, atol=1e-6)
    np.testing.assert_allclose([written["segm"]["stats"][n] for n in DETECTION_STATS], segm,
                               atol=1e-6)
    assert "segm: AP=" in stdout

    # predict: the masks of the drawn detections tint the image
    image_path = sorted((pennfudan_subset / "PNGImages").iterdir())[0]
    code, _, err = run_cli(["predict", "--model", str(run / "last.keras"), str(image_path),
                            "--output-dir", str(tmp_path / "drawn"), "--score-threshold", "0",
                            "--verbose", "0"], capsys)
    assert code == 0, err
    image = np.asarray(Image.open(image_path).convert("RGB"))
    found = model.predict_images([image])
    n = int(found["num_detections"][0])
    masks = masks_in_image(found["masks"][0, :n], found["scale"][0], *image.shape[:2]) > 0.5
    drawn = np.asarray(Image.open(tmp_path / "drawn" / (image_path.stem + ".png")).convert("RGB"))
    changed = np.any(drawn != image, axis=-1)
    if masks.any():
        assert changed[masks.any(axis=0)].mean() > 0.9

    if keras.backend.backend() == "tensorflow":  # kdet.export builds TensorFlow graphs
        import tensorflow as tf

        exported = tmp_path / "exported"
        code, _, err = run_cli(["export", "--model", str(run / "last.keras"), "--output",
                                str(exported)], capsys)
        assert code == 0, err
        serve = tf.saved_model.load(str(exported)).signatures["serving_default"]
        images = np.random.default_rng(0).uniform(0, 255, (1, 128, 128, 3)).astype("float32")
        got = {k: v.numpy() for k, v in serve(images=tf.constant(images)).items()}
        expected = model.predict_on_batch(images)
        np.testing.assert_array_equal(got["num_detections"], expected["num_detections"])
        n = int(expected["num_detections"][0])
        np.testing.assert_allclose(got["boxes"][:, :n], expected["boxes"][:, :n], atol=1e-3)
        np.testing.assert_allclose(got["masks"][:, :n], expected["masks"][:, :n], atol=1e-3)

    code, stdout, err = run_cli(["bench", "--model", "maskrcnn", "--backbone", "mobilenet_v2",
                                 "--image-size", "64", "--batch-size", "1", "--bench-steps", "1",
                                 "--warmup", "1", "--num-classes", "2"], capsys)
    assert code == 0, err
    assert "maskrcnn_mobilenet_v2_fpn" in stdout and "train img/s" in stdout


@pytest.mark.slow
def test_keypointrcnn_train_eval_predict(shared_data, tmp_path, capsys):
    import keras

    from kdet.data import COCODataset
    from kdet.workflow.data import split_off

    root = shared_data / "keypoints" / "coco_mini_val2017"
    annotations = root / "annotations" / "person_keypoints_val2017.json"
    data = ["--format", "coco", "--train-data", str(annotations), "--train-images",
            str(root / "val2017"), "--val-fraction", "0.1"]
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *data, "--model", "keypointrcnn", "--backbone",
                            "mobilenet_v2", "--image-size", "128", "--epochs", "1",
                            "--steps-per-epoch", "2", "--batch-size", "2", "--output-dir",
                            str(run), "--verbose", "0", "--tensorboard", "false",
                            "--eval-every", "2"], capsys)  # no evaluation while training
    assert code == 0, err
    model = keras.saving.load_model(str(run / "last.keras"), safe_mode=True)
    assert model.num_keypoints == 17

    out = tmp_path / "eval"
    code, stdout, err = run_cli(["eval", "--model", str(run / "last.keras"), *data,
                                 "--batch-size", "2", "--output-dir", str(out), "--verbose", "0"],
                                capsys)
    assert code == 0, err
    written = json.loads((out / "eval_results.json").read_text())["keypoints"]["stats"]
    _, val = split_off(COCODataset(annotations, root / "val2017", include_keypoints=True), 0.1, 0)
    results = []
    for images, targets in _eval_inputs(val, 128):
        raw = model.predict_on_batch(images)
        for b, image_id in enumerate(targets["image_id"]):
            scale = float(targets["scale"][b])
            for i in range(int(raw["num_detections"][b])):
                kp = np.asarray(raw["keypoints"][b, i], np.float64).copy()
                kp[:, :2] /= scale
                results.append({"image_id": int(image_id),
                                "category_id": int(val.category_ids[int(raw["labels"][b, i])]),
                                "keypoints": kp.reshape(-1).tolist(),
                                "score": float(raw["scores"][b, i])})
    assert results, "the model detected nothing: no evidence either way"
    reference = _pycocotools(val.coco_ground_truth(), results, "keypoints")
    np.testing.assert_allclose([written[n] for n in KEYPOINT_STATS], reference, atol=1e-6)
    assert "keypoints: AP=" in stdout

    image_path = root / "val2017" / val.records[0]["file_name"]
    code, _, err = run_cli(["predict", "--model", str(run / "last.keras"), str(image_path),
                            "--output-dir", str(tmp_path / "drawn"), "--score-threshold", "0",
                            "--verbose", "0"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "drawn" / "predictions.json").read_text())["images"][0]
    assert all(len(d["keypoints"]) == 17 for d in record["detections"])
