"""The item collection's schema, shared by both backends and the exact (numpy) path.

One point per item:
- point id: a non-negative integer item id is used as is; any other id (a string, a negative
  integer) becomes a deterministic uuid5 of its text. The mapping depends only on
  ``str(item_id)``, so the integer ``42`` and the string ``"42"`` (the wire's key form, and
  what ``items.npz`` stores) are the same point, while ``"042"`` is a different one.
- vector: the model's item embedding, L2-normalised, compared by cosine (= dot product).
- payload: ``item_id`` (the original id, returned by every query; an integer beyond 64 bits
  is kept as its decimal text), ``surfaces`` (where the
  item may be shown; keyword-indexed, filtered on), ``created_at`` (epoch ms) and
  ``popularity`` (float; indexed so the serving fallback can order by it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vector_store.errors import CorruptPointError

ItemId = int | str
PointId = int | uuid.UUID

ITEM_ID = "item_id"
SURFACES = "surfaces"
CREATED_AT = "created_at"
POPULARITY = "popularity"

# Fixed for the life of the project: changing it re-keys every string id in every store.
ID_NAMESPACE = uuid.UUID("5f0c8e57-2f5e-4c53-9d55-6b1d3c0f1a2e")
# Qdrant point ids are unsigned 64-bit; stay inside the signed range so every client
# (JSON, gRPC, msgpack) round-trips them unchanged.
_MAX_INT_ID = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """One item's payload. ``surfaces`` is explicit: "missing = all" is resolved by the caller."""

    item_id: ItemId
    surfaces: tuple[str, ...]
    created_at: int = 0  # epoch ms; 0 = unknown (items bulk-loaded from items.npz)
    popularity: float = 0.0


def point_id(item_id: ItemId) -> PointId:
    """The Qdrant point id of an item id (see the module docstring)."""
    if isinstance(item_id, bool) or not isinstance(item_id, (int, str)):
        raise TypeError(f"item ids are int or str, got {type(item_id).__name__}: {item_id!r}")
    text = str(item_id)
    # Canonical decimal only: "007" or "+7" must not collide with 7.
    if text.isdigit() and text.isascii() and (text == "0" or text[0] != "0"):
        value = int(text)
        if value <= _MAX_INT_ID:
            return value
    return uuid.uuid5(ID_NAMESPACE, text)


def payload_item_id(item_id: ItemId) -> ItemId:
    """The id as stored in the payload: integers outside the signed 64-bit range are kept as
    their decimal text (the engines' JSON payloads would turn them into floats). That text is
    the same item by `point_id`, so queries return an id that still matches."""
    if isinstance(item_id, int) and not -_MAX_INT_ID - 1 <= item_id <= _MAX_INT_ID:
        return str(item_id)
    return item_id


def to_payload(record: ItemRecord) -> dict[str, Any]:
    return {
        ITEM_ID: payload_item_id(record.item_id),
        SURFACES: list(record.surfaces),
        CREATED_AT: int(record.created_at),
        POPULARITY: float(record.popularity),
    }


def from_payload(payload: dict[str, Any]) -> ItemRecord:
    return ItemRecord(
        item_id=payload[ITEM_ID],
        surfaces=tuple(payload.get(SURFACES) or ()),
        created_at=int(payload.get(CREATED_AT, 0)),
        popularity=float(payload.get(POPULARITY, 0.0)),
    )


def point_payload(point: Any) -> dict[str, Any]:
    """A stored point's payload (Edge and server alike); one without an item id is corruption."""
    payload = point.payload
    if not payload or ITEM_ID not in payload:
        raise CorruptPointError(f"point {point.id} has no {ITEM_ID!r} in its payload (not written by recsys: "
                                "another writer shares the collection?)")
    return dict(payload)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (C-contiguous); zero rows stay zero."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0.0, norms, 1.0)


def check_matrix(vectors: np.ndarray, dim: int, what: str) -> np.ndarray:
    """``vectors`` as a finite float32 [N, dim] matrix, or a ValueError saying what is wrong."""
    x = np.asarray(vectors)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what}: expected shape [N, {dim}], got {list(x.shape)}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return x


def per_query(values: Sequence[Any] | None, n: int, what: str, default: Any) -> list[Any]:
    """Broadcast an optional per-query argument to a list of length ``n``."""
    if values is None:
        return [default] * n
    out = list(values)
    if len(out) != n:
        raise ValueError(f"{what}: expected one entry per query ({n}), got {len(out)}")
    return out


def dedupe_ids(ids: Iterable[ItemId]) -> list[PointId]:
    """Point ids of ``ids`` without repeats, order kept (for has_id filters)."""
    return list(dict.fromkeys(point_id(i) for i in ids))


def full_scan_threshold_kb(n_items: int, dim: int) -> int:
    """Qdrant's full-scan threshold (KB of float32 vectors) equivalent to ``n_items`` items."""
    return max(1, (n_items * dim * 4) // 1024)
