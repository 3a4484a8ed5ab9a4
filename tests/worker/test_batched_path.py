"""The worker's batched hot path against its per-user references: `plan_batch` vs
`plan_queries`, `merge_batch` vs `merge_hits`, and `Worker.compute` (real ONNX Runtime, real
Qdrant Edge) vs the reference pipeline that asks every query for the whole budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.guards import clean_update
from inference.runtime import ModelRuntime
from inference.worker import (
    Condition,
    Worker,
    merge_batch,
    merge_hits,
    next_headroom,
    plan_batch,
    plan_queries,
    query_limits,
    single_query_users,
)
from recsys.settings import InferenceSettings, Settings
from vector_store import ItemRecord, open_store
from vector_store.indexer import ItemTable


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4), m=st.integers(1, 4), dim=st.integers(3, 8), seed=st.integers(0, 2**32 - 1),
    layout=st.lists(st.tuples(st.sampled_from(["home", "search", "related"]), st.floats(0.05, 1.0)), min_size=1, max_size=5),
)
def test_plan_batch_is_plan_queries(b: int, m: int, dim: int, seed: int, layout: list[tuple[str, float]]) -> None:
    rng = np.random.default_rng(seed)
    conditions = [Condition(surface, f"o{i}", w) for i, (surface, w) in enumerate(layout)]
    q = len(conditions)
    queries = _unit(rng.normal(size=(b, q, m, dim)))
    # Plant near-duplicates (cosine ~0.999) so that merging happens, chains included.
    dup = rng.random((b, q, m)) < 0.5
    src = queries.reshape(b, q * m, dim)[np.arange(b)[:, None], rng.integers(0, q * m, (b, q * m))].reshape(b, q, m, dim)
    queries = np.where(dup[..., None], _unit(src + 0.01 * rng.normal(size=src.shape)), queries).astype(np.float32)
    single = rng.random(b) < 0.5 if seed % 3 else None  # users given one query per outcome
    want = plan_queries(queries, conditions, budget=100, merge_cosine=0.98, single=single)
    got = plan_batch(queries, conditions, budget=100, merge_cosine=0.98, single=single)
    assert got.generated == b * q * m
    k = 0
    for user, per_surface in enumerate(want):
        for s, (surface, planned) in enumerate(per_surface.items()):
            assert got.surfaces[s] == surface
            for vector, budget in planned:
                assert (got.user[k], got.surface[k]) == (user, s)
                np.testing.assert_array_equal(got.vectors[k], vector)
                assert got.budgets[k] == budget  # summed in the same order: bit-identical
                assert got.group[k] == user * len(got.surfaces) + s
                k += 1
    assert k == len(got.budgets)


@st.composite
def _groups(draw: Any) -> tuple[list[list[list[int]]], list[list[float]], list[list[int]], int]:
    """Groups of queries: each query's full ranked list (distinct codes from a small universe,
    so queries overlap), its budget, and the cut it is searched with."""
    limit = draw(st.integers(1, 12))
    universe = draw(st.integers(1, 30))
    n_groups = draw(st.integers(1, 4))
    lists, budgets, cuts = [], [], []
    for _ in range(n_groups):
        k = draw(st.integers(1, 4))
        lists.append([draw(st.lists(st.integers(0, universe - 1), max_size=limit, unique=True)) for _ in range(k)])
        budgets.append([draw(st.sampled_from([1e-12, 0.5, 1.0, 2.5, 3.0, 7.5, 17.5])) for _ in range(k)])
        cuts.append([draw(st.integers(1, limit)) for _ in range(k)])
    return lists, budgets, cuts, limit


def test_merge_keys_equal_but_for_float_noise_tie_the_same_way_in_any_group() -> None:
    """3 / (100/7) and 15 / (500/7) are both 0.21 but differ in the last float bits: both merges
    must treat them as one tie (query order), whichever row of the batch the group sits in."""
    budgets = np.array([100 / 7, 500 / 7])
    first = [1000 + r for r in range(40)]  # query 0: its rank-3 hit is item 1003
    second = [r for r in range(40)]  # query 1: its rank-15 hit is item 15
    want = merge_hits([[(c, 1.0) for c in first], [(c, 1.0) for c in second]], budgets.tolist(), 30)
    for row in (0, 3000):
        group = np.array([row, row])
        codes = np.array([first, second], dtype=np.int64)
        merged = merge_batch(codes, np.ones(codes.shape, np.float32), budgets, group, row + 1, np.array([40, 40]), 30)
        start = int(merged.counts[:row].sum())
        assert [str(c) for c in merged.codes[start : start + 30].tolist()] == want[0], row


@settings(max_examples=300, deadline=None)
@given(case=_groups())
def test_merge_batch_is_merge_hits(case: tuple[list[list[list[int]]], list[list[float]], list[list[int]], int]) -> None:
    """A group not flagged short merges exactly as merge_hits does on the uncut lists; with
    every cut at the full limit, no group is short."""
    lists, budgets, cuts, limit = case
    score = {c: float(np.float32(1.0 - c / 64)) for c in range(64)}

    def batch(cut_lists: list[list[list[int]]], limits: list[list[int]]) -> tuple[list[Any], np.ndarray]:
        flat = [hits for group in cut_lists for hits in group]
        width = max(1, max(len(h) for h in flat))
        codes = np.full((len(flat), width), -1, np.int64)
        scores = np.full((len(flat), width), -np.inf, np.float32)
        for i, hits in enumerate(flat):
            codes[i, : len(hits)] = hits
            scores[i, : len(hits)] = [score[c] for c in hits]
        group = np.repeat(np.arange(len(cut_lists)), [len(g) for g in cut_lists])
        merged = merge_batch(codes, scores, np.array([b for g in budgets for b in g]), group, len(cut_lists),
                             np.array([c for g in limits for c in g]), limit)
        out, begin = [], 0
        for count in merged.counts.tolist():
            out.append(([str(c) for c in merged.codes[begin : begin + count].tolist()],
                        merged.scores[begin : begin + count].tolist()))
            begin += count
        return out, merged.short

    want = [merge_hits([[(c, score[c]) for c in hits] for hits in group], b, limit) for group, b in zip(lists, budgets, strict=True)]
    cut = [[hits[:c] for hits, c in zip(group, cs, strict=True)] for group, cs in zip(lists, cuts, strict=True)]
    got, short = batch(cut, cuts)
    for g, (w, (items, scores)) in enumerate(zip(want, got, strict=True)):
        if not short[g]:
            assert (items, scores) == (w[0], w[1])
    full, short = batch(lists, [[limit] * len(group) for group in lists])
    assert not short.any()
    assert full == [(items, scores) for items, scores in want]


def test_query_limits() -> None:
    assert query_limits(np.array([7.5, 17.5, 100.0, 0.2]), 100, 2.0).tolist() == [15, 35, 100, 1]


def _reference_compute(worker: Worker, updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The worker's path as it was: per-user plan, every query asks for the whole budget."""
    cfg = worker.settings.inference
    queries = worker.runtime.generate(worker.encode(updates))
    plans = plan_queries(queries, worker.conditions, cfg.candidates_per_surface, cfg.merge_cosine,
                         single_query_users(updates, worker.runtime.max_len, cfg))
    matrix, surfaces, exclude = [], [], []
    for update, plan in zip(updates, plans, strict=True):
        recent = sorted({str(e["item_id"]) for e in update["events"]})
        for surface, planned in plan.items():
            matrix += [vector for vector, _ in planned]
            surfaces += [surface] * len(planned)
            exclude += [recent] * len(planned)
    hits = worker.store.query_batch(np.stack(matrix), cfg.candidates_per_surface, surfaces, exclude)
    out, cursor = [], 0
    for plan in plans:
        per_surface = {}
        for surface, planned in plan.items():
            items, scores = merge_hits(hits[cursor : cursor + len(planned)], [b for _, b in planned], cfg.candidates_per_surface)
            cursor += len(planned)
            per_surface[surface] = {"items": items, "scores": scores}
        out.append(per_surface)
    return out


