"""The Faust worker against the real broker, run as `python -m recsys streams` subprocesses.

One worker (module fixture) serves the acceptance checks that need no restart: 10,000 events
with 1% malformed, out-of-order events, a burst, every hostile payload of
scripts/fuzz_events.py into the DLQ. The restart test runs its own app through SIGTERM and
SIGKILL and compares its final state with the shared, uninterrupted worker's; the crash test
makes a window fail.
The oracle is independent of the fold: a user's expected sequence is the last N of their
valid events sorted by event time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from recsys.kafka_broker import free_port
from recsys.kafka_clients import read_to_end
from streams.app import read_counters
from streams.produce import Record, ensure_topic, produce
from streams.schema import ActionEvent, encode_event, now_ms
from streams.synthetic import synthetic_events

pytestmark = [pytest.mark.kafka]

PARTITIONS = 2
N = 8  # max_sequence_len of the test workers: most users overflow it
FLUSH_S = 0.25
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers: topics


def updates_by_user(bootstrap: str, topic: str) -> dict[str, list[dict[str, Any]]]:
    """user key -> every user-updates value for that user, in log order."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in read_to_end(bootstrap, topic):
        out[r.key.decode()].append(msgpack.unpackb(r.value, raw=False))
    return out


def events_of(update: dict[str, Any]) -> list[tuple[Any, str, str, int]]:
    return [(e["item_id"], e["action"], e["surface"], e["ts"]) for e in update["events"]]


def latest_sequences(bootstrap: str, topic: str) -> dict[str, list[tuple[Any, str, str, int]]]:
    """user key -> the events of that user's newest user-updates record."""
    return {u: events_of(ups[-1]) for u, ups in updates_by_user(bootstrap, topic).items()}


def expected_sequences(valid: Sequence[ActionEvent], n: int = N) -> dict[str, list[tuple[Any, str, str, int]]]:
    """The oracle: per user, the last n valid events by event time (the test data has distinct times)."""
    per_user: dict[str, list[ActionEvent]] = defaultdict(list)
    for e in valid:
        per_user[e.key].append(e)
    return {
        user: [(e.item_id, e.action, e.surface, e.ts) for e in sorted(evs, key=lambda e: e.ts)[-n:]]
        for user, evs in per_user.items()
    }


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- helpers: the worker process


