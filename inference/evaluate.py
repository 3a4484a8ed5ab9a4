"""Offline evaluation of the generative retriever (`recsys evaluate`).

- `ranking_metrics`: full-ranking Recall@K / NDCG@K of single held-out targets over every item
  of the catalogue (no sampled negatives). `exclude_history` masks the items the user already
  interacted with; the benchmark reports both variants and says which is headline.
- `window_recall`: PinRec's unordered recall: the merged candidate list of the M generated
  embeddings against every item the user engages with in a future window (`per_user_window_recall`
  each user's, `paired_gap` the bootstrap interval of two models' difference on the same users).
- `diversity`: intra-list diversity and category coverage of merged lists (model-independent:
  measured on item features such as genres, not on the model's own embeddings).
- per-outcome recall: `ranking_metrics(..., outcome=...)` conditions every query on a given
  outcome (or the target's true one, or none) and `target_action` restricts to targets of one
  outcome.

Queries are generated through `GenerativeRetriever.forward`, the very graph that is exported
to ONNX, fed with item-side embeddings exactly as the worker feeds them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.data import EventLog, concat_ranges, engaged, eval_histories, user_histories
from inference.model import GenerativeRetriever, joint_score

OutcomeChoice = str | int  # "true" (the target's own), "none" (0), an action name or an index


@dataclass
class QueryBatch:
    rows: np.ndarray  # int64 [B] target rows in the log
    queries: torch.Tensor  # float32 [B, M, D]


@torch.no_grad()
def item_matrix(model: GenerativeRetriever, features: np.ndarray | None) -> torch.Tensor:
    """The L2-normalised item table (N, D) the vector store would index."""
    model.eval()
    feats = None if features is None else torch.as_tensor(features, dtype=torch.float32, device=_device(model))
    return model.item_table(feats).float()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _resolve(choice: OutcomeChoice, true_values: np.ndarray, vocab: Sequence[str]) -> np.ndarray:
    if isinstance(choice, (int, np.integer)):
        return np.full_like(true_values, int(choice))
    if choice == "true":
        return true_values
    if choice == "none":
        return np.zeros_like(true_values)
    if choice in vocab:
        return np.full_like(true_values, list(vocab).index(choice) + 1)
    raise ValueError(f"unknown conditioning {choice!r}: use true, none or one of {list(vocab)}")


@torch.no_grad()
def generate(
    model: GenerativeRetriever,
    log: EventLog,
    rows: np.ndarray,
    items: torch.Tensor,
    *,
    outcome: OutcomeChoice = "true",
    surface: OutcomeChoice = "true",
    batch_size: int = 512,
) -> Iterator[QueryBatch]:
    """Queries (B, M, D) for predicting each target row from the events before it."""
    model.eval()
    device = _device(model)
    pad = torch.cat([torch.zeros(1, items.shape[1], device=device), items])  # index 0 = padding
    for s in range(0, len(rows), batch_size):
        r = rows[s : s + batch_size]
        h = eval_histories(log, r, model.cfg.max_len)
        t_out = _resolve(outcome, log.action[r], log.actions)
        t_surf = _resolve(surface, log.surface[r], log.surfaces)
        q = model(
            pad[torch.as_tensor(h.item, device=device)],
            torch.as_tensor(h.action, device=device),
            torch.as_tensor(h.surface, device=device),
            torch.as_tensor(h.ts, device=device),
            # Requested when the worker computes: right after the newest event of the history,
            # not at the target's own time (that would tell the model when the target happens).
            torch.as_tensor(h.ts[:, -1], device=device),
            torch.as_tensor(t_surf[:, None], device=device),
            torch.as_tensor(t_out[:, None], device=device),
        )
        yield QueryBatch(r, q[:, 0].float())


def _history_mask(log: EventLog, rows: np.ndarray, n_items: int) -> torch.Tensor:
    """(B, N) bool: items the user touched before each target row."""
    starts = log.offsets[log.user[rows]]
    lengths = rows - starts
    r = np.repeat(np.arange(len(rows)), lengths)
    cols = log.item[concat_ranges(starts, rows)] - 1
    mask = torch.zeros(len(rows), n_items, dtype=torch.bool)
    mask[torch.as_tensor(r), torch.as_tensor(cols)] = True
    return mask


@torch.no_grad()
def ranking_metrics(
    model: GenerativeRetriever,
    log: EventLog,
    rows: np.ndarray,
    *,
    ks: Sequence[int] = (5, 10),
    exclude_history: bool = False,
    outcome: OutcomeChoice = "true",
    surface: OutcomeChoice = "true",
    target_action: str | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Full-ranking Recall@K and NDCG@K of each target row (one held-out item per row).

    With M > 1 queries an item's score is its best cosine over the M queries, or their joint
    score for a model trained with joint queries."""
    if target_action is not None:
        rows = rows[log.action[rows] == log.actions.index(target_action) + 1]
    items = item_matrix(model, log.features)
    hits = {k: 0.0 for k in ks}
    gains = {k: 0.0 for k in ks}
    for qb in generate(model, log, rows, items, outcome=outcome, surface=surface, batch_size=batch_size):
        if not torch.isfinite(qb.queries).all():  # a NaN score would rank its target first
            raise ValueError("the model generated non-finite query embeddings")
        scores = model.item_scores(qb.queries @ items.T).cpu()  # (B, N)
        target = torch.as_tensor(log.item[qb.rows] - 1)
        if exclude_history:
            mask = _history_mask(log, qb.rows, items.shape[0])
            # A target seen before is still the item to find: only the OTHER history items
            # leave the ranking (no test target repeats in Beauty or ML-100K; synthetic logs do).
            mask[torch.arange(len(target)), target] = False
            scores[mask] = -torch.inf
        t_score = scores.gather(1, target[:, None])
        rank = (scores > t_score).sum(dim=1).numpy()  # 0 = top
        for k in ks:
            hit = rank < k
            hits[k] += float(hit.sum())
            gains[k] += float((hit / np.log2(rank + 2.0)).sum())
    n = max(len(rows), 1)
    out = {f"recall@{k}": hits[k] / n for k in ks} | {f"ndcg@{k}": gains[k] / n for k in ks}
    out["n_targets"] = float(len(rows))
    return out


