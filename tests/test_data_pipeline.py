"""build_pipeline: resize/pad math, flip and crop consistency, static shapes, seeds."""
import numpy as np
import pytest

from kdet.data import COCODataset, ShapesDataset, build_pipeline
from kdet.data.pipeline import BOX_FORMATS, convert_boxes

S = 96


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(16, image_size=S, seed=0, max_objects=4, size_range=(16, 40))


def _examples(ds):
    """Unbatch ``(images, targets)`` batches into per-image dicts of numpy arrays."""
    out = []
    for images, targets in ds:
        for b in range(images.shape[0]):
            ex = {k: v[b].numpy() for k, v in targets.items()}
            ex["image"] = images[b].numpy()
            out.append(ex)
    return out


def _valid(ex):
    return ex["labels"] >= 0


def _bilinear(image, out_h, out_w):
    """Independent numpy bilinear resize with half-pixel centres (tf.image.resize)."""
    def axis(n_in, n_out):
        pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        lo = np.floor(pos)
        return (np.clip(lo, 0, n_in - 1).astype(int), np.clip(lo + 1, 0, n_in - 1).astype(int),
                pos - lo)
    y0, y1, wy = axis(image.shape[0], out_h)
    x0, x1, wx = axis(image.shape[1], out_w)
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx)[None, :, None] + img[y0][:, x1] * wx[None, :, None]
    bottom = img[y1][:, x0] * (1 - wx)[None, :, None] + img[y1][:, x1] * wx[None, :, None]
    return top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]


def _nearest(masks, out_h, out_w):
    _, h, w = masks.shape
    rows = np.minimum(np.floor((np.arange(out_h) + 0.5) * h / out_h), h - 1)
    cols = np.minimum(np.floor((np.arange(out_w) + 0.5) * w / out_w), w - 1)
    return masks[:, rows.astype(int)][:, :, cols.astype(int)]


