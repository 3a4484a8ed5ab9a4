"""The follower's realignment after aiokafka reassigns every partition from its start, with the
order of a fetch's partitions fixed (a real broker's test, `test_serving_kafka.py -k
partition_added`, leaves that order to chance): a consumer stand-in with aiokafka's position
rules, driving the follower's own loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import TopicPartition

from recsys.settings import Settings
from serving.follower import CandidatesFollower
from serving.store import CandidateStore

TOPIC = "candidates"


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes
    timestamp: int
    topic: str = TOPIC
    value: bytes = b""


class ReassigningConsumer:
    """One partition of three records; on the third fetch a second partition appears with one
    record and every partition restarts from offset 0, as aiokafka's no-group coordinator does.
    A fetch returns partition 0's records before partition 1's and moves the positions past them."""

    def __init__(self) -> None:
        self.logs = {0: [Record(0, i, f"u{i}".encode(), 1000 + i) for i in range(3)]}
        self.positions = {TopicPartition(TOPIC, 0): 0}
        self.fetches = 0

    async def topics(self) -> set[str]:
        return {TOPIC}

    def subscribe(self, topics: list[str]) -> None:
        pass

    def assignment(self) -> set[TopicPartition]:
        return set(self.positions)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.logs.get(tp.partition, [])) for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = 0

    async def offsets_for_times(self, query: dict[TopicPartition, int]) -> dict[TopicPartition, None]:
        return {tp: None for tp in query}

    def last_poll_timestamp(self, tp: TopicPartition) -> int:
        return 1

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.logs.get(tp.partition, []))

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        self.fetches += 1
        if self.fetches == 3:
            self.logs[1] = [Record(1, 0, b"new", 2000)]
            self.positions = {TopicPartition(TOPIC, 0): 0, TopicPartition(TOPIC, 1): 0}
        out = {}
        for tp in sorted(self.positions, key=lambda tp: tp.partition):
            if records := self.logs.get(tp.partition, [])[self.positions[tp]:]:
                out[tp] = records
                self.positions[tp] += len(records)
        await asyncio.sleep(0.001)
        return out


def test_a_reassignment_inside_a_fetch_skips_what_was_applied_and_loses_nothing_else() -> None:
    """The old partition's records came again in the same fetch as the new partition's first:
    stopping at the first repeat lost the new one (its position had moved past it)."""
    base = Settings()
    settings = base.model_copy(update={"topics": base.topics.model_copy(update={"candidates": TOPIC}),
                                       "serving": base.serving.model_copy(update={"poll_ms": 1, "metadata_retry_s": 0.001})})

    async def scenario() -> tuple[list[bytes], dict[int, int]]:
        follower = CandidatesFollower(settings, CandidateStore(100))
        applied: list[bytes] = []
        follower._apply = lambda key, value: applied.append(key)  # type: ignore[method-assign,assignment,misc]
        follower._consumer = ReassigningConsumer()  # type: ignore[assignment]
        task = asyncio.create_task(follower._run())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return applied, follower.positions

    applied, positions = asyncio.run(scenario())
    assert applied == [b"u0", b"u1", b"u2", b"new"]
    assert positions == {0: 3, 1: 1}
