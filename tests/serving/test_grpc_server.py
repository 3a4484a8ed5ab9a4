"""GetCandidates / BatchGetCandidates over a real grpc.aio server on loopback, real client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recsys.settings import Settings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from serving.server import SERVICE_NAME
from serving.store import CandidateStore

Make = Callable[..., dict[str, Any]]


def request(user_id: str = "alice", surface: str = "home", limit: int = 0) -> pb.GetCandidatesRequest:
    return pb.GetCandidatesRequest(user_id=user_id, surface=surface, limit=limit)


def test_known_user_gets_their_list_per_surface(running_server: Any) -> None:
    async def scenario() -> None:
        async with running_server() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CandidatesStub(channel)
            home = await stub.GetCandidates(request(limit=3))
            assert [c.item_id for c in home.candidates] == ["home-alice-0", "home-alice-1", "home-alice-2"]
            assert [c.score for c in home.candidates] == [20.0, 19.0, 18.0]
            assert (home.user_id, home.surface, home.model_version) == ("alice", "home", "m1")
            assert home.source_event_ts_ms == 1_700_000_000_000
            assert home.generated_at_ms == 1_700_000_000_001
            assert not home.is_fallback
            search = await stub.GetCandidates(request(surface="search", limit=3))
            assert search.candidates[0].item_id == "search-alice-0"
            default = await stub.GetCandidates(request())  # limit 0 = default_limit (10)
            assert len(default.candidates) == 10
            everything = await stub.GetCandidates(request(limit=50))  # the user has only 20
            assert len(everything.candidates) == 20

    asyncio.run(scenario())


def test_unknown_user_gets_the_popularity_fallback_flagged(running_server: Any) -> None:
    async def scenario() -> None:
        async with running_server() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CandidatesStub(channel)
            response = await stub.GetCandidates(request(user_id="carol", surface="related", limit=3))
            assert response.is_fallback
            assert [c.item_id for c in response.candidates] == ["i49", "i48", "i47"]
            assert response.model_version == "pop-v1" and response.source_event_ts_ms == 0
            # fallback_size (20) bounds it whatever the limit
            assert len((await stub.GetCandidates(request(user_id="carol", limit=50))).candidates) == 20

    asyncio.run(scenario())


def test_known_user_without_that_surface_falls_back(settings: Settings, make_candidates: Make, running_server: Any) -> None:
    store = CandidateStore(10)
    value = make_candidates("dave", source_event_ts=5)
    del value["surfaces"]["search"]
    store.apply(value)

    async def scenario() -> None:
        async with running_server(store=store) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CandidatesStub(channel)
            assert not (await stub.GetCandidates(request(user_id="dave", surface="home"))).is_fallback
            assert (await stub.GetCandidates(request(user_id="dave", surface="search"))).is_fallback

    asyncio.run(scenario())


def test_batch_answers_in_request_order(running_server: Any) -> None:
    async def scenario() -> None:
        async with running_server() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CandidatesStub(channel)
            asked = [request("bob", "search", 2), request("zed", "home", 2), request("alice", "related", 1)]
            batch = await stub.BatchGetCandidates(pb.BatchGetCandidatesRequest(requests=asked))
            assert [(r.user_id, r.surface, r.is_fallback) for r in batch.responses] == [
                ("bob", "search", False), ("zed", "home", True), ("alice", "related", False)]
            assert [c.item_id for c in batch.responses[0].candidates] == ["search-bob-0", "search-bob-1"]
            assert len((await stub.BatchGetCandidates(pb.BatchGetCandidatesRequest())).responses) == 0

    asyncio.run(scenario())


def test_health_and_reflection_are_reachable(running_server: Any) -> None:
    async def scenario() -> None:
        async with running_server() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflection.ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
            ]))
            replies = [reply async for reply in call]
            services = {s.name for s in replies[0].list_services_response.service}
            assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
            assert replies[1].file_descriptor_response.file_descriptor_proto  # clients can build stubs

    asyncio.run(scenario())
