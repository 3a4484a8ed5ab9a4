"""`recsys produce` against the real broker: keys, values, topic creation, file replay."""

from __future__ import annotations

import uuid
from pathlib import Path

import msgpack
import pytest

from recsys.settings import Settings
from streams.produce import main
from streams.schema import decode_event

pytestmark = [pytest.mark.kafka]


def test_produce_replays_movielens_keyed_by_user_in_time_order(kafka_bootstrap: str, tmp_path: Path) -> None:
    from kafka import KafkaConsumer, TopicPartition

    data = tmp_path / "u.data"
    data.write_text("196\t242\t3\t881250949\n186\t302\t4\t891717742\n196\t377\t5\t878887116\n")
    topic = f"produce-{uuid.uuid4().hex[:8]}"
    rc = main(["--file", str(data), "--bootstrap", kafka_bootstrap, "--topic", topic, "--rate", "100", "--no-progress"])
    assert rc == 0

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic)
        assert parts and len(parts) == Settings().kafka.partitions  # created by produce, not auto-created
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records = []
        while len(records) < 3:
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(batch)
    finally:
        consumer.close()
    s = Settings()
    events = [decode_event(r.value, s) for r in records]
    assert all(r.key == str(e.user_id).encode() for r, e in zip(records, events, strict=True))
    user_196 = [e for e in events if e.user_id == 196]
    assert [(e.item_id, e.action) for e in user_196] == [(377, "save"), (242, "click")]  # time order
    assert all(msgpack.unpackb(r.value)["surface"] == "home" for r in records)
