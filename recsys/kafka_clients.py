"""Kafka client helpers shared by the processes that consume with kafka-python."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
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


class PendingCommits:
    """Offsets (partition -> next offset to read) of work that is done but not yet committed,
    committed by name, with a guard against a consumer stuck in a rebalance.

    By name, because a commit of "the consumed positions" during a rebalance can carry none of
    them (CI saw the items follower commit nothing after a first join with no partition
    metadata). The guard: kafka-python 3.0.12 was seen stuck for good after a group leader's
    second join (SyncGroup never sent, the broker dropped the member, every commit refused as
    "rebalance in progress" while poll() kept fetching on the old assignment). Past
    ``rejoin_after_s`` of refusals in a row the owner replaces the consumer; the fresh one joins
    anew and re-reads from the committed offsets, so nothing done since is lost, only redone.
    """

    def __init__(self, rejoin_after_s: float) -> None:
        self.rejoin_after_s = rejoin_after_s
        self.offsets: dict[Any, int] = {}
        self.committed: dict[Any, int] = {}  # what the last successful commit carried
        self._refused_since: float | None = None

    def clear(self) -> None:
        """Forget every pending offset (their records are re-read) and any refusal so far."""
        self.offsets, self._refused_since = {}, None

    def add(self, offsets: Mapping[Any, int]) -> None:
        for tp, offset in offsets.items():
            self.offsets[tp] = max(offset, self.offsets.get(tp, 0))

    def commit(self, consumer: Any) -> bool:
        """Commit every pending offset through ``consumer``. False when commits have been
        refused by a rebalance for ``rejoin_after_s``: the consumer is stuck and must be
        replaced (the pending offsets are dropped: its successor re-reads them). A refusal
        before that, or any other failure, raises and keeps them pending."""
        from kafka.errors import CommitFailedError, RebalanceInProgressError
        from kafka.structs import OffsetAndMetadata

        # A partition the group has given to another member since: its offset committed from
        # here could move the new owner's committed position back (the broker takes commits
        # of any member for any partition). Its records are re-read there if need be.
        owned = consumer.assignment()
        self.offsets = {tp: o for tp, o in self.offsets.items() if tp in owned}
        self.committed = {}
        if not self.offsets:
            # Nothing left to commit (what was refused moved to other members): the refusal is
            # over, and must not count towards the next one's `rejoin_after_s`.
            self._refused_since = None
            return True
        try:
            consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in self.offsets.items()})
        except (CommitFailedError, RebalanceInProgressError):
            now = time.monotonic()
            self._refused_since = self._refused_since or now
            if now - self._refused_since < self.rejoin_after_s:
                raise
            log.warning("commits refused by a rebalance for %.0f s; replacing the consumer", now - self._refused_since)
            self.offsets, self._refused_since = {}, None
            return False
        self.committed, self.offsets, self._refused_since = self.offsets, {}, None
        return True


def read_topic(bootstrap: str, topic: str) -> list[tuple[str, bytes]]:
    """Every (key, value) of ``topic`` up to its current end, partition by partition, in log order."""
    return [(r.key.decode(), r.value) for r in read_to_end(bootstrap, topic) if r.value is not None]


def read_to_end(bootstrap: str, topic: str, group_id: str | None = None, *, stall_s: float = 30.0) -> list[Any]:
    """`iter_to_end`'s records, partition by partition, in log order."""
    records = list(iter_to_end(bootstrap, topic, group_id, stall_s=stall_s))
    return sorted(records, key=lambda r: (r.partition, r.offset))


class Stopped(Exception):
    """A read given up because the process was asked to stop (SIGTERM)."""


def iter_to_end(bootstrap: str, topic: str, group_id: str | None = None, *, stall_s: float = 30.0,
                stop: threading.Event | None = None) -> Iterator[Any]:
    """The records of ``topic`` up to the end offsets it has now, as they are fetched (in log
    order within a partition): from the beginning, or from ``group_id``'s committed offsets
    (what that group has yet to read). Reads with manually assigned partitions, so the group
    is neither joined nor committed to. Raises KafkaTimeoutError when the broker does not
    answer, or no record arrives for ``stall_s`` before the end; Stopped once ``stop`` is set
    (a long topic would otherwise hold a stopping process past its grace period)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaTimeoutError

    # earliest: a committed offset the log no longer holds resumes where the group consumer will
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        if group_id is not None:
            for tp in tps:
                committed = consumer.committed(tp, timeout_ms=int(stall_s * 1000))
                if committed is not None:
                    consumer.seek(tp, committed)
        end = consumer.end_offsets(tps)
        last_progress = time.monotonic()

        def behind(tp: Any) -> bool:
            # kafka-python returns None when the offset reset does not finish in time (the broker
            # went away since end_offsets): the timeout this promises, not a TypeError.
            position = consumer.position(tp, timeout_ms=int(stall_s * 1000))
            if position is None:
                raise KafkaTimeoutError(f"reading {topic} to its end: no position for {tp} in {stall_s:.0f} s")
            return bool(position < end[tp])

        while any(behind(tp) for tp in tps):
            if stop is not None and stop.is_set():
                raise Stopped(f"reading {topic} to its end")
            batches = consumer.poll(timeout_ms=500)
            if batches:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall_s:
                raise KafkaTimeoutError(f"reading {topic} to its end: no record for {stall_s:.0f} s")
            for tp, batch in batches.items():
                yield from (r for r in batch if r.offset < end[tp])
    finally:
        consumer.close(autocommit=False)


def _partitions(consumer: Any, topic: str) -> set[int]:
    from kafka.errors import KafkaError

    try:
        return consumer.partitions_for_topic(topic) or set()
    except KafkaError:  # broker not reachable yet: keep waiting until the deadline
        return set()
