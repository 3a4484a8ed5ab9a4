"""The ONNX Runtime worker: `user-updates` in, fresh per-surface `candidates` out.

An update's journey, top to bottom (`Worker.process`):

    poll `user-updates`           micro-batch: up to max_batch users or max_wait_ms
    coalesce                      only the newest version of each user is worth computing
    encode_histories              left-padded arrays: item embeddings, actions, surfaces, times
    runtime.generate              ONE ONNX Runtime call: every surface x outcome x M queries
    plan_queries                  each surface's budget split across outcomes by its weights;
                                  near-identical query embeddings merged, budgets summed (PinRec)
    store.query_batch             ONE vector-store call for the whole micro-batch, the user's
                                  recent items excluded, surface eligibility filtered
    merge_hits                    fair-share interleave of the queries' lists, de-dup, top-N
    produce `candidates`          compacted, key = user id
    commit offsets                only after the candidates write is acknowledged, so a crash
                                  re-delivers (and recomputes) rather than loses an update

In the embedded default the Qdrant Edge shard allows one process, so this worker also
follows the `items` topic and indexes new items between micro-batches.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from kafka.errors import KafkaError

from inference.guards import RetryingStore, StoreUnavailable, call_with_retry, clean_update
from inference.runtime import ModelRuntime
from recsys.settings import Settings, get_settings

log = logging.getLogger(__name__)

__all__ = [
    "Condition",
    "Worker",
    "coalesce",
    "conditions_for",
    "encode_histories",
    "main",
    "merge_hits",
    "plan_queries",
]


@dataclass(frozen=True)
class Condition:
    """One (surface, outcome) the model is asked to generate for, with its budget share."""

    surface: str
    outcome: str
    weight: float


def conditions_for(settings: Settings, surfaces: Sequence[str], actions: Sequence[str]) -> list[Condition]:
    """The conditions of every surface, in the model's surface order; weights sum to 1 per surface."""
    out: list[Condition] = []
    for surface in surfaces:
        weights = {o: w for o, w in settings.inference.outcome_weights.get(surface, {}).items() if w > 0}
        unknown = set(weights) - set(actions)
        if unknown:
            raise ValueError(f"outcome_weights[{surface!r}] names outcomes the model lacks: {sorted(unknown)}")
        if not weights:  # a surface with no stated goal aims at clicks
            weights = {actions[0]: 1.0}
        total = sum(weights.values())
        out += [Condition(surface, o, w / total) for o, w in weights.items()]
    return out


