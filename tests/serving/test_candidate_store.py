"""CandidateStore: newest wins whatever the order, LRU bound, snapshots, malformed records."""

from __future__ import annotations

import gc
import io
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from serving.eligibility import Eligibility
from serving.server import encode_candidates
from serving.store import CandidateStore, MalformedCandidates, SnapshotInfo, SurfaceList, UserCandidates, parse_candidates

Make = Callable[..., dict[str, Any]]


def test_parse_turns_ids_into_strings_and_cuts_lists(make_candidates: Make) -> None:
    value = make_candidates("7", source_event_ts=10, n=30)
    value["user_id"] = 7
    value["surfaces"]["home"]["items"] = list(range(30))
    record = parse_candidates(value, max_items=5)
    assert record.user_id == "7"
    assert record.surfaces["home"].items == ("0", "1", "2", "3", "4")
    assert tuple(record.surfaces["home"].scores) == (30.0, 29.0, 28.0, 27.0, 26.0)
    assert record.order_key == (-1, 10, 11)  # no update version on the record


@pytest.mark.parametrize(
    "breakage",
    [
        lambda v: v.pop("user_id"),
        lambda v: v.pop("surfaces"),
        lambda v: v.update(source_event_ts="yesterday"),
        lambda v: v.update(generated_at=True),
        lambda v: v.update(user_id=""),
        lambda v: v.update(user_id=[1]),
        lambda v: v.update(model_version=3),
        lambda v: v.update(surfaces=[1, 2]),
        lambda v: v["surfaces"]["home"].update(scores=[1.0]),
        lambda v: v["surfaces"]["home"].update(items="abc"),
        lambda v: v["surfaces"]["home"]["items"].__setitem__(0, {"x": 1}),
        lambda v: v["surfaces"]["home"]["scores"].__setitem__(0, "high"),
        lambda v: v["surfaces"].update(home=None),
        lambda v: v["surfaces"]["home"]["scores"].__setitem__(0, 10**400),  # no float holds it
    ],
)
def test_malformed_records_are_rejected_and_counted(make_candidates: Make, breakage: Callable[[dict[str, Any]], Any]) -> None:
    value = make_candidates("u", source_event_ts=10)
    breakage(value)
    with pytest.raises(MalformedCandidates):
        parse_candidates(value)
    store = CandidateStore(10)
    assert not store.apply(value)
    assert store.malformed == 1 and len(store) == 0


@pytest.mark.parametrize("raw", [b"\x81\x91\x01\x01", b"\x81\x81\x01\x01\x01", b"\xc1", b"\x92\x01"])
def test_the_follower_counts_undecodable_bytes_instead_of_dying(raw: bytes) -> None:
    """A map keyed by an array or a map makes msgpack raise TypeError, not its own errors."""
    from recsys.settings import Settings
    from serving.follower import CandidatesFollower

    store = CandidateStore(10)
    CandidatesFollower(Settings(), store)._apply(b"u", raw)
    assert store.malformed == 1 and len(store) == 0


def test_non_map_values_are_malformed() -> None:
    store = CandidateStore(10)
    for value in (None, 3, "x", b"x", [1, 2]):
        assert not store.apply(value)
    assert store.malformed == 5


def test_newest_wins_in_any_arrival_order(make_candidates: Make) -> None:
    # (source_event_ts, generated_at): a newer action wins; for one action the later generation wins.
    versions = [(10, 11), (10, 50), (20, 21), (20, 22), (30, 31)]
    for seed in range(20):
        order = versions[:]
        random.Random(seed).shuffle(order)
        store = CandidateStore(10)
        for ts, gen in order + order:  # a full replay on top changes nothing
            store.apply(make_candidates("u", source_event_ts=ts, generated_at=gen, tag=f"{ts}/{gen}"))
        record = store.get("u")
        assert record is not None and record.order_key == (-1, 30, 31)
        assert record.surfaces["home"].items[0] == "home30/31-u-0"