def test_eval_resize_with_pad_math(shared_data):
    coco = COCODataset(shared_data / "coco128/annotations/instances_train2017.json",
                       shared_data / "coco128/train2017", include_masks=True).subset(range(3))
    size = 160
    examples = _examples(build_pipeline(coco, size, 3, training=False, keep_crowd=True,
                                        mask_size=(40, 40)))
    for index, ex in enumerate(examples):
        ref = coco[index]
        h, w = ref["original_size"]
        scale = size / max(h, w)
        assert ex["scale"] == pytest.approx(scale, rel=1e-6)
        assert ex["image_id"] == ref["image_id"] and ex["original_size"].tolist() == [h, w]
        n = len(ref["labels"])
        # boxes are scaled by exactly `scale`; predictions map back with / scale
        np.testing.assert_allclose(ex["boxes"][:n], ref["boxes"] * scale, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(ex["boxes"][:n] / ex["scale"], ref["boxes"], atol=2e-3)
        np.testing.assert_array_equal(ex["labels"][:n], ref["labels"])
        assert (ex["labels"][n:] == -1).all() and (ex["boxes"][n:] == 0).all()
        # image: bilinear resize placed top-left, zero padding
        nh, nw = int(np.round(h * scale)), int(np.round(w * scale))
        np.testing.assert_allclose(ex["image"][:nh, :nw], _bilinear(ref["image"], nh, nw),
                                   atol=0.05)
        assert (ex["image"][nh:] == 0).all() and (ex["image"][:, nw:] == 0).all()
        # masks: nearest resize, padded, then nearest to mask_size
        canvas = np.zeros((n, size, size), np.uint8)
        canvas[:, :nh, :nw] = _nearest(ref["masks"], nh, nw)
        np.testing.assert_array_equal(ex["masks"][:n], _nearest(canvas, 40, 40))
        assert (ex["masks"][n:] == 0).all()


def test_crowd_dropped_and_negatives(shared_data):
    coco = COCODataset(shared_data / "coco128/annotations/instances_train2017.json",
                       shared_data / "coco128/train2017")
    crowd = next(i for i, r in enumerate(coco.records) if r["iscrowd"].any())
    empty = next(i for i, r in enumerate(coco.records) if len(r["labels"]) == 0)
    ds = coco.subset([crowd, empty])
    a, b = _examples(build_pipeline(ds, 128, 2, training=False))
    assert _valid(a).sum() == (coco.records[crowd]["iscrowd"] == 0).sum()
    assert not _valid(b).any() and (b["boxes"] == 0).all()
    a = _examples(build_pipeline(ds, 128, 2, training=False, keep_crowd=True))[0]
    assert _valid(a).sum() == len(coco.records[crowd]["labels"])


def test_flip_moves_boxes_masks_keypoints_together(shapes):
    plain = {int(e["image_id"]): e for e in _examples(
        build_pipeline(shapes, S, 8, training=False))}
    flipped = _examples(build_pipeline(shapes, S, 8, training=True, augment=("flip",), seed=1,
                                       deterministic=True))
    outcomes = set()
    for ex in flipped:
        ref = plain[int(ex["image_id"])]
        was_flipped = not np.array_equal(ex["image"], ref["image"])
        outcomes.add(was_flipped)
        if not was_flipped:
            for key in ("boxes", "labels", "masks", "keypoints"):
                np.testing.assert_array_equal(ex[key], ref[key])
            continue
        np.testing.assert_array_equal(ex["image"], ref["image"][:, ::-1])
        v = _valid(ref)
        np.testing.assert_array_equal(ex["labels"], ref["labels"])
        x1, y1, x2, y2 = ref["boxes"][v].T
        np.testing.assert_allclose(ex["boxes"][v], np.stack([S - x2, y1, S - x1, y2], 1),
                                   atol=1e-4)
        np.testing.assert_array_equal(ex["masks"][v], ref["masks"][v][:, :, ::-1])
        kp = ref["keypoints"][v][:, [0, 2, 1]]  # left/right swapped
        np.testing.assert_allclose(ex["keypoints"][v][..., 0], S - kp[..., 0], atol=1e-4)
        np.testing.assert_allclose(ex["keypoints"][v][..., 1:], kp[..., 1:], atol=1e-4)
        # semantic check: "bottom_left" is still left of "bottom_right"
        assert (ex["keypoints"][v][:, 1, 0] < ex["keypoints"][v][:, 2, 0]).all()
    assert outcomes == {True, False}


def test_scale_jitter_crop_keeps_everything_inside_and_consistent(shapes):
    examples = _examples(build_pipeline(shapes, 64, 8, training=True, seed=3,
                                        deterministic=True))
    scales = []
    for ex in examples:
        for key in ("boxes", "keypoints", "image", "scale"):
            assert np.isfinite(ex[key]).all()
        assert ex["image"].min() >= 0 and ex["image"].max() <= 255
        v = _valid(ex)
        boxes = ex["boxes"][v]
        assert (boxes >= 0).all() and (boxes <= 64).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert (ex["boxes"][~v] == 0).all() and (ex["masks"][~v] == 0).all()
        scale = float(ex["scale"])
        scales.append(scale)
        content = int(np.round(S * scale))
        if content <= 64:  # no crop: content top-left, zero padding beyond
            assert (ex["image"][content:] == 0).all() and (ex["image"][:, content:] == 0).all()
        for k in np.flatnonzero(v):
            rows, cols = np.nonzero(ex["masks"][k])
            x1, y1, x2, y2 = ex["boxes"][k]
            tol = 1 + scale  # nearest-neighbour resampling of the mask
            if len(rows):  # the mask lies inside its (clipped) box
                assert cols.min() >= x1 - tol and cols.max() + 1 <= x2 + tol
                assert rows.min() >= y1 - tol and rows.max() + 1 <= y2 + tol
            if min(x1, y1) > 0 and max(x2, y2) < 64:  # not cut by the crop: box = mask extent
                assert abs(cols.min() - x1) <= tol and abs(cols.max() + 1 - x2) <= tol
                assert abs(rows.min() - y1) <= tol and abs(rows.max() + 1 - y2) <= tol
            kp = ex["keypoints"][k]
            seen = kp[:, 2] > 0
            assert (kp[~seen, :2] == 0).all()
            assert ((kp[seen, 0] >= x1 - 1e-3) & (kp[seen, 0] <= x2 + 1e-3)).all()
            assert ((kp[seen, 1] >= y1 - 1e-3) & (kp[seen, 1] <= y2 + 1e-3)).all()
    # automl range 0.1 .. 2.0 of S / max(H, W) = 64 / 96
    assert min(scales) >= 0.1 * 64 / S - 1e-6 and max(scales) <= 2.0 * 64 / S + 1e-6
    assert max(scales) > 64 / S  # some images were enlarged and cropped


def test_static_shapes_and_dtypes(shapes):
    train = build_pipeline(shapes, 64, 4, training=True, seed=0, max_boxes=7,
                           mask_size=(16, 16))
    images, targets = train.element_spec
    assert images.shape.as_list() == [4, 64, 64, 3] and images.dtype.name == "float32"
    expected = {"boxes": [4, 7, 4], "labels": [4, 7], "image_id": [4], "scale": [4],
                "original_size": [4, 2], "masks": [4, 7, 16, 16], "keypoints": [4, 7, 3, 3]}
    assert {k: v.shape.as_list() for k, v in targets.items()} == expected
    assert targets["labels"].dtype.name == "int32" and targets["masks"].dtype.name == "uint8"
    evaluation = build_pipeline(shapes, 64, 4, training=False, max_boxes=7)
    assert evaluation.element_spec[0].shape.as_list() == [None, 64, 64, 3]
    # max_boxes truncates: at most 2 objects survive
    ex = _examples(build_pipeline(shapes, 64, 4, training=False, max_boxes=2))
    assert all(e["labels"].shape == (2,) for e in ex)
    assert any(_valid(e).sum() == 2 for e in ex)


def test_seed_reproduces_batches_and_epochs_differ(shapes):
    def run(seed):
        ds = build_pipeline(shapes.subset(range(8)), 64, 4, training=True, seed=seed,
                            deterministic=True, include_masks=False)
        return [_examples(ds) for _ in range(2)]  # two epochs

    a, b, c = run(7), run(7), run(8)
    for epoch_a, epoch_b in zip(a, b):
        for x, y in zip(epoch_a, epoch_b):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a[0], a[1]))
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a[0], c[0]))


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_box_formats_match_keras(fmt, rng):
    from keras.utils import bounding_boxes

    xy = rng.uniform(0, 50, (6, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (6, 2))], 1).astype(np.float32)
    ours = convert_boxes(boxes, fmt, 100).numpy()
    reference = np.asarray(bounding_boxes.convert_format(boxes, "xyxy", fmt, height=100,
                                                         width=100))
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_pipeline_box_format_and_tf_dataset_input(shapes):
    ds = shapes.subset(range(4))
    xyxy = _examples(build_pipeline(ds, 64, 4, training=False))
    rel = _examples(build_pipeline(ds.as_tf_dataset(), 64, 4, training=False,
                                   bounding_box_format="rel_yxyx"))
    for a, b in zip(xyxy, rel):
        v = _valid(a)
        np.testing.assert_allclose(b["boxes"][v], a["boxes"][v][:, [1, 0, 3, 2]] / 64,
                                   atol=1e-6)


