"""Fault injection under load: crash each process, restart the broker, count what was lost.

    run = FaultRun(work_dir, model_dir, faults=["kill:streams", "kill:worker", "kill:serve", "restart:broker"])
    report = run.run()          # report.events_lost, report.updates_lost, report.details

One run = the whole system as real processes (recsys.local_stack: its own broker, `recsys
streams`, `recsys worker`, `recsys serve`), a producer sending a fixed, seeded list of valid
actions at a steady rate, and the faults spread evenly over the sending time:

    kill:<service>     SIGKILL the process group of streams | worker | serve, start it again
    restart:broker     SIGTERM the broker (clients see every connection drop), start it again
    kill:broker        SIGKILL the broker, start it again

Afterwards the run waits until serving has converged (or a timeout), then reads the final
state and compares it with what an uninterrupted run must end in. That reference is the
fold's definition (streams/sequences.py): a user's sequence is the last max_sequence_len of
their accepted events in event-time order — a function of the *set* of events, whatever the
order or the replays — and the served source_event_ts is the time of the user's newest event.
`compare_states` also compares two runs' states directly (benchmarks/reliability.py runs an
uninterrupted stack beside the faulted one and compares both with each other and with it).

What is counted, never asserted here (the test and the benchmark decide):
- events_unacked: sends the broker never acknowledged within the producer's delivery timeout
  (the producer retries with back-off meanwhile; an unacknowledged send is the client's to retry)
- events_lost: acknowledged events missing from the `actions` log, plus events that belong in
  a user's final sequence (by the reference) but are not in it
- updates_lost: users whose newest state never reached serving: the served lists (every
  surface) do not carry the source_event_ts of the user's newest event, or are fallbacks
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from recsys.kafka_clients import read_topic
from recsys.local_stack import LocalStack

__all__ = ["FAULTS", "FaultRun", "RunReport", "compare_states", "expected_state", "make_events"]

log = logging.getLogger(__name__)

FAULTS = ("kill:streams", "kill:worker", "kill:serve", "restart:broker", "kill:broker")
SURFACES = ("home", "search", "related")


def make_events(n_events: int, n_users: int, item_ids: Sequence[str], seed: int, start_ts: int) -> list[dict[str, Any]]:
    """A seeded list of valid actions; event k has ts = start_ts + k (unique, increasing)."""
    rng = random.Random(seed)
    return [
        {"user_id": f"fault-user-{rng.randrange(n_users)}", "item_id": rng.choice(item_ids),
         "action": rng.choice(("click", "save")), "surface": rng.choice(SURFACES), "ts": start_ts + k}
        for k in range(n_events)
    ]


def _key(e: dict[str, Any]) -> tuple[int, str, str, str]:
    return (int(e["ts"]), str(e["item_id"]), str(e["action"]), str(e["surface"]))


def expected_state(events: Sequence[dict[str, Any]], max_len: int) -> dict[str, dict[str, Any]]:
    """What an uninterrupted run ends in: per user, the last max_len events in event-time
    order and the newest event's ts (all events valid, in-order per user, within the age bound)."""
    by_user: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_user[str(e["user_id"])].append(e)
    return {
        user: {"sequence": [_key(e) for e in sorted(evs, key=_key)[-max_len:]], "source_event_ts": max(e["ts"] for e in evs)}
        for user, evs in by_user.items()
    }


