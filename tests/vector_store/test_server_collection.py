"""The server backend's collection on qdrant-client's local engine: what a start finds half made
(a crash between creating the collection and its payload indexes), or made by another process
between its check and its create."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from recsys.settings import VectorStoreSettings
from vector_store import ItemRecord
from vector_store.schema import POPULARITY, SURFACES
from vector_store.server import ServerStore

SETTINGS = VectorStoreSettings(backend="server", url=":memory:")

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local:UserWarning")


class IndexRecordingClient(QdrantClient):
    """The local engine, noting the payload indexes asked for (it keeps no payload schema)."""

    def __init__(self) -> None:
        super().__init__(location=":memory:")
        self.indexed: list[str] = []

    def create_payload_index(self, collection_name: str, field_name: str, *args: Any, **kwargs: Any) -> Any:
        self.indexed.append(field_name)
        return super().create_payload_index(collection_name, field_name, *args, **kwargs)


def test_a_collection_left_without_its_payload_indexes_gets_them_at_the_next_start() -> None:
    client = IndexRecordingClient()
    client.create_collection(SETTINGS.collection, vectors_config=qm.VectorParams(size=2, distance=qm.Distance.COSINE))
    store = ServerStore(SETTINGS, client=client)
    assert store.dim == 2
    assert sorted(client.indexed) == sorted([SURFACES, POPULARITY])


class LateCheckClient(IndexRecordingClient):
    """Another process creates the collection between this one's check and its create."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    def create_collection(self, collection_name: str, *args: Any, **kwargs: Any) -> bool:
        if not self.raced:
            self.raced = True
            super().create_collection(collection_name, *args, **kwargs)  # the other process wins
        return super().create_collection(collection_name, *args, **kwargs)  # raises: it exists


def test_the_loser_of_a_race_to_create_the_collection_uses_the_winners() -> None:
    client = LateCheckClient()
    store = ServerStore(SETTINGS, client=client)
    store.ensure_collection(2)
    assert client.raced and store.dim == 2
    store.upsert([ItemRecord("a", ("home",), 1, 0.5)], np.array([[1.0, 0.0]], np.float32))
    assert store.top_popular("home", 5) == [("a", 0.5)]
