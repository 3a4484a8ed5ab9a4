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
    path = tmp_path / "items.npz"
    table.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.npz"]  # no temp file left, no suffix added
    assert ItemTable.load(path).ids.tolist() == ["a", "b"]
    # A reader with the old file open (a server re-reading it) reads it whole after a save: the
    # new one is renamed over it, not written into it.
    old = path.read_bytes()
    with path.open("rb") as reader:
        ItemTable(np.array(["c"]), np.eye(1, 2, dtype=np.float32), np.array([3.0], np.float32), np.zeros((1, 0), np.float32)).save(path)
        assert reader.read() == old
    assert ItemTable.load(path).ids.tolist() == ["c"]


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


def test_the_worker_s_published_lists_replace_the_item_table_s_per_surface(model_dir: Path) -> None:
    """`popular` records (the candidates format, key "popular") go through a one-user store:
    validated, newest wins, a tombstone goes back to items.npz, garbage is counted."""
    import msgpack

    from recsys.settings import Settings
    from serving.follower import PopularFollower

    fallback = PopularityFallback(model_dir, SURFACES, 3)
    follower = PopularFollower(Settings(), fallback)

    def record(generated_at: int, search: list[str]) -> bytes:
        return msgpack.packb({"user_id": "popular", "model_version": "m7", "source_event_ts": generated_at,
                              "generated_at": generated_at,
                              "surfaces": {"search": {"items": search, "scores": [1.0] * len(search)}}})

    follower._apply(b"popular", record(2_000, ["s1", "s2", "s3", "s4"]))
    assert fallback.entry("search") == (fallback.get("search"), "m7", 2_000)
    assert fallback.get("search").items == ("s1", "s2", "s3")  # cut to the fallback's size
    assert fallback.get("home").items == ("i49", "i48", "i47")  # not published: items.npz's
    assert fallback.entry("home")[1:] == ("pop-v1", fallback.generated_at)
    follower._apply(b"popular", record(1_000, ["old"]))  # an older record changes nothing
    assert fallback.get("search").items == ("s1", "s2", "s3")
    follower._apply(b"popular", record(2_500, []))  # a store with nothing indexed yet
    assert fallback.get("search").items == ("i49", "i48", "i47")
    follower._apply(b"popular", record(3_000, ["s1", "s2", "s3", "s4"]))
    assert fallback.get("search").items == ("s1", "s2", "s3")
    follower._apply(b"popular", b"\xc1")
    assert follower.store.malformed == 1 and fallback.get("search").items == ("s1", "s2", "s3")
    # A user's record on `popular` (a misrouted producer): the one-user store must not take it
    # and evict the worker's lists.
    stray = msgpack.packb({"user_id": "u1", "model_version": "m7", "source_event_ts": 9_000, "generated_at": 9_000,
                           "surfaces": {"search": {"items": ["x"], "scores": [1.0]}}})
    follower._apply(b"u1", stray)
    assert follower.store.malformed == 2 and fallback.get("search").items == ("s1", "s2", "s3")
    follower._apply(b"popular", None)  # tombstone
    assert fallback.published is None and fallback.get("search").items == ("i49", "i48", "i47")
