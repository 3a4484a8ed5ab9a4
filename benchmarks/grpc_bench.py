"""GetCandidates throughput and latency under ghz, side by side with a grpc.aio echo ceiling.

    python -m benchmarks.grpc_bench                     # workers 1,2 x concurrency 4,8,16; ~6 min
    python -m benchmarks.grpc_bench --workers 2 --duration 5

What runs (all real, on this machine):
1. a local Kafka broker (recsys.kafka_broker) with a compacted `candidates` topic holding
   `--users` users x 3 surfaces x `--items` items, written as the inference worker writes it;
2. `recsys serve --workers W` (W processes sharing the port with SO_REUSEPORT), each reading
   the topic whole before it reports SERVING: the production entry point, unchanged;
3. ghz (a Go gRPC load generator, not ours; pinned GHZ_VERSION, installed with `go install`
   into the cache dir when missing) asking GetCandidates(limit = `--limit`) for every
   (user, surface) pair in turn, `--concurrency` calls in flight on `--connections` connections;
4. the same ghz run against benchmarks/grpc/echo_server.py with the same W: the same service
   answering with no work at all, i.e. the cost of Python gRPC itself: the ceiling (`echo_*`);
   and again with answers of the same size (a prebuilt list of `--limit` candidates), so that
   transport and ghz's decoding cost the same as for GetCandidates (`sized_echo_*`): what is
   left between that and GetCandidates is our lookup and encoding.

Writes benchmarks/results/grpc.json: the headline `qps`, `p50_ms`, `p99_ms`, `echo_qps`,
`ratio` (= qps / echo_qps) of the run (workers W, concurrency c) with the most q/s whose p99 is
within `--p99-target-ms` (else the most q/s); the CPU per call of the server, of the echo and of
ghz itself (`cpu_us_per_call`, ...; on a shared machine CPU per call moves far less than q/s,
and `cpu_ratio` = echo / serve is the load-independent ratio); `machine_bound_qps` = cores /
(server + ghz CPU per call); every run as `<metric>_w<W>_c<c>`; and grpc.png.
ghz shares the cores with the servers (GOMAXPROCS = `--ghz-cpus`), as any co-located client
would; the 1-minute load average before and after is recorded because the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import msgpack

from benchmarks.results_io import RESULTS_DIR, write_result
from recsys.kafka_broker import LocalBroker, free_port
from recsys.settings import CACHE_DIR, KafkaSettings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO = PROTO_ROOT / "recsys" / "v1" / "candidates.proto"
METHOD = "recsys.v1.Candidates.GetCandidates"
SURFACES = ("home", "search", "related")
GHZ_MODULE = "github.com/bojand/ghz/cmd/ghz"
GHZ_VERSION = "v0.93.0"  # what `@latest` resolved to on the Go module proxy (2026-11)
CATALOGUE = 12_101  # item ids are drawn from a catalogue of this size (Amazon Beauty's)


def find_ghz() -> Path:
    """ghz from $RECSYS_GHZ, PATH or the cache; otherwise `go install` it into the cache."""
    for candidate in (os.environ.get("RECSYS_GHZ"), shutil.which("ghz"), str(CACHE_DIR / "gobin" / "ghz")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    go = shutil.which("go")
    if go is None:
        raise SystemExit("ghz is not installed and Go is missing: install Go, or set RECSYS_GHZ")
    env = {**os.environ, "GOBIN": str(CACHE_DIR / "gobin"), "GOPATH": str(CACHE_DIR / "go")}
    print(f"installing ghz {GHZ_VERSION} into {env['GOBIN']} ...", flush=True)
    subprocess.run([go, "install", f"{GHZ_MODULE}@{GHZ_VERSION}"], env=env, check=True, cwd=tempfile.gettempdir())
    return CACHE_DIR / "gobin" / "ghz"


def candidates_record(user: int, items: int) -> dict[str, Any]:
    """One user's `candidates` value (the brief's contract), distinct lists per surface."""
    return {
        "user_id": f"user-{user}", "model_version": "bench", "source_event_ts": 1_700_000_000_000 + user,
        "generated_at": 1_700_000_000_100 + user,
        "surfaces": {
            s: {"items": [str(1_000_000 + (user * 7919 + (k + 31 * j) * 104_729) % CATALOGUE) for k in range(items)],
                "scores": [1.0 - k / items for k in range(items)]}
            for j, s in enumerate(SURFACES)
        },
    }


async def fill_topic(bootstrap: str, topic: str, users: int, items: int) -> None:
    from aiokafka import AIOKafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 2, 1, topic_configs={"cleanup.policy": "compact"})])
    admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        for start in range(0, users, 1000):
            sends = [await producer.send(topic, key=f"user-{u}".encode(), value=msgpack.packb(candidates_record(u, items)))
                     for u in range(start, min(users, start + 1000))]
            await asyncio.gather(*sends)
    finally:
        await producer.stop()


class Processes:
    """A command that starts `workers` server processes; ready when each printed `marker`."""

    def __init__(self, argv: list[str], env: dict[str, str], marker: str, workers: int, log: Path) -> None:
        self.log = log
        self.marker, self.workers = marker, workers
        self._out = log.open("w")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.log.read_text().count(self.marker) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server not ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and all its descendants (from /proc).

    Per-call CPU is the robust figure on a shared machine: other tenants' load stretches wall
    time and so q/s, but not the CPU a call costs the server."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime + stime
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def ghz(binary: Path, target: str, data: Path, args: argparse.Namespace, concurrency: int, *, n: int | None = None,
        duration_s: float | None = None) -> dict[str, Any]:
    cmd = [str(binary), "--insecure", "--proto", str(PROTO), "--import-paths", str(PROTO_ROOT), "--call", METHOD,
           "--data-file", str(data), "-c", str(concurrency), "--connections", str(min(concurrency, args.connections)),
           "--cpus", str(args.ghz_cpus), "-O", "json"]
    # -n (a count) for the measured runs: a -z (duration) run ends by closing connections under
    # calls still in flight, which shows up as UNAVAILABLE errors that are ghz's, not the server's.
    cmd += ["-n", str(n)] if n is not None else ["-z", f"{duration_s}s"]
    report = json.loads(subprocess.run([*cmd, target], capture_output=True, text=True, check=True).stdout)
    latency = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    codes = report.get("statusCodeDistribution") or {}
    return {"qps": report["rps"], "p50_ms": latency.get(50, float("nan")), "p99_ms": latency.get(99, float("nan")),
            "count": report["count"], "errors": sum(v for k, v in codes.items() if k != "OK")}


def measure(binary: Path, target: str, requests: list[dict[str, Any]], tmp: Path, args: argparse.Namespace,
            concurrency: int, server_pid: int) -> dict[str, Any]:
    """A warm-up, then the timed run on a freshly started server: the timed run starts where the
    warm-up stopped in the request list, so that its calls ask for lists not served before (the
    server memoises a list's encoding), as long as it asks fewer than the list holds."""
    data = tmp / "requests.json"
    data.write_text(json.dumps(requests))
    warm = ghz(binary, target, data, args, concurrency, duration_s=args.warmup)
    data.write_text(json.dumps(requests[warm["count"] % len(requests):] + requests[: warm["count"] % len(requests)]))
    cpu_before, ghz_before = tree_cpu_seconds(server_pid), _children_cpu_seconds()
    result = ghz(binary, target, data, args, concurrency, n=max(2000, int(warm["qps"] * args.duration)))
    result["repeated_share"] = max(0, warm["count"] + result["count"] - len(requests)) / result["count"]
    result["cpu_us_per_call"] = (tree_cpu_seconds(server_pid) - cpu_before) / result["count"] * 1e6
    # the load generator's own CPU: on 2 shared cores it is what the server cannot have
    result["ghz_cpu_us_per_call"] = (_children_cpu_seconds() - ghz_before) / result["count"] * 1e6
    return result


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished (waited-for) children: the ghz runs
    return usage.ru_utime + usage.ru_stime


def check_served(port: int) -> None:
    """Before timing: the server answers a known user from the topic, not with a fallback."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.CandidatesStub(channel).GetCandidates(
            pb.GetCandidatesRequest(user_id="user-1", surface="home", limit=5), timeout=10)
    assert not reply.is_fallback and len(reply.candidates) == 5, reply


def plot(rows: list[dict[str, Any]], path: Path, target_ms: float) -> None:
    """Throughput-latency curves: one per worker count, GetCandidates solid, echo dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(10, 4.8))
    for workers in sorted({r["workers"] for r in rows}):
        mine = sorted((r for r in rows if r["workers"] == workers), key=lambda r: r["concurrency"])
        (line,) = ax.plot([r["qps"] for r in mine], [r["p99_ms"] for r in mine], "o-",
                          label=f"GetCandidates, {workers} process(es)")
        ax.plot([r["echo_qps"] for r in mine], [r["echo_p99_ms"] for r in mine], "o--", color=line.get_color(),
                alpha=0.6, label=f"echo ceiling, {workers} process(es)")
        ax.plot([r["sized_echo_qps"] for r in mine], [r["sized_echo_p99_ms"] for r in mine], "^:",
                color=line.get_color(), alpha=0.6, label=f"echo, same-size answers, {workers} process(es)")
        for r in mine:
            ax.annotate(f"c={r['concurrency']}", (r["qps"], r["p99_ms"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(target_ms, color="grey", linestyle=":", label=f"p99 target {target_ms} ms")
    ax.axvline(5000, color="grey", linestyle="-.", label="5,000 q/s target")
    ax.set(xlabel="queries/s (ghz)", ylabel="p99 latency (ms)", yscale="log",
           title="GetCandidates vs grpc.aio echo on this machine")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rows_from_result(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-run rows back from grpc.json's `<metric>_w<W>_c<c>` keys (for --replot)."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for key, value in metrics.items():
        name, sep, tag = key.rpartition("_w")
        if not sep or "_c" not in tag:
            continue
        workers, concurrency = (int(x) for x in tag.split("_c"))
        rows.setdefault((workers, concurrency), {"workers": workers, "concurrency": concurrency})[name] = value
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grpc_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="server process counts to measure, comma-separated")
    parser.add_argument("--users", type=int, default=20_000, help="users in the topic: 3x this many lists, more than a run asks for")
    parser.add_argument("--items", type=int, default=100, help="candidates per surface in the topic")
    parser.add_argument("--limit", type=int, default=100, help="candidates asked per request")
    parser.add_argument("--concurrency", default="4,8,16", help="ghz -c values (calls in flight), comma-separated")
    parser.add_argument("--connections", type=int, default=12, help="ghz --connections (spread over processes)")
    parser.add_argument("--ghz-cpus", type=int, default=1, help="GOMAXPROCS of ghz")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (approx.)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run")
    parser.add_argument("--p99-target-ms", type=float, default=5.0)
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting a local broker")
    parser.add_argument("--replot", action="store_true", help="only redraw grpc.png from grpc.json")
    args = parser.parse_args(argv)
    if args.replot:
        plot(rows_from_result(json.loads((RESULTS_DIR / "grpc.json").read_text())), RESULTS_DIR / "grpc.png",
             args.p99_target_ms)
        return 0
    worker_counts = [int(w) for w in args.workers.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    binary = find_ghz()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = None
        if args.bootstrap is None:
            broker = LocalBroker(KafkaSettings(data_dir=tmp / "kafka", port=free_port(),
                                               controller_port=free_port(), partitions=2))
        try:
            bootstrap = args.bootstrap or broker.start()  # type: ignore[union-attr]
            topic = f"candidates-bench-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            asyncio.run(fill_topic(bootstrap, topic, args.users, args.items))
            print(f"topic {topic}: {args.users} users in {time.perf_counter() - started:.1f} s", flush=True)
            # Every (user, surface) pair once, in turn: each list served once, like real traffic (a
            # list is read about once after each update), so the server's memoised encoding is
            # cold: the pessimistic case. Each concurrency gets freshly started servers.
            requests = [{"user_id": f"user-{u}", "surface": s, "limit": args.limit}
                        for s in SURFACES for u in range(args.users)]
            env = {**os.environ, "RECSYS_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "RECSYS_TOPICS__CANDIDATES": topic,
                   "RECSYS_INFERENCE__MODEL_DIR": str(tmp / "no-model")}
            runs: dict[tuple[int, int], dict[str, Any]] = {}
            for workers in worker_counts:
                echo = [sys.executable, "-m", "benchmarks.grpc.echo_server"]
                # The three servers of one (W, c) one after the other, not each server's whole
                # grid in a row: a load change on the shared machine then hits all three alike.
                for concurrency in concurrencies:
                    for name, argv_, marker in [
                        ("echo", echo, "echo ready"),
                        ("sized_echo", [*echo, "--payload", str(args.limit)], "echo ready"),
                        ("serve", [sys.executable, "-m", "recsys.cli", "serve"], "serving on port"),
                    ]:
                        port = free_port()
                        procs = Processes([*argv_, "--port", str(port), "--workers", str(workers)], env, marker, workers,
                                          tmp / f"{name}-{workers}-{concurrency}.log")
                        try:
                            procs.wait_ready()
                            if name == "serve":
                                check_served(port)
                            result = measure(binary, f"127.0.0.1:{port}", requests, tmp, args, concurrency, procs.proc.pid)
                            row = runs.setdefault((workers, concurrency), {"workers": workers, "concurrency": concurrency})
                            row.update({f"{'' if name == 'serve' else name + '_'}{k}": v for k, v in result.items()})
                        finally:
                            procs.stop()
                for concurrency in concurrencies:
                    row = runs[(workers, concurrency)]
                    row["ratio"] = row["qps"] / row["echo_qps"]
                    row["cpu_ratio"] = row["echo_cpu_us_per_call"] / row["cpu_us_per_call"]
                    row["sized_ratio"] = row["qps"] / row["sized_echo_qps"]
                    row["sized_cpu_ratio"] = row["sized_echo_cpu_us_per_call"] / row["cpu_us_per_call"]
                    print(json.dumps(row), flush=True)
            rows = list(runs.values())
        finally:
            if broker is not None:
                broker.destroy()

    within = [r for r in rows if r["p99_ms"] <= args.p99_target_ms]
    best = max(within or rows, key=lambda r: r["qps"])
    metrics: dict[str, Any] = {
        "qps": round(best["qps"], 1), "p50_ms": round(best["p50_ms"], 3), "p99_ms": round(best["p99_ms"], 3),
        "echo_qps": round(best["echo_qps"], 1), "ratio": round(best["ratio"], 3), "workers": best["workers"],
        "concurrency": best["concurrency"], "echo_p50_ms": round(best["echo_p50_ms"], 3),
        "echo_p99_ms": round(best["echo_p99_ms"], 3),
        # server CPU per call (all its processes) and the echo's: robust to the shared machine's load
        "cpu_us_per_call": round(best["cpu_us_per_call"], 1),
        "echo_cpu_us_per_call": round(best["echo_cpu_us_per_call"], 1), "cpu_ratio": round(best["cpu_ratio"], 3),
        "ghz_cpu_us_per_call": round(best["ghz_cpu_us_per_call"], 1),
        "echo_ghz_cpu_us_per_call": round(best["echo_ghz_cpu_us_per_call"], 1),
        # what one core could serve if the server had it alone (1e6 / CPU per call)
        "qps_per_core_capacity": round(1e6 / best["cpu_us_per_call"], 1),
        "echo_qps_per_core_capacity": round(1e6 / best["echo_cpu_us_per_call"], 1),
        # the most this machine could do with this client if nothing else ran: all its cores
        # divided by the server's plus ghz's CPU per call
        "machine_bound_qps": round((os.cpu_count() or 1) * 1e6 / (best["cpu_us_per_call"] + best["ghz_cpu_us_per_call"]), 1),
        "echo_machine_bound_qps": round(
            (os.cpu_count() or 1) * 1e6 / (best["echo_cpu_us_per_call"] + best["echo_ghz_cpu_us_per_call"]), 1),
        # the same-size ceiling: an echo answering with a prebuilt list of `limit` candidates
        "sized_echo_qps": round(best["sized_echo_qps"], 1), "sized_echo_p99_ms": round(best["sized_echo_p99_ms"], 3),
        "sized_ratio": round(best["sized_ratio"], 3),
        "sized_echo_cpu_us_per_call": round(best["sized_echo_cpu_us_per_call"], 1),
        "sized_cpu_ratio": round(best["sized_cpu_ratio"], 3),
        "errors": sum(r["errors"] + r["echo_errors"] + r["sized_echo_errors"] for r in rows),
        "meets_target": int(best["qps"] >= 5000 and best["p99_ms"] <= args.p99_target_ms),
        "best_qps_any_latency": round(max(r["qps"] for r in rows), 1),
        "best_echo_qps_any_latency": round(max(r["echo_qps"] for r in rows), 1),
        "best_sized_echo_qps_any_latency": round(max(r["sized_echo_qps"] for r in rows), 1),
        "users": args.users, "items_per_surface": args.items, "limit": args.limit, "connections": args.connections,
        "ghz_cpus": args.ghz_cpus, "ghz_version": GHZ_VERSION, "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }
    for r in rows:
        tag = f"w{r['workers']}_c{r['concurrency']}"
        for key in ("qps", "p50_ms", "p99_ms", "echo_qps", "echo_p99_ms", "sized_echo_qps", "sized_echo_p99_ms",
                    "cpu_us_per_call", "echo_cpu_us_per_call", "sized_echo_cpu_us_per_call"):
            metrics[f"{key}_{tag}"] = round(r[key], 3 if key.endswith("_ms") else 1)
    command = shlex.join(["python", "-m", "benchmarks.grpc_bench", *(sys.argv[1:] if argv is None else argv)])
    path = write_result("grpc", metrics, command=command)
    plot(rows, RESULTS_DIR / "grpc.png", args.p99_target_ms)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