def merge_round_robin(ranked: np.ndarray, limit: int) -> np.ndarray:
    """Merge M ranked lists (M, L) into one de-duplicated list of `limit`: every list gets an
    equal share of the budget, in turns (PinRec's budget split across generated embeddings)."""
    out: list[int] = []
    seen: set[int] = set()
    for col in range(ranked.shape[1]):
        for m in range(ranked.shape[0]):
            item = int(ranked[m, col])
            if item not in seen:
                seen.add(item)
                out.append(item)
                if len(out) == limit:
                    return np.asarray(out)
    return np.asarray(out)


def served_merge(model: GenerativeRetriever) -> str:
    """The merge the worker serves this model's queries by (inference/worker.py)."""
    return "joint" if model.cfg.joint_queries else "round_robin"


@torch.no_grad()
def merged_candidates(
    model: GenerativeRetriever,
    log: EventLog,
    rows: np.ndarray,
    limit: int,
    *,
    outcome: OutcomeChoice = "none",
    surface: OutcomeChoice = "true",
    exclude_history: bool = True,
    merge: str | None = None,
    single_below: int = 0,
    batch_size: int = 512,
) -> list[np.ndarray]:
    """Per row, the merged top-`limit` item indices (1..N) of the M generated queries: equal
    budget shares in turns (`round_robin`, what the worker does for a model without joint
    queries), every item ranked by its best cosine over the queries (`max_score`), or by the
    queries' joint score (`joint`, `model.joint_score`, the worker's merge for a model trained
    with joint queries). A row whose model input has fewer than
    `single_below` events gets its first query's top `limit` alone (the worker's
    `inference.multi_query_min_history`). By default, the merge the worker serves the model by."""
    merge = merge or served_merge(model)
    items = item_matrix(model, log.features)
    single = input_lengths(model, log, rows) < single_below
    out: list[np.ndarray] = []
    for qb in generate(model, log, rows, items, outcome=outcome, surface=surface, batch_size=batch_size):
        scores = (qb.queries @ items.T).cpu()  # (B, M, N)
        if exclude_history:
            scores.masked_fill_(_history_mask(log, qb.rows, items.shape[0])[:, None, :], -torch.inf)
        k = min(limit, scores.shape[-1])
        one = single[len(out) : len(out) + len(qb.rows)]
        # Each query's own top list: for the round-robin, and for rows that get the first alone.
        top = scores.topk(k, dim=-1).indices.numpy() if merge == "round_robin" or one.any() else None  # (B, M, limit)
        if merge in ("max_score", "joint"):
            best = scores.amax(dim=1) if merge == "max_score" else joint_score(scores, float(model.scale()), dim=1)
            ranked = list(best.topk(k, dim=-1).indices.numpy())
        elif merge == "round_robin":
            ranked = [merge_round_robin(t, limit) for t in top]
        else:
            raise ValueError(f"unknown merge {merge!r}: round_robin | max_score | joint")
        out += [(top[i, 0] if alone else r) + 1 for i, (r, alone) in enumerate(zip(ranked, one, strict=True))]
    return out


