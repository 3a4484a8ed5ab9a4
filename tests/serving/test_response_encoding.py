"""The server's memoised wire encoding gives exactly the message built the plain way."""

from __future__ import annotations

from array import array
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.settings import Settings
from serving._proto import candidates_pb2 as pb
from serving.fallback import PopularityFallback
from serving.server import Limits, build_response, encode_candidates
from serving.store import SurfaceList, UserCandidates

LIMITS = Limits(Settings(serving={"max_limit": 500, "default_limit": 7}))
FALLBACK = PopularityFallback(Path("/nonexistent"), ["home"], 10)

ids = st.text(min_size=0, max_size=300)  # > 127 bytes needs a two-byte varint length
scores = st.floats(allow_nan=False, width=32)


def reference(request: pb.GetCandidatesRequest, record: UserCandidates) -> pb.GetCandidatesResponse:
    lists = record.surfaces[request.surface]
    limit = request.limit or LIMITS.default_limit
    return pb.GetCandidatesResponse(
        user_id=request.user_id, surface=request.surface, model_version=record.model_version,
        generated_at_ms=record.generated_at, source_event_ts_ms=record.source_event_ts,
        candidates=[pb.Candidate(item_id=i, score=s) for i, s in zip(lists.items[:limit], lists.scores[:limit])],
    )


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(ids, scores), min_size=1, max_size=40), limit=st.integers(0, 50))
def test_build_response_matches_the_plain_construction(pairs: list[tuple[str, float]], limit: int) -> None:
    lists = SurfaceList(tuple(i for i, _ in pairs), array("f", [s for _, s in pairs]))
    record = UserCandidates("u", "v1", 5, 6, {"home": lists})
    request = pb.GetCandidatesRequest(user_id="u", surface="home", limit=limit)
    for _ in range(2):  # first call encodes and memoises, the second reuses
        got = build_response(request, record, FALLBACK, LIMITS)
        assert got == reference(request, record)
    encoded, offsets = encode_candidates(lists)
    assert len(offsets) == len(pairs) + 1 and offsets[-1] == len(encoded)


def test_an_empty_published_list_is_answered_with_the_fallback() -> None:
    """The worker publishes an empty list when the store had nothing eligible (a catalogue not
    loaded yet): the user gets the popular items, flagged, as an unknown user would."""
    record = UserCandidates("u", "v1", 5, 6, {"home": SurfaceList((), array("f"))})
    got = build_response(pb.GetCandidatesRequest(user_id="u", surface="home"), record, FALLBACK, LIMITS)
    assert got.is_fallback and got.model_version != "v1"


def test_no_answer_is_longer_than_max_limit_whatever_the_default() -> None:
    """A default limit (or fallback size) configured above max_limit: the default request's
    answer is still cut to max_limit, as any explicit limit is."""
    limits = Limits(Settings(serving={"max_limit": 5, "default_limit": 100}))
    lists = SurfaceList(tuple(f"i{k}" for k in range(20)), array("f", [1.0] * 20))
    record = UserCandidates("u", "v1", 5, 6, {"home": lists})
    got = build_response(pb.GetCandidatesRequest(user_id="u", surface="home"), record, FALLBACK, limits)
    assert [c.item_id for c in got.candidates] == ["i0", "i1", "i2", "i3", "i4"]
