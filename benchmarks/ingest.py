"""Ingest throughput: events/s through the Faust `sequences` table, beside a bare consumer.

    python -m benchmarks.ingest                       # 200k events, 10k users, 4 partitions, 3 repeats
    python -m benchmarks.ingest --events 50000 --repeats 1 --profile var/profile --profile-only
    python -m benchmarks.ingest --replot              # redraw ingest.png from ingest.json

What runs (all real, on this machine):
1. a local Kafka broker (recsys.kafka_broker) and one `actions` topic holding `--events`
   synthetic events (streams.synthetic) over `--users` users, produced before anything reads;
2. the ceiling: a bare aiokafka consumer (the client under Faust, with the fetch settings the
   Faust worker gives it) reading the whole topic from the beginning and counting records,
   nothing else;
3. the worker: `python -m recsys streams` (the production entry point, unchanged), a fresh
   app id per run so that it starts from the first event with an empty table, timed from
   the first event it reports on `/metrics` to the last (decode, validate, fold into the
   table, changelog, coalesced user-updates, commits: everything it does in production);
4. the same worker with `streams.delivery=stream` (Faust's own per-event stream path) over
   the first `--stream-events` events, for comparison.

They run back to back within each repeat (same topic, same broker, same machine moment); the
result is the median over the repeats of each figure and of the per-repeat ratio. Events/s
on this shared 2-core machine move with everybody's load, so the CPU time per event of the
worker process and of the bare consumer is reported too (`cpu_us_per_event`,
`raw_consumer_cpu_us_per_event`, `cpu_ratio`): what the ratio would be with a core each.

Writes benchmarks/results/ingest.json (medians, every repeat, the setup, the load average)
and ingest.png. With `--profile DIR` one more worker run is sampled with py-spy (only
threads holding the GIL, i.e. Python's CPU time) and DIR gets the raw stacks (`faust.txt`,
for speedscope / flamegraph tools) and `top.txt` (hottest functions by own and total
samples), which benchmarks/sections/ingest.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.results_io import RESULTS_DIR, py_spy, write_result
from recsys.kafka_broker import LocalBroker, free_port
from recsys.settings import KafkaSettings, Settings
from streams.app import read_counters
from streams.produce import ensure_topic, produce
from streams.schema import now_ms
from streams.synthetic import synthetic_events

ROOT = Path(__file__).resolve().parents[1]
TARGET_EVENTS_PER_S = 20_000
TARGET_RATIO = 0.5


# ---------------------------------------------------------------- the ceiling


async def raw_consume(bootstrap: str, topic: str, n_events: int, settings: Settings) -> tuple[float, float]:
    """Events/s of a bare aiokafka consumer reading `topic` whole (fetch and count, no
    processing), and its CPU time per event in microseconds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.app import create_app

    conf = create_app(settings).conf  # the fetch settings the Faust worker gives its consumer
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=conf.broker_max_poll_records,
        max_partition_fetch_bytes=conf.consumer_max_fetch_size,
        fetch_max_wait_ms=1500,
        check_crcs=conf.broker_check_crcs,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen, first, cpu = 0, None, 0.0
        while seen < n_events:
            batches = await consumer.getmany(timeout_ms=1000)
            got = sum(len(records) for records in batches.values())
            if got and first is None:
                # The clock starts at the first batch, as the worker's does at its first event.
                first, cpu, seen = time.perf_counter(), time.process_time(), 0
            seen += got
        assert first is not None
        return seen / (time.perf_counter() - first), 1e6 * (time.process_time() - cpu) / seen
    finally:
        await consumer.stop()


# ---------------------------------------------------------------- the Faust worker


