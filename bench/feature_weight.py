"""Choosing `storyscan export --feature-weight` without looking at val.

    python bench/feature_weight.py --checkpoint runs/bench-protocols/held-out/best.pt

The checkpoint must be one trained with `--holdout` (bench/protocols.py's second model): its
held-out products are what a shop adds after training. The weight is chosen on their
*training* photos, which that model never saw: each held-out product is enrolled from its
first 5 training photos (or from its catalog photo alone) and its other training photos are
recognised among all products, the trained ones represented as the kiosk represents them
(prototype, joined with their mean features, plus the catalog photo). The weight with the best
mean of the two new-product top-1s is picked. The same numbers on `val`, and how well the
best similarity tells held-out photos from known ones (AUROC, held-out products not enrolled),
are shown for each weight but play no part in the choice.

Embeddings come from the FP32 torch model with flip averaging, as exported; the kiosk's INT8
path is measured by bench/protocols.py with the weight chosen here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.report import add_docs_args, write_docs
from device.matcher import Matcher
from models.preprocess import InputSpec, prepare
from models.recognizer import FlipAveraged
from models.tables import format_markdown_table, format_table
from trainer.ingest import IngestReport, Split, load_split, read_layout, read_references
from trainer.metrics import auroc
from trainer.train import holdout_products, load_checkpoint, predict

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery"
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 0.9)
ENROL_PHOTOS = 5
COLUMNS = ["feature weight", "tune: 5 photos", "tune: catalog photo", "tune: mean", "chosen",
           "val: 5 photos", "val: catalog photo", "val: known", "val: unknown AUROC"]


def joined(trained: np.ndarray, features: np.ndarray, w: float) -> np.ndarray:
    return np.concatenate([np.sqrt(1 - w) * trained, np.sqrt(w) * features], axis=1)


def top1(matcher: Matcher, queries: np.ndarray, truth: list[str]) -> float:
    picks = [matcher.products[int(np.argmax(matcher.scores(q)))] for q in queries]
    return float(np.mean([p == t for p, t in zip(picks, truth, strict=True)]))


@dataclass
class HeldOut:
    """A held-out model's view of the data: every photo's trained embedding and unit pooled
    features (flip-averaged FP32), product names per split, the trained prototypes, and the
    photos each held-out product is enrolled from and tuned on (training photos only)."""

    checkpoint: Path
    ckpt: dict
    spec: InputSpec
    fine: list[str]  # every product
    held: list[str]
    known: list[str]
    trained: dict[str, np.ndarray]  # split -> [photos, dim]
    features: dict[str, np.ndarray]
    names: dict[str, np.ndarray]  # split -> product per photo
    protos: dict[str, np.ndarray]
    enrol: dict[str, np.ndarray]  # held-out product -> indices into train
    tune: np.ndarray  # training photos of held-out products not used to enrol them


def load_held_out(checkpoint: Path, data: Path) -> HeldOut:
    model, ckpt = load_checkpoint(checkpoint)
    held = holdout_products(ckpt["config"].get("holdout", ""))
    if not held:
        raise SystemExit(f"{checkpoint}: trained without --holdout; no new products")
    spec = InputSpec.from_dict(ckpt["input"])
    labels, train_split, val_split = read_layout(data)
    to_input = lambda img: prepare(img, spec)  # noqa: E731
    splits: dict[str, Split] = {
        name: load_split(split, to_input, IngestReport(), {}, f"{name} photos")
        for name, split in (("train", train_split), ("val", val_split),
                            ("catalog", read_references(data, labels)))}
    # trained embedding and unit pooled features of every photo, from one flip-averaged pass
    model.feature_weight = 0.5
    dim = model.prototypes().shape[1]
    emb = {name: predict(FlipAveraged(model), s.images)["embedding"] * np.sqrt(2)
           for name, s in splits.items()}
    names = {k: np.array([labels.fine[f] for f in s.fine]) for k, s in splits.items()}
    protos = dict(zip(ckpt["labels"]["fine"], model.prototypes().detach().numpy(), strict=True))
    enrol = {sku: np.flatnonzero(names["train"] == sku)[:ENROL_PHOTOS] for sku in held}
    tune = np.array([i for i, n in enumerate(names["train"])
                     if n in held and i not in enrol[n]])
    return HeldOut(checkpoint, ckpt, spec, list(labels.fine), held, list(protos),
                   {k: v[:, :dim] for k, v in emb.items()},
                   {k: v[:, dim:] for k, v in emb.items()}, names, protos, enrol, tune)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_docs_args(p)
    args = p.parse_args()
    h = load_held_out(args.checkpoint, args.data)
    ckpt, spec, held, known = h.ckpt, h.spec, h.held, h.known
    trained, features, protos, enrol, tune = h.trained, h.features, h.protos, h.enrol, h.tune
    names = {k: list(v) for k, v in h.names.items()}
    train_names = h.names["train"]
    means = {}
    for sku in known:
        m = features["train"][train_names == sku].mean(0)
        means[sku] = m / np.linalg.norm(m)
    val_names = h.names["val"]
    val_new = np.isin(val_names, held)

    def refs(source: str, idx: list[int], w: float) -> tuple[list[str], np.ndarray]:
        """Photos `idx` of a split as references: their products and joined embeddings."""
        return ([names[source][i] for i in idx],
                joined(trained[source][idx], features[source][idx], w))

    catalog_known = [i for i, n in enumerate(names["catalog"]) if n in known]
    catalog_held = [i for i, n in enumerate(names["catalog"]) if n in held]
    enrol_idx = [int(i) for s in held for i in enrol[s]]
    rows = []
    for w in WEIGHTS:
        # trained products: prototype joined with their mean features, plus the catalog photo
        skus, vectors = refs("catalog", catalog_known, w)
        base_skus = known + skus
        base = np.concatenate([joined(np.stack([protos[s] for s in known]),
                                      np.stack([means[s] for s in known]), w), vectors])
        by_photos = refs("train", enrol_idx, w)
        by_catalog = refs("catalog", catalog_held, w)
        q = {k: joined(trained[k], features[k], w) for k in ("train", "val")}
        row = {"feature weight": w}
        for label, (skus, vectors) in (("5 photos", by_photos), ("catalog photo", by_catalog)):
            m = Matcher(base_skus + skus, np.concatenate([base, vectors]), 1.0)
            row[f"tune: {label}"] = top1(m, q["train"][tune], [names["train"][i] for i in tune])
            row[f"val: {label}"] = top1(m, q["val"][val_new], list(val_names[val_new]))
            if label == "5 photos":
                row["val: known"] = top1(m, q["val"][~val_new], list(val_names[~val_new]))
        only_known = Matcher(base_skus, base, 1.0)
        best = np.array([only_known.scores(e).max() for e in q["val"]])
        row["val: unknown AUROC"] = auroc(best[~val_new], best[val_new])
        row["tune: mean"] = (row["tune: 5 photos"] + row["tune: catalog photo"]) / 2
        rows.append(row)
        print(format_table(rows[-1:], COLUMNS), flush=True)
    chosen = max(rows, key=lambda r: r["tune: mean"])
    for r in rows:
        r["chosen"] = "yes" if r is chosen else ""
    print(format_table(rows, COLUMNS))
    if args.no_docs:
        return
    body = (f"Held-out model `{args.checkpoint}` ({ckpt['config']['arch']} at {spec.size} px, "
            f"{len(held)} products held out of training). Tuning photos: the "
            f"{len(tune)} training photos of held-out products not used to enrol them; each "
            f"held-out product enrolled from its first {ENROL_PHOTOS} training photos or its "
            f"catalog photo, recognised among all {len(h.fine)} products. Val columns "
            f"({int(val_new.sum())} new-product and {int((~val_new).sum())} known-product "
            f"photos) are for information only. FP32 with flip averaging.\n\n"
            + format_markdown_table(rows, COLUMNS)
            + f"\n\nChosen: feature weight {chosen['feature weight']}.")
    write_docs(args, "feature-weight", "Choosing the feature weight of the matched embedding", body)


if __name__ == "__main__":
    main()
