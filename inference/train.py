"""Training of the generative retriever (`recsys train`): pretraining, per-surface fine-tuning.

Objective (shared/DESIGN.md, PinRec): every position t of every training window predicts
the items engaged in its future window (the next `train.window` events that are not negative
actions). The position's M queries are conditioned on its next engagement: surface, outcome
(randomly dropped to 0 = "unconditioned" so both modes are learned) and the time until it.
Every window target is scored by all M query slots, and `train.slots` (`slot_loss`) says how
the slots share it: `offset` (PinRec: slot m answers for the m-th block of the window),
`mixture` (loss = -log mean_m softmax_m(target): a slot is rewarded for the targets it explains
best, so slots specialise on future steps / distinct interests instead of collapsing), `wta`
(relaxed winner-takes-all: each target trains its best slot) or `joint` (one softmax over the
catalogue whose logit for an item is the logsumexp of the M slots' logits: an item is as likely
as its best slots make it, and a slot pointing at nothing this user wants adds next to nothing,
so the lists need not give every slot an equal share; plus the mixture term; the model is marked
`ModelConfig.joint_queries` and evaluated and served by that score). For M = 1 and a window of
1 every mode is plain softmax cross-entropy (SASRec with a full softmax).

The softmax runs over the whole catalogue when it is small enough (`loss = full`; 12k Beauty
items cost less than the transformer), else over the batch's own targets plus uniformly drawn
items with log-Q correction (`loss = sampled`, the expected-inclusion probability of each
candidate is subtracted from its logit; Yi et al. 2019, PinRec).

Stages:
1. pretrain: all surfaces, every parameter.
2. finetune (`--finetune`): per surface, only that surface's head MLP (the item tower and the
   transformer stay frozen, so the exported item vectors do not move); targets on that surface;
   shown-but-not-engaged events (`train.negative_actions`, e.g. "hide") in the target window are
   hard negatives counted `hard_negative_weight` times in the softmax.

Loop: nanoGPT-shaped, one visible `while` over epochs: lr schedule -> batches (AMP, clip, step)
-> validation every `eval_every` epochs -> best / last checkpoints -> early stopping. Seeds are
set, `--resume` continues from <stage>_last.pt with the weights, optimizer and random state an
uninterrupted run would have had at that epoch (it ends with the same weights; a stage file of
another run, another seed, data or pretraining, is refused or, for fine-tuning, started afresh),
a progress bar shows steps, <stage>_curves.png plots the loss and validation metric.
`train.max_minutes` bounds the whole run, its stages together. GPU and mixed precision when present; CPU otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # type: ignore[import-untyped]

from inference.checkpoint import Checkpoint, load_blob, save_checkpoint
from inference.data import (
    EventLog,
    Split,
    TrainBatch,
    concat_ranges,
    engaged,
    iterate_train_batches,
    n_train_batches,
)
from inference.evaluate import ranking_metrics
from inference.model import GenerativeRetriever, ModelConfig
from recsys.settings import ModelSettings, Settings, TrainSettings, get_settings

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA cards that have it. Not fp16 on older cards: its gradients need a
    loss scaler to not underflow, and fp32 there is the simpler correct choice. On the CPU
    autocast costs more in casts than it saves for a model this small; there only the softmax
    matmuls go bf16 (`softmax_dtype`)."""
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def softmax_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 for the (P, N) softmax matmuls on CPUs with native bf16 (AMX / AVX512-BF16)."""
    if enabled and device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def model_config(settings: ModelSettings, log_: EventLog, slots: str = "mixture") -> ModelConfig:
    return ModelConfig(
        n_buckets=log_.n_items + 1,
        n_actions=len(log_.actions),
        n_surfaces=len(log_.surfaces),
        feature_dim=log_.feature_dim,
        dim=settings.dim,
        n_layers=settings.n_layers,
        n_heads=settings.n_heads,
        max_len=settings.max_len,
        num_queries=settings.num_queries,
        dropout=settings.dropout,
        item_mlp=settings.item_mlp,
        head_mult=settings.head_mult,
        init_temperature=settings.init_temperature,
        joint_queries=slots == "joint" and settings.num_queries > 1,
    )


# ----------------------------------------------------------------------------- the loss


@dataclass
class LossSpec:
    """What one training stage optimises."""

    full_softmax: bool
    n_negatives: int
    negative_actions: torch.Tensor  # int64 action indices that are never targets
    log_pop: torch.Tensor  # float32 [N+1] log training frequency (index 0 unused)
    outcome_dropout: float
    surface_dropout: float
    id_dropout: float
    surface: int | None = None  # fine-tuning: only targets on this surface
    hard_negative_weight: float = 0.0  # 0 = no hard negatives (pretraining)
    mm_dtype: torch.dtype | None = None  # bf16 softmax matmuls (CPU mixed precision)
    slots: str = "offset"  # offset | mixture | wta | joint (TrainSettings.slots)


class _SoftmaxXent(torch.autograd.Function):
    """Softmax cross-entropy of queries against an item matrix, fused for the CPU.

    The (R, N) logits are the only large tensor: they are computed once, turned into
    probabilities in place and reused as the gradient, so a step costs one matmul forward,
    two backward and a single exp pass (3x faster than matmul + F.cross_entropy here). Each row
    may have several targets (a future window) sharing its softmax."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,  # (R, D), temperature already folded in
        items: torch.Tensor,  # (N, D)
        target: torch.Tensor,  # (R, W) columns of the positives
        col_bias: torch.Tensor | None,  # (N,) added to every row (log-Q correction)
        hard: tuple[torch.Tensor, torch.Tensor, float] | None,  # (rows, cols, bias) hard negatives
        mm_dtype: torch.dtype | None,  # bf16 matmuls under mixed precision
        join: int,  # consecutive rows scored as one (joint slots); target is then (R / join, W)
    ) -> torch.Tensor:
        qm, im = (q, items) if mm_dtype is None else (q.to(mm_dtype), items.to(mm_dtype))
        logits = (qm @ im.T).float()
        if col_bias is not None:
            logits += col_bias[None, :]
        if hard is not None:
            rows, cols, value = hard
            logits.index_put_((rows, cols), torch.full_like(rows, value, dtype=logits.dtype), accumulate=True)
        resp = None
        if join > 1:
            # Each row's score of an item is the logsumexp of its `join` queries' scores; the
            # responsibilities (softmax over the queries) route the gradient back to them.
            resp = logits.view(-1, join, logits.shape[1])
            top = resp.amax(dim=1, keepdim=True)
            resp.sub_(top).exp_()
            per_item = resp.sum(dim=1, keepdim=True)
            resp.div_(per_item)
            logits = (top + per_item.log()).squeeze(1)  # (R / join, N)
        tgt_logit = logits.gather(1, target)  # (R, W)
        m = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(m).exp_()
        total = probs.sum(dim=1, keepdim=True)
        probs.div_(total)
        ctx.save_for_backward(qm, im, target, probs, resp)
        ctx.dtypes = (q.dtype, items.dtype)
        return m + total.log() - tgt_logit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        qm, im, target, probs, resp = ctx.saved_tensors
        # d/dlogits of sum_w g_w * (lse - logit_w) = (sum_w g_w) * softmax - sum_w g_w * onehot_w
        probs.mul_(grad.sum(dim=1, keepdim=True))
        probs.scatter_add_(1, target, -grad)
        if resp is not None:
            probs = resp.mul_(probs[:, None, :]).view(-1, probs.shape[1])
        g = probs.to(qm.dtype)
        return (g @ im).to(ctx.dtypes[0]), (g.T @ qm).to(ctx.dtypes[1]), None, None, None, None, None


