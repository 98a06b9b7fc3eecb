"""Recipe arms over several seeds, on the kiosk's path: is a change bigger than its noise?

    python bench/seeds.py --arm "shipped=" --arm "frozen 5=--frozen-stages 5" --seeds 0,1,2 \\
        --arch efficientnet_lite2 --size 260 --epochs 12 --jobs 12

On Grocery's 296 val photos the seed alone moves product top-1 by about 2 pp and new products
enrolled from their catalog photo by about 16 pp (docs/BENCHMARKS.md, protocols-gpu and
protocols-gpu-seed1), so one training per arm cannot tell a 1 pp change from luck. Each arm
(`NAME=OPTIONS`, the options `storyscan train` takes, added to the common recipe) is trained
once per seed on every product and once with bench/protocols.py's 20 products held out; each
pair goes through that bench's three protocols (INT8 bundle, kiosk matcher). The arms are then
compared as mean ± sd over the seeds and, seed by seed, as differences to the first arm (the
same seed gives the heads the same start and the photos the same order).

One held-out fold judges only 17 new products (20 held out, 3 without val photos), and a
product's val photos come from one session, so they are right or wrong together: new-product
top-1 spans about 30 pp at 95%. `--folds 0,1,2,3` trains one held-out model per fold (fold k
holds out products k, k + every, ...), so every product is new once and about 60 are judged.
Each top-1 counted on photos is pooled over seeds and folds and comes with its 95% interval
over products; each difference to the first arm with one that draws the same products again
for both arms, so what a product's difficulty costs both cancels. The unknown AUROC is each
fold model's own, averaged; its interval draws products too, each with its photos in every
fold (unknown in its own, known in the others).

The last epoch is measured, never the epoch that was best on val. Trainings run `--jobs` at a
time, each in its own process (a GPU trains several at once; on 2 CPU cores use 1), and so do
the measurements, each on its own share of the cores. Finished trainings and measurements
under --out are reused, so a run that stopped goes on where it was. What it costs: the H200
trained the 12 efficientnet_lite2 260 px 12-epoch runs of the example in 4 min together
(`--jobs 12`); measuring takes about 3 min per arm and seed on 2 cores (two INT8 exports, the
kiosk's passes over val), also there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from bench.protocols import (
    DEFAULT_DATA,
    NOT_TRAINING_OPTIONS,
    add_recipe_options,
    held_out_products,
    interval,
    measure_closed,
    measure_held_out,
    read_checkpoint,
)
from bench.report import add_docs_args, write_docs
from models.tables import format_markdown_table, format_table
from trainer.config import TrainConfig
from trainer.export import ExportConfig, export
from trainer.ingest import read_layout
from trainer.metrics import auroc, format_interval, product_interval
from trainer.train import train


def new_photos(result: dict, enrolled: str) -> tuple[list[str], list[bool]]:
    """Each held-out fold's new-product val photos, pooled: their products, and whether the
    matcher (all products searched) named them first when enrolled from `enrolled`."""
    products, right = [], []
    for fold in result["folds"].values():
        photos = fold["photos"]
        new = np.array(photos["new"], bool)
        products += list(np.array(photos["product"])[new])
        right += list(np.array(photos[f"right, {enrolled}"], bool)[new])
    return products, right


# what a run judges photo by photo (each photo's product, right or not): pooled over seeds
# and folds, with intervals drawn over products
PHOTO_METRICS = {
    "kiosk matcher top-1": lambda r: (r["closed"]["photos"]["product"],
                                      r["closed"]["photos"]["right"]),
    "new, 5 photos": lambda r: new_photos(r, "photos"),
    "new, catalog photo": lambda r: new_photos(r, "iconic"),
}


def share_right(metric: str):
    """A photo metric's share of photos right in one run."""
    return lambda r: float(np.mean(PHOTO_METRICS[metric](r)[1]))


# what each run is judged on, read from bench/protocols.py's rows, and the target
METRICS = {
    "fine top-1 INT8": (lambda r: r["closed"]["heads"][1]["fine top-1"], 0.90),
    "coarse top-1 INT8": (lambda r: r["closed"]["heads"][1]["coarse top-1"], 0.95),
    "INT8/FP32 agree": (lambda r: r["closed"]["heads"][1]["INT8/FP32 agree"], 0.995),
    "kiosk matcher top-1": (share_right("kiosk matcher top-1"), None),
    "new, 5 photos": (share_right("new, 5 photos"), 0.85),
    "new, catalog photo": (share_right("new, catalog photo"), 0.60),
    # mean over the folds: each fold's model scores its own new products
    "unknown AUROC": (lambda r: float(np.mean([f["unknown"][0]["AUROC"]
                                               for f in r["folds"].values()])), 0.90),
}


