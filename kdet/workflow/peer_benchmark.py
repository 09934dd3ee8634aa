"""kdet next to the detector a user would pick instead: ``kdet bench --compare PEER``.

    kdet bench --model efficientdet --phi lite0 --compare effdet
    kdet bench --model retinanet --compare torchvision --bench-batches 1,8
    kdet bench --model maskrcnn --compare torchvision --image-size 512 --bench-train false

Each side runs in its own subprocess (a backend is chosen once per process, and
torch must be imported before TensorFlow when both share one) on the same
synthetic batch: same input size, same thread count (``torch.set_num_threads``;
TensorFlow's intra- and inter-op pools; ``OMP_NUM_THREADS``), random init.
Per (side, batch size) the process builds the model once, then times

* ``predict``: the whole detector, decoding and NMS included (kdet
  ``predict_on_batch`` and the outputs brought to numpy; torchvision
  ``model.eval()`` under ``torch.no_grad`` with its postprocess, i.e. box
  decoding, NMS and Mask R-CNN's mask pasting into the image; effdet
  ``DetBenchPredict``);
* ``train``: one SGD (momentum 0.9) step on the same fixed batch with targets
  (kdet ``train_on_batch``; torchvision / effdet ``loss.backward()`` +
  ``optimizer.step()``),

each after ``warmup`` untimed calls (tracing), as the median over
``bench_steps`` calls of wall time and of the process's CPU time
(``time.process_time``). The ratio column is peer CPU seconds per image over
kdet's (> 1: kdet cheaper); on a machine shared with other jobs CPU time with
one thread is the steady figure, wall time is not.

Peers: effdet (timm, PyTorch) for EfficientDet, torchvision for RetinaNet,
Faster R-CNN and Mask R-CNN (``min_size = max_size = image size``, so both
sides see the same square input). A peer that is not installed is skipped with
a message and only kdet is measured.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

# the peer of each model and the peer's class count for kdet's ``num_classes``
PEERS = {"efficientdet": "effdet", "retinanet": "torchvision", "fasterrcnn": "torchvision",
         "maskrcnn": "torchvision"}
DEFAULT_SIZES = {"retinanet": 640, "fasterrcnn": 800, "maskrcnn": 800}
EFFDET_ARCH = {str(p): f"tf_efficientdet_{'' if str(p).startswith('lite') else 'd'}{p}"
               for p in (0, 1, 2, 3, 4, 5, 6, 7, "lite0", "lite1", "lite2", "lite3", "lite4")}
TORCHVISION_BUILDERS = {"retinanet": "retinanet_resnet50_fpn",
                        "fasterrcnn": "fasterrcnn_resnet50_fpn",
                        "maskrcnn": "maskrcnn_resnet50_fpn"}
NUM_CLASSES = 90  # foreground classes (COCO's 80 in 90 ids): torchvision R-CNN 91, effdet 90
OBJECTS_PER_IMAGE = 4


def append_to_results(path, heading, text, intro=""):
    """Add ``text`` at the end of the ``## heading...`` section of the results file
    ``path`` (the first section whose title starts with ``heading``), or, when there
    is none, a new section at the end with ``intro`` under its title. Every benchmark
    script records its table this way."""
    path = pathlib.Path(path)
    lines = (path.read_text() if path.exists() else "# Benchmark results\n").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"## {heading}")), None)
    block = [""] + text.strip("\n").splitlines()
    if start is None:
        lines += ["", f"## {heading}"] + ([""] + intro.strip("\n").splitlines() if intro else [])
        end = len(lines)
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1  # before the blank lines that close the section
    lines[end:end] = block
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def peer_installed(peer):
    return importlib.util.find_spec(peer) is not None


def image_size_of(model, phi, image_size=None):
    """The square input size both sides get: ``image_size``, else the model's default."""
    if image_size:
        return int(image_size)
    if model == "efficientdet":
        from kdet.models.efficientdet import EFFICIENTDET_CONFIGS
        key = str(phi) if str(phi).startswith("lite") else f"d{phi}"
        return int(EFFICIENTDET_CONFIGS[key]["image_size"])
    return DEFAULT_SIZES[model]