def softmax_xent(
    q: torch.Tensor,
    items: torch.Tensor,
    target: torch.Tensor,
    col_bias: torch.Tensor | None = None,
    hard: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    mm_dtype: torch.dtype | None = None,
    join: int = 1,
) -> torch.Tensor:
    """Cross-entropy of softmax(q @ items.T + biases) at `target`: (R,) for targets (R,), or
    (R, W) for targets (R, W) sharing each row's softmax. With `join` > 1 every `join`
    consecutive rows of q are one row whose item scores are the logsumexp of theirs."""
    flat = target.dim() == 1
    out: torch.Tensor = _SoftmaxXent.apply(q, items, target[:, None] if flat else target, col_bias, hard, mm_dtype, join)
    return out[:, 0] if flat else out


def slot_loss(ce: torch.Tensor, slots: str) -> torch.Tensor:
    """Combine each target's cross-entropy under the M query slots, (P, M, W) -> (P, W).

    - offset (PinRec): slot m answers for the m-th block of the future window (near -> far).
    - mixture: -log mean_m p_m(target), a mixture of the slots' softmaxes; a slot is pulled
      towards the targets it already explains best, so slots specialise softly.
    - wta (multiple-choice learning, relaxed winner-takes-all as in MIND / ComiRec-style
      multi-interest training): each target trains its best slot with weight 1 - eps and the
      others with eps / (M - 1), so slots specialise hard but none goes dead.
    With M = 1 every mode is the plain cross-entropy."""
    P, M, W = ce.shape
    if M == 1:
        return ce[:, 0]
    if slots == "offset":
        slot = (torch.arange(W, device=ce.device) * M) // W  # (W,)
        return ce.gather(1, slot[None, None, :].expand(P, 1, W)).squeeze(1)
    if slots == "wta":
        eps = WTA_EPS
        best = ce.detach().argmin(dim=1, keepdim=True)  # (P, 1, W)
        w = torch.full_like(ce, eps / (M - 1)).scatter_(1, best, 1.0 - eps)
        return (ce * w).sum(dim=1)
    if slots == "mixture":
        return -(torch.logsumexp(-ce, dim=1) - math.log(M))
    raise ValueError(f"unknown train.slots {slots!r}: offset | mixture | wta (joint: batch_loss)")


