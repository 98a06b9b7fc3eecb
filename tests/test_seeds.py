"""bench/seeds.py on a small synthetic shop: arms over seeds and held-out folds, compared seed
by seed and product by product."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from trainer.synthetic import generate_demo


def seeds_bench(data: Path, out: Path, *arms: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "seeds.py"), "--data", data, "--out", out,
         *(a for arm in arms for a in ("--arm", arm)), "--seeds", "0,1", "--size", "64",
         "--epochs", "1", "--batch-size", "8", "--jobs", "2", "--folds", "0,1", "--no-docs"],
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
    runs = [ln.split() for ln in text.split("Each run")[1].split("Each held-out")[0].splitlines()
            if ln.startswith(("base", "no margin"))]
    assert [(r[0], r[-9]) for r in runs] == [("base", "0"), ("base", "1"), ("no", "0"),
                                             ("no", "1")]
    # each arm and seed trained on every product and once per held-out fold, the last epoch kept
    for arm in ("base", "no-margin"):
        for seed in (0, 1):
            run = out / arm / f"seed{seed}"
            for part in ("closed", "held-out-fold0", "held-out-fold1"):
                assert (run / part / "last.pt").is_file()
            for part in ("closed", "fold0", "fold1"):
                assert (run / f"{part}.json").is_file()

    # new products pooled over the folds: a run's top-1 is its folds' top-1s weighted by
    # their photos, each fold's products judged by the model that never saw them
    folds = [ln.split() for ln in text.split("Each held-out fold")[1].splitlines()
             if ln.startswith(("base", "no margin"))]
    assert len(folds) == 8  # 2 arms x 2 seeds x 2 folds
    for i, run in enumerate(runs):
        mine = folds[2 * i:2 * i + 2]
        assert [f[-5] for f in mine] == ["2", "2"]  # 2 of the 8 products held out per fold
        photos = [int(f[-4]) for f in mine]
        for fold_column, run_column in ((-3, -4), (-2, -3)):  # 5 photos, catalog photo
            pooled = sum(n * float(f[fold_column]) for n, f in zip(photos, mine, strict=True))
            assert abs(pooled / sum(photos) - float(run[run_column])) <= 0.0015
    # photo metrics carry their interval over products, differences one drawn in pairs
    table = text.split("Arms over")[1].split("Each run")[0]
    assert "no margin - base, 95% CI" in table
    for metric in ("kiosk matcher top-1", "new, 5 photos", "new, catalog photo",
                   "unknown AUROC"):
        row = next(ln for ln in table.splitlines() if ln.startswith(metric))
        low, high = map(float, re.findall(r"\(([01]\.\d\d)-([01]\.\d\d)\)", row)[0])
        assert 0 <= low <= high <= 1
        assert re.search(r"[-+]\d+\.\d to [-+]\d+\.\d pp", row)

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


def fold_run(scores: dict[str, list[float]]) -> dict:
    """A run's folds as bench/seeds.py reads them: fold k holds out products k and k + 2 of
    a, b, c, d (two val photos each), scored `scores[fold]`."""
    products = [p for p in "abcd" for _ in range(2)]
    return {"folds": {fold: {"photos": {"product": products,
                                        "new": [p in "abcd"[k::2] for p in products],
                                        "unknown score": scores[fold]}}
                      for k, fold in enumerate(("fold0", "fold1"))}}


def test_unknown_auroc_interval_draws_products_across_folds() -> None:
    from bench.seeds import auroc_difference_interval, auroc_interval

    # fold0 holds out a and c, fold1 b and d: known photos score 0.9, unknown ones 0.1
    apart = fold_run({"fold0": [0.1, 0.1, 0.9, 0.9, 0.1, 0.1, 0.9, 0.9],
                      "fold1": [0.9, 0.9, 0.1, 0.1, 0.9, 0.9, 0.1, 0.1]})
    assert auroc_interval([apart]) == "1.00-1.00"
    assert auroc_difference_interval([apart], [apart]) == "+0.0 to +0.0 pp"
    # fold1's model gets it backwards: its AUROC falls from 1 to 0, the mean of the two
    # models' by 50 pp on every draw (a draw judging neither model is left out)
    backwards = fold_run({"fold0": apart["folds"]["fold0"]["photos"]["unknown score"],
                          "fold1": [0.1, 0.1, 0.9, 0.9, 0.1, 0.1, 0.9, 0.9]})
    assert auroc_interval([backwards]) == "0.50-0.50"
    assert auroc_difference_interval([apart], [backwards]) == "-50.0 to -50.0 pp"


def state(pid: int) -> tuple[int, str] | None:
    """A process's parent and state letter, None when it is gone (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0]


def alive(pid: int) -> bool:
    s = state(pid)
    return s is not None and s[1] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_a_killed_bench_takes_its_workers_with_it() -> None:
    # a worker left training after its bench is killed writes on into the folder a rerun reuses
    code = ("import time; from bench.seeds import in_parallel; "
            "in_parallel(time.sleep, [(120,)], 1, 'sleeping')")
    bench = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not workers and time.monotonic() < deadline:
            for stat in Path("/proc").glob("[0-9]*/stat"):
                pid = int(stat.parent.name)
                with contextlib.suppress(OSError):
                    if (state(pid) or (0, ""))[0] == bench.pid and \
                            b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        workers.add(pid)
            time.sleep(0.2)
        assert workers, "the bench started no worker"
        time.sleep(3)  # the worker has imported the bench and runs its initializer
        bench.terminate()
        bench.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), "a worker outlived its bench"
    finally:
        bench.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
