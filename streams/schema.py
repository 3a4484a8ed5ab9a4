"""The action event: its dataclass, its msgpack wire form, and the validating decoder.

Wire form (shared/DESIGN.md): a msgpack map with `user_id` (int or str), `item_id` (int or
str), `action`, `surface`, `ts` (event time, epoch ms) and optional `query`, `context_item`,
`dwell_ms`. Unknown keys are kept (in `ActionEvent.extra`) but ignored. Everything else is
rejected with an `InvalidEvent` whose `reason` the dead-letter topic records.

The decoder faces untrusted bytes, so it bounds work before doing it: the size is checked
before unpacking, the unpacker's string / container limits are set, and nothing it raises
escapes as anything but `InvalidEvent`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgpack

from recsys.settings import EventSettings, Settings
from streams.errors import InvalidEvent

__all__ = ["REQUIRED_FIELDS", "ActionEvent", "Id", "decode_event", "encode_event", "now_ms"]

Id = int | str
REQUIRED_FIELDS: tuple[str, ...] = ("user_id", "item_id", "action", "surface", "ts")
_OPTIONAL_FIELDS: tuple[str, ...] = ("query", "context_item", "dwell_ms")
_KNOWN_FIELDS = frozenset(REQUIRED_FIELDS + _OPTIONAL_FIELDS)


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ActionEvent:
    """One user action on one item on one surface, at event time `ts` (epoch ms)."""

    user_id: Id
    item_id: Id
    action: str
    surface: str
    ts: int
    query: str | None = None  # what the user searched (surface "search")
    context_item: Id | None = None  # the item the related-items surface was opened from
    dwell_ms: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)  # unknown keys, ignored

    @property
    def time(self) -> datetime:
        """Event time as a timezone-aware UTC datetime."""
        return datetime.fromtimestamp(self.ts / 1000, tz=UTC)

    @property
    def key(self) -> str:
        """The Kafka key of this event: the user id as a string (per-user order, partitioning)."""
        return str(self.user_id)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map: unknown keys first so that a known field always wins."""
        wire: dict[str, Any] = dict(self.extra)
        wire.update(
            user_id=self.user_id, item_id=self.item_id, action=self.action, surface=self.surface, ts=self.ts
        )
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                wire[name] = value
        return wire


def encode_event(event: ActionEvent | Mapping[str, Any]) -> bytes:
    """msgpack bytes of an event (or of any map: tests and tools use it to craft bad events)."""
    wire = event.to_wire() if isinstance(event, ActionEvent) else dict(event)
    return msgpack.packb(wire, use_bin_type=True)


