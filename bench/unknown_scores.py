"""Unknown scores: which number best tells an item the shop does not sell from one it does?

    python bench/unknown_scores.py --checkpoint runs/bench-protocols/held-out/best.pt

The kiosk calls a scan unknown when its best cosine to the catalog's references (trained
products' prototypes and every catalog photo) falls below the bundle's threshold. Protocol 3
(bench/protocols.py) measures that score; this compares it with the scores the
out-of-distribution literature offers, each made of what a kiosk could hold: the prototypes,
the catalog photos' embeddings and, for the nearest-neighbour and Mahalanobis scores, the
training photos' embeddings or their per-product means and covariance (a few MB more in the
bundle). On protocol 2's held-out model, exported as the
kiosk gets it (INT8), the val photos of trained products are known items and those of the
held-out ones unknown. Each score's AUROC comes with its 95% interval drawn over products
(bench/protocols.py says why), and the share of unknown items it accepts when 95% of known
ones pass.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.enrolment_views import trained_with
from bench.protocols import (
    DEFAULT_DATA,
    Kiosk,
    read_checkpoint,
    separation,
    train_and_export,
)
from bench.report import add_docs_args, write_docs
from models.tables import format_markdown_table, format_table
from trainer.config import FEATURE_WEIGHT, TrainConfig
from trainer.ingest import catalog_products, read_layout
from trainer.metrics import far_at_tar
from trainer.train import holdout_products

NEIGHBOURS = (1, 5, 10)
COLUMNS = ["score", "AUROC", "AUROC 95% CI", "FAR @ 95% TAR"]


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def shrunk_precision(centred: np.ndarray) -> np.ndarray:
    """Inverse of the covariance of `centred` rows, shrunk towards a multiple of the identity
    by Ledoit and Wolf's rule: 256 dimensions from a couple of thousand photos leave the
    sample covariance's small eigenvalues too small, and the inverse would trust them."""
    n, d = centred.shape
    cov = centred.T @ centred / n
    mu = np.trace(cov) / d
    squares = centred**2
    beta = (np.sum(squares.T @ squares) / n - np.sum(cov**2)) / (d * n)
    delta = (np.sum(cov**2) - 2 * mu * np.trace(cov) + d * mu**2) / d
    shrinkage = min(beta, delta) / delta if delta else 1.0
    return np.linalg.inv((1 - shrinkage) * cov + shrinkage * mu * np.eye(d))