def test_an_older_record_never_overwrites_a_newer_one(make_candidates: Make) -> None:
    store = CandidateStore(10)
    assert store.apply(make_candidates("u", source_event_ts=100, generated_at=101, model_version="new"))
    assert not store.apply(make_candidates("u", source_event_ts=99, generated_at=500, model_version="old"))
    assert not store.apply(make_candidates("u", source_event_ts=100, generated_at=101, model_version="same"))
    record = store.get("u")
    assert record is not None and record.model_version == "new"
    assert store.stale == 2


def test_the_update_version_orders_before_event_time(make_candidates: Make) -> None:
    """A late event (older than the user's newest) folded into update v2 gives v2 an older
    source_event_ts than v1; v2 is still the newer list."""
    store = CandidateStore(10)
    v1 = {**make_candidates("u", source_event_ts=1_000, tag="v1"), "version": 1}
    v2 = {**make_candidates("u", source_event_ts=900, tag="v2"), "version": 2}
    for order in ([v1, v2], [v2, v1]):
        store = CandidateStore(10)
        for value in order:
            store.apply(value)
        record = store.get("u")
        assert record is not None and record.version == 2 and record.surfaces["home"].items[0] == "homev2-u-0"
    assert not store.apply({**make_candidates("u", source_event_ts=5, tag="x"), "version": "3"})  # malformed


def test_lru_bound_evicts_the_least_recently_used(make_candidates: Make) -> None:
    store = CandidateStore(3)
    for user in ("a", "b", "c"):
        store.apply(make_candidates(user, source_event_ts=1))
    assert store.get("a") is not None  # a is now the most recently used
    store.apply(make_candidates("d", source_event_ts=1))
    assert len(store) == 3 and "b" not in store and {"a", "c", "d"} <= {r.user_id for r in store}
    assert store.evicted == 1
    for k in range(100):
        store.apply(make_candidates(f"x{k}", source_event_ts=1))
    assert len(store) == 3


def test_tombstone_deletes(make_candidates: Make) -> None:
    store = CandidateStore(3)
    store.apply(make_candidates("a", source_event_ts=1))
    store.delete("a")
    store.delete("never-seen")
    assert store.get("a") is None


def test_snapshot_round_trip_and_newest_wins_on_load(tmp_path: Path, make_candidates: Make) -> None:
    store = CandidateStore(100)
    for k in range(10):
        store.apply(make_candidates(f"u{k}", source_event_ts=k + 1))
    path = tmp_path / "snap" / "candidates.msgpack"
    info = SnapshotInfo("candidates", {0: 7, 1: 3}, 1_800_000_000_000)
    assert store.save(path, info) == 10

    restored = CandidateStore(100)
    restored.apply(make_candidates("u3", source_event_ts=1_000, model_version="newer"))
    assert restored.load(path) == (9, info)  # u3 in the snapshot is older than what is there
    assert len(restored) == 10
    assert restored.get("u5") == store.get("u5")
    u3 = restored.get("u3")
    assert u3 is not None and u3.model_version == "newer"
    assert CandidateStore(1).load(tmp_path / "missing") == (0, None)
    # The file is the header, then one msgpack array of the records, written and read record by record.
    header, records = msgpack.Unpacker(io.BytesIO(path.read_bytes()), raw=False, strict_map_key=False)
    assert header["positions"] == {0: 7, 1: 3}
    assert [r["user_id"] for r in records] == [f"u{k}" for k in range(10)]
    # A snapshot of the first format (the array alone) is read as before, as fresh as its file.
    (tmp_path / "format-1").write_bytes(msgpack.packb(records))
    assert CandidateStore(100).load(tmp_path / "format-1", max_age_ms=60_000) == (10, SnapshotInfo())
    for name, damaged in (("truncated", path.read_bytes()[:-20]), ("empty", b""), ("not-records", msgpack.packb(7)),
                          ("bad-header", msgpack.packb({"format": 2}) + msgpack.packb([]))):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(MalformedCandidates, match="cannot be read"):
            CandidateStore(100).load(tmp_path / name)