def input_lengths(model: GenerativeRetriever, log: EventLog, rows: np.ndarray) -> np.ndarray:
    """Events the model reads for each row: the user's earlier events, at most max_len (the
    length the worker's inference.multi_query_min_history is compared with)."""
    return np.minimum(rows - log.offsets[log.user[rows]], model.cfg.max_len)


def future_window(
    log: EventLog, rows: np.ndarray, window: int, positive: Sequence[int] | None = None, stop: np.ndarray | None = None
) -> list[np.ndarray]:
    """Item indices the user engages with in rows r .. r+window-1 (same user; optional action
    filter); `stop`: per row, the first row the window may not reach (e.g. the user's test part)."""
    ends = log.offsets[log.user[rows] + 1] if stop is None else np.minimum(stop, log.offsets[log.user[rows] + 1])
    out = []
    for r, e in zip(rows, ends, strict=True):
        sl = slice(r, min(r + window, e))
        items = log.item[sl]
        if positive is not None:
            items = items[np.isin(log.action[sl], positive)]
        out.append(np.unique(items))
    return out


def window_recall(candidates: Sequence[np.ndarray], future: Sequence[np.ndarray]) -> float:
    """Mean over users of |candidates ∩ future| / |future| (users with an empty future skipped)."""
    per_user = per_user_window_recall(candidates, future)
    return float(np.nanmean(per_user)) if np.isfinite(per_user).any() else 0.0


def per_user_window_recall(candidates: Sequence[np.ndarray], future: Sequence[np.ndarray]) -> np.ndarray:
    """Each user's |candidates ∩ future| / |future|; NaN where the future is empty."""
    return np.array([np.isin(f, c).mean() if len(f) else np.nan for c, f in zip(candidates, future, strict=True)],
                    dtype=np.float64)


