"""Instance-mask folder reader (Penn-Fudan layout).

Layout: ``<root>/PNGImages/<stem>.png`` and ``<root>/PedMasks/<stem>_mask.png``
where each mask pixel holds an instance id (0 = background, k = k-th
object). Every non-zero id becomes one object of the single class; its box is
the mask's extent in kdet's continuous coordinates, ``[xmin, ymin, xmax + 1,
ymax + 1]`` over the mask's pixel indices (torchvision's ``masks_to_boxes``
returns ``xmax``/``ymax`` without the +1).

    >>> ds = MaskFolderDataset("pennfudan")  # doctest: +SKIP
    >>> ds[0]["masks"].shape, ds[0]["boxes"][0]  # doctest: +SKIP
    ((2, 536, 559), array([159., 181., 302., 431.], dtype=float32))
"""
import os

import numpy as np

from kdet.data.dataset import (DEFAULT_MAX_PIXELS, CHECK_IMAGES, DetectionDataset,
                               read_image_header)
from kdet.data.errors import ProblemLog


def read_instance_ids(path):
    """The instance-id image of a mask PNG as a 2-D integer array.

    Palette images give their indices (not colours); RGB masks are rejected.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"{path}: mask mode {im.mode} is not a single-channel id image")
        return np.asarray(im)


def boxes_from_masks(ids, instance_ids):
    """xyxy continuous boxes ``[xmin, ymin, xmax + 1, ymax + 1]`` of each id."""
    boxes = np.zeros((len(instance_ids), 4), np.float32)
    for i, k in enumerate(instance_ids):
        rows = np.flatnonzero((ids == k).any(axis=1))
        cols = np.flatnonzero((ids == k).any(axis=0))
        boxes[i] = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    return boxes


class MaskFolderDataset(DetectionDataset):
    """Images plus one instance-id PNG per image (Penn-Fudan style).

    Args:
        root: folder holding ``image_dir`` and ``mask_dir``.
        image_dir, mask_dir: sub-folder names (default Penn-Fudan's).
        mask_suffix: mask file = ``<stem><mask_suffix>.png``.
        class_name: the one class (label 0).
        on_error, check_images, max_pixels: see :class:`kdet.data.COCODataset`.
    """

    has_masks = True

    def __init__(self, root, image_dir="PNGImages", mask_dir="PedMasks", mask_suffix="_mask",
                 class_name="pedestrian", on_error="raise", check_images="header",
                 max_pixels=DEFAULT_MAX_PIXELS):
        if check_images not in CHECK_IMAGES:
            raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
        root = str(root)
        self.image_dir = os.path.join(root, image_dir)
        self.mask_dir = os.path.join(root, mask_dir)
        for d in (self.image_dir, self.mask_dir):
            if not os.path.isdir(d):
                raise ValueError(f"{d}: folder not found")
        log = ProblemLog(on_error)
        images = sorted(f for f in os.listdir(self.image_dir) if not f.startswith("."))
        records = []
        for image_id, name in enumerate(images):
            file_name = os.path.join(self.image_dir, name)
            stem = os.path.splitext(name)[0]
            mask_file = os.path.join(self.mask_dir, f"{stem}{mask_suffix}.png")
            where = f"{file_name}"
            header = read_image_header(file_name, apply_exif=False, max_pixels=max_pixels,
                                       check=check_images,
                                       log=log, where=where)
            if header is None:
                continue
            if not os.path.isfile(mask_file):
                log.error("missing_image", where, f"mask file {mask_file} not found")
                continue
            try:
                ids = read_instance_ids(mask_file)
            except (OSError, ValueError) as e:
                log.error("bad_mask", where, f"mask {mask_file} does not decode ({e})")
                continue
            if ids.shape != header[:2]:
                log.error("size_mismatch", where, f"mask {mask_file} is {ids.shape[1]}x"
                          f"{ids.shape[0]}, image is {header[1]}x{header[0]}")
                continue
            instance_ids = np.unique(ids)
            instance_ids = instance_ids[instance_ids != 0].astype(np.int32)
            records.append({
                "image_id": image_id, "file_name": file_name, "mask_file": mask_file,
                "original_size": header[:2], "instance_ids": instance_ids,
                "boxes": boxes_from_masks(ids, instance_ids),
                "labels": np.zeros(len(instance_ids), np.int32)})
        log.summarize(root)
        super().__init__(records, [class_name], problems=log.counts, source=root,
                         on_error=on_error)

    def load_masks(self, index):
        record = self.records[index]
        ids = read_instance_ids(record["mask_file"])
        return (ids[None] == record["instance_ids"][:, None, None]).astype(np.uint8)
