"""Matching a scan's embedding to catalog products: the best of each product's references counts,
confidence is a softmax over the products searched, and the best products come first; the
search can be narrowed to the likeliest categories, or shortlisted by 4-bit hash codes. Large
catalogs scan 7-bit codes first and still return exactly what float search returns."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from device.matcher import (
    Matcher,
    count_bits_by_table,
    hamming,
    hash_codes,
    hash_recall,
)

SCALE = 10.0


@pytest.fixture(params=[10**9, 1], ids=["float search", "7-bit scan"])
def scan_from(request: pytest.FixtureRequest) -> int:
    """Run a test with exact search as small catalogs do it and as large ones do."""
    return request.param


def unit(*values: float) -> np.ndarray:
    v = np.array(values, np.float64)
    return v / np.linalg.norm(v)


def softmax(scores: list[float], scale: float) -> np.ndarray:
    e = np.exp(scale * np.array(scores) - scale * max(scores))
    return e / e.sum()


def test_a_products_best_reference_photo_decides_its_score(scan_from: int) -> None:
    matcher = Matcher(["mug", "mug", "plate"],
                      np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(1, 1, 0)]), SCALE,
                      scan_from=scan_from)
    matches = matcher.match(unit(0, 1, 0).astype(np.float32))
    assert [m.sku for m in matches] == ["mug", "plate"]
    assert matches[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert matches[1].similarity == pytest.approx(np.sqrt(0.5), abs=1e-6)


def test_confidence_is_a_softmax_over_all_products_summing_to_one(scan_from: int) -> None:
    vectors = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1), unit(1, 1, 1)])
    matcher = Matcher(["a", "b", "c", "d"], vectors, SCALE, scan_from=scan_from)
    query = unit(3, 2, 1)
    matches = matcher.match(query, k=4)
    sims = {sku: float(v @ query) for sku, v in zip("abcd", vectors, strict=True)}
    expected = dict(zip("abcd", softmax(list(sims.values()), SCALE), strict=True))
    assert sum(m.confidence for m in matches) == pytest.approx(1.0)
    for m in matches:
        assert m.similarity == pytest.approx(sims[m.sku], abs=1e-6)
        assert m.confidence == pytest.approx(expected[m.sku], rel=1e-5)


def test_top_k_returns_the_k_best_products_best_first(scan_from: int) -> None:
    vectors = np.stack([unit(1, 0), unit(0.9, 0.1), unit(0.5, 0.5), unit(0, 1)])
    matcher = Matcher(["w", "x", "y", "z"], vectors, SCALE, scan_from=scan_from)
    matches = matcher.match(unit(1, 0), k=2)
    assert [m.sku for m in matches] == ["w", "x"]
    assert matches[0].similarity > matches[1].similarity
    # the confidences still share out over all four products, not just the two shown
    assert sum(m.confidence for m in matches) < 1.0
    assert [m.sku for m in matcher.match(unit(1, 0), k=10)] == ["w", "x", "y", "z"]


def test_vectors_of_any_length_are_compared_by_direction_only(scan_from: int) -> None:
    unit_refs = np.stack([unit(1, 2, 0), unit(2, -1, 1)])
    scaled = Matcher(["a", "b"], unit_refs * np.array([[7.0], [0.2]]), SCALE,
                     scan_from=scan_from)
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


def test_an_empty_catalog_matches_nothing(scan_from: int) -> None:
    matcher = Matcher([], np.zeros((0, 4), np.float32), SCALE, scan_from=scan_from)
    assert len(matcher) == 0
    assert matcher.match(unit(1, 0, 0, 0)) == []


def test_tied_products_keep_a_stable_order_by_sku(scan_from: int) -> None:
    same = unit(1, 1)
    matcher = Matcher(["pear", "apple", "fig"], np.stack([same, same, same]), SCALE,
                      scan_from=scan_from)
    matches = matcher.match(same)
    assert [m.sku for m in matches] == ["apple", "fig", "pear"]
    assert [m.confidence for m in matches] == pytest.approx([1 / 3] * 3)
    skus = [f"tie-{i}" for i in range(9, -1, -1)]  # more tied than shown: the first skus win
    tied = Matcher(skus, np.stack([same] * 10), SCALE, scan_from=scan_from)
    assert [m.sku for m in tied.match(same, k=4)] == ["tie-0", "tie-1", "tie-2", "tie-3"]


def test_each_reference_vector_needs_a_sku() -> None:
    with pytest.raises(ValueError, match="one sku per reference vector"):
        Matcher(["a"], np.stack([unit(1, 0), unit(0, 1)]), SCALE)


# --- hierarchy: search only the likeliest categories --------------------------------------------

PLATE, VASE = 0, 1


def shop(scan_from: int = 10**9) -> Matcher:
    """Two plates, two vases and a lamp (a category the model does not know)."""
    vectors = np.stack([unit(1, 0, 0), unit(1, 0.2, 0), unit(0.9, 0.1, 0.3), unit(0, 1, 0),
                        unit(0.6, 0, 0.8)])
    return Matcher(["plate-a", "plate-b", "vase-a", "vase-b", "lamp"], vectors, SCALE,
                   {"plate-a": PLATE, "plate-b": PLATE, "vase-a": VASE, "vase-b": VASE},
                   scan_from=scan_from)


def test_top_category_search_keeps_only_its_products_and_unknown_categories(
        scan_from: int) -> None:
    matcher = shop(scan_from)
    query = unit(1, 0.05, 0.1)
    says_vase = np.array([0.2, 3.0])
    matches = matcher.match(query, k=5, coarse_logits=says_vase, top_coarse=1)
    assert [m.sku for m in matches] == ["vase-a", "lamp", "vase-b"]
    assert sum(m.confidence for m in matches) == pytest.approx(1.0)  # shared among those searched
    plain = matcher.match(query, k=5)
    assert plain[0].sku == "plate-a"  # without the hierarchy the nearest plate wins
    assert {m.sku: m.similarity for m in matches} == pytest.approx(
        {m.sku: m.similarity for m in plain if m.sku in {"vase-a", "lamp", "vase-b"}})


def test_searching_as_many_categories_as_there_are_is_the_plain_search(scan_from: int) -> None:
    matcher = shop(scan_from)
    query = unit(0.3, 1, 0.2)
    both = matcher.match(query, k=5, coarse_logits=np.array([1.0, 0.5]), top_coarse=2)
    assert both == matcher.match(query, k=5)
    assert matcher.match(query, k=5, coarse_logits=np.array([1.0, 0.5]), top_coarse=0) == both


def test_a_category_with_nothing_in_the_shop_matches_nothing(scan_from: int) -> None:
    matcher = Matcher(["plate-a", "vase-a"], np.stack([unit(1, 0), unit(0, 1)]), SCALE,
                      {"plate-a": PLATE, "vase-a": VASE}, scan_from=scan_from)
    assert matcher.match(unit(1, 0), coarse_logits=np.array([0.0, 0.0, 5.0]), top_coarse=1) == []


def test_a_confident_category_head_overrules_a_near_tie_across_categories(
        scan_from: int) -> None:
    matcher = shop(scan_from)
    query = unit(1, 0.05, 0.1)  # plate-a 0.994, vase-a 0.965: a near tie
    says_vase = np.array([0.0, 3.0])
    matches = matcher.match(query, k=5, coarse_logits=says_vase, category_prior=True)
    assert [m.sku for m in matches][:2] == ["vase-a", "plate-a"]
    # nothing is left out, and the confidences are a softmax over every product
    assert len(matches) == 5 and sum(m.confidence for m in matches) == pytest.approx(1.0)
    plain = {m.sku: m.similarity for m in matcher.match(query, k=5)}
    # similarities stay cosines (the unknown check reads them); the ranking adds log P / scale
    assert {m.sku: m.similarity for m in matches} == pytest.approx(plain)
    # lamp, plate-a, plate-b, vase-a, vase-b: the lamp (a category the model does not know)
    # counts as in the likeliest one
    log_p = says_vase - np.log(np.exp(says_vase).sum())
    assert matcher.category_offsets(says_vase) == pytest.approx(
        [log_p[1], log_p[0], log_p[0], log_p[1], log_p[1]] / np.float32(SCALE))


def test_an_unsure_category_head_leaves_the_ranking_be(scan_from: int) -> None:
    matcher = shop(scan_from)
    query = unit(1, 0.05, 0.1)
    unsure = np.array([1.0, 1.0])
    assert ([m.sku for m in matcher.match(query, k=5, coarse_logits=unsure,
                                          category_prior=True)]
            == [m.sku for m in matcher.match(query, k=5)])


def test_the_category_prior_is_the_same_in_every_search() -> None:
    """Float search, the 7-bit scan and a shortlist of every reference rank alike."""
    skus, vectors, queries = clustered_catalog(products=600, refs=2, queries=10)
    categories = {s: int(s[1:]) % 5 for s in skus}
    searches = [Matcher(skus, vectors, SCALE, categories),
                Matcher(skus, vectors, SCALE, categories, scan_from=1),
                Matcher(skus, vectors, SCALE, categories, hash_candidates=len(skus))]
    logits = np.random.default_rng(4).normal(scale=2.0, size=(len(queries), 5))
    for query, coarse in zip(queries, logits, strict=True):
        got = [m.match(query, 6, coarse, category_prior=True) for m in searches]
        assert [m.sku for m in got[0]] != [m.sku for m in searches[0].match(query, 6)]
        for other in got[1:]:
            assert_same(other, [(m.sku, m.similarity, m.confidence) for m in got[0]])


# --- binary hash codes for very large catalogs --------------------------------------------------


def test_hash_codes_are_sign_bits_and_hamming_counts_differing_signs() -> None:
    signs = np.where(np.random.default_rng(0).random((3, 100)) > 0.5, 1.0, -1.0)
    codes = hash_codes(signs)
    assert codes.shape == (3, 2) and codes.dtype == np.uint64  # 100 bits in two 64-bit words
    differ = (signs[:, None, :] != signs[None, :, :]).sum(-1)
    for i in range(3):
        assert hamming(codes, codes[i]).tolist() == differ[i].tolist()


def test_bit_counting_by_table_agrees_with_numpy() -> None:
    words = np.random.default_rng(1).integers(0, 2**63, (50, 4), dtype=np.uint64)
    by_table = count_bits_by_table(words).sum(-1)
    expected = [sum(bin(int(w)).count("1") for w in row) for row in words]
    assert by_table.tolist() == expected


def clustered_catalog(products: int = 2000, refs: int = 3, dim: int = 256,
                      queries: int = 50) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Products in 40 look-alike families, noisy reference photos, noisier scans of products
    (a scan's cosine to its product is about 0.55, as for real photos)."""
    rng = np.random.default_rng(0)

    def noisy(x: np.ndarray, spread: float) -> np.ndarray:
        y = x + rng.normal(scale=spread / np.sqrt(dim), size=x.shape)
        return y / np.linalg.norm(y, axis=-1, keepdims=True)

    families = noisy(np.zeros((40, dim)), 1.0)
    centres = noisy(families[rng.integers(0, 40, products)], 1.0)
    vectors = noisy(np.repeat(centres, refs, axis=0), 0.5)
    skus = [f"P{i:04d}" for i in range(products) for _ in range(refs)]
    return skus, vectors, noisy(centres[rng.choice(products, queries, replace=False)], 1.5)


