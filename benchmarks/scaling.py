"""Scaling: freshness and throughput of the whole stack from 1,000 to 100,000 users, and with
one partition / one inference worker vs two partitions / two workers.

Each configuration starts a fresh stack of real processes (recsys.local_stack: Kafka, the Faust
worker, the ONNX Runtime worker(s) with Qdrant Edge, the gRPC server), offers the same steady
load (--rate actions/s spread over the configuration's users), and measures, as
benchmarks/freshness.py does, produce -> new candidates served over gRPC for sampled actions,
plus the stack's throughput over the window: actions taken in by the broker and candidates
records written by the worker(s) per second (end offsets of the two topics).

A second worker needs its own Qdrant Edge shard (one process per shard directory), so it gets
a copy of the index in a directory of its own and does not follow `items`.

    python -m benchmarks.scaling                      # 1k, 10k, 100k users x 1 worker; 10k, 100k x 2
    python -m benchmarks.scaling --replot             # the PNG again from scaling.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.freshness import Load, Prober, ensure_model
from benchmarks.results_io import RESULTS_DIR, cpu_snapshot, cpu_window, write_result
from recsys.local_stack import LocalStack
from recsys.processes import Service, settings_env

USERS = [1_000, 10_000, 100_000]
TWO_WORKERS = [10_000, 100_000]  # user counts also run with 2 partitions / 2 workers


def end_offsets(bootstrap: str, topic: str) -> int:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return int(sum(consumer.end_offsets(tps).values()))
    finally:
        consumer.close()


def run_config(work: Path, model_dir: Path, users: int, workers: int, rate: float, items: int,
               warmup_s: float, seconds: float) -> dict[str, Any]:
    run_dir = work / f"u{users}-w{workers}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh broker: no earlier backlog
    with LocalStack(run_dir, model_dir, partitions=workers) as stack:
        assert stack.bootstrap is not None
        for extra in range(1, workers):  # more workers in the group, each with its own shard
            env = {**stack.env(), **settings_env({"vector_store.path": run_dir / f"qdrant-{extra}"})}
            index = Service(f"index-{extra}", ["index"], env, run_dir / "logs").start()
            if index.proc is None or index.proc.wait(300) != 0:
                raise RuntimeError(f"indexing for worker {extra} failed:\n{index.log_tail()}")
            stack.services[f"worker-{extra}"] = Service(f"worker-{extra}", ["worker", "--no-follow-items"], env,
                                                        run_dir / "logs").start()
        load = Load(stack.bootstrap, "actions", users, items, rate)
        threading.Thread(target=load.run, daemon=True).start()
        time.sleep(warmup_s)
        prober = Prober(stack.grpc_target, load)
        watcher = threading.Thread(target=prober.run, daemon=True)
        actions0, cands0 = end_offsets(stack.bootstrap, "actions"), end_offsets(stack.bootstrap, "candidates")
        started, cpu0 = time.perf_counter(), cpu_snapshot()
        watcher.start()
        time.sleep(seconds)
        actions1, cands1 = end_offsets(stack.bootstrap, "actions"), end_offsets(stack.bootstrap, "candidates")
        elapsed, cpu = time.perf_counter() - started, cpu_window(cpu0, cpu_snapshot())
        prober.stop.set()
        watcher.join()
        load.stop.set()
        stack.check_alive()
    latencies, missed = [s.latency_ms for s in prober.samples], prober.missed
    row: dict[str, Any] = {
        "users": users, "workers": workers, "partitions": workers,
        "events_per_s": round((actions1 - actions0) / elapsed, 1),
        "candidates_per_s": round((cands1 - cands0) / elapsed, 1),
        "samples": len(latencies), "missed_10s": missed, **cpu,
    }
    if latencies:
        row |= {f"p{q}_ms": round(float(np.percentile(latencies, q)), 1) for q in (50, 90, 99)}
    return row


def rows_from_flat(flat: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-configuration rows back from scaling.json's flat keys (`<metric>_<N>k_w<W>`)."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for key, value in flat.items():
        head, sep, workers = key.rpartition("_w")
        if not sep or not workers.isdigit() or "_" not in head:
            continue
        metric, _, users = head.rpartition("_")
        if users.endswith("k") and users[:-1].isdigit():
            row = rows.setdefault((int(users[:-1]) * 1000, int(workers)), {"users": int(users[:-1]) * 1000, "workers": int(workers)})
            row[metric] = value
    return [rows[k] for k in sorted(rows, key=lambda k: (k[1], k[0]))]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for workers, marker in ((1, "o"), (2, "s")):
        mine = [r for r in rows if r["workers"] == workers and "p99_ms" in r]
        if not mine:
            continue
        users = [r["users"] for r in mine]
        label = f"{workers} partition{'s' if workers > 1 else ''} / worker{'s' if workers > 1 else ''}"
        a.plot(users, [r["p99_ms"] for r in mine], marker=marker, label=f"p99, {label}")
        a.plot(users, [r["p50_ms"] for r in mine], marker=marker, linestyle="--", label=f"p50, {label}")
        b.plot(users, [r["candidates_per_s"] for r in mine], marker=marker, label=f"candidates written/s, {label}")
        b.plot(users, [r["events_per_s"] for r in mine], marker=marker, linestyle=":", label=f"actions taken/s, {label}")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("users sending actions")
        ax.legend(fontsize=7)
    a.set_ylabel("produce -> served over gRPC (ms)")
    a.axhline(1000, color="grey", linewidth=0.5)
    b.set_ylabel("per second")
    fig.suptitle("Scaling on the shared 2-core machine (steady offered load)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", default=",".join(map(str, USERS)))
    p.add_argument("--two-workers", default=",".join(map(str, TWO_WORKERS)), help="user counts also run with 2 workers")
    p.add_argument("--rate", type=float, default=500.0, help="offered actions/s")
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--warmup", type=float, default=60.0, help="seconds of load before measuring (see freshness.py)")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--work-dir", type=Path, default=Path("var/bench/scaling"))
    p.add_argument("--replot", action="store_true")
    args = p.parse_args()
    if args.replot:
        plot(rows_from_flat(json.loads((RESULTS_DIR / "scaling.json").read_text())), RESULTS_DIR / "scaling.png")
        return
    # The freshness benchmark's model (10,000 users, 2,000 items): users are not model inputs.
    model_dir = ensure_model(Path("var/bench/freshness/model").resolve(), 10_000, args.items)
    configs = [(int(u), 1) for u in args.users.split(",") if u] + [(int(u), 2) for u in args.two_workers.split(",") if u]
    rows = []
    for users, workers in configs:
        row = run_config(args.work_dir.resolve(), model_dir, users, workers, args.rate, args.items, args.warmup, args.seconds)
        print(row, flush=True)
        rows.append(row)
    metrics: dict[str, Any] = {}
    for r in rows:
        tag = f"_{r['users'] // 1000}k_w{r['workers']}"
        metrics |= {f"{k}{tag}": v for k, v in r.items() if k not in ("users", "workers", "partitions")}
    metrics |= {"rate": args.rate, "items": args.items, "seconds": args.seconds}
    plot(rows, RESULTS_DIR / "scaling.png")
    print(write_result("scaling", metrics, command="python -m benchmarks.scaling " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("users", args.users), ("two_workers", args.two_workers),
                                                    ("rate", args.rate), ("warmup", args.warmup),
                                                    ("seconds", args.seconds)))))


if __name__ == "__main__":
    main()