@pytest.mark.parametrize(("numpy_exact", "headroom", "min_history"),
                         [(True, 2.0, 0), (True, 1.0, 0), (True, 0.1, 0), (False, 1.0, 0), (True, 2.0, 15)])
def test_compute_equals_the_reference_pipeline(
    small_model_dir: Path, tmp_path: Path, numpy_exact: bool, headroom: float, min_history: int
) -> None:
    """Real session, real Edge store (exact snapshot, or Qdrant's own search), items eligible on
    some surfaces only: the batched path serves exactly the reference's lists, whatever the
    headroom (a small one only means more surfaces searched again), with or without users
    below inference.multi_query_min_history getting one query per outcome."""
    settings = Settings(
        inference={"candidates_per_surface": 20, "limit_headroom": headroom, "multi_query_min_history": min_history},
        vector_store={"path": tmp_path / "qdrant", "numpy_exact": numpy_exact},
    )
    runtime = ModelRuntime.load(small_model_dir, "cpu")
    table = ItemTable.load(small_model_dir)
    rng = np.random.default_rng(0)
    surfaces = settings.events.surfaces
    records = [ItemRecord(i, tuple(s for s in surfaces if rng.random() < 0.7), 0, float(p))
               for i, p in zip(table.ids, table.popularity.tolist(), strict=True)]
    store = open_store(settings, dim=runtime.dim)
    try:
        store.upsert(records, table.embeddings)
        worker = Worker.offline(settings, runtime, store)
        updates = []
        for u in range(40):
            n = int(rng.integers(1, 30))
            events = [{"item_id": table.ids[int(rng.integers(0, len(table.ids)))], "action": ["click", "save"][int(rng.integers(0, 2))],
                       "surface": surfaces[int(rng.integers(0, 3))], "ts": 1_700_000_000_000 + 1000 * j} for j in range(n)]
            updates.append({"user_id": f"u{u}", "version": 1, "events": events})
        got = worker.compute(updates)
        want = _reference_compute(worker, updates)
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for surface in g:
                assert g[surface]["items"] == w[surface]["items"]
                np.testing.assert_allclose(g[surface]["scores"], w[surface]["scores"], atol=1e-5)
        if min_history:  # the light users' extra embeddings were folded into their first ones
            single = single_query_users(updates, runtime.max_len, settings.inference)
            assert 0 < single.sum() < len(updates)
            unfolded = plan_batch(runtime.generate(worker.encode(updates)), worker.conditions, 20, settings.inference.merge_cosine)
            assert worker.last_plan_size[1] < len(unfolded.budgets)
        if headroom < 1:
            assert worker.last_plan_size[2] > 0  # the re-search path ran
            assert worker.headroom == 2 * headroom  # ... so the next micro-batch reads deeper
    finally:
        store.close()