def test_voc_difficult_reaches_targets(tmp_path):
    from PIL import Image

    from kdet.data import VOCDataset

    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(tmp_path / "images/a.png")
    objects = "".join(
        f"<object><name>cat</name><difficult>{d}</difficult><bndbox><xmin>{x}</xmin>"
        f"<ymin>5</ymin><xmax>{x + 9}</xmax><ymax>20</ymax></bndbox></object>"
        for x, d in ((1, 1), (30, 0)))
    (tmp_path / "annotations/a.xml").write_text(f"<annotation>{objects}</annotation>")
    ds = VOCDataset(tmp_path)
    assert ds.category_ids == [1]
    ex = _examples(build_pipeline(ds, 40, 1, training=False, max_boxes=4))[0]
    assert ex["difficult"].tolist() == [1, 0, 0, 0]
    np.testing.assert_allclose(ex["boxes"][:2], [[0, 2, 5, 10], [14.5, 2, 19.5, 10]])


def test_argument_errors(shapes):
    with pytest.raises(ValueError, match="unknown augment"):
        build_pipeline(shapes, 64, 2, training=True, augment=("mosaic",))
    with pytest.raises(ValueError, match="bounding_box_format"):
        build_pipeline(shapes, 64, 2, training=True, bounding_box_format="xyzw")
    with pytest.raises(ValueError, match="keypoint_flip_map"):
        build_pipeline(shapes.as_tf_dataset(), 64, 2, training=True)


