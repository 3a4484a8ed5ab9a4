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


class RebalanceWatch:
    """How long a consumer's commits have been refused by a rebalance, in a row.

    kafka-python 3.0.12 was seen stuck for good after a group leader's second join: SyncGroup
    never sent, the broker dropped the member, every commit refused as "rebalance in progress"
    while poll() kept fetching on the old assignment. Past ``limit_s`` of refusals the owner
    replaces the consumer with a fresh one, which joins anew and re-reads from the committed
    offsets (so nothing polled since is lost, only recomputed).
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._since: float | None = None

    def refused(self) -> bool:
        """Note a refused commit; True (and start over) once refusals have lasted ``limit_s``."""
        now = time.monotonic()
        self._since = self._since or now
        if now - self._since < self.limit_s:
            return False
        log.warning("commits refused by a rebalance for %.0f s; replacing the consumer", now - self._since)
        self._since = None
        return True

    def committed(self) -> None:
        self._since = None


def _partitions(consumer: Any, topic: str) -> set[int]:
    from kafka.errors import KafkaError

    try:
        return consumer.partitions_for_topic(topic) or set()
    except KafkaError:  # broker not reachable yet: keep waiting until the deadline
        return set()
