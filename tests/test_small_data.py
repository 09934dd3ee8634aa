"""Issue #12 item 4: the ``small_data`` preset of ``kdet train`` and benchmarks/small_data.py.

The preset's values were chosen from the runs recorded in benchmarks/RESULTS.md ("Small-data
defaults"); ``CHOSEN`` repeats them here so that a change to the preset is a deliberate one
(with new measurements). The benchmark's reference side is smoke-run on 2 raccoon images
(~10 s, TensorFlow backend only: it is torch code); its kdet side traces a whole EfficientDet
training step (~1 min) and is slow-marked.
"""

import pytest

from conftest import HAVE_TORCHVISION, backend, load_benchmark
from kdet import cli
from kdet.workflow import config as wconfig
from kdet.workflow.presets import PRESETS, describe

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")

CHOSEN = {"model": "efficientdet", "phi": "lite0", "backbone_weights": "imagenet",
          "image_size": 384, "batch_size": 8, "learning_rate": 0.08, "epochs": 40,
          "augment": ["scale_jitter", "flip", "color"], "scale_range": (0.75, 1.25),
          "ema": "auto"}


def test_small_data_preset_is_what_kdet_train_uses():
    command, settings, where = cli.parse(["train", "--format", "coco", "--preset", "small_data"])
    resolved = wconfig.resolve(command, file_config=settings, config_path=where)
    assert {k: resolved[k] for k in CHOSEN} == CHOSEN
    assert resolved["preset"] == "small_data"
    lines = "\n".join(describe(PRESETS["small_data"]))  # what kdet train prints
    assert all(f"{k} " in lines for k in CHOSEN) and "RESULTS.md" in lines
    # without the preset, the built-in defaults stay
    plain = wconfig.resolve("train", {"format": "coco"})
    assert plain["preset"] is None and plain["phi"] == 0 and plain["backbone_weights"] is None


def test_preset_sits_under_the_config_file_and_the_flags(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("format: coco\npreset: small_data\nimage_size: 512\n")
    command, settings, where = cli.parse(["train", "--config", str(path), "--epochs", "3"])
    resolved = wconfig.resolve(command, file_config=settings, config_path=where)
    assert resolved["image_size"] == 512 and resolved["epochs"] == 3
    assert resolved["phi"] == CHOSEN["phi"] and resolved["scale_range"] == CHOSEN["scale_range"]
    # the preset's rate is per image: another batch scales it, unless a rate is given
    for args, rate in ((["--batch-size", "4"], 0.04), (["--batch-size", "16"], 0.16),
                       (["--batch-size", "4", "--learning-rate", "0.1"], 0.1)):
        command, settings, where = cli.parse(["train", "--format", "coco", "--preset",
                                              "small_data"] + args)
        resolved = wconfig.resolve(command, file_config=settings, config_path=where)
        assert resolved["learning_rate"] == pytest.approx(rate), args
    with pytest.raises(ValueError, match="preset='tiny' is not one of"):
        wconfig.resolve("train", {"preset": "tiny"})
    # another command ignores the key (one file drives train and eval)
    assert "preset" not in wconfig.resolve("eval", {"preset": "small_data"})


@needs_torchvision
def test_reference_side_smoke(shared_data, tmp_path):
    """The tutorial's model as the issue states it, one epoch on 2 raccoon images, scored."""
    if backend() != "tensorflow":
        pytest.skip("the reference side is torch code: run once, on the TensorFlow backend")
    from kdet.converters.backbones import installed_imagenet_checkpoint
    if installed_imagenet_checkpoint("mobilenet_v2") is None:
        pytest.skip("the ImageNet package of mobilenet_v2 is not installed")
    bench = load_benchmark("small_data")
    model = bench.tutorial_model(1, 800, None)
    assert model.backbone.out_channels == 1280 and model.transform.min_size == (800,)
    assert model.transform.max_size == 1333
    assert model.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),)
    assert model.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),)
    assert model.roi_heads.box_roi_pool.featmap_names == ["0"]
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    args = bench.parse_args(["--side", "reference", "--limit", "2", "--epochs", "1",
                             "--min-size", "128", "--out", str(tmp_path),
                             "--json", str(tmp_path / "ref.jsonl")])
    records = bench.run_reference(args)
    assert len(records) == 1 and records[0]["images_seen"] == 2
    assert records[0]["train_cpu_s"] > 0 and 0 <= records[0]["AP"] <= 1
    assert (tmp_path / "ref.jsonl").read_text().count("\n") == 1


@pytest.mark.slow
def test_kdet_side_smoke(shared_data, tmp_path):
    bench = load_benchmark("small_data")
    args = bench.parse_args(["--side", "kdet", "--limit", "2", "--out", str(tmp_path), "--kdet",
                             "preset=small_data", "backbone_weights=none", "image_size=128",
                             "epochs=1", "batch_size=2", "verbose=0"])
    record = bench.run_kdet(args)
    assert record["image_size"] == 128 and record["images_seen"] == 2
    assert record["settings"]["preset"] == "small_data" and 0 <= record["AP"] <= 1
