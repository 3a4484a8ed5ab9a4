"""The vector store unavailable: retries with back-off, nothing committed meanwhile, recovery.

Real failures of real stores, no mocks. Which failures are realistic depends on the backend:

- Qdrant Edge (embedded) serves reads from memory (mmap'd segments, the numpy snapshot): a
  shard directory that disappears under a running process does not stop its queries, but
  every write's flush fails ("failed to open file ... No such file or directory") until the
  directory is back. And a shard is unavailable to a process that starts while another
  still holds its lock (a redeploy overlapping the old worker, a re-index).
  Both are tested here: the `items` follower's writes during a directory outage, and a worker
  started while its shard is locked.
- Qdrant server (docker-compose's backend): no Qdrant server can be installed on these
  machines, so the outage is tested up to what the real qdrant-client raises against a
  loopback endpoint where the server is gone (connection refused), which must count as
  transient, and the back-off schedule that follows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from kafka import KafkaProducer

from inference.guards import RetryingStore, StoreUnavailable, call_with_retry, is_transient
from recsys.kafka_broker import free_port
from recsys.local_stack import wait_for
from recsys.processes import Service, settings_env
from recsys.settings import Settings, VectorStoreSettings
from streams.synthetic import N_CLUSTERS, cluster_features
from vector_store import open_store
from vector_store.indexer import ItemsFollower, ItemTable, OnnxItemEncoder, index_item_table, model_id_bucket, model_version
from worker_helpers import committed_and_end, read_candidates

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


@pytest.mark.filterwarnings("ignore:Failed to obtain server version")
@pytest.mark.parametrize("prefer_grpc", [True, False])
def test_a_gone_qdrant_server_is_a_transient_failure_and_the_back_off_doubles(prefer_grpc: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The real qdrant-client, over gRPC (as docker-compose configures it) and REST, against
    ports nobody serves."""
    from vector_store.server import ServerStore

    port = free_port()
    settings = VectorStoreSettings(backend="server", url=f"http://127.0.0.1:{port}", timeout_s=2,
                                   prefer_grpc=prefer_grpc)
    with pytest.raises(Exception) as caught:
        ServerStore(settings)
    assert is_transient(caught.value), repr(caught.value)
    assert not is_transient(ValueError("query vectors: contains NaN or inf"))
    # A bug is not an outage: raised at once, never waited out.
    for bug in (NameError("name 'x' is not defined"), ImportError("no module"), ZeroDivisionError(), KeyError("k")):
        assert not is_transient(bug), repr(bug)
    # Nor is a point another writer left without our payload: every query that meets it fails
    # the same way, so the worker stops with the reason instead of retrying for ever.
    from types import SimpleNamespace

    from vector_store.schema import point_payload

    with pytest.raises(Exception, match="has no 'item_id'") as corrupt:
        point_payload(SimpleNamespace(id=7, payload={"title": "not ours"}))
    assert not is_transient(corrupt.value)

    attempts = 0
    stopping = threading.Event()

    def attempt() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 6:
            stopping.set()
        ServerStore(settings)

    with caplog.at_level(logging.DEBUG, logger="inference.guards"), pytest.raises(StoreUnavailable):
        call_with_retry(attempt, what="open", initial_s=0.02, max_s=0.08, stopping=stopping)
    delays = [float(r.getMessage().rsplit("retrying in ", 1)[1].split()[0]) for r in caplog.records]
    assert delays == [0.02, 0.04, 0.08, 0.08, 0.08, 0.08]  # doubling, capped; stopped at the 6th wait
    # qdrant-client checks the server version in a thread of its own; let it end inside this test.
    for thread in threading.enumerate():
        if "_check_compatibility" in thread.name:
            thread.join(30)


