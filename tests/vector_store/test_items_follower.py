"""The `items` follower against the real broker: a produced item becomes retrievable without a
restart, offsets are committed only after the upsert, refused records go to items.dlq."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from recsys.kafka_clients import Stopped, read_topic
from recsys.settings import Settings, VectorStoreSettings
from vector_store import ItemRecord
from vector_store.edge import EdgeStore
from vector_store.indexer import IndexStats, ItemMessage, ItemsFollower, ItemTable, load_table, model_version

pytestmark = pytest.mark.kafka

DIM = 8
DEADLINE_S = 60.0  # a failure bound, not a timing assertion


def _embed(items: Sequence[ItemMessage]) -> np.ndarray:
    """Stand-in encoder: the item's features are its embedding."""
    return np.asarray([item.features for item in items], dtype=np.float32)


def _settings(kafka_bootstrap: str, unique: str, path: Path) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={"items": f"items-{unique}", "items_dlq": f"items-{unique}.dlq"},
        vector_store=VectorStoreSettings(
            path=path, indexer_group_id=f"indexer-{unique}", indexer_poll_ms=200
        ),
    )


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def _produce(bootstrap: str, topic: str, values: list[bytes | None], keys: list[str]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for key, value in zip(keys, values, strict=True):
        producer.send(topic, key=key.encode(), value=value)
    producer.flush()
    producer.close()


def _item(item_id: str, vec: list[float], **extra: object) -> bytes:
    value = {"item_id": item_id, "features": vec, "created_at": 1_700_000_000_000, **extra}
    return msgpack.packb(value)


def _poll_until(follower: ItemsFollower, done: Callable[[IndexStats], bool]) -> IndexStats:
    total = IndexStats()
    deadline = time.monotonic() + DEADLINE_S
    while not done(total):
        assert time.monotonic() < deadline, f"gave up waiting; indexed so far: {total}"
        total += follower.poll_once()
    return total


def test_new_item_becomes_retrievable(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    topic = settings.topics.items
    _create_topic(kafka_bootstrap, topic, partitions=2)
    eye = np.eye(DIM, dtype=np.float32)

    with EdgeStore(settings.vector_store) as store:
        # A catalogue is already being served (as after `recsys index`).
        store.ensure_collection(DIM)
        store.upsert([ItemRecord(f"old{i}", ("home", "search")) for i in range(3)], eye[:3])
        follower = ItemsFollower(store, _embed, settings)
        try:
            huge = "x" * 900_000  # quoted in the detail, it would push the DLQ record past the broker's limit
            _produce(kafka_bootstrap, topic,
                     [_item("new", eye[5].tolist(), surfaces=["search"]), b"not msgpack",
                      _item("typo", eye[6].tolist(), surfaces=["Search"]), _item("other", eye[7].tolist()),
                      _item("big", eye[7].tolist(), created_at=huge)],
                     ["new", "junk", "typo", "not-other", "big"])
            stats = _poll_until(follower, lambda s: s.embedded >= 1 and s.skipped >= 4)
            assert (stats.embedded, stats.skipped, stats.dead_lettered) == (1, 4, 4)
            # The refused records are on items.dlq with their reasons, before their offsets were committed.
            dead = {key: msgpack.unpackb(value) for key, value in read_topic(kafka_bootstrap, settings.topics.items_dlq)}
            assert {key: d["reason"] for key, d in dead.items()} == {
                "junk": "not msgpack", "typo": "unknown surface", "not-other": "wrong key", "big": "wrong type"}
            assert dead["junk"]["original"] == b"not msgpack" and dead["junk"]["topic"] == topic
            assert len(dead["big"]["detail"]) < 2000 and dead["big"]["original_size"] > 900_000
            assert store.retrieve(["typo"]) == {}
            # Retrievable by the very next query, with its surface eligibility.
            both = np.stack([eye[5], eye[5]])
            (on_search, on_home) = store.query_batch(both, 1, ["search", "home"])
            assert on_search == [("new", pytest.approx(1.0))]
            assert on_home and on_home[0][0] != "new"
        finally:
            follower.close()

        # The same group resumes after the committed offsets: nothing is indexed twice.
        again = ItemsFollower(store, _embed, settings)
        try:
            _produce(kafka_bootstrap, topic, [_item("newer", eye[6].tolist())], ["newer"])
            stats = _poll_until(again, lambda s: s.embedded >= 1)
            assert (stats.embedded, stats.payload_only, stats.skipped) == (1, 0, 0)
            assert store.query_batch(eye[6:7], 1)[0][0][0] == "newer"
        finally:
            again.close()


def test_a_refusal_that_cannot_be_dead_lettered_is_not_committed(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """items.dlq cannot be written (the broker times the send out): the follower stops with the
    batch uncommitted, so a restart re-reads the refused record instead of losing it."""
    from kafka.errors import KafkaTimeoutError

    from vector_store.indexer import DeadLetterFailed

    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    settings = settings.model_copy(update={
        "vector_store": settings.vector_store.model_copy(update={"dead_letter_timeout_s": 3.0})})
    _produce(kafka_bootstrap, settings.topics.items, [b"not msgpack"], ["junk"])
    with EdgeStore(settings.vector_store) as store:
        store.ensure_collection(DIM)
        follower = ItemsFollower(store, _embed, settings)
        # Its producer cannot be made (the broker went away after the poll), as in the outage
        # run() waits out: the refused record must not be committed meanwhile either.
        follower.bootstrap_servers = "localhost:1"
        try:
            with pytest.raises(DeadLetterFailed):
                _poll_until(follower, lambda s: False)
        finally:
            follower.close()
        assert _committed(kafka_bootstrap, settings, follower.group_id) == 0
        # Restarted (the process stops on DeadLetterFailed), and the send itself fails this time.
        follower = ItemsFollower(store, _embed, settings)
        follower._producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)

        def timed_out(*args: Any, **kwargs: Any) -> None:
            raise KafkaTimeoutError("injected: items.dlq metadata not available")

        follower._producer.send = timed_out
        try:
            with pytest.raises(DeadLetterFailed, match="injected"):
                _poll_until(follower, lambda s: False)
        finally:
            follower.close()
        assert _committed(kafka_bootstrap, settings, follower.group_id) == 0
    # Restarted, with the dead-letter topic writable again, it gets the record and dead-letters it.
    with EdgeStore(settings.vector_store) as store:
        again = ItemsFollower(store, _embed, settings)
        try:
            assert _poll_until(again, lambda s: s.dead_lettered >= 1).dead_lettered == 1
        finally:
            again.close()
    assert [key for key, _ in read_topic(kafka_bootstrap, settings.topics.items_dlq)] == ["junk"]


def test_every_edge_shard_follows_the_whole_topic(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """Two workers' Edge shards, one settings object: each indexes every partition's items (in
    one shared group each would get half), and a shard deleted and rebuilt reads the topic from
    the start instead of resuming from its predecessor's offsets."""
    settings = _settings(kafka_bootstrap, unique, tmp_path / "unused")
    topic = settings.topics.items
    _create_topic(kafka_bootstrap, topic, partitions=4)
    eye = np.eye(DIM, dtype=np.float32)
    ids = [f"i{k}" for k in range(DIM)]
    _produce(kafka_bootstrap, topic, [_item(i, eye[k].tolist()) for k, i in enumerate(ids)], ids)

    def follow_all(path: Path) -> str:
        shard = settings.model_copy(update={"vector_store": settings.vector_store.model_copy(update={"path": path})})
        with EdgeStore(shard.vector_store) as store:
            store.ensure_collection(DIM)
            follower = ItemsFollower(store, _embed, shard)
            try:
                _poll_until(follower, lambda s: s.embedded >= DIM)
                assert sorted(store.retrieve(ids)) == ids
            finally:
                follower.close()
            return str(follower.group_id)

    first, second = follow_all(tmp_path / "a"), follow_all(tmp_path / "b")
    assert first != second
    assert _committed(kafka_bootstrap, settings, first) == DIM

    def group_of(path: Path) -> str:
        with EdgeStore(settings.vector_store.model_copy(update={"path": path})) as store:
            return store.items_group("g")

    # The same shard keeps its group; a copy of it (cp -r, a restored backup) gets one of its own
    # and follows the whole topic, instead of splitting the partitions with its original.
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    assert group_of(tmp_path / "a") == group_of(tmp_path / "a")
    assert group_of(tmp_path / "a-copy") != group_of(tmp_path / "a")
    assert follow_all(tmp_path / "a-copy") not in (first, second)
    assert group_of(tmp_path / "a").removeprefix("g.") in first  # the original still follows in its first group
    shutil.rmtree(tmp_path / "a")
    assert follow_all(tmp_path / "a") not in (first, second)


def test_a_new_model_reads_the_catalogue_topic_again(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """Items published after the last export have vectors from that model's space; the next
    model's follower reads `items` from the start and embeds them again, the first does not."""
    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    eye = np.eye(DIM, dtype=np.float32)
    ids = [f"i{k}" for k in range(3)]
    _produce(kafka_bootstrap, settings.topics.items, [_item(i, eye[k].tolist()) for k, i in enumerate(ids)], ids)
    with EdgeStore(settings.vector_store) as store:
        store.ensure_collection(DIM)
        for version, new_vectors in (("v1", 3), ("v1", 0), ("v2", 3)):
            follower = ItemsFollower(store, _embed, settings, model_version=version)
            try:
                stats = IndexStats()
                deadline = time.monotonic() + 5.0  # an empty poll or two: the same group has nothing new
                while stats.embedded < new_vectors or (new_vectors == 0 and time.monotonic() < deadline):
                    assert time.monotonic() < deadline + DEADLINE_S, f"{version}: {stats}"
                    stats += follower.poll_once()
                assert stats.embedded == new_vectors, (version, stats)
            finally:
                follower.close()


def test_a_follower_that_starts_behind_indexes_each_item_in_its_newest_state(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """A new shard's or model's group replays the whole topic: an item withdrawn later must not
    be served as eligible on the way (one record per poll here, so every state in between would
    be), and a payload-only newest record still gets the features of the record before it, even
    when the follower restarts between the two."""
    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    settings.vector_store.indexer_max_records = 1
    topic = settings.topics.items
    _create_topic(kafka_bootstrap, topic, partitions=1)
    eye = np.eye(DIM, dtype=np.float32)
    _produce(kafka_bootstrap, topic,
             [_item("late", eye[2].tolist(), surfaces=["home"]), _item("gone", eye[1].tolist(), surfaces=["home"]),
              msgpack.packb({"item_id": "late", "surfaces": ["search"], "created_at": 1, "popularity": 5.0}),
              _item("gone", eye[1].tolist(), surfaces=[]),
              b"not msgpack"],  # refused: it does not hide the withdrawal before it
             ["late", "gone", "late", "gone", "gone"])
    with EdgeStore(settings.vector_store) as store:
        store.ensure_collection(DIM)
        # Every write of a state, vectors and all (upsert) or the payload alone (update_payloads).
        upserted: list[tuple[str, tuple[str, ...]]] = []
        upsert, update_payloads = store.upsert, store.update_payloads

        def recording(records: Sequence[ItemRecord], vectors: np.ndarray) -> None:
            upserted.extend((str(r.item_id), r.surfaces) for r in records)
            upsert(records, vectors)

        def recording_payloads(records: Sequence[ItemRecord], **kwargs: Any) -> None:
            upserted.extend((str(r.item_id), r.surfaces) for r in records)
            update_payloads(records, **kwargs)

        store.upsert = recording  # type: ignore[method-assign]
        store.update_payloads = recording_payloads  # type: ignore[method-assign]
        first = ItemsFollower(store, _embed, settings)
        try:  # "late" with its features, committed; then the process stops
            assert _poll_until(first, lambda s: s.embedded >= 1).embedded == 1
        finally:
            first.close()
        follower = ItemsFollower(store, _embed, settings)
        try:
            stats = _poll_until(follower, lambda s: s.embedded + s.payload_only + s.superseded + s.skipped >= 4)
            assert (stats.embedded, stats.payload_only, stats.superseded, stats.skipped) == (1, 1, 1, 1)
            # Every state the store was given is the item's newest: never "gone" on "home".
            assert upserted == [("late", ("search",)), ("late", ("search",)), ("gone", ())]
            assert store.query_batch(eye[2:3], 1, ["search"])[0][0][0] == "late"
            assert store.query_batch(eye[1:2], 1, ["home"]) == [[]]  # nothing else is on "home"
            # Past the catch-up, records are live: each is indexed in turn.
            _produce(kafka_bootstrap, topic, [_item("gone", eye[1].tolist(), surfaces=["home"])], ["gone"])
            _poll_until(follower, lambda s: s.embedded >= 1)
            assert upserted[-1] == ("gone", ("home",))
            assert not follower._catch_up.latest and not follower._catch_up.popularity  # released once committed past the range
        finally:
            follower.close()


def test_a_stop_during_the_catch_up_scan_gives_up_at_once(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """SIGTERM while a new shard scans the whole topic: the scan ends now, not at the topic's end."""
    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    topic = settings.topics.items
    _create_topic(kafka_bootstrap, topic, partitions=1)
    _produce(kafka_bootstrap, topic, [_item(f"i{k}", [1.0] * DIM) for k in range(3)], [f"i{k}" for k in range(3)])
    stop = threading.Event()
    stop.set()
    with EdgeStore(settings.vector_store) as store:
        store.ensure_collection(DIM)
        with pytest.raises(Stopped):
            ItemsFollower(store, _embed, settings, stop=stop)
        assert store.count() == 0


def test_offsets_are_committed_only_after_the_upsert(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    topic = settings.topics.items
    eye = np.eye(DIM, dtype=np.float32)
    _produce(kafka_bootstrap, topic, [_item(f"x{i}", eye[i].tolist()) for i in range(3)],
             [f"x{i}" for i in range(3)])

    def broken_encoder(items: Sequence[ItemMessage]) -> np.ndarray:
        raise RuntimeError("encoder down")

    with EdgeStore(settings.vector_store) as store:
        store.ensure_collection(DIM)
        failing = ItemsFollower(store, broken_encoder, settings)
        try:
            with pytest.raises(RuntimeError, match="encoder down"):
                _poll_until(failing, lambda s: False)
        finally:
            failing.close()
        assert store.count() == 0
        # Nothing was committed, so a restarted follower in the same group gets them all.
        follower = ItemsFollower(store, _embed, settings)
        try:
            _poll_until(follower, lambda s: s.embedded >= 3)
        finally:
            follower.close()
        assert store.count() == 3


def test_a_failed_commit_is_retried_when_the_topic_goes_quiet(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """The broker refuses the commit after the upsert (as while it restarts) and no record
    follows: the next empty poll commits, so a restart does not index the batch twice."""
    from kafka.errors import KafkaConnectionError

    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    eye = np.eye(DIM, dtype=np.float32)
    _produce(kafka_bootstrap, settings.topics.items, [_item("x0", eye[0].tolist())], ["x0"])
    with EdgeStore(settings.vector_store) as store:
        store.ensure_collection(DIM)
        follower = ItemsFollower(store, _embed, settings)
        real_commit, refused = follower._consumer.commit, []

        def commit_refused_once(*args: Any, **kwargs: Any) -> None:
            if not refused:
                refused.append(True)
                raise KafkaConnectionError("injected: broker unreachable for this commit")
            real_commit(*args, **kwargs)

        follower._consumer.commit = commit_refused_once
        try:
            with pytest.raises(KafkaConnectionError):
                _poll_until(follower, lambda s: False)
            assert store.count() == 1 and refused
            follower.poll_once()  # nothing new on the topic: the pending commit is retried
        finally:
            follower.close()
    assert _committed(kafka_bootstrap, settings, follower.group_id) == 1


@contextlib.contextmanager
def _stuck_follower(kafka_bootstrap: str, unique: str, tmp_path: Path,
                    item_id: str) -> Iterator[tuple[Settings, EdgeStore, ItemsFollower, Any, list[bool]]]:
    """A follower of a topic holding ``item_id`` whose consumer has every commit refused as
    "rebalance in progress", for good (a kafka-python 3 consumer was seen stuck so), with
    `kafka.rejoin_after_s` at 1 s: (settings, store, follower, the stuck consumer, refusals)."""
    from kafka.errors import RebalanceInProgressError

    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"rejoin_after_s": 1.0})})
    eye = np.eye(DIM, dtype=np.float32)
    _produce(kafka_bootstrap, settings.topics.items, [_item(item_id, eye[0].tolist())], [item_id])
    with EdgeStore(settings.vector_store) as store:
        store.ensure_collection(DIM)
        follower = ItemsFollower(store, _embed, settings)
        stuck, refused = follower._consumer, []

        def always_refused(*args: Any, **kwargs: Any) -> None:
            refused.append(True)
            raise RebalanceInProgressError("injected: the group never finishes rebalancing")

        stuck.commit = always_refused
        try:
            yield settings, store, follower, stuck, refused
        finally:
            follower.close()


def _poll_until_committed(follower: ItemsFollower, kafka_bootstrap: str, settings: Settings,
                          retried: type[Exception], why: Callable[[], str]) -> None:
    """poll_once until the topic's one record is committed; ``retried`` is waited out as run() does."""
    deadline = time.monotonic() + DEADLINE_S
    while _committed(kafka_bootstrap, settings, follower.group_id) != 1:
        assert time.monotonic() < deadline, f"never committed; {why()}"
        try:
            follower.poll_once()
        except retried:
            time.sleep(0.2)


def test_a_follower_stuck_in_a_rebalance_is_replaced(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """After `kafka.rejoin_after_s` of refused commits the follower replaces its consumer, whose
    fresh one re-reads the topic from the committed offsets, indexes it again (an upsert) and
    commits."""
    from kafka.errors import RebalanceInProgressError

    with _stuck_follower(kafka_bootstrap, unique, tmp_path, "x0") as (settings, store, follower, stuck, refused):
        _poll_until_committed(follower, kafka_bootstrap, settings, RebalanceInProgressError,
                              lambda: f"{len(refused)} refused")
        assert refused and follower._consumer is not stuck
        assert store.count() == 1


def test_a_failed_replacement_of_a_stuck_consumer_is_tried_again(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """The stuck consumer is replaced while the broker cannot be reached (creating the new one
    raises): the follower must not be left polling the closed one for good."""
    from kafka.errors import KafkaConnectionError, KafkaError

    with _stuck_follower(kafka_bootstrap, unique, tmp_path, "y0") as (settings, _, follower, stuck, refused):
        make, failed = follower._new_consumer, []

        def broker_down_once() -> Any:
            if not failed:
                failed.append(True)
                raise KafkaConnectionError("injected: the broker is down right now")
            return make()

        follower._new_consumer = broker_down_once  # type: ignore[method-assign]
        _poll_until_committed(follower, kafka_bootstrap, settings, KafkaError,  # what run() backs off from
                              lambda: f"{len(refused)} refused, {failed}")
        assert failed and follower._consumer is not None and follower._consumer is not stuck


def _committed(bootstrap: str, settings: Settings, group: str | None) -> int:
    """A follower group's committed offsets on the items topic, summed."""
    reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    try:
        partitions = reader.partitions_for_topic(settings.topics.items) or set()
        return sum(reader.committed(TopicPartition(settings.topics.items, p)) or 0 for p in partitions)
    finally:
        reader.close()


def test_recsys_index_follow_loads_the_table_then_indexes_items_until_sigterm(
    kafka_bootstrap: str, unique: str, tmp_path: Path, small_model_dir: Path
) -> None:
    """docker-compose's indexer, `recsys index --follow`, as a process: the model's table is
    loaded, a produced item is embedded by the model's ONNX encoder, a malformed record goes to
    items.dlq, and SIGTERM ends it cleanly with the shard whole."""
    from streams.synthetic import N_CLUSTERS, cluster_features

    shard = tmp_path / "shard"
    settings = _settings(kafka_bootstrap, unique, shard)
    # One partition: the refusal below then follows the item in its log, whatever their keys hash to.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")} | {
        "RECSYS_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "RECSYS_KAFKA__PARTITIONS": "1",
        "RECSYS_TOPICS__ITEMS": settings.topics.items,
        "RECSYS_TOPICS__ITEMS_DLQ": settings.topics.items_dlq,
        "RECSYS_VECTOR_STORE__PATH": str(shard),
        "RECSYS_VECTOR_STORE__INDEXER_GROUP_ID": settings.vector_store.indexer_group_id,
        "RECSYS_VECTOR_STORE__INDEXER_POLL_MS": "200",
        "RECSYS_INFERENCE__MODEL_DIR": str(small_model_dir),
    }
    log_path = tmp_path / "index.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "recsys", "index", "--follow"], cwd=tmp_path, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while b"following" not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        features = cluster_features(3, N_CLUSTERS)
        _produce(kafka_bootstrap, settings.topics.items,
                 [_item("brand-new", features, surfaces=["search"]), b"not msgpack"], ["brand-new", "junk"])
        # Once the refusal is on items.dlq, the item before it was indexed (or is, in the same
        # batch, before the commit).
        while not read_topic(kafka_bootstrap, settings.topics.items_dlq):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0, log_path.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    table = ItemTable.load(small_model_dir)
    with EdgeStore(VectorStoreSettings(path=shard)) as store:
        assert store.catalogue_version() == model_version(small_model_dir)
        assert store.count() == len(table.ids) + 1
        assert store.records(["brand-new"])["brand-new"].surfaces == ("search",)
        vector = store.retrieve(["brand-new"])["brand-new"]
        assert store.query_batch(vector[None], 1, ["search"])[0][0][0] == "brand-new"


def test_after_a_reload_of_the_same_model_the_follower_embeds_again_what_the_load_overwrote(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    """`recsys index --reindex` writes the exported rows again, over an item the follower had
    re-embedded from newer features: the next follower reads `items` from its start again, so
    the item gets its newer vector back instead of the stale row for good."""
    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    _create_topic(kafka_bootstrap, settings.topics.items, partitions=1)
    eye = np.eye(DIM, dtype=np.float32)
    table = ItemTable(["a", "b"], eye[:2], np.ones(2, np.float32))
    with EdgeStore(settings.vector_store) as store:
        store.ensure_collection(DIM)  # as `recsys index` opens it
        load_table(store, table, "v1", settings.events.surfaces)
        _produce(kafka_bootstrap, settings.topics.items, [_item("a", eye[5].tolist())], ["a"])  # newer features
        for _ in ("before the reload", "after it"):
            follower = ItemsFollower(store, _embed, settings, model_version="v1")
            try:
                _poll_until(follower, lambda s: s.embedded >= 1)
            finally:
                follower.close()
            np.testing.assert_allclose(store.retrieve(["a"])["a"], eye[5], atol=1e-6)
            load_table(store, table, "v1", settings.events.surfaces)  # --reindex
            np.testing.assert_allclose(store.retrieve(["a"])["a"], eye[0], atol=1e-6)


def test_a_follower_stops_when_the_store_is_loaded_again(kafka_bootstrap: str, unique: str, tmp_path: Path) -> None:
    """`recsys index --follow` beside another `recsys index --reindex` (a Qdrant server): its
    group is the previous load's, so it stops (to be restarted in the new load's group)."""
    from inference.worker import SerialisedStore
    from vector_store.indexer import CatalogueReloaded

    settings = _settings(kafka_bootstrap, unique, tmp_path / "shard")
    settings.inference.catalogue_check_every_s = 0.1
    _create_topic(kafka_bootstrap, settings.topics.items, partitions=1)
    table = ItemTable(["a"], np.eye(1, DIM, dtype=np.float32), np.ones(1, np.float32))
    with EdgeStore(settings.vector_store) as edge:
        store = SerialisedStore(edge)  # two threads on one shard, as in the worker
        store.ensure_collection(DIM)
        load_table(store, table, "v1", settings.events.surfaces)
        follower = ItemsFollower(store, _embed, settings, model_version="v1")
        stop, raised = threading.Event(), []

        def run() -> None:
            try:
                follower.run(stop)
            except CatalogueReloaded as exc:
                raised.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        try:
            thread.start()
            time.sleep(0.5)
            assert thread.is_alive()  # its own load: it follows
            load_table(store, table, "v1", settings.events.surfaces)
            thread.join(DEADLINE_S)
            assert not thread.is_alive() and raised and "loaded again" in str(raised[0])
        finally:
            stop.set()
            thread.join(DEADLINE_S)
            follower.close()

