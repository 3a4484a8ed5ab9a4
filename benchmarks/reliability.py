"""Reliability: inject faults and hostile inputs, count what was lost (the long form).

    flock /tmp/recsys-bench.lock python -m benchmarks.reliability      # ~9 min: 2 rounds of 5 faults
    python -m benchmarks.reliability --seconds 90 --rounds 1 --fuzz-runs 20000 --no-save   # shorter

Three parts, each counted, none asserted (RELIABILITY.md says what each row means):

1. Faults under load (recsys/faults.py): the whole stack as real processes takes a steady
   stream of actions while, `--rounds` times over, the Faust worker, the inference worker and
   the gRPC server are SIGKILLed and restarted and the broker is restarted (SIGTERM) and
   killed (SIGKILL). The same seeded events then go through an uninterrupted stack. Both
   final states (every user's sequence on `user-updates`, every user's served
   source_event_ts on every surface) are compared with the reference state and with each
   other: events_lost and updates_lost are the faulted run's losses against the reference.
2. Hostile events: scripts/fuzz_events.py (atheris, coverage-guided) for `--fuzz-runs`
   inputs, each a sequence of raw `actions` values through the decoder, the DLQ record and
   the fold; a finding would make it exit non-zero.
3. Hostile requests: a gRPC server (this process, fallback lists) gets every kind of bad
   request of tests/serving/test_grpc_hostile.py; each must end in its expected status.

Writes benchmarks/results/reliability.json (faults_injected, bad_inputs_tried, events_lost,
updates_lost, and the details as flat keys).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results_io import write_result

ROOT = Path(__file__).resolve().parents[1]
FAULTS_PER_ROUND = ["kill:streams", "kill:worker", "kill:serve", "restart:broker", "kill:broker"]


def fault_runs(model_dir: Path, work: Path, seconds: float, rounds: int, rate: float, users: int) -> dict[str, Any]:
    from recsys.faults import FaultRun, compare_states

    faults = FAULTS_PER_ROUND * rounds
    common = {"users": users, "events_per_s": rate, "seconds": seconds, "seed": 7, "on_progress": print}
    faulted = FaultRun(work / "faulted", model_dir, faults=faults, **common).run()
    print({k: v for k, v in vars(faulted).items() if k != "state"})
    clean = FaultRun(work / "uninterrupted", model_dir, faults=[], **common).run()
    # The two runs against each other: the uninterrupted run's served state as the reference.
    # Same seeded events, but each run stamps them from its own start time: shift to compare.
    shift = faulted.details["first_event_ts"] - clean.details["first_event_ts"]
    as_reference = {user: {"sequence": [(e[0] + shift, *e[1:]) for e in st["sequence"]],
                           "source_event_ts": st["served_ts"].get("home", 0) + shift}
                    for user, st in clean.state.items()}
    versus = compare_states(as_reference, faulted.state)
    return {
        "faults_injected": len(faulted.faults_injected),
        "faults_planned": len(faults),
        "events_sent": faulted.events_sent,
        "events_acked": faulted.events_acked,
        "events_unacked": faulted.events_unacked,
        "events_lost": faulted.events_lost,
        "updates_lost": faulted.updates_lost,
        "users": faulted.details["users"],
        "faulted_converged_s": faulted.converged_s if faulted.converged_s is not None else -1,
        "faulted_users_sequence_differs": faulted.details["users_sequence_differs"],
        "faulted_users_with_reordered_updates": faulted.details["users_with_reordered_updates"],
        "uninterrupted_events_lost": clean.events_lost,
        "uninterrupted_updates_lost": clean.updates_lost,
        "faulted_vs_uninterrupted_events_missing": versus["events_missing_from_sequences"],
        "faulted_vs_uninterrupted_users_differ": versus["users_sequence_differs"] + versus["users_update_missing"],
        "broker_restart_recovered_s": max(
            (f.get("recovered_in_s", 0) for f in faulted.faults_injected if f["fault"].endswith("broker")), default=0),
        "_faults": faulted.faults_injected,
        "_examples": faulted.details["examples"],
    }


def fuzz(runs: int) -> dict[str, Any]:
    """scripts/fuzz_events.py for `runs` inputs; inputs tried and whether it found anything."""
    with tempfile.TemporaryDirectory() as artifacts:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "fuzz_events.py"), "--runs", str(runs), "--seed", "3",
             "--artifacts", artifacts], capture_output=True, text=True, cwd=ROOT,
        )
    return {"fuzz_inputs": runs, "fuzz_findings": 0 if proc.returncode == 0 else 1}


def grpc_hostile(model_dir: Path) -> dict[str, Any]:
    """Every kind of bad request against a real server in this process; unexpected statuses counted."""
    import grpc

    from recsys.settings import Settings
    from serving._proto import candidates_pb2 as pb
    from serving._proto import candidates_pb2_grpc as pb_grpc
    from serving.fallback import PopularityFallback
    from serving.server import create_server
    from serving.store import CandidateStore

    settings = Settings(serving={"host": "127.0.0.1", "port": 0, "max_limit": 50, "max_batch": 8,
                                 "max_concurrent_rpcs": 64}, inference={"model_dir": model_dir})
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    req = pb.GetCandidatesRequest
    cases: list[tuple[str, Any, set[grpc.StatusCode]]] = [
        ("empty user_id", req(user_id="", surface="home"), {invalid}),
        ("user_id 257 chars", req(user_id="x" * 257, surface="home"), {invalid}),
        ("user_id 2 MiB", req(user_id="x" * (2 << 20), surface="home"), {grpc.StatusCode.RESOURCE_EXHAUSTED}),
        ("unknown surface", req(user_id="a", surface="checkout"), {invalid}),
        ("empty surface", req(user_id="a", surface=""), {invalid}),
        ("limit -1", req(user_id="a", surface="home", limit=-1), {invalid}),
        ("limit max+1", req(user_id="a", surface="home", limit=51), {invalid}),
        ("limit 2^31-1", req(user_id="a", surface="home", limit=2**31 - 1), {invalid}),
        ("1 ms deadline", req(user_id="a", surface="home"), {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}),
    ]
    raw_cases = [
        ("invalid UTF-8 bytes", "/recsys.v1.Candidates/GetCandidates", b"\x0a\x03\xff\xfe\xfd", {invalid}),
        ("truncated message", "/recsys.v1.Candidates/GetCandidates", b"\x0a\x80", {invalid}),
        ("unknown method", "/recsys.v1.Candidates/DropAll", b"", {grpc.StatusCode.UNIMPLEMENTED}),
    ]
    flood = 2000

    async def scenario() -> dict[str, Any]:
        store = CandidateStore(1000, max_items=50)
        fallback = PopularityFallback(model_dir, settings.events.surfaces, 20)
        server, port = create_server(settings, store, fallback)
        await server.start()
        unexpected: list[str] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.CandidatesStub(channel)
                for name, request, expected in cases:
                    timeout = 0.001 if "deadline" in name else 10
                    code = await _code(stub.GetCandidates(request, timeout=timeout))
                    if code not in expected:
                        unexpected.append(f"{name}: {code}")
                batch = pb.BatchGetCandidatesRequest(requests=[req(user_id="a", surface="home")] * 9)
                if (code := await _code(stub.BatchGetCandidates(batch, timeout=10))) != invalid:
                    unexpected.append(f"batch of 9: {code}")
                for name, method, payload, expected in raw_cases:
                    if (code := await _code(channel.unary_unary(method)(payload, timeout=10))) not in expected:
                        unexpected.append(f"{name}: {code}")
                calls = [stub.GetCandidates(req(user_id=f"u{k}", surface="home", limit=50), timeout=30) for k in range(flood)]
                codes = [await _code(c) for c in calls]
                shed = {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
                unexpected += [f"flood: {c}" for c in set(codes) - shed]
                if await _code(stub.GetCandidates(req(user_id="a", surface="home"), timeout=10)) != grpc.StatusCode.OK:
                    unexpected.append("server not answering after the flood")
        finally:
            await server.stop(None)
        return {"grpc_hostile_requests": len(cases) + 1 + len(raw_cases) + flood,
                "grpc_unexpected_statuses": len(unexpected), "_grpc_unexpected": unexpected}

    return asyncio.run(scenario())


async def _code(call: Any) -> Any:
    import grpc

    try:
        await call
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0,
                        help="sending time of each of the two runs (a broker restart takes ~30 s here: leave room)")
    parser.add_argument("--rounds", type=int, default=2, help=f"times the fault set {FAULTS_PER_ROUND} is injected")
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--fuzz-runs", type=int, default=200_000, help="atheris inputs (each several events)")
    parser.add_argument("--work-dir", type=Path, default=Path("var/bench/reliability"))
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    from benchmarks.freshness import ensure_model

    work = args.work_dir.resolve() / time.strftime("%Y%m%dT%H%M%S")
    model_dir = ensure_model(args.work_dir.resolve() / "model", 2000, 500)
    started = time.monotonic()
    faults = fault_runs(model_dir, work, args.seconds, args.rounds, args.rate, args.users)
    fuzzed = fuzz(args.fuzz_runs)
    grpc_part = grpc_hostile(model_dir)
    details = {k: v for part in (faults, fuzzed, grpc_part) for k, v in part.items() if k.startswith("_")}
    flat = {k: v for part in (faults, fuzzed, grpc_part) for k, v in part.items() if not k.startswith("_")}
    metrics = {
        "faults_injected": flat.pop("faults_injected"),
        "bad_inputs_tried": flat["fuzz_inputs"] + flat["grpc_hostile_requests"],
        "events_lost": flat.pop("events_lost"),
        "updates_lost": flat.pop("updates_lost"),
        **flat,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(metrics)
    print(details)
    if not args.no_save:
        print(write_result("reliability", metrics))


if __name__ == "__main__":
    main()
