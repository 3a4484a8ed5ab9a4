"""`recsys demo`: the main job on the embedded default, in one command, shown live.

1. trains a small model on generated events with planted interests (or reuses the one in
   `<work-dir>/model`) and exports it to ONNX;
2. starts a real Kafka broker, indexes the items into Qdrant Edge, starts the Faust worker,
   the ONNX Runtime worker and the gRPC server as processes (recsys.local_stack);
3. streams background traffic into `actions` and, every few seconds, sends one action of a
   few featured users and shows — through gRPC GetCandidates — their candidates changing,
   with the time from produce to the new list being served.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import signal
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from recsys.local_stack import LocalStack, wait_for
from recsys.settings import get_settings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from streams.produce import produce
from streams.schema import encode_event
from streams.synthetic import N_CLUSTERS, cluster_features, item_cluster, synthetic_events, user_interests

console = Console()


def ensure_model(model_dir: Path, *, users: int, items: int, seed: int, retrain: bool) -> None:
    # The data the model was trained for, beside it: a demo run with other --users, --items or
    # --seed would stream items and users the model never saw.
    made_for = {"users": users, "items": items, "seed": seed}
    recipe = model_dir / "demo.json"
    if (model_dir / "meta.json").exists() and not retrain:
        if recipe.exists() and json.loads(recipe.read_text(encoding="utf-8")) == made_for:
            console.print(f"[dim]model: reusing {model_dir} (--retrain to train again)[/dim]")
            return
        console.print(f"[dim]model: {model_dir} was trained for other data than {made_for}: training again[/dim]")
    from inference.train import train_small_demo_model

    console.print(f"[bold]training[/bold] a small model on {users * 15:,} generated events ({items} items) ...")
    started = time.monotonic()
    settings = get_settings()
    events = [e.to_wire() for e in synthetic_events(users * 15, users, items, seed, events=settings.events)]
    features = {str(i): cluster_features(i, N_CLUSTERS) for i in range(items)}  # new items can be embedded
    train_small_demo_model(events, settings, model_dir, item_features=features)
    recipe.write_text(json.dumps(made_for), encoding="utf-8")
    console.print(f"model exported to {model_dir} in {time.monotonic() - started:.0f}s")


def background_traffic(bootstrap: str, topic: str, users: int, items: int, rate: float, stop: threading.Event) -> None:
    """Steady synthetic actions for everyone but the featured users, until stopped."""
    for chunk in itertools.count():
        if stop.is_set():
            return
        events = synthetic_events(int(rate), users, items, seed=1000 + chunk, user_prefix="bg-",
                                  start_ts_ms=int(time.time() * 1000), step_ms=max(1, int(1000 / rate)),
                                  events=get_settings().events)
        produce((e.to_wire() for e in events), bootstrap, topic, rate=rate, progress=False)


def show(console: Console, user: str, event: dict[str, Any], reply: Any, latency_ms: float) -> None:
    table = Table(title=f"user {user}: {event['action']} item {event['item_id']} on {event['surface']}"
                        f" -> served {latency_ms:.0f} ms later", title_justify="left")
    table.add_column("surface")
    table.add_column("top candidates (item: cluster)")
    table.add_column("model")
    for response in reply.responses:
        top = ", ".join(f"{c.item_id}:{int(c.item_id) % 8}" for c in response.candidates[:8])
        table.add_row(response.surface, top, response.model_version[:16] + (" (fallback)" if response.is_fallback else ""))
    console.print(table)


def featured_actions(stack: LocalStack, args: argparse.Namespace) -> list[float]:
    """Until `args.seconds` have passed: one action of a featured user at a time, its new
    candidates shown once served; returns each action's time from produce to served (ms)."""
    settings = get_settings()
    channel = grpc.insecure_channel(stack.grpc_target)
    stub = pb_grpc.CandidatesStub(channel)
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=0)
    featured = [f"demo-{u}" for u in range(args.featured)]
    engagements = [a for a in settings.events.actions if a not in settings.train.negative_actions]
    latencies: list[float] = []
    deadline = time.monotonic() + args.seconds
    try:
        for step in itertools.count():
            if time.monotonic() > deadline:
                break
            user = featured[step % len(featured)]
            interests = user_interests(step % len(featured), n_clusters=8, seed=args.seed)
            cluster = interests[step % len(interests)]
            item = cluster + 8 * ((step * 7) % (args.items // 8))
            assert item_cluster(item, 8) == cluster
            event = {"user_id": user, "item_id": item, "action": engagements[step % len(engagements)],
                     "surface": settings.events.surfaces[step % len(settings.events.surfaces)],
                     "ts": int(time.time() * 1000)}
            sent = time.monotonic()
            producer.send(settings.topics.actions, key=user.encode(), value=encode_event(event))
            producer.flush()
            request = pb.BatchGetCandidatesRequest(requests=[
                pb.GetCandidatesRequest(user_id=user, surface=s, limit=8) for s in settings.events.surfaces])

            def fresh() -> Any:
                try:
                    reply = stub.BatchGetCandidates(request, timeout=1.0)
                except grpc.RpcError:  # a slow answer on a loaded machine: asked again
                    return None
                return reply if all(r.source_event_ts_ms == event["ts"] for r in reply.responses) else None

            reply = None
            if wait_for(lambda: (reply := fresh()) is not None, 10.0):  # noqa: F841
                reply = fresh() or stub.BatchGetCandidates(request, timeout=5.0)
                latency = (time.monotonic() - sent) * 1000
                latencies.append(latency)
                show(console, user, event, reply, latency)
            else:
                console.print(f"[red]user {user}: no fresh candidates within 10 s[/red]")
                stack.check_alive()
            time.sleep(1.0)
    finally:  # before the stack stops: a producer left open retries a dead broker at exit
        with contextlib.suppress(KafkaError):
            producer.close(timeout=2)
        channel.close()
    return latencies


def at_least(low: float, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: `kind(text)`, refused below `low`."""
    def parse(text: str) -> Any:
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: at least {low}")
        return value
    return parse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("var/demo"))
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to stream")
    parser.add_argument("--users", type=at_least(1, int), default=2000)
    parser.add_argument("--items", type=at_least(N_CLUSTERS, int), default=400, help="at least one per planted cluster")
    parser.add_argument("--rate", type=at_least(1, float), default=100.0, help="background events per second")
    parser.add_argument("--featured", type=at_least(1, int), default=3, help="users whose candidates are shown")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    settings = get_settings()
    model_dir = args.work_dir.resolve() / "model"
    ensure_model(model_dir, users=args.users, items=args.items, seed=args.seed, retrain=args.retrain)

    # `kill`, `timeout` and a closed terminal stop the demo as Ctrl-C does: through the stack's
    # clean stop, not leaving the broker and the services (each in a session of its own) behind.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    console.print("[bold]starting[/bold] Kafka, the indexer, streams, worker and gRPC server ...")
    try:
        with LocalStack(args.work_dir / "run", model_dir) as stack:
            console.print(f"gRPC GetCandidates on {stack.grpc_target}; logs in {stack.work_dir / 'logs'}")
            assert stack.bootstrap is not None
            stop = threading.Event()
            traffic = threading.Thread(target=background_traffic, daemon=True, args=(
                stack.bootstrap, settings.topics.actions, args.users, args.items, args.rate, stop))
            traffic.start()

            try:
                latencies = featured_actions(stack, args)
            finally:
                stop.set()
            if latencies:
                console.print(f"[bold]produce -> served[/bold] over {len(latencies)} featured actions: "
                              f"median {statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms")
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP: the stack has stopped on the way out
        console.print("[yellow]stopped[/yellow]: the broker and every service are down")
        return 130
    return 0
