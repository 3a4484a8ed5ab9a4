"""Model edge cases and hostile `user-updates` through the real worker loop (issue 6).

Real Kafka, the real ONNX Runtime session of a small exported model, a real Qdrant Edge shard.
Every case has a defined answer and none may end the loop:

    empty history / no usable event / not an update  -> skipped, counted, no candidates record
    only unknown items, an item id never seen         -> candidates from action/surface/time
    more events than the model reads                  -> the newest max_len are read
    an action the model does not know                 -> that event dropped; candidates served
    unknown surface names                             -> read as padding; candidates served
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from kafka import KafkaProducer

from inference.guards import RetryingStore, clean_update
from inference.runtime import ModelRuntime
from inference.worker import Worker, excluded_items, recent_items
from recsys.settings import EventSettings, Settings
from vector_store import open_store
from vector_store.indexer import ItemTable, index_item_table
from worker_helpers import committed_and_end, create_topics, read_candidates, send_updates, start_loop

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

LIMIT = 10
NOW = int(time.time() * 1000)


def ev(item: Any, ts: int = NOW, action: Any = "click", surface: Any = "home") -> dict[str, Any]:
    return {"item_id": item, "action": action, "surface": surface, "ts": ts}


def update(user: Any, events: Any, version: int = 1, **extra: Any) -> bytes:
    return msgpack.packb({"user_id": user, "version": version, "events": events, **extra})


# user key -> raw record; the *served* ones must get a candidates record, the others none.
SERVED: dict[str, bytes] = {
    "good": update("good", [ev(1, NOW - 2), ev(9, NOW - 1), ev(17)]),
    "unknown-only": update("unknown-only", [ev("never-seen-a"), ev("never-seen-b", NOW + 1)]),
    "int-id-never-seen": update("int-id-never-seen", [ev(2**64 - 1), ev(-7), ev(3)]),
    "too-long": update("too-long", [ev(i % 64, NOW - 5000 + i) for i in range(5000)]),
    "odd-names": update("odd-names", [ev(5, action="purchase", surface="checkout"), ev(6)]),
    "some-bad-events": update("some-bad-events", [ev(None), ev(1, ts="yesterday"), ev([1]), ev(2, ts=-1),
                                                  ev(3, ts=2**64 - 1), ev(4, ts=float("nan")), "junk", ev(8)]),
    "7": update(7, [ev(2)]),  # integer user id
}
SKIPPED: dict[str, bytes] = {
    "empty-history": update("empty-history", []),
    "all-events-bad": update("all-events-bad", [ev(None), ev(1, ts="x"), {"ts": NOW}]),
    "no-events-key": msgpack.packb({"user_id": "no-events-key", "version": 1}),
    "events-not-list": update("events-not-list", {"0": ev(1)}),
    "no-user": update(None, [ev(1)]),
    "bool-user": update(True, [ev(1)]),
    "not-msgpack": b"\xc1\xff\x00garbage",
    "not-a-map": msgpack.packb([1, 2, 3]),
    "empty-value": b"",
}


@pytest.fixture
def worker(kafka_bootstrap: str, small_model_dir: Path, tmp_path: Path, unique: str) -> Iterator[Worker]:
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={"user_updates": f"uu-{unique}", "candidates": f"cand-{unique}"},
        inference={"group_id": f"w-{unique}", "candidates_per_surface": LIMIT, "max_wait_ms": 5},
        vector_store={"path": tmp_path / "qdrant"},
    )
    create_topics(kafka_bootstrap, settings.topics.user_updates)
    runtime = ModelRuntime.load(small_model_dir, "cpu")
    store = open_store(settings, dim=runtime.dim)
    index_item_table(store, ItemTable.load(small_model_dir), settings.events.surfaces)
    w = Worker(settings, runtime, RetryingStore(store, initial_s=0.05, max_s=0.2))
    try:
        yield w
    finally:
        w.stopping.set()
        w.close()
        store.close()


def test_hostile_updates_through_the_loop_get_their_defined_answer(worker: Worker, kafka_bootstrap: str) -> None:
    settings = worker.settings
    send_updates(kafka_bootstrap, settings.topics.user_updates, {**SKIPPED, **SERVED})
    thread, errors = start_loop(worker)
    deadline = time.monotonic() + 60
    served: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and set(served) != set(SERVED):
        served = read_candidates(kafka_bootstrap, settings.topics.candidates)
    # All offsets committed: nothing is stuck behind a record the worker could not use.
    deadline = time.monotonic() + 20
    committed, ends = committed_and_end(kafka_bootstrap, settings.inference.group_id, settings.topics.user_updates)
    while time.monotonic() < deadline and committed != ends:
        time.sleep(0.2)
        committed, ends = committed_and_end(kafka_bootstrap, settings.inference.group_id, settings.topics.user_updates)
    worker.stopping.set()
    thread.join(30)

    assert not errors, errors
    assert set(served) == set(SERVED), sorted(set(SERVED) - set(served))
    assert committed == ends
    assert worker.updates_skipped == len(SKIPPED)
    assert worker.users_failed == 0
    for user, record in served.items():
        assert set(record["surfaces"]) == {"home", "search", "related"}, user
        for lists in record["surfaces"].values():
            assert len(lists["items"]) == LIMIT and len(set(lists["items"])) == LIMIT, user
            assert all(np.isfinite(lists["scores"])), user
    # The kept events' newest ts is the source time: the bad events of "some-bad-events" are gone.
    assert served["some-bad-events"]["source_event_ts"] == NOW
    assert served["good"]["source_event_ts"] == NOW
    # Recent items are excluded, unknown ones included (they simply match nothing).
    assert not {"1", "9", "17"} & set(served["good"]["surfaces"]["home"]["items"])


def test_clean_update_defined_answers() -> None:
    assert clean_update(SKIPPED["empty-history"], 50) is None
    assert clean_update(None, 50) is None
    assert clean_update(b"\x00" * (5 << 20), 50) is None  # oversized record: not even unpacked
    long = clean_update(SERVED["too-long"], 50)
    assert long is not None and len(long["events"]) == 50
    assert [e["ts"] for e in long["events"]] == [NOW - 5000 + i for i in range(4950, 5000)]  # the newest
    some = clean_update(SERVED["some-bad-events"], 50)
    assert some is not None and [e["item_id"] for e in some["events"]] == [8]
    assert some["version"] == 1 and some["last_event_ts"] == NOW
    weird = clean_update(msgpack.packb({"user_id": "u", "version": "x", "events": [ev(1)]}), 50)
    assert weird is not None and weird["version"] == 0
    # An action the model was not trained on (added to events.actions since) would be a padding
    # token, and as the newest event the one the user's state is read from: dropped.
    model_actions = frozenset({"click", "save", "hide"})
    shared = clean_update(update("u", [ev(1, NOW - 1), ev(2, action="share")]), 50, actions=model_actions)
    assert shared is not None and [e["item_id"] for e in shared["events"]] == [1]
    assert clean_update(update("u", [ev(2, action="share")]), 50, actions=model_actions) is None
    # ... but the user engaged with that item all the same: it stays out of their candidates.
    assert shared["unread_items"] == ["2"]
    assert excluded_items([shared], recent_items([shared])) == [["1", "2"]]
    # A user id longer than the streams accept would make a candidates record the producer may
    # refuse (and stop the loop on, after every restart): not a user id.
    longest = "u" * EventSettings().max_id_length
    assert clean_update(update(longest, [ev(1)]), 50) is not None
    assert clean_update(update(longest + "u", [ev(1)]), 50) is None
    assert clean_update(update(longest + "u", [ev(1)]), 50, max_id_bytes=len(longest) + 1) is not None  # as configured
    # A last_event_ts that is no epoch ms (the server's int64 field could not take it).
    assert clean_update(update("u", [ev(1, NOW)], last_event_ts=2**64 - 1), 50)["last_event_ts"] == NOW


def test_history_longer_than_the_model_reads_and_unknown_items(worker: Worker) -> None:
    """compute() on the edge histories directly: a defined, full answer for each."""
    runtime = worker.runtime
    long_history = [ev(i % 20, NOW - 1000 + i) for i in range(3 * runtime.max_len)]
    updates = [
        {"user_id": "long", "version": 1, "events": long_history},
        {"user_id": "unknown", "version": 1, "events": [ev("nope-1"), ev("nope-2")]},
        {"user_id": "one", "version": 1, "events": [ev(3)]},
    ]
    inputs = worker.encode(updates)
    assert inputs["item_emb"].shape[1] == runtime.max_len
    # The newest max_len events are read, in order (the oldest would be a stale user).
    np.testing.assert_allclose(inputs["event_ts"][0], [e["ts"] / 1000 for e in long_history[-runtime.max_len:]])
    assert not inputs["item_emb"][1].any()  # unknown items: zero vectors, not an error
    kept, results = worker.compute_isolated(updates)
    assert [u["user_id"] for u in kept] == ["long", "unknown", "one"]
    for per_surface in results:
        assert all(len(lists["items"]) == LIMIT for lists in per_surface.values())


def test_a_failed_commit_is_retried_when_the_topic_goes_quiet(worker: Worker, kafka_bootstrap: str) -> None:
    """The broker refuses the last batch's commit (as while it restarts) and no record follows:
    the offsets must still land, not wait for traffic that may never come."""
    from kafka.errors import KafkaConnectionError

    real_commit, refused = worker.consumer.commit, []

    def commit_refused_once(*args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(args)
            raise KafkaConnectionError("injected: broker unreachable for this commit")
        return real_commit(*args, **kwargs)

    worker.consumer.commit = commit_refused_once
    committed, ends = _serve_two_until_committed(worker, kafka_bootstrap, refused, 60)
    assert refused, "the injected commit failure never happened"
    assert sum(ends.values()) == 2 and committed == ends


def test_a_consumer_stuck_in_a_rebalance_is_replaced(worker: Worker, kafka_bootstrap: str) -> None:
    """Every commit refused as "rebalance in progress", for good (a kafka-python 3 consumer was
    seen stuck so after its second join): after `kafka.rejoin_after_s` the worker replaces the
    consumer, which re-reads from the committed offsets and commits."""
    from kafka.errors import RebalanceInProgressError

    worker._pending.rejoin_after_s = 1.0  # kafka.rejoin_after_s
    stuck = worker.consumer
    refused: list[Any] = []

    def always_refused(*args: Any, **kwargs: Any) -> Any:
        refused.append(args)
        raise RebalanceInProgressError("injected: the group never finishes rebalancing")

    stuck.commit = always_refused
    committed, ends = _serve_two_until_committed(worker, kafka_bootstrap, refused, 90)
    assert refused and worker.consumer is not stuck
    assert sum(ends.values()) == 2 and committed == ends


def _serve_two_until_committed(worker: Worker, kafka_bootstrap: str, refused: list[Any],
                               timeout_s: float) -> tuple[dict[int, int], dict[int, int]]:
    """Two served users' updates through the running loop, until their offsets are committed
    (and the injected refusal happened) or the timeout: (committed, end) offsets."""
    settings = worker.settings
    send_updates(kafka_bootstrap, settings.topics.user_updates, {key: SERVED[key] for key in ("good", "7")})
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    committed, ends = committed_and_end(kafka_bootstrap, settings.inference.group_id, settings.topics.user_updates)
    while time.monotonic() < deadline and (committed != ends or not refused):
        time.sleep(0.2)
        committed, ends = committed_and_end(kafka_bootstrap, settings.inference.group_id, settings.topics.user_updates)
    worker.stopping.set()
    thread.join(30)
    return committed, ends


def test_a_record_the_producer_refuses_skips_that_user_instead_of_stopping_the_loop(worker: Worker, kafka_bootstrap: str) -> None:
    """A candidates record over the producer's max_request_size is refused inside send(): raised
    out of the loop it would stop the worker on that record after every restart."""
    worker.producer.close()
    worker.producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=128)  # every record is larger (~400 B)
    updates = [{"user_id": f"u{i}", "version": 1, "last_event_ts": NOW, "hidden": [], "events": [ev(i)]} for i in range(3)]
    assert worker.publish(updates, worker.compute(updates)) == []
    assert worker.users_failed == 3 and worker.users_done == 0


def test_candidates_the_broker_refuses_leave_the_batch_uncommitted(worker: Worker, kafka_bootstrap: str) -> None:
    """Offsets are committed only after the broker has the batch's candidates: here it refuses
    them (a topic whose records may not pass 64 bytes; the producer learns so from the reply,
    after send), the loop stops, nothing is committed; the restarted loop, writing where it
    should, serves the users and commits."""
    from kafka.admin import KafkaAdminClient, NewTopic

    good_settings = worker.settings
    small = f"{good_settings.topics.candidates}-small"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(small, 1, 1, topic_configs={"max.message.bytes": "64"})])
    finally:
        admin.close()
    worker.settings = good_settings.model_copy(update={"topics": good_settings.topics.model_copy(update={"candidates": small})})
    send_updates(kafka_bootstrap, good_settings.topics.user_updates, {key: SERVED[key] for key in ("good", "7")})
    thread, errors = start_loop(worker)
    thread.join(90)
    assert not thread.is_alive() and errors, "the refused candidates did not stop the loop"
    from kafka.errors import MessageSizeTooLargeError  # the broker's refusal, not some other failure of the loop

    assert isinstance(errors[0], MessageSizeTooLargeError), repr(errors[0])
    committed, ends = committed_and_end(kafka_bootstrap, good_settings.inference.group_id, good_settings.topics.user_updates)
    assert sum(ends.values()) == 2 and sum(committed.values()) == 0

    worker.settings = good_settings
    worker.producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    worker.consumer.close(autocommit=False)
    worker.consumer = worker._new_consumer()  # as a restarted process: from the committed offsets
    committed, ends = _serve_two_until_committed(worker, kafka_bootstrap, [None], 60)
    assert committed == ends
    assert set(read_candidates(kafka_bootstrap, good_settings.topics.candidates)) == {"good", "7"}


def test_candidates_not_delivered_for_a_passing_reason_are_computed_again_not_the_loop_s_end(
    worker: Worker, kafka_bootstrap: str
) -> None:
    """A broker unreachable past the producer's timeouts fails a send (no metadata within
    max_block_ms) or a delivery (delivery_timeout_ms): the loop stopped on it with a traceback,
    dead where no supervisor restarts it. Now the batch is read again and served, and nothing
    is committed past an undelivered record."""
    from kafka.errors import KafkaTimeoutError
    from kafka.producer.future import FutureProduceResult, FutureRecordMetadata
    from kafka.structs import TopicPartition

    real_send, failed = worker.producer.send, []

    def fails_twice(*args: Any, **kwargs: Any) -> Any:
        if not failed:  # the first record: the delivery fails after send
            failed.append("delivery")
            produce = FutureProduceResult(TopicPartition(worker.settings.topics.candidates, 0))
            produce.failure(KafkaTimeoutError("injected: expired before delivery"))
            return FutureRecordMetadata(produce, 0, -1, None, -1, -1, -1)
        if len(failed) == 1:  # the next: the producer cannot take it at all
            failed.append("send")
            raise KafkaTimeoutError("injected: no metadata within max_block_ms")
        return real_send(*args, **kwargs)

    worker.producer.send = fails_twice
    committed, ends = _serve_two_until_committed(worker, kafka_bootstrap, failed, 90)
    assert failed == ["delivery", "send"]
    assert sum(ends.values()) == 2 and committed == ends
    assert set(read_candidates(kafka_bootstrap, worker.settings.topics.candidates)) == {"good", "7"}


def test_a_batch_whose_delivery_failed_is_not_committed_by_the_next_batchs_offsets(worker: Worker, kafka_bootstrap: str) -> None:
    """Batch N's record is not delivered (a passing failure) while batch N+1, of the same
    partition, is in flight: committing N+1's offsets would skip N's update for good, its user
    never served. Both are read again."""
    from kafka.errors import KafkaTimeoutError
    from kafka.partitioner.default import murmur2
    from kafka.producer.future import FutureProduceResult, FutureRecordMetadata
    from kafka.structs import TopicPartition

    settings = worker.settings
    by_partition: dict[int, list[str]] = {}
    for key in SERVED:
        by_partition.setdefault((murmur2(key.encode()) & 0x7FFFFFFF) % 2, []).append(key)
    first, second = next(keys for keys in by_partition.values() if len(keys) >= 2)[:2]
    real_send, failed = worker.producer.send, []

    def first_delivery_fails(topic: str, *args: Any, **kwargs: Any) -> Any:
        if failed or topic != settings.topics.candidates:  # the popular lists go as they are
            return real_send(topic, *args, **kwargs)
        failed.append(first)
        # The next update lands now, so the next poll takes it: batch N+1 is sent before N settles.
        send_updates(kafka_bootstrap, settings.topics.user_updates, {second: SERVED[second]})
        produce = FutureProduceResult(TopicPartition(settings.topics.candidates, 0))
        produce.failure(KafkaTimeoutError("injected: expired before delivery"))
        return FutureRecordMetadata(produce, 0, -1, None, -1, -1, -1)

    worker.producer.send = first_delivery_fails
    send_updates(kafka_bootstrap, settings.topics.user_updates, {first: SERVED[first]})
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 90
    served: set[str] = set()
    committed, ends = {}, {0: -1}
    while time.monotonic() < deadline and (served != {first, second} or committed != ends):
        time.sleep(0.3)
        served = set(read_candidates(kafka_bootstrap, settings.topics.candidates))
        committed, ends = committed_and_end(kafka_bootstrap, settings.inference.group_id, settings.topics.user_updates)
    worker.stopping.set()
    thread.join(30)
    assert failed == [first] and served == {first, second}
    assert sum(ends.values()) == 2 and committed == ends  # both committed, once delivered
