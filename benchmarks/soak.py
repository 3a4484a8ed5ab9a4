"""Soak: steady load on the whole system for a bounded time; do memory and latency drift?

The real processes of recsys.local_stack (Kafka broker, Faust worker, ONNX Runtime worker with
Qdrant Edge, gRPC server) take a steady stream of actions (default 100 events/s from 10,000
users, a rate this machine keeps up with, so a backlog does not pass for a leak). Every
`--sample-s` seconds the script records the resident memory (RSS) of each process group and
probes freshness: the time from producing an action to GetCandidates serving lists built from
it. After a warm-up, it compares the first and the last window (each a fifth of the measured
time) and fits a line through every sample:

    rss_<proc>_first_mb, rss_<proc>_last_mb, rss_<proc>_ratio, rss_<proc>_slope_mb_per_min
    fresh_p50_first_ms, fresh_p50_last_ms, fresh_p50_ratio, fresh_p99_first_ms, ..., fresh_slope_ms_per_min

Not part of the test suite (ten minutes by default); run it under the shared benchmark lock:

    flock /tmp/recsys-bench.lock python -m benchmarks.soak            # 10 minutes
    python -m benchmarks.soak --minutes 2 --no-save                   # a quick look
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.freshness import Load, Prober, ensure_model
from benchmarks.results_io import RESULTS_DIR, write_result
from recsys.local_stack import LocalStack

PROCESSES = ("broker", "streams", "worker", "serve")


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in process group ``pgid`` (MB), read from /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total / 1024.0


def pgids(stack: LocalStack) -> dict[str, int]:
    out = {name: os.getpgid(s.proc.pid) for name, s in stack.services.items() if s.proc is not None and s.running}
    if stack.broker is not None and (pid := stack.broker.pid()) is not None:
        out["broker"] = os.getpgid(pid)
    return out


def slope_per_min(t_s: list[float], values: list[float]) -> float:
    if len(t_s) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(t_s) / 60.0, np.asarray(values), 1)[0])


def summarise(samples: list[dict[str, float]], latencies: list[tuple[float, float]], measured_from: float,
              window_s: float) -> dict[str, float]:
    """First vs last window and a fitted slope for every RSS series and the freshness latency."""
    metrics: dict[str, float] = {}
    kept = [s for s in samples if s["t"] >= measured_from]
    end = max(s["t"] for s in kept)
    first = [s for s in kept if s["t"] < measured_from + window_s]
    last = [s for s in kept if s["t"] > end - window_s]
    for proc in PROCESSES:
        series = [(s["t"], s[proc]) for s in kept if proc in s]
        if not series:
            continue
        a = float(np.median([s[proc] for s in first if proc in s]))
        b = float(np.median([s[proc] for s in last if proc in s]))
        metrics[f"rss_{proc}_first_mb"] = round(a, 1)
        metrics[f"rss_{proc}_last_mb"] = round(b, 1)
        metrics[f"rss_{proc}_ratio"] = round(b / a, 3) if a else 0.0
        metrics[f"rss_{proc}_slope_mb_per_min"] = round(slope_per_min(*map(list, zip(*series))), 3)
    lat = [(t, ms) for t, ms in latencies if t >= measured_from]
    lat_first = [ms for t, ms in lat if t < measured_from + window_s]
    lat_last = [ms for t, ms in lat if t > end - window_s]
    for q in (50, 99):
        a, b = float(np.percentile(lat_first, q)), float(np.percentile(lat_last, q))
        metrics[f"fresh_p{q}_first_ms"] = round(a, 1)
        metrics[f"fresh_p{q}_last_ms"] = round(b, 1)
        metrics[f"fresh_p{q}_ratio"] = round(b / a, 3)
    metrics["fresh_slope_ms_per_min"] = round(slope_per_min([t for t, _ in lat], [ms for _, ms in lat]), 2)
    metrics["fresh_samples"] = len(lat)
    return metrics


def plot(samples: list[dict[str, float]], latencies: list[tuple[float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for proc in PROCESSES:
        pts = [(s["t"] / 60, s[proc]) for s in samples if proc in s]
        if pts:
            top.plot(*zip(*pts), label=proc)
    top.set_ylabel("RSS (MB)")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title)
    if latencies:
        t, ms = zip(*latencies)
        bottom.plot(np.asarray(t) / 60, ms, ".", markersize=2, color="#4477aa")
    bottom.set_ylabel("produce -> served (ms)")
    bottom.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the steady load (default 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--warmup-s", type=float, default=None, help="not compared (default: 10%% of the run, <= 60 s)")
    parser.add_argument("--work-dir", type=Path, default=Path("var/bench/soak"))
    parser.add_argument("--no-save", action="store_true", help="print, do not write benchmarks/results/soak.json")
    args = parser.parse_args()

    duration = args.minutes * 60
    warmup = args.warmup_s if args.warmup_s is not None else min(60.0, 0.1 * duration)
    window = (duration - warmup) / 5
    model_dir = ensure_model(args.work_dir.resolve() / "model", args.users, args.items)
    samples: list[dict[str, float]] = []
    with LocalStack(args.work_dir / "run", model_dir, partitions=2) as stack:
        assert stack.bootstrap is not None
        load = Load(stack.bootstrap, "actions", args.users, args.items, args.rate)
        loader = threading.Thread(target=load.run, daemon=True)
        loader.start()
        groups = pgids(stack)
        prober = Prober(stack.grpc_target, load)
        watcher = threading.Thread(target=prober.run, daemon=True)
        start = time.perf_counter()
        watcher.start()
        while (now := time.perf_counter()) - start < duration:
            samples.append({"t": now - start, **{name: group_rss_mb(g) for name, g in groups.items()}})
            time.sleep(max(0.0, start + len(samples) * args.sample_s - time.perf_counter()))
        prober.stop.set()
        watcher.join()
        latencies = [(s.sent_at - start, s.latency_ms) for s in prober.samples]
        missed = prober.missed
        sent = load.sent
        load.stop.set()
        loader.join()
        stack.check_alive()
    metrics = {
        "minutes": args.minutes, "events_per_s": round(sent / duration, 1), "users": args.users,
        "warmup_s": warmup, "window_s": round(window, 1), "rss_samples": len(samples), "fresh_missed_10s": missed,
        **summarise(samples, latencies, warmup, window),
    }
    print(metrics)
    if not args.no_save:
        plot(samples, latencies, RESULTS_DIR / "soak.png",
             f"soak: {args.minutes:g} min at {metrics['events_per_s']:.0f} events/s, {args.users:,} users")
        print(write_result("soak", metrics))


if __name__ == "__main__":
    main()
