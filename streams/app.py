"""`recsys streams`: the Faust worker that turns `actions` into per-user sequences.

    actions --decode/validate--> fold into Table `sequences` --coalesce--> user-updates
                     \\--invalid / too late--> actions.dlq (reason + original bytes, key cut)

`actions` is read in flush windows: up to `streams.max_batch_events` events, or what arrived
within `streams.flush_interval_s` of a window's first event. By default Faust's consumer hands
each window straight to `process_window` (`streams.delivery = "window"`, streams/delivery.py:
Faust's per-event stream machinery alone caps a worker at ~5k events/s here); with
`"stream"` an agent collects the same windows from Faust's stream (`take_events`). Per window:

1. every event is decoded (`streams.schema.decode_event`); a bad one goes to the DLQ;
2. each user's table value (`streams.sequences.PackedSeq`) is read once, folded with all of
   the user's events of the window and written back once, so its changelog carries one
   record per user per window;
3. the changelog (and DLQ) records are produced and awaited, then one `user-updates` message
   per touched user (a burst of 1,000 events for one user in a second yields a handful of
   updates), and those are awaited (streams/outbox.py: one record batch per partition);
4. only then are the window's events acked, so committed offsets never run ahead of what is
   durable. A crash replays uncommitted events; the fold drops them as duplicates or stale
   and the user is re-emitted with a new version, so no event is lost or folded twice. (The
   DLQ is at-least-once: a refused event replayed is dead-lettered again; its records carry
   topic, partition and offset to de-duplicate by.)

Steps 3-4 of a window run while the next window goes through steps 1-2 (one window's output
in flight at a time, in order), which hides the broker's round trips.

Counters (events by outcome, invalid by reason, updates emitted) are served as Prometheus
text on `http://<web_host>:<web_port>/metrics` and logged every `streams.stats_interval_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import faust
import mode
import msgpack
from faust.streams import _current_event  # the context var Faust's tables read the event from
from faust.types import EventT, Message, StoreT

from recsys.dead_letters import dead_letter
from recsys.settings import Settings, get_settings
from recsys.topics import ensure_own_topics
from streams.delivery import WindowedApp, partition_event, set_current_event
from streams.errors import InvalidEvent
from streams.forget import IdleSweep
from streams.outbox import Outbox
from streams.schema import ActionEvent, decode_event, now_ms
from streams.sequences import Outcome, PackedSeq, hidden_malformed

__all__ = ["Counters", "create_app", "main"]

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """What the worker has done since it started (per process; Prometheus counters)."""

    events: Counter[str] = field(default_factory=Counter)  # valid events by fold outcome
    invalid: Counter[str] = field(default_factory=Counter)  # DLQ records by reason
    updates: int = 0  # user-updates messages sent
    windows: int = 0  # flush windows processed
    forgotten: int = 0  # idle users deleted from the table (streams/forget.py)
    unreadable: int = 0  # stored values that could not be read: those users started afresh

    @property
    def valid(self) -> int:
        return sum(self.events.values())

    def prometheus(self) -> str:
        lines = [
            "# TYPE recsys_streams_events_total counter",
            *(f'recsys_streams_events_total{{outcome="{k}"}} {v}' for k, v in sorted(self.events.items())),
            "# TYPE recsys_streams_invalid_total counter",
            *(f'recsys_streams_invalid_total{{reason="{k}"}} {v}' for k, v in sorted(self.invalid.items())),
            "# TYPE recsys_streams_updates_total counter",
            f"recsys_streams_updates_total {self.updates}",
            "# TYPE recsys_streams_windows_total counter",
            f"recsys_streams_windows_total {self.windows}",
            "# TYPE recsys_streams_forgotten_total counter",
            f"recsys_streams_forgotten_total {self.forgotten}",
            "# TYPE recsys_streams_unreadable_states_total counter",
            f"recsys_streams_unreadable_states_total {self.unreadable}",
        ]
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        return (
            f"valid={self.valid} {dict(self.events)} invalid={sum(self.invalid.values())} "
            f"{dict(self.invalid)} updates={self.updates} windows={self.windows} forgotten={self.forgotten} "
            f"unreadable={self.unreadable}"
        )


def read_counters(port: int, host: str = "127.0.0.1", timeout_s: float = 5.0) -> dict[str, float] | None:
    """A running worker's counters from its `/metrics` page, by series (name and labels as
    printed); None while its web server does not answer (starting, stopped)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    lines = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {series: float(value) for series, value in lines}


