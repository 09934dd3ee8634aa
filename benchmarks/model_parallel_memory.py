"""Parameter and activation memory per device of an EfficientDet under
``kdet.distribute.make_model_parallel`` (JAX ``keras.distribution.ModelParallel``).

Builds the model symbolically (no step runs), applies
:func:`kdet.distribute.model_parallel_layout_map` for a 'model' axis of 1, 2, 4 and 8
devices and adds up, per device, the float32 bytes of the weights (a sharded variable
holds ``1/M`` of its array) and an upper bound of the activations: the outputs of every
layer for one image (nested layers counted with their parents; XLA keeps less after
fusion and rematerialisation; an output of a layer whose kernel is split over channels is
split too). Optimizer state: SGD with momentum adds one copy
of the trainable weights, Adam two.

    python benchmarks/model_parallel_memory.py --phi 7x
"""
import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("--phi", default="7x")
parser.add_argument("--axis-sizes", default="1,2,4,8")
args = parser.parse_args()
sizes = [int(s) for s in args.axis_sizes.split(",")]
os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={max(sizes)}")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kdet import distribute  # noqa: E402
from kdet.models import EfficientDet  # noqa: E402


def main():
    model = EfficientDet(phi=args.phi, num_classes=90, backbone_weights=None)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    # outputs of every layer of the functional graph, one image; channel-split with the
    # layer's kernel
    outputs = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for node in getattr(layer, "_inbound_nodes", []):
            for tensor in node.output_tensors:
                shape = [d for d in tensor.shape[1:]]
                if None not in shape:
                    outputs.append((layer, int(np.prod(shape))))
    activation = sum(n for _, n in outputs)
    print(f"EfficientDet-D{args.phi} at {model.image_size} px: {total / 1e6:.1f} M weights "
          f"({trainable / 1e6:.1f} M trainable, {4 * total / 2**20:.0f} MiB float32); "
          f"layer outputs (upper bound) {4 * activation / 2**30:.2f} GiB per image")
    print("| model axis | weights / device (MiB) | share sharded | "
          "layer outputs / device / image, upper bound (GiB) |")
    print("|---|---|---|---|")
    devices = keras.distribution.list_devices()
    for size in sizes:
        mesh = keras.distribution.DeviceMesh(
            (1, size), ("batch", "model"), devices=np.asarray(devices[:size]).reshape(1, size))
        layout = distribute.model_parallel_layout_map(model, mesh)
        per_device = sharded = 0
        split_layers = set()
        for v in model.weights:
            n = int(np.prod(v.shape))
            if "model" in layout[v.path].axes:
                per_device += n / size
                sharded += n
                split_layers.add(v.path.rsplit("/", 1)[0])
            else:
                per_device += n
        act = 0.0
        for layer, n in outputs:
            split = any(w.path.rsplit("/", 1)[0] in split_layers for w in layer.weights)
            act += n / size if split else n
        print(f"| {size} | {4 * per_device / 2**20:.0f} | {sharded / total:.0%} | "
              f"{4 * act / 2**30:.2f} |")


if __name__ == "__main__":
    main()
