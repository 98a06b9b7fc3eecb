"""Matching an embedding against the catalog's reference embeddings.

Each product is represented by its reference embeddings: the bundle's learned prototype for
products the model was trained on, plus one per reference photo (so a product enrolled from
photos is matchable without retraining). A product's score is its best cosine similarity;
confidence is the softmax of scores at the temperature the model was trained with, over the
products searched.

Exact search (the default) returns the same products and similarities however large the
catalog. Up to `SCAN_FROM` references it is one float32 BLAS pass over them all. Beyond that a
float32 pass is bound by memory bandwidth (100k x 256 floats is 100 MB per query), so it scans
a 7-bit copy of the references instead (a quarter of the bytes, ONNX Runtime's integer matrix
product), which gives every cosine to within a known error bound, and re-ranks in float32
every reference whose bound could still place its product in the top k: the products and
similarities returned are exactly the float search's. Only the softmax's sum over the products
not returned uses their 7-bit cosines (about 1e-3 off), so confidences can be ~0.1% off.

Two ways to use the model's category logits, both off by default:

- hierarchy: only products of the `top_coarse` likeliest categories are searched (a product
  whose category the model does not know always is), so a vase is never confused with a plate
  that happens to share its colours;
- category prior: every product is searched, ranked by scale * cosine + log P(its category):
  the product and category heads' evidence multiplied, with no weight to tune. A confident
  category head overrules a near tie across categories, an unsure one leaves the ranking be,
  and the runners-up stay (bench/matching.py measures both against plain search).

One way to search less than everything, off by default:

- hashing, for very large catalogs: every reference also gets a 4-bit code (an eighth of the
  float bytes, ONNX Runtime's MatMulNBits); the `hash_candidates` references with the best
  4-bit cosines are shortlisted and only they are compared by exact cosine, and the softmax
  is over the shortlisted products. `hash_recall` measures what that costs against exact
  search. (Sign-bit codes compared by Hamming distance, `hash_codes` and `hamming`, were the
  shortlist before: at 100k random products they need 20k candidates for recall@5 0.99 where
  4-bit codes need 50, see bench/catalog_scale.py.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

NO_CATEGORY = -1  # a product whose category the model does not know: searched always
SCAN_FROM = 8_192  # references; below, one float32 pass beats the 7-bit scan and its overheads
# every core, as the engine uses (a scan runs after inference, with the cores free): measured
# on this 2-core machine, 1M references hash-shortlisted in 6.9 ms on two threads, 14.2 on one
SCAN_THREADS = os.cpu_count() or 1


@dataclass(slots=True)  # made once per match and result: slots make that 2.5x faster
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


# --- compressed scans (ONNX Runtime, which the kiosk has anyway) -------------------------------

_CHUNK = 65_536  # rows quantised at a time, so building for 1M references needs no 1 GB temporaries


class _Scan:
    """A single-threaded ONNX Runtime session computing y [rows, n] from a query input `x`.

    The codes (`arrays`) go in as external initializers, read from our numpy memory, not
    copied through a protobuf (which at 1M references cost seconds and a few hundred MB)."""

    def __init__(self, nodes: list, x: object, arrays: dict[str, np.ndarray], n: int,
                 opsets: dict[str, int], rows: int = 1) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        placeholders = []
        for name, array in arrays.items():
            t = TensorProto(name=name, dims=array.shape,
                            data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value=f"{name}.bin")
            placeholders.append(t)
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])
        graph = helper.make_graph(nodes, "scan", [x], [y], placeholders)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                        for d, v in opsets.items()])
        options = ort.SessionOptions()
        options.intra_op_num_threads = SCAN_THREADS
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the CPU be
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
        options.add_external_initializers(list(arrays), self._values)
        self._arrays = arrays  # the session may read them in place: keep them alive
        self.session = ort.InferenceSession(model.SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x})[0]


def _norms(rows: np.ndarray) -> np.ndarray:
    """Euclidean norm of each row (einsum: a third of np.linalg.norm's time on big arrays)."""
    return np.sqrt(np.einsum("ij,ij->i", rows, rows))


class _Int8Scan:
    """Every reference's cosine to a query from 7-bit codes, plus a bound on the error.

    A reference is stored as round(v / s) with s = max|v| / 63 and the query as uint8 with
    zero point 128, so the integer product is exact and the error comes from rounding alone:
    |v.x - s_v s_x (q_v.q_x)| <= |v - v^| |x| + |v^| |x - x^| (Cauchy-Schwarz). 7 bits, not 8,
    because x86 CPUs without VNNI add uint8 x int8 pairs in saturating int16.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        import cv2
        from onnx import TensorProto, helper

        n, dim = vectors.shape
        self.scales = np.empty(n, np.float32)
        codes = np.empty((n, dim), np.int8)
        self.error, self.norm = 0.0, 0.0  # largest |v - v^| and |v^| over the references
        for i in range(0, n, _CHUNK):
            v = vectors[i:i + _CHUNK]
            s = np.maximum(np.abs(v).max(axis=1), 1e-30) / 63
            q = v * (1 / s)[:, None]
            np.rint(q, out=q)
            restored = q * s[:, None]
            self.error = max(self.error, float(_norms(v - restored).max()))
            self.norm = max(self.norm, float(_norms(restored).max()))
            self.scales[i:i + _CHUNK] = s
            codes[i:i + _CHUNK] = q
        codes = cv2.transpose(codes)  # [K, N] as MatMulInteger wants; 4x numpy's speed
        zero = helper.make_tensor("zero", TensorProto.UINT8, [], [128])
        self.scan = _Scan(
            [helper.make_node("Constant", [], ["zero"], value=zero),
             helper.make_node("MatMulInteger", ["x", "codes", "zero"], ["dot"]),
             helper.make_node("Cast", ["dot"], ["y"], to=TensorProto.FLOAT)],
            helper.make_tensor_value_info("x", TensorProto.UINT8, [2, dim]),
            {"codes": codes}, n, {"": 17}, rows=2)

    def __call__(self, query: np.ndarray) -> tuple[np.ndarray, float]:
        """(approximate cosine of each reference [N] float32, bound on |approx - exact|) for a
        unit query.

        The query goes in as two uint8 rows, its 8-bit code and the 8-bit code of what that
        leaves over, as one matrix product (the codes are read once either way): the query's
        own rounding error, the same for every reference and so not averaging out in the
        softmax's sum, becomes negligible, and the bound tightens to the references' error."""
        s1 = max(float(np.abs(query).max()), 1e-30) / 127
        q1 = np.rint(query / s1)
        rest = query - q1 * s1
        s2 = max(float(np.abs(rest).max()), 1e-30) / 127
        q2 = np.rint(rest / s2)
        dots = self.scan.run((np.stack([q1, q2]) + 128).astype(np.uint8))
        approx = dots[1]
        approx *= np.float32(s2 / s1)
        approx += dots[0]
        approx *= self.scales
        approx *= np.float32(s1)
        query_error = float(np.linalg.norm(rest - q2 * s2))
        # float32 rounding of the products and sums above is far below the 1e-5 margin
        return approx, self.error + self.norm * query_error + 1e-5


class _Int4Scan:
    """Every reference's approximate cosine to a query from 4-bit codes (one scale per block
    of up to 256 dimensions), for the hash shortlist: an eighth of the float bytes, so the
    fastest full scan there is; its error (about 0.008 on 256-d unit vectors) is no bound, so
    the shortlist is then re-ranked by exact cosine."""

    def __init__(self, vectors: np.ndarray) -> None:
        from onnx import TensorProto, helper

        n, dim = vectors.shape
        self.dim = dim + -dim % 32
        block = next(b for b in (256, 128, 64, 32) if self.dim % b == 0)
        blocks = self.dim // block
        packed = np.empty((n, blocks, block // 2), np.uint8)
        scales = np.empty((n, blocks), np.float32)
        for i in range(0, n, _CHUNK):
            v = np.zeros((len(vectors[i:i + _CHUNK]), self.dim), np.float32)
            v[:, :dim] = vectors[i:i + _CHUNK]
            v = v.reshape(len(v), blocks, block)
            s = np.maximum(np.abs(v).max(axis=2), 1e-30) / 7
            q = (np.rint(v / s[..., None]) + 8).astype(np.uint8)  # 1..15; value (q - 8) * s
            packed[i:i + _CHUNK] = q[..., 0::2] | (q[..., 1::2] << 4)
            scales[i:i + _CHUNK] = s
        self.scan = _Scan(
            [helper.make_node("MatMulNBits", ["x", "codes", "scales"], ["y"],
                              domain="com.microsoft", K=self.dim, N=n, bits=4,
                              block_size=block, accuracy_level=4)],  # int8 compute
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, self.dim]),
            {"codes": packed, "scales": scales.reshape(-1)}, n, {"": 17, "com.microsoft": 1})

    def __call__(self, query: np.ndarray) -> np.ndarray:
        x = np.zeros((1, self.dim), np.float32)
        x[0, :len(query)] = query
        return self.scan.run(x)[0]


def _at_least_top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the n largest values and of any tied with the n-th.

    For long arrays a threshold from a strided sample first keeps a few hundred candidates in
    one cheap pass, so only those are partitioned (np.argpartition of 1M floats costs more
    than the rest of a query); if the guess keeps too few, the full partition decides."""
    if n >= len(values):
        return np.arange(len(values))
    if len(values) > _CHUNK:
        sample = values[::64]
        rank = 2 * n // 64 + 16
        if rank < len(sample):
            keep = np.flatnonzero(values >= np.partition(sample, -rank)[-rank])
            if len(keep) >= n:
                return keep[values[keep] >= np.partition(values[keep], -n)[-n]]
    return np.flatnonzero(values >= np.partition(values, -n)[-n])