def _produce_item(bootstrap: str, topic: str, item_id: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    producer.send(topic, key=item_id.encode(), value=msgpack.packb(
        {"item_id": item_id, "features": cluster_features(0, N_CLUSTERS), "surfaces": ["home"],
         "created_at": int(time.time() * 1000), "popularity": 1.0}))
    producer.flush()
    producer.close()


def test_the_items_follower_waits_out_a_vanished_edge_directory_and_commits_only_after(
    kafka_bootstrap: str, small_model_dir: Path, tmp_path: Path, unique: str
) -> None:
    settings = Settings(
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={"items": f"items-{unique}"},
        vector_store={"path": tmp_path / "shard", "indexer_group_id": f"idx-{unique}", "indexer_poll_ms": 100},
    )
    store = open_store(settings, dim=ItemTable.load(small_model_dir).embeddings.shape[1])
    index_item_table(store, ItemTable.load(small_model_dir), settings.events.surfaces)
    retrying = RetryingStore(store, initial_s=0.05, max_s=0.4)
    follower = ItemsFollower(retrying, OnnxItemEncoder(small_model_dir, model_id_bucket(small_model_dir)), settings)
    stop = threading.Event()
    retrying.stopping = stop
    errors: list[BaseException] = []

    def run() -> None:
        try:
            follower.run(stop)
        except StoreUnavailable:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        _produce_item(kafka_bootstrap, settings.topics.items, "before-outage")
        assert wait_for(lambda: "before-outage" in store.retrieve(["before-outage"]), 30)
        # An item is retrievable once upserted, before its flush and commit: the outage must
        # start after that commit, or it fails the first batch's flush instead of the second's.
        assert wait_for(lambda: sum(committed_and_end(kafka_bootstrap, follower.group_id,
                                                      settings.topics.items)[0].values()) == 1, 30)

        os.rename(tmp_path / "shard", tmp_path / "away")  # the volume is gone
        _produce_item(kafka_bootstrap, settings.topics.items, "during-outage")
        assert wait_for(lambda: retrying.failures >= 3, 30), "the flush never failed"
        committed, ends = committed_and_end(kafka_bootstrap, follower.group_id, settings.topics.items)
        assert sum(committed.values()) == sum(ends.values()) - 1  # the failed batch is not committed
        assert thread.is_alive() and not errors

        os.rename(tmp_path / "away", tmp_path / "shard")  # and back
        assert wait_for(lambda: committed_and_end(kafka_bootstrap, follower.group_id,
                                               settings.topics.items)[0] == ends, 30)
    finally:
        stop.set()
        thread.join(30)
        follower.close()
        store.close()
    assert not errors, errors
    # Durable, not just in memory: a fresh process-equivalent open finds the item.
    with open_store(settings) as reopened:
        assert set(reopened.retrieve(["before-outage", "during-outage"])) == {"before-outage", "during-outage"}


def test_a_worker_started_while_its_shard_is_locked_waits_commits_nothing_then_catches_up(
    kafka_bootstrap: str, small_model_dir: Path, tmp_path: Path, unique: str
) -> None:
    """`recsys worker` as a process; the test holds the Edge shard (as an overlapping old
    worker or a re-index would) while updates arrive, then lets go."""
    overrides = {
        "kafka.bootstrap_servers": kafka_bootstrap,
        "topics.user_updates": f"uu-{unique}", "topics.candidates": f"cand-{unique}", "topics.items": f"items-{unique}",
        "inference.group_id": f"w-{unique}", "inference.model_dir": small_model_dir,
        "inference.candidates_per_surface": 10, "inference.store_retry_initial_s": 0.05,
        "inference.store_retry_max_s": 0.5,
        "vector_store.path": tmp_path / "shard", "vector_store.indexer_group_id": f"idx-{unique}",
    }
    settings = Settings(vector_store={"path": tmp_path / "shard"})
    holder = open_store(settings, dim=ItemTable.load(small_model_dir).embeddings.shape[1])
    index_item_table(holder, ItemTable.load(small_model_dir), settings.events.surfaces)
    holder.mark_catalogue(model_version(small_model_dir))  # as `recsys index` does

    users = [f"locked-{i}" for i in range(20)]
    now = int(time.time() * 1000)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i, user in enumerate(users):
        update = {"user_id": user, "version": 1, "last_event_ts": now + i,
                  "events": [{"item_id": i % 64, "action": "click", "surface": "home", "ts": now + i}]}
        producer.send(overrides["topics.user_updates"], key=user.encode(), value=msgpack.packb(update))
    producer.flush()
    producer.close()

    worker = Service("worker", ["worker"], settings_env(overrides), tmp_path / "logs").start()
    try:
        assert wait_for(lambda: "opening the vector store failed" in worker.log_tail(20000), 60), worker.log_tail()
        time.sleep(1.0)
        assert worker.running
        committed, ends = committed_and_end(kafka_bootstrap, overrides["inference.group_id"], overrides["topics.user_updates"])
        assert sum(committed.values()) == 0 and sum(ends.values()) == len(users)
        holder.close()  # the shard is free again
        assert wait_for(lambda: committed_and_end(kafka_bootstrap, overrides["inference.group_id"],
                                               overrides["topics.user_updates"])[0] == ends, 90), worker.log_tail()
        # Committed means written: every user's list is on the topic (a fresh reader may need a
        # few tries to see them all under load).
        served: dict[str, dict] = {}

        def all_served() -> bool:
            served.update(read_candidates(kafka_bootstrap, overrides["topics.candidates"]))
            return set(served) == set(users)

        assert wait_for(all_served, 60), sorted(served)
        assert all(served[u]["source_event_ts"] == now + i for i, u in enumerate(users))
        assert worker.running
    finally:
        worker.stop()
        holder.close()


def test_failures_that_are_not_the_data_stop_the_batch_instead_of_skipping_its_users(
    small_model_dir: Path, tmp_path: Path
) -> None:
    """A shard built for another model (dimension 8): every query fails the same way. That is
    not the users' data: the batch must raise (and stay uncommitted), not be skipped user by
    user and committed with nothing written; so must a run of lone users that all fail."""
    from inference.guards import StoreCallFailed
    from inference.runtime import ModelRuntime
    from inference.worker import SystemicFailure, Worker

    settings = Settings(vector_store={"path": tmp_path / "shard"}, inference={"max_failed_in_a_row": 5})
    store = open_store(settings, dim=8)
    try:
        index_item_table(store, ItemTable(["a", "b"], np.eye(2, 8, dtype=np.float32), np.ones(2, np.float32)),
                         settings.events.surfaces)
        runtime = ModelRuntime.load(small_model_dir, "cpu")
        worker = Worker.offline(settings, runtime, RetryingStore(store, initial_s=0.01, max_s=0.01))
        now = int(time.time() * 1000)

        def batch(item: str, n: int) -> list[dict]:
            return [{"user_id": f"u{i}", "version": 1, "last_event_ts": now,
                     "events": [{"item_id": item, "action": "click", "surface": "home", "ts": now}]} for i in range(n)]

        known = str(ItemTable.load(small_model_dir).ids[0])  # its vector comes from the model: the search fails
        with pytest.raises(StoreCallFailed, match="DimensionMismatchError"):
            worker.compute_isolated(batch(known, 3))
        # "a" is fetched from this shard with 8 numbers, not the model's: encoding fails, for all.
        with pytest.raises(SystemicFailure, match="all 3 users"):
            worker.compute_isolated(batch("a", 3))
        assert worker.users_failed == 0
        # A lone failing user is still skipped: one record cannot say whose fault it is.
        assert worker.compute_isolated(batch("a", 1)) == ([], []) and worker.users_failed == 1
        # ... but not the fifth user in a row to fail (3 + 1 + 1) with none served between: at
        # low traffic every batch holds one user, and a broken worker would skip them all.
        with pytest.raises(SystemicFailure, match="5 in a row"):
            worker.compute_isolated(batch("a", 1))
        assert worker.users_failed == 1
    finally:
        store.close()


def test_lone_failing_users_far_apart_do_not_add_up_to_a_systemic_failure(small_model_dir: Path, tmp_path: Path) -> None:
    """`max_failed_in_a_row` counts users failing with none served between: a batch served
    without any failure ends the streak, however it was served."""
    from inference.runtime import ModelRuntime
    from inference.worker import Worker

    settings = Settings(vector_store={"path": tmp_path / "shard"}, inference={"max_failed_in_a_row": 3})
    runtime = ModelRuntime.load(small_model_dir, "cpu")
    with open_store(settings, dim=runtime.dim) as store:
        index_item_table(store, ItemTable.load(small_model_dir), settings.events.surfaces)
        worker = Worker.offline(settings, runtime, store)
        real_compute = worker.compute

        def compute(updates: list[dict]) -> list:  # one user's data the model cannot take
            if any(u["user_id"] == "bad" for u in updates):
                raise ValueError("bad data")
            return real_compute(updates)

        worker.compute = compute  # type: ignore[method-assign]
        now = int(time.time() * 1000)
        item = str(runtime.item_ids[0])

        def user(name: str) -> dict:
            return {"user_id": name, "version": 1, "last_event_ts": now,
                    "events": [{"item_id": item, "action": "click", "surface": "home", "ts": now}]}

        for _ in range(5):  # each bad user alone, good users served between: never systemic
            assert worker.compute_isolated([user("good")])[0] == [user("good")]
            assert worker.compute_isolated([user("bad")]) == ([], [])
        assert worker.users_failed == 5
