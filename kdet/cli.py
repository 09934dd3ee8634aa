"""The ``kdet`` command: train, evaluate, predict, export, convert, benchmark, inspect data.

    kdet train --format coco --train-data ann.json --train-images imgs/ --val-fraction 0.1
    kdet eval --model runs/kdet/best.keras --config train.yaml
    kdet predict --model runs/kdet/best.keras photos/ --output-dir drawn/
    kdet export --model runs/kdet/best.keras --output d0.tflite --quantization fp16
    kdet bench --model efficientdet --phi 0 --image-size 512 --batch-size 8
    kdet datasets inspect --format voc --train-data VOCdevkit/VOC2012
    kdet convert --source effdet --arch tf_efficientdet_d0 --checkpoint d0.pth --output d0.keras

Every flag is also a key of a ``--config`` YAML/JSON file (``--batch-size`` is
``batch_size``); flags given on the command line win over the file. One file
can serve every command: keys another command does not read are ignored.
The settings table lives in :mod:`kdet.workflow.config`; the work is done by
:mod:`kdet.training` and :mod:`kdet.workflow` (importable, same names).

The parser imports no TensorFlow/Keras: ``kdet --help`` is instant. TensorFlow's C++
start-up lines are kept off the terminal unless ``TF_CPP_MIN_LOG_LEVEL`` is set
(:mod:`kdet.tf_startup`; ``TF_CPP_MIN_LOG_LEVEL=0`` shows them all).
"""
import argparse
import json
import sys

from kdet.workflow import config as wconfig

COMMAND_HELP = {
    "train": "train a detector (checkpoints, CSV/TensorBoard logs, COCO eval, resumable)",
    "eval": "COCO evaluation of a trained model + PR curves, confusion matrix, training curves",
    "predict": "draw detections on images (PNG per image + predictions.json)",
    "export": "export to SavedModel / LiteRT (TFLite) / ONNX with NMS inside",
    "bench": "images/s of predict and of a training step on this machine (--compare: vs the "
             "PyTorch peer)",
    "convert": "convert a torchvision / effdet / automl checkpoint to a kdet .keras model",
    "inspect": "counts, class histogram, sizes and problems of a dataset",
}

