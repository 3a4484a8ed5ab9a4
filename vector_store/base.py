"""The one interface every vector-store backend implements (Qdrant Edge, Qdrant server).

Callers (the indexer, the inference worker, the serving fallback) see only this class. It
validates and normalises inputs once, here, so backends receive float32 unit vectors of the
collection's width and per-query filter lists of the right length.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from recsys.settings import VectorStoreSettings
from vector_store.errors import CollectionMissingError, DimensionMismatchError
from vector_store.schema import POPULARITY, ItemId, ItemRecord, check_matrix, normalise, per_query, point_id, to_payload

F = TypeVar("F")  # a backend's filter type
SCROLL_PAGE = 4096  # points per scroll page when a whole collection is read (the exact snapshot, item_ids)

Hit = tuple[ItemId, float]  # (item id, cosine similarity | popularity)


@dataclass(frozen=True)
class BatchHits:
    """`VectorStore.query_arrays`' answer: row ``i`` holds query ``i``'s hits, best first."""

    codes: np.ndarray  # [Q, L] int64: index into `ids`; -1 past the query's last hit
    scores: np.ndarray  # [Q, L] float32 cosine; -inf where codes is -1
    ids: np.ndarray  # [C] object: the item id of each code (one code per distinct item)
    texts: np.ndarray | None = None  # [C] object: str of each id, where the store keeps them

    def id_texts(self) -> np.ndarray:
        """`ids` as text, the wire's item ids (the store's cached array when it has one: no
        str() per hit on the worker's hot path)."""
        if self.texts is not None:
            return self.texts
        out = np.empty(len(self.ids), dtype=object)
        out[:] = [str(i) for i in self.ids.tolist()]
        return out

    def lists(self) -> list[list[Hit]]:
        """The same hits as `query_batch` returns them."""
        ids = self.ids
        return [
            [(ids[c], s) for c, s in zip(c_row, s_row, strict=True) if c >= 0]
            for c_row, s_row in zip(self.codes.tolist(), self.scores.tolist(), strict=True)
        ]