def test_a_snapshot_older_than_the_topics_tombstones_is_not_loaded(tmp_path: Path, make_candidates: Make) -> None:
    """Users deleted after the snapshot was written may have had their tombstones compacted
    away: loaded, the snapshot would serve them again, and save them into every later one."""
    import os
    import time

    store = CandidateStore(10)
    store.apply(make_candidates("deleted-since", source_event_ts=1))
    path = tmp_path / "candidates.msgpack"
    day_ms = 24 * 3600 * 1000
    now_ms = int(time.time() * 1000)
    store.save(path, SnapshotInfo("candidates", {}, now_ms - 3_600_000))
    assert CandidateStore(10).load(path, max_age_ms=day_ms)[0] == 1  # fresh: loaded
    # Its age is when the server last read the topic, not the file's time: a server cut off
    # from the broker for two days, then stopped, writes a new file of two-day-old contents.
    store.save(path, SnapshotInfo("candidates", {}, now_ms - 2 * day_ms))
    stale = CandidateStore(10)
    assert stale.load(path, max_age_ms=day_ms) == (0, None) and stale.get("deleted-since") is None
    # Never read from a topic: its age is unknown, so not loaded where deletions matter.
    store.save(path, SnapshotInfo("candidates", {}, None))
    assert CandidateStore(10).load(path, max_age_ms=day_ms) == (0, None)
    assert CandidateStore(10).load(path)[0] == 1  # a server that serves the snapshot alone
    # The first format's age is its file's time.
    path.write_bytes(msgpack.packb([make_candidates("deleted-since", source_event_ts=1)]))
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(path, (two_days_ago, two_days_ago))
    assert CandidateStore(10).load(path, max_age_ms=day_ms) == (0, None)


def test_max_users_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_users"):
        CandidateStore(0)


def test_served_replaced_and_evicted_lists_leave_no_reference_cycles(make_candidates: Make) -> None:
    """The server freezes the store out of the cyclic GC (a full pass over it stalls every call),
    which is safe only while the store's objects are freed by reference counting alone."""
    eligibility = Eligibility(["home", "search", "related"])
    eligibility.apply("home-u0-1", ["search"])  # restricted: filter() memoises on every list
    store = CandidateStore(5, max_items=50)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a pass finds unreachable stays in gc.garbage to be looked at
    try:
        for round_ in range(3):  # newer lists replace the served ones; 20 users through 5 places
            for u in range(20):
                store.apply(make_candidates(f"u{u % 20}", source_event_ts=round_ + 1))
                record = store.get(f"u{u % 20}")
                assert record is not None
                for surface, lists in record.surfaces.items():
                    encode_candidates(eligibility.filter(lists, surface))
            eligibility.apply(f"home-u{round_}-2", [])  # a new version: memos redone
        store.delete("u19")
        del record, lists
        gc.collect()
        # only the store's own objects: other threads of the test process make cyclic garbage too
        assert not [o for o in gc.garbage if isinstance(o, (SurfaceList, UserCandidates))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_a_snapshot_of_another_topic_is_dropped_only_by_a_server_that_follows_the_topic(
    tmp_path: Path, make_candidates: Make
) -> None:
    """Its users are not the followed topic's (whose deletions never reach them): dropped. A
    server that serves the snapshot alone (follow off) has no topic to mix them with: loaded."""
    from recsys.settings import Settings
    from serving.server import load_snapshot

    snapshot = tmp_path / "candidates.msgpack"
    store = CandidateStore(10)
    store.apply(make_candidates("u1", source_event_ts=1))
    import time

    store.save(snapshot, SnapshotInfo("candidates-elsewhere", {0: 1}, int(time.time() * 1000)))  # fresh: loadable
    for follow, users in ((True, 0), (False, 1)):
        settings = Settings(serving={"snapshot_path": snapshot, "follow": follow})
        loaded = CandidateStore(10)
        info = load_snapshot(settings, loaded)
        assert len(loaded) == users and (info is not None) is (not follow)
