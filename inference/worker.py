"""The ONNX Runtime worker: `user-updates` in, fresh per-surface `candidates` out.

An update's journey, top to bottom (`Worker.process`):

    poll `user-updates`           micro-batch: up to max_batch users or max_wait_ms
    coalesce                      only the newest version of each user is worth computing
    encode_histories              left-padded arrays: item embeddings, actions, surfaces, times
    runtime.generate              ONE ONNX Runtime call: every surface x outcome x M queries
    plan_batch                    each surface's budget split across outcomes by its weights;
                                  near-identical query embeddings merged, budgets summed (PinRec);
                                  each query asks for headroom x its share, not the budget
                                  (the headroom adapts: next_headroom)
    store.query_arrays            ONE vector-store call for the whole micro-batch, the user's
                                  recent and hidden items excluded, surface eligibility filtered
    merge_batch                   fair-share interleave of the queries' lists (merge_key), de-dup,
                                  top-N; a surface whose cut lists might hide a candidate is
                                  searched again at the full budget, so the lists are exactly
                                  what full-budget queries give (exact search; under HNSW a
                                  cut list need not be a prefix of the longer one)
    (joint_lists)                 a model with joint queries: each outcome's M queries search at
                                  the full budget, and their hits become one list ranked by the
                                  joint score over all M (model.joint_score); the fair share
                                  then runs across outcomes only. Nothing is folded, but users
                                  below multi_query_min_history get each outcome's first query
                                  alone, as with a model without joint queries
    produce `candidates`          compacted, key = user id
    commit offsets                only after the candidates write is acknowledged, so a crash
                                  re-delivers (and recomputes) rather than loses an update

Every step after the model works on arrays for the whole micro-batch: `plan_queries` and
`merge_hits` are the per-user references they are tested against (tests/worker).

In the embedded default the Qdrant Edge shard allows one process, so this worker also
follows the `items` topic, in a thread beside the micro-batches: store calls are serialised,
and a batch may read an item's vector just before or just after its re-embedding.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from kafka.errors import KafkaError, MessageSizeTooLargeError

from inference.guards import RetryingStore, StoreCallFailed, StoreUnavailable, call_with_retry, clean_update, is_transient
from inference.runtime import ModelRuntime, VectorLookup, check_same_export
from recsys.kafka_clients import PendingCommits, group_consumer
from recsys.settings import InferenceSettings, Settings, get_settings
from recsys.topics import POPULAR_KEY
from vector_store.base import VectorStore
from vector_store.exact import product

log = logging.getLogger(__name__)

__all__ = [
    "Condition",
    "Worker",
    "coalesce",
    "conditions_for",
    "MergedLists",
    "QueryPlan",
    "encode_histories",
    "main",
    "joint_lists",
    "merge_batch",
    "merge_hits",
    "merge_key",
    "plan_batch",
    "plan_queries",
    "query_limits",
]


@dataclass(frozen=True)
class Condition:
    """One (surface, outcome) the model is asked to generate for, with its budget share."""

    surface: str
    outcome: str
    weight: float


def conditions_for(settings: Settings, surfaces: Sequence[str], actions: Sequence[str]) -> list[Condition]:
    """The conditions of every surface, in the model's surface order; weights sum to 1 per surface."""
    out: list[Condition] = []
    # A typo ("Home") would leave that surface aiming at clicks without a word. (A configured
    # surface the model was not trained on is no typo: it has no conditions to weigh.)
    if unknown_surfaces := set(settings.inference.outcome_weights) - set(surfaces) - set(settings.events.surfaces):
        raise ValueError(f"outcome_weights names surfaces that are neither configured nor the model's: "
                         f"{sorted(unknown_surfaces)}; the model has {list(surfaces)}")
    for surface in surfaces:
        weights = {o: w for o, w in settings.inference.outcome_weights.get(surface, {}).items() if w > 0}
        unknown = set(weights) - set(actions)
        if unknown:
            raise ValueError(f"outcome_weights[{surface!r}] names outcomes the model lacks: {sorted(unknown)}")
        if negative := set(weights) & set(settings.train.negative_actions):
            raise ValueError(f"outcome_weights[{surface!r}] aims at {sorted(negative)}, which users do to reject "
                             "an item (train.negative_actions): give it weight 0")
        if not weights:  # a surface with no stated goal aims at clicks, else the first positive action
            positive = [a for a in actions if a not in settings.train.negative_actions]
            if not positive:
                raise ValueError(f"surface {surface!r} has no outcome_weights and the model has no action but "
                                 f"train.negative_actions ({list(actions)}) to aim at")
            weights = {"click" if "click" in positive else positive[0]: 1.0}
        total = sum(weights.values())
        out += [Condition(surface, o, w / total) for o, w in weights.items()]
    return out


def coalesce(updates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only the newest version of each user's update (first-seen user order; of equal
    versions, the later record)."""
    latest: dict[str, dict[str, Any]] = {}
    for update in updates:
        user = str(update["user_id"])
        if user not in latest or update["version"] >= latest[user]["version"]:  # equal: the later record
            latest[user] = update
    return list(latest.values())


_EVENT_FIELDS = tuple(itemgetter(name) for name in ("item_id", "action", "surface", "ts"))
_ITEM_ID = _EVENT_FIELDS[0]


def recent_items(updates: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Per user, the distinct item ids of the update's events as text, oldest first: the items
    excluded from that user's candidates, and (their union) the histories' vectors to look up.
    One C-level pass per user (map/itemgetter): this runs for every event of a batch."""
    return [list(dict.fromkeys(map(str, map(_ITEM_ID, u["events"])))) for u in updates]


def excluded_items(updates: Sequence[dict[str, Any]], recent: Sequence[list[str]]) -> list[list[str]]:
    """Per user, what their candidates must not hold: the items of their recent events and
    every item they hid (`clean_update`'s "hidden": hides that left the sequence included), and
    the items of recent events the model does not read ("unread_items")."""
    out = []
    for update, ids in zip(updates, recent, strict=True):
        more = [*update.get("hidden", ()), *update.get("unread_items", ())]
        if more:
            seen = set(ids)
            ids = ids + [i for i in dict.fromkeys(map(str, more)) if i not in seen]
        out.append(ids)
    return out


