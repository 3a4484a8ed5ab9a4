"""Congruence: the same catalogue and the same filtered batch queries give the same answers on
every backend (Edge from its numpy snapshot, Edge through the engine, the server backend on
qdrant-client's local mode) as a plain-numpy reference; Edge's HNSW graph agrees up to recall."""

from __future__ import annotations

import dataclasses

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from vs_helpers import (
    EXACT_BACKENDS,
    SURFACES,
    assert_same_hits,
    clustered,
    make_records,
    open_backend,
    reference_search,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vector_store import ItemId, ItemRecord, VectorStore, point_id

pytestmark = [
    # qdrant-client's local mode says (rightly) that it ignores indexes and search params.
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]

DIM = 16


def _scorer(
    records: list[ItemRecord], vectors: np.ndarray, queries: np.ndarray,
    surfaces: list[str | None], exclude: list[list[ItemId]],
) -> Callable[[int, ItemId], float | None]:
    """True cosine of (query, item), or None where the filters forbid the item."""
    rows = {point_id(r.item_id): i for i, r in enumerate(records)}
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)

    def score(qi: int, item_id: ItemId) -> float | None:
        row = rows[point_id(item_id)]
        rec = records[row]
        if surfaces[qi] is not None and surfaces[qi] not in rec.surfaces:
            return None
        if point_id(item_id) in {point_id(e) for e in exclude[qi]}:
            return None
        return float(x[row].astype(np.float64) @ qn[qi].astype(np.float64))

    return score


def _workload(n: int, n_queries: int, seed: int) -> tuple[
    list[ItemRecord], np.ndarray, np.ndarray, list[str | None], list[list[ItemId]]
]:
    records = make_records(n, seed)
    vectors = clustered(n, DIM, seed)
    queries = clustered(n_queries, DIM, seed + 1) * 3.0  # not unit: the store normalises
    rng = np.random.default_rng(seed + 2)
    options: list[str | None] = [None, *SURFACES, "nowhere"]
    surfaces = [options[i] for i in rng.integers(0, len(options), n_queries)]
    # Exclude some true near neighbours, given by int or str form, plus an unknown id.
    exclude: list[list[ItemId]] = []
    for q in queries:
        near = np.argsort(-(vectors @ q))[: rng.integers(0, 8)]
        ids: list[ItemId] = [records[i].item_id for i in near]
        exclude.append([str(i) for i in ids] + ["never-indexed"])
    return records, vectors, queries, surfaces, exclude


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_exact_backends_match_reference(kind: str, stores: Callable[..., VectorStore]) -> None:
    records, vectors, queries, surfaces, exclude = _workload(400, 40, seed=7)
    store = stores(kind)
    store.ensure_collection(DIM)
    store.upsert(records, vectors)
    assert store.count() == len(records)
    for limit in (1, 10, 500):
        got = store.query_batch(queries, limit, surfaces, exclude)
        want = reference_search(records, vectors, queries, limit, surfaces, exclude)
        assert_same_hits(got, want, _scorer(records, vectors, queries, surfaces, exclude))


