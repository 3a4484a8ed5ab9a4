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

    Both inputs are float32 rows; normalise them first for cosine.
    """
    n = vectors.shape[0]
    k = min(k, n)
    idx = np.empty((queries.shape[0], k), dtype=np.int64)
    val = np.empty((queries.shape[0], k), dtype=np.float32)
    rows = max(1, _BLOCK_SCORES // max(n, 1))
    for start in range(0, queries.shape[0], rows):
        scores = queries[start : start + rows] @ vectors.T  # [q, N]
        i, v = _select(scores, k)
        idx[start : start + rows], val[start : start + rows] = i, v
    return idx, val


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
        # Filters as column lists, once per call: ineligible columns per surface, and
        # (query, column) pairs of excluded items.
        ineligible = {
            s: np.flatnonzero(~self.surface_masks[s]) if s in self.surface_masks else slice(None)
            for s in set(surfaces)
            if s is not None
        }
        banned = [
            [self.rows[p] for p in map(point_id, excl) if p in self.rows] for excl in exclude
        ]
        out: list[list[tuple[ItemId, float]]] = []
        step = max(1, _BLOCK_SCORES // n)
        for start in range(0, len(q), step):
            scores = q[start : start + step] @ self.vectors.T  # [q, N]
            for j in range(scores.shape[0]):
                surface = surfaces[start + j]
                if surface is not None:
                    scores[j, ineligible[surface]] = -np.inf
                scores[j, banned[start + j]] = -np.inf
            idx, val = _select(scores, k)
            for i_row, v_row in zip(idx.tolist(), val.tolist(), strict=True):
                hits = zip(i_row, v_row, strict=True)
                out.append([(self.item_ids[i], v) for i, v in hits if v != -np.inf])
        return out
