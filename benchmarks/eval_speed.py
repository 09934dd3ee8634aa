"""COCO evaluator speed: kdet vs pycocotools, faster-coco-eval, hotcoco, ultrafast-pycocotools.

Synthesises a COCO ground truth (random boxes of every size, 80 categories with
a skewed frequency, ~1% crowd; ``segm``: an octagon polygon in each box;
``keypoints``: one person category, 17 keypoints) and a result list with
jittered, duplicated, mislabelled and false-positive detections (scores rounded
to 3 decimals, so there are ties; ``segm``: RLE masks), then times each
evaluator on the same data, in this one process, and asserts that all report
the same stats as the reference (pycocotools; ``--reference hotcoco`` at LVIS
scale, where pycocotools takes hours). Evaluators that are not installed are skipped
with a message (``pip install kdet[bench]`` installs them). Ratios are computed
within the run; the table is printed and appended to ``benchmarks/RESULTS.md``.

    python benchmarks/eval_speed.py --images 5000 --dets-per-image 20
    python benchmarks/eval_speed.py --iou-types bbox,segm,keypoints --repeats 3
    python benchmarks/eval_speed.py --images 20000 --categories 1000 --reference hotcoco

``kdet-numpy`` is kdet with ``KDET_NATIVE=0`` (its numpy fallback, no C kernels);
``kdet-arrays`` is kdet fed columns (``add_detection_arrays``: image ids, category ids,
scores, boxes / keypoints as arrays, built outside the timing), what kdet's own
evaluation loop pays; the peers and ``kdet`` read the result dicts.
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
import gc
import importlib.metadata
import io
import os
import pathlib
import platform
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdet.metrics import native  # noqa: E402
from kdet.metrics.coco import COCOEvaluator  # noqa: E402
from kdet.workflow.peer_benchmark import append_to_results  # noqa: E402

NUM_KEYPOINTS = 17


def _octagon(x, y, w, h):
    """A polygon (flat x, y list) cut from the box's corners: a mask that is not its box."""
    cx, cy = 0.3 * w, 0.3 * h
    points = [(x + cx, y), (x + w - cx, y), (x + w, y + cy), (x + w, y + h - cy),
              (x + w - cx, y + h), (x + cx, y + h), (x, y + h - cy), (x, y + cy)]
    return [round(float(v), 2) for p in points for v in p]


