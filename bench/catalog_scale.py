"""Catalog scale: time per match and recall@5 from 1k to 1M products, against faiss flat search.

    python bench/catalog_scale.py --sizes 1000,10000,100000,1000000 --queries 200

The catalog is random 256-d unit vectors, one reference per product (with --refs R, R
references per product, each at cosine about 0.8 to its product's random centre). A query is
a noisy copy of a random catalog reference at cosine exactly 0.75 to it, so its own product
is clearly first and the other four of the top 5 are the random tail. Per size, one query at
a time, k = 5 products:

- exact: `Matcher.match` (float32 BLAS up to `SCAN_FROM` references, above that the 7-bit scan
  and bounded float re-rank, which returns exactly what float search returns);
- before: exact search as the matcher did it before (float32 pass, np.maximum.at per
  product, a sort of every product);
- float32 scan: `Matcher` with the 7-bit scan off, one BLAS pass over every reference;
- hash L + re-rank: `Matcher(hash_candidates=L)`, 4-bit shortlist of L references;
- sign bits L + re-rank: the shortlist the matcher used before 4-bit codes, L references
  nearest by Hamming distance (`hash_codes`, `hamming`) re-ranked by float cosine;
- faiss IndexFlatIP: faiss-cpu's exhaustive float32 search (top 5R references, the first 5
  distinct products of them), skipped with a note when faiss is not installed.

recall@5 is the share of exact float32 search's top-5 products (brute force, batched) that a
method returns. The methods take turns in rounds, a block of queries each (the first untimed,
so the threads another method left spinning go idle), so machine noise hits them alike;
`vs faiss` is a method's median time over faiss's median in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_docs_args, write_docs
from device.matcher import SCAN_FROM, SCAN_THREADS, Matcher, hamming, hash_codes
from models.tables import format_markdown_table, format_table

COLUMNS = ["products", "references", "method", "build s", "min ms", "p50 ms", "p95 ms",
           "recall@5", "vs faiss"]
FORMATS = {"build s": ".1f", "min ms": ".2f", "p50 ms": ".2f", "p95 ms": ".2f",
           "recall@5": ".3f", "vs faiss": ".2f"}
DIM, QUERY_COSINE, REF_COSINE, K = 256, 0.75, 0.8, 5


def at_cosine(rng: np.random.Generator, anchors: np.ndarray, cosine: float) -> np.ndarray:
    """Unit vectors at exactly `cosine` to each unit anchor, in a random direction."""
    noise = rng.standard_normal(anchors.shape, dtype=np.float32)
    noise -= np.sum(noise * anchors, axis=1, keepdims=True) * anchors
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (cosine * anchors + np.sqrt(1 - cosine**2) * noise).astype(np.float32)


def catalog(rng: np.random.Generator, products: int, refs: int,
            queries: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sku per reference, unit references [products*refs, DIM], unit queries)."""
    vectors = np.empty((products * refs, DIM), np.float32)
    for i in range(0, products, 65_536):  # in chunks: 1M products need no 2 GB temporaries
        v = rng.standard_normal((min(65_536, products - i), DIM), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        if refs > 1:
            v = at_cosine(rng, np.repeat(v, refs, axis=0), REF_COSINE)
        vectors[i * refs:i * refs + len(v)] = v
    skus = [f"P{i:07d}" for i in range(products) for _ in range(refs)]
    sources = vectors[rng.integers(0, len(vectors), queries)]
    return skus, vectors, at_cosine(rng, sources, QUERY_COSINE)


def true_top(vectors: np.ndarray, refs: int, queries: np.ndarray) -> list[set[int]]:
    """Exact float32 search's top-K product indices per query (brute force, in batches)."""
    tops = []
    for i in range(0, len(queries), 16):
        sims = queries[i:i + 16] @ vectors.T
        best = sims.reshape(len(sims), -1, refs).max(axis=2)
        tops += [set(np.argpartition(-b, K)[:K].tolist()) for b in best]
    return tops


def sign_bit_search(vectors: np.ndarray, refs: int, candidates: int) -> Callable:
    """The old shortlist: `candidates` references nearest by Hamming distance of sign bits,
    re-ranked by float cosine."""
    codes = hash_codes(vectors)

    def search(query: np.ndarray) -> list[int]:
        distance = hamming(codes, hash_codes(query))
        near = (np.argpartition(distance, candidates)[:candidates] if candidates < len(codes)
                else np.arange(len(codes)))
        order = near[np.argsort(-(vectors[near] @ query))] // refs
        return list(dict.fromkeys(order.tolist()))[:K]
    return search


def old_exact_search(vectors: np.ndarray, refs: int) -> Callable:
    """Exact search as `Matcher.match` did it before this benchmark: one float32 pass, each
    product's best by np.maximum.at, the softmax, a full sort of the products."""
    owner = np.arange(len(vectors)) // refs

    def search(query: np.ndarray) -> list[int]:
        best = np.full(len(vectors) // refs, -np.inf, np.float32)
        np.maximum.at(best, owner, vectors @ (query / np.linalg.norm(query)))
        probs = np.exp(16.0 * (best.astype(np.float64) - best.max()))
        probs /= probs.sum()
        return np.argsort(-best, kind="stable")[:K].tolist()
    return search


def faiss_search(vectors: np.ndarray, refs: int, threads: int) -> Callable | None:
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)

    def search(query: np.ndarray) -> list[int]:
        _, ids = index.search(query[None], K * refs)  # K*refs references hold >= K products
        return list(dict.fromkeys((ids[0] // refs).tolist()))[:K]
    return search


def matcher_search(matcher: Matcher) -> Callable:
    index = {s: i for i, s in enumerate(matcher.products)}
    return lambda q: [index[m.sku] for m in matcher.match(q, K)]


def run_size(products: int, args: argparse.Namespace, notes: list[str]) -> list[dict]:
    rng = np.random.default_rng(products)
    skus, vectors, queries = catalog(rng, products, args.refs, args.queries + args.rounds)
    truth = true_top(vectors, args.refs, queries)
    builders: list[tuple[str, Callable[[], Callable | None]]] = [
        ("exact", lambda: matcher_search(Matcher(skus, vectors, 16.0))),
        ("before: float32 + np.maximum.at", lambda: old_exact_search(vectors, args.refs)),
        ("float32 scan", lambda: matcher_search(
            Matcher(skus, vectors, 16.0, scan_from=len(vectors) + 1))),
        *[(f"hash {c} + re-rank", lambda c=c: matcher_search(
            Matcher(skus, vectors, 16.0, hash_candidates=c))) for c in args.candidates],
        *[(f"sign bits {c} + re-rank", lambda c=c: sign_bit_search(vectors, args.refs, c))
          for c in args.sign_bits],
        ("faiss IndexFlatIP", lambda: faiss_search(vectors, args.refs, args.faiss_threads)),
    ]
    methods, rows = [], []
    for name, build in builders:
        t0 = time.perf_counter()
        search = build()
        if search is None:
            notes.append("faiss is not installed (`pip install 'storyscan[bench]'`): no faiss "
                         "row, no `vs faiss` column values.")
            continue
        methods.append((name, search, time.perf_counter() - t0))
    times: list[list[float]] = [[] for _ in methods]
    found = [0] * len(methods)
    for block in np.array_split(np.arange(len(queries)), args.rounds):
        for i, (_, search, _) in enumerate(methods):
            search(queries[block[0]])  # untimed: lets the last method's threads go idle
            for n in block[1:]:
                t0 = time.perf_counter()
                got = search(queries[n])
                times[i].append(time.perf_counter() - t0)
                found[i] += len(truth[n] & set(got))
    faiss_p50 = next((np.median(t) for (name, _, _), t in zip(methods, times, strict=True)
                      if name.startswith("faiss")), None)
    for (name, _, build_s), t, hits in zip(methods, times, found, strict=True):
        p50 = float(np.median(t))
        rows.append({"products": products, "references": len(vectors), "method": name,
                     "build s": build_s, "min ms": min(t) * 1e3, "p50 ms": p50 * 1e3,
                     "p95 ms": float(np.percentile(t, 95)) * 1e3,
                     "recall@5": hits / (K * args.queries),
                     "vs faiss": p50 / faiss_p50 if faiss_p50 else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000",
                   help="catalog sizes in products (comma-separated)")
    p.add_argument("--queries", type=int, default=200, help="timed queries per size")
    p.add_argument("--rounds", type=int, default=5,
                   help="blocks of queries per method, the methods taking turns")
    p.add_argument("--refs", type=int, default=1, help="reference embeddings per product")
    p.add_argument("--candidates", default="100",
                   help="hash shortlist sizes, in references (comma-separated)")
    p.add_argument("--sign-bits", default="1000",
                   help="sign-bit Hamming shortlist sizes (comma-separated; '' for none)")
    p.add_argument("--faiss-threads", type=int, default=SCAN_THREADS,
                   help="faiss OpenMP threads (default: as many as the matcher's scans use)")
    add_docs_args(p)
    args = p.parse_args()
    args.candidates = [int(c) for c in args.candidates.split(",") if c]
    args.sign_bits = [int(c) for c in args.sign_bits.split(",") if c]

    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    notes: list[str] = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows += run_size(size, args, notes)
        print(format_table([r for r in rows if r["products"] == size], COLUMNS, FORMATS),
              flush=True)
    load_after = os.getloadavg()[0]
    print(format_table(rows, COLUMNS, FORMATS))
    if args.no_docs:
        return
    refs = (f"{args.refs} references per product at cosine {REF_COSINE} to a random centre"
            if args.refs > 1 else "one reference per product")
    body = (f"Random {DIM}-d unit vectors, {refs}; each query is a noisy copy of a random "
            f"reference at cosine {QUERY_COSINE} to it; top {K} products, one query at a time, "
            f"{args.queries} timed queries per size, the methods taking turns in "
            f"{args.rounds} rounds of the same run (`vs faiss`: median over faiss's median). "
            f"recall@5 is against exact float32 search. The matcher's scans run on "
            f"{SCAN_THREADS} ONNX Runtime thread(s), faiss on {args.faiss_threads} OpenMP "
            f"thread(s), numpy's BLAS on its default; exact search scans 7-bit codes from "
            f"{SCAN_FROM} references. Load average {load_before:.1f} before, {load_after:.1f} "
            f"after (2 cores: anything else running shows in these times; numpy's two BLAS "
            f"threads then wait a scheduler slice, about 8 ms, for a core, which is why the "
            f"float32 rows can jump to 8 ms). `min ms`, the least disturbed query, is the "
            f"nearest this gets to an idle machine.\n\n"
            f"`exact` returns exactly the float32 search's products and similarities (its "
            f"recall is 1 by construction, not by luck); `hash` is approximate, its recall "
            f"measured. Issue 4's targets, one query: exact top 5 in 3 ms at 100k products; "
            f"10 ms at 1M at recall@5 >= 0.99; within 1.5x of faiss flat.\n\n"
            + format_markdown_table(rows, COLUMNS, FORMATS)
            + "".join(f"\n\n{n}" for n in dict.fromkeys(notes)))
    name = "catalog-scale" if args.refs == 1 else f"catalog-scale-{args.refs}refs"
    title = "Catalog scale" + (f" ({args.refs} references per product)" if args.refs > 1 else "")
    write_docs(args, name, title, body)


if __name__ == "__main__":
    main()