def test_hashed_search_finds_what_exact_search_finds_from_a_small_shortlist() -> None:
    skus, vectors, queries = clustered_catalog()
    assert hash_recall(skus, vectors, queries, candidates=30, k=1) >= 0.95  # 0.5% of references
    assert hash_recall(skus, vectors, queries, candidates=30, k=5) >= 0.95
    assert hash_recall(skus, vectors, queries, candidates=6, k=5) < 0.9  # it is approximate


def test_hashed_search_is_exact_when_the_shortlist_holds_every_reference() -> None:
    skus, vectors, queries = clustered_catalog(products=300, queries=20)
    assert hash_recall(skus, vectors, queries, candidates=len(vectors), k=5) == 1.0
    exact, hashed = Matcher(skus, vectors, SCALE), Matcher(skus, vectors, SCALE, None, 10**6)
    assert all(exact.match(q) == hashed.match(q) for q in queries)


def test_hashed_search_reports_exact_cosines_not_hamming_estimates() -> None:
    skus, vectors, queries = clustered_catalog(products=300, queries=5)
    hashed = Matcher(skus, vectors, SCALE, hash_candidates=30)
    owners = np.array(skus)
    for query in queries:
        for m in hashed.match(query):
            cosines = vectors[owners == m.sku] @ query  # of one of its shortlisted references
            assert np.abs(cosines - m.similarity).min() < 1e-6


