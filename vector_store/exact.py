"""Exact top-k by one BLAS matrix product: the reference for every ANN result, and the fast
path for small catalogues (below settings.vector_store.exact_below a [Q, D] x [D, N] product
beats walking an HNSW graph per query).

Below _CACHE_BYTES of vectors (32k items at 64-d) the batched search runs as one small ONNX
Runtime graph per surface (Gemm -> ScatterND of the excluded pairs -> TopK): ORT's TopK selects
on every core, where numpy's argpartition takes one, and the filters are applied as score masks
inside the same call. Larger catalogues go through numpy in column blocks.

`ExactIndex` is an immutable snapshot of a catalogue (ids, normalised vectors, one boolean
mask per surface) that answers the same filtered batch queries as the Qdrant backends. Updates
return a new snapshot, so a reader never sees a half-applied upsert and needs no lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from vector_store.schema import (
    ItemId,
    ItemRecord,
    PointId,
    normalise,
    payload_item_id,
    point_id,
)

# Score rows computed at once are bounded to this many floats (16 MiB), so a large batch
# against a large catalogue does not allocate a [Q, N] matrix in one go.
_BLOCK_SCORES = 1 << 22
# Catalogues up to this size (bytes of vectors) are searched in blocks of queries against the
# whole matrix, which stays in cache; larger ones in blocks of items, each read once per call.
_CACHE_BYTES = 8 << 20


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` without numpy's "invalid value" warning. Some OpenBLAS kernels leave the
    floating-point invalid flag set on finite inputs (numpy#24067; seen on one CI machine's CPU
    for a single query against 142 rows), which numpy reports as a RuntimeWarning on every such
    call. A non-finite input still shows as NaN in the product, warned or not."""
    with np.errstate(invalid="ignore"):
        return a @ b


