"""Item embeddings in Qdrant: one interface (`VectorStore`), two backends, and the factory.

- `edge`   : Qdrant Edge, embedded, on disk (the default; one process per shard directory)
- `server` : a Qdrant server / cluster through qdrant-client

`open_store(settings)` picks the backend from settings.vector_store.backend. The item
indexer (`recsys index`) lives in vector_store.indexer.
"""

from __future__ import annotations

from recsys.settings import Settings, VectorStoreSettings
from vector_store.base import BatchHits, Hit, VectorStore
from vector_store.errors import (
    CollectionMissingError,
    CorruptPointError,
    DimensionMismatchError,
    StoreLockedError,
    VectorStoreError,
)
from vector_store.schema import ItemId, ItemRecord, point_id

__all__ = [
    "BatchHits",
    "CollectionMissingError",
    "CorruptPointError",
    "DimensionMismatchError",
    "Hit",
    "ItemId",
    "ItemRecord",
    "StoreLockedError",
    "VectorStore",
    "VectorStoreError",
    "open_store",
    "point_id",
]

BACKENDS = ("edge", "server")


def open_store(settings: Settings | VectorStoreSettings, dim: int | None = None) -> VectorStore:
    """Open the configured backend; with ``dim``, also create the collection if missing.

    Edge raises StoreLockedError when another process has the shard open.
    """
    vs = settings.vector_store if isinstance(settings, Settings) else settings
    store: VectorStore
    if vs.backend == "edge":
        from vector_store.edge import EdgeStore  # imported lazily: each backend's engine is heavy

        store = EdgeStore(vs)
    elif vs.backend == "server":
        from vector_store.server import ServerStore

        store = ServerStore(vs)
    else:
        raise ValueError(
            f"settings.vector_store.backend must be one of {BACKENDS}, got {vs.backend!r}"
        )
    if dim is not None:
        try:
            store.ensure_collection(dim)
        except BaseException:
            store.close()
            raise
    return store
