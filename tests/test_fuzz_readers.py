"""Property-based fuzzing of the COCO / VOC / YOLO readers and of COCOEvaluator input.

Small valid files are corrupted at random (bytes deleted, inserted, replaced,
truncated; fields set to wrong types, NaN, inf, huge or negative values; keys
dropped; ids duplicated; malformed XML; extra columns). The property: the
reader either returns a correct result (records of untouched images exactly
as expected; every box finite, inside its image and of positive size; and,
where the corruption left the value meaningful, the value the format's
definition gives) or raises ``ValueError`` naming the file and the record.
Never another exception, a hang or a NaN.

The code under test is NumPy / PIL / pycocotools only, so these tests run
under the TensorFlow backend and skip under the others (the suite runs on
both backends; running them twice would test nothing new).
"""
import contextlib
import io
import json
import math
import os
import re
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from PIL import Image

from conftest import once_on_tensorflow
from kdet.data import COCODataset, VOCDataset, YOLODataset
from kdet.metrics.coco import COCOEvaluator

pytestmark = once_on_tensorflow("NumPy/PIL/pycocotools")

# Fixed examples in CI (derandomize); KDET_FUZZ_EXAMPLES=5000 runs a longer, random search.
_DEEP = os.environ.get("KDET_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_DEEP or 150), deadline=None, derandomize=not _DEEP,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])

# Values a corrupted field may take: wrong types, NaN, inf, huge, negative, ids of
# other records, numeric strings.
BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.lists(st.integers(-5, 100), max_size=5),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=4, max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.sampled_from([-1, 0, 1, 2, 3, 7, 10, 11, 12, 48, 64, 1e300, -1e300, 1.5, "1", "10",
                     "nan", "1234", [1, 2, 3, 4], [0, 0, 1e308, 1e308], [5, 5, 0, 3],
                     [1, 2, 3], [1, 2, 3, 4, 5], 10 ** 5000]))


def _image(path, width, height):
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(path)


def _corrupt_bytes(draw, data):
    """One byte-level corruption: delete, insert, replace, truncate or non-UTF-8."""
    op = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "latin1"]))
    n = len(data)
    i = draw(st.integers(0, n))
    if op == "delete":
        j = draw(st.integers(i, min(n, i + 8)))
        return data[:i] + data[j:]
    if op == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=6)) + data[i:]
    if op == "replace":
        j = min(n, i + draw(st.integers(1, 4)))
        return data[:i] + draw(st.binary(min_size=j - i, max_size=j - i)) + data[j:]
    if op == "truncate":
        return data[:i]
    return data[:i] + b"\xff\xfe\xe9" + data[i:]


def _check_clean(ds, sizes, num_classes):
    """Invariants every returned dataset keeps, whatever the input was."""
    for r in ds.records:
        h, w = sizes[r["image_id"]] if isinstance(sizes, dict) else sizes(r)
        assert tuple(int(v) for v in r["original_size"]) == (h, w)
        b = r["boxes"]
        assert b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4
        assert np.isfinite(b).all(), b
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all(), b
        assert (b[:, 2] <= w).all() and (b[:, 3] <= h).all(), b
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all(), b
        labels = r["labels"]
        assert labels.shape == (len(b),)
        assert ((labels >= 0) & (labels < num_classes)).all(), labels
        assert set(np.unique(r["iscrowd"])) <= {0, 1}
        for key in ("area", "keypoints"):
            if key in r:
                assert np.isfinite(np.asarray(r[key], np.float64)).all(), (key, r[key])


def _message_ok(message, file_token, record_tokens):
    assert file_token in message, message
    if record_tokens:
        assert any(t in message for t in record_tokens), (record_tokens, message)


def _real(v):
    """A finite JSON number (an int beyond float range is none)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return abs(v) <= sys.float_info.max
    return isinstance(v, float) and math.isfinite(v)


def _clip_box(box, height, width):
    """The box a reader gives for xyxy ``box``: None when it must be an error."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box) or not (x2 > x1 and y2 > y1):
        return None
    c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
         min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    c32 = np.float32(c)  # boxes are stored as float32: positive size there
    if not (c[2] > c[0] and c[3] > c[1] and c32[2] > c32[0] and c32[3] > c32[1]):
        return None
    return c


# --------------------------------------------------------------------------- COCO
COCO_SIZES = {1: (48, 64), 2: (30, 40)}
COCO_FILE_SIZES = {"a.jpg": (48, 64), "b.png": (30, 40)}


def _coco_sizes(r):  # by file: a corrupted id may move a file to another id
    return COCO_FILE_SIZES[os.path.basename(r["file_name"])]


COCO_BASE = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
               {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400,
         "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 7, "bbox": [30.5, 5, 10, 30], "area": 300,
         "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40, 30], "area": 1200,
         "iscrowd": 1}]}
COCO_EXPECTED = {
    1: {"boxes": [[10, 10, 30, 30], [30.5, 5, 40.5, 35]], "labels": [0, 1], "iscrowd": [0, 0],
        "area": [400, 300], "annotation_ids": [10, 11]},
    2: {"boxes": [[0, 0, 40, 30]], "labels": [1], "iscrowd": [1], "area": [1200],
        "annotation_ids": [12]}}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco")
    _image(d / "a.jpg", 64, 48)
    _image(d / "b.png", 40, 30)
    return d


def _coco_record_equal(r, expected):
    for key, value in expected.items():
        np.testing.assert_array_equal(r[key], np.asarray(value, r[key].dtype), err_msg=key)


