"""`recsys produce`: file readers and records in memory; keys, values, topic creation and
file replay against the real broker."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, strategies as st

from recsys.settings import Settings
from streams.errors import InvalidEvent
from streams.produce import _CANONICAL_INT, _maybe_int, main, read_csv, read_events, read_jsonl, read_movielens, to_record
from streams.schema import ActionEvent, decode_event

WIRE_INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack carries and the decoder accepts as ints
TS = 1_700_000_000_000


def _consume(bootstrap: str, topic: str, n: int) -> list[Any]:
    """The first `n` records of `topic`, from all its partitions; asserts produce created it."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic)
        assert parts and len(parts) == Settings().kafka.partitions  # created by produce, not auto-created
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = time.monotonic() + 60  # a failure bound, not a timing assertion
        while len(records) < n:
            assert time.monotonic() < deadline, f"{len(records)} of {n} records on {topic}"
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


@given(WIRE_INTS)
def test_canonical_decimal_ids_are_ints(n: int) -> None:
    assert _maybe_int(str(n), _CANONICAL_INT) == n


@given(st.integers(min_value=0, max_value=2**64), st.integers(min_value=1, max_value=3), st.booleans())
def test_zero_padded_ids_stay_text(n: int, zeros: int, negative: bool) -> None:
    text = ("-" if negative else "") + "0" * zeros + str(n)
    assert _maybe_int(text, _CANONICAL_INT) == text


@given(st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1))
def test_ids_msgpack_cannot_carry_stay_text(n: int) -> None:
    assert _maybe_int(str(n), _CANONICAL_INT) == str(n)


def test_csv_keeps_ids_that_differ_only_by_leading_zeros_apart(tmp_path: Path) -> None:
    data = tmp_path / "events.csv"
    data.write_text(
        "user_id,item_id,action,surface,ts,context_item,dwell_ms\n"
        f"007,000123,click,home,{TS},0,0500\n"
        f"7,123,click,home,{TS},-0,\n"
        f"-7,{2**64 - 1},click,home,{TS},{2**64},\n"
    )
    rows = list(read_csv(data))
    assert [(r["user_id"], r["item_id"], r["context_item"]) for r in rows] == [
        ("007", "000123", 0),
        (7, 123, "-0"),
        (-7, 2**64 - 1, str(2**64)),
    ]
    assert rows[0]["dwell_ms"] == 500  # a quantity, not an identity: padding does not matter


@pytest.mark.parametrize("big", [2**64, -(2**63) - 1, 10**30])
def test_an_int_msgpack_cannot_carry_goes_as_its_text(big: int) -> None:
    s = Settings()
    key, value = to_record({"user_id": big, "item_id": big, "action": "click", "surface": "home", "ts": TS, "x": [big]})
    assert key == str(big).encode()
    event = decode_event(value, s, now=TS)  # accepted: a str id is a valid id
    assert (event.user_id, event.item_id, event.extra) == (str(big), str(big), {"x": [str(big)]})

    _, value = to_record(ActionEvent(1, big, "click", "home", TS))  # MovieLens ids are ints
    assert decode_event(value, s, now=TS).item_id == str(big)

    _, value = to_record({"user_id": 1, "item_id": 2, "action": "click", "surface": "home", "ts": big})
    with pytest.raises(InvalidEvent, match="ts must be an int"):  # the worker dead-letters it
        decode_event(value, s, now=TS)


def test_jsonl_int_too_long_for_python_is_read_as_text(tmp_path: Path) -> None:
    data = tmp_path / "events.jsonl"
    data.write_text('{"user_id": 1, "item_id": ' + "9" * 5000 + "}\n" + '{"user_id": 2}\n')
    assert [e["item_id"] if "item_id" in e else e["user_id"] for e in read_jsonl(data)] == ["9" * 5000, 2]


def test_jsonl_lines_json_accepts_but_msgpack_cannot_carry_are_sent_for_the_dlq(tmp_path: Path) -> None:
    data = tmp_path / "events.jsonl"
    good = '{"user_id": 3, "item_id": 4, "action": "click", "surface": "home", "ts": %d}' % TS
    data.write_text('{"user_id": "\\ud800", "item_id": 1}\n' + "[" * 3000 + "]" * 3000 + "\n" + good + "\n")
    events = list(read_jsonl(data))  # the deeply nested line is skipped with a warning, not fatal
    assert [e["user_id"] for e in events] == ["\ud800", 3]
    key, value = to_record(events[0])  # a lone surrogate: its bytes, which the worker refuses
    assert key == "\ud800".encode("utf-8", "surrogatepass")
    with pytest.raises(InvalidEvent, match="not msgpack"):
        decode_event(value, Settings(), now=TS)
    assert decode_event(to_record(events[1])[1], Settings(), now=TS).user_id == 3
    both = {"user_id": "\ud800", "item_id": 2**70}  # each fallback alone would have raised on the other
    with pytest.raises(InvalidEvent, match="not msgpack"):
        decode_event(to_record(both)[1], Settings(), now=TS)


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path: Path) -> None:
    data = tmp_path / "events.csv"
    data.write_text("user_id,item_id,action,surface,ts\n7,8,click,home,%d\n" % TS, encoding="utf-8-sig")
    assert list(read_csv(data)) == [{"user_id": 7, "item_id": 8, "action": "click", "surface": "home", "ts": TS}]