def encode_histories(
    updates: Sequence[dict[str, Any]],
    runtime: ModelRuntime,
    conditions: Sequence[Condition],
    vectors: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The user model's inputs for a micro-batch (see inference/export.py for the contract).

    Histories are cut to the model's max_len newest events and left-padded; items without
    an embedding (never exported nor indexed) keep their action/surface/time but a zero vector.
    """
    action_ix = {a: i + 1 for i, a in enumerate(runtime.actions)}
    surface_ix = {s: i + 1 for i, s in enumerate(runtime.surfaces)}
    histories = [u["events"][-runtime.max_len :] for u in updates]
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    b, t, d = len(updates), max(1, int(lengths.max(initial=0))), runtime.dim
    events = [e for h in histories for e in h]  # all events, user by user
    n = len(events)
    # Event j of the flat list sits at (row[j], col[j]) of the left-padded [B, T] grid.
    row = np.repeat(np.arange(b), lengths)
    col = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths - (t - lengths), lengths)
    # The four fields as columns, one C-level map per field (this runs for every event of a
    # batch; 4x cheaper than one pass of 4-tuples transposed by zip).
    item_col, action_col, surface_col, ts_col = (list(map(field, events)) for field in _EVENT_FIELDS)
    ids = list(map(str, item_col))
    uniq = list(dict.fromkeys(ids))
    if isinstance(vectors, VectorLookup):  # the runtime's table: one gather, no per-id arrays
        table, codes = vectors.table(uniq)
        code_of = dict(zip(uniq, codes, strict=True))  # item id -> row of `table` (0: no vector)
    else:
        code_of = {}
        found: list[np.ndarray] = []
        for item in uniq:
            vector = vectors.get(item)
            if vector is not None:
                found.append(vector)
                code_of[item] = len(found)
        table = np.zeros((len(found) + 1, d), np.float32)
        if found:
            table[1:] = np.stack(found)
    item_emb = np.zeros((b, t, d), np.float32)
    action = np.zeros((b, t), np.int64)
    surface = np.zeros((b, t), np.int64)
    event_ts = np.zeros((b, t), np.float64)
    item_emb[row, col] = table[np.fromiter(map(code_of.get, ids, repeat(0)), dtype=np.int64, count=n)]
    action[row, col] = np.fromiter(map(action_ix.get, action_col, repeat(0)), dtype=np.int64, count=n)
    surface[row, col] = np.fromiter(map(surface_ix.get, surface_col, repeat(0)), dtype=np.int64, count=n)
    event_ts[row, col] = np.array(ts_col, dtype=np.int64) / 1000.0
    q = len(conditions)
    return {
        "item_emb": item_emb,
        "action": action,
        "surface": surface,
        "event_ts": event_ts,
        # The request is the newest event's time, as in training: the lists are computed for
        # right after it. The wall clock would feed a worker catching up on a backlog gaps the
        # model never saw in training.
        "request_ts": event_ts[:, -1].copy(),
        "target_surface": np.tile(np.array([surface_ix[c.surface] for c in conditions], np.int64)
                                  * runtime.conditioned_on("surface"), (b, 1)).reshape(b, q),
        "target_outcome": np.tile(np.array([action_ix[c.outcome] for c in conditions], np.int64)
                                  * runtime.conditioned_on("outcome"), (b, 1)).reshape(b, q),
    }


def plan_queries(
    queries: np.ndarray, conditions: Sequence[Condition], budget: int, merge_cosine: float,
    single: np.ndarray | None = None,
) -> list[dict[str, list[tuple[np.ndarray, float]]]]:
    """Per user, per surface: the ANN queries to run, each with its share of the budget.

    ``queries`` is [B, Q, M, D]. A surface's budget is split across its outcomes by weight
    and evenly across the M embeddings of an outcome; embeddings whose cosine exceeds
    ``merge_cosine`` with an already kept one are merged into it (budgets summed), as PinRec
    does, so duplicates do not cost an ANN query each. A user marked in ``single`` ([B] bool)
    gets one query per outcome: its other embeddings' budgets go to the first one's.
    """
    b, _, m, _ = queries.shape
    plans: list[dict[str, list[tuple[np.ndarray, float]]]] = []
    for row in range(b):
        per_surface: dict[str, list[tuple[np.ndarray, float]]] = {}
        for qi, cond in enumerate(conditions):
            kept = per_surface.setdefault(cond.surface, [])
            share = budget * cond.weight / m
            first = None  # where this outcome's first embedding went
            for slot, vector in enumerate(queries[row, qi]):
                if slot > 0 and single is not None and single[row]:
                    kept[first] = (kept[first][0], kept[first][1] + share)
                    continue
                for k, (other, other_budget) in enumerate(kept):
                    if float(product(vector, other)) > merge_cosine:
                        kept[k] = (other, other_budget + share)
                        first = k if first is None else first
                        break
                else:
                    kept.append((vector, share))
                    first = len(kept) - 1 if first is None else first
        plans.append(per_surface)
    return plans


@dataclass(frozen=True)
class QueryPlan:
    """A micro-batch's ANN queries (`plan_queries` for every user at once, as arrays),
    ordered user by user, surface by surface, kept queries in the reference's order."""

    vectors: np.ndarray  # [K, D] float32 unit query embeddings
    budgets: np.ndarray  # [K] float64: each query's share of its surface's candidate budget
    user: np.ndarray  # [K] int64: the query's row of the micro-batch
    surface: np.ndarray  # [K] int64: index into `surfaces`
    surfaces: tuple[str, ...]  # the conditions' surfaces, in order
    generated: int  # query embeddings the model produced, before near-duplicates were merged

    @property
    def group(self) -> np.ndarray:
        """[K] int64: the (user, surface) list each query feeds, user * S + surface."""
        return self.user * len(self.surfaces) + self.surface

    @property
    def n_groups(self) -> int:
        return (int(self.user.max()) + 1 if len(self.user) else 0) * len(self.surfaces)


def plan_batch(
    queries: np.ndarray, conditions: Sequence[Condition], budget: int, merge_cosine: float,
    single: np.ndarray | None = None,
) -> QueryPlan:
    """`plan_queries` vectorised over the batch: the same queries, budgets and order.

    Per surface, the greedy merge walks its K = outcomes x M embeddings once, for all users at
    a time: embedding j joins the first kept embedding i < j whose cosine exceeds
    ``merge_cosine`` (a [B, K, K] Gram matrix), else it is kept itself; for a user in
    ``single`` an outcome's later embeddings join wherever its first one went.
    """
    b, _, m, _ = queries.shape
    surfaces = tuple(dict.fromkeys(c.surface for c in conditions))
    parts: list[tuple[np.ndarray, ...]] = []
    for si, name in enumerate(surfaces):
        cols = [qi for qi, c in enumerate(conditions) if c.surface == name]
        x = queries[:, cols].reshape(b, len(cols) * m, -1)  # [B, K, D]: condition-major, as the reference walks
        k = x.shape[1]
        share = np.repeat([budget * conditions[qi].weight / m for qi in cols], m)  # [K]
        gram = product(x, x.transpose(0, 2, 1))  # [B, K, K]
        kept = np.zeros((b, k), dtype=bool)
        kept[:, 0] = True
        target = np.zeros((b, k), dtype=np.int64)
        forced = np.zeros(b, dtype=bool) if single is None else np.asarray(single, dtype=bool)
        for j in range(1, k):
            joins = (gram[:, :j, j] > merge_cosine) & kept[:, :j]
            has = joins.any(axis=1)
            target[:, j] = np.where(has, joins.argmax(axis=1), j)
            if j % m:  # not an outcome's first embedding: a single-query user folds it into that one
                target[forced, j] = target[forced, j - j % m]
                has = has | forced
            kept[:, j] = ~has
        # Budgets summed into the kept embedding, in j order (bincount adds in input order).
        into = (np.arange(b)[:, None] * k + target).ravel()
        budgets = np.bincount(into, weights=np.tile(share, b), minlength=b * k).reshape(b, k)
        users, slots = np.nonzero(kept)
        parts.append((x[users, slots], budgets[users, slots], users, np.full(len(users), si)))
    vectors, budgets, users, surface = (np.concatenate(p) for p in zip(*parts, strict=True))
    order = np.lexsort((surface, users))  # stable: kept order within (user, surface)
    return QueryPlan(
        vectors=np.ascontiguousarray(vectors[order], dtype=np.float32),
        budgets=budgets[order].astype(np.float64),
        user=users[order].astype(np.int64),
        surface=surface[order].astype(np.int64),
        surfaces=surfaces,
        generated=int(np.prod(queries.shape[:3])),
    )


def single_query_users(updates: Sequence[dict[str, Any]], max_len: int, cfg: InferenceSettings) -> np.ndarray | None:
    """[B] bool: the users whose model input (their newest ``max_len`` events) is shorter than
    ``cfg.multi_query_min_history``; None when every user gets all M queries."""
    if cfg.multi_query_min_history <= 0:
        return None
    return np.array([min(len(u["events"]), max_len) < cfg.multi_query_min_history for u in updates])


def query_limits(budgets: np.ndarray, budget: int, headroom: float) -> np.ndarray:
    """Hits to ask of each query: ``headroom`` times its share, at least 1, at most the
    surface's budget (what every query asked for before per-query limits)."""
    return np.clip(np.ceil(budgets * headroom), 1, budget).astype(np.int64)


def next_headroom(headroom: float, short_share: float, cfg: InferenceSettings) -> float:
    """The limit headroom for the next micro-batch, from the share of (user, surface) lists the
    last one had to search again at the full budget.

    How deep each query must be read depends on how much the lists of one surface overlap,
    i.e. on the model: with near-parallel queries nearly every list came up short at 2x and
    every search ran twice (a freshly trained small model: 1.25 vs 0.71 ms of CPU per user at
    4x). So the headroom doubles while more than ``cfg.max_short_share`` of the lists are
    short, up to ``cfg.limit_headroom_max``, and decays slowly back towards
    ``cfg.limit_headroom`` while none is (a larger k costs TopK and merge time for nothing).
    """
    if short_share > cfg.max_short_share:
        return min(headroom * 2.0, cfg.limit_headroom_max)
    if short_share == 0.0:
        return max(cfg.limit_headroom, headroom * 0.98)
    return headroom


def merge_key(rank: Any, budget: Any) -> Any:
    """Where the hit at ``rank`` of a query with ``budget`` is placed in its surface's merged
    list (lower first; ties go to the earlier query). Fair share: rank / budget, so each query
    contributes in proportion to its budget. Scalars or arrays; `merge_hits` and `merge_batch`
    both order by it, and must stay consistent (a merge consumes each list in rank order).
    Rounded to multiples of 2^-20, so keys equal but for float noise (3/(100/7) vs 15/(500/7))
    are one tie, broken by query order in both, and `merge_batch` can sort them as integers."""
    return np.rint(rank / np.maximum(budget, 1e-9) * _KEY_UNITS) / _KEY_UNITS


_KEY_UNITS = float(1 << 20)  # merge keys are whole multiples of 1 / _KEY_UNITS


def merge_hits(
    hit_lists: Sequence[Sequence[tuple[Any, float]]], budgets: Sequence[float], limit: int
) -> tuple[list[str], list[float]]:
    """Merge the ranked lists of one surface's queries into its top ``limit``.

    Fair share: the hit at rank r of a query with budget w is placed at r / w, so every
    query contributes in proportion to its budget and the lists fill each other's gaps;
    an item found by several queries keeps its first (best-placed) occurrence.
    """
    placed: list[tuple[float, int, Any, float]] = []
    for qi, (hits, weight) in enumerate(zip(hit_lists, budgets)):
        placed += [(float(merge_key(rank, weight)), qi, item, score) for rank, (item, score) in enumerate(hits)]
    placed.sort(key=lambda p: (p[0], p[1]))
    items: list[str] = []
    scores: list[float] = []
    seen: set[str] = set()
    for _, _, item, score in placed:
        key = str(item)
        if key in seen:
            continue
        seen.add(key)
        items.append(key)
        scores.append(float(score))
        if len(items) == limit:
            break
    return items, scores


@dataclass(frozen=True)
class MergedLists:
    """`merge_batch`'s answer: every group's merged list, group after group."""

    codes: np.ndarray  # [total] int64 item codes (BatchHits.codes values), best-placed first
    scores: np.ndarray  # [total] float32
    counts: np.ndarray  # [G] int64: items of each group (its slice of codes / scores)
    short: np.ndarray  # [G] bool: a query's list was cut before the merge was done with it


def merge_batch(
    codes: np.ndarray, scores: np.ndarray, budgets: np.ndarray, group: np.ndarray,
    n_groups: int, limits: np.ndarray, limit: int,
) -> MergedLists:
    """`merge_hits` for every (user, surface) group of a micro-batch at once, as arrays.

    ``codes`` / ``scores`` [K, L] are the queries' hits (code -1: none), ``group`` [K] is
    sorted (the queries of a group are contiguous, in merge order). Per group: all hits ordered
    by (merge_key, query), first occurrence of each item kept, the first ``limit`` taken.

    A query asked for ``limits[k]`` < ``limit`` hits and got them all may have had more: its
    group is `short` when the merge read that query's last hit before it filled the group
    (what a longer list would have placed there is unknown). Groups not short are exactly what
    lists of ``limit`` hits give; a short group is searched again at the full limit.
    """
    nq, width_l = codes.shape
    flat = codes.ravel()
    hit = np.flatnonzero(flat >= 0)  # query by query, rank ascending
    qk, rank = np.divmod(hit, max(width_l, 1))
    g_hit = group[qk]
    key = (merge_key(rank, budgets[qk]) * _KEY_UNITS).astype(np.int64)  # whole units already: exact
    # One stable sort on (group, key) packed into one int64 (the group in the high bits): equal
    # pairs keep query order (`group` is sorted), as merge_hits breaks ties. Two keys if it
    # would not fit.
    bits = int(key.max(initial=0)).bit_length()
    if int(n_groups).bit_length() + bits <= 62:
        order = np.argsort((g_hit.astype(np.int64) << bits) | key, kind="stable")
    else:
        order = np.lexsort((key, g_hit))
    g_sorted = g_hit[order]
    at_hit = hit[order]  # merge position -> flat index into codes / scores
    c_sorted = flat[at_hit]
    n = len(order)
    positions = np.arange(n)
    # First occurrence of each (group, item) in merge order: sort (pair, position) packed into
    # one int64 and keep each pair's lowest position. An unstable SIMD sort of one key is
    # 2-3x cheaper here than np.unique's stable argsort or a scatter-min over a groups x items table.
    pair = g_sorted * (int(c_sorted.max(initial=0)) + 1) + c_sorted
    if (int(pair.max(initial=0)) * n + n).bit_length() <= 63:
        packed = np.sort(pair * n + positions)
        pair_of, first_pos = np.divmod(packed, n)
    else:
        by_pair = np.lexsort((positions, pair))
        pair_of, first_pos = pair[by_pair], by_pair
    starts = np.ones(n, dtype=bool)
    starts[1:] = pair_of[1:] != pair_of[:-1]
    kept = np.zeros(n, dtype=bool)
    kept[first_pos[starts]] = True
    at = np.flatnonzero(kept)  # merge positions of the distinct items, group by group
    g_kept = g_sorted[at]
    per_group = np.bincount(g_kept, minlength=n_groups)
    group_start = np.cumsum(per_group) - per_group
    pos = np.arange(len(at)) - group_start[g_kept]  # place within the group
    take = at[pos < limit]
    counts = np.bincount(g_sorted[take], minlength=n_groups)
    # Where each full group stopped reading (its limit-th item); never, for groups not full.
    stop = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    full = pos == limit - 1
    stop[g_kept[full]] = at[full]
    # Each query's last hit, in merge positions.
    n_hits = np.bincount(qk, minlength=nq)
    where = np.empty(n, dtype=np.int64)
    where[order] = positions
    last = np.full(nq, -1, dtype=np.int64)
    some = n_hits > 0
    last[some] = where[np.cumsum(n_hits)[some] - 1]
    cut = (n_hits >= limits) & (limits < limit) & (last <= stop[group])
    short = np.zeros(n_groups, dtype=bool)
    short[group[cut]] = True
    return MergedLists(c_sorted[take], scores.ravel()[at_hit[take]], counts, short)


def joint_score(cosines: np.ndarray, scale: float) -> np.ndarray:
    """inference.model.joint_score over the last axis, in numpy (the worker has no torch)."""
    top = cosines.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp((cosines - top) * scale).sum(axis=-1, keepdims=True)) / scale)[..., 0]


