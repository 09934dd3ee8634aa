"""COCO bbox evaluator speed: kdet vs pycocotools (and faster-coco-eval when installed).

Synthesises a COCO ground truth (random boxes of every size, 80 categories with
a skewed frequency, ~1% crowd) and a result list with jittered, duplicated,
mislabelled and false-positive detections (scores rounded to 3 decimals, so
there are ties), then times each evaluator on the same data and asserts that
all report the same 12 stats as pycocotools. Ratios are computed within the
run; the table is printed and appended to ``benchmarks/RESULTS.md``.

    python benchmarks/eval_speed.py --images 5000 --dets-per-image 20

Timed for pycocotools and faster-coco-eval: ``loadRes`` + ``evaluate`` +
``accumulate`` + ``summarize``; for kdet: ``add_detections`` + ``evaluate``.
Building the ground-truth index (``COCO(...)`` / ``COCOEvaluator(...)``) is timed
separately. Wall and process CPU time are both reported: on a shared machine the
CPU-time ratio is the steadier figure.
"""
import argparse
import contextlib
import copy
import datetime
import io
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdet.metrics.coco import COCOEvaluator  # noqa: E402


def synthesize(num_images, dets_per_image, num_categories=80, seed=0):
    """A COCO ground-truth dict and a result list with realistic mistakes."""
    rng = np.random.default_rng(seed)
    cat_ids = list(range(1, num_categories + 1))
    cat_freq = 1.0 / np.arange(1, num_categories + 1) ** 0.8
    cat_freq /= cat_freq.sum()
    images, anns, dets = [], [], []
    for img_id in range(1, num_images + 1):
        width, height = 640, int(rng.integers(360, 640))
        images.append({"id": img_id, "width": width, "height": height,
                       "file_name": f"{img_id:012d}.jpg"})
        num_gt = int(rng.integers(1, 15))
        side = np.exp(rng.uniform(np.log(6), np.log(400), (num_gt, 2)))  # all area ranges
        w, h = np.minimum(side[:, 0], width - 1), np.minimum(side[:, 1], height - 1)
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        cats = rng.choice(cat_ids, num_gt, p=cat_freq)
        crowd = rng.random(num_gt) < 0.01
        img_gt = []
        for j in range(num_gt):
            box = [round(float(v), 2) for v in (x[j], y[j], w[j], h[j])]
            ann = {"id": len(anns) + 1, "image_id": img_id, "category_id": int(cats[j]),
                   "bbox": box, "area": box[2] * box[3] * (0.8 if crowd[j] else 1.0),
                   "iscrowd": int(crowd[j]), "segmentation": []}
            anns.append(ann)
            img_gt.append(ann)
        for _ in range(dets_per_image):
            kind = rng.random()
            if kind < 0.6:  # jittered ground truth (sometimes a duplicate or mislabelled)
                ann = img_gt[int(rng.integers(len(img_gt)))]
                bx, by, bw, bh = ann["bbox"]
                jit = rng.normal(0, 0.12, 4) * [bw, bh, bw, bh]
                box = [bx + jit[0], by + jit[1], max(bw + jit[2], 1.0), max(bh + jit[3], 1.0)]
                cat = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
            else:  # background false positive
                bw, bh = np.exp(rng.uniform(np.log(6), np.log(300), 2))
                box = [rng.uniform(0, width - bw), rng.uniform(0, height - bh), bw, bh]
                cat = int(rng.choice(cat_ids, p=cat_freq))
            dets.append({"image_id": img_id, "category_id": cat,
                         "bbox": [round(float(v), 2) for v in box],
                         "score": round(float(rng.beta(2, 3) if kind >= 0.6
                                              else rng.beta(4, 2)), 3)})
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


class _Clock:
    """Wall and process CPU seconds since the last ``lap()``."""

    def __init__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self):
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self._wall, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu
        return out