def compare_states(reference: dict[str, dict[str, Any]], observed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Events and updates of ``reference`` missing from ``observed`` (see the module docstring)."""
    events_missing = 0
    missing_ts: list[int] = []
    users_sequence_differs: list[str] = []
    users_update_missing: list[str] = []
    for user, ref in reference.items():
        got = observed.get(user, {})
        seq = set(map(tuple, got.get("sequence", [])))
        missing = [e for e in ref["sequence"] if tuple(e) not in seq]
        events_missing += len(missing)
        missing_ts += [int(e[0]) for e in missing]
        if [tuple(e) for e in got.get("sequence", [])] != [tuple(e) for e in ref["sequence"]]:
            users_sequence_differs.append(user)
        served = got.get("served_ts", {})
        if any(served.get(s) != ref["source_event_ts"] for s in SURFACES) or got.get("fallback", True):
            users_update_missing.append(user)
    return {
        "events_missing_from_sequences": events_missing,
        "users_sequence_differs": len(users_sequence_differs),
        "users_update_missing": len(users_update_missing),
        "examples": {"sequence_differs": users_sequence_differs[:5], "update_missing": users_update_missing[:5],
                     "missing_event_ts": sorted(missing_ts)[:5] + sorted(missing_ts)[-5:]},
    }


@dataclass
class RunReport:
    faults_injected: list[dict[str, Any]]
    events_sent: int
    events_acked: int
    events_unacked: int
    events_lost: int
    updates_lost: int
    converged_s: float | None  # from the last send to a fully converged served state
    details: dict[str, Any] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)  # per user: sequence, served_ts, fallback


class FaultNotInjected(RuntimeError):
    """A planned fault could not be applied (or its process not brought back): the run proves nothing."""


class FaultRun:
    """One loaded run of the local stack with faults at evenly spaced times (none = the reference run)."""

    def __init__(
        self,
        work_dir: Path,
        model_dir: Path,
        *,
        faults: Sequence[str] = (),
        users: int = 100,
        events_per_s: float = 100.0,
        seconds: float = 20.0,
        seed: int = 0,
        downtime_s: float = 1.0,
        converge_timeout_s: float = 120.0,
        overrides: dict[str, Any] | None = None,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
        self.work_dir = Path(work_dir)
        self.model_dir = Path(model_dir)
        self.faults = list(faults)
        self.users = users
        self.events_per_s = events_per_s
        self.seconds = seconds
        self.seed = seed
        self.downtime_s = downtime_s
        self.converge_timeout_s = converge_timeout_s
        self.overrides = {
            "inference.candidates_per_surface": 10,
            "inference.max_wait_ms": 5,
            "inference.store_retry_max_s": 1.0,
            # Static membership: a restarted Faust worker takes its partitions back at once
            # instead of waiting out the dead member's session.
            "streams.instance_id": "faults-streams-0",
            **(overrides or {}),
        }
        self.progress = on_progress or (lambda msg: log.info("%s", msg))
        self.users_with_reordered_updates = 0  # an older user-updates record after a newer one in the log

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> RunReport:
        from inference.runtime import ModelRuntime
        from recsys.settings import Settings

        max_len = Settings().streams.max_sequence_len
        item_ids = [str(i) for i in ModelRuntime.load(self.model_dir, "cpu").item_ids[:200]]
        n_events = int(self.events_per_s * self.seconds)
        # Event times end just before "now" at the end of sending: all valid, none in the future.
        start_ts = int(time.time() * 1000) - 10 * 60 * 1000
        events = make_events(n_events, self.users, item_ids, self.seed, start_ts)
        reference = expected_state(events, max_len)

        with LocalStack(self.work_dir, self.model_dir, overrides=self.overrides) as stack:
            self.progress(f"stack up; sending {n_events} events to {self.users} users over {self.seconds:.0f} s "
                          f"with faults {self.faults}")
            acked, unacked, injected, sent_done = self._send_with_faults(stack, events)
            converged_s = self._wait_converged(stack, reference, sent_done)
            state = self.observe(stack, list(reference))
            in_log = self._actions_in_log(stack)
            stack.check_alive()
        acked_missing = sum(1 for k in acked if k not in in_log)
        comparison = compare_states(reference, state)
        return RunReport(
            faults_injected=injected,
            events_sent=n_events,
            events_acked=len(acked),
            events_unacked=unacked,
            events_lost=acked_missing + comparison["events_missing_from_sequences"],
            updates_lost=comparison["users_update_missing"],
            converged_s=converged_s,
            details={"acked_missing_from_actions_log": acked_missing, **comparison, "users": len(reference),
                     "first_event_ts": start_ts, "faults_planned": len(self.faults),
                     "users_with_reordered_updates": self.users_with_reordered_updates},
            state=state,
        )

    def _send_with_faults(self, stack: LocalStack, events: list[dict[str, Any]]) -> tuple[set[tuple[Any, ...]], int, list[dict[str, Any]], float]:
        from kafka import KafkaProducer

        from streams.schema import encode_event

        topic = str(stack.overrides.get("topics.actions", "actions"))
        producer = KafkaProducer(
            bootstrap_servers=stack.bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
            delivery_timeout_ms=120_000, retry_backoff_ms=200, reconnect_backoff_max_ms=2000,
        )
        acked: set[tuple[Any, ...]] = set()
        failed = [0]
        lock = threading.Lock()

        def on_ok(key: tuple[Any, ...]) -> Callable[[Any], None]:
            def ok(_: Any) -> None:
                with lock:
                    acked.add(key)
            return ok

        def on_err(_: Exception) -> None:
            with lock:
                failed[0] += 1

        fault_at = [self.seconds * (i + 1) / (len(self.faults) + 1) for i in range(len(self.faults))]
        injected: list[dict[str, Any]] = []
        faults_thread: threading.Thread | None = None
        start = time.monotonic()
        for k, event in enumerate(events):
            due = start + k / self.events_per_s
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            if fault_at and time.monotonic() - start >= fault_at[0] and (faults_thread is None or not faults_thread.is_alive()):
                fault_at.pop(0)
                name = self.faults[len(injected)]
                record = {"fault": name, "at_s": round(time.monotonic() - start, 2)}
                injected.append(record)
                # Injected beside the sender: the load keeps flowing while a process is down.
                faults_thread = threading.Thread(target=self._inject, args=(stack, name, record), daemon=True)
                faults_thread.start()
            future = producer.send(topic, key=str(event["user_id"]).encode(), value=encode_event(event))
            future.add_callback(on_ok((event["user_id"], *_key(event))))
            future.add_errback(on_err)
        if faults_thread is not None:
            faults_thread.join()
        if failed_faults := [f for f in injected if "error" in f]:
            producer.close()
            raise FaultNotInjected(f"faults that could not be applied: {failed_faults}")
        if len(injected) < len(self.faults):  # the load ended first: say so, never pretend
            self.progress(f"only {len(injected)} of {len(self.faults)} faults fitted into {self.seconds:.0f} s of load")
        producer.flush()
        producer.close()
        sent_done = time.monotonic()
        self.progress(f"sent {len(events)} events: {len(acked)} acked, {failed[0]} failed")
        return acked, failed[0], injected, sent_done

    def _inject(self, stack: LocalStack, name: str, record: dict[str, Any]) -> None:
        """Apply one fault and bring the process back; runs in a thread beside the sender, so a
        failure is kept in ``record["error"]`` (raised once the load ends) instead of dying
        with the thread while the report lists the fault as injected."""
        try:
            self._apply_fault(stack, name, record)
        except Exception as exc:  # noqa: BLE001 - handed to the sender, which raises it
            record["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("fault %s failed", name)

    def _apply_fault(self, stack: LocalStack, name: str, record: dict[str, Any]) -> None:
        kind, target = name.split(":")
        t0 = time.monotonic()
        if target == "broker":
            assert stack.broker is not None, "broker faults need the stack's own broker"
            if kind == "kill":
                import os
                import signal

                pid = stack.broker.pid()
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    while stack.broker.pid() is not None:
                        time.sleep(0.05)
            else:
                stack.broker.stop()
            record["down_in_s"] = round(time.monotonic() - t0, 2)
            time.sleep(self.downtime_s)
            stack.broker.start()
        else:
            stack.services[target].kill()
            time.sleep(self.downtime_s)
            stack.start_service(target)
        record["recovered_in_s"] = round(time.monotonic() - t0, 2)
        self.progress(f"fault {name} at {record['at_s']} s: back in {record['recovered_in_s']} s")

    # -- the final state ---------------------------------------------------------------------
    def _served(self, stack: LocalStack, users: Sequence[str]) -> dict[str, dict[str, Any]]:
        import grpc

        from serving._proto import candidates_pb2 as pb
        from serving._proto import candidates_pb2_grpc as pb_grpc

        out: dict[str, dict[str, Any]] = {}
        with grpc.insecure_channel(stack.grpc_target) as channel:
            stub = pb_grpc.CandidatesStub(channel)
            for user in users:
                reply = stub.BatchGetCandidates(pb.BatchGetCandidatesRequest(
                    requests=[pb.GetCandidatesRequest(user_id=user, surface=s) for s in SURFACES]), timeout=10)
                out[user] = {
                    "served_ts": {r.surface: r.source_event_ts_ms for r in reply.responses},
                    "fallback": any(r.is_fallback for r in reply.responses),
                    "n_candidates": min(len(r.candidates) for r in reply.responses),
                }
        return out

    def _wait_converged(self, stack: LocalStack, reference: dict[str, dict[str, Any]], sent_done: float) -> float | None:
        deadline = sent_done + self.converge_timeout_s
        while time.monotonic() < deadline:
            try:
                stack.wait_serving(timeout_s=max(1.0, deadline - time.monotonic()))
                served = self._served(stack, list(reference))
            except Exception as exc:  # noqa: BLE001 - a service may still be coming back
                self.progress(f"not converged yet ({type(exc).__name__})")
                time.sleep(1.0)
                continue
            behind = [u for u, ref in reference.items()
                      if served[u]["fallback"] or any(ts != ref["source_event_ts"] for ts in served[u]["served_ts"].values())]
            if not behind:
                return round(time.monotonic() - sent_done, 2)
            time.sleep(0.5)
        self.progress("serving did not converge within the timeout")
        return None

    def observe(self, stack: LocalStack, users: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Per user: the newest sequence on `user-updates` and what gRPC serves."""
        newest: dict[str, dict[str, Any]] = {}
        reordered: set[str] = set()
        for key, value in read_topic(stack.bootstrap, str(stack.overrides.get("topics.user_updates", "user-updates"))):
            update = msgpack.unpackb(value, raw=False)
            # The newest state is the highest version, not the last record in the log: a producer
            # retry after a broker crash can land an older batch behind a newer one.
            if key in newest and update["version"] < newest[key]["version"]:
                reordered.add(key)
            if key not in newest or update["version"] >= newest[key]["version"]:
                newest[key] = update
        self.users_with_reordered_updates = len(reordered & set(users))
        served = self._served(stack, users)
        return {u: {"sequence": [_key(e) for e in newest.get(u, {}).get("events", [])], **served[u]} for u in users}

    def _actions_in_log(self, stack: LocalStack) -> set[tuple[Any, ...]]:
        out: set[tuple[Any, ...]] = set()
        for _, value in read_topic(stack.bootstrap, str(stack.overrides.get("topics.actions", "actions"))):
            e = msgpack.unpackb(value, raw=False)
            out.add((e["user_id"], *_key(e)))
        return out
