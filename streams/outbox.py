"""A window's output records, produced as one record batch per partition and awaited together.

`producer.send` costs ~6 us per record in aiokafka alone (metadata wait, partitioner,
accumulator, a future per record) - a sixth of the worker's CPU per event at one update and
one changelog record per event. Here records are appended to `BatchBuilder`s per (topic,
partition) (C code) and each batch is handed over with `send_batch`, one future per batch.
Records without a partition get the producer's default one (murmur2 of the key, as
`producer.send` and the Java client pick it, or a random one without a key), so the
user-updates partitioning is unchanged.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2

__all__ = ["Outbox"]


class Outbox:
    """Records to send; `flush` sends them and returns once the broker has every one (acks)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._batches: dict[tuple[str, int], list[Any]] = {}  # (topic, partition) -> BatchBuilders
        self._partitions: dict[str, Sequence[int]] = {}  # topic -> its partitions, sorted

    async def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        """Queue one record (a None value: a tombstone); without `partition`, the producer's
        default partition for `key`."""
        if partition is None:
            parts = self._partitions.get(topic)
            if parts is None:
                # Also waits for the topic's metadata, as producer.send would.
                parts = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
            # As producer.send: murmur2 of the key, or any partition for a record without one
            # (a keyless event on its way to the DLQ).
            partition = random.choice(parts) if key is None else parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
        builders = self._batches.setdefault((topic, partition), [])
        if not builders or builders[-1].append(key=key, value=value, timestamp=None) is None:
            builder = self.producer.create_batch()
            builder.append(key=key, value=value, timestamp=None)  # a batch always takes its first record
            builders.append(builder)

    async def add_beside(self, topic: str, key: bytes | None, value: bytes, source_partition: int) -> None:
        """Queue one record on the partition of `topic` numbered like `source_partition` (modulo
        its count): per-key order without hashing a key that may be hostile (DLQ records; a
        Kafka key can be as large as a message, and murmur2 here is pure Python)."""
        parts = self._partitions.get(topic)
        if parts is None:
            parts = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        await self.add(topic, key, value, parts[source_partition % len(parts)])

    async def flush(self) -> dict[TopicPartition, int]:
        """Send every queued record; once all are acknowledged, the last offset per partition.

        Raises the first delivery error (the window is then not acked and will be re-read)."""
        batches, self._batches = self._batches, {}
        futures: list[tuple[TopicPartition, int, asyncio.Future[Any]]] = []
        for (topic, partition), builders in batches.items():
            for builder in builders:
                builder.close()
                count = builder.record_count()
                futures.append(
                    (TopicPartition(topic, partition), count,
                     await self.producer.send_batch(builder, topic, partition=partition))
                )  # fmt: skip
        last: dict[TopicPartition, int] = {}
        for tp, count, future in futures:
            meta = await future
            last[tp] = max(last.get(tp, -1), meta.offset + count - 1)  # meta.offset: the batch's first
        return last
