"""The generative retriever: a PinRec-style, outcome-conditioned, multi-token user model.

Design against the paper (PinRec, arXiv 2504.10507; shared/REFERENCES.md):

- **Item tower** (`ItemEncoder`). PinRec: content embedding ⊕ hashed learned id embedding ->
  MLP -> L2 norm. Here: learned id embedding (a vocabulary bucket, see inference/items.py) plus
  a projection of the content features, an optional residual MLP, L2 norm. Bucket 0 is the
  "unknown id" row: id dropout during training teaches the content path to place items the
  model never saw. The same L2-normalised vectors are (a) the rows of items.npz that the vector
  store indexes, (b) the item part of every input token and (c) the softmax's output
  embeddings, i.e. input and output embeddings are tied, as in SASRec.
- **Tokens**: item vector (through a linear map into token space) + action embedding +
  surface embedding + time features (log time since the previous action; sinusoids of
  absolute time with daily, weekly and yearly periods, as PinRec) + a learned recency
  position (distance from the newest event; with left padding this is SASRec's position).
- **Backbone**: a causal pre-LN transformer (nanoGPT's blocks) over the left-padded history;
  the newest event's final hidden state summarises the user (PinRec: 12 layers x 768; here
  2 x 64 by default, which is what 10^5-event data sets support).
- **Head** (`QueryHead`): conditioned on the target surface, the target outcome (0 =
  unconditioned; trained with outcome dropout so both are meaningful), the log time from
  the newest event to the request, and a learned query-slot embedding m = 0..M-1. (PinRec runs
  at request time; this system computes each user's lists when an action arrives and serves
  them later, so the request is "right after the newest event" in training, evaluation and
  serving alike: a gap of ~0. Training with the next engagement's time as the request taught
  the model how long until its target, which serving never knows.) It emits M
  L2-normalised query embeddings per (surface, outcome) -- multi-token generation in one
  forward pass. PinRec conditions its slots on explicit future offsets (now, +30 s, ...); we
  learn the slots and train them with an unordered loss over a future window (train.py), so
  each slot specialises on part of what the user does next (a future step or a distinct
  interest) instead of all collapsing onto the same "next item". PinRec splits the candidate
  budget across its tokens; with `joint_queries` the slots instead score items together (the
  logsumexp of their scaled cosines, `joint_score`: one softmax whose mass a slot adds to where
  it points) and the lists rank the union of their hits by that score, so a user whose future
  is one interest is not given four equal shares of it. The head's MLP is one per surface so
  that per-surface fine-tuning touches only that surface's parameters.
- **Scores**: cosine(query, item) times a learned logit scale (a temperature) in training;
  serving needs the normalised vectors (inner product = cosine), and for joint queries the
  scale too (meta.json's logit_scale).

`GenerativeRetriever.forward` is exactly the exported `user_model.onnx` graph (inputs named
in `USER_INPUTS`); `ItemEncoder.forward` is `item_encoder.onnx`. Training calls `encode` and
`head` directly to score every position of a sequence at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

USER_INPUTS = ("item_emb", "action", "surface", "event_ts", "request_ts", "target_surface", "target_outcome")
USER_OUTPUTS = ("queries",)
ITEM_INPUTS = ("id_bucket", "features")
ITEM_OUTPUTS = ("item_emb",)

# Absolute-time periods for the sinusoidal features (seconds): day, week, (Julian) year.
TIME_PERIODS_S = (86_400.0, 604_800.0, 31_557_600.0)
N_TIME_FEATURES = 1 + 2 * len(TIME_PERIODS_S)
# log1p(seconds) reaches ~17 for a year; dividing keeps the feature near unit scale.
LOG_TIME_SCALE = 10.0


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in checkpoints and ONNX metadata."""

    n_buckets: int  # item-encoder id rows: training vocabulary + 1 (bucket 0 = unknown id)
    n_actions: int  # len(settings.events.actions)
    n_surfaces: int  # len(settings.events.surfaces)
    feature_dim: int = 0  # content features per item (0 = ids only)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 50
    num_queries: int = 4
    dropout: float = 0.2
    item_mlp: bool = False  # residual MLP in the item tower (PinRec's fusion MLP)
    head_mult: int = 4  # hidden width of the head MLP, in multiples of dim
    init_temperature: float = 0.05
    # How the M queries of a condition rank items together. False: each query ranks alone and
    # the worker gives each an equal share of the list (trained as a mixture of softmaxes). True
    # (train.slots=joint): an item's score is the logsumexp of its M scaled cosines, one softmax
    # over the catalogue, and the lists are the union of the queries' hits ranked by that score.
    joint_queries: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def joint_score(cosines: torch.Tensor, scale: float, dim: int = -1) -> torch.Tensor:
    """logsumexp over `dim` of scale x cosine, divided by the scale, so it stays on the cosine
    scale (between the best cosine and it + log(M) / scale): the score a joint model's softmax
    ranks items by. inference.worker.joint_score is the same in numpy."""
    return torch.logsumexp(cosines * scale, dim=dim) / scale


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, n_layers: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        # GPT-2 scaled init: residual branches start small so deep stacks stay stable.
        nn.init.normal_(self.c_proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.dim % cfg.n_heads == 0, f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}"
        self.n_heads = cfg.n_heads
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        nn.init.normal_(self.c_proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
        self.attn_dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``last_only``, (B, 1, C): only the newest position
        attends (keys and values still come from every position) -- serving reads no other."""
        B, T, C = x.shape
        if last_only:
            w, b = self.c_attn.weight, self.c_attn.bias
            q = F.linear(x[:, -1:], w[:C], b[:C])
            k, v = F.linear(x, w[C:], b[C:]).split(C, dim=2)
            mask = mask[:, :, -1:]
        else:
            q, k, v = self.c_attn(x).split(C, dim=2)
        Tq = q.shape[1]
        q = q.view(B, Tq, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, Tq, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, Tq, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, 4 * cfg.dim, cfg.dropout, cfg.n_layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        y = self.attn(self.ln_1(x), mask, last_only)
        x = (x[:, -1:] if last_only else x) + y
        return x + self.mlp(self.ln_2(x))


class ItemEncoder(nn.Module):
    """(id bucket, content features) -> L2-normalised item embedding: item_encoder.onnx."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.feature_dim = cfg.feature_dim
        self.id_emb = nn.Embedding(cfg.n_buckets, cfg.dim)
        self.content = nn.Linear(cfg.feature_dim, cfg.dim) if cfg.feature_dim else None
        self.mlp = MLP(cfg.dim, 4 * cfg.dim, 0.0, 1) if cfg.item_mlp else None

    def forward(self, id_bucket: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.id_emb(id_bucket)  # (N, D)
        if self.content is not None:
            h = h + self.content(features)
        if self.mlp is not None:
            h = h + self.mlp(h)
        return F.normalize(h, dim=-1)


class QueryHead(nn.Module):
    """(user state, target surface, target outcome, time to request) -> M normalised queries."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, M = cfg.dim, cfg.num_queries
        self.n_surfaces = cfg.n_surfaces
        self.surface = nn.Embedding(cfg.n_surfaces + 1, D)  # 0 = any surface
        self.outcome = nn.Embedding(cfg.n_actions + 1, D)  # 0 = unconditioned
        self.slot = nn.Parameter(torch.randn(M, D) * 0.5)
        # Slot 0 reads the user state as is (SASRec's query); slots 1..M-1 through their own maps,
        # the identity plus noise (cosine ~0.9 to slot 0). Slots that start as near-copies of
        # each other stay copies under a mixture loss; these start apart but all useful.
        self.slot_maps = nn.Parameter(torch.eye(D).repeat(M - 1, 1, 1) + torch.randn(M - 1, D, D) * (0.5 / math.sqrt(D)))
        self.gap = nn.Linear(1, D)
        self.ln = nn.LayerNorm(D)
        # One MLP per surface (index 0 = unconditioned), so fine-tuning a surface is local to it.
        self.mlps = nn.ModuleList(MLP(D, cfg.head_mult * D, cfg.dropout, cfg.n_layers) for _ in range(cfg.n_surfaces + 1))

    def forward(self, h: torch.Tensor, surface: torch.Tensor, outcome: torch.Tensor, gap_s: torch.Tensor) -> torch.Tensor:
        # h (N, D), surface/outcome int64 (N,), gap_s float64 (N,) seconds -> (N, M, D)
        gap = (torch.log1p(gap_s.clamp(min=0.0)) / LOG_TIME_SCALE).to(h.dtype)
        cond = self.surface(surface) + self.outcome(outcome) + self.gap(gap[:, None])  # (N, D)
        x = self.ln(h)[:, None, :] + cond[:, None, :] + self.slot[None, :, :].to(h.dtype)  # (N, M, D)
        if self.training:
            # Every surface's MLP on every row, the target's kept: the same gradients as the
            # gather below, and the dropout draws every measured training run was made with.
            pick = (surface[None, :] == torch.arange(self.n_surfaces + 1, device=h.device)[:, None]).to(h.dtype)
            delta = sum(mlp(x) * pick[s][:, None, None] for s, mlp in enumerate(self.mlps))
        else:
            # Serving: each row through its target surface's MLP only, rows gathered per surface
            # and scattered back (ONNX: NonZero, Gather, ScatterND), a quarter of the FLOPs.
            delta = torch.zeros_like(x)
            for s, mlp in enumerate(self.mlps):
                rows = torch.nonzero(surface == s).squeeze(1)
                delta = delta.index_put((rows,), mlp(x.index_select(0, rows)))
        base = h[:, None, :]  # (N, 1, D)
        if self.slot_maps.shape[0]:
            base = torch.cat([base, torch.einsum("nd,mde->nme", h, self.slot_maps.to(h.dtype))], dim=1)  # (N, M, D)
        return F.normalize(base + delta, dim=-1)


def time_features(event_ts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float64 epoch seconds (B, T) -> float32 (B, T, N_TIME_FEATURES); zeros at padding.

    Phases are taken in float64: epoch seconds do not fit float32 to the second."""
    # Shift right by one (pad, then drop the last column): no zero-length slices, so T = 1 exports.
    prev = F.pad(event_ts, (1, 0))[:, :-1]
    prev_valid = F.pad(valid.to(torch.int64), (1, 0))[:, :-1] > 0
    gap = torch.where(prev_valid & valid, (event_ts - prev).clamp(min=0.0), torch.zeros_like(event_ts))
    feats = [torch.log1p(gap) / LOG_TIME_SCALE]
    for period in TIME_PERIODS_S:
        cycles = event_ts / period
        phase = (cycles - torch.floor(cycles)) * (2.0 * math.pi)
        feats += [torch.sin(phase), torch.cos(phase)]
    out = torch.stack(feats, dim=-1).to(torch.float32)
    return out * valid[..., None].to(torch.float32)


class GenerativeRetriever(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.items = ItemEncoder(cfg)
        self.item_in = nn.Linear(D, D, bias=False)  # normalised item vector -> token space
        self.action = nn.Embedding(cfg.n_actions + 1, D, padding_idx=0)
        self.surface = nn.Embedding(cfg.n_surfaces + 1, D, padding_idx=0)
        self.time = nn.Linear(N_TIME_FEATURES, D)
        self.pos = nn.Embedding(cfg.max_len, D)  # 0 = newest event
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D)
        self.head = QueryHead(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.apply(self._init_weights)
        # Unit item vectors scaled to unit-variance coordinates (SASRec's sqrt(d) scaling). The
        # identity start carries the input item to the output, so the query starts near the last
        # item and its neighbours: measured on Beauty, this beats a random rotation by ~20% on the
        # test split (item-to-item similarity is the strongest signal there), at the price of the
        # last item itself often ranking first -- serving filters the user's seen items anyway.
        with torch.no_grad():
            self.item_in.weight.copy_(torch.eye(D) * math.sqrt(D))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def scale(self) -> torch.Tensor:
        """Logit scale (1 / temperature), capped as in CLIP so training cannot blow it up."""
        return self.logit_scale.exp().clamp(max=100.0)

    def item_scores(self, cosines: torch.Tensor) -> torch.Tensor:
        """(..., M, N) cosines of M queries with N items -> (..., N) the items' scores: the
        joint score (`joint_score`) for joint queries, else the best cosine."""
        if self.cfg.joint_queries:
            return joint_score(cosines, float(self.scale().detach()), dim=-2)
        return cosines.amax(dim=-2)

    def encode(
        self, item_emb: torch.Tensor, action: torch.Tensor, surface: torch.Tensor, event_ts: torch.Tensor,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Left-padded history -> hidden state of every position (B, T, D); causal. With
        ``last_only``, of the newest position only (B, 1, D): the last block then computes
        that one row (the same numbers, ~40% fewer FLOPs for serving)."""
        _B, T, _ = item_emb.shape
        assert T <= self.cfg.max_len, f"Cannot forward sequence of length {T}, max_len is {self.cfg.max_len}"
        valid = action > 0  # (B, T)
        idx = torch.arange(T, device=item_emb.device)
        positions = (T - 1) - idx  # recency: newest = 0
        x = (
            self.item_in(item_emb)
            + self.action(action)
            + self.surface(surface)
            + self.time(time_features(event_ts, valid))
            + self.pos(positions)[None]
        )
        x = self.drop(x)
        # Causal and key-padding mask; every position may see itself so padded rows stay finite.
        causal = idx[None, :] <= idx[:, None]  # (T, T): key j <= query i
        mask = causal[None] & (valid[:, None, :] | (idx[None, :] == idx[:, None])[None])  # (B, T, T)
        mask = mask[:, None]  # (B, 1, T, T)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only and i == len(self.blocks) - 1)
        return self.ln_f(x)

    def forward(
        self,
        item_emb: torch.Tensor,  # float32 (B, T, D): history items' item-side vectors, 0 = padding/unknown
        action: torch.Tensor,  # int64 (B, T): action index + 1, 0 = padding
        surface: torch.Tensor,  # int64 (B, T): surface index + 1, 0 = padding
        event_ts: torch.Tensor,  # float64 (B, T): epoch seconds
        request_ts: torch.Tensor,  # float64 (B,): epoch seconds
        target_surface: torch.Tensor,  # int64 (B, Q): surface index + 1 (0 = any)
        target_outcome: torch.Tensor,  # int64 (B, Q): action index + 1 (0 = unconditioned)
    ) -> torch.Tensor:
        """The exported user model: (B, Q, M, D) L2-normalised queries."""
        B, Q = target_surface.shape
        D, M = self.cfg.dim, self.cfg.num_queries
        h = self.encode(item_emb, action, surface, event_ts, last_only=True)[:, -1]  # (B, D): newest event
        gap = (request_ts - event_ts[:, -1])[:, None].expand(B, Q).reshape(B * Q)
        hq = h[:, None, :].expand(B, Q, D).reshape(B * Q, D)
        q = self.head(hq, target_surface.reshape(B * Q), target_outcome.reshape(B * Q), gap)
        return q.reshape(B, Q, M, D)

    def item_table(self, features: torch.Tensor | None, drop_ids: float = 0.0) -> torch.Tensor:
        """Embeddings of the whole training vocabulary (N, D); row i-1 = item index / bucket i.

        `drop_ids` > 0 (training, content features present) routes that fraction of items
        through the unknown-id bucket so the content path learns to stand alone."""
        n = self.cfg.n_buckets - 1
        device = self.logit_scale.device
        buckets = torch.arange(1, n + 1, device=device)
        if drop_ids > 0 and self.cfg.feature_dim:
            buckets = torch.where(torch.rand(n, device=device) < drop_ids, torch.zeros_like(buckets), buckets)
        if features is None:
            features = torch.zeros(n, self.cfg.feature_dim, device=device)
        return self.items(buckets, features)

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        """AdamW; weight decay only on linear maps inside the network (not on embeddings,
        norms, biases, the item->token map or the logit scale)."""
        decay = {id(m.weight) for name, m in self.named_modules() if isinstance(m, nn.Linear) and name != "item_in"}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