WTA_EPS = 0.05  # share of a target's weight spread over the slots that did not win it


def distinct_targets(tgt: torch.Tensor) -> torch.Tensor:
    """How many events a batch's (B, T, W) target table holds, each counted once: an event is
    the window target of up to W positions, but one draw from the catalogue for log-Q. Each is
    the next target (offset 1) of exactly one position, and the targets of a window's positions
    are contiguous rows, so the rest are the last such position's later offsets."""
    nxt = tgt[:, :, 0] > 0
    last = torch.where(nxt.any(1), nxt.shape[1] - 1 - nxt.flip(1).to(torch.int8).argmax(1), -1)  # (B,)
    tail = (tgt[torch.arange(tgt.shape[0], device=tgt.device), last.clamp(min=0), 1:] > 0).sum(1) * (last >= 0)
    return nxt.sum() + tail.sum()


def hard_negatives(negative: torch.Tensor, positive: torch.Tensor, targets: torch.Tensor, surface: torch.Tensor,
                   on_surface: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, window slot) of each hard negative of a batch's (P, W) target window: a
    negative event on the surface being fine-tuned (any, when pretraining), once per item and
    position, and never an item that is also one of the position's positives (its boost
    would land on the positive's own logit and weaken the pull towards it)."""
    keep = negative.clone()
    if on_surface is not None:
        keep &= surface == on_surface
    pr, w = keep.nonzero(as_tuple=True)
    item = targets[pr, w]
    keep = ~((targets[pr] == item[:, None]) & positive[pr]).any(dim=1)
    pr, w, item = pr[keep], w[keep], item[keep]
    # The same item hidden twice in a window: one boost (index_put_ accumulates).
    key = pr * (int(targets.max()) + 1) + item
    uniq, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((len(uniq),), len(key), dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(key), device=key.device), reduce="amin")
    return pr[first], w[first]


def batch_loss(
    model: GenerativeRetriever,
    batch: TrainBatch,
    features: torch.Tensor | None,
    spec: LossSpec,
    device: torch.device,
    frozen_trunk: bool = False,
) -> tuple[torch.Tensor, int] | None:
    """Mixture-of-slots softmax loss over every (position, future target) of a batch.

    One query set per position, conditioned on its next engagement (surface and outcome); all
    the position's window targets share that softmax (PinRec's unordered window)."""
    h = batch.history
    grad = contextlib.nullcontext() if not frozen_trunk else torch.no_grad()
    with grad:
        items = model.item_table(features, drop_ids=spec.id_dropout if model.training else 0.0)  # (N, D)
        pad = F.pad(items, (0, 0, 1, 0))  # row 0 = padding
        hidden = model.encode(
            pad[torch.as_tensor(h.item, device=device)],
            torch.as_tensor(h.action, device=device),
            torch.as_tensor(h.surface, device=device),
            torch.as_tensor(h.ts, device=device),
        )  # (B, T, D)
    tgt = torch.as_tensor(batch.target_item, device=device)  # (B, T, W)
    t_act = torch.as_tensor(batch.target_action, device=device)
    t_surf = torch.as_tensor(batch.target_surface, device=device)
    negative = torch.isin(t_act, spec.negative_actions) & (tgt > 0)
    positive = (tgt > 0) & ~negative
    if spec.surface is not None:
        positive &= t_surf == spec.surface
    b, t = positive.any(dim=2).nonzero(as_tuple=True)
    P = len(b)
    if P == 0:
        return None
    pos = positive[b, t]  # (P, W)
    first = pos.to(torch.int8).argmax(dim=1)  # the next engagement conditions the queries
    surf, out = t_surf[b, t, first], t_act[b, t, first]
    if model.training and spec.outcome_dropout > 0:
        out = torch.where(torch.rand(P, device=device) < spec.outcome_dropout, torch.zeros_like(out), out)
    if model.training and spec.surface_dropout > 0:
        surf = torch.where(torch.rand(P, device=device) < spec.surface_dropout, torch.zeros_like(surf), surf)
    # A query conditioned on an outcome answers for the window's engagements with that outcome:
    # trained on all of them, a "save" query learnt the clicks of the next ten events as well,
    # and the surfaces' outcome-weighted budgets no longer meant anything. Unconditioned
    # (outcome 0, dropped out) it answers for every engagement.
    pos &= (out[:, None] == 0) | (t_act[b, t] == out[:, None])
    # The request is the moment the worker computes the lists: right after the position's own
    # event (`evaluate.generate` and the worker alike), never the next engagement's time.
    # Given that time, the model learnt something serving never knows (how long until the
    # target): on ML-100K it was worth ~30% of recall@10 that vanished at a gap of 0.
    gap = torch.zeros(P, dtype=torch.float64, device=device)
    q = model.head(hidden[b, t], surf, out, gap)  # (P, M, D)
    M = q.shape[1]
    qs = (q * model.scale()).reshape(P * M, -1)  # fold the temperature into the queries
    targets = tgt[b, t]  # (P, W), 0 where no target
    if spec.full_softmax:
        cand_items, col_bias = items, None
        cols = (targets - 1).clamp(min=0)
    else:
        n = items.shape[0]
        sampled = torch.randint(1, n + 1, (spec.n_negatives,), device=device)
        cand = torch.unique(torch.cat([tgt[tgt > 0], sampled]))  # sorted item indices
        # log-Q: probability that each candidate is in the set (batch targets or the uniform draw).
        n_targets = float(distinct_targets(tgt))
        p_batch = -torch.expm1(n_targets * torch.log1p(-spec.log_pop[cand].exp().clamp(max=1 - 1e-6)))
        p_uniform = -math.expm1(spec.n_negatives * math.log1p(-1.0 / n)) if n > 1 else 1.0  # k draws with replacement
        cand_items, col_bias = items[cand - 1], -torch.log1p(-(1 - p_batch) * (1 - p_uniform))
        cols = torch.searchsorted(cand, targets.clamp(min=1))
    hard = None
    if spec.hard_negative_weight > 0:
        pr, w = hard_negatives(negative[b, t], pos, targets, t_surf[b, t], spec.surface)
        rows = (pr[:, None] * M + torch.arange(M, device=device)[None, :]).reshape(-1)
        hard = (rows, cols[pr, w].repeat_interleave(M), math.log(spec.hard_negative_weight))
    ce = softmax_xent(qs.float(), cand_items.float(), cols.repeat_interleave(M, dim=0), col_bias, hard, spec.mm_dtype)
    ce = ce.view(P, M, -1)  # (P, M, W)
    if spec.slots == "joint" and M > 1:
        joint = softmax_xent(qs.float(), cand_items.float(), cols, col_bias, hard, spec.mm_dtype, join=M)  # (P, W)
        # Plus the mixture's term, so that each slot also explains part of the window alone: under
        # the joint softmax by itself a slot can settle where it adds nothing (multi-token
        # benchmark, seed 0: synthetic recall@50 .1397 without it, .1468 with it; ML-100K .4312, .4356).
        n_pos = pos.sum()
        loss = ((joint + slot_loss(ce, "mixture")) * pos).sum() / n_pos
        return loss + joint[torch.arange(P, device=device), first].mean(), int(n_pos)
    per_target = slot_loss(ce, spec.slots)  # (P, W)
    n_pos = pos.sum()
    loss = (per_target * pos).sum() / n_pos
    if spec.slots in ("mixture", "wta", "joint") and (M > 1 or ce.shape[2] > 1):
        # Slot 0 also answers alone for the next engagement, the target its condition describes:
        # without this the mixture lets other slots absorb it and outcome conditioning fades.
        # (With M = 1 and a window of 1 this term would only repeat the loss above.)
        loss = loss + ce[torch.arange(P, device=device), 0, first].mean()
    return loss, int(n_pos)


