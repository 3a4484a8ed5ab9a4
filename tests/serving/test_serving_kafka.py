"""The server materialises a real compacted `candidates` topic and recovers it on restart.

Real broker (session fixture `kafka_bootstrap`), real grpc.aio server via `serve()` and via the
`recsys serve` process, real clients. Nothing here is faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import msgpack
import pytest
from aiokafka import AIOKafkaProducer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka.admin import KafkaAdminClient, NewTopic

from recsys.kafka_broker import free_port
from recsys.settings import Settings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from serving.server import SERVICE_NAME, FollowerStopped, serve

pytestmark = pytest.mark.kafka

Make = Callable[..., dict[str, Any]]
USERS = 200
T0 = 1_700_000_000_000


def create_topic(bootstrap: str, name: str, partitions: int = 2) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(name, partitions, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[str, dict[str, Any] | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for user_id, value in records:
            await producer.send(topic, key=user_id.encode(), value=None if value is None else msgpack.packb(value))
        await producer.flush()
    finally:
        await producer.stop()


async def wait_serving(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass  # not bound yet
            await asyncio.sleep(0.05)
    raise TimeoutError(f"server on {port} never reported SERVING")


async def get(port: int, user_id: str, surface: str = "home", limit: int = 3) -> pb.GetCandidatesResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await pb_grpc.CandidatesStub(channel).GetCandidates(
            pb.GetCandidatesRequest(user_id=user_id, surface=surface, limit=limit), timeout=5)


async def get_all(port: int, users: list[str]) -> dict[str, pb.GetCandidatesResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CandidatesStub(channel)
        batches = [users[i:i + 8] for i in range(0, len(users), 8)]
        out: dict[str, pb.GetCandidatesResponse] = {}
        for batch in batches:
            reply = await stub.BatchGetCandidates(pb.BatchGetCandidatesRequest(
                requests=[pb.GetCandidatesRequest(user_id=u, surface="home", limit=3) for u in batch]), timeout=5)
            out.update({r.user_id: r for r in reply.responses})
        return out


class RunningServe:
    """serve() in a task of the test's loop; `await stop()` cancels it (its shutdown path runs)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port_ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(serve(settings, ready=self.port_ready.set_result))

    async def port(self) -> int:
        done, _ = await asyncio.wait({self.port_ready, self.task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()  # serve() died: raise its error here
        return self.port_ready.result()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _settings(settings: Settings, bootstrap: str, topic: str, **serving: Any) -> Settings:
    return settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"bootstrap_servers": bootstrap}),
        # popular and items named after the test's topic too: the broker is shared by the session
        "topics": settings.topics.model_copy(update={"candidates": topic, "popular": f"{topic}.popular",
                                                     "items": f"{topic}.items"}),
        "serving": settings.serving.model_copy(update={"poll_ms": 50, "metadata_retry_s": 0.2, "metadata_refresh_ms": 300, **serving}),
    })


def test_serves_the_topic_keeps_up_and_recovers_after_restart(
    kafka_bootstrap: str, unique: str, settings: Settings, make_candidates: Make
) -> None:
    topic = f"candidates-{unique}"
    create_topic(kafka_bootstrap, topic)
    cfg = _settings(settings, kafka_bootstrap, topic)
    users = [f"user-{k}" for k in range(USERS)]

    async def scenario() -> None:
        # Two versions per user written before the server starts; the newer one must win.
        await produce(kafka_bootstrap, topic,
                      [(u, make_candidates(u, source_event_ts=T0, tag="old")) for u in users]
                      + [(u, make_candidates(u, source_event_ts=T0 + 1, tag="new")) for u in users]
                      + [("gone", make_candidates("gone", source_event_ts=T0)), ("gone", None)])
        first = RunningServe(cfg)
        port = await first.port()
        await wait_serving(port)  # SERVING only once the whole topic has been read
        answers = await get_all(port, users)
        wrong = {u: (a.is_fallback, a.candidates[0].item_id) for u, a in answers.items() if a.is_fallback or a.candidates[0].item_id != f"homenew-{u}-0"}
        assert not wrong, (len(wrong), list(wrong.items())[:5])
        assert (await get(port, "gone")).is_fallback  # the tombstone forgot the user

        # Keeping up: a fresh record shows up; a stale one (older action) is ignored.
        await produce(kafka_bootstrap, topic, [
            ("user-0", make_candidates("user-0", source_event_ts=T0 + 50, tag="live")),
            ("user-1", make_candidates("user-1", source_event_ts=T0 - 50, tag="stale")),
            ("newcomer", make_candidates("newcomer", source_event_ts=T0 + 5)),
        ])
        deadline = time.monotonic() + 30
        while (await get(port, "newcomer")).is_fallback or (await get(port, "user-0")).source_event_ts_ms != T0 + 50:
            assert time.monotonic() < deadline, "the server did not pick up new records"
            await asyncio.sleep(0.05)
        assert (await get(port, "user-0")).candidates[0].item_id == "homelive-user-0-0"
        assert (await get(port, "user-1")).candidates[0].item_id == "homenew-user-1-0"
        await first.stop()

        # A restarted server recovers every user from the topic before it says SERVING.
        second = RunningServe(cfg)
        port = await second.port()
        await wait_serving(port)
        answers = await get_all(port, [*users, "newcomer"])
        assert not any(a.is_fallback for a in answers.values())
        assert answers["user-0"].source_event_ts_ms == T0 + 50
        assert answers["user-1"].candidates[0].item_id == "homenew-user-1-0"
        assert answers["user-7"].candidates[0].item_id == "homenew-user-7-0"
        await second.stop()

    asyncio.run(scenario())


