"""Item id -> item-encoder id bucket: the scheme the model was trained with.

The scheme is a vocabulary, not a hash: the N items seen in training own buckets 1..N in the
order of `items.npz["ids"]` (bucket = row + 1); every other id maps to bucket 0, the learned
"unknown id" row. Training routes a share of items through bucket 0 (id dropout), so the
content features alone place an unseen item near similar ones; an item that arrives on the
`items` topic after training therefore gets a useful embedding from its features.

Why not PinRec's hashed ids: a hash makes unrelated items share a learned row (about 9% of
Beauty's items at 2^17 buckets), which costs accuracy, and an id unseen in training has nothing
learned in its hashed row anyway (worse: it inherits another item's row); content features are
what carry it. meta.json (`id_hashing`) describes the scheme and carries the vocabulary inline,
so `id_bucket_fn(meta)` needs nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SCHEME", "UNKNOWN_BUCKET", "id_bucket", "id_bucket_fn", "id_hashing_meta"]

SCHEME = "vocab"
UNKNOWN_BUCKET = 0  # ids outside the training vocabulary


def id_bucket(item_id: object, vocab: Mapping[str, int]) -> int:
    """The encoder bucket of one item id: its vocabulary row + 1, or UNKNOWN_BUCKET."""
    return vocab.get(str(item_id), UNKNOWN_BUCKET)


def id_hashing_meta(item_ids: Sequence[str] | np.ndarray) -> dict[str, Any]:
    """The `id_hashing` section of meta.json for a training vocabulary."""
    return {
        "scheme": SCHEME,
        "n_buckets": len(item_ids) + 1,
        "unknown_bucket": UNKNOWN_BUCKET,
        "rule": "bucket = 1 + index of str(item_id) in vocab_ids (= row in items.npz ids); unknown ids -> 0",
        "function": "inference.hashing.id_bucket_fn(meta)",
        "vocab_ids": [str(i) for i in item_ids],
    }


def id_bucket_fn(meta: Mapping[str, Any], model_dir: str | Path | None = None) -> Callable[[Sequence[object]], np.ndarray]:
    """`ids -> int64 buckets` for an exported model, from its meta.json (or items.npz in
    `model_dir` when the vocabulary is not inline)."""
    spec = meta["id_hashing"]
    if spec["scheme"] != SCHEME:
        raise ValueError(f"unknown id hashing scheme {spec['scheme']!r}")
    ids = spec.get("vocab_ids")
    if ids is None:
        if model_dir is None:
            raise ValueError("meta.json carries no vocab_ids; pass model_dir to read items.npz")
        with np.load(Path(model_dir) / "items.npz", allow_pickle=False) as z:
            ids = z["ids"].astype(str).tolist()
    vocab = {str(item): row + 1 for row, item in enumerate(ids)}

    def buckets(item_ids: Sequence[object]) -> np.ndarray:
        return np.fromiter((vocab.get(str(i), UNKNOWN_BUCKET) for i in item_ids), dtype=np.int64, count=len(item_ids))

    return buckets
