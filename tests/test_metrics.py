"""Hand-checked cases for trainer.metrics: every expected number below was worked
out on paper, so a regression shows up as a concrete disagreement."""

import csv
import json

import matplotlib.image
import numpy as np
import pytest

from models.tables import format_markdown_table, format_table
from trainer.metrics import (
    PER_CLASS_COLUMNS,
    Report,
    confusion_matrix,
    evaluate_scores,
    format_interval,
    macro_f1,
    micro_f1,
    multi_hot,
    per_class_table,
    plot_confusion,
    product_interval,
    topk_accuracy,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Four samples, four classes. True-class rank: 2nd, 1st, 4th, and 3rd (all
# scores tie in the last row, so order falls back to class index 0, 1, 2, 3).
SCORES = np.array(
    [
        [0.1, 0.5, 0.3, 0.1],
        [0.9, 0.05, 0.03, 0.02],
        [0.2, 0.3, 0.4, 0.1],
        [0.25, 0.25, 0.25, 0.25],
    ]
)
SCORE_LABELS = np.array([2, 0, 3, 2])

# Confusion matrix (rows true, cols predicted) of the pair below:
#   class 0: [2, 1, 0, 0]   class 1: [1, 1, 0, 0]   class 2: [0, 1, 0, 0]   class 3: absent
# F1: class 0 = 2/3, class 1 = 2*1/(2*1+2+1) = 2/5, class 2 = 0 (never predicted).
LABELS = np.array([0, 0, 0, 1, 1, 2])
PRED = np.array([0, 0, 1, 1, 0, 1])
NAMES = ["apple", "banana", "cherry", "date"]


@pytest.mark.parametrize(("k", "expected"), [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)])
def test_topk_accuracy_hand_computed(k: int, expected: float) -> None:
    assert topk_accuracy(SCORES, SCORE_LABELS, k) == pytest.approx(expected)


def test_top1_agrees_with_argmax_on_ties() -> None:
    expected = float((SCORES.argmax(axis=1) == SCORE_LABELS).mean())
    assert topk_accuracy(SCORES, SCORE_LABELS, 1) == expected


@pytest.mark.parametrize("k", [0, 5])
def test_topk_rejects_k_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match="k must"):
        topk_accuracy(SCORES, SCORE_LABELS, k)


def test_topk_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        topk_accuracy(SCORES, np.array([0, 1, 2, 4]), 1)


def test_confusion_matrix_rows_true_cols_predicted() -> None:
    cm = confusion_matrix(np.array([1]), np.array([0]), 3)
    assert cm[0, 1] == 1
    assert cm.sum() == 1


