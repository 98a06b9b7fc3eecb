"""Matching an embedding against the catalog's reference embeddings.

Each product is represented by its reference embeddings: the bundle's learned prototype for
products the model was trained on, plus one per reference photo (so a product enrolled from
photos is matchable without retraining). A product's score is its best cosine similarity;
confidence is the softmax of scores at the temperature the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Match:
    sku: str
    similarity: float  # best cosine similarity to one of the product's references
    confidence: float  # softmax share among all products


class Matcher:
    def __init__(self, skus: list[str], vectors: np.ndarray, scale: float) -> None:
        if len(skus) != len(vectors):
            raise ValueError("one sku per reference vector")
        self.products = sorted(set(skus))
        index = {s: i for i, s in enumerate(self.products)}
        self.owner = np.array([index[s] for s in skus], np.int64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True) if len(vectors) else 1.0
        self.vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
        self.scale = scale

    def __len__(self) -> int:
        return len(self.products)

    def scores(self, embedding: np.ndarray) -> np.ndarray:
        """Best similarity per product ([products])."""
        query = embedding.astype(np.float32)
        sims = self.vectors @ (query / max(float(np.linalg.norm(query)), 1e-12))
        best = np.full(len(self.products), -np.inf, np.float32)
        np.maximum.at(best, self.owner, sims)
        return best

    def match(self, embedding: np.ndarray, k: int = 5) -> list[Match]:
        """The k best products, best first."""
        if not self.products:
            return []
        best = self.scores(embedding)
        logits = self.scale * best.astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-best, kind="stable")[:k]
        return [Match(self.products[i], float(best[i]), float(probs[i])) for i in top]