def test_hashed_search_stays_within_the_likeliest_categories() -> None:
    skus, vectors, queries = clustered_catalog(products=300, queries=10)
    categories = {s: int(s[1:]) % 3 for s in skus}
    hashed = Matcher(skus, vectors, SCALE, categories, hash_candidates=30)
    for query in queries:
        matches = hashed.match(query, k=10, coarse_logits=np.array([0.0, 1.0, 0.0]), top_coarse=1)
        assert matches and {categories[m.sku] for m in matches} == {1}


def test_a_negative_shortlist_is_refused() -> None:
    with pytest.raises(ValueError, match="hash_candidates"):
        Matcher(["a"], np.stack([unit(1, 0)]), SCALE, hash_candidates=-1)


def test_hashed_search_beats_sign_bit_hamming_on_the_same_shortlist() -> None:
    """Why the shortlist is 4-bit codes: sign bits lose the near-ties that decide places 2-5."""
    skus, vectors, queries = clustered_catalog(products=1000, queries=20)
    exact = Matcher(skus, vectors, SCALE)
    codes, owners, found = hash_codes(vectors), np.array(skus), 0
    for query in queries:
        near = np.argpartition(hamming(codes, hash_codes(query)), 30)[:30]
        by_hamming = owners[near[np.argsort(-(vectors[near] @ query))]]
        found += len({m.sku for m in exact.match(query)} & set(list(dict.fromkeys(by_hamming))[:5]))
    assert found / (5 * len(queries)) < hash_recall(skus, vectors, queries, candidates=30, k=5)


