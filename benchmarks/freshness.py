"""Freshness: time from producing an action to its new candidates being served over gRPC.

The whole system runs as real processes (recsys.local_stack: Kafka, Faust worker, ONNX
Runtime worker with Qdrant Edge, gRPC server). A producer thread sends a steady stream of
synthetic actions from many users; a probe thread repeatedly takes the action just sent and
polls GetCandidates for that user until the served list's source_event_ts reaches the
action's time. The latency is produce -> visible, as a user of the system would see it.

    python -m benchmarks.freshness --users 10000 --rate 500 --seconds 60
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from kafka import KafkaProducer

from benchmarks.results_io import RESULTS_DIR, write_result
from recsys.local_stack import LocalStack
from recsys.settings import Settings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from streams.schema import encode_event
from streams.synthetic import synthetic_events


def ensure_model(model_dir: Path, users: int, items: int) -> Path:
    if (model_dir / "meta.json").exists():
        return model_dir
    from inference.train import train_small_demo_model

    events = [e.to_wire() for e in synthetic_events(min(users * 5, 60_000), users, items, seed=11)]
    return train_small_demo_model(events, Settings(), model_dir, max_seconds=60)


class Load:
    """A steady stream of actions; remembers the newest (user, ts, sent-at) for the probe."""

    def __init__(self, bootstrap: str, topic: str, users: int, items: int, rate: float) -> None:
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks=1)
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


def sample_once(stub: pb_grpc.CandidatesStub, load: Load, timeout_s: float) -> tuple[float, float] | None:
    """Poll GetCandidates for the newest action sent until the served list reflects it: (ms
    from produce to served, ms from the action's ts to the worker's `generated_at`: streams +
    worker; the rest is the candidates topic, the server and this polling), or None if it did
    not become visible within ``timeout_s`` (or nothing was sent yet)."""
    if load.latest is None:
        return None
    user, ts, sent_at = load.latest
    request = pb.GetCandidatesRequest(user_id=user, surface="home", limit=10)
    while True:
        reply = stub.GetCandidates(request, timeout=2.0)
        now = time.perf_counter()
        if reply.source_event_ts_ms >= ts and not reply.is_fallback:
            return (now - sent_at) * 1000, float(reply.generated_at_ms - ts)
        if now - sent_at > timeout_s:
            return None
        time.sleep(0.002)


def probe(target: str, load: Load, stop: threading.Event, timeout_s: float) -> tuple[list[float], int, list[float]]:
    """Latencies (ms) of sampled actions, how many never became visible in time, and for each
    visible one its produce -> generated_at part (see `sample_once`)."""
    latencies: list[float] = []
    to_generated: list[float] = []
    missed = 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.CandidatesStub(channel)
        while not stop.is_set():
            if load.latest is None:
                time.sleep(0.01)
                continue
            sample = sample_once(stub, load, timeout_s)
            if sample is None:
                missed += 1
            else:
                latencies.append(sample[0])
                to_generated.append(sample[1])
            time.sleep(0.02)
    return latencies, missed, to_generated


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
    parser.add_argument("--probes", type=int, default=3, help="probe threads sampling actions side by side")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
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
        stop = threading.Event()
        results: list[tuple[list[float], int, list[float]]] = []
        # A few probes side by side: more sampled actions per run (each waits for its own).
        probers = [threading.Thread(target=lambda: results.append(probe(stack.grpc_target, load, stop, 10.0)))
                   for _ in range(args.probes)]
        sent_before = load.sent
        started = time.perf_counter()
        for prober in probers:
            prober.start()
        time.sleep(args.seconds)
        stop.set()
        for prober in probers:
            prober.join()
        elapsed = time.perf_counter() - started
        achieved = (load.sent - sent_before) / elapsed
        load.stop.set()
        loader.join()
        stack.check_alive()
    latencies = [ms for r in results for ms in r[0]]
    missed = sum(r[1] for r in results)
    to_generated = [ms for r in results for ms in r[2]]
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
        "items": args.items,
        "seconds": args.seconds,
    }
    plot(latencies, RESULTS_DIR / f"{args.name}.png",
         f"{args.users:,} users, {achieved:.0f} events/s: p50 {metrics['p50_ms']} ms, p99 {metrics['p99_ms']} ms")
    print(write_result(args.name, metrics))
    print(metrics)


if __name__ == "__main__":
    main()
