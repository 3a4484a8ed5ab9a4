"""Multi-token generation, M = 4 vs M = 1: benchmarks/results/multitoken.json (+ .png).

Three data sets: `synthetic` (streams.synthetic: 2,000 users with 1-3 of 8 planted interest
clusters, 4,000 items skewed by popularity within each cluster, 60k events; diversity measured
on the planted clusters), `ml100k` (MovieLens-100K ratings replayed as events; diversity on
the movies' genres) and `beauty` (Amazon Beauty's purchase sequences; it has no item metadata,
so diversity is measured on 20 clusters of the items' co-purchase factors). On each, two
models are trained identically on the future window (the engaged events among every position's next `WINDOW`
items are its targets, PinRec's unordered future-window loss);
they differ only in M, the number of query embeddings the head emits. Slots are trained as a
mixture of softmaxes (`train.slots=mixture`, inference/train.py `slot_loss`): each window
target is scored by -log mean_m p_m(target), so slots specialise on the targets they explain
best; slot 0 also answers alone for the next engagement (for M = 1 the same two terms apply,
so both models share one objective). `--set train.slots=joint` measures the joint slots
instead (one softmax over the logsumexp of the slots' logits, plus the mixture term; M = 1
trains as before).

Evaluation, per test user: the history is everything before the user's last 10% of events;
the future window is the engaged (non-"hide") events among the next `WINDOW` after it, less the items
already in the history (the lists exclude those). Each model
produces one merged list of `BUDGET` candidates, the one the worker serves for that model (M = 1:
its top `BUDGET`; M = 4 mixture: every embedding gets an equal share, merged round-robin and
de-duplicated, which is what the worker's `merge_hits` fair share does with equal budgets;
M = 4 joint: every item ranked by the queries' joint score, as the worker's `joint_lists`), the
user's earlier items masked. Reported:
recall@BUDGET of the merged list against the future window (PinRec's unordered recall), and
diversity measured on model-independent item features: intra-list diversity (1 - mean
pairwise cosine of the feature vectors), distinct categories per list, catalogue coverage.
The other merges of M = 4's queries are reported beside it (`round_robin`, `max_score`: every
item ranked by its best cosine, `joint`), keys `<data>_m4_recall@<BUDGET>_<merge>_merge`; the
served one is `<data>_m4_served_merge` (its paired gap is also written as `<data>_m4_served_gap@50`). Recall is also measured at `CURVE_BUDGETS` (10-200 candidates; the worker
serves 100 per surface) for each merge, keys `<data>_m<M>_curve_<merge>_recall@<K>`; the PNG's
third panel plots M = 4's recall over M = 1's at each list length. Both models rank the same
users, so the gap is also reported paired, with a 95% bootstrap interval over users
(`<data>_m4_<merge>_gap@50`, `_ci95_low`, `_ci95_high`), and split by quartile of the users'
history length (`<data>_m<M>_recall@50_history_q<1-4>`, the fourth panel): on real data
several queries pay off for users with long histories and cost recall for short ones.

    python -m benchmarks.multitoken --set train.num_threads=1   # 4 models, 2 at a time (~10-26 min)
    python -m benchmarks.multitoken --name multitoken_joint --set train.num_threads=1 \
        --set train.slots=joint --set train.epochs=60          # the joint slots (~13 min)
    python -m benchmarks.multitoken --datasets beauty --name multitoken_beauty --set train.num_threads=1   # ~33 min
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.cooccurrence import item_factors
from benchmarks.results_io import write_result
from inference.data import (
    EventLog,
    Split,
    events_from_dicts,
    load_movielens,
    load_movielens_genres,
    load_sequences,
    tail_split,
    user_histories,
)
from inference.evaluate import (
    diversity,
    future_window,
    input_lengths,
    merged_candidates,
    paired_gap,
    per_user_window_recall,
    served_merge,
    window_recall,
)
from inference.model import GenerativeRetriever
from inference.train import apply_overrides, train
from recsys.settings import Settings

WINDOW = 10  # future events per position (training) and per user (evaluation)
BUDGET = 50  # merged candidates per user (the headline)
CURVE_BUDGETS = (10, 20, BUDGET, 100, 200)  # recall also at these, 100 being the worker's list length
# streams.synthetic: users with 1-3 of 8 interest clusters, popularity-skewed items within each
SYNTH_USERS, SYNTH_ITEMS, SYNTH_PER_USER = 2000, 4000, 30
SYNTH_START_MS = 1_700_000_000_000  # fixed event times: the time features, hence the run, reproduce
BEAUTY_CLUSTERS = 20  # co-occurrence clusters Beauty's diversity is measured on (it has no categories)

SHARED = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_len=50",
    "model.dropout=0.2",
    "train.batch_size=64",
    "train.lr=0.002",
    "train.min_lr=0.0002",
    "train.warmup_steps=50",
    "train.epochs=30",
    "train.eval_every=5",
    "train.patience=3",
    f"train.window={WINDOW}",
    "train.outcome_dropout=1.0",
    "train.surface_dropout=0.0",
    "train.slots=mixture",
]


def plot(metrics: dict[str, object], path: Path, names: list[str]) -> None:
    """Merged-list recall and intra-list diversity, M = 1 vs M = 4, per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 4, figsize=(16, 3.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for ax, (key, label) in zip(axes[row], ((f"recall@{BUDGET}", f"window recall@{BUDGET}"), ("intra_list_diversity", "intra-list diversity")), strict=False):
            values = [float(metrics[f"{name}_m{m}_{key}"]) for m in (1, 4)]  # type: ignore[arg-type]
            bars = ax.bar(["M = 1", "M = 4"], values, color=["tab:gray", "tab:blue"])
            ax.bar_label(bars, fmt="%.4f")
            ax.set_ylim(min(values) * 0.95, max(values) * 1.03)
            ax.set_title(f"{name}: {label}")
        ax = axes[row][2]
        base = [float(metrics[f"{name}_m1_curve_round_robin_recall@{b}"]) for b in CURVE_BUDGETS]  # type: ignore[arg-type]
        for merge, style in (("round_robin", "o-"), ("max_score", "s--"), ("joint", "^-")):
            m4 = [float(metrics[f"{name}_m4_curve_{merge}_recall@{b}"]) for b in CURVE_BUDGETS]  # type: ignore[arg-type]
            ax.plot(CURVE_BUDGETS, [a / b for a, b in zip(m4, base, strict=True)], style, label=f"M = 4, {merge.replace('_', '-')}")
        ax.axhline(1.0, color="tab:gray", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(CURVE_BUDGETS, [str(b) for b in CURVE_BUDGETS])
        ax.set_xlabel("candidates per user")
        ax.set_title(f"{name}: recall, M = 4 / M = 1")
        ax.legend(fontsize=8)
        ax = axes[row][3]
        quartiles = [q for q in range(1, 5) if f"{name}_m1_recall@{BUDGET}_history_q{q}" in metrics]
        ratios = [float(metrics[f"{name}_m4_recall@{BUDGET}_history_q{q}"]) / max(float(metrics[f"{name}_m1_recall@{BUDGET}_history_q{q}"]), 1e-9)  # type: ignore[arg-type]
                  for q in quartiles]
        labels = [f"{metrics[f'{name}_history_q{q}_min_events']}-{metrics[f'{name}_history_q{q}_max_events']}" for q in quartiles]
        bars = ax.bar(labels, ratios, color="tab:blue")
        ax.bar_label(bars, fmt="%.3f")
        ax.axhline(1.0, color="tab:gray", lw=1)
        ax.set_ylim(min([*ratios, 1.0]) * 0.95, max([*ratios, 1.0]) * 1.03)
        ax.set_xlabel("history length, quartiles of users")
        ax.set_title(f"{name}: recall@{BUDGET}, M = 4 / M = 1")
    fig.suptitle(f"{BUDGET} merged candidates, future window {WINDOW}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load(name: str, data: Path) -> tuple[EventLog, np.ndarray]:
    """The event log of a data set and the item features diversity is measured on."""
    if name == "ml100k":
        log = load_movielens(data / "ml-100k" / "u.data")
        return log, load_movielens_genres(data / "ml-100k" / "u.item", log)
    if name == "beauty":
        log = load_sequences(data / "amazon-beauty" / "Beauty.txt")
        return log, cooccurrence_clusters(log, BEAUTY_CLUSTERS, seed=0)
    if name == "synthetic":
        return synthetic_log(SYNTH_USERS, SYNTH_ITEMS, SYNTH_PER_USER, seed=0)
    raise SystemExit(f"unknown dataset {name!r}")


def evaluation_points(
    log: EventLog, part: np.ndarray, before: np.ndarray | None = None
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """One point per user: the first event of `part` (the test or validation rows), its future
    = the next WINDOW engaged (not `train.negative_actions`) items (not reaching `before`'s rows: the validation windows stop
    at the test part), and the user's items before it."""
    negative = Settings().train.negative_actions  # never targets, in training or here
    positive = [i + 1 for i, a in enumerate(log.actions) if a not in negative]
    rows = part[np.unique(log.user[part], return_index=True)[1]]
    stop = None
    if before is not None:
        first_before = np.full(log.n_users, np.iinfo(np.int64).max)
        np.minimum.at(first_before, log.user[before], before)
        stop = first_before[log.user[rows]]
    histories = user_histories(log, rows)
    # The lists exclude the user's earlier items, so the window is scored on the new ones only
    # (re-engagements, ~5% of the synthetic windows and none of the real ones, could not be hit).
    future = [np.setdiff1d(f, h) for f, h in zip(future_window(log, rows, WINDOW, positive, stop), histories, strict=True)]
    return rows, future, histories


def pick_min_history(model: GenerativeRetriever, log: EventLog, split: Split) -> int:
    """`inference.multi_query_min_history` chosen on validation users: the history length below
    which a user's first query alone recalls more of the window than the M queries' fair share
    (the smallest best one; 0 when M queries are best for everyone). The validation windows end
    where the user's test events begin (a user with under 100 events has fewer than 10
    validation events), so no test target takes part in the choice."""
    rows, future, _ = evaluation_points(log, split.valid, before=split.test)
    lengths = input_lengths(model, log, rows)
    shared, alone = (per_user_window_recall(merged_candidates(model, log, rows, BUDGET, outcome="none", single_below=below), future)
                     for below in (0, model.cfg.max_len + 1))
    scored = np.isfinite(shared)
    candidates = np.arange(model.cfg.max_len + 2)
    recall = [np.where(lengths < c, alone, shared)[scored].mean() for c in candidates]
    return int(candidates[int(np.argmax(recall))])


@dataclass
class Run:
    metrics: dict[str, object]
    per_user: dict[str, np.ndarray]  # merge -> each test user's recall@BUDGET (NaN: empty window)
    history: np.ndarray  # each test user's events before the evaluation point


def run_one(name: str, m: int, data: Path, out: Path, overrides: list[str], quiet: bool) -> Run:
    """Train one model with M = `m` on data set `name`; its merged lists' recall and diversity."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log, features = load(name, data)
    split = tail_split(log, test_frac=0.1, valid_frac=0.1)
    rows, future, histories = evaluation_points(log, split.test)
    settings = apply_overrides(Settings(), [*SHARED, f"model.num_queries={m}", *overrides])
    torch.set_num_threads(settings.train.num_threads)
    t0 = time.time()
    model, _, results = train(log, split, settings, out / f"{name}-m{m}", name=f"{name}-m{m}", progress=not quiet)
    # Users whose window is empty (their held-out events all re-engage history items, or are
    # hides) score NaN and are left out of every recall; the count says how many are scored.
    metrics: dict[str, object] = {f"{name}_n_users": len(rows), f"{name}_n_users_scored": sum(len(f) > 0 for f in future)}
    served = served_merge(model)
    merges = ("round_robin", "max_score", "joint") if m > 1 else ("round_robin",)
    lists = {  # each (merge, list length) ranked once; the headline is the 50-long one
        (merge, budget): merged_candidates(model, log, rows, budget, outcome="none", exclude_history=True, merge=merge)
        for merge in merges for budget in CURVE_BUDGETS
    }
    per_user = {merge: per_user_window_recall(lists[merge, BUDGET], future) for merge in merges}
    per_user["served"] = per_user[served]
    metrics[f"{name}_m{m}_served_merge"] = served
    metrics[f"{name}_m{m}_recall@{BUDGET}"] = round(float(np.nanmean(per_user[served])), 4)
    for (merge, budget), candidates in lists.items():  # does the picture depend on the list length?
        metrics[f"{name}_m{m}_curve_{merge}_recall@{budget}"] = round(window_recall(candidates, future), 4)
    for key, value in diversity(lists[served, BUDGET], features).items():
        metrics[f"{name}_m{m}_{key}"] = round(value, 4)
    if m > 1:  # the other merges of the same queries
        for merge in merges:
            metrics[f"{name}_m{m}_recall@{BUDGET}_{merge}_merge"] = round(float(np.nanmean(per_user[merge])), 4)
            metrics[f"{name}_m{m}_intra_list_diversity_{merge}_merge"] = round(diversity(lists[merge, BUDGET], features)["intra_list_diversity"], 4)
        # The worker with inference.multi_query_min_history picked on validation users.
        below = pick_min_history(model, log, split)
        adaptive = merged_candidates(model, log, rows, BUDGET, outcome="none", single_below=below)  # the served merge
        per_user["adaptive"] = per_user_window_recall(adaptive, future)
        metrics[f"{name}_m{m}_multi_query_min_history"] = below
        metrics[f"{name}_m{m}_recall@{BUDGET}_adaptive"] = round(float(np.nanmean(per_user["adaptive"])), 4)
        metrics[f"{name}_m{m}_intra_list_diversity_adaptive"] = round(diversity(adaptive, features)["intra_list_diversity"], 4)
    metrics[f"{name}_m{m}_epochs"] = results[0].epochs
    metrics[f"{name}_m{m}_best_epoch"] = int(results[0].best.get("epoch", results[0].epochs))
    metrics[f"{name}_m{m}_train_seconds"] = round(sum(r.seconds for r in results), 1)
    metrics[f"{name}_m{m}_train_and_evaluate_seconds"] = round(time.time() - t0, 1)
    return Run(metrics, per_user, np.array([len(h) for h in histories]))


def paired_metrics(name: str, m1: Run, m4: Run) -> dict[str, object]:
    """M = 4 minus M = 1 on the same test users: the recall@BUDGET gap with its bootstrap
    interval per merge, and both models' recall by quartile of the users' history length
    (whether several queries pay off depends on how much a user has done)."""
    out: dict[str, object] = {}
    base = m1.per_user["served"]
    for merge, recall in m4.per_user.items():
        gap, lo, hi = paired_gap(recall, base)
        out |= {f"{name}_m4_{merge}_gap@{BUDGET}": round(gap, 4),
                f"{name}_m4_{merge}_gap@{BUDGET}_ci95_low": round(lo, 4),
                f"{name}_m4_{merge}_gap@{BUDGET}_ci95_high": round(hi, 4)}
    history = m1.history
    quartile = np.searchsorted(np.percentile(history, [25, 50, 75]), history, side="right")
    for q in range(4):
        users = quartile == q
        if not users.any():  # equal history lengths leave quartiles empty (the synthetic users)
            continue
        out[f"{name}_history_q{q + 1}_min_events"] = int(history[users].min())
        out[f"{name}_history_q{q + 1}_max_events"] = int(history[users].max())
        for m, run in ((1, m1), (4, m4)):
            out[f"{name}_m{m}_recall@{BUDGET}_history_q{q + 1}"] = round(float(np.nanmean(run.per_user["served"][users])), 4)
    return out


def cooccurrence_clusters(log: EventLog, k: int, seed: int) -> np.ndarray:
    """One-hot item clusters from who bought what (Beauty.txt has no item metadata): k-means
    over the items' rank-32 factors of the user x item incidence matrix. Model-independent: no
    model's embedding is involved, so both models' lists are measured on the same yardstick."""
    factors = item_factors(log, np.arange(log.n_events), 32, seed)
    rng = np.random.default_rng(seed)
    centres = factors[rng.choice(len(factors), k, replace=False)]
    for _ in range(50):  # Lloyd's k-means on the unit sphere (cosine)
        assign = (factors @ centres.T).argmax(axis=1)
        for c in range(k):
            members = factors[assign == c]
            if len(members):
                mean = members.mean(axis=0)
                centres[c] = mean / max(np.linalg.norm(mean), 1e-9)
    return np.eye(k, dtype=np.float32)[assign]


def synthetic_log(n_users: int, n_items: int, per_user: int, seed: int) -> tuple[EventLog, np.ndarray]:
    """streams.synthetic's stream (users with 1-3 interest clusters) and one-hot item clusters."""
    from streams.synthetic import item_cluster, synthetic_events

    ev = Settings().events
    events = synthetic_events(n_users * per_user, n_users, n_items, seed, start_ts_ms=SYNTH_START_MS)
    log = events_from_dicts(events, ev.actions, ev.surfaces)
    clusters = np.asarray([item_cluster(int(i), 8) for i in log.item_ids])
    return log, np.eye(8, dtype=np.float32)[clusters]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In each pool worker: end with the benchmark. A SIGTERM or SIGKILL to the parent alone
    left its workers training for an hour, taking the CPU of every later measurement."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/datasets"), help="holds ml-100k/ and amazon-beauty/")
    p.add_argument("--datasets", default="synthetic,ml100k", help="comma-separated: synthetic, ml100k, beauty")
    p.add_argument("--out", type=Path, default=Path("var/bench/multitoken"))
    p.add_argument("--name", default="multitoken", help="results file name (benchmarks/results/<name>.json)")
    p.add_argument("--set", action="append", default=[], help="override for every model")
    p.add_argument("--jobs", type=int, default=2, help="models trained at once (one process each)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    names = args.datasets.split(",")
    metrics: dict[str, object] = {"window": WINDOW, "budget": BUDGET}
    jobs = [(name, m, args.data, args.out, args.set, args.quiet) for name in names for m in (1, 4)]
    t0 = time.time()
    runs: dict[tuple[str, int], Run] = {}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=die_with_parent) as pool:
        for job, run in zip(jobs, pool.map(run_one, *zip(*jobs, strict=True)), strict=True):
            runs[job[0], job[1]] = run
            metrics |= run.metrics
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    for name in names:
        metrics |= paired_metrics(name, runs[name, 1], runs[name, 4])
        metrics[f"{name}_m4_wins_recall"] = bool(metrics[f"{name}_m4_recall@{BUDGET}"] > metrics[f"{name}_m1_recall@{BUDGET}"])  # type: ignore[operator]
        metrics[f"{name}_m4_wins_diversity"] = bool(metrics[f"{name}_m4_intra_list_diversity"] > metrics[f"{name}_m1_intra_list_diversity"])  # type: ignore[operator]
    metrics["settings_overrides"] = [*SHARED, *args.set]
    path = write_result(args.name, metrics)
    plot(metrics, path.with_suffix(".png"), names)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
