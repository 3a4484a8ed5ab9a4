"""The exported model, loaded for serving: one ONNX Runtime session plus the item table.

The user model reads history items as their item-side embeddings (the same vectors the
vector store indexes), so this module owns the id -> embedding lookup: the exported
`items.npz` first (rows replaced when this process's items follower re-embeds an exported item:
`reembedded`), then vectors of items indexed later (fetched from the vector store and
cached for `fetched_item_ttl_s`, so a re-embedded item is picked up); ids the store does not
know either are not asked of it again for `unknown_item_retry_s`. Both caches are bounded
(`fetched_items_max`, least recently used dropped first). CUDA EP
is used when a GPU is present, CPU EP otherwise; the provider actually in use is read back from
the session, because onnxruntime-gpu lists CUDA even without a GPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from cachetools import TTLCache

from recsys.settings import InferenceSettings

log = logging.getLogger(__name__)

__all__ = ["ModelRuntime", "VectorLookup", "choose_providers", "load_cuda_libraries"]

Fetch = Callable[[Sequence[str]], dict[Any, np.ndarray]]  # item ids -> the vectors the store has


def _now() -> float:
    # Looked up at each call (not bound once into the caches) so tests can move the clock.
    return time.monotonic()


def _ttl_cache(size: int, ttl_s: float) -> TTLCache[str, Any]:
    return TTLCache(maxsize=max(1, size), ttl=ttl_s, timer=_now)


def load_cuda_libraries() -> bool:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels into the process (ONNX Runtime's
    `preload_dlls`), so that the CUDA EP finds them: nothing else puts them on the loader's
    path, since the worker never imports torch. Only where an NVIDIA driver is installed
    (libcuda.so.1): elsewhere there is no GPU to run on, and loading a gigabyte of libraries
    would buy nothing."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    ort.preload_dlls(directory="")  # "": the nvidia site packages, then the default paths
    return True


class MixedModelDirectory(RuntimeError):
    """The model directory's files come from different exports (one under way, or cut short)."""


def check_one_export(model_dir: Path, meta: dict[str, Any], session: ort.InferenceSession, items: Any) -> None:
    """Raise `MixedModelDirectory` unless user_model.onnx and items.npz carry meta.json's
    version: a worker that loaded parts of two exports would feed one model's item vectors to the
    other's queries and search a third's catalogue, with no error anywhere."""
    found = {"user_model.onnx": str(session.get_modelmeta().custom_metadata_map.get("version"))}
    if "version" in items.files:  # tables exported before the stamp carry none
        found["items.npz"] = str(items["version"])
    if len(items["ids"]) != meta.get("n_items", len(items["ids"])):
        found["items.npz rows"] = f"{len(items['ids'])} (meta.json: {meta['n_items']})"
    check_same_export(model_dir, meta["version"], found)