def _preview(key: bytes | None, limit: int = 64) -> str:
    """A Kafka key for a message: its first bytes and its size (a key can be ~1 MB)."""
    if key is None or len(key) <= limit:
        return repr(key)
    return f"{key[:limit]!r}... ({len(key)} bytes)"


@dataclass
class _Pending:
    """One user's state while a flush window is folded."""

    key: bytes
    seq: PackedSeq  # the table value, folded in place
    event: EventT  # a Faust event of the user's source partition: table writes are routed by it
    emit: bool = False


def read_state(stored: bytes | None, user_id: Any, counters: Counters) -> PackedSeq:
    """The user's stored sequence, or a fresh one: none stored, or a value this release cannot
    read (another release's form, a record written to the changelog by hand). Raising would
    fail the window, and every restart would fail on the same event: the partition stalled."""
    if stored:
        try:
            return PackedSeq.decode(stored)
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            counters.unreadable += 1
            log.error("streams: the stored state of user %r cannot be read (%s: %s); starting it afresh",
                      user_id, type(exc).__name__, exc)
    return PackedSeq(user_id, 0, [], [], b"")


def fold_or_start_afresh(seq: PackedSeq, event: ActionEvent, settings: Settings, counters: Counters) -> tuple[PackedSeq, Outcome]:
    """`seq.fold(event)`, and the sequence folded into. `PackedSeq.decode` checks a stored value's
    newest entries only (a whole pass costs a quarter of a decode), so older ones that are not
    ours fail here: the user's events start afresh, as in `read_state` (their hides, when they
    are ours, and version kept), instead of the window failing at every restart. A failure on a value that passes the
    whole check (`PackedSeq.malformed`) is a defect, and raises."""
    hidden = seq.hidden
    try:
        return seq, seq.fold(event, settings)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, msgpack.UnpackException) as exc:
        reason = seq.malformed()
        if reason is None:
            raise
        counters.unreadable += 1
        log.error("streams: the stored events of user %r cannot be folded into (%s: %s; %s); starting them afresh",
                  event.user_id, type(exc).__name__, exc, reason)
        kept = hidden if hidden_malformed(hidden) is None else ()
        fresh = PackedSeq(event.user_id, seq.version if type(seq.version) is int else 0, [], [], b"", kept)
        return fresh, fresh.fold(event, settings)


