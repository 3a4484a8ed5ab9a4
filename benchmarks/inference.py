"""Inference throughput: user regenerations/s of the worker's compute path vs ONNX Runtime alone.

The worker's whole path for a micro-batch runs in-process on real components: the model's
ONNX Runtime session (CPU EP), a real Qdrant Edge store holding the exported item table
(below `vector_store.exact_below` items the Edge store answers from its numpy snapshot, as the
worker does by default), the query plan and the merge (`inference.worker.Worker.compute`).
The ceiling is the same ONNX Runtime session alone on the same encoded inputs
(`ModelRuntime.generate`). Both are timed in interleaved rounds (best of --repeats), so they
see the same load on this shared machine; the ratio is what to trust.

The model is the default one (`settings.model`: dim 64, 2 layers, M = 4), trained for
--train-seconds on generated events (its quality does not matter here, but a trained model's
query embeddings merge like a real one's) and exported; 3 surfaces, each with two outcomes,
100 candidates per surface. Users are replayed from the same generated events: each one's last
`streams.max_sequence_len` events, exactly as `user-updates` carries them.

    python -m benchmarks.inference                   # writes inference.json
    python -m benchmarks.inference --slots joint --name inference_joint   # a model with joint queries
    python -m benchmarks.inference --profile out.svg  # py-spy flame graph of the compute path
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results_io import RESULTS_DIR, py_spy, reusable_model, write_result
from recsys.settings import Settings, VectorStoreSettings

# -- defaults (each is a flag) ------------------------------------------------------------------
USERS = 10_000
ITEMS = 10_000
EVENTS = 600_000  # ~60 per user: most users' updates carry the full 50 (streams.max_sequence_len), as at steady state
BATCH = 256  # users per micro-batch (settings.inference.max_batch)
BATCHES = 8  # distinct micro-batches per timed round
REPEATS = 5
TRAIN_SECONDS = 90.0


def ensure_model(model_dir: Path, events: list[dict[str, Any]], train_seconds: float, slots: str) -> Path:
    """Train the default model (with `train.slots` = ``slots``) briefly on ``events`` and
    export it (once; reused after)."""
    recipe = {"events": len(events), "train_seconds": train_seconds, "slots": slots, "settings": Settings().model_dump(mode="json")}
    if reusable_model(model_dir, recipe):
        return model_dir
    from inference.data import events_from_dicts, tail_split
    from inference.export import export_model
    from inference.train import train

    settings = Settings()
    settings = settings.model_copy(update={"train": settings.train.model_copy(update={
        "epochs": 50, "eval_every": 1, "patience": 2, "num_threads": 1, "max_minutes": train_seconds / 60.0, "slots": slots})})
    log_ = events_from_dicts(events, settings.events.actions, settings.events.surfaces)
    split = tail_split(log_, test_frac=0.0, valid_frac=0.1)
    model, info, _ = train(log_, split, settings, model_dir / "train", name="bench-default", progress=False)
    export_model(model, info, model_dir)
    return model_dir


def open_indexed_store(model_dir: Path, path: Path, surfaces: Sequence[str], n_items: int | None = None) -> Any:
    """A Qdrant Edge store holding the model's item table, or its first ``n_items`` items
    (built once under ``path``)."""
    from vector_store import open_store
    from vector_store.indexer import ItemTable, index_item_table

    table = ItemTable.load(model_dir)
    if n_items is not None:
        table = ItemTable(table.ids[:n_items], table.embeddings[:n_items], table.popularity[:n_items])
    settings = VectorStoreSettings(backend="edge", path=path)
    store = open_store(settings, dim=table.embeddings.shape[1])
    if store.count() != len(table.ids):
        index_item_table(store, table, surfaces)
    return store


def user_updates(events: list[dict[str, Any]], max_len: int) -> list[dict[str, Any]]:
    """Each user's newest ``max_len`` events as a decoded `user-updates` value."""
    per_user: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        per_user[e["user_id"]].append(e)
    return [
        {"user_id": u, "version": 1, "events": evs[-max_len:], "last_event_ts": evs[-1]["ts"]}
        for u, evs in per_user.items()
    ]