def test_hnsw_agrees_with_reference(stores: Callable[..., VectorStore]) -> None:
    """Through the HNSW graph: filters hold exactly, scores are true cosines, recall is high."""
    records, vectors, queries, surfaces, exclude = _workload(3000, 60, seed=11)
    store = stores("edge-hnsw")
    store.ensure_collection(DIM)
    store.upsert(records, vectors)
    store.optimize()
    got = store.query_batch(queries, 10, surfaces, exclude)
    want = reference_search(records, vectors, queries, 10, surfaces, exclude)
    score = _scorer(records, vectors, queries, surfaces, exclude)
    found = total = 0
    for qi, (g, w) in enumerate(zip(got, want, strict=True)):
        for item_id, s in g:
            ts = score(qi, item_id)
            assert ts is not None, f"query {qi}: filtered-out item {item_id!r} returned"
            assert abs(ts - s) <= 2e-5
        found += len({point_id(i) for i, _ in g} & {point_id(i) for i, _ in w})
        total += len(w)
    assert found / total >= 0.9


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_upsert_replaces_vector_and_payload(kind: str, stores: Callable[..., VectorStore]) -> None:
    store = stores(kind)
    store.ensure_collection(2)
    store.upsert([ItemRecord(42, ("home",), 1, 0.5), ItemRecord("a", ("home",), 1, 0.1)],
                 np.array([[1, 0], [0, 1]], np.float32))
    # "42" is the same item as 42 (same point); it moves to `search` and turns around.
    store.upsert([ItemRecord("42", ("search",), 2, 0.9)], np.array([[-1, 0]], np.float32))
    assert store.count() == 2
    (hits,) = store.query_batch(np.array([[1, 0]], np.float32), 5, ["home"])
    assert hits == [("a", pytest.approx(0.0, abs=1e-6))]
    (hits,) = store.query_batch(np.array([[-1, 0]], np.float32), 5, ["search"])
    assert hits == [("42", pytest.approx(1.0))]
    assert store.records([42])[42] == ItemRecord("42", ("search",), 2, 0.9)
    np.testing.assert_allclose(store.retrieve([42])[42], [-1, 0], atol=1e-6)
    assert store.retrieve(["missing"]) == {}


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_update_vectors_leaves_the_payload_as_stored(kind: str, stores: Callable[..., VectorStore]) -> None:
    """A bulk load rewrites stored items' vectors only: a withdrawal written meanwhile stays."""
    store = stores(kind)
    store.ensure_collection(2)
    store.upsert([ItemRecord("a", ("home",), 1, 0.5), ItemRecord(7, ("home", "search"), 2, 0.2)],
                 np.array([[1, 0], [0, 1]], np.float32))
    store.upsert([ItemRecord(7, (), 3, 0.2)], np.array([[0, 1]], np.float32))  # the follower's withdrawal
    store.update_vectors(["7", "a"], np.array([[-1, 0], [0, -1]], np.float32))
    assert store.records([7])[7] == ItemRecord(7, (), 3, 0.2)
    assert store.records(["a"])["a"] == ItemRecord("a", ("home",), 1, 0.5)
    np.testing.assert_allclose(store.retrieve(["a", 7])["a"], [0, -1], atol=1e-6)
    (hits,) = store.query_batch(np.array([[0, -1]], np.float32), 5, ["home"])
    assert hits == [("a", pytest.approx(1.0))]  # the new vector answers; 7 is on no surface


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_update_payloads_leaves_the_vector_as_stored(kind: str, stores: Callable[..., VectorStore]) -> None:
    """A follower's payload-only update: a vector a bulk load wrote meanwhile stays; an item no
    longer stored is not brought back."""
    store = stores(kind)
    store.ensure_collection(2)
    store.upsert([ItemRecord("a", ("home",), 1, 0.5), ItemRecord(7, ("home",), 2, 0.2)],
                 np.array([[1, 0], [0, 1]], np.float32))
    store.update_vectors(["a"], np.array([[0, -1]], np.float32))  # the new model's load
    store.update_payloads([ItemRecord("a", ("home",), 1, 0.1), ItemRecord("a", ("search",), 4, 0.9),
                           ItemRecord("gone", ("home",), 1, 0.1)])
    assert store.records(["a"])["a"] == ItemRecord("a", ("search",), 4, 0.9)  # the later record won
    np.testing.assert_allclose(store.retrieve(["a"])["a"], [0, -1], atol=1e-6)
    assert store.retrieve(["gone"]) == {} and store.count() == 2
    # Without popularity: the stored one stays, whatever the records say (a load's, set meanwhile).
    store.set_popularity(["a"], np.array([7.0], np.float32))
    store.update_payloads([ItemRecord("a", ("home", "search"), 5, 0.0)], popularity=False)
    assert store.records(["a"])["a"] == ItemRecord("a", ("home", "search"), 5, 7.0)
    (home,), (search,) = (store.query_batch(np.array([[0, -1]], np.float32), 5, [s]) for s in ("home", "search"))
    assert [i for i, _ in home] == ["a", 7] and search == [("a", pytest.approx(1.0))]


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_item_ids_lists_every_item_and_deleted_ones_are_gone(kind: str, stores: Callable[..., VectorStore]) -> None:
    records = make_records(300, seed=5)  # more than one page of some scrolls
    vectors = clustered(300, DIM, 5)
    store = stores(kind)
    store.ensure_collection(DIM)
    store.upsert(records, vectors)
    assert sorted(map(str, store.item_ids())) == sorted(str(r.item_id) for r in records)
    gone = [r.item_id for r in records[::3]]
    store.delete([*gone, "never-stored"])
    assert store.count() == 200
    assert {str(i) for i in store.item_ids()} == {str(r.item_id) for r in records} - {str(i) for i in gone}
    assert store.retrieve(gone) == {}
    # No query finds a deleted item, whichever path answers it (the numpy snapshot included).
    hits = store.query_batch(vectors[::3], 10)
    assert not {point_id(i) for h in hits for i, _ in h} & {point_id(i) for i in gone}