def decode_event(raw: bytes | None, settings: Settings, *, now: int | None = None) -> ActionEvent:
    """Validate and decode one raw `actions` value; raise `InvalidEvent(reason)` otherwise.

    `now` (epoch ms) defaults to the wall clock; it bounds how far in the future `ts` may be.
    """
    cfg = settings.events
    if raw is None or len(raw) == 0:
        raise InvalidEvent("not msgpack", "empty value")
    if len(raw) > cfg.max_event_bytes:
        raise InvalidEvent("oversized", f"{len(raw)} bytes > max_event_bytes={cfg.max_event_bytes}")
    try:
        obj = _unpack(raw, cfg, strict_map_key=True)  # map keys str / bytes: every event as sent
    except InvalidEvent as exc:
        if "not allowed for map key" not in exc.detail:
            raise
        # A scalar key of another type: allowed below the top level (DESIGN: unknown keys are kept
        # but ignored, their values as they came), so only those events pay for the second read.
        obj = _unpack(raw, cfg, strict_map_key=False)
        if isinstance(obj, dict) and (bad := [k for k in obj if not isinstance(k, (str, bytes))]):
            raise InvalidEvent("wrong type", f"field names must be strings, got {bad[0]!r}"[:200]) from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not a map", f"top level is {type(obj).__name__}")

    for name in REQUIRED_FIELDS:
        if obj.get(name) is None:  # nil counts as missing
            raise InvalidEvent("missing field", name)
    user_id = _id(obj["user_id"], "user_id", cfg.max_id_length)
    item_id = _id(obj["item_id"], "item_id", cfg.max_id_length)
    action = _str(obj["action"], "action")
    surface = _str(obj["surface"], "surface")
    ts = _int(obj["ts"], "ts")
    if action not in cfg.actions:
        raise InvalidEvent("unknown action", repr(action)[:100])
    if surface not in cfg.surfaces:
        raise InvalidEvent("unknown surface", repr(surface)[:100])
    if ts < cfg.min_ts_ms:
        raise InvalidEvent("ts too old", f"ts={ts} < min_ts_ms={cfg.min_ts_ms} (seconds instead of ms?)")
    horizon = (now_ms() if now is None else now) + cfg.max_future_ms
    if ts > horizon:
        raise InvalidEvent("ts in the future", f"ts={ts} > now + max_future_ms={horizon}")

    query = obj.get("query")
    if query is not None:
        query = _str(query, "query")
    context_item = obj.get("context_item")
    if context_item is not None:
        context_item = _id(context_item, "context_item", cfg.max_id_length)
    dwell_ms = obj.get("dwell_ms")
    if dwell_ms is not None:
        dwell_ms = _int(dwell_ms, "dwell_ms")
        if dwell_ms < 0:
            raise InvalidEvent("bad value", f"dwell_ms={dwell_ms} < 0")

    extra = {k: v for k, v in obj.items() if k not in _KNOWN_FIELDS}
    for k, v in extra.items():
        if _depth(v, cfg.max_nesting) > cfg.max_nesting:
            raise InvalidEvent("bad value", f"value of unknown key {str(k)[:50]!r} nested deeper than {cfg.max_nesting}")
    return ActionEvent(
        user_id=user_id,
        item_id=item_id,
        action=action,
        surface=surface,
        ts=ts,
        query=query,
        context_item=context_item,
        dwell_ms=dwell_ms,
        extra=extra,
    )


def _unpack(raw: bytes, cfg: EventSettings, *, strict_map_key: bool) -> Any:
    """msgpack within the event limits; `InvalidEvent` with the rule broken otherwise. Each map
    is bounded by max_map_len, so non-string keys cannot be used to flood a dict's hash."""
    try:
        return msgpack.unpackb(
            raw,
            raw=False,  # str must be valid utf-8
            strict_map_key=strict_map_key,
            max_str_len=cfg.max_event_bytes,
            max_bin_len=cfg.max_event_bytes,
            max_ext_len=cfg.max_event_bytes,
            max_array_len=cfg.max_fields,
            max_map_len=cfg.max_fields,
        )
    except Exception as exc:  # the unpacker raises half a dozen types (ValueError, StackError, ...)
        # Valid msgpack past a limit, or with a key of the wrong type, is not "not msgpack": say
        # which rule it broke (the unpacker tells them apart only by its message).
        text = str(exc)
        reason = ("oversized" if "exceeds max_" in text
                  else "wrong type" if "not allowed for map key" in text or "unhashable" in text  # a map or array as a key
                  else "not msgpack")
        raise InvalidEvent(reason, f"{type(exc).__name__}: {exc}"[:200]) from None


def _int(value: Any, name: str) -> int:
    # bool is a subclass of int; True is not a timestamp.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent("wrong type", f"{name} must be an int, got {type(value).__name__}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidEvent("wrong type", f"{name} must be a str, got {type(value).__name__}")
    return value


def _id(value: Any, name: str, max_length: int) -> Id:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidEvent("wrong type", f"{name} must be an int or a str, got {type(value).__name__}")
    if isinstance(value, str):
        if not value.strip():
            raise InvalidEvent("bad value", f"{name} is empty")
        if len(value.encode()) > max_length:
            raise InvalidEvent("bad value", f"{name} longer than max_id_length={max_length} bytes")
    return value


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded msgpack value (a scalar is 0, `[1]` is 1), counted up to `limit + 1`."""
    depth, level = 0, [value]
    while depth <= limit:
        if not any(isinstance(v, dict | list) for v in level):
            return depth
        children: list[Any] = []
        for v in level:
            if isinstance(v, dict):
                children.extend(v.values())
            elif isinstance(v, list):
                children.extend(v)
        depth, level = depth + 1, children
    return depth
