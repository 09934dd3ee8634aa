"""Training-step and predict throughput of EfficientDet, kdet vs effdet (timm/PyTorch).

For every (model, image size, batch size) this measures, each in its own
process (a backend is chosen once per process, and torch must not share a
process with TensorFlow):

* kdet, TensorFlow graph (``jit_compile=False``), TensorFlow XLA
  (``jit_compile=True``) and JAX (``jax.jit``, when jax is installed):
  ``train_on_batch`` steps/s and ``predict_on_batch`` (network + decode + NMS)
  images/s;
* the peer, effdet ``tf_efficientdet_*`` (random init, no download):
  ``DetBenchTrain`` step and ``DetBenchPredict`` (``torch.no_grad``).

Each figure is the median of ``--repeats`` timed calls after ``--warmup``
untimed ones (the first call traces/compiles; its time is reported
separately). Wall time and process CPU time are both recorded: on a machine
shared with other jobs wall time is inflated, CPU time much less so.

    python benchmarks/train_throughput.py                       # the default grid
    python benchmarks/train_throughput.py --models lite0:128 --batches 4 \\
        --runtimes tf-graph,tf-xla,jax,effdet --json out.json
"""
import argparse
import json
import os
import subprocess
import sys
import time

RUNTIMES = ("tf-graph", "tf-xla", "jax", "effdet")
EFFDET_NAMES = {"d0": "tf_efficientdet_d0", "lite0": "tf_efficientdet_lite0"}
NUM_CLASSES = 90


