"""Every exception the streams package raises, in one place.

    StreamsError                 base class of this package's errors
     └── InvalidEvent            an event fails validation; carries a stable `reason`
          └── TooLate            a valid event older than the user's lateness bound

Invalid events are data, not crashes: the Faust agent catches `InvalidEvent` and writes the
original bytes with `reason` to the dead-letter topic, so a reason is a short, stable string
(counted per reason in the metrics) and `detail` says what exactly was wrong.
"""

from __future__ import annotations

from recsys.dead_letters import bounded_detail

__all__ = ["REASONS", "InvalidEvent", "StreamsError", "TooLate"]

# The stable reasons. Metrics label by these; the DLQ record carries one in "reason".
REASONS: tuple[str, ...] = (
    "oversized",  # raw bytes longer than settings.events.max_event_bytes (checked before unpacking), or a map / array / ext header past its unpack limit (max_fields entries)
    "not msgpack",  # empty, truncated, trailing bytes, bad utf-8, too deep containers
    "not a map",  # valid msgpack, but not a map at the top level
    "missing field",  # one of user_id, item_id, action, surface, ts is absent (or nil)
    "wrong type",  # e.g. ts not an int (bools are not ints), id neither int nor str, a map key not a string
    "bad value",  # right type, wrong value: empty / too long id, negative dwell_ms, too deep extras
    "unknown action",  # action not in settings.events.actions
    "unknown surface",  # surface not in settings.events.surfaces
    "ts in the future",  # ts more than settings.events.max_future_ms ahead of the record's Kafka time (or the clock, if earlier)
    "ts too old",  # ts before settings.events.min_ts_ms (usually seconds sent instead of ms)
    "wrong key",  # the Kafka key is not str(user_id) (per-user order and partitioning need it)
    "too late",  # event time behind the user's newest event by more than streams.lateness_ms
)


class StreamsError(Exception):
    """Base class of the streams package's errors."""


class InvalidEvent(StreamsError):
    """An event that must not enter a sequence; raised by `decode_event` and `fold_event`.

    `reason` is one of `REASONS`; `detail` is a human-readable explanation.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, f"unknown reason {reason!r}; add it to REASONS"
        detail = bounded_detail(detail)
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail




class TooLate(InvalidEvent):
    """A valid event whose event time is behind the user's newest event by more than the
    configured lateness (`settings.streams.lateness_ms`), and which would otherwise have
    entered the kept sequence."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("too late", detail)