class VectorStore(ABC):
    """Item embeddings with their payload; batch ANN queries with per-query filters."""

    def __init__(self, settings: VectorStoreSettings) -> None:
        self.settings = settings

    # -- collection ------------------------------------------------------------------------
    @property
    @abstractmethod
    def dim(self) -> int | None:
        """The collection's vector width, or None while it does not exist."""

    @abstractmethod
    def ensure_collection(self, dim: int) -> None:
        """Create the collection for ``dim``-wide vectors unless it exists; an existing one
        must have that width (DimensionMismatchError otherwise)."""

    @abstractmethod
    def catalogue_version(self) -> str | None:
        """The model version whose item table was bulk-loaded here in full (`mark_catalogue`),
        or None: never, or a load that did not finish."""

    @abstractmethod
    def mark_catalogue(self, version: str | None, *, loading: str | None = None) -> None:
        """Record that the item table of model ``version`` is wholly loaded (and durable);
        None clears the record: a load is starting, of model ``loading`` (kept until the next
        mark, so that a load cut short is known for the model whose vectors it left)."""

    @abstractmethod
    def catalogue_loading(self) -> str | None:
        """The model whose load began after the last whole one (`mark_catalogue(None,
        loading=...)`), or None."""

    @abstractmethod
    def catalogue_load(self) -> str | None:
        """An id of the last whole load, new at every `mark_catalogue(version)` (None: no load,
        or one recorded before loads had ids). The `items` followers' consumer group carries
        it: a load writes the exported rows over items a follower had re-embedded from newer
        features, so the followers after it read `items` from its start again."""

    @staticmethod
    def new_load_id() -> str:
        return uuid.uuid4().hex[:12]

    def items_group(self, base: str) -> str:
        """The consumer group in which a follower of `items` commits for this store. A shared
        store (a Qdrant server) has one group, ``base``: its followers split the partitions."""
        return base

    @abstractmethod
    def count(self) -> int:
        """Number of items stored."""

    # -- writes ----------------------------------------------------------------------------
    def upsert(self, records: Sequence[ItemRecord], vectors: np.ndarray) -> None:
        """Insert or replace items: ``records[i]`` with the embedding ``vectors[i]`` ([N, D]).
        Vectors are L2-normalised here; writes go in batches of settings.upsert_batch."""
        self._write_batches("upsert", "records", records, vectors, self._upsert)

    @abstractmethod
    def _upsert(self, records: Sequence[ItemRecord], vectors: np.ndarray) -> None:
        """Write one batch; ``vectors`` are float32 unit rows."""

    def update_vectors(self, item_ids: Sequence[ItemId], vectors: np.ndarray) -> None:
        """Replace the vectors of stored items and leave their payloads as they are: a payload a
        follower writes meanwhile (an item withdrawn) is not overwritten by one read before it."""
        self._write_batches("update_vectors", "ids", item_ids, vectors, self._update_vectors)

    def _write_batches(self, what: str, rows: str, keys: Sequence[Any], vectors: np.ndarray,
                       write: Callable[[Sequence[Any], np.ndarray], None]) -> None:
        """Check ``vectors`` against ``keys`` and the collection, L2-normalise them, and hand
        them to ``write`` in batches of settings.upsert_batch."""
        dim = self._require_dim()
        if len(keys) != len(vectors):
            raise ValueError(f"{what}: {len(keys)} {rows} but {len(vectors)} vectors")
        if len(keys) == 0:
            return
        x = normalise(self._check(vectors, dim, f"{what} vectors"))
        step = max(1, self.settings.upsert_batch)
        for start in range(0, len(keys), step):
            write(keys[start : start + step], x[start : start + step])

    @abstractmethod
    def _update_vectors(self, item_ids: Sequence[ItemId], vectors: np.ndarray) -> None:
        """Write one batch of vectors (float32 unit rows) of stored items."""

    def update_payloads(self, records: Sequence[ItemRecord], *, popularity: bool = True) -> None:
        """Write the payloads of stored items and leave their vectors as they are: a vector a
        bulk load writes meanwhile (a new model's) is not overwritten by one read before it.
        Without ``popularity`` the stored popularity stays too (the records' is not written),
        whatever a load set meanwhile. Items not stored are skipped."""
        self._require_dim()
        latest = {point_id(r.item_id): r for r in records}  # later records for an item win, as in upsert
        stored = self.records([r.item_id for r in latest.values()])
        step = max(1, self.settings.upsert_batch)
        payloads = [(r.item_id, to_payload(r)) for r in latest.values() if r.item_id in stored]
        if not popularity:
            for _, payload in payloads:
                del payload[POPULARITY]
        for start in range(0, len(payloads), step):
            self._update_payloads(payloads[start : start + step])

    @abstractmethod
    def _update_payloads(self, payloads: Sequence[tuple[ItemId, dict[str, Any]]]) -> None:
        """Merge each payload into its stored item's (the keys it has replace those stored)."""

    def set_popularity(self, item_ids: Sequence[ItemId], popularity: np.ndarray) -> None:
        """Replace the popularity of stored items and nothing else of their payload (a
        withdrawal a follower writes meanwhile stays)."""
        if len(item_ids) != len(popularity):
            raise ValueError(f"set_popularity: {len(item_ids)} ids but {len(popularity)} values")
        # Popularities are counts, shared by many items: one write per distinct value.
        by_value: dict[float, list[ItemId]] = {}
        for item_id, value in zip(item_ids, np.asarray(popularity, dtype=np.float64).tolist(), strict=True):
            by_value.setdefault(value, []).append(item_id)
        self._set_popularity(by_value)

    @abstractmethod
    def _set_popularity(self, by_value: dict[float, list[ItemId]]) -> None:
        """Write each popularity onto its stored items."""

    @abstractmethod
    def delete(self, item_ids: Sequence[ItemId]) -> None:
        """Remove the items (those not stored are ignored)."""

    def flush(self) -> None:
        """Make every acknowledged write durable (a no-op where upserts already wait for it)."""

    def optimize(self) -> None:
        """Bring the ANN index up to date after bulk writes (a no-op where the engine does it
        in the background)."""

    # -- reads -----------------------------------------------------------------------------
    def query_batch(
        self,
        vectors: np.ndarray,
        limit: int,
        surfaces: Sequence[str | None] | None = None,
        exclude: Sequence[Sequence[ItemId]] | None = None,
    ) -> list[list[Hit]]:
        """Nearest items of each query row of ``vectors`` ([Q, D] float32), best first.

        Per query ``i``: only items eligible on ``surfaces[i]`` (None = any surface), never an
        item of ``exclude[i]`` (e.g. the user's recent items); up to ``limit`` hits of
        (item id, cosine similarity). Queries are normalised here.
        """
        dim = self._require_dim()
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        q = self._check(vectors, dim, "query vectors")
        n = q.shape[0]
        surf = per_query(surfaces, n, "surfaces", None)
        excl = per_query(exclude, n, "exclude", ())
        if n == 0:
            return []
        if limit == 0:
            return [[] for _ in range(n)]
        return self._query_batch(normalise(q), limit, surf, excl)

    def query_arrays(
        self,
        vectors: np.ndarray,
        limits: np.ndarray | Sequence[int],
        surfaces: Sequence[str | None] | None = None,
        exclude: Sequence[Sequence[ItemId]] | None = None,
        exclude_of: np.ndarray | None = None,
    ) -> BatchHits:
        """`query_batch` for a hot path: a limit per query, results as arrays.

        Query ``i`` gets up to ``limits[i]`` hits, is filtered on ``surfaces[i]`` and excludes
        ``exclude[exclude_of[i]]`` (``exclude[i]`` when ``exclude_of`` is None): many queries
        can share one exclusion list (a user's recent items), which backends map once.
        """
        dim = self._require_dim()
        q = self._check(vectors, dim, "query vectors")
        n = q.shape[0]
        lim = np.asarray(limits, dtype=np.int64).reshape(-1)
        if len(lim) != n:
            raise ValueError(f"limits: expected one entry per query ({n}), got {len(lim)}")
        if n and lim.min() < 0:
            raise ValueError(f"limits must be >= 0, got {int(lim.min())}")
        surf = per_query(surfaces, n, "surfaces", None)
        if exclude_of is None:
            excl = per_query(exclude, n, "exclude", ())
            owner = np.arange(n, dtype=np.int64)
        else:
            excl = list(exclude or [])
            owner = np.asarray(exclude_of, dtype=np.int64).reshape(-1)
            if len(owner) != n or (n and (owner.min() < 0 or owner.max() >= len(excl))):
                raise ValueError(f"exclude_of: expected {n} indices into {len(excl)} exclusion lists")
        if n == 0 or not lim.any():
            empty = np.zeros((n, 0), np.int64)
            return BatchHits(empty, empty.astype(np.float32), np.empty(0, dtype=object))
        return self._query_arrays(normalise(q), lim, surf, excl, owner)

    def _query_arrays(
        self,
        queries: np.ndarray,
        limits: np.ndarray,
        surfaces: list[str | None],
        exclude: list[Sequence[ItemId]],
        exclude_of: np.ndarray,
    ) -> BatchHits:
        """Default: `_query_batch` at the largest limit, each query's list cut to its own."""
        lists = self._query_batch(queries, int(limits.max()), surfaces, [exclude[o] for o in exclude_of])
        return hits_to_arrays([hits[:lim] for hits, lim in zip(lists, limits.tolist(), strict=True)])

    @abstractmethod
    def _query_batch(
        self,
        queries: np.ndarray,
        limit: int,
        surfaces: list[str | None],
        exclude: list[Sequence[ItemId]],
    ) -> list[list[Hit]]:
        """Run validated, normalised queries."""

    @abstractmethod
    def retrieve(self, item_ids: Sequence[ItemId]) -> dict[ItemId, np.ndarray]:
        """Stored (unit) vectors of the items that exist, keyed by the id as asked for."""

    @abstractmethod
    def records(self, item_ids: Sequence[ItemId]) -> dict[ItemId, ItemRecord]:
        """Stored payloads of the items that exist, keyed by the id as asked for."""

    @abstractmethod
    def item_ids(self) -> list[ItemId]:
        """The ids of every stored item (as their payloads hold them), in no particular order."""

    @abstractmethod
    def top_popular(self, surface: str | None, limit: int) -> list[Hit]:
        """The ``limit`` most popular items eligible on ``surface`` (None = any):
        (item id, popularity), most popular first. The serving fallback for unknown users."""

    # -- lifecycle -------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Flush and release the store (idempotent)."""

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------
    def _require_dim(self) -> int:
        dim = self.dim
        if dim is None:
            raise CollectionMissingError(
                f"collection {self.settings.collection!r} does not exist yet: "
                "call ensure_collection(dim) (or run `recsys index`) first"
            )
        return dim

    @staticmethod
    def _check(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
        x = np.asarray(vectors)
        if x.ndim == 2 and x.shape[1] != dim:
            raise DimensionMismatchError(f"{what}: collection has dim {dim}, got {x.shape[1]}")
        return check_matrix(x, dim, what)


def shared_filters(
    surfaces: Sequence[str | None],
    exclude: Sequence[Sequence[ItemId]],
    make: Callable[[str | None, Sequence[ItemId]], F],
) -> list[F]:
    """Each query's filter, made once per (exclusion list, surface) pair and shared by that
    pair's queries: the worker asks ~24 queries per user, all with the same exclusion list
    object (recent and hidden items, up to a few hundred ids)."""
    made: dict[tuple[int, str | None], F] = {}
    out = []
    for surface, excl in zip(surfaces, exclude, strict=True):
        key = (id(excl), surface)  # the lists outlive this call: ids stay unique meanwhile
        if key not in made:
            made[key] = make(surface, excl)
        out.append(made[key])
    return out


def hits_to_arrays(lists: Sequence[Sequence[Hit]]) -> BatchHits:
    """Hit lists as `BatchHits` (codes numbered by first appearance of each item id)."""
    code_of: dict[ItemId, int] = {}
    width = max((len(h) for h in lists), default=0)
    codes = np.full((len(lists), width), -1, dtype=np.int64)
    scores = np.full((len(lists), width), -np.inf, dtype=np.float32)
    for i, hits in enumerate(lists):
        if hits:
            codes[i, : len(hits)] = [code_of.setdefault(item, len(code_of)) for item, _ in hits]
            scores[i, : len(hits)] = [s for _, s in hits]
    ids = np.empty(len(code_of), dtype=object)
    ids[:] = list(code_of)
    return BatchHits(codes, scores, ids)
