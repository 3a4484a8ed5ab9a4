"""The exported item side of the model: `items.npz`.

Keys: `ids` (str [N]; row r is item-encoder bucket r+1, see inference/hashing.py),
`embeddings` (float32 [N, D], L2-normalised: exactly what the vector store indexes and what the
user model reads as history-item inputs), `popularity` (float32 [N], training frequency, sums
to 1; the serving fallback), `features` (float32 [N, F] content features, F may be 0) and
`version` (the model version, as meta.json's; absent in tables exported before it was added).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.hashing import id_bucket
from recsys.files import atomic_write


@dataclass(frozen=True)
class ItemTable:
    ids: np.ndarray  # str [N]
    embeddings: np.ndarray  # float32 [N, D]
    popularity: np.ndarray  # float32 [N]
    features: np.ndarray  # float32 [N, F]
    version: str = ""  # the model's (meta.json's): a reader can tell a table from another export

    @property
    def vocab(self) -> dict[str, int]:
        return {str(item): row + 1 for row, item in enumerate(self.ids)}

    def buckets(self, item_ids: list[object]) -> np.ndarray:
        vocab = self.vocab
        return np.asarray([id_bucket(i, vocab) for i in item_ids], dtype=np.int64)

    def save(self, path: str | Path) -> None:
        """Write atomically: servers re-read items.npz while an export may be writing it."""
        with atomic_write(path) as f:  # a file object: np.savez adds no ".npz" suffix to it
            np.savez(
                f,
                ids=np.asarray(self.ids).astype(str),
                embeddings=np.asarray(self.embeddings, dtype=np.float32),
                popularity=np.asarray(self.popularity, dtype=np.float32),
                features=np.asarray(self.features, dtype=np.float32),
                version=np.asarray(self.version),
            )

    @staticmethod
    def load(path: str | Path) -> ItemTable:
        with np.load(path, allow_pickle=False) as z:
            n = len(z["ids"])
            features = z["features"] if "features" in z.files else np.zeros((n, 0), np.float32)
            version = str(z["version"]) if "version" in z.files else ""
            return ItemTable(z["ids"].astype(str), z["embeddings"], z["popularity"], features, version)
