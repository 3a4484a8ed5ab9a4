"""Popularity fallback: what a user the server knows nothing about gets, flagged as such.

Sources, best first:
- `published`: the lists the inference worker reads from the vector store for each surface
  (`VectorStore.top_popular`) and publishes on the compacted `popular` topic; they honour the
  `items` topic's eligibility (an item withdrawn from a surface leaves that surface's list) and
  popularity updates. `serving.follower.PopularFollower` keeps them current.
- until the worker has published (or for a surface it published no item for): the model's own item
  table, `items.npz` in settings.inference.model_dir (`ids`: str [N], `popularity`: float32
  [N]), with the model version from `meta.json` beside it. It says nothing of eligibility, so
  that list is the same for every surface.

`refresh()` reloads when items.npz changes on disk (a newly exported model), so the server
need not restart; a missing or unreadable model directory gives an empty fallback, never an
exception in a handler.
"""

from __future__ import annotations

import json
import logging
import zipfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.store import SurfaceList, UserCandidates

__all__ = ["PopularityFallback", "top_popular"]

log = logging.getLogger(__name__)
_EMPTY = SurfaceList((), array("f"))


def top_popular(ids: np.ndarray, popularity: np.ndarray, size: int) -> SurfaceList:
    """The `size` most popular items, best first; ties keep the table's order (stable)."""
    if ids.shape[0] != popularity.shape[0]:
        raise ValueError(f"ids has {ids.shape[0]} rows, popularity {popularity.shape[0]}")
    order = np.argsort(-popularity.astype(np.float64), kind="stable")[:size]
    return SurfaceList(tuple(str(i) for i in ids[order]), array("f", popularity[order].astype(np.float32).tobytes()))


@dataclass(frozen=True, slots=True)
class _Loaded:
    mtimes: tuple[int, int]  # of items.npz and meta.json (0 = missing) when they were read
    items: SurfaceList
    model_version: str
    generated_at: int  # ms: when the item table was written


class PopularityFallback:
    """Per-surface popularity lists from the model directory, reloaded when it changes."""

    def __init__(self, model_dir: Path, surfaces: list[str], size: int) -> None:
        self.model_dir = model_dir
        self.surfaces = list(surfaces)
        self.size = size
        self._loaded: _Loaded | None = None
        self.published: UserCandidates | None = None  # the worker's per-surface lists, when there are any
        self.refresh()

    @property
    def model_version(self) -> str:
        return self._loaded.model_version if self._loaded else ""

    @property
    def generated_at(self) -> int:
        return self._loaded.generated_at if self._loaded else 0

    def get(self, surface: str) -> SurfaceList:
        """The fallback list of a surface (empty when no model has been exported yet)."""
        return self.entry(surface)[0]

    def entry(self, surface: str, *, published: bool = True) -> tuple[SurfaceList, str, int]:
        """(list, model version, generated_at ms) of a surface's fallback: the worker's
        published list when there is one (and ``published``), else the model's item table."""
        # One read of each: refresh() swaps _loaded from another thread (serving/server.py).
        loaded, published_lists = self._loaded, self.published if published else None
        version, generated_at = (loaded.model_version, loaded.generated_at) if loaded else ("", 0)
        if surface not in self.surfaces:
            return _EMPTY, version, generated_at
        # An empty published list (a store with nothing indexed yet) is no fallback at all.
        if published_lists is not None and (lists := published_lists.surfaces.get(surface)) is not None and lists.items:
            return lists, published_lists.model_version, published_lists.generated_at
        return (loaded.items if loaded else _EMPTY), version, generated_at

    def refresh(self) -> bool:
        """Reload if items.npz or meta.json changed since the last load; True when something
        was loaded. An export writes items.npz first and meta.json last, seconds apart: keyed
        on items.npz alone, a refresh in between kept the old version for the new list."""
        path = self.model_dir / "items.npz"
        try:
            mtime_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        try:
            meta_mtime_ns = (self.model_dir / "meta.json").stat().st_mtime_ns
        except FileNotFoundError:
            meta_mtime_ns = 0
        mtimes = (mtime_ns, meta_mtime_ns)
        if self._loaded is not None and self._loaded.mtimes == mtimes:
            return False
        try:
            with np.load(path, allow_pickle=False) as table:
                items = top_popular(table["ids"], table["popularity"], self.size)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            # A half-written export or a foreign file: keep serving the previous list.
            log.warning("popularity fallback: cannot read %s: %s", path, exc)
            return False
        self._loaded = _Loaded(mtimes, items, self._read_version(), mtime_ns // 1_000_000)
        log.info("popularity fallback: %d items from %s (model %r)", len(items.items), path, self.model_version)
        return True

    def _read_version(self) -> str:
        try:
            meta = json.loads((self.model_dir / "meta.json").read_text())
        except (OSError, ValueError):
            return ""
        version = meta.get("version", meta.get("model_version", "")) if isinstance(meta, dict) else ""
        return str(version)
