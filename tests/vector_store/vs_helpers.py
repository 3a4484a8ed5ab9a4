"""Helpers of the vector-store tests: catalogues with planted cluster structure, the stores
under test built from one set of settings, and the plain-numpy reference search that every
backend is compared with (qdrant-client's congruence-test pattern).

A plain module with a unique name (not conftest.py) so test modules can import it whatever
else pytest has loaded under the name `conftest`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from recsys.settings import VectorStoreSettings
from vector_store import ItemId, ItemRecord, VectorStore, point_id
from vector_store.edge import EdgeStore
from vector_store.server import ServerStore

SURFACES = ("home", "search", "related")

# The backends compared: Edge answering from its numpy snapshot, Edge asking the engine
# (plain segments, full scan), and the server backend on qdrant-client's local mode.
EXACT_BACKENDS = ("edge-numpy", "edge-qdrant", "server-local")


def clustered(n: int, dim: int, seed: int, n_clusters: int = 16) -> np.ndarray:
    """Unit vectors around ``n_clusters`` random centres (embeddings cluster; noise does not)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    x = centres[rng.integers(0, n_clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_records(n: int, seed: int) -> list[ItemRecord]:
    """Mixed int and str ids, each item eligible on a random subset of the surfaces."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        item_id: ItemId = i if i % 3 else f"item-{i}"
        surfaces = tuple(s for s in SURFACES if rng.random() < 0.6)
        out.append(ItemRecord(item_id, surfaces, 1_700_000_000_000 + i, float(rng.random())))
    return out


def reference_search(
    records: Sequence[ItemRecord],
    vectors: np.ndarray,
    queries: np.ndarray,
    limit: int,
    surfaces: Sequence[str | None],
    exclude: Sequence[Sequence[ItemId]],
) -> list[list[tuple[ItemId, float]]]:
    """The obviously-correct search: score every eligible item in float64, sort."""
    x = vectors.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    out = []
    for q, surface, excl in zip(queries.astype(np.float64), surfaces, exclude, strict=True):
        q = q / max(np.linalg.norm(q), 1e-300)
        banned = {point_id(e) for e in excl}
        scored = [
            (r.item_id, float(v @ q))
            for r, v in zip(records, x, strict=True)
            if (surface is None or surface in r.surfaces) and point_id(r.item_id) not in banned
        ]
        scored.sort(key=lambda h: -h[1])
        out.append(scored[:limit])
    return out


def assert_same_hits(
    got: list[list[tuple[ItemId, float]]],
    want: list[list[tuple[ItemId, float]]],
    true_score: Callable[[int, ItemId], float | None],
    atol: float = 2e-5,
) -> None:
    """Exact agreement up to ties: same length, same scores rank by rank, and every returned
    id really has the score it came with (and passed the filters: true_score is None if not)."""
    assert len(got) == len(want)
    for qi, (g, w) in enumerate(zip(got, want, strict=True)):
        assert len(g) == len(w), f"query {qi}: {len(g)} hits, reference has {len(w)}"
        np.testing.assert_allclose(
            [s for _, s in g], [s for _, s in w], atol=atol, err_msg=f"query {qi}"
        )
        assert len({point_id(i) for i, _ in g}) == len(g), f"query {qi}: duplicate hits"
        for item_id, score in g:
            ts = true_score(qi, item_id)
            assert ts is not None, f"query {qi}: {item_id!r} is excluded or ineligible"
            assert abs(ts - score) <= atol, f"query {qi}: {item_id!r} scored {score}, truly {ts}"


def open_backend(kind: str, root: Path, **overrides: object) -> VectorStore:
    """A fresh, empty store of one of the kinds compared (no collection yet)."""
    fields: dict[str, object]
    if kind == "edge-numpy":
        fields = {"path": root / kind}
    elif kind == "edge-qdrant":
        fields = {"path": root / kind, "numpy_exact": False}
    elif kind == "edge-hnsw":
        # exact_below=0 and a 1 KB indexing threshold: optimize() builds a graph even here
        fields = {"path": root / kind, "exact_below": 0, "indexing_threshold_kb": 1}
    elif kind == "server-local":
        fields = {"backend": "server", "url": ":memory:"}
    else:
        raise ValueError(kind)
    settings = VectorStoreSettings.model_validate({**fields, **overrides})
    return ServerStore(settings) if kind == "server-local" else EdgeStore(settings)