def test_a_csv_cell_over_the_csv_module_s_limit_goes_on_for_the_dlq(tmp_path: Path) -> None:
    """The csv module refuses a cell over 128 KiB: the replay stopped there, every row after it
    unsent. The row goes on (the worker dead-letters it as oversized)."""
    data = tmp_path / "events.csv"
    big = "q" * 200_000
    data.write_text(f"user_id,item_id,action,surface,ts,query\n1,8,click,home,{TS},a\n2,8,click,search,{TS},{big}\n"
                    f"3,8,click,home,{TS},b\n")
    rows = list(read_csv(data))
    assert [r["user_id"] for r in rows] == [1, 2, 3] and rows[1]["query"] == big


def test_a_json_array_file_is_read_as_its_objects(tmp_path: Path) -> None:
    """A `.json` export (one array, on one line or pretty-printed) was read line by line: every
    line skipped, "produced 0 events", exit 0."""
    events = [{"user_id": 1, "item_id": 8, "action": "click", "surface": "home", "ts": TS},
              {"user_id": 2, "item_id": 9, "action": "save", "surface": "home", "ts": TS}]
    for text in (json.dumps(events), "\n" + json.dumps([*events, 5], indent=2)):
        data = tmp_path / "events.json"
        data.write_text(text)
        assert list(read_jsonl(data)) == events  # the non-object element skipped
    data.write_text('[{"user_id": 1}, ')
    with pytest.raises(ValueError, match="a JSON array that cannot be read"):
        list(read_jsonl(data))


def test_bytes_that_are_not_utf8_go_to_the_dlq_and_the_replay_goes_on(tmp_path: Path) -> None:
    """A strict decode raised on the bad byte and lost the valid lines of its 8 KB chunk before it."""
    line = '{"user_id": %d, "item_id": "%s", "action": "click", "surface": "home", "ts": %d}\n'
    jsonl = tmp_path / "events.jsonl"
    jsonl.write_bytes(b"".join((line % (u, "caf\xe9" if u == 50 else "x", TS)).encode("latin-1") for u in range(56)))
    events = list(read_jsonl(jsonl))
    assert [e["user_id"] for e in events] == list(range(56))
    with pytest.raises(InvalidEvent, match="not msgpack"):
        decode_event(to_record(events[50])[1], Settings(), now=TS)
    csv_file = tmp_path / "events.csv"
    csv_file.write_bytes(b"user_id,item_id,action,surface,ts\n" + b"".join(
        b"%d,%s,click,home,%d\n" % (u, b"caf\xe9" if u == 5 else b"x", TS) for u in range(8)))
    assert [e["user_id"] for e in read_csv(csv_file)] == list(range(8))


def test_a_malformed_movielens_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    data = tmp_path / "u.data"
    data.write_text("196\t242\t3\t881250949\n196\tx\t4\t881250950\n\n186\t302\t4\n186\t302\t4\t891717742\n")
    assert [(e.user_id, e.item_id) for e in read_movielens(data)] == [(196, 242), (186, 302)]
    # replayed on the surface `recsys train --dataset ml100k` reads them on (the first configured)
    assert {e.surface for e in read_events(data, "movielens", movielens_surface="shop")} == {"shop"}


@pytest.mark.kafka
def test_produce_replays_movielens_keyed_by_user_in_time_order(kafka_bootstrap: str, tmp_path: Path) -> None:
    data = tmp_path / "u.data"
    data.write_text("196\t242\t3\t881250949\n186\t302\t4\t891717742\n196\t377\t5\t878887116\n")
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    rc = main(["--file", str(data), "--bootstrap", kafka_bootstrap, "--topic", topic, "--rate", "100", "--no-progress"])
    assert rc == 0

    records = _consume(kafka_bootstrap, topic, 3)
    s = Settings()
    events = [decode_event(r.value, s) for r in records]
    assert all(r.key == str(e.user_id).encode() for r, e in zip(records, events, strict=True))
    user_196 = [e for e in events if e.user_id == 196]
    assert [(e.item_id, e.action) for e in user_196] == [(377, "save"), (242, "click")]  # time order
    assert all(msgpack.unpackb(r.value)["surface"] == "home" for r in records)


@pytest.mark.kafka
def test_replay_goes_on_past_an_int_beyond_64_bits(kafka_bootstrap: str, tmp_path: Path) -> None:
    # One user, so all three share a partition and arrive in file order.
    events = [
        {"user_id": 5, "item_id": item, "action": "click", "surface": "home", "ts": TS + i}
        for i, item in enumerate([1, 2**64, 3])
    ]
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in events))
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    rc = main(["--file", str(data), "--bootstrap", kafka_bootstrap, "--topic", topic, "--no-progress"])
    assert rc == 0

    records = _consume(kafka_bootstrap, topic, 3)
    decoded = [decode_event(r.value, Settings(), now=TS) for r in records]
    assert [e.item_id for e in decoded] == [1, str(2**64), 3]
    assert all(r.key == b"5" for r in records)


@pytest.mark.kafka
def test_a_record_too_large_to_send_is_reported_and_the_replay_goes_on(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A row over the producer's request size was refused inside send(): the replay stopped
    there with a traceback, every row after it unsent."""
    topic = f"produce-big-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "events.csv"
    data.write_text(f"user_id,item_id,action,surface,ts,query\n5,1,click,home,{TS},a\n5,2,click,search,{TS},{'q' * (9 << 20)}\n"
                    f"5,3,click,home,{TS},b\n")
    assert main(["--file", str(data), "--topic", topic, "--bootstrap", kafka_bootstrap, "--no-progress"]) == 1
    assert [decode_event(r.value, Settings(), now=TS).item_id for r in _consume(kafka_bootstrap, topic, 2)] == [1, 3]
