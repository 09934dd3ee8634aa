"""Write then read: YOLO txt and TF OD API TFRecord give back the same examples."""
import numpy as np
import pytest
from PIL import Image

from kdet.data import (COCODataset, ShapesDataset, TFRecordDataset, VOCDataset, YOLODataset,
                       write_tfrecord, write_yolo)
from kdet.data.tfrecord import read_label_map


def _by_id(ds):
    return {r["image_id"]: r for r in ds.records}


def _assert_same_objects(a, b, atol):
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=atol, rtol=0)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["original_size"].tolist() == b["original_size"].tolist()


def test_yolo_round_trip_raccoon(shared_data, tmp_path):
    source = VOCDataset(shared_data / "raccoon").subset(range(20))
    yaml_path = write_yolo(source, tmp_path / "yolo", split="val")
    back = YOLODataset(yaml_path, split="val")
    assert back.class_names == source.class_names and len(back) == 20
    by_name = {r["file_name"].rsplit("/", 1)[-1].split("_", 1)[1]: r for r in back.records}
    for rec in source.records:
        _assert_same_objects(rec, by_name[rec["file_name"].rsplit("/", 1)[-1]], atol=1e-4)


def test_yolo_round_trip_shapes_in_memory_images(tmp_path):
    source = ShapesDataset(5, image_size=64, seed=3, size_range=(10, 30))
    back = YOLODataset(write_yolo(source, tmp_path / "shapes"))
    for index, rec in enumerate(back.records):
        ref_index = int(rec["file_name"].rsplit("/", 1)[-1].split(".")[0])
        _assert_same_objects(source.records[ref_index], rec, atol=1e-4)
        np.testing.assert_array_equal(back[index]["image"], source[ref_index]["image"])


def test_yolo_polygons_and_names_dict(tmp_path):
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "labels/train").mkdir(parents=True)
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "images/train/a.png")
    (tmp_path / "labels/train/a.txt").write_text("1 0.1 0.2 0.5 0.2 0.5 0.8 0.1 0.8\n")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: a\n  1: b\n")
    ds = YOLODataset(tmp_path / "data.yaml", include_masks=True)
    assert ds.class_names == ("a", "b")
    np.testing.assert_allclose(ds.records[0]["boxes"], [[10, 10, 50, 40]], atol=1e-5)
    mask = ds[0]["masks"][0]
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (10, 49, 10, 39)


def test_yolo_pose_rows(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "images/a.png")
    (tmp_path / "labels/a.txt").write_text("0 0.5 0.5 0.4 0.4 0.4 0.5 2 0.6 0.5 1 0 0 0\n")
    (tmp_path / "data.yaml").write_text(
        "train: images\nnames: [p]\nkpt_shape: [3, 3]\nflip_idx: [1, 0, 2]\n")
    ds = YOLODataset(tmp_path / "data.yaml")
    np.testing.assert_allclose(ds.records[0]["keypoints"][0],
                               [[40, 25, 2], [60, 25, 1], [0, 0, 0]], atol=1e-5)
    assert ds.keypoint_flip_map == (1, 0, 2)


def test_tfrecord_round_trip_shapes_masks_keypoints(tmp_path):
    source = ShapesDataset(6, image_size=64, seed=1, size_range=(12, 30))
    paths = write_tfrecord(source, str(tmp_path / "shapes.tfrecord"), num_shards=2)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["shapes.tfrecord-00000-of-00002",
                                                     "shapes.tfrecord-00001-of-00002"]
    back = TFRecordDataset(str(tmp_path / "shapes.tfrecord-*"))
    assert back.class_names == source.class_names and not back.problems
    assert back.keypoint_names == source.keypoint_names and back.has_masks
    assert back.label_to_category_id == source.label_to_category_id
    seen = set()
    for example in back.as_tf_dataset():
        i = int(example["image_id"])
        ref = source[i]
        seen.add(i)
        np.testing.assert_array_equal(example["image"].numpy(), ref["image"])
        np.testing.assert_array_equal(example["masks"].numpy(), ref["masks"])
        np.testing.assert_allclose(example["boxes"].numpy(), ref["boxes"], atol=1e-4)
        np.testing.assert_allclose(example["keypoints"].numpy(), ref["keypoints"], atol=1e-4)
        np.testing.assert_array_equal(example["labels"].numpy(), ref["labels"])
    assert seen == set(range(6))


