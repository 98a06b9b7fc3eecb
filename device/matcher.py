"""Matching an embedding against the catalog's reference embeddings.

Each product is represented by its reference embeddings: the bundle's learned prototype for
products the model was trained on, plus one per reference photo (so a product enrolled from
photos is matchable without retraining). A product's score is its best cosine similarity;
confidence is the softmax of scores at the temperature the model was trained with, over the
products searched.

Two ways to search less than everything, both off by default (exact search of every product):

- hierarchy: given the model's category logits, only products of the `top_coarse` likeliest
  categories are searched (a product whose category the model does not know always is), so a
  vase is never confused with a plate that happens to share its colours;
- binary hashing, for very large catalogs: every reference also gets the sign bits of its
  embedding; the `hash_candidates` references nearest by Hamming distance (XOR + popcount) are
  shortlisted and only they are compared by exact cosine. `hash_recall` measures what that
  costs against exact search.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

NO_CATEGORY = -1  # a product whose category the model does not know: searched always


@dataclass(frozen=True)
class Match:
    sku: str
    similarity: float  # best cosine similarity to one of the product's references
    confidence: float  # softmax share among the products searched


# --- binary codes ------------------------------------------------------------------------------

_BITS_IN_BYTE = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def count_bits_by_table(words: np.ndarray) -> np.ndarray:
    """Set bits of each byte of `words` (uint64 [..., W] -> [..., 8W]): numpy < 2 has no
    bitwise_count; summed over the last axis it gives the same totals."""
    return _BITS_IN_BYTE[words.view(np.uint8)]


_count_bits = getattr(np, "bitwise_count", count_bits_by_table)


def hash_codes(vectors: np.ndarray) -> np.ndarray:
    """Sign bits of each vector packed into uint64 words ([..., dim] -> [..., ceil(dim/64)])."""
    bits = np.packbits(np.asarray(vectors) > 0, axis=-1)
    pad = [(0, 0)] * (bits.ndim - 1) + [(0, -bits.shape[-1] % 8)]
    return np.pad(bits, pad).view(np.uint64)


def hamming(codes: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Hamming distance of each code ([N, W]) to one code ([W])."""
    return _count_bits(codes ^ code).sum(axis=-1, dtype=np.int64)


# --- the matcher -------------------------------------------------------------------------------


class Matcher:
    def __init__(self, skus: list[str], vectors: np.ndarray, scale: float,
                 categories: Mapping[str, int] | None = None, hash_candidates: int = 0) -> None:
        """`categories`: sku -> index of its category among the model's coarse labels (a sku
        missing here is searched whatever the category); `hash_candidates`: references
        shortlisted by Hamming distance before exact cosine (0: exact search of all)."""
        if len(skus) != len(vectors):
            raise ValueError("one sku per reference vector")
        if hash_candidates < 0:
            raise ValueError("hash_candidates must be 0 (exact search) or more")
        self.products = sorted(set(skus))
        index = {s: i for i, s in enumerate(self.products)}
        self.owner = np.array([index[s] for s in skus], np.int64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True) if len(vectors) else 1.0
        self.vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
        self.scale = scale
        categories = categories or {}
        self.category = np.array([categories.get(s, NO_CATEGORY) for s in self.products],
                                 np.int64)
        self.hash_candidates = hash_candidates
        self.codes = hash_codes(self.vectors) if hash_candidates else None

    def __len__(self) -> int:
        return len(self.products)

    def in_categories(self, categories: np.ndarray) -> np.ndarray:
        """Which products to search for these category indices ([products] bool)."""
        return np.isin(self.category, categories) | (self.category == NO_CATEGORY)

    def scores(self, embedding: np.ndarray, searched: np.ndarray | None = None) -> np.ndarray:
        """Best similarity per product ([products]); -inf for a product not searched
        (outside `searched`, or none of its references on the hash shortlist)."""
        query = embedding.astype(np.float32)
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        best = np.full(len(self.products), -np.inf, np.float32)
        shortlist = self._shortlist(query, searched)
        if shortlist is None:
            np.maximum.at(best, self.owner, self.vectors @ query)
        else:
            np.maximum.at(best, self.owner[shortlist], self.vectors[shortlist] @ query)
        if searched is not None:
            best[~searched] = -np.inf
        return best

    def _shortlist(self, query: np.ndarray, searched: np.ndarray | None) -> np.ndarray | None:
        """The references nearest by Hamming distance among the searched products' ones, or
        None to compare all of them (hashing off, or the shortlist would hold every one)."""
        if self.codes is None or self.hash_candidates >= len(self.vectors):
            return None
        distance = hamming(self.codes, hash_codes(query))
        if searched is not None:
            distance[~searched[self.owner]] = np.iinfo(np.int64).max  # shortlisted last
        return np.argpartition(distance, self.hash_candidates)[: self.hash_candidates]

    def match(self, embedding: np.ndarray, k: int = 5, coarse_logits: np.ndarray | None = None,
              top_coarse: int = 0) -> list[Match]:
        """The k best products searched, best first. With the model's category logits and
        `top_coarse` > 0, only products of the `top_coarse` likeliest categories are searched."""
        searched = None
        if coarse_logits is not None and top_coarse > 0:
            searched = self.in_categories(np.argsort(-coarse_logits, kind="stable")[:top_coarse])
        best = self.scores(embedding, searched)
        found = np.isfinite(best)
        if not found.any():
            return []
        logits = self.scale * best.astype(np.float64)
        probs = np.exp(logits - logits[found].max())
        probs /= probs.sum()
        top = np.argsort(-best, kind="stable")[: min(k, int(found.sum()))]
        return [Match(self.products[i], float(best[i]), float(probs[i])) for i in top]


def hash_recall(skus: list[str], vectors: np.ndarray, queries: np.ndarray, candidates: int,
                k: int = 1) -> float:
    """Share of the exact search's top-k products that hashed search with `candidates`
    shortlisted references also returns in its top-k, over a batch of queries ([N, dim])."""
    exact = Matcher(skus, vectors, 1.0)
    hashed = Matcher(skus, vectors, 1.0, hash_candidates=candidates)
    found = 0
    for query in queries:
        want = {m.sku for m in exact.match(query, k)}
        found += len(want & {m.sku for m in hashed.match(query, k)})
    return found / (len(queries) * min(k, len(exact)))