@st.composite
def coco_mutations(draw):
    """(data, touched image ids or None for 'any', record tokens, bbox oracle)."""
    data = json.loads(json.dumps(COCO_BASE))
    section = draw(st.sampled_from(["images", "annotations", "categories", "top"]))
    if section == "top":
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        if draw(st.booleans()):
            del data[key]
        else:
            data[key] = draw(BAD_VALUES)
        return data, None, [], None
    k = draw(st.integers(0, len(data[section]) - 1))
    entry = data[section][k]
    op = draw(st.sampled_from(["set", "set", "set", "drop", "replace", "duplicate"]))
    keys = sorted(entry)
    key = draw(st.sampled_from(keys))
    oracle = None
    if op == "set":
        entry[key] = draw(BAD_VALUES)
        if section == "annotations" and key == "bbox":
            oracle = (k, entry["bbox"])
    elif op == "drop":
        del entry[key]
    elif op == "replace":
        data[section][k] = draw(BAD_VALUES)
    else:
        data[section].append(json.loads(json.dumps(entry)))
    if section == "images":
        new_id = entry.get("id") if isinstance(entry, dict) else None
        shown_id = entry.get("id", "") if isinstance(entry, dict) else ""
        tokens = [f"images[{k}]", f"image id {shown_id}"]
        touched = {COCO_BASE["images"][k]["id"]}
        if _real(new_id) and float(new_id).is_integer():  # read as int(new_id)
            touched.add(int(new_id))
            tokens.append(f"image id {int(new_id)}")
        if op == "duplicate":
            tokens = [f"images[{len(data['images']) - 1}]", f"image id {entry['id']}"]
        # with its id changed, the image's annotations are reported as orphans
        tokens += [f"annotations[{j}]" for j, a in enumerate(COCO_BASE["annotations"])
                   if a["image_id"] in touched]
        return data, touched, tokens, None
    if section == "annotations":
        touched = {COCO_BASE["annotations"][k]["image_id"]}
        ann = data["annotations"][k]
        if isinstance(ann, dict) and isinstance(ann.get("image_id"), int):
            touched.add(ann["image_id"])
        tokens = [f"annotations[{k}]"]
        if op == "duplicate":
            tokens.append(f"annotations[{len(data['annotations']) - 1}]")
        if op == "set" and key == "id":  # a duplicate id may be reported at the other one
            tokens += [f"annotations[{j}]" for j, a in enumerate(COCO_BASE["annotations"])
                       if a["id"] == entry["id"]]
        return data, touched, tokens, oracle
    return data, None, ["categor"], None  # category changes relabel everything


def _load_coco(path, coco_dir, **kw):
    return COCODataset(path, coco_dir, **kw)


@FUZZ
@given(mutation=coco_mutations())
def test_coco_structured_corruptions(coco_dir, mutation):
    data, touched, tokens, oracle = mutation
    path = coco_dir / "fuzz.json"
    try:  # NaN/Infinity are written as JS literals, which json reads
        text = json.dumps(data)
    except ValueError:  # an int too long to print: test_coco_bugs_found_by_fuzzing has one
        assume(False)
    path.write_text(text)
    try:
        ds = _load_coco(path, coco_dir)
        raised = None
    except ValueError as e:
        raised = str(e)
        _message_ok(raised, "fuzz.json", tokens if _record_level(raised) else [])
    if raised is None:
        _check_clean(ds, _coco_sizes, len(ds.class_names))
        for r in ds.records:
            if touched is not None and r["image_id"] not in touched:
                _coco_record_equal(r, COCO_EXPECTED[r["image_id"]])
        if oracle is not None:
            _coco_bbox_oracle(ds, *oracle)
    # skip mode: same file, never raises for a record-level problem, counts what it drops
    try:
        skipped = _load_coco(path, coco_dir, on_error="skip")
    except ValueError as e:
        assert raised is not None and not _record_level(str(e)), str(e)
        return
    _check_clean(skipped, _coco_sizes, len(skipped.class_names))
    if raised is not None:
        assert _record_level(raised) and skipped.problems, raised
    for r in skipped.records:
        if touched is not None and r["image_id"] not in touched:
            _coco_record_equal(r, COCO_EXPECTED[r["image_id"]])


def _record_level(message):
    """A problem with one record (skip mode skips it) rather than the whole file."""
    return "pass on_error='skip'" in message


def _coco_bbox_oracle(ds, k, bbox):
    """Annotation k's bbox was set to ``bbox``: the reader's box is the definition's."""
    ann = COCO_BASE["annotations"][k]
    h, w = COCO_SIZES[ann["image_id"]]
    assert isinstance(bbox, list) and len(bbox) == 4 and all(_real(v) for v in bbox), \
        f"bbox {bbox!r} was accepted"
    x, y, bw, bh = (float(v) for v in bbox)
    want = _clip_box([x, y, x + bw, y + bh], h, w)
    assert want is not None, f"bbox {bbox!r} was accepted"
    r = next(r for r in ds.records if r["image_id"] == ann["image_id"])
    row = list(r["annotation_ids"]).index(ann["id"])
    np.testing.assert_allclose(r["boxes"][row], np.float32(want), rtol=1e-6)


@FUZZ
@given(data=st.data())
def test_coco_byte_corruptions(coco_dir, data):
    original = json.dumps(COCO_BASE, indent=1).encode()
    corrupted = _corrupt_bytes(data.draw, original)
    path = coco_dir / "bytes.json"
    path.write_bytes(corrupted)
    try:
        ds = _load_coco(path, coco_dir)
    except ValueError as e:
        _message_ok(str(e), "bytes.json", [])
        return
    _check_clean(ds, _coco_sizes, len(ds.class_names))
    try:
        same = json.loads(corrupted) == COCO_BASE
    except ValueError:
        same = False
    if same:
        for r in ds.records:
            _coco_record_equal(r, COCO_EXPECTED[r["image_id"]])


