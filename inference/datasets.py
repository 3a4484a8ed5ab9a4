"""Named data sets for `recsys train|evaluate --dataset NAME` and their default splits.

- `beauty`: Amazon Beauty 5-core sequences (../shared/datasets/amazon-beauty/Beauty.txt);
  leave-one-out, the published protocol.
- `ml100k`: MovieLens-100K `u.data` replayed as events (rating >= 4 = "save", else "click");
  each user's last 10% of events are test targets.
- `events`: a JSONL file of streams/ events (the system's own log); tail split.
- `synthetic`: streams.synthetic's planted-structure stream; tail split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from inference.data import (
    EventLog,
    Split,
    events_from_dicts,
    leave_one_out,
    load_events_jsonl,
    load_movielens,
    load_sequences,
    tail_split,
    time_split,
)
from recsys.settings import Settings

DATASETS = ("beauty", "ml100k", "events", "synthetic")


def default_path(name: str, settings: Settings) -> Path | None:
    root = settings.train.datasets_dir
    return {"beauty": root / "amazon-beauty" / "Beauty.txt", "ml100k": root / "ml-100k" / "u.data"}.get(name)


def load_dataset(
    name: str,
    path: Path | None,
    settings: Settings,
    *,
    n_events: int = 20_000,
    n_users: int = 500,
    n_items: int = 300,
    start_ts_ms: int | None = None,
) -> EventLog:
    """The named data set as an EventLog. `synthetic` is generated from `train.seed` over the
    configured actions and surfaces, its first event at `start_ts_ms` (default: its last event
    now); `synthetic_start_ms` gives a log's, which `recsys evaluate` needs to feed the model the
    times it was trained on."""
    path = path or default_path(name, settings)
    if path is not None and not path.exists():
        where = "" if name in ("events",) else f" (--path, or train.datasets_dir = {settings.train.datasets_dir})"
        raise FileNotFoundError(f"--dataset {name}: {path} not found{where}")
    ev = settings.events
    if name == "beauty":
        assert path is not None
        return load_sequences(path, action=ev.actions[0], surface=ev.surfaces[0])
    if name == "ml100k":
        assert path is not None
        return load_movielens(path, surface=ev.surfaces[0])
    if name == "events":
        if path is None:
            raise ValueError("--dataset events needs --path to a JSONL file of events")
        return load_events_jsonl(path, ev.actions, ev.surfaces)
    if name == "synthetic":
        from streams.synthetic import N_CLUSTERS, cluster_features, synthetic_events

        # With content features, so that the model it trains (docker-compose's) embeds new items.
        features = {str(i): cluster_features(i, N_CLUSTERS) for i in range(n_items)}
        return events_from_dicts(synthetic_events(n_events, n_users, n_items, settings.train.seed, events=ev,
                                                  start_ts_ms=start_ts_ms),
                                 ev.actions, ev.surfaces, features)
    raise ValueError(f"unknown dataset {name!r}; one of {DATASETS}")


def synthetic_start_ms(log: EventLog) -> int:
    """The time of a synthetic log's first event (its `start_ts_ms`)."""
    return int(round(float(log.ts.min()) * 1000))


def make_split(log: EventLog, kind: str, dataset: str) -> Split:
    if kind == "auto":
        kind = "loo" if dataset == "beauty" else "tail"
    splits = {"loo": leave_one_out, "tail": tail_split, "time": time_split}
    if kind in splits:
        return dataclasses.replace(splits[kind](log), kind=kind)
    raise ValueError(f"unknown split {kind!r}: loo | tail | time | auto")
