"""Draw detections on images and plot evaluation results.

Drawing uses Pillow and plots use matplotlib (both core dependencies), through
``matplotlib.figure.Figure`` so no global backend is switched.

    >>> import numpy as np
    >>> from kdet.visualize import draw_detections
    >>> image = np.zeros((64, 96, 3), np.uint8)
    >>> drawn = draw_detections(image, boxes=[[10, 10, 50, 40]], labels=[0], scores=[0.9],
    ...                         class_names=["cat"])
    >>> drawn.shape, bool(drawn[10, 30].any()), bool(drawn[60, 90].any())
    ((64, 96, 3), True, False)

Why not ``keras.visualization.draw_bounding_boxes``: it needs OpenCV, which
kdet does not depend on, and draws no masks or keypoints.
"""
import numpy as np

#: Distinct colours (RGB) for classes, cycled (the "tab20" hues, saturated).
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)


#: The COCO person skeleton (1-based keypoint index pairs, as the COCO categories list it).
COCO_PERSON_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))


def skeleton_for(keypoints):
    """The COCO person skeleton for ``[N, 17, 3]`` keypoints, else no lines (``None``)."""
    if keypoints is None or np.ndim(keypoints) != 3 or np.shape(keypoints)[1] != 17:
        return None
    return COCO_PERSON_SKELETON


def class_colour(label):
    return PALETTE[int(label) % len(PALETTE)]


def select_detections(predictions, index=0, score_threshold=0.0):
    """Image ``index``'s detections from a padded prediction dict, as a dict of arrays.

    Keeps rows with ``label >= 0``, ``score >= score_threshold`` and row index
    below ``num_detections`` (when present); carries ``masks``/``keypoints``.
    """
    scores = np.asarray(predictions["scores"])[index]
    labels = np.asarray(predictions["labels"])[index]
    keep = (labels >= 0) & (scores >= score_threshold)
    if "num_detections" in predictions:
        count = int(np.asarray(predictions["num_detections"])[index])
        keep &= np.arange(len(scores)) < count
    out = {"boxes": np.asarray(predictions["boxes"])[index][keep], "scores": scores[keep],
           "labels": labels[keep]}
    for key in ("masks", "keypoints"):
        if key in predictions:
            out[key] = np.asarray(predictions[key])[index][keep]
    return out


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_detections(image, boxes, labels, scores=None, class_names=None, masks=None,
                    keypoints=None, skeleton=None, line_width=None, mask_alpha=0.45,
                    keypoint_threshold=0.0):
    """A copy of ``image`` with boxes, class names and scores (and masks, keypoints) drawn.

    Args:
        image: ``[H, W, 3]`` RGB, uint8 or float 0..255.
        boxes: ``[N, 4]`` xyxy in ``image`` pixels.
        labels: ``[N]`` class indices.
        scores: ``[N]`` or ``None``.
        class_names: names of the labels (else the label numbers are shown).
        masks: ``[N, H, W]`` (probabilities or 0/1; > 0.5 is drawn) or ``None``.
        keypoints: ``[N, K, 3]`` (x, y, visibility/score) or ``None``; points
            with the third value ``> keypoint_threshold`` are drawn.
        skeleton: pairs of keypoint indices (1-based, as COCO) to join.
        line_width: box outline width (default scales with the image).
    Returns:
        uint8 ``[H, W, 3]``.
    """
    from PIL import Image, ImageDraw

    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an image [H, W, 3], got shape {array.shape}")
    array = np.clip(array[..., :3], 0, 255).astype(np.uint8)
    height, width = array.shape[:2]
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    if scores is not None:
        scores = np.asarray(scores, np.float64).reshape(-1)
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape[0] != len(boxes) or masks.shape[1:] != (height, width):
            raise ValueError(f"masks {masks.shape} must be [N={len(boxes)}, {height}, {width}]")
        canvas = array.astype(np.float32)
        for mask, label in zip(masks, labels):
            on = mask > 0.5
            canvas[on] = (1 - mask_alpha) * canvas[on] + mask_alpha * np.array(class_colour(label))
        array = canvas.round().astype(np.uint8)

    picture = Image.fromarray(array)
    draw = ImageDraw.Draw(picture)
    line_width = line_width or max(1, round(max(height, width) / 250))
    font = _font(max(10, round(max(height, width) / 45)))
    for i, (box, label) in enumerate(zip(boxes, labels)):
        colour = class_colour(label)
        x1, y1, x2, y2 = box
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=line_width)
        name = (class_names[int(label)] if class_names is not None and 0 <= label < len(class_names)
                else str(int(label)))
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top + 2
        ty = y1 - th - 1 if y1 - th - 1 >= 0 else y1 + 1
        draw.rectangle([x1, ty, x1 + tw + 2, ty + th], fill=colour)
        draw.text((x1 + 1, ty - top), text, fill=(255, 255, 255), font=font)
    if keypoints is not None:
        keypoints = np.asarray(keypoints, np.float64)
        radius = max(2, line_width + 1)
        for points, label in zip(keypoints, labels):
            colour = class_colour(label)
            visible = points[:, 2] > keypoint_threshold
            for a, b in (skeleton or ()):
                a, b = a - 1, b - 1
                if visible[a] and visible[b]:
                    draw.line([tuple(points[a, :2]), tuple(points[b, :2])], fill=colour,
                              width=line_width)
            for x, y, _ in points[visible]:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour,
                             outline=(255, 255, 255))
    return np.asarray(picture)


