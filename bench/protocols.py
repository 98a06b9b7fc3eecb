"""The three recognition protocols, measured on the kiosk's own path (INT8 bundle + catalog).

    python bench/protocols.py --data ../shared/data/grocery --size 224 --epochs 8

1. Closed set: train on `train` (+ catalog photos when the recipe says so) with every product,
   export, and report `val` fine/coarse top-1, top-5 and macro-F1 for FP32 and INT8, plus
   what the kiosk matcher gets (trained prototypes + the catalog's reference photos), with and
   without the "classify first, then search within the category" restriction, and the recall
   of hashed (4-bit code shortlist) search against exact search.
2. New products: every 4th product (20 of Grocery's 81) is held out of training entirely; the
   held-out ones are then enrolled into the kiosk catalog from (a) 5 training photos each or
   (b) their single catalog (iconic) photo, and their `val` photos are recognised among all
   products. `--fold K` holds out products K, K + 4, ... instead (fold 1 is the protocol's).
3. Unknown items: with the held-out products not in the catalog, their `val` photos should
   score below the known products' ones: AUROC, the false-accept rate at 95% true-accept, and
   what the bundle's calibrated threshold does.

Each top-1 and the AUROC come with a 95% interval drawn over products, not photos: Grocery
shoots a product's val photos in one session, so they are right or wrong together, and 17
new products (3 of the 20 have no val photos) are 17 chances, not 81.

Training options are `storyscan train`'s (`--size`, `--epochs`, `--margin`, ...); checkpoints
this script trained before can be reused with --closed-checkpoint / --held-out-checkpoint. The
tables go to stdout and to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import MISSING, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.report import add_docs_args, write_docs
from device.catalog import Catalog, Product
from device.engines import open_engine
from device.matcher import Matcher, hash_recall
from device.pipeline import SHOP_VIEWS, Pipeline
from models.bundle import Bundle
from models.preprocess import load_image, prepare
from models.tables import format_markdown_table, format_table
from trainer.config import FEATURE_WEIGHT, TrainConfig
from trainer.export import ExportConfig, export
from trainer.ingest import Labels, catalog_products, read_layout
from trainer.metrics import auroc, far_at_tar, format_interval, product_interval
from trainer.train import holdout_products, train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
ENROL_PHOTOS = 5
NOT_TRAINING_OPTIONS = {"data", "out", "holdout", "resume", "device", "threads", "loader_threads"}


def held_out_products(fine: list[str], every: int, fold: int = 1) -> list[str]:
    """Every `every`-th product starting with id `fold`: fold 1 (ids 1, 5, 9, ...: 20 of 81)
    is protocol 2's; folds 0 to every - 1 together hold out each product once."""
    if not 0 <= fold < every:
        raise SystemExit(f"fold {fold}: pick 0 to {every - 1} (every {every}th product)")
    return fine[fold::every]


def add_recipe_options(p: argparse.ArgumentParser, defaults: bool = True,
                       skip: set[str] = frozenset()) -> None:
    """`storyscan train`'s options that make the recipe (not where data and checkpoints go);
    without `defaults` an option left out is absent from the parsed namespace."""
    for f in fields(TrainConfig):
        if f.name not in NOT_TRAINING_OPTIONS | skip and f.default is not MISSING:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                           default=f.default if defaults else argparse.SUPPRESS)


def train_and_export(cfg: TrainConfig, checkpoint: Path | None, out: Path, name: str,
                     feature_weight: float) -> tuple[Bundle, float | None]:
    """Train (unless a checkpoint is given) and export; the training minutes (of a reused
    checkpoint: its epochs' minutes from the history.json beside it, or None)."""
    t0 = time.time()
    best = checkpoint or train(cfg)
    minutes = (time.time() - t0) / 60
    if checkpoint:
        history = checkpoint.parent / "history.json"
        minutes = (sum(h["seconds"] for h in json.loads(history.read_text())) / 60
                   if history.is_file() else None)
    bundle = export(ExportConfig(checkpoint=str(best), data=cfg.data, out=str(out / name),
                                 name=name, force=True, feature_weight=feature_weight))
    return bundle, minutes


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's dict: its TrainConfig, epoch, history (read without unpickling code)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


