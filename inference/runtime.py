"""The exported model, loaded for serving: one ONNX Runtime session plus the item table.

The user model reads history items as their item-side embeddings (the same vectors the
vector store indexes), so this module owns the id -> embedding lookup: the exported
`items.npz` first, then vectors of items indexed later (fetched from the vector store once
and cached). CUDA EP is used when a GPU is present, CPU EP otherwise; the provider actually
in use is read back from the session, because onnxruntime-gpu lists CUDA even without a GPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

__all__ = ["ModelRuntime", "choose_providers"]


def choose_providers(provider: str) -> list[str]:
    """ONNX Runtime providers for a settings value: auto | cuda | cpu."""
    available = ort.get_available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError("provider=cuda but this onnxruntime has no CUDA execution provider")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider != "auto":
        raise ValueError(f"unknown provider {provider!r}: use auto, cuda or cpu")
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@dataclass
class ModelRuntime:
    """Everything the worker needs from a model directory."""

    session: ort.InferenceSession
    meta: dict[str, Any]
    item_ids: np.ndarray  # [N] str
    item_vectors: np.ndarray  # [N, D] float32, unit rows
    popularity: np.ndarray  # [N] float32
    index: dict[str, int] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # items indexed after export

    @classmethod
    def load(cls, model_dir: Path, provider: str = "auto", threads: int = 0, spinning: bool = False) -> ModelRuntime:
        model_dir = Path(model_dir)
        meta_path = model_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no model in {model_dir} (meta.json missing): run `recsys train --export` first"
            )
        meta = json.loads(meta_path.read_text())
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the CUDA-missing fallback warning is expected on CPU machines
        if threads:
            options.intra_op_num_threads = threads
        # ORT's pool threads busy-wait after each run by default; on a few shared cores that
        # spinning steals the CPU the rest of the micro-batch (numpy, Kafka) needs: 2x slower here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers = choose_providers(provider)
        if provider == "auto":
            # Without a GPU the CUDA EP fails to load its libraries and ORT logs that as an
            # error; in auto mode that is expected, so we report the outcome ourselves below.
            ort.set_default_logger_severity(4)
        try:
            session = ort.InferenceSession(str(model_dir / "user_model.onnx"), sess_options=options, providers=providers)
        finally:
            ort.set_default_logger_severity(2)
        if providers[0] == "CUDAExecutionProvider" and session.get_providers()[0] != providers[0]:
            log.warning("CUDA execution provider unavailable (no GPU or CUDA libraries): running on CPU")
        items = np.load(model_dir / "items.npz", allow_pickle=False)
        ids = items["ids"].astype(str)
        runtime = cls(
            session=session,
            meta=meta,
            item_ids=ids,
            item_vectors=np.ascontiguousarray(items["embeddings"], dtype=np.float32),
            popularity=np.asarray(items["popularity"], dtype=np.float32),
            index={item_id: i for i, item_id in enumerate(ids.tolist())},
        )
        log.info("model %s loaded on %s (%d items)", runtime.version, runtime.provider, len(ids))
        return runtime

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unknown"))

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    @property
    def surfaces(self) -> list[str]:
        return list(self.meta["surfaces"])

    @property
    def actions(self) -> list[str]:
        return list(self.meta["actions"])

    @property
    def max_len(self) -> int:
        return int(self.meta["config"]["max_len"])

    def item_vectors_for(
        self, item_ids: Iterable[str], fetch: Callable[[Sequence[str]], dict[Any, np.ndarray]] | None = None
    ) -> dict[str, np.ndarray]:
        """Embeddings of the given items that are known (exported, or indexed later and
        fetched through ``fetch`` once). Unknown items are simply absent."""
        wanted = set(item_ids)
        out = {i: self.item_vectors[self.index[i]] for i in wanted if i in self.index}
        out.update({i: self.extra[i] for i in wanted if i in self.extra})
        missing = [i for i in wanted if i not in out]
        if missing and fetch is not None:
            for item_id, vector in fetch(missing).items():
                self.extra[str(item_id)] = np.asarray(vector, dtype=np.float32)
                out[str(item_id)] = self.extra[str(item_id)]
        return out

    def generate(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the user model: [B, Q, M, D] unit query embeddings."""
        (queries,) = self.session.run(["queries"], inputs)
        return np.asarray(queries, dtype=np.float32)
