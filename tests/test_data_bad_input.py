"""Every bad-input case: ``on_error="raise"`` names file + record + problem,
``on_error="skip"`` drops/fixes and counts; never NaN or silently wrong boxes."""
import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from kdet.data import COCODataset, MaskFolderDataset, VOCDataset, YOLODataset
from kdet.data.errors import ProblemLog, sanitize_boxes


def _image(path, width=64, height=48, fmt=None):
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path, format=fmt)


def _coco(tmp_path, annotations, images=None, categories=None, make_images=True):
    images = images or [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                        {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48}]
    if make_images:
        for im in images:
            if not (tmp_path / im["file_name"]).exists():
                _image(tmp_path / im["file_name"], im["width"], im["height"], "JPEG")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}))
    return path


def _ann(i, image_id, bbox, category=3, **kw):
    return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": category,
            "iscrowd": 0, "area": 1.0, **kw}


GOOD = [_ann(1, 1, [10, 10, 20, 20]), _ann(2, 2, [5, 5, 10, 10], category=7)]


def _both(tmp_path, annotations, **kw):
    """(error raised with on_error='raise', dataset read with 'skip')."""
    path = _coco(tmp_path, annotations, **kw)
    with pytest.raises(ValueError) as info:
        COCODataset(path, tmp_path)
    return str(info.value), COCODataset(path, tmp_path, on_error="skip")


def test_good_coco_loads_clean(tmp_path):
    ds = COCODataset(_coco(tmp_path, GOOD), tmp_path)
    assert not ds.problems and len(ds) == 2
    np.testing.assert_array_equal(ds.records[1]["boxes"], [[5, 5, 15, 15]])
    assert ds.records[1]["labels"].tolist() == [1]


def test_malformed_json_names_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    for mode in ("raise", "skip"):  # a whole file cannot be skipped
        with pytest.raises(ValueError, match=r"broken\.json: malformed JSON"):
            COCODataset(path, tmp_path, on_error=mode)
    with pytest.raises(ValueError, match="not found"):
        COCODataset(tmp_path / "nope.json", tmp_path)


def test_malformed_annotation_entry(tmp_path):
    message, ds = _both(tmp_path, GOOD + [_ann(9, 1, "oops")])
    assert "ann.json: image id 1 (a.jpg), annotation id 9" in message
    assert "malformed_annotation" in message
    assert ds.problems == {"malformed_annotation": 1}
    assert sum(len(r["labels"]) for r in ds.records) == 2


def test_missing_image_file(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
              {"id": 5, "file_name": "gone.jpg", "width": 64, "height": 48}]
    _image(tmp_path / "a.jpg")
    message, ds = _both(tmp_path, GOOD[:1], images=images, make_images=False)
    assert "image id 5 (gone.jpg)" in message and "not found" in message
    assert ds.problems == {"missing_image": 1} and [r["image_id"] for r in ds.records] == [1]


def test_corrupt_image_file(tmp_path):
    _image(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"this is not an image")
    message, ds = _both(tmp_path, GOOD)
    assert "b.jpg" in message and "corrupt_image" in message
    assert ds.problems == {"corrupt_image": 1} and len(ds) == 1


