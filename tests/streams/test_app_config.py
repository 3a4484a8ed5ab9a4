"""`create_app` wires the settings into Faust (built, not started: no broker needed)."""

from __future__ import annotations

import msgpack
import pytest

from recsys.settings import Settings
from recsys.dead_letters import dlq_key, dlq_record
from streams.app import Counters, create_app
from streams.errors import InvalidEvent


def test_app_uses_the_settings() -> None:
    s = Settings(
        kafka={"bootstrap_servers": "k1:9092,k2:9092", "partitions": 3},
        topics={"actions": "a", "dlq": "a.dlq", "user_updates": "u"},
        streams={"app_id": "app-x", "web_port": 7001, "broker_max_poll_records": 50, "instance_id": "w1"},
    )
    app = create_app(s)
    assert app.conf.id == "app-x"
    assert [str(u) for u in app.conf.broker] == ["kafka://k1:9092", "kafka://k2:9092"]
    assert app.conf.topic_partitions == 3
    assert app.conf.web_port == 7001 and app.conf.broker_max_poll_records == 50
    assert app.conf.consumer_group_instance_id == "w1"
    table = app.tables["sequences"]
    assert table.changelog_topic.get_topic_name() == "app-x-sequences-changelog"
    assert table.partitions == 3
    # The changelog carries raw bytes (this package's msgpack), not Faust's JSON.
    assert table.key_serializer == "raw" and table.value_serializer == "raw"
    assert [t for agent in app.agents.values() for t in agent.channel.topics] == ["a"]


def test_dlq_record_carries_reason_original_and_position() -> None:
    rec = msgpack.unpackb(
        dlq_record(InvalidEvent("oversized", "5000 bytes"), original=b"x" * 10, topic="a", partition=1, offset=7, max_original=4),
        raw=False,
    )
    assert rec["reason"] == "oversized" and rec["detail"] == "5000 bytes"
    assert rec["original"] == b"xxxx" and rec["original_size"] == 10 and rec["truncated"] is True
    assert (rec["topic"], rec["partition"], rec["offset"]) == ("a", 1, 7) and rec["at"] > 0


def test_dlq_record_carries_the_key_size_and_cut_key_and_the_worst_case_fits_the_broker() -> None:
    cfg = Settings().streams
    rec = msgpack.unpackb(
        dlq_record(InvalidEvent("wrong key"), original=b"v", topic="a", partition=0, offset=1, max_original=9,
                   key=b"kk", max_key=cfg.dlq_max_key_bytes),
        raw=False,
    )
    assert rec["key_size"] == 2 and rec["key_truncated"] is False
    assert dlq_key(None, 4) is None and dlq_key(b"123456", 4) == b"1234"
    assert msgpack.unpackb(dlq_record(InvalidEvent("not msgpack"), original=None, topic="a", partition=0, offset=1,
                                      max_original=9), raw=False)["key_size"] == 0  # fmt: skip
    # The worst case as the worker builds it: a ~1 MiB key and value, the longest detail (4-byte
    # characters) and topic name Kafka allows. Key + value stay far below the broker's 1 MiB.
    big = b"\xff" * (1 << 20)
    key = dlq_key(big, cfg.dlq_max_key_bytes)
    assert key is not None and len(key) == cfg.dlq_max_key_bytes
    value = dlq_record(InvalidEvent("wrong key", "\U0001f600" * 10_000), original=big, topic="t" * 249,
                       partition=2**31 - 1, offset=2**63 - 1, key=big, max_key=cfg.dlq_max_key_bytes,
                       max_original=cfg.dlq_max_original_bytes - len(key))  # fmt: skip
    rec = msgpack.unpackb(value, raw=False)
    assert rec["key_size"] == len(big) and rec["key_truncated"] is True
    assert rec["original_size"] == len(big) and rec["truncated"] is True
    assert len(key) + len(value) < cfg.dlq_max_original_bytes + 8 * 1024 < 1_000_000


def test_counters_are_prometheus_text() -> None:
    c = Counters()
    c.events["applied"] += 3
    c.invalid["not msgpack"] += 1
    c.updates = 2
    text = c.prometheus()
    assert 'recsys_streams_events_total{outcome="applied"} 3' in text
    assert 'recsys_streams_invalid_total{reason="not msgpack"} 1' in text
    assert "recsys_streams_updates_total 2" in text
    assert c.valid == 3


def test_stock_delivery_without_a_flush_interval_is_refused() -> None:
    # Faust's take_events reads within=0 as no time limit: a quiet stream would hold its events.
    with pytest.raises(ValueError, match="flush_interval_s > 0"):
        create_app(Settings(streams={"delivery": "stream", "flush_interval_s": 0}))
    assert create_app(Settings(streams={"flush_interval_s": 0})).conf.id  # window delivery handles 0