def test_confusion_matrix_hand_computed() -> None:
    expected = [[2, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(confusion_matrix(PRED, LABELS, 4), expected)


def test_macro_f1_excludes_absent_class_keeps_unpredicted_class() -> None:
    # Mean over classes 0-2 only: (2/3 + 2/5 + 0) / 3 = 16/45. Class 3 is absent.
    assert macro_f1(PRED, LABELS, 4) == pytest.approx(16 / 45)
    assert macro_f1(PRED, LABELS, 3) == pytest.approx(16 / 45)


def test_macro_f1_counts_predicted_but_absent_class() -> None:
    # Class 0: tp 2, fn 1, fp 0 -> F1 4/5. Class 1 is predicted but never true -> F1 0.
    # Class 2 is absent from both and excluded: mean of (4/5, 0).
    assert macro_f1(np.array([0, 1, 0]), np.array([0, 0, 0]), 3) == pytest.approx(2 / 5)


def test_macro_f1_perfect() -> None:
    assert macro_f1(LABELS, LABELS, 10) == 1.0


def test_per_class_table_values() -> None:
    rows = per_class_table(PRED, LABELS, NAMES)
    assert [r["class"] for r in rows] == NAMES
    apple, banana, cherry, date = rows
    assert apple == pytest.approx(
        {
            "class": "apple",
            "support": 3,
            "precision": 2 / 3,
            "recall": 2 / 3,
            "f1": 2 / 3,
            "mistaken_for": "banana",
            "mistaken_count": 1,
        }
    )
    assert banana["precision"] == pytest.approx(1 / 3)
    assert banana["recall"] == pytest.approx(1 / 2)
    assert banana["f1"] == pytest.approx(2 / 5)
    assert (banana["mistaken_for"], banana["mistaken_count"]) == ("apple", 1)
    assert cherry["support"] == 1
    assert (cherry["precision"], cherry["recall"], cherry["f1"]) == (0.0, 0.0, 0.0)
    assert (cherry["mistaken_for"], cherry["mistaken_count"]) == ("banana", 1)
    assert (date["support"], date["mistaken_for"], date["mistaken_count"]) == (0, "", 0)
    assert set(apple) == set(PER_CLASS_COLUMNS)


def test_per_class_table_picks_most_frequent_confusion() -> None:
    rows = per_class_table(np.array([2, 2, 1, 0]), np.array([0, 0, 0, 0]), ["a", "b", "c"])
    assert (rows[0]["mistaken_for"], rows[0]["mistaken_count"]) == ("c", 2)


def test_evaluate_scores_clips_top5_to_class_count() -> None:
    coarse_scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    coarse_labels = np.array([1, 1, 1, 0])
    report = evaluate_scores(SCORES, SCORE_LABELS, coarse_scores, coarse_labels)
    assert report.fine_top1 == pytest.approx(0.25)
    assert report.fine_top5 == 1.0  # k clipped to 4 classes
    assert report.coarse_top1 == pytest.approx(0.75)
    assert report.coarse_top5 == 1.0  # k clipped to 2 classes
    # Coarse preds [1, 0, 1, 0]: class 0 F1 = 2/3, class 1 F1 = 4/5.
    assert report.coarse_macro_f1 == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert report.n == 4
    assert report.to_dict()["fine_top1"] == report.fine_top1


def test_evaluate_scores_rejects_mismatched_heads() -> None:
    with pytest.raises(ValueError, match="coarse labels"):
        evaluate_scores(SCORES, SCORE_LABELS, SCORES[:2], SCORE_LABELS[:2])


def test_multi_hot_marks_each_rows_indices() -> None:
    assert multi_hot([[0, 2], [], [1]], 3).tolist() == [[True, False, True],
                                                         [False, False, False],
                                                         [False, True, False]]


def test_micro_f1_hand_computed() -> None:
    # 4 true pairs, 3 predicted, 2 right: F1 = 2*2 / (3 + 4) = 4/7
    target = multi_hot([[0, 1], [2], [0]], 3)
    pred = multi_hot([[0], [2, 1], []], 3)
    assert micro_f1(pred, target) == pytest.approx(4 / 7)
    assert micro_f1(target, target) == 1.0
    assert micro_f1(np.zeros_like(target), target) == 0.0  # predicting nothing is no baseline
    assert micro_f1(np.zeros((2, 3)), np.zeros((2, 3))) == 0.0


def test_micro_f1_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one shape"):
        micro_f1(np.zeros((2, 3)), np.zeros((2, 4)))


TABLE_ROWS = [
    {"name": "apple", "acc": 0.5, "n": 10},
    {"name": "kiwi fruit", "acc": 0.12345, "n": 3},
]


def test_format_table_alignment() -> None:
    expected = "\n".join(
        [
            "name          acc   n",
            "----------  -----  --",
            "apple       0.500  10",
            "kiwi fruit  0.123   3",
        ]
    )
    assert format_table(TABLE_ROWS, ["name", "acc", "n"]) == expected


def test_format_table_custom_format_and_missing_value() -> None:
    rows = [*TABLE_ROWS, {"name": "fig", "n": 1}]
    lines = format_table(rows, ["name", "acc", "n"], formats={"acc": ".1%"}).splitlines()
    assert lines[2] == "apple       50.0%  10"
    assert lines[4] == "fig                 1"


def test_format_markdown_table() -> None:
    rows = [*TABLE_ROWS, {"name": "a|b", "acc": 1.0, "n": 0}]
    expected = "\n".join(
        [
            "| name | acc | n |",
            "| --- | ---: | ---: |",
            "| apple | 0.500 | 10 |",
            "| kiwi fruit | 0.123 | 3 |",
            "| a\\|b | 1.000 | 0 |",
        ]
    )
    assert format_markdown_table(rows, ["name", "acc", "n"]) == expected


def _assert_valid_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    assert min(image.shape[:2]) > 100


def test_plot_confusion_writes_png(tmp_path) -> None:
    cm = confusion_matrix(PRED, LABELS, 4)  # includes an all-zero row
    path = plot_confusion(cm, NAMES, tmp_path / "cm.png", "test")
    _assert_valid_png(path)


def test_plot_confusion_rejects_mismatched_names(tmp_path) -> None:
    with pytest.raises(ValueError, match="class names"):
        plot_confusion(np.zeros((3, 3)), NAMES, tmp_path / "cm.png", "test")


def test_write_report(tmp_path) -> None:
    report = Report(0.5, 0.9, 0.7, 1.0, 0.4, 0.6, 6)
    coarse_names = ["fruit", "veg"]
    paths = write_report(
        tmp_path / "eval",
        report,
        PRED,
        LABELS,
        NAMES,
        PRED % 2,
        LABELS % 2,
        coarse_names,
    )
    assert set(paths) == {
        "metrics.json",
        "per_class.csv",
        "per_class.md",
        "confusion_fine.png",
        "confusion_coarse.png",
    }
    assert json.loads(paths["metrics.json"].read_text()) == report.to_dict()
    with paths["per_class.csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == NAMES
    assert float(rows[1]["f1"]) == pytest.approx(2 / 5)
    markdown = paths["per_class.md"].read_text()
    assert "| cherry |" in markdown
    assert "| fruit |" in markdown
    _assert_valid_png(paths["confusion_fine.png"])
    _assert_valid_png(paths["confusion_coarse.png"])


def test_product_interval_counts_products_not_photos() -> None:
    """20 products of 5 photos each, every product all right or all wrong (as one-session
    photos tend to be): the interval is as wide as 20 chances give, not 100."""
    right = np.repeat(np.arange(20) < 14, 5)  # 14 of 20 products right: 0.70
    products = np.repeat(np.arange(20), 5)
    low, high = product_interval(lambda i: right[i].mean(), products)
    as_photos = product_interval(lambda i: right[i].mean(), np.arange(100))
    assert low < 0.70 < high and as_photos[0] < 0.70 < as_photos[1]
    assert high - low > 1.7 * (as_photos[1] - as_photos[0])
    assert 0.45 < low < 0.6 and 0.8 < high < 0.95  # binomial(20, 0.7): sd 0.10
    assert product_interval(lambda i: right[i].mean(), products) == (low, high)  # seeded
    assert format_interval((low, high)) == f"{low:.2f}-{high:.2f}"
    everything = product_interval(lambda i: np.ones(100)[i].mean(), products)
    assert everything == (1.0, 1.0)


def test_product_interval_keeps_each_stratum_whole() -> None:
    """Known and unknown products are drawn apart: every draw has both, as AUROC needs."""
    products = np.r_[np.repeat(np.arange(10), 5), np.repeat(np.arange(10, 15), 3)]
    unknown = products >= 10
    assert product_interval(lambda i: float(unknown[i].sum()), products, unknown) == (15, 15)
    with pytest.raises(ValueError, match="one product and stratum per photo"):
        product_interval(lambda i: 0.0, products, unknown[:-1])


def test_product_interval_leaves_out_draws_where_the_stat_is_undefined() -> None:
    """A draw without a product the stat needs (NaN) is left out, not a NaN interval."""
    products = np.arange(4)  # one photo each; product 0 is the only one of its kind
    rare = products == 0
    low, high = product_interval(lambda i: 1.0 if rare[i].any() else float("nan"), products)
    assert (low, high) == (1.0, 1.0)
    with pytest.raises(ValueError, match="undefined"):
        product_interval(lambda i: float("nan"), products)