def test_truncated_jpeg_needs_full_check(tmp_path):
    _image(tmp_path / "a.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(
        tmp_path / "b.jpg", format="JPEG")
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[:len(data) // 2])
    path = _coco(tmp_path, GOOD)
    assert len(COCODataset(path, tmp_path)) == 2  # the header is intact
    ds = COCODataset(path, tmp_path, on_error="skip", check_images="full")
    assert ds.problems == {"corrupt_image": 1} and len(ds) == 1


@pytest.mark.parametrize("bbox,kind", [([10, 10, 0, 5], "degenerate_box"),
                                       ([10, 10, 5, -3], "degenerate_box"),
                                       ([float("nan"), 1, 2, 3], "non_finite_box"),
                                       ([100, 100, 5, 5], "box_outside_image")])
def test_bad_boxes(tmp_path, bbox, kind):
    message, ds = _both(tmp_path, GOOD + [_ann(9, 1, bbox)])
    assert "annotation id 9" in message and kind in message
    assert ds.problems == {kind: 1}
    rec = ds.records[0]
    np.testing.assert_array_equal(rec["boxes"], [[10, 10, 30, 30]])  # the good one stays


def test_box_partly_outside_is_clipped_and_counted(tmp_path):
    ds = COCODataset(_coco(tmp_path, [_ann(1, 1, [-5, 40, 30, 20])]), tmp_path)  # raise mode
    np.testing.assert_array_equal(ds.records[0]["boxes"], [[0, 40, 25, 48]])
    assert ds.problems == {"box_clipped": 1}


def test_unknown_category(tmp_path):
    message, ds = _both(tmp_path, GOOD + [_ann(9, 2, [1, 1, 5, 5], category=99)])
    assert "category_id 99" in message and "unknown_class" in message
    assert ds.problems == {"unknown_class": 1}


def test_size_mismatch(tmp_path):
    _image(tmp_path / "a.jpg", 64, 48)
    _image(tmp_path / "b.jpg", 50, 48)  # JSON says 64 wide
    message, ds = _both(tmp_path, GOOD)
    assert "b.jpg" in message and "JSON says 64x48, file is 50x48" in message
    assert ds.problems == {"size_mismatch": 1}


def test_huge_image(tmp_path):
    path = _coco(tmp_path, GOOD)
    with pytest.raises(ValueError, match="max_pixels=1000"):
        COCODataset(path, tmp_path, max_pixels=1000)
    ds = COCODataset(path, tmp_path, on_error="skip", max_pixels=1000)
    assert ds.problems == {"image_too_large": 2} and len(ds) == 0


def test_duplicate_image_id(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
              {"id": 1, "file_name": "b.jpg", "width": 64, "height": 48}]
    message, ds = _both(tmp_path, GOOD[:1], images=images)
    assert "duplicate_image_id" in message and ds.problems == {"duplicate_image_id": 1}


def test_empty_images_are_kept_as_negatives(tmp_path):
    ds = COCODataset(_coco(tmp_path, GOOD[:1]), tmp_path)
    assert len(ds) == 2 and ds.inspect()["num_negative_images"] == 1
    example = list(ds.as_tf_dataset())[1]
    assert example["boxes"].shape == (0, 4) and example["labels"].shape == (0,)


def test_bad_segmentation_with_masks(tmp_path):
    bad = _ann(9, 1, [1, 1, 5, 5], segmentation=[[1, 2, 3]])
    path = _coco(tmp_path, [dict(a, segmentation=[[10, 10, 30, 10, 30, 30]]) for a in GOOD]
                 + [bad])
    assert not COCODataset(path, tmp_path).problems  # without masks it is not read
    with pytest.raises(ValueError, match="annotation id 9.*polygon"):
        COCODataset(path, tmp_path, include_masks=True)
    ds = COCODataset(path, tmp_path, include_masks=True, on_error="skip")
    assert ds.problems == {"bad_mask": 1}
    assert ds[0]["masks"].shape == (1, 48, 64)


def test_skip_logs_a_warning_summary(tmp_path, caplog):
    path = _coco(tmp_path, GOOD + [_ann(8, 1, [1, 1, 0, 0]), _ann(9, 1, [1, 1, 0, 3])])
    with caplog.at_level(logging.WARNING, logger="kdet.data"):
        ds = COCODataset(path, tmp_path, on_error="skip")
    assert ds.problems == {"degenerate_box": 2}
    assert "degenerate_box: 2" in caplog.text and "annotation id 8" in caplog.text
    assert ds.inspect()["problems"] == {"degenerate_box": 2}


def test_on_error_value_checked():
    with pytest.raises(ValueError, match="on_error"):
        ProblemLog("ignore")


def test_sanitize_boxes_never_returns_nan_or_outside(rng):
    boxes = rng.normal(30, 40, (200, 4))
    boxes[::7] = np.nan
    log = ProblemLog("skip")
    out, keep = sanitize_boxes(boxes, 48, 64, log, str)
    kept = out[keep]
    assert np.isfinite(kept).all()
    assert (kept[:, 2] > kept[:, 0]).all() and (kept[:, 3] > kept[:, 1]).all()
    assert (kept >= 0).all() and (kept[:, [0, 2]] <= 64).all() and (kept[:, [1, 3]] <= 48).all()
    # every dropped box is counted once
    assert sum(log.counts[k] for k in log.counts if k != "box_clipped") == (~keep).sum()


# ---- VOC -------------------------------------------------------------------------
def _voc(tmp_path, objects, size=(64, 48), name="a"):
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "images").mkdir(exist_ok=True)
    if not (tmp_path / "images" / f"{name}.jpg").exists():
        _image(tmp_path / "images" / f"{name}.jpg", 64, 48, "JPEG")
    body = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects)
    (tmp_path / "annotations" / f"{name}.xml").write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"
        f"{body}</annotation>")