def mahalanobis(queries: np.ndarray, training: np.ndarray, training_labels: np.ndarray,
                classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(Mahalanobis, relative Mahalanobis) score of each query: minus its smallest distance to
    a product's training photos, modelled as Gaussians around each product's mean with one
    shared covariance (Lee et al. 2018), and that distance less the query's distance to all
    training photos as one Gaussian (Ren et al. 2021), which discounts how far from everything
    a query sits and keeps only how far it sits from its nearest product."""
    means = np.stack([training[training_labels == c].mean(axis=0) for c in range(classes)])
    precision = shrunk_precision(training - means[training_labels])
    every = training.mean(axis=0)
    background = shrunk_precision(training - every)

    def distances(x: np.ndarray, centres: np.ndarray, p: np.ndarray) -> np.ndarray:
        return (np.einsum("ij,jk,ik->i", x, p, x)[:, None] - 2 * x @ p @ centres.T
                + np.einsum("ij,jk,ik->i", centres, p, centres)[None])

    to_products = distances(queries, means, precision)
    to_all = distances(queries, every[None], background)
    return -to_products.min(axis=1), -(to_products - to_all).min(axis=1)


def scores(queries: np.ndarray, catalog: np.ndarray, prototypes: np.ndarray,
           training: np.ndarray, training_labels: np.ndarray, scale: float
           ) -> dict[str, np.ndarray]:
    """Every score of each query (higher: more likely a product the shop sells), from
    `catalog` ([queries, products]: the kiosk's best cosine per catalog product), the trained
    `prototypes` and the known products' `training` photo embeddings (their product indices
    `training_labels`, into `prototypes`)."""
    to_protos = queries @ prototypes.T
    ranked = np.sort(catalog, axis=1)
    logits = scale * to_protos
    top = logits.max(axis=1, keepdims=True)
    energy = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    neighbours = np.sort(queries @ training.T, axis=1)
    own = np.einsum("ij,ij->i", training, prototypes[training_labels])
    typical = np.array([np.median(own[training_labels == c]) if (training_labels == c).any()
                        else np.inf for c in range(len(prototypes))])
    mean = training.mean(axis=0)
    centred = unit(queries - mean) @ unit(prototypes - mean).T
    distance, relative = mahalanobis(queries, training, training_labels, len(prototypes))
    return {
        "best cosine, prototypes + catalog photos (shipped)": ranked[:, -1],
        "best cosine, prototypes alone": to_protos.max(axis=1),
        "best cosine, prototypes alone, embeddings centred": centred.max(axis=1),
        "best cosine minus its product's median training-photo cosine":
            (to_protos - typical).max(axis=1),
        "margin: best minus second product's cosine": ranked[:, -1] - ranked[:, -2],
        "softmax confidence (prototypes, trained scale)": np.exp(top[:, 0] - energy),
        "energy: logsumexp of scaled prototype cosines": energy,
        **{f"cosine to the {k}{'st' if k == 1 else 'th'} nearest training photo":
           neighbours[:, -k] for k in NEIGHBOURS},
        "Mahalanobis: nearest product's training photos, shared covariance": distance,
        "relative Mahalanobis: that less the distance to all training photos": relative,
    }


def measure(checkpoint: Path, data: Path, out: Path) -> list[dict]:
    """One row per score, for a held-out checkpoint."""
    held = holdout_products(read_checkpoint(checkpoint)["config"]["holdout"])
    if not held:
        raise SystemExit(f"{checkpoint}: trained without --holdout; no unknown items")
    labels, train, val = read_layout(data)
    truth = np.array([labels.fine[f] for f in val.fine])
    is_new = np.isin(truth, held)
    known = [pr for pr in catalog_products(data) if pr.sku not in held]
    bundle, _ = train_and_export(TrainConfig(data=str(data)), checkpoint, out, "held-out-bundle",
                                 FEATURE_WEIGHT)
    trained = bundle.fine_labels
    known_train = [(path, trained.index(labels.fine[f]))
                   for path, f in zip(train.paths, train.fine, strict=True)
                   if labels.fine[f] in trained]
    with tempfile.TemporaryDirectory() as tmp:
        kiosk = Kiosk(bundle, Path(tmp), val.paths)
        catalog = kiosk.scores(kiosk.use_catalog("known-only", known))
        training = Kiosk(bundle, Path(tmp), [path for path, _ in known_train]).embeddings
    every = scores(kiosk.embeddings, catalog, bundle.prototypes(), training,
                   np.array([c for _, c in known_train]), bundle.scale)
    rows = []
    for name, score in every.items():
        area, area_interval = separation(score, is_new, truth)
        rows.append({"score": name, "AUROC": area, "AUROC 95% CI": area_interval,
                     "FAR @ 95% TAR": far_at_tar(score[~is_new], score[is_new])[1]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a --holdout checkpoint")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/bench-unknown-scores"))
    add_docs_args(p)
    args = p.parse_args()

    rows = measure(args.checkpoint, args.data, args.out)
    print(format_table(rows, COLUMNS))
    write_docs(args, "unknown-scores", "Unknown scores: what tells unsold items from sold ones",
               f"Held-out model `{args.checkpoint}` ({trained_with(args.checkpoint)}), INT8 "
               "bundle; known: val photos of trained products, unknown: val photos of the "
               "held-out ones (not in the catalog). Nearest-neighbour scores search the trained "
               "products' training photos.\n\n" + format_markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