def check_same_export(model_dir: Path, version: str, parts: Mapping[str, str | None]) -> None:
    """Raise `MixedModelDirectory` unless every stamped part (file name -> its version; None:
    exported before stamps) is model ``version``'s, meta.json's. An export under way or cut
    short leaves parts of two models: loaded together, one model's vectors would be marked as
    the other's, or new items embedded in another space than the catalogue they join."""
    wrong = {name: v for name, v in parts.items() if v is not None and v != version}
    if wrong:
        raise MixedModelDirectory(f"{model_dir} holds parts of different exports: meta.json is model {version}, "
                                  f"but {wrong}; an export is under way or was cut short (export again)")


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
    settings: InferenceSettings = field(default_factory=InferenceSettings)  # the fetch caches' sizes and lifetimes
    extra: TTLCache[str, np.ndarray] = field(init=False)  # items indexed after export, fetched
    unknown: TTLCache[str, bool] = field(init=False)  # ids the vector store did not know

    def __post_init__(self) -> None:
        cfg = self.settings
        self.extra = _ttl_cache(cfg.fetched_items_max, cfg.fetched_item_ttl_s)
        self.unknown = _ttl_cache(cfg.fetched_items_max, cfg.unknown_item_retry_s)

    @classmethod
    def load(
        cls, model_dir: Path, provider: str = "auto", threads: int = 0, spinning: bool = False,
        settings: InferenceSettings | None = None,
    ) -> ModelRuntime:
        model_dir = Path(model_dir)
        meta_path = model_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"no model in {model_dir} (meta.json missing): run `recsys train --export` first"
            )
        meta = json.loads(meta_path.read_text())
        if meta["config"].get("joint_queries") and "logit_scale" not in meta:
            raise ValueError(f"{meta_path}: a model with joint queries needs its logit_scale (export it again)")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the CUDA-missing fallback warning is expected on CPU machines
        if threads:
            options.intra_op_num_threads = threads
        # ORT's pool threads busy-wait after each run by default; on a few shared cores that
        # spinning steals the CPU the rest of the micro-batch (numpy, Kafka) needs: 2x slower here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers = choose_providers(provider)
        if providers[0] == "CUDAExecutionProvider":
            load_cuda_libraries()
        if provider == "auto":
            # Without a GPU the CUDA EP fails to load its libraries and ORT logs that as an
            # error; in auto mode that is expected, so we report the outcome ourselves below.
            ort.set_default_logger_severity(4)
        try:
            session = ort.InferenceSession(str(model_dir / "user_model.onnx"), sess_options=options, providers=providers)
        finally:
            ort.set_default_logger_severity(2)
        if providers[0] == "CUDAExecutionProvider" and session.get_providers()[0] != providers[0]:
            if provider == "cuda":  # asked for by name (docker-compose's GPU worker): no quiet CPU fallback
                raise RuntimeError("provider=cuda, but the CUDA execution provider could not load "
                                   "(no GPU, no NVIDIA driver, or a CUDA library missing)")
            log.warning("CUDA execution provider unavailable (no GPU or CUDA libraries): running on CPU")
        items = np.load(model_dir / "items.npz", allow_pickle=False)
        check_one_export(model_dir, meta, session, items)
        ids = items["ids"].astype(str)
        runtime = cls(
            session=session,
            meta=meta,
            item_ids=ids,
            item_vectors=np.ascontiguousarray(items["embeddings"], dtype=np.float32),
            popularity=np.asarray(items["popularity"], dtype=np.float32),
            index={item_id: i for i, item_id in enumerate(ids.tolist())},
            settings=settings or InferenceSettings(),
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
    def joint_queries(self) -> bool:
        """The model ranks items by its M queries' joint score (ModelConfig.joint_queries)."""
        return bool(self.meta["config"].get("joint_queries", False))

    @property
    def logit_scale(self) -> float:
        """The scale `joint_score` applies (meta.json's logit_scale; 1 / temperature)."""
        return float(self.meta["logit_scale"])

    def conditioned_on(self, kind: str) -> bool:
        """Whether the model was trained to read its target `kind` ("outcome" | "surface"):
        a model trained with that condition always dropped gets 0 ("none") there."""
        return bool(self.meta.get("conditioned", {}).get(kind, True))

    @property
    def surfaces(self) -> list[str]:
        return list(self.meta["surfaces"])

    @property
    def actions(self) -> list[str]:
        return list(self.meta["actions"])

    @property
    def max_len(self) -> int:
        return int(self.meta["config"]["max_len"])

    def item_vectors_for(self, item_ids: Iterable[str], fetch: Fetch | None = None) -> dict[str, np.ndarray]:
        """Embeddings of the given items that are known (exported, or indexed later and
        fetched through ``fetch``). Unknown items are simply absent."""
        wanted = set(item_ids)
        self._fetch_missing(wanted, fetch)
        out = {i: self.item_vectors[self.index[i]] for i in wanted if i in self.index}
        for i in wanted.difference(out):
            if (vector := self.extra.get(i)) is not None:
                out[i] = vector
        return out

    def vector_lookup(self, item_ids: Iterable[str], fetch: Fetch | None = None) -> Mapping[str, np.ndarray]:
        """`item_vectors_for` as a read-only mapping that looks vectors up when asked, without
        building a dict of every id (the worker's hot path). Unknown ids are fetched first."""
        self._fetch_missing(set(item_ids), fetch)
        return VectorLookup(self)

    def reembedded(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Exported items the vector store now holds with new vectors (re-embedded from new
        content features by the items follower in this process): the model reads them as those,
        as the store searches them. Rows are written in place: a batch running meanwhile may read
        a row old, new, or (numpy copies without the GIL) part of each, for that batch only.
        Items not exported are left to the fetched cache's lifetime: it is the worker thread's to
        mutate."""
        for item_id, vector in zip(item_ids, np.asarray(vectors, dtype=np.float32), strict=True):
            row = self.index.get(item_id)
            if row is not None:
                norm = float(np.linalg.norm(vector))
                self.item_vectors[row] = vector / norm if norm > 0 else vector

    def _fetch_missing(self, item_ids: set[str], fetch: Fetch | None) -> None:
        """Ask ``fetch`` for the ids neither exported nor in the fetched cache; the ones it
        does not know either are not asked again until they expire from ``unknown``. Without
        that, histories full of deleted or not-yet-indexed items would cost a vector-store call
        on every micro-batch."""
        if fetch is None:
            return
        index, extra, unknown = self.index, self.extra, self.unknown
        missing = [i for i in item_ids if i not in index and i not in extra and i not in unknown]
        if not missing:
            return
        for item_id, vector in fetch(missing).items():
            extra[str(item_id)] = np.asarray(vector, dtype=np.float32)
        if self.settings.unknown_item_retry_s > 0:
            for i in missing:
                if i not in extra:
                    unknown[i] = True

    def generate(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run the user model: [B, Q, M, D] unit query embeddings."""
        (queries,) = self.session.run(["queries"], inputs)
        return np.asarray(queries, dtype=np.float32)


class VectorLookup(Mapping[str, np.ndarray]):
    """Item id -> embedding over a runtime's exported table and the vectors fetched since."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self._rt = runtime

    def __getitem__(self, item_id: str) -> np.ndarray:
        row = self._rt.index.get(item_id)
        return self._rt.item_vectors[row] if row is not None else self._rt.extra[item_id]

    def __iter__(self) -> Iterator[str]:
        yield from self._rt.index
        yield from list(self._rt.extra)

    def __len__(self) -> int:
        return len(self._rt.index) + len(self._rt.extra)

    def table(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """([1 + U, D] vectors: row 0 zeros, then one per known id; each id's row, 0 = unknown),
        gathered from the exported table in one indexing step."""
        rt = self._rt
        rows = [rt.index.get(i, -1) for i in item_ids]
        # One read per fetched id: an entry that expires between a membership test and a read
        # would otherwise raise; one that expires before this read encodes as unknown.
        fetched = {j: v for j, r in enumerate(rows) if r < 0 and (v := rt.extra.get(item_ids[j])) is not None}
        known = np.array([r >= 0 for r in rows], dtype=bool)
        known[list(fetched)] = True
        codes = np.zeros(len(item_ids), dtype=np.int64)
        codes[known] = np.arange(1, int(known.sum()) + 1)
        table = np.zeros((int(known.sum()) + 1, rt.item_vectors.shape[1]), np.float32)
        exported = np.array(rows, dtype=np.int64)
        table[codes[exported >= 0]] = rt.item_vectors[exported[exported >= 0]]
        for j, vector in fetched.items():
            table[codes[j]] = vector
        return table, codes.tolist()