class Kiosk:
    """A bundle's INT8 pipeline over a scratch catalog, and the val photos it recognises."""

    def __init__(self, bundle: Bundle, work: Path, val_paths: list[Path]) -> None:
        self.bundle, self.work = bundle, work
        self.engine = open_engine(bundle, "auto", "int8")
        out = [self.engine.infer(prepare(load_image(p), bundle.input_spec)[None])
               for p in val_paths]  # one photo at a time, as the kiosk runs
        self.embeddings = np.concatenate([o["embedding"] for o in out])
        self.coarse = np.concatenate([o["coarse"] for o in out])

    def use_catalog(self, name: str, products: list[Product], shop_views: int = SHOP_VIEWS
                    ) -> Matcher:
        """The matcher of a fresh catalog holding `products` (reference photos embedded, with
        `shop_views` per studio photo of an untrained product, as the kiosk does)."""
        catalog = Catalog(self.work / name / "catalog.db")
        catalog.upsert(products)
        return Pipeline(self.bundle, self.engine, catalog, shop_views=shop_views).matcher

    def scores(self, matcher: Matcher) -> np.ndarray:
        """[val photos, products] best similarity per catalog product."""
        return np.stack([matcher.scores(e) for e in self.embeddings])


def interval(right: np.ndarray, products: Sequence[str]) -> str:
    """95% interval of the share of photos right, whole products drawn again: a product's
    val photos come from one session, so they are right or wrong together."""
    return format_interval(product_interval(lambda i: right[i].mean(), products))


def separation(score: np.ndarray, unknown: np.ndarray, products: Sequence[str]
               ) -> tuple[float, str]:
    """AUROC of known over `unknown` photos by `score`, and its 95% interval with known and
    unknown products drawn again apart."""
    def of(i: np.ndarray) -> float:
        return auroc(score[i][~unknown[i]], score[i][unknown[i]])

    return of(np.arange(len(score))), format_interval(product_interval(of, products, unknown))


# how the kiosk matcher can search: (name, top_coarse, category_prior), see Matcher.match
SEARCHES = {"all products": (0, False), "top-1 categories": (1, False),
            "top-2 categories": (2, False), "top-3 categories": (3, False),
            "all products, category prior": (0, True)}


def search(matcher: Matcher, kiosk: Kiosk, truth: list[str], how: str
           ) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    """Which val photos the matcher, searching `how`, names right first and within its top 5,
    the mean microseconds a match took, and the product it names first for each photo."""
    t0 = time.perf_counter()
    picks = [[x.sku for x in matcher.match(e, 5, c, *SEARCHES[how])]
             for e, c in zip(kiosk.embeddings, kiosk.coarse, strict=True)]
    us = (time.perf_counter() - t0) / len(picks) * 1e6
    return (np.array([p[:1] == [t] for p, t in zip(picks, truth, strict=True)]),
            np.array([t in p for p, t in zip(picks, truth, strict=True)]), us,
            [p[0] for p in picks])


def closed_set(bundle: Bundle, kiosk: Kiosk, truth: list[str], products: list[Product],
               held: Sequence[str] = ()) -> dict[str, list[dict]]:
    """The heads, search and hashing tables; with protocol 2's `held` products, also "trained":
    what this model, trained on them, gets on their val photos (the bar for enrolling them);
    "photos": each val photo's product and whether the matcher named it first."""
    m = bundle.manifest["metrics"]
    heads = [{"precision": p.upper(), "fine top-1": m[p]["fine_top1"],
              "fine top-5": m[p]["fine_top5"], "coarse top-1": m[p]["coarse_top1"],
              "macro-F1": m[p]["fine_macro_f1"],
              "INT8/FP32 agree": m["int8_fp32_agreement"] if p == "int8" else None}
             for p in ("fp32", "int8")]
    matcher = kiosk.use_catalog("closed", products)
    category = {pr.sku: pr.category for pr in products}
    is_held = np.isin(truth, held)
    searches, trained = [], []
    for how in SEARCHES:
        top1, top5, us, first = search(matcher, kiosk, truth, how)
        # the category of the product the kiosk shows, which a shopper reads with it
        searches.append({"search": how, "top-1": top1.mean(),
                         "top-1 95% CI": interval(top1, truth),
                         "top-5": top5.mean(),
                         "category top-1": np.mean([category[f] == category[t]
                                                    for f, t in zip(first, truth, strict=True)]),
                         "match µs": us})
        if how != "all products":
            continue
        photos = {"product": list(truth), "right": top1.tolist()}
        if is_held.any():
            trained.append({"enrolled from": "none: trained on (all-products model)",
                            "search": how, "new top-1": top1[is_held].mean(),
                            "new top-1 95% CI": interval(top1[is_held],
                                                         np.array(truth)[is_held]),
                            "new top-5": top5[is_held].mean(),
                            "known top-1": top1[~is_held].mean(),
                            "known top-5": top5[~is_held].mean()})
    refs = (list(matcher.products[i] for i in matcher.owner), matcher.vectors)
    hashing = []
    for candidates in (8, 16, 32, 64):
        hashed = Matcher(*refs, bundle.scale, hash_candidates=candidates)
        t0 = time.perf_counter()
        for e in kiosk.embeddings:
            hashed.match(e, 5)
        us = (time.perf_counter() - t0) / len(kiosk.embeddings) * 1e6
        hashing.append({"shortlist": f"{candidates} of {len(refs[0])} references",
                        "recall@1": hash_recall(*refs, kiosk.embeddings, candidates, 1),
                        "recall@5": hash_recall(*refs, kiosk.embeddings, candidates, 5),
                        "match µs": us})
    return {"heads": heads, "search": searches, "hashing": hashing, "trained": trained,
            "photos": photos}


