"""Scale-out backend: a Qdrant server (or cluster) through qdrant-client.

Same collection schema and filter semantics as the embedded Edge backend. Qdrant indexes in
the background, so there is no optimize step; small catalogues are searched exactly by the
server itself (the collection's full-scan threshold is set from settings.exact_below). No
numpy snapshot here: other processes may write to the server, so only the server is current.

settings.url = ":memory:" gives qdrant-client's local mode (pure-Python brute force, same API):
for tests of this module's code, not for serving.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from recsys.settings import VectorStoreSettings
from vector_store.base import SCROLL_PAGE, Hit, VectorStore, shared_filters
from vector_store.errors import DimensionMismatchError, VectorStoreError
from vector_store.schema import (
    ITEM_ID,
    POPULARITY,
    SURFACES,
    ItemId,
    ItemRecord,
    PointId,
    dedupe_ids,
    from_payload,
    point_payload,
    full_scan_threshold_kb,
    point_id,
    to_payload,
)


_CATALOGUE_KEY = "recsys_catalogue_model_version"  # collection metadata set after a whole bulk load
_LOADING_KEY = "recsys_catalogue_loading"  # the model whose load began after it
_LOAD_KEY = "recsys_catalogue_load"  # an id of the whole load: the items followers' group carries it


class ServerStore(VectorStore):
    """A VectorStore on one collection of a Qdrant server."""

    def __init__(self, settings: VectorStoreSettings, client: QdrantClient | None = None) -> None:
        super().__init__(settings)
        self.collection = settings.collection
        self.client = client if client is not None else _connect(settings)
        self._dim: int | None = None
        if self.client.collection_exists(self.collection):
            self._dim = self._collection_dim()
            self._ensure_payload_indexes()  # a crash right after create_collection skipped them

    # -- collection ------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self._dim

    def ensure_collection(self, dim: int) -> None:
        if self._dim is None and self.client.collection_exists(self.collection):
            self._dim = self._collection_dim()  # created by another process meanwhile
            self._ensure_payload_indexes()
        if self._dim is not None:
            if self._dim != dim:
                raise DimensionMismatchError(
                    f"collection {self.collection!r} holds {self._dim}-d vectors, "
                    f"asked for {dim}-d"
                )
            return
        s = self.settings
        try:
            self.client.create_collection(
                self.collection,
                vectors_config=qm.VectorParams(size=dim, distance=qm.Distance.COSINE),
                hnsw_config=qm.HnswConfigDiff(
                    m=s.hnsw_m,
                    ef_construct=s.hnsw_ef_construct,
                    full_scan_threshold=full_scan_threshold_kb(s.exact_below, dim),
                ),
            )
        except Exception:
            # Two processes starting at once (the indexer and a worker's follower): the loser is
            # told the collection exists (409, ALREADY_EXISTS, or local mode's ValueError).
            if not self.client.collection_exists(self.collection):
                raise
            self.ensure_collection(dim)  # the winner's collection, its dimension checked
            return
        self._dim = dim
        self._ensure_payload_indexes()

    def catalogue_version(self) -> str | None:
        return self._marker(_CATALOGUE_KEY)

    def catalogue_loading(self) -> str | None:
        return self._marker(_LOADING_KEY)

    def catalogue_load(self) -> str | None:
        return self._marker(_LOAD_KEY)

    def _marker(self, key: str) -> str | None:
        if self._dim is None:
            return None
        # Collection metadata (Qdrant 1.16+): a server that drops it leaves the marker unset,
        # which costs a repeated bulk load, never a skipped one.
        metadata = self.client.get_collection(self.collection).config.metadata or {}
        value = metadata.get(key)
        return None if value is None else str(value)

    def mark_catalogue(self, version: str | None, *, loading: str | None = None) -> None:
        self._require_dim()
        load = None if version is None else self.new_load_id()
        self.client.update_collection(self.collection,
                                      metadata={_CATALOGUE_KEY: version, _LOADING_KEY: loading, _LOAD_KEY: load})

    def count(self) -> int:
        self._require_dim()
        return int(self.client.count(self.collection, exact=True).count)

    # -- writes ----------------------------------------------------------------------------
    def _upsert(self, records: Sequence[ItemRecord], vectors: np.ndarray) -> None:
        points = [
            qm.PointStruct(id=_wire(point_id(r.item_id)), vector=v, payload=to_payload(r))
            for r, v in zip(records, vectors.tolist(), strict=True)
        ]
        self.client.upsert(self.collection, points=points, wait=True)

    def _update_vectors(self, item_ids: Sequence[ItemId], vectors: np.ndarray) -> None:
        points = [qm.PointVectors(id=_wire(point_id(i)), vector=v) for i, v in zip(item_ids, vectors.tolist(), strict=True)]
        self.client.update_vectors(self.collection, points=points, wait=True)

    def _update_payloads(self, payloads: Sequence[tuple[ItemId, dict[str, Any]]]) -> None:
        operations = [
            qm.SetPayloadOperation(set_payload=qm.SetPayload(payload=payload, points=[_wire(point_id(item_id))]))
            for item_id, payload in payloads
        ]
        self.client.batch_update_points(self.collection, update_operations=operations, wait=True)

    def _set_popularity(self, by_value: dict[float, list[ItemId]]) -> None:
        operations = [
            qm.SetPayloadOperation(set_payload=qm.SetPayload(payload={POPULARITY: value},
                                                             points=[_wire(point_id(i)) for i in ids]))
            for value, ids in by_value.items()
        ]
        if operations:
            self.client.batch_update_points(self.collection, update_operations=operations, wait=True)

    def delete(self, item_ids: Sequence[ItemId]) -> None:
        self._require_dim()
        if item_ids:
            self.client.delete(self.collection, points_selector=qm.PointIdsList(points=[_wire(point_id(i)) for i in item_ids]),
                               wait=True)

    # -- reads -----------------------------------------------------------------------------
    def _query_batch(
        self,
        queries: np.ndarray,
        limit: int,
        surfaces: list[str | None],
        exclude: list[Sequence[ItemId]],
    ) -> list[list[Hit]]:
        params = qm.SearchParams(hnsw_ef=max(self.settings.search_ef, limit))
        requests = [
            qm.QueryRequest(query=q, limit=limit, filter=f, params=params, with_payload=[ITEM_ID])
            for q, f in zip(queries.tolist(), shared_filters(surfaces, exclude, _filter), strict=True)
        ]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [
            [(point_payload(p)[ITEM_ID], float(p.score)) for p in resp.points] for resp in responses
        ]

    def retrieve(self, item_ids: Sequence[ItemId]) -> dict[ItemId, np.ndarray]:
        out: dict[ItemId, np.ndarray] = {}
        for item_id, rec in self._fetch(item_ids, with_vectors=True).items():
            vector = rec.vector
            if isinstance(vector, dict):  # named-vector form; ours is the unnamed default
                vector = vector.get("", next(iter(vector.values())))
            out[item_id] = np.asarray(vector, dtype=np.float32)
        return out

    def records(self, item_ids: Sequence[ItemId]) -> dict[ItemId, ItemRecord]:
        return {
            item_id: from_payload(point_payload(rec))
            for item_id, rec in self._fetch(item_ids, with_vectors=False).items()
        }

    def item_ids(self) -> list[ItemId]:
        self._require_dim()
        ids: list[ItemId] = []
        offset: Any = None
        while True:
            page, offset = self.client.scroll(self.collection, limit=SCROLL_PAGE, offset=offset,
                                              with_payload=[ITEM_ID], with_vectors=False)
            ids.extend(point_payload(rec)[ITEM_ID] for rec in page)
            if offset is None:
                return ids

    def top_popular(self, surface: str | None, limit: int) -> list[Hit]:
        self._require_dim()
        if limit <= 0:
            return []
        resp = self.client.query_points(
            self.collection,
            query=qm.OrderByQuery(
                order_by=qm.OrderBy(key=POPULARITY, direction=qm.Direction.DESC)
            ),
            query_filter=_filter(surface, ()),
            limit=limit,
            with_payload=[ITEM_ID, POPULARITY],
        )
        return [(point_payload(p)[ITEM_ID], float(point_payload(p)[POPULARITY])) for p in resp.points]

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self.client.close()

    # -- helpers ---------------------------------------------------------------------------
    def _ensure_payload_indexes(self) -> None:
        """Keyword index on `surfaces` (filters), float index on `popularity` (order_by needs it)."""
        existing = self.client.get_collection(self.collection).payload_schema or {}
        for name, kind in ((SURFACES, qm.PayloadSchemaType.KEYWORD), (POPULARITY, qm.PayloadSchemaType.FLOAT)):
            if name not in existing:
                self.client.create_payload_index(self.collection, name, kind, wait=True)

    def _collection_dim(self) -> int:
        vectors = self.client.get_collection(self.collection).config.params.vectors
        if isinstance(vectors, qm.VectorParams):
            return int(vectors.size)
        raise VectorStoreError(
            f"collection {self.collection!r} uses named vectors {vectors!r}; "
            "this store expects one unnamed dense vector"
        )

    def _fetch(self, item_ids: Sequence[ItemId], *, with_vectors: bool) -> dict[ItemId, Any]:
        self._require_dim()
        if not item_ids:
            return {}
        by_point = {_wire(point_id(i)): i for i in item_ids}
        recs = self.client.retrieve(
            self.collection, ids=list(by_point), with_payload=True, with_vectors=with_vectors
        )
        # The client returns uuid ids as strings (lower-case, hyphenated), ints as ints.
        return {by_point[r.id]: r for r in recs if r.id in by_point}


def _connect(settings: VectorStoreSettings) -> QdrantClient:
    if not settings.url:
        raise VectorStoreError(
            "backend=server needs settings.vector_store.url "
            "(e.g. RECSYS_VECTOR_STORE__URL=http://localhost:6333, or :memory: for local mode)"
        )
    if settings.url == ":memory:":
        return QdrantClient(location=":memory:")
    return QdrantClient(
        url=settings.url,
        api_key=settings.api_key,
        prefer_grpc=settings.prefer_grpc,
        timeout=settings.timeout_s,
    )


def _wire(pid: PointId) -> int | str:
    """qdrant-client takes uuid point ids as strings."""
    return str(pid) if isinstance(pid, uuid.UUID) else pid


def _filter(surface: str | None, exclude: Sequence[ItemId]) -> qm.Filter | None:
    must: list[qm.Condition] | None = None
    must_not: list[qm.Condition] | None = None
    if surface is not None:
        must = [qm.FieldCondition(key=SURFACES, match=qm.MatchValue(value=surface))]
    if exclude:
        must_not = [qm.HasIdCondition(has_id=[_wire(p) for p in dedupe_ids(exclude)])]
    if must is None and must_not is None:
        return None
    return qm.Filter(must=must, must_not=must_not)


