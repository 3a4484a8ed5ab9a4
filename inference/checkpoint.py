"""Checkpoints: the model, what it was trained on, and enough state to resume.

A checkpoint stores `model_args` (a `ModelConfig`), so loading rebuilds the network without any
other configuration (nanoGPT's pattern), plus the item vocabulary (row order = id bucket - 1),
item content features, training popularity, the action / surface vocabularies, a version string
and the training state (epoch, step, optimizer, RNGs, curves, best validation metrics).
Files are written atomically (temp file + rename) so an interrupted run never leaves a torn one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.data import EventLog, reindex_items
from inference.model import GenerativeRetriever, ModelConfig
from recsys.files import atomic_write


@dataclass
class Checkpoint:
    """Everything about a trained model except its weights."""

    model_args: dict[str, Any]
    item_ids: np.ndarray  # str [N]
    features: np.ndarray | None  # float32 [N, F]
    popularity: np.ndarray  # float32 [N], training frequency (sums to 1)
    actions: tuple[str, ...]
    surfaces: tuple[str, ...]
    version: str
    state: dict[str, Any] = field(default_factory=dict)  # epoch, step, history, best, rng, ...
    # What it was trained on ({"split": kind, "seed": train.seed}): `recsys evaluate` scores
    # the same held-out targets (synthetic data is made from the seed).
    trained_on: dict[str, Any] = field(default_factory=dict)

    @property
    def conditioned(self) -> dict[str, bool]:
        """Which target conditions ("outcome", "surface") the model learnt; a checkpoint from
        before they were recorded learnt both."""
        return {"outcome": True, "surface": True} | dict(self.trained_on.get("conditioned") or {})

    def align(self, log: EventLog) -> EventLog:
        """`log` in this checkpoint's item vocabulary (and with its features)."""
        if tuple(log.actions) != self.actions or tuple(log.surfaces) != self.surfaces:
            raise ValueError(
                f"data has actions {log.actions} / surfaces {log.surfaces}, "
                f"the model was trained on {self.actions} / {self.surfaces}"
            )
        return reindex_items(log, self.item_ids, self.features)


def save_checkpoint(
    path: str | Path,
    model: GenerativeRetriever,
    info: Checkpoint,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "model_args": model.cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "item_ids": [str(i) for i in info.item_ids],
        "features": None if info.features is None else torch.from_numpy(np.asarray(info.features, np.float32)),
        "popularity": torch.from_numpy(np.asarray(info.popularity, np.float32)),
        "actions": list(info.actions),
        "surfaces": list(info.surfaces),
        "version": info.version,
        "state": info.state,
        "trained_on": info.trained_on,
    }
    with atomic_write(path) as f:
        torch.save(blob, f)


def load_blob(path: str | Path) -> dict[str, Any]:
    blob: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return blob


def checkpoint_info(blob: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        model_args=dict(blob["model_args"]),
        item_ids=np.asarray(blob["item_ids"]).astype(str),
        features=None if blob["features"] is None else blob["features"].numpy(),
        popularity=blob["popularity"].numpy(),
        actions=tuple(blob["actions"]),
        surfaces=tuple(blob["surfaces"]),
        version=str(blob["version"]),
        state=dict(blob.get("state") or {}),
        trained_on=dict(blob.get("trained_on") or {}),
    )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GenerativeRetriever, Checkpoint]:
    """Rebuild the model from its stored `model_args` and load its weights (eval mode)."""
    blob = load_blob(path)
    model = GenerativeRetriever(ModelConfig(**blob["model_args"]))
    model.load_state_dict(blob["model"])
    model.to(device).eval()
    return model, checkpoint_info(blob)
