"""The training recipe, one change at a time: val top-1 and train time of each step.

    python bench/recipe.py --data ../shared/data/grocery --size 160 --epochs 4

Starts from the seed recipe (BN + Dropout head, class-weighted cross-entropy, SGD momentum 0.9,
weight decay 1e-4, cosine annealing, flips, colour jitter, random crops) and adds one change per
row. A change that raises val product top-1 is kept and the next row builds on it; one that does
not is reported and dropped ("keep what pays"); a change made for speed (bf16, frozen stages)
is kept when it costs at most one standard error of top-1 and makes epochs faster. Top-1 is the
last epoch's, not the best epoch's, so no row is picked on val twice. The last row adds flip
test-time augmentation to the final recipe, measured through the same `FlipAveraged` wrapper
`storyscan export` builds into the bundle (twice the inference per scan).

Each finished row is stored under --out, so an interrupted run picks up where it stopped. The
table goes to stdout and to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.report import add_docs_args, write_docs
from models.recognizer import FlipAveraged, input_spec
from models.tables import format_markdown_table, format_table
from trainer.config import TrainConfig
from trainer.metrics import evaluate_scores
from trainer.train import load_checkpoint, load_data, predict, train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
COLUMNS = ["step", "change", "kept", "fine top-1", "coarse top-1", "Δ top-1 (pp)", "train min",
           "fastest epoch s"]

# the seed recipe: every switch off (TrainConfig's defaults are the recipe this bench kept)
SEED = {"margin": 0.0, "label_smoothing": 0.0, "cutmix": 0.0, "erasing": 0.0, "ema": 0.0,
        "probe_epochs": 0, "reference_views": 0, "precision": "fp32", "frozen_stages": 0,
        "catalog_loss": 0.0}
SPEED_STEPS = {"bf16", "frozen"}  # judged by time at (nearly) equal accuracy
# (name, description, changes on top of the recipe kept so far)
STEPS: list[tuple[str, str, dict]] = [
    ("seed", "seed recipe", {}),
    ("cosface", "CosFace margin 0.2 on the product head", {"margin": 0.2}),
    ("smoothing", "label smoothing 0.1", {"label_smoothing": 0.1}),
    ("ema", "EMA of weights (decay 0.99)", {"ema": 0.99}),
    ("references", "catalog (iconic) photos as extra views, x4", {"reference_views": 4}),
    ("probe", "1 epoch heads-only probe before fine-tuning", {"probe_epochs": 1}),
    ("cutmix", "CutMix on half the batches", {"cutmix": 0.5}),
    ("erasing", "random erasing on a quarter of the views", {"erasing": 0.25}),
    ("bf16", "bf16 autocast (FP32 master weights)", {"precision": "bf16"}),
    ("frozen", "stem and first 2 block stages frozen at ImageNet", {"frozen_stages": 3}),
    ("lite2", "EfficientNet-Lite2 backbone", {"arch": "efficientnet_lite2"}),
    ("catalog", "catalog-photo loss (views against catalog photos' embeddings)",
     {"catalog_loss": 1.0}),
]


def final_val(run: Path) -> dict:
    """The last epoch's val metrics and the total train time of a finished run."""
    history = json.loads((run / "history.json").read_text())
    return {**history[-1], "train_seconds": sum(h["seconds"] for h in history),
            "fastest_epoch": min(h["seconds"] for h in history)}


def same_config(stored: Path, cfg: TrainConfig) -> bool:
    """Whether a finished row was trained as `cfg` says (options added since are defaults)."""
    if not stored.exists():
        return False
    now, before = asdict(cfg), json.loads(stored.read_text())
    return all(now.get(k) == v for k, v in before.items()) and all(
        v == getattr(TrainConfig, k) for k, v in now.items() if k not in before)


