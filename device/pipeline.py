"""From a photo to a recognised product: preprocess -> engine -> match -> result.

The pipeline binds one verified bundle, its engine and the catalog. Opening it makes sure every
reference photo in the catalog has an embedding under this bundle and its shop views (a new
model, or views drawn another way after a software update, recomputes them), then builds the
in-memory matcher.

A product the bundle was not trained on has no prototype, only its reference photos; each of
those that is a studio shot (the product on white or light grey, as catalog photos are) is
also embedded as SHOP_VIEWS shop views: cut out and held alone, close up, on a dark backdrop
(models/studio.py), each a reference of its own, stored beside the photo's as `photo#shop-N`.
A product enrolled from its catalog photo alone is then found from shop photos of it more
often (bench/enrolment_views.py).

Open set: a scan whose best similarity is below the unknown threshold (the bundle's, calibrated
at export to keep 95% of correctly recognised validation photos, or the caller's) comes back
unknown, with no product but its best guesses, rather than naming the nearest product in a shop
that does not sell it. Hierarchy and hashing (see device/matcher.py) are the caller's choice.

A bundle with an attribute head also says what the photo shows (e.g. "cobalt", "floral"): every
attribute whose probability is above the bundle's threshold, read from the photo itself, so an
unknown scan has them too.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from device.catalog import Catalog
from device.engines import Engine, open_engine
from device.matcher import Match, Matcher
from models import studio
from models.bundle import ATTRIBUTES, Bundle, load_bundle, logit
from models.preprocess import ImageError, load_image, prepare

# shop views embedded per studio reference photo of a product the bundle was not trained on.
# Lite2 260 px held-out model, 20 new products enrolled from their catalog photo: 8 views took
# val top-1 0.407 -> 0.531 (tune 0.393 -> 0.435), trained products' -0.5 pp
SHOP_VIEWS = 8


def references_key(bundle_key: str, shop_views: int) -> str:
    """What the catalog stores reference embeddings under: the exact model and the shop views
    made with it, so a new bundle, another number of views or views drawn another way (a
    software update) embeds the references again rather than mixing in stale ones."""
    return f"{bundle_key}+{shop_views}x{studio.KIOSK_VIEWS}"


@dataclass
class ScanResult:
    source: str
    sku: str | None  # None: unknown, or nothing in the catalog to match against
    name: str
    confidence: float  # 0 for an unknown scan
    similarity: float  # best similarity found, also for an unknown scan
    story: str
    alternatives: list[Match]  # runners-up; for an unknown scan every best guess, best first
    unknown: bool  # no product is similar enough: the best similarity is below the threshold
    attributes: list[str] = field(default_factory=list)  # seen in the photo; [] without the head
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Pipeline:
    def __init__(self, bundle: Bundle, engine: Engine, catalog: Catalog, progress: bool = False,
                 threshold: float | None = None, top_coarse: int = 0,
                 hash_candidates: int = 0, category_prior: bool = False,
                 shop_views: int = SHOP_VIEWS) -> None:
        """`threshold`: None uses the bundle's calibrated one (no unknown check if it has none),
        0 or less turns the check off; `top_coarse`, `category_prior`, `hash_candidates`: see
        Matcher.match and Matcher (0 / False: rank every product by its similarity alone);
        `shop_views`: per studio photo of an untrained product, when first embedded."""
        self.bundle, self.engine, self.catalog = bundle, engine, catalog
        self.shop_views = shop_views
        self.references_key = references_key(bundle.key, shop_views)
        self.spec = bundle.input_spec
        if threshold is None:
            threshold = bundle.unknown_threshold
        self.threshold = threshold if threshold is not None and threshold > 0 else None
        self.top_coarse, self.category_prior = top_coarse, category_prior
        self.attribute_logit = logit(bundle.attribute_threshold)
        # this bundle's embeddings with shop views of another kind: nothing matches them again
        catalog.drop_embeddings([m for m in catalog.embedding_models() if m != self.references_key
                                 and (m == bundle.key or m.startswith(bundle.key + "+"))])
        self.update_embeddings(progress)
        self.matcher = self._build_matcher(hash_candidates)

    @classmethod
    def open(cls, bundle: str | Path, catalog: str | Path, precision: str = "int8",
             backend: str = "auto", threads: int = 0, progress: bool = False,
             threshold: float | None = None, top_coarse: int = 0,
             hash_candidates: int = 0, category_prior: bool = False,
             shop_views: int = SHOP_VIEWS) -> Pipeline:
        b = load_bundle(bundle)
        return cls(b, open_engine(b, backend, precision, threads), Catalog(catalog), progress,
                   threshold, top_coarse, hash_candidates, category_prior, shop_views)

    def embed(self, images: list[np.ndarray], batch: int = 16) -> np.ndarray:
        """Embeddings of decoded RGB photos ([N, dim])."""
        out = []
        for i in range(0, len(images), batch):
            x = np.stack([prepare(img, self.spec) for img in images[i : i + batch]])
            out.append(self.engine.infer(x)["embedding"])
        return np.concatenate(out) if out else np.zeros((0, self.bundle.embedding_dim))

    def update_embeddings(self, progress: bool = False) -> int:
        """Embed the catalog's reference photos this bundle has not seen (and an untrained
        product's shop views of them); returns how many photos."""
        missing = self.catalog.missing_embeddings(self.references_key)
        trained = set(self.bundle.fine_labels)
        rows, photos = [], 0
        for sku, path in tqdm(missing, desc="embedding reference photos", unit="photo",
                              disable=None if progress and missing else True, leave=False):
            try:
                image = load_image(path)
            except ImageError as e:
                print(f"warning: {e} (reference photo skipped)")
                continue
            views = [] if sku in trained else studio.shop_views(image, self.shop_views)
            vectors = self.embed([image, *views])
            rows += [(sku, path, vectors[0])] + [
                (sku, Path(f"{path}#shop-{i}"), v) for i, v in enumerate(vectors[1:], 1)]
            photos += 1
        self.catalog.put_embeddings(self.references_key, rows)
        return photos

    def _categories(self) -> dict[str, int]:
        """Each catalog product's index among the model's categories: a trained product's from
        the bundle, an enrolled one's by its catalog category's name (case aside); a category
        the model does not know is left out (such a product is always searched)."""
        coarse = {name.casefold(): i for i, name in enumerate(self.bundle.coarse_labels)}
        categories = {p.sku: coarse[p.category.casefold()] for p in self.catalog.products()
                      if p.category.casefold() in coarse}
        return categories | dict(zip(self.bundle.fine_labels, self.bundle.coarse_of_fine,
                                     strict=True))

    def _build_matcher(self, hash_candidates: int) -> Matcher:
        """Catalog products only (no story, no match): their photos plus trained prototypes."""
        skus, vectors = self.catalog.embeddings(self.references_key)
        in_catalog = set(self.catalog.skus())
        protos = self.bundle.prototypes()
        trained = [(s, protos[i]) for i, s in enumerate(self.bundle.fine_labels)
                   if s in in_catalog]
        all_skus = skus + [s for s, _ in trained]
        dim = self.bundle.embedding_dim
        all_vectors = np.concatenate([vectors.reshape(-1, dim),
                                      np.array([v for _, v in trained]).reshape(-1, dim)])
        return Matcher(all_skus, all_vectors, self.bundle.scale, self._categories(),
                       hash_candidates)

    def recognize(self, image: np.ndarray, source: str = "camera") -> ScanResult:
        """Recognise one decoded RGB photo; timings per stage in milliseconds."""
        t0 = time.perf_counter()
        x = prepare(image, self.spec)[None]
        t1 = time.perf_counter()
        out = self.engine.infer(x)
        t2 = time.perf_counter()
        matches = self.matcher.match(out["embedding"][0], k=6, coarse_logits=out["coarse"][0],
                                     top_coarse=self.top_coarse,
                                     category_prior=self.category_prior)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
                   "match": (t3 - t2) * 1e3}
        attributes = self._attributes(out)
        if not matches:  # an empty catalog, or none of it in the likeliest categories
            return ScanResult(source, None, "", 0.0, 0.0, "", [], len(self.matcher) > 0,
                              attributes, timings)
        best = matches[0]
        if self.threshold is not None and best.similarity < self.threshold:
            return ScanResult(source, None, "", 0.0, best.similarity, "", matches, True,
                              attributes, timings)
        product = self.catalog.product(best.sku)
        return ScanResult(source, best.sku, product.name if product else best.sku,
                          best.confidence, best.similarity,
                          product.story() if product else "", matches[1:], False, attributes,
                          timings)

    def _attributes(self, out: dict[str, np.ndarray]) -> list[str]:
        """Names of the attributes above the bundle's threshold for the first photo of `out`
        (none for a bundle without the attribute head)."""
        labels = self.bundle.attribute_labels
        if not labels:
            return []
        return [name for name, z in zip(labels, out[ATTRIBUTES][0], strict=True)
                if z > self.attribute_logit]

    def scan_file(self, path: str | Path) -> ScanResult:
        """Decode and recognise a photo file; raises ImageError for a bad file."""
        t0 = time.perf_counter()
        image = load_image(path)
        decode_ms = (time.perf_counter() - t0) * 1e3
        result = self.recognize(image, str(path))
        result.timings_ms = {"decode": decode_ms, **result.timings_ms}
        return result
