"""A small event stream with planted structure, for the model's tests (no ../shared needed).

- Items 0..n_items-1 belong to cluster `i % n_clusters`; their content features are the
  cluster one-hot plus a little noise, so features alone identify the cluster.
- Every user has a home cluster. Most steps move to the *successor* of the previous item in
  that cluster (`prev + n_clusters`, wrapping), some to a random item of the cluster, a few to
  a random item anywhere: a sequence model can predict far better than popularity.
- Outcomes are planted: each step first draws its outcome ("save" 40%, else "click"), then
  the item from the half of the cluster that outcome belongs to (`is_save_item`: even rank
  within the cluster), so the outcome decides which item comes next and conditioning on it
  should move the generated queries towards the matching half.
- A few "hide" events on random off-cluster items (shown but not engaged); surfaces random.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ACTIONS = ("click", "save", "hide")
SURFACES = ("home", "search", "related")


def item_cluster(item: int, n_clusters: int) -> int:
    return item % n_clusters


def is_save_item(item: int, n_clusters: int) -> bool:
    return (item // n_clusters) % 2 == 0


def item_features(n_items: int, n_clusters: int, seed: int = 0, extra: int = 2) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed + 1)
    out = {}
    for i in range(n_items):
        v = np.zeros(n_clusters + extra, np.float32)
        v[item_cluster(i, n_clusters)] = 1.0
        v += rng.normal(0, 0.05, size=v.shape).astype(np.float32)
        out[f"i{i}"] = v.tolist()
    return out


def planted_events(
    n_users: int = 150,
    n_items: int = 48,
    n_clusters: int = 6,
    length: int = 24,
    seed: int = 0,
    exclude_items: frozenset[int] = frozenset(),
) -> list[dict[str, Any]]:
    """Event dicts in the streams/ schema (ts in ms), time-ordered per user."""
    rng = np.random.default_rng(seed)
    per_cluster = n_items // n_clusters
    events: list[dict[str, Any]] = []
    t0 = 1_750_000_000_000
    for u in range(n_users):
        home = u % n_clusters
        item = home + n_clusters * int(rng.integers(per_cluster))
        ts = t0 + u * 1000
        for _ in range(length):
            action = "save" if rng.random() < 0.4 else "click"
            parity = 0 if action == "save" else 1  # save-items have even rank in their cluster
            rank = item // n_clusters
            r = rng.random()
            if r < 0.7:  # the successor within the outcome's half of the cluster
                rank = rank + 1 if (rank + 1) % 2 == parity else rank + 2
            elif r < 0.92:  # any item of that half
                rank = parity + 2 * int(rng.integers(per_cluster // 2))
            else:  # noise: anything
                item = int(rng.integers(n_items))
            if r < 0.92:
                item = home + n_clusters * (rank % per_cluster)
            if item in exclude_items:
                continue
            ts += int(rng.integers(30_000, 3_600_000))
            events.append(
                {"user_id": f"u{u}", "item_id": f"i{item}", "action": action, "surface": SURFACES[int(rng.integers(3))], "ts": ts}
            )
            if rng.random() < 0.1:
                other = int(rng.integers(n_items))
                if item_cluster(other, n_clusters) != home and other not in exclude_items:
                    ts += 1000
                    events.append({"user_id": f"u{u}", "item_id": f"i{other}", "action": "hide", "surface": "home", "ts": ts})
    return events