def test_items_the_user_hid_are_never_candidates_though_the_hide_left_the_sequence(
    small_model_dir: Path, tmp_path: Path
) -> None:
    """`user-updates` carries the items a user hid (streams.sequences.fold_hidden), including
    hides that fell off the bounded sequence: none of them comes back, on any surface."""
    settings = Settings(inference={"candidates_per_surface": 20}, vector_store={"path": tmp_path / "qdrant"})
    runtime = ModelRuntime.load(small_model_dir, "cpu")
    table = ItemTable.load(small_model_dir)
    store = open_store(settings, dim=runtime.dim)
    try:
        store.upsert([ItemRecord(i, tuple(settings.events.surfaces)) for i in table.ids], table.embeddings)
        worker = Worker.offline(settings, runtime, store)
        events = [{"item_id": table.ids[j], "action": "click", "surface": "home", "ts": 1_700_000_000_000 + j}
                  for j in range(5)]
        update = {"user_id": "u", "version": 1, "events": events}
        (before,) = worker.compute([update])
        hidden = before["home"]["items"][:3] + before["search"]["items"][:2]
        (after,) = worker.compute([{**update, "hidden": hidden}])
        for surface, lists in after.items():
            assert not set(lists["items"]) & set(hidden), surface
            assert len(lists["items"]) == 20  # the list is refilled, not shortened
        assert clean_update(msgpack.packb({**update, "hidden": [7, "x", None, True]}), keep=50)["hidden"] == ["7", "x"]
        many = clean_update(msgpack.packb({**update, "hidden": list(range(10_000))}), keep=50, keep_hidden=200)
        assert many["hidden"] == [str(i) for i in range(9_800, 10_000)]  # the newest, as the streams keep them
    finally:
        store.close()


