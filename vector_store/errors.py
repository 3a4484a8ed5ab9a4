"""Every error the vector store raises on purpose.

VectorStoreError                 base: anything the store could not do
 ├── StoreLockedError            the Edge shard directory is open elsewhere (WAL lock)
 ├── CollectionMissingError      a read or write before ensure_collection(dim) created it
 ├── DimensionMismatchError      vectors (or an existing collection) have another width
 └── CorruptPointError           a stored point without the payload every point of ours has
"""

from __future__ import annotations


class VectorStoreError(RuntimeError):
    """The vector store could not do what was asked; the message says why."""


class StoreLockedError(VectorStoreError):
    """Raised when a Qdrant Edge shard is already open in another process.

    Edge allows one process per shard directory: its write-ahead log is locked while open.
    Run the indexer's `items` follower inside the process that serves queries, or give each
    process its own shard directory (settings.vector_store.path).
    """


class CollectionMissingError(VectorStoreError):
    """Raised on use of a collection (or Edge shard) that does not exist yet."""


class DimensionMismatchError(VectorStoreError):
    """Raised when vectors do not match the collection's dimension."""


class CorruptPointError(VectorStoreError):
    """Raised when a stored point has no item id in its payload (written by something else
    into the collection): asking again cannot help, so it is not retried as an outage."""
