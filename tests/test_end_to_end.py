"""End to end, everything real: Kafka broker, Faust worker, ONNX Runtime worker with Qdrant
Edge, gRPC server — each its own process, as in docker-compose.yml.

An action goes in on `actions`; GetCandidates must serve a new list built from it.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from kafka import KafkaConsumer, KafkaProducer

from inference.runtime import ModelRuntime
from recsys.local_stack import LocalStack, wait_for
from recsys.settings import Settings, TopicSettings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from streams.schema import encode_event
from streams.synthetic import cluster_features

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

N_ITEMS = 96
N_USERS = 200
FRESH_S = 20.0  # generous: the suite shares two cores with the broker and four services
SURFACES = ["home", "search", "related"]
N_CLUSTERS = 4  # item i belongs to cluster i % 4: 24 items each, more than a surface's 20 candidates


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.train import train_small_demo_model

    out = tmp_path_factory.mktemp("model")
    # Bounded by epochs (~10 s here), not by the clock: a time cap let a loaded machine cut
    # training short. At lr 1e-3 the demo's 30 epochs left this model barely conditioned (loss
    # 4.0 of ln 96 = 4.6; save vs click queries 0.004 apart, the same top 20); at the demo
    # trainer's 1e-2 it recovers the planted outcome clusters (loss 3.0; 19 of 20 in the right one).
    features = {str(i): cluster_features(i, N_CLUSTERS) for i in range(N_ITEMS)}  # so that it embeds new items
    return train_small_demo_model(_outcome_events(6000, N_USERS, N_ITEMS, seed=3), Settings(), out, max_seconds=None,
                                  item_features=features)


def _outcome_events(n_events: int, n_users: int, n_items: int, seed: int) -> list[dict[str, Any]]:
    """Actions with the outcome planted in the item (cluster = item % 4; low indices more
    popular): users save in clusters 0-1 and click in clusters 2-3, user u in save cluster
    `u % 2` and click cluster `2 + u // 2 % 2`, on any surface. A model conditioned on "save"
    must then point at saved clusters, on "click" at clicked ones. (streams.synthetic's outcome
    mix differs too little between clusters for that: on its data this test was a coin flip.)"""
    rng = random.Random(seed)
    start = int(time.time() * 1000) - n_events * 100
    events = []
    for i in range(n_events):
        user = rng.randrange(n_users)
        action = "save" if rng.random() < 0.4 else "click"
        cluster = user % 2 if action == "save" else 2 + user // 2 % 2
        size = len(range(cluster, n_items, N_CLUSTERS))
        item = cluster + N_CLUSTERS * int(size * rng.random() ** 2)
        events.append({"user_id": user, "item_id": item, "action": action, "surface": rng.choice(SURFACES),
                       "ts": start + i * 100})
    return events


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    suffix = f"-e2e-{time.time_ns()}"
    topics = {f"topics.{name}": f"{value}{suffix}" for name, value in TopicSettings().model_dump().items()}
    overrides = {
        **topics,
        "streams.app_id": f"streams{suffix}",
        "inference.group_id": f"worker{suffix}",
        "vector_store.indexer_group_id": f"indexer{suffix}",
        "inference.candidates_per_surface": 20,
        "inference.max_wait_ms": 5,
    }
    with LocalStack(tmp_path_factory.mktemp("stack"), model_dir, bootstrap=kafka_bootstrap, overrides=overrides) as s:
        yield s


def _topic(stack: LocalStack, name: str) -> str:
    return str(stack.overrides[f"topics.{name}"])


def _send(stack: LocalStack, topic: str, key: str, value: bytes) -> None:
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap)
    producer.send(_topic(stack, topic), key=key.encode(), value=value)
    producer.flush()
    producer.close()


def _get(stack: LocalStack, user: str, limit: int = 20) -> dict[str, Any]:
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = pb_grpc.CandidatesStub(channel)
        reply = stub.BatchGetCandidates(pb.BatchGetCandidatesRequest(
            requests=[pb.GetCandidatesRequest(user_id=user, surface=s, limit=limit) for s in SURFACES]), timeout=5)
    return {r.surface: r for r in reply.responses}


def _act(stack: LocalStack, user: str, item: int, action: str = "save", surface: str = "home") -> int:
    ts = int(time.time() * 1000)
    _send(stack, "actions", user, encode_event({"user_id": user, "item_id": item, "action": action, "surface": surface, "ts": ts}))
    return ts


def _fresh(stack: LocalStack, user: str, ts: int) -> dict[str, Any] | None:
    replies = _get(stack, user)
    return replies if all(r.source_event_ts_ms == ts and not r.is_fallback for r in replies.values()) else None


def test_an_action_yields_fresh_candidates(stack: LocalStack, model_dir: Path) -> None:
    user = "e2e-user-1"
    before = _get(stack, user)
    assert all(r.is_fallback for r in before.values())  # unknown so far: popularity, flagged

    history = [3, 11, 19, 27]  # one cluster of the catalogue (item % 4 == 3)
    for item in history[:-1]:
        _act(stack, user, item)
    ts = _act(stack, user, history[-1])
    assert wait_for(lambda: _fresh(stack, user, ts), FRESH_S), f"no fresh candidates:\n{stack.services['worker'].log_tail()}"
    replies = _fresh(stack, user, ts)
    assert replies is not None
    lists = {s: [c.item_id for c in r.candidates] for s, r in replies.items()}
    for surface, items in lists.items():
        assert len(items) == 20, surface
        assert not set(items) & {str(i) for i in history}, f"{surface} serves the user's recent items"
        assert replies[surface].model_version == ModelRuntime.load(model_dir).version
    # The surfaces aim at different outcomes (home: mostly save, search: mostly click).
    assert lists["home"] != lists["search"]


def test_lists_follow_the_outcome_weights(stack: LocalStack) -> None:
    """A history that saves in one cluster and clicks in another: home (0.7 save + 0.3 click)
    serves more of the saved cluster than search (0.8 click + 0.2 save), and search more of the
    clicked one: the budget split follows the configured outcome weights."""
    user = "e2e-user-2"
    saved, clicked = [5, 13, 21], [2, 10, 18]  # clusters 1 and 2
    ts = 0
    for s_item, c_item in zip(saved, clicked, strict=True):
        _act(stack, user, s_item, action="save", surface="home")
        ts = _act(stack, user, c_item, action="click", surface="search")
    assert wait_for(lambda: _fresh(stack, user, ts), FRESH_S)
    replies = _fresh(stack, user, ts)
    assert replies is not None

    def share(surface: str, cluster: int) -> int:
        return sum(int(c.item_id) % N_CLUSTERS == cluster for c in replies[surface].candidates)

    counts = {s: (share(s, 1), share(s, 2)) for s in ("home", "search")}
    assert counts["home"][0] > counts["search"][0], counts  # the saved cluster
    assert counts["search"][1] > counts["home"][1], counts  # the clicked cluster


def test_a_new_item_is_retrievable_without_restart(stack: LocalStack) -> None:
    """With a budget larger than the catalogue every eligible item is retrieved; a new item
    sent on `items` (eligible on `related` only) to the running worker must show up there, and
    only there: its items follower thread embeds and indexes it, no restart."""
    user = "e2e-user-3"

    def served_on() -> set[str] | None:
        ts = _act(stack, user, 7)
        if not wait_for(lambda: _fresh(stack, user, ts), FRESH_S):
            return None
        replies = _get(stack, user, limit=500)
        return {s for s, r in replies.items() if "brand-new-item" in {c.item_id for c in r.candidates}}

    # A budget of 20 may not reach the new item; ask the worker for the whole catalogue.
    stack.overrides["inference.candidates_per_surface"] = N_ITEMS + 10
    try:
        stack.restart("worker")  # for the setting; the item is sent to the worker now running
        # The restarted worker answers (so its items follower has started and caught up): what
        # follows reaches it live.
        assert wait_for(lambda: served_on() is not None, 60), stack.services["worker"].log_tail()
        _send(stack, "items", "brand-new-item", msgpack.packb(
            {"item_id": "brand-new-item", "features": cluster_features(1, N_CLUSTERS), "surfaces": ["related"],
             "created_at": int(time.time() * 1000), "popularity": 0.0}))
        found = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not found:
            found = served_on()
        assert found == {"related"}
    finally:
        stack.overrides["inference.candidates_per_surface"] = 20
        stack.restart("worker")


def test_restarted_server_recovers_every_user(stack: LocalStack) -> None:
    users = ["e2e-restart-1", "e2e-restart-2"]
    for k, user in enumerate(users):
        ts = _act(stack, user, 4 + k)
        assert wait_for(lambda user=user, ts=ts: _fresh(stack, user, ts), FRESH_S)
    before = {u: _get(stack, u) for u in users}
    assert all(not r.is_fallback for reply in before.values() for r in reply.values())
    stack.restart("serve", kill=True)
    after = {u: _get(stack, u) for u in users}
    for user in users:
        for surface in SURFACES:
            assert [c.item_id for c in after[user][surface].candidates] == [c.item_id for c in before[user][surface].candidates]
            assert after[user][surface].source_event_ts_ms == before[user][surface].source_event_ts_ms


def test_killing_the_worker_mid_stream_loses_no_update(stack: LocalStack) -> None:
    """SIGKILL the worker while updates flow (every user's next action every ~50 ms, so its
    batches are in flight: a worker that committed offsets before its candidates were written
    would lose some users' newest action for good); after a restart every user's newest action
    is reflected in `candidates`."""
    users = [f"e2e-kill-{i}" for i in range(30)]
    last_ts: dict[str, int] = {}
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap)
    stop = threading.Event()

    def stream() -> None:  # rounds of every user's next action until told to stop
        for round_ in itertools.count():
            for i, user in enumerate(users):
                ts = int(time.time() * 1000)
                event = {"user_id": user, "item_id": (i * 8 + round_) % N_ITEMS, "action": "click", "surface": "home", "ts": ts}
                producer.send(_topic(stack, "actions"), key=user.encode(), value=encode_event(event))
                last_ts[user] = ts
            producer.flush()
            if stop.wait(0.05):
                return

    streaming = threading.Thread(target=stream, daemon=True)
    streaming.start()
    time.sleep(2.0)  # updates flow through the streams into the worker's batches
    assert streaming.is_alive(), "the stop should come mid-stream"
    stack.services["worker"].kill()
    stop.set()
    streaming.join(30)
    producer.close()
    stack.start_service("worker")

    def all_fresh() -> bool:
        return all(_get(stack, u)["home"].source_event_ts_ms == ts for u, ts in last_ts.items())

    assert wait_for(all_fresh, 60, interval_s=0.5), stack.services["worker"].log_tail()

    # And the topic itself holds a record for every user (nothing only in memory).
    consumer = KafkaConsumer(_topic(stack, "candidates"), bootstrap_servers=stack.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    seen = {m.key.decode() for m in consumer}
    consumer.close()
    assert set(users) <= seen
