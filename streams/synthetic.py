"""A synthetic action stream with planted structure, for tests, benchmarks and the demo.

Items belong to `n_clusters` interest clusters (`item_cluster`); every user has one to three
clusters (`user_interests`, derived from the seed). Most of a user's actions hit items of
their clusters - positive outcomes ("save", "click") there, more "hide" off-interest - so a
retriever trained on the stream can be checked against the structure it should recover.
Within a cluster, low item indices are more popular (a skewed, long-tailed catalogue).

Everything is deterministic given the seed; event times are strictly increasing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from recsys.settings import EventSettings
from streams.schema import ActionEvent, Id, now_ms

__all__ = ["N_CLUSTERS", "cluster_features", "item_cluster", "synthetic_events", "user_interests"]

# Outcome mix on / off a user's interests, by action name; unknown action names get `_OTHER`.
_ON_INTEREST = {"click": 0.62, "save": 0.33, "hide": 0.05}
_OFF_INTEREST = {"click": 0.55, "save": 0.05, "hide": 0.40}
_OTHER = 0.1
_SURFACE_WEIGHT = {"home": 0.5, "search": 0.3, "related": 0.2}
N_CLUSTERS = 8  # planted interest clusters, unless asked otherwise


def item_cluster(item: int, n_clusters: int) -> int:
    """The interest cluster an item belongs to."""
    return item % n_clusters


def cluster_features(item: int, n_clusters: int) -> list[float]:
    """An item's content features: its cluster, one-hot (what a category or an image embedding
    tells a real model). With them a model can embed an item published after it was trained;
    an id-only model has nothing to place such an item by."""
    features = [0.0] * n_clusters
    features[item_cluster(item, n_clusters)] = 1.0
    return features


def user_interests(user: int, *, n_clusters: int, seed: int) -> tuple[int, ...]:
    """The one to three clusters a synthetic user is interested in (stable for a seed)."""
    rng = random.Random(f"{seed}:{user}")
    k = rng.choice((1, 2, 2, 3))
    return tuple(sorted(rng.sample(range(n_clusters), min(k, n_clusters))))


def synthetic_events(
    n_events: int,
    n_users: int,
    n_items: int,
    seed: int = 0,
    *,
    n_clusters: int = N_CLUSTERS,
    noise: float = 0.15,
    start_ts_ms: int | None = None,
    step_ms: int = 100,
    user_prefix: str | None = None,
    events: EventSettings | None = None,
) -> Iterator[ActionEvent]:
    """Yield `n_events` valid action events over `n_users` users and `n_items` items.

    `noise` is the share of actions on a random item outside the user's interests. Event i
    happens at `start_ts_ms + i * step_ms` (default start: so that the last event is now).
    With `user_prefix`, user ids are strings `f"{user_prefix}{u}"` (tests keep users apart).
    """
    assert n_items >= n_clusters >= 1, f"need n_items >= n_clusters >= 1, got {n_items}, {n_clusters}"
    cfg = events or EventSettings()
    rng = random.Random(seed)
    start = now_ms() - n_events * step_ms if start_ts_ms is None else start_ts_ms
    surfaces: Sequence[str] = cfg.surfaces
    surface_w = [_SURFACE_WEIGHT.get(s, _OTHER) for s in surfaces]
    on_w = [_ON_INTEREST.get(a, _OTHER) for a in cfg.actions]
    off_w = [_OFF_INTEREST.get(a, _OTHER) for a in cfg.actions]
    interests: dict[int, tuple[int, ...]] = {}
    last_item: dict[int, int] = {}

    for i in range(n_events):
        u = rng.randrange(n_users)
        mine = interests.get(u) or interests.setdefault(u, user_interests(u, n_clusters=n_clusters, seed=seed))
        on_interest = rng.random() >= noise
        cluster = rng.choice(mine) if on_interest else rng.randrange(n_clusters)
        size = len(range(cluster, n_items, n_clusters))
        # rng.random() ** 2 skews towards low indices: popular items within the cluster.
        item = cluster + n_clusters * int(size * rng.random() ** 2)
        action = rng.choices(cfg.actions, on_w if on_interest else off_w)[0]
        surface = rng.choices(surfaces, surface_w)[0]
        user_id: Id = f"{user_prefix}{u}" if user_prefix is not None else u
        yield ActionEvent(
            user_id=user_id,
            item_id=item,
            action=action,
            surface=surface,
            ts=start + i * step_ms,
            query=f"topic {cluster}" if surface == "search" else None,
            context_item=last_item.get(u) if surface == "related" else None,
            dwell_ms=rng.randrange(200, 60_000) if action != "hide" else None,
        )
        last_item[u] = item
