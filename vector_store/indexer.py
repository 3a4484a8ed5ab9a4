"""`recsys index`: load the model's item embeddings into the vector store, then keep the store
current from the `items` topic so a new item is retrievable without restarting anything.

Two sources, one write path (`index_items` / `index_item_table`):
- bulk: `items.npz` of the exported model (ids, L2-normalised embeddings, popularity); every
  item is eligible on every configured surface until the `items` topic says otherwise.
- stream: the `items` topic (msgpack, key = str(item_id); value {"item_id", "features"?,
  "surfaces"? (missing = all), "created_at", "popularity"? (missing = the last one the
  item's records gave, else unchanged; 0 for a new item)}). A new item's embedding comes from
  the model's item encoder (`item_encoder.onnx`) through an `embed_items(items) -> [N, D]`
  callable; an item already stored keeps its trained vector unless the message carries
  content features, and only its payload (surfaces, popularity, created_at) changes.

`items` is compacted: its latest record per item is the item, so a record should carry the
whole item (features included); a shard built later (a new worker, a rebuilt one) reads the
topic from the start, each Edge shard in a consumer group of its own (`items_group`), and so
does a new model's follower (the model version is in the group), re-embedding the items
published since the previous export in the new model's space. A follower that starts behind
indexes each item's newest record up to the topic's end at its start and passes over the older
ones (`CatchUp`): replayed in order, an item withdrawn later would be served as eligible until
the replay reached its withdrawal.

Offsets are committed only after the upsert is durable, so a crash re-reads (at least once;
upserts are idempotent). Refused records (malformed, an unknown surface, or an item the
encoder cannot embed: features of the wrong width, or an id outside the model's vocabulary
with no content features, which would get the same vector as every other such item) go to
`items.dlq` with a reason (ITEM_REASONS) in the `actions.dlq` format, before the batch is
committed; never fatal.

The bulk load runs when the store's catalogue marker does not name the exported model's
version: a first start, a load cut short, or a new model.

Qdrant Edge allows one process per shard: with the edge backend the follower must run inside
the process that queries the store (`ItemsFollower.run` in a thread), not beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
import msgpack
import numpy as np

from recsys.dead_letters import bounded_detail, dead_letter
from recsys.settings import Settings, get_settings
from recsys.topics import ensure_own_topics
from vector_store import open_store
from vector_store.base import VectorStore
from vector_store.schema import ItemId, ItemRecord, point_id

log = logging.getLogger(__name__)

EmbedItems = Callable[[Sequence["ItemMessage"]], np.ndarray]  # items -> [N, D] float32
IdBucket = Callable[[Sequence[ItemId]], np.ndarray]  # item ids -> int64 [N] hash buckets
OnRefused = Callable[["ItemMessage", "BadItemMessage"], None]  # an item the encoder refused, and why
OnEmbedded = Callable[[list[str], np.ndarray], None]  # ids (as text) and vectors of the items just embedded and stored


# The stable reasons an `items` record is refused for; its dead-letter record carries one.
ITEM_REASONS: tuple[str, ...] = (
    "tombstone",  # a null value: items are withdrawn with `surfaces: []`, not deleted
    "not msgpack",
    "not a map",
    "wrong type",  # e.g. item_id neither int nor str, created_at not an int
    "bad value",  # right type, wrong value: blank / too long id, non-finite number
    "unknown surface",  # a surface not in settings.events.surfaces (it would be eligible nowhere)
    "wrong key",  # the Kafka key is not str(item_id): compaction keeps one record per key
    "cannot embed",  # the model has nothing to embed it from (features of the wrong width, or none for an unseen id)
)


class CatalogueReloaded(RuntimeError):
    """A new bulk load of the store: a follower in the previous load's group stops (exit 1,
    restarted by its supervisor) to read `items` again in the new one's."""


class DeadLetterFailed(RuntimeError):
    """Refused `items` records could not be written to `items.dlq`: the batch stays uncommitted."""


