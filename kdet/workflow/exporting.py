"""Export and convert models: what ``kdet export`` and ``kdet convert`` run.

Both only wire settings to the real work: :func:`kdet.export.export`
(post-processing inside, SavedModel / LiteRT / ONNX) and the
:mod:`kdet.converters` (torchvision / effdet / automl checkpoints to a kdet
``.keras`` model).
"""
import os

from kdet.workflow.config import resolve

CONVERT_SOURCES = ("torchvision", "effdet", "automl")


def export_model(config, *, model=None, config_path="config"):
    """``kdet export``: returns the written path.

    ``quantization="int8"`` calibrates on ``calibration_steps`` images of the
    configured training data (``format``/``train_data``...).
    """
    from kdet import export
    from kdet.workflow.models import load_model, model_image_size

    settings = resolve("export", file_config=config, config_path=config_path)
    if not settings["output"]:
        raise ValueError("kdet export needs --output (a folder, .tflite or .onnx path)")
    if model is None:
        model = load_model(settings["model"], weights=settings["weights"])
    labels = settings["labels"]
    if labels is None and isinstance(settings["model"], str):
        beside = os.path.join(os.path.dirname(os.path.abspath(settings["model"])), "labels.txt")
        labels = beside if os.path.isfile(beside) else None
    calibration = None
    if settings["quantization"] == "int8":
        from kdet.workflow.data import evaluation_batches, read_dataset

        if not settings["format"]:
            raise ValueError("int8 export calibrates on training images: give --format and "
                             "--train-data (the same data settings as kdet train)")
        if settings["format"] == "shapes" and settings["image_size"] is None:
            settings["image_size"] = model_image_size(model)
        dataset = read_dataset(settings, "train")
        calibration = evaluation_batches(dataset, model_image_size(model), 1).take(
            int(settings["calibration_steps"]))
    fmt = settings["export_format"]
    return export.export(model, settings["output"], format=fmt,
                         quantization=settings["quantization"],
                         representative_dataset=calibration,
                         input_dtype=settings["input_dtype"],
                         batch_size=settings["export_batch_size"], labels=labels,
                         calibration_steps=int(settings["calibration_steps"]))


def convert_checkpoint(config, config_path="config"):
    """``kdet convert``: a foreign checkpoint -> a kdet ``.keras`` model; returns its path.

    ``source`` picks the converter (``torchvision``: ``retinanet_resnet50_fpn[_v2]``;
    ``effdet``: ``tf_efficientdet_d0`` ... ``lite4``; ``automl``:
    ``efficientdet-d0`` ...), ``arch`` the architecture, ``checkpoint`` the
    file (``.pth`` or automl checkpoint prefix/folder).
    """
    import keras

    from kdet import converters
    from kdet.workflow.callbacks import atomic_save

    settings = resolve("convert", file_config=config, config_path=config_path)
    source, arch, checkpoint = settings["source"], settings["arch"], settings["checkpoint"]
    output = settings["output"]
    missing = [flag for flag, value in (("--source", source), ("--arch", arch),
                                        ("--checkpoint", checkpoint), ("--output", output))
               if not value]
    if missing:
        raise ValueError(f"kdet convert needs {', '.join(missing)}")
    if not output.endswith(".keras"):
        raise ValueError(f"--output {output}: kdet convert writes a .keras model file")
    if source != "automl" and not os.path.exists(checkpoint):
        raise ValueError(f"--checkpoint {checkpoint}: file not found")
    kwargs = {}
    if settings["num_classes"] is not None:
        kwargs["num_classes"] = settings["num_classes"]
    if settings["image_size"] is not None:
        kwargs["image_size"] = settings["image_size"]
    build = getattr(converters, f"build_{source}")
    convert = getattr(converters, f"convert_{source}")
    model = build(arch, **kwargs)
    model = convert(checkpoint, model, strict=settings["strict"]) or model
    if not isinstance(model, keras.Model):
        raise ValueError(f"convert_{source} returned {type(model).__name__}, not a model")
    return atomic_save(model, output)
