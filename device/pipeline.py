"""From a photo to a recognised product: preprocess -> engine -> match -> result.

The pipeline binds one verified bundle, its engine and the catalog. Opening it makes sure every
reference photo in the catalog has an embedding under this bundle (a new model recomputes
them), then builds the in-memory matcher.
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
from models.bundle import Bundle, load_bundle
from models.preprocess import ImageError, load_image, prepare


@dataclass
class ScanResult:
    source: str
    sku: str | None  # None: nothing in the catalog to match against
    name: str
    confidence: float
    similarity: float
    story: str
    alternatives: list[Match]
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Pipeline:
    def __init__(self, bundle: Bundle, engine: Engine, catalog: Catalog,
                 progress: bool = False) -> None:
        self.bundle, self.engine, self.catalog = bundle, engine, catalog
        self.spec = bundle.input_spec
        self.update_embeddings(progress)
        self.matcher = self._build_matcher()

    @classmethod
    def open(cls, bundle: str | Path, catalog: str | Path, precision: str = "int8",
             backend: str = "auto", threads: int = 0, progress: bool = False) -> Pipeline:
        b = load_bundle(bundle)
        return cls(b, open_engine(b, backend, precision, threads), Catalog(catalog), progress)

    def embed(self, images: list[np.ndarray], batch: int = 16) -> np.ndarray:
        """Embeddings of decoded RGB photos ([N, dim])."""
        out = []
        for i in range(0, len(images), batch):
            x = np.stack([prepare(img, self.spec) for img in images[i : i + batch]])
            out.append(self.engine.infer(x)["embedding"])
        return np.concatenate(out) if out else np.zeros((0, self.bundle.embedding_dim))

    def update_embeddings(self, progress: bool = False) -> int:
        """Embed the catalog's reference photos this bundle has not seen; returns how many."""
        missing = self.catalog.missing_embeddings(self.bundle.key)
        rows = []
        for sku, path in tqdm(missing, desc="embedding reference photos", unit="photo",
                              disable=None if progress and missing else True, leave=False):
            try:
                rows.append((sku, path, self.embed([load_image(path)])[0]))
            except ImageError as e:
                print(f"warning: {e} (reference photo skipped)")
        self.catalog.put_embeddings(self.bundle.key, rows)
        return len(rows)

    def _build_matcher(self) -> Matcher:
        """Catalog products only (no story, no match): their photos plus trained prototypes."""
        skus, vectors = self.catalog.embeddings(self.bundle.key)
        in_catalog = set(self.catalog.skus())
        protos = self.bundle.prototypes()
        trained = [(s, protos[i]) for i, s in enumerate(self.bundle.fine_labels)
                   if s in in_catalog]
        all_skus = skus + [s for s, _ in trained]
        dim = self.bundle.embedding_dim
        all_vectors = np.concatenate([vectors.reshape(-1, dim),
                                      np.array([v for _, v in trained]).reshape(-1, dim)])
        return Matcher(all_skus, all_vectors, self.bundle.scale)

    def recognize(self, image: np.ndarray, source: str = "camera") -> ScanResult:
        """Recognise one decoded RGB photo; timings per stage in milliseconds."""
        t0 = time.perf_counter()
        x = prepare(image, self.spec)[None]
        t1 = time.perf_counter()
        embedding = self.engine.infer(x)["embedding"][0]
        t2 = time.perf_counter()
        matches = self.matcher.match(embedding, k=6)
        t3 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
                   "match": (t3 - t2) * 1e3}
        if not matches:
            return ScanResult(source, None, "", 0.0, 0.0, "", [], timings)
        best = matches[0]
        product = self.catalog.product(best.sku)
        return ScanResult(source, best.sku, product.name if product else best.sku,
                          best.confidence, best.similarity,
                          product.story() if product else "", matches[1:], timings)

    def scan_file(self, path: str | Path) -> ScanResult:
        """Decode and recognise a photo file; raises ImageError for a bad file."""
        t0 = time.perf_counter()
        image = load_image(path)
        decode_ms = (time.perf_counter() - t0) * 1e3
        result = self.recognize(image, str(path))
        result.timings_ms = {"decode": decode_ms, **result.timings_ms}
        return result