@dataclass
class Worker:
    """One `python -m recsys streams` process with its own app id, topics and web port."""

    bootstrap: str
    name: str
    data_dir: Path
    web_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def actions(self) -> str:
        return f"{self.name}.actions"

    @property
    def dlq(self) -> str:
        return f"{self.name}.actions.dlq"

    @property
    def updates(self) -> str:
        return f"{self.name}.user-updates"

    @property
    def changelog(self) -> str:
        return f"{self.name}-sequences-changelog"

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"worker-{self.starts}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
        env.update(
            RECSYS_KAFKA__BOOTSTRAP_SERVERS=self.bootstrap,
            RECSYS_KAFKA__PARTITIONS=str(PARTITIONS),
            RECSYS_STREAMS__APP_ID=self.name,
            RECSYS_STREAMS__DATA_DIR=str(self.data_dir),
            RECSYS_STREAMS__WEB_PORT=str(self.web_port),
            RECSYS_STREAMS__MAX_SEQUENCE_LEN=str(N),
            RECSYS_STREAMS__FLUSH_INTERVAL_S=str(FLUSH_S),
            RECSYS_STREAMS__STATS_INTERVAL_S="5",
            # Static membership: a restart after SIGKILL takes the partitions back at once
            # instead of waiting for the killed member's session to time out.
            RECSYS_STREAMS__INSTANCE_ID=f"{self.name}-worker",
            RECSYS_TOPICS__ACTIONS=self.actions,
            RECSYS_TOPICS__DLQ=self.dlq,
            RECSYS_TOPICS__USER_UPDATES=self.updates,
        )
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.starts += 1
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recsys", "streams"],
            cwd=self.data_dir,  # relative paths of the worker stay inside the test's directory
            env=self.env(),
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: self.metrics() is not None, 60, f"{self.name} web server ({self.tail()})")
        except BaseException:  # not left running past the test, retrying a broker gone with it
            self.kill()
            raise

    def metrics(self) -> dict[str, float] | None:
        """The worker's counters (`/metrics`), or None while it is not serving."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}: {self.tail()}")
        return read_counters(self.web_port, timeout_s=2)

    def valid(self) -> int:
        m = self.metrics() or {}
        return int(sum(v for k, v in m.items() if k.startswith("recsys_streams_events_total")))

    def invalid(self) -> Counter[str]:
        m = self.metrics() or {}
        prefix = 'recsys_streams_invalid_total{reason="'
        return Counter({k[len(prefix) : -2]: int(v) for k, v in m.items() if k.startswith(prefix)})

    def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except BaseException:  # it did not stop (or the wait was interrupted): killed, not orphaned
            self.kill()
            raise
        finally:
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace") if self.log_path.exists() else ""

    @contextlib.contextmanager
    def running(self) -> Iterator[Worker]:
        """Started, and stopped cleanly (SIGTERM, exit 0) on the way out unless already stopped."""
        self.start()
        try:
            yield self
        finally:
            if self.proc is not None:
                assert self.stop(signal.SIGTERM) == 0, self.tail()


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """The shared, never interrupted worker."""
    w = Worker(kafka_bootstrap, f"streams-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("streams"))
    ensure_topic(kafka_bootstrap, w.actions, PARTITIONS)
    with w.running():
        yield w


# ---------------------------------------------------------------- malformed events


def malformed(marker: str, i: int, key: str, now: int) -> tuple[Record, str]:
    """The i-th malformed record (ten kinds in turn) and the reason the worker must give."""
    base = {"user_id": key, "item_id": 1, "action": "click", "surface": "home", "ts": now, "m": f"{marker}-{i}"}
    kind = i % 10
    if kind == 0:
        return (key, b"\xc1not msgpack " + base["m"].encode()), "not msgpack"
    if kind == 1:
        return (key, msgpack.packb([base["m"], 1])), "not a map"
    if kind == 2:
        return {k: v for k, v in base.items() if k != "surface"}, "missing field"
    if kind == 3:
        return {**base, "ts": str(now)}, "wrong type"
    if kind == 4:
        return {**base, "item_id": 1.5}, "wrong type"
    if kind == 5:
        return {**base, "action": "purchase"}, "unknown action"
    if kind == 6:
        return {**base, "surface": "email"}, "unknown surface"
    if kind == 7:
        return {**base, "pad": "x" * 5000}, "oversized"
    if kind == 8:
        return {**base, "ts": now + 24 * 3600 * 1000}, "ts in the future"
    return {**base, "ts": now // 1000}, "ts too old"


def original(record: Record) -> bytes:
    return record[1] if isinstance(record, tuple) else encode_event(record)  # type: ignore[arg-type]


def dlq_reasons(bootstrap: str, topic: str, originals: set[bytes]) -> Counter[tuple[bytes, str]]:
    out: Counter[tuple[bytes, str]] = Counter()
    for r in read_to_end(bootstrap, topic):
        rec = msgpack.unpackb(r.value, raw=False)
        assert set(rec) >= {"reason", "original", "topic", "partition", "offset", "at"}
        if rec["original"] in originals:
            out[(rec["original"], rec["reason"])] += 1
    return out


# ---------------------------------------------------------------- the acceptance tests


def test_10k_events_1pct_malformed_every_valid_event_sequenced_every_bad_one_dead_lettered(worker: Worker) -> None:
    marker = uuid.uuid4().hex[:8]
    now = now_ms()
    valid = list(
        synthetic_events(9_900, 1_000, 500, seed=7, start_ts_ms=now - 9_900 * 5, step_ms=5, user_prefix=f"{marker}-")
    )
    records: list[Record] = list(valid)
    expected_bad: dict[bytes, str] = {}
    for i in range(100):
        rec, reason = malformed(marker, i, valid[i * 97].key, now)
        expected_bad[original(rec)] = reason
        records.insert(i * 100 + 50, rec)  # spread over the stream
    assert len(records) == 10_000 and len(set(expected_bad.values())) == 9

    before_valid, before_invalid = worker.valid(), worker.invalid()
    assert produce(records, worker.bootstrap, worker.actions, progress=False) == 10_000
    wait_until(
        lambda: worker.valid() - before_valid + sum((worker.invalid() - before_invalid).values()) >= 10_000,
        120,
        "the worker to take all 10,000 events",
    )
    # The counts add up exactly: 9,900 valid, 100 invalid with the expected reasons.
    assert worker.valid() - before_valid == 9_900
    assert worker.invalid() - before_invalid == Counter(expected_bad.values())

    expected = expected_sequences(valid)
    assert len(expected) == 1_000

    def final_state_complete() -> bool:
        latest = {u: ups[-1] for u, ups in updates_by_user(worker.bootstrap, worker.updates).items() if u in expected}
        return len(latest) == len(expected) and all(events_of(latest[u]) == seq for u, seq in expected.items())

    wait_until(final_state_complete, 60, "user-updates to show every user's last N events", interval=1)
    updates = updates_by_user(worker.bootstrap, worker.updates)
    for user, seq in expected.items():
        versions = [u["version"] for u in updates[user]]
        assert versions == sorted(set(versions)), f"versions of {user} not strictly increasing: {versions}"
        last = updates[user][-1]
        assert last["user_id"] == user and last["last_event_ts"] == seq[-1][3]

    # Every malformed event is in the DLQ exactly once with its reason; no valid event is.
    dead = dlq_reasons(worker.bootstrap, worker.dlq, set(expected_bad) | {encode_event(e) for e in valid})
    assert dead == Counter({(raw, reason): 1 for raw, reason in expected_bad.items()})


def test_out_of_order_events_within_lateness_end_up_in_order_later_ones_are_dead_lettered(worker: Worker) -> None:
    user = f"ooo-{uuid.uuid4().hex[:8]}"
    t = now_ms() - 120_000
    from recsys.settings import Settings

    lateness = Settings().streams.lateness_ms  # the worker sets none: the default

    def ev(dt: int, item: int) -> ActionEvent:
        return ActionEvent(user, item, "click", "home", t + dt)

    sent = [ev(0, 1), ev(30_000, 2), ev(10_000, 3), ev(20_000, 4), ev(5_000, 5), ev(10_000, 3)]  # last: duplicate
    too_late = ev(30_000 - lateness - 1, 6)
    # A hide as late: dead-lettered for the sequence, but the item is hidden all the same.
    late_hide = ActionEvent(user, 8, "hide", "home", t + 30_000 - lateness - 2)
    miskeyed: Record = (f"not-{user}", encode_event(ev(15_000, 7)))  # key must be str(user_id)
    # The newest first, on its own: every later window holds only older (late) events.
    produce(sent[:2], worker.bootstrap, worker.actions, progress=False)
    wait_until(lambda: len(events_of((updates_by_user(worker.bootstrap, worker.updates).get(user) or [{"events": []}])[-1])) == 2,
               60, "the first two events")
    produce([*sent[2:], too_late, late_hide, miskeyed], worker.bootstrap, worker.actions, progress=False)

    want = [(1, "click", "home", t), (5, "click", "home", t + 5_000), (3, "click", "home", t + 10_000),
            (4, "click", "home", t + 20_000), (2, "click", "home", t + 30_000)]  # fmt: skip
    wait_until(
        lambda: bool(ups := updates_by_user(worker.bootstrap, worker.updates).get(user)) and events_of(ups[-1]) == want,
        60,
        "the out-of-order events in order",
    )
    # Each update is stamped with the newest action its sequence holds, however late the
    # events that triggered it (a window of only late ones would otherwise carry their time).
    for update in updates_by_user(worker.bootstrap, worker.updates)[user]:
        assert update["last_event_ts"] == max(e["ts"] for e in update["events"])
    wait_until(lambda: updates_by_user(worker.bootstrap, worker.updates)[user][-1]["hidden"] == [8], 60,
               "the late hide taken")
    # The same late hide again, as a replay after a crash between the changelog and user-updates
    # would bring it: it changes nothing, but the user is emitted again (the update may never have
    # left), as for any replayed valid event.
    version = updates_by_user(worker.bootstrap, worker.updates)[user][-1]["version"]
    produce([late_hide], worker.bootstrap, worker.actions, progress=False)
    wait_until(lambda: updates_by_user(worker.bootstrap, worker.updates)[user][-1]["version"] > version, 60,
               "the replayed late hide re-emitted")
    assert updates_by_user(worker.bootstrap, worker.updates)[user][-1]["hidden"] == [8]
    dead = dlq_reasons(worker.bootstrap, worker.dlq, {encode_event(too_late), encode_event(late_hide), miskeyed[1]})
    assert dead == Counter({(encode_event(too_late), "too late"): 1, (encode_event(late_hide), "too late"): 2,
                            (miskeyed[1], "wrong key"): 1})


def test_the_future_check_reads_the_records_own_time_so_a_replay_judges_alike(worker: Worker) -> None:
    # Two records stamped by Kafka ten minutes ago, their events' times behind the wall clock
    # today: judged against the record's time, as they were when first read (and as a replay
    # after a crash reads them), one is too far ahead of it.
    from kafka import KafkaProducer

    from recsys.settings import Settings

    user = f"skew-{uuid.uuid4().hex[:8]}"
    stamped = now_ms() - 600_000
    ahead = Settings().events.max_future_ms
    fine = ActionEvent(user, 1, "click", "home", stamped + ahead - 1_000)
    skewed = ActionEvent(user, 2, "click", "home", stamped + ahead + 1_000)
    producer = KafkaProducer(bootstrap_servers=worker.bootstrap, acks="all")
    try:
        for event in (fine, skewed):
            producer.send(worker.actions, key=event.key.encode(), value=encode_event(event), timestamp_ms=stamped)
        producer.flush()
    finally:
        producer.close()
    wait_until(lambda: bool(ups := updates_by_user(worker.bootstrap, worker.updates).get(user))
               and events_of(ups[-1]) == [(1, "click", "home", fine.ts)], 60, "the event within the horizon")
    want = Counter({(encode_event(skewed), "ts in the future"): 1})
    wait_until(lambda: dlq_reasons(worker.bootstrap, worker.dlq, {encode_event(skewed)}) == want, 60,
               "the skewed event dead-lettered")
    # A producer that stamps its records in seconds (a record time before events.min_ts_ms):
    # judged by the clock, not refused as "in the future" of 1970.
    by_seconds = ActionEvent(user, 3, "click", "home", now_ms() - 1_000)
    producer = KafkaProducer(bootstrap_servers=worker.bootstrap, acks="all")
    try:
        producer.send(worker.actions, key=by_seconds.key.encode(), value=encode_event(by_seconds),
                      timestamp_ms=int(time.time()))
        producer.flush()
    finally:
        producer.close()
    wait_until(lambda: events_of(updates_by_user(worker.bootstrap, worker.updates)[user][-1])[-1]
               == (3, "click", "home", by_seconds.ts), 60, "the event of a producer stamping seconds")


def test_a_burst_for_one_user_yields_a_handful_of_coalesced_updates(worker: Worker) -> None:
    user = f"burst-{uuid.uuid4().hex[:8]}"
    t = now_ms() - 10_000
    burst = [ActionEvent(user, i, "click", "home", t + i) for i in range(1_000)]
    produce(burst, worker.bootstrap, worker.actions, rate=1_000, progress=False)  # one second
    want = [(e.item_id, e.action, e.surface, e.ts) for e in burst[-N:]]
    wait_until(
        lambda: bool(ups := updates_by_user(worker.bootstrap, worker.updates).get(user)) and events_of(ups[-1]) == want,
        60,
        "the burst's final update",
    )
    updates = updates_by_user(worker.bootstrap, worker.updates)[user]
    versions = [u["version"] for u in updates]
    assert versions == sorted(set(versions))
    # One update per flush window (FLUSH_S = 0.25 s) at most, not one per event: a one-second
    # burst spans about five windows; twenty leaves room for a slow, shared machine.
    assert 1 <= len(updates) <= 20, f"{len(updates)} updates for 1,000 events"


def test_sigterm_and_sigkill_mid_stream_lose_nothing_and_match_an_uninterrupted_run(
    worker: Worker, kafka_bootstrap: str, tmp_path: Path
) -> None:
    name = f"restart-{uuid.uuid4().hex[:8]}"
    # 300 users x 6 events = 1,800 events over three phases: every event stays within the last
    # N = 8, so the final state depends on events committed before each stop (table recovery).
    events = list(
        synthetic_events(1_800, 300, 200, seed=11, start_ts_ms=now_ms() - 1_800 * 10, step_ms=10, user_prefix=f"{name}-")
    )
    phases = [events[:600], events[600:1_200], events[1_200:]]
    victim = Worker(kafka_bootstrap, name, tmp_path)
    ensure_topic(kafka_bootstrap, victim.actions, PARTITIONS)

    def produce_in_background(batch: list[ActionEvent]) -> threading.Thread:
        thread = threading.Thread(
            target=produce, args=(batch, kafka_bootstrap, victim.actions), kwargs={"rate": 100, "progress": False}
        )
        thread.start()
        return thread

    try:
        for phase, sig in zip(phases[:2], (signal.SIGTERM, signal.SIGKILL), strict=True):
            victim.start()
            # Once the worker demonstrably processes events, the rest of the phase is produced
            # at 100/s (6 s: room for a worker slowed by a loaded machine) and the worker is
            # stopped after ~100 of them: mid-stream.
            produce(phase[:1], kafka_bootstrap, victim.actions, progress=False)
            wait_until(lambda: victim.valid() >= 1, 60, f"the worker to process events ({victim.tail()})")
            start = victim.valid()
            thread = produce_in_background(phase[1:])
            wait_until(lambda: victim.valid() >= start + 100, 60, "the worker to process part of the phase")
            assert thread.is_alive(), "the stop should come mid-stream, while the phase is being produced"
            rc = victim.stop(sig)
            assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL), victim.tail()
            thread.join()
        victim.start()
        produce(phases[2], kafka_bootstrap, victim.actions, progress=False)
        # The same events through the uninterrupted worker.
        produce(events, kafka_bootstrap, worker.actions, progress=False)

        expected = expected_sequences(events)

        def final(w: Worker) -> dict[str, list[tuple[Any, str, str, int]]]:
            return {u: seq for u, seq in latest_sequences(kafka_bootstrap, w.updates).items() if u in expected}

        wait_until(lambda: final(victim) == expected, 90, "the restarted worker's final state", interval=1)
        wait_until(lambda: final(worker) == expected, 60, "the uninterrupted worker's final state", interval=1)
        assert final(victim) == final(worker)

        # Versions stay strictly increasing across both restarts.
        for user, ups in updates_by_user(kafka_bootstrap, victim.updates).items():
            versions = [u["version"] for u in ups]
            assert versions == sorted(set(versions)), f"{user}: {versions}"
        # The changelog holds the same final state (it is what the table is recovered from).
        from streams.sequences import decode_state

        latest = {r.key.decode(): decode_state(r.value) for r in read_to_end(kafka_bootstrap, victim.changelog)}
        assert {u: [(e.item_id, e.action, e.surface, e.ts) for e in s.events] for u, s in latest.items()} == expected
    finally:
        if victim.proc is not None:
            victim.stop(signal.SIGTERM)


# ---------------------------------------------------------------- hostile payloads, failures


def fuzz_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_events", ROOT / "scripts" / "fuzz_events.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hostile_payloads_through_the_worker_all_reach_the_dlq_with_their_reason_and_the_counters_add_up(
    worker: Worker,
) -> None:
    from kafka import KafkaProducer

    from recsys.settings import Settings

    settings = Settings()  # the worker's event rules: its environment sets no RECSYS_EVENTS__*
    now = now_ms()
    user = f"hostile-{uuid.uuid4().hex[:8]}"
    valid = [ActionEvent(user, i, "click", "home", now - 10_000 + i) for i in range(3)]
    cut = settings.streams.dlq_max_original_bytes
    max_key = settings.streams.dlq_max_key_bytes
    hostile: list[tuple[bytes, bytes | None, str]] = [
        (b"7", raw, reason) for _, raw, reason in fuzz_module().hostile_payloads(settings, now, seed=5)
    ]
    hostile += [
        (f"not-{user}".encode(), encode_event(valid[0]), "wrong key"),
        (None, encode_event(valid[1]), "wrong key"),  # no key at all
        # A huge key: its repr is 4x its size; the DLQ record keeps its first max_key bytes.
        (b"\x00" * 300_000, encode_event(valid[2]), "wrong key"),
        (user.encode(), b"\xc1" + os.urandom(cut + 1000), "oversized"),  # cut short in the DLQ record
        (b"\x00" * 300_000, b"\xc1" + os.urandom(cut + 1000), "oversized"),  # cut key + cut original fit
    ]
    before_valid, before_invalid = worker.valid(), worker.invalid()
    producer = KafkaProducer(bootstrap_servers=worker.bootstrap, acks="all", max_request_size=4 << 20)
    try:
        sent = [(producer.send(worker.actions, key=key, value=raw), key, raw, reason) for key, raw, reason in hostile]
        for e in valid:
            producer.send(worker.actions, key=e.key.encode(), value=encode_event(e))
        producer.flush()
        where = {(f.get().partition, f.get().offset): (key, raw, reason) for f, key, raw, reason in sent}
    finally:
        producer.close()

    total = len(hostile) + len(valid)
    wait_until(
        lambda: worker.valid() - before_valid + sum((worker.invalid() - before_invalid).values()) >= total,
        60,
        "the worker to take every hostile payload",
    )
    assert worker.valid() - before_valid == len(valid)
    assert worker.invalid() - before_invalid == Counter(reason for _, _, reason in hostile)
    # Each one is in the DLQ exactly once, found by its position, with its reason and original.
    found: Counter[tuple[int, int]] = Counter()
    for r in read_to_end(worker.bootstrap, worker.dlq):
        rec = msgpack.unpackb(r.value, raw=False)
        position = (rec["partition"], rec["offset"])
        if rec["topic"] != worker.actions or position not in where:
            continue
        key, raw, reason = where[position]
        found[position] += 1
        assert rec["reason"] == reason and rec["detail"], rec
        kept = (key or b"")[:max_key]  # the DLQ record's key: a prefix of the original's
        assert (r.key or b"") == kept and rec["key_size"] == len(key or b"")
        assert rec["key_truncated"] == (len(key or b"") > max_key)
        budget = cut - len(kept)  # the kept key counts in the budget
        assert rec["original"] == (raw or b"")[:budget] and rec["original_size"] == len(raw or b"")
        assert rec["truncated"] == (len(raw or b"") > budget)
        assert len(rec["detail"]) < 1100
    assert found == Counter(dict.fromkeys(where, 1))


def test_a_hostile_key_near_the_broker_limit_reaches_the_dlq_cut_and_the_worker_goes_on(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A key that just fits the broker's 1 MiB limit on `actions`: a DLQ record that kept it
    whole (plus its value) would pass the limit, fail every window that holds it and stop the
    partition in a crash loop. The record keeps a prefix of the key and says how large it was."""
    from kafka import KafkaProducer

    from recsys.settings import Settings

    max_key = Settings().streams.dlq_max_key_bytes
    victim = Worker(kafka_bootstrap, f"bigkey-{uuid.uuid4().hex[:8]}", tmp_path)
    ensure_topic(kafka_bootstrap, victim.actions, PARTITIONS)
    user = f"{victim.name}-u"
    now = now_ms()
    good = ActionEvent(user, 1, "click", "home", now - 1_000)
    hostile = [  # (key, value, reason); each fits the broker's default max.message.bytes (1 MiB + 12)
        (b"k" * 1_048_500, b"\xc1", "not msgpack"),
        (b"\x00" * 1_048_400, encode_event(ActionEvent(user, 2, "click", "home", now - 2_000)), "wrong key"),
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=4 << 20)
    try:
        victim.start()
        where: dict[tuple[int, int], tuple[bytes, bytes, str]] = {}
        for key, value, reason in hostile:
            meta = producer.send(victim.actions, key=key, value=value, partition=0).get(timeout=30)
            where[(meta.partition, meta.offset)] = (key, value, reason)
        # A good event after them, on the same partition: it is only taken if the partition goes on.
        producer.send(victim.actions, key=good.key.encode(), value=encode_event(good), partition=0).get(timeout=30)
        producer.flush()

        # The counters move before a window's output is written; its update comes after its DLQ records.
        wait_until(lambda: victim.valid() >= 1 and user in updates_by_user(kafka_bootstrap, victim.updates), 60,
                   f"the good event after the huge keys ({victim.tail()})")  # fmt: skip
        assert victim.invalid() == Counter(reason for _, _, reason in hostile)
        assert victim.proc is not None and victim.proc.poll() is None, victim.tail()  # still running
        assert [events_of(u) for u in updates_by_user(kafka_bootstrap, victim.updates)[user]][-1] == [
            (1, "click", "home", good.ts)
        ]

        found: dict[tuple[int, int], Any] = {}
        for r in read_to_end(kafka_bootstrap, victim.dlq):
            rec = msgpack.unpackb(r.value, raw=False)
            assert rec["topic"] == victim.actions
            found[(rec["partition"], rec["offset"])] = (r, rec)
        assert set(found) == set(where)  # found by the original's topic, partition and offset
        for position, (key, value, reason) in where.items():
            r, rec = found[position]
            assert rec["reason"] == reason and rec["detail"], rec["detail"]
            assert r.key == key[:max_key] and rec["key_size"] == len(key) and rec["key_truncated"] is True
            assert rec["original"] == value and rec["original_size"] == len(value) and rec["truncated"] is False
            assert len(r.key) + len(r.value) < 8 * 1024  # far from the broker's limit
        assert victim.stop(signal.SIGTERM) == 0, victim.tail()
    finally:
        producer.close()
        if victim.proc is not None:
            victim.stop(signal.SIGTERM)