def synthetic_batch(batch, size, with_masks=False, seed=0):
    """Images 0-255 [B, S, S, 3], xyxy boxes and labels (0-based) [B, N], box-shaped masks."""
    import numpy as np
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    wh = rng.uniform(0.1, 0.4, (batch, OBJECTS_PER_IMAGE, 2)) * size
    xy = rng.uniform(0, 1, (batch, OBJECTS_PER_IMAGE, 2)) * (size - wh)
    boxes = np.concatenate([xy, xy + wh], -1).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, (batch, OBJECTS_PER_IMAGE)).astype("int32")
    targets = {"boxes": boxes, "labels": labels}
    if with_masks:
        masks = np.zeros((batch, OBJECTS_PER_IMAGE, size, size), "uint8")
        for b in range(batch):
            for n, (x1, y1, x2, y2) in enumerate(boxes[b].astype(int)):
                masks[b, n, y1:y2, x1:x2] = 1
        targets["masks"] = masks
    return images, targets


def time_calls(fn, warmup, repeats):
    """First call (wall, cpu), then the medians over ``repeats`` calls after ``warmup`` more."""
    import numpy as np
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    first = (time.perf_counter() - w0, time.process_time() - c0)
    for _ in range(max(warmup - 1, 0)):  # the first call is a warm-up call too
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {"first_wall_s": first[0], "first_cpu_s": first[1],
            "wall_s": float(np.median(walls)), "cpu_s": float(np.median(cpus))}


# ------------------------------------------------------------------ the two sides
def _kdet_steps(job, images, targets):
    import keras

    import kdet
    name, size = job["model"], job["image_size"]
    keras.utils.set_random_seed(0)
    if job.get("precision", "float32") != "float32":
        # weights stay float32, compute in bfloat16/float16 (Keras mixed precision)
        keras.mixed_precision.set_global_policy(f"mixed_{job['precision']}")
    threshold = job.get("score_threshold")
    if name == "efficientdet":  # effdet has no score threshold: kdet's default is 0 too
        model = kdet.models.EfficientDet(phi=job["phi"], num_classes=NUM_CLASSES,
                                         image_size=size)
    elif name == "retinanet":
        model = kdet.models.RetinaNet(
            num_classes=NUM_CLASSES + 1, image_size=size,
            **({} if threshold is None else {"score_threshold": threshold}))
    else:
        cls = kdet.models.MaskRCNN if name == "maskrcnn" else kdet.models.FasterRCNN
        model = cls(num_classes=NUM_CLASSES, image_size=size,
                    **({} if threshold is None else {"box_score_thresh": threshold}))
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), jit_compile=False)

    def predict():
        # numpy arrays on every backend, as a user gets them (another convert_to_numpy
        # would copy every output once more: 2 GB of Mask R-CNN masks at batch 8, 800 px)
        model.predict_on_batch(images)

    return {"predict": predict, "train": lambda: model.train_on_batch(images, targets)}


def _torch_device(job):
    """``(device, autocast context factory, finish)`` of a PyTorch side.

    ``job["device"] == "gpu"`` runs on CUDA and ``finish`` waits for the queued kernels
    (a step is timed to its end, as kdet's calls that bring results to the host);
    ``precision`` bfloat16 / float16 is torch AMP (``torch.autocast``), the counterpart
    of Keras' ``mixed_*`` policies.
    """
    import contextlib

    import torch
    device = "cuda" if job.get("device", "cpu") == "gpu" else "cpu"
    precision = job.get("precision", "float32")
    if precision == "float32":
        autocast = contextlib.nullcontext
    else:
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[precision]

        def autocast():
            return torch.autocast(device, dtype=dtype)
    finish = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return device, autocast, finish


def _torchvision_steps(job, images, targets):
    import torch
    import torchvision
    name, size = job["model"], job["image_size"]
    torch.manual_seed(0)
    # torchvision's RetinaNet has no background class; its R-CNNs do (label 0)
    classes = NUM_CLASSES + 1
    threshold = {} if job.get("score_threshold") is None else {
        "score_thresh" if name == "retinanet" else "box_score_thresh": job["score_threshold"]}
    model = getattr(torchvision.models.detection, TORCHVISION_BUILDERS[name])(
        weights=None, weights_backbone=None, num_classes=classes, min_size=size, max_size=size,
        **threshold)
    device, autocast, finish = _torch_device(job)
    model.to(device)
    x = [(torch.from_numpy(im).permute(2, 0, 1).contiguous() / 255.0).to(device)
         for im in images]
    y = [{"boxes": torch.from_numpy(targets["boxes"][b]).to(device),
          "labels": torch.from_numpy(targets["labels"][b] + 1).long().to(device),
          **({"masks": torch.from_numpy(targets["masks"][b]).to(device)}
             if "masks" in targets else {})}
         for b in range(len(images))]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def predict():
        model.eval()
        with torch.no_grad(), autocast():
            model(x)
        finish()

    def train():
        model.train()
        optimizer.zero_grad()
        with autocast():
            loss = sum(model(x, y).values())
        loss.backward()
        optimizer.step()
        finish()

    return {"predict": predict, "train": train}


