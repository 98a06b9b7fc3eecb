"""Matching a scan's embedding to catalog products: the best of each product's references counts,
confidence is a softmax over all products, and the best products come first."""

from __future__ import annotations

import numpy as np
import pytest

from device.matcher import Matcher

SCALE = 10.0


def unit(*values: float) -> np.ndarray:
    v = np.array(values, np.float64)
    return v / np.linalg.norm(v)


def softmax(scores: list[float], scale: float) -> np.ndarray:
    e = np.exp(scale * np.array(scores) - scale * max(scores))
    return e / e.sum()


def test_a_products_best_reference_photo_decides_its_score() -> None:
    matcher = Matcher(["mug", "mug", "plate"],
                      np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(1, 1, 0)]), SCALE)
    matches = matcher.match(unit(0, 1, 0).astype(np.float32))
    assert [m.sku for m in matches] == ["mug", "plate"]
    assert matches[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert matches[1].similarity == pytest.approx(np.sqrt(0.5), abs=1e-6)


def test_confidence_is_a_softmax_over_all_products_summing_to_one() -> None:
    vectors = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1), unit(1, 1, 1)])
    matcher = Matcher(["a", "b", "c", "d"], vectors, SCALE)
    query = unit(3, 2, 1)
    matches = matcher.match(query, k=4)
    sims = {sku: float(v @ query) for sku, v in zip("abcd", vectors, strict=True)}
    expected = dict(zip("abcd", softmax(list(sims.values()), SCALE), strict=True))
    assert sum(m.confidence for m in matches) == pytest.approx(1.0)
    for m in matches:
        assert m.similarity == pytest.approx(sims[m.sku], abs=1e-6)
        assert m.confidence == pytest.approx(expected[m.sku], rel=1e-5)


def test_top_k_returns_the_k_best_products_best_first() -> None:
    vectors = np.stack([unit(1, 0), unit(0.9, 0.1), unit(0.5, 0.5), unit(0, 1)])
    matcher = Matcher(["w", "x", "y", "z"], vectors, SCALE)
    matches = matcher.match(unit(1, 0), k=2)
    assert [m.sku for m in matches] == ["w", "x"]
    assert matches[0].similarity > matches[1].similarity
    # the confidences still share out over all four products, not just the two shown
    assert sum(m.confidence for m in matches) < 1.0
    assert [m.sku for m in matcher.match(unit(1, 0), k=10)] == ["w", "x", "y", "z"]


def test_vectors_of_any_length_are_compared_by_direction_only() -> None:
    unit_refs = np.stack([unit(1, 2, 0), unit(2, -1, 1)])
    scaled = Matcher(["a", "b"], unit_refs * np.array([[7.0], [0.2]]), SCALE)
    plain = Matcher(["a", "b"], unit_refs, SCALE)
    query = unit(1, 1, 1)
    for long_query in (query * 5.0, query * 0.3):
        got, want = scaled.match(long_query), plain.match(query)
        assert [m.sku for m in got] == [m.sku for m in want]
        for g, w in zip(got, want, strict=True):
            assert g.similarity == pytest.approx(w.similarity, abs=1e-6)
            assert g.confidence == pytest.approx(w.confidence, rel=1e-5)
    assert max(m.similarity for m in scaled.match(unit(1, 2, 0) * 9.0)) == pytest.approx(
        1.0, abs=1e-6)


def test_an_empty_catalog_matches_nothing() -> None:
    matcher = Matcher([], np.zeros((0, 4), np.float32), SCALE)
    assert len(matcher) == 0
    assert matcher.match(unit(1, 0, 0, 0)) == []


def test_tied_products_keep_a_stable_order_by_sku() -> None:
    same = unit(1, 1)
    matcher = Matcher(["pear", "apple", "fig"], np.stack([same, same, same]), SCALE)
    matches = matcher.match(same)
    assert [m.sku for m in matches] == ["apple", "fig", "pear"]
    assert [m.confidence for m in matches] == pytest.approx([1 / 3] * 3)


def test_each_reference_vector_needs_a_sku() -> None:
    with pytest.raises(ValueError, match="one sku per reference vector"):
        Matcher(["a"], np.stack([unit(1, 0), unit(0, 1)]), SCALE)