def test_coco_bugs_found_by_fuzzing(coco_dir):
    """Each input once crashed with another exception, or passed silently."""
    cases = {
        # int(inf) raised OverflowError
        "inf width": ("images", 0, "width", float("inf"), "images[0]"),
        "1e400 height": ("images", 1, "height", float("inf"), "images[1]"),
        # an unhashable image_id / category_id raised TypeError
        "list image_id": ("annotations", 0, "image_id", [1], "annotations[0]"),
        "list category_id": ("annotations", 1, "category_id", [7], "annotations[1]"),
        # float('abc') / float(None) on 'area' raised without naming the record
        "string area": ("annotations", 0, "area", "abc", "annotations[0]"),
        "null area": ("annotations", 1, "area", None, "annotations[1]"),
        "nan area": ("annotations", 1, "area", float("nan"), "annotations[1]"),
        # np.asarray(ids, int64) raised on a non-integer annotation id
        "string id": ("annotations", 2, "id", "x", "annotations[2]"),
        "id past int64": ("annotations", 0, "id", 2 ** 70, "annotations[0]"),  # OverflowError
        "duplicate annotation id": ("annotations", 1, "id", 10, "annotations["),
        # a string bbox was read character by character
        "string bbox": ("annotations", 0, "bbox", "1234", "annotations[0]"),
        # image id 1.5 became 1
        "fractional image id": ("images", 1, "id", 1.5, "images[1]"),
        # an annotation of no image was dropped silently
        "orphan annotation": ("annotations", 2, "image_id", 99, "annotations[2]"),
        # sorted(None) / c["id"] on the categories raised TypeError / KeyError
        "null categories": ("top", None, "categories", None, "categories"),
        "category without id": ("categories", 0, "id", None, "categories[0]"),
        "category without name": ("categories", 1, "name", None, "categories[1]"),
        "duplicate category id": ("categories", 1, "id", 3, "categories[1]"),
        "null annotations": ("top", None, "annotations", None, "annotations"),
    }
    for name, (section, k, key, value, token) in cases.items():
        data = json.loads(json.dumps(COCO_BASE))
        if section == "top":
            data[key] = value
        elif value is None and key in ("id", "name"):
            del data[section][k][key]
        else:
            data[section][k][key] = value
        path = coco_dir / "case.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError) as info:
            _load_coco(path, coco_dir)
        _message_ok(str(info.value), "case.json", [token])
    # a huge integer (more digits than int() parses) and deep nesting: file-level errors
    for text in ('{"images": [], "x": ' + "1" * 5000 + "}", "[" * 100000):
        path = coco_dir / "case.json"
        path.write_text(text)
        with pytest.raises(ValueError, match="case.json"):
            _load_coco(path, coco_dir)


def test_box_thinner_than_float32_is_degenerate(coco_dir):
    """x2 = 1e-50 > x1 = 0 in float64, but the stored float32 box had zero width."""
    data = json.loads(json.dumps(COCO_BASE))
    data["annotations"][1]["bbox"] = [0, 5, 1e-50, 10]
    path = coco_dir / "case.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[1\]\): box .* zero area"):
        _load_coco(path, coco_dir)
    ds = _load_coco(path, coco_dir, on_error="skip")
    assert ds.problems == {"degenerate_box": 1}
    _coco_record_equal(ds.records[0], {"boxes": [[10, 10, 30, 30]], "annotation_ids": [10]})


SEGMENTATIONS = st.one_of(
    BAD_VALUES,
    st.lists(st.lists(st.floats(-10, 100) | st.integers(-10, 100), max_size=10), max_size=3),
    st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=6, max_size=8),
             min_size=1, max_size=2),
    st.fixed_dictionaries({"counts": BAD_VALUES | st.text(max_size=8)
                           | st.lists(st.integers(-3, 3100), max_size=6),
                           "size": st.sampled_from([[48, 64], [64, 48], [48], "48x64", None])}),
    st.just({"size": [48, 64]}))


@FUZZ
@given(key=st.sampled_from(["segmentation", "keypoints", "num_keypoints"]),
       k=st.integers(0, 2), value=SEGMENTATIONS)
def test_coco_masks_and_keypoints_corruptions(coco_dir, key, k, value):
    """Segmentations and keypoints: reading and ``load_masks`` raise ValueError or work."""
    data = json.loads(json.dumps(COCO_BASE))
    data["categories"][0]["keypoints"] = ["left", "right"]
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        ann["keypoints"] = [x + 1, y + 1, 2, x + 2, y + 2, 1]
        ann["num_keypoints"] = 2
    data["annotations"][k][key] = value
    path = coco_dir / "masks.json"
    try:
        path.write_text(json.dumps(data))
    except ValueError:  # an int too long to print
        assume(False)
    try:
        ds = _load_coco(path, coco_dir, include_masks=True, include_keypoints=True)
    except ValueError as e:
        _message_ok(str(e), "masks.json", [f"annotations[{k}]"])
        return
    _check_clean(ds, _coco_sizes, 2)
    for i, r in enumerate(ds.records):
        h, w = _coco_sizes(r)
        assert r["keypoints"].shape == (len(r["boxes"]), 2, 3)
        try:
            masks = ds.load_masks(i)
        except ValueError as e:
            ann_id = COCO_BASE["annotations"][k]["id"]
            _message_ok(str(e), "masks.json", [f"annotation id {ann_id}"])
            continue
        assert masks.shape == (len(r["boxes"]), h, w) and masks.dtype == np.uint8


def test_segmentations_that_crash_pycocotools_are_bad_masks(coco_dir, yolo_root):
    """These passed the reader's check, then load_masks crashed the process (SIGSEGV)
    inside pycocotools: int overflow of huge polygon coordinates, RLE runs adding up to
    more than the image, garbage RLE strings."""
    for k, segmentation in ((0, [[0, 0, 1e9, 0, 1e9, 1e9]]),
                            (1, {"counts": [5000], "size": [48, 64]}),
                            (1, {"counts": [10, -5, 3067], "size": [48, 64]}),
                            (2, {"counts": "zzzz\u00ff", "size": [30, 40]}),
                            (2, {"counts": "PPPP", "size": [30, 40]})):  # ends mid-number
        data = json.loads(json.dumps(COCO_BASE))
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        data["annotations"][k]["segmentation"] = segmentation
        path = coco_dir / "crash.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=rf"annotations\[{k}\]\): .*\[bad_mask\]"):
            _load_coco(path, coco_dir, include_masks=True)
    # a valid compressed RLE still decodes
    from pycocotools import mask as mask_utils
    full = np.zeros((30, 40), np.uint8)
    full[5:20, 3:30] = 1
    rle = mask_utils.encode(np.asfortranarray(full))
    data["annotations"][2]["segmentation"] = {"counts": rle["counts"].decode(),
                                              "size": [30, 40]}
    path.write_text(json.dumps(data))
    ds = _load_coco(path, coco_dir, include_masks=True)
    np.testing.assert_array_equal(ds.load_masks(1)[0], full)
    # YOLO polygon rows with include_masks
    (yolo_root / "labels" / "a.txt").write_text("0 0 0 0.5 0 1e9 1e9\n")
    with pytest.raises(ValueError, match=r"a\.txt: line 1: .*\[bad_mask\]"):
        YOLODataset(images_dir=yolo_root / "images", class_names=["cat", "dog"],
                    include_masks=True)
    (yolo_root / "labels" / "a.txt").write_text("\n".join(YOLO_LINES["a"]) + "\n")


