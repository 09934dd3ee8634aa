"""Detection ops in pure ``keras.ops``: static shapes, XLA friendly, TF and JAX."""
from kdet._lazy import lazy_exports

__all__ = ["nms", "batched_nms", "roi_align", "roi_pool", "map_roi_levels",
           "multilevel_roi_align"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "nms": ".nms", "batched_nms": ".nms",
    "roi_align": ".roi_align", "roi_pool": ".roi_pool",
    "map_roi_levels": ".roi_align", "multilevel_roi_align": ".roi_align",
})