EXAMPLES = {
    "train": """examples:
  # synthetic shapes, tiny run (CPU friendly)
  kdet train --format shapes --num-images 64 --image-size 128 --epochs 5 --output-dir runs/shapes
  # COCO-format data, 10% held out for validation, EfficientDet-D0 at 512
  kdet train --format coco --train-data data/ann.json --train-images data/images \\
             --val-fraction 0.1 --model efficientdet --phi 0 --epochs 50 --batch-size 8
  # Pascal VOC devkit with its own val split, RetinaNet v2
  kdet train --format voc --train-data VOC2012 --train-split train --val-data VOC2012 \\
             --val-split val --model retinanet --version 2 --image-size 640
  # Mask R-CNN v2 on Penn-Fudan masks; Keypoint R-CNN on COCO person keypoints
  kdet train --format masks --train-data PennFudanPed --val-fraction 0.2 --model maskrcnn \\
             --version 2 --backbone resnet50 --image-size 512
  kdet train --format coco --train-data person_keypoints_train2017.json \\
             --train-images train2017 --val-fraction 0.05 --model keypointrcnn
  # everything in a file, one flag overridden; rerun the same command to resume
  kdet train --config train.yaml --epochs 100""",
    "eval": """examples:
  kdet eval --model runs/shapes/best.keras --format shapes --val-num-images 32
  # Mask / Keypoint R-CNN: segm / keypoints AP next to bbox (+ dets_segm.json ...)
  kdet eval --model runs/mask/best.keras --format masks --train-data PennFudanPed \\
            --val-fraction 0.2 --detections-out dets.json
  kdet eval --config train.yaml --model runs/d0/best.keras --output-dir runs/d0/eval
  kdet eval --model d0.keras --format coco --val-data val.json --val-images val2017 \\
            --detections-out dets.json --score-threshold 0.3""",
    "predict": """examples:
  kdet predict --model runs/shapes/best.keras images/ --output-dir drawn/
  kdet predict --model d0.keras a.jpg b.jpg --labels labels.txt --score-threshold 0.4
  kdet predict --model runs/mask/best.keras people/ --output-dir drawn/   # + masks, keypoints""",
    "export": """examples:
  kdet export --model runs/d0/best.keras --output exported/d0_saved_model
  kdet export --model runs/d0/best.keras --output d0_fp16.tflite --quantization fp16
  kdet export --config train.yaml --model runs/d0/best.keras --output d0_int8.tflite \\
              --quantization int8 --input-dtype uint8      # calibrates on the training data
  kdet export --model runs/d0/best.keras --output d0.onnx
  kdet export --model runs/mask/best.keras --output mask_saved_model   # R-CNNs too""",
    "bench": """examples:
  kdet bench --model efficientdet --phi 0 --image-size 512 --batch-size 8
  kdet bench --model retinanet --backbone resnet50 --image-size 640 --bench-train false
  kdet bench --model maskrcnn --version 2 --image-size 512 --batch-size 2
  kdet bench --model runs/d0/best.keras --jit-compile true
  # side by side with the PyTorch peer, each in its own process, 1 thread each
  kdet bench --model efficientdet --phi lite0 --compare effdet
  kdet bench --model maskrcnn --compare torchvision --bench-batches 1 --bench-train false""",
    "convert": """examples:
  kdet convert --source effdet --arch tf_efficientdet_d0 \\
               --checkpoint tf_efficientdet_d0_34-f153e0cf.pth --output d0_coco.keras
  kdet convert --source torchvision --arch retinanet_resnet50_fpn_v2 \\
               --checkpoint retinanet_resnet50_fpn_v2_coco-5905b1c5.pth --output retinanet.keras
  kdet convert --source automl --arch efficientdet-d0 --checkpoint efficientdet-d0/ \\
               --output d0.keras""",
    "inspect": """examples:
  kdet datasets inspect --format coco --train-data coco128/annotations/instances_train2017.json \\
                        --train-images coco128/train2017
  kdet datasets inspect --format voc --train-data bad/          # problems are counted, not fatal
  kdet datasets inspect --format yolo --train-data data.yaml --split val --json""",
}


# commands that load TensorFlow (datasets inspect reads annotations only)
TENSORFLOW_COMMANDS = ("train", "eval", "predict", "export", "bench", "convert")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)


def _add_options(parser, command):
    groups = {}
    for option in wconfig.options_for(command):
        if command == "predict" and option.name == "inputs":
            continue  # positional below
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(f"{option.group} settings")
        default = option.default
        if isinstance(default, (list, tuple)):
            default = ",".join(str(v) for v in default)
        text = option.help
        if option.choices:
            text += f" {{{', '.join(str(c) for c in option.choices)}}}"
        text += f" (default: {default})"
        metavar = option.metavar or option.name.upper()
        extra = {}
        if option.convert is wconfig._bool:  # --json alone means --json true
            metavar, extra = "{true,false}", {"nargs": "?", "const": "true"}
        elif option.convert is wconfig._auto_bool:
            metavar, extra = "{auto,true,false}", {"nargs": "?", "const": "true"}
        group.add_argument(option.flag, dest=option.name, metavar=metavar, help=text, **extra)
    if command == "predict":
        parser.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER",
                            help="images or folders of images (or `inputs` in the config)")