def _effdet_steps(job, images, targets):
    import torch
    from effdet import create_model
    size = job["image_size"]
    torch.manual_seed(0)
    # effdet normalises in its data loader, not in the model: do it here, inside the timing
    device, autocast, finish = _torch_device(job)
    mean = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255).to(device)
    std = (torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255).to(device)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    common = dict(num_classes=NUM_CLASSES, pretrained=False, pretrained_backbone=False,
                  image_size=(size, size))
    arch = EFFDET_ARCH[str(job["phi"])]
    predictor = create_model(arch, bench_task="predict", **common).eval().to(device)
    trainer = create_model(arch, bench_task="train", bench_labeler=True,
                           **common).train().to(device)
    optimizer = torch.optim.SGD(trainer.parameters(), lr=1e-3, momentum=0.9)
    target = {"bbox": torch.from_numpy(targets["boxes"][..., [1, 0, 3, 2]]).to(device),  # yxyx
              "cls": torch.from_numpy(targets["labels"] + 1).float().to(device)}

    def predict():
        with torch.no_grad(), autocast():
            predictor((x - mean) / std)
        finish()

    def train():
        optimizer.zero_grad()
        with autocast():
            loss = trainer((x - mean) / std, target)["loss"]
        loss.backward()
        optimizer.step()
        finish()

    return {"predict": predict, "train": train}


def run_job(job):
    """Measure one (side, model, size, batch) in this process; a list of row dicts."""
    threads = int(job["threads"])
    if job["side"] == "kdet":
        if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
            import tensorflow as tf  # before any op runs: the pools are sized once
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        make = _kdet_steps
    else:
        import torch  # before TensorFlow (kdet's numpy helpers do not import it)
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)
        make = _effdet_steps if job["side"] == "effdet" else _torchvision_steps
    images, targets = synthetic_batch(job["batch"], job["image_size"],
                                      with_masks=job["model"] == "maskrcnn")
    steps = make(job, images, targets)
    rows = []
    for task in job["tasks"]:
        try:
            figures = time_calls(steps[task], job["warmup"], job["repeats"])
        except (ValueError, RuntimeError) as error:  # e.g. torch BN on a 1x1 map at batch 1
            rows.append(dict(job, task=task, error=f"{type(error).__name__}: {error}"[:300]))
            continue
        rows.append(dict(job, task=task, **figures,
                         cpu_s_per_image=figures["cpu_s"] / job["batch"],
                         images_per_s=job["batch"] / figures["wall_s"]))
    return rows


# ------------------------------------------------------------------ the driver
def _launch(job, timeout):
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]),
               PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if job["side"] == "kdet":
        env["KERAS_BACKEND"] = job.get("backend") or env.get("KERAS_BACKEND", "tensorflow")
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "kdet.workflow.peer_benchmark",
                               json.dumps(job)], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return [dict(job, task=t, error=f"timed out after {timeout} s") for t in job["tasks"]]
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
            if line.startswith("RESULT ")]
    if not rows:
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        rows = [dict(job, task=t, error=f"exit {proc.returncode}: {tail}"[:400])
                for t in job["tasks"]]
    for row in rows:
        row["process_wall_s"] = time.perf_counter() - started
    return rows