# ----------------------------------------------------------------------------- the loop


@dataclass
class Stage:
    name: str  # "pretrain" | "finetune-<surface>"
    epochs: int
    lr: float
    spec: LossSpec
    valid_rows: np.ndarray
    trainable: list[torch.nn.Parameter] | None = None  # None = all
    frozen_trunk: bool = False
    train_modules: list[torch.nn.Module] = field(default_factory=list)  # in training mode when the trunk is frozen


@dataclass
class TrainResult:
    best: dict[str, float]
    history: list[dict[str, float]]
    checkpoint: Path
    seconds: float
    epochs: int


TRAINING_PROTOCOL = 2  # RunState.protocol of the runs this code writes


@dataclass
class RunState:
    # What the run's metrics mean. Raised when evaluation changes so that an older run's best
    # cannot be compared with new evaluations (2: the request time is the newest history
    # event's, not the target's, and "hide" is no target, 7a3ded6): resuming such a run kept a
    # best no new evaluation could beat, and patience then exported the old weights.
    protocol: int = 1  # what a state saved before the field was
    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    early_stopped: bool = False  # patience ran out: a resumed run ends here too
    origin: str = ""  # stage_origin of the run: a checkpoint resumes only its own run


def stage_origin(model: GenerativeRetriever, log_: EventLog, split: Split) -> str:
    """A digest of what a stage starts from: the data, its split and the weights it begins
    with (for pretraining the seed's initialisation, for fine-tuning the pretrained model)."""
    h = hashlib.sha256()
    h.update("\n".join((*log_.actions, "", *log_.surfaces)).encode())
    for a in (log_.user, log_.item, log_.action, log_.surface, log_.ts, log_.user_ids, log_.item_ids, split.train_end,
              log_.features if log_.features is not None else np.zeros(0)):
        h.update(np.ascontiguousarray(a).tobytes())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def loss_spec(log_: EventLog, train_end: np.ndarray, tcfg: TrainSettings, device: torch.device) -> LossSpec:
    counts = log_.item_counts(concat_ranges(log_.offsets[:-1], train_end))
    pop = (counts + 1e-3) / (counts.sum() + 1e-3 * len(counts))
    full = tcfg.loss == "full" or (tcfg.loss == "auto" and log_.n_items <= tcfg.full_softmax_max_items)
    neg = [log_.actions.index(a) + 1 for a in tcfg.negative_actions if a in log_.actions]
    return LossSpec(
        full_softmax=full,
        n_negatives=tcfg.n_negatives,
        negative_actions=torch.as_tensor(neg, dtype=torch.int64, device=device),
        log_pop=torch.as_tensor(np.log(pop), dtype=torch.float32, device=device),
        outcome_dropout=tcfg.outcome_dropout,
        surface_dropout=tcfg.surface_dropout,
        id_dropout=tcfg.id_dropout,
        mm_dtype=softmax_dtype(device, tcfg.amp),
        slots=tcfg.slots,
    )