def test_an_item_withdrawn_after_the_lists_were_made_leaves_them(
    kafka_bootstrap: str, unique: str, settings: Settings, make_candidates: Make
) -> None:
    """A takedown on `items` (surfaces: []) reaches the lists already served, without the user
    acting again; a restarted server has read `items` whole before it says SERVING."""
    topic, items = f"candidates-elig-{unique}", f"items-elig-{unique}"
    create_topic(kafka_bootstrap, topic)
    create_topic(kafka_bootstrap, items)
    cfg = _settings(settings, kafka_bootstrap, topic)
    cfg = cfg.model_copy(update={"topics": cfg.topics.model_copy(update={"items": items})})

    async def scenario() -> None:
        await produce(kafka_bootstrap, topic, [("u1", make_candidates("u1", source_event_ts=T0))])
        first = RunningServe(cfg)
        port = await first.port()
        await wait_serving(port)
        served = [c.item_id for c in (await get(port, "u1", limit=5)).candidates]
        gone = served[1]
        await produce(kafka_bootstrap, items, [(gone, {"item_id": gone, "surfaces": []})])
        deadline = time.monotonic() + 30
        while gone in [c.item_id for c in (await get(port, "u1", limit=5)).candidates]:
            assert time.monotonic() < deadline, "the withdrawal never reached the served list"
            await asyncio.sleep(0.05)
        assert [c.item_id for c in (await get(port, "u1", limit=4)).candidates] == [i for i in served if i != gone]
        await first.stop()
        second = RunningServe(cfg)
        port = await second.port()
        await wait_serving(port)
        assert gone not in [c.item_id for c in (await get(port, "u1", limit=5)).candidates]
        await second.stop()

    asyncio.run(scenario())


def test_missing_topic_serves_fallbacks_then_follows_it_once_created(
    kafka_bootstrap: str, unique: str, settings: Settings, make_candidates: Make
) -> None:
    topic = f"candidates-late-{unique}"
    cfg = _settings(settings, kafka_bootstrap, topic)

    async def scenario() -> None:
        server = RunningServe(cfg)
        port = await server.port()
        await wait_serving(port)  # nothing written yet = nothing to catch up on
        assert (await get(port, "early")).is_fallback
        create_topic(kafka_bootstrap, topic)
        await produce(kafka_bootstrap, topic, [("early", make_candidates("early", source_event_ts=T0))])
        deadline = time.monotonic() + 30
        while (await get(port, "early")).is_fallback:
            assert time.monotonic() < deadline, "the server never followed the new topic"
            await asyncio.sleep(0.1)
        await server.stop()

    asyncio.run(scenario())


