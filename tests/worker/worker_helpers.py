"""Helpers of the worker tests: committed vs end offsets of a consumer group, polling."""

from __future__ import annotations

import time
from collections.abc import Callable

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


def wait_until(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until truthy or the timeout; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False
