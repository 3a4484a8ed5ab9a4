"""The ceiling for grpc_bench: a minimal grpc.aio server of the same service that does no work.

GetCandidates echoes the request's user and surface back with no candidates: what remains is
the cost of gRPC itself (HTTP/2, protobuf parsing, the asyncio handler dispatch) in Python.
With `--payload N` it adds the same prebuilt N candidates to every answer: a ceiling whose
answers are as large as the real server's.
It runs the same way as `recsys serve`: the same server options, N spawned processes sharing
the port with SO_REUSEPORT.

    python -m benchmarks.grpc.echo_server --port 50060 --workers 2 [--payload 100]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import sys
from typing import Any

import grpc

from recsys.settings import ServingSettings, Settings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from serving.server import _server_options, run_event_loop


class EchoServicer(pb_grpc.CandidatesServicer):
    def __init__(self, payload: int) -> None:
        # --payload N: one prebuilt answer with N candidates, returned as is (gRPC only serializes
        # it), so the answer is as large as GetCandidates' (same transport and client decoding
        # cost) while making it costs nothing. (Copying N Candidate messages into a fresh answer
        # per call would cost more than the real server, which merges memoised bytes.)
        self.payload = payload
        self.sized = pb.GetCandidatesResponse(
            user_id="user-0000", surface="home", model_version="echo",
            candidates=[pb.Candidate(item_id=str(1_000_000 + k), score=1.0 - k / max(payload, 1)) for k in range(payload)],
        )

    async def GetCandidates(self, request: pb.GetCandidatesRequest, context: Any) -> pb.GetCandidatesResponse:
        if self.payload:
            return self.sized
        return pb.GetCandidatesResponse(user_id=request.user_id, surface=request.surface)


async def _serve(settings: Settings, payload: int = 0) -> None:
    server = grpc.aio.server(options=_server_options(settings),
                             maximum_concurrent_rpcs=settings.serving.max_concurrent_rpcs)
    pb_grpc.add_CandidatesServicer_to_server(EchoServicer(payload), server)
    server.add_insecure_port(f"{settings.serving.host}:{settings.serving.port}")
    await server.start()
    print(f"echo ready on port {settings.serving.port}", flush=True)  # grpc_bench counts these
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def _run(blob: str, payload: int) -> None:
    settings = Settings.model_validate_json(blob)
    run_event_loop(_serve(settings, payload), settings)  # the same event loop as `recsys serve`


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--payload", type=int, default=0, help="candidates in every answer (0: none)")
    args = parser.parse_args(argv)
    settings = Settings(serving=ServingSettings(port=args.port, workers=args.workers))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_run, args=(settings.model_dump_json(), args.payload)) for _ in range(args.workers)]
    for proc in procs:
        proc.start()
    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            proc.terminate()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for proc in procs:
        proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