def test_unknown_users_get_each_surface_s_popular_eligible_items_as_the_worker_publishes_them(
    kafka_bootstrap: str, unique: str, settings: Settings, small_model_dir: Path, tmp_path: Path
) -> None:
    """Worker -> `popular` -> server: the fallback honours the vector store's eligibility (the
    most popular item withdrawn from search is not in search's fallback) instead of one list."""
    from kafka import KafkaProducer

    from inference.runtime import ModelRuntime
    from inference.worker import Worker
    from recsys.topics import COMPACTED, ensure_topics
    from vector_store import ItemRecord, open_store
    from vector_store.indexer import ItemTable

    popular = f"popular-{unique}"
    ensure_topics(kafka_bootstrap, {popular: COMPACTED}, partitions=1)
    cfg = _settings(settings, kafka_bootstrap, f"candidates-{unique}")
    cfg = cfg.model_copy(update={"topics": cfg.topics.model_copy(update={"popular": popular})})
    worker_cfg = cfg.model_copy(update={
        "inference": cfg.inference.model_copy(update={"model_dir": small_model_dir}),
        "vector_store": cfg.vector_store.model_copy(update={"path": tmp_path / "qdrant"}),
    })
    runtime = ModelRuntime.load(small_model_dir, "cpu")
    table = ItemTable.load(small_model_dir)
    top = str(table.ids[int(np.argmax(table.popularity))])
    records = [ItemRecord(i, ("home",) if i == top else ("home", "search", "related"), 0, float(p))
               for i, p in zip(table.ids, table.popularity.tolist(), strict=True)]
    store = open_store(worker_cfg, dim=runtime.dim)
    worker = Worker.offline(worker_cfg, runtime, store)
    worker.producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        store.upsert(records, table.embeddings)
        assert worker.publish_popular()
        worker.producer.flush()
    finally:
        worker.producer.close()
        store.close()

    async def scenario() -> None:
        server = RunningServe(cfg)
        port = await server.port()
        await wait_serving(port)  # SERVING once `popular` has been read too
        home, search = await get(port, "nobody", "home", 20), await get(port, "nobody", "search", 20)
        assert home.is_fallback and search.is_fallback
        assert home.candidates[0].item_id == top and home.model_version == runtime.version
        assert top not in [c.item_id for c in search.candidates] and len(search.candidates) == 20
        scores = [c.score for c in search.candidates]
        assert scores == sorted(scores, reverse=True)
        await server.stop()

    asyncio.run(scenario())


def test_a_server_started_before_its_broker_waits_for_it_and_then_serves(
    tmp_path: Path, unique: str, settings: Settings, make_candidates: Make
) -> None:
    """Processes of a deployment start in any order: with no broker yet, the server stays up
    (NOT_SERVING, calls UNAVAILABLE with the reason: it cannot know a user's list or what was
    withdrawn) instead of dying, and follows the topic once a broker is up."""
    from recsys.kafka_broker import LocalBroker
    from recsys.settings import KafkaSettings

    port = free_port()
    bootstrap = f"localhost:{port}"
    topic = f"candidates-{unique}"
    cfg = _settings(settings, bootstrap, topic)

    async def scenario() -> None:
        server = RunningServe(cfg)
        grpc_port = await server.port()
        await asyncio.sleep(1.0)  # a few failed connection attempts
        assert not server.task.done()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await get(grpc_port, "early")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "catching up" in (refused.value.details() or "")
        with pytest.raises(TimeoutError):
            await wait_serving(grpc_port, timeout_s=0.5)
        broker = LocalBroker(KafkaSettings(data_dir=tmp_path / "kafka", port=port, controller_port=free_port()))
        await asyncio.to_thread(broker.start)
        try:
            create_topic(bootstrap, topic)
            await produce(bootstrap, topic, [("early", make_candidates("early", source_event_ts=T0))])
            await wait_serving(grpc_port)
            deadline = time.monotonic() + 30
            while (await get(grpc_port, "early")).is_fallback:
                assert time.monotonic() < deadline, "the server never followed the topic"
                await asyncio.sleep(0.1)
            await server.stop()
        finally:
            await asyncio.to_thread(broker.destroy)

    asyncio.run(scenario())


def test_a_server_stopped_before_it_caught_up_leaves_its_snapshot_as_it_was(
    tmp_path: Path, unique: str, settings: Settings, make_candidates: Make
) -> None:
    """A server that never reached the topic leaves its snapshot as it was: saved, its old
    contents would be dated now. (Its age is in its header: it is not loaded where deletions
    matter, written before headers it is its file's time, as here.)"""
    from serving.store import CandidateStore

    snapshot = tmp_path / "snap.msgpack"
    old = CandidateStore(10)
    old.apply(make_candidates("u1", source_event_ts=T0))
    old.save(snapshot)
    os.utime(snapshot, (1_000_000, 1_000_000))  # written long ago
    cfg = _settings(settings, f"localhost:{free_port()}", f"candidates-{unique}", snapshot_path=snapshot)  # no broker there

    async def scenario() -> None:
        server = RunningServe(cfg)
        await server.port()
        await asyncio.sleep(1.0)  # a few failed connection attempts
        await server.stop()

    asyncio.run(scenario())
    assert snapshot.stat().st_mtime == 1_000_000

    # A server that only serves its snapshot (follow off): loaded whatever its age (there are no
    # deletions it could miss), and left as it was (it has nothing newer).
    async def snapshot_only() -> None:
        server = RunningServe(cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"follow": False})}))
        port = await server.port()
        await wait_serving(port)
        assert not (await get(port, "u1")).is_fallback
        await server.stop()

    asyncio.run(snapshot_only())
    assert snapshot.stat().st_mtime == 1_000_000