def save_image(array, path):
    """Write ``array`` (uint8 RGB) to ``path`` (format from the extension, e.g. PNG)."""
    from PIL import Image
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def detection_grid(images, predictions, class_names=None, score_threshold=0.3, columns=4,
                   zoom=1):
    """One picture of ``images`` in a grid, each with its detections drawn.

    ``predictions`` is a padded prediction dict for the batch ``images``
    ``[B, H, W, 3]``; ``zoom`` enlarges small images (nearest) before drawing.

    >>> import numpy as np
    >>> images = np.zeros((3, 32, 32, 3), "uint8")
    >>> preds = {"boxes": np.array([[[4., 4, 20, 20]]] * 3), "scores": np.ones((3, 1)),
    ...          "labels": np.zeros((3, 1), int), "num_detections": np.ones(3, int)}
    >>> detection_grid(images, preds, ["shape"], columns=2, zoom=2).shape
    (128, 128, 3)
    """
    tiles = []
    for i, image in enumerate(np.asarray(images)):
        if zoom != 1:
            image = np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)
        found = select_detections(predictions, i, score_threshold)
        tiles.append(draw_detections(image, found["boxes"] * zoom, found["labels"],
                                     found["scores"], class_names,
                                     masks=None if "masks" not in found else
                                     np.repeat(np.repeat(found["masks"], zoom, 1), zoom, 2),
                                     keypoints=None if "keypoints" not in found else
                                     found["keypoints"] * np.array([zoom, zoom, 1])))
    rows = -(-len(tiles) // columns)
    height, width = tiles[0].shape[:2]
    sheet = np.zeros((rows * height, columns * width, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * height:(r + 1) * height, c * width:(c + 1) * width] = tile
    return sheet


# ---- plots ---------------------------------------------------------------------------------
def _figure(width, height):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("kdet's plots need matplotlib (a kdet dependency that is missing "
                          "here): pip install matplotlib") from error
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def precision_recall_curves(precision, iou_index=0, area_index=0, max_dets_index=-1):
    """``[K, R]`` precision at the 101 recall points for each class.

    ``precision`` is ``COCOEvaluator.precision`` (pycocotools' ``eval["precision"]``),
    ``[T, R, K, A, M]``; the defaults pick IoU 0.5, area "all" and the largest
    max-detections (100). Entries are -1 where a class has no ground truth.
    """
    precision = np.asarray(precision)
    if precision.ndim != 5:
        raise ValueError(f"precision must be [T, R, K, A, M], got shape {precision.shape}")
    return precision[iou_index, :, :, area_index, max_dets_index].T


def plot_precision_recall(precision, class_names, path, iou_index=0, area_index=0,
                          max_dets_index=-1, title="Precision-recall, IoU=0.50, all areas, "
                                                   "maxDets=100"):
    """One precision-recall curve per class (from ``COCOEvaluator.precision``) to ``path``."""
    curves = precision_recall_curves(precision, iou_index, area_index, max_dets_index)
    if len(class_names) != curves.shape[0]:
        raise ValueError(f"{len(class_names)} class names for {curves.shape[0]} classes")
    recall = np.linspace(0.0, 1.0, curves.shape[1])
    fig = _figure(7, 5)
    ax = fig.subplots()
    shown = 0
    for k, (curve, name) in enumerate(zip(curves, class_names)):
        if (curve < 0).all():
            continue  # no ground truth for this class
        ap = float(np.mean(curve[curve > -1]))
        ax.plot(recall, np.where(curve < 0, np.nan, curve), color=np.array(class_colour(k)) / 255,
                label=f"{name} (AP50 {ap:.3f})", linewidth=1.5)
        shown += 1
    valid = curves[(curves > -1).any(axis=1)]
    if len(valid):
        mean_curve = np.mean(np.where(valid < 0, 0, valid), axis=0)
        ax.plot(recall, mean_curve, color="black", linewidth=2.5,
                label=f"all classes (mAP50 {float(np.mean(mean_curve)):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if shown <= 20:
        ax.legend(loc="lower left", fontsize="small")
    fig.savefig(path)
    return path


def plot_confusion_matrix(matrix, class_names, path, title=None):
    """A detection confusion matrix (rows: ground truth + background, columns:
    predictions + background) to ``path``, counts written in the cells."""
    matrix = np.asarray(matrix)
    names = list(class_names) + ["background"]
    if matrix.shape != (len(names), len(names)):
        raise ValueError(f"matrix {matrix.shape} does not fit {len(class_names)} classes "
                         "+ background")
    size = max(4.0, 0.5 * len(names) + 2.5)
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    # colour by each row's share so rare classes stay readable; numbers are counts
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape, float), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the row")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "Confusion matrix")
    if len(names) <= 30:
        for i in range(len(names)):
            for j in range(len(names)):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                            color="white" if share[i, j] > 0.5 else "black", fontsize="small")
    fig.savefig(path)
    return path


def plot_training_curves(rows, path):
    """Loss, learning rate and validation AP per epoch (rows of ``history.csv``) to ``path``.

    ``rows``: a CSV path or a list of dicts as :func:`kdet.history.read_csv_log` gives. A
    value that is missing (``None``, an empty cell: not measured that epoch) is not drawn.
    """
    if isinstance(rows, (str, bytes)) or hasattr(rows, "__fspath__"):
        from kdet.history import read_csv_log
        rows = read_csv_log(rows)
    if not rows:
        raise ValueError("the training log has no rows")
    epochs = np.array([r["epoch"] for r in rows], float)

    def column(key):
        return np.array([np.nan if r.get(key) is None else r[key] for r in rows], float)

    panels = [("loss", ["loss"])]
    if any(r.get("learning_rate") is not None for r in rows):
        panels.append(("learning rate", ["learning_rate"]))
    ap_keys = [k for k in ("val_AP", "val_AP50", "val_AP75", "val_mAP")
               if any(r.get(k) is not None for r in rows)]
    if ap_keys:
        panels.append(("validation AP", ap_keys))
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.2 * len(panels), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            values = column(key)
            keep = ~np.isnan(values)
            ax.plot(epochs[keep], values[keep], marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize="small")
    fig.savefig(path)
    return path
