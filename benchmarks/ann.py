"""ANN benchmark: Qdrant Edge's HNSW against exact search, at 100k and 1M items.

For each catalogue size: build an Edge shard through the project's VectorStore (upsert with
the real payload, then optimize() builds the graph; timed), compute the exact top-10 of every
query (numpy/BLAS), sweep HNSW's query-time ef, and pick the fastest ef whose recall@10
against the exact answer is at least --target-recall. Queries go in batches (--batch) through
`VectorStore.query_batch`, as the inference worker sends them. The same again with the
worker's filters (a surface per query, must-not-have-id of 50 "recent" items). Finally the
headline queries/s of each engine at its chosen setting (HNSW, and the exact baseline: one
batched BLAS product plus top-k selection, i.e. vector_store.exact) are timed in interleaved
rounds, best of --final-repeats, so that both see the same load on this shared machine.

Data: synthetic and clustered, not uniform noise (on which every ANN index looks bad and which
no embedding resembles): --clusters Gaussian clusters, each spread along its own random
--rank-dimensional subspace plus a little isotropic noise, L2-normalised; queries are fresh
draws from the same mixture. Say so wherever the numbers are quoted.

Output: benchmarks/results/ann.json (flat; per size suffix `_100k` / `_1m`, and the headline
keys `n_items`, `recall@10`, `qps`, `exact_qps`, `qps_ratio` for the largest size measured)
and benchmarks/results/ann.png (recall@10 vs queries/s per size, exact search as a line).

    python -m benchmarks.ann                       # 100k and 1M
    python -m benchmarks.ann --sizes 100000        # one size; merges into an existing ann.json

Shards are kept under --workdir and reused when the data parameters match, so a rerun does
not rebuild (the build time recorded is the original build's).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.results_io import RESULTS_DIR, write_result
from recsys.settings import VectorStoreSettings
from vector_store.edge import EdgeStore
from vector_store.exact import ExactIndex, topk
from vector_store.schema import ItemRecord

# -- defaults (each is a flag) ------------------------------------------------------------------
SIZES = [100_000, 1_000_000]
DIM = 64  # the model's embedding width (settings.model.dim)
N_QUERIES = 1000  # recall@10 over this many queries: +-0.007 at recall 0.95
K = 10
BATCH = 64  # queries per query_batch call / per matrix product
EFS = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
TARGET_RECALL = 0.95
CLUSTERS = 1000
RANK = 32  # within-cluster subspace dimension (roughly the data's intrinsic dimension)
SPREAD = 0.5  # within-cluster std per coordinate along the subspace (centres: std 1)
NOISE = 0.2  # isotropic std per coordinate on top
REPEATS = 2  # timed passes per sweep point; the fastest is kept (the machine is shared)
FINAL_REPEATS = 5  # interleaved rounds timing the headline settings
N_RECENT = 50  # must-not ids per query in the filtered pass (a user's recent items)
SURFACES = ("home", "search", "related")
SEED = 0


class Mixture:
    """Low-rank Gaussian clusters in ``dim`` dimensions; samples are L2-normalised."""

    def __init__(self, dim: int, clusters: int, rank: int, spread: float, noise: float,
                 seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.centres = rng.normal(size=(clusters, dim)).astype(np.float32)  # std 1 per coordinate
        # Each cluster's own random subspace, scaled so that a standard-normal z moves each
        # coordinate by std 1: `spread` is then relative to the spread of the centres.
        self.bases = (rng.normal(size=(clusters, rank, dim)) / np.sqrt(rank)).astype(np.float32)
        self.spread, self.noise = spread, noise

    def sample(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        """[n, dim] unit float32 rows; a different ``seed`` gives other points, same clusters."""
        rng = np.random.default_rng(seed)
        clusters, rank, dim = self.bases.shape
        out = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            c = rng.integers(0, clusters, m)
            z = rng.normal(size=(m, 1, rank)).astype(np.float32) * self.spread
            iso = rng.normal(size=(m, dim)).astype(np.float32) * self.noise
            x = self.centres[c] + (z @ self.bases[c])[:, 0] + iso
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def records_for(n: int, seed: int) -> list[ItemRecord]:
    """Payloads as the indexer writes them: random surface eligibility, popularity."""
    rng = np.random.default_rng(seed)
    elig = rng.random((n, len(SURFACES))) < 0.67
    elig[~elig.any(axis=1), 0] = True  # every item is shown somewhere
    pop = rng.pareto(1.5, n).astype(np.float32)
    combos = {
        mask: tuple(s for s, on in zip(SURFACES, mask, strict=True) if on)
        for mask in {tuple(row) for row in elig.tolist()}
    }
    return [
        ItemRecord(i, combos[tuple(row)], 0, float(p))
        for i, (row, p) in enumerate(zip(elig.tolist(), pop.tolist(), strict=True))
    ]


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


def build_shard(n: int, args: argparse.Namespace, vectors: np.ndarray,
                records: list[ItemRecord]) -> tuple[EdgeStore, float, float]:
    """An optimised Edge shard of the catalogue, reused when already built.

    Returns (store, upsert seconds, optimize seconds)."""
    path = args.workdir / f"edge-{label(n)}"
    marker = path.parent / f"edge-{label(n)}.json"
    params = {"n": n, "dim": args.dim, "clusters": args.clusters, "rank": args.rank,
              "spread": args.spread, "noise": args.noise, "seed": args.seed}
    settings = VectorStoreSettings(path=path, exact_below=0, numpy_exact=False)
    if marker.exists() and (saved := json.loads(marker.read_text()))["params"] == params:
        store = EdgeStore(settings)
        if store.count() == n:
            print(f"[{label(n)}] reusing {path} (built in {saved['build_s']:.1f} s)", flush=True)
            return store, saved["upsert_s"], saved["build_s"]
        store.close()
    if path.exists():
        import shutil

        shutil.rmtree(path)
    store = EdgeStore(settings)
    store.ensure_collection(args.dim)
    t = time.perf_counter()
    store.upsert(records, vectors)
    upsert_s = time.perf_counter() - t
    print(f"[{label(n)}] upserted {n} in {upsert_s:.1f} s; building HNSW ...", flush=True)
    t = time.perf_counter()
    store.optimize()
    build_s = time.perf_counter() - t
    print(f"[{label(n)}] optimize() took {build_s:.1f} s", flush=True)
    marker.write_text(json.dumps({"params": params, "upsert_s": upsert_s, "build_s": build_s}))
    return store, upsert_s, build_s


def recall(got: list[list[tuple[Any, float]]], truth: list[set[Any]]) -> float:
    hits = sum(len({i for i, _ in g} & t) for g, t in zip(got, truth, strict=True))
    return hits / sum(len(t) for t in truth)


Sweep = list[tuple[int, float, float]]  # (ef, recall@k, queries/s)


def sweep_ef(store: EdgeStore, queries: np.ndarray, truth: list[set[Any]],
             args: argparse.Namespace, surfaces: list[str | None] | None = None,
             exclude: list[list[Any]] | None = None, *, stop_at_target: bool = False) -> Sweep:
    """recall@k and queries/s of batched query_batch calls for each ef of args.efs."""
    spans = [(i, i + args.batch) for i in range(0, len(queries), args.batch)]

    def run() -> list[list[tuple[Any, float]]]:
        return [
            hit
            for a, b in spans
            for hit in store.query_batch(
                queries[a:b], args.k,
                None if surfaces is None else surfaces[a:b],
                None if exclude is None else exclude[a:b],
            )
        ]

    rows: Sweep = []
    for ef in args.efs:
        store.settings.search_ef = ef
        r = recall(run(), truth)
        qps = len(queries) / best_time(run, args.repeats)
        rows.append((ef, r, qps))
        kind = "filtered" if surfaces is not None else "plain"
        print(f"  {kind:8s} ef={ef:4d} recall@{args.k}={r:.4f} {qps:9,.0f} q/s", flush=True)
        if stop_at_target and r >= args.target_recall:
            break
    return rows


def at_target(rows: Sweep, target: float) -> tuple[int, float, float]:
    """The fastest setting that reaches the target (the most accurate one if none does)."""
    ok = [row for row in rows if row[1] >= target]
    return max(ok, key=lambda row: row[2]) if ok else max(rows, key=lambda row: row[1])


def run_size(n: int, args: argparse.Namespace) -> dict[str, float]:
    tag = label(n)
    load_start = os.getloadavg()[0]
    mixture = Mixture(args.dim, args.clusters, args.rank, args.spread, args.noise, args.seed)
    vectors = mixture.sample(n, seed=args.seed + 1)
    queries = mixture.sample(args.queries, seed=args.seed + 2)  # same clusters, fresh points
    records = records_for(n, args.seed + 3)
    spans = [(i, i + args.batch) for i in range(0, len(queries), args.batch)]
    print(f"[{tag}] {n:,} items, {args.queries} queries, dim {args.dim}", flush=True)

    # Ground truth, plain: the exact top-k (one BLAS product per block plus selection).
    truth_idx, _ = topk(queries, vectors, args.k)
    truth = [set(row.tolist()) for row in truth_idx]
    # ... and with the worker's filters: a surface per query and N_RECENT excluded ids (two of
    # them true neighbours, so the filter changes the answer), answered by ExactIndex's masks.
    rng = np.random.default_rng(args.seed + 4)
    surfaces: list[str | None] = [SURFACES[i % len(SURFACES)] for i in range(len(queries))]
    exclude: list[list[Any]] = [
        rng.choice(truth_idx[q], 2, replace=False).tolist()
        + rng.integers(0, n, N_RECENT - 2).tolist()
        for q in range(len(queries))
    ]
    exact_index = ExactIndex.build(records, vectors)
    f_hits = exact_index.search(queries, args.k, surfaces, exclude)
    f_truth = [{i for i, _ in hits} for hits in f_hits]

    store, upsert_s, build_s = build_shard(n, args, vectors, records)
    try:
        plain = sweep_ef(store, queries, truth, args)
        filtered = sweep_ef(store, queries, f_truth, args, surfaces, exclude, stop_at_target=True)
        ef, rec, _ = at_target(plain, args.target_recall)
        f_ef, f_rec, _ = at_target(filtered, args.target_recall)

        # Headline figures: each engine at its chosen setting, timed in interleaved rounds so
        # that the exact baseline and HNSW see the same load on this shared machine.
        def exact_plain() -> None:
            for a, b in spans:
                topk(queries[a:b], vectors, args.k)

        def exact_filtered() -> None:
            for a, b in spans:
                exact_index.search(queries[a:b], args.k, surfaces[a:b], exclude[a:b])

        def hnsw(ef_: int, filters: bool) -> Callable[[], None]:
            def run() -> None:
                store.settings.search_ef = ef_
                for a, b in spans:
                    if filters:
                        store.query_batch(queries[a:b], args.k, surfaces[a:b], exclude[a:b])
                    else:
                        store.query_batch(queries[a:b], args.k)
            return run

        timed = {"exact": exact_plain, "hnsw": hnsw(ef, False),
                 "exact_filtered": exact_filtered, "hnsw_filtered": hnsw(f_ef, True)}
        best = dict.fromkeys(timed, float("inf"))
        for _ in range(args.final_repeats):
            for name, fn in timed.items():
                best[name] = min(best[name], best_time(fn, 1))
    finally:
        store.close()
    qps = {name: len(queries) / t for name, t in best.items()}
    print(f"  headline: exact {qps['exact']:,.0f} q/s, HNSW ef={ef} {qps['hnsw']:,.0f} q/s; "
          f"filtered: exact {qps['exact_filtered']:,.0f}, HNSW ef={f_ef} "
          f"{qps['hnsw_filtered']:,.0f} q/s", flush=True)
    metrics: dict[str, float] = {
        f"n_items_{tag}": n,
        f"recall@{args.k}_{tag}": round(rec, 4),
        f"qps_{tag}": round(qps["hnsw"], 1),
        f"exact_qps_{tag}": round(qps["exact"], 1),
        f"qps_ratio_{tag}": round(qps["hnsw"] / qps["exact"], 2),
        f"ef_{tag}": ef,
        f"filtered_recall@{args.k}_{tag}": round(f_rec, 4),
        f"filtered_qps_{tag}": round(qps["hnsw_filtered"], 1),
        f"filtered_exact_qps_{tag}": round(qps["exact_filtered"], 1),
        f"filtered_qps_ratio_{tag}": round(qps["hnsw_filtered"] / qps["exact_filtered"], 2),
        f"filtered_ef_{tag}": f_ef,
        f"build_s_{tag}": round(build_s, 1),
        f"upsert_s_{tag}": round(upsert_s, 1),
        # 1-minute load average around this size's run: 2.0 = both cores busy without us
        f"load_avg_{tag}": round((load_start + os.getloadavg()[0]) / 2, 2),
    }
    for prefix, rows in (("sweep", plain), ("fsweep", filtered)):
        for e, r, q in rows:
            metrics[f"{prefix}_{tag}_ef{e}_recall@{args.k}"] = round(r, 4)
            metrics[f"{prefix}_{tag}_ef{e}_qps"] = round(q, 1)
    return metrics


def sweeps_from(metrics: dict[str, Any], k: int, prefix: str) -> dict[str, Sweep]:
    """(ef, recall, qps) rows per size tag, read back from the flat metrics."""
    out: dict[str, Sweep] = {}
    for key, value in metrics.items():
        if key.startswith(f"{prefix}_") and key.endswith("_qps"):
            _, tag, ef = key.removesuffix("_qps").split("_")
            recall_key = f"{prefix}_{tag}_{ef}_recall@{k}"
            out.setdefault(tag, []).append((int(ef[2:]), metrics[recall_key], value))
    return {tag: sorted(rows) for tag, rows in out.items()}


def plot(metrics: dict[str, Any], path: Path, target: float, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plain, filtered = sweeps_from(metrics, k, "sweep"), sweeps_from(metrics, k, "fsweep")
    tags = sorted(plain, key=lambda tag: metrics[f"n_items_{tag}"])
    for tag, color in zip(tags, ["tab:blue", "tab:orange", "tab:green"], strict=False):
        for rows, style, what in ((plain[tag], "o-", ""),
                                  (filtered.get(tag, []), "s:", ", filtered")):
            ax.plot([q for _, _, q in rows], [r for _, r, _ in rows], style, color=color,
                    label=f"Qdrant Edge HNSW, {tag} items{what}")
            for ef, r, q in rows:
                ax.annotate(str(ef), (q, r), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.axvline(metrics[f"exact_qps_{tag}"], color=color, ls="--",
                   label=f"exact (numpy BLAS), {tag}")
        if f"filtered_exact_qps_{tag}" in metrics:
            ax.axvline(metrics[f"filtered_exact_qps_{tag}"], color=color, ls="-.",
                       label=f"exact (numpy BLAS), {tag}, filtered")
    ax.axhline(target, color="grey", ls=":", label=f"recall@{k} = {target}")
    ax.set_xscale("log")
    ax.set_xlabel(f"queries/s (log), batches of {metrics['batch']} through VectorStore.query_batch")
    ax.set_ylabel(f"recall@{k} vs exact")
    ax.set_title(f"Qdrant Edge HNSW vs exact search, dim {metrics['dim']}, "
                 "clustered synthetic data (labels: ef)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--queries", type=int, default=N_QUERIES)
    p.add_argument("--k", type=int, default=K)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--efs", type=int, nargs="+", default=EFS)
    p.add_argument("--target-recall", type=float, default=TARGET_RECALL)
    p.add_argument("--clusters", type=int, default=CLUSTERS)
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--spread", type=float, default=SPREAD)
    p.add_argument("--noise", type=float, default=NOISE)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--final-repeats", type=int, default=FINAL_REPEATS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workdir", type=Path, default=Path("var/bench/ann"))
    p.add_argument("--name", default="ann", help="writes results/<name>.json and .png")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    out = RESULTS_DIR / f"{args.name}.json"
    metrics: dict[str, Any] = {}
    if out.exists():
        # A run of some sizes keeps the other sizes' figures from the previous file.
        old = json.loads(out.read_text())
        others = {label(int(v)) for k, v in old.items() if k.startswith("n_items_")}
        others -= {label(n) for n in args.sizes}
        metrics = {k: v for k, v in old.items()
                   if any(k.endswith(f"_{t}") or k.startswith(f"sweep_{t}_") for t in others)}
    for n in sorted(args.sizes):
        metrics.update(run_size(n, args))
    sizes = sorted(int(v) for k, v in metrics.items() if k.startswith("n_items_"))
    head = label(sizes[-1])
    headline = {
        "n_items": metrics[f"n_items_{head}"],
        f"recall@{args.k}": metrics[f"recall@{args.k}_{head}"],
        "qps": metrics[f"qps_{head}"],
        "exact_qps": metrics[f"exact_qps_{head}"],
        "qps_ratio": metrics[f"qps_ratio_{head}"],
        "dim": args.dim,
        "n_queries": args.queries,
        "batch": args.batch,
        "target_recall": args.target_recall,
    }
    # Recorded as the module invocation: `python benchmarks/ann.py` cannot import its package.
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "benchmarks.ann", *given])
    path = write_result(args.name, {**headline, **dict(sorted(metrics.items()))}, command=command)
    plot({**headline, **metrics}, RESULTS_DIR / f"{args.name}.png", args.target_recall, args.k)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
