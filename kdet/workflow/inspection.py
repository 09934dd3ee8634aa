"""Describe a dataset before training on it: what ``kdet datasets inspect`` prints.

Reads the set with ``on_error="skip"`` by default (so every problem is
counted instead of stopping at the first) and reports counts, the class
histogram, image and box sizes and the problems found
(:data:`kdet.data.PROBLEM_KINDS` explains each kind).

    >>> from kdet.workflow.inspection import inspect_dataset
    >>> report, text = inspect_dataset({"format": "shapes", "num_images": 4, "image_size": 64})
    >>> report["num_images"], report["num_classes"]
    (4, 3)
"""
from kdet.workflow.config import resolve


def inspect_dataset(config, config_path="config"):
    """``(report dict, text)`` of the ``split`` (train or val) set of ``config``."""
    from kdet.workflow.data import read_datasets

    config = dict(config)
    config.setdefault("on_error", "skip")
    settings = resolve("inspect", file_config=config, config_path=config_path)
    train, val = read_datasets(settings, need_train=settings["split"] == "train",
                               need_val=settings["split"] == "val")
    dataset = train if settings["split"] == "train" else val
    if dataset is None:
        raise ValueError(f"no {settings['split']} data configured")
    report = dataset.inspect(max_boxes=settings["max_boxes"])
    return report, format_report(report)


def format_report(report, bar_width=30):
    """The report as aligned text with a bar chart of the class histogram."""
    from kdet.data import PROBLEM_KINDS

    lines = [f"source:             {report['source']}",
             f"images:             {report['num_images']} "
             f"({report['num_negative_images']} without objects)",
             f"objects:            {report['num_objects']} ({report['num_crowd']} crowd)",
             f"classes:            {report['num_classes']}"]
    per = report["objects_per_image"]
    lines.append(f"objects per image:  min {per['min']}, mean {per['mean']:.2f}, max {per['max']}")
    if "max_boxes" in report:
        limit = report["max_boxes"]
        if report["max_boxes_auto"]:
            lines.append(f"max_boxes:          {limit} (auto: the most objects in one image; "
                         "none dropped)")
        elif report["objects_beyond_max_boxes"]:
            lines.append(f"max_boxes:          {limit}: {report['objects_beyond_max_boxes']} "
                         f"objects in {report['images_beyond_max_boxes']} images beyond it are "
                         f"DROPPED by the pipeline (--max-boxes {report['max_boxes_needed']} "
                         "keeps them)")
        else:
            lines.append(f"max_boxes:          {limit} (none dropped)")
    sizes = report["image_size_hw"]
    lines.append(f"image size (HxW):   min {sizes['min'][0]}x{sizes['min'][1]}, "
                 f"max {sizes['max'][0]}x{sizes['max'][1]}")
    boxes = report.get("box_size_wh")
    if boxes:
        lines.append("box size (WxH):     " + ", ".join(
            f"{k} {boxes[k][0]:.1f}x{boxes[k][1]:.1f}" for k in ("min", "median", "max")))
    lines.append(f"masks:              {'yes' if report['has_masks'] else 'no'}")
    lines.append(f"keypoints:          {report['num_keypoints']}")
    histogram = report["class_histogram"]
    if histogram:
        lines.append("class histogram:")
        width = max(len(n) for n in histogram)
        top = max(histogram.values()) or 1
        for name, count in histogram.items():
            bar = "#" * int(round(bar_width * count / top))
            lines.append(f"  {name:<{width}}  {count:>7}  {bar}")
        empty = [n for n, c in histogram.items() if c == 0]
        if empty:
            lines.append(f"classes without objects: {len(empty)} ({', '.join(empty[:10])}"
                         f"{', ...' if len(empty) > 10 else ''})")
    problems = report.get("problems") or {}
    if problems:
        lines.append("problems found:")
        for kind, count in sorted(problems.items()):
            lines.append(f"  {kind}: {count}  ({PROBLEM_KINDS.get(kind, 'see kdet.data.errors')})")
    else:
        lines.append("problems found:     none")
    return "\n".join(lines)