class WorkerRun:
    """One `python -m recsys streams` process with its own app id and output topics."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, tmp: Path, extra_env: dict[str, str]) -> None:
        self.name = f"ingest-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.dir = tmp / self.name
        self.dir.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
        self.env.update(
            RECSYS_KAFKA__BOOTSTRAP_SERVERS=bootstrap,
            RECSYS_KAFKA__PARTITIONS=str(partitions),
            RECSYS_STREAMS__APP_ID=self.name,
            RECSYS_STREAMS__DATA_DIR=str(self.dir / "data"),
            RECSYS_STREAMS__WEB_PORT=str(self.port),
            RECSYS_STREAMS__LOGLEVEL="warning",
            RECSYS_TOPICS__ACTIONS=topic,
            RECSYS_TOPICS__DLQ=f"{self.name}.dlq",
            RECSYS_TOPICS__USER_UPDATES=f"{self.name}.user-updates",
        )
        self.env.update(extra_env)
        self.log = self.dir / "worker.log"

    def counts(self, proc: subprocess.Popen[bytes]) -> dict[str, float] | None:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}: {self.log.read_text()[-3000:]}")
        return read_counters(self.port)

    def run(self, n_events: int, poll_s: float, timeout_s: float, prefix: list[str] | None = None) -> dict[str, Any]:
        """Start the worker, time it through all `n_events`, stop it with SIGTERM; its figures."""
        cmd = [*(prefix or []), sys.executable, "-m", "recsys", "streams"]
        with self.log.open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            samples: list[tuple[float, int, float]] = []  # (time, events done, worker CPU seconds)
            deadline = time.monotonic() + timeout_s
            last: dict[str, float] = {}
            while True:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not take {n_events} events in {timeout_s} s: {samples[-3:]}")
                m = self.counts(proc)
                t = time.perf_counter()
                if m is not None:
                    last = m
                    done = int(sum(v for k, v in m.items() if k.startswith(("recsys_streams_events_total",
                                                                             "recsys_streams_invalid_total"))))
                    if done:
                        samples.append((t, done, _cpu_seconds(proc.pid)))
                    if done >= n_events:
                        break
                time.sleep(poll_s)
        finally:
            # Under py-spy (a prefix) the worker is its child: stop the worker, py-spy then
            # writes its profile and exits by itself.
            for pid in (_children(proc.pid) if prefix else []) or [proc.pid]:
                os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Rate between the first sample that saw events and the first that saw them all.
        (t0, n0, c0), (t1, n1, c1) = samples[0], samples[-1]
        rate = (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")
        return {
            "events_per_s": rate,
            "cpu_us_per_event": 1e6 * (c1 - c0) / max(n1 - n0, 1),
            "updates": int(last.get("recsys_streams_updates_total", 0)),
            "windows": int(last.get("recsys_streams_windows_total", 0)),
            "invalid": int(sum(v for k, v in last.items() if k.startswith("recsys_streams_invalid_total"))),
            "measured_events": n1 - n0,
        }


# ---------------------------------------------------------------- the profile


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; clock ticks of 10 ms)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def summarise_profile(raw: Path, out: Path, top: int = 25) -> str:
    """The hottest functions of py-spy's raw (collapsed) stacks, by own and by total samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    n = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        n += c
        frames = stack.split(";")
        own[frames[-1]] += c
        for frame in set(frames):
            total[frame] += c
    lines = [f"{n} samples", "", "own (self) time:"]
    lines += [f"  {100 * c / n:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines += ["", "total (inclusive) time:"]
    lines += [f"  {100 * c / n:5.1f}%  {f}" for f, c in total.most_common(top)]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


# ---------------------------------------------------------------- main


def plot(repeats: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("raw_consumer_events_per_s", "bare aiokafka consumer (ceiling)"),
              ("events_per_s", "worker, window delivery (default)"),
              ("stream_delivery_events_per_s", "worker, stock Faust stream delivery")]  # fmt: skip
    series = [(k, label) for k, label in series if k in repeats[0]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(1, len(repeats) + 1)]
        bars = ax.bar(xs, [r[key] for r in repeats], width, label=label)
        ax.bar_label(bars, labels=[f"{r[key] / 1000:.0f}k" if r[key] >= 1000 else f"{r[key]:.0f}" for r in repeats],
                     fontsize=7)
    ax.axhline(TARGET_EVENTS_PER_S, color="grey", linestyle=":", label=f"target {TARGET_EVENTS_PER_S:,} events/s")
    ax.set(xlabel="repeat (each: the three back to back, same topic)", ylabel="events/s (log)", yscale="log",
           title="Ingest through the sequences table, one worker, 2 shared cores", xticks=range(1, len(repeats) + 1),
           ylim=(1_000, 30 * max(r["raw_consumer_events_per_s"] for r in repeats)))
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events in the topic")
    parser.add_argument("--users", type=int, default=10_000, help="distinct users in the events")
    parser.add_argument("--items", type=int, default=20_000, help="distinct items in the events")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the actions topic")
    parser.add_argument("--repeats", type=int, default=3, help="raw-consumer / worker pairs measured")
    parser.add_argument("--stream-events", type=int, default=30_000,
                        help="per repeat, also time stock Faust delivery (streams.delivery=stream) over this many "
                             "events (0: not)")
    parser.add_argument("--poll-s", type=float, default=0.1, help="how often the worker's /metrics is read")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per worker run")
    parser.add_argument("--profile", type=Path, help="also sample one worker run with py-spy into this folder")
    parser.add_argument("--profile-only", action="store_true", help="only the profiled run; writes no result")
    parser.add_argument("--no-save", action="store_true", help="print the result, write no JSON / PNG")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting a local broker")
    parser.add_argument("--topic", help="with --bootstrap: an actions topic filled by an earlier run (--keep)")
    parser.add_argument("--keep", action="store_true", help="print the topic and leave it (for --topic)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="extra environment for the worker (e.g. RECSYS_STREAMS__MAX_BATCH_EVENTS=5000)")
    parser.add_argument("--replot", action="store_true", help="redraw ingest.png from ingest.json, run nothing")
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads((RESULTS_DIR / "ingest.json").read_text())
        keys = ("raw_consumer_events_per_s", "events_per_s", "stream_delivery_events_per_s")
        plot([{k: saved[f"{k}_r{i}"] for k in keys if f"{k}_r{i}" in saved} for i in range(1, saved["repeats"] + 1)],
             RESULTS_DIR / "ingest.png")
        return 0
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = None
        if args.bootstrap is None:
            broker = LocalBroker(KafkaSettings(data_dir=tmp / "kafka", port=free_port(), controller_port=free_port(),
                                               partitions=args.partitions))
        try:
            bootstrap = args.bootstrap or broker.start()  # type: ignore[union-attr]
            if args.topic:
                topic = args.topic
            else:
                topic = f"ingest-bench-{uuid.uuid4().hex[:8]}"
                ensure_topic(bootstrap, topic, args.partitions)
                started = time.perf_counter()
                step_ms = 1
                events = synthetic_events(args.events, args.users, args.items, seed=0,
                                          start_ts_ms=now_ms() - args.events * step_ms, step_ms=step_ms)
                produce(events, bootstrap, topic, progress=False)
                print(f"topic {topic}: {args.events} events in {time.perf_counter() - started:.1f} s", flush=True)
            settings = Settings(kafka={"bootstrap_servers": bootstrap, "partitions": args.partitions})

            def worker_run(prefix: list[str] | None = None, env: dict[str, str] | None = None,
                           n_events: int = args.events) -> dict[str, Any]:
                return WorkerRun(bootstrap, topic, args.partitions, tmp, {**extra_env, **(env or {})}).run(
                    n_events, args.poll_s, args.timeout_s, prefix)

            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                spy = py_spy()
                raw = args.profile.resolve() / "faust.txt"
                result = worker_run([spy, "record", "--rate", "250", "--format", "raw", "--nonblocking", "--gil",
                                     "-o", str(raw), "--"])
                print(f"profiled run: {result['events_per_s']:.0f} events/s (slowed by sampling)", flush=True)
                print(summarise_profile(raw, args.profile / "top.txt"), flush=True)
                if args.profile_only:
                    return 0

            repeats: list[dict[str, Any]] = []
            for i in range(args.repeats):
                raw_rate, raw_cpu = asyncio.run(raw_consume(bootstrap, topic, args.events, settings))
                worker = worker_run()
                row = {"raw_consumer_events_per_s": raw_rate, **worker, "raw_consumer_cpu_us_per_event": raw_cpu,
                       "ratio": worker["events_per_s"] / raw_rate,
                       "cpu_ratio": raw_cpu / worker["cpu_us_per_event"], "loadavg_1m": os.getloadavg()[0]}
                if args.stream_events:
                    # The same worker on Faust's own per-event path, over the topic's first events.
                    stock = worker_run(env={"RECSYS_STREAMS__DELIVERY": "stream"}, n_events=args.stream_events)
                    row.update(stream_delivery_events_per_s=stock["events_per_s"],
                               stream_delivery_cpu_us_per_event=stock["cpu_us_per_event"])
                repeats.append(row)
                print(f"repeat {i + 1}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in row.items()), flush=True)
        finally:
            if broker is not None:
                broker.destroy()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in repeats)

    metrics: dict[str, Any] = {
        "events_per_s": round(median("events_per_s")),
        "raw_consumer_events_per_s": round(median("raw_consumer_events_per_s")),
        "ratio": round(median("ratio"), 3),
        # CPU per event of each (load-independent, unlike events/s on a shared machine); cpu_ratio
        # = raw consumer's / worker's, what `ratio` would be if each had a core to itself
        "cpu_us_per_event": round(median("cpu_us_per_event"), 1),
        "raw_consumer_cpu_us_per_event": round(median("raw_consumer_cpu_us_per_event"), 2),
        "cpu_ratio": round(median("cpu_ratio"), 4),
        "events_per_cpu_s": round(1e6 / median("cpu_us_per_event")),
        **({"stream_delivery_events_per_s": round(median("stream_delivery_events_per_s")),
            "stream_delivery_cpu_us_per_event": round(median("stream_delivery_cpu_us_per_event"), 1),
            "stream_delivery_events": args.stream_events} if args.stream_events else {}),
        "meets_target": int(median("events_per_s") >= TARGET_EVENTS_PER_S and median("ratio") >= TARGET_RATIO),
        "events": args.events, "users": args.users, "partitions": args.partitions, "repeats": args.repeats,
        "updates_per_event": round(statistics.median(r["updates"] / args.events for r in repeats), 3),
        "events_per_window": round(statistics.median(args.events / max(r["windows"], 1) for r in repeats), 1),
        "worker_env": extra_env,
        "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }
    for i, r in enumerate(repeats, 1):
        metrics[f"events_per_s_r{i}"] = round(r["events_per_s"])
        metrics[f"raw_consumer_events_per_s_r{i}"] = round(r["raw_consumer_events_per_s"])
        metrics[f"ratio_r{i}"] = round(r["ratio"], 3)
        if "stream_delivery_events_per_s" in r:
            metrics[f"stream_delivery_events_per_s_r{i}"] = round(r["stream_delivery_events_per_s"])
    command = shlex.join(["python", "-m", "benchmarks.ingest", *(sys.argv[1:] if argv is None else argv)])
    if args.no_save:
        print(json.dumps(metrics, indent=2))
        return 0
    path = write_result("ingest", metrics, command=command)
    plot(repeats, RESULTS_DIR / "ingest.png")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
