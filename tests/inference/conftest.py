"""Fixtures for the model tests: a planted-structure log and one tiny model trained on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gr_helpers import HELD_OUT, N_CLUSTERS, N_ITEMS, tiny_settings
from planted import ACTIONS, SURFACES, item_features, planted_events

from inference.checkpoint import Checkpoint
from inference.data import EventLog, Split, events_from_dicts, tail_split
from inference.model import GenerativeRetriever
from inference.train import train


@pytest.fixture(scope="session")
def planted_log() -> EventLog:
    events = planted_events(n_items=N_ITEMS, n_clusters=N_CLUSTERS, exclude_items=HELD_OUT)
    return events_from_dicts(events, ACTIONS, SURFACES, item_features(N_ITEMS, N_CLUSTERS), feature_dim=N_CLUSTERS + 2)


@pytest.fixture(scope="session")
def planted_split(planted_log: EventLog) -> Split:
    return tail_split(planted_log, test_frac=0.15, valid_frac=0.1)


@pytest.fixture(scope="session")
def tiny_model(
    planted_log: EventLog, planted_split: Split, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GenerativeRetriever, Checkpoint, Path]]:
    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model, info, _ = train(planted_log, planted_split, tiny_settings(out), out, name="tiny", finetune=True, progress=False)
    yield model.eval(), info, out