def fit(
    model: GenerativeRetriever,
    log_: EventLog,
    split: Split,
    tcfg: TrainSettings,
    stage: Stage,
    info: Checkpoint,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    seconds_left: float | None = None,
) -> TrainResult:
    """Run one stage to its end (epochs, early stopping or `seconds_left` of training, the
    run's time budget less what earlier stages took); keep the best weights."""
    device = pick_device(tcfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = stage.trainable if stage.trainable is not None else list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(stage.trainable is None)
    for p in params:
        p.requires_grad_(True)
    optimizer = model.configure_optimizer(stage.lr, tcfg.weight_decay, (0.9, 0.98))
    features = None if log_.features is None else torch.as_tensor(log_.features, device=device)
    st = RunState(protocol=TRAINING_PROTOCOL, origin=stage_origin(model, log_, split))
    last, best_path = out_dir / f"{stage.name}_last.pt", out_dir / f"{stage.name}_best.pt"
    blob = load_blob(last) if resume and last.exists() else None
    if blob is not None:
        if ModelConfig(**blob["model_args"]) != model.cfg:  # e.g. train.slots changed: the best so far was ranked otherwise
            raise ValueError(f"{last} was written for another model ({blob['model_args']}, now {model.cfg.to_dict()}): "
                             "start afresh, without --resume or with another --out")
        saved = RunState(**blob["state"]["run"])
        if saved.protocol != TRAINING_PROTOCOL:
            raise ValueError(f"{last} was written by a run whose metrics are not comparable with this code's "
                             f"(protocol {saved.protocol}, now {TRAINING_PROTOCOL}): start afresh, without --resume "
                             "or with another --out")
        if saved.origin != st.origin:
            if stage.trainable is None:  # asked to resume this very stage: not silently thrown away
                why = ("by a version of this code that did not record what a run starts from" if not saved.origin
                       else "by another run (other data, seed or starting weights)")
                raise ValueError(f"{last} was written {why}: start afresh, without --resume or with another --out")
            # A fine-tuning stage whose pretraining differs: an earlier run's leftover in the same
            # directory, which would replace this run's pretrained weights with that run's.
            log.warning("%s belongs to an earlier run (it fine-tuned other weights): %s starts afresh", last, stage.name)
            blob = None
    if blob is None:
        best_path.unlink(missing_ok=True)  # an earlier run's best must not stand in for this stage's
    else:
        model.load_state_dict(blob["model"])
        if blob["optimizer"] is not None:
            optimizer.load_state_dict(blob["optimizer"])
        st = saved
        torch.set_rng_state(blob["state"]["torch_rng"])
        if blob["state"].get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["state"]["cuda_rng"])
        log.info("resumed %s at epoch %d", stage.name, st.epoch)
    steps_per_epoch = n_train_batches(log_, split.train_end, model.cfg.max_len, tcfg.batch_size)
    total_steps = max(1, stage.epochs * steps_per_epoch)
    metric = tcfg.eval_metric
    # A fine-tuning stage is short (the default deployment's: 40 batches), and a warm-up sized
    # for pretraining outlasted it: the head never reached its learning rate, nor decayed.
    warmup = tcfg.warmup_steps if stage.trainable is None else max(1, min(tcfg.warmup_steps, total_steps // 10))

    def lr_at(step: int) -> float:
        # Linear warm-up, then cosine decay to min_lr over the planned epochs (nanoGPT's get_lr),
        # reached at the last batch. `step` is the batch's position, not the optimizer steps
        # taken: a fine-tuning stage skips every batch without its surface's targets, and
        # counted in steps its schedule never got near min_lr.
        if step < warmup:
            return stage.lr * (step + 1) / warmup
        ratio = min(1.0, (step + 1 - warmup) / max(1, total_steps - warmup))
        floor = min(tcfg.min_lr, stage.lr)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (stage.lr - floor)

    def checkpoint(path: Path, with_optimizer: bool) -> None:
        info.state = {
            "stage": stage.name,
            "run": st.__dict__.copy(),
            "torch_rng": torch.get_rng_state(),  # dropout, sampled negatives, outcome dropout
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        save_checkpoint(path, model, info, optimizer if with_optimizer else None)

    validating = len(stage.valid_rows) > 0  # none in a final refit: the last weights are kept
    metric_k = int(metric.split("@")[1])

    def validate() -> dict[str, float]:
        # A model trained never to see the target's outcome (or surface) is validated as it is
        # used, unconditioned: the true one would feed an embedding row that never trained, and
        # pick the checkpoint on noise.
        val = ranking_metrics(model, log_, stage.valid_rows, ks=sorted({5, 10, metric_k}), batch_size=tcfg.eval_batch,
                              outcome="none" if stage.spec.outcome_dropout >= 1.0 else "true",
                              surface="none" if stage.spec.surface_dropout >= 1.0 else "true")
        return {f"valid_{k}": v for k, v in val.items() if k != "n_targets"}

    if stage.trainable is not None and validating and st.epoch == 0 and not st.history:
        # A fine-tuning stage starts from trained weights: they are its epoch 0, so a stage that
        # never beats them keeps them rather than shipping a worse head.
        st.best = {"epoch": 0, "loss": float("nan")} | validate()
        st.history.append(dict(st.best))
        checkpoint(best_path, with_optimizer=False)
        log.info("%s before fine-tuning %s", stage.name, json.dumps(st.best))

    def out_of_time() -> bool:
        return seconds_left is not None and st.seconds > seconds_left

    t_start = time.time() - st.seconds
    # A stage stopped for time ends there on resume as well: one more epoch each resume would
    # give the shipped model epochs the uninterrupted run never trained.
    while st.epoch < stage.epochs and not st.early_stopped and not out_of_time():
        model.train()
        if stage.frozen_trunk:
            # The frozen trunk and item tower run as they are served (no dropout), so the head
            # learns on the inputs it will get; the root stays in training mode for the loss's
            # condition dropout.
            for child in model.children():
                child.eval()
            for module in stage.train_modules:
                module.train()
        losses: list[float] = []
        # Each epoch's batch order from its own stream, so a resumed run draws what the
        # uninterrupted one would have (one stream across epochs could not be restarted midway).
        rng = np.random.default_rng([tcfg.seed, st.epoch])
        bar = tqdm(
            iterate_train_batches(log_, split.train_end, model.cfg.max_len, tcfg.batch_size, tcfg.window, rng),
            total=steps_per_epoch,
            desc=f"{stage.name} {st.epoch + 1}/{stage.epochs}",
            disable=not progress,
            leave=False,
            mininterval=5.0,
            file=sys.stderr,
        )
        lr = stage.lr
        for position, batch in enumerate(bar, start=st.epoch * steps_per_epoch):
            lr = lr_at(position)
            for g in optimizer.param_groups:
                g["lr"] = lr
            with autocast(device, tcfg.amp):
                out = batch_loss(model, batch, features, stage.spec, device, stage.frozen_trunk)
            if out is None:
                continue
            loss, _ = out
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            optimizer.step()
            st.step += 1
            losses.append(loss.item())
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        st.epoch += 1
        st.seconds = time.time() - t_start
        row: dict[str, float] = {"epoch": st.epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "lr": lr}
        if st.epoch % tcfg.eval_every == 0 or st.epoch == stage.epochs or out_of_time():
            if validating:
                row |= validate()
                if f"valid_{metric}" not in st.best or row[f"valid_{metric}"] > st.best[f"valid_{metric}"]:
                    st.best = dict(row)
                    st.bad_evals = 0
                    checkpoint(best_path, with_optimizer=False)
                else:
                    st.bad_evals += 1
            else:
                st.best = dict(row)
                checkpoint(best_path, with_optimizer=False)
            log.info("%s epoch %d %s", stage.name, st.epoch, json.dumps(row))
            st.history.append(row)
            st.early_stopped = st.bad_evals >= tcfg.patience
            checkpoint(last, with_optimizer=True)
            plot_curves(st.history, out_dir / f"{stage.name}_curves.png", metric)
            with open(out_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(json.dumps({"stage": stage.name, "seconds": round(st.seconds, 1)} | row) + "\n")
            if st.early_stopped or out_of_time():
                break
        else:
            st.history.append(row)
    if not best_path.exists():
        checkpoint(best_path, with_optimizer=False)
    best = load_blob(best_path)
    model.load_state_dict(best["model"])
    for p in model.parameters():
        p.requires_grad_(True)
    return TrainResult(best=st.best, history=st.history, checkpoint=best_path, seconds=st.seconds, epochs=st.epoch)


def plot_curves(history: list[dict[str, float]], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["loss"] for h in history], color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    val = [(h["epoch"], h[f"valid_{metric}"]) for h in history if f"valid_{metric}" in h]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), color="tab:orange", marker="o", label=f"valid {metric}")
        ax2.set_ylabel(f"valid {metric}", color="tab:orange")
    ax.set_title(path.stem)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- entry points


def train(
    log_: EventLog,
    split: Split,
    settings: Settings,
    out_dir: Path | None = None,
    *,
    name: str = "model",
    finetune: bool = False,
    resume: bool = False,
    progress: bool = True,
    data_origin: Mapping[str, Any] | None = None,
) -> tuple[GenerativeRetriever, Checkpoint, list[TrainResult]]:
    """Pretrain on every surface, optionally fine-tune each surface's head; returns the model,
    its checkpoint info and the per-stage results. Writes `<out_dir>/ckpt_best.pt`.
    `data_origin` goes into the checkpoint's `trained_on`: what remakes the data (synthetic's
    start time)."""
    tcfg = settings.train
    if tcfg.slots == "offset" and settings.model.num_queries > tcfg.window:
        raise ValueError(
            f"train.slots=offset gives query slot m the m-th block of the window: with train.window={tcfg.window} "
            f"< model.num_queries={settings.model.num_queries} some slots would never train "
            "(use train.slots=mixture or a window of at least num_queries)"
        )
    out_dir = Path(out_dir or tcfg.out_dir)
    torch.set_num_threads(tcfg.num_threads)
    seed_everything(tcfg.seed)
    device = pick_device(tcfg.device)
    model = GenerativeRetriever(model_config(settings.model, log_, tcfg.slots)).to(device)
    spec = loss_spec(log_, split.train_end, tcfg, device)
    counts = log_.item_counts(concat_ranges(log_.offsets[:-1], split.train_end))[1:]
    info = Checkpoint(
        model_args=model.cfg.to_dict(),
        item_ids=log_.item_ids,
        features=log_.features,
        popularity=(counts / max(counts.sum(), 1.0)).astype(np.float32),
        actions=tuple(log_.actions),
        surfaces=tuple(log_.surfaces),
        version=f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}",
        trained_on={
            "split": split.kind, "seed": tcfg.seed, **(data_origin or {}),
            # Which target conditions trained (a dropout of 1 never does: its embedding rows and
            # surface heads keep their initial weights); the worker and `recsys evaluate` feed
            # "none" for the others.
            "conditioned": {"outcome": tcfg.outcome_dropout < 1.0, "surface": tcfg.surface_dropout < 1.0},
        },
    )
    log.info("model %s: %d parameters, %s softmax", info.version, model.n_params(), "full" if spec.full_softmax else "sampled")
    valid = engaged(log_, split.valid, tcfg.negative_actions)
    def seconds_left() -> float | None:  # train.max_minutes bounds the run, every stage together
        return None if tcfg.max_minutes <= 0 else tcfg.max_minutes * 60 - sum(r.seconds for r in results)

    results: list[TrainResult] = []
    results.append(fit(model, log_, split, tcfg, Stage("pretrain", tcfg.epochs, tcfg.lr, spec, valid), info, out_dir,
                       resume=resume, progress=progress, seconds_left=seconds_left()))
    if finetune:
        for s, surface_name in enumerate(log_.surfaces, start=1):
            rows = valid[log_.surface[valid] == s]
            if len(rows) == 0:
                continue
            # No id dropout: it trains the frozen item tower's content path, nothing of the head's.
            ft = LossSpec(**{**spec.__dict__, "surface": s, "surface_dropout": 0.0, "id_dropout": 0.0,
                             "hard_negative_weight": tcfg.hard_negative_weight})
            stage = Stage(
                f"finetune-{surface_name}",
                tcfg.finetune_epochs,
                tcfg.finetune_lr,
                ft,
                rows,
                trainable=list(model.head.mlps[s].parameters()),
                frozen_trunk=True,
                train_modules=[model.head.mlps[s]],
            )
            results.append(fit(model, log_, split, tcfg, stage, info, out_dir, resume=resume, progress=progress,
                               seconds_left=seconds_left()))
    if finetune and not info.trained_on["conditioned"]["surface"]:
        # The surface heads learnt only where every surface's fine-tuning kept trained weights
        # (a stage skipped, out of time, or keeping epoch 0 leaves a head at its initialisation).
        tuned = {r.checkpoint.name for r in results[1:] if r.best.get("epoch", 0) > 0}
        info.trained_on["conditioned"]["surface"] = tuned == {f"finetune-{s}_best.pt" for s in log_.surfaces}
    info.state = {"stages": [{"epochs": r.epochs, "seconds": r.seconds, "best": r.best} for r in results]}
    save_checkpoint(out_dir / "ckpt_best.pt", model, info)
    return model, info, results


def train_small_demo_model(events: Iterable[Any], settings: Settings, out_dir: Path, *, max_seconds: float | None = 45.0,
                           item_features: Mapping[str, Sequence[float]] | None = None) -> Path:
    """The demo's fast path: a small model trained on `events` for at most ~`max_seconds` on the
    CPU (None: its 30 epochs, whatever the time), then exported into `out_dir` (user_model.onnx,
    item_encoder.onnx, items.npz, meta.json).
    With `item_features` (str(item id) -> content features) its item encoder can embed items
    published after training. Returns `out_dir`."""
    from inference.data import events_from_dicts, tail_split
    from inference.export import export_model

    log_ = events_from_dicts(events, settings.events.actions, settings.events.surfaces, item_features)
    # This 1-layer, 32-d model under-trains at the default 1e-3 in 30 epochs: on the demo's data
    # 1e-2 gives best valid recall@10 .2519 vs .2395, and only at 1e-2 does it condition on the
    # outcome (tests/test_end_to_end.py). An lr set explicitly (e.g. RECSYS_TRAIN__LR) wins.
    lr = settings.train.lr if "lr" in settings.train.model_fields_set else 1e-2
    small = settings.model_copy(
        update={
            "model": settings.model.model_copy(update={"dim": 32, "n_layers": 1, "n_heads": 1, "dropout": 0.1}),
            "train": settings.train.model_copy(
                update={"epochs": 30, "eval_every": 5, "patience": 2, "max_minutes": (max_seconds or 0.0) / 60.0, "warmup_steps": 20,
                        "batch_size": 64, "lr": lr}
            ),
        }
    )
    split = tail_split(log_, test_frac=0.0, valid_frac=0.1)
    work = Path(out_dir) / "train"
    model, info, _ = train(log_, split, small, work, name="demo", progress=False)
    export_model(model, info, Path(out_dir))
    return Path(out_dir)


EXPORT_TO_MODEL_DIR = Path("<inference.model_dir>")  # `--export` given without a directory


def main(argv: list[str]) -> int:
    from inference.datasets import DATASETS, load_dataset, make_split, synthetic_start_ms

    settings = get_settings()
    p = argparse.ArgumentParser(prog="recsys train", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic", choices=DATASETS)
    p.add_argument("--path", type=Path, help="data file (default: the dataset's usual place)")
    p.add_argument("--split", default="auto", choices=["auto", "loo", "tail", "time"],
                   help="loo (each user's last two events) | tail (each user's last 10%% of events) | time (one cut-off for "
                        "everybody: the log's last 10%% of events) | auto (loo for beauty, else tail)")
    p.add_argument("--out", type=Path, help="checkpoint directory (default: train.out_dir)")
    p.add_argument("--finetune", action="store_true", help="fine-tune every surface's head after pretraining")
    p.add_argument("--resume", action="store_true", help="continue from <out>/*_last.pt")
    p.add_argument("--export", type=Path, nargs="?", const=EXPORT_TO_MODEL_DIR,
                   help="also export to this model dir (no value: inference.model_dir)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a setting, e.g. train.epochs=50")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--unless-exported", action="store_true",
                   help="do nothing when the --export directory already holds a model (a deployment's one-shot trainer, "
                        "which `docker compose up` starts again each time, must not replace the served model)")
    args = p.parse_args(argv)
    # After the overrides: `--set train.out_dir=...` or `inference.model_dir=...` say where.
    settings = apply_overrides(settings, args.set)
    args.out = args.out or settings.train.out_dir
    if args.export == EXPORT_TO_MODEL_DIR:
        args.export = settings.inference.model_dir
    if args.unless_exported:
        if not args.export:
            p.error("--unless-exported needs --export")
        if (meta := args.export / "meta.json").is_file():
            version = json.loads(meta.read_text(encoding="utf-8")).get("version")
            print(json.dumps({"skipped": f"{args.export} already holds model {version}", "version": version}, indent=2))
            return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start_ts_ms = None  # synthetic data is made afresh: a resumed run remakes the one it trained on
    if args.dataset == "synthetic" and args.resume and (last := args.out / "pretrain_last.pt").exists():
        start_ts_ms = (load_blob(last).get("trained_on") or {}).get("start_ts_ms")
    try:
        log_ = load_dataset(args.dataset, args.path, settings, start_ts_ms=start_ts_ms)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    split = make_split(log_, args.split, args.dataset)
    origin = {"start_ts_ms": synthetic_start_ms(log_)} if args.dataset == "synthetic" else {}
    model, info, _results = train(log_, split, settings, args.out, name=args.dataset, finetune=args.finetune,
                                  resume=args.resume, progress=not args.quiet, data_origin=origin)
    summary = {"checkpoint": str(args.out / "ckpt_best.pt"), "version": info.version, "stages": info.state["stages"]}
    if args.export:
        from inference.export import export_model

        export_model(model, info, args.export)
        summary["exported"] = str(args.export)
    print(json.dumps(summary, indent=2, default=float))
    return 0


def apply_overrides(settings: Settings, overrides: Iterable[str]) -> Settings:
    """`section.field=value` pairs (value parsed as JSON when it parses) on top of `settings`."""
    data = settings.model_dump()
    for item in overrides:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        if section not in data or name not in data[section]:
            raise SystemExit(f"unknown setting {key!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        data[section][name] = value
    return Settings(**data)
