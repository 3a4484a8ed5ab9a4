"""Shared helpers of the model tests (a uniquely named module: every test folder has a
`conftest`, so test modules import from here, never from `conftest`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from planted import item_features

from inference.train import apply_overrides
from recsys.settings import Settings

N_ITEMS, N_CLUSTERS = 48, 6
HELD_OUT = frozenset({5, 10, 15, 20, 25, 30})  # one per cluster, never in any event

TINY = [
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.max_len=16",
    "model.num_queries=2",
    "model.dropout=0.1",
    "train.epochs=30",
    "train.batch_size=32",
    "train.lr=0.005",
    "train.min_lr=0.001",
    "train.warmup_steps=10",
    "train.eval_every=5",
    "train.patience=3",
    "train.window=2",
    "train.id_dropout=0.3",
    "train.finetune_epochs=2",
    "train.amp=false",
    "train.num_threads=1",
]


def tiny_settings(tmp: Path, *extra: str) -> Settings:
    return apply_overrides(Settings(), [*TINY, f"train.out_dir={tmp}", *extra])


def features_of(items: list[int]) -> np.ndarray:
    feats = item_features(N_ITEMS, N_CLUSTERS)
    return np.asarray([feats[f"i{i}"] for i in items], dtype=np.float32)
