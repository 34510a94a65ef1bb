"""Per-class diagnostics of a COCO box evaluation, as PNG + JSON files a user can read.

Everything is derived from the COCOeval object detectron2 computed its AP with (either backend
of :mod:`~retinanet_plugin.evaluation.coco_evaluation`):

* AP (IoU 0.5:0.95) and AP50 per class, and the precision-recall curve per class at IoU 0.5:
  ``coco_eval.eval["precision"]`` / ``["scores"]`` at area "all" and the last ``maxDets`` (the
  arrays and the averaging detectron2 reports ``AP-<class>`` from).
* Precision, recall and F1 at an operating score threshold, and the threshold of best F1 per
  class: counted from COCOeval's own per-image matching at IoU 0.5 (``evalImgs``, area "all",
  last ``maxDets``: which detections are true positives, which are ignored, how many ground-truth
  boxes count). These are the exact counts at the threshold; the 101-point arrays are
  interpolated (precision at recall >= r) and would hide false positives that raise no recall.
  pycocotools' COCOeval keeps ``evalImgs``; faster-coco-eval's does not, and for it
  pycocotools' ``evaluate()`` runs once more on the same ground truth and detections, at IoU 0.5
  and area "all" only.
* A confusion matrix at IoU 0.5 (:func:`confusion_matrix`): COCOeval's same-class matches on the
  diagonal; the detections it left unmatched are matched to the unmatched ground truth of other
  classes (greedily by score, highest IoU first, COCO's box IoU), the rest are background.

:func:`compute_diagnostics` returns all of it as one dict, :func:`write_diagnostics` writes
:data:`FILES` into a folder.
"""

import contextlib
import io
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

__all__ = ["FILES", "IOU_THRESHOLD", "compute_diagnostics", "confusion_matrix", "write_diagnostics"]

logger = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5
# What write_diagnostics writes, by the key of compute_diagnostics' dict it draws.
FILES = {
    "precision_recall": ("precision_recall.json", "precision_recall.png"),
    "class_metrics": ("class_metrics.json", "ap_per_class.png"),
    "confusion_matrix": ("confusion_matrix.json", "confusion_matrix.png"),
}
# Above this many classes, figures leave out the legend and the numbers in the cells.
MAX_ANNOTATED_CLASSES = 20


def _index_of(values: Sequence[float], value: float, what: str) -> int:
    hits = np.flatnonzero(np.isclose(np.asarray(values, dtype=float), value))
    if not len(hits):
        raise ValueError(f"COCOeval has no {what} {value} (it has {list(values)})")
    return int(hits[0])


def _area_all(params) -> int:
    return list(params.areaRngLbl).index("all")


def _eval_images(coco_eval) -> List[Dict[str, Any]]:
    """COCOeval's per-image, per-category matching at IoU 0.5, area "all" and its last
    ``maxDets``: pycocotools' ``evalImgs`` entries (``dtIds``, ``dtScores``, ``dtMatches`` and
    ``dtIgnore`` of shape (D,) at IoU 0.5, ``gtIds``, ``gtIgnore`` (G,)), only those of images
    with ground truth or detections of the category; ``dtMatches`` holds the matched
    ground-truth id, 0 for none."""
    params = coco_eval.params
    area = params.areaRng[_area_all(params)]
    if isinstance(coco_eval, COCOeval) and getattr(coco_eval, "evalImgs", None):
        iou = _index_of(params.iouThrs, IOU_THRESHOLD, "IoU threshold")
        entries = [e for e in coco_eval.evalImgs if e is not None and list(e["aRng"]) == area]
    else:  # faster-coco-eval keeps no evalImgs: pycocotools' matching, at IoU 0.5 only
        again = COCOeval(coco_eval.cocoGt, coco_eval.cocoDt, params.iouType)
        again.params.imgIds = list(params.imgIds)
        again.params.catIds = list(params.catIds)
        again.params.iouThrs = np.array([IOU_THRESHOLD])
        again.params.areaRng, again.params.areaRngLbl = [area], ["all"]
        again.params.maxDets = [params.maxDets[-1]]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            again.evaluate()
        iou, entries = 0, [e for e in again.evalImgs if e is not None]
    return [
        {
            **e,
            "dtMatches": np.asarray(e["dtMatches"])[iou],
            "dtIgnore": np.asarray(e["dtIgnore"], dtype=bool)[iou],
            "gtIgnore": np.asarray(e["gtIgnore"], dtype=bool),
            "dtScores": np.asarray(e["dtScores"], dtype=float),
        }
        for e in entries
    ]


