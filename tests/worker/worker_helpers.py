"""Helpers of the worker tests: committed vs end offsets of a consumer group, the candidates written."""

from __future__ import annotations

import threading
from typing import Any

import msgpack
from kafka import KafkaConsumer
from kafka.structs import TopicPartition


def committed_and_end(bootstrap: str, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """The group's committed offset (0 = none) and the end offset of each partition of ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = consumer.end_offsets(tps)
        return {tp.partition: consumer.committed(tp) or 0 for tp in tps}, {tp.partition: ends[tp] for tp in tps}
    finally:
        consumer.close()


def read_candidates(bootstrap: str, topic: str) -> dict[str, dict[str, Any]]:
    """The newest `candidates` record of each user on ``topic`` so far (a read that stops after
    1.5 s without a record: poll it until what the test expects is there)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=1500)
    try:
        return {m.key.decode(): msgpack.unpackb(m.value, raw=False) for m in consumer}
    finally:
        consumer.close()


def send_updates(bootstrap: str, topic: str, records: dict[str, bytes]) -> None:
    """`user-updates` records (key -> raw value), acknowledged before returning."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for key, value in records.items():
        producer.send(topic, key=key.encode(), value=value)
    producer.flush()
    producer.close()


def start_loop(worker: Any) -> tuple[threading.Thread, list[BaseException]]:
    """`worker.run()` in a daemon thread; what it raised lands in the returned list."""
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            worker.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread, errors


def create_topics(bootstrap: str, *names: str) -> None:
    """Create ``names`` before a worker subscribes: a consumer waits up to 30 s for the partitions
    of a topic that does not exist yet (recsys.kafka_clients.group_consumer)."""
    from recsys.topics import ensure_topics

    ensure_topics(bootstrap, dict.fromkeys(names, {}), partitions=2)