# --------------------------------------------------------------------------- VOC
VOC_XML = """<annotation>
  <folder>x</folder><filename>{stem}.png</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
{objects}</annotation>
"""
VOC_OBJECT = """  <object><name>{name}</name><difficult>{difficult}</difficult>
    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>
  </object>
"""
VOC_BASE = {
    "a": {"width": "64", "height": "48", "objects": [
        {"name": "cat", "difficult": "0", "xmin": "11", "ymin": "11", "xmax": "30", "ymax": "30"},
        {"name": "dog", "difficult": "1", "xmin": "31", "ymin": "6", "xmax": "40.5",
         "ymax": "35"}]},
    "b": {"width": "40", "height": "30", "objects": [
        {"name": "dog", "difficult": "0", "xmin": "1", "ymin": "1", "xmax": "40", "ymax": "30"}]}}
VOC_SIZES = {"a": (48, 64), "b": (30, 40)}
VOC_EXPECTED = {"a": [[10, 10, 30, 30], [30, 5, 40.5, 35]], "b": [[0, 0, 40, 30]]}
VOC_CLASSES = ["cat", "dog"]
BAD_TEXT = st.one_of(
    st.sampled_from(["", " ", "abc", "nan", "NaN", "inf", "-inf", "1e400", "-1e400", "-5", "0",
                     "1" * 400, " 12 ", "12.5", "0x10", "1,5", "\uff11\uff12", "<", "&amp;",
                     "&bogus;", "]]>", "\x00", "1e-400", "dog", "cat", "bird"]),
    st.text(max_size=6), st.integers(-100, 100).map(str),
    st.floats(-100, 100, allow_nan=False).map(repr))


def _voc_xml(spec, drop=None):
    objects = "".join(VOC_OBJECT.format(**o) for o in spec["objects"])
    text = VOC_XML.format(stem="x", width=spec["width"], height=spec["height"], objects=objects)
    if drop:  # remove one element, e.g. "<xmin>...</xmin>"
        start = text.find(f"<{drop}>")
        end = text.find(f"</{drop}>", start) + len(drop) + 3
        text = text[:start] + text[end:]
    return text


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    (root / "annotations").mkdir()
    (root / "images").mkdir()
    for stem, (h, w) in VOC_SIZES.items():
        _image(root / "images" / f"{stem}.png", w, h)
    return root


def _write_voc(root, texts):
    for stem, text in texts.items():
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        (root / "annotations" / f"{stem}.xml").write_bytes(data)


def _voc_sizes(r):
    return VOC_SIZES[os.path.splitext(os.path.basename(r["file_name"]))[0]]


@st.composite
def voc_mutations(draw):
    """(texts, touched stem, record tokens, (object, field, text) for the bbox oracle)."""
    spec = json.loads(json.dumps(VOC_BASE))
    stem = draw(st.sampled_from(["a", "b"]))
    s = spec[stem]
    kind = draw(st.sampled_from(["size", "object", "object", "object", "drop", "bytes"]))
    oracle, tokens, drop = None, [], None
    if kind == "size":
        s[draw(st.sampled_from(["width", "height"]))] = draw(BAD_TEXT)
    elif kind == "object":
        k = draw(st.integers(0, len(s["objects"]) - 1))
        field = draw(st.sampled_from(["name", "difficult", "xmin", "ymin", "xmax", "ymax"]))
        s["objects"][k][field] = draw(BAD_TEXT)
        tokens = [f"object {k}"]
        if field in ("xmin", "ymin", "xmax", "ymax"):
            oracle = (k, field, s["objects"][k][field])
    elif kind == "drop":
        drop = draw(st.sampled_from(["size", "width", "height", "object", "name", "bndbox",
                                     "xmin", "ymax", "difficult", "annotation"]))
        if drop in ("name", "bndbox", "xmin", "ymax"):
            tokens = ["object 0"]
    texts = {st_: _voc_xml(spec[st_]) for st_ in spec}
    texts[stem] = _voc_xml(s, drop)
    if kind == "bytes":
        texts[stem] = _corrupt_bytes(draw, texts[stem].encode())
    return texts, stem, tokens, oracle


def _voc_bbox_oracle(ds, stem, k, field, text):
    obj = dict(VOC_BASE[stem]["objects"][k])
    try:
        value = float(text.strip())
    except ValueError:
        value = None
    assert value is not None and math.isfinite(value), f"<{field}> {text!r} was accepted"
    obj[field] = value
    h, w = VOC_SIZES[stem]
    want = _clip_box([float(obj["xmin"]) - 1, float(obj["ymin"]) - 1, float(obj["xmax"]),
                      float(obj["ymax"])], h, w)
    assert want is not None, f"<{field}> {text!r} was accepted"
    r = next(r for r in ds.records if r["file_name"].endswith(f"{stem}.png"))
    np.testing.assert_allclose(r["boxes"][k], np.float32(want), rtol=1e-6)