def catalog(data: Path, labels: Labels) -> list[Product]:
    """The data's catalog products, which must be the trained ones."""
    products = catalog_products(data)
    if {pr.sku for pr in products} != set(labels.fine):
        raise SystemExit(f"{data}: catalog products differ from the trained products")
    return products


def measure_closed(data: Path, bundle: Bundle, held: Sequence[str] = ()) -> dict:
    """Protocol 1 with a bundle trained on every product: what `closed_set` gives."""
    labels, _, val = read_layout(data)
    with tempfile.TemporaryDirectory() as tmp:
        return closed_set(bundle, Kiosk(bundle, Path(tmp), val.paths),
                          [labels.fine[f] for f in val.fine], catalog(data, labels), held)


def measure(data: Path, closed_bundle: Bundle, held_bundle: Bundle, held: list[str]
            ) -> dict:
    """Every protocol's rows, on the kiosk's INT8 path: "closed" (heads, search and hashing
    tables), then what `measure_held_out` gives, its "new" table led by what the closed model,
    trained on the held-out products, gets on their photos."""
    closed = measure_closed(data, closed_bundle, held)
    rows = measure_held_out(data, held_bundle, held)
    rows["new"] = closed.pop("trained") + rows["new"]
    return {"closed": closed, **rows}


def measure_held_out(data: Path, held_bundle: Bundle, held: list[str]) -> dict:
    """Protocols 2 and 3 with a bundle trained without the `held` products: "new" (them
    enrolled), "unknown" (them not enrolled), "new photos" (how many val photos are theirs) and
    "photos": each val photo's product, whether it is new, its unknown score (best similarity
    with them not enrolled), and whether the matcher named it first with them enrolled either
    way (all products searched), for pooling over folds and seeds."""
    labels, train_split, val = read_layout(data)
    truth = [labels.fine[f] for f in val.fine]
    products = catalog(data, labels)
    by_sku = {pr.sku: pr for pr in products}
    with tempfile.TemporaryDirectory() as tmp:
        kiosk = Kiosk(held_bundle, Path(tmp), val.paths)
        is_new = np.array([t in held for t in truth])
        known = [pr for pr in products if pr.sku not in held]
        # 3. unknown: the held-out products are not in the catalog at all
        best = kiosk.scores(kiosk.use_catalog("known-only", known)).max(axis=1)
        threshold = held_bundle.unknown_threshold
        tar_threshold, far = far_at_tar(best[~is_new], best[is_new], 0.95)
        area, area_interval = separation(best, is_new, truth)
        unknown = [{"AUROC": area, "AUROC 95% CI": area_interval, "FAR @ 95% TAR": far,
                    "threshold @ 95% TAR": tar_threshold, "bundle threshold": threshold,
                    "known accepted": float(np.mean(best[~is_new] >= threshold)),
                    "unknown rejected": float(np.mean(best[is_new] < threshold))}]
        # 2. new products: enrolled from 5 training photos, or from the iconic photo alone
        new_rows = []
        photos = {"product": truth, "new": is_new.tolist(), "unknown score": best.tolist()}
        first_photos = {sku: [str(path) for path, f in zip(train_split.paths, train_split.fine,
                                                           strict=True)
                              if labels.fine[f] == sku][:ENROL_PHOTOS] for sku in held}
        for key, name, images in (
                ("photos", f"{ENROL_PHOTOS} training photos", first_photos),
                ("iconic", "catalog (iconic) photo", {s: by_sku[s].images for s in held})):
            enrolled = [replace(by_sku[s], images=images[s]) for s in held]
            matcher = kiosk.use_catalog(key, known + enrolled)
            # the category head never saw the new products: does it still place them?
            for how in ("all products", "top-1 categories", "all products, category prior"):
                top1, top5, _, _ = search(matcher, kiosk, truth, how)
                if how == "all products":
                    photos[f"right, {key}"] = top1.tolist()
                new_rows.append({"enrolled from": name, "search": how,
                                 "new top-1": top1[is_new].mean(),
                                 "new top-1 95% CI": interval(top1[is_new],
                                                              np.array(truth)[is_new]),
                                 "new top-5": top5[is_new].mean(),
                                 "known top-1": top1[~is_new].mean(),
                                 "known top-5": top5[~is_new].mean()})

    return {"new": new_rows, "unknown": unknown, "new photos": int(is_new.sum()),
            "photos": photos}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/bench-protocols"))
    p.add_argument("--holdout-every", type=int, default=4)
    p.add_argument("--fold", type=int, default=1,
                   help="which every-th products are held out: ids fold, fold + every, ...")
    p.add_argument("--closed-checkpoint", type=Path, help="reuse: trained on every product")
    p.add_argument("--held-out-checkpoint", type=Path, help="reuse: trained without held-out")
    p.add_argument("--feature-weight", type=float, default=FEATURE_WEIGHT,
                   help="export option: share of backbone features in the matched embedding")
    p.add_argument("--trained-on", help="where reused checkpoints were trained (for the docs)")
    add_docs_args(p)
    add_recipe_options(p)
    args = p.parse_args()
    recipe = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
              if f.name not in NOT_TRAINING_OPTIONS and f.default is not MISSING}

    labels = read_layout(args.data)[0]
    catalog(args.data, labels)  # before hours of training
    held = held_out_products(labels.fine, args.holdout_every, args.fold)
    reused = []  # which epoch of its schedule each reused checkpoint is
    if args.closed_checkpoint:
        ckpt = read_checkpoint(args.closed_checkpoint)
        reused.append(f"epoch {ckpt['epoch']} of {ckpt['config']['epochs']} (all products)")
        # the docs name the recipe the checkpoint was trained with
        recipe = {k: v for k, v in ckpt["config"].items() if k in recipe}
    if args.held_out_checkpoint:
        ckpt = read_checkpoint(args.held_out_checkpoint)
        reused.append(f"epoch {ckpt['epoch']} of {ckpt['config']['epochs']} (held-out products "
                      "left out)")
        if holdout_products(ckpt["config"]["holdout"]) != held:
            raise SystemExit(f"{args.held_out_checkpoint} held out "
                             f"{ckpt['config']['holdout'] or 'nothing'}, not this protocol's "
                             f"{','.join(held)}")

    closed_bundle, closed_min = train_and_export(
        TrainConfig(data=str(args.data), out=str(args.out / "closed"), **recipe),
        args.closed_checkpoint, args.out, "closed-bundle", args.feature_weight)
    held_bundle, held_min = train_and_export(
        TrainConfig(data=str(args.data), out=str(args.out / "held-out"), holdout=",".join(held),
                    **recipe), args.held_out_checkpoint, args.out, "held-out-bundle",
        args.feature_weight)

    rows = measure(args.data, closed_bundle, held_bundle, held)
    closed, new_rows, unknown = rows["closed"], rows["new"], rows["unknown"]
    recipe_text = ", ".join(f"{k}={v}" for k, v in recipe.items()
                            if getattr(TrainConfig, k, None) != v)
    if args.feature_weight != FEATURE_WEIGHT:
        recipe_text += f"{', ' if recipe_text else ''}exported with feature weight " \
                       f"{args.feature_weight}"
    tables = [
        ("1. Closed set: classifier heads", closed["heads"],
         ["precision", "fine top-1", "fine top-5", "coarse top-1", "macro-F1",
          "INT8/FP32 agree"]),
        ("1. Closed set: kiosk matcher (INT8, prototypes + catalog photos)", closed["search"],
         ["search", "top-1", "top-1 95% CI", "top-5", "category top-1", "match µs"]),
        ("1. Closed set: hash (4-bit code) shortlist + float re-rank vs exact search",
         closed["hashing"], ["shortlist", "recall@1", "recall@5", "match µs"]),
        (f"2. New products ({len(held)} held out of training, {rows['new photos']} val photos)",
         new_rows, ["enrolled from", "search", "new top-1", "new top-1 95% CI", "new top-5",
                    "known top-1", "known top-5"]),
        ("3. Unknown items (held-out products not in the catalog)", unknown,
         ["AUROC", "AUROC 95% CI", "FAR @ 95% TAR", "threshold @ 95% TAR", "bundle threshold",
          "known accepted", "unknown rejected"]),
    ]
    for title, rows, cols in tables:
        print(f"\n{title}\n{format_table(rows, cols)}")
    if args.no_docs:
        return
    minutes = " and ".join(f"{m:.0f} min ({what})" for m, what in
                           ((closed_min, "all products"), (held_min, "held-out products left out"))
                           if m is not None)
    body = (f"Recipe: {recipe_text or 'defaults'}"
            + (f"; training took {minutes}" if minutes else "")
            + (f", on {args.trained_on}" if args.trained_on else "")
            + (f"; checkpoints used: {' and '.join(reused)}" if reused else "")
            + f". Held out: {', '.join(held)}.\n\n"
            + "\n\n".join(f"**{t}**\n\n{format_markdown_table(r, c)}" for t, r, c in tables))
    write_docs(args, "protocols",
               "Recognition protocols: closed set, new products, unknown items", body)


if __name__ == "__main__":
    main()
