"""Images/s of ``model.fit`` on one vs two devices with the same global batch (issue #14).

Runs tests/distributed_run.py (a fresh interpreter per setting: the device count is fixed
when TF / JAX start) for a dense detector (EfficientDet-lite0, 128 px, BN synchronised on
TF) and a two-stage one (Faster R-CNN R50-FPN, 128 px, frozen backbone), global batch 4:
TF ``MirroredStrategy`` over 2 logical CPU devices and JAX ``DataParallel`` over 2 forced
host devices, each against one device. Reports the steady state after the first step
(which traces / compiles): images per wall second and images per CPU second (the
process's CPU time over all threads). On a CPU host the "devices" share the same cores,
so two replicas cannot be faster: this measures the cost of the replication, not a gain.

    python benchmarks/distribute_scaling.py --steps 6 --backends tensorflow,jax
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--backends", default="tensorflow,jax")
parser.add_argument("--models", default="efficientdet,fasterrcnn")
args = parser.parse_args()


def run(backend, model, replicas):
    env = dict(os.environ, KERAS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("TF_CONFIG", None)
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "distributed_run.py"), "--model", model,
             "--replicas", str(replicas), "--steps", str(args.steps), "--batch-size",
             str(args.batch_size), "--learning-rate", "0.001",
             "--out", os.path.join(scratch, "r.npz")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(next(s for s in done.stdout.splitlines()[::-1] if s.startswith("{")))


def main():
    print(f"load average before: {os.getloadavg()}", flush=True)
    print("| backend | model | replicas | images/s (wall) | images per CPU-s | "
          "first step (s) |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        strategy = {"tensorflow": "mirrored", "jax": "dataparallel"}[backend]
        for model in args.models.split(","):
            for replicas in (1, 2):
                r = run(backend, model, replicas)
                wall = r["steps_per_second"] * args.batch_size
                cpu = args.batch_size / r["cpu_seconds_per_step"]
                first = r["fit_seconds"] - (args.steps - 1) / r["steps_per_second"]
                name = "none" if replicas == 1 else strategy
                print(f"| {backend} | {model} | {replicas} ({name}) | {wall:.2f} | {cpu:.2f} | "
                      f"{first:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