# ---- objects beyond max_boxes (issue #10, item 6) ----------------------------------------
def _crowded_records():
    """Image 1: 5 objects; image 2: 4 objects, one of them crowd; image 3: none."""
    def boxes(n):
        return np.array([[4 * i, 4 * i, 4 * i + 10, 4 * i + 10] for i in range(n)], np.float32)
    return [{"image_id": 1, "image": np.zeros((48, 64, 3), np.uint8), "boxes": boxes(5),
             "labels": np.arange(5) % 2},
            {"image_id": 2, "image": np.zeros((48, 64, 3), np.uint8), "boxes": boxes(4),
             "labels": np.zeros(4), "iscrowd": np.array([0, 1, 0, 0])},
            {"image_id": 3, "image": np.zeros((48, 64, 3), np.uint8)}]


def test_objects_beyond_max_boxes_are_counted_and_warned_once(caplog):
    import logging

    from kdet.data import DetectionDataset

    ds = DetectionDataset.from_records(_crowded_records(), ["a", "b"])
    # by hand: image 1 keeps 3 of 5; image 2 has 3 non-crowd objects, all kept
    assert ds.objects_beyond(3) == (2, 1)
    assert ds.objects_beyond(3, keep_crowd=True) == (3, 2)
    with caplog.at_level(logging.WARNING, logger="kdet.data"):
        examples = _examples(build_pipeline(ds, 64, 3, training=False, max_boxes=3))
        build_pipeline(ds, 64, 3, training=False, max_boxes=3)  # e.g. the next epoch
    warnings = [r.getMessage() for r in caplog.records if "max_boxes" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 object(s) in 1 image(s) lie beyond max_boxes=3" in warnings[0]
    assert "most objects in one image: 5" in warnings[0]
    np.testing.assert_array_equal(examples[0]["labels"], [0, 1, 0])  # the first 3 stay


def test_max_boxes_none_keeps_every_object():
    from kdet.data import DetectionDataset

    ds = DetectionDataset.from_records(_crowded_records(), ["a", "b"])
    examples = _examples(build_pipeline(ds, 64, 3, training=False, max_boxes=None))
    assert examples[0]["boxes"].shape == (5, 4)  # the most objects in one image
    for ex, record in zip(examples, ds.records):
        keep = record["iscrowd"] == 0
        np.testing.assert_array_equal(ex["labels"][_valid(ex)], record["labels"][keep])
        np.testing.assert_allclose(ex["boxes"][_valid(ex)], record["boxes"][keep])
    with pytest.raises(ValueError, match="max_boxes=None"):
        build_pipeline(ds.as_tf_dataset(), 64, 3, training=False, max_boxes=None)


def _pycocotools_objects_per_image(shared_data):
    """image id -> non-crowd annotations, counted by pycocotools (the pipeline drops crowd)."""
    from pycocotools.coco import COCO

    coco = COCO(str(shared_data / "coco128/annotations/instances_train2017.json"))
    return {i: len(coco.getAnnIds(imgIds=[i], iscrowd=False)) for i in coco.getImgIds()}


def test_workflow_max_boxes_from_the_data_and_training_log(shared_data, caplog):
    import logging

    from kdet.workflow import data as wdata
    from kdet.workflow.config import resolve

    per_image = _pycocotools_objects_per_image(shared_data)
    assert resolve("train", file_config={"format": "shapes"})["max_boxes"] is None
    config = {"format": "coco", "train_images": str(shared_data / "coco128/train2017"),
              "train_data": str(shared_data / "coco128/annotations/instances_train2017.json")}
    train = wdata.read_dataset(config, "train")
    batches = wdata.training_batches(train, 64, 2, steps_per_epoch=1, first_epoch=0, epochs=1)
    assert batches.element_spec[1]["boxes"].shape[1] == max(per_image.values()) == 42
    assert wdata.evaluation_batches(train, 64, 2).element_spec[1]["boxes"].shape[1] == 42
    train = train.subset(range(24))  # a few images decode faster
    counts = np.array([per_image[r["image_id"]] for r in train.records])
    with caplog.at_level(logging.WARNING, logger="kdet.data"):
        batches = wdata.training_batches(train, 64, 2, steps_per_epoch=1, first_epoch=0,
                                         epochs=3, max_boxes=5)
        assert len(list(batches)) == 3
    dropped, images = int(np.maximum(counts - 5, 0).sum()), int((counts > 5).sum())
    assert dropped > 0
    warnings = [r.getMessage() for r in caplog.records if "max_boxes=5" in r.getMessage()]
    assert warnings == [f"{train.source}: {dropped} object(s) in {images} image(s) lie beyond "
                        f"max_boxes=5 and are dropped (most objects in one image: {counts.max()}; "
                        f"pass max_boxes={counts.max()}, or None, to keep them)"]


def test_torchvision_resize_rule(shared_data):
    """min_size/max_size: torchvision's rule (sizes from kdet.models.detector's
    torchvision_resized_size, itself checked against GeneralizedRCNNTransform), padded
    into the square; scaled down here (128 / 213 into 224) to stay fast."""
    from kdet.models.detector import torchvision_resized_size
    coco = COCODataset(shared_data / "coco128/annotations/instances_train2017.json",
                       shared_data / "coco128/train2017").subset(range(4))
    size, min_size, max_size = 224, 128, 213
    examples = _examples(build_pipeline(coco, size, 4, training=False, keep_crowd=True,
                                        min_size=min_size, max_size=max_size))
    shapes = set()
    for index, ex in enumerate(examples):
        ref = coco[index]
        h, w = ref["original_size"]
        scale = min(min_size / min(h, w), max_size / max(h, w))
        assert ex["scale"] == pytest.approx(scale, rel=1e-6)
        nh, nw = torchvision_resized_size(h, w, min_size, max_size)
        shapes.add((nh, nw))
        np.testing.assert_allclose(ex["image"][:nh, :nw], _bilinear(ref["image"], nh, nw),
                                   atol=0.05)
        assert (ex["image"][nh:] == 0).all() and (ex["image"][:, nw:] == 0).all()
        assert ex["image"][nh - 1, nw - 1].any()  # the content reaches the floored size
        n = len(ref["labels"])
        np.testing.assert_allclose(ex["boxes"][:n], np.minimum(ref["boxes"] * scale,
                                                               [nw, nh, nw, nh]), atol=2e-3)
    assert len(shapes) > 1  # landscape and portrait images


def test_torchvision_resize_rule_too_large_is_an_error(shapes):
    import tensorflow as tf
    ds = build_pipeline(shapes, 64, 2, training=False, min_size=96, max_size=200)
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than image_size=64"):
        next(iter(ds))
