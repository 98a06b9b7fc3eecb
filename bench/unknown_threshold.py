"""Which unknown threshold a bundle should ship: calibration rules compared on the kiosk.

    python bench/unknown_threshold.py --closed-bundle runs/exp-closed-bundle \\
        --held-out-bundle runs/exp-held-bundle

Each rule picks a threshold from what `storyscan export` sees (the INT8 embeddings of the val
photos of the products the model was trained on, its prototypes and the catalog's photos), and
is then measured on the kiosk's INT8 path in two shops:

- **new items**: the bundle trained without bench/protocols.py's held-out products, a catalog of
  the trained ones; the held-out products' val photos should come back unknown (protocol 3);
- **not stocked**: the bundle trained on every product, a shop selling all but the held-out
  ones; their val photos should come back unknown. A chain trains one model for all its shops
  and each sells a part of the range, so this is the everyday case.

Known accepted is the share of the catalog's own val photos at or above the threshold (the
calibration photos themselves: this measures the rule, not generalisation), unknown rejected
the share of the others below it.

Rules: 95% of the recognised val photos kept, their best similarity taken against the
prototypes alone (the export before this benchmark) or against what the kiosk searches,
prototypes and catalog photos (shipped).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.protocols import DEFAULT_DATA, Kiosk, catalog, held_out_products
from bench.report import add_docs_args, write_docs
from device.catalog import Product
from device.engines import infer_all
from models.bundle import Bundle, load_bundle
from models.preprocess import load_image, prepare
from models.tables import format_markdown_table, format_table
from trainer.export import UNKNOWN_TAR, known_similarities
from trainer.ingest import read_layout
from trainer.metrics import threshold_at_tar

COLUMNS = ["shop", "rule", "threshold", "known accepted", "unknown rejected",
           "mean of the two"]


def rules(embed: Callable[[list[str]], np.ndarray], bundle: Bundle, emb: np.ndarray,
          truth: list[str], products: list[Product]) -> dict[str, float]:
    """Each rule's threshold from the val photos (`emb`, `truth`) of the trained `products`."""
    fine = bundle.fine_labels
    labels = np.array([fine.index(t) for t in truth])
    protos = bundle.prototypes()
    ref_skus = [p.sku for p in products for _ in p.images]
    refs = embed([path for p in products for path in p.images])
    alone = known_similarities(emb, labels, fine, protos, [], np.zeros(0))
    kiosk = known_similarities(emb, labels, fine, protos, ref_skus, refs)
    return {"prototypes alone (before)": threshold_at_tar(alone, UNKNOWN_TAR),
            "kiosk search (shipped)": threshold_at_tar(kiosk, UNKNOWN_TAR)}


def shop(name: str, bundle: Bundle, data: Path, sold: set[str], work: Path) -> list[dict]:
    """One shop's rows: every rule calibrated on the trained products, measured with a catalog
    of the `sold` ones."""
    labels, _, val = read_layout(data)
    truth = np.array([labels.fine[f] for f in val.fine])
    trained = np.isin(truth, bundle.fine_labels)
    kiosk = Kiosk(bundle, work / name, val.paths)
    products = [p for p in catalog(data, labels) if p.sku in bundle.fine_labels]

    def embed(paths: list[str]) -> np.ndarray:
        return infer_all(kiosk.engine, [prepare(load_image(p), bundle.input_spec)
                                        for p in paths])["embedding"]

    thresholds = rules(embed, bundle, kiosk.embeddings[trained], list(truth[trained]), products)
    matcher = kiosk.use_catalog(name, [p for p in products if p.sku in sold])
    best = kiosk.scores(matcher).max(axis=1)
    known = np.isin(truth, list(sold))
    return [{"shop": name, "rule": rule, "threshold": t,
             "known accepted": float(np.mean(best[known] >= t)),
             "unknown rejected": float(np.mean(best[~known] < t)),
             "mean of the two": float(np.mean(best[known] >= t) + np.mean(best[~known] < t)) / 2}
            for rule, t in thresholds.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--closed-bundle", type=Path, required=True,
                   help="exported from a model trained on every product")
    p.add_argument("--held-out-bundle", type=Path, required=True,
                   help="exported from a model trained without bench/protocols.py's held-out")
    p.add_argument("--holdout-every", type=int, default=4)
    add_docs_args(p)
    args = p.parse_args()
    labels = read_layout(args.data)[0]
    held = set(held_out_products(labels.fine, args.holdout_every))
    closed, held_out = load_bundle(args.closed_bundle), load_bundle(args.held_out_bundle)
    if held & set(held_out.fine_labels) or not held <= set(closed.fine_labels):
        raise SystemExit("--held-out-bundle must leave out bench/protocols.py's held-out "
                         "products and --closed-bundle must know them")
    with tempfile.TemporaryDirectory() as tmp:
        rows = (shop("new items", held_out, args.data, set(held_out.fine_labels), Path(tmp))
                + shop("not stocked", closed, args.data, set(closed.fine_labels) - held,
                       Path(tmp)))
    print(format_table(rows, COLUMNS))
    if not args.no_docs:
        body = (f"Bundles: `{args.closed_bundle}` (every product, {closed.architecture} at "
                f"{closed.input_spec.size} px) and "
                f"`{args.held_out_bundle}` (held-out products left out); INT8, one photo at a "
                f"time. Unknown: the val photos of the {len(held)} held-out products "
                "(bench/protocols.py's). Known accepted counts every val photo of a sold product, "
                "recognised or not, so it can fall below the 95% of recognised ones a rule "
                "keeps.\n\n" + format_markdown_table(rows, COLUMNS))
        write_docs(args, "unknown-threshold", "Unknown threshold: calibration rules", body)


if __name__ == "__main__":
    main()
