"""Readers on the real datasets of ../shared/data, checked against the raw files
read independently (json / csv / txt / PIL / pycocotools)."""
import csv
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageOps

from kdet.data import COCODataset, MaskFolderDataset, VOCDataset, YOLODataset
from kdet.data.dataset import DetectionDataset, tf_apply_exif_orientation

COCO_PERSON_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # torchvision


def coco128(shared_data, **kw):
    return COCODataset(shared_data / "coco128/annotations/instances_train2017.json",
                       shared_data / "coco128/train2017", **kw)


def test_coco128_boxes_labels_against_raw_json(shared_data):
    raw = json.load(open(shared_data / "coco128/annotations/instances_train2017.json"))
    ds = coco128(shared_data)
    assert len(ds) == 128 and not ds.problems
    assert ds.num_classes == 80
    cat_ids = sorted(c["id"] for c in raw["categories"])
    names = {c["id"]: c["name"] for c in raw["categories"]}
    by_image = {r["image_id"]: r for r in ds.records}
    # the first annotation of the file, by hand
    a = raw["annotations"][0]
    rec = by_image[a["image_id"]]
    k = list(rec["annotation_ids"]).index(a["id"])
    x, y, w, h = a["bbox"]
    np.testing.assert_allclose(rec["boxes"][k], [x, y, x + w, y + h], rtol=0, atol=1e-4)
    assert rec["labels"][k] == cat_ids.index(a["category_id"])
    assert ds.label_to_category_id[int(rec["labels"][k])] == a["category_id"]
    assert ds.class_names[rec["labels"][k]] == names[a["category_id"]]
    # every annotation
    n = 0
    for a in raw["annotations"]:
        rec = by_image[a["image_id"]]
        k = list(rec["annotation_ids"]).index(a["id"])
        x, y, w, h = a["bbox"]
        np.testing.assert_allclose(rec["boxes"][k], [x, y, x + w, y + h], atol=1e-3)
        assert ds.category_id_to_label[a["category_id"]] == rec["labels"][k]
        assert rec["iscrowd"][k] == a["iscrowd"]
        n += 1
    info = ds.inspect()
    assert info["num_objects"] == n == 939
    assert info["num_crowd"] == 10 and info["num_negative_images"] == 2
    assert info["class_histogram"]["person"] == 259
    sizes = {im["id"]: [im["height"], im["width"]] for im in raw["images"]}
    assert all(r["original_size"].tolist() == sizes[r["image_id"]] for r in ds.records)


def test_coco128_masks_match_pycocotools(shared_data):
    from pycocotools.coco import COCO

    ann_file = str(shared_data / "coco128/annotations/instances_train2017.json")
    coco = COCO(ann_file)
    ds = coco128(shared_data, include_masks=True)
    crowd_images = [i for i, r in enumerate(ds.records) if r["iscrowd"].any()]
    for index in [0, 1, crowd_images[0]]:
        rec = ds.records[index]
        masks = ds[index]["masks"]
        assert masks.dtype == np.uint8
        assert masks.shape == (len(rec["labels"]), *rec["original_size"])
        for k, ann_id in enumerate(rec["annotation_ids"]):
            np.testing.assert_array_equal(masks[k], coco.annToMask(coco.anns[int(ann_id)]))


def test_coco_keypoints_mmpose(shared_data):
    root = shared_data / "keypoints/mmpose_coco"
    raw = json.load(open(root / "test_coco.json"))
    ds = COCODataset(root / "test_coco.json", root, include_keypoints=True)
    assert list(ds.keypoint_flip_map) == COCO_PERSON_FLIP
    assert ds.num_keypoints == 17 and ds.class_names == ("person",)
    assert sum(len(r["labels"]) for r in ds.records) == 14
    by_image = {r["image_id"]: r for r in ds.records}
    for a in raw["annotations"]:
        rec = by_image[a["image_id"]]
        k = list(rec["annotation_ids"]).index(a["id"])
        np.testing.assert_array_equal(rec["keypoints"][k],
                                      np.array(a["keypoints"], np.float32).reshape(17, 3))


def test_coco_mini_keypoints_negatives_and_crowd(shared_data):
    root = shared_data / "keypoints/coco_mini_val2017"
    ds = COCODataset(root / "annotations/person_keypoints_val2017.json", root / "val2017",
                     include_keypoints=True, include_masks=True)
    info = ds.inspect()
    assert info["num_images"] == 79 and info["num_objects"] == 118 and info["num_crowd"] == 1
    assert info["num_negative_images"] == 40  # images without a person are kept
    crowd = next(i for i, r in enumerate(ds.records) if r["iscrowd"].any())
    example = ds[crowd]
    k = int(np.flatnonzero(example["iscrowd"])[0])
    assert example["masks"][k].sum() > 0  # crowd RLE decoded
    assert example["keypoints"].shape[1:] == (17, 3)


