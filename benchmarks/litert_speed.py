"""LiteRT latency of EfficientDet-Lite0 and D0 in fp32 / fp16 / dynamic / int8, next to
the Keras model, and the AP each export keeps on Penn-Fudan.

Latency (random init, 90 classes, each variant at its own size): the Keras
model's ``predict_on_batch`` and each ``.tflite`` file's interpreter call
(``LiteRTDetector``, decoding and NMS inside), batch 1, ``--threads`` threads
(TensorFlow's pools; the interpreter's ``num_threads``), median wall and CPU time
of ``--repeats`` calls after two warm-up calls. int8 calibrates on
``--calibration`` random images (the latency does not depend on them).

AP (``--keras-model``: a detector trained on Penn-Fudan, e.g. by
``examples/train_pennfudan_boxes.py``, which holds out the same 50 images):
COCO box AP of the Keras model and of each export on the held-out images, at
the model's input size, mapped back to each image's pixels; int8 calibrates on
100 training images.

    python benchmarks/litert_speed.py --variants lite0,0
    python benchmarks/litert_speed.py --variants lite0 --keras-model pf/pennfudan_lite0.keras \
        --data /work/shared/data/pennfudan
"""
import argparse
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kdet.workflow.peer_benchmark import time_calls  # noqa: E402

MODES = ("fp32", "fp16", "dynamic", "int8")


def timed(fn, repeats):
    """Median (wall s, cpu s) of ``repeats`` calls after two warm-up calls."""
    figures = time_calls(fn, warmup=2, repeats=repeats)
    return figures["wall_s"], figures["cpu_s"]


def export(model, path, mode, calibration):
    import kdet
    return kdet.export.export(model, path, quantization=None if mode == "fp32" else mode,
                              representative_dataset=calibration if mode == "int8" else None,
                              calibration_steps=len(calibration))


def latency_rows(variant, modes, threads, repeats, calibration_images, tmp):
    import keras
    import numpy as np

    import kdet
    from kdet.export.litert import LiteRTDetector
    keras.utils.set_random_seed(0)
    model = kdet.models.EfficientDet(phi=variant, num_classes=90)
    size = model.image_size[0]
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, size, size, 3)).astype("float32")
    calibration = list(rng.uniform(0, 255, (calibration_images, size, size, 3))
                       .astype("float32"))
    model.compile(optimizer="sgd", jit_compile=False)
    wall, cpu = timed(lambda: keras.tree.map_structure(
        keras.ops.convert_to_numpy, model.predict_on_batch(image)), repeats)
    rows = [(f"{variant} @ {size}", "Keras (TF graph)", wall, cpu, None)]
    for mode in modes:
        path = os.path.join(tmp, f"{variant}_{mode}.tflite")
        export(model, path, mode, calibration)
        detector = LiteRTDetector(path, num_threads=threads)
        wall, cpu = timed(lambda: detector._invoke(image), repeats)
        rows.append((f"{variant} @ {size}", f"LiteRT {mode}", wall, cpu,
                     os.path.getsize(path) / 2 ** 20))
        print(f"  {rows[-1][0]} {rows[-1][1]}: {cpu * 1000:.1f} ms CPU", flush=True)
    return rows


def ap_rows(keras_path, data_root, modes, threads, tmp, val_images=50, seed=0):
    import keras
    import numpy as np

    from kdet.data import MaskFolderDataset, build_pipeline
    from kdet.export.litert import LiteRTDetector
    from kdet.metrics import COCOEvaluator
    import kdet
    for name in kdet.models.__all__:  # the lazy exports register the classes load_model needs
        getattr(kdet.models, name)
    model = keras.saving.load_model(keras_path)
    size = model.image_size[0]
    data = MaskFolderDataset(data_root)
    order = np.random.default_rng(seed).permutation(len(data))  # examples/_common.split
    train, val = data.subset(sorted(order[val_images:])), data.subset(sorted(order[:val_images]))
    batches = [(images.numpy(), targets["image_id"].numpy(), targets["scale"].numpy())
               for images, targets in build_pipeline(val, image_size=size, batch_size=1,
                                                     training=False, include_masks=False)]
    calibration = [images.numpy() for images, _ in build_pipeline(
        train, image_size=size, batch_size=1, training=False, include_masks=False).take(100)]

    def average_precision(predict):
        evaluator = COCOEvaluator(val.coco_ground_truth())
        for images, image_ids, scale in batches:
            evaluator.add_predictions(image_ids, predict(images), scale=1.0 / scale)
        return evaluator.evaluate()["AP"]

    rows = [("Keras", average_precision(lambda x: keras.tree.map_structure(
        keras.ops.convert_to_numpy, model.predict_on_batch(x))))]
    for mode in modes:
        path = os.path.join(tmp, f"pf_{mode}.tflite")
        export(model, path, mode, calibration)
        detector = LiteRTDetector(path, num_threads=threads)
        rows.append((f"LiteRT {mode}", average_precision(detector._invoke)))
        print(f"  AP {rows[-1][0]}: {rows[-1][1]:.4f}", flush=True)
    return size, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="lite0,0")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=8,
                        help="random calibration images of the latency rows' int8 export")
    parser.add_argument("--keras-model", help="a Penn-Fudan-trained .keras file: AP rows")
    parser.add_argument("--data", default="/work/shared/data/pennfudan")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="kdet_litert_bench_") as tmp:
        rows = []
        for variant in (v for v in args.variants.split(",") if v):
            variant = int(variant) if variant.isdigit() else variant
            rows += latency_rows(variant, modes, args.threads, args.repeats, args.calibration,
                                 tmp)
        print(f"\nbatch 1, {args.threads} thread(s), median of {args.repeats}")
        print("| model @ size | runtime | wall (ms) | CPU (ms) | CPU vs Keras | file (MiB) |")
        print("|---|---|---|---|---|---|")
        keras_cpu = None
        for name, runtime, wall, cpu, mib in rows:
            keras_cpu = cpu if runtime.startswith("Keras") else keras_cpu
            print(f"| {name} | {runtime} | {wall * 1000:.1f} | {cpu * 1000:.1f} | "
                  f"{keras_cpu / cpu:.2f}x | {'-' if mib is None else f'{mib:.1f}'} |")
        if args.keras_model:
            size, ap = ap_rows(args.keras_model, args.data, modes, args.threads, tmp)
            print(f"\nCOCO box AP, 50 held-out Penn-Fudan images, {args.keras_model} @ {size}")
            print("| runtime | AP | AP change vs Keras |")
            print("|---|---|---|")
            for name, value in ap:
                print(f"| {name} | {value:.4f} | {value - ap[0][1]:+.4f} |")


if __name__ == "__main__":
    main()
