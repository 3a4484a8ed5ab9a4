"""Exact top-k by one BLAS matrix product: the reference for every ANN result, and the fast
path for small catalogues (below settings.vector_store.exact_below a [Q, D] x [D, N] product
beats walking an HNSW graph per query).

`ExactIndex` is an immutable snapshot of a catalogue (ids, normalised vectors, one boolean
mask per surface) that answers the same filtered batch queries as the Qdrant backends. Updates
return a new snapshot, so a reader never sees a half-applied upsert and needs no lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
        return _select(queries @ vectors.T, k)
    idx, val = [], []
    for start in range(0, n, cols):
        scores = queries @ vectors[start : start + cols].T  # [Q, cols]
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

    @classmethod
    def build(cls, records: Sequence[ItemRecord], vectors: np.ndarray) -> ExactIndex:
        """A snapshot of ``records`` (one row of ``vectors`` each). Later duplicates win."""
        empty = cls((), {}, np.zeros((0, vectors.shape[1]), np.float32), {})
        return empty.with_upserts(records, vectors)

    def __len__(self) -> int:
        return len(self.item_ids)

    def with_upserts(self, records: Sequence[ItemRecord], vectors: np.ndarray) -> ExactIndex:
        """A new snapshot with ``records`` inserted or replaced (same semantics as an upsert)."""
        ids = list(self.item_ids)
        rows = dict(self.rows)
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
        return ExactIndex(tuple(ids), rows, mat, masks)

    def search(
        self,
        queries: np.ndarray,
        limit: int,
        surfaces: Sequence[str | None],
        exclude: Sequence[Sequence[ItemId]],
    ) -> list[list[tuple[ItemId, float]]]:
        """Per query: up to ``limit`` (item id, cosine) best first, among the items eligible
        on that query's surface (None = any) and not in its exclusion list."""
        n = len(self.item_ids)
        if n == 0 or limit <= 0:
            return [[] for _ in range(len(queries))]
        q = normalise(queries)
        k = min(limit, n)
        # Filters, once per call: the queries of each surface, and the (query, column) pairs
        # of excluded items.
        by_surface = {
            s: np.array([j for j, x in enumerate(surfaces) if x == s], dtype=np.int64)
            for s in set(surfaces)
            if s is not None
        }
        pairs = [
            (j, self.rows[p]) for j, excl in enumerate(exclude)
            for p in map(point_id, excl) if p in self.rows
        ]
        ban = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        # Column blocks, as in topk: every item vector is read once per call.
        cols = max(k, _BLOCK_SCORES // max(len(q), 1))
        idx_parts, val_parts = [], []
        for start in range(0, n, cols):
            end = min(n, start + cols)
            scores = q @ self.vectors[start:end].T  # [Q, end - start]
            for surface, qs in by_surface.items():
                mask = self.surface_masks.get(surface)
                off = slice(None) if mask is None else np.flatnonzero(~mask[start:end])
                scores[np.ix_(qs, np.arange(end - start)[off])] = -np.inf
            here = (ban[:, 1] >= start) & (ban[:, 1] < end)
            scores[ban[here, 0], ban[here, 1] - start] = -np.inf
            i, v = _select(scores, min(k, end - start))
            idx_parts.append(i + start)
            val_parts.append(v)
        idx, val = _merge(idx_parts, val_parts, k)
        out: list[list[tuple[ItemId, float]]] = []
        for i_row, v_row in zip(idx.tolist(), val.tolist(), strict=True):
            hits = zip(i_row, v_row, strict=True)
            out.append([(self.item_ids[i], v) for i, v in hits if v != -np.inf])
        return out