def _rle(polygon, height, width):
    from pycocotools import mask as mask_api
    rle = mask_api.merge(mask_api.frPyObjects([polygon], height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _person_keypoints(rng, x, y, w, h, visible=None):
    kx, ky = rng.uniform(x, x + w, NUM_KEYPOINTS), rng.uniform(y, y + h, NUM_KEYPOINTS)
    v = rng.choice([0, 1, 2], NUM_KEYPOINTS, p=[0.2, 0.2, 0.6]) if visible is None else \
        np.full(NUM_KEYPOINTS, visible)
    kx, ky = np.where(v > 0, kx, 0), np.where(v > 0, ky, 0)
    return [round(float(c), 2) for c in np.stack([kx, ky, v], 1).ravel()], int((v > 0).sum())


def synthesize(num_images, dets_per_image, num_categories=80, seed=0, iou_type="bbox"):
    """A COCO ground-truth dict and a result list with realistic mistakes."""
    rng = np.random.default_rng(seed)
    if iou_type == "keypoints":
        num_categories = 1  # COCO keypoints: person only
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
            if iou_type == "segm":
                polygon = _octagon(*box)
                ann["segmentation"] = _rle(polygon, height, width) if crowd[j] else [polygon]
            if iou_type == "keypoints":
                ann["keypoints"], ann["num_keypoints"] = _person_keypoints(rng, *box)
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
            det = {"image_id": img_id, "category_id": cat,
                   "bbox": [round(float(v), 2) for v in box],
                   "score": round(float(rng.beta(2, 3) if kind >= 0.6
                                        else rng.beta(4, 2)), 3)}
            if iou_type == "segm":
                x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
                det["segmentation"] = _rle(_octagon(x0, y0, min(box[2], width - x0),
                                                    min(box[3], height - y0)), height, width)
                del det["bbox"]  # loadRes derives it from the mask
            if iou_type == "keypoints":
                if kind < 0.6 and ann.get("num_keypoints"):
                    kp = np.asarray(ann["keypoints"], float).reshape(-1, 3)
                    kp[:, :2] += rng.normal(0, 0.05, (NUM_KEYPOINTS, 2)) * [bw, bh]
                    kp[:, 2] = 1
                    det["keypoints"] = [round(float(c), 2) for c in kp.ravel()]
                else:
                    det["keypoints"], _ = _person_keypoints(rng, *det["bbox"], visible=1)
            dets.append(det)
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in cat_ids]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


class _Clock:
    """Wall, process CPU (user + system) and system seconds since the last ``lap()``.
    The system part is mostly page faults on fresh memory, which this kind of shared VM
    charges very unevenly (the same run: 0.01 s or 0.4 s)."""

    def __init__(self):
        self._last = self._now()

    @staticmethod
    def _now():
        times = os.times()
        return time.perf_counter(), time.process_time(), times.system

    def lap(self):
        now = self._now()
        out = tuple(b - a for a, b in zip(self._last, now))
        self._last = now
        return out


def _cocoapi(make_gt, make_eval):
    """A timer for an evaluator with pycocotools' API (COCO, loadRes, COCOeval)."""
    def run(gt, dets, iou_type):
        gt = copy.deepcopy(gt)
        with _quiet():
            clock = _Clock()
            coco_gt = make_gt(gt)
            load = clock.lap()
            coco_dt = coco_gt.loadRes(dets)
            ev = make_eval(coco_gt, coco_dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            run = clock.lap()
        return load, run, np.asarray(ev.stats[:len(ev.stats)], float)
    return run


def _pycocotools_gt(gt):
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    return coco


def _pycocotools_eval(coco_gt, coco_dt, iou_type):
    from pycocotools.cocoeval import COCOeval
    return COCOeval(coco_gt, coco_dt, iou_type)


def _faster_gt(gt):
    from faster_coco_eval import COCO
    return COCO(gt)


def _faster_eval(coco_gt, coco_dt, iou_type):
    from faster_coco_eval import COCOeval_faster
    return COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None)


def _hotcoco_gt(gt):
    from hotcoco import COCO
    return COCO(gt)


def _hotcoco_eval(coco_gt, coco_dt, iou_type):
    from hotcoco import COCOeval
    return COCOeval(coco_gt, coco_dt, iou_type)


def _ultrafast_gt(gt):
    from ultrafast_pycocotools.coco import COCO
    return COCO(gt)


def _ultrafast_eval(coco_gt, coco_dt, iou_type):
    from ultrafast_pycocotools.cocoeval import COCOeval
    return COCOeval(coco_gt, coco_dt, iou_type)


def time_kdet(gt, dets, iou_type):
    clock = _Clock()
    ev = COCOEvaluator(gt, iou_type=iou_type)
    load = clock.lap()
    ev.add_detections(dets)
    ev.evaluate()
    run = clock.lap()
    return load, run, ev.stats


def detection_columns(dets, iou_type):
    """The result list as the columns ``COCOEvaluator.add_detection_arrays`` takes (what a
    predict loop holds; built outside the timing)."""
    columns = {"image_ids": np.array([d["image_id"] for d in dets], np.int64),
               "category_ids": np.array([d["category_id"] for d in dets], np.int64),
               "scores": np.array([d["score"] for d in dets], np.float64)}
    if iou_type == "bbox" or all("bbox" in d for d in dets):  # keypoints: areas from boxes
        columns["boxes"] = np.array([d["bbox"] for d in dets], np.float64)
    if iou_type == "keypoints":
        columns["keypoints"] = np.array([d["keypoints"] for d in dets], np.float64)
    return columns


def time_kdet_arrays(gt, dets, iou_type):
    """kdet from columns (``add_detection_arrays``): what kdet's own evaluation loop pays.
    segm has no columnar input (masks are RLE strings): timed from the dicts."""
    if iou_type == "segm":
        return time_kdet(gt, dets, iou_type)
    columns = detection_columns(dets, iou_type)
    clock = _Clock()
    ev = COCOEvaluator(gt, iou_type=iou_type)
    load = clock.lap()
    ev.add_detection_arrays(**columns)
    ev.evaluate()
    run = clock.lap()
    return load, run, ev.stats


def time_kdet_numpy(gt, dets, iou_type):
    """kdet without its C kernels (``KDET_NATIVE=0``): the numpy fallback."""
    previous = os.environ.get("KDET_NATIVE")
    os.environ["KDET_NATIVE"] = "0"
    try:
        return time_kdet(gt, dets, iou_type)
    finally:
        if previous is None:
            del os.environ["KDET_NATIVE"]
        else:
            os.environ["KDET_NATIVE"] = previous


# name, distribution (for the version), module (installed?), timer
EVALUATORS = (
    ("pycocotools", "pycocotools", "pycocotools", _cocoapi(_pycocotools_gt, _pycocotools_eval)),
    ("kdet", None, "kdet", time_kdet),
    ("kdet-arrays", None, "kdet", time_kdet_arrays),
    ("kdet-numpy", None, "kdet", time_kdet_numpy),
    ("faster-coco-eval", "faster-coco-eval", "faster_coco_eval",
     _cocoapi(_faster_gt, _faster_eval)),
    ("hotcoco", "hotcoco", "hotcoco", _cocoapi(_hotcoco_gt, _hotcoco_eval)),
    ("ultrafast-pycocotools", "ultrafast-pycocotools", "ultrafast_pycocotools",
     _cocoapi(_ultrafast_gt, _ultrafast_eval)),
)


def _version(distribution):
    if distribution is None:
        return ""
    try:
        return " " + importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def run_one(iou_type, args):
    """Time every installed evaluator on one synthetic set; the markdown section."""
    import importlib.util
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gt, dets = synthesize(args.images, args.dets_per_image, args.categories,
                          iou_type=iou_type)
    print(f"{iou_type}: {len(gt['images'])} images, {len(gt['annotations'])} ground truths "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(dets)} detections, "
          f"{len(gt['categories'])} categories", flush=True)
    only = set(args.evaluators.split(",")) if args.evaluators else None
    rows, ref_stats = [], None
    reference = args.reference
    evaluators = []
    for entry in sorted(EVALUATORS, key=lambda e: e[0] != reference):  # the reference first
        name, module = entry[0], entry[2]
        if only and name not in only and name != reference:
            continue
        if importlib.util.find_spec(module) is None:
            print(f"  {name}: not installed, skipped", flush=True)
            if name == reference:
                raise SystemExit(f"the reference {reference} is not installed")
            continue
        evaluators.append(entry)
    # Repeats in rounds (every tool once, then again): the state one tool leaves (freed
    # memory, garbage) falls on each of the others in turn, not always on the next one.
    runs = {entry[0]: [] for entry in evaluators}
    for _ in range(args.repeats):
        for name, _, _, timer in evaluators:
            # every tool gets its own copy: loadRes writes into the result dicts
            copied = copy.deepcopy(dets)
            gc.collect()
            runs[name].append(timer(gt, copied, iou_type))
            del copied
    for name, distribution, _, _ in evaluators:
        load, run, stats = sorted(runs[name], key=lambda r: r[1][1])[len(runs[name]) // 2]
        if ref_stats is None:  # median CPU above; the reference is first
            ref_stats = stats
        dev = float(np.abs(stats[:len(ref_stats)] - ref_stats).max())
        assert dev <= 1e-12, f"{name} {iou_type} stats differ from {reference} by {dev}"
        if name in ("kdet", "kdet-arrays"):
            name += " (C kernels)" if native.library() is not None else " (numpy: no C kernels)"
        rows.append((name + _version(distribution), load, run, dev))
        print(f"  {rows[-1][0]}: eval {run[0]:.2f} s wall, {run[1]:.2f} s CPU "
              f"({run[2]:.2f} s system)", flush=True)

    cores = os.cpu_count()
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    command = "python benchmarks/eval_speed.py " + " ".join(args.argv)
    ref_wall, ref_cpu = rows[0][2][:2]
    k_cpu = next(r[2][1] for r in rows if r[0].startswith("kdet "))
    lines = [
        f"### {datetime.date.today().isoformat()}: {len(gt['images'])} images x "
        f"{args.dets_per_image} dets ({iou_type}), {len(gt['annotations'])} GT, "
        f"{len(gt['categories'])} categories",
        "",
        f"Machine: {cores}-core CPU ({platform.processor() or platform.machine()}), "
        f"load average {load_start:.1f} at the start, {load_avg:.1f} at the end (shared "
        "machine), "
        f"Python {platform.python_version()}, numpy {np.__version__}; one process; "
        f"median CPU time of {args.repeats} (in rounds); command: `{command.strip()}`",
        "",
        "| evaluator | GT index wall (s) | eval wall (s) | eval CPU (s) | of which system (s) "
        "| speed-up vs "
        f"{reference} (wall) | speed-up vs {reference} (CPU) | kdet's CPU advantage "
        f"| max abs stat deviation vs {reference} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, load, (wall, cpu, system), dev in rows:
        lines.append(f"| {name} | {load[0]:.2f} | {wall:.2f} | {cpu:.2f} | {system:.2f} | "
                     f"{ref_wall / wall:.1f}x | {ref_cpu / cpu:.1f}x | {cpu / k_cpu:.2f}x | "
                     f"{dev:.1e} |")
    lines.append("")
    lines.append("eval = loadRes + evaluate + accumulate + summarize (the pycocotools API), "
                 "add_detections + evaluate (kdet; kdet-numpy: the same without the C "
                 "kernels, KDET_NATIVE=0); kdet's CPU advantage = the evaluator's "
                 "CPU time / kdet's. "
                 f"AP = {ref_stats[0]:.4f}, AP50 = {ref_stats[1]:.4f} for all evaluators.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=20)
    parser.add_argument("--categories", type=int, default=80,
                        help="bbox/segm categories (LVIS scale: 1000+; keypoints: always 1)")
    parser.add_argument("--iou-types", default="bbox", help="comma-separated: bbox,segm,keypoints")
    parser.add_argument("--evaluators", default="",
                        help="comma-separated subset (the reference always runs)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timings per tool; the run of median CPU time is reported")
    parser.add_argument("--reference", default="pycocotools",
                        help="evaluator whose stats all must equal (always runs); hotcoco "
                             "at LVIS scale, where pycocotools takes hours")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    tables = [run_one(iou_type, args) for iou_type in args.iou_types.split(",")]
    table = "\n\n".join(tables)
    print(table)
    if not args.no_write:
        path = args.results
        append_to_results(path, "COCO evaluator speed", table, intro=(
            "`benchmarks/eval_speed.py`: synthetic COCO sets, identical stats asserted "
            "(every evaluator vs the reference, 1e-12)."))
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
