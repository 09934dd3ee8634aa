"""Where kdet's predict time goes: cumulative sub-graphs of one detector, batch 1, CPU.

Builds the model (random init), then times graphs (``tf.function``, inference
mode) of the model's own layers that stop after each stage, e.g. for Faster R-CNN
``normalize -> backbone -> fpn -> rpn_head -> proposals -> roi_heads``, and the
whole ``predict_on_batch`` (decoding, NMS, mask pasting). Each stage's cost is
the difference to the previous one (median CPU time of ``--repeats`` calls
after a warm-up, one TF thread by default: the steady figure on a shared machine).

    python benchmarks/profile_predict.py --model retinanet --image-size 640
    python benchmarks/profile_predict.py --model maskrcnn --image-size 800 --threads 1

``--train``: each stage forward and forward + gradients of every trainable variable (a
dummy loss, the sum of the stage's outputs; the stages' layers run as in inference, batch
norms on their moving statistics, and the R-CNN stages on the inference proposals), then
the whole ``train_on_batch`` (3 random boxes an image):

    python benchmarks/profile_predict.py --model retinanet --backbone mobilenet_v2 \
        --num-classes 2 --image-size 256 --batch 2 --train --repeats 6
"""
import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kdet.workflow.peer_benchmark import time_calls  # noqa: E402

STAGES = {
    "retinanet": ("normalize", "backbone", "fpn", "head"),
    "fasterrcnn": ("normalize", "backbone", "fpn", "rpn_head", "proposals", "roi_heads"),
    "maskrcnn": ("normalize", "backbone", "fpn", "rpn_head", "proposals", "roi_heads"),
}


def run_until(model, images, last):
    """The model's functional graph, stage by stage (as the model's constructor wires
    it), stopped after the stage ``last``."""
    layer = {item.name: item for item in model.layers}
    backbone = next(item for item in model.layers if type(item).__name__ == "Functional")
    two_stage = "rpn_head" in layer
    out = x = layer["normalize"](images)
    if last == "normalize":
        return out
    out = features = backbone(x)
    if last == "backbone":
        return out
    names = ("C2", "C3", "C4", "C5") if two_stage else ("C3", "C4", "C5")
    out = pyramid = layer["fpn"]({k: features[k] for k in names})
    if last == "fpn":
        return out
    levels = [pyramid[f"P{i}"] for i in (range(2, 7) if two_stage else range(3, 8))]
    if not two_stage:
        return layer["head"](levels)
    out = rpn = layer["rpn_head"](levels)
    if last == "rpn_head":
        return out
    out = proposals = layer["proposals"](rpn["objectness"], rpn["box_deltas"])
    if last == "proposals":
        return out
    return layer["roi_heads"](levels[:4], proposals["proposals"], proposals["valid"])


def build(name, size, backbone=None, num_classes=None):
    """The model, COCO's classes by default (torchvision's 91 for RetinaNet, 90 + background
    for the R-CNNs)."""
    import kdet
    extra = {} if backbone is None else {"backbone": backbone}
    if name == "retinanet":
        return kdet.models.RetinaNet(num_classes=num_classes or 91, image_size=size, **extra)
    cls = kdet.models.MaskRCNN if name == "maskrcnn" else kdet.models.FasterRCNN
    return cls(num_classes=num_classes or 90, image_size=size, **extra)


def training_rows(model, images, stages, repeats):
    """(stage, forward CPU s, forward + backward CPU s) per stage, training mode."""
    import tensorflow as tf

    variables = [v.value for v in model.trainable_variables]
    rows = []
    for stage in stages:
        def forward(stage=stage):
            return run_until(model, images, stage)

        def forward_backward(stage=stage):
            with tf.GradientTape() as tape:
                out = run_until(model, images, stage)
                loss = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) * 1e-6
                                 for v in tf.nest.flatten(out)])
            return tape.gradient(loss, variables,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
        rows.append((stage, timed(tf.function(forward), repeats)[1],
                     timed(tf.function(forward_backward), repeats)[1]))
    return rows


def timed(fn, repeats):
    """Median (wall s, cpu s) of ``repeats`` calls after two warm-up calls."""
    figures = time_calls(fn, warmup=2, repeats=repeats)
    return figures["wall_s"], figures["cpu_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="retinanet", choices=sorted(STAGES))
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backbone", default=None, help="the model's backbone (default its own)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: COCO's")
    parser.add_argument("--train", action="store_true",
                        help="forward and forward + backward per stage, then train_on_batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--all-mask-rows", action="store_true",
                        help="Mask R-CNN: run the mask head on all D rows (the code before "
                             "RoIHeads skipped the padded ones)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras
    import numpy as np

    model = build(args.model, args.image_size, args.backbone, args.num_classes)
    if args.train:
        return print_training(model, args)
    if args.all_mask_rows:
        model.roi_heads.skip_padded_masks = False
    images = np.random.default_rng(0).uniform(
        0, 255, (args.batch, args.image_size, args.image_size, 3)).astype("float32")
    rows, previous = [], 0.0
    for stage in STAGES[args.model]:
        graph = tf.function(lambda x, stage=stage: run_until(model, x, stage))
        wall, cpu = timed(lambda: keras.tree.map_structure(
            keras.ops.convert_to_numpy, graph(images)), args.repeats)
        rows.append((f"up to {stage}", wall, cpu, cpu - previous))
        previous = cpu
    model.compile(optimizer="sgd", jit_compile=False)
    wall, cpu = timed(lambda: keras.tree.map_structure(
        keras.ops.convert_to_numpy, model.predict_on_batch(images)), args.repeats)
    rows.append(("predict_on_batch (all)", wall, cpu, cpu - previous))
    print(f"{args.model} @ {args.image_size}, batch {args.batch}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print("| sub-graph | wall (s) | CPU (s) | stage CPU (s) |")
    print("|---|---|---|---|")
    for name, wall, cpu, stage in rows:
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {stage:+.3f} |")


def print_training(model, args):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    size, batch = args.image_size, args.batch
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    rows = training_rows(model, images, STAGES[args.model][1:], args.repeats)
    boxes = np.zeros((batch, 8, 4), "float32")
    labels = -np.ones((batch, 8), "int32")
    for b in range(batch):  # 3 objects an image
        for i in range(3):
            x0, y0 = rng.uniform(0, size * 0.6, 2)
            w, h = rng.uniform(0.08 * size, 0.4 * size, 2)
            boxes[b, i], labels[b, i] = [x0, y0, x0 + w, y0 + h], 0
    targets = {"boxes": boxes, "labels": labels}
    if getattr(model, "with_masks", False):  # box-shaped masks at the image's size
        masks = np.zeros((batch, 8, size, size), "uint8")
        for b, i in zip(*np.nonzero(labels >= 0)):
            x0, y0, x1, y1 = boxes[b, i].astype(int)
            masks[b, i, y0:y1, x0:x1] = 1
        targets["masks"] = masks
    model.compile(optimizer=model.default_optimizer(steps=100, batch_size=batch),
                  jit_compile=False)
    step = timed(lambda: model.train_on_batch(images, targets), args.repeats)[1]
    print(f"{args.model} ({args.backbone or 'default backbone'}) @ {size}, batch {batch}, "
          f"{args.threads} thread(s), training, median CPU s of {args.repeats}")
    print("| up to | forward (s) | forward + backward (s) |")
    print("|---|---|---|")
    for stage, forward, both in rows:
        print(f"| {stage} | {forward:.3f} | {both:.3f} |")
    print(f"| train_on_batch (loss, update) | - | {step:.3f} |")


if __name__ == "__main__":
    main()