def compare(model, *, peer=None, phi=0, image_size=None, batches=(1, 8),
            tasks=("predict", "train"), threads=1, warmup=2, repeats=5, timeout=3600,
            score_threshold=None, device="cpu", precision="float32", backend=None,
            verbose=True):
    """Measure kdet and its peer side by side; ``(rows, table text)``.

    ``peer``: ``"effdet"``, ``"torchvision"``, or None for the model's own
    (:data:`PEERS`). A peer that is not installed is skipped with a message.

    ``score_threshold``: both sides' detection score threshold (RetinaNet and
    the R-CNNs; None: each side's default, 0.05). A random-init model scores
    every candidate ~1/classes, below 0.05: torchvision then finds nothing and
    skips its mask head and mask pasting, while kdet's static-shape graph runs
    them on its ``D`` padded rows. ``0.0`` gives both sides ``D`` detections,
    the load of a busy image under a trained model.

    ``device``: ``"cpu"`` or ``"gpu"`` (PyTorch on CUDA; kdet on the backend's
    accelerator: JAX or TensorFlow place it there themselves); ``precision``:
    ``"float32"``, ``"bfloat16"`` or ``"float16"`` (Keras ``mixed_*`` policy,
    torch AMP); ``backend``: kdet's Keras backend (default: ``KERAS_BACKEND``,
    else TensorFlow).
    """
    if model not in PEERS:
        raise ValueError(f"bench --compare: model must be one of {sorted(PEERS)}, got {model!r}")
    peer = peer or PEERS[model]
    if peer != PEERS[model]:
        raise ValueError(f"bench --compare: the peer of {model} is {PEERS[model]}, not {peer!r}")
    size = image_size_of(model, phi, image_size)
    sides = ["kdet"]
    if peer_installed(peer):
        sides.append(peer)
    elif verbose:
        print(f"kdet bench: {peer} is not installed: measuring kdet only "
              f"(pip install {peer})", flush=True)
    rows = []
    for batch in batches:
        for side in sides:
            job = {"side": side, "model": model, "phi": phi, "image_size": size,
                   "batch": int(batch), "tasks": list(tasks), "threads": int(threads),
                   "warmup": int(warmup), "repeats": int(repeats),
                   "score_threshold": score_threshold, "device": device,
                   "precision": precision, "backend": backend}
            new = _launch(job, timeout)
            rows += new
            if verbose:
                for r in new:
                    print(f"  {_row_text(r)}", flush=True)
    return rows, format_ratio_table(rows)


def _row_text(r):
    what = f"{r['side']:11s} {r['model']} @ {r['image_size']} b{r['batch']} {r['task']:7s}"
    if r.get("precision", "float32") != "float32":
        what += f" {r['precision']}"
    if "error" in r:
        return f"{what} failed: {r['error']}"
    return (f"{what} {r['cpu_s_per_image']:.3f} cpu-s/img, {r['images_per_s']:.2f} img/s "
            f"(first call {r['first_wall_s']:.1f} s)")


def format_ratio_table(rows):
    """Markdown: a line per (task, batch) with each side's CPU s/image and img/s, and
    the peer / kdet ratios of CPU time per image (> 1: kdet cheaper) and of wall time."""
    ok = [r for r in rows if "error" not in r]
    index = {(r["side"], r["task"], r["batch"]): r for r in ok}
    keys = sorted({(r["task"], r["batch"]) for r in rows}, key=lambda k: (k[0] != "predict", k))
    peer = next((r["side"] for r in rows if r["side"] != "kdet"), None)
    model = rows[0]["model"] + (f" {rows[0]['phi']}" if rows[0]["model"] == "efficientdet"
                                else "") if rows else "-"
    if rows and rows[0].get("precision", "float32") != "float32":
        model += f" ({rows[0]['precision']})"
    head = ["task", "model @ size", "batch", "kdet cpu-s/img", "kdet img/s (wall)"]
    if peer:
        head += [f"{peer} cpu-s/img", f"{peer} img/s (wall)", "CPU ratio peer/kdet",
                 "wall ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, batch in keys:
        k, p = index.get(("kdet", task, batch)), index.get((peer, task, batch))
        size = (k or p or {"image_size": "-"})["image_size"]
        cells = [task, f"{model} @ {size}", str(batch),
                 f"{k['cpu_s_per_image']:.3f}" if k else "failed",
                 f"{k['images_per_s']:.2f}" if k else "-"]
        if peer:
            cells += [f"{p['cpu_s_per_image']:.3f}" if p else "failed",
                      f"{p['images_per_s']:.2f}" if p else "-",
                      f"{p['cpu_s_per_image'] / k['cpu_s_per_image']:.2f}x" if k and p else "-",
                      f"{k['images_per_s'] / p['images_per_s']:.2f}x" if k and p else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"{r['side']} {r['task']} b{r['batch']}: {r['error']}" for r in rows
              if "error" in r]
    return "\n".join(lines + [f"failed: {e}" for e in errors])


def main(argv=None):
    """Worker entry: ``python -m kdet.workflow.peer_benchmark '<job json>'``."""
    argv = sys.argv[1:] if argv is None else argv
    for row in run_job(json.loads(argv[0])):
        print("RESULT " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