def topk(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unfiltered exact top-k by dot product: (indices [Q, k], scores [Q, k]), best first.

    Both inputs are float32 rows; normalise them first for cosine. The catalogue is walked in
    column blocks (all queries against each block, then a merge of the per-block winners), so
    every item vector is read once per call however many queries there are.
    """
    n = vectors.shape[0]
    k = min(k, n)
    cols = max(k, _BLOCK_SCORES // max(queries.shape[0], 1))
    if cols >= n:
        return _select(product(queries, vectors.T), k)
    idx, val = [], []
    for start in range(0, n, cols):
        scores = product(queries, vectors[start : start + cols].T)  # [Q, cols]
        i, v = _select(scores, min(k, scores.shape[1]))
        idx.append(i + start)
        val.append(v)
    return _merge(idx, val, k)


def _merge(
    idx: list[np.ndarray], val: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of per-block winners (global column indices ``idx``, scores ``val``)."""
    if len(idx) == 1:
        return idx[0], val[0]
    cand_idx, cand_val = np.concatenate(idx, axis=1), np.concatenate(val, axis=1)
    best, best_val = _select(cand_val, k)
    return np.take_along_axis(cand_idx, best, axis=1), best_val


def _select(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k columns of each row of ``scores``, sorted by descending score."""
    n = scores.shape[1]
    if k < n:
        # Partition at n-k (largest last) rather than negating: -scores would copy [Q, N].
        part = np.argpartition(scores, n - k, axis=1)[:, n - k :]
    else:
        part = np.broadcast_to(np.arange(n), scores.shape)
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


@dataclass(frozen=True)
class ExactIndex:
    """A catalogue snapshot searched exactly with the store's filter semantics."""

    item_ids: tuple[ItemId, ...]
    rows: dict[PointId, int]  # point id -> row of `vectors`
    vectors: np.ndarray  # [N, D] float32, L2-normalised
    surface_masks: dict[str, np.ndarray]  # surface -> bool [N]: item eligible there
    # str(item id) -> row: the same point as `rows` (point ids depend only on the id's text),
    # without a uuid5 per lookup on the worker's hot path
    text_rows: dict[str, int] = field(default_factory=dict)
    # per-surface eligible rows / vectors, filled on first use (the snapshot never changes)
    _eligible: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(cls, records: Sequence[ItemRecord], vectors: np.ndarray) -> ExactIndex:
        """A snapshot of ``records`` (one row of ``vectors`` each). Later duplicates win."""
        empty = cls((), {}, np.zeros((0, vectors.shape[1]), np.float32), {})
        return empty.with_upserts(records, vectors)

    def __len__(self) -> int:
        return len(self.item_ids)

    @cached_property
    def id_array(self) -> np.ndarray:
        """`item_ids` as an object array: row -> item id, for fancy indexing."""
        out = np.empty(len(self.item_ids), dtype=object)
        out[:] = self.item_ids
        return out

    @cached_property
    def text_array(self) -> np.ndarray:
        """`id_array` as text: row -> the item id as the candidates topic carries it."""
        out = np.empty(len(self.item_ids), dtype=object)
        out[:] = [str(i) for i in self.item_ids]
        return out

    def with_upserts(self, records: Sequence[ItemRecord], vectors: np.ndarray) -> ExactIndex:
        """A new snapshot with ``records`` inserted or replaced (same semantics as an upsert)."""
        ids = list(self.item_ids)
        rows = dict(self.rows)
        text_rows = dict(self.text_rows)
        new_vecs = normalise(vectors)
        target = np.empty(len(records), dtype=np.int64)
        for j, rec in enumerate(records):
            pid = point_id(rec.item_id)
            row = rows.get(pid)
            stored_id = payload_item_id(rec.item_id)  # what the engines would return
            if row is None:
                row = rows[pid] = len(ids)
                ids.append(stored_id)
            else:
                ids[row] = stored_id
            text_rows[str(rec.item_id)] = row
            target[j] = row
        mat = np.zeros((len(ids), self.vectors.shape[1]), dtype=np.float32)
        mat[: len(self.item_ids)] = self.vectors
        mat[target] = new_vecs  # numpy assigns in order, so the last duplicate wins
        surfaces = set(self.surface_masks) | {s for r in records for s in r.surfaces}
        masks: dict[str, np.ndarray] = {}
        for s in surfaces:
            mask = np.zeros(len(ids), dtype=bool)
            old = self.surface_masks.get(s)
            if old is not None:
                mask[: len(old)] = old
            mask[target] = [s in r.surfaces for r in records]
            masks[s] = mask
        return ExactIndex(tuple(ids), rows, mat, masks, text_rows)

    def _columns(self, surface: str | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(rows eligible on ``surface``, row -> column among them or -1); (None, None) when
        every item is eligible. An unknown surface has no eligible item."""
        if surface is None:
            return None, None
        cached = self._eligible.get(surface)
        if cached is None:
            mask = self.surface_masks.get(surface)
            if mask is None:
                mask = np.zeros(len(self.item_ids), dtype=bool)
            if mask.all():
                cached = (None, None)
            else:
                rows = np.flatnonzero(mask)
                column = np.full(len(mask), -1, dtype=np.int64)
                column[rows] = np.arange(len(rows))
                cached = (rows, column)
            self._eligible[surface] = cached
        return cached

    def _eligible_vectors(self, surface: str) -> np.ndarray:
        """The vectors of the items eligible on ``surface`` (rows of `_columns`), cached."""
        key = f"vectors:{surface}"
        if key not in self._eligible:
            rows, _ = self._columns(surface)
            self._eligible[key] = (self.vectors if rows is None else np.ascontiguousarray(self.vectors[rows]), None)
        return self._eligible[key][0]  # type: ignore[return-value]

    def rows_of(self, item_ids: Iterable[ItemId]) -> np.ndarray:
        """Rows of the given items that are in the snapshot (unknown ids are skipped)."""
        get = self.text_rows.get
        found = [r for r in map(get, map(str, item_ids)) if r is not None]
        return np.array(found, dtype=np.int64)

    def search(
        self,
        queries: np.ndarray,
        limit: int,
        surfaces: Sequence[str | None],
        exclude: Sequence[Sequence[ItemId]],
        threads: int = 0,
    ) -> list[list[tuple[ItemId, float]]]:
        """Per query: up to ``limit`` (item id, cosine) best first, among the items eligible
        on that query's surface (None = any) and not in its exclusion list."""
        rows, scores = self.search_rows(queries, np.full(len(queries), limit), surfaces, exclude, threads=threads)
        ids = self.item_ids
        out: list[list[tuple[ItemId, float]]] = []
        for i_row, v_row in zip(rows.tolist(), scores.tolist(), strict=True):
            out.append([(ids[i], v) for i, v in zip(i_row, v_row, strict=True) if i >= 0])
        return out

    def search_rows(
        self,
        queries: np.ndarray,
        limits: np.ndarray,
        surfaces: Sequence[str | None],
        exclude: Sequence[Sequence[ItemId]],
        exclude_of: np.ndarray | None = None,
        threads: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The array form of `search`: (rows [Q, L] int64, scores [Q, L] float32), best first.

        Query ``i`` gets up to ``limits[i]`` hits; L is the largest limit (at most the catalogue
        size) and a row ends in -1 / -inf where its query has fewer hits. Query ``i`` excludes
        ``exclude[exclude_of[i]]`` (``exclude[i]`` when ``exclude_of`` is None), so the
        queries of one user share one list that is mapped to rows once. Filters are score
        masks on one matrix product per block of queries.
        """
        nq, n = len(queries), len(self.item_ids)
        lim = np.minimum(np.asarray(limits, dtype=np.int64).reshape(nq), n)
        k = int(lim.max()) if nq and n else 0
        out_rows = np.full((nq, k), -1, dtype=np.int64)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        if k <= 0:
            return out_rows, out_scores
        q = normalise(queries)
        owner = np.arange(nq) if exclude_of is None else np.asarray(exclude_of, dtype=np.int64)
        # (query, row) pairs to ban: each exclusion list mapped to rows once, then repeated
        # for every query that uses it.
        banned = [self.rows_of(e) for e in exclude]
        counts = np.array([len(b) for b in banned], dtype=np.int64)
        flat = np.concatenate(banned) if banned else np.zeros(0, np.int64)
        starts = np.cumsum(counts) - counts
        per_q = counts[owner]
        ban_q = np.repeat(np.arange(nq), per_q)
        ban_r = flat[np.repeat(starts[owner] - (np.cumsum(per_q) - per_q), per_q) + np.arange(per_q.sum())]
        ban_at = np.searchsorted(ban_q, np.arange(nq + 1))  # ban_q is sorted: per-query slices
        # Surface eligibility: the queries of each surface whose mask leaves items out.
        restricted: list[tuple[np.ndarray, np.ndarray]] = []
        for surface in {s for s in surfaces if s is not None}:
            mask = self.surface_masks.get(surface)
            off = np.flatnonzero(~mask) if mask is not None else np.arange(n)
            if len(off):
                qs = np.array([j for j, s in enumerate(surfaces) if s == surface], dtype=np.int64)
                restricted.append((qs, off))
        def masked(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
            """Scores of queries r0:r1 against rows c0:c1, filtered items at -inf."""
            scores = product(q[r0:r1], self.vectors[c0:c1].T)
            for qs, off in restricted:
                rs = qs[(qs >= r0) & (qs < r1)] - r0
                cs = off[(off >= c0) & (off < c1)] - c0
                if len(rs) and len(cs):
                    scores[np.ix_(rs, cs)] = -np.inf
            lo, hi = ban_at[r0], ban_at[r1]
            bq, br = ban_q[lo:hi] - r0, ban_r[lo:hi]
            inside = (br >= c0) & (br < c1)
            scores[bq[inside], br[inside] - c0] = -np.inf
            return scores

        if n * self.vectors.shape[1] * 4 <= _CACHE_BYTES:
            # A catalogue that stays in cache: per surface, its queries against its eligible items.
            session = _search_session(threads)
            by_surface: dict[str | None, list[int]] = {}
            for j, surface in enumerate(surfaces):
                by_surface.setdefault(surface, []).append(j)
            step = max(1, _BLOCK_SCORES // n)
            for surface, members in by_surface.items():
                eligible, column = self._columns(surface)
                m = n if eligible is None else len(eligible)
                if m == 0:
                    continue
                qs = np.array(members, dtype=np.int64)
                items = self.vectors if eligible is None else self._eligible_vectors(surface)
                # This surface's bans as (query position in qs, column of items).
                mine = np.isin(ban_q, qs)
                bq, bc = np.searchsorted(qs, ban_q[mine]), ban_r[mine]
                if column is not None:
                    bc = column[bc]
                    bq, bc = bq[bc >= 0], bc[bc >= 0]
                for r0 in range(0, len(qs), step):
                    r1 = min(len(qs), r0 + step)
                    lo, hi = np.searchsorted(bq, [r0, r1])
                    kb = int(min(lim[qs[r0:r1]].max(), m))
                    if kb <= 0:
                        continue
                    v, i = session.run(None, {
                        "queries": q[qs[r0:r1]],
                        "items": items,
                        "k": np.array([kb], dtype=np.int64),
                        "ban": np.stack([bq[lo:hi] - r0, bc[lo:hi]], axis=1),
                        "ban_value": np.full(hi - lo, -np.inf, dtype=np.float32),
                    })
                    out_rows[qs[r0:r1], :kb] = i if eligible is None else eligible[i]
                    out_scores[qs[r0:r1], :kb] = v
        else:
            # Column blocks, as in topk: every item vector is read once per call.
            cols = max(k, _BLOCK_SCORES // max(nq, 1))
            idx_parts, val_parts = [], []
            for c0 in range(0, n, cols):
                c1 = min(n, c0 + cols)
                i, v = _select(masked(0, nq, c0, c1), min(k, c1 - c0))
                idx_parts.append(i + c0)
                val_parts.append(v)
            out_rows[:], out_scores[:] = _merge(idx_parts, val_parts, k)
        # Past a query's own limit, and filtered-out items, are not hits.
        cut = (np.arange(k)[None, :] >= lim[:, None]) | (out_scores == -np.inf)
        out_rows[cut] = -1
        out_scores[cut] = -np.inf
        return out_rows, out_scores


@lru_cache(maxsize=2)
def _search_session(threads: int = 0) -> Any:
    """The exact search as an ONNX Runtime graph (built once per process; ``threads``: its
    intra-op threads, 0 = one per core):

        scores = queries [Q, D] @ items [N, D]^T
        scores[ban[p, 0], ban[p, 1]] = ban_value[p]   (-inf: excluded items)
        values, indices = TopK(scores, k), largest first (ties: lower index first)
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["queries", "items"], ["scores"], transB=1),
            helper.make_node("ScatterND", ["scores", "ban", "ban_value"], ["masked"]),
            helper.make_node("TopK", ["masked", "k"], ["values", "indices"], axis=1, largest=1, sorted=1),
        ],
        "exact_search",
        [
            helper.make_tensor_value_info("queries", f, ["Q", "D"]),
            helper.make_tensor_value_info("items", f, ["N", "D"]),
            helper.make_tensor_value_info("k", i64, [1]),
            helper.make_tensor_value_info("ban", i64, ["P", 2]),
            helper.make_tensor_value_info("ban_value", f, ["P"]),
        ],
        [
            helper.make_tensor_value_info("values", f, ["Q", "K"]),
            helper.make_tensor_value_info("indices", i64, ["Q", "K"]),
        ],
    )
    # IR 10 / opset 18: what the pinned onnxruntime reads (the onnx package writes newer IRs).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # No busy-waiting between runs: the caller's own work (and the model's session) needs the cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
