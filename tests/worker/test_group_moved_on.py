"""A batch computed after the consumer group moved on is not sent.

A worker that waits out a long store outage inside one batch passes `max_poll_interval_s`;
the group drops it and hands its partitions to another worker, which recomputes the
uncommitted batch. Were the stalled worker to send its lists afterwards, an older list could
land last in the compacted `candidates` and outlive the newer one there. Real broker, real
group, real Edge store; the outage is a store call held back until the test releases it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from kafka import KafkaConsumer

from inference.guards import RetryingStore
from inference.runtime import ModelRuntime
from inference.worker import Worker
from recsys.settings import Settings
from vector_store import open_store
from vector_store.indexer import ItemTable, index_item_table
from worker_helpers import committed_and_end, create_topics, read_candidates, send_updates, start_loop

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

USERS = [f"u{i}" for i in range(6)]


class HeldStore:
    """The real store, whose first ANN query waits until released (an outage waited out)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.held = threading.Event()
        self.release = threading.Event()

    def query_arrays(self, *args: Any, **kwargs: Any) -> Any:
        if not self.release.is_set():
            self.held.set()
            self.release.wait(60)
        return self._store.query_arrays(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
def held_worker(kafka_bootstrap: str, small_model_dir: Path, tmp_path: Path, unique: str) -> Iterator[tuple[Worker, HeldStore]]:
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={"user_updates": f"uu-{unique}", "candidates": f"cand-{unique}", "popular": f"pop-{unique}"},
        inference={"group_id": f"w-{unique}", "max_wait_ms": 5, "max_poll_interval_s": 2.0,
                   "popular_every_s": 3600},
        vector_store={"path": tmp_path / "shard"},
    )
    create_topics(kafka_bootstrap, settings.topics.user_updates)
    runtime = ModelRuntime.load(small_model_dir, "cpu")
    store = open_store(settings, dim=runtime.dim)
    index_item_table(store, ItemTable.load(small_model_dir), settings.events.surfaces)
    store.mark_catalogue(runtime.version)
    held = HeldStore(store)
    worker = Worker(settings, runtime, RetryingStore(held, initial_s=0.05, max_s=0.2))
    try:
        yield worker, held
    finally:
        held.release.set()
        worker.stopping.set()
        worker.close()
        store.close()


def test_a_batch_computed_after_the_group_gave_its_partitions_away_is_not_sent_and_is_redone(
    held_worker: tuple[Worker, HeldStore], kafka_bootstrap: str
) -> None:
    worker, held = held_worker
    settings = worker.settings
    items = [str(i) for i in worker.runtime.item_ids[:5]]
    now = int(time.time() * 1000)
    events = [{"item_id": item, "action": "click", "surface": "home", "ts": now - 10 + k} for k, item in enumerate(items)]
    send_updates(kafka_bootstrap, settings.topics.user_updates,
                 {user: msgpack.packb({"user_id": user, "version": 1, "events": events}) for user in USERS})
    thread, errors = start_loop(worker)
    assert held.held.wait(60), "the worker never queried the store"

    # Past max_poll_interval_s the stalled worker is dropped; another member takes every partition.
    rival = KafkaConsumer(settings.topics.user_updates, bootstrap_servers=kafka_bootstrap,
                          group_id=settings.inference.group_id, enable_auto_commit=False,
                          auto_offset_reset="earliest")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not rival.assignment():
            rival.poll(timeout_ms=200)
        assert rival.assignment(), "the rival never got the partitions"
        held.release.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and worker.batches_dropped == 0:
            time.sleep(0.1)
        assert worker.batches_dropped == 1
        # nothing sent: the topic's end offsets, not a read that may time out before its first fetch
        assert sum(committed_and_end(kafka_bootstrap, "nobody", settings.topics.candidates)[1].values()) == 0
    finally:
        rival.close(autocommit=False)  # it leaves without committing: the partitions come back

    # Redone: the worker rejoins, re-reads the uncommitted updates and serves every user.
    deadline = time.monotonic() + 60
    served: dict[str, Any] = {}
    while time.monotonic() < deadline and set(served) != set(USERS):
        served = read_candidates(kafka_bootstrap, settings.topics.candidates)
    worker.stopping.set()
    thread.join(30)
    assert not errors, errors
    assert set(served) == set(USERS)