class BadItemMessage(ValueError):
    """An `items` record that does not follow the wire contract or that the model cannot
    embed: refused, counted and dead-lettered with its `reason` (one of ITEM_REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in ITEM_REASONS, f"unknown reason {reason!r}; add it to ITEM_REASONS"
        detail = bounded_detail(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ItemMessage:
    """One decoded `items` record."""

    item_id: ItemId
    features: tuple[float, ...] | None = None  # content features; None = not sent
    surfaces: tuple[str, ...] | None = None  # None = eligible on every surface
    created_at: int = 0  # epoch ms
    # None = not sent: a stored item keeps its own (a retrained model's load brings the newer
    # shares; a record without the field must not reset them to 0), a new one gets 0. A share of
    # engagements, as items.npz's (summing to 1), not a count.
    popularity: float | None = None

    def carrying(self, older: ItemMessage) -> ItemMessage:
        """This record with what an older record of the item carried and this one does not
        (features, popularity): the state a follower reaches by indexing both in turn."""
        features = self.features if self.features is not None else older.features
        popularity = self.popularity if self.popularity is not None else older.popularity
        if features is self.features and popularity is self.popularity:
            return self
        return dataclasses.replace(self, features=features, popularity=popularity)

    def record(self, all_surfaces: Sequence[str], stored: ItemRecord | None = None) -> ItemRecord:
        surfaces = tuple(all_surfaces) if self.surfaces is None else self.surfaces
        popularity = self.popularity if self.popularity is not None else stored.popularity if stored else 0.0
        return ItemRecord(self.item_id, surfaces, self.created_at, popularity)


@dataclass
class IndexStats:
    """What one call of the write path did."""

    embedded: int = 0  # items whose vector came from embed_items
    payload_only: int = 0  # items already stored, vector kept
    skipped: int = 0  # refused messages (malformed, or nothing to embed them from)
    dead_lettered: int = 0  # refused messages written to items.dlq (the follower's)
    superseded: int = 0  # records passed over on catching up: a newer one of the item followed

    def __iadd__(self, other: IndexStats) -> IndexStats:
        self.embedded += other.embedded
        self.payload_only += other.payload_only
        self.skipped += other.skipped
        self.dead_lettered += other.dead_lettered
        self.superseded += other.superseded
        return self


# -- decoding --------------------------------------------------------------------------------
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUMBER_TYPES = frozenset({int, float})  # exact types: msgpack gives no subclasses, and bool is not one of them


def decode_item(value: bytes | None, max_id_length: int, known_surfaces: Sequence[str] | None = None) -> ItemMessage:
    """Decode and validate one `items` value; BadItemMessage says what is wrong. With
    ``known_surfaces``, a surface outside them is refused: a typo ("Home") would otherwise
    make the item eligible nowhere without a word."""
    if value is None:
        raise BadItemMessage("tombstone", "empty value; withdraw an item with surfaces: [] instead")
    try:
        obj = msgpack.unpackb(value, raw=False)
    except Exception as e:  # msgpack raises several unrelated types for bad bytes
        raise BadItemMessage("not msgpack", str(e)) from e
    if not isinstance(obj, dict):
        raise BadItemMessage("not a map", f"value is a {type(obj).__name__}")
    item_id = obj.get("item_id")
    if isinstance(item_id, bool) or not isinstance(item_id, (int, str)):
        raise BadItemMessage("wrong type", f"item_id must be int or str, got {item_id!r}")
    # The streams' rule (streams/schema.py): an id indexed here but refused there would be
    # recommended while every action on it went to the dead-letter topic.
    if isinstance(item_id, str) and (not item_id.strip() or len(item_id.encode()) > max_id_length):
        raise BadItemMessage("bad value", f"item_id must be non-blank and at most {max_id_length} bytes in UTF-8")
    features = obj.get("features")
    if features is not None:
        # map() keeps the per-feature checks in C: this runs for every record of `items`, in
        # the indexer and in every server process before it reports SERVING.
        if not isinstance(features, list) or not _NUMBER_TYPES.issuperset(map(type, features)):
            raise BadItemMessage("bad value", "features must be a list of finite float32 numbers")
        features = tuple(map(float, features))  # msgpack's ints (64-bit) all fit a float
        # The sum is NaN or inf when any feature is; the encoder runs in float32, so a finite
        # float64 beyond its range would arrive as inf.
        if features and not (math.isfinite(sum(features))
                             and max(features) <= _FLOAT32_MAX and min(features) >= -_FLOAT32_MAX):
            raise BadItemMessage("bad value", "features must be a list of finite float32 numbers")
    surfaces = obj.get("surfaces")
    if surfaces is not None:
        if not isinstance(surfaces, list) or not all(isinstance(s, str) for s in surfaces):
            raise BadItemMessage("wrong type", "surfaces must be a list of strings")
        surfaces = tuple(dict.fromkeys(surfaces))
        if known_surfaces is not None and (unknown := [x for x in surfaces if x not in known_surfaces]):
            raise BadItemMessage("unknown surface", f"{unknown!r}; the surfaces are {list(known_surfaces)!r}")
    created_at = obj.get("created_at", 0)
    popularity = obj.get("popularity")
    if isinstance(created_at, bool) or not isinstance(created_at, int):
        raise BadItemMessage("wrong type", f"created_at must be epoch ms (int), got {created_at!r}")
    if not -(1 << 63) <= created_at < 1 << 63:
        # Payload integers are int64 in Qdrant: the server backend's client raises on a larger
        # one (msgpack's uint64) and the follower would stop on the record at every restart.
        raise BadItemMessage("bad value", f"created_at must fit a signed 64-bit int, got {created_at}")
    if popularity is not None and (
        isinstance(popularity, bool)
        or not isinstance(popularity, (int, float))
        or not math.isfinite(popularity)
    ):
        raise BadItemMessage("bad value", f"popularity must be a finite number, got {popularity!r}")
    return ItemMessage(item_id, features, surfaces, created_at, None if popularity is None else float(popularity))


# -- the write path --------------------------------------------------------------------------
def index_items(
    store: VectorStore,
    items: Sequence[ItemMessage],
    embed_items: EmbedItems,
    all_surfaces: Sequence[str],
    on_refused: OnRefused | None = None,
    on_embedded: OnEmbedded | None = None,
) -> IndexStats:
    """Upsert ``items``: embed the new ones (and any that carry features), keep the stored
    vector of the others and refresh their payload. Later messages for an id win. Items the
    encoder refuses are skipped and passed to ``on_refused``; ``on_embedded`` gets the ids and
    vectors of the items embedded, once stored."""
    by_point: dict[Any, ItemMessage] = {}
    for m in items:
        pid = point_id(m.item_id)
        prev = by_point.get(pid)
        if prev is not None:
            # A payload-only update right after the item's features (or a record without a
            # popularity after one with it) must not drop them: the item would then depend on
            # whether the two messages shared a poll.
            m = m.carrying(prev)
        by_point[pid] = m
    latest = list(by_point.values())
    if not latest:
        return IndexStats()
    stored = store.records([m.item_id for m in latest]) if store.dim is not None else {}
    to_embed = [m for m in latest if m.features is not None or m.item_id not in stored]
    keep = [m for m in latest if m.features is None and m.item_id in stored]
    # The payload alone: rewriting the vector read above would undo a new model's bulk load
    # that wrote this item in between (another process on the server backend); and the stored
    # popularity, where the record has none, is left in place rather than written back.
    for has_popularity in (True, False):
        if part := [m for m in keep if (m.popularity is not None) is has_popularity]:
            store.update_payloads([m.record(all_surfaces) for m in part], popularity=has_popularity)
    skipped = 0
    if to_embed:
        to_embed, vectors, skipped = _embed(to_embed, embed_items, on_refused)
    if to_embed:
        store.ensure_collection(vectors.shape[1])  # the first item may arrive before any bulk load
        # Popularities kept from the store are read again after the embedding, which can be long.
        kept = [m.item_id for m in to_embed if m.popularity is None and m.item_id in stored]
        stored = store.records(kept) if kept else {}
        store.upsert([m.record(all_surfaces, stored.get(m.item_id)) for m in to_embed], vectors)
        if on_embedded is not None:
            on_embedded([str(m.item_id) for m in to_embed], vectors)
    return IndexStats(embedded=len(to_embed), payload_only=len(keep), skipped=skipped)


def _embed(
    items: list[ItemMessage], embed_items: EmbedItems, on_refused: OnRefused | None = None
) -> tuple[list[ItemMessage], np.ndarray, int]:
    """Embed a batch; if the encoder rejects it (BadItemMessage), embed item by item so that
    only the bad ones are skipped (and handed to ``on_refused``). Returns (embedded items,
    their vectors, number skipped)."""
    try:
        vectors = _checked(embed_items(items), len(items))
        return items, vectors, 0
    except BadItemMessage:
        pass
    good: list[ItemMessage] = []
    rows: list[np.ndarray] = []
    for item in items:
        try:
            rows.append(_checked(embed_items([item]), 1))
            good.append(item)
        except BadItemMessage as e:
            log.warning("item %r skipped: %s", item.item_id, e)
            if on_refused is not None:
                on_refused(item, e)
    vectors = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
    return good, vectors, len(items) - len(good)


def _checked(vectors: np.ndarray, n: int) -> np.ndarray:
    out = np.asarray(vectors, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(f"embed_items returned shape {list(out.shape)} for {n} items")
    if not np.isfinite(out).all():
        # Features the encoder turns into NaN/inf are that item's data, not a store failure:
        # the store would refuse the whole batch, and the re-read batch would refuse again.
        raise BadItemMessage("cannot embed", "the item encoder returned a non-finite vector")
    return out


@dataclass(frozen=True)
class ItemTable:
    """The exported item side of the model (items.npz)."""

    ids: list[ItemId]
    embeddings: np.ndarray  # [N, D] float32, L2-normalised
    popularity: np.ndarray  # [N] float32
    version: str | None = None  # the export's stamp (None: a table exported before stamps)

    @classmethod
    def load(cls, model_dir: Path) -> ItemTable:
        path = Path(model_dir) / "items.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: train and export a model first")
        with np.load(path, allow_pickle=False) as npz:
            ids = [str(i) for i in npz["ids"].tolist()]
            emb = np.asarray(npz["embeddings"], dtype=np.float32)
            pop = (
                np.asarray(npz["popularity"], dtype=np.float32)
                if "popularity" in npz
                else np.zeros(len(ids), np.float32)
            )
            version = str(npz["version"]) if "version" in npz else None
        if emb.ndim != 2 or emb.shape[0] != len(ids) or pop.shape != (len(ids),):
            raise ValueError(
                f"{path}: ids {len(ids)}, embeddings {list(emb.shape)}, "
                f"popularity {list(pop.shape)} disagree"
            )
        return cls(ids, emb, pop, version)


def index_item_table(
    store: VectorStore,
    table: ItemTable,
    all_surfaces: Sequence[str],
    *,
    keep_payload: bool = True,
) -> int:
    """Bulk-upsert the model's item table, then build the ANN index. Items already stored keep
    their eligibility learned from the `items` topic when ``keep_payload``; their vectors and
    popularity become this table's (a retrained model's shares are the newer), each written
    alone: a withdrawal a follower applies meanwhile (a Qdrant server's, beside this) is not
    overwritten by the payload read before it. The followers after a load (`load_table`: a new
    group) read `items` from its start again: an item whose newest record carries features is
    embedded again, and one whose record carries a popularity has it again. Returns the number
    of items written."""
    store.ensure_collection(table.embeddings.shape[1])
    step = max(1, store.settings.upsert_batch)
    surfaces = tuple(all_surfaces)
    for start in range(0, len(table.ids), step):
        ids = table.ids[start : start + step]
        vectors = table.embeddings[start : start + step]
        known = store.records(ids) if keep_payload else {}
        stored = [k for k, i in enumerate(ids) if i in known]
        new = [k for k, i in enumerate(ids) if i not in known]
        popularity = table.popularity[start : start + step]
        if stored:
            store.update_vectors([ids[k] for k in stored], vectors[stored])
            store.set_popularity([ids[k] for k in stored], popularity[stored])
        if new:
            store.upsert([ItemRecord(ids[k], surfaces, 0, float(popularity[k])) for k in new], vectors[new])
    store.optimize()
    return len(table.ids)


def load_table(store: VectorStore, table: ItemTable, version: str, all_surfaces: Sequence[str]) -> int:
    """`recsys index`'s bulk load of model ``version``'s table, marked once whole (a new
    `catalogue_load`: the followers after it read `items` from its start). Returns the number
    of items written."""
    loaded = store.catalogue_version()
    # Another model's vectors are here when the marker names it, or when its load was cut
    # short (a roll-back to the model before it): they go first. A load of this same model cut
    # short keeps what is outside its table: items its follower embedded.
    other = next((v for v in (loaded, store.catalogue_loading()) if v not in (None, version)), None)
    if other is not None:
        # The whole-table mark goes before the first delete, the other model's name kept as the
        # load in progress: a drop cut short is done again by this model's restart, and a
        # roll-back to the other model loads its table again instead of passing the remains
        # for it (its workers stop now, not once the drop is over).
        store.mark_catalogue(None, loading=other)
        dropped = drop_items_outside(store, table)
        log.info("removed %d items of model %s that model %s's table lacks", dropped, other, version)
    # Cleared first: a load cut short must not leave the previous model's marker over a store
    # that holds some of this model's vectors (a roll-back would then skip the load).
    store.mark_catalogue(None, loading=version)
    n = index_item_table(store, table, all_surfaces)
    store.mark_catalogue(version)
    return n


def drop_items_outside(store: VectorStore, table: ItemTable) -> int:
    """Delete the stored items that `table` lacks; returns how many. Before another model's
    table is loaded: their vectors are that model's, in another space, and would be retrieved
    with meaningless scores (and read as history inputs the new model was not exported with).
    The new model's `items` follower, a new consumer group that reads the topic from its start,
    embeds again those whose records carry features. Run while the marker names the other model
    as the load in progress (`load_table`), so a load cut short after it does it again on the
    next start."""
    keep = {str(i) for i in table.ids}  # the point id depends on str(item id) only (vector_store.schema)
    stale = [i for i in store.item_ids() if str(i) not in keep]
    step = max(1, store.settings.upsert_batch)
    for start in range(0, len(stale), step):
        store.delete(stale[start : start + step])
    return len(stale)


# -- the `items` follower ---------------------------------------------------------------------
Key = tuple[int, bytes]  # (partition, record key): one item's records, in log order


@dataclass
class CatchUp:
    """What a follower that starts behind must not replay: each item's records older than its
    newest one up to the topic's end at the start.

    A consumer group that starts behind (every new shard, every new model's group: the whole
    topic) would otherwise index each item's history batch by batch, and the store would serve
    the states in between: an item withdrawn later (``surfaces: []``) eligible again, a
    popularity going back, until the replay reached the newest record. Compaction keeps only
    the newest record per key, but not in the log's active segment, nor before the cleaner
    has run. The records past the start's end are live: indexed in order, as always.

    Nothing here depends on what was read before a restart: an older record is skipped
    whatever the consumer's history, and what an item's newest record lacks and older ones gave
    is indexed at their offsets, so a commit past them loses nothing: at the last features
    record's, the item's final state (the newest payload with those features and the last
    popularity); at the last popularity record's, when that is older, the newest record with
    that popularity (only the newest's own features: the final ones are not known there, an
    older record's would be a state the item never had). The maps are kept until the group's
    commits pass the range (`release`): a replaced consumer re-reads from the last commit and
    must thin the same way. Only offsets, popularities and the newest records of items that
    need a carry are kept (not every item's features: a whole catalogue's catch-up)."""

    latest: dict[Key, int]  # offset of each item's newest valid record in the catch-up range
    # items whose newest record has no features but an older one does: (its offset, the newest)
    carry: dict[Key, tuple[int, ItemMessage]]
    ends: dict[int, int]  # partition -> the offset after its last record in the range
    # the newest popularity an item's records in the range gave, for a newest record without one
    popularity: dict[Key, float] = field(default_factory=dict)
    # items whose newest record has no popularity but an older one does, given before any
    # features carry: (that record's offset, the newest)
    popularity_carry: dict[Key, tuple[int, ItemMessage]] = field(default_factory=dict)

    @classmethod
    def scan(cls, records: Iterable[Any], decode: Callable[[Any], ItemMessage]) -> CatchUp:
        """From the records a follower has yet to read (`iter_to_end`), as they come. Records
        the decoder refuses do not count: one must not hide the valid record before it, which a
        live follower would have indexed."""
        latest: dict[Key, int] = {}
        features_at: dict[Key, int] = {}
        carry: dict[Key, tuple[int, ItemMessage]] = {}
        ends: dict[int, int] = {}
        popularity: dict[Key, float] = {}
        popularity_at: dict[Key, int] = {}
        popularity_carry: dict[Key, tuple[int, ItemMessage]] = {}
        for rec in records:
            ends[rec.partition] = max(ends.get(rec.partition, 0), rec.offset + 1)
            try:
                item = decode(rec)
            except BadItemMessage:
                continue
            key = (rec.partition, rec.key)
            latest[key] = rec.offset
            if item.features is not None:
                features_at[key] = rec.offset
                carry.pop(key, None)
            elif key in features_at:
                carry[key] = (features_at[key], item)
            if item.popularity is not None:
                popularity[key] = item.popularity
                popularity_at[key] = rec.offset
                popularity_carry.pop(key, None)
            elif key in popularity_at and (key not in carry or popularity_at[key] < carry[key][0]):
                # (a features carry at or before it indexes the final popularity already)
                popularity_carry[key] = (popularity_at[key], item)
            else:
                popularity_carry.pop(key, None)
        return cls(latest, carry, ends, popularity, popularity_carry)

    def thin(self, rec: Any, item: ItemMessage) -> ItemMessage | None:
        """The item to index for a record, or None when a newer record of the item follows in
        the catch-up range."""
        key = (rec.partition, rec.key)
        newest = self.latest.get(key)
        if newest is None or rec.offset > newest:  # live, or an item the range does not hold
            return item
        if rec.offset == newest:
            state = item
        elif (carried := self.carry.get(key)) is not None and carried[0] == rec.offset:
            # The newest without features could not embed an item published after the model's
            # export: its final state now, with these features (as index_items merges them
            # within one batch); the newest then only refreshes the payload.
            state = dataclasses.replace(carried[1], features=item.features)
        elif (carried := self.popularity_carry.get(key)) is not None and carried[0] == rec.offset:
            state = carried[1]  # the popularity is filled in below; a restart past here keeps it stored
        else:
            return None
        if state.popularity is None and key in self.popularity:
            state = dataclasses.replace(state, popularity=self.popularity[key])  # as an older record left it
        return state

    def release(self, committed: Mapping[int, int]) -> None:
        """Forget each partition whose range ``committed`` (partition -> the offset this
        follower committed) has passed: no consumer of the group reads it again."""
        done = {p for p, end in self.ends.items() if committed.get(p, 0) >= end}
        if done:
            self.latest = {k: o for k, o in self.latest.items() if k[0] not in done}
            self.carry = {k: c for k, c in self.carry.items() if k[0] not in done}
            self.popularity = {k: v for k, v in self.popularity.items() if k[0] not in done}
            self.popularity_carry = {k: c for k, c in self.popularity_carry.items() if k[0] not in done}
            self.ends = {p: end for p, end in self.ends.items() if p not in done}


@dataclass
class ItemsFollower:
    """Consumes `items`, indexes each poll's batch, commits offsets after the upsert."""

    store: VectorStore
    embed_items: EmbedItems
    settings: Settings = field(default_factory=get_settings)
    bootstrap_servers: str | None = None  # default: settings.kafka.bootstrap_servers
    group_id: str | None = None  # default: the store's `items_group` of indexer_group_id, and the model version
    # The encoder's model: a new one (new vectors for the whole catalogue) reads `items` again
    # from the start, so that items published after the previous export are re-embedded too
    # instead of keeping vectors from the previous model's space. So does every new bulk load
    # (the store's `catalogue_load` joins the group): a `--reindex` of the same model writes the
    # exported rows over items re-embedded since from newer features.
    model_version: str | None = None
    # Told of each item embedded (ids, vectors), once stored: the worker's model reads items as
    # these vectors, and an exported item re-embedded from new features must change there too.
    on_embedded: OnEmbedded | None = None
    # Set on SIGTERM: the catch-up scan at construction then raises kafka_clients.Stopped.
    stop: threading.Event | None = None
    stats: IndexStats = field(default_factory=IndexStats)

    def __post_init__(self) -> None:
        from recsys.kafka_clients import PendingCommits  # imported here: the bulk path needs no Kafka client

        # The whole load this follower's group follows (with a model version): one after it
        # wrote the exported rows again, and the follower stops (`run`) to rejoin in its group.
        self.load = self.store.catalogue_load() if self.model_version is not None else None
        if self.group_id is None:
            group = self.store.items_group(self.settings.vector_store.indexer_group_id)
            self.group_id = group if self.model_version is None else ".".join(filter(None, (group, self.model_version, self.load)))
        from recsys.kafka_clients import iter_to_end

        # Before the group consumer starts: the records it has yet to read, up to the end now.
        backlog = iter_to_end(self._bootstrap, self.settings.topics.items, self.group_id,
                              stall_s=self.settings.kafka.read_stall_s, stop=self.stop)
        self._catch_up = CatchUp.scan(backlog, self._decode)
        log.info("items follower: %d items to catch up on", len(self._catch_up.latest))
        self._committed: dict[int, int] = {}  # partition -> offset, as this follower committed it
        self._consumer = self._new_consumer()
        self._since_optimize = 0
        self._pending = PendingCommits(self.settings.kafka.rejoin_after_s)  # indexed and flushed, not committed
        self._producer: Any = None  # of items.dlq, made at the first refusal

    @property
    def _bootstrap(self) -> str:
        return self.bootstrap_servers or self.settings.kafka.bootstrap_servers

    def _new_consumer(self) -> Any:
        from recsys.kafka_clients import group_consumer

        vs = self.settings.vector_store
        return group_consumer(
            self.settings.topics.items,
            bootstrap_servers=self._bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,  # commit after the upsert, never before
            auto_offset_reset="earliest",  # a fresh group indexes the topic's whole history
            max_poll_records=vs.indexer_max_records,
        )

    def poll_once(self) -> IndexStats:
        """One poll: decode, index, make durable, commit. Returns what this poll did.

        A commit that failed is retried first, on every poll (a topic that goes quiet, or a
        next batch stuck waiting for the store, must not leave it uncommitted); if it fails
        again the poll goes on, and the next batch's commit carries it."""
        from kafka.errors import KafkaError

        vs = self.settings.vector_store
        if self._pending.offsets and self._consumer is not None:
            try:
                self._commit()
            except KafkaError as exc:
                log.warning("items follower: commit retry failed (%s: %s)", type(exc).__name__, exc)
        if self._consumer is None:  # its replacement failed on the last poll
            self._consumer = self._new_consumer()
        batches = self._consumer.poll(
            timeout_ms=vs.indexer_poll_ms, max_records=vs.indexer_max_records
        )
        if not batches:
            return IndexStats()
        items: list[ItemMessage] = []
        source: dict[Any, Any] = {}  # point -> its latest record (the one index_items keeps), for dead-lettering
        refused: list[tuple[Any, BadItemMessage]] = []
        superseded = 0  # older records of items whose newest is still to come (CatchUp)
        polled: dict[Any, int] = {}
        for tp, records in batches.items():
            if records:
                polled[tp] = records[-1].offset + 1
            for rec in records:
                try:
                    item = self._decode(rec)
                except BadItemMessage as e:
                    log.warning("items %s[%d]@%d refused: %s", tp.topic, tp.partition, rec.offset, e)
                    refused.append((rec, e))
                    continue
                kept = self._catch_up.thin(rec, item)
                if kept is None:
                    superseded += 1
                    continue
                items.append(kept)
                source[point_id(kept.item_id)] = rec
        stats = index_items(self.store, items, self.embed_items, self.settings.events.surfaces,
                            lambda item, e: refused.append((source[point_id(item.item_id)], e)), self.on_embedded)
        stats.skipped = len(refused)  # the decoder's refusals and the encoder's
        stats.superseded = superseded
        self._since_optimize += stats.embedded
        if vs.optimize_every and self._since_optimize >= vs.optimize_every:
            self.store.optimize()
            self._since_optimize = 0
        self.store.flush()
        stats.dead_lettered = self._dead_letter(refused)
        self._pending.add(polled)
        self._commit()
        self.stats += stats
        return stats

    def _decode(self, rec: Any) -> ItemMessage:
        """`decode_item` of a record, whose key must be str(item_id): `items` is compacted by
        key, so records of two items under one key would leave only the later one to a shard
        built after compaction."""
        events = self.settings.events
        item = decode_item(rec.value, events.max_id_length, events.surfaces)
        if rec.key != str(item.item_id).encode():
            raise BadItemMessage("wrong key", f"key {rec.key!r:.80} is not str(item_id) {str(item.item_id)!r:.80}")
        return item

    def _dead_letter(self, refused: list[tuple[Any, BadItemMessage]]) -> int:
        """Write each refused record to `items.dlq` (the `actions.dlq` contract) and wait for the
        broker's acks, before the batch's offsets are committed. A write that fails past the
        producer's retries stops the follower with the batch uncommitted (a restart re-reads
        it), rather than committing records that were neither indexed nor dead-lettered."""
        from kafka.errors import KafkaError

        if not refused:
            return 0
        cfg = self.settings.streams  # the same bounds as actions.dlq: the broker's limit is the same
        try:
            if self._producer is None:
                from kafka import KafkaProducer

                timeout_ms = int(self.settings.vector_store.dead_letter_timeout_s * 1000)
                self._producer = KafkaProducer(
                    bootstrap_servers=self._bootstrap, acks="all",
                    max_block_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)  # give up as the acks do
            futures = []
            for rec, e in refused:
                key, value = dead_letter(e, key=rec.key, original=rec.value, topic=rec.topic, partition=rec.partition,
                                         offset=rec.offset, max_key=cfg.dlq_max_key_bytes,
                                         max_original=cfg.dlq_max_original_bytes)
                futures.append(self._producer.send(self.settings.topics.items_dlq, key=key, value=value))
            for future in futures:
                future.get(timeout=self.settings.vector_store.dead_letter_timeout_s)
        except KafkaError as exc:
            raise DeadLetterFailed(f"could not write {len(refused)} refused items to "
                                   f"{self.settings.topics.items_dlq!r}: {exc}") from exc
        return len(refused)

    def _commit(self) -> None:
        """Commit the offsets of what was indexed and flushed (`PendingCommits`: by name; if it
        raises they stay pending for the next poll). A consumer stuck in a rebalance is
        replaced: the fresh one re-reads from the committed offsets, and indexing an item again
        is an upsert."""
        if not self._pending.commit(self._consumer):
            self._replace_consumer()
            return
        if self._catch_up.ends:
            for tp, offset in self._pending.committed.items():  # not those of partitions gone elsewhere
                self._committed[tp.partition] = max(offset, self._committed.get(tp.partition, 0))
            self._catch_up.release(self._committed)

    def _replace_consumer(self) -> None:
        """A fresh consumer for a stuck one. If creating it fails (broker down), the field is
        left empty, never pointing at the closed one: the next poll tries again."""
        old, self._consumer = self._consumer, None
        if old is not None:
            old.close(autocommit=False)
        self._consumer = self._new_consumer()

    def run(self, stop: threading.Event) -> None:
        """Follow until ``stop`` is set. A broker that cannot be reached (a restart) is waited
        out with a doubling back-off (0.1 s to 2 s); other errors propagate. Either way a batch
        is committed only after its upsert and flush, so nothing is skipped."""
        from kafka.errors import KafkaError

        delay = 0.1
        check_every = self.settings.inference.catalogue_check_every_s
        check_at = time.monotonic() + check_every
        while not stop.is_set():
            if self.model_version is not None and time.monotonic() >= check_at:
                check_at = time.monotonic() + check_every
                if (load := self.store.catalogue_load()) != self.load:
                    raise CatalogueReloaded(f"the store's catalogue was loaded again (load {load}, this follower's "
                                            f"{self.load}): restart to follow the new load's group")
            try:
                self.poll_once()
                delay = 0.1
            except KafkaError as exc:
                log.warning("items follower: Kafka failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc, delay)
                stop.wait(delay)
                delay = min(2.0, delay * 2)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
        if self._producer is not None:
            self._producer.close()


# -- the model's item encoder -------------------------------------------------------------------
class OnnxItemEncoder:
    """`embed_items` backed by the model's `item_encoder.onnx`.

    Inputs ``id_bucket`` int64 [N] (from ``id_bucket(ids)``, the model's id vocabulary) and
    ``features`` float32 [N, F] (zeros where a message carries none); output ``item_emb`` [N, D].
    Runs on the CPU EP: new items trickle in, and the GPU belongs to the user model.
    """

    def __init__(self, model_dir: Path, id_bucket: IdBucket, threads: int = 0) -> None:
        import onnxruntime as ort

        path = Path(model_dir) / "item_encoder.onnx"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: export the model first (`recsys export`)")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # As the user model's session (inference/runtime.py): spinning pool threads would take
        # the CPU the worker's own loop needs, this session running beside it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.version: str | None = self._session.get_modelmeta().custom_metadata_map.get("version")
        inputs = {i.name: i for i in self._session.get_inputs()}
        if set(inputs) != {"id_bucket", "features"}:
            raise ValueError(f"{path}: expected inputs id_bucket, features; got {sorted(inputs)}")
        width = inputs["features"].shape[-1]
        if not isinstance(width, int):
            raise ValueError(f"{path}: the features input needs a fixed width, got {width!r}")
        self._input_width = width
        # A model trained without content features still takes a (zero) features column, so the
        # input's width says nothing: meta.json does. Without them an unseen id cannot be placed.
        meta_path = Path(model_dir) / "meta.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
        self.feature_dim = width if meta.get("uses_content_features", True) else 0
        self._id_bucket = id_bucket

    def __call__(self, items: Sequence[ItemMessage]) -> np.ndarray:
        from inference.hashing import UNKNOWN_BUCKET

        feats = np.zeros((len(items), self._input_width), dtype=np.float32)
        buckets = np.asarray(self._id_bucket([i.item_id for i in items]), dtype=np.int64)
        for row, item in enumerate(items):
            if item.features is not None and self.feature_dim:  # a model without them reads ids alone
                if len(item.features) != self.feature_dim:
                    raise BadItemMessage(
                        "cannot embed", f"item {item.item_id!r}: {len(item.features)} features, "
                        f"the model expects {self.feature_dim}"
                    )
                feats[row] = item.features
            if buckets[row] == UNKNOWN_BUCKET and (item.features is None or self.feature_dim == 0):
                # Its vector would be the "unknown id" row alone, the same for every such item:
                # all of them would rank as one block. Refused instead, with the reason.
                raise BadItemMessage(
                    "cannot embed", f"item {item.item_id!r} is not in the model's vocabulary and "
                    + ("carries no content features" if self.feature_dim else "the model has no content features")
                )
        (emb,) = self._session.run(["item_emb"], {"id_bucket": buckets, "features": feats})
        return np.asarray(emb, dtype=np.float32)


def model_version(model_dir: Path) -> str:
    """The exported model's version string (meta.json, as in the ONNX metadata)."""
    return str(json.loads((Path(model_dir) / "meta.json").read_text(encoding="utf-8"))["version"])


def model_id_bucket(model_dir: Path) -> IdBucket:
    """The model's id -> encoder bucket mapping, as exported with it (owned by inference/:
    `inference.hashing.id_bucket_fn` over meta.json, falling back to items.npz's ids)."""
    from inference.hashing import id_bucket_fn

    meta = json.loads((Path(model_dir) / "meta.json").read_text(encoding="utf-8"))
    fn: IdBucket = id_bucket_fn(meta, model_dir)
    return fn


# -- CLI ---------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="default: settings.inference.model_dir")
    parser.add_argument(
        "--reindex",
        action="store_true",
        help="bulk-load items.npz even if the store says this model's table is already loaded",
    )
    parser.add_argument(
        "--follow", action="store_true", help="then follow the `items` topic until interrupted"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = get_settings()
    from inference.runtime import check_same_export

    model_dir = args.model_dir or settings.inference.model_dir
    if not (model_dir / "meta.json").is_file():
        parser.error(f"no model in {model_dir} (meta.json missing): run `recsys train --export` first")
    version = model_version(model_dir)  # first: an export replaces meta.json last
    table = ItemTable.load(model_dir)
    check_same_export(model_dir, version, {"items.npz": table.version})
    with open_store(settings, dim=table.embeddings.shape[1]) as store:
        # Loaded is what the marker says, not "the store holds items": a load cut short (a
        # crash, a store error) or an earlier model's table, or items the follower upserted
        # first, must not pass for this model's whole catalogue.
        loaded = store.catalogue_version()
        if args.reindex or loaded != version:
            n = load_table(store, table, version, settings.events.surfaces)
            log.info("indexed %d items of model %s from %s (%s; before: %s)", n, version, model_dir,
                     settings.vector_store.backend, loaded or "no whole table")
        else:
            log.info("store holds model %s's table (%d items); no bulk load (--reindex forces one)",
                     version, store.count())
        if not args.follow:
            return 0
        if settings.vector_store.backend == "edge":
            # One process per Edge shard: a worker started on it waits for this one to exit.
            log.warning("following `items` holds the Edge shard %s: a worker on it cannot start until this stops "
                        "(with the embedded store the worker follows `items` itself; --follow is for a Qdrant server)",
                        settings.vector_store.path)
        stop = threading.Event()
        # `docker stop` sends SIGTERM: finish the current batch, close cleanly.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        # `items` compacted (a shard built later reads the whole catalogue from it) and
        # `items.dlq`, before anything reads or writes them.
        if not ensure_own_topics(settings, (settings.topics.items, settings.topics.items_dlq), stop):
            return 0
        from recsys.kafka_clients import Stopped

        encoder = OnnxItemEncoder(model_dir, model_id_bucket(model_dir), settings.inference.ort_threads)
        check_same_export(model_dir, version, {"item_encoder.onnx": encoder.version, "meta.json": model_version(model_dir)})
        try:
            follower = ItemsFollower(store, encoder, settings, model_version=version, stop=stop)
        except Stopped:
            log.info("stopped while catching up on %r; nothing was committed", settings.topics.items)
            return 0
        try:
            log.info("following %r", settings.topics.items)
            follower.run(stop)
        except KeyboardInterrupt:
            pass
        except CatalogueReloaded as exc:
            log.error("items follower: %s", exc)
            return 1
        finally:
            follower.close()
            log.info("followed: %s", follower.stats)
    return 0
