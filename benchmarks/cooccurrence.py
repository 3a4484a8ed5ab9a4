"""Item factors from who engaged with what, for data sets whose items carry no metadata.

Beauty.txt is ids only: its benchmarks build item descriptions from the user x item incidence
matrix instead, either as the model's content features (`benchmarks.beauty`, training rows
only) or as a model-independent yardstick for diversity (`benchmarks.multitoken`, clusters).
"""

from __future__ import annotations

import numpy as np
import torch

from inference.data import EventLog


def item_factors(log: EventLog, rows: np.ndarray, rank: int, seed: int) -> np.ndarray:
    """[N, rank] float32: each item's rank-`rank` factors (right singular vectors scaled by the
    singular values) of the user x item incidence of the events at ``rows``, L2-normalised;
    zeros for an item none of those events touches."""
    incidence = torch.sparse_coo_tensor(
        np.stack([log.user[rows], log.item[rows] - 1]), torch.ones(len(rows)), (log.n_users, log.n_items),
        check_invariants=True,
    ).coalesce()
    torch.manual_seed(seed)
    _, s, v = torch.svd_lowrank(incidence, q=rank, niter=4)
    factors = (v * s).numpy().astype(np.float32)
    return factors / np.maximum(np.linalg.norm(factors, axis=1, keepdims=True), 1e-9)
