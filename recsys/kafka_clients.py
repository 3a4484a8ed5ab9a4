"""Kafka client helpers shared by the processes that consume with kafka-python."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def group_consumer(topic: str, *, metadata_wait_s: float = 30.0, **config: Any) -> Any:
    """A KafkaConsumer in a consumer group, subscribed to `topic` only once its partitions are
    known.

    kafka-python's group leader assigns from the metadata it holds at the join: subscribing
    before the topic's partitions are known gives an empty assignment ("No partition metadata
    for topic"), and the rejoin that should follow the metadata update was seen to leave the
    member idle with no partitions for a minute. Fetching the metadata first avoids that path.
    A topic that does not exist yet (a deployment whose producer creates it) is subscribed to
    after `metadata_wait_s` anyway, as before.
    """
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(**config)
    deadline = time.monotonic() + metadata_wait_s
    while not _partitions(consumer, topic):
        if time.monotonic() >= deadline:
            log.warning("no partitions known for %s after %.0f s; subscribing anyway", topic, metadata_wait_s)
            break
        time.sleep(0.2)
    consumer.subscribe([topic])
    return consumer


def _partitions(consumer: Any, topic: str) -> set[int]:
    from kafka.errors import KafkaError

    try:
        return consumer.partitions_for_topic(topic) or set()
    except KafkaError:  # broker not reachable yet: keep waiting until the deadline
        return set()