def time_pycocotools(gt, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = copy.deepcopy(gt)
    with _quiet():
        clock = _Clock()
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        load = clock.lap()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        run = clock.lap()
    return load, run, np.asarray(ev.stats)


def time_faster_coco_eval(gt, dets):
    import faster_coco_eval
    from faster_coco_eval import COCO, COCOeval_faster
    gt = copy.deepcopy(gt)
    with _quiet():
        clock = _Clock()
        coco_gt = COCO(gt)
        load = clock.lap()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *a, **k: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        run = clock.lap()
    return load, run, np.asarray(ev.stats[:12]), faster_coco_eval.__version__


def time_kdet(gt, dets):
    clock = _Clock()
    ev = COCOEvaluator(gt, iou_type="bbox")
    load = clock.lap()
    ev.add_detections(dets)
    ev.evaluate()
    run = clock.lap()
    return load, run, ev.stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings per tool")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="only print the table")
    args = parser.parse_args(argv)

    gt, dets = synthesize(args.images, args.dets_per_image)
    print(f"{len(gt['images'])} images, {len(gt['annotations'])} ground truths "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(dets)} detections")

    def best(fn, *fn_args):
        runs = [fn(gt, *fn_args) for _ in range(args.repeats)]
        return min(runs, key=lambda r: r[1][0])

    # Every tool gets its own copy: loadRes writes into the result dicts.
    ref_load, ref_eval, ref_stats = best(lambda g, d: time_pycocotools(g, copy.deepcopy(d)), dets)
    rows = [("pycocotools", ref_load, ref_eval, 0.0)]
    k_load, k_eval, k_stats = best(lambda g, d: time_kdet(g, d), dets)
    k_dev = float(np.abs(k_stats - ref_stats).max())
    assert k_dev <= 1e-12, f"kdet stats differ from pycocotools by {k_dev}"
    rows.append(("kdet", k_load, k_eval, k_dev))
    try:
        f_load, f_eval, f_stats, f_version = best(
            lambda g, d: time_faster_coco_eval(g, copy.deepcopy(d)), dets)
    except ImportError:
        print("faster-coco-eval not installed: skipped")
    else:
        f_dev = float(np.abs(f_stats - ref_stats).max())
        assert f_dev <= 1e-12, f"faster-coco-eval stats differ from pycocotools by {f_dev}"
        rows.append((f"faster-coco-eval {f_version}", f_load, f_eval, f_dev))

    cores = os.cpu_count()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python benchmarks/eval_speed.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    ref_wall, ref_cpu = rows[0][2]
    lines = [
        f"### {datetime.date.today().isoformat()}: {len(gt['images'])} images x "
        f"{args.dets_per_image} dets (bbox), {len(gt['annotations'])} GT, 80 categories",
        "",
        f"Machine: {cores}-core CPU ({platform.processor() or platform.machine()}), "
        f"load average {load_avg:.1f} at the end (shared machine), "
        f"Python {platform.python_version()}, numpy {np.__version__}; "
        f"best of {args.repeats}; command: `{command.strip()}`",
        "",
        "| evaluator | GT index wall (s) | eval wall (s) | eval CPU (s) | speed-up (wall) "
        "| speed-up (CPU) | max abs stat deviation vs pycocotools |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (load_wall, _), (wall, cpu), dev in rows:
        lines.append(f"| {name} | {load_wall:.2f} | {wall:.2f} | {cpu:.2f} | "
                     f"{ref_wall / wall:.1f}x | {ref_cpu / cpu:.1f}x | {dev:.1e} |")
    lines.append("")
    lines.append("eval = loadRes + evaluate + accumulate + summarize (pycocotools, "
                 "faster-coco-eval), add_detections + evaluate (kdet). "
                 f"AP = {ref_stats[0]:.4f}, AP50 = {ref_stats[1]:.4f}, "
                 f"AR100 = {ref_stats[8]:.4f} for all evaluators.")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        path = pathlib.Path(args.results)
        text = path.read_text() if path.exists() else "# Benchmark results\n"
        if "## COCO evaluator speed" not in text:
            text = text.rstrip("\n") + (
                "\n\n## COCO evaluator speed\n\n"
                "`benchmarks/eval_speed.py`: synthetic COCO bbox set, identical stats asserted "
                "(kdet and faster-coco-eval vs pycocotools, 1e-12).\n")
        text = text.rstrip("\n") + "\n\n" + table + "\n"
        path.write_text(text)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