def _counts(tp: int, fp: int, fn: int) -> Dict[str, Any]:
    """Counts with precision, recall and F1; None where undefined (no detections / no ground
    truth / neither)."""
    return {
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
    }


def _best_threshold(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> Optional[Dict]:
    """The score threshold of highest F1 (the highest such threshold on ties), with its counts;
    None without detections or ground truth."""
    if not len(scores) or not num_gt:
        return None
    order = np.argsort(-scores, kind="mergesort")
    scores, tp = scores[order], np.cumsum(is_tp[order])
    fp = np.arange(1, len(scores) + 1) - tp
    # Keeping all detections with score >= s: the last of each run of equal scores.
    last = np.flatnonzero(np.append(scores[1:] != scores[:-1], True))
    f1 = 2 * tp[last] / (2 * tp[last] + fp[last] + (num_gt - tp[last]))
    best = last[int(np.argmax(f1))]
    return {
        "score": float(scores[best]),
        **_counts(int(tp[best]), int(fp[best]), num_gt - int(tp[best])),
    }


def _ap(precision: np.ndarray) -> Optional[float]:
    """detectron2's per-class AP in percent: the mean of the defined (> -1) precisions."""
    precision = precision[precision > -1]
    return float(np.mean(precision) * 100) if precision.size else None


def confusion_matrix(
    coco_eval, eval_images: List[Dict[str, Any]], score_threshold: float
) -> np.ndarray:
    """Counts of ground-truth class (rows) against predicted class (columns), background last.

    Only detections with score >= ``score_threshold`` that COCOeval did not ignore, and
    ground-truth boxes it did not ignore (crowd regions), are counted. A detection matched by
    COCOeval to a box of its class is on the diagonal. Each other detection, by descending score,
    is matched to the unmatched ground-truth box of another class with the highest IoU >= 0.5
    (row: that class); without one it is a background false positive (last row). A ground-truth
    box left unmatched is a background false negative (last column).

    Args:
        coco_eval: the evaluated COCOeval (its ``cocoGt``, ``cocoDt`` and ``params.catIds``).
        eval_images: the per-image matching of ``_eval_images``.
        score_threshold: the operating score threshold.

    Returns:
        int64 array of shape (K + 1, K + 1), K = ``len(coco_eval.params.catIds)``.
    """
    cat_index = {cat: k for k, cat in enumerate(coco_eval.params.catIds)}
    num_classes = len(cat_index)
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    by_image: Dict[Any, List[Dict[str, Any]]] = {}
    for e in eval_images:
        by_image.setdefault(e["image_id"], []).append(e)
    for entries in by_image.values():
        detections, ground_truth = [], []  # leftovers: (score, id, class), (id, class)
        for e in entries:
            k = cat_index[e["category_id"]]
            kept = (e["dtScores"] >= score_threshold) & ~e["dtIgnore"]
            matched = kept & (e["dtMatches"] > 0)
            matrix[k, k] += int(matched.sum())
            detections += [
                (s, d, k)
                for s, d in zip(
                    e["dtScores"][kept & ~matched], np.asarray(e["dtIds"])[kept & ~matched]
                )
            ]
            found = {int(m) for m in e["dtMatches"][matched]}
            ground_truth += [
                (g, k)
                for g, ignore in zip(e["gtIds"], e["gtIgnore"])
                if not ignore and int(g) not in found
            ]
        taken = np.zeros(len(ground_truth), dtype=bool)
        if detections and ground_truth:
            ious = mask_util.iou(
                [coco_eval.cocoDt.anns[int(d)]["bbox"] for _, d, _ in detections],
                [coco_eval.cocoGt.anns[int(g)]["bbox"] for g, _ in ground_truth],
                [0] * len(ground_truth),
            )
        for i in sorted(range(len(detections)), key=lambda i: -detections[i][0]):
            k = detections[i][2]
            candidates = [
                j
                for j, (_, gk) in enumerate(ground_truth)
                if gk != k and not taken[j] and ious[i, j] >= IOU_THRESHOLD
            ]
            if candidates:
                j = max(candidates, key=lambda j: ious[i, j])
                taken[j] = True
                matrix[ground_truth[j][1], k] += 1
            else:
                matrix[num_classes, k] += 1
        for (_, gk), was_taken in zip(ground_truth, taken):
            if not was_taken:
                matrix[gk, num_classes] += 1
    return matrix


def compute_diagnostics(
    coco_eval, class_names: Optional[Sequence[str]], score_threshold: float
) -> Dict[str, Dict[str, Any]]:
    """The diagnostics of an evaluated (``evaluate()``, ``accumulate()``) box COCOeval.

    Args:
        coco_eval: pycocotools' COCOeval or a compatible one (faster-coco-eval's), for boxes.
        class_names: the K names of ``coco_eval.params.catIds`` in order (detectron2's
            ``thing_classes``); None or another length: the ground truth's category names.
        score_threshold: the operating score threshold (detections with score >= it are kept).

    Returns:
        ``{"precision_recall": ..., "class_metrics": ..., "confusion_matrix": ...}``, each
        JSON-serializable (undefined values None), as described in docs/training.md. AP values
        are in percent, as detectron2 reports them; precision, recall and F1 in [0, 1].
    """
    params = coco_eval.params
    cat_ids = list(params.catIds)
    if class_names is None or len(class_names) != len(cat_ids):
        class_names = [c["name"] for c in coco_eval.cocoGt.loadCats(cat_ids)]
    area, iou = _area_all(params), _index_of(params.iouThrs, IOU_THRESHOLD, "IoU threshold")
    precision = coco_eval.eval["precision"][:, :, :, area, -1]  # (T, R, K)
    scores = coco_eval.eval["scores"][:, :, :, area, -1]
    eval_images = _eval_images(coco_eval)
    setting = {
        "score_threshold": float(score_threshold),
        "iou_threshold": IOU_THRESHOLD,
        "area": "all",
        "max_detections_per_image": int(params.maxDets[-1]),
    }
    by_category: Dict[Any, List[Dict[str, Any]]] = {cat_id: [] for cat_id in cat_ids}
    for e in eval_images:
        by_category[e["category_id"]].append(e)
    classes, curves, totals = [], [], np.zeros(3, dtype=np.int64)
    for k, (cat_id, name) in enumerate(zip(cat_ids, class_names)):
        entries = by_category[cat_id]
        dt_scores = np.concatenate([e["dtScores"][~e["dtIgnore"]] for e in entries] + [[]])
        is_tp = np.concatenate([e["dtMatches"][~e["dtIgnore"]] > 0 for e in entries] + [[]])
        is_tp = is_tp.astype(bool)
        num_gt = int(sum(int((~e["gtIgnore"]).sum()) for e in entries))
        kept = dt_scores >= score_threshold
        tp = int(is_tp[kept].sum())
        counts = np.array([tp, int(kept.sum()) - tp, num_gt - tp])
        totals += counts
        ap50 = _ap(precision[iou, :, k])
        classes.append(
            {
                "name": name,
                "category_id": cat_id.item() if isinstance(cat_id, np.generic) else cat_id,
                "AP": _ap(precision[:, :, k]),
                "AP50": ap50,
                "ground_truth": num_gt,
                "detections": len(dt_scores),
                **_counts(*map(int, counts)),
                "best_threshold": _best_threshold(dt_scores, is_tp, num_gt),
            }
        )
        defined = precision[iou, :, k] > -1
        curves.append(
            {
                "name": name,
                "AP50": ap50,
                "precision": [
                    float(p) if d else None for p, d in zip(precision[iou, :, k], defined)
                ],
                "scores": [float(s) if d else None for s, d in zip(scores[iou, :, k], defined)],
            }
        )
    matrix = confusion_matrix(coco_eval, eval_images, score_threshold)
    return {
        "precision_recall": {
            **setting,
            "recall": [float(r) for r in params.recThrs],
            "classes": curves,
        },
        "class_metrics": {**setting, "classes": classes, "overall": _counts(*map(int, totals))},
        "confusion_matrix": {
            **setting,
            "labels": [*class_names, "background"],
            "rows": "ground truth",
            "columns": "prediction",
            "matrix": matrix.tolist(),
        },
    }


def summary_table(diagnostics: Dict[str, Dict[str, Any]]) -> str:
    """The per-class counts, precision, recall, F1 and best threshold as a text table."""
    from tabulate import tabulate

    metrics = diagnostics["class_metrics"]
    keys = ("true_positives", "false_positives", "false_negatives", "precision", "recall", "f1")
    rows = [
        [c["name"], *(c[k] for k in keys), (c["best_threshold"] or {}).get("score")]
        for c in metrics["classes"]
    ]
    rows.append(["(all)", *(metrics["overall"][k] for k in keys), None])
    return tabulate(
        rows,
        headers=["category", "TP", "FP", "FN", "precision", "recall", "F1", "best threshold"],
        tablefmt="pipe",
        floatfmt=".3f",
        missingval="-",
    )


def _setting_line(part: Dict[str, Any]) -> str:
    return (
        f"IoU {part['iou_threshold']}, area {part['area']}, "
        f"{part['max_detections_per_image']} detections per image"
    )


def _draw_precision_recall(part: Dict[str, Any], metrics: Dict[str, Any]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    for curve, counts in zip(part["classes"], metrics["classes"]):
        if curve["AP50"] is None:
            continue
        precision = [np.nan if p is None else p for p in curve["precision"]]
        (line,) = ax.plot(
            part["recall"], precision, label=f"{curve['name']} (AP50 {curve['AP50']:.1f})"
        )
        if counts["precision"] is not None and counts["recall"] is not None:
            ax.plot(counts["recall"], counts["precision"], "o", color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    ax.set_title(
        f"Precision-recall per class (COCO, interpolated), {_setting_line(part)}\n"
        f"dots: score threshold {metrics['score_threshold']:g}",
        fontsize=9,
    )
    if len(part["classes"]) <= MAX_ANNOTATED_CLASSES:
        ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return fig


def _draw_ap_per_class(metrics: Dict[str, Any]):
    from matplotlib.figure import Figure

    classes = metrics["classes"]
    fig = Figure(figsize=(8, 1.5 + 0.35 * len(classes)))
    ax = fig.subplots()
    positions = np.arange(len(classes))
    for offset, key in ((-0.2, "AP"), (0.2, "AP50")):
        values = [np.nan if c[key] is None else c[key] for c in classes]
        bars = ax.barh(positions + offset, np.nan_to_num(values), height=0.4, label=key)
        labels = ["no ground truth" if math.isnan(v) else f"{v:.1f}" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.set_yticks(positions, [c["name"] for c in classes], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 110), xlabel="AP (%)")
    ax.set_title("Box AP per class (AP: IoU 0.5:0.95, AP50: IoU 0.5), area all", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _draw_confusion_matrix(part: Dict[str, Any]):
    from matplotlib.figure import Figure

    matrix = np.asarray(part["matrix"], dtype=float)
    labels = part["labels"]
    size = 3 + 0.45 * len(labels)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    rows = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="fraction of the row")
    if len(labels) <= MAX_ANNOTATED_CLASSES + 1:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                color = "white" if fractions[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set(xlabel="predicted class", ylabel="ground-truth class")
    ax.set_title(
        f"Confusion matrix (counts), score >= {part['score_threshold']:g},\n{_setting_line(part)}",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def write_diagnostics(diagnostics: Dict[str, Dict[str, Any]], output_dir: str) -> List[str]:
    """Writes :data:`FILES` (JSON and PNG) of :func:`compute_diagnostics`' result into
    ``output_dir`` (created if needed), replacing the files of an earlier evaluation.

    Returns:
        The paths written.
    """
    from detectron2.utils.file_io import PathManager

    figures = {
        "precision_recall": lambda: _draw_precision_recall(
            diagnostics["precision_recall"], diagnostics["class_metrics"]
        ),
        "class_metrics": lambda: _draw_ap_per_class(diagnostics["class_metrics"]),
        "confusion_matrix": lambda: _draw_confusion_matrix(diagnostics["confusion_matrix"]),
    }
    PathManager.mkdirs(output_dir)
    written = []
    for key, (json_name, png_name) in FILES.items():
        path = os.path.join(output_dir, json_name)
        with PathManager.open(path, "w") as f:
            json.dump(diagnostics[key], f, indent=1)
        written.append(path)
        path = os.path.join(output_dir, png_name)
        with PathManager.open(path, "wb") as f:
            figures[key]().savefig(f, format="png", dpi=100)
        written.append(path)
    return written
