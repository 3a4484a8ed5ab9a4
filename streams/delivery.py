"""Window delivery: Faust's consumer hands a topic's messages to one coroutine, a window at a time.

Faust delivers every message on its own: the fetch loop starts four asyncio tasks per message
(`mode.Service.wait_first` in `Consumer._drain_messages`), the conductor decodes it into an
Event and queues it, the stream dequeues it, sets the per-event context, runs its processors
and acks it. With no processing at all that caps a worker at about 4,400 events/s on the
development machine (benchmarks/sections/ingest.md), a hundredth of what a bare aiokafka
consumer reads there. `take_events` only batches *after* all of that.

`WindowedApp` keeps everything else of Faust - the consumer group and its assignor, table
recovery and the changelog, commits of acked offsets, rebalances, the web server - and
changes only the last step for the topics registered with `WindowedApp.window`: in the
fetch loop their messages are collected into a window (up to `max_events`, or `within_s`
seconds after its first message) and the window is handed to the handler in one call, in
the fetch task. The handler does the window's CPU work and returns its output still to be
awaited (sends); that is awaited in a task of its own while the next window is processed,
one window's output at a time, in window order. Messages of every other topic (changelogs
during recovery, ...) take Faust's usual path. The bookkeeping a stream does is kept, so
Faust's guarantees hold:

- a window is tracked as unacked before the handler runs and acked, message by message, only
  after its output completed: committed offsets never pass a message whose effects are not
  durable;
- a rebalance waits for the window in the handler (`Consumer.wait_empty`, as for a stream);
- messages fetched under an older consumer generation, or while the flow is stopped for a
  rebalance, are dropped unprocessed and unacked, as a stream skips them; Faust seeks back to
  the committed offsets, so they are read again by whoever owns the partition then, and a
  partition with no commit yet (the group's first commit comes seconds after a start) is sought
  to its start (`WindowConsumer.perform_seek`);
- a fetch asks for a snapshot of the active partitions, not Faust's live set, which a pause
  can empty while the fetch waits (`WindowConsumer._getmany`);
- if the fetch task is cancelled (shutdown) or the handler or its output fails, the window is
  untracked without an ack (re-read after a restart), and a failure crashes the worker, as
  the app's `CrashingSupervisor` does for an agent (tests/streams/test_streams_worker.py).

The table writes of a handler need Faust's current event (it routes them to the changelog
partition of the source partition): `partition_event` makes one per source partition.

This overrides `faust.transport.consumer.Consumer._drain_messages` (and wraps `_getmany` and
`perform_seek`) of faust-streaming 0.15.3, the version pinned in pyproject.toml: the override
keeps the original's loop (read offsets, gaps, commit_every, periodic yields) and must be
re-checked on an upgrade (tests/streams/test_window_consumer.py fails when any of the three
methods' source differs from the one read).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence
from functools import cached_property
from time import monotonic
from typing import Any, NamedTuple, cast

import faust
from faust.streams import _current_event  # the context var Faust's tables read the event from
from aiokafka import TopicPartition
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import EventT, Message

__all__ = ["WindowHandler", "WindowSpec", "WindowedApp", "partition_event", "set_current_event"]

# Processes a window and returns what is left to await (its output) before the window is acked.
WindowHandler = Callable[[Sequence[Message]], Awaitable[Awaitable[None]]]


class WindowSpec(NamedTuple):
    handler: WindowHandler
    max_events: int  # a window closes at this many messages ...
    within_s: float  # ... or this long after its first message


def partition_event(app: faust.App, message: Message) -> EventT:
    """A Faust event for `message` (its partition is what the table routes writes by)."""
    return app.create_event(message.key, message.value, message.headers, message)


def set_current_event(event: EventT) -> Any:
    """Make `event` Faust's current event (as a stream does per event); returns the reset token."""
    return _current_event.set(weakref.ref(event))


class WindowConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer whose fetch loop hands windowed topics to their handlers."""

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - runs in the worker
        app = cast(WindowedApp, self.app)
        specs = app.windowed
        if not specs:
            await super()._drain_messages(fetcher)
            return
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = app.topics.acks_enabled_for
        windows: dict[str, list[Message]] = {topic: [] for topic in specs}
        deadlines: dict[str, float] = {}  # topic -> when its open window closes
        yield_every, since_yield = 100, 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                # Wait for records at most until the first open window is due.
                timeout = max(0.0, min(deadlines.values()) - monotonic()) if deadlines else 1.0
                ait = getmany(timeout=timeout)
                await self.sleep(0)  # as the original: never hog the loop between fetches
                if not self.should_stop:
                    async for tp, message in ait:
                        since_yield += 1
                        if since_yield > yield_every:
                            await asyncio.sleep(0)
                            since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and offset < r_offset:
                            continue  # already read (the original drops these too)
                        gap = offset - (r_offset or 0)
                        if gap > 1 and r_offset and acks_enabled_for(message.topic):
                            await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None and self._n_acked >= commit_every:
                            self._n_acked = 0
                            await self.commit()
                        window = windows.get(tp.topic)
                        if window is None:  # not windowed: Faust's per-message path
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        else:
                            if not window:
                                deadlines[tp.topic] = monotonic() + specs[tp.topic].within_s
                            window.append(message)
                            if len(window) >= specs[tp.topic].max_events:
                                await self._run_window(tp.topic, windows, deadlines)
                        set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
                now = monotonic()
                for topic in [t for t, due in deadlines.items() if due <= now]:
                    await self._run_window(topic, windows, deadlines)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _run_window(self, topic: str, windows: dict[str, list[Message]], deadlines: dict[str, float]) -> None:
        app = cast(WindowedApp, self.app)
        window, windows[topic] = windows[topic], []
        deadlines.pop(topic, None)
        # What a stream skips: messages of an older generation or read while the flow stopped
        # for a rebalance. Unacked, they are read again from the committed offset.
        generation = app.consumer_generation_id
        live = [m for m in window if m.generation_id == generation] if self.flow_active else []
        if not live:
            return
        for message in live:
            self.track_message(message)  # unacked: a rebalance or shutdown waits for it
        completion: Awaitable[None] | None = None
        try:
            completion = await app.windowed[topic].handler(live)
            # One window's output in flight at a time, in window order: this window's I/O
            # starts only once the previous window's is done (and acked).
            previous, self._in_flight = self._in_flight, None
            if previous is not None:
                await previous
        except BaseException as exc:
            if asyncio.iscoroutine(completion):
                completion.close()
            await self._failed(topic, live, exc)
            raise
        self._in_flight = asyncio.ensure_future(self._complete(topic, completion, live))

    _in_flight: asyncio.Future[None] | None = None

    async def _getmany(self, active_partitions: set[Any] | None, timeout: float) -> Any:
        # A copy: aiokafka filters the records it hands out by this set while it waits for
        # them, in the consumer's thread, and Faust's pause_partitions empties the same set
        # object in place (at the end of changelog recovery, before it resumes the source
        # partitions). To aiokafka an empty set means "every partition": a fetch that woke in
        # that moment returned the backlog of `actions`, which Faust then dropped as not active,
        # and with nothing committed yet no seek ever brought it back (tests/test_fault_injection.py).
        return await super()._getmany(None if active_partitions is None else set(active_partitions), timeout)

    async def perform_seek(self) -> None:
        """Seek every partition to its committed offset, and a windowed one with none to its start.

        Faust seeks back to the committed offsets whenever it drops fetched messages unprocessed
        (a rebalance, a stopped flow, a window of an older generation). Before the group's first
        commit (every `commit_interval`, the first one some seconds after a start) there is no
        committed offset, Faust's seek does nothing for that partition, and the dropped messages
        would never be read again. From the start is where a group without a commit reads from
        (`consumer_auto_offset_reset="earliest"`); replaying what was already folded is safe,
        as the fold drops duplicates."""
        await super().perform_seek()
        windowed = cast(WindowedApp, self.app).windowed
        fresh = [TopicPartition(tp.topic, tp.partition) for tp in self.assignment()
                 if tp.topic in windowed and not self._committed_offset.get(tp)]
        if fresh:
            await self._thread.seek_to_beginning(*fresh)

    async def _complete(self, topic: str, completion: Awaitable[None], live: list[Message]) -> None:
        """Await a window's output, then ack it (runs while the next window is processed)."""
        app = cast(WindowedApp, self.app)
        try:
            await completion
        except BaseException as exc:
            await self._failed(topic, live, exc)
            raise
        ack = self.ack
        on_message_out = app.sensors.on_message_out
        for message in live:
            if ack(message):
                on_message_out(message.tp, message.offset, message)
        inbound = self._stream_inbound_time  # what Faust's stall detector reads per partition
        now = monotonic()
        for tp in {m.tp for m in live}:
            inbound[tp] = now

    @cached_property
    def _stream_inbound_time(self) -> dict[Any, float]:
        return cast(dict[Any, float], self.app.monitor.stream_inbound_time)

    async def _failed(self, topic: str, live: list[Message], exc: BaseException) -> None:
        # Not acked: untracked, so that shutdown and rebalances do not wait for it; it is read
        # again from the committed offset by whoever owns the partition next.
        unacked = self._unacked_messages
        for message in live:
            unacked.discard(message)
        if not isinstance(exc, asyncio.CancelledError):
            self.log.exception("window of %r failed: %r", topic, exc)
            await self.app.crash(exc)  # a bug or a lost broker: end the worker, as CrashingSupervisor does


class WindowTransport(aiokafka_driver.Transport):
    Consumer = WindowConsumer


class WindowedApp(faust.App):
    """A `faust.App` whose consumer can deliver chosen topics a window at a time (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.windowed: dict[str, WindowSpec] = {}

    def window(self, topic: str, handler: WindowHandler, *, max_events: int, within_s: float) -> None:
        """Deliver `topic` to `handler` in windows instead of to its agent's stream.

        The topic still needs a consumer of its own in the app (an agent) for Faust to
        subscribe to it and co-partition the tables with it."""
        assert max_events >= 1 and within_s >= 0, f"bad window: {max_events} events, {within_s} s"
        self.windowed[topic] = WindowSpec(handler, max_events, within_s)

    def _new_transport(self) -> Any:
        return WindowTransport(self.conf.broker_consumer, self)
