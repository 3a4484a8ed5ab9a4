"""Helper of the worker tests: committed vs end offsets of a consumer group."""

from __future__ import annotations

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