# --- large catalogs: 7-bit scan, then float re-rank of whatever could place ---------------------


def brute_force(skus: list[str], vectors: np.ndarray, query: np.ndarray, k: int,
                allowed: set[str] | None = None) -> list[tuple[str, float, float]]:
    """(sku, best cosine, softmax confidence) of the k best products, in float64."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = v @ (query / np.linalg.norm(query))
    best: dict[str, float] = {}
    for sku, sim in zip(skus, sims, strict=True):
        if allowed is None or sku in allowed:
            best[sku] = max(best.get(sku, -np.inf), float(sim))
    ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    probs = softmax([s for _, s in ranked], SCALE)
    return [(sku, s, float(p)) for (sku, s), p in zip(ranked, probs, strict=True)][:k]


def assert_same(got: list, want: list[tuple[str, float, float]]) -> None:
    assert [m.sku for m in got] == [sku for sku, _, _ in want]
    assert [m.similarity for m in got] == pytest.approx([s for _, s, _ in want], abs=1e-5)
    # the softmax's sum over products not returned uses their 7-bit cosines: near-duplicates
    # share rounding errors and a product's best of several is biased up, by ~1e-3 of the sum
    assert [m.confidence for m in got] == pytest.approx([p for _, _, p in want], rel=5e-3)


@pytest.mark.parametrize("refs", [1, 3])
def test_the_7bit_scan_returns_exactly_what_brute_force_returns(refs: int) -> None:
    skus, vectors, queries = clustered_catalog(products=3000 // refs, refs=refs, queries=20)
    scanned = Matcher(skus, vectors, SCALE, scan_from=1)
    for query in queries:
        want = brute_force(skus, vectors, query, 12)
        for k in (1, 5, 12):
            assert_same(scanned.match(query, k), want[:k])


def test_the_7bit_scan_is_exact_among_near_duplicates() -> None:
    """40 look-alikes within 0.002 of cosine of each other, far closer than the 7-bit codes'
    error (about 0.01), among 500 unrelated products."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(1, 64))
    vectors = np.concatenate([base + rng.normal(scale=0.05, size=(40, 64)),
                              rng.normal(size=(500, 64))])
    skus = [f"D{i:03d}" for i in range(len(vectors))]
    scanned = Matcher(skus, vectors, SCALE, scan_from=1)
    for query in base + rng.normal(scale=0.05, size=(10, 64)):
        want = brute_force(skus, vectors, query, 6)
        assert want[0][1] - want[5][1] < 0.002
        assert min(a[1] - b[1] for a, b in itertools.pairwise(want)) > 5e-7  # float32 can tell
        assert_same(scanned.match(query, 5), want[:5])


def test_the_7bit_scan_stays_within_the_likeliest_categories() -> None:
    skus, vectors, queries = clustered_catalog(products=900, refs=2, queries=10)
    categories = {s: int(s[1:]) % 3 for s in skus}
    scanned = Matcher(skus, vectors, SCALE, categories, scan_from=1)
    allowed = {s for s, c in categories.items() if c == 1}
    for query in queries:
        got = scanned.match(query, k=5, coarse_logits=np.array([0.0, 1.0, 0.0]), top_coarse=1)
        assert_same(got, brute_force(skus, vectors, query, 5, allowed))


def test_catalogs_past_the_scan_threshold_match_exactly_and_hash_well() -> None:
    """70k products (small vectors, to stay quick): the default thresholds pick the 7-bit scan,
    and long score arrays take the sampled-threshold path to their top candidates."""
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(70_000, 16)).astype(np.float32)
    skus = [f"L{i:05d}" for i in range(len(vectors))]
    queries = vectors[rng.choice(len(vectors), 5)] + rng.normal(scale=0.3, size=(5, 16))
    exact = Matcher(skus, vectors, SCALE)
    hashed = Matcher(skus, vectors, SCALE, hash_candidates=200)
    for query in queries:
        want = brute_force(skus, vectors, query, 5)
        assert_same(exact.match(query), want)
        got = hashed.match(query)
        assert len({m.sku for m in got} & {sku for sku, _, _ in want}) >= 4
        assert [m.similarity for m in got] == sorted((m.similarity for m in got), reverse=True)