def best_rate(fn: Callable[[], int], repeats: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return max(rates), rates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=USERS)
    p.add_argument("--items", type=int, default=ITEMS, help="the model's item vocabulary (and catalogue)")
    p.add_argument("--catalogues", default="", help="also measure with only the first N items indexed, e.g. 2000,5000")
    p.add_argument("--events", type=int, default=EVENTS)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--batches", type=int, default=BATCHES)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--train-seconds", type=float, default=TRAIN_SECONDS)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = one per core)")
    p.add_argument("--work-dir", type=Path, default=Path("var/bench/inference"))
    p.add_argument("--profile", type=Path, help="instead of timing: py-spy record the compute path into this SVG")
    p.add_argument("--slots", default=Settings().train.slots,
                   help="train.slots of the model (joint: the worker ranks each outcome's queries' hits by their joint score)")
    p.add_argument("--name", default="inference", help="results file name (benchmarks/results/<name>.json)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    from inference.runtime import ModelRuntime
    from inference.worker import Worker
    from streams.synthetic import synthetic_events

    settings = Settings()
    work = args.work_dir.resolve() / f"u{args.users}-i{args.items}-e{args.events}-{args.slots}"
    events = [e.to_wire() for e in synthetic_events(args.events, args.users, args.items, seed=21)]
    model_dir = ensure_model(work / "model", events, args.train_seconds, args.slots)
    runtime = ModelRuntime.load(model_dir, "cpu", threads=args.threads)
    updates = user_updates(events, settings.streams.max_sequence_len)
    batches = [updates[i * args.batch : (i + 1) * args.batch] for i in range(args.batches)]
    assert all(len(b) == args.batch for b in batches), f"need {args.batch * args.batches} users with events"
    sizes = [len(runtime.item_ids)] + [int(n) for n in args.catalogues.split(",") if n]
    metrics: dict[str, Any] = {}
    for n_items in sizes:
        store = open_indexed_store(model_dir, work / f"qdrant-{n_items}", runtime.surfaces, n_items)
        try:
            worker = Worker.offline(settings, runtime, store)
            if args.profile:
                _profile(args.profile, lambda: sum(len(b) for b in batches if worker.compute(b) is not None))
                return
            row = measure(worker, runtime, batches, args.repeats)
        finally:
            store.close()
        row["n_items"] = n_items
        print(n_items, row)
        suffix = "" if n_items == sizes[0] else f"_{n_items // 1000}k"
        metrics.update({f"{k}{suffix}": v for k, v in row.items()})
    metrics.update({
        "batch": args.batch,
        "surfaces": len(runtime.surfaces),
        "m": int(runtime.meta["config"]["num_queries"]),
        "slots": args.slots,
        "joint_queries": runtime.joint_queries,
        "dim": runtime.dim,
        "n_layers": int(runtime.meta["config"]["n_layers"]),
        "candidates_per_surface": settings.inference.candidates_per_surface,
        "limit_headroom": settings.inference.limit_headroom,
        "ort_threads": args.threads,
        # what the timed users carry (a batch runs at its longest history)
        "mean_history_events": round(statistics.fmean(len(u["events"]) for b in batches for u in b), 1),
        "min_history_events": min(len(u["events"]) for b in batches for u in b),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    })
    print(metrics)
    if not args.no_save:
        command = " ".join(shlex.quote(a) for a in ["python", "-m", "benchmarks.inference", *sys.argv[1:]])
        print(write_result(args.name, metrics, command=command))


def measure(worker: Any, runtime: Any, batches: list[list[dict[str, Any]]], repeats: int) -> dict[str, Any]:
    """Users/s of Worker.compute and of the session alone on the same inputs, interleaved."""
    encoded = [worker.encode(b) for b in batches]  # exactly what compute feeds the session
    users = sum(len(b) for b in batches)

    def full() -> int:
        for b in batches:
            worker.compute(b)
        return users

    def ort_only() -> int:
        for x in encoded:
            runtime.generate(x)
        return users

    full(), ort_only()  # warm-up: first-call allocations, page cache
    full_rates, ort_rates, again = [], [], 0
    for _ in range(repeats):  # interleaved, so both see the same load
        full_rates.append(best_rate(full, 1)[0])
        again += worker.last_plan_size[2]
        ort_rates.append(best_rate(ort_only, 1)[0])
    generated, searched, _ = worker.last_plan_size
    per_user = len(batches[-1])
    return {
        "users_per_s": round(max(full_rates), 1),
        "ort_only_users_per_s": round(max(ort_rates), 1),
        "ratio": round(max(full_rates) / max(ort_rates), 3),
        "users_per_s_median": round(statistics.median(full_rates), 1),
        "ort_only_users_per_s_median": round(statistics.median(ort_rates), 1),
        "ratio_of_medians": round(statistics.median(full_rates) / statistics.median(ort_rates), 3),
        "queries_generated_per_user": generated / per_user,
        "queries_searched_per_user": round(searched / per_user, 2),
    }


def _profile(out: Path, fn: Callable[[], int]) -> None:
    """py-spy the compute path of this process for ~20 s (needs py-spy from the dev extra)."""
    import subprocess
    import threading

    stop = threading.Event()
    spy = subprocess.Popen([py_spy(), "record", "--pid", str(os.getpid()), "--output", str(out),
                            "--duration", "20", "--rate", "200", "--nonblocking"])

    def loop() -> None:
        while not stop.is_set():
            fn()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    spy.wait()
    stop.set()
    t.join()
    print(f"profile: {out}")


if __name__ == "__main__":
    main()
