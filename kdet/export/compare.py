"""Do two sets of padded detections agree? (an exported model against its Keras model)."""
import numpy as np

from kdet.utils import box_iou_numpy


def match_detections(reference, other, iou_min=0.99, score_tol=1e-3, top_k=None,
                     nms_iou=None):
    """Match detections per image: same label, IoU >= ``iou_min``, |score diff| <= ``score_tol``.

    ``reference`` and ``other`` are padded prediction dicts of numpy arrays
    (``boxes``, ``scores``, ``labels``, ``num_detections``). Returns
    ``(fraction of reference detections matched, max |score diff|, min IoU over
    matches, unmatched list of (image, index, score, label))``. A reference
    detection may stay unmatched only when the list is full (``num == D``) and
    its score is within ``score_tol`` of the last kept score: there a float tie
    decides which detection makes the cut.

    With ``top_k``, only each image's ``top_k`` best reference detections are
    looked for (anywhere in ``other``'s list) and the counts may differ: a
    quick check that does not trip over detections at the score threshold.

    ``nms_iou`` (the models' NMS IoU threshold) also accepts an NMS near-tie: a
    reference detection missing from ``other`` while ``other`` keeps an unmatched
    detection of the same label within ``score_tol`` that overlaps it by more than
    ``nms_iou``. Two candidates that close suppress each other, and which one wins
    is decided by float rounding; so it counts as matched (not in the IoU / score
    figures).

    >>> ref = {"boxes": np.array([[[0., 0, 10, 10]]]), "scores": np.array([[0.9]]),
    ...        "labels": np.array([[1]]), "num_detections": np.array([1])}
    >>> fraction, score_diff, iou, unmatched = match_detections(
    ...     ref, dict(ref, scores=np.array([[0.9004]])))
    >>> fraction, round(score_diff, 6), iou, unmatched
    (1.0, 0.0004, 1.0, [])
    """
    matched, total, worst_score, worst_iou, unmatched = 0, 0, 0.0, 1.0, []
    for b in range(len(reference["num_detections"])):
        n_ref, n_got = int(reference["num_detections"][b]), int(other["num_detections"][b])
        capacity = reference["scores"].shape[1]
        if top_k is not None:
            n_ref, capacity = min(n_ref, top_k), np.inf
        elif n_ref != n_got and n_ref != capacity and n_got != capacity:
            raise AssertionError(f"image {b}: {n_ref} reference detections vs {n_got}")
        iou = box_iou_numpy(reference["boxes"][b, :n_ref], other["boxes"][b, :n_got])
        labels, scores = other["labels"][b, :n_got], other["scores"][b, :n_got]
        used = np.zeros(n_got, bool)
        cut = reference["scores"][b, n_ref - 1] if n_ref == capacity else -np.inf
        for i in range(n_ref):
            score = reference["scores"][b, i]
            ok = (~used & (labels == reference["labels"][b, i]) & (iou[i] >= iou_min)
                  & (np.abs(scores - score) <= score_tol))
            total += 1
            if ok.any():
                j = int(np.flatnonzero(ok)[np.argmax(iou[i][ok])])
                used[j] = True
                matched += 1
                worst_score = max(worst_score, abs(float(scores[j] - score)))
                worst_iou = min(worst_iou, float(iou[i, j]))
            elif score > cut + score_tol:
                unmatched.append((b, i, float(score), int(reference["labels"][b, i])))
            else:
                matched += 1  # at the capacity cut: a tie in float rounding decides
        if nms_iou is not None and unmatched:
            for entry in [u for u in unmatched if u[0] == b]:
                i = entry[1]
                tie = (~used & (labels == reference["labels"][b, i]) & (iou[i] > nms_iou)
                       & (np.abs(scores - reference["scores"][b, i]) <= score_tol))
                if tie.any():
                    used[int(np.flatnonzero(tie)[0])] = True
                    unmatched.remove(entry)
                    matched += 1
    return matched / max(total, 1), worst_score, worst_iou, unmatched