def _best_first(products: np.ndarray, similarity: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k most similar products, best first, ties in sku order (the order a
    stable sort gives), without sorting them all."""
    near = _at_least_top(similarity, k)
    return near[np.lexsort((products[near], -similarity[near]))][:k]


# --- the matcher -------------------------------------------------------------------------------


class Matcher:
    def __init__(self, skus: list[str], vectors: np.ndarray, scale: float,
                 categories: Mapping[str, int] | None = None, hash_candidates: int = 0, *,
                 scan_from: int = SCAN_FROM) -> None:
        """`categories`: sku -> index of its category among the model's coarse labels (a sku
        missing here is searched whatever the category); `hash_candidates`: references
        shortlisted by their 4-bit codes before exact cosine (0: exact search of all);
        `scan_from`: how many references make exact search scan 7-bit codes first. Unit-length
        float32 `vectors` are used in place, not copied."""
        if len(skus) != len(vectors):
            raise ValueError("one sku per reference vector")
        if hash_candidates < 0:
            raise ValueError("hash_candidates must be 0 (exact search) or more")
        self.products = sorted(set(skus))
        index = {s: i for i, s in enumerate(self.products)}
        owner = np.fromiter((index[s] for s in skus), np.int64, len(skus))
        # a product's references side by side: its best is one np.maximum.reduceat away
        order = np.argsort(owner, kind="stable")
        self.owner = owner[order]
        vectors = np.ascontiguousarray(vectors, np.float32)
        if (np.diff(owner) < 0).any():
            vectors = vectors[order]
        norms = _norms(vectors)
        # unit vectors already (as bundles' embeddings are): kept as they are, no copy (1 GB
        # at 1M references)
        self.vectors = (vectors if np.all(np.abs(norms - 1) < 1e-6)
                        else vectors / np.maximum(norms, 1e-12)[:, None])
        self.scale = scale
        categories = categories or {}
        self.category = np.array([categories.get(s, NO_CATEGORY) for s in self.products],
                                 np.int64)
        self.hash_candidates = hash_candidates
        self._starts = np.searchsorted(self.owner, np.arange(len(self.products)))
        self._counts = np.diff(np.append(self._starts, len(self.owner)))
        self._one_each = len(self.owner) == len(self.products)  # then reference i is product i
        self._every_product = np.arange(len(self.products))
        hashed = 0 < hash_candidates < len(self.vectors)
        self._shortlister = _Int4Scan(self.vectors) if hashed else None
        self._bounded = (_Int8Scan(self.vectors)
                         if not hashed and len(self.vectors) >= max(scan_from, 1) else None)

    def __len__(self) -> int:
        return len(self.products)

    def in_categories(self, categories: np.ndarray) -> np.ndarray:
        """Which products to search for these category indices ([products] bool)."""
        return np.isin(self.category, categories) | (self.category == NO_CATEGORY)

    def scores(self, embedding: np.ndarray, searched: np.ndarray | None = None) -> np.ndarray:
        """Best similarity per product ([products]); -inf for a product not searched
        (outside `searched`, or none of its references on the hash shortlist)."""
        query = _unit(embedding)
        if self._shortlister is not None:
            best = np.full(len(self.products), -np.inf, np.float32)
            products, similarity = self._shortlisted(query, searched)
            best[products] = similarity
            return best
        return self._all_scores(query, searched)

    def match(self, embedding: np.ndarray, k: int = 5, coarse_logits: np.ndarray | None = None,
              top_coarse: int = 0, category_prior: bool = False) -> list[Match]:
        """The k best products searched, best first. With the model's category logits and
        `top_coarse` > 0, only products of the `top_coarse` likeliest categories are searched;
        with `category_prior`, products rank by similarity + log P(category) / scale (a
        Match's similarity stays its cosine, for the unknown check; its confidence is the
        softmax of the ranking scores)."""
        if k < 1:
            return []
        searched = None
        if coarse_logits is not None and top_coarse > 0:
            searched = self.in_categories(np.argsort(-coarse_logits, kind="stable")[:top_coarse])
        offset = (self.category_offsets(coarse_logits)
                  if coarse_logits is not None and category_prior else None)
        query = _unit(embedding)
        if self._shortlister is not None:
            products, similarity = self._shortlisted(query, searched)
        elif self._bounded is not None:
            return self._bounded_match(query, searched, k, offset)
        else:
            similarity = self._all_scores(query, searched)
            products = self._every_product
            if searched is not None:
                products = products[np.isfinite(similarity)]
                similarity = similarity[products]
        if not len(products):
            return []
        rank = similarity if offset is None else similarity + offset[products]
        top = _best_first(products, rank, k)
        logits = rank - rank[top[0]]  # <= 0: exp cannot overflow in float32
        logits *= np.float32(self.scale)
        np.exp(logits, out=logits)
        probs = (logits[top] / logits.sum(dtype=np.float64)).tolist()
        names = [self.products[p] for p in products[top].tolist()]
        return [Match(*m) for m in zip(names, similarity[top].tolist(), probs, strict=True)]

    def category_offsets(self, coarse_logits: np.ndarray) -> np.ndarray:
        """log P(each product's category | photo) / scale ([products] float32, <= 0): what
        the category prior adds to a product's similarity. A product of a category the model
        does not know gets the likeliest category's, as `top_coarse` always searches it."""
        logits = np.asarray(coarse_logits, np.float64).reshape(-1)
        log_p = logits - logits.max()
        log_p -= np.log(np.exp(log_p).sum())
        known = self.category != NO_CATEGORY
        per_product = np.where(known, log_p[np.where(known, self.category, 0)], log_p.max())
        return (per_product / self.scale).astype(np.float32)

    # --- the three searches --------------------------------------------------------------------

    def _all_scores(self, query: np.ndarray, searched: np.ndarray | None) -> np.ndarray:
        """Exact best similarity of every product (float32 BLAS), -inf outside `searched`."""
        if not len(self.products):
            return np.zeros(0, np.float32)
        similarity = self.vectors @ query
        best = similarity if self._one_each else np.maximum.reduceat(similarity, self._starts)
        if searched is not None:
            best[~searched] = -np.inf
        return best

    def _shortlisted(self, query: np.ndarray, searched: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Products with a reference among the `hash_candidates` of best 4-bit cosine (of the
        searched products'), and their exact best similarity over those references."""
        approx = self._shortlister(query)
        if searched is not None:
            approx[~self._per_reference(searched)] = -np.inf
        refs = _at_least_top(approx, self.hash_candidates)
        if len(refs) > self.hash_candidates:  # ties at the cut: keep exactly that many
            refs = np.sort(refs[np.argpartition(-approx[refs], self.hash_candidates - 1)
                                [: self.hash_candidates]])
        return self._exact_best(query, refs[np.isfinite(approx[refs])])

    def _bounded_match(self, query: np.ndarray, searched: np.ndarray | None, k: int,
                       offset: np.ndarray | None = None) -> list[Match]:
        """Exact top k from the 7-bit scan: the k likeliest products' references are re-ranked
        exactly, which makes the k-th of their ranking scores (similarity + `offset`) a floor
        no product outside the top k reaches; then every reference whose cosine bound reaches
        that floor is re-ranked too, so no product that could place is left to its
        approximate score."""
        approx, bound = self._bounded(query)
        if searched is not None:
            approx[~self._per_reference(searched)] = -np.inf
        if offset is not None:  # rank by similarity + offset throughout; the bound is the same
            approx += self._per_reference(offset)
        approx_best = approx if self._one_each else np.maximum.reduceat(approx, self._starts)
        likely = _at_least_top(approx_best, k)
        likely = likely[np.isfinite(approx_best[likely])]
        if not len(likely):
            return []

        def exact(refs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            products, similarity = self._exact_best(query, refs)
            rank = similarity if offset is None else similarity + offset[products]
            return products, similarity, rank

        refs = self._references_of(likely)
        products, similarity, rank = exact(refs)
        if len(products) >= k:  # else every product searched is already here, exactly
            floor = np.partition(rank, -k)[-k]
            refs = np.union1d(refs, np.flatnonzero(approx >= floor - bound))
            products, similarity, rank = exact(refs)
        top = _best_first(products, rank, k)
        # softmax over every product searched: exact for those returned, 7-bit for the rest
        best = rank[top].astype(np.float64)
        terms = approx_best - np.float32(best[0])
        terms *= np.float32(self.scale)
        np.exp(terms, out=terms)
        shown = np.exp(self.scale * (best - best[0]))
        total = terms.sum(dtype=np.float64) - terms[products[top]].sum(dtype=np.float64)
        probs = shown / (total + shown.sum())
        return [Match(self.products[products[i]], float(similarity[i]), float(p))
                for i, p in zip(top, probs, strict=True)]

    # --- references and products ---------------------------------------------------------------

    def _per_reference(self, per_product: np.ndarray) -> np.ndarray:
        return per_product if self._one_each else np.repeat(per_product, self._counts)

    def _references_of(self, products: np.ndarray) -> np.ndarray:
        """All references of these products, ascending."""
        if self._one_each:
            return np.sort(products)
        counts = self._counts[products]
        first = np.repeat(self._starts[products] - np.cumsum(counts) + counts, counts)
        return np.sort(first + np.arange(counts.sum()))

    def _exact_best(self, query: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(products owning these references (ascending), each one's best exact cosine over
        them); `refs` ascending."""
        if not len(refs):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        similarity = self.vectors[refs] @ query
        owners = self.owner[refs]
        starts = np.flatnonzero(np.diff(owners, prepend=-1))
        return owners[starts], np.maximum.reduceat(similarity, starts)


def _unit(embedding: np.ndarray) -> np.ndarray:
    query = np.asarray(embedding, np.float32).reshape(-1)
    return query / max(float(np.sqrt(query @ query)), 1e-12)


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
