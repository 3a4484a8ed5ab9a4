"""The tiny model learns the planted structure: beats popularity, follows the outcome it is
conditioned on, and embeds an item it never saw from its content features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gr_helpers import HELD_OUT, N_CLUSTERS, N_ITEMS, features_of
from planted import is_save_item

from inference.checkpoint import Checkpoint
from inference.data import EventLog, Split
from inference.evaluate import (
    generate,
    generate,
    item_matrix,
    merged_candidates,
    popularity_metrics,
    ranking_metrics,
)
from inference.hashing import UNKNOWN_BUCKET
from inference.model import GenerativeRetriever

Trained = tuple[GenerativeRetriever, Checkpoint, Path]


def test_tiny_model_beats_popularity(tiny_model: Trained, planted_log: EventLog, planted_split: Split) -> None:
    model, _, _ = tiny_model
    rows = planted_split.test[planted_log.action[planted_split.test] != planted_log.actions.index("hide") + 1]
    ours = ranking_metrics(model, planted_log, rows, ks=(10,))
    pop = popularity_metrics(planted_log, rows, planted_split.train_end, ks=(10,))
    assert ours["recall@10"] > pop["recall@10"] + 0.2, (ours, pop)
    assert ours["ndcg@10"] > pop["ndcg@10"] * 1.5, (ours, pop)


def test_a_target_seen_before_is_not_masked_away_by_the_history(tiny_model: Trained, planted_log: EventLog) -> None:
    """Excluding the history removes the other items the user saw, never the target itself."""
    model, _, _ = tiny_model
    starts = planted_log.offsets[planted_log.user]
    rows = np.array([r for r in range(len(planted_log.item)) if r > starts[r]
                     and planted_log.item[r] in planted_log.item[starts[r] : r]])
    assert len(rows) > 10  # the planted users revisit items
    incl = ranking_metrics(model, planted_log, rows, ks=(10,))
    excl = ranking_metrics(model, planted_log, rows, ks=(10,), exclude_history=True)
    assert excl["recall@10"] >= incl["recall@10"] > 0
    # And the other history items do leave the ranking: the target climbs above them.
    assert excl["ndcg@10"] > incl["ndcg@10"] + 0.05, (incl, excl)


def _item_ids(log: EventLog) -> np.ndarray:
    return np.asarray([int(i[1:]) for i in log.item_ids])


def test_outcome_conditioning_moves_queries_to_the_matching_items(
    tiny_model: Trained, planted_log: EventLog, planted_split: Split
) -> None:
    model, _, _ = tiny_model
    rows = planted_split.test
    items = item_matrix(model, planted_log.features)
    save_like = torch.as_tensor([is_save_item(i, N_CLUSTERS) for i in _item_ids(planted_log)])

    def queries(outcome: str) -> torch.Tensor:
        (qb,) = list(generate(model, planted_log, rows, items, outcome=outcome, batch_size=len(rows)))
        return qb.queries

    q_save, q_click, q_none = queries("save"), queries("click"), queries("none")
    assert (q_save - q_click).abs().max() > 0.02
    assert (q_save - q_none).abs().max() > 0.01

    # The planted save-items fill more of the top-3 under "save" than under "click" ...
    def save_share(q: torch.Tensor) -> float:
        top = (q @ items.T).amax(dim=1).topk(3, dim=1).indices
        return float(save_like[top].float().mean())

    assert save_share(q_save) > save_share(q_click) + 0.05
    # ... and conditioning on the target's true outcome ranks it better than the wrong one.
    for target, wrong in (("save", "click"), ("click", "save")):
        right = ranking_metrics(model, planted_log, rows, ks=(3,), outcome=target, target_action=target)
        other = ranking_metrics(model, planted_log, rows, ks=(3,), outcome=wrong, target_action=target)
        assert right["ndcg@3"] > other["ndcg@3"], (target, right, other)


def test_unseen_item_is_embedded_from_its_content_features(tiny_model: Trained, planted_log: EventLog) -> None:
    model, _, _ = tiny_model
    known = item_matrix(model, planted_log.features).numpy()
    known_cluster = _item_ids(planted_log) % N_CLUSTERS
    held = sorted(HELD_OUT)
    assert not {f"i{i}" for i in held} & set(planted_log.item_ids)  # really never seen
    with torch.no_grad():
        emb = model.items(
            torch.full((len(held),), UNKNOWN_BUCKET, dtype=torch.int64), torch.as_tensor(features_of(held))
        ).numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sims = emb @ known.T  # (H, N)
    for row, item in enumerate(held):
        same = known_cluster == item % N_CLUSTERS
        top5 = np.argsort(-sims[row])[:5]
        assert same[top5].sum() >= 4, (item, known_cluster[top5])
        assert sims[row, same].mean() > sims[row, ~same].mean() + 0.2
    # ...and different clusters' unseen items get different embeddings.
    assert (emb @ emb.T)[~np.eye(len(held), dtype=bool)].max() < 0.95


def test_planted_catalogue_is_complete(planted_log: EventLog) -> None:
    assert planted_log.n_items == N_ITEMS - len(HELD_OUT)


def test_the_popularity_baseline_leaves_the_history_out_as_the_model_s_ranking_does(
    planted_log: EventLog, planted_split: Split
) -> None:
    """Against a brute-force ranking: training counts, the user's other earlier items removed
    (a target seen before stays), rank of the target among what is left."""
    rows = planted_split.test
    counts = np.bincount(np.concatenate([planted_log.item[s:e] for s, e in zip(planted_log.offsets[:-1], planted_split.train_end)]),
                         minlength=planted_log.n_items + 1)[1:]
    order = np.argsort(-counts, kind="stable")  # item row by popularity, ties by index
    hits = 0
    for r in rows:
        user = planted_log.user[r]
        earlier = set((planted_log.item[planted_log.offsets[user] : r] - 1).tolist())
        target = planted_log.item[r] - 1
        ranking = [i for i in order.tolist() if i == target or i not in earlier]
        hits += ranking.index(target) < 10
    got = popularity_metrics(planted_log, rows, planted_split.train_end, ks=(10,), exclude_history=True)
    assert got["recall@10"] == pytest.approx(hits / len(rows))
    assert got["recall@10"] > popularity_metrics(planted_log, rows, planted_split.train_end, ks=(10,))["recall@10"]


def test_users_with_short_histories_get_the_first_query_s_list_alone(tiny_model: Trained, planted_log: EventLog, planted_split: Split) -> None:
    """`merged_candidates(single_below=n)` is the worker's inference.multi_query_min_history:
    below n events of model input, the first query's top list; otherwise the M queries' merge."""
    model, _, _ = tiny_model
    assert model.cfg.num_queries > 1
    rows = planted_split.test[:40]
    lengths = np.minimum(rows - planted_log.offsets[planted_log.user[rows]], model.cfg.max_len)
    cut = int(np.median(lengths)) + 1
    shared = merged_candidates(model, planted_log, rows, 20, outcome="none")
    alone = merged_candidates(model, planted_log, rows, 20, outcome="none", single_below=model.cfg.max_len + 1)
    mixed = merged_candidates(model, planted_log, rows, 20, outcome="none", single_below=cut)
    items = item_matrix(model, planted_log.features)
    (first, *_) = generate(model, planted_log, rows[:1], items, outcome="none")
    earlier = int(rows[0] - planted_log.offsets[planted_log.user[rows[0]]])  # masked out of the list
    assert set(alone[0].tolist()) <= set((first.queries[0, 0] @ items.T).topk(20 + earlier).indices.numpy() + 1)
    assert any(not np.array_equal(a, s) for a, s in zip(alone, shared))  # the M queries do reach other items
    for short, a, s, m in zip(lengths < cut, alone, shared, mixed):
        np.testing.assert_array_equal(m, a if short else s)


def test_queries_do_not_know_when_their_target_happens(tiny_model: Trained, planted_log: EventLog, planted_split: Split) -> None:
    """The worker computes a user's lists right after their newest action, before anyone knows
    when the next one comes: evaluation must ask the model the same, not at the target's time."""
    import dataclasses

    model, info, _ = tiny_model
    items = item_matrix(model, info.features)
    last = planted_split.test[planted_split.test + 1 == planted_log.offsets[planted_log.user[planted_split.test] + 1]]
    rows = last[:64]  # users' newest events: moving them changes no history
    later = planted_log.ts.copy()
    later[rows] += 30 * 86400.0  # every target a month later
    moved = dataclasses.replace(planted_log, ts=later)
    (now,) = list(generate(model, planted_log, rows, items, batch_size=len(rows)))
    (then,) = list(generate(model, moved, rows, items, batch_size=len(rows)))
    torch.testing.assert_close(now.queries, then.queries)