def test_a_snapshot_is_a_warm_start_from_its_positions_and_dropped_for_a_recreated_topic(
    kafka_bootstrap: str, unique: str, settings: Settings, make_candidates: Make, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server restarted from its snapshot reads only the records written since (it re-read the
    whole topic, the snapshot adding nothing but the risk of deleted users), deletions since
    included; a topic recreated since does not get the snapshot's users; a damaged snapshot is
    read past."""
    import logging

    topic = f"candidates-{unique}"
    create_topic(kafka_bootstrap, topic)
    snapshot = tmp_path / "snap.msgpack"
    cfg = _settings(settings, kafka_bootstrap, topic, snapshot_path=snapshot)
    users = [f"user-{k}" for k in range(30)]

    async def restarted() -> tuple[RunningServe, int]:
        caplog.clear()
        server = RunningServe(cfg)
        port = await server.port()
        await wait_serving(port)
        return server, port

    def caught_up_records() -> int:
        (line,) = [r.getMessage() for r in caplog.records if f"follower of {topic}: caught up" in r.getMessage()]
        return int(line.rsplit("(", 1)[1].split()[0])

    async def scenario() -> None:
        await produce(kafka_bootstrap, topic, [(u, make_candidates(u, source_event_ts=T0)) for u in users])
        server, _ = await restarted()
        assert caught_up_records() == 30
        await server.stop()  # saves the snapshot, with the positions read up to
        await produce(kafka_bootstrap, topic, [("later", make_candidates("later", source_event_ts=T0)), ("user-1", None),
                                               ("user-2", make_candidates("user-2", source_event_ts=T0 + 1, tag="new"))])
        server, port = await restarted()
        assert caught_up_records() == 3  # the records written since, not the whole topic again
        answers = await get_all(port, ["user-0", "user-1", "user-2", "later"])
        assert not answers["user-0"].is_fallback and not answers["later"].is_fallback
        assert answers["user-1"].is_fallback  # deleted since the snapshot
        assert answers["user-2"].candidates[0].item_id == "homenew-user-2-0"
        await server.stop()

        # A snapshot read further than the topic goes (the topic deleted and created again
        # since): its users are not this topic's.
        from serving.store import CandidateStore, SnapshotInfo

        elsewhere = CandidateStore(10)
        elsewhere.apply(make_candidates("elsewhere", source_event_ts=T0))
        elsewhere.save(snapshot, SnapshotInfo(topic, {0: 10_000, 1: 10_000}, int(time.time() * 1000)))
        server, port = await restarted()
        assert caught_up_records() == 33
        answers = await get_all(port, ["elsewhere", "user-0"])
        assert answers["elsewhere"].is_fallback and not answers["user-0"].is_fallback
        await server.stop()
        # ... or one recreated and grown past the positions since: records below them written
        # after the snapshot was fresh (an hour ago, here), which the same topic cannot hold.
        an_hour_ago = int(time.time() * 1000) - 3_600_000
        elsewhere.save(snapshot, SnapshotInfo(topic, {0: 2, 1: 2}, an_hour_ago, stamps={0: an_hour_ago, 1: an_hour_ago}))
        server, port = await restarted()
        assert caught_up_records() == 33
        assert (await get(port, "elsewhere")).is_fallback
        await server.stop()
        # A snapshot whose store had evicted users, loaded by a larger store: the topic is read
        # whole over it (the evicted users come back), its users kept.
        _, info = CandidateStore(100).load(snapshot)
        assert info is not None and info.positions and info.stamps
        elsewhere.save(snapshot, SnapshotInfo(topic, info.positions, info.fresh_at_ms, max_users=10, evicted=True,
                                              stamps=info.stamps))
        server, port = await restarted()
        assert caught_up_records() == 33 and not (await get(port, "elsewhere")).is_fallback
        await server.stop()
        # ... or one read from another topic.
        elsewhere.save(snapshot, SnapshotInfo(f"{topic}-other", {0: 2, 1: 2}, int(time.time() * 1000)))
        server, port = await restarted()
        assert caught_up_records() == 33 and (await get(port, "elsewhere")).is_fallback
        await server.stop()

        snapshot.write_bytes(snapshot.read_bytes()[:-10])  # damaged: read past, the topic read whole
        server, port = await restarted()
        assert caught_up_records() == 33 and not (await get(port, "user-0")).is_fallback
        await server.stop()

    with caplog.at_level(logging.INFO, logger="serving"):
        asyncio.run(scenario())


def test_a_follower_that_ends_stops_its_server_with_the_error(unique: str, settings: Settings) -> None:
    """A follower ends only on what no retry covers (here a bootstrap address aiokafka cannot
    parse). The server must stop and say why (the process exits non-zero), not stay NOT_SERVING
    in silence, or SERVING a store that no longer follows its topic."""
    cfg = _settings(settings, "localhost:notaport", f"candidates-{unique}", drain_s=0.0)

    async def scenario() -> None:
        server = RunningServe(cfg)
        await server.port()
        with pytest.raises(FollowerStopped, match="notaport"):
            await asyncio.wait_for(server.task, 30)

    asyncio.run(scenario())


def test_processes_sharing_a_port_bind_it_only_once_caught_up(unique: str, settings: Settings) -> None:
    """With serving.workers > 1 the kernel hands each new connection to any process bound to
    the port, and a health probe sees only one of them: a process still reading the topic (here
    it cannot, no broker answers) must not be bound, or it would answer its share of the calls
    with fallbacks."""
    port = free_port()
    cfg = _settings(settings, f"localhost:{free_port()}", f"candidates-{unique}", workers=2, port=port)

    async def scenario() -> None:
        server = RunningServe(cfg)
        await server.port()
        await asyncio.sleep(1.0)  # a few failed connection attempts
        assert not server.task.done()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        await server.stop()

    asyncio.run(scenario())


def test_a_process_that_cannot_bind_after_catch_up_stops_with_the_error(unique: str, settings: Settings) -> None:
    """With serving.workers > 1 the port is bound after catch-up; taken by a server that does
    not share it, the process must stop with that error, not live on unbound and unnoticed."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    cfg = _settings(settings, "localhost:1", f"candidates-{unique}", workers=2, port=port, follow=False, drain_s=0.0)

    async def scenario() -> None:
        server = RunningServe(cfg)
        with pytest.raises(RuntimeError, match="bind"):  # grpc's own "Failed to bind to address ..."
            await asyncio.wait_for(server.task, 30)

    try:
        asyncio.run(scenario())
    finally:
        holder.close()


@contextlib.contextmanager
def serve_process(port: int, *args: str, **env: str) -> Iterator[subprocess.Popen[str]]:
    """`recsys serve --port PORT ARGS` as a real process, with these RECSYS_* variables (and a
    1 s shutdown grace); killed at the end if a failed assertion left it running."""
    # A session of its own, as a terminal's job: a signal to its group reaches every process.
    proc = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--port", str(port), *args],
                            env={**os.environ, "RECSYS_SERVING__SHUTDOWN_GRACE_S": "1", **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def kafka_env(bootstrap: str, topic: str, model_dir: Path) -> dict[str, str]:
    return {"RECSYS_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "RECSYS_TOPICS__CANDIDATES": topic,
            "RECSYS_TOPICS__POPULAR": f"{topic}.popular", "RECSYS_TOPICS__ITEMS": f"{topic}.items",
            "RECSYS_INFERENCE__MODEL_DIR": str(model_dir)}


def test_recsys_serve_process_sigterm_snapshot_and_workers(
    kafka_bootstrap: str, unique: str, tmp_path: Path, model_dir: Path, make_candidates: Make
) -> None:
    """`recsys serve` as a real process: SIGTERM shuts it down cleanly and writes the snapshot;
    `--workers 2` runs two processes on one port that both stop on SIGTERM."""
    topic = f"candidates-proc-{unique}"
    create_topic(kafka_bootstrap, topic)
    asyncio.run(produce(kafka_bootstrap, topic, [("p1", make_candidates("p1", source_event_ts=T0))]))
    snapshot = tmp_path / "snap.msgpack"

    for args in (["--snapshot", str(snapshot)], ["--workers", "2"]):
        port = free_port()
        with serve_process(port, *args, **kafka_env(kafka_bootstrap, topic, model_dir)) as proc:
            asyncio.run(wait_serving(port))
            reply = asyncio.run(get(port, "p1"))
            assert not reply.is_fallback and reply.candidates[0].item_id == "home-p1-0"
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, output
            assert output.count("shutting down: NOT_SERVING") == (2 if "--workers" in args else 1), output
    assert snapshot.exists() and b"home-p1-0" in snapshot.read_bytes()


def test_recsys_serve_drains_before_refusing_calls(model_dir: Path) -> None:
    """After SIGTERM, for serving.drain_s: health says NOT_SERVING (so a load balancer polling
    it moves away) while calls are still answered; then the process stops cleanly."""
    port = free_port()

    async def during_the_drain() -> tuple[int, pb.GetCandidatesResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 10  # a failure bound: the signal lands within a few ms
            while time.monotonic() < deadline:
                status = (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return status, await get(port, "anyone")
                await asyncio.sleep(0.02)
            raise AssertionError("health never said NOT_SERVING")

    # A drain long enough that a slow machine's health poll and call land inside it.
    with serve_process(port, "--no-follow", RECSYS_INFERENCE__MODEL_DIR=str(model_dir), RECSYS_SERVING__DRAIN_S="12") as proc:
        asyncio.run(wait_serving(port))
        proc.send_signal(signal.SIGTERM)
        _, reply = asyncio.run(during_the_drain())
        assert reply.is_fallback and reply.candidates  # answered, not UNAVAILABLE
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "12.0 s drain" in output, output


def test_recsys_serve_workers_stops_when_one_process_dies(
    kafka_bootstrap: str, unique: str, model_dir: Path
) -> None:
    """One of `--workers 2` killed: the supervisor stops the other and exits non-zero, so that
    compose or Kubernetes restarts the replica instead of it running at half capacity."""
    topic = f"candidates-crash-{unique}"
    create_topic(kafka_bootstrap, topic)
    port = free_port()
    with serve_process(port, "--workers", "2", **kafka_env(kafka_bootstrap, topic, model_dir)) as proc:
        asyncio.run(wait_serving(port))
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        servers = [int(c) for c in children
                   if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(servers) == 2, children
        os.kill(servers[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0, output
        assert "exited (-9); stopping the others" in output, output
        assert output.count("shutting down: NOT_SERVING") == 1, output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_recsys_serve_workers_stopped_while_starting_exits_cleanly(
    kafka_bootstrap: str, unique: str, model_dir: Path, sig: signal.Signals
) -> None:
    """A SIGTERM to `recsys serve --workers 2` before its processes have started (CI caught one
    still importing: it died of the forwarded signal, exit 15) stops every one cleanly; so does
    a SIGINT (a Ctrl-C then was ignored by every process, and they went on serving)."""
    topic = f"candidates-early-{unique}"
    create_topic(kafka_bootstrap, topic)
    with serve_process(free_port(), "--workers", "2", **kafka_env(kafka_bootstrap, topic, model_dir)) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the supervisor's handlers are in; its processes just spawned
        assert "starting 2 server processes" in first, first
        if sig == signal.SIGTERM:
            proc.send_signal(sig)
        else:
            # As a terminal's Ctrl-C: to every process of the group, the servers still
            # importing (a second or more) included: they must not die of it.
            time.sleep(0.3)
            os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=60)
        output = first + output
        assert proc.returncode == 0, output
        assert output.count("shutting down: NOT_SERVING") == 2, output


def test_a_follower_records_only_positions_it_applied(kafka_bootstrap: str, unique: str, settings: Settings,
                                                     make_candidates: Make) -> None:
    """Stopped at one of its yields mid-batch, the follower's positions (a snapshot's warm start)
    must not count the record it had not applied yet: a restart would skip it for good."""
    from serving.follower import CandidatesFollower
    from serving.store import CandidateStore, SnapshotInfo

    topic = f"candidates-{unique}"
    create_topic(kafka_bootstrap, topic, partitions=1)
    cfg = _settings(settings, kafka_bootstrap, topic, apply_yield_every=8)

    async def scenario() -> None:
        await produce(kafka_bootstrap, topic, [(f"u{k}", make_candidates(f"u{k}", source_event_ts=T0)) for k in range(40)])
        follower = CandidatesFollower(cfg, CandidateStore(100))
        applied: list[int] = []
        real_apply = follower._apply

        def apply(key: bytes | None, value: bytes | None) -> None:
            real_apply(key, value)
            applied.append(len(applied))
            if len(applied) == 12:
                assert follower._task is not None
                follower._task.cancel()  # lands at the next yield, after record 16 was counted
        follower._apply = apply  # type: ignore[method-assign]
        await follower.start()
        assert follower._task is not None
        await asyncio.gather(follower._task, return_exceptions=True)
        await follower.stop()
        assert len(applied) == 15 and follower.positions == {0: 15}
        # Resumed from there, with a freshness older than the records applied (a stop between
        # two notes of it): the same topic, so only the 25 records left are read.
        info = SnapshotInfo(topic, follower.positions, int(time.time() * 1000) - 60_000, stamps=follower.stamps)
        again = CandidatesFollower(cfg, CandidateStore(100), start=info)
        again.store.apply(make_candidates("from-the-snapshot", source_event_ts=T0))
        await again.start()
        await asyncio.wait_for(again.caught_up.wait(), 60)
        assert again.records == 25 and again.store.get("from-the-snapshot") is not None
        await again.stop()

    asyncio.run(scenario())


def test_a_warm_start_whose_seek_fails_seeks_again_rather_than_reading_whole(
    kafka_bootstrap: str, unique: str, settings: Settings, make_candidates: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KafkaError from a seek (the assignment replaced mid-way) left the partitions unseeked
    and the follower fetched them from their start: the warm start became a cold read."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import IllegalStateError

    from serving.follower import CandidatesFollower
    from serving.store import CandidateStore, SnapshotInfo

    topic = f"candidates-{unique}"
    create_topic(kafka_bootstrap, topic, partitions=1)
    cfg = _settings(settings, kafka_bootstrap, topic)
    real_seek = AIOKafkaConsumer.seek
    failed: list[int] = []

    def seek_failing_once(self: AIOKafkaConsumer, partition: Any, offset: int) -> None:
        if not failed:
            failed.append(offset)
            raise IllegalStateError("No current assignment for partition")
        real_seek(self, partition, offset)

    monkeypatch.setattr(AIOKafkaConsumer, "seek", seek_failing_once)

    async def scenario() -> None:
        await produce(kafka_bootstrap, topic, [(f"u{k}", make_candidates(f"u{k}", source_event_ts=T0)) for k in range(40)])
        info = SnapshotInfo(topic, {0: 30}, int(time.time() * 1000))
        follower = CandidatesFollower(cfg, CandidateStore(100), start=info)
        await follower.start()
        await asyncio.wait_for(follower.caught_up.wait(), 60)
        assert failed == [30] and follower.records == 10
        await follower.stop()

    asyncio.run(scenario())


def test_a_followers_freshness_stops_when_its_broker_goes(tmp_path: Path, unique: str, settings: Settings,
                                                         make_candidates: Make) -> None:
    """aiokafka's getmany returns nothing, without an error, while the broker is unreachable:
    the freshness a snapshot is dated by went on advancing, so one saved after a long outage
    passed the tombstone-retention check."""
    from recsys.kafka_broker import LocalBroker
    from recsys.settings import KafkaSettings
    from serving.follower import CandidatesFollower
    from serving.store import CandidateStore

    topic = f"candidates-{unique}"
    broker = LocalBroker(KafkaSettings(data_dir=tmp_path / "kafka", port=free_port(), controller_port=free_port()))
    bootstrap = broker.start()
    try:
        create_topic(bootstrap, topic)
        cfg = _settings(settings, bootstrap, topic)

        async def scenario() -> None:
            await produce(bootstrap, topic, [("u", make_candidates("u", source_event_ts=T0))])
            follower = CandidatesFollower(cfg, CandidateStore(10))
            await follower.start()
            await asyncio.wait_for(follower.caught_up.wait(), 60)
            first = follower.fresh_at_ms
            await asyncio.sleep(1.0)
            assert follower.fresh_at_ms is not None and first is not None and follower.fresh_at_ms > first  # fetching: renewed
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(1.0)  # fetches in flight answer, or fail
            cut_off = follower.fresh_at_ms
            await asyncio.sleep(2.0)
            assert follower.fresh_at_ms == cut_off  # the last fetch that answered, not the clock
            await follower.stop()

        asyncio.run(scenario())
    finally:
        broker.destroy()


def test_a_server_whose_topic_is_missing_drops_its_snapshots_users(
    kafka_bootstrap: str, unique: str, settings: Settings, make_candidates: Make, tmp_path: Path
) -> None:
    """The snapshot was read from a topic that is gone (deleted to purge the lists, or another
    cluster): its users are not served as if they were current, as with a recreated topic."""
    from serving.store import CandidateStore, SnapshotInfo

    snapshot = tmp_path / "snap.msgpack"
    now = int(time.time() * 1000)
    kept = CandidateStore(10)
    kept.apply(make_candidates("u1", source_event_ts=T0))
    kept.save(snapshot, SnapshotInfo(f"candidates-{unique}", {0: 5, 1: 7}, now, max_users=10, stamps={0: now, 1: now}))
    cfg = _settings(settings, kafka_bootstrap, f"candidates-{unique}", snapshot_path=snapshot)  # never created

    async def scenario() -> None:
        server = RunningServe(cfg)
        port = await server.port()
        await wait_serving(port)
        assert (await get(port, "u1")).is_fallback
        await server.stop()

    asyncio.run(scenario())
    n, info = CandidateStore(100).load(snapshot)
    assert n == 0 and info is not None and info.positions == {}


async def caught_up_on(bootstrap: str, cfg: Settings, users: list[str], make_candidates: Make) -> Any:
    """A CandidatesFollower of cfg's topic, caught up on a record of each of `users`."""
    from serving.follower import CandidatesFollower
    from serving.store import CandidateStore

    await produce(bootstrap, cfg.topics.candidates, [(u, make_candidates(u, source_event_ts=T0)) for u in users])
    follower = CandidatesFollower(cfg, CandidateStore(100))
    await follower.start()
    await asyncio.wait_for(follower.caught_up.wait(), 60)
    return follower


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_partition_added_under_a_follower_is_read_alone(
    kafka_bootstrap: str, unique: str, settings: Settings, make_candidates: Make
) -> None:
    """Without a group, aiokafka reassigns every partition when one is added, each from its
    start: the follower read the whole topic again while serving (and `items` replayed
    withdrawn items' older records). Now the old partitions go on from where they were."""
    from kafka.admin import NewPartitions

    topic = f"candidates-{unique}"
    create_topic(kafka_bootstrap, topic, partitions=1)
    cfg = _settings(settings, kafka_bootstrap, topic)

    async def scenario() -> None:
        follower = await caught_up_on(kafka_bootstrap, cfg, [f"u{k}" for k in range(30)], make_candidates)
        assert follower.records == 30
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.create_partitions({topic: NewPartitions(2)})
        finally:
            admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, key=b"new", value=msgpack.packb(make_candidates("new", source_event_ts=T0)),
                                         partition=1)
        finally:
            await producer.stop()
        await until(lambda: follower.store.get("new") is not None)
        await asyncio.sleep(1.0)  # a few more metadata refreshes and fetches
        assert follower.store.get("new") is not None
        assert follower.records == 31 and follower.positions == {0: 30, 1: 1}
        await follower.stop()

    asyncio.run(scenario())


def test_a_topic_recreated_under_a_follower_is_read_afresh(
    kafka_bootstrap: str, unique: str, settings: Settings, make_candidates: Make
) -> None:
    """Deleted and created again while the server runs: the old topic's users go (they kept
    being served until a restart), the new topic's are read."""
    from kafka.errors import TopicAlreadyExistsError

    topic = f"candidates-{unique}"
    create_topic(kafka_bootstrap, topic, partitions=1)
    cfg = _settings(settings, kafka_bootstrap, topic)

    async def scenario() -> None:
        follower = await caught_up_on(kafka_bootstrap, cfg, [f"u{k}" for k in range(10)], make_candidates)
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.delete_topics([topic])
            deadline = time.monotonic() + 30
            while True:  # the follower's own metadata requests may create it again first (auto-create)
                try:
                    admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
                    break
                except TopicAlreadyExistsError:
                    if topic in admin.list_topics() and time.monotonic() > deadline - 25:
                        break
                    await asyncio.sleep(0.2)
        finally:
            admin.close()
        await produce(kafka_bootstrap, topic, [("fresh", make_candidates("fresh", source_event_ts=T0))])
        await until(lambda: follower.store.get("fresh") is not None)
        assert follower.store.get("u0") is None and len(follower.store) == 1
        await follower.stop()

    asyncio.run(scenario())
