"""Why new products are hard: where a held-out product's photos go, and what a bias costs.

    python bench/new_products.py --checkpoint runs/bench-protocols/held-out/best.pt

A diagnostic for protocol 2 of bench/protocols.py, on its held-out model (trained with
`--holdout`): each held-out product is enrolled from its first 5 training photos or from its
catalog (iconic) photo, the trained products are represented as the kiosk represents them
(prototype plus catalog photo), and photos of held-out products are recognised among all
products. Embeddings are the trained ones (feature weight 0, the export default), FP32 with
flip averaging.

1. Where the photos go: right; wrong and to a trained product; wrong and to another new one;
   and top-1 when only the new products compete (the ceiling if the kiosk always knew a
   photo was of a new product).
2. Calibrated stacking (Chao et al., 2016): the trained products' similarities lowered by a
   constant before the best is taken, the usual answer to a model that pulls unseen classes
   towards the ones it was trained on. It trades known-product accuracy for new-product
   accuracy; the table shows the trade, nothing is chosen or shipped from it.
3. Per new product, enrolled from 5 photos: top-1 on its other training photos against top-1
   on its val photos. A product whose val photos fall far behind looks different there
   (another shop, light or batch), which its 5 training photos cannot show; the rows say
   which products the new-product target is lost on.

Tuning columns are training photos of held-out products (never seen by the model, not used to
enrol); val columns are for information.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.feature_weight import DEFAULT_DATA, HeldOut, load_held_out
from bench.report import add_docs_args, write_docs
from models.tables import format_markdown_table, format_table

PENALTIES = (0.0, 0.05, 0.1, 0.15, 0.2)
WHERE = ["enrolled from", "photos", "top-1", "wrong: to a trained product",
         "wrong: to another new one", "top-1 among new products only"]
STACKING = ["trained-product penalty", "tune: new from 5 photos", "tune: new from catalog photo",
            "val: new from 5 photos", "val: new from catalog photo",
            "val: known (catalog-photo catalog)"]
PER_PRODUCT = ["product", "tune photos", "tune top-1", "val photos", "val top-1",
               "val - tune (pp)"]
FORMATS = {"val - tune (pp)": "+.0f"}


def references(h: HeldOut, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(product per reference, [refs, dim], whether it is a trained product's) for a catalog
    where the held-out products are enrolled from `source` ("photos" or "catalog")."""
    cat = h.names["catalog"]
    known_cat = np.flatnonzero(np.isin(cat, h.known))
    skus = [*h.known, *cat[known_cat]]
    vectors = [np.stack([h.protos[s] for s in h.known]), h.trained["catalog"][known_cat]]
    if source == "photos":
        idx = np.concatenate([h.enrol[s] for s in h.held])
        skus += list(h.names["train"][idx])
        vectors.append(h.trained["train"][idx])
    else:
        idx = np.flatnonzero(np.isin(cat, h.held))
        skus += list(cat[idx])
        vectors.append(h.trained["catalog"][idx])
    skus_arr = np.array(skus)
    return skus_arr, np.concatenate(vectors), np.isin(skus_arr, h.known)


def best_product(skus: np.ndarray, vectors: np.ndarray, queries: np.ndarray,
                 penalty: np.ndarray | float = 0.0) -> np.ndarray:
    """The product of the most similar reference for each query (a product's score is its
    best reference's, as in device/matcher.py)."""
    return skus[np.argmax(queries @ vectors.T - penalty, axis=1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_docs_args(p)
    args = p.parse_args()
    h = load_held_out(args.checkpoint, args.data)
    val_new = np.isin(h.names["val"], h.held)
    sets = {"tune": (h.trained["train"][h.tune], h.names["train"][h.tune]),
            "val": (h.trained["val"][val_new], h.names["val"][val_new])}
    known_val = (h.trained["val"][~val_new], h.names["val"][~val_new])

    where, right = [], {}  # right: (source, split) -> which photos top-1 names right
    for source, label in (("photos", "5 training photos"), ("catalog", "catalog photo")):
        skus, vectors, _ = references(h, source)
        new_only = ~np.isin(skus, h.known)
        for split, (queries, truth) in sets.items():
            pick = best_product(skus, vectors, queries)
            wrong = pick != truth
            right[source, split] = ~wrong
            to_known = np.isin(pick, h.known)
            only = best_product(skus[new_only], vectors[new_only], queries)
            where.append({"enrolled from": f"{label} ({split})", "photos": len(truth),
                          "top-1": float(np.mean(~wrong)),
                          "wrong: to a trained product": float(np.mean(wrong & to_known)),
                          "wrong: to another new one": float(np.mean(wrong & ~to_known)),
                          "top-1 among new products only": float(np.mean(only == truth))})
    stacking = []
    for penalty in PENALTIES:
        row: dict = {"trained-product penalty": penalty}
        for source, label in (("photos", "5 photos"), ("catalog", "catalog photo")):
            skus, vectors, trained = references(h, source)
            for split, (queries, truth) in sets.items():
                pick = best_product(skus, vectors, queries, penalty * trained)
                row[f"{split}: new from {label}"] = float(np.mean(pick == truth))
            if source == "catalog":
                pick = best_product(skus, vectors, known_val[0], penalty * trained)
                row["val: known (catalog-photo catalog)"] = float(np.mean(pick == known_val[1]))
        stacking.append(row)

    per_product = []
    for sku in h.held:
        row: dict = {"product": sku}
        for split, (_, truth) in sets.items():
            mine = truth == sku
            row[f"{split} photos"] = int(mine.sum())
            if mine.any():  # blank in the table otherwise
                row[f"{split} top-1"] = float(right["photos", split][mine].mean())
        if "val top-1" in row and "tune top-1" in row:
            row["val - tune (pp)"] = 100 * (row["val top-1"] - row["tune top-1"])
        per_product.append(row)
    per_product.sort(key=lambda r: r.get("val - tune (pp)", 0.0))

    tables = [("1. Where photos of new products go", where, WHERE),
              ("2. Calibrated stacking: trained products' similarities lowered by a constant",
               stacking, STACKING),
              ("3. Per new product, enrolled from 5 training photos: other training photos "
               "against val photos", per_product, PER_PRODUCT)]
    for title, rows, cols in tables:
        print(f"\n{title}\n{format_table(rows, cols, FORMATS)}")
    if args.no_docs:
        return
    c = h.ckpt["config"]
    body = (f"Held-out model `{args.checkpoint}`: `storyscan train --arch {c['arch']} --size "
            f"{h.spec.size} --epochs {c['epochs']} --holdout ...` with bench/protocols.py's "
            f"{len(h.held)} of {len(h.fine)} products held out. Tune: the {len(h.tune)} "
            "training photos of held-out products not used to enrol them; val: the "
            f"{int(val_new.sum())} val photos of held-out products (and, for the known column, "
            f"the {int((~val_new).sum())} of trained ones).\n\n"
            + "\n\n".join(f"**{t}**\n\n{format_markdown_table(r, cl, FORMATS)}"
                            for t, r, cl in tables))
    write_docs(args, "new-products", "New products: where their photos go", body)


if __name__ == "__main__":
    main()
