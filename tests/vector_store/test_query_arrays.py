"""`VectorStore.query_arrays` (the worker's call: a limit per query, one exclusion list shared
by many queries, arrays out) against the plain reference, on every backend, and the exact
index's two code paths (ONNX Runtime for cache-sized catalogues, numpy column blocks above)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vs_helpers import EXACT_BACKENDS, SURFACES, assert_same_hits, clustered, make_records, reference_search

import vector_store.exact as exact
from vector_store import VectorStore, point_id
from vector_store.exact import ExactIndex

DIM = 8

pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]


def _workload(n_items: int, n_users: int, seed: int) -> tuple:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    records = make_records(n_items, seed)
    vectors = clustered(n_items, DIM, seed)
    per_user = 5  # queries per user, each with its own surface and limit
    queries = clustered(n_users * per_user, DIM, seed + 1)
    surfaces = [[None, *SURFACES][i % 4] for i in range(len(queries))]
    limits = rng.integers(0, 40, len(queries))
    # Each user's recent items: some of them are the best hits of its queries.
    exclude = [[records[j].item_id for j in rng.choice(n_items, 12, replace=False)] for _ in range(n_users)]
    owner = np.repeat(np.arange(n_users), per_user)
    return records, vectors, queries, surfaces, limits, exclude, owner


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_query_arrays_agrees_with_reference(kind: str, stores: Callable[..., VectorStore]) -> None:
    records, vectors, queries, surfaces, limits, exclude, owner = _workload(400, 12, seed=3)
    store = stores(kind)
    store.ensure_collection(DIM)
    store.upsert(records, vectors)
    hits = store.query_arrays(queries, limits, surfaces, exclude, owner)
    want = [
        reference_search(records, vectors, queries[i : i + 1], int(limits[i]), [surfaces[i]], [exclude[owner[i]]])[0]
        for i in range(len(queries))
    ]

    def score(qi: int, item_id: object) -> float | None:
        for rec, vec in zip(records, vectors, strict=True):
            if point_id(rec.item_id) == point_id(item_id):  # type: ignore[arg-type]
                eligible = surfaces[qi] is None or surfaces[qi] in rec.surfaces
                banned = point_id(rec.item_id) in {point_id(e) for e in exclude[owner[qi]]}
                return None if banned or not eligible else float(vec @ queries[qi] / np.linalg.norm(queries[qi]))
        return None

    got = hits.lists()
    assert_same_hits(got, want, score, atol=1e-4)
    assert hits.codes.shape == hits.scores.shape and len(hits.ids) == len(set(map(str, hits.ids)))
    # The list form is the same search.
    assert [[i for i, _ in h] for h in got] == [
        [i for i, _ in h] for h in [x[:lim] for x, lim in zip(store.query_batch(
            queries, int(limits.max()), surfaces, [exclude[o] for o in owner]), limits.tolist(), strict=True)]
    ]


def test_query_arrays_validates(stores: Callable[..., VectorStore]) -> None:
    store = stores("edge-numpy")
    store.ensure_collection(2)
    with pytest.raises(ValueError, match="limits"):
        store.query_arrays(np.ones((2, 2), np.float32), [1])
    with pytest.raises(ValueError, match="exclude_of"):
        store.query_arrays(np.ones((2, 2), np.float32), [1, 1], exclude=[["a"]], exclude_of=np.array([0, 1]))
    empty = store.query_arrays(np.ones((2, 2), np.float32), [3, 3])  # empty catalogue
    assert empty.lists() == [[], []]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 120), n_users=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
    big=st.booleans(), block=st.sampled_from([1, 5, 1 << 22]),
)
def test_exact_paths_agree(n: int, n_users: int, seed: int, big: bool, block: int) -> None:
    """The ONNX Runtime path and the numpy column-block path (any block size) return the same
    hits as the reference, limits, filters and shared exclusion lists included."""
    rng = np.random.default_rng(seed)
    records = make_records(n, seed)
    vectors = clustered(n, DIM, seed)
    index = ExactIndex.build(records, vectors)
    nq = n_users * 3
    queries = rng.normal(size=(nq, DIM)).astype(np.float32)
    surfaces = [[None, *SURFACES, "nowhere"][int(i)] for i in rng.integers(0, 5, nq)]
    limits = rng.integers(0, n + 3, nq)
    exclude = [[records[j].item_id for j in rng.integers(0, n, 4)] + ["not-an-item"] for _ in range(n_users)]
    owner = rng.integers(0, n_users, nq)
    old = exact._CACHE_BYTES, exact._BLOCK_SCORES
    exact._CACHE_BYTES, exact._BLOCK_SCORES = (0 if big else old[0]), block
    try:
        rows, scores = index.search_rows(queries, limits, surfaces, exclude, owner)
    finally:
        exact._CACHE_BYTES, exact._BLOCK_SCORES = old
    for i in range(nq):
        (want,) = reference_search(records, vectors, queries[i : i + 1], int(limits[i]), [surfaces[i]], [exclude[owner[i]]])
        got_rows = rows[i][rows[i] >= 0]
        assert len(got_rows) == len(want), (i, surfaces[i], limits[i])
        np.testing.assert_allclose(scores[i][: len(got_rows)], [s for _, s in want], atol=1e-5)
        assert all(np.isneginf(scores[i][len(got_rows):]))
        banned = {point_id(e) for e in exclude[owner[i]]}
        assert not {point_id(index.item_ids[r]) for r in got_rows} & banned
