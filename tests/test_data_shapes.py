"""Synthetic shapes: deterministic, geometrically consistent, easy to learn."""
import numpy as np
import pytest

from kdet.data import ShapesDataset


def test_deterministic_per_seed_and_index():
    a, b = ShapesDataset(6, image_size=96, seed=5), ShapesDataset(12, image_size=96, seed=5)
    for i in range(6):
        x, y = a[i], b[i]
        for key in ("image", "boxes", "labels", "masks", "keypoints"):
            np.testing.assert_array_equal(x[key], y[key])
    c = ShapesDataset(6, image_size=96, seed=6)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_boxes_masks_keypoints_agree():
    ds = ShapesDataset(40, image_size=256, seed=0, max_objects=4)
    counts = np.zeros(3, int)
    for i in range(len(ds)):
        ex = ds[i]
        n = len(ex["labels"])
        assert 1 <= n <= 4 and ex["masks"].shape == (n, 256, 256)
        counts += np.bincount(ex["labels"], minlength=3)
        boxes = ex["boxes"]
        assert (boxes >= 0).all() and (boxes <= 256).all()
        for k in range(n):
            x1, y1, x2, y2 = boxes[k]
            size = x2 - x1
            assert 24 <= size <= 96
            rows, cols = np.nonzero(ex["masks"][k])
            # mask = pixel centres inside the shape: extents within one pixel of the box
            # (two at a triangle's apex, whose first rows are narrower than a pixel)
            apex = 2 if ex["labels"][k] == 2 else 1
            assert abs(cols.min() - x1) <= 1 and abs(cols.max() + 1 - x2) <= 1
            assert abs(rows.min() - y1) <= apex and abs(rows.max() + 1 - y2) <= 1
            kp = ex["keypoints"][k]
            assert (kp[:, 2] == 2).all()
            top, left, right = kp[:, :2]
            assert top[0] == pytest.approx((x1 + x2) / 2) and top[1] == pytest.approx(y1)
            assert left[0] < top[0] < right[0] and left[1] == pytest.approx(right[1])
            if ex["labels"][k] in (1, 2):  # square corners / triangle vertices
                np.testing.assert_allclose([left, right], [[x1, y2], [x2, y2]], atol=1e-4)
            else:  # on the circle
                centre, r = np.array([(x1 + x2) / 2, (y1 + y2) / 2]), size / 2
                np.testing.assert_allclose(np.linalg.norm(kp[:, :2] - centre, axis=1), r,
                                           rtol=1e-5)
        # shapes never overlap, so masks are disjoint and complete
        assert ex["masks"].sum(0).max() <= 1
    assert (counts > 10).all()  # all three classes well represented


def test_shapes_stand_out_from_background():
    ex = ShapesDataset(1, image_size=128, seed=2)[0]
    inside = ex["image"][ex["masks"][0] > 0].astype(float).mean(0)
    outside = ex["image"][ex["masks"].sum(0) == 0].astype(float).mean(0)
    assert np.abs(inside - outside).max() > 40


def test_tf_dataset_equals_numpy(rng):
    ds = ShapesDataset(3, image_size=64, seed=1, size_range=(10, 30))
    for i, ex in enumerate(ds.as_tf_dataset()):
        ref = ds[i]
        for key in ("image", "boxes", "labels", "masks", "keypoints", "iscrowd"):
            np.testing.assert_array_equal(ex[key].numpy(), ref[key])
    assert ds.keypoint_flip_map == (0, 2, 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size_range"):
        ShapesDataset(2, image_size=64, size_range=(24, 96))
    assert ShapesDataset(1, image_size=64).size_range == (6, 24)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesDataset(2, max_objects=0)
