"""WindowConsumer's two guards against fetched `actions` messages that are never read again.

Both were behind a loss under crashes (tests/test_fault_injection.py): a Faust worker SIGKILLed
before its group's first commit and restarted while events kept arriving lost everything that
arrived between the kill and its first fetch. The end of changelog recovery pauses the
changelog partitions by emptying, in place, the very set object a pending fetch filters by; to
aiokafka an empty set means every partition, so the fetch returned the `actions` backlog, which
Faust dropped as not active; with nothing committed, its seek back did nothing.

These run the consumer's own methods against a stand-in for the aiokafka consumer thread (the
part that talks to the broker), to pin down what each method hands it; the whole system under
kills, with a real broker, is the fault-injection test.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from faust.transport.consumer import ensure_TP

from streams.delivery import WindowConsumer

ACTIONS_0, ACTIONS_1 = TopicPartition("actions", 0), TopicPartition("actions", 1)
CHANGELOG_0 = TopicPartition("recsys-streams-sequences-changelog", 0)


class ConsumerThread:
    """Records what the consumer hands to the thread that owns the aiokafka consumer."""

    def __init__(self, committed: dict[TopicPartition, int | None] | None = None) -> None:
        self.committed = committed or {}
        self.fetch_filter: set[Any] | None = None
        self.filter_while_waiting: set[Any] | None = None
        self.seeks_to_beginning: list[TopicPartition] = []

    async def getmany(self, active_partitions: set[Any] | None, timeout: float) -> dict[Any, list[Any]]:
        self.fetch_filter = active_partitions
        await asyncio.sleep(0.01)  # aiokafka waits for records: recovery ends meanwhile
        self.filter_while_waiting = None if active_partitions is None else set(active_partitions)
        return {}

    async def seek_to_committed(self) -> dict[TopicPartition, int | None]:
        return dict(self.committed)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        self.seeks_to_beginning.extend(partitions)


def window_consumer(thread: ConsumerThread) -> WindowConsumer:
    consumer = object.__new__(WindowConsumer)  # no transport, no app start: only the methods under test
    consumer._thread = thread  # type: ignore[attr-defined]
    consumer.app = SimpleNamespace(windowed={"actions": object()})  # type: ignore[assignment]
    consumer._read_offset = {}
    consumer._committed_offset = {}
    consumer.assignment = lambda: {ensure_TP(tp) for tp in thread.committed}  # type: ignore[method-assign]
    return consumer


def test_a_pause_while_a_fetch_waits_does_not_widen_that_fetch_to_every_partition() -> None:
    thread = ConsumerThread()
    consumer = window_consumer(thread)
    active = {ensure_TP(CHANGELOG_0)}  # during recovery: only the changelog is being read

    async def fetch_while_recovery_ends() -> None:
        fetch = asyncio.ensure_future(consumer._getmany(active, timeout=1.0))
        await asyncio.sleep(0)
        active.difference_update({ensure_TP(CHANGELOG_0)})  # Faust's pause_partitions, in place
        await fetch

    asyncio.run(fetch_while_recovery_ends())
    assert thread.fetch_filter is not active
    # Still the changelog alone: an emptied filter would have made aiokafka return `actions` too.
    assert thread.filter_while_waiting == {ensure_TP(CHANGELOG_0)}


def test_the_seek_back_sends_a_windowed_partition_without_a_commit_to_its_start() -> None:
    thread = ConsumerThread({ACTIONS_0: None, ACTIONS_1: 17, CHANGELOG_0: None})
    consumer = window_consumer(thread)
    consumer._read_offset[ACTIONS_0] = 230  # read (and dropped) before the seek

    asyncio.run(consumer.perform_seek())

    # actions-1 was sought to its committed offset by seek_to_committed itself; the changelog is
    # positioned by table recovery, never here.
    assert thread.seeks_to_beginning == [ACTIONS_0]
    assert consumer._read_offset[ACTIONS_0] is None  # re-read from the start, none skipped as read
    assert consumer._read_offset[ACTIONS_1] == 17
    assert consumer._committed_offset == {ensure_TP(ACTIONS_1): 17}


def test_with_every_windowed_partition_committed_the_seek_back_is_faust_s_own() -> None:
    thread = ConsumerThread({ACTIONS_0: 5, ACTIONS_1: 17, CHANGELOG_0: None})
    consumer = window_consumer(thread)

    asyncio.run(consumer.perform_seek())

    assert thread.seeks_to_beginning == []
    assert consumer._committed_offset == {ensure_TP(ACTIONS_0): 5, ensure_TP(ACTIONS_1): 17}


# Faust methods WindowConsumer re-implements or wraps, as read when it was written
# (faust-streaming 0.15.3): sha256 of their source, first 16 hex digits.
_FAUST_SOURCES_READ = {
    "_drain_messages": "44a2500309e83c63",  # re-implemented: the fetch loop
    "_getmany": "f9d47aa9010b5ff2",  # wrapped: the active-partition set is copied
    "perform_seek": "0e8c130ff4b0afd8",  # wrapped: windowed partitions sent to their start
}


def test_the_faust_methods_the_window_consumer_overrides_are_those_it_was_written_against() -> None:
    """streams/delivery.py copies Faust's fetch loop and wraps two private methods; a Faust
    upgrade that changes any of them must be read again before it ships (this names which)."""
    import hashlib
    import inspect

    from faust.transport.drivers import aiokafka as faust_aiokafka

    changed = {
        name: getattr(faust_aiokafka.Consumer, name).__qualname__
        for name, digest in _FAUST_SOURCES_READ.items()
        if hashlib.sha256(inspect.getsource(getattr(faust_aiokafka.Consumer, name)).encode()).hexdigest()[:16] != digest
    }
    assert not changed, (
        f"Faust's {sorted(changed.values())} changed since streams/delivery.py was written against "
        "them: re-read WindowConsumer against the new source, then update _FAUST_SOURCES_READ"
    )