def test_tfrecord_round_trip_coco_category_ids_crowd_masks(shared_data, tmp_path):
    source = COCODataset(shared_data / "coco128/annotations/instances_train2017.json",
                         shared_data / "coco128/train2017", include_masks=True)
    crowd = [i for i, r in enumerate(source.records) if r["iscrowd"].any()][:1]
    empty = [i for i, r in enumerate(source.records) if len(r["labels"]) == 0][:1]
    source = source.subset([0, 1] + crowd + empty)
    write_tfrecord(source, str(tmp_path / "coco.tfrecord"))
    items, _ = read_label_map(str(tmp_path / "label_map.pbtxt"))
    assert items[90] == "toothbrush" and len(items) == 80
    back = TFRecordDataset(str(tmp_path / "coco.tfrecord"))
    assert back.label_to_category_id == source.label_to_category_id
    assert back.class_names == source.class_names
    by_id = _by_id(source)
    for example in back.as_tf_dataset():
        rec = by_id[int(example["image_id"])]
        np.testing.assert_allclose(example["boxes"].numpy(), rec["boxes"], atol=1e-3)
        np.testing.assert_array_equal(example["labels"].numpy(), rec["labels"])
        np.testing.assert_array_equal(example["iscrowd"].numpy(), rec["iscrowd"])
        index = [r["image_id"] for r in source.records].index(rec["image_id"])
        np.testing.assert_array_equal(example["masks"].numpy(), source.load_masks(index))
        # the JPEG bytes are copied, so the pixels are the same decode
        np.testing.assert_array_equal(example["image"].numpy(), source.load_image(index))


def test_tfrecord_from_raw_records_and_problems(tmp_path):
    image = np.full((20, 30, 3), 7, np.uint8)
    records = [{"image_id": 1, "image": image, "boxes": [[1, 2, 10, 12]], "labels": [0]},
               {"image_id": 2, "image": image, "boxes": [[25, 2, 40, 12]], "labels": [1]}]
    with pytest.raises(ValueError, match="class_names"):
        write_tfrecord(records, str(tmp_path / "r.tfrecord"))
    with pytest.raises(ValueError, match=r"record 1 \(image_id 2\): object 0: label 1 outside"):
        write_tfrecord(records, str(tmp_path / "r.tfrecord"), class_names=["a"])
    write_tfrecord(records, str(tmp_path / "r.tfrecord"), class_names=["a", "b"])
    # a label map without class 2 ("b"): unknown class
    (tmp_path / "only_a.pbtxt").write_text("item { id: 1 name: 'a' }\n")
    with pytest.raises(ValueError, match=r"r\.tfrecord: record 1: object 0: class 2 not in"):
        TFRecordDataset(str(tmp_path / "r.tfrecord"), label_map=str(tmp_path / "only_a.pbtxt"))
    ds = TFRecordDataset(str(tmp_path / "r.tfrecord"), label_map=str(tmp_path / "only_a.pbtxt"),
                         on_error="skip")
    assert ds.problems == {"unknown_class": 1}
    # the second record's box reached past the 30 px border: clipped before writing
    full = TFRecordDataset(str(tmp_path / "r.tfrecord"))
    np.testing.assert_allclose(full.records[1]["boxes"], [[25, 2, 30, 12]], atol=1e-4)
    assert not full.problems
    subset = full.subset([1])
    example = next(iter(subset.as_tf_dataset()))
    assert int(example["image_id"]) == 2


def test_tfrecord_corrupt_file(tmp_path):
    (tmp_path / "x.tfrecord").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match=r"x\.tfrecord"):
        TFRecordDataset(str(tmp_path / "x.tfrecord"))
    with pytest.raises(ValueError, match="no TFRecord files"):
        TFRecordDataset(str(tmp_path / "none-*"))
