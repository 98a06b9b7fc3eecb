"""bench/protocols.py end to end on a small synthetic shop: every table comes out, sane."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from trainer.synthetic import generate_demo


@pytest.mark.slow
def test_protocols_bench_runs_on_synthetic_data(tmp_path: Path) -> None:
    generate_demo(tmp_path / "data", products=8, train=8, val=3, scans=0, size=96, seed=5)
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "protocols.py"), "--data", tmp_path / "data",
         "--out", tmp_path / "runs", "--size", "64", "--epochs", "2", "--batch-size", "8",
         "--margin", "0.2", "--no-docs"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for title in ("1. Closed set: classifier heads", "kiosk matcher", "hash (4-bit code) shortlist",
                  "2. New products (2 held out of training, 6 val photos)",
                  "3. Unknown items"):
        assert title in out
    assert "5 training photos" in out and "catalog (iconic) photo" in out
    assert "top-2 categories" in out and "64 of" in out
    assert out.count("all products, category prior") == 3  # closed set, both enrolments
    # the category of the product the kiosk names is right whenever the product is
    matcher = out.split("kiosk matcher")[1].split("hash (4-bit code)")[0]
    assert "category top-1" in matcher
    rows = [ln.split()[-5:] for ln in matcher.splitlines() if ln.startswith(("all", "top-"))]
    assert len(rows) == 5
    for top1, interval, _, category, _ in rows:
        assert float(top1) <= float(category) <= 1
        low, high = map(float, interval.split("-"))
        assert low - 0.005 <= float(top1) <= high + 0.005  # cells rounded to 0.01 and 0.001
    # every top-1 and AUROC comes with its 95% interval over products: 5 searches, 7 rows of
    # new products (the trained bar, 2 enrolments x 3 searches), 1 unknown row
    intervals = re.findall(r"(?<![\d.])([01]\.\d\d)-([01]\.\d\d)(?![\d.])", out)
    assert len(intervals) == 13
    assert all(0 <= float(low) <= float(high) <= 1 for low, high in intervals)
    for column in ("new top-1 95% CI", "AUROC 95% CI"):
        assert column in out
    # protocol 2's bar: the closed model, trained on the held-out products, leads its table
    new = out.split("2. New products")[1].split("3. Unknown items")[0]
    assert new.count("none: trained on (all-products model)") == 1
    assert new.index("trained on") < new.index("5 training photos")

    # checkpoints trained elsewhere (a GPU box) are reused: the same tables come out; a
    # "held-out" checkpoint that held out other products is refused in one line
    runs = tmp_path / "runs"
    reuse = [sys.executable, str(ROOT / "bench" / "protocols.py"), "--data", tmp_path / "data",
             "--out", tmp_path / "reuse", "--no-docs", "--closed-checkpoint",
             runs / "closed" / "best.pt", "--held-out-checkpoint"]
    again = subprocess.run([*reuse, runs / "held-out" / "best.pt"], capture_output=True,
                           text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    def heads(text: str) -> str:
        return text.split("1. Closed set: classifier heads")[1].split("kiosk matcher")[0]

    assert heads(again.stdout) == heads(out)
    wrong = subprocess.run([*reuse, runs / "closed" / "best.pt"], capture_output=True,
                           text=True, timeout=600, cwd=ROOT)
    assert wrong.returncode != 0 and "held out nothing, not this protocol's" in wrong.stderr

    # bench/matching.py compares checkpoints' search modes: here the same one twice, which
    # must give the same numbers, row for row
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "matching.py"), "--data", tmp_path / "data",
         "--out", tmp_path / "matching", "--no-docs", "--training-photos"]
        + ["--checkpoint", tmp_path / "runs" / "closed" / "best.pt"] * 2,
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [ln.split("best.pt", 1)[1].split()[:-1]  # all but the (timed) last column
            for ln in result.stdout.splitlines() if "best.pt" in ln]
    # 2 precisions per checkpoint, then per checkpoint 5 searches of the shipped catalog and
    # 5 of the one with every training photo enrolled
    heads, searches = rows[:4], rows[4:]
    assert len(searches) == 20
    assert sum("training" in r for r in searches) == 10
    assert heads[:2] == heads[2:] and searches[:10] == searches[10:]
    assert "top-1 95% CI" in result.stdout  # intervals are seeded: equal rows, equal intervals

    # the held-out model it trained is what bench/feature_weight.py chooses the weight with
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "feature_weight.py"), "--data", tmp_path / "data",
         "--checkpoint", tmp_path / "runs" / "held-out" / "best.pt", "--no-docs"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout.split("feature weight")[-1]
    assert table.count("yes") == 1  # exactly one weight chosen
    for column in ("tune: 5 photos", "tune: catalog photo", "val: unknown AUROC"):
        assert column in result.stdout

    # and what bench/new_products.py says about where the new products' photos go
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "new_products.py"), "--data", tmp_path / "data",
         "--checkpoint", tmp_path / "runs" / "held-out" / "best.pt", "--no-docs"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    where = [ln.split() for ln in result.stdout.splitlines() if ln.startswith(("5 training",
                                                                             "catalog photo"))]
    assert len(where) == 4
    for row in where:  # right + wrong to a trained product + wrong to another new one = 1
        top1, to_known, to_new = map(float, row[-4:-1])
        assert abs(top1 + to_known + to_new - 1) <= 0.0015  # three values rounded to 0.001
    assert "Calibrated stacking" in result.stdout
    per_product = result.stdout.split("against val photos")[1].strip().splitlines()[2:]
    full = [row.split() for row in per_product if len(row.split()) == 6]
    assert full  # held-out products with photos in both splits, below the header and rule
    for _, _, tune, _, val, gap in full:  # the gap is val minus tune, in whole pp
        assert abs(100 * (float(val) - float(tune)) - float(gap)) <= 0.6

    # bench/enrolment_views.py: each enrolment photo adds its 3 centre crops as references;
    # each studio photo (the synthetic shop's catalog photos, on a light grey sweep) 8 shop
    # views
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "enrolment_views.py"), "--data", tmp_path / "data",
         "--checkpoint", tmp_path / "runs" / "held-out" / "best.pt", "--out",
         tmp_path / "views", "--no-docs"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    table = [ln.split("best.pt", 1)[1] for ln in result.stdout.splitlines() if "best.pt" in ln]
    assert len(table) == 6  # 2 sources x (as is, + crops), catalog photo + 2 kinds of views
    # references per product (catalog photo: as is, with crops, with piled and with held shop
    # views; then 5 training photos, no studio shots: as is, with crops)
    assert [float(row.split()[-5]) for row in table] == [1, 4, 9, 9, 5, 20]
    for row in table:  # all val photos' top-1 lies between the new and the known ones'
        new, known, every = map(float, row.split()[-3:])
        assert min(new, known) - 1e-3 <= every <= max(new, known) + 1e-3

    # bench/unknown_threshold.py: each calibration rule in both shops, from the two bundles
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "unknown_threshold.py"), "--data",
         tmp_path / "data", "--closed-bundle", runs / "closed-bundle", "--held-out-bundle",
         runs / "held-out-bundle", "--no-docs"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [ln.split() for ln in result.stdout.splitlines()
            if ln.startswith(("new items", "not stocked"))]
    assert [" ".join(r[:2]) for r in rows] == ["new items"] * 2 + ["not stocked"] * 2
    assert ["(before)" in " ".join(r) for r in rows] == [True, False, True, False]
    for row in rows:
        kept, rejected, mean = map(float, row[-3:])
        assert 0 <= kept <= 1 and 0 <= rejected <= 1 and abs((kept + rejected) / 2 - mean) < 2e-3
    wrong = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "unknown_threshold.py"), "--data",
         tmp_path / "data", "--closed-bundle", runs / "held-out-bundle", "--held-out-bundle",
         runs / "closed-bundle", "--no-docs"], capture_output=True, text=True, timeout=600,
        cwd=ROOT)
    assert wrong.returncode != 0 and "must leave out" in wrong.stderr

    # bench/unknown_scores.py: the shipped score first, as protocol 3 measured it, then the
    # others, each AUROC with its interval over products
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "unknown_scores.py"), "--data", tmp_path / "data",
         "--checkpoint", runs / "held-out" / "best.pt", "--out", tmp_path / "scores",
         "--no-docs"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [ln.split() for ln in result.stdout.split("FAR @ 95% TAR")[-1].splitlines()[2:]]
    assert len(rows) == 12 and "(shipped)" in rows[0]
    protocol3 = out.split("3. Unknown items")[1].strip().splitlines()[-1].split()
    assert abs(float(rows[0][-3]) - float(protocol3[0])) <= 0.02
    for row in rows:
        low, high = map(float, row[-2].split("-"))
        assert 0 <= low <= high <= 1 and 0 <= float(row[-3]) <= 1 and 0 <= float(row[-1]) <= 1


def test_held_out_folds_hold_out_each_product_once() -> None:
    """Protocol 2's fold stays ids 1, 5, 9, ...; the 4 folds together hold out every product
    once, so a multi-fold run judges each as a new product; a fold past them is refused."""
    from bench.protocols import held_out_products

    fine = [f"p{i}" for i in range(81)]
    folds = [held_out_products(fine, 4, k) for k in range(4)]
    assert held_out_products(fine, 4) == folds[1] == fine[1::4] and len(folds[1]) == 20
    assert sorted(p for fold in folds for p in fold) == sorted(fine)
    with pytest.raises(SystemExit, match="fold 4: pick 0 to 3"):
        held_out_products(fine, 4, 4)


def test_mahalanobis_score_forgives_how_products_vary_and_survives_few_photos() -> None:
    """bench/unknown_scores.py's Mahalanobis score: a query off a product along the direction
    its photos vary (light, angle) scores as more likely sold than one as far off across it;
    with fewer photos than dimensions the shrunk covariance still inverts to finite scores."""
    from bench.unknown_scores import mahalanobis

    rng = np.random.default_rng(0)
    spread = np.array([3.0, 0.1, 0.1, 0.1])
    centres = np.array([[0.0, 0, 0, 0], [0, 5, 0, 0]])
    labels = np.repeat([0, 1], 200)
    photos = centres[labels] + rng.normal(size=(400, 4)) * spread
    along, across = np.array([[3.0, 0, 0, 0]]), np.array([[0.0, 0, 3, 0]])
    distance, relative = mahalanobis(np.concatenate([along, across]), photos, labels, 2)
    assert distance[0] > distance[1] and relative[0] > relative[1]

    few = rng.normal(size=(6, 32))
    distance, relative = mahalanobis(rng.normal(size=(3, 32)), few, np.array([0, 0, 0, 1, 1, 1]),
                                     2)
    assert np.isfinite(distance).all() and np.isfinite(relative).all()