def scored_photos(runs: list[dict]) -> dict[str, np.ndarray]:
    """Every held-out fold's val photos over `runs` (an arm's seeds): each one's product, its
    fold model ("seed/fold"), whether it is unknown there (held out) and its unknown score."""
    cols: dict[str, list] = {"product": [], "model": [], "unknown": [], "score": []}
    for s, run in enumerate(runs):
        for fold, f in run["folds"].items():
            photos = f["photos"]
            cols["product"] += photos["product"]
            cols["model"] += [f"{s}/{fold}"] * len(photos["product"])
            cols["unknown"] += photos["new"]
            cols["score"] += photos["unknown score"]
    return {k: np.asarray(v, bool if k == "unknown" else None) for k, v in cols.items()}


def mean_auroc(photos: dict[str, np.ndarray], i: np.ndarray) -> float:
    """The unknown AUROC of photos `i` (a photo drawn twice counts twice), each fold model's
    own, averaged over the models; NaN where no model has both known and unknown photos."""
    areas = []
    for model in np.unique(photos["model"][i]):
        j = i[photos["model"][i] == model]
        unknown = photos["unknown"][j]
        if unknown.any() and not unknown.all():
            areas.append(auroc(photos["score"][j][~unknown], photos["score"][j][unknown]))
    return float(np.mean(areas)) if areas else float("nan")


def auroc_interval(runs: list[dict]) -> str:
    """95% interval of the mean unknown AUROC, whole products drawn again: a product is
    unknown in its own fold and known in the others, so it is drawn with all its photos in
    every fold at once."""
    photos = scored_photos(runs)
    return format_interval(product_interval(lambda i: mean_auroc(photos, i),
                                            photos["product"]))


def auroc_difference_interval(base: list[dict], arm: list[dict]) -> str:
    """95% interval of the arm's mean unknown AUROC minus the base's, in pp, the same
    products drawn again for both."""
    was, now = scored_photos(base), scored_photos(arm)
    if not np.array_equal(was["product"], now["product"]):
        raise SystemExit("unknown AUROC: the arms judged different photos (other data?)")
    low, high = product_interval(lambda i: mean_auroc(now, i) - mean_auroc(was, i),
                                 was["product"])
    return f"{100 * low:+.1f} to {100 * high:+.1f} pp"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-") or "arm"


def parse_arm(text: str) -> tuple[str, dict]:
    """`NAME=OPTIONS` -> (name, the TrainConfig fields the options set)."""
    name, sep, options = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--arm {text!r}: write NAME=OPTIONS, e.g. 'frozen 5=--frozen-stages 5'")
    p = argparse.ArgumentParser(prog=f"--arm {name.strip()!r}")
    add_recipe_options(p, defaults=False, skip={"seed"})
    return name.strip(), vars(p.parse_args(shlex.split(options)))


def options(changes: dict) -> str:
    """An arm's changes as the `storyscan train` options that make them."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())


def finished(cfg: TrainConfig) -> bool:
    """Whether `cfg.out` holds this training, all epochs done; another training there is an
    error (it would be measured as this arm)."""
    last = Path(cfg.out) / "last.pt"
    if not last.is_file():
        return False
    trained = read_checkpoint(last)
    # the data and held-out products belong to the recipe here; where it is written does not
    mine = {k: v for k, v in vars(cfg).items()
            if k not in NOT_TRAINING_OPTIONS - {"data", "holdout"}}
    other = {k: v for k, v in trained["config"].items() if k in mine and mine[k] != v}
    if other:
        raise SystemExit(f"{last} was trained with {other}, not this arm's recipe: remove it or "
                         "use another --out")
    return trained["epoch"] >= cfg.epochs


def run_training(cfg: TrainConfig) -> None:
    """One training, its progress in train.log beside its checkpoints (runs in a worker)."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.out) / "train.log", "a") as log, redirect_stdout(log), \
            redirect_stderr(log):
        train(cfg)


def run_protocols(data: Path, run: Path, part: str, held: list[str], cpus: list[int]) -> None:
    """Export one arm and seed's last epoch of `part` ("closed", or a fold trained without
    `held`) and measure it (runs in a worker, on `cpus`, so that workers do not slow each
    other down); the rows go to `part`.json."""
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    which = "closed" if part == "closed" else f"held-out-{part}"
    with open(run / f"{part}.log", "a") as log, redirect_stdout(log), redirect_stderr(log):
        bundle = export(ExportConfig(checkpoint=str(run / which / "last.pt"), data=str(data),
                                     out=str(run / f"{which}-bundle"), name=which, force=True))
        if part == "closed":
            rows = measure_closed(data, bundle)
            rows["train minutes"] = sum(h["seconds"] for h in json.loads(
                (run / which / "history.json").read_text())) / 60
        else:
            rows = measure_held_out(data, bundle, held)
    (run / f"{part}.json").write_text(json.dumps(rows, indent=1, default=float))