@FUZZ
@given(mutation=voc_mutations())
def test_voc_corruptions(voc_root, mutation):
    texts, stem, tokens, oracle = mutation
    _write_voc(voc_root, texts)
    path = str(voc_root / "annotations" / f"{stem}.xml")
    try:
        ds = VOCDataset(voc_root, class_names=VOC_CLASSES)
        raised = None
    except ValueError as e:
        raised = str(e)
        # the file, and the object when the XML parsed
        _message_ok(raised, path, tokens if "malformed XML" not in raised else [])
    if raised is None:
        _check_clean(ds, _voc_sizes, 2)
        for r in ds.records:
            other = os.path.splitext(os.path.basename(r["file_name"]))[0]
            if other != stem:
                np.testing.assert_array_equal(r["boxes"], np.float32(VOC_EXPECTED[other]))
        if oracle is not None:
            _voc_bbox_oracle(ds, stem, *oracle)
    skipped = VOCDataset(voc_root, class_names=VOC_CLASSES, on_error="skip")  # never raises
    _check_clean(skipped, _voc_sizes, 2)
    if raised is not None:
        assert skipped.problems, raised
    for r in skipped.records:
        other = os.path.splitext(os.path.basename(r["file_name"]))[0]
        if other != stem:
            np.testing.assert_array_equal(r["boxes"], np.float32(VOC_EXPECTED[other]))


def test_voc_bugs_found_by_fuzzing(voc_root):
    """int(float('inf')) raised OverflowError; bad numbers did not name the object."""
    for field, text, token in (("width", "inf", "<width>"), ("height", "1e400", "<height>"),
                               ("xmin", "abc", "object 1"), ("difficult", "inf", "object 1")):
        spec = json.loads(json.dumps(VOC_BASE))
        if field in ("width", "height"):
            spec["a"][field] = text
        else:
            spec["a"]["objects"][1][field] = text
        _write_voc(voc_root, {s: _voc_xml(spec[s]) for s in spec})
        with pytest.raises(ValueError) as info:
            VOCDataset(voc_root, class_names=VOC_CLASSES)
        _message_ok(str(info.value), str(voc_root / "annotations" / "a.xml"), [token])
    _write_voc(voc_root, {s: _voc_xml(VOC_BASE[s]) for s in VOC_BASE})


# --------------------------------------------------------------------------- YOLO
YOLO_LINES = {"a": ["0 0.5 0.5 0.25 0.5", "1 0.25 0.25 0.125 0.25"], "b": ["1 0.5 0.5 1 1"]}
YOLO_SIZES = {"a": (48, 64), "b": (30, 40)}
YOLO_EXPECTED = {"a": [[24, 12, 40, 36], [12, 6, 20, 18]], "b": [[0, 0, 40, 30]]}
BAD_TOKEN = st.one_of(  # no line breaks: they would renumber the lines
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-1", "0", "1", "2", "0.5", "1.0", "1e-9",
                     "abc", "0x1", "1_0", "\uff11", "", "\x00", "1" * 400, "3.5", "-0"]),
    st.text(max_size=4).filter(lambda t: "\r" not in t and "\n" not in t),
    st.floats(-2, 3, allow_nan=False).map(repr))


@pytest.fixture(scope="module")
def yolo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for stem, (h, w) in YOLO_SIZES.items():
        _image(root / "images" / f"{stem}.png", w, h)
    return root


@st.composite
def yolo_mutations(draw):
    """(file bytes per stem, touched stem, line tokens, (line index, tokens) for the oracle)."""
    lines = {s: list(v) for s, v in YOLO_LINES.items()}
    stem = draw(st.sampled_from(["a", "b"]))
    n = draw(st.integers(0, len(lines[stem]) - 1))
    tokens = lines[stem][n].split()
    kind = draw(st.sampled_from(["token", "token", "extra", "drop", "blank", "crlf", "bytes"]))
    oracle, line_no = None, n + 1
    if kind == "token":
        tokens[draw(st.integers(0, len(tokens) - 1))] = draw(BAD_TOKEN)
    elif kind == "extra":
        tokens += draw(st.lists(BAD_TOKEN, min_size=1, max_size=5))
    elif kind == "drop":
        del tokens[draw(st.integers(0, len(tokens) - 1))]
    elif kind == "blank":
        lines[stem].insert(n, draw(st.sampled_from(["", "  ", "\t"])))
        line_no += 1
    lines[stem][n + (kind == "blank")] = " ".join(tokens)
    sep = "\r\n" if kind == "crlf" else "\n"
    files = {s: (sep.join(v) + sep).encode("utf-8") for s, v in lines.items()}
    if kind == "bytes":
        files[stem] = _corrupt_bytes(draw, files[stem])
        return files, stem, [], None
    # a token with whitespace in it splits into more tokens: the oracle reads the line as
    # the reader would
    oracle = (n, " ".join(tokens).split())
    return files, stem, [f"line {line_no}"], oracle


def _yolo_sizes(r):
    return YOLO_SIZES[os.path.splitext(os.path.basename(r["file_name"]))[0]]


def _yolo_oracle(ds, stem, n, tokens):
    """The line's box by the format's definition, or None where it must be an error."""
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        return None
    if not values or not all(math.isfinite(v) for v in values):
        return None
    cls, rest = values[0], values[1:]
    if cls != int(cls) or not 0 <= cls < 2:
        return None
    h, w = YOLO_SIZES[stem]
    if len(rest) == 4:
        cx, cy, bw, bh = rest
        box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
    elif len(rest) >= 6 and len(rest) % 2 == 0:
        xs, ys = [v * w for v in rest[0::2]], [v * h for v in rest[1::2]]
        box = [min(xs), min(ys), max(xs), max(ys)]
    else:
        return None
    return int(cls), _clip_box(box, h, w)


@FUZZ
@given(mutation=yolo_mutations())
def test_yolo_corruptions(yolo_root, mutation):
    files, stem, tokens, oracle = mutation
    for s, data in files.items():
        (yolo_root / "labels" / f"{s}.txt").write_bytes(data)
    path = str(yolo_root / "labels" / f"{stem}.txt")
    kw = dict(images_dir=yolo_root / "images", class_names=["cat", "dog"])
    want = _yolo_oracle(None, stem, *oracle) if oracle else "unknown"
    try:
        ds = YOLODataset(**kw)
        raised = None
    except ValueError as e:
        raised = str(e)
        _message_ok(raised, path, tokens)
        assert want is None or want == "unknown" or want[1] is None, (want, raised)
    if raised is None:
        _check_clean(ds, _yolo_sizes, 2)
        for r in ds.records:
            other = os.path.splitext(os.path.basename(r["file_name"]))[0]
            if other != stem:
                np.testing.assert_array_equal(r["boxes"], np.float32(YOLO_EXPECTED[other]))
            elif oracle is not None:
                assert want is not None and want[1] is not None, (oracle, r["boxes"])
                n = oracle[0]
                assert r["labels"][n] == want[0]
                np.testing.assert_allclose(r["boxes"][n], np.float32(want[1]), rtol=1e-5,
                                           atol=1e-4)
    skipped = YOLODataset(on_error="skip", **kw)  # never raises
    _check_clean(skipped, _yolo_sizes, 2)
    if raised is not None:
        assert skipped.problems