def put_value(store: Any, key: bytes, value: bytes, partition: int) -> None:
    """Write a user's value into the table's store, as recovery would, partition included.

    Faust's memory store drops, once a rebalance's recovery completes, the values of partitions
    it no longer owns, but only those whose partition it knows: the ones it recovered from the
    changelog. A value written live was kept, and when its partition came back (recovery
    replays the changelog from its start over what the store holds) it returned stale if the
    owner in between had forgotten the user and the tombstone was compacted away.
    """
    store[key] = value
    key_partition = getattr(store, "_key_partition", None)  # memory:// only
    if key_partition is not None:
        key_partition[key] = partition


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app (agent, table, topics, window delivery, metrics page) without starting it."""
    cfg = settings.streams
    partitions = settings.kafka.partitions
    if cfg.delivery not in ("window", "stream"):
        raise ValueError(f"streams.delivery must be 'window' or 'stream', not {cfg.delivery!r}")
    if cfg.delivery == "stream" and cfg.flush_interval_s <= 0:
        # Faust's take_events reads within=0 as "no time limit": a quiet stream's events would wait
        # for max_batch_events more to arrive.
        raise ValueError("streams.delivery = 'stream' needs streams.flush_interval_s > 0")
    app = WindowedApp(
        cfg.app_id,
        broker=[f"kafka://{host.strip()}" for host in settings.kafka.bootstrap_servers.split(",")],
        store=cfg.store,
        datadir=str(cfg.data_dir),
        autodiscover=False,
        # An unexpected error ends the worker (exit code 1) instead of restarting the agent in
        # place, where the failed window's events would stay unacked and block every later
        # commit. The restarted process re-reads them; the idempotent fold makes that safe.
        agent_supervisor=mode.CrashingSupervisor,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=partitions,
        topic_replication_factor=cfg.replication_factor,
        topic_disable_leader=True,  # no leader-only tasks here; saves a topic
        consumer_auto_offset_reset="earliest",  # a new group starts from the first event
        broker_max_poll_records=cfg.broker_max_poll_records,
        broker_session_timeout=cfg.session_timeout_s,
        consumer_group_instance_id=cfg.instance_id,
        producer_max_batch_size=cfg.producer_max_batch_bytes,
        table_standby_replicas=0,  # the changelog is the replica; standbys only slow rebalances
        web_enabled=True,
        web_bind=cfg.web_host,
        web_host=cfg.web_host,
        web_port=cfg.web_port,
        web_metrics_enabled=True,  # Faust's own /performance/ (lag, throughput) beside ours
    )
    # Keys and values are bytes end to end: this package encodes and decodes the msgpack.
    # (One Schema object per topic: Faust updates a topic's schema in place.)
    def raw() -> faust.Schema:
        return faust.Schema(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    actions = app.topic(settings.topics.actions, partitions=partitions, schema=raw())
    dlq = app.topic(settings.topics.dlq, partitions=partitions, schema=raw())
    updates = app.topic(settings.topics.user_updates, partitions=partitions, schema=raw())
    # key_type / value_type bytes is what makes Faust pick the raw codec for the changelog.
    table = app.Table(
        "sequences", partitions=partitions, key_type=bytes, value_type=bytes, help="user -> last N events (streams.sequences.PackedSeq)"
    )
    counters = Counters()
    sweep = IdleSweep(cfg)

    def owned_partitions() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == actions.get_topic_name()}
    negative = frozenset(settings.train.negative_actions)  # hides: kept even when too late for the sequence
    declared: list[bool] = []

    async def declare_outputs() -> None:
        # Faust creates the topics it consumes and the changelog; the outputs are created here,
        # before the first send, with the app's partition count (not the broker's defaults).
        if not declared:
            await dlq.maybe_declare()
            await updates.maybe_declare()
            declared.append(True)

    async def process_window(messages: Sequence[Message]) -> Awaitable[None]:
        """Decode, fold and write one window to the table; return its output, to be awaited.

        The output (changelog, then user-updates and DLQ records) is awaited by the caller
        before the window is acked; window delivery awaits it while it processes the next
        window, so the CPU work of one window overlaps the broker round trips of the other."""
        await declare_outputs()
        # Faust's Producer wraps one AIOKafkaProducer; its batch API is not exposed.
        producer = cast(Any, app.producer)._ensure_producer()
        now = now_ms()
        pending: dict[bytes, _Pending] = {}
        first = Outbox(producer)  # changelog records and DLQ records
        events: dict[int, EventT] = {}  # source partition -> a Faust event of it (table routing)
        token = None
        current_partition = -1
        changelog = table.changelog_topic.get_topic_name()
        # Idle users leave before the window is folded: their tombstones precede its records.
        for key, partition in sweep.due(cast(Any, table.data), owned_partitions, now):
            await first.add(changelog, key, None, partition)
            counters.forgotten += 1
        try:
            for msg in messages:
                p: _Pending | None = None
                try:
                    # "Now" for the future check is the record's own time when it is earlier
                    # than the clock: a replay after a crash then judges the event as it was
                    # judged first, and a producer whose clock runs ahead gains nothing. A record
                    # without a timestamp (-1, an old message format) or one before
                    # events.min_ts_ms (a producer that writes seconds: every event of it would
                    # be "in the future") is judged by the clock.
                    record_ms = int(msg.timestamp * 1000) if msg.timestamp else -1
                    if record_ms < settings.events.min_ts_ms:
                        record_ms = now
                    event = decode_event(msg.value, settings, now=min(now, record_ms))
                    key = event.key.encode()
                    if key != msg.key:  # per-user order and the table's partitioning rest on it
                        raise InvalidEvent("wrong key", f"Kafka key {_preview(msg.key)} is not str(user_id)={event.key!r}")
                    p = pending.get(key)
                    if p is None:
                        if msg.partition != current_partition:
                            # Table reads and writes go to the store of this source partition.
                            current_partition = msg.partition
                            pe = events.get(current_partition)
                            if pe is None:
                                pe = events[current_partition] = partition_event(app, msg)
                            if token is not None:
                                _current_event.reset(token)
                            token = set_current_event(pe)
                        seq = read_state(table.data.get(key), event.user_id, counters)
                        p = pending[key] = _Pending(key, seq, events[msg.partition])
                    p.seq, outcome = fold_or_start_afresh(p.seq, event, settings, counters)
                except InvalidEvent as exc:
                    if p is not None and event.action in negative:
                        # A hide too late for the sequence is still taken (fold_hidden), and like
                        # any valid event it re-emits the user even when it changed nothing: it
                        # may be a replay after a crash whose update never left.
                        p.emit = True
                    counters.invalid[exc.reason] += 1
                    # The DLQ record keeps at most dlq_max_key_bytes of the original key (a key
                    # near the broker's limit would otherwise make the DLQ record pass it, fail
                    # the window and stop the partition), and the kept key's bytes come out of
                    # the original's budget: key + value stay well under the broker's limit.
                    kept_key, record = dead_letter(exc, key=msg.key, original=msg.value, topic=msg.topic,
                                                   partition=msg.partition, offset=msg.offset,
                                                   max_key=cfg.dlq_max_key_bytes,
                                                   max_original=cfg.dlq_max_original_bytes)
                    await first.add_beside(dlq.get_topic_name(), kept_key, record, msg.partition)
                    continue
                counters.events[outcome.value] += 1
                # Emit even when the fold changed nothing: a duplicate or stale event may be a
                # replay after a crash whose update never left; re-emitting under a new version
                # repairs that.
                p.emit = True

            # The changelog first: an update is only visible once the state it shows is
            # durable, so a restarted worker never reuses a version consumers have seen. The
            # store is written directly and the changelog records produced and awaited here,
            # not through `table[key] = ...` and Faust's send_soon buffer, whose flush gives
            # up after 0.1 s with records still queued (ProducerBuffer.flush_atmost) and would
            # let offsets be committed ahead of the changelog.
            emitted: list[_Pending] = []
            for p in pending.values():
                if not p.emit:
                    continue
                # A hybrid clock, not a counter: strictly increasing per user as before, and a
                # user whose state starts afresh (a reset of the streams state, a new app id)
                # starts above every version already in `candidates` instead of at 1, which the
                # servers dropped as stale until the older records were gone.
                p.seq.version = max(p.seq.version + 1, now_ms())
                p.seq.partition = p.event.message.partition
                value = p.seq.encode()
                if token is not None:
                    _current_event.reset(token)
                token = set_current_event(p.event)
                put_value(table.data, p.key, value, p.event.message.partition)
                await first.add(changelog, p.key, value, p.event.message.partition)
                emitted.append(p)
        finally:
            if token is not None:
                _current_event.reset(token)
        return send_output(first, changelog, emitted)

    async def send_output(first: Outbox, changelog: str, emitted: list[_Pending]) -> None:
        for tp, offset in (await first.flush()).items():  # raises if a record could not be written
            if tp.topic == changelog:
                cast(StoreT, table.data).set_persisted_offset(tp, offset)  # what Table._on_changelog_sent records
        emitted_at = now_ms()
        topic = updates.get_topic_name()
        then = Outbox(first.producer)
        for p in emitted:
            # The newest action the sequence holds (what the lists will reflect), not the newest
            # of this window's events: a late, duplicate or stale one is older than that.
            await then.add(topic, p.key, p.seq.update(last_event_ts=p.seq.ts[-1], emitted_at=emitted_at))
        await then.flush()
        counters.updates += len(emitted)
        counters.windows += 1

    if cfg.delivery == "window":
        # The consumer hands `actions` to process_window a window at a time (streams/delivery.py);
        # the agent below then only subscribes the topic and never receives an event.
        app.window(actions.get_topic_name(), process_window, max_events=cfg.max_batch_events,
                   within_s=cfg.flush_interval_s)

    async def fold_and_send(window: Sequence[EventT]) -> None:
        await (await process_window([event.message for event in window]))

    @app.agent(actions)
    async def sequences_agent(stream: faust.StreamT) -> None:
        await declare_outputs()
        # delivery = "stream": Faust's own per-event path, batched afterwards by take_events.
        # take_events acks a window in a `finally` once the loop body leaves it, whatever the
        # outcome, and a stopping worker then commits it. So a window's output is finished even
        # when the agent is cancelled (SIGTERM), and a window that fails ends the process before
        # the generator can close: unacked, it is read again after the restart.
        async for window in cast(faust.Stream, stream).take_events(cfg.max_batch_events, within=cfg.flush_interval_s):
            done = asyncio.ensure_future(fold_and_send(window))
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                # As long as the group would wait for a silent member, then unacked.
                await exit_unacked_on_failure(done, cfg.session_timeout_s)
                raise
            except Exception:  # noqa: BLE001 - judged (and the process ended) in there
                await exit_unacked_on_failure(done, 0.0)

    @app.timer(interval=cfg.stats_interval_s)
    async def log_counters() -> None:
        log.info("streams: %s", counters.summary())

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        return web.text(counters.prometheus(), content_type="text/plain; version=0.0.4")

    app.recsys_counters = counters  # type: ignore[attr-defined]  # for in-process tests and tools
    return app


async def exit_unacked_on_failure(window: asyncio.Future[None], within_s: float) -> None:
    """Wait for a window's output to finish; if it failed, or is not done within ``within_s``
    (a stopping worker whose broker is gone: its sends would retry for many minutes), end the
    process at once (exit 1), before anything can ack or commit the window's events."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not window.done():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            break
        try:
            await asyncio.wait_for(asyncio.shield(window), left)
        except asyncio.CancelledError:
            continue  # the agent is stopping: the window still finishes first
        except Exception:  # noqa: BLE001 - judged below (a timeout included)
            pass
    error = None if not window.done() or window.cancelled() else window.exception()
    if not window.done() or window.cancelled() or error is not None:
        log.critical("streams: a window %s; exiting without acking it",
                     "failed" if window.done() else f"was not written within {within_s:.0f} s", exc_info=error)
        logging.shutdown()
        os._exit(1)


