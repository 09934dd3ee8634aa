"""Every row of issue #13's CPU table from one command: kdet vs its PyTorch peer.

Runs :func:`kdet.workflow.peer_benchmark.compare` (what ``kdet bench --compare``
runs) for EfficientDet D0 and Lite0 vs effdet, RetinaNet, Faster R-CNN and
Mask R-CNN vs torchvision, at each batch size, predict and train, each side in
its own process with the same threads; prints the tables and appends machine,
versions, command and tables to ``benchmarks/RESULTS.md``.

    python benchmarks/peer_speed.py                                  # the whole grid
    python benchmarks/peer_speed.py --rows retinanet,maskrcnn --batches 1 --tasks predict
    python benchmarks/peer_speed.py --rows efficientdet:lite0 --sizes lite0=256 --no-write
"""
import argparse
import datetime
import importlib.metadata
import os
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdet.workflow.peer_benchmark import (  # noqa: E402
    append_to_results, compare, image_size_of)

ROWS = "efficientdet:0,efficientdet:lite0,retinanet,fasterrcnn,maskrcnn"
PACKAGES = ("tensorflow", "keras", "torch", "torchvision", "timm", "effdet", "numpy")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, {cpu}, load average {load:.1f}"


def versions():
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=ROWS,
                        help="comma-separated model[:phi] (efficientdet:0, retinanet, ...)")
    parser.add_argument("--sizes", default="",
                        help="image-size overrides, e.g. 0=512,lite0=320,retinanet=640")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tasks", default="predict,train")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per side (1: the steady figure on a shared machine)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="both sides' detection score threshold (RetinaNet, R-CNNs); "
                             "0: D detections each, the load of a busy image (default: "
                             "each side's own, 0.05)")
    parser.add_argument("--timeout", type=int, default=3600, help="per process, seconds")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="only print the tables")
    args = parser.parse_args(argv)
    sizes = dict(item.split("=") for item in args.sizes.split(",") if item)
    started = machine()
    tables = []
    for row in args.rows.split(","):
        model, _, phi = row.partition(":")
        phi = (int(phi) if phi.isdigit() else phi) if phi else 0
        size = image_size_of(model, phi, sizes.get(str(phi) if model == "efficientdet"
                                                   else model))
        print(f"{row} @ {size}", flush=True)
        _, table = compare(model, phi=phi, image_size=size,
                           batches=[int(b) for b in args.batches.split(",")],
                           tasks=args.tasks.split(","), threads=args.threads,
                           warmup=args.warmup, repeats=args.repeats, timeout=args.timeout,
                           score_threshold=args.score_threshold)
        print(table, flush=True)
        tables.append(table)
    command = "python benchmarks/peer_speed.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    threshold = "each side's default" if args.score_threshold is None else args.score_threshold
    header = tables[0].splitlines()[:2]
    body = [line for t in tables for line in t.splitlines()[2:]]
    text = "\n".join([
        f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: "
        f"kdet vs PyTorch peers, {args.threads} thread(s) per side",
        "", f"Machine: {started} at the start, {machine().split(', ')[-1]} at the end; "
        f"{versions()}; random init, warm-up {args.warmup}, median of {args.repeats}, "
        f"score threshold {threshold}.",
        "", f"Command: `{command.strip()}`", "", *header, *body, ""])
    print(text)
    if not args.no_write:
        path = args.results
        append_to_results(path, "kdet vs PyTorch peers (issue #13)", text, intro=(
            "`benchmarks/peer_speed.py` (`kdet bench --compare`): each side in its own "
            "process, same synthetic batch (4 boxes per image, box-shaped masks), same "
            "input size and threads; predict = whole detector with decoding, NMS and "
            "(Mask R-CNN) mask pasting; train = one SGD step on that batch. Ratio = peer "
            "CPU s per image / kdet's (> 1: kdet cheaper); wall ratio = kdet img/s / peer's."))
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
