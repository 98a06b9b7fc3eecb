"""Classification metrics and evaluation reports for the fine (product) and coarse
(category) heads, and micro-F1 for the optional multi-label attribute head.

Everything works on plain numpy arrays so that the trainer, the CLIs and the
benchmarks share one definition of each number, without importing torch.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.tables import format_markdown_table

PER_CLASS_COLUMNS = [
    "class",
    "support",
    "precision",
    "recall",
    "f1",
    "mistaken_for",
    "mistaken_count",
]
SUMMARY_COLUMNS = ["head", "top1", "top5", "macro_f1", "n"]


def _check_labels(labels: np.ndarray, num_classes: int, name: str = "labels") -> np.ndarray:
    """Return `labels` as a 1-D int array, failing loudly on out-of-range ids
    (an off-by-one class mapping would otherwise silently skew every metric)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    return labels.astype(np.int64)


def _check_pair(
    pred: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate predictions and labels together: same length, valid class ids."""
    pred = _check_labels(pred, num_classes, "pred")
    labels = _check_labels(labels, num_classes, "labels")
    if pred.shape != labels.shape:
        raise ValueError(f"pred and labels differ in length: {pred.shape} vs {labels.shape}")
    return pred, labels


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the `k` highest scores.

    Ties are broken towards the lower class index, the same rule as `np.argmax`,
    so top-1 accuracy always agrees with argmax predictions (and a constant-score
    model is not rewarded for its ties).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty [N, C] array, got shape {scores.shape}")
    num_samples, num_classes = scores.shape
    labels = _check_labels(labels, num_classes)
    if labels.shape[0] != num_samples:
        raise ValueError(f"{num_samples} score rows but {labels.shape[0]} labels")
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must lie in [1, {num_classes}], got {k}")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Count matrix [C, C]: rows are true classes, columns predicted classes."""
    pred, labels = _check_pair(pred, labels, num_classes)
    flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num / den with 0 where den is 0 (undefined scores count as 0,
    the same convention as scikit-learn's `zero_division=0`)."""
    num = num.astype(np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class support, precision, recall and F1 from a confusion matrix."""
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    return {
        "support": support,
        "predicted": predicted,
        "precision": _safe_ratio(tp, predicted),
        "recall": _safe_ratio(tp, support),
        "f1": _safe_ratio(2 * tp, support + predicted),
    }


def macro_f1(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 scores.

    Classes that appear neither in `labels` nor in `pred` are excluded from the
    mean: their F1 is undefined, and counting them as 0 (or 1) would make the
    score depend on how many unused classes the label map happens to contain,
    e.g. when evaluating on a subset. A class that is present but never
    predicted (or predicted but never present) counts with F1 = 0.
    """
    scores = _per_class_scores(confusion_matrix(pred, labels, num_classes))
    present = (scores["support"] + scores["predicted"]) > 0
    if not present.any():
        raise ValueError("macro F1 is undefined for empty inputs")
    return float(scores["f1"][present].mean())


def per_class_table(pred: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One row per class (in class-id order) with support, precision, recall, F1
    and the class it is most often mistaken for, to show where the errors go.

    `mistaken_for` is the most frequent wrong prediction for samples of this
    class ("" when it has no errors); ties go to the lower class index.
    """
    cm = confusion_matrix(pred, labels, len(class_names))
    scores = _per_class_scores(cm)
    errors = cm.copy()
    np.fill_diagonal(errors, 0)
    rows = []
    for i, name in enumerate(class_names):
        worst = int(errors[i].argmax())
        count = int(errors[i, worst])
        rows.append(
            {
                "class": name,
                "support": int(scores["support"][i]),
                "precision": float(scores["precision"][i]),
                "recall": float(scores["recall"][i]),
                "f1": float(scores["f1"][i]),
                "mistaken_for": class_names[worst] if count else "",
                "mistaken_count": count,
            }
        )
    return rows


@dataclass
class Report:
    """Headline numbers for one evaluation run of both heads."""

    fine_top1: float
    fine_top5: float
    coarse_top1: float
    coarse_top5: float
    fine_macro_f1: float
    coarse_macro_f1: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict, ready for JSON."""
        return asdict(self)

    def summary_rows(self) -> list[dict]:
        """The report as one table row per head (columns `SUMMARY_COLUMNS`)."""
        return [
            {
                "head": head,
                "top1": getattr(self, f"{head}_top1"),
                "top5": getattr(self, f"{head}_top5"),
                "macro_f1": getattr(self, f"{head}_macro_f1"),
                "n": self.n,
            }
            for head in ("fine", "coarse")
        ]


def _head_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Top-1, top-5 (k clipped to the class count) and macro F1 for one head."""
    scores = np.asarray(scores)
    num_classes = scores.shape[-1]
    return (
        topk_accuracy(scores, labels, 1),
        topk_accuracy(scores, labels, min(5, num_classes)),
        macro_f1(scores.argmax(axis=1), labels, num_classes),
    )


def evaluate_scores(
    fine_scores: np.ndarray,
    fine_labels: np.ndarray,
    coarse_scores: np.ndarray,
    coarse_labels: np.ndarray,
) -> Report:
    """Compute the headline report from raw [N, C] scores (logits or
    probabilities; only their order matters) of both heads."""
    if len(fine_labels) != len(coarse_labels):
        raise ValueError(f"{len(fine_labels)} fine labels but {len(coarse_labels)} coarse labels")
    fine_top1, fine_top5, fine_f1 = _head_metrics(fine_scores, fine_labels)
    coarse_top1, coarse_top5, coarse_f1 = _head_metrics(coarse_scores, coarse_labels)
    return Report(
        fine_top1=fine_top1,
        fine_top5=fine_top5,
        coarse_top1=coarse_top1,
        coarse_top5=coarse_top5,
        fine_macro_f1=fine_f1,
        coarse_macro_f1=coarse_f1,
        n=len(fine_labels),
    )


def multi_hot(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """[len(rows), width] bool matrix with row i true at the indices `rows[i]`: each product's
    attribute labels as the targets of a multi-label head."""
    out = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        out[i, list(row)] = True
    return out


def micro_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """Micro-averaged F1 of multi-label [N, L] yes/no decisions: every (item, label) pair
    counts once, and predicting no label at all scores 0 (with mostly-negative targets,
    plain accuracy would reward it). 0 as well when there is nothing to find."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred and target must be [N, L] of one shape, got {pred.shape} "
                         f"and {target.shape}")
    true_pos = int(np.sum(pred & target))
    both = int(pred.sum() + target.sum())
    return 2 * true_pos / both if both else 0.0


def threshold_at_tar(known_scores: np.ndarray, tar: float = 0.95) -> float:
    """The highest threshold that still accepts (score >= threshold) at least `tar` of the
    known items: the operating point an open-set recogniser is calibrated to."""
    known = np.sort(np.asarray(known_scores, np.float64))[::-1]
    if not known.size:
        raise ValueError("a threshold needs at least one known score")
    if not 0 < tar <= 1:
        raise ValueError(f"tar must lie in (0, 1], got {tar}")
    accepted = int(np.ceil(round(tar * known.size, 9)))  # round: 0.95 * 20 is 19.000000000000004
    return float(known[accepted - 1])


def far_at_tar(
    known_scores: np.ndarray, unknown_scores: np.ndarray, tar: float = 0.95
) -> tuple[float, float]:
    """(threshold accepting `tar` of the known items, share of unknown items it accepts too):
    how many strangers get a product name when `tar` of real products keep theirs."""
    unknown = np.asarray(unknown_scores, np.float64)
    if not unknown.size:
        raise ValueError("a false accept rate needs at least one unknown score")
    threshold = threshold_at_tar(known_scores, tar)
    return threshold, float(np.mean(unknown >= threshold))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks in ascending order; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new_value = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(new_value)
    ends = np.r_[starts[1:], len(values)]
    group = np.cumsum(new_value) - 1
    ranks = np.empty(len(values))
    ranks[order] = ((starts + ends + 1) / 2)[group]
    return ranks


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """Probability that a known item scores higher than an unknown one (ties count half):
    threshold-free separation of known from unknown, by ranks (Mann-Whitney U), O(n log n)."""
    known = np.asarray(known_scores, np.float64).ravel()
    unknown = np.asarray(unknown_scores, np.float64).ravel()
    if not known.size or not unknown.size:
        raise ValueError("AUROC needs at least one known and one unknown score")
    ranks = _average_ranks(np.concatenate([known, unknown]))
    u = ranks[: known.size].sum() - known.size * (known.size + 1) / 2
    return float(u / (known.size * unknown.size))


BOOTSTRAP_ROUNDS = 2000


def product_interval(stat: Callable[[np.ndarray], float], products: Sequence,
                     strata: Sequence | None = None, level: float = 0.95,
                     rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat(photo indices)` when whole products are drawn
    again with replacement (`products`: each photo's product), within each stratum apart
    (`strata`: each photo's, e.g. known or unknown, so every draw keeps as many of each).

    A product's photos are not independent draws: Grocery shoots each product's val photos
    in one session, so they tend to be all right or all wrong together. Resampling photos
    would give an interval as if there were 296 chances where there are 60 products; what
    the number would do on other products is what this interval shows. A draw on which `stat`
    is undefined (NaN: say, no unknown product drawn) is left out."""
    products = np.asarray(products)
    strata = np.zeros(len(products), int) if strata is None else np.asarray(strata)
    if len(products) != len(strata) or not len(products):
        raise ValueError("a product interval needs one product and stratum per photo, and "
                         "at least one photo")
    groups = [[np.flatnonzero((strata == s) & (products == p))
               for p in np.unique(products[strata == s])] for s in np.unique(strata)]
    rng = np.random.default_rng(seed)
    values = np.array([stat(np.concatenate([g[i] for g in groups
                                            for i in rng.integers(0, len(g), len(g))]))
                       for _ in range(rounds)], np.float64)
    values = values[~np.isnan(values)]  # draws where the stat is undefined (NaN) are left out
    if not values.size:
        raise ValueError("the stat is undefined (NaN) on every draw")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def format_interval(interval: tuple[float, float]) -> str:
    """'0.49-0.77': an interval as a table cell."""
    return f"{interval[0]:.2f}-{interval[1]:.2f}"


def _row_normalise(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its total, so colours show per-class recall patterns
    regardless of class frequency; rows of absent classes stay 0."""
    totals = cm.sum(axis=1, keepdims=True)
    return _safe_ratio(cm, totals)


def _plot_style(num_classes: int) -> dict[str, float]:
    """Cell size and font sizes that keep labels legible as the class count
    grows: the figure grows with the classes, the fonts shrink gently."""
    if num_classes <= 12:
        return {"cell": 0.6, "label": 10, "count": 9}
    if num_classes <= 30:
        return {"cell": 0.42, "label": 8, "count": 6.5}
    return {"cell": 0.2, "label": 6.5, "count": 0}


def _short(name: str, limit: int = 32) -> str:
    """Truncate long product names so they do not squeeze the matrix."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _annotate_counts(ax: Axes, cm: np.ndarray, norm: np.ndarray, fontsize: float) -> None:
    """Write non-zero counts into cells, in white on dark cells for contrast."""
    for i, j in zip(*np.nonzero(cm), strict=True):
        colour = "white" if norm[i, j] > 0.5 else "black"
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=fontsize, color=colour)


def plot_confusion(
    cm: np.ndarray, class_names: Sequence[str], path: Path | str, title: str
) -> Path:
    """Write a row-normalised confusion-matrix PNG (rows true, columns predicted).

    Uses a bare Agg canvas rather than pyplot, so it works headless and does not
    touch the process-wide matplotlib backend. Counts are written in the cells
    only up to 30 classes; beyond that they would be unreadable.
    """
    cm = np.asarray(cm)
    num_classes = len(class_names)
    if cm.shape != (num_classes, num_classes):
        raise ValueError(f"cm shape {cm.shape} does not match {num_classes} class names")
    style = _plot_style(num_classes)
    side = max(6.0, num_classes * style["cell"] + 3.5)
    fig = Figure(figsize=(side + 0.6, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norm = _row_normalise(cm)
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.6, label="fraction of true class")

    names = [_short(n) for n in class_names]
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks, names, rotation=90, fontsize=style["label"])
    ax.set_yticks(ticks, names, fontsize=style["label"])
    ax.set_xticks(ticks - 0.5, minor=True)
    ax.set_yticks(ticks - 0.5, minor=True)
    ax.grid(which="minor", color="0.9", linewidth=0.4)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if style["count"]:
        _annotate_counts(ax, cm, norm, style["count"])

    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    """Full-precision CSV, for spreadsheets and later comparison."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _markdown_report(report: Report, fine_rows: list[dict], coarse_rows: list[dict]) -> str:
    """Summary plus both per-class tables, ready to paste into docs."""
    return (
        "\n\n".join(
            [
                "# Evaluation report",
                "## Summary",
                format_markdown_table(report.summary_rows(), SUMMARY_COLUMNS),
                "## Fine classes (products)",
                format_markdown_table(fine_rows, PER_CLASS_COLUMNS),
                "## Coarse classes (categories)",
                format_markdown_table(coarse_rows, PER_CLASS_COLUMNS),
            ]
        )
        + "\n"
    )


def write_report(
    out_dir: Path | str,
    report: Report,
    fine_pred: np.ndarray,
    fine_labels: np.ndarray,
    fine_names: Sequence[str],
    coarse_pred: np.ndarray,
    coarse_labels: np.ndarray,
    coarse_names: Sequence[str],
) -> dict[str, Path]:
    """Write the evaluation artefacts into `out_dir` (created if needed):
    metrics.json, per_class.csv (fine classes), per_class.md (both heads),
    confusion_fine.png and confusion_coarse.png. Returns file name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fine_rows = per_class_table(fine_pred, fine_labels, fine_names)
    coarse_rows = per_class_table(coarse_pred, coarse_labels, coarse_names)
    paths = {
        name: out_dir / name
        for name in (
            "metrics.json",
            "per_class.csv",
            "per_class.md",
            "confusion_fine.png",
            "confusion_coarse.png",
        )
    }
    paths["metrics.json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    _write_csv(paths["per_class.csv"], fine_rows, PER_CLASS_COLUMNS)
    paths["per_class.md"].write_text(
        _markdown_report(report, fine_rows, coarse_rows), encoding="utf-8"
    )
    plot_confusion(
        confusion_matrix(fine_pred, fine_labels, len(fine_names)),
        fine_names,
        paths["confusion_fine.png"],
        "Fine classes (products)",
    )
    plot_confusion(
        confusion_matrix(coarse_pred, coarse_labels, len(coarse_names)),
        coarse_names,
        paths["confusion_coarse.png"],
        "Coarse classes (categories)",
    )
    return paths