@pytest.mark.parametrize("delivery", ["window", "stream"])
def test_a_failing_window_ends_the_worker_unacked_and_a_restart_reads_it_again(
    kafka_bootstrap: str, tmp_path: Path, delivery: str
) -> None:
    """With either delivery: Faust's take_events (delivery = "stream") acks its window in a
    `finally`, so a failure that let the generator close would commit the failed window."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(  # a bug in the fold, for this process only
        "import streams.sequences as s\n"
        "def fold(self, event, settings):\n"
        "    raise RuntimeError('planted failure')\n"
        "s.PackedSeq.fold = fold\n"
    )
    victim = Worker(kafka_bootstrap, f"crash-{uuid.uuid4().hex[:8]}", tmp_path,
                    extra_env={"PYTHONPATH": f"{plant}{os.pathsep}{ROOT}", "RECSYS_STREAMS__DELIVERY": delivery})  # fmt: skip
    ensure_topic(kafka_bootstrap, victim.actions, PARTITIONS)
    events = list(synthetic_events(20, 5, 10, seed=3, user_prefix=f"{victim.name}-"))
    try:
        victim.start()
        produce(events, kafka_bootstrap, victim.actions, progress=False)
        assert victim.proc is not None
        assert victim.proc.wait(timeout=60) == 1, victim.tail()  # crashed, not restarted in place
        assert "planted failure" in victim.tail(20_000)
        victim.proc = None
        victim.extra_env = {"RECSYS_STREAMS__DELIVERY": delivery}
        victim.start()  # the same group: whatever was not acked is read again
        wait_until(lambda: victim.valid() >= len(events), 60, f"the restarted worker to take the events ({victim.tail()})")
        assert victim.valid() == len(events) and not victim.invalid()
        final = latest_sequences(kafka_bootstrap, victim.updates)
        assert final == expected_sequences(events)
    finally:
        if victim.proc is not None:
            victim.stop(signal.SIGTERM)


def test_stock_faust_delivery_gives_the_same_sequences(kafka_bootstrap: str, tmp_path: Path) -> None:
    """delivery = "stream" (Faust's per-event stream + take_events, streams/app.py) still works."""
    stock = Worker(kafka_bootstrap, f"stock-{uuid.uuid4().hex[:8]}", tmp_path,
                   extra_env={"RECSYS_STREAMS__DELIVERY": "stream"})  # fmt: skip
    ensure_topic(kafka_bootstrap, stock.actions, PARTITIONS)
    now = now_ms()
    events = list(synthetic_events(300, 30, 50, seed=4, start_ts_ms=now - 3_000, step_ms=10, user_prefix=f"{stock.name}-"))
    bad = [malformed(stock.name, i, events[i].key, now) for i in range(5)]
    with stock.running():
        produce([*events, *(rec for rec, _ in bad)], kafka_bootstrap, stock.actions, progress=False)
        wait_until(lambda: stock.valid() + sum(stock.invalid().values()) >= 305, 60, f"the stock worker ({stock.tail()})")
        assert stock.valid() == 300 and stock.invalid() == Counter(reason for _, reason in bad)
        expected = expected_sequences(events)
        wait_until(lambda: latest_sequences(kafka_bootstrap, stock.updates) == expected, 60, "the stock worker's final state")


def test_the_worker_creates_its_topics_with_the_configured_partitions(kafka_bootstrap: str, tmp_path: Path) -> None:
    """No topic made beforehand, and a partition count the broker's auto-creation would not give:
    `actions` left to the broker got its count while the changelog got the setting's, and Faust
    refused to start (PartitionsMismatch)."""
    from kafka import KafkaConsumer

    partitions = PARTITIONS + 1  # the test broker auto-creates topics with PARTITIONS
    fresh = Worker(kafka_bootstrap, f"fresh-{uuid.uuid4().hex[:8]}", tmp_path,
                   extra_env={"RECSYS_KAFKA__PARTITIONS": str(partitions)})  # fmt: skip
    now = now_ms()
    events = list(synthetic_events(60, 12, 30, seed=5, start_ts_ms=now - 1_000, step_ms=10, user_prefix=f"{fresh.name}-"))
    with fresh.running():
        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        try:
            found = {t: len(consumer.partitions_for_topic(t) or ()) for t in (fresh.actions, fresh.dlq, fresh.updates)}
        finally:
            consumer.close()
        assert found == dict.fromkeys([fresh.actions, fresh.dlq, fresh.updates], partitions)
        produce(events, kafka_bootstrap, fresh.actions, progress=False)
        wait_until(lambda: fresh.valid() >= len(events), 60, f"the fresh worker ({fresh.tail()})")
        wait_until(lambda: latest_sequences(kafka_bootstrap, fresh.updates) == expected_sequences(events), 60,
                   "the fresh worker's sequences")


def test_a_fresh_streams_state_emits_versions_above_the_old_ones(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A reset of the streams state (here: a new app id over the same topics, as a deleted
    changelog or recreated topics also give) must not restart versions: servers keep the highest
    version they hold and would drop every new list as stale."""
    name = f"streams-{uuid.uuid4().hex[:8]}"
    first = Worker(kafka_bootstrap, name, tmp_path / "first")
    first.data_dir.mkdir()
    ensure_topic(kafka_bootstrap, first.actions, PARTITIONS)
    t = now_ms() - 60_000
    events = [ActionEvent(f"u{u}", k, "click", "home", t + 10 * k + u) for u in range(5) for k in range(3)]
    produce(events, kafka_bootstrap, first.actions, progress=False)
    with first.running():
        wait_until(lambda: len(updates_by_user(kafka_bootstrap, first.updates)) == 5, 60, "the first state's updates")
    before = updates_by_user(kafka_bootstrap, first.updates)
    old = {u: max(x["version"] for x in ups) for u, ups in before.items()}

    again = Worker(kafka_bootstrap, name, tmp_path / "again",
                   extra_env={"RECSYS_STREAMS__APP_ID": f"{name}-reset", "RECSYS_STREAMS__INSTANCE_ID": f"{name}-reset"})
    again.data_dir.mkdir()
    with again.running():  # reads `actions` from the start into an empty table
        wait_until(lambda: all(len(ups) > len(before[u]) for u, ups in updates_by_user(kafka_bootstrap, again.updates).items()),
                   60, "the fresh state's updates")
    for user, ups in updates_by_user(kafka_bootstrap, again.updates).items():
        assert ups[-1]["version"] > old[user], (user, old[user], [x["version"] for x in ups])


def test_idle_users_leave_the_table_and_its_changelog_and_come_back_afresh(kafka_bootstrap: str, tmp_path: Path) -> None:
    """streams.forget_idle_ms bounds the table: a user whose last fold is older goes, with a
    tombstone on the changelog (a restart does not bring them back). Back, they start afresh
    (their hide gone too) above every version served; a user active within the bound stays."""
    idle = Worker(kafka_bootstrap, f"idle-{uuid.uuid4().hex[:8]}", tmp_path,
                  # 10 s: `kept` must not fall idle between its two events, which a slow machine
                  # spreads over a metrics poll, a producer and a fetch.
                  extra_env={"RECSYS_STREAMS__FORGET_IDLE_MS": "10000", "RECSYS_STREAMS__SWEEP_EVERY_S": "0"})
    ensure_topic(kafka_bootstrap, idle.actions, PARTITIONS)
    gone, kept = f"{idle.name}-gone", f"{idle.name}-kept"
    t = now_ms() - 60_000
    with idle.running():
        produce([ActionEvent(gone, 1, "click", "home", t), ActionEvent(gone, 2, "hide", "home", t + 1)],
                kafka_bootstrap, idle.actions, progress=False)
        wait_until(lambda: gone in updates_by_user(kafka_bootstrap, idle.updates), 60, "the first update")
        before = updates_by_user(kafka_bootstrap, idle.updates)[gone][-1]
        assert before["hidden"] == [2]
        time.sleep(11.0)  # no window runs meanwhile: the next one finds the user idle
        produce([ActionEvent(kept, 1, "click", "home", t + 2)], kafka_bootstrap, idle.actions, progress=False)
        wait_until(lambda: (idle.metrics() or {}).get("recsys_streams_forgotten_total", 0) >= 1, 60, "the sweep")
        produce([ActionEvent(kept, 2, "click", "home", t + 3), ActionEvent(gone, 3, "click", "home", t + 4)],
                kafka_bootstrap, idle.actions, progress=False)
        wait_until(lambda: events_of(updates_by_user(kafka_bootstrap, idle.updates)[gone][-1]) == [(3, "click", "home", t + 4)],
                   60, "the forgotten user's fresh state")
        wait_until(lambda: len(events_of(updates_by_user(kafka_bootstrap, idle.updates)[kept][-1])) == 2, 60, "kept's second event")
        after = updates_by_user(kafka_bootstrap, idle.updates)[gone][-1]
        assert after.get("hidden", []) == [] and after["version"] > before["version"]
        assert (idle.metrics() or {})["recsys_streams_forgotten_total"] == 1
    tombstones = [r.value is None for r in read_to_end(kafka_bootstrap, idle.changelog) if r.key == gone.encode()]
    # the state (one record per window that folded its events), one tombstone, the fresh state
    assert tombstones.count(True) == 1 and not tombstones[0] and tombstones[-2:] == [True, False], tombstones


def test_a_stored_state_it_cannot_read_starts_the_user_afresh(kafka_bootstrap: str, tmp_path: Path) -> None:
    """A changelog value this release cannot read (another release's form, a record written
    by hand): the user starts afresh, counted, and the partition goes on. Failing the window
    instead would fail it again on every restart, the partition stalled for good."""
    from kafka import KafkaProducer

    w = Worker(kafka_bootstrap, f"unreadable-{uuid.uuid4().hex[:8]}", tmp_path)
    ensure_topic(kafka_bootstrap, w.actions, PARTITIONS)
    user, t = f"{w.name}-u", now_ms() - 60_000
    with w.running():
        produce([ActionEvent(user, 1, "click", "home", t)], kafka_bootstrap, w.actions, progress=False)
        wait_until(lambda: user in updates_by_user(kafka_bootstrap, w.updates), 60, "the first update")
    (partition,) = {r.partition for r in read_to_end(kafka_bootstrap, w.changelog) if r.key == user.encode()}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(w.changelog, key=user.encode(), value=msgpack.packb({"user_id": user, "events": 7}), partition=partition)
    producer.flush()
    producer.close()
    with w.running():  # recovers the table from the changelog, the unreadable value last
        produce([ActionEvent(user, 2, "save", "home", t + 1)], kafka_bootstrap, w.actions, progress=False)
        wait_until(lambda: events_of(updates_by_user(kafka_bootstrap, w.updates)[user][-1]) == [(2, "save", "home", t + 1)],
                   60, "the user's fresh state")
        assert (w.metrics() or {})["recsys_streams_unreadable_states_total"] == 1