def test_encode_with_the_runtime_lookup_equals_a_plain_dict(small_model_dir: Path) -> None:
    """The runtime's gathered table and a plain id -> vector dict encode the same inputs, items
    indexed after export (fetched) and unknown ones included."""
    from inference.worker import conditions_for, encode_histories

    runtime = ModelRuntime.load(small_model_dir, "cpu")
    late = np.full(runtime.dim, 1 / np.sqrt(runtime.dim), np.float32)
    fetch = lambda ids: {i: late for i in ids if i == "late-item"}  # noqa: E731
    updates = [
        {"events": [{"item_id": runtime.item_ids[3], "action": "click", "surface": "home", "ts": 1_700_000_000_000},
                    {"item_id": "late-item", "action": "save", "surface": "search", "ts": 1_700_000_001_000},
                    {"item_id": "never-seen", "action": "hide", "surface": "related", "ts": 1_700_000_002_000}]},
        {"events": [{"item_id": int(runtime.item_ids[5]), "action": "save", "surface": "home", "ts": 1_700_000_000_500}]},
    ]
    conds = conditions_for(Settings(), runtime.surfaces, runtime.actions)
    ids = {str(e["item_id"]) for u in updates for e in u["events"]}
    fast = encode_histories(updates, runtime, conds, runtime.vector_lookup(ids, fetch=fetch))
    plain = encode_histories(updates, runtime, conds, runtime.item_vectors_for(ids, fetch=fetch))
    assert fast.keys() == plain.keys()
    for name in fast:
        np.testing.assert_array_equal(fast[name], plain[name], err_msg=name)
    np.testing.assert_array_equal(fast["item_emb"][0, 1], late)  # fetched once, then cached
    assert not fast["item_emb"][0, 2].any() and fast["action"][1, 0] == 0  # unknown: zeros; left padding
    # Asked for right after each user's newest event, as the model was trained, whatever the clock says.
    np.testing.assert_array_equal(fast["request_ts"], [1_700_000_002.0, 1_700_000_000.5])


def test_an_exported_item_re_embedded_by_the_follower_is_read_as_its_new_vector(small_model_dir: Path) -> None:
    """The store searches the new vector of an item re-published with new features; the model
    must read the item the same way (ItemsFollower.on_embedded -> ModelRuntime.reembedded)."""
    runtime = ModelRuntime.load(small_model_dir, "cpu")
    item = str(runtime.item_ids[3])
    new = np.arange(runtime.dim, dtype=np.float32) + 1.0
    runtime.reembedded([item, "never-exported"], np.stack([new, new]))
    np.testing.assert_allclose(runtime.vector_lookup([item])[item], new / np.linalg.norm(new), atol=1e-6)
    assert "never-exported" not in runtime.vector_lookup(["never-exported"])  # left to the fetched cache