def flip_tta(run: Path, cfg: TrainConfig) -> dict:
    """Val metrics of the run's last checkpoint as export ships it: each photo averaged with
    its mirror image inside the model (FlipAveraged)."""
    model, _ = load_checkpoint(run / "last.pt")
    data = load_data(cfg, input_spec(cfg.arch, cfg.size))
    out = predict(FlipAveraged(model), data.val.images)
    return evaluate_scores(out["fine"], np.array(data.val.fine), out["coarse"],
                           np.array(data.val.coarse)).to_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--steps", default=",".join(s for s, _, _ in STEPS),
                   help="which steps to run, in order (comma-separated)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-recipe"))
    add_docs_args(p)
    args = p.parse_args()

    base = TrainConfig(data=str(args.data), arch=args.arch, size=args.size, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, **SEED)
    kept, rows, prev_top1, prev_fastest = base, [], None, float("inf")
    wanted = args.steps.split(",")
    for name, description, change in [s for s in STEPS if s[0] in wanted]:
        cfg = replace(kept, out=str(args.out / name), **change)
        run = Path(cfg.out)
        done = run / "history.json"
        if not (done.exists() and same_config(run / "config.json", cfg)):
            t0 = time.time()
            train(cfg)
            (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
            print(f"{name}: {time.time() - t0:.0f} s")
        v = final_val(run)
        if name in SPEED_STEPS and prev_top1 is not None:
            se = (prev_top1 * (1 - prev_top1) / v["n"]) ** 0.5
            better = (v["fine_top1"] >= prev_top1 - se
                      and v["fastest_epoch"] < prev_fastest)
        else:
            better = prev_top1 is None or v["fine_top1"] > prev_top1
        rows.append({"step": name, "change": description, "kept": "yes" if better else "no",
                     "fine top-1": v["fine_top1"], "coarse top-1": v["coarse_top1"],
                     "Δ top-1 (pp)": None if prev_top1 is None
                     else 100 * (v["fine_top1"] - prev_top1),
                     "train min": v["train_seconds"] / 60,
                     "fastest epoch s": v["fastest_epoch"]})
        if better:
            kept, prev_top1, prev_fastest, best_run = cfg, v["fine_top1"], v["fastest_epoch"], run
    if not rows:
        raise SystemExit(f"no such steps: {args.steps}")
    tta = flip_tta(best_run, kept)
    rows.append({"step": "tta", "change": "flip test-time augmentation (in the exported model)",
                     "kept": "yes" if tta["fine_top1"] > prev_top1 else "no",
                     "fine top-1": tta["fine_top1"], "coarse top-1": tta["coarse_top1"],
                     "Δ top-1 (pp)": 100 * (tta["fine_top1"] - prev_top1), "train min": None,
                     "fastest epoch s": None})
    print(format_table(rows, COLUMNS))
    if args.no_docs:
        return
    val_photos = tta["n"]
    changes = {k: v for k, v in asdict(kept).items() if asdict(base)[k] != v and k != "out"}
    body = (f"{args.arch} at {args.size} px, {args.epochs} epochs per row, batch "
            f"{args.batch_size}, lr {args.lr}, trained on `train`, top-1 of the last epoch on "
            f"all `val` photos (FP32 checkpoint). Each row adds one change to the rows kept "
            f"above it. With {val_photos} val photos one photo is {100 / val_photos:.2f} pp "
            f"and the standard error of a top-1 near {prev_top1:.0%} is "
            f"{100 * (prev_top1 * (1 - prev_top1) / val_photos) ** 0.5:.1f} pp, so steps "
            f"smaller than that are noise, whichever way they went. Train minutes include "
            f"waiting whenever another job shared the two cores; the fastest epoch is the cost "
            f"of the row itself.\n\n{format_markdown_table(rows, COLUMNS)}\n\n"
            f"Kept recipe: {', '.join(f'{k}={v}' for k, v in changes.items()) or 'the seed'}.")
    write_docs(args, f"recipe-{args.arch}-{args.size}-{args.epochs}",
               f"Training recipe, step by step ({args.arch}, {args.size} px, {args.epochs} epochs)",
               body)


if __name__ == "__main__":
    main()