def _filled(store: VectorStore, n: int, seed: int) -> tuple[VectorStore, list[ItemRecord]]:
    """``store`` holding ``n`` generated items (clustered vectors)."""
    records = make_records(n, seed=seed)
    store.ensure_collection(DIM)
    store.upsert(records, clustered(n, DIM, seed))
    return store, records


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_top_popular_per_surface(kind: str, stores: Callable[..., VectorStore]) -> None:
    store, records = _filled(stores(kind), 200, seed=3)
    for surface in (None, *SURFACES, "nowhere"):
        eligible = [r for r in records if surface is None or surface in r.surfaces]
        want = sorted(eligible, key=lambda r: -r.popularity)[:20]
        got = store.top_popular(surface, 20)
        assert [point_id(i) for i, _ in got] == [point_id(r.item_id) for r in want]
        assert [p for _, p in got] == pytest.approx([r.popularity for r in want])


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_set_popularity_changes_the_popularity_alone(kind: str, stores: Callable[..., VectorStore]) -> None:
    store, records = _filled(stores(kind), 50, seed=4)
    ids = [r.item_id for r in records[:10]]
    store.set_popularity(ids, np.array([1e6] * 5 + [2e6] * 5, np.float32))
    got = store.records(ids)
    assert [got[i] for i in ids] == [
        dataclasses.replace(r, popularity=pytest.approx(1e6 if k < 5 else 2e6)) for k, r in enumerate(records[:10])]
    assert {point_id(i) for i, _ in store.top_popular(None, 5)} == {point_id(i) for i in ids[5:]}  # ties: any order


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_the_catalogue_marker_names_the_last_whole_load(kind: str, stores: Callable[..., VectorStore]) -> None:
    store = stores(kind)
    assert store.catalogue_version() is None  # no collection yet
    store.ensure_collection(2)
    store.upsert([ItemRecord("a", ("home",), 1, 0.1)], np.array([[1, 0]], np.float32))
    assert store.catalogue_version() is None  # points, but no whole table
    store.mark_catalogue("m1")
    store.mark_catalogue("m2")
    assert store.catalogue_version() == "m2"
    store.mark_catalogue(None)  # a load is starting
    assert store.catalogue_version() is None
    store.mark_catalogue(None, loading="m3")  # ... of model m3
    assert store.catalogue_version() is None and store.catalogue_loading() == "m3"
    store.mark_catalogue("m3")
    assert store.catalogue_version() == "m3" and store.catalogue_loading() is None


@pytest.mark.parametrize("kind", EXACT_BACKENDS)
def test_bad_inputs_are_clear_errors(kind: str, stores: Callable[..., VectorStore]) -> None:
    from vector_store import CollectionMissingError, DimensionMismatchError

    store = stores(kind)
    with pytest.raises(CollectionMissingError):
        store.query_batch(np.zeros((1, 4), np.float32), 3)
    store.ensure_collection(4)
    store.ensure_collection(4)  # idempotent
    with pytest.raises(DimensionMismatchError):
        store.ensure_collection(5)
    with pytest.raises(DimensionMismatchError):
        store.query_batch(np.zeros((1, 5), np.float32), 3)
    with pytest.raises(ValueError, match="one entry per query"):
        store.query_batch(np.ones((2, 4), np.float32), 3, surfaces=["home"])
    with pytest.raises(ValueError, match="NaN"):
        store.upsert([ItemRecord(1, ("home",))], np.full((1, 4), np.nan, np.float32))
    assert store.query_batch(np.ones((2, 4), np.float32), 3) == [[], []]  # empty catalogue


