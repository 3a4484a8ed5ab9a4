"""Embedded backend: a Qdrant Edge shard (the Qdrant engine in-process) on local disk.

The shard lives in settings.vector_store.path. Points are searchable as soon as they are
upserted (plain segments are scanned); `optimize()` builds the HNSW graph for segments above
the indexing threshold and blocks until done, so bulk loads call it once at the end.

Only one process may open a shard directory (its WAL is locked); a second one gets
StoreLockedError. Because this process is the only writer, a small catalogue (fewer than
settings.exact_below items) is also kept as a numpy snapshot and searched with one BLAS
product per batch, which is faster than Qdrant there and cannot go stale.

qdrant-edge-py is beta (pinned to 0.9.0): every call into it is in this module.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from recsys.files import atomic_write
from recsys.settings import VectorStoreSettings
from vector_store.base import SCROLL_PAGE, BatchHits, Hit, VectorStore, hits_to_arrays, shared_filters
from vector_store.errors import (
    CollectionMissingError,
    DimensionMismatchError,
    StoreLockedError,
    VectorStoreError,
)
from vector_store.exact import ExactIndex
from vector_store.schema import (
    ITEM_ID,
    POPULARITY,
    SURFACES,
    ItemId,
    ItemRecord,
    dedupe_ids,
    from_payload,
    point_payload,
    full_scan_threshold_kb,
    point_id,
    to_payload,
)

log = logging.getLogger(__name__)

_CONFIG_FILE = "edge_config.json"  # written by EdgeShard.create; its presence = shard exists
_CATALOGUE_FILE = "recsys_catalogue.json"  # {"model_version": the last whole bulk load, "loading": a load begun since}
_SHARD_ID_FILE = "recsys_shard_id"  # names this shard's own `items` consumer group


class EdgeStore(VectorStore):
    """A VectorStore on one Qdrant Edge shard directory."""

    def __init__(self, settings: VectorStoreSettings) -> None:
        super().__init__(settings)
        self.path = Path(settings.path)
        self._shard: qe.EdgeShard | None = None
        self._dim: int | None = None
        self._exact: ExactIndex | None = None
        self._closed = False
        if (self.path / _CONFIG_FILE).exists():
            self._dim = _stored_dim(self.path)
            self._shard = _open(lambda: qe.EdgeShard.load(str(self.path)), self.path)
            _ensure_payload_indexes(self._shard)  # a crash right after create() skipped them
            self._refresh_exact()

    # -- collection ------------------------------------------------------------------------
    @property
    def dim(self) -> int | None:
        return self._dim

    def ensure_collection(self, dim: int) -> None:
        if self._dim is not None:
            if self._dim != dim:
                raise DimensionMismatchError(
                    f"Edge shard {self.path} holds {self._dim}-d vectors, asked for {dim}-d; "
                    "index into a fresh directory (settings.vector_store.path)"
                )
            return
        s = self.settings
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine),
            hnsw_config=qe.HnswIndexConfig(
                m=s.hnsw_m,
                ef_construct=s.hnsw_ef_construct,
                # segments smaller than exact_below items are scanned, not graph-searched
                full_scan_threshold=full_scan_threshold_kb(s.exact_below, dim),
            ),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=s.indexing_threshold_kb),
            max_search_threads=s.max_search_threads,
        )
        self.path.mkdir(parents=True, exist_ok=True)
        shard = _open(lambda: qe.EdgeShard.create(str(self.path), config), self.path)
        _ensure_payload_indexes(shard)
        self._shard, self._dim = shard, dim
        self._refresh_exact()

    def catalogue_version(self) -> str | None:
        return self._marker("model_version")

    def catalogue_loading(self) -> str | None:
        return self._marker("loading")

    def catalogue_load(self) -> str | None:
        return self._marker("load")

    def _marker(self, key: str) -> str | None:
        marker = self.path / _CATALOGUE_FILE
        value = json.loads(marker.read_text(encoding="utf-8")).get(key) if marker.exists() else None
        return None if value is None else str(value)

    def mark_catalogue(self, version: str | None, *, loading: str | None = None) -> None:
        # The marker must not outlive writes a crash would lose: the points of a whole load, or
        # the deletes of another model's items made before a load begins (a marker that names
        # this load with those deletes lost would let its restart skip them).
        if version is not None or self._shard is not None:
            self.flush()
        with atomic_write(self.path / _CATALOGUE_FILE) as f:
            load = None if version is None else self.new_load_id()
            f.write(json.dumps({"model_version": version, "loading": loading, "load": load}).encode())

    def items_group(self, base: str) -> str:
        """A group of this shard's own. Each Edge shard is a whole copy of the catalogue, private
        to one process: in one shared group two workers' shards would each get only some
        partitions' items, and a shard deleted and rebuilt would resume from its predecessor's
        offsets, missing every item published since the export. The id lives in the shard's
        directory, so it lasts as long as the shard does. With it is the directory's inode: a
        copy of the shard made beside it (`cp -r`, a second worker's volume copied from the
        first) gets an id of its own instead of sharing the original's group and half its
        partitions. (Not the device too: it can change under an unchanged shard, e.g. a
        container's overlay, and every such start would read the whole topic again. A backup
        restored in place of a deleted shard can be given the same inode, and then resumes
        from the original's offsets.)"""
        id_file = self.path / _SHARD_ID_FILE
        self.path.mkdir(parents=True, exist_ok=True)
        here = self.path.stat().st_ino
        try:
            text = id_file.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            text = ""
        if text.startswith("{"):
            try:
                recorded = json.loads(text)
            except ValueError:
                recorded = None
        else:  # the earlier form, the id alone: adopted, with this directory's inode
            recorded = {"id": text, "dir": here} if text else None
        if not isinstance(recorded, dict) or recorded.get("dir") != here or not recorded.get("id"):
            recorded = {"id": uuid.uuid4().hex, "dir": here}
        if text != json.dumps(recorded):
            with atomic_write(id_file) as f:
                f.write(json.dumps(recorded).encode())
        return f"{base}.{recorded['id']}"

    def count(self) -> int:
        return int(self._live().count(qe.CountRequest(exact=True)))

    # -- writes ----------------------------------------------------------------------------
    def _upsert(self, records: Sequence[ItemRecord], vectors: np.ndarray) -> None:
        shard = self._live()
        points = [
            qe.Point(point_id(r.item_id), v, to_payload(r))
            for r, v in zip(records, vectors.tolist(), strict=True)
        ]
        shard.update(qe.UpdateOperation.upsert_points(points))
        if self._exact is not None:
            snapshot = self._exact.with_upserts(records, vectors)
            # Past the threshold the snapshot is dropped for good: HNSW takes over.
            self._exact = snapshot if len(snapshot) < self.settings.exact_below else None

    def _update_vectors(self, item_ids: Sequence[ItemId], vectors: np.ndarray) -> None:
        shard = self._live()
        shard.update(qe.UpdateOperation.update_vectors(
            [qe.PointVectors(point_id(i), v) for i, v in zip(item_ids, vectors.tolist(), strict=True)]))
        if self._exact is not None:
            records = self.records(item_ids)
            self._exact = self._exact.with_upserts([records[i] for i in item_ids if i in records],
                                                   vectors[[k for k, i in enumerate(item_ids) if i in records]])

    def _update_payloads(self, payloads: Sequence[tuple[ItemId, dict[str, Any]]]) -> None:
        shard = self._live()
        for item_id, payload in payloads:  # each payload is the item's own; a write per point costs ~5 us here
            shard.update(qe.UpdateOperation.set_payload([point_id(item_id)], payload))
        if self._exact is not None:  # its surface masks: the stored points, read once
            points = self._fetch([item_id for item_id, _ in payloads], with_vector=True)
            if points:
                self._exact = self._exact.with_upserts([from_payload(point_payload(p)) for p in points.values()],
                                                       np.asarray([p.vector for p in points.values()], dtype=np.float32))

    def _set_popularity(self, by_value: dict[float, list[ItemId]]) -> None:
        shard = self._live()
        for value, ids in by_value.items():
            shard.update(qe.UpdateOperation.set_payload([point_id(i) for i in ids], {POPULARITY: value}))

    def delete(self, item_ids: Sequence[ItemId]) -> None:
        if not item_ids:
            return
        self._live().update(qe.UpdateOperation.delete_points([point_id(i) for i in item_ids]))
        if self._exact is not None:
            self._refresh_exact()

    def flush(self) -> None:
        self._live().flush()

    def optimize(self) -> None:
        shard = self._live()
        shard.optimize()
        shard.flush()

    # -- reads -----------------------------------------------------------------------------
    def _query_batch(
        self,
        queries: np.ndarray,
        limit: int,
        surfaces: list[str | None],
        exclude: list[Sequence[ItemId]],
    ) -> list[list[Hit]]:
        exact = self._exact  # one read: a concurrent upsert swaps in a new snapshot
        if exact is not None:
            return exact.search(queries, limit, surfaces, exclude, threads=self.settings.max_search_threads or 0)
        params = qe.SearchParams(hnsw_ef=max(self.settings.search_ef, limit))
        requests = [
            qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(q),
                filter=_filter(surface, excl),
                params=params,
                with_payload=[ITEM_ID],
            )
            for q, surface, excl in zip(queries.tolist(), surfaces, exclude, strict=True)
        ]
        results = self._live().query_batch(qe.QueryBatchRequest(requests))
        return [[(point_payload(p)[ITEM_ID], float(p.score)) for p in hits] for hits in results]

    def _query_arrays(
        self,
        queries: np.ndarray,
        limits: np.ndarray,
        surfaces: list[str | None],
        exclude: list[Sequence[ItemId]],
        exclude_of: np.ndarray,
    ) -> BatchHits:
        exact = self._exact
        if exact is not None:
            rows, scores = exact.search_rows(queries, limits, surfaces, exclude, exclude_of,
                                             threads=self.settings.max_search_threads or 0)
            return BatchHits(rows, scores, exact.id_array, exact.text_array)
        requests = [
            qe.QueryRequest(
                limit=max(limit, 1),
                query=qe.Query.Nearest(q),
                filter=f,
                params=qe.SearchParams(hnsw_ef=max(self.settings.search_ef, limit)),
                with_payload=[ITEM_ID],
            )
            for q, limit, f in zip(queries.tolist(), limits.tolist(),
                                   shared_filters(surfaces, [exclude[o] for o in exclude_of], _filter), strict=True)
        ]
        results = self._live().query_batch(qe.QueryBatchRequest(requests))
        return hits_to_arrays([
            [(point_payload(p)[ITEM_ID], float(p.score)) for p in hits][:limit]
            for hits, limit in zip(results, limits.tolist(), strict=True)
        ])

    def retrieve(self, item_ids: Sequence[ItemId]) -> dict[ItemId, np.ndarray]:
        return {
            item_id: np.asarray(rec.vector, dtype=np.float32)
            for item_id, rec in self._fetch(item_ids, with_vector=True).items()
        }

    def records(self, item_ids: Sequence[ItemId]) -> dict[ItemId, ItemRecord]:
        return {
            item_id: from_payload(point_payload(rec))
            for item_id, rec in self._fetch(item_ids, with_vector=False).items()
        }

    def item_ids(self) -> list[ItemId]:
        ids: list[ItemId] = []
        offset: Any = None
        while True:
            page, offset = self._live().scroll(
                qe.ScrollRequest(offset=offset, limit=SCROLL_PAGE, with_payload=[ITEM_ID], with_vector=False)
            )
            ids.extend(point_payload(rec)[ITEM_ID] for rec in page)
            if offset is None:
                return ids

    def top_popular(self, surface: str | None, limit: int) -> list[Hit]:
        if limit <= 0:
            return []
        hits = self._live().query(
            qe.QueryRequest(
                limit=limit,
                query=qe.OrderBy(POPULARITY, qe.Direction.Desc),
                filter=_filter(surface, ()),
                with_payload=[ITEM_ID, POPULARITY],
            )
        )
        return [(point_payload(p)[ITEM_ID], float(point_payload(p)[POPULARITY])) for p in hits]

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        if self._shard is not None:
            self._shard.flush()
            self._shard.close()
        self._shard = None
        self._exact = None
        self._closed = True

    # -- helpers ---------------------------------------------------------------------------
    def _live(self) -> qe.EdgeShard:
        if self._shard is None:
            if self._closed:
                raise VectorStoreError(f"Edge store {self.path} is closed")
            raise CollectionMissingError(
                f"no Qdrant Edge shard at {self.path} yet: call ensure_collection(dim) "
                "(or run `recsys index`) first"
            )
        return self._shard

    def _fetch(self, item_ids: Sequence[ItemId], *, with_vector: bool) -> dict[ItemId, Any]:
        shard = self._live()
        if not item_ids:
            return {}
        by_point = {point_id(i): i for i in item_ids}
        recs = shard.retrieve(list(by_point), with_payload=True, with_vector=with_vector)
        # The engine returns uuid point ids as UUID objects, ints as ints: map back.
        return {by_point[r.id]: r for r in recs if r.id in by_point}

    def _refresh_exact(self) -> None:
        """Load the numpy snapshot when the catalogue is small enough to search exactly."""
        self._exact = None
        if not self.settings.numpy_exact or self._dim is None:
            return
        if self.count() >= self.settings.exact_below:
            return
        records: list[ItemRecord] = []
        vectors: list[list[float]] = []
        offset: Any = None
        while True:
            page, offset = self._live().scroll(
                qe.ScrollRequest(
                    offset=offset, limit=SCROLL_PAGE, with_payload=True, with_vector=True
                )
            )
            for rec in page:
                records.append(from_payload(point_payload(rec)))
                vectors.append(_dense(rec.vector))
            if offset is None:
                break
        matrix = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), self._dim)
        self._exact = ExactIndex.build(records, matrix)


