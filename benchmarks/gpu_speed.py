"""Issue #13's GPU rows in one go: kdet (JAX backend) vs torchvision / effdet on one GPU.

Each (row, precision, side) runs in its own process through
:func:`kdet.workflow.peer_benchmark.compare` (what ``kdet bench --compare`` and
``benchmarks/peer_speed.py`` use on CPU) with ``device="gpu"``: PyTorch on CUDA with
``torch.cuda.synchronize()`` closing every timed call, kdet on the JAX backend (its
calls return host arrays / floats, so they are timed to their end too), random init,
synthetic batch, warm-up calls (JAX compiles, cuDNN autotunes) excluded, median of
``--repeats``. ``bfloat16`` is Keras' ``mixed_bfloat16`` policy on kdet's side and torch
AMP (``torch.autocast(dtype=torch.bfloat16)``) on the peer's. The figure is images/s
(wall): the ratio column is kdet img/s / peer img/s (> 1: kdet faster).

    python benchmarks/gpu_speed.py                       # every row, ~5-10 min on one H100
    python benchmarks/gpu_speed.py --rows retinanet --precisions float32
    python benchmarks/gpu_speed.py --device cpu --rows retinanet --sizes retinanet=128 \\
        --batches retinanet=1 --repeats 1 --tasks predict      # smoke run without a GPU

Reference figures (issue #13, torchvision / effdet on one H100, weights=None), to read
next to the peer's column of a run: RetinaNet 800 b8 predict 97 img/s fp32 / 107 AMP,
train 69; Faster R-CNN 144 / 185, train 61; Mask R-CNN ~19, train 57; effdet D0 512 b16
205 / 287, D3 896 b16 120 / 189. Goal: kdet >= 1.5x each, >= 3x on Mask R-CNN predict.
"""
import argparse
import datetime
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdet.workflow.peer_benchmark import compare, format_ratio_table  # noqa: E402

# row -> (model, phi, image size, batch) of the GPU table
ROWS = {"retinanet": ("retinanet", 0, 800, 8), "fasterrcnn": ("fasterrcnn", 0, 800, 8),
        "maskrcnn": ("maskrcnn", 0, 800, 8), "efficientdet:0": ("efficientdet", 0, 512, 16),
        "efficientdet:3": ("efficientdet", 3, 896, 16)}


def _overrides(text):
    return dict(item.split("=") for item in text.split(",") if item)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--tasks", default="predict,train",
                        help="train runs in float32 only (the issue's training figures)")
    parser.add_argument("--sizes", default="",
                        help="overrides, e.g. retinanet=640,efficientdet:0=384")
    parser.add_argument("--batches", default="", help="overrides, e.g. maskrcnn=4")
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument("--backend", default="jax", help="kdet's Keras backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="both sides' score threshold (default: each side's own)")
    parser.add_argument("--timeout", type=int, default=900, help="per process, seconds")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args(argv)
    sizes, batches = _overrides(args.sizes), _overrides(args.batches)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    everything, tables = [], []
    for row in args.rows.split(","):
        model, phi, size, batch = ROWS[row]
        size, batch = int(sizes.get(row, size)), int(batches.get(row, batch))
        for precision in args.precisions.split(","):
            tasks = [t for t in args.tasks.split(",") if t == "predict" or precision == "float32"]
            if not tasks:
                continue
            print(f"{row} @ {size} b{batch} {precision}", flush=True)
            rows, _ = compare(model, phi=phi, image_size=size, batches=[batch], tasks=tasks,
                              warmup=args.warmup, repeats=args.repeats, timeout=args.timeout,
                              score_threshold=args.score_threshold, device=args.device,
                              precision=precision, backend=args.backend)
            everything += rows
            tables.append(format_ratio_table(rows))
            print(tables[-1], flush=True)
    header = tables[0].splitlines()[:2] if tables else []
    body = [line for t in tables for line in t.splitlines()[2:]]
    print("\n".join([f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
                     f"device {args.device}, kdet on {args.backend}", "", *header, *body]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(everything, indent=1))
    return everything


if __name__ == "__main__":
    main()
