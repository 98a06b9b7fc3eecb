"""How the kiosk matcher searches, compared on trained checkpoints (protocol 1, closed set).

    python bench/matching.py --checkpoint runs/a/best.pt --checkpoint runs/b/best.pt

Each checkpoint is exported as the kiosk gets it (INT8 bundle), its catalog holds every
product with its reference photo, and every `val` photo is recognised: by the INT8 heads, by
searching all products, only the top 1-3 categories, or all products with the category head's
prior added (bench/protocols.py's `closed_set`, so the rows mean the same there and here).
With --training-photos the catalog is built a second time with every training photo enrolled
as a reference of its product too (what `storyscan enroll` of those photos would give), and
every search is repeated against it.
Checkpoints of one training run (e.g. its EMA and its raw weights) compare paired: same
photos, same split. Each top-1 has its 95% interval drawn over products (bench/protocols.py
says why). The table goes to stdout and to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocols import (
    DEFAULT_DATA,
    SEARCHES,
    Kiosk,
    closed_set,
    interval,
    search,
    train_and_export,
)
from bench.report import add_docs_args, write_docs
from models.tables import format_markdown_table, format_table
from trainer.config import FEATURE_WEIGHT, TrainConfig
from trainer.ingest import catalog_products, read_layout

COLUMNS = ["checkpoint", "references", "search", "top-1", "top-1 95% CI", "top-5",
           "match µs"]
SHIPPED = "prototypes + catalog photos"
WITH_TRAINING = SHIPPED + " + training photos"
HEAD_COLUMNS = ["checkpoint", "precision", "fine top-1", "fine top-5", "coarse top-1",
                "macro-F1", "INT8/FP32 agree"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, action="append", required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/bench-matching"))
    p.add_argument("--training-photos", action="store_true",
                   help="also search a catalog with every training photo as a reference")
    add_docs_args(p)
    args = p.parse_args()

    labels, train, val = read_layout(args.data)
    truth = [labels.fine[f] for f in val.fine]
    products = catalog_products(args.data)
    photos = {pr.sku: [] for pr in products}  # training photos per product
    for path, f in zip(train.paths, train.fine, strict=True):
        photos[labels.fine[f]].append(str(path))
    heads, searches = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, checkpoint in enumerate(args.checkpoint):
            bundle, _ = train_and_export(TrainConfig(data=str(args.data)), checkpoint,
                                         args.out, f"bundle-{i}", FEATURE_WEIGHT)
            kiosk = Kiosk(bundle, Path(tmp) / str(i), val.paths)
            rows = closed_set(bundle, kiosk, truth, products)
            heads += [{"checkpoint": str(checkpoint), **r} for r in rows["heads"]]
            searches += [{"checkpoint": str(checkpoint), "references": SHIPPED, **r}
                         for r in rows["search"]]
            if args.training_photos:
                matcher = kiosk.use_catalog("training", [
                    replace(pr, images=pr.images + photos[pr.sku]) for pr in products])
                for how in SEARCHES:
                    top1, top5, us, _ = search(matcher, kiosk, truth, how)
                    searches.append({"checkpoint": str(checkpoint), "references": WITH_TRAINING,
                                     "search": how, "top-1": top1.mean(),
                                     "top-1 95% CI": interval(top1, truth),
                                     "top-5": top5.mean(), "match µs": us})
    print(format_table(heads, HEAD_COLUMNS))
    print(format_table(searches, COLUMNS))
    write_docs(args, "matching", "Kiosk matcher search modes (closed set, INT8)",
               f"Every `val` photo ({len(truth)}), one at a time through the INT8 bundle, against "
               "a catalog of every product"
               + (f" (and one with all {len(train)} training photos enrolled too)"
                  if args.training_photos else "") + ".\n\n"
               f"**Classifier heads**\n\n{format_markdown_table(heads, HEAD_COLUMNS)}"
               f"\n\n**Matcher**\n\n{format_markdown_table(searches, COLUMNS)}")


if __name__ == "__main__":
    main()