def test_voc_malformed_xml(tmp_path):
    _voc(tmp_path, [("cat", (1, 1, 10, 10), 0)])
    _voc(tmp_path, [("cat", (1, 1, 10, 10), 0)], name="b")
    (tmp_path / "annotations/b.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match=r"b\.xml: malformed XML"):
        VOCDataset(tmp_path)
    ds = VOCDataset(tmp_path, on_error="skip")
    assert ds.problems == {"malformed_annotation": 1} and len(ds) == 1


def test_voc_non_numeric_coordinate(tmp_path):
    _voc(tmp_path, [("cat", (1, "x", 10, 10), 0)])
    with pytest.raises(ValueError, match=r"a\.xml: object 0: <ymin> is 'x'"):
        VOCDataset(tmp_path)


def test_voc_unknown_class_inverted_box_difficult(tmp_path):
    _voc(tmp_path, [("cat", (1, 1, 10, 10), 1), ("cow", (1, 1, 10, 10), 0),
                    ("cat", (20, 5, 10, 30), 0)])
    with pytest.raises(ValueError, match=r"a\.xml: object 1: class 'cow' not in class_names"):
        VOCDataset(tmp_path, class_names=["cat"])
    ds = VOCDataset(tmp_path, class_names=["cat"], on_error="skip")
    assert ds.problems == {"unknown_class": 1, "degenerate_box": 1}
    rec = ds.records[0]
    np.testing.assert_array_equal(rec["boxes"], [[0, 0, 10, 10]])
    assert rec["difficult"].tolist() == [1]
    assert len(VOCDataset(tmp_path, class_names=["cat", "cow"], on_error="skip",
                          include_difficult=False).records[0]["labels"]) == 1


def test_voc_size_mismatch_and_missing_image(tmp_path):
    _voc(tmp_path, [("cat", (1, 1, 10, 10), 0)], size=(100, 48))
    with pytest.raises(ValueError, match=r"<size> says 100x48, image .*a\.jpg is 64x48"):
        VOCDataset(tmp_path)
    _voc(tmp_path, [("cat", (1, 1, 10, 10), 0)], name="b")
    (tmp_path / "images/b.jpg").unlink()
    ds = VOCDataset(tmp_path, on_error="skip")
    assert ds.problems == {"size_mismatch": 1, "missing_image": 1} and len(ds) == 0


def test_voc_bad_folder_copy_with_extra_faults(shared_data, tmp_path):
    shutil.copytree(shared_data / "bad", tmp_path / "bad")
    (tmp_path / "bad/images/apple_17.jpg").unlink()
    ds = VOCDataset(tmp_path / "bad", on_error="skip")
    assert ds.problems == {"size_from_image": 4, "missing_image": 1} and len(ds) == 4


# ---- YOLO / mask folders ------------------------------------------------------------
def test_yolo_bad_lines(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _image(tmp_path / "images/a.png", 100, 50)
    (tmp_path / "labels/a.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n"     # good: [40, 15, 60, 35]
        "7 0.5 0.5 0.2 0.2\n"     # class outside 0..1
        "1 0.5 x 0.2 0.2\n"       # not a number
        "1 0.5 0.5 0.2\n"         # wrong length
        "1 nan 0.5 0.2 0.2\n"     # NaN
        "1 0.95 0.5 0.2 0.2\n")   # partly outside: clipped to [85, 20, 100, 30]
    with pytest.raises(ValueError, match=r"a\.txt: line 2: class 7 outside 0\.\.1"):
        YOLODataset(images_dir=tmp_path / "images", class_names=["a", "b"])
    ds = YOLODataset(images_dir=tmp_path / "images", class_names=["a", "b"], on_error="skip")
    assert ds.problems == {"unknown_class": 1, "malformed_annotation": 2, "non_finite_box": 1,
                           "box_clipped": 1}
    np.testing.assert_allclose(ds.records[0]["boxes"], [[40, 15, 60, 35], [85, 20, 100, 30]],
                               atol=1e-4)


def test_mask_folder_size_mismatch_and_missing_mask(tmp_path):
    (tmp_path / "PNGImages").mkdir()
    (tmp_path / "PedMasks").mkdir()
    for stem in ("a", "b", "c"):
        _image(tmp_path / f"PNGImages/{stem}.png", 64, 48)
    ids = np.zeros((48, 64), np.uint8)
    ids[5:10, 20:30] = 1
    Image.fromarray(ids).save(tmp_path / "PedMasks/a_mask.png")
    Image.fromarray(ids[:40]).save(tmp_path / "PedMasks/b_mask.png")
    with pytest.raises(ValueError, match=r"b\.png: mask .*b_mask\.png is 64x40, image is 64x48"):
        MaskFolderDataset(tmp_path)
    ds = MaskFolderDataset(tmp_path, on_error="skip")
    assert ds.problems == {"size_mismatch": 1, "missing_image": 1}
    np.testing.assert_array_equal(ds.records[0]["boxes"], [[20, 5, 30, 10]])


# ---- files that pass the header check but do not decode (issue #10, item 5) ---------
def _cut(data, cut):
    """``data`` truncated: ``cut`` is a byte count, ``"half"`` or ``"len-k"``."""
    if cut == "half":
        return data[:len(data) // 2]
    if isinstance(cut, str) and cut.startswith("len-"):
        return data[:len(data) - int(cut[4:])]
    return data[:cut]


def _images_per_epoch(batches):
    return sum(int(images.shape[0]) for images, _ in batches)


def _bad_copy(shared_data, tmp_path, cut):
    """A copy of shared/data/bad with apple_17.jpg (a PNG, 364745 bytes) cut."""
    root = tmp_path / "bad"
    shutil.copytree(shared_data / "bad", root)
    target = root / "images/apple_17.jpg"
    data = target.read_bytes()
    target.chmod(0o644)
    target.write_bytes(_cut(data, cut))
    return root, target


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("cut", [0, 100, "half", "len-2"])
def test_cut_image_in_real_set_skipped_and_counted_during_training(shared_data, tmp_path,
                                                                   cut, caplog):
    from kdet.data import build_pipeline

    root, target = _bad_copy(shared_data, tmp_path, cut)
    ds = VOCDataset(root, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="kdet.data"):
        # before the fix the cuts past the header ended this epoch with a bare
        # InvalidArgumentError from tf.io.decode_image
        batches = build_pipeline(ds, 64, 2, training=True, seed=0, drop_remainder=False)
        assert _images_per_epoch(batches) == 4
    assert len(ds) == 4 and ds.problems["corrupt_image"] == 1
    assert all(not r["file_name"].endswith("apple_17.jpg") for r in ds.records)
    assert "apple_17.jpg" in caplog.text  # the skipped file is named in the log


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("cut", [0, "half", "len-2"])
def test_cut_image_in_real_set_raise_names_the_file_before_training(shared_data, tmp_path, cut):
    from kdet.data import build_pipeline

    root, target = _bad_copy(shared_data, tmp_path, cut)
    with pytest.raises(ValueError, match=r"apple_17\.jpg.*\[corrupt_image\]"):
        ds = VOCDataset(root)  # a cut inside the header raises here...
        build_pipeline(ds, 64, 2, training=True)  # ...the others here, before any batch


def _noise_jpeg_bytes(tmp_path):
    path = tmp_path / "noise.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(
        path, format="JPEG", quality=90)
    return path.read_bytes()


@pytest.mark.parametrize("content", ["zero-byte", "text", 10, 100, "half", "len-2"])
def test_bad_jpeg_file_skip_and_raise(tmp_path, content, caplog):
    from kdet.data import build_pipeline

    data = {"zero-byte": b"", "text": b"not an image, but named b.jpg\n"}.get(content)
    if data is None:
        data = _cut(_noise_jpeg_bytes(tmp_path), content)
    _image(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(data)
    path = _coco(tmp_path, GOOD)
    with pytest.raises(ValueError, match=r"b\.jpg.*\[corrupt_image\]"):
        build_pipeline(COCODataset(path, tmp_path), 32, 1, training=False)
    ds = COCODataset(path, tmp_path, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="kdet.data"):
        assert _images_per_epoch(build_pipeline(ds, 32, 1, training=False)) == 1
    assert ds.problems == {"corrupt_image": 1} and [r["image_id"] for r in ds.records] == [1]
    assert "b.jpg" in caplog.text


def test_decoders_disagree_and_either_failure_is_bad(shared_data, tmp_path):
    """A PNG cut inside its end chunk: PIL decodes it, TF does not. kdet reads pixels with
    both (numpy view: PIL, tf.data view: TF), so it counts as bad."""
    import tensorflow as tf

    data = (shared_data / "bad/images/apple_37.jpg").read_bytes()[:-2]
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # PIL: fine
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(data, channels=3)
    _image(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(data)
    path = _coco(tmp_path, GOOD, images=[{"id": 1, "file_name": "a.jpg", "width": 64,
                                          "height": 48},
                                         {"id": 2, "file_name": "b.jpg", "width": 389,
                                          "height": 352}])
    ds = COCODataset(path, tmp_path, on_error="skip", check_images="full")  # PIL passes it
    assert len(ds) == 2
    assert ds.check_pixels() == [str(tmp_path / "b.jpg")]
    assert ds.problems == {"corrupt_image": 1} and len(ds) == 1
    assert ds.check_pixels() == [] and ds.pixels_checked  # once per dataset


def test_check_pixels_leaves_good_sets_alone(shared_data):
    from kdet.data import ShapesDataset

    ds = VOCDataset(shared_data / "bad")
    assert ds.check_pixels() == [] and len(ds) == 5 and "corrupt_image" not in ds.problems
    assert ShapesDataset(2, image_size=32, seed=0).check_pixels() == []


def test_cut_image_in_tfrecord_is_skipped_by_record(tmp_path):
    from kdet.data import TFRecordDataset, build_pipeline, write_tfrecord

    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2, 3)]
    for im in images:
        _image(tmp_path / im["file_name"], fmt="JPEG")
    data = _noise_jpeg_bytes(tmp_path)
    (tmp_path / "2.jpg").write_bytes(_cut(data, "half"))
    anns = [_ann(i, i, [5, 5, 10, 10]) for i in (1, 2, 3)]
    source = COCODataset(_coco(tmp_path, anns, images=images, make_images=False), tmp_path)
    write_tfrecord(source, str(tmp_path / "data.tfrecord"))  # copies the file bytes as they are
    with pytest.raises(ValueError, match=r"data\.tfrecord: record 1 \(2\.jpg\)"):
        build_pipeline(TFRecordDataset(str(tmp_path / "data.tfrecord")), 32, 1, training=False)
    ds = TFRecordDataset(str(tmp_path / "data.tfrecord"), on_error="skip")
    ids = [int(i) for _, t in build_pipeline(ds, 32, 1, training=False)
           for i in t["image_id"].numpy()]
    assert ids == [1, 3] and ds.problems == {"corrupt_image": 1}


def test_workflow_reads_skip_the_bad_file_once_and_train_an_epoch(tmp_path, caplog):
    from kdet.workflow import data as wdata

    _image(tmp_path / "a.jpg")
    _image(tmp_path / "c.jpg")
    (tmp_path / "b.jpg").write_bytes(_cut(_noise_jpeg_bytes(tmp_path), "half"))
    images = [{"id": i, "file_name": f"{n}.jpg", "width": 64, "height": 48}
              for i, n in ((1, "a"), (2, "b"), (3, "c"))]
    path = _coco(tmp_path, GOOD, images=images, make_images=False)
    config = {"format": "coco", "train_data": str(path), "train_images": str(tmp_path)}
    with pytest.raises(ValueError, match=r"b\.jpg.*\[corrupt_image\]"):
        wdata.read_dataset(config, "train")
    with caplog.at_level(logging.WARNING, logger="kdet.data"):
        train = wdata.read_dataset(dict(config, on_error="skip"), "train")
    assert len(train) == 2 and train.problems == {"corrupt_image": 1}
    assert caplog.text.count("b.jpg") == 1
    batches = wdata.training_batches(train, 32, 2, steps_per_epoch=3, first_epoch=0, epochs=2)
    assert _images_per_epoch(batches) == 2 * 3 * 2


@pytest.mark.parametrize("content", [b"", b"GIF89a but not really an image"])
def test_unchecked_reader_still_skips_non_images_before_training(tmp_path, content):
    from kdet.data import build_pipeline

    _voc(tmp_path, [("cat", (1, 1, 10, 10), 0)])
    _voc(tmp_path, [("cat", (1, 1, 10, 10), 0)], name="b")
    (tmp_path / "images/b.jpg").write_bytes(content)
    # check_images="none" with sizes in the XML never opens the files
    ds = VOCDataset(tmp_path, check_images="none", on_error="skip")
    assert len(ds) == 2
    assert _images_per_epoch(build_pipeline(ds, 32, 2, training=True, seed=0,
                                            drop_remainder=False)) == 1
    assert ds.problems == {"corrupt_image": 1}
    with pytest.raises(ValueError, match=r"b\.jpg: image does not decode"):
        build_pipeline(VOCDataset(tmp_path, check_images="none"), 32, 2, training=True)
