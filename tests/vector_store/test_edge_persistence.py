"""Qdrant Edge on disk: a reopened shard still holds its items, graph and payload indexes; the
one-process-per-shard lock is a clear error; the numpy snapshot hands over to the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from vs_helpers import SURFACES, clustered, make_records, reference_search

from recsys.settings import Settings, VectorStoreSettings
from vector_store import (
    CollectionMissingError,
    DimensionMismatchError,
    StoreLockedError,
    open_store,
)
from vector_store.edge import EdgeStore

DIM = 8


def test_reopened_shard_answers_the_same(tmp_path: Path) -> None:
    settings = VectorStoreSettings(path=tmp_path / "shard", exact_below=0, indexing_threshold_kb=1)
    records, vectors = make_records(1500, seed=1), clustered(1500, DIM, seed=1)
    queries = clustered(20, DIM, seed=2)
    surfaces = [SURFACES[i % 3] for i in range(20)]
    exclude = [[records[i].item_id] for i in range(20)]
    with EdgeStore(settings) as store:
        store.ensure_collection(DIM)
        store.upsert(records, vectors)
        store.optimize()
        before = store.query_batch(queries, 10, surfaces, exclude)
        popular = store.top_popular("home", 5)
    with EdgeStore(settings) as store:
        assert store.dim == DIM
        assert store.count() == len(records)
        after = store.query_batch(queries, 10, surfaces, exclude)
        assert [[i for i, _ in q] for q in after] == [[i for i, _ in q] for q in before]
        assert store.top_popular("home", 5) == popular
        vec = store.retrieve([records[7].item_id])[records[7].item_id]
        np.testing.assert_allclose(vec, vectors[7], atol=1e-6)


def test_writes_survive_without_optimize(tmp_path: Path) -> None:
    """Points upserted after the last optimize() come back from the WAL / segments."""
    settings = VectorStoreSettings(path=tmp_path / "shard")
    with EdgeStore(settings) as store:
        store.ensure_collection(DIM)
        store.upsert(make_records(10, seed=4), clustered(10, DIM, seed=4))
    with EdgeStore(settings) as store:
        assert store.count() == 10


def test_second_open_is_a_lock_error(tmp_path: Path) -> None:
    settings = VectorStoreSettings(path=tmp_path / "shard")
    with EdgeStore(settings) as store:
        store.ensure_collection(DIM)
        with pytest.raises(StoreLockedError, match="already open"):
            EdgeStore(settings)
        # ... also from another process, which is what the lock is for.
        code = (
            "import sys\n"
            "from recsys.settings import VectorStoreSettings\n"
            "from vector_store import StoreLockedError\n"
            "from vector_store.edge import EdgeStore\n"
            "try:\n"
            f"    EdgeStore(VectorStoreSettings(path={str(settings.path)!r}))\n"
            "except StoreLockedError:\n"
            "    sys.exit(3)\n"
        )
        assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 3
    with EdgeStore(settings) as store:  # closing released the lock
        assert store.count() == 0


def test_missing_collection_and_wrong_dim(tmp_path: Path) -> None:
    settings = VectorStoreSettings(path=tmp_path / "shard")
    with EdgeStore(settings) as store:
        assert store.dim is None
        with pytest.raises(CollectionMissingError):
            store.count()
        store.ensure_collection(DIM)
    with pytest.raises(DimensionMismatchError, match="holds 8-d"):
        open_store(Settings(vector_store=settings), dim=DIM + 1)
    with open_store(Settings(vector_store=settings), dim=DIM) as store:
        assert store.count() == 0


def test_snapshot_hands_over_to_the_engine(tmp_path: Path) -> None:
    """Crossing exact_below drops the numpy snapshot; answers stay exact-equal either way."""
    settings = VectorStoreSettings(path=tmp_path / "shard", exact_below=50)
    records, vectors = make_records(80, seed=5), clustered(80, DIM, seed=5)
    queries = clustered(10, DIM, seed=6)
    surf: list[str | None] = [None] * 10
    excl: list[list[int | str]] = [[] for _ in range(10)]
    with EdgeStore(settings) as store:
        store.ensure_collection(DIM)
        store.upsert(records[:40], vectors[:40])
        assert store._exact is not None and len(store._exact) == 40
        small = store.query_batch(queries, 5, surf, excl)
        want_small = reference_search(records[:40], vectors[:40], queries, 5, surf, excl)
        assert [[i for i, _ in q] for q in small] == [[i for i, _ in q] for q in want_small]
        store.upsert(records[40:], vectors[40:])
        assert store._exact is None
        big = store.query_batch(queries, 5, surf, excl)
        want = reference_search(records, vectors, queries, 5, surf, excl)
        assert [[i for i, _ in q] for q in big] == [[i for i, _ in q] for q in want]
    with EdgeStore(settings) as store:
        assert store._exact is None  # 80 >= 50: the reopened store stays on the engine
    with EdgeStore(settings.model_copy(update={"exact_below": 1000})) as store:
        assert store._exact is not None and len(store._exact) == 80  # loaded back from disk
        again = store.query_batch(queries, 5, surf, excl)
        assert [[i for i, _ in q] for q in again] == [[i for i, _ in q] for q in want]


def test_payload_indexes_are_made_on_load_if_missing(tmp_path: Path) -> None:
    """A shard created by the engine alone (as if we crashed before indexing) gets them."""
    import qdrant_edge as qe

    path = tmp_path / "shard"
    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine))
    shard = qe.EdgeShard.create(str(path), config)
    shard.close()
    with EdgeStore(VectorStoreSettings(path=path)) as store:
        store.upsert(make_records(30, seed=8), clustered(30, DIM, seed=8))
        assert len(store.top_popular("home", 3)) == 3  # order-by needs the float index
    shard = qe.EdgeShard.load(str(path))
    assert {"surfaces", "popularity"} <= set(shard.info().payload_schema)
    shard.close()