def paired_gap(a: np.ndarray, b: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over the users both score (non-NaN) and its 95% percentile-bootstrap
    interval, resampling users with replacement. Recall varies far more from user to user than
    between two models, so a gap of a few percent means something only if it holds over
    resamples of the same users' paired differences."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or n_boot < 1:
        raise ValueError(f"paired_gap needs two arrays of one shape and n_boot >= 1, got {a.shape}, {b.shape}, {n_boot}")
    d = a - b
    d = d[np.isfinite(d)]
    if len(d) == 0:  # no user both could score: nothing was measured
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // len(d))  # resamples drawn at once: bounded memory on 22k-user Beauty
    means = np.concatenate([d[rng.integers(0, len(d), (min(chunk, n_boot - s), len(d)))].mean(axis=1)
                            for s in range(0, n_boot, chunk)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def diversity(candidates: Sequence[np.ndarray], item_features: np.ndarray) -> dict[str, float]:
    """Intra-list diversity (1 - mean pairwise cosine of the items' feature vectors), the mean
    number of distinct feature categories per list, and catalogue coverage."""
    feats = item_features / np.maximum(np.linalg.norm(item_features, axis=1, keepdims=True), 1e-9)
    ild, cats = [], []
    for c in candidates:
        f = feats[c - 1]
        sim = f @ f.T
        n = len(c)
        ild.append(1.0 - (sim.sum() - np.trace(sim)) / max(n * (n - 1), 1))
        cats.append(float((item_features[c - 1].sum(axis=0) > 0).sum()))
    covered = np.unique(np.concatenate(list(candidates))) if candidates else np.zeros(0)
    return {
        "intra_list_diversity": float(np.mean(ild)),
        "categories_per_list": float(np.mean(cats)),
        "coverage": float(len(covered) / item_features.shape[0]),
    }


def popularity_metrics(
    log: EventLog, rows: np.ndarray, train_end: np.ndarray, ks: Sequence[int] = (5, 10), *, exclude_history: bool = False
) -> dict[str, float]:
    """The most-popular baseline (training counts), same protocol as `ranking_metrics`
    (``exclude_history``: the user's earlier items are taken out of the ranking first)."""
    starts = log.offsets[:-1]
    counts = log.item_counts(concat_ranges(starts, train_end))[1:]
    order = np.argsort(-counts, kind="stable")
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    rank = rank_of[log.item[rows] - 1]
    if exclude_history:  # each distinct earlier item ranked above the target moves it up one
        rank = rank - np.array([
            np.count_nonzero(rank_of[np.unique(h) - 1] < r) for h, r in zip(user_histories(log, rows), rank, strict=True)
        ], dtype=rank.dtype)
    out = {f"recall@{k}": float((rank < k).mean()) for k in ks}
    out |= {f"ndcg@{k}": float(((rank < k) / np.log2(rank + 2.0)).mean()) for k in ks}
    return out


def main(argv: list[str]) -> int:
    from inference.checkpoint import load_checkpoint
    from inference.datasets import DATASETS, load_dataset, make_split
    from recsys.settings import get_settings

    settings = get_settings()
    p = argparse.ArgumentParser(prog="recsys evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=settings.train.out_dir / "ckpt_best.pt")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS, help="what the checkpoint is scored on")
    p.add_argument("--path", type=Path, help="data file (default: the dataset's usual place)")
    p.add_argument("--split", default="auto",
                   help="loo | tail | time | auto: the split the checkpoint was trained with (else loo for beauty, tail otherwise)")
    p.add_argument("--on", default="test", choices=["valid", "test"])
    p.add_argument("--exclude-history", action="store_true")
    p.add_argument("--outcome", default="true", help="true | none | an action name")
    args = p.parse_args(argv)
    if not args.checkpoint.exists():
        p.error(f"{args.checkpoint} not found: train first (`recsys train`) or pass --checkpoint")
    model, ckpt = load_checkpoint(args.checkpoint)
    conditioned = ckpt.conditioned
    if not conditioned["outcome"] and args.outcome not in ("true", "none"):
        p.error(f"--outcome {args.outcome}: this model never learnt the target outcome (trained with outcome_dropout=1)")
    if "seed" in ckpt.trained_on:  # synthetic data is made from it
        settings = settings.model_copy(update={"train": settings.train.model_copy(update={"seed": ckpt.trained_on["seed"]})})
    try:
        # and at the training run's times: the model reads the time of day, week and year
        log = load_dataset(args.dataset, args.path, settings, start_ts_ms=ckpt.trained_on.get("start_ts_ms"))
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    # Split the data as it is, then drop what the checkpoint cannot embed: dropped first, the
    # held-out targets moved back onto events the model trained on, and targets on items it
    # never saw left the denominator instead of counting as misses.
    kind = (ckpt.trained_on.get("split") or "auto") if args.split == "auto" else args.split
    split = make_split(log, kind, args.dataset)
    rows = engaged(log, split.test if args.on == "test" else split.valid, settings.train.negative_actions)
    known = np.isin(log.item_ids[log.item - 1], np.asarray(ckpt.item_ids).astype(str))
    aligned_row = np.cumsum(known) - 1  # the align keeps the other rows in order
    log = ckpt.align(log)
    scored = rows[known[rows]]
    metrics = ranking_metrics(  # conditioned as the worker serves it: "none" where the model never learnt a condition
        model, log, aligned_row[scored], exclude_history=args.exclude_history, ks=(5, 10, 20, 50),
        outcome=args.outcome if conditioned["outcome"] else "none", surface="true" if conditioned["surface"] else "none",
    )
    unknown = len(rows) - len(scored)
    if unknown:  # a miss each: no list of this model can hold an item it does not have
        metrics = {k: v * len(scored) / len(rows) if "@" in k else v for k, v in metrics.items()}
    metrics |= {"n_targets": len(rows), "n_targets_unknown_item": unknown}
    json.dump(metrics, sys.stdout, indent=2)
    print()
    return 0 if all(math.isfinite(v) for v in metrics.values()) else 1
