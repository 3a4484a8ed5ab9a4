"""A gRPC server's restart, cold (the compacted `candidates` topic read whole) vs warm (its
snapshot loaded and the topic followed from the snapshot's offsets):
benchmarks/results/serving_restart.json.

A local broker holds `--users` users' candidates (3 surfaces x 100 items, the worker's shape);
one server reads them and saves its snapshot at shutdown. Then, `--repeats` times alternating,
1% of the users get a newer list and a server is started cold (no snapshot) or warm (the
snapshot of the server before it), and the time from the start of `serve()` to gRPC health
SERVING is measured (every Candidates call is UNAVAILABLE until then). Both serve the same
store afterwards (checked on a sample of users). In-process, one server at a time.

    python -m benchmarks.serving_restart     # ~3 min at the default 30,000 users
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import msgpack
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.results_io import write_result
from recsys.kafka_broker import LocalBroker, free_port
from recsys.settings import KafkaSettings, Settings
from recsys.topics import ensure_topics, topic_configs
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from serving.server import serve

LIST_LEN = 100
CATALOGUE = 50_000


def record(user: int, version: int, surfaces: list[str]) -> bytes:
    return msgpack.packb({
        "user_id": f"user-{user}", "version": version, "model_version": "m", "source_event_ts": version,
        "generated_at": version,
        "surfaces": {s: {"items": [str((user * 7 + i * 13 + k + version) % CATALOGUE) for k in range(LIST_LEN)],
                         "scores": [1.0 - k / LIST_LEN for k in range(LIST_LEN)]} for i, s in enumerate(surfaces)},
    }, use_single_float=True)


def publish(bootstrap: str, topic: str, users: range, version: int, surfaces: list[str]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20,
                             max_request_size=8 << 20)
    for user in users:
        producer.send(topic, key=f"user-{user}".encode(), value=record(user, version, surfaces))
    producer.flush()
    producer.close()


async def time_to_serving(settings: Settings, users: int) -> tuple[float, dict[str, str]]:
    """Seconds from serve()'s start to health SERVING; the first item of a sample of users."""
    start = time.monotonic()
    port_ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, ready=port_ready.set_result))
    port = await port_ready
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        seconds = time.monotonic() - start
        stub = pb_grpc.CandidatesStub(channel)
        sample = {}
        for user in range(0, users, 997):
            reply = await stub.GetCandidates(pb.GetCandidatesRequest(user_id=f"user-{user}", surface="home", limit=1), timeout=5)
            sample[f"user-{user}"] = reply.candidates[0].item_id if reply.candidates else ""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return seconds, sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=30_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-save", action="store_true", help="print the result, write no JSON")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="serving-restart-"))
    broker = LocalBroker(KafkaSettings(data_dir=work / "kafka", port=free_port(), controller_port=free_port()))
    bootstrap = broker.start()
    try:
        base = Settings()
        surfaces = list(base.events.surfaces)
        ensure_topics(bootstrap, topic_configs(base.topics, base.kafka.tombstone_retention_ms), partitions=4)
        snapshot = work / "candidates.msgpack"
        settings = base.model_copy(update={
            "kafka": base.kafka.model_copy(update={"bootstrap_servers": bootstrap}),
            "inference": base.inference.model_copy(update={"model_dir": work / "no-model"}),
            "serving": base.serving.model_copy(update={"port": 0, "snapshot_path": snapshot, "follow_items": False}),
        })
        t = time.monotonic()
        publish(bootstrap, base.topics.candidates, range(args.users), 1, surfaces)
        publish_s = time.monotonic() - t
        first, _ = asyncio.run(time_to_serving(settings, args.users))  # reads the topic whole, saves the snapshot
        cold: list[float] = []
        warm: list[float] = []
        version = 1
        for _ in range(args.repeats):
            for kind in ("cold", "warm"):
                version += 1
                publish(bootstrap, base.topics.candidates, range(0, args.users, 100), version, surfaces)
                if kind == "cold":
                    snapshot.unlink()
                seconds, sample = asyncio.run(time_to_serving(settings, args.users))
                (cold if kind == "cold" else warm).append(seconds)
                # Both read every user's newest list (the updated 1% included).
                want = {u: str((int(u.split("-")[1]) * 7 + (version if int(u.split("-")[1]) % 100 == 0 else 1))
                               % CATALOGUE) for u in sample}
                assert sample == want, f"{kind} start served other lists"
                print(f"{kind}: {seconds:.2f} s to SERVING", flush=True)
        metrics: dict[str, Any] = {
            "users": args.users, "list_length": LIST_LEN, "surfaces": len(surfaces), "updated_share": 0.01,
            "publish_seconds": round(publish_s, 1), "first_start_seconds": round(first, 2),
            "cold_start_seconds": round(statistics.median(cold), 2), "warm_start_seconds": round(statistics.median(warm), 2),
            "warm_over_cold": round(statistics.median(warm) / statistics.median(cold), 3),
            **{f"cold_start_seconds_r{k + 1}": round(s, 2) for k, s in enumerate(cold)},
            **{f"warm_start_seconds_r{k + 1}": round(s, 2) for k, s in enumerate(warm)},
        }
        print(metrics)
        if not args.no_save:
            print(write_result("serving_restart", metrics))
    finally:
        broker.destroy()
        shutil.rmtree(work, ignore_errors=True)  # the snapshot
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
