"""The worker's pure steps: coalescing, the outcome-weighted query plan, the merge."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.worker import Condition, coalesce, conditions_for, merge_hits, plan_queries, single_query_users
from recsys.settings import InferenceSettings, Settings


def test_coalesce_keeps_newest_version_per_user() -> None:
    updates = [
        {"user_id": 1, "version": 3}, {"user_id": "2", "version": 1},
        {"user_id": 1, "version": 5}, {"user_id": 1, "version": 4},
    ]
    assert coalesce(updates) == [{"user_id": 1, "version": 5}, {"user_id": "2", "version": 1}]


def test_conditions_follow_surface_weights() -> None:
    settings = Settings(inference=InferenceSettings(outcome_weights={"home": {"save": 7, "click": 3}, "search": {}}))
    conds = conditions_for(settings, ["home", "search"], ["click", "save", "hide"])
    assert conds == [Condition("home", "save", 0.7), Condition("home", "click", 0.3), Condition("search", "click", 1.0)]
    with pytest.raises(ValueError, match="outcomes the model lacks"):
        conditions_for(Settings(inference=InferenceSettings(outcome_weights={"home": {"buy": 1}})), ["home"], ["click"])
    with pytest.raises(ValueError, match=r"neither configured nor the model's: \['Home'\]"):
        conditions_for(Settings(inference=InferenceSettings(outcome_weights={"Home": {"save": 1}})), ["home"], ["click", "save"])
    with pytest.raises(ValueError, match=r"aims at \['hide'\]"):
        conditions_for(Settings(inference=InferenceSettings(outcome_weights={"home": {"hide": 1}})), ["home"], ["click", "hide"])


def test_a_surface_without_weights_aims_at_clicks_never_at_a_negative_action() -> None:
    """With the model's actions ordered hide-first, an unweighted surface aimed at `hide`."""
    settings = Settings(events={"surfaces": ["feed"], "actions": ["hide", "click", "save"]})
    assert conditions_for(settings, ["feed"], ["hide", "click", "save"]) == [Condition("feed", "click", 1.0)]
    settings = Settings(events={"surfaces": ["feed"], "actions": ["hide", "view", "save"]})
    assert conditions_for(settings, ["feed"], ["hide", "view", "save"]) == [Condition("feed", "view", 1.0)]
    with pytest.raises(ValueError, match="no action but train.negative_actions"):
        conditions_for(Settings(events={"surfaces": ["feed"], "actions": ["hide"]}), ["feed"], ["hide"])


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_plan_merges_near_identical_embeddings_and_sums_budgets() -> None:
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(1, 8)))[0]
    other = _unit(rng.normal(size=(1, 8)))[0]
    # one user, two conditions on one surface, M=2: three copies of `base`, one `other`
    queries = np.stack([np.stack([base, base]), np.stack([base, other])])[None]
    conds = [Condition("home", "save", 0.5), Condition("home", "click", 0.5)]
    (plan,) = plan_queries(queries, conds, budget=100, merge_cosine=0.99)
    budgets = sorted(b for _, b in plan["home"])
    assert budgets == [25.0, 75.0]  # 3 x 25 merged, 1 x 25 alone; the total is preserved
    (unmerged,) = plan_queries(queries, conds, budget=100, merge_cosine=1.01)
    assert len(unmerged["home"]) == 4


def test_a_single_query_user_gets_each_outcome_s_first_embedding_with_its_whole_budget() -> None:
    rng = np.random.default_rng(1)
    queries = _unit(rng.normal(size=(2, 2, 4, 8)))  # two users, two outcomes, M = 4, all distinct
    conds = [Condition("home", "save", 0.7), Condition("home", "click", 0.3)]
    light, heavy = plan_queries(queries, conds, budget=100, merge_cosine=0.98, single=np.array([True, False]))
    assert [b for _, b in light["home"]] == pytest.approx([70.0, 30.0])
    np.testing.assert_array_equal(light["home"][0][0], queries[0, 0, 0])
    np.testing.assert_array_equal(light["home"][1][0], queries[0, 1, 0])
    assert [b for _, b in heavy["home"]] == pytest.approx([17.5] * 4 + [7.5] * 4)


def test_users_with_short_model_inputs_are_the_single_query_ones() -> None:
    updates = [{"events": [{}] * n} for n in (3, 10, 80)]
    cfg = InferenceSettings(multi_query_min_history=10)
    assert single_query_users(updates, max_len=50, cfg=cfg).tolist() == [True, False, False]
    assert single_query_users(updates, max_len=5, cfg=cfg).tolist() == [True, True, True]  # input is cut to max_len
    assert single_query_users(updates, max_len=50, cfg=InferenceSettings()) is None


def test_merge_is_fair_share_and_deduplicated() -> None:
    a = [(f"a{i}", 1.0 - i / 100) for i in range(10)]
    b = [(f"b{i}", 0.5) for i in range(10)]
    items, scores = merge_hits([a, b], [3.0, 1.0], limit=8)
    assert sum(i.startswith("a") for i in items) == 6 and sum(i.startswith("b") for i in items) == 2
    dup = [("x", 0.9), ("y", 0.8)]
    items, _ = merge_hits([dup, dup], [1.0, 1.0], limit=10)
    assert items == ["x", "y"]


@given(
    lists=st.lists(st.lists(st.integers(0, 30), max_size=20), min_size=1, max_size=5),
    limit=st.integers(1, 40),
)
def test_merge_properties(lists: list[list[int]], limit: int) -> None:
    hit_lists = [[(i, 1.0) for i in dict.fromkeys(hits)] for hits in lists]
    items, scores = merge_hits(hit_lists, [1.0] * len(lists), limit)
    universe = {str(i) for hits in lists for i in hits}
    assert len(items) == len(set(items)) == min(limit, len(universe))
    assert set(items) <= universe and len(scores) == len(items)