def test_coco_ground_truth_scores_ap_1_with_pycocotools(shared_data):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    raw = json.load(open(shared_data / "coco128/annotations/instances_train2017.json"))
    ds = coco128(shared_data)
    gt_dict = ds.coco_ground_truth()
    gt = COCO()
    gt.dataset = gt_dict
    gt.createIndex()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0} for a in raw["annotations"] if not a["iscrowd"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    raw_area = {a["id"]: a["area"] for a in raw["annotations"]}
    assert all(a["area"] == pytest.approx(raw_area[a["id"]]) for a in gt_dict["annotations"])
    # resized ground truth: everything scaled by S / max(H, W)
    small = ds.coco_ground_truth(image_size=320)
    sizes = {im["id"]: (im["height"], im["width"]) for im in raw["images"]}
    for a, b in zip(gt_dict["annotations"], small["annotations"]):
        s = 320 / max(sizes[a["image_id"]])
        np.testing.assert_allclose(b["bbox"], np.array(a["bbox"]) * s, rtol=1e-6)
        assert b["area"] == pytest.approx(a["area"] * s * s)


def test_coco_ground_truth_segm_scores_ap_1(shared_data):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    raw = COCO(str(shared_data / "coco128/annotations/instances_train2017.json"))
    ds = coco128(shared_data, include_masks=True).subset(range(12))
    ids = {r["image_id"] for r in ds.records}
    gt = COCO()
    gt.dataset = ds.coco_ground_truth(include_masks=True)
    gt.createIndex()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"],
             "segmentation": raw.annToRLE(a), "score": 1.0}
            for a in raw.dataset["annotations"] if a["image_id"] in ids and not a["iscrowd"]]
    ev = COCOeval(gt, gt.loadRes(dets), "segm")
    ev.evaluate(), ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_voc_raccoon_against_csv(shared_data):
    ds = VOCDataset(shared_data / "raccoon")
    assert ds.class_names == ("raccoon",) and len(ds) == 200 and not ds.problems
    by_file = {r["file_name"].rsplit("/", 1)[-1]: r for r in ds.records}
    rows = []
    for split in ("train", "test"):
        with open(shared_data / f"raccoon/splits/{split}_labels.csv") as f:
            rows += list(csv.DictReader(f))
    assert len(rows) == sum(len(r["labels"]) for r in ds.records) == 217
    for row in rows:
        rec = by_file[row["filename"]]
        assert rec["original_size"].tolist() == [int(row["height"]), int(row["width"])]
        raw = [int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
        expected = [raw[0] - 1, raw[1] - 1, raw[2], raw[3]]  # 1-based inclusive -> 0-based
        assert any(np.array_equal(b, expected) for b in rec["boxes"]), row
    assert sum(int(r["truncated"].sum()) for r in ds.records) == 59
    assert all(r["difficult"].sum() == 0 for r in ds.records)


def test_voc_raccoon_first_box_by_hand(shared_data):
    ds = VOCDataset(annotation_dir=shared_data / "raccoon/annotations",
                    image_dir=shared_data / "raccoon/images", class_names=["raccoon"])
    rec = next(r for r in ds.records if r["file_name"].endswith("/raccoon-1.jpg"))
    np.testing.assert_array_equal(rec["boxes"], [[80, 87, 522, 408]])  # XML: 81 88 522 408
    assert rec["original_size"].tolist() == [417, 650]


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_voc_bad_folder_sizes_from_images_and_decoding(shared_data):
    ds = VOCDataset(shared_data / "bad")
    assert ds.problems == {"size_from_image": 5}
    assert ds.class_names == ("apple", "banana", "orange")
    expected_wh = {"apple_1": (349, 349), "apple_17": (700, 800), "apple_37": (389, 352),
                   "orange_1": (640, 347), "mixed_16": (439, 417)}
    for rec in ds.records:
        stem = re.sub(r".*/|\.jpg$", "", rec["file_name"])
        w, h = expected_wh[stem]
        assert rec["original_size"].tolist() == [h, w]
    # tf.io.decode_image sniffs PNG under .jpg; RGBA and palette become the same RGB as PIL's
    for example, rec in zip(ds.as_tf_dataset(), ds.records):
        with Image.open(rec["file_name"]) as im:
            reference = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(example["image"].numpy(), reference)
        np.testing.assert_array_equal(example["boxes"].numpy(), rec["boxes"])


def test_grayscale_jpeg_becomes_three_channels(shared_data):
    ds = VOCDataset(shared_data / "raccoon")
    index = next(i for i, r in enumerate(ds.records) if r["file_name"].endswith("/raccoon-150.jpg"))
    gray = ds.subset([index])
    image = next(iter(gray.as_tf_dataset()))["image"].numpy()
    assert image.shape == (*gray.records[0]["original_size"], 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    with Image.open(gray.records[0]["file_name"]) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(image[..., 0], np.asarray(im))


def test_pennfudan_boxes_from_masks_against_txt(shared_data):
    ds = MaskFolderDataset(shared_data / "pennfudan")
    assert len(ds) == 170 and sum(len(r["labels"]) for r in ds.records) == 423
    far = 0
    for rec in ds.records:
        stem = rec["file_name"].rsplit("/", 1)[-1][:-4]
        text = open(shared_data / f"pennfudan/Annotation/{stem}.txt").read()
        boxes = re.findall(r"\(Xmin, Ymin\) - \(Xmax, Ymax\) : \((\d+), (\d+)\) - "
                            r"\((\d+), (\d+)\)", text)
        txt = np.array([[int(a) - 1, int(b) - 1, int(c), int(d)] for a, b, c, d in boxes])
        assert len(txt) == len(rec["boxes"])
        diff = np.abs(txt - rec["boxes"]).max(1)
        assert diff.max() <= 6
        far += int((diff > 2).sum())
    assert far == 2  # the README's two known disagreements


def test_pennfudan_masks_are_instance_ids(shared_data):
    ds = MaskFolderDataset(shared_data / "pennfudan").subset([0, 5])
    for index, example in enumerate(ds.as_tf_dataset()):
        rec = ds.records[index]
        ids = np.asarray(Image.open(rec["mask_file"]))
        masks = example["masks"].numpy()
        assert masks.shape == (len(rec["labels"]), *ids.shape)
        for k in range(len(masks)):
            np.testing.assert_array_equal(masks[k], ids == k + 1)
            rows, cols = np.nonzero(masks[k])
            np.testing.assert_array_equal(example["boxes"].numpy()[k],
                                          [cols.min(), rows.min(), cols.max() + 1,
                                           rows.max() + 1])


def test_tf_dataset_equals_numpy_view(shared_data):
    ds = coco128(shared_data, include_masks=True).subset(range(3))
    for index, example in enumerate(ds.as_tf_dataset()):
        ref = ds[index]
        assert example["image"].dtype.name == "uint8" and example["image_id"].dtype.name == "int64"
        for key in ("image", "image_id", "boxes", "labels", "iscrowd", "masks",
                    "original_size"):
            np.testing.assert_array_equal(example[key].numpy(), ref[key], err_msg=key)


def test_in_memory_records():
    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    ds = DetectionDataset([{"image_id": 3, "image": image, "boxes": [[1, 2, 10, 20]],
                            "labels": [1]}], class_names=["a", "b"])
    example = next(iter(ds.as_tf_dataset()))
    np.testing.assert_array_equal(example["image"].numpy(), image)
    assert example["original_size"].numpy().tolist() == [30, 40]
    assert ds.label_to_category_id == {0: 1, 1: 2}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation, rng):
    array = rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.info["exif"] = exif.tobytes()
    reference = np.asarray(ImageOps.exif_transpose(_with_exif(im, exif)))
    np.testing.assert_array_equal(tf_apply_exif_orientation(array, orientation).numpy(),
                                  reference)


def _with_exif(im, exif):
    import io

    buffer = io.BytesIO()
    im.save(buffer, format="PNG", exif=exif)
    buffer.seek(0)
    return Image.open(buffer)


def test_exif_rotated_file_through_yolo_reader(tmp_path, rng):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    array = rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)  # stored 40 wide, 20 high
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: 20 wide, 40 high
    im.save(tmp_path / "images/a.png", exif=exif)
    (tmp_path / "labels/a.txt").write_text("0 0.5 0.25 0.5 0.5\n")
    ds = YOLODataset(images_dir=tmp_path / "images", class_names=["x"])
    rec = ds.records[0]
    assert rec["original_size"].tolist() == [40, 20] and rec["orientation"] == 6
    np.testing.assert_allclose(rec["boxes"], [[5, 0, 15, 20]])
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "images/a.png")))
    np.testing.assert_array_equal(next(iter(ds.as_tf_dataset()))["image"].numpy(), expected)
    np.testing.assert_array_equal(ds[0]["image"], expected)