def test_an_id_the_store_does_not_know_is_asked_for_again_only_after_the_retry_window(
    small_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Histories full of deleted or not-yet-indexed items cost one store call per retry window,
    not one per micro-batch; an item indexed meanwhile is found at the next ask and kept."""
    clock = _fake_clock(monkeypatch)
    cfg = InferenceSettings(unknown_item_retry_s=30.0)
    runtime = ModelRuntime.load(small_model_dir, "cpu", settings=cfg)
    late = np.full(runtime.dim, 1 / np.sqrt(runtime.dim), np.float32)
    store = _RecordingStore()

    ids = {str(runtime.item_ids[0]), "not-yet-indexed"}
    for _ in range(3):
        lookup = runtime.vector_lookup(ids, fetch=store.fetch)
    assert store.asked == [["not-yet-indexed"]]  # exported ids are never asked; the unknown one once
    assert "not-yet-indexed" not in lookup

    store.vectors["not-yet-indexed"] = late
    clock[0] += 29.0
    runtime.vector_lookup(ids, fetch=store.fetch)
    assert len(store.asked) == 1  # still inside the window
    clock[0] += 2.0
    lookup = runtime.vector_lookup(ids, fetch=store.fetch)
    assert store.asked == [["not-yet-indexed"]] * 2
    np.testing.assert_array_equal(lookup["not-yet-indexed"], late)
    runtime.vector_lookup(ids, fetch=store.fetch)
    assert len(store.asked) == 2  # found: cached with the exported ones, not asked again

    forgetful = ModelRuntime.load(small_model_dir, "cpu", settings=InferenceSettings(unknown_item_retry_s=0.0))
    forgetful.vector_lookup({"gone"}, fetch=store.fetch)  # no retry window: nothing remembered
    forgetful.vector_lookup({"gone"}, fetch=store.fetch)
    assert store.asked[2:] == [["gone"], ["gone"]]


def test_a_fetched_vector_is_fetched_again_after_its_lifetime_so_a_re_embedded_item_is_picked_up(
    small_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _fake_clock(monkeypatch)
    runtime = ModelRuntime.load(small_model_dir, "cpu", settings=InferenceSettings(fetched_item_ttl_s=300.0))
    store = _RecordingStore()
    old, new = np.eye(runtime.dim, dtype=np.float32)[:2]
    store.vectors["late-item"] = old
    np.testing.assert_array_equal(runtime.vector_lookup({"late-item"}, fetch=store.fetch)["late-item"], old)

    store.vectors["late-item"] = new  # the indexer re-embedded it from new content features
    clock[0] += 299.0
    np.testing.assert_array_equal(runtime.vector_lookup({"late-item"}, fetch=store.fetch)["late-item"], old)
    clock[0] += 2.0
    np.testing.assert_array_equal(runtime.vector_lookup({"late-item"}, fetch=store.fetch)["late-item"], new)
    assert store.asked == [["late-item"]] * 2


def test_the_fetched_and_unknown_ids_kept_are_bounded_however_many_items_arrive_after_export(
    small_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_clock(monkeypatch)
    runtime = ModelRuntime.load(small_model_dir, "cpu", settings=InferenceSettings(fetched_items_max=100))
    store = _RecordingStore()
    vector = np.eye(runtime.dim, dtype=np.float32)[0]
    for batch in range(30):
        store.vectors.update({f"new-{batch}-{i}": vector for i in range(20)})
        lookup = runtime.vector_lookup({f"new-{batch}-{i}" for i in range(20)} | {f"gone-{batch}-{i}" for i in range(20)}, fetch=store.fetch)
        assert all(f"new-{batch}-{i}" in lookup for i in range(20))  # the batch being encoded is whole
    assert len(runtime.extra) == 100 and len(runtime.unknown) == 100
    assert "new-29-0" in runtime.extra and "new-0-0" not in runtime.extra  # the oldest went first


def _fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    import inference.runtime as runtime_module

    clock = [1000.0]
    monkeypatch.setattr(runtime_module.time, "monotonic", lambda: clock[0])
    return clock


class _RecordingStore:
    """The vector store's retrieve as the worker calls it, recording each ask."""

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.asked: list[list[str]] = []

    def fetch(self, ids: Any) -> dict[str, np.ndarray]:
        self.asked.append(sorted(ids))
        return {i: self.vectors[i] for i in ids if i in self.vectors}


def test_the_headroom_doubles_while_lists_come_up_short_and_settles_back_when_none_does() -> None:
    cfg = Settings(inference={"limit_headroom": 2.0, "limit_headroom_max": 16.0, "max_short_share": 0.05}).inference
    h = 2.0
    for want in (4.0, 8.0, 16.0, 16.0):  # every list short: double, up to the cap
        h = next_headroom(h, 1.0, cfg)
        assert h == want
    assert next_headroom(h, 0.05, cfg) == h  # a few short lists: hold (re-searching them is cheap)
    for _ in range(500):  # none short for a while: back down, never below the configured floor
        h = next_headroom(h, 0.0, cfg)
    assert h == 2.0


def _joint_lists_reference(codes: np.ndarray, hit_scores: np.ndarray, vectors: np.ndarray, known: np.ndarray,
                           queries: np.ndarray, m: int, scale: float, limit: int,
                           alone: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per pool of m queries: the distinct hit codes, each scored against all m (the first
    alone, for a pool marked in `alone`), or by the best cosine the store gave it where its
    vector is not known; best first, ties by code."""
    out = []
    for p in range(len(codes) // m):
        n = 1 if alone[p] else m
        scored = {}
        for q in range(m):
            for c, said in zip(codes[p * m + q].tolist(), hit_scores[p * m + q].tolist(), strict=True):
                if c < 0:
                    continue
                if known[c]:
                    scored[c] = float(np.log(np.exp(scale * (queries[p * m : p * m + n] @ vectors[c])).sum()) / scale)
                elif q < n:
                    scored[c] = max(scored.get(c, -np.inf), said)
        out.append(sorted(scored.items(), key=lambda cs: (-cs[1], cs[0]))[:limit])
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_joint_lists_rank_the_union_of_a_pools_hits_by_the_joint_score(m: int, n_pools: int, width: int, limit: int, seed: int) -> None:
    from inference.worker import joint_lists

    rng = np.random.default_rng(seed)
    vectors = _unit(rng.normal(size=(12, 8))).astype(np.float32)
    queries = _unit(rng.normal(size=(m * n_pools, 8))).astype(np.float32)
    codes = rng.integers(-1, 12, size=(m * n_pools, width))
    codes[rng.random(codes.shape) < 0.2] = -1
    hit_scores = rng.uniform(-1, 1, size=codes.shape).astype(np.float32)
    known = rng.random(12) < 0.8
    alone = rng.random(n_pools) < 0.3
    got_codes, got_scores = joint_lists(codes, hit_scores, vectors, known, queries, m, 20.0, limit, alone)
    assert got_codes.shape == got_scores.shape == (n_pools, min(limit, m * width))
    want_lists = _joint_lists_reference(codes, hit_scores, vectors, known, queries, m, 20.0, limit, alone)
    for row_codes, row_scores, want in zip(got_codes, got_scores, want_lists, strict=True):
        kept = row_codes >= 0
        assert not kept[len(want):].any() and np.isneginf(row_scores[~kept]).all()
        assert row_codes[kept].tolist() == [c for c, _ in want]
        np.testing.assert_allclose(row_scores[kept], [s for _, s in want], rtol=1e-5, atol=1e-5)


def test_the_workers_joint_score_is_the_models() -> None:
    import torch

    from inference import model, worker

    cosines = np.random.default_rng(0).uniform(-1, 1, size=(5, 7, 4)).astype(np.float32)
    np.testing.assert_allclose(worker.joint_score(cosines, 17.0), model.joint_score(torch.from_numpy(cosines), 17.0).numpy(), rtol=1e-6)


@pytest.fixture
def joint_model_dir(small_model_dir: Path, tmp_path: Path) -> Path:
    """The small model with joint queries: the worker reads that, and the scale, from meta.json
    (the ONNX graph is the same whichever way a model's queries are merged)."""
    import json
    import shutil

    out = Path(shutil.copytree(small_model_dir, tmp_path / "joint-model"))
    meta = json.loads((out / "meta.json").read_text())
    meta["config"]["joint_queries"] = True
    meta["logit_scale"] = 15.0
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_a_joint_models_lists_are_each_outcomes_union_ranked_by_the_joint_score_then_shared_fairly(
    joint_model_dir: Path, tmp_path: Path
) -> None:
    """Real session, real Edge store: per (user, surface), each outcome's M queries' full-budget
    hits ranked by their joint score over all M, the outcomes' lists then merged by the fair
    share of their weights. Nothing is folded: near-duplicate embeddings still score together.
    A user below inference.multi_query_min_history gets each outcome's first query's list."""
    settings = Settings(inference={"candidates_per_surface": 20, "multi_query_min_history": 8},
                        vector_store={"path": tmp_path / "qdrant"})
    runtime = ModelRuntime.load(joint_model_dir, "cpu")
    assert runtime.joint_queries and runtime.logit_scale == 15.0
    table = ItemTable.load(joint_model_dir)
    surfaces = settings.events.surfaces
    rng = np.random.default_rng(1)
    store = open_store(settings, dim=runtime.dim)
    try:
        store.upsert([ItemRecord(i, tuple(surfaces)) for i in table.ids], table.embeddings)
        worker = Worker.offline(settings, runtime, store)
        updates = [{"user_id": f"u{u}", "version": 1, "events": [
            {"item_id": table.ids[int(rng.integers(0, len(table.ids)))], "action": "click", "surface": "home",
             "ts": 1_700_000_000_000 + 1000 * j} for j in range(int(rng.integers(1, 20)))]} for u in range(12)]
        got = worker.compute(updates)
        queries = runtime.generate(worker.encode(updates))  # [B, Q, M, D]
        vectors = dict(zip(table.ids, table.embeddings, strict=True))
        single = single_query_users(updates, runtime.max_len, settings.inference)
        assert 0 < single.sum() < len(updates)
        for u, update in enumerate(updates):
            recent = sorted({e["item_id"] for e in update["events"]})
            for surface in surfaces:
                lists, budgets = [], []
                for qi, cond in enumerate(worker.conditions):
                    if cond.surface != surface:
                        continue
                    hits = store.query_batch(queries[u, qi], 20, [surface] * queries.shape[2], [recent] * queries.shape[2])
                    if single[u]:
                        lists.append(hits[0])
                    else:
                        found = {item for h in hits for item, _ in h}
                        scored = [(item, float(np.log(np.exp(15.0 * (queries[u, qi] @ vectors[item])).sum()) / 15.0)) for item in found]
                        lists.append(sorted(scored, key=lambda s: -s[1])[:20])
                    budgets.append(20 * cond.weight)
                items, scores = merge_hits(lists, budgets, 20)
                assert got[u][surface]["items"] == items
                np.testing.assert_allclose(got[u][surface]["scores"], scores, atol=1e-5)
        assert worker.last_plan_size[1] == queries.shape[0] * queries.shape[1] * queries.shape[2]  # none folded
    finally:
        store.close()