# -- generated inputs ---------------------------------------------------------------------
_ids = st.one_of(st.integers(min_value=-5, max_value=2**64), st.text(min_size=1, max_size=6))


@st.composite
def _cases(draw: st.DrawFn) -> tuple[
    list[ItemRecord], np.ndarray, np.ndarray, int, list[str | None], list[list[ItemId]]
]:
    dim = draw(st.integers(2, 6))
    raw_ids = draw(st.lists(_ids, min_size=1, max_size=40, unique_by=lambda i: point_id(i)))
    n = len(raw_ids)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    records = [
        ItemRecord(i, tuple(draw(st.lists(st.sampled_from(SURFACES), unique=True))), 0, 0.0)
        for i in raw_ids
    ]
    n_q = draw(st.integers(1, 5))
    queries = rng.normal(size=(n_q, dim)).astype(np.float32)
    surfaces = draw(st.lists(st.sampled_from([None, *SURFACES]), min_size=n_q, max_size=n_q))
    exclude = draw(st.lists(st.lists(st.sampled_from(raw_ids)), min_size=n_q, max_size=n_q))
    limit = draw(st.integers(1, n + 2))
    return records, vectors, queries, limit, surfaces, exclude


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_cases())
def test_generated_catalogues_agree(case: tuple) -> None:  # type: ignore[type-arg]
    records, vectors, queries, limit, surfaces, exclude = case
    want = reference_search(records, vectors, queries, limit, surfaces, exclude)
    score = _scorer(records, vectors, queries, surfaces, exclude)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Payload indexes have no effect", UserWarning)
        warnings.filterwarnings("ignore", "Local mode performs exact", UserWarning)
        for kind in EXACT_BACKENDS:
            with open_backend(kind, Path(tmp)) as store:
                store.ensure_collection(vectors.shape[1])
                store.upsert(records, vectors)
                got = store.query_batch(queries, limit, surfaces, exclude)
                assert_same_hits(got, want, score, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 300), n_q=st.integers(1, 20), k=st.integers(1, 40),
    block=st.sampled_from([1, 7, 64, 1 << 22]), seed=st.integers(0, 2**32 - 1),
)
def test_blocked_topk_is_exact(n: int, n_q: int, k: int, block: int, seed: int) -> None:
    """The column-blocked top-k (any block size) equals a full sort."""
    import vector_store.exact as exact

    rng = np.random.default_rng(seed)
    x, q = rng.normal(size=(n, 5)).astype(np.float32), rng.normal(size=(n_q, 5)).astype(np.float32)
    old, exact._BLOCK_SCORES = exact._BLOCK_SCORES, block
    try:
        idx, val = exact.topk(q, x, k)
    finally:
        exact._BLOCK_SCORES = old
    full = q @ x.T
    want = -np.sort(-full, axis=1)[:, : min(k, n)]
    # A block's matmul may sum in another order than the full one's: float32 rounding, which
    # a relative bound alone fails on scores near 0 (seen: -0.00853242 vs -0.00853243).
    np.testing.assert_allclose(val, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), val, rtol=1e-6, atol=1e-6)


def test_product_reports_no_flag_but_keeps_nan() -> None:
    """The invalid flag (here raised for real by inf * 0) is not a warning; the NaN stays."""
    from vector_store.exact import product

    a, b = np.array([[np.inf, 1.0]], np.float32), np.array([[0.0], [2.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="invalid value encountered in matmul"):
            a @ b  # noqa: B018 - the warning `product` spares its callers
        assert np.isnan(product(a, b)).all()


@pytest.mark.parametrize("block", [1, 50, 1 << 22])
def test_exact_index_blocks_agree(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filters hold across column blocks of any size (blocks split surfaces and exclusions)."""
    import vector_store.exact as exact

    records, vectors, queries, surfaces, exclude = _workload(300, 30, seed=13)
    monkeypatch.setattr(exact, "_BLOCK_SCORES", block)
    index = exact.ExactIndex.build(records, vectors)
    for limit in (1, 10, 400):
        got = index.search(queries, limit, surfaces, exclude)
        want = reference_search(records, vectors, queries, limit, surfaces, exclude)
        assert_same_hits(got, want, _scorer(records, vectors, queries, surfaces, exclude))