def exit_with_parent(parent: int) -> None:
    """Worker initializer: a worker whose bench was killed (SIGTERM reaches the bench alone)
    would go on training for minutes, writing into the run folder that the next bench reuses."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def in_parallel(fn, calls: list[tuple], jobs: int, what: str) -> None:
    """fn(*call) for each call, `jobs` processes at a time; the first failure stops the run."""
    if not calls:
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(fn, *call) for call in calls]
        for f in tqdm(futures, desc=what, unit="run"):
            f.result()


def cell(values: list[float], pp: bool = False) -> str:
    """mean ± sample sd (pp: as percentage points, signed)."""
    v = np.array(values) * (100 if pp else 1)
    sd = f" ± {v.std(ddof=1):.{1 if pp else 3}f}" if len(v) > 1 else ""
    return f"{v.mean():+.1f}{sd} pp" if pp else f"{v.mean():.3f}{sd}"


def photos(runs: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """A photo metric's photos over `runs` (an arm's seeds): their products, right or not."""
    pairs = [PHOTO_METRICS[metric](r) for r in runs]
    return (np.concatenate([np.asarray(p, str) for p, _ in pairs]),
            np.concatenate([np.asarray(r, float) for _, r in pairs]))


def difference_interval(base: list[dict], arm: list[dict], metric: str) -> str:
    """95% interval of the arm's share right minus the base's, in pp, whole products drawn
    again for both at once: the two arms judge the same photos, so a hard product costs
    both, and only what the arm changes on a product widens the interval."""
    products, was = photos(base, metric)
    _, now = photos(arm, metric)
    low, high = product_interval(lambda i: now[i].mean() - was[i].mean(), products)
    return f"{100 * low:+.1f} to {100 * high:+.1f} pp"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", action="append", required=True, metavar="NAME=OPTIONS",
                   help="a recipe arm: its name and the `storyscan train` options it changes "
                        "(the first arm is the baseline; 'shipped=' changes nothing)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/bench-seeds"))
    p.add_argument("--jobs", type=int, default=1, help="trainings (and measurements) at a time")
    p.add_argument("--holdout-every", type=int, default=4)
    p.add_argument("--folds", default="1",
                   help="held-out folds, comma-separated: fold k holds out products k, "
                        "k + every, ... (1: bench/protocols.py's 20; 0,1,2,3: each product once)")
    add_docs_args(p)
    add_recipe_options(p, skip={"seed"})
    args = p.parse_args()
    arms = [parse_arm(a) for a in args.arm]
    if len({slug(name) for name, _ in arms}) != len(arms):
        raise SystemExit("--arm: give each arm its own name")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    jobs = max(1, args.jobs)
    common = {k: v for k, v in vars(args).items()
              if k in TrainConfig.__dataclass_fields__ and k not in NOT_TRAINING_OPTIONS}
    labels = read_layout(args.data)[0]
    held = {f"fold{k}": held_out_products(labels.fine, args.holdout_every, int(k))
            for k in args.folds.split(",") if k.strip()}
    cores = sorted(os.sched_getaffinity(0))

    share = max(1, len(cores) // jobs)
    runs = {(name, seed): args.out / slug(name) / f"seed{seed}" for name, _ in arms
            for seed in seeds}
    trainings = []
    for name, changes in arms:
        for seed in seeds:
            for which, holdout in (("closed", ""), *((f"held-out-{fold}", ",".join(products))
                                                     for fold, products in held.items())):
                cfg = TrainConfig(**{**common, **changes, "data": str(args.data), "seed": seed,
                                     "holdout": holdout, "resume": True,
                                     "out": str(runs[name, seed] / which)})
                if jobs > 1:  # the machine's cores shared out; views still come ahead of steps
                    cfg = replace(cfg, threads=share, loader_threads=max(2, share))
                if not finished(cfg):
                    trainings.append((cfg,))
    in_parallel(run_training, trainings, jobs, "training")
    todo = [(run, part, held.get(part, [])) for run in runs.values()
            for part in ("closed", *held) if not (run / f"{part}.json").is_file()]
    workers = max(1, min(jobs, len(todo)))
    share = max(1, len(cores) // workers)
    in_parallel(run_protocols, [(args.data, run, part, products,
                                 cores[i % workers * share:][:share])
                                for i, (run, part, products) in enumerate(todo)], workers,
                "measuring")
    results = {key: {"closed": json.loads((run / "closed.json").read_text()),
                     "folds": {fold: json.loads((run / f"{fold}.json").read_text())
                               for fold in held}}
               for key, run in runs.items()}
    of = {name: [results[name, s] for s in seeds] for name, _ in arms}

    base = arms[0][0]
    compare = []
    for metric, (read, target) in METRICS.items():
        row = {"metric": metric, "target": target}
        for name, _ in arms:
            row[name] = cell([read(r) for r in of[name]])
            if metric in PHOTO_METRICS:
                products, right = photos(of[name], metric)
                row[name] += f" ({interval(right, products)})"
            elif metric == "unknown AUROC":
                row[name] += f" ({auroc_interval(of[name])})"
        for name, _ in arms[1:]:
            row[f"{name} - {base}"] = cell([read(a) - read(b)
                                            for a, b in zip(of[name], of[base], strict=True)],
                                           pp=True)
            if metric in PHOTO_METRICS:
                row[f"{name} - {base}, 95% CI"] = difference_interval(of[base], of[name], metric)
            elif metric == "unknown AUROC":
                row[f"{name} - {base}, 95% CI"] = auroc_difference_interval(of[base], of[name])
        compare.append(row)
    compare.append({"metric": "train minutes (all products)",
                    **{name: cell([r["closed"]["train minutes"] for r in of[name]])
                       for name, _ in arms}})
    columns = ["metric", "target", *(n for n, _ in arms),
               *(c for n, _ in arms[1:] for c in (f"{n} - {base}", f"{n} - {base}, 95% CI"))]
    per_run = [{"arm": name, "seed": seed,
                **{metric: read(results[name, seed]) for metric, (read, _) in METRICS.items()},
                "train minutes": results[name, seed]["closed"]["train minutes"]}
               for name, _ in arms for seed in seeds]
    run_columns = ["arm", "seed", *METRICS, "train minutes"]
    per_fold = [{"arm": name, "seed": seed, "fold": fold,
                 "new products": len(set(np.array(f["photos"]["product"])[f["photos"]["new"]])),
                 "new photos": f["new photos"],
                 **{metric: METRICS[metric][0]({"folds": {fold: f}})
                    for metric in ("new, 5 photos", "new, catalog photo", "unknown AUROC")}}
                for name, _ in arms for seed in seeds
                for fold, f in results[name, seed]["folds"].items()]
    fold_columns = ["arm", "seed", "fold", "new products", "new photos", "new, 5 photos",
                    "new, catalog photo", "unknown AUROC"]
    judged = photos(of[base][:1], "new, 5 photos")[0]
    print(f"\nArms over seeds {args.seeds} (mean ± sd; photo metrics pooled over seeds and "
          f"folds, 95% intervals over products)\n{format_table(compare, columns)}")
    print(f"\nEach run\n{format_table(per_run, run_columns)}")
    print(f"\nEach held-out fold\n{format_table(per_fold, fold_columns)}")
    if args.no_docs:
        return
    recipe = ", ".join(f"{k}={v}" for k, v in common.items()
                       if getattr(TrainConfig, k, None) != v)
    arms_text = "; ".join(f"**{name}**: {options(changes) or 'the recipe as it is'}"
                          for name, changes in arms)
    folds_text = "; ".join(f"{fold}: {', '.join(products)}" for fold, products in held.items())
    body = (f"Common recipe: {recipe or 'defaults'}. Arms: {arms_text}. Seeds {args.seeds}; "
            "each arm and seed trained once on every product and once per held-out fold "
            f"({folds_text}). The last epoch of each is exported and measured by "
            "bench/protocols.py on the INT8 bundle and the kiosk matcher; a new product is "
            f"judged by the model of its fold ({len(set(judged))} new products with "
            f"{len(judged)} val photos per seed). Cells are mean ± sample sd over the seeds; "
            "for a top-1 counted on photos, in brackets its 95% interval over products (seeds "
            "and folds pooled, bench/protocols.py's); for the unknown AUROC (each fold model's "
            "own, averaged), one that draws products with their photos in every fold. A "
            "difference column is the arm minus the first arm, seed by seed, in percentage "
            "points; its 95% interval draws the same products again for both arms.\n\n"
            f"{format_markdown_table(compare, columns)}\n\n**Each run**\n\n"
            f"{format_markdown_table(per_run, run_columns)}\n\n**Each held-out fold**\n\n"
            f"{format_markdown_table(per_fold, fold_columns)}")
    write_docs(args, "seeds", "Recipe arms over seeds", body)


if __name__ == "__main__":
    main()
