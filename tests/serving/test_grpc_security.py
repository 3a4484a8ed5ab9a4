"""Optional TLS (server certificate) and bearer-token check on metadata, both on and off."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.settings import Settings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc

REQUEST = pb.GetCandidatesRequest(user_id="alice", surface="home", limit=1)


def _with(settings: Settings, **serving: Any) -> Settings:
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=serving)})


def test_tls_serves_trusting_clients_and_refuses_plaintext(settings: Settings, running_server: Any,
                                                           tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    tls = _with(settings, tls_cert=cert, tls_key=key)

    async def scenario() -> None:
        async with running_server(settings=tls) as port:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                answer = await pb_grpc.CandidatesStub(channel).GetCandidates(REQUEST)
                assert answer.candidates[0].item_id == "home-alice-0"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await pb_grpc.CandidatesStub(plain).GetCandidates(REQUEST, timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            # a client that does not trust this certificate gets nothing either
            async with grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials()) as untrusted:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await pb_grpc.CandidatesStub(untrusted).GetCandidates(REQUEST, timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_tls_needs_both_files(settings: Settings, running_server: Any, tls_files: tuple[Path, Path]) -> None:
    async def scenario() -> None:
        async with running_server(settings=_with(settings, tls_cert=tls_files[0])):
            pass

    with pytest.raises(ValueError, match="tls_cert and serving.tls_key"):
        asyncio.run(scenario())


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer s3cret"),), grpc.StatusCode.OK),
        ((("authorization", "bearer s3cret"),), grpc.StatusCode.OK),  # the scheme is case-insensitive
        ((("authorization", "BEARER s3cret"),), grpc.StatusCode.OK),
        ((("authorization", "Bearer S3CRET"),), grpc.StatusCode.UNAUTHENTICATED),  # the token is not
        ((("authorization", "Basic s3cret"),), grpc.StatusCode.UNAUTHENTICATED),
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "s3cret"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer s3cret "),), grpc.StatusCode.UNAUTHENTICATED),
        ((("x-token", "Bearer s3cret"),), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_bearer_token(settings: Settings, running_server: Any, metadata: tuple[tuple[str, str], ...],
                      expected: grpc.StatusCode) -> None:
    async def scenario() -> None:
        async with running_server(settings=_with(settings, auth_token="s3cret")) as port, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CandidatesStub(channel)
            for call in (stub.GetCandidates(REQUEST, metadata=metadata),
                         stub.BatchGetCandidates(pb.BatchGetCandidatesRequest(requests=[REQUEST]), metadata=metadata)):
                try:
                    await call
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                assert code == expected
            # probes need no secret
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(scenario())


def test_tls_and_token_together(settings: Settings, running_server: Any, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files

    async def scenario() -> None:
        async with running_server(settings=_with(settings, tls_cert=cert, tls_key=key, auth_token="t0k")) as port:
            # the token travels per call on a TLS channel, as grpc's composite credentials do
            credentials = grpc.composite_channel_credentials(
                grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()),
                grpc.access_token_call_credentials("t0k"),
            )
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                answer = await pb_grpc.CandidatesStub(channel).GetCandidates(REQUEST)
                assert not answer.is_fallback

    asyncio.run(scenario())
