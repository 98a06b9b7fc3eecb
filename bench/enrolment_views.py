"""Enrolment views: do extra views of each photo help new products?

    python bench/enrolment_views.py --checkpoint runs/bench-protocols/held-out/best.pt

A catalog photo is a studio shot of the whole pack on white; a shop photo is closer and
tighter, and shows a hand or a crate of them. So a new product could be enrolled from each of
its photos plus views of it, each a reference of its own, to look more like what the camera
will see: centre crops (0.8, 0.6 and 0.45 of the side), or, for a studio photo, the kiosk's
shop views (device/pipeline.py SHOP_VIEWS: the product cut out and held alone on a dark
backdrop; models/studio.py) or as many views that pile copies of it, as in a crate (the
kiosk's views before). On protocol 2's held-out model (bench/protocols.py, trained with
`--holdout`), exported as the kiosk gets it (INT8 bundle), each held-out product is enrolled
from its catalog (iconic) photo or its first 5 training photos, with each kind of view; the
trained products keep their catalog photo and prototype, as shipped. Tune: the other training
photos of held-out products (never seen by the model, not enrolled); val: the held-out
products' val photos, and the trained products' ones, whose top-1 is what extra references of
new products can cost.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np

from bench.protocols import (
    DEFAULT_DATA,
    ENROL_PHOTOS,
    Kiosk,
    read_checkpoint,
    search,
    train_and_export,
)
from bench.report import add_docs_args, write_docs
from device.pipeline import SHOP_VIEWS
from models.preprocess import load_image
from models.studio import shop_views
from models.tables import format_markdown_table, format_table
from trainer.config import FEATURE_WEIGHT, TrainConfig
from trainer.ingest import catalog_products, read_layout
from trainer.train import holdout_products

ZOOMS = (0.8, 0.6, 0.45)
COLUMNS = ["checkpoint", "enrolled from", "views", "references per product", "tune: new top-1",
           "val: new top-1", "val: known top-1", "val: all top-1"]


def write_views(views: list[np.ndarray], folder: Path, name: str) -> list[str]:
    """PNG files (lossless) `folder/name-i.png` of RGB `views`: extra reference photos."""
    paths = []
    for i, view in enumerate(views):
        path = folder / f"{name}-{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(view, cv2.COLOR_RGB2BGR))
        paths.append(str(path))
    return paths


def centre_crops(photo: str, zooms: tuple[float, ...]) -> list[np.ndarray]:
    """Centred crops of `photo`, each `zoom` of its height and width."""
    img = load_image(photo)
    h, w = img.shape[:2]
    crops = []
    for zoom in zooms:
        ch, cw = round(h * zoom), round(w * zoom)
        top, left = (h - ch) // 2, (w - cw) // 2
        crops.append(img[top : top + ch, left : left + cw])
    return crops


def measure(checkpoint: Path, data: Path, out: Path, name: str) -> list[dict]:
    """The table's rows for one held-out checkpoint."""
    held = holdout_products(read_checkpoint(checkpoint)["config"]["holdout"])
    if not held:
        raise SystemExit(f"{checkpoint}: trained without --holdout; no new products")
    labels, train, val = read_layout(data)
    products = {pr.sku: pr for pr in catalog_products(data)}
    known = [pr for sku, pr in products.items() if sku not in held]
    photos = {sku: [str(path) for path, f in zip(train.paths, train.fine, strict=True)
                    if labels.fine[f] == sku] for sku in held}
    sources = {"catalog (iconic) photo": {sku: products[sku].images for sku in held},
               f"{ENROL_PHOTOS} training photos": {sku: photos[sku][:ENROL_PHOTOS]
                                                   for sku in held}}
    enrolled = {path for source in sources.values() for paths in source.values()
                for path in paths}
    tune = [(path, labels.fine[f]) for path, f in zip(train.paths, train.fine, strict=True)
            if labels.fine[f] in held and str(path) not in enrolled]
    val_truth = [labels.fine[f] for f in val.fine]
    is_new = np.array([t in held for t in val_truth])
    bundle, _ = train_and_export(TrainConfig(data=str(data)), checkpoint, out, name,
                                 FEATURE_WEIGHT)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tune_kiosk = Kiosk(bundle, work / "tune", [path for path, _ in tune])
        val_kiosk = Kiosk(bundle, work / "val", val.paths)
        for k, (source, images) in enumerate(sources.items()):
            crops = {sku: [c for j, photo in enumerate(images[sku])
                           for c in write_views(centre_crops(photo, ZOOMS), work,
                                                f"crop-{k}-{sku}-{j}")]
                     for sku in held}
            variants = [("photo as is", {}, 0), (f"+ centre crops {ZOOMS}", crops, 0)]
            if source.startswith("catalog"):  # shop views are made of studio photos only
                piles = {sku: [v for j, photo in enumerate(images[sku])
                               for v in write_views(shop_views(load_image(photo), SHOP_VIEWS,
                                                               piles=True),
                                                    work, f"piles-{k}-{sku}-{j}")]
                         for sku in held}
                variants += [(f"+ {SHOP_VIEWS} shop views, alone or piled (before)", piles, 0),
                             (f"+ {SHOP_VIEWS} shop views, held alone (shipped)", {},
                              SHOP_VIEWS)]
            for views, extra, shop in variants:
                refs = {sku: images[sku] + extra.get(sku, []) for sku in held}
                catalog = known + [replace(products[sku], images=refs[sku]) for sku in held]
                key = str(len(rows))
                tune_matcher = tune_kiosk.use_catalog(key, catalog, shop)
                tune_top1, *_ = search(tune_matcher, tune_kiosk, [t for _, t in tune],
                                       "all products")
                val_top1, *_ = search(val_kiosk.use_catalog(key, catalog, shop), val_kiosk,
                                      val_truth, "all products")
                owners = [tune_matcher.products[i] for i in tune_matcher.owner]
                per_product = np.isin(owners, list(held)).sum() / len(held)
                rows.append({"checkpoint": str(checkpoint), "enrolled from": source,
                             "views": views,
                             "references per product": per_product,
                             "tune: new top-1": tune_top1.mean(),
                             "val: new top-1": val_top1[is_new].mean(),
                             "val: known top-1": val_top1[~is_new].mean(),
                             "val: all top-1": val_top1.mean()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, action="append", required=True,
                   help="a --holdout checkpoint (repeat: one run per checkpoint, e.g. seeds)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/bench-enrolment-views"))
    add_docs_args(p)
    args = p.parse_args()

    rows = [row for i, checkpoint in enumerate(args.checkpoint)
            for row in measure(checkpoint, args.data, args.out, f"held-out-bundle-{i}")]
    print(format_table(rows, COLUMNS))
    write_docs(args, "enrolment-views",
               "Enrolment views: centre crops and shop views of new photos",
               "Held-out models (bench/protocols.py's products held out of training), INT8 "
               "bundles, search of all products. Tune: training photos of held-out products not "
               "enrolled; val: the val photos of held-out products (new) and of trained ones "
               "(known).\n\n"
               + "".join(f"- `{c}`: {trained_with(c)}\n" for c in args.checkpoint)
               + "\n" + format_markdown_table(rows, COLUMNS))


def trained_with(checkpoint: Path) -> str:
    """A checkpoint's training options that differ from the defaults, and its epoch."""
    ckpt = read_checkpoint(checkpoint)
    config = ckpt["config"]
    options = [f"{k}={v}" for k, v in config.items()
               if k not in ("data", "out", "holdout") and getattr(TrainConfig, k, None) != v]
    return f"{', '.join(options)}; epoch {ckpt['epoch']} of {config['epochs']}"


if __name__ == "__main__":
    main()
