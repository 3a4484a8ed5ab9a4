"""Fixtures of the vector-store tests (helpers live in vs_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vs_helpers import open_backend

from vector_store import VectorStore


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[..., VectorStore]]:
    """Factory of stores under test; everything it opened is closed afterwards."""
    opened: list[VectorStore] = []

    def make(kind: str, **overrides: object) -> VectorStore:
        store = open_backend(kind, tmp_path, **overrides)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
