"""Follows the compacted `candidates` topic into the CandidateStore, in the server's event loop.

Every server process reads ALL partitions from the beginning (no consumer group, so the
consumer assigns itself every partition, new ones included; no committed offsets): the compacted topic holds the latest record of every user, so a restarted or new
replica recovers everyone's candidates by reading it whole, then keeps up with new records.
A server restarted from its snapshot goes on from the offsets the snapshot's records were read
up to (`SnapshotInfo.positions`) and reads only what came since. A partition added later is read
from its start, the others go on from where they were (aiokafka, without a group, reassigns
every partition from its start then); a topic recreated under the server (found when the
consumer falls back below what was read) is read whole, what came from the old one dropped.
`caught_up` is set once every partition has been read up to the end offset it had at start;
the server reports SERVING on gRPC health only then, so a load balancer never sends traffic to
a replica that would answer with fallbacks for users it has not read yet.

Records are msgpack (the brief's `candidates` contract); a malformed record is counted and
skipped, a null value (tombstone) forgets the user. The store's newest-wins rule makes the
order of partitions and replays irrelevant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from recsys.settings import Settings
from recsys.topics import POPULAR_KEY
from serving.eligibility import Eligibility
from serving.fallback import PopularityFallback
from serving.store import CandidateStore, SnapshotInfo
from vector_store.indexer import BadItemMessage, decode_item  # the indexer's rules, not a copy of them

__all__ = ["CandidatesFollower", "EligibilityFollower", "PopularFollower", "decode_value"]

log = logging.getLogger(__name__)


# What garbage bytes raise from msgpack: its own errors (ValueError subclasses), and TypeError
# for a map keyed by an array or a map (unhashable in Python).
UNDECODABLE = (ValueError, TypeError, msgpack.UnpackException)


def decode_value(raw: bytes) -> Any:
    """msgpack -> Python; raises one of UNDECODABLE on garbage (the caller counts them)."""
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


class CandidatesFollower:
    """Reads the whole `candidates` topic, then follows it; `caught_up` marks the first."""

    def __init__(self, settings: Settings, store: CandidateStore, *, topic: str | None = None,
                 start: SnapshotInfo | None = None) -> None:
        self.settings = settings
        self.store = store
        self.topic = topic or settings.topics.candidates
        # A loaded snapshot's header: its records were read up to these positions, from which
        # the follower goes on (a warm start) when they fit the topic.
        self.loaded = start  # what the store was loaded with (`snapshot_info`)
        self.resume_from = start if start is not None and start.topic == self.topic else None
        # The snapshot lacks users its store had to evict, which a larger store can hold: the
        # topic is read whole (over the snapshot, newest-wins) to bring them back.
        self.read_whole = start is not None and start.evicted and start.max_users < store.max_users
        self.caught_up = asyncio.Event()
        self.records = 0  # records read (all kinds)
        self.positions: dict[int, int] = {}  # partition -> next offset, of the records applied
        self.stamps: dict[int, int] = {}  # partition -> the newest record timestamp applied (`SnapshotInfo.stamps`)
        # Wall clock (ms) of the last fetch since the follower read the topic to its end: the
        # snapshot's freshness (`SnapshotInfo`); None until then (a topic that does not exist).
        self.fresh_at_ms: int | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start following in a background task. Returns at once: connecting waits out a broker
        that is not up yet (processes of a deployment start in any order, and a broker restart
        takes tens of seconds), and catch-up follows; the server stays NOT_SERVING meanwhile."""
        self._task = asyncio.create_task(self._connect_and_run(), name="candidates-follower")

    async def _connect_and_run(self) -> None:
        cfg = self.settings.serving
        while self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.settings.kafka.bootstrap_servers,
                # No group: the consumer assigns itself every partition of the subscribed topic
                # (and new ones as metadata shows them); nothing is committed.
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",  # no committed offsets: always from the beginning
                client_id=f"{cfg.group_id}-follower",
                max_partition_fetch_bytes=cfg.max_fetch_bytes,
                fetch_max_bytes=cfg.max_fetch_bytes,
                metadata_max_age_ms=cfg.metadata_refresh_ms,
            )
            try:
                await consumer.start()
            except KafkaError as exc:
                await consumer.stop()
                log.warning("candidates follower: Kafka at %s unreachable (%s); retrying in %.1f s",
                            self.settings.kafka.bootstrap_servers, exc, cfg.metadata_retry_s)
                await asyncio.sleep(cfg.metadata_retry_s)
                continue
            except asyncio.CancelledError:  # stopped while connecting
                await consumer.stop()
                raise
            self._consumer = consumer
        await self._run()

    async def stopped(self) -> BaseException | None:
        """Wait until the follower ends on its own (it retries what Kafka throws at it, so only
        a defect or a setting it cannot use ends it); its error. Cancelled by stop()."""
        assert self._task is not None, "start() first"
        await asyncio.wait([self._task])
        return None if self._task.cancelled() else self._task.exception()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # A task that already died keeps its error: stopping must go on (the other
            # followers, the snapshot); serve() has reported it.
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            try:
                await consumer.stop()
            except (KafkaError, asyncio.CancelledError) as exc:
                # With the broker gone, aiokafka's fetcher can end its close with the
                # cancellation of its own fetch: the server's shutdown (the other followers, the
                # snapshot) must go on. A cancellation of this task itself is passed on.
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                    raise
                log.warning("follower of %s: closing the consumer failed (%s)", self.topic, type(exc).__name__)

    async def _wait_for_topic(self, consumer: AIOKafkaConsumer) -> None:
        """Subscribe once the topic exists. Subscribing earlier would make the broker auto-create
        it with default (non-compacted) settings; a missing topic holds nothing to catch up on
        meanwhile, and the users of a snapshot read from it are dropped (a recreated topic's
        rule: the topic they came from is gone)."""
        cfg = self.settings.serving
        while True:
            try:
                topics = await consumer.topics()
            except KafkaError as exc:
                # Not "the topic does not exist": a replica marked caught up here would report
                # SERVING with an empty store and answer every known user with fallbacks.
                log.warning("candidates follower: metadata failed (%s); retrying", exc)
                await asyncio.sleep(cfg.metadata_retry_s)
                continue
            if self.topic in topics:
                consumer.subscribe([self.topic])
                return
            if self.resume_from is not None and self.resume_from.positions:
                log.warning("follower of %s: the topic the snapshot was read from (up to %s) does not exist: its "
                            "users dropped", self.topic, self.resume_from.positions)
                self._forget_all()
                self.resume_from = self.loaded = None
            if not self.caught_up.is_set():
                log.info("candidates follower: topic %s does not exist yet; serving fallbacks", self.topic)
                self.caught_up.set()
            await asyncio.sleep(cfg.metadata_refresh_ms / 1000)

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "start() first"
        cfg = self.settings.serving
        await self._wait_for_topic(consumer)
        pending: dict[TopicPartition, int] | None = None  # end offsets to reach before SERVING
        known: set[TopicPartition] | None = None  # the partitions assigned when last looked
        realign_at: float | None = None  # when to realign the consumer with the positions applied
        read_to_end = False  # not caught_up: that is also set while the topic does not exist
        while True:
            if not read_to_end:
                try:
                    if pending is None and (assigned := consumer.assignment()):
                        ends = await consumer.end_offsets(list(assigned))
                        if self.resume_from is not None:
                            await self._resume(consumer, ends)
                        pending = ends
                        log.info("follower of %s: catching up to %s", self.topic, pending)
                    elif pending is None and self.resume_from is not None:
                        # No fetch before the seek: it would read the partitions from their start.
                        await asyncio.sleep(cfg.poll_ms / 1000)
                        continue
                    if pending is not None:
                        for tp in [tp for tp, end in pending.items() if await consumer.position(tp) >= end]:
                            del pending[tp]
                        if not pending:
                            log.info("follower of %s: caught up (%d records)", self.topic, self.records)
                            read_to_end = True
                            self.fresh_at_ms = int(time.time() * 1000)
                            self.caught_up.set()
                except KafkaError as exc:
                    log.warning("candidates follower: metadata failed (%s); retrying", exc)
                    if self.resume_from is not None:  # no fetch before the seek (above)
                        await asyncio.sleep(cfg.metadata_retry_s)
                        continue
            if (assigned := consumer.assignment()) and assigned != known:
                if known is not None:  # the first assignment is _resume's
                    # A partition added (or the topic recreated with others): aiokafka resets
                    # every partition to its start; realigned before the fetch where it can be.
                    realign_at = 0.0
                known = assigned
            if realign_at is not None and time.monotonic() >= realign_at:
                # Retried, not waited on: the records below the positions are skipped meanwhile,
                # and a partition that cannot answer must not stop the others being read.
                realign_at = None if await self._realign(consumer) else time.monotonic() + cfg.metadata_retry_s
                if realign_at is None and not read_to_end:
                    pending = None  # the end offsets to catch up to, of the partitions now assigned
            try:
                batches = await consumer.getmany(timeout_ms=cfg.poll_ms, max_records=cfg.poll_max_records)
            except KafkaError as exc:
                log.warning("candidates follower: fetch failed (%s); retrying", exc)
                await asyncio.sleep(cfg.metadata_retry_s)
                continue
            applied = 0
            for record in (record for records in batches.values() for record in records):
                if record.offset < self.positions.get(record.partition, 0):
                    # Below what was applied: a reassignment the check above did not see in
                    # time, or a partition out of range (the topic recreated under the server
                    # with the same partitions). Skipped, and the consumer realigned; the rest
                    # of the batch is applied (other partitions' records would be lost).
                    realign_at = 0.0 if realign_at is None else realign_at
                    continue
                applied += 1
                if applied % cfg.apply_yield_every == 0:
                    # Decoding a full fetch takes tens of ms: let the RPCs waiting meanwhile run.
                    await asyncio.sleep(0)
                try:
                    self._apply(record.key, record.value)
                except Exception:  # noqa: BLE001 - one record must not end the follower
                    # A record this code cannot handle is a bug, but ending the task would
                    # leave the replica serving stale lists (or never SERVING) silently,
                    # and the compacted topic keeps the record: every restart would too.
                    self.store.malformed += 1
                    log.exception("candidates follower: record %s:%d:%d skipped",
                                  record.topic, record.partition, record.offset)
                # After the record is applied: a cancellation at the yield above must not
                # leave a snapshot saying it was.
                self.positions[record.partition] = record.offset + 1
                if record.timestamp is not None and record.timestamp > self.stamps.get(record.partition, -1):  # None: v0 records
                    self.stamps[record.partition] = record.timestamp
            if read_to_end:
                self._note_freshness(consumer)

    def snapshot_info(self) -> SnapshotInfo:
        """The header of a snapshot of the store now. Fresh as of the last fetch from the topic;
        one never read leaves the records as fresh as the snapshot they came from (or of unknown
        age: not reloaded), and a follower that never went on from that snapshot (its broker not
        reached) keeps its positions and bound, against which the topic is checked when it is
        there again."""
        loaded, store = self.loaded, self.store
        read = loaded if loaded is not None and self.resume_from is not None else None
        return SnapshotInfo(
            self.topic, dict(read.positions if read else self.positions),
            self.fresh_at_ms or (loaded.fresh_at_ms if loaded is not None else None),
            # the bound its users were kept under: the snapshot's, if they are its
            min(store.max_users, read.max_users) if read else store.max_users,
            store.evicted > 0 or (loaded is not None and loaded.evicted),
            dict(read.stamps if read else self.stamps))

    def _note_freshness(self, consumer: AIOKafkaConsumer) -> None:
        """`fresh_at_ms` = the oldest of the partitions' last fetch responses, when every one
        has been read to its high watermark. aiokafka's getmany returns nothing, without an
        error, while the broker is unreachable: the wall clock would date a cut-off server's
        store now, and a snapshot of it would pass the tombstone-retention check."""
        stamps = []
        for tp in consumer.assignment():
            stamp, highwater = consumer.last_poll_timestamp(tp), consumer.highwater(tp)
            if stamp is None or highwater is None or self.positions.get(tp.partition, 0) < highwater:
                return  # not known to be at the end: the older freshness stands
            stamps.append(stamp)
        if stamps:
            self.fresh_at_ms = max(self.fresh_at_ms or 0, min(stamps))

    async def _resume(self, consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> None:
        """Seek each partition to where the loaded snapshot's records were read up to. A topic
        recreated since is not the one its users came from (a position past a partition's end,
        or a record below a position newer than every one read there): they are dropped, and
        the topic is read whole instead; so it is, over the snapshot, by a store larger than the
        one that had to evict users (`read_whole`)."""
        assert self.resume_from is not None
        info = self.resume_from
        recreated = await self._recreated(consumer, ends, info.positions, info.stamps)
        if recreated or self.read_whole:
            if recreated:
                log.warning("follower of %s: the topic is not the one the snapshot was read from (positions %s, ends %s): "
                            "a recreated topic; its users dropped, the topic read whole", self.topic, info.positions,
                            {tp.partition: end for tp, end in ends.items()})
                self._forget_all()
            await consumer.seek_to_beginning(*ends)
            self.resume_from = None
            return
        for tp in ends:
            # Not behind what was fetched already; a position before the log's start (records
            # deleted) is moved there by the consumer's reset.
            if (offset := info.positions.get(tp.partition)) is not None and offset > await consumer.position(tp):
                consumer.seek(tp, offset)
                self.positions[tp.partition] = offset
                if tp.partition in info.stamps:
                    self.stamps[tp.partition] = max(self.stamps.get(tp.partition, -1), info.stamps[tp.partition])
        # Only now: a KafkaError above (the assignment replaced mid-way) leaves it, and the checks
        # and seeks run again; no fetch comes first, which would read the partitions from their start.
        self.resume_from = None
        log.info("follower of %s: going on from the snapshot's positions %s", self.topic, info.positions)

    async def _realign(self, consumer: AIOKafkaConsumer) -> bool:
        """After a reassignment (every partition from its start) or a fall back below the
        records applied: go on from the positions applied, other partitions where they are;
        unless the topic is not the one they were read from (`_recreated`): then everything read
        is dropped and the topic read whole. False when Kafka failed (to be tried again)."""
        try:
            ends = await consumer.end_offsets(list(consumer.assignment()))
            if await self._recreated(consumer, ends, self.positions, self.stamps):
                log.warning("follower of %s: the topic was recreated (positions %s, ends %s): what was read from it "
                            "dropped, the topic read whole", self.topic, self.positions,
                            {tp.partition: end for tp, end in ends.items()})
                self._forget_all()
                await consumer.seek_to_beginning(*ends)
                return True
            for tp in ends:
                if (offset := self.positions.get(tp.partition)) is not None:
                    consumer.seek(tp, offset)
        except KafkaError as exc:
            log.warning("follower of %s: realigning after a reassignment failed (%s); retrying", self.topic, exc)
            return False
        log.info("follower of %s: %d partitions assigned; going on from %s", self.topic, len(ends), self.positions)
        return True

    @staticmethod
    async def _recreated(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int], positions: dict[int, int],
                         stamps: dict[int, int]) -> bool:
        """Whether the topic is not the one read up to `positions`: a position past a
        partition's end, or a record below a position newer than every one read there (every
        record below a position was read, so none there is newer than the newest read,
        whatever the producers' clocks: one that is was written since)."""
        if any(positions.get(tp.partition, 0) > end for tp, end in ends.items()):
            return True
        if not stamps:
            return False
        found = await consumer.offsets_for_times({tp: stamps[tp.partition] + 1 for tp in ends
                                                  if tp.partition in stamps and tp.partition in positions})
        return any(at is not None and at.offset < positions[tp.partition] for tp, at in found.items())

    def _forget_all(self) -> None:
        """Drop what was read from the topic (it is not the one it came from)."""
        self.store.clear()
        self.positions.clear()
        self.stamps.clear()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        self.records += 1
        if value is None:  # tombstone: the user was deleted upstream
            if key is not None:
                self.store.delete(key.decode("utf-8", errors="replace"))
            return
        try:
            decoded = decode_value(value)
        except UNDECODABLE as exc:
            self.store.malformed += 1
            log.debug("candidates follower: undecodable record (%s)", exc)
            return
        self.store.apply(decoded)


