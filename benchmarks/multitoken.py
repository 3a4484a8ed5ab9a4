"""Multi-token generation, M = 4 vs M = 1 on MovieLens-100K: benchmarks/results/multitoken.json.

Both models are trained identically on the future window (every position's next `WINDOW`
events are its targets, PinRec's unordered future-window loss); they differ only in M, the
number of query embeddings the head emits. With M > 1 each target is scored by a mixture of
the M slots' softmaxes, so slots specialise.

Evaluation, per test user: the history is everything before the user's last 10% of events;
the future window is the next `WINDOW` events after it. Each model produces one merged list of
`BUDGET` candidates (M = 4: every embedding gets an equal share, merged round-robin and
de-duplicated, as the worker's budget split does; M = 1: its top `BUDGET`), the user's rated
movies masked. Reported: recall@BUDGET of the merged list against the future window
(PinRec's unordered recall), and diversity measured on the movies' genres (model-independent):
intra-list diversity (1 - mean pairwise cosine of genre vectors), distinct genres per list,
catalogue coverage across users.

    python -m benchmarks.multitoken      # ~10 min on the 2-core dev CPU
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.results_io import write_result
from inference.data import load_movielens, load_movielens_genres, tail_split
from inference.evaluate import (
    diversity,
    future_window,
    merged_candidates,
    window_recall,
)
from inference.train import apply_overrides, train
from recsys.settings import Settings

WINDOW = 10  # future events per position (training) and per user (evaluation)
BUDGET = 50  # merged candidates per user

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
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/datasets/ml-100k"))
    p.add_argument("--out", type=Path, default=Path("var/bench/multitoken"))
    p.add_argument("--name", default="multitoken", help="results file name (benchmarks/results/<name>.json)")
    p.add_argument("--set", action="append", default=[], help="override for both models")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    log = load_movielens(args.data / "u.data")
    genres = load_movielens_genres(args.data / "u.item", log)
    split = tail_split(log, test_frac=0.1, valid_frac=0.1)
    # One evaluation point per user: the first test event; its future = the next WINDOW events.
    first = np.unique(log.user[split.test], return_index=True)[1]
    rows = split.test[first]
    future = future_window(log, rows, WINDOW)

    metrics: dict[str, object] = {"window": WINDOW, "budget": BUDGET, "n_users": len(rows)}
    t0 = time.time()
    for m in (1, 4):
        settings = apply_overrides(Settings(), [*SHARED, f"model.num_queries={m}", *args.set])
        torch.set_num_threads(settings.train.num_threads)
        model, _, results = train(log, split, settings, args.out / f"m{m}", name=f"ml100k-m{m}", progress=not args.quiet)
        cands = merged_candidates(model, log, rows, BUDGET, outcome="none", exclude_history=True)
        metrics[f"m{m}_recall@{BUDGET}"] = round(window_recall(cands, future), 4)
        for key, value in diversity(cands, genres).items():
            metrics[f"m{m}_{key}"] = round(value, 4)
        if m > 1:  # the alternative merge: every item ranked by its best score over the M queries
            best = merged_candidates(model, log, rows, BUDGET, outcome="none", exclude_history=True, merge="max_score")
            metrics[f"m{m}_recall@{BUDGET}_max_score_merge"] = round(window_recall(best, future), 4)
            metrics[f"m{m}_intra_list_diversity_max_score_merge"] = round(diversity(best, genres)["intra_list_diversity"], 4)
        metrics[f"m{m}_epochs"] = results[0].epochs
        metrics[f"m{m}_train_seconds"] = round(results[0].seconds, 1)
    metrics["train_seconds"] = round(time.time() - t0, 1)
    metrics["m4_wins_recall"] = bool(metrics[f"m4_recall@{BUDGET}"] > metrics[f"m1_recall@{BUDGET}"])  # type: ignore[operator]
    metrics["m4_wins_diversity"] = bool(metrics["m4_intra_list_diversity"] > metrics["m1_intra_list_diversity"])  # type: ignore[operator]
    path = write_result(args.name, metrics)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