def build_parser():
    """The ``kdet`` argument parser (values stay strings; :func:`kdet.workflow.config.resolve`
    converts and checks them like config-file values)."""
    from kdet import __version__

    parser = argparse.ArgumentParser(
        prog="kdet", formatter_class=_Formatter,
        description="kdet: Keras 3 object detection - train, evaluate, predict, export.",
        epilog="Each command has --help with its settings and examples. Settings can come from "
               "--config FILE (YAML/JSON, keys = flag names with '_'); flags override the file.")
    parser.add_argument("--version", action="version", version=f"kdet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, parent, command, help_text):
        sub = parent.add_parser(name, help=help_text, description=help_text,
                                epilog=EXAMPLES[command], formatter_class=_Formatter,
                                argument_default=argparse.SUPPRESS)
        sub.add_argument("--config", dest="_config", metavar="FILE",
                         help="YAML or JSON file of settings (keys as the flags below)")
        _add_options(sub, command)
        sub.set_defaults(_command=command)
        return sub

    for command in ("train", "eval", "predict", "export", "bench", "convert"):
        add(command, commands, command, COMMAND_HELP[command])
    datasets = commands.add_parser("datasets", help="dataset tools (inspect)",
                                   description="dataset tools", formatter_class=_Formatter)
    dataset_commands = datasets.add_subparsers(dest="dataset_command", metavar="COMMAND")
    add("inspect", dataset_commands, "inspect", COMMAND_HELP["inspect"])
    datasets.set_defaults(_parser=datasets)
    return parser


def parse(argv=None):
    """``(command, settings dict, config path)`` from command-line arguments.

    The settings are the config file's (if any) updated by the flags given;
    defaults are filled in by the workflow functions.
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("_command", None)
    if command is None:
        target = args.get("_parser", parser)
        target.print_help(sys.stderr)
        raise SystemExit(2)
    config_path = args.pop("_config", None)
    args.pop("_parser", None)
    args.pop("command", None)
    args.pop("dataset_command", None)
    settings = wconfig.load_config_file(config_path) if config_path else {}
    settings.update({k: v for k, v in args.items() if not (k == "inputs" and v == [])})
    return command, settings, config_path or "arguments"


def run(command, settings, config_path="config"):
    """Run ``command`` with ``settings`` (what :func:`main` does after parsing)."""
    if command == "train":
        from kdet.training import train
        result = train(settings, config_path=config_path)
        print(f"done: {result.output_dir} (best: {result.best_checkpoint}, "
              f"last: {result.last_checkpoint})", flush=True)
        return result
    if command == "eval":
        from kdet.workflow.evaluation import evaluate, format_stats
        result = evaluate(settings, config_path=config_path)
        print(format_stats(result.results, result.more), flush=True)
        return result
    if command == "predict":
        from kdet.workflow.prediction import predict
        return predict(settings, config_path=config_path)
    if command == "export":
        from kdet.workflow.exporting import export_model
        path = export_model(settings, config_path=config_path)
        print(f"exported: {path}", flush=True)
        return path
    if command == "convert":
        from kdet.workflow.exporting import convert_checkpoint
        path = convert_checkpoint(settings, config_path=config_path)
        print(f"converted: {path}", flush=True)
        return path
    if command == "bench":
        from kdet.workflow.benchmark import benchmark
        return benchmark(settings, config_path=config_path)
    if command == "inspect":
        from kdet.workflow.inspection import inspect_dataset
        report, text = inspect_dataset(settings, config_path=config_path)
        as_json = wconfig.resolve("inspect", file_config=settings, config_path=config_path)["json"]
        print(json.dumps(report, indent=2) if as_json else text, flush=True)
        return report
    raise ValueError(f"unknown command {command!r}")


def main(argv=None):
    """Entry point of the ``kdet`` console script; returns the exit status."""
    try:
        command, settings, config_path = parse(argv)
    except ValueError as error:  # a config file that does not parse
        print(f"kdet: error: {error}", file=sys.stderr)
        return 2
    if command in TENSORFLOW_COMMANDS:
        # before any TensorFlow import: its C++ start-up lines stay off the terminal
        # unless TF_CPP_MIN_LOG_LEVEL is set
        from kdet.tf_startup import import_tensorflow_quietly
        import_tensorflow_quietly()
    try:
        run(command, settings, config_path)
    except ValueError as error:
        name = "datasets inspect" if command == "inspect" else command
        print(f"kdet {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kdet {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