def synthetic_batch(batch, size, seed=0, max_boxes=8):
    """Random images (0-255) and 1..max_boxes random boxes per image (xyxy, label -1 padding)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    boxes = np.zeros((batch, max_boxes, 4), "float32")
    labels = np.full((batch, max_boxes), -1, "int32")
    for b in range(batch):
        n = int(rng.integers(1, max_boxes + 1))
        wh = rng.uniform(0.05, 0.5, (n, 2)) * size
        xy = rng.uniform(0, 1, (n, 2)) * (size - wh)
        boxes[b, :n] = np.concatenate([xy, xy + wh], 1)
        labels[b, :n] = rng.integers(0, NUM_CLASSES, n)
    return images, boxes, labels


def timed(fn, warmup, repeats):
    """(first-call wall s, first-call cpu s, median wall s, median cpu s) of ``fn()``:
    the first call, ``warmup`` more, then ``repeats`` timed calls."""
    from kdet.workflow.peer_benchmark import time_calls

    f = time_calls(fn, warmup=warmup + 1, repeats=repeats)
    return f["first_wall_s"], f["first_cpu_s"], f["wall_s"], f["cpu_s"]


# ------------------------------------------------------------------ workers
def run_kdet(runtime, variant, size, batch, warmup, repeats, tasks):
    import keras

    import kdet

    images, boxes, labels = synthetic_batch(batch, size)
    targets = {"boxes": boxes, "labels": labels}
    model = kdet.models.EfficientDet(phi=variant, num_classes=NUM_CLASSES, image_size=size)
    rows = []
    if "train" in tasks:
        model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9),
                      jit_compile=runtime in ("tf-xla", "jax"))
        rows.append(("train",) + timed(lambda: model.train_on_batch(images, targets),
                                       warmup, repeats))
    if "predict" in tasks:
        if "train" not in tasks:
            model.compile(optimizer="sgd", jit_compile=runtime in ("tf-xla", "jax"))

        def predict():
            out = model.predict_on_batch(images)
            keras.ops.convert_to_numpy(out["boxes"])

        rows.append(("predict",) + timed(predict, warmup, repeats))
    return rows


def run_effdet(variant, size, batch, warmup, repeats, tasks):
    import torch
    from effdet import create_model

    images, boxes, labels = synthetic_batch(batch, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    # effdet normalises in its data loader, not in the model; do it here for the same input.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    rows = []
    common = dict(num_classes=NUM_CLASSES, pretrained=False, pretrained_backbone=False,
                  image_size=(size, size))
    if "train" in tasks:
        bench = create_model(EFFDET_NAMES[variant], bench_task="train", bench_labeler=True,
                             **common).train()
        optimizer = torch.optim.SGD(bench.parameters(), lr=1e-3, momentum=0.9)
        target = {"bbox": torch.from_numpy(boxes[..., [1, 0, 3, 2]]),  # effdet: yxyx
                  "cls": torch.from_numpy(labels + 1).float().masked_fill(
                      torch.from_numpy(labels < 0), -1)}

        def step():
            optimizer.zero_grad()
            loss = bench((x - mean) / std, target)["loss"]
            loss.backward()
            optimizer.step()

        try:
            rows.append(("train",) + timed(step, warmup, repeats))
        except ValueError as e:  # torch BN refuses 1 value per channel (batch 1, 1x1 P7)
            print(f"effdet train {variant}@{size} b{batch}: {e}", file=sys.stderr)
    if "predict" in tasks:
        bench = create_model(EFFDET_NAMES[variant], bench_task="predict", **common).eval()

        def predict():
            with torch.no_grad():
                bench((x - mean) / std)

        rows.append(("predict",) + timed(predict, warmup, repeats))
    return rows


def worker(args):
    """One (runtime, model, size, batch) in this process; prints one JSON line per task."""
    variant, size = args.worker_model.split(":")
    size, batch, tasks = int(size), int(args.worker_batch), args.tasks.split(",")
    threads = args.threads or os.cpu_count() or 1
    if args.worker_runtime == "effdet":
        import torch
        torch.set_num_threads(threads)
        rows = run_effdet(variant, size, batch, args.warmup, args.repeats, tasks)
    else:
        if args.worker_runtime.startswith("tf") and args.threads:
            import tensorflow as tf
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        rows = run_kdet(args.worker_runtime, variant, size, batch, args.warmup, args.repeats,
                        tasks)
    for task, first_wall, first_cpu, wall, cpu in rows:
        print("RESULT " + json.dumps({
            "runtime": args.worker_runtime, "model": variant, "size": size, "batch": batch,
            "task": task, "first_call_wall_s": first_wall, "first_call_cpu_s": first_cpu,
            "wall_s": wall, "cpu_s": cpu, "images_per_s": batch / wall,
            "cpu_s_per_image": cpu / batch}), flush=True)


# ------------------------------------------------------------------ driver
def launch(runtime, model, batch, args):
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax" if runtime == "jax" else "tensorflow"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if runtime == "jax" and args.threads:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                            + ("true" if args.threads > 1 else "false")
                            + f" intra_op_parallelism_threads={args.threads}").strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-runtime", runtime,
           "--worker-model", model, "--worker-batch", str(batch), "--tasks", args.tasks,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--threads", str(args.threads or 0)]
    started = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"  {runtime} {model} b{batch}: timed out after {args.timeout} s", flush=True)
        return []
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(rows) < len(args.tasks.split(",")):
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-3:])
        print(f"  {runtime} {model} b{batch}: failed (exit {proc.returncode}):\n{tail}",
              flush=True)
    for row in rows:
        print(f"  {runtime:8s} {model:10s} b{batch} {row['task']:7s} "
              f"{row['images_per_s']:7.2f} img/s  {row['cpu_s_per_image']:.3f} cpu-s/img  "
              f"(first call {row['first_call_wall_s']:.0f} s wall, "
              f"{row['first_call_cpu_s']:.0f} s cpu; process {time.time() - started:.0f} s)",
              flush=True)
    return rows


def markdown(rows):
    """One table: a line per (model, size, batch, task), a column per runtime, ratios to effdet.

    Ratios compare kdet's fastest runtime with effdet: by wall-clock images/s,
    and by CPU seconds per image (the steadier figure on a shared machine).
    """
    keys = sorted({(r["model"], r["size"], r["batch"], r["task"]) for r in rows},
                  key=lambda k: (k[3], k[0], k[1], k[2]))
    runtimes = [rt for rt in RUNTIMES if any(r["runtime"] == rt for r in rows)]
    index = {(r["runtime"], r["model"], r["size"], r["batch"], r["task"]): r for r in rows}
    head = ("| task | model @ size | batch | " + " | ".join(
        f"{rt} img/s (cpu-s/img)" for rt in runtimes)
        + " | kdet / effdet, wall | kdet / effdet, CPU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model, size, batch, task in keys:
        cells, fastest, cheapest = [], None, None
        for rt in runtimes:
            r = index.get((rt, model, size, batch, task))
            if r is None:
                cells.append("-")
                continue
            cells.append(f"{r['images_per_s']:.2f} ({r['cpu_s_per_image']:.3f})")
            if rt != "effdet":
                fastest = max(fastest or 0.0, r["images_per_s"])
                cheapest = min(cheapest or float("inf"), r["cpu_s_per_image"])
        peer = index.get(("effdet", model, size, batch, task))
        wall = f"{fastest / peer['images_per_s']:.2f}x" if fastest and peer else "-"
        cpu = f"{peer['cpu_s_per_image'] / cheapest:.2f}x" if cheapest and peer else "-"
        lines.append(f"| {task} | {model} @ {size} | {batch} | " + " | ".join(cells)
                     + f" | {wall} | {cpu} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="d0:512,lite0:320,d0:256,lite0:128",
                        help="comma-separated variant:size")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--runtimes", default="tf-graph,effdet",
                        help=f"comma-separated, of {RUNTIMES} (XLA and JAX compile for "
                             "minutes on a CPU: ask for them on small sizes)")
    parser.add_argument("--tasks", default="train,predict")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=3600, help="per process, seconds")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per runtime (0: its default, all cores). On a machine "
                             "shared with other jobs use 1: spinning thread pools (OpenMP, "
                             "Eigen) waste most of their time waiting for descheduled peers")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--table-from", help="only print the table of a --json file")
    parser.add_argument("--worker-runtime", help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_runtime:
        return worker(args)
    if args.table_from:
        rows = []
        for path in args.table_from.split(","):
            with open(path) as f:
                rows += json.load(f)
        print(markdown(rows))
        return rows

    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        parser.error(f"unknown runtimes {sorted(unknown)}; choose from {RUNTIMES}")
    available = []
    for runtime in runtimes:
        module = {"jax": "jax", "effdet": "effdet"}.get(runtime)
        if module and subprocess.run([sys.executable, "-c", f"import {module}"],
                                     capture_output=True).returncode != 0:
            print(f"{runtime}: {module} is not installed; skipped")
            continue
        available.append(runtime)
    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()}; "
          f"threads per runtime: {args.threads or 'default'}")
    rows = []
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for runtime in available:
                rows += launch(runtime, model, batch, args)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