def ensure_topics_before_start(settings: Settings, names: Sequence[str]) -> bool:
    """`recsys.topics.ensure_own_topics`, obeying SIGTERM / SIGINT while it waits for the
    broker (Faust's worker installs its own handlers only once it runs); False if told to stop."""
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return ensure_own_topics(settings, names, stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str]) -> int:
    """`recsys streams [--loglevel LEVEL]`: run the worker until SIGTERM / SIGINT."""
    settings = get_settings()
    p = argparse.ArgumentParser(prog="recsys streams", description=__doc__.split("\n\n")[0])
    p.add_argument("--loglevel", default=settings.streams.loglevel)
    args = p.parse_args(argv)
    settings.streams.data_dir.mkdir(parents=True, exist_ok=True)
    # Faust creates only its own topics (the changelog). `actions` left to the broker's
    # auto-creation gets the broker's partition count, and when that differs from
    # kafka.partitions, which the changelog gets, Faust refuses to start (PartitionsMismatch);
    # a cluster without auto-creation would never have it.
    t = settings.topics
    if not ensure_topics_before_start(settings, [t.actions, t.dlq, t.user_updates]):
        log.warning("streams: stopped before Kafka could be reached")
        return 0
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=args.loglevel, redirect_stdouts=False)
    # Faust's progress spinner sets the root logger to DEBUG at log levels >= WARNING, and then
    # every debug call of aiokafka and Faust builds a log record: ~8% of the worker's time.
    worker.spinner = None
    try:
        worker.execute_from_commandline()  # handles SIGTERM / SIGINT: stops cleanly, commits acked offsets
    except SystemExit as exc:
        log.info("streams stopped: %s", app.recsys_counters.summary())  # type: ignore[attr-defined]
        return int(exc.code or 0)
    return 0
