"""The event decoder: valid events round-trip, every bad input is an InvalidEvent with a reason."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from recsys.settings import Settings
from streams.errors import REASONS, InvalidEvent
from streams.schema import ActionEvent, decode_event, encode_event

S = Settings()
NOW = 1_700_000_000_000
GOOD: dict[str, Any] = {"user_id": 7, "item_id": "sku-1", "action": "save", "surface": "home", "ts": NOW - 1000}


def decode(obj: Any, **kw: Any) -> ActionEvent:
    raw = obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True)
    return decode_event(raw, S, now=NOW, **kw)


def test_valid_event_round_trips_with_optional_fields_and_unknown_keys_kept() -> None:
    event = ActionEvent(
        user_id="u-1", item_id=42, action="click", surface="search", ts=NOW, query="red shoes", dwell_ms=1500,
        extra={"client": "ios", "ab": [1, 2]},
    )
    back = decode_event(encode_event(event), S, now=NOW)
    assert back == event
    assert back.extra == {"client": "ios", "ab": [1, 2]}
    assert back.key == "u-1"


def test_unknown_keys_keep_whatever_scalar_keys_their_maps_have() -> None:
    # DESIGN: unknown keys are kept but ignored; only the event's own field names must be strings.
    assert decode({**GOOD, "meta": {1: "x", "k": [1, {2: 3}]}}).extra == {"meta": {1: "x", "k": [1, {2: 3}]}}


def test_time_is_timezone_aware_utc() -> None:
    event = decode(GOOD)
    assert event.time == datetime.fromtimestamp((NOW - 1000) / 1000, tz=UTC)
    assert event.time.tzinfo is not None


def test_nil_optional_fields_are_absent() -> None:
    event = decode({**GOOD, "query": None, "dwell_ms": None})
    assert event.query is None and event.dwell_ms is None


BAD: list[tuple[str, Any, str]] = [
    ("empty", b"", "not msgpack"),
    ("reserved byte", b"\xc1", "not msgpack"),
    ("truncated", msgpack.packb(GOOD)[:-3], "not msgpack"),
    ("trailing bytes", msgpack.packb(GOOD) + b"\x00", "not msgpack"),
    ("bad utf-8", b"\x81\xa7user_id\xa2\xff\xfe", "not msgpack"),
    ("int map key", {**GOOD, 5: 1}, "wrong type"),  # valid msgpack: the rule broken, not "not msgpack"
    ("array map key", msgpack.packb(GOOD)[:1].replace(b"\x85", b"\x86") + msgpack.packb(GOOD)[1:] + b"\x91\x01\x02",
     "wrong type"),
    ("array", [1, 2, 3], "not a map"),
    ("scalar", 12, "not a map"),
    ("no user_id", {k: v for k, v in GOOD.items() if k != "user_id"}, "missing field"),
    ("nil ts", {**GOOD, "ts": None}, "missing field"),
    ("bool user_id", {**GOOD, "user_id": True}, "wrong type"),
    ("float ts", {**GOOD, "ts": float(NOW)}, "wrong type"),
    ("str ts", {**GOOD, "ts": str(NOW)}, "wrong type"),
    ("bool ts", {**GOOD, "ts": True}, "wrong type"),
    ("list item_id", {**GOOD, "item_id": [1]}, "wrong type"),
    ("bytes item_id", {**GOOD, "item_id": b"x"}, "wrong type"),
    ("int action", {**GOOD, "action": 1}, "wrong type"),
    ("float dwell", {**GOOD, "dwell_ms": 1.5}, "wrong type"),
    ("int query", {**GOOD, "query": 3}, "wrong type"),
    ("empty user_id", {**GOOD, "user_id": ""}, "bad value"),
    ("blank item_id", {**GOOD, "item_id": "   "}, "bad value"),
    ("long user_id", {**GOOD, "user_id": "u" * (S.events.max_id_length + 1)}, "bad value"),
    ("negative dwell", {**GOOD, "dwell_ms": -1}, "bad value"),
    ("deep extras", {**GOOD, "x": [[[[[[[[[[1]]]]]]]]]]}, "bad value"),
    ("unknown action", {**GOOD, "action": "purchase"}, "unknown action"),
    ("unknown surface", {**GOOD, "surface": "email"}, "unknown surface"),
    ("future", {**GOOD, "ts": NOW + S.events.max_future_ms + 1}, "ts in the future"),
    ("seconds not ms", {**GOOD, "ts": NOW // 1000}, "ts too old"),
    ("oversized", {**GOOD, "pad": "x" * S.events.max_event_bytes}, "oversized"),
    # Size is checked before unpacking: garbage that is too big is "oversized", not "not msgpack".
    ("oversized garbage", b"\xc1" * (S.events.max_event_bytes + 1), "oversized"),
    ("deep nesting", b"\x91" * 3000 + b"\xc0", "not msgpack"),
    ("huge array header", b"\xdd\xff\xff\xff\xff", "oversized"),  # past max_fields before anything is read
]


@pytest.mark.parametrize(("obj", "reason"), [(o, r) for _, o, r in BAD], ids=[n for n, _, _ in BAD])
def test_bad_event_is_rejected_with_its_reason(obj: Any, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(obj)
    assert info.value.reason == reason
    assert reason in REASONS


def test_limits_come_from_settings() -> None:
    small = Settings(events={"max_event_bytes": 64, "actions": ["buy"], "surfaces": ["email"]})
    raw = msgpack.packb({**GOOD, "action": "buy", "surface": "email"})
    assert decode_event(raw, small, now=NOW).action == "buy"
    with pytest.raises(InvalidEvent, match="oversized"):
        decode_event(msgpack.packb({**GOOD, "action": "buy", "surface": "email", "pad": "x" * 64}), small, now=NOW)


@hsettings(max_examples=400, deadline=None)
@given(st.binary(max_size=2 * S.events.max_event_bytes))
def test_arbitrary_bytes_never_crash_the_decoder(raw: bytes) -> None:
    try:
        decode_event(raw, S, now=NOW)
    except InvalidEvent as exc:
        assert exc.reason in REASONS and str(exc)


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)
field_values = {
    "user_id": st.integers(0, 10**6) | st.text(max_size=300) | values,
    "item_id": st.integers(0, 10**6) | st.text(max_size=10) | values,
    "action": st.sampled_from([*S.events.actions, "buy"]) | values,
    "surface": st.sampled_from([*S.events.surfaces, "tv"]) | values,
    "ts": st.integers(0, 2 * NOW) | values,
    "query": st.text(max_size=10) | values,
    "dwell_ms": st.integers(-10, 10**6) | values,
}

def _with_extras(fields: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.text(max_size=8), values, max_size=3).map(lambda extra: {**extra, **fields})


# Half the maps carry every required field with a valid value (the rest anything): arbitrary
# fields alone almost never make an event (0 of 1,200 drawn), and the checks of what passes
# would never run.
valid_fields = {
    "user_id": st.integers(0, 10**6) | st.text(min_size=1, max_size=20).filter(str.strip),
    "item_id": st.integers(0, 10**6) | st.text(min_size=1, max_size=10).filter(str.strip),
    "action": st.sampled_from(S.events.actions),
    "surface": st.sampled_from(S.events.surfaces),
    "ts": st.integers(S.events.min_ts_ms, NOW),
}
optional_fields = {k: v for k, v in field_values.items() if k not in valid_fields}
maps = (st.fixed_dictionaries(valid_fields, optional=optional_fields).flatmap(_with_extras)
        | st.fixed_dictionaries({}, optional=field_values).flatmap(_with_extras))


@hsettings(max_examples=400, deadline=None)
@given(maps)
def test_structured_maps_are_decoded_or_rejected_with_a_reason(obj: dict[str, Any]) -> None:
    try:
        event = decode(obj)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        return
    # Whatever passes satisfies the schema.
    assert isinstance(event.ts, int) and not isinstance(event.ts, bool)
    assert S.events.min_ts_ms <= event.ts <= NOW + S.events.max_future_ms
    assert event.action in S.events.actions and event.surface in S.events.surfaces
    for id_ in (event.user_id, event.item_id):
        assert isinstance(id_, int | str) and not isinstance(id_, bool) and str(id_).strip()
    again = encode_event(event)  # bytes, not objects: NaN in an unknown key is not == itself
    assert encode_event(decode_event(again, S, now=NOW)) == again