class PopularFollower(CandidatesFollower):
    """Follows `popular` (the worker's per-surface popularity lists, read from the vector store,
    in the `candidates` format) into the PopularityFallback. A one-user CandidateStore does the
    validation, newest-wins and tombstones exactly as for users."""

    def __init__(self, settings: Settings, fallback: PopularityFallback) -> None:
        super().__init__(settings, CandidateStore(1, max_items=fallback.size), topic=settings.topics.popular)
        self.fallback = fallback

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key != POPULAR_KEY.encode():
            # The one-user store would take any user's record and evict the worker's lists with
            # it: unknown users would get the model table's list until the next publication.
            self.records += 1
            self.store.malformed += 1
            return
        super()._apply(key, value)
        self.fallback.published = self.store.get(POPULAR_KEY)

    def _forget_all(self) -> None:
        super()._forget_all()
        self.fallback.published = None


class EligibilityFollower(CandidatesFollower):
    """Follows `items` (the catalogue: which surfaces each item may be served on) into the
    server's Eligibility, so that an item withdrawn after a user's lists were computed leaves
    them at once. Read whole before SERVING, as `candidates` is."""

    def __init__(self, settings: Settings, eligibility: Eligibility) -> None:
        super().__init__(settings, CandidateStore(1), topic=settings.topics.items)
        self.eligibility = eligibility

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        self.records += 1
        events = self.settings.events
        try:
            item = decode_item(value, events.max_id_length, events.surfaces)
        except BadItemMessage:
            return  # the indexer dead-letters it; the item keeps its last valid eligibility
        if key != str(item.item_id).encode():
            return  # "wrong key", likewise
        self.eligibility.apply(str(item.item_id), item.surfaces)

    def _forget_all(self) -> None:
        super()._forget_all()
        self.eligibility.clear()