def joint_lists(
    codes: np.ndarray, hit_scores: np.ndarray, vectors: np.ndarray, known: np.ndarray, queries: np.ndarray,
    m: int, scale: float, limit: int, alone: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A joint model's queries, ``m`` at a time (one condition's), made into one ranked list
    each: the union of their hits, every item scored by the joint score of its cosines with
    all ``m`` queries (not only those that found it), de-duplicated, the best ``limit`` kept.
    An item whose vector is not ``known`` (indexed after the export and not fetched yet) is
    scored by the cosine the store gave it. A pool marked in ``alone`` ([K / m] bool) is its
    first query's list: scored by that query's cosine only (its own hits come first; the
    others' are only ever below them).

    ``codes`` / ``hit_scores`` [K, L] the hits (code -1: none), ``vectors`` [C, D] and
    ``known`` [C] each code's item vector, ``queries`` [K, D] -> ([K / m, limit] codes, -1 past
    the last; [K / m, limit] scores).
    """
    k, width = codes.shape
    n_pools, d = k // m, queries.shape[1]
    pools = codes.reshape(n_pools, m * width)
    padded = np.concatenate([vectors.reshape(-1, d), np.zeros((1, d), np.float32)])  # code -1: the zero row
    cosines = product(padded[pools], queries.reshape(n_pools, m, d).transpose(0, 2, 1))  # [P, m L, m]
    unknown = (pools >= 0) & ~np.append(known, False)[pools]
    if unknown.any():
        finder = np.arange(m)[None, :] == (np.arange(m * width) // max(width, 1))[:, None]  # [m L, m]: who found it
        said = np.where(finder[None], hit_scores.reshape(n_pools, m * width, 1), -np.inf)
        cosines = np.where(unknown[..., None], said, cosines)
    if alone is not None:
        cosines[alone, :, 1:] = -np.inf
    with np.errstate(invalid="ignore"):  # an unknown item only another query found, in an alone pool: -inf
        scores = joint_score(cosines, scale).astype(np.float32)
    scores[(pools < 0) | np.isnan(scores)] = -np.inf
    # Each item once, at its best score (copies of a known item score alike; an unknown one's
    # copies carry their finders' cosines): by code, best first, then the rest dropped.
    order = np.lexsort((-scores, pools), axis=1)
    pools, scores = np.take_along_axis(pools, order, 1), np.take_along_axis(scores, order, 1)
    repeat = np.zeros_like(pools, dtype=bool)
    repeat[:, 1:] = pools[:, 1:] == pools[:, :-1]
    scores[repeat] = -np.inf
    rank = np.lexsort((pools, -scores), axis=1)[:, :limit]  # best first; ties by code
    out_codes, out_scores = np.take_along_axis(pools, rank, 1), np.take_along_axis(scores, rank, 1)
    out_codes[np.isneginf(out_scores)] = -1
    return out_codes, out_scores.astype(np.float32)


_KAFKA_BACKOFF_S = (0.1, 2.0)  # back-off after a failed poll/commit: first, cap (kafka-python raises while the broker is down)


class SystemicFailure(RuntimeError):
    """Every user of a batch failed: the worker or its configuration is wrong, not the data."""


class Worker:
    """Consumes `user-updates`, publishes `candidates`; owns the session and the store."""

    updates_skipped = 0  # unusable `user-updates` records (inference/guards.py: clean_update)
    _kafka_delay = 0.1  # current back-off after a failed poll or commit (broker unreachable)
    users_failed = 0  # users whose data made compute raise; skipped, the rest of the batch served
    _failed_in_a_row = 0  # users failed since the last one served (SystemicFailure past a bound)

    def __init__(self, settings: Settings, runtime: ModelRuntime, store: Any, item_follower: Any = None) -> None:
        from kafka import KafkaProducer

        self._init_compute(settings, runtime, store)
        self.item_follower = item_follower
        kafka = settings.kafka.bootstrap_servers
        self.consumer = self._new_consumer()
        # One record batch per partition for a whole micro-batch (~3 KB per user; 16 KB default).
        self.producer = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=2, batch_size=1 << 18)
        self.stopping = threading.Event()
        self.users_done = 0
        self.batches_done = 0  # micro-batches that regenerated at least one user
        self.catalogue_changed: str | None = None  # what the store held instead, once run() saw it change
        # (model version, load id) this worker's lists are for, as main found them before the
        # items follower's catch-up (which can be long); None: read when run() starts.
        self.catalogue: tuple[str | None, str | None] | None = None
        self._polled: dict[Any, int] = {}  # partition -> next offset, of the records polled for the batch
        self._polled_generation: int | None = None  # the group generation the batch was polled in
        self._polled_partitions: set[Any] = set()  # and its records' partitions
        self.batches_dropped = 0  # batches computed after the group moved on: not sent (moved_on)
        self._pending = PendingCommits(settings.kafka.rejoin_after_s)  # settled offsets whose commit failed

    def _new_consumer(self) -> Any:
        return group_consumer(
            self.settings.topics.user_updates,
            bootstrap_servers=self.settings.kafka.bootstrap_servers,
            group_id=self.settings.inference.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.settings.inference.max_batch,
            max_poll_interval_ms=int(self.settings.inference.max_poll_interval_s * 1000),
        )

    @classmethod
    def offline(cls, settings: Settings, runtime: ModelRuntime, store: Any) -> Worker:
        """A worker without Kafka clients: `compute` only (benchmarks, tests)."""
        worker = cls.__new__(cls)
        worker._init_compute(settings, runtime, store)
        return worker

    def _init_compute(self, settings: Settings, runtime: ModelRuntime, store: Any) -> None:
        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.conditions = conditions_for(settings, runtime.surfaces, runtime.actions)
        # (embeddings generated, queries searched, queries searched again) in the last compute
        self.last_plan_size = (0, 0, 0)
        self.headroom = settings.inference.limit_headroom  # next_headroom keeps it fitted to the model

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Poll, compute, send; commit a batch's offsets once its candidates are acknowledged.

        Pipelined by one batch: batch N's records are acknowledged (and its offsets committed)
        while batch N+1 is polled and computed, so the broker's round trip is not spent idle.
        A batch is committed only after every one of its records was acknowledged; a crash
        re-reads (and recomputes) the at most two batches not yet committed.
        """
        log.info("worker: %d conditions per user, provider %s", len(self.conditions), self.runtime.provider)
        report_at, reported, batches_then = time.monotonic() + 10.0, 0, 0
        popular_at = check_at = time.monotonic()
        # This model's table (checked by main: wait_for_catalogue) and that load's id: the items
        # follower's group carries it, and after a reload the restart joins the new one's.
        catalogue = self.catalogue or (self.store.catalogue_version(), self.store.catalogue_load())
        inflight: tuple[list[Any], dict[Any, int]] | None = None  # (send futures, offsets) of the last batch
        while not self.stopping.is_set():
            updates = self.poll_batch()
            offsets, self._polled = self._polled, {}
            sent = self.process(updates) if updates else []
            if inflight is not None and not self.settle(*inflight):
                # The last batch's records were not all delivered: this batch's offsets, later
                # ones of the same partitions, must not be committed over them either.
                sent = None
            if sent is None:  # the group moved on while it was computed (another worker's now), or a send failed
                # Offsets still pending may be of partitions owned elsewhere now: committing them
                # there could move the new owner's position back. Dropped: only redone, never lost.
                self._pending.clear()
                self._replace_consumer()
                sent, offsets = [], {}
            inflight = (sent, offsets) if offsets else None
            if inflight is None and self._pending.offsets:  # idle: a failed commit is retried, not left for the next record
                self.commit()
            if time.monotonic() >= check_at:
                check_at = time.monotonic() + self.settings.inference.catalogue_check_every_s
                if (now := (self.store.catalogue_version(), self.store.catalogue_load())) != catalogue:
                    # `recsys index` of another model over a shared store: the marker is cleared
                    # while it loads, then names that model. This model's queries against those
                    # vectors would replace every active user's lists with meaningless ones: stop,
                    # the batch in hand uncommitted (the restart, which loads the model in model_dir
                    # and waits for its catalogue, computes those users again).
                    now_holds = now[0]
                    self.catalogue_changed = (("a new load of " if now_holds == catalogue[0] else "") + f"model {now_holds}'s"
                                              if now_holds else "no whole catalogue (a load under way)")
                    log.error("worker: the vector store now holds %s, not model %s's; stopping", self.catalogue_changed,
                              self.runtime.version)
                    break
            if time.monotonic() >= popular_at:
                self.publish_popular()
                popular_at = time.monotonic() + self.settings.inference.popular_every_s
            if time.monotonic() >= report_at:  # throughput in the log: is the worker keeping up?
                batches = self.batches_done - batches_then
                log.info("worker: %d users regenerated (%.0f/s, %.1f per micro-batch)", self.users_done,
                         (self.users_done - reported) / 10.0, (self.users_done - reported) / max(batches, 1))
                report_at, reported, batches_then = time.monotonic() + 10.0, self.users_done, self.batches_done
        if inflight is not None and self.catalogue_changed is None:
            self.settle(*inflight)

    def publish_popular(self) -> bool:
        """Send each surface's most popular eligible items, as the vector store has them, to
        `popular`: the server's fallback for users it knows nothing about then honours the
        `items` topic's eligibility (an item withdrawn from a surface leaves its list) and
        popularity. One record in the `candidates` format, key "popular"; resent every
        `inference.popular_every_s` (three small lists), so a lost send is repaired by the next.
        A store that is down is waited out as for users (the retrying store); any other failure
        only skips this round, the server keeping the lists it has."""
        size = self.settings.serving.fallback_size
        try:
            surfaces = {s: self.store.top_popular(s, size) for s in self.settings.events.surfaces}
            now = int(time.time() * 1000)
            self.producer.send(self.settings.topics.popular, key=POPULAR_KEY.encode(), value=msgpack.packb({
                "user_id": POPULAR_KEY, "model_version": self.runtime.version, "source_event_ts": now,
                "generated_at": now, "surfaces": {s: {"items": [str(i) for i, _ in hits], "scores": [float(x) for _, x in hits]}
                                                  for s, hits in surfaces.items()},
            }, use_single_float=True))
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - the fallback must not stop the regeneration of users
            log.exception("worker: popular lists not published")
            return False
        return True

    def settle(self, sent: Sequence[Any], offsets: dict[Any, int]) -> bool:
        """Wait until the broker has every record of a batch, then commit that batch's offsets.
        False, nothing committed, when a record could not be delivered for a reason that can
        pass (a broker unreachable past the producer's delivery timeout): the caller re-reads
        the batch. A record the broker refuses for good raises here, before any commit."""
        try:
            for future in sent:
                future.get()
        except KafkaError as exc:
            if not exc.retriable:
                raise
            self._kafka_backoff("delivering a batch's candidates (it is read again)", exc)
            return False
        self.commit(offsets)
        return True

    def commit(self, offsets: dict[Any, int] | None = None) -> None:
        """Commit ``offsets`` (partition -> next offset to read) together with any earlier ones
        whose commit failed. A broker that cannot take the commit keeps them pending: they are
        retried with the next batch's or, when idle, on the next loop — a topic that goes quiet
        must not keep its last batch uncommitted. A group that rebalanced meanwhile (e.g. during
        a long store outage) refuses: offsets of partitions still ours are retried, the others'
        next owner re-reads and recomputes those updates. None lost."""
        from kafka.errors import CommitFailedError, RebalanceInProgressError

        self._pending.add(offsets or {})
        if self.consumer is None:  # its replacement failed: kept pending until poll_batch makes one
            return
        try:
            if not self._pending.commit(self.consumer):
                self._replace_consumer()  # a rebalance that never completes
        except (CommitFailedError, RebalanceInProgressError) as exc:
            # kafka-python keeps a partition's position across a rebalance that leaves it here,
            # so nobody would re-read these: they stay pending (the retry follows the rejoin
            # that the next poll does). Partitions now owned elsewhere are re-read there: the
            # retry leaves them out (PendingCommits); one back here later is committed with its
            # next batch, and until then a restart only re-reads it.
            self._kafka_backoff("commit (group rebalanced)", exc)
        except KafkaError as exc:
            self._kafka_backoff("commit", exc)

    def _replace_consumer(self) -> None:
        """Close the consumer without committing; its successor, which poll_batch creates (the
        broker may be down now), joins the group anew and re-reads from the committed offsets,
        so what was polled since is redone, not lost."""
        old, self.consumer = self.consumer, None
        if old is not None:
            old.close(autocommit=False)

    def moved_on(self) -> bool:
        """Has the group moved on since the batch in hand was polled? Then its partitions may
        be another worker's, which recomputes the batch (it is uncommitted) and may already have
        written newer lists for its users: sending ours after them would put an older list last
        in the compacted `candidates`. The member rejoins only inside poll(), so while a batch is
        computed its generation either stays or is reset, when the group drops the member (e.g.
        past `max_poll_interval_s` waiting out a store outage)."""
        if self.consumer is None:
            return True
        return (self.consumer.group_metadata().generation_id != self._polled_generation
                or not self._polled_partitions <= self.consumer.assignment())

    def _kafka_backoff(self, what: str, exc: Exception) -> None:
        """Wait before talking to the broker again: doubling from 0.1 s to 2 s while it fails."""
        log.warning("worker: %s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, self._kafka_delay)
        self.stopping.wait(self._kafka_delay)
        self._kafka_delay = min(_KAFKA_BACKOFF_S[1], self._kafka_delay * 2)

    def poll_batch(self) -> list[dict[str, Any]]:
        """Up to max_batch updates, waiting at most max_wait_ms once the first has arrived.
        Malformed records are skipped and counted (inference/guards.py: clean_update)."""
        cfg = self.settings.inference
        keep = max(self.runtime.max_len, self.settings.streams.max_sequence_len)
        actions = frozenset(self.runtime.actions)
        batch: list[dict[str, Any]] = []
        deadline: float | None = None
        while len(batch) < cfg.max_batch and not self.stopping.is_set():
            timeout = 200 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            try:
                if self.consumer is None:  # the replacement of a stuck consumer failed: again
                    self.consumer = self._new_consumer()
                records = self.consumer.poll(timeout_ms=timeout, max_records=cfg.max_batch - len(batch))
            except KafkaError as exc:  # broker unreachable (e.g. restarting): keep what was fetched, back off
                self._kafka_backoff("poll", exc)
                break
            self._kafka_delay = _KAFKA_BACKOFF_S[0]
            for tp, part in records.items():
                if part:
                    self._polled[tp] = part[-1].offset + 1
                for record in part:
                    update = clean_update(record.value, keep, self.settings.streams.max_hidden, actions,
                                          self.settings.events.max_id_length)
                    if update is None:
                        self.updates_skipped += 1
                        log.warning("worker: skipped an unusable update at %s:%d:%d (no user or no usable event)",
                                    record.topic, record.partition, record.offset)
                    else:
                        batch.append(update)
            if batch and deadline is None:
                deadline = time.monotonic() + cfg.max_wait_ms / 1000.0
            if deadline is None or time.monotonic() >= deadline:
                break
        # After the last poll: a rejoin inside poll_batch that kept this member's partitions is
        # no reason to drop the batch (moved_on checks the partitions too).
        self._polled_generation = self.consumer.group_metadata().generation_id if self.consumer is not None else None
        self._polled_partitions = set(self._polled)
        return batch

    def process(self, updates: Sequence[dict[str, Any]]) -> list[Any] | None:
        """Compute a micro-batch's candidates and send them (not waiting for the broker);
        returns the send futures, to be settled before the batch's offsets are committed, or
        None when the group moved on meanwhile (`moved_on`: nothing sent) or the producer could
        not take the records (`publish`): the batch is read again."""
        fresh = [u for u in coalesce(updates) if u.get("events")]
        if not fresh:
            return []
        fresh, results = self.compute_isolated(fresh)
        if self.moved_on():
            self.batches_dropped += 1
            log.warning("worker: the consumer group moved on while %d users were computed; not sent "
                        "(their partitions' owner computes them again)", len(fresh))
            return None
        return self.publish(fresh, results)

    def publish(self, updates: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]) -> list[Any] | None:
        """Send each user's candidates record (not waiting for the broker); the send futures, or
        None when the producer could not take them for a reason that can pass (no metadata for
        the topic within its max_block_ms: a broker unreachable): the batch is read again."""
        sent = []
        for update, surfaces in zip(updates, results, strict=True):
            try:
                sent.append(self.producer.send(
                    self.settings.topics.candidates,
                    key=str(update["user_id"]).encode(),
                    # scores are float32: packed as such, 4 bytes less each
                    value=msgpack.packb(self.candidates_record(update, surfaces), use_single_float=True),
                ))
            except MessageSizeTooLargeError as exc:
                # Refused before it left (this record only, e.g. too large for max_request_size):
                # raising would stop the loop on it after every restart. Skipped, as a user whose
                # compute fails.
                self.users_failed += 1
                log.error("worker: user %r's candidates not sent (%s: %s)", update.get("user_id"), type(exc).__name__, exc)
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                self._kafka_backoff("sending a batch's candidates (it is read again)", exc)
                return None
        self.users_done += len(sent)
        self.batches_done += 1
        return sent

    def compute_isolated(self, updates: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """`compute` for the batch; if the data makes it raise, user by user, skipping (and
        counting) only the users that fail. A store that is down is not data: it raises
        StoreUnavailable from the retrying store and ends the loop uncommitted; so does a store
        call that can never succeed (StoreCallFailed): skipping every user would commit a batch
        with nothing written. For the same reason a batch of several users that ALL fail on
        their own is taken as the worker's fault, not the data's: SystemicFailure, uncommitted.
        A lone user that fails is skipped (one record cannot tell the two apart), but
        `inference.max_failed_in_a_row` users failing with none served between is systemic
        too: at low traffic most batches hold one user, and a broken session would otherwise
        skip and commit every update while the process looked healthy."""
        try:
            results = self.compute(updates)
            self._failed_in_a_row = 0
            return updates, results
        except (StoreUnavailable, StoreCallFailed):
            raise
        except Exception:  # noqa: BLE001 - isolated below; the loop must not die on one user's data
            log.exception("worker: a batch of %d users failed; recomputing them one by one", len(updates))
        kept: list[dict[str, Any]] = []
        results: list[Any] = []
        failed: list[tuple[dict[str, Any], Exception]] = []
        for update in updates:
            try:
                results += self.compute([update])
                kept.append(update)
            except (StoreUnavailable, StoreCallFailed):
                raise
            except Exception as exc:  # noqa: BLE001
                failed.append((update, exc))
        self._failed_in_a_row = 0 if kept else self._failed_in_a_row + len(failed)
        if failed and not kept and (len(updates) > 1 or self._failed_in_a_row >= self.settings.inference.max_failed_in_a_row):
            exc = failed[-1][1]
            raise SystemicFailure(f"all {len(updates)} users of the batch failed ({self._failed_in_a_row} in a row), "
                                  f"the last with {type(exc).__name__}: {exc}") from exc
        for update, exc in failed:
            self.users_failed += 1
            log.error("worker: user %r skipped (%s: %s)", update.get("user_id"), type(exc).__name__, exc)
        return kept, results

    def compute(self, updates: Sequence[dict[str, Any]]) -> list[dict[str, dict[str, list[Any]]]]:
        """Per user, per surface: {"items": [...], "scores": [...]} (no I/O besides the store)."""
        cfg = self.settings.inference
        budget = cfg.candidates_per_surface
        recent = recent_items(updates)  # their vectors are the model's input
        excluded = excluded_items(updates, recent)  # recent and hidden: never candidates
        inputs = self.encode(updates, recent)
        queries = self.runtime.generate(inputs)  # [B, Q, M, D]
        single = single_query_users(updates, self.runtime.max_len, cfg)
        m, alone = queries.shape[2], None
        if self.runtime.joint_queries:  # every query kept: an outcome's M score each item together
            plan = plan_batch(queries, self.conditions, budget, math.inf)
            if single is not None:
                alone = single[plan.user[::m]]  # per outcome: its first query alone
        else:
            plan = plan_batch(queries, self.conditions, budget, cfg.merge_cosine, single)
        names = [plan.surfaces[s] for s in plan.surface.tolist()]

        def search_and_merge(rows: np.ndarray, limits: np.ndarray) -> tuple[MergedLists, np.ndarray]:
            # ONE store call for these queries; the user's recent and hidden items excluded, eligibility filtered.
            hits = self.store.query_arrays(plan.vectors[rows], limits, [names[r] for r in rows.tolist()],
                                           excluded, plan.user[rows])
            codes, scores, budgets, group = hits.codes, hits.scores, plan.budgets[rows], plan.group[rows]
            if self.runtime.joint_queries:  # rows: whole (user, surface) groups, so pools stay whole
                pools = rows[::m] // m
                codes, scores = self._joint_lists(hits, plan.vectors[rows], m, budget, None if alone is None else alone[pools])
                budgets, group, limits = budgets.reshape(-1, m).sum(axis=1), group[::m], limits[::m]
            merged = merge_batch(codes, scores, budgets, group, plan.n_groups, limits, budget)
            return merged, hits.id_texts()

        everything = np.arange(len(plan.budgets))
        if self.runtime.joint_queries:
            # Full-budget searches, as any query may supply the whole list (the other queries of a
            # first-query-alone outcome: one hit, never ranked above its own). The rescored union is
            # the top by joint score but for an item just below every query's cut (none of 100 at a
            # logit scale of 20 or more, 1-2 at 10, in a synthetic check).
            limits = np.full(len(everything), budget)
            if alone is not None:
                limits.reshape(-1, m)[alone, 1:] = 1
        else:
            limits = query_limits(plan.budgets, budget, self.headroom)
        merged, ids = search_and_merge(everything, limits)
        lists = _group_lists(merged, ids)
        again = np.flatnonzero(np.isin(plan.group, np.flatnonzero(merged.short)))
        if len(again):  # lists cut too short for an exact merge: those surfaces at the full budget
            merged_again, ids_again = search_and_merge(again, np.full(len(again), budget))
            redone = _group_lists(merged_again, ids_again)
            for g in np.flatnonzero(merged.short).tolist():
                lists[g] = redone[g]
        self.last_plan_size = (plan.generated, len(plan.budgets), len(again))
        self.headroom = next_headroom(self.headroom, float(merged.short.mean()) if len(merged.short) else 0.0, cfg)
        n_s = len(plan.surfaces)
        return [
            {name: lists[u * n_s + s] for s, name in enumerate(plan.surfaces)}
            for u in range(len(updates))
        ]

    def encode(self, updates: Sequence[dict[str, Any]], recent: Sequence[list[str]] | None = None) -> dict[str, np.ndarray]:
        """The session's inputs for a micro-batch (history vectors looked up or fetched);
        ``recent``: `recent_items(updates)` when the caller has it already."""
        history_ids = set().union(*(recent_items(updates) if recent is None else recent))
        vectors = self.runtime.vector_lookup(history_ids, fetch=self._fetch_vectors)
        return encode_histories(updates, self.runtime, self.conditions, vectors)

    def candidates_record(self, update: dict[str, Any], surfaces: dict[str, Any]) -> dict[str, Any]:
        return {
            "user_id": update["user_id"],
            "model_version": self.runtime.version,
            "source_event_ts": int(update.get("last_event_ts") or update["events"][-1]["ts"]),
            "generated_at": int(time.time() * 1000),
            "version": update["version"],
            "surfaces": surfaces,
        }

    def _joint_lists(self, hits: Any, queries: np.ndarray, m: int, limit: int,
                     alone: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """`joint_lists` of a store answer, with the vectors of the items it holds: looked up
        for the codes that occur only (an exact store's codes span the whole catalogue)."""
        hit = hits.codes >= 0
        used, compact = np.unique(hits.codes[hit], return_inverse=True)
        texts = hits.id_texts()[used].tolist()
        table, rows = self.runtime.vector_lookup(texts, fetch=self._fetch_vectors).table(texts)
        codes = np.full_like(hits.codes, -1)
        codes[hit] = compact
        codes, scores = joint_lists(codes, hits.scores, table[rows], np.asarray(rows) > 0, queries, m,
                                    self.runtime.logit_scale, limit, alone)
        return np.where(codes >= 0, used[np.maximum(codes, 0)] if len(used) else -1, -1), scores

    def _fetch_vectors(self, item_ids: Sequence[str]) -> dict[Any, np.ndarray]:
        return dict(self.store.retrieve(list(item_ids)))

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
        self.producer.close()


def _group_lists(merged: MergedLists, texts: np.ndarray) -> list[dict[str, list[Any]]]:
    """Per group: {"items": [str ids], "scores": [floats]} from merge_batch's flat arrays
    (``texts``: each code's item id as text)."""
    items = texts[merged.codes].tolist() if len(merged.codes) else []
    scores = merged.scores.tolist()
    ends = np.cumsum(merged.counts).tolist()
    out, begin = [], 0
    for end in ends:
        out.append({"items": items[begin:end], "scores": scores[begin:end]})
        begin = end
    return out


class SerialisedStore:
    """A vector store whose calls, from any thread, run one at a time."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


def _budget_sanity(settings: Settings) -> None:
    cfg = settings.inference
    if cfg.candidates_per_surface <= 0 or not math.isfinite(cfg.merge_cosine) or not (
            math.isfinite(cfg.limit_headroom) and 0 < cfg.limit_headroom <= cfg.limit_headroom_max):
        raise ValueError("inference.candidates_per_surface and limit_headroom must be > 0 (finite), "
                         "limit_headroom <= limit_headroom_max, merge_cosine finite")


def stop_if_model_dir_moved_on(model_dir: Path, loaded: str, detail: str = "") -> None:
    """SystemExit when meta.json now names another model than the ``loaded`` one: a restart
    loads it. (One that cannot be read, an export replacing it, is no reason.)"""
    from vector_store.indexer import model_version

    try:
        exported = model_version(model_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return
    if exported != loaded:
        raise SystemExit(f"worker: {model_dir} now holds model {exported}, not the loaded {loaded}{detail}: restarting loads it")


def wait_for_catalogue(store: VectorStore, version: str, settings: Settings, stopping: threading.Event) -> bool:
    """Until the store holds model ``version``'s whole item table (its catalogue marker, set by
    `recsys index`). This model's queries against another model's vectors, or an empty store,
    would publish lists that replace every active user's good ones. A Qdrant server is loaded
    by the indexer beside us: wait for it (False if stopped first). An Edge shard is this
    process's alone, so nobody else can load it while we wait: say so and stop."""
    while True:
        try:
            loaded = store.catalogue_version()
        except Exception as exc:  # noqa: BLE001 - an outage is waited out, anything else raised
            if not is_transient(exc):
                raise
            log.warning("worker: cannot read the vector store's catalogue marker (%s); retrying", exc)
            if stopping.wait(settings.inference.store_retry_max_s):
                return False
            continue
        if loaded == version:
            return True
        now = f"model {loaded}'s" if loaded else "no whole catalogue"
        # The load we wait for may never come: the model directory moved on to the model being
        # indexed (or another).
        stop_if_model_dir_moved_on(settings.inference.model_dir, version, f" (the store holds {now})")
        if settings.vector_store.backend == "edge":
            raise SystemExit(f"worker: the Edge shard {settings.vector_store.path} holds {now}, not model {version}'s: "
                             "run `recsys index` first (it loads the exported items.npz)")
        log.warning("worker: the vector store holds %s, not model %s's; waiting for `recsys index` to load it", now, version)
        if stopping.wait(settings.inference.store_retry_max_s):
            return False


def main(argv: list[str]) -> int:
    from recsys.topics import ensure_own_topics
    from vector_store import open_store

    parser = argparse.ArgumentParser(prog="recsys worker", description="user-updates -> candidates (ONNX Runtime)")
    parser.add_argument("--no-follow-items", action="store_true", help="do not index the `items` topic here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    _budget_sanity(settings)
    runtime = ModelRuntime.load(settings.inference.model_dir, settings.inference.provider,
                                threads=settings.inference.ort_threads, settings=settings.inference)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    retry = {"initial_s": settings.inference.store_retry_initial_s, "max_s": settings.inference.store_retry_max_s}
    # `candidates` and `popular` must be compacted (the server rebuilds its state from them), as
    # must `items` (a new shard reads the whole catalogue from it): left to the broker's
    # auto-creation by a first send they would be plain logs with a retention.
    t = settings.topics
    if not ensure_own_topics(settings, [t.candidates, t.popular] + ([] if args.no_follow_items else [t.items, t.items_dlq]),
                             stopping):
        log.warning("worker: stopped before Kafka could be reached")
        return 0
    try:
        # The store may be down at start too (a Qdrant server not up yet, an Edge shard still
        # locked by the process that held it): wait for it, consuming nothing meanwhile.
        store = call_with_retry(lambda: open_store(settings, dim=runtime.dim), what="opening the vector store",
                                stopping=stopping, **retry)
    except StoreUnavailable:
        log.warning("worker: stopped before the vector store could be opened")
        return 0
    if not wait_for_catalogue(store, runtime.version, settings, stopping):
        log.warning("worker: stopped before the vector store held the model's catalogue")
        return 0
    follower = None
    if not args.no_follow_items:
        # An Edge shard belongs to one process, so the `items` follower runs here, in a thread
        # of its own (it blocks on Kafka); every store call of both threads goes through one lock.
        from vector_store.indexer import ItemsFollower, OnnxItemEncoder, model_id_bucket

        store = SerialisedStore(store)
    # Every store call of the worker and the follower waits out a store outage (the lock is not held while waiting).
    store = RetryingStore(store, stopping=stopping, **retry)
    if not args.no_follow_items:
        model_dir = settings.inference.model_dir
        from recsys.kafka_clients import Stopped

        encoder = OnnxItemEncoder(model_dir, model_id_bucket(model_dir), settings.inference.ort_threads)
        # Read after the catalogue wait, which can be long: an export since then would have new
        # items embedded in its space and joined to this model's catalogue.
        stop_if_model_dir_moved_on(model_dir, runtime.version)
        check_same_export(model_dir, runtime.version, {"item_encoder.onnx": encoder.version})
        try:
            follower = ItemsFollower(store, encoder, settings,
                                     model_version=runtime.version, on_embedded=runtime.reembedded, stop=stopping)
        except Stopped:
            log.info("stopped while the items follower caught up; nothing was committed")
            store.close()
            return 0
    worker = Worker(settings, runtime, store, follower)
    worker.stopping = stopping
    worker.catalogue = (runtime.version, follower.load if follower is not None else store.catalogue_load())
    failed: list[BaseException] = []
    follower_thread = None
    if follower is not None:
        items_follower = follower

        def follow() -> None:
            # A follower that dies must not leave a worker serving a catalogue that stopped
            # growing: the whole process stops (its items batch uncommitted) and is restarted.
            try:
                items_follower.run(stopping)
            except BaseException as exc:  # noqa: BLE001 - reported, then the worker stops
                if not isinstance(exc, StoreUnavailable):
                    log.exception("worker: the items follower failed; stopping")
                    failed.append(exc)
                stopping.set()

        follower_thread = threading.Thread(target=follow, name="items-follower", daemon=True)
        follower_thread.start()
    try:
        worker.run()
    except StoreUnavailable:
        log.warning("worker: stopped while the vector store was down; the batch in hand stays uncommitted")
    finally:
        stopping.set()
        worker.close()
        if follower is not None:
            if follower_thread is not None:
                follower_thread.join(30)  # out of its poll before its consumer is closed
            follower.close()
        store.close()
    return 1 if failed or worker.catalogue_changed else 0
