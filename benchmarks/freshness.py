"""Freshness: time from producing an action to its new candidates being served over gRPC.

The whole system runs as real processes (recsys.local_stack: Kafka, Faust worker, ONNX
Runtime worker with Qdrant Edge, gRPC server). A producer thread sends a steady stream of
synthetic actions from many users; a probe thread samples the action just sent every 50 ms and
polls BatchGetCandidates for every sampled action still waiting until its user's served list's
source_event_ts reaches the action's time. The latency is produce -> visible, as a user of the
system would see it.

    python -m benchmarks.freshness --users 10000 --rate 500 --seconds 60
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import msgpack
import numpy as np
from kafka import KafkaProducer

from benchmarks.results_io import RESULTS_DIR, cpu_snapshot, cpu_window, reusable_model, write_result
from recsys.kafka_clients import read_topic
from recsys.local_stack import LocalStack
from recsys.settings import Settings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from streams.schema import encode_event
from streams.synthetic import synthetic_events


def ensure_model(model_dir: Path, users: int, items: int) -> Path:
    if reusable_model(model_dir, {"users": users, "items": items, "settings": Settings().model_dump(mode="json")}):
        return model_dir
    from inference.train import train_small_demo_model

    events = [e.to_wire() for e in synthetic_events(min(users * 5, 60_000), users, items, seed=11)]
    return train_small_demo_model(events, Settings(), model_dir, max_seconds=60)


class Load:
    """A steady stream of actions; remembers the newest (user, ts, sent-at) for the probe."""

    def __init__(self, bootstrap: str, topic: str, users: int, items: int, rate: float) -> None:
        # linger 5 ms: Kafka 4's default for producers (KIP-1030), counted in every latency here
        # (an action waits up to 5 ms in this producer). At 1 ms the broker spent ~20% of a core
        # more on the extra requests (steady state, measured 2026-11-23), on a machine it shares.
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
        self.topic, self.users, self.items, self.rate = topic, users, items, rate
        self.sent = 0
        self.latest: tuple[str, int, float] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(5)
        interval = 1.0 / self.rate
        next_at = time.perf_counter()
        while not self.stop.is_set():
            user = f"u{rng.randrange(self.users)}"
            ts = int(time.time() * 1000)
            event = {"user_id": user, "item_id": rng.randrange(self.items), "action": rng.choice(["click", "save"]),
                     "surface": rng.choice(["home", "search", "related"]), "ts": ts}
            sent_at = time.perf_counter()
            self.producer.send(self.topic, key=user.encode(), value=encode_event(event))
            self.latest = (user, ts, sent_at)
            self.sent += 1
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        self.producer.flush()
        self.producer.close()


@dataclass(frozen=True)
class Sample:
    """One sampled action, once its candidates were served."""

    sent_at: float  # perf_counter() when it was produced
    latency_ms: float  # produce -> the served list reflects it
    to_generated_ms: float  # the action's ts -> the worker's generated_at: streams + worker


class Prober:
    """Samples the action just sent every ``sample_every_s`` and watches every sampled action
    still waiting with ONE BatchGetCandidates per ``poll_every_s`` until its served list's
    source_event_ts reaches the action's time (or ``timeout_s`` passes: missed).

    One batched poll for all of them keeps the observer light: a GetCandidates loop per sample
    every 2 ms (this benchmark until 2026-11-23) sent ~1,500 calls/s at the server, and the
    server and the probes took most of a core from the system they measured. The poll interval
    bounds the error of each latency (it reads up to ``poll_every_s`` late)."""

    def __init__(self, target: str, load: Load, *, sample_every_s: float = 0.05, poll_every_s: float = 0.005,
                 timeout_s: float = 10.0, max_waiting: int = 100) -> None:
        self.target, self.load = target, load
        self.sample_every_s, self.poll_every_s, self.timeout_s = sample_every_s, poll_every_s, timeout_s
        self.max_waiting = max_waiting  # at most the server's serving.max_batch
        self.samples: list[Sample] = []
        self.missed = 0
        self.poll_errors = 0  # polls the server failed (each sample waiting then is still judged)
        self.stop = threading.Event()

    def run(self) -> None:
        """Until stopped, and then until every sampled action was seen or timed out (dropping
        the slow ones at the end would bias the tail down)."""
        waiting: list[tuple[str, int, float]] = []
        last: tuple[str, int, float] | None = None
        next_sample = time.perf_counter()
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.CandidatesStub(channel)
            while not self.stop.is_set() or waiting:
                tick = time.perf_counter()
                latest = self.load.latest
                if (not self.stop.is_set() and tick >= next_sample and latest is not None and latest is not last
                        and len(waiting) < self.max_waiting):
                    waiting.append(latest)
                    last, next_sample = latest, tick + self.sample_every_s
                if waiting:
                    waiting = self._poll(stub, waiting)
                time.sleep(max(0.0, tick + self.poll_every_s - time.perf_counter()))

    def _poll(self, stub: pb_grpc.CandidatesStub, waiting: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
        request = pb.BatchGetCandidatesRequest(
            requests=[pb.GetCandidatesRequest(user_id=user, surface="home", limit=10) for user, _, _ in waiting])
        try:
            replies = stub.BatchGetCandidates(request, timeout=2.0).responses
        except grpc.RpcError:
            # A slow or failed poll is a slow system, not the end of the measurement: the samples
            # keep waiting (and time out as missed), so a stall is counted, not dropped.
            self.poll_errors += 1
            replies = [pb.GetCandidatesResponse()] * len(waiting)
        now = time.perf_counter()
        still: list[tuple[str, int, float]] = []
        for (user, ts, sent_at), reply in zip(waiting, replies):
            if reply.source_event_ts_ms >= ts and not reply.is_fallback:
                self.samples.append(Sample(sent_at, (now - sent_at) * 1000, float(reply.generated_at_ms - ts)))
            elif now - sent_at > self.timeout_s:
                self.missed += 1
            else:
                still.append((user, ts, sent_at))
        return still


def stage_times(bootstrap: str, since_ms: int, until_ms: int) -> dict[str, float]:
    """Where the time goes, for EVERY action whose candidates were generated in the window (not
    only the sampled ones), from the records themselves: the action's ts -> the Faust worker
    emits the user's update (`emitted_at`: window + table) -> the ONNX worker stamps the
    candidates (`generated_at`: user-updates topic, queue, micro-batch, compute)."""
    topics = Settings().topics  # the local stack's names
    updates = (msgpack.unpackb(v, raw=False) for _, v in read_topic(bootstrap, topics.user_updates))
    emitted = {(u["user_id"], u["version"]): u["emitted_at"] for u in updates}
    streams_ms, worker_ms = [], []
    for c in (msgpack.unpackb(v, raw=False) for _, v in read_topic(bootstrap, topics.candidates)):
        at = emitted.get((c["user_id"], c["version"]))
        if at is not None and since_ms <= c["source_event_ts"] <= until_ms:
            streams_ms.append(at - c["source_event_ts"])
            worker_ms.append(c["generated_at"] - at)
    if not streams_ms:
        return {}
    return {f"{stage}_p{q}_ms": round(float(np.percentile(values, q)), 1)
            for stage, values in (("streams", streams_ms), ("worker", worker_ms)) for q in (50, 99)
            } | {"stage_samples": len(streams_ms)}


def plot(latencies: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(latencies, bins=60, color="#4477aa")
    for q, style in ((50, "--"), (99, ":")):
        v = float(np.percentile(latencies, q))
        ax.axvline(v, color="k", linestyle=style, label=f"p{q} = {v:.0f} ms")
    ax.set_xlabel("produce -> new candidates served over gRPC (ms)")
    ax.set_ylabel("sampled actions")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sample-ms", type=float, default=50.0, help="how often an action just sent is sampled")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="how often every waiting sample is polled (one batch call)")
    # A fresh broker's JIT compiles for its first ~40-60 s under load (its CPU fell from ~60% to
    # ~12-30% of a core, measured 2026-11-23): measuring then is not the steady state.
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of load before measuring")
    parser.add_argument("--work-dir", type=Path, default=Path("var/bench/freshness"))
    parser.add_argument("--name", default="freshness")
    args = parser.parse_args()

    model_dir = ensure_model(args.work_dir.resolve() / "model", args.users, args.items)
    # A fresh broker, shard and state every run: a previous run's topics would leave a backlog
    # of user-updates (and its consumer offsets) for this run's worker to work through first.
    shutil.rmtree(args.work_dir / "run", ignore_errors=True)
    with LocalStack(args.work_dir / "run", model_dir, partitions=2) as stack:
        assert stack.bootstrap is not None
        load = Load(stack.bootstrap, stack.env().get("RECSYS_TOPICS__ACTIONS", "actions"), args.users, args.items, args.rate)
        loader = threading.Thread(target=load.run, daemon=True)
        loader.start()
        time.sleep(args.warmup)
        prober = Prober(stack.grpc_target, load, poll_every_s=args.poll_ms / 1000.0,
                        sample_every_s=args.sample_ms / 1000.0)
        watcher = threading.Thread(target=prober.run, daemon=True)
        sent_before = load.sent
        started, since_ms, cpu0 = time.perf_counter(), int(time.time() * 1000), cpu_snapshot()
        watcher.start()
        time.sleep(args.seconds)
        elapsed, until_ms, cpu = time.perf_counter() - started, int(time.time() * 1000), cpu_window(cpu0, cpu_snapshot())
        achieved = (load.sent - sent_before) / elapsed
        prober.stop.set()
        watcher.join()
        load.stop.set()
        loader.join()
        stack.check_alive()
        stages = stage_times(stack.bootstrap, since_ms, until_ms)
    latencies = [s.latency_ms for s in prober.samples]
    missed = prober.missed
    to_generated = [s.to_generated_ms for s in prober.samples]
    if not latencies:
        raise SystemExit(f"no sampled action became visible within 10 s ({missed} missed): the worker cannot keep up "
                         f"with {args.rate:.0f} events/s here; see {stack.work_dir / 'logs'}")
    metrics = {
        "events_per_s": round(achieved, 1),
        "users": args.users,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p90_ms": round(float(np.percentile(latencies, 90)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "max_ms": round(max(latencies), 1),
        "mean_ms": round(statistics.fmean(latencies), 1),
        "samples": len(latencies),
        # produce -> the worker's generated_at (streams + worker), and the rest (topic, server, probe)
        "p50_to_generated_ms": round(float(np.percentile(to_generated, 50)), 1),
        "p99_to_generated_ms": round(float(np.percentile(to_generated, 99)), 1),
        "p50_generated_to_served_ms": round(float(np.percentile(np.subtract(latencies, to_generated), 50)), 1),
        "missed_10s": missed,
        "poll_errors": prober.poll_errors,
        "items": args.items,
        "seconds": args.seconds,
        **stages,
        **cpu,
        "poll_ms": args.poll_ms,
        "sample_ms": args.sample_ms,
    }
    plot(latencies, RESULTS_DIR / f"{args.name}.png",
         f"{args.users:,} users, {achieved:.0f} events/s: p50 {metrics['p50_ms']} ms, p99 {metrics['p99_ms']} ms")
    print(write_result(args.name, metrics))
    print(metrics)


if __name__ == "__main__":
    main()