def _ensure_payload_indexes(shard: qe.EdgeShard) -> None:
    """Keyword index on `surfaces` (filters), float index on `popularity` (order by)."""
    existing = shard.info().payload_schema
    wanted = {SURFACES: qe.PayloadSchemaType.Keyword, POPULARITY: qe.PayloadSchemaType.Float}
    for name, kind in wanted.items():
        if name not in existing:
            shard.update(qe.UpdateOperation.create_field_index(name, kind))
    shard.flush()


def _filter(surface: str | None, exclude: Sequence[ItemId]) -> qe.Filter | None:
    must = None
    if surface is not None:
        must = [qe.FieldCondition(SURFACES, match=qe.MatchValue(surface))]
    must_not = [qe.HasIdCondition(set(dedupe_ids(exclude)))] if exclude else None
    if must is None and must_not is None:
        return None
    return qe.Filter(must=must, must_not=must_not)


def _dense(vector: Any) -> list[float]:
    """The default (unnamed) dense vector of a record, however the binding shapes it."""
    if isinstance(vector, dict):
        vector = vector.get("", next(iter(vector.values())))
    return list(vector)


def _stored_dim(path: Path) -> int:
    try:
        config = json.loads((path / _CONFIG_FILE).read_text())
        return int(config["vectors"][""]["size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VectorStoreError(f"{path / _CONFIG_FILE} is not a readable Edge config: {e}") from e


def _open(opener: Callable[[], qe.EdgeShard], path: Path) -> qe.EdgeShard:
    """Open or create a shard, turning the engine's lock failure into StoreLockedError."""
    try:
        return opener()
    except Exception as e:  # the binding raises bare Exception with the engine's message
        text = str(e)
        if "WouldBlock" in text or "lock" in text.lower():
            raise StoreLockedError(
                f"Qdrant Edge shard {path} is already open elsewhere (another process, or "
                "another store object in this one: its WAL is locked). One process per shard "
                "directory: run the `items` follower inside the process that queries, or "
                "point settings.vector_store.path elsewhere. "
                f"Engine said: {text}"
            ) from e
        raise VectorStoreError(f"cannot open Qdrant Edge shard {path}: {text}") from e