def coalesce(updates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only the newest version of each user's update (first-seen user order)."""
    latest: dict[str, dict[str, Any]] = {}
    for update in updates:
        user = str(update["user_id"])
        if user not in latest or update["version"] > latest[user]["version"]:
            latest[user] = update
    return list(latest.values())


def encode_histories(
    updates: Sequence[dict[str, Any]],
    runtime: ModelRuntime,
    conditions: Sequence[Condition],
    now_ms: int,
    vectors: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The user model's inputs for a micro-batch (see inference/export.py for the contract).

    Histories are cut to the model's max_len newest events and left-padded; items without
    an embedding (never exported nor indexed) keep their action/surface/time but a zero vector.
    """
    action_ix = {a: i + 1 for i, a in enumerate(runtime.actions)}
    surface_ix = {s: i + 1 for i, s in enumerate(runtime.surfaces)}
    histories = [u["events"][-runtime.max_len :] for u in updates]
    b, t, d = len(updates), max(1, max(len(h) for h in histories)), runtime.dim
    item_emb = np.zeros((b, t, d), np.float32)
    action = np.zeros((b, t), np.int64)
    surface = np.zeros((b, t), np.int64)
    event_ts = np.zeros((b, t), np.float64)
    for row, events in enumerate(histories):
        offset = t - len(events)
        for col, event in enumerate(events, start=offset):
            vector = vectors.get(str(event["item_id"]))
            if vector is not None:
                item_emb[row, col] = vector
            action[row, col] = action_ix.get(event["action"], 0)
            surface[row, col] = surface_ix.get(event["surface"], 0)
            event_ts[row, col] = event["ts"] / 1000.0
    q = len(conditions)
    return {
        "item_emb": item_emb,
        "action": action,
        "surface": surface,
        "event_ts": event_ts,
        "request_ts": np.full((b,), now_ms / 1000.0, np.float64),
        "target_surface": np.tile(np.array([surface_ix[c.surface] for c in conditions], np.int64), (b, 1)).reshape(b, q),
        "target_outcome": np.tile(np.array([action_ix[c.outcome] for c in conditions], np.int64), (b, 1)).reshape(b, q),
    }


def plan_queries(
    queries: np.ndarray, conditions: Sequence[Condition], budget: int, merge_cosine: float
) -> list[dict[str, list[tuple[np.ndarray, float]]]]:
    """Per user, per surface: the ANN queries to run, each with its share of the budget.

    ``queries`` is [B, Q, M, D]. A surface's budget is split across its outcomes by weight
    and evenly across the M embeddings of an outcome; embeddings whose cosine exceeds
    ``merge_cosine`` with an already kept one are merged into it (budgets summed), as PinRec
    does, so duplicates do not cost an ANN query each.
    """
    b, _, m, _ = queries.shape
    plans: list[dict[str, list[tuple[np.ndarray, float]]]] = []
    for row in range(b):
        per_surface: dict[str, list[tuple[np.ndarray, float]]] = {}
        for qi, cond in enumerate(conditions):
            kept = per_surface.setdefault(cond.surface, [])
            share = budget * cond.weight / m
            for vector in queries[row, qi]:
                for k, (other, other_budget) in enumerate(kept):
                    if float(vector @ other) > merge_cosine:
                        kept[k] = (other, other_budget + share)
                        break
                else:
                    kept.append((vector, share))
        plans.append(per_surface)
    return plans


def merge_hits(
    hit_lists: Sequence[Sequence[tuple[Any, float]]], budgets: Sequence[float], limit: int
) -> tuple[list[str], list[float]]:
    """Merge the ranked lists of one surface's queries into its top ``limit``.

    Fair share: the hit at rank r of a query with budget w is placed at r / w, so every
    query contributes in proportion to its budget and the lists fill each other's gaps;
    an item found by several queries keeps its first (best-placed) occurrence.
    """
    placed: list[tuple[float, int, Any, float]] = []
    for qi, (hits, weight) in enumerate(zip(hit_lists, budgets)):
        w = max(weight, 1e-9)
        placed += [(rank / w, qi, item, score) for rank, (item, score) in enumerate(hits)]
    placed.sort(key=lambda p: (p[0], p[1]))
    items: list[str] = []
    scores: list[float] = []
    seen: set[str] = set()
    for _, _, item, score in placed:
        key = str(item)
        if key in seen:
            continue
        seen.add(key)
        items.append(key)
        scores.append(float(score))
        if len(items) == limit:
            break
    return items, scores


_KAFKA_BACKOFF_S = (0.1, 2.0)  # back-off after a failed poll/commit: first, cap (kafka-python raises while the broker is down)


class Worker:
    """Consumes `user-updates`, publishes `candidates`; owns the session and the store."""

    updates_skipped = 0  # unusable `user-updates` records (inference/guards.py: clean_update)
    _kafka_delay = 0.1  # current back-off after a failed poll or commit (broker unreachable)
    users_failed = 0  # users whose data made compute raise; skipped, the rest of the batch served

    def __init__(self, settings: Settings, runtime: ModelRuntime, store: Any, item_follower: Any = None) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        self.settings = settings
        self.runtime = runtime
        self.store = store
        self.item_follower = item_follower
        self.conditions = conditions_for(settings, runtime.surfaces, runtime.actions)
        kafka = settings.kafka.bootstrap_servers
        self.consumer = KafkaConsumer(
            settings.topics.user_updates,
            bootstrap_servers=kafka,
            group_id=settings.inference.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.inference.max_batch,
        )
        self.producer = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=2)
        self.stopping = threading.Event()
        self.users_done = 0

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        log.info("worker: %d conditions per user, provider %s", len(self.conditions), self.runtime.provider)
        report_at, reported = time.monotonic() + 10.0, 0
        while not self.stopping.is_set():
            updates = self.poll_batch()
            if updates:
                self.process(updates)
                self.commit()
            if time.monotonic() >= report_at:  # throughput in the log: is the worker keeping up?
                log.info("worker: %d users regenerated (%.0f/s)", self.users_done, (self.users_done - reported) / 10.0)
                report_at, reported = time.monotonic() + 10.0, self.users_done

    def commit(self) -> None:
        """Commit the polled offsets; a group that rebalanced meanwhile (e.g. during a long store
        outage) refuses, and its next owner re-reads and recomputes those updates: none lost."""
        from kafka.errors import CommitFailedError

        try:
            self.consumer.commit()
        except CommitFailedError as exc:
            log.warning("worker: commit refused after a rebalance (%s); the batch will be re-read", exc)
        except KafkaError as exc:  # broker unreachable: the next commit covers these offsets too
            self._kafka_backoff("commit", exc)

    def _kafka_backoff(self, what: str, exc: Exception) -> None:
        """Wait before talking to the broker again: doubling from 0.1 s to 2 s while it fails."""
        log.warning("worker: %s failed (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, self._kafka_delay)
        self.stopping.wait(self._kafka_delay)
        self._kafka_delay = min(_KAFKA_BACKOFF_S[1], self._kafka_delay * 2)

    def poll_batch(self) -> list[dict[str, Any]]:
        """Up to max_batch updates, waiting at most max_wait_ms once the first has arrived.
        Malformed records are skipped and counted (inference/guards.py: clean_update)."""
        cfg = self.settings.inference
        keep = max(self.runtime.max_len, self.settings.streams.max_sequence_len)
        batch: list[dict[str, Any]] = []
        deadline: float | None = None
        while len(batch) < cfg.max_batch and not self.stopping.is_set():
            timeout = 200 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            try:
                records = self.consumer.poll(timeout_ms=timeout, max_records=cfg.max_batch - len(batch))
            except KafkaError as exc:  # broker unreachable (e.g. restarting): keep what was fetched, back off
                self._kafka_backoff("poll", exc)
                break
            self._kafka_delay = _KAFKA_BACKOFF_S[0]
            for part in records.values():
                for record in part:
                    update = clean_update(record.value, keep)
                    if update is None:
                        self.updates_skipped += 1
                        log.warning("worker: skipped an unusable update at %s:%d:%d (no user or no valid event)",
                                    record.topic, record.partition, record.offset)
                    else:
                        batch.append(update)
            if batch and deadline is None:
                deadline = time.monotonic() + cfg.max_wait_ms / 1000.0
            if deadline is None or time.monotonic() >= deadline:
                break
        return batch

    def process(self, updates: Sequence[dict[str, Any]]) -> int:
        """Compute and publish candidates for a micro-batch; returns the number of users."""
        fresh = [u for u in coalesce(updates) if u.get("events")]
        if not fresh:
            return 0
        fresh, results = self.compute_isolated(fresh)
        sent = [
            self.producer.send(
                self.settings.topics.candidates,
                key=str(update["user_id"]).encode(),
                value=msgpack.packb(self.candidates_record(update, surfaces)),
            )
            for update, surfaces in zip(fresh, results)
        ]
        self.producer.flush()
        for future in sent:  # a record the broker never took raises here, before any commit
            future.get()
        self.users_done += len(fresh)
        return len(fresh)

    def compute_isolated(self, updates: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """`compute` for the batch; if the data makes it raise, user by user, skipping (and
        counting) only the users that fail. A store that is down is not data: it raises
        StoreUnavailable from the retrying store and ends the loop uncommitted."""
        try:
            return updates, self.compute(updates)
        except StoreUnavailable:
            raise
        except Exception:  # noqa: BLE001 - isolated below; the loop must not die on one user's data
            log.exception("worker: a batch of %d users failed; recomputing them one by one", len(updates))
        kept: list[dict[str, Any]] = []
        results: list[Any] = []
        for update in updates:
            try:
                results += self.compute([update])
                kept.append(update)
            except StoreUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001
                self.users_failed += 1
                log.error("worker: user %r skipped (%s: %s)", update.get("user_id"), type(exc).__name__, exc)
        return kept, results

    def compute(self, updates: Sequence[dict[str, Any]]) -> list[dict[str, dict[str, list[Any]]]]:
        """Per user, per surface: {"items": [...], "scores": [...]} (no I/O besides the store)."""
        cfg = self.settings.inference
        now_ms = int(time.time() * 1000)
        history_ids = {str(e["item_id"]) for u in updates for e in u["events"]}
        vectors = self.runtime.item_vectors_for(history_ids, fetch=self._fetch_vectors)
        inputs = encode_histories(updates, self.runtime, self.conditions, now_ms, vectors)
        queries = self.runtime.generate(inputs)
        plans = plan_queries(queries, self.conditions, cfg.candidates_per_surface, cfg.merge_cosine)

        # One store call for the micro-batch: flatten (user, surface, query) in order.
        matrix: list[np.ndarray] = []
        surfaces: list[str] = []
        exclude: list[list[str]] = []
        for update, plan in zip(updates, plans):
            recent = sorted({str(e["item_id"]) for e in update["events"]})
            for surface, planned in plan.items():
                matrix += [vector for vector, _ in planned]
                surfaces += [surface] * len(planned)
                exclude += [recent] * len(planned)
        hits = self.store.query_batch(np.stack(matrix), cfg.candidates_per_surface, surfaces, exclude)

        results: list[dict[str, dict[str, list[Any]]]] = []
        cursor = 0
        for plan in plans:
            per_surface: dict[str, dict[str, list[Any]]] = {}
            for surface, planned in plan.items():
                lists = hits[cursor : cursor + len(planned)]
                cursor += len(planned)
                items, scores = merge_hits(lists, [budget for _, budget in planned], cfg.candidates_per_surface)
                per_surface[surface] = {"items": items, "scores": scores}
            results.append(per_surface)
        return results

    def candidates_record(self, update: dict[str, Any], surfaces: dict[str, Any]) -> dict[str, Any]:
        return {
            "user_id": update["user_id"],
            "model_version": self.runtime.version,
            "source_event_ts": int(update.get("last_event_ts") or update["events"][-1]["ts"]),
            "generated_at": int(time.time() * 1000),
            "version": update["version"],
            "surfaces": surfaces,
        }

    def _fetch_vectors(self, item_ids: Sequence[str]) -> dict[Any, np.ndarray]:
        return dict(self.store.retrieve(list(item_ids)))

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.producer.close()


class SerialisedStore:
    """A vector store whose calls, from any thread, run one at a time."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attr(*args, **kwargs)

        return locked


def _budget_sanity(settings: Settings) -> None:
    if settings.inference.candidates_per_surface <= 0 or not math.isfinite(settings.inference.merge_cosine):
        raise ValueError("inference.candidates_per_surface must be > 0 and merge_cosine finite")


def main(argv: list[str]) -> int:
    from vector_store import open_store

    parser = argparse.ArgumentParser(prog="recsys worker", description="user-updates -> candidates (ONNX Runtime)")
    parser.add_argument("--no-follow-items", action="store_true", help="do not index the `items` topic here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    _budget_sanity(settings)
    runtime = ModelRuntime.load(settings.inference.model_dir, settings.inference.provider)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    retry = {"initial_s": settings.inference.store_retry_initial_s, "max_s": settings.inference.store_retry_max_s}
    try:
        # The store may be down at start too (a Qdrant server not up yet, an Edge shard still
        # locked by the process that held it): wait for it, consuming nothing meanwhile.
        store = call_with_retry(lambda: open_store(settings, dim=runtime.dim), what="opening the vector store",
                                stopping=stopping, **retry)
    except StoreUnavailable:
        log.warning("worker: stopped before the vector store could be opened")
        return 0
    follower = None
    if not args.no_follow_items:
        # An Edge shard belongs to one process, so the `items` follower runs here, in a thread
        # of its own (it blocks on Kafka); every store call of both threads goes through one lock.
        from vector_store.indexer import ItemsFollower, OnnxItemEncoder, model_id_bucket

        store = SerialisedStore(store)
    # Every store call of the worker and the follower waits out a store outage (the lock is not held while waiting).
    store = RetryingStore(store, stopping=stopping, **retry)
    if not args.no_follow_items:
        model_dir = settings.inference.model_dir
        follower = ItemsFollower(store, OnnxItemEncoder(model_dir, model_id_bucket(model_dir)), settings)
    worker = Worker(settings, runtime, store, follower)
    worker.stopping = stopping
    if follower is not None:
        threading.Thread(target=follower.run, args=(worker.stopping,), name="items-follower", daemon=True).start()
    try:
        worker.run()
    except StoreUnavailable:
        log.warning("worker: stopped while the vector store was down; the batch in hand stays uncommitted")
    finally:
        worker.close()
        if follower is not None:
            follower.close()
        store.close()
    return 0
