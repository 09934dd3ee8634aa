"""Peak memory and time of one Mask R-CNN training step, kdet vs torchvision.

The setting of issue #11 ("Scale"): R50-FPN Mask R-CNN, 800 x 800 images,
batch 2, 10 objects per image with full-resolution masks, random init, CPU.
Each side runs in its own process (torch and TensorFlow must not share one);
the figure is the process's peak resident memory (``ru_maxrss``) after two
training steps, and the median CPU/wall time of the steps after the first
(the first one traces the graph).

    python benchmarks/mask_rcnn_memory.py                 # both sides
    python benchmarks/mask_rcnn_memory.py --side kdet --mask-size 200
    PYTHONPATH=/path/to/old/checkout python benchmarks/mask_rcnn_memory.py --side kdet

``--mask-size S`` stores the kdet GT masks at S x S (``build_pipeline``'s
``mask_size``); targets are then read with the RoIs scaled to that grid.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def scene(size, batch, objects, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    boxes = np.zeros((batch, objects, 4), "float32")
    masks = np.zeros((batch, objects, size, size), "uint8")
    for b in range(batch):
        wh = rng.uniform(0.05, 0.4, (objects, 2)) * size
        xy = rng.uniform(0, 1, (objects, 2)) * (size - wh)
        boxes[b] = np.concatenate([xy, xy + wh], 1)
        for n, (x1, y1, x2, y2) in enumerate(boxes[b].astype(int)):
            masks[b, n, y1:y2, x1:x2] = 1
    labels = rng.integers(0, 90, (batch, objects)).astype("int32")
    return images, boxes, labels, masks


def run_kdet(args):
    import keras
    import numpy as np
    import kdet
    images, boxes, labels, masks = scene(args.size, args.batch, args.objects)
    if args.mask_size and args.mask_size != args.size:
        step = args.size // args.mask_size
        masks = masks[:, :, ::step, ::step]
    model = kdet.models.MaskRCNN(num_classes=90, image_size=args.size)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=False)
    y = {"boxes": boxes, "labels": labels, "masks": masks}
    return [lambda: model.train_on_batch(images, y)]


def run_torchvision(args):
    import torch
    import torchvision
    torch.set_num_threads(args.threads)
    images, boxes, labels, masks = scene(args.size, args.batch, args.objects)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=args.size,
        max_size=args.size)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    imgs = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
    targets = [{"boxes": torch.from_numpy(boxes[b]), "labels": torch.from_numpy(labels[b] + 1).long(),
                "masks": torch.from_numpy(masks[b])} for b in range(args.batch)]

    def step():
        opt.zero_grad()
        loss = sum(model(imgs, targets).values())
        loss.backward()
        opt.step()
    return [step]


def child(args):
    if args.side == "torchvision":
        (step,) = run_torchvision(args)
    else:
        (step,) = run_kdet(args)
    times = []
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - w0, time.process_time() - c0))
    later = sorted(times[1:]) or times
    mid = later[len(later) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB -> GiB
    print(json.dumps({"side": args.side, "mask_size": args.mask_size or args.size,
                      "peak_rss_gib": round(peak, 2), "first_step_s": round(times[0][0], 1),
                      "step_wall_s": round(mid[0], 1), "step_cpu_s": round(mid[1], 1)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=["kdet", "torchvision", "both"], default="both")
    parser.add_argument("--size", type=int, default=800)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=10)
    parser.add_argument("--mask-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sides = ["kdet", "torchvision"] if args.side == "both" else [args.side]
    for side in sides:
        cmd = [sys.executable, __file__, "--child", "--side", side, "--size", str(args.size),
               "--batch", str(args.batch), "--objects", str(args.objects),
               "--steps", str(args.steps), "--threads", str(args.threads)]
        if args.mask_size:
            cmd += ["--mask-size", str(args.mask_size)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(args.threads))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else f"{side} failed:\n{out.stderr[-3000:]}", flush=True)


if __name__ == "__main__":
    main()
