"""Export a checkpoint into a model directory for the worker and the indexer (`recsys export`).

Writes into `settings.inference.model_dir` (or `--out`):

`user_model.onnx` -- `GenerativeRetriever.forward`; dynamic batch B, history length T
(1..max_len) and number of conditions Q:

    inputs
      item_emb        float32 [B, T, D]  history items' item-side vectors = rows of items.npz
                                         (zeros for padding and for items without a vector)
      action          int64   [B, T]     index into meta["actions"] + 1; 0 = padding
      surface         int64   [B, T]     index into meta["surfaces"] + 1; 0 = padding
      event_ts        float64 [B, T]     event time, epoch seconds
      request_ts      float64 [B]        request time, epoch seconds (trained and served as the newest event's time)
      target_surface  int64   [B, Q]     surface to generate for, index + 1 (0 = any surface)
      target_outcome  int64   [B, Q]     outcome to aim for, action index + 1 (0 = unconditioned)
    output
      queries         float32 [B, Q, M, D]  L2-normalised; score items by inner product

  Histories are LEFT-padded: the newest event is column T-1 (the model reads its state there).

`item_encoder.onnx` -- `ItemEncoder.forward`: `id_bucket` int64 [N] (inference.hashing:
training vocabulary row + 1, 0 = unknown id) and `features` float32 [N, F] (F fixed, in
meta.json; a model trained without content features still takes F = 1 zeros so the interface is
the same) -> `item_emb` float32 [N, D], L2-normalised.

`items.npz` -- see inference/items.py. `meta.json` -- the model config (`joint_queries`: how
the worker merges the queries), version, surfaces, actions, input/output names, dtypes and
shapes, feature width, the id-bucket scheme with its vocabulary, the logit scale, which target
conditions the model learnt (`conditioned`: the worker feeds 0 for the others). The version string is also in both ONNX files' metadata_props (`version`), with
the model config (`model_config`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from inference.checkpoint import Checkpoint, load_checkpoint
from inference.evaluate import item_matrix
from inference.hashing import id_hashing_meta
from inference.items import ItemTable
from inference.model import (
    ITEM_INPUTS,
    ITEM_OUTPUTS,
    USER_INPUTS,
    USER_OUTPUTS,
    GenerativeRetriever,
    ItemEncoder,
)
from recsys.files import atomic_write

OPSET = 18

USER_MODEL_SPEC: dict[str, Any] = {
    "inputs": {
        "item_emb": {"dtype": "float32", "shape": ["B", "T", "D"], "doc": "history items' rows of items.npz; 0 = padding/unknown"},
        "action": {"dtype": "int64", "shape": ["B", "T"], "doc": "actions index + 1; 0 = padding"},
        "surface": {"dtype": "int64", "shape": ["B", "T"], "doc": "surfaces index + 1; 0 = padding"},
        "event_ts": {"dtype": "float64", "shape": ["B", "T"], "doc": "epoch seconds"},
        "request_ts": {"dtype": "float64", "shape": ["B"], "doc": "epoch seconds; trained and served as the newest event's time"},
        "target_surface": {"dtype": "int64", "shape": ["B", "Q"], "doc": "surfaces index + 1; 0 = any"},
        "target_outcome": {"dtype": "int64", "shape": ["B", "Q"], "doc": "actions index + 1; 0 = unconditioned"},
    },
    "outputs": {"queries": {"dtype": "float32", "shape": ["B", "Q", "M", "D"], "doc": "L2-normalised query embeddings"}},
    "padding": "left",
}


class _ItemEncoderGraph(nn.Module):
    """The item tower with the documented (id_bucket, features) signature, even without features."""

    def __init__(self, encoder: ItemEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, id_bucket: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.encoder.feature_dim:
            return self.encoder(id_bucket, features)
        # An input the graph never reads would be pruned; a zero-weight read keeps the contract.
        return self.encoder(id_bucket, features[:, :0]) + 0.0 * features[:, :1]


def _export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...], dynamic: dict[str, Any]) -> None:
    # The exporter narrates (progress prints, torchvision notices, dim-renaming warnings); this
    # is a batch job, so keep it quiet and let real errors raise.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    assert program is not None
    program.save(str(path))


def _stamp(path: Path, props: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


# The files of an export, in the order they replace the directory's: meta.json last, so a reader
# that sees the new meta.json sees the rest; one that reads between two replacements finds parts
# of two exports, which ModelRuntime.load refuses by their version stamps.
EXPORT_FILES = ("items.npz", "item_encoder.onnx", "user_model.onnx", "meta.json")


def export_model(model: GenerativeRetriever, info: Checkpoint, out_dir: Path) -> dict[str, Any]:
    """Write user_model.onnx, item_encoder.onnx, items.npz and meta.json; returns the meta.

    They are written into a staging directory first and then each renamed into `out_dir`: a
    worker or server reading the directory meanwhile (a restart during an export), or an export
    cut short, never leaves a file half written or a meta.json naming files it did not write."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".export.staging"
    shutil.rmtree(staging, ignore_errors=True)  # what an export cut short left
    staging.mkdir()
    try:
        meta = _write_export(model, info, staging)
        for name in EXPORT_FILES:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _write_export(model: GenerativeRetriever, info: Checkpoint, out_dir: Path) -> dict[str, Any]:
    model = model.to("cpu").float().eval()
    cfg = model.cfg
    D, M = cfg.dim, cfg.num_queries

    items = item_matrix(model, info.features).numpy()
    n = items.shape[0]
    features = info.features if info.features is not None else np.zeros((n, 0), np.float32)
    ItemTable(np.asarray(info.item_ids).astype(str), items, info.popularity, features, version=info.version).save(out_dir / "items.npz")

    # Example sizes avoid 0 and 1, which torch.export would specialise on.
    B, T, Q = 2, min(3, cfg.max_len), 2
    example = (
        torch.randn(B, T, D),
        torch.randint(1, cfg.n_actions + 1, (B, T)),
        torch.randint(1, cfg.n_surfaces + 1, (B, T)),
        torch.full((B, T), 1.7e9, dtype=torch.float64),
        torch.full((B,), 1.7e9, dtype=torch.float64),
        torch.randint(0, cfg.n_surfaces + 1, (B, Q)),
        torch.randint(0, cfg.n_actions + 1, (B, Q)),
    )
    bd, qd = torch.export.Dim("B", min=1), torch.export.Dim("Q", min=1)
    # A model that reads one event has a static T (a Dim cannot have min = max = 1).
    seq = {0: bd, 1: torch.export.Dim("T", min=1, max=cfg.max_len)} if cfg.max_len > 1 else {0: bd}
    dynamic = {
        "item_emb": seq,
        "action": seq,
        "surface": seq,
        "event_ts": seq,
        "request_ts": {0: bd},
        "target_surface": {0: bd, 1: qd},
        "target_outcome": {0: bd, 1: qd},
    }
    _export(model, example, out_dir / "user_model.onnx", USER_INPUTS, USER_OUTPUTS, dynamic)

    width = max(cfg.feature_dim, 1)
    nd = torch.export.Dim("N", min=1)
    _export(
        _ItemEncoderGraph(model.items).eval(),
        (torch.tensor([1, 0, min(2, n)], dtype=torch.int64), torch.zeros(3, width)),
        out_dir / "item_encoder.onnx",
        ITEM_INPUTS,
        ITEM_OUTPUTS,
        {"id_bucket": {0: nd}, "features": {0: nd}},
    )

    meta: dict[str, Any] = {
        "version": info.version,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "dim": D,
        "num_queries": M,
        "max_len": cfg.max_len,
        "surfaces": list(info.surfaces),
        "actions": list(info.actions),
        "n_items": n,
        "feature_dim": width,
        "uses_content_features": bool(cfg.feature_dim),
        "score": "inner product of L2-normalised vectors (= cosine)",
        # config.joint_queries: a condition's M queries rank items by their joint score
        # (inference.model.joint_score at this scale), not each alone.
        "logit_scale": float(model.scale().detach()),
        # target_outcome / target_surface the model was trained to read; 0 ("none") for the others
        "conditioned": info.conditioned,
        "opset": OPSET,
        "user_model": {"file": "user_model.onnx", **USER_MODEL_SPEC, "dims": {"D": D, "M": M, "T_max": cfg.max_len}},
        "item_encoder": {
            "file": "item_encoder.onnx",
            "inputs": {
                "id_bucket": {"dtype": "int64", "shape": ["N"], "doc": "see id_hashing"},
                "features": {"dtype": "float32", "shape": ["N", width], "doc": "content features (zeros when absent)"},
            },
            "outputs": {"item_emb": {"dtype": "float32", "shape": ["N", D], "doc": "L2-normalised"}},
        },
        "items": {"file": "items.npz", "keys": ["ids", "embeddings", "popularity", "features"]},
        "id_hashing": id_hashing_meta(info.item_ids),
        "training": info.state,
    }
    props = {"version": info.version, "model_config": json.dumps(cfg.to_dict())}
    for name in ("user_model.onnx", "item_encoder.onnx"):
        _stamp(out_dir / name, props)
    with atomic_write(out_dir / "meta.json") as f:
        f.write((json.dumps(meta, indent=1, default=_json_default) + "\n").encode())
    return meta


def _json_default(obj: object) -> object:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return None  # RNG states and the like are not meta
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def main(argv: list[str]) -> int:
    from recsys.settings import get_settings

    settings = get_settings()
    p = argparse.ArgumentParser(prog="recsys export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=settings.train.out_dir / "ckpt_best.pt")
    p.add_argument("--out", type=Path, default=settings.inference.model_dir)
    args = p.parse_args(argv)
    if not args.checkpoint.exists():
        raise SystemExit(f"no checkpoint at {args.checkpoint}: run `recsys train` first")
    model, info = load_checkpoint(args.checkpoint)
    meta = export_model(model, info, args.out)
    print(json.dumps({"out": str(args.out), "version": meta["version"], "n_items": meta["n_items"], "dim": meta["dim"]}))
    return 0
