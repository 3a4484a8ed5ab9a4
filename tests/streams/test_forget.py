"""IdleSweep: which users a flush window forgets (the real worker: test_streams_worker.py -k idle)."""

from __future__ import annotations

import asyncio

import faust
import msgpack
from faust.types import TP

from recsys.settings import StreamsSettings
from streams.app import put_value
from streams.forget import IdleSweep
from streams.sequences import PackedSeq

NOW = 1_800_000_000_000
IDLE = 1_000


def value(version: int, partition: int = 0) -> bytes:
    return PackedSeq("u", version, [], [], b"", partition=partition).encode()


def test_only_owned_users_idle_by_a_clock_version_are_forgotten_a_slice_per_window() -> None:
    table = {
        b"idle": value(NOW - IDLE - 1),
        b"active": value(NOW - IDLE + 1),
        b"elsewhere": value(NOW - IDLE - 1, partition=1),  # a partition this worker lost (memory://)
        b"unplaced": value(NOW - IDLE - 1, partition=-1),  # written before values named their partition
        b"counter": value(7),  # an earlier release's counter version: its idleness is unknown
    }
    table |= {f"old{k}".encode(): value(NOW - 10 * IDLE) for k in range(5)}
    table[b"garbage"] = b"\xc1 not msgpack"  # skipped, not the window's failure
    # nor values not ours in other ways (an unhashable partition, an infinite version)
    table |= {b"list-p": msgpack.packb({"version": NOW - 10 * IDLE, "p": [0]}),
              b"inf": msgpack.packb({"version": float("inf"), "p": 0})}
    sweep = IdleSweep(StreamsSettings(forget_idle_ms=IDLE, sweep_every_s=3600, sweep_batch=4))
    forgotten = []
    for _ in range(4):  # thirteen keys, four per window
        forgotten += sweep.due(table, lambda: {0}, NOW)
    assert sorted(forgotten) == sorted([(b"idle", 0), *((f"old{k}".encode(), 0) for k in range(5))])
    assert sorted(table) == [b"active", b"counter", b"elsewhere", b"garbage", b"inf", b"list-p", b"unplaced"]
    table[b"late"] = value(NOW - 10 * IDLE)
    assert sweep.due(table, lambda: {0}, NOW) == []  # the next round waits for sweep_every_s


def test_zero_forgets_nobody() -> None:
    table = {b"idle": value(NOW - 10 * IDLE)}
    assert IdleSweep(StreamsSettings(forget_idle_ms=0)).due(table, lambda: {0}, NOW) == [] and b"idle" in table


def test_the_partition_survives_the_table_value() -> None:
    assert PackedSeq.decode(value(NOW, partition=3)).partition == 3
    assert PackedSeq.decode(PackedSeq("u", 1, [], [], b"").encode()).partition == -1


def test_values_written_live_leave_a_memory_store_with_their_partition() -> None:
    """A partition moved to another worker: its users' values must not stay here, or they come
    back stale when it returns (the other worker may have forgotten them meanwhile)."""
    table = faust.App("forget-test", store="memory://").Table("sequences", partitions=2)
    store = table.data
    put_value(store, b"kept", value(NOW, partition=0), 0)
    put_value(store, b"moved", value(NOW, partition=1), 1)
    asyncio.run(store.on_recovery_completed({TP("forget-test-sequences-changelog", 0)}, set()))
    assert list(store.keys()) == [b"kept"]