def test_yolo_bugs_found_by_fuzzing(yolo_root):
    """A NaN or inf class raised a bare ValueError / OverflowError (no file, no line)."""
    for token in ("nan", "inf", "-inf"):
        (yolo_root / "labels" / "a.txt").write_text(f"0 0.5 0.5 0.25 0.5\n{token} 0.5 0.5 .1 .1\n")
        with pytest.raises(ValueError) as info:
            YOLODataset(images_dir=yolo_root / "images", class_names=["cat", "dog"])
        _message_ok(str(info.value), str(yolo_root / "labels" / "a.txt"), ["line 2"])
    (yolo_root / "labels" / "a.txt").write_text("\n".join(YOLO_LINES["a"]) + "\n")


def test_yolo_pose_non_finite_keypoints(tmp_path):
    """NaN keypoints in a pose row were passed on as NaN."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    _image(tmp_path / "images" / "a.png", 64, 48)
    (tmp_path / "data.yaml").write_text("names: [person]\nkpt_shape: [2, 3]\ntrain: images\n")
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5 0.4 0.4 2 nan 0.6 2\n")
    with pytest.raises(ValueError) as info:
        YOLODataset(tmp_path / "data.yaml")
    _message_ok(str(info.value), str(tmp_path / "labels" / "a.txt"), ["line 1"])
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5 0.4 0.4 2 0.6 0.6 1\n")
    kp = YOLODataset(tmp_path / "data.yaml")[0]["keypoints"]
    np.testing.assert_allclose(kp, [[[25.6, 19.2, 2], [38.4, 28.8, 1]]], rtol=1e-6)


# --------------------------------------------------------------------------- evaluator
EVAL_GT = {
    "images": [{"id": 1, "height": 48, "width": 64}, {"id": 2, "height": 30, "width": 40}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400,
         "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [30, 5, 10, 30], "area": 300,
         "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40, 30], "area": 1200,
         "iscrowd": 0}]}
EVAL_DETS = [
    {"image_id": 1, "category_id": 3, "bbox": [11, 10, 20, 19], "score": 0.9},
    {"image_id": 1, "category_id": 7, "bbox": [30, 6, 10, 28], "score": 0.8},
    {"image_id": 2, "category_id": 7, "bbox": [2, 0, 36, 30], "score": 0.7},
    {"image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 10], "score": 0.3}]


def _valid_detection(d):
    """A detection pycocotools reads the same way: the definition of 'valid'."""
    if not isinstance(d, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(d):
        return False
    ids_ok = all(not isinstance(d[k], (bool, list, dict)) and d[k] in ids
                 for k, ids in (("image_id", {1, 2}), ("category_id", {3, 7})))
    b = d["bbox"]
    box_ok = isinstance(b, list) and len(b) == 4 and all(_real(v) for v in b) and \
        b[2] >= 0 and b[3] >= 0
    return ids_ok and box_ok and _real(d["score"])


def _pycocotools_stats(dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(EVAL_GT))
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@st.composite
def detection_mutations(draw):
    dets = json.loads(json.dumps(EVAL_DETS))
    i = draw(st.integers(0, len(dets) - 1))
    op = draw(st.sampled_from(["set", "set", "set", "drop", "replace"]))
    if op == "set":
        key = draw(st.sampled_from(["image_id", "category_id", "bbox", "score"]))
        dets[i][key] = draw(st.one_of(BAD_VALUES, st.lists(
            st.floats(-1e3, 1e3) | st.integers(-10, 100), min_size=4, max_size=4)))
    elif op == "drop":
        del dets[i][draw(st.sampled_from(sorted(dets[i])))]
    else:
        dets[i] = draw(BAD_VALUES)
    return dets, i


@FUZZ
@given(mutation=detection_mutations())
def test_add_detections_corruptions(mutation):
    dets, i = mutation
    ev = COCOEvaluator(EVAL_GT)
    valid = _valid_detection(dets[i])
    try:
        ev.add_detections(dets)
    except ValueError as e:
        assert not valid, (dets[i], str(e))
        _message_ok(str(e), f"detection #{i}", [])
        return
    assert valid, f"detection {dets[i]!r} was accepted"
    stats = ev.evaluate()
    values = np.array([v for k, v in stats.items() if k != "per_class_AP"], np.float64)
    assert not np.isnan(values).any(), stats
    np.testing.assert_allclose(values[:12], _pycocotools_stats(dets), atol=1e-12)


def _expected_results(pred):
    """COCO results that ``add_predictions`` must add for the (numeric) ``pred``, by its
    definition; None where the input is bad (it must raise)."""
    boxes, scores = pred["boxes"], pred["scores"]
    labels, counts = pred["labels"], pred["num_detections"]
    if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()
            and np.isfinite(counts).all() and (counts == np.round(counts)).all()):
        return None
    out = []
    for b, image_id in enumerate([1, 2]):
        for d in range(boxes.shape[1]):
            if labels[b, d] < 0 or d >= counts[b]:
                continue
            if labels[b, d] >= 2 or not np.isfinite(scores[b, d]):
                return None
            x1, y1, x2, y2 = boxes[b, d]
            if not np.isfinite(boxes[b, d]).all() or x2 < x1 or y2 < y1:
                return None
            out.append({"image_id": image_id, "category_id": [3, 7][int(labels[b, d])],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": scores[b, d]})
    return out


@FUZZ
@given(data=st.data())
def test_add_predictions_corruptions(data):
    boxes = np.array([[[10, 10, 30, 30], [30, 5, 40, 35]], [[0, 0, 40, 30], [1, 1, 5, 5]]],
                     np.float64)
    pred = {"boxes": boxes, "scores": np.array([[0.9, 0.8], [0.7, 0.1]]),
            "labels": np.array([[0, 1], [1, 0]]), "num_detections": np.array([2, 2])}
    key = data.draw(st.sampled_from(sorted(pred)))
    arr = np.array(pred[key], np.float64)
    element = data.draw(st.booleans())
    if element:  # one bad element: the result is known
        idx = tuple(data.draw(st.integers(0, s - 1)) for s in arr.shape)
        arr[idx] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 1e300, 0.5, 7.0,
                                              -5.0, 2.0, 3.0, 1.0, 0.0]))
        pred[key] = arr
        want = _expected_results(pred)
    else:  # wrong shape or dtype
        pred[key] = data.draw(st.sampled_from([
            arr[..., :1], arr[None], arr.reshape(-1), arr.astype(str), np.zeros((0,)),
            arr.astype(object), list(arr.tolist())]))
        want = "unknown"
    ev = COCOEvaluator(EVAL_GT)
    try:
        ev.add_predictions([1, 2], pred)
    except ValueError as e:
        assert "predictions" in str(e), str(e)
        assert want is None or want == "unknown", (key, pred[key], str(e))
        return
    assert want is not None, f"{key} {pred[key]!r} was accepted"
    stats = ev.evaluate()
    values = np.array([v for k, v in stats.items() if k != "per_class_AP"], np.float64)
    assert not np.isnan(values).any(), stats
    if want != "unknown":
        assert ev._num_detections == len(want), (key, pred[key])
        if want:
            np.testing.assert_allclose(values[:12], _pycocotools_stats(want), atol=1e-12)


def test_evaluator_bugs_found_by_fuzzing():
    """Inputs the evaluator once took silently (or with a bare cast warning)."""
    cases = {  # detection 1 changed: it was accepted as something else
        "bool image id": ("image_id", True),  # True == 1: read as image 1
        "string score": ("score", "0.5"),  # np.asarray(['0.5'], float64) converted it
        "string bbox": ("bbox", ["30", "6", "10", "28"]),
        "bool in bbox": ("bbox", [30, 6, True, 28]),
    }
    for name, (key, value) in cases.items():
        dets = json.loads(json.dumps(EVAL_DETS))
        dets[1][key] = value
        with pytest.raises(ValueError, match=r"detection #1 \(") as info:
            COCOEvaluator(EVAL_GT).add_detections(dets)
        assert key in str(info.value), (name, str(info.value))
    # an int too long to print broke the message (ValueError from repr, no record named);
    # one too large for a float raised OverflowError
    for key, value in (("image_id", 10 ** 5000), ("bbox", [10 ** 400, 0, 1, 1])):
        dets = json.loads(json.dumps(EVAL_DETS))
        dets[1][key] = value
        with pytest.raises(ValueError, match=r"detection #1 \("):
            COCOEvaluator(EVAL_GT).add_detections(dets)
    gt = json.loads(json.dumps(EVAL_GT))
    gt["annotations"][2]["area"] = "1200"
    with pytest.raises(ValueError, match=r"annotations\[2\] \(id=3\): 'area' must be a number"):
        COCOEvaluator(gt)

    def predictions(**change):
        pred = {"boxes": np.array([[[10., 10, 30, 30], [30, 5, 40, 35]],
                                   [[0, 0, 40, 30], [1, 1, 5, 5]]]),
                "scores": np.array([[0.9, 0.8], [0.7, 0.1]]),
                "labels": np.array([[0., 1], [1, 0]]), "num_detections": np.array([2., 2])}
        for key, (index, value) in change.items():
            pred[key][index] = value
        return pred

    # a NaN / inf / 1e300 label cast to int64 became a negative id: the row was dropped
    for value in (np.nan, np.inf, 1e300):
        with pytest.raises(ValueError, match="predictions row 1, detection 0: label"):
            COCOEvaluator(EVAL_GT).add_predictions([1, 2], predictions(labels=((1, 0), value)))
    # num_detections NaN or 0.5 was cast to 0 (rows dropped); 1e300 to a negative count
    for value in (np.nan, 0.5):
        with pytest.raises(ValueError, match="'num_detections'"):
            COCOEvaluator(EVAL_GT).add_predictions([1, 2],
                                                   predictions(num_detections=(0, value)))
    ev = COCOEvaluator(EVAL_GT)
    ev.add_predictions([1, 2], predictions(num_detections=(0, 1e300)))
    assert ev._num_detections == 4


def test_huge_finite_boxes_match_pycocotools_without_warnings():
    """w * h of a huge but finite box overflows to inf, as in pycocotools' C code."""
    import warnings

    dets = json.loads(json.dumps(EVAL_DETS))
    dets[2]["bbox"] = [0, 0, 1e200, 1e200]
    ev = COCOEvaluator(EVAL_GT)
    ev.add_detections(dets)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        stats = ev.evaluate()
    values = np.array([v for k, v in stats.items() if k != "per_class_AP"], np.float64)
    np.testing.assert_allclose(values[:12], _pycocotools_stats(dets), atol=1e-12)


