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


def _served(record: UserCandidates, surface: str, eligibility: Eligibility, fallback: PopularityFallback) -> list[str]:
    response = build_response(pb.GetCandidatesRequest(user_id="u", surface=surface), record, fallback, LIMITS, eligibility)
    return [c.item_id for c in response.candidates]


def test_a_withdrawn_item_leaves_the_lists_on_the_surfaces_it_left_and_comes_back_when_restored(tmp_path: Path) -> None:
    eligibility = Eligibility(SURFACES)
    fallback = PopularityFallback(tmp_path, SURFACES, 10)
    record = _record(["a", "b", "c"])
    assert _served(record, "home", eligibility, fallback) == ["a", "b", "c"]
    eligibility.apply(b"b", {"item_id": "b", "surfaces": []})  # withdrawn
    eligibility.apply(b"c", {"item_id": "c", "surfaces": ["search"]})  # search only now
    assert _served(record, "home", eligibility, fallback) == ["a"]
    assert _served(record, "search", eligibility, fallback) == ["a", "c"]
    assert _served(record, "home", eligibility, fallback) == ["a"]  # memoised, same answer
    eligibility.apply(b"b", {"item_id": "b"})  # surfaces missing = all: back everywhere
    assert _served(record, "home", eligibility, fallback) == ["a", "b"]
    assert eligibility.restricted == {"c": frozenset({"search"})}


def test_records_the_indexer_refuses_change_nothing(tmp_path: Path) -> None:
    eligibility = Eligibility(SURFACES)
    for key, value in [(b"x", {"item_id": "x", "surfaces": ["Home"]}),  # unknown surface
                       (b"other", {"item_id": "x", "surfaces": []}),  # wrong key
                       (b"x", {"item_id": "x", "surfaces": "home"}),  # wrong type
                       (b"x", ["not", "a", "map"]), (b"x", None)]:
        eligibility.apply(key, value)
    assert eligibility.restricted == {} and eligibility.version == 0


def test_a_list_left_empty_is_answered_with_the_fallback(tmp_path: Path) -> None:
    eligibility = Eligibility(SURFACES)
    eligibility.apply(b"a", {"item_id": "a", "surfaces": []})
    fallback = PopularityFallback(tmp_path, SURFACES, 10)
    fallback.published = _record(["p", "a", "q"])  # the worker's popular list, also filtered
    response = build_response(pb.GetCandidatesRequest(user_id="u", surface="home"), _record(["a"]), fallback, LIMITS,
                              eligibility)
    assert response.is_fallback and [c.item_id for c in response.candidates] == ["p", "q"]
