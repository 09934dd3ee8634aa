"""Detection ops in pure ``keras.ops``: static shapes, XLA friendly, TF and JAX.

The functions are imported eagerly: ``roi_align`` and ``nms`` share their
names with their modules, so a lazy attribute would be shadowed by the
submodule as soon as anything imports it.
"""
from .nms import batched_nms, nms, select_detections  # noqa: F401
from .roi_align import (map_roi_levels, multilevel_roi_align, roi_align,  # noqa: F401
                        roi_align_maps)
from .roi_pool import roi_pool  # noqa: F401

__all__ = ["nms", "batched_nms", "select_detections", "roi_align", "roi_align_maps", "roi_pool",
           "map_roi_levels", "multilevel_roi_align"]
