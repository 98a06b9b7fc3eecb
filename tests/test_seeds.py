"""bench/seeds.py on a small synthetic shop: arms over seeds, compared seed by seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainer.synthetic import generate_demo


def seeds_bench(data: Path, out: Path, *arms: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "seeds.py"), "--data", data, "--out", out,
         *(a for arm in arms for a in ("--arm", arm)), "--seeds", "0,1", "--size", "64",
         "--epochs", "1", "--batch-size", "8", "--jobs", "2", "--no-docs"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_seeds_bench_compares_arms_seed_by_seed(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    generate_demo(data, products=8, train=8, val=3, scans=0, size=96, seed=5)
    result = seeds_bench(data, out, "base=", "no margin=--margin 0.0")
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "no margin - base" in text  # the difference column
    for metric in ("fine top-1 INT8", "INT8/FP32 agree", "new, 5 photos", "new, catalog photo",
                   "unknown AUROC", "train minutes"):
        assert metric in text
    runs = [ln.split() for ln in text.split("Each run")[1].splitlines()
            if ln.startswith(("base", "no margin"))]
    assert [(r[0], r[-9]) for r in runs] == [("base", "0"), ("base", "1"), ("no", "0"),
                                             ("no", "1")]
    # each arm and seed trained with and without the held-out products, the last epoch kept
    for arm in ("base", "no-margin"):
        for seed in (0, 1):
            run = out / arm / f"seed{seed}"
            assert (run / "closed" / "last.pt").is_file()
            assert (run / "held-out" / "last.pt").is_file()
            assert (run / "protocols.json").is_file()

    # a second run reuses every training and measurement: the same tables come out
    logs = sorted(out.glob("*/seed*/*/train.log"))
    sizes = [p.stat().st_size for p in logs]
    again = seeds_bench(data, out, "base=", "no margin=--margin 0.0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.split("Arms over")[1] == text.split("Arms over")[1]
    assert [p.stat().st_size for p in logs] == sizes

    # another recipe under the same name is refused in one line, not measured as that arm
    other = seeds_bench(data, out, "base=", "no margin=--margin 0.1")
    assert other.returncode != 0
    assert "not this arm's recipe" in other.stderr.strip().splitlines()[-1]
