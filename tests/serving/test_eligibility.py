"""Items withdrawn after a user's lists were computed leave what the server answers at once."""

from __future__ import annotations

from array import array
from pathlib import Path

from recsys.settings import Settings
from serving._proto import candidates_pb2 as pb
from serving.eligibility import Eligibility
from serving.fallback import PopularityFallback
from serving.server import Limits, build_response
from serving.store import SurfaceList, UserCandidates

SURFACES = ["home", "search", "related"]
LIMITS = Limits(Settings(serving={"default_limit": 10}))


def _record(items: list[str]) -> UserCandidates:
    lists = SurfaceList(tuple(items), array("f", [1.0 - k / 10 for k in range(len(items))]))
    return UserCandidates("u", "v1", 5, 6, {s: lists for s in SURFACES})


def _served(record: UserCandidates | None, surface: str, eligibility: Eligibility, fallback: PopularityFallback) -> list[str]:
    response = build_response(pb.GetCandidatesRequest(user_id="u", surface=surface), record, fallback, LIMITS, eligibility)
    return [c.item_id for c in response.candidates]


def test_a_withdrawn_item_leaves_the_lists_on_the_surfaces_it_left_and_comes_back_when_restored(tmp_path: Path) -> None:
    eligibility = Eligibility(SURFACES)
    fallback = PopularityFallback(tmp_path, SURFACES, 10)
    record = _record(["a", "b", "c"])
    assert _served(record, "home", eligibility, fallback) == ["a", "b", "c"]
    eligibility.apply("b", ())  # withdrawn
    eligibility.apply("c", ("search",))  # search only now
    assert _served(record, "home", eligibility, fallback) == ["a"]
    assert _served(record, "search", eligibility, fallback) == ["a", "c"]
    assert _served(record, "home", eligibility, fallback) == ["a"]  # memoised, same answer
    eligibility.apply("b", None)  # surfaces missing = all: back everywhere
    assert _served(record, "home", eligibility, fallback) == ["a", "b"]
    assert eligibility.restricted == {"c": frozenset({"search"})}


def test_records_the_indexer_refuses_change_nothing(tmp_path: Path) -> None:
    """The follower reads `items` with the indexer's decoder: a record the vector store never
    took (a NaN popularity, an unknown surface, a wrong key) must not lift a takedown either."""
    import msgpack

    from serving.follower import EligibilityFollower

    eligibility = Eligibility(SURFACES)
    follower = EligibilityFollower(Settings(), eligibility)
    follower._apply(b"x", msgpack.packb({"item_id": "x", "surfaces": []}))
    for key, value in [(b"x", {"item_id": "x", "popularity": float("nan")}),
                       (b"x", {"item_id": "x", "surfaces": ["Home"]}),
                       (b"other", {"item_id": "x"}),
                       (b"x", {"item_id": "x", "created_at": "2026-12-07"}),
                       (b"x", ["not", "a", "map"])]:
        follower._apply(key, msgpack.packb(value))
    follower._apply(b"x", None)  # a tombstone
    follower._apply(b"x", b"\xc1 not msgpack")
    assert eligibility.restricted == {"x": frozenset()} and eligibility.version == 1


def test_a_list_left_empty_is_answered_with_the_fallback(tmp_path: Path) -> None:
    eligibility = Eligibility(SURFACES)
    eligibility.apply("a", ())
    fallback = PopularityFallback(tmp_path, SURFACES, 10)
    fallback.published = _record(["p", "a", "q"])  # the worker's popular list, also filtered
    response = build_response(pb.GetCandidatesRequest(user_id="u", surface="home"), _record(["a"]), fallback, LIMITS,
                              eligibility)
    assert response.is_fallback and [c.item_id for c in response.candidates] == ["p", "q"]


def test_a_published_popular_list_all_withdrawn_gives_way_to_the_model_s_table(tmp_path: Path) -> None:
    import numpy as np

    from inference.items import ItemTable

    ItemTable(np.array(["t1", "p", "t2"]), np.eye(3, 4, dtype=np.float32), np.array([5, 9, 1], np.float32),
              np.zeros((3, 0), np.float32)).save(tmp_path / "items.npz")
    eligibility = Eligibility(SURFACES)
    fallback = PopularityFallback(tmp_path, SURFACES, 10)
    fallback.published = _record(["p", "q"])
    eligibility.apply("p", ())
    eligibility.apply("q", ("search",))
    assert _served(None, "home", eligibility, fallback) == ["t1", "t2"]  # not an empty answer
    assert _served(None, "search", eligibility, fallback) == ["q"]