@FUZZ
@given(k=st.integers(0, 3), value=SEGMENTATIONS, in_ground_truth=st.booleans())
def test_segm_evaluator_corruptions(k, value, in_ground_truth):
    """iou_type='segm': a bad segmentation in the ground truth or a detection is a
    ValueError naming the record (pycocotools' C code crashed on some), else no NaN."""
    gt = json.loads(json.dumps(EVAL_GT))
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    dets = []
    for d in EVAL_DETS:
        x, y, w, h = d["bbox"]
        dets.append({"image_id": d["image_id"], "category_id": d["category_id"],
                     "score": d["score"],
                     "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    if in_ground_truth:
        k = min(k, 2)
        gt["annotations"][k]["segmentation"] = value
        token = f"annotations[{k}]"
    else:
        dets[k]["segmentation"] = value
        token = f"detection #{k}"
    try:
        ev = COCOEvaluator(gt, iou_type="segm")
        ev.add_detections(dets)
        stats = ev.evaluate()
    except ValueError as e:
        _message_ok(str(e), token, [])
        return
    values = np.array([v for key, v in stats.items() if key != "per_class_AP"], np.float64)
    assert not np.isnan(values).any(), stats


@pytest.mark.parametrize("segmentation, problem", [
    ({"counts": [5000], "size": [48, 64]}, "RLE counts do not decode"),  # was AP 0, no error
    ({"counts": "PPPP", "size": [48, 64]}, "RLE counts do not decode"),
    ([[0, 0, 1e9, 0, 1e9, 1e9]], "not a list of numbers within"),  # was SIGSEGV
])
def test_segm_evaluator_rejects_what_crashes_pycocotools(segmentation, problem):
    gt = json.loads(json.dumps(EVAL_GT))
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    ev = COCOEvaluator(gt, iou_type="segm")
    with pytest.raises(ValueError, match=rf"detection #0 \(image_id=1.*{problem}"):
        ev.add_detections([{"image_id": 1, "category_id": 3, "score": 0.5,
                            "segmentation": segmentation}])
    gt["annotations"][1]["segmentation"] = segmentation
    ev = COCOEvaluator(gt, iou_type="segm")
    ev.add_detections([{"image_id": 1, "category_id": 7, "score": 0.5,
                        "segmentation": [[30, 5, 40, 5, 40, 35, 30, 35]]}])
    with pytest.raises(ValueError, match=rf"annotations\[1\] \(id=2\).*{problem}"):
        ev.evaluate()


YAML_BASE = {"path": ".", "train": "images", "names": ["cat", "dog"], "nc": 2}


@FUZZ
@given(data=st.data())
def test_yolo_data_yaml_corruptions(yolo_root, data):
    """data.yaml: a ValueError naming the yaml, or a dataset with string class names."""
    import yaml

    spec = dict(YAML_BASE)
    key = data.draw(st.sampled_from(["path", "train", "names", "nc", "kpt_shape", "flip_idx",
                                     "bytes"]))
    if key == "bytes":
        text = _corrupt_bytes(data.draw, yaml.safe_dump(spec).encode())
    else:
        spec[key] = data.draw(BAD_VALUES | st.lists(st.text(max_size=3), max_size=3)
                              | st.dictionaries(st.integers(-1, 3) | st.text(max_size=2),
                                                st.text(max_size=3), max_size=3))
        try:
            text = yaml.safe_dump(spec).encode()
        except ValueError:  # an int too long to print
            assume(False)
    path = yolo_root / "data.yaml"
    path.write_bytes(text)
    for name in ("a", "b"):
        (yolo_root / "labels" / f"{name}.txt").write_text("\n".join(YOLO_LINES[name]) + "\n")
    try:
        ds = YOLODataset(path, on_error="skip")
    except ValueError as e:
        assert str(path) in str(e), str(e)
        return
    assert all(isinstance(n, str) for n in ds.class_names)
    _check_clean(ds, _yolo_sizes, len(ds.class_names))


@pytest.mark.parametrize("key, value, problem", [
    ("names", {0: "cat", "x": "dog"}, "names ids"),  # sorted() raised TypeError
    ("names", None, "'names' must be"),  # len(None) raised TypeError
    ("names", "catdog", "'names' must be"),  # read as 6 one-letter classes
    ("nc", "two", "nc='two'"),  # int('two') raised without the file
    ("path", 1, "'path' must be"),  # os.path.join raised TypeError
    ("train", "nowhere", "'train' entry"),  # the message named the folder, not the yaml
    ("kpt_shape", [2], "kpt_shape"),  # kpt_shape[1] raised IndexError
    ("kpt_shape", "17x3", "kpt_shape"),  # read as kpt_shape [1, 7]
])
def test_yolo_data_yaml_bugs_found_by_fuzzing(yolo_root, key, value, problem):
    import yaml

    spec = dict(YAML_BASE, **{key: value})
    path = yolo_root / "data.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=f"data.yaml: .*{re.escape(problem)}"):
        YOLODataset(path)


@FUZZ
@given(mutation=coco_mutations(), iou_type=st.sampled_from(["bbox", "segm"]))
def test_evaluator_ground_truth_corruptions(mutation, iou_type):
    """A corrupted ground truth dict: ValueError naming it (and the record), or an
    evaluation without NaN."""
    gt = mutation[0]
    for ann in gt.get("annotations", []) if isinstance(gt.get("annotations"), list) else []:
        if isinstance(ann, dict) and isinstance(ann.get("bbox"), list) and \
                len(ann["bbox"]) == 4 and all(_real(v) for v in ann["bbox"]):
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    dets = [dict(d, segmentation=[[1, 1, 20, 1, 20, 20]]) for d in EVAL_DETS]
    try:
        ev = COCOEvaluator(gt, iou_type=iou_type)
    except ValueError as e:
        assert "ground truth" in str(e), str(e)
        return
    try:
        ev.add_detections(dets)
        stats = ev.evaluate()
    except ValueError as e:
        assert "ground truth" in str(e) or "detection #" in str(e), str(e)
        return
    values = np.array([v for key, v in stats.items() if key != "per_class_AP"], np.float64)
    assert not np.isnan(values).any(), stats


@pytest.mark.parametrize("section, k, key, value, problem", [
    ("images", 0, "height", None, r"images\[0\] \(id=1\): height/width"),  # TypeError
    ("images", 1, "width", 10 ** 30, r"images\[1\] \(id=2\): height/width"),  # OverflowError
    ("annotations", 0, "id", [10], r"annotations\[0\].*unhashable"),  # TypeError
    ("annotations", 1, "category_id", [7], r"annotations\[1\].*category_id \[7\]"),
    ("annotations", 2, "area", 10 ** 400, r"annotations\[2\].*'area' must be a number"),
], ids=["null-height", "huge-width", "list-id", "list-category_id", "huge-int-area"])
def test_evaluator_ground_truth_bugs_found_by_fuzzing(section, k, key, value, problem):
    gt = json.loads(json.dumps(EVAL_GT))
    gt[section][k][key] = value
    with pytest.raises(ValueError, match=f"ground truth: {problem}"):
        COCOEvaluator(gt)
