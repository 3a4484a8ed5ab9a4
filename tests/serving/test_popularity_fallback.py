"""PopularityFallback: the model's most popular items, reloaded when the model changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from serving.fallback import PopularityFallback, top_popular

SURFACES = ["home", "search", "related"]


def test_top_popular_orders_by_popularity_then_table_order() -> None:
    ids = np.array(["a", "b", "c", "d"])
    popularity = np.array([1.0, 3.0, 3.0, 2.0], dtype=np.float32)
    top = top_popular(ids, popularity, 3)
    assert top.items == ("b", "c", "d")
    assert tuple(top.scores) == (3.0, 3.0, 2.0)


def test_loads_items_npz_and_meta(model_dir: Path) -> None:
    fallback = PopularityFallback(model_dir, SURFACES, 5)
    assert fallback.get("home").items == ("i49", "i48", "i47", "i46", "i45")
    assert fallback.get("search") == fallback.get("home")
    assert fallback.get("unknown-surface").items == ()
    assert fallback.model_version == "pop-v1"
    assert fallback.generated_at > 0


def test_missing_model_gives_an_empty_list_then_picks_up_a_new_export(tmp_path: Path) -> None:
    fallback = PopularityFallback(tmp_path, SURFACES, 5)
    assert fallback.get("home").items == ()
    assert fallback.model_version == ""
    np.savez(tmp_path / "items.npz", ids=np.array(["x", "y"]), popularity=np.array([1.0, 2.0], dtype=np.float32))
    assert fallback.refresh()
    assert fallback.get("home").items == ("y", "x")
    assert not fallback.refresh()  # unchanged on disk: nothing reloaded


def test_a_broken_export_keeps_the_previous_list(model_dir: Path) -> None:
    fallback = PopularityFallback(model_dir, SURFACES, 3)
    before = fallback.get("home")
    path = model_dir / "items.npz"
    path.write_bytes(b"not a zip file")
    os.utime(path, ns=(1, 1))  # a different mtime than the good file's
    assert not fallback.refresh()
    assert fallback.get("home") == before


def test_a_half_written_export_keeps_the_previous_list(model_dir: Path) -> None:
    """A zip cut short raises zipfile.BadZipFile, which is neither OSError nor ValueError."""
    fallback = PopularityFallback(model_dir, SURFACES, 3)
    before = fallback.get("home")
    path = model_dir / "items.npz"
    path.write_bytes(path.read_bytes()[:200])
    os.utime(path, ns=(1, 1))
    assert not fallback.refresh()
    assert fallback.get("home") == before


def test_item_table_save_replaces_the_file_whole(tmp_path: Path) -> None:
    from inference.items import ItemTable

    table = ItemTable(np.array(["a", "b"]), np.eye(2, dtype=np.float32), np.array([1.0, 2.0], np.float32),
                      np.zeros((2, 0), np.float32))
    table.save(tmp_path / "items.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.npz"]  # no temp file left, no suffix added
    assert ItemTable.load(tmp_path / "items.npz").ids.tolist() == ["a", "b"]


def test_a_meta_json_written_after_the_table_updates_the_version(model_dir: Path) -> None:
    """An export writes items.npz first and meta.json last: a refresh in between must not keep
    the old version for good."""
    import json

    fallback = PopularityFallback(model_dir, SURFACES, 3)
    meta = model_dir / "meta.json"
    meta.write_text(json.dumps({"version": "pop-v2"}))
    os.utime(meta, ns=(2, 2))
    assert fallback.refresh()
    assert fallback.model_version == "pop-v2"
    assert not fallback.refresh()
