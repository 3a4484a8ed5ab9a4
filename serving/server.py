"""The gRPC GetCandidates server (`recsys serve`): answers from the materialised `candidates`.

    recsys serve [--host H] [--port P] [--workers N] [--bootstrap B] [--no-follow] [--snapshot PATH]

Shape (grpc's examples/python): pure helpers at module level (`validate_request`,
`build_response`), a thin servicer, `create_server()` that builds and binds a grpc.aio server
and returns `(server, port)` apart from `serve()` that runs one until SIGTERM, and `main()`.

What the server guarantees:
- INVALID_ARGUMENT with a reason for bytes that are not the method's message (bad UTF-8, a
  truncated field: grpc alone would answer UNKNOWN with the parser's exception), an empty or oversized user_id, an unknown surface, a limit
  outside [0, max_limit] (0 = default_limit) or a batch larger than max_batch; deadlines are
  enforced by gRPC and checked between the lookups of a batch; RESOURCE_EXHAUSTED beyond
  max_concurrent_rpcs; message sizes capped both ways (a batch answer over the cap is refused
  with a reason, where gRPC would refuse it bare).
- Unknown users (and known users without a list, or with an empty one, for that surface) get
  the surface's popularity list with is_fallback = true.
- UNAVAILABLE (which clients retry) until `candidates`, `popular` and `items` have been read to
  their ends once, as health says NOT_SERVING: before, a user with a list would get the
  fallback and items withdrawn since a loaded snapshot would be served.
- Items withdrawn from a surface on `items` after the lists were made are left out of every
  answer at once (serving/eligibility.py), not when each user next acts.
- gRPC health checking (`grpc.health.v1`; SERVING only after `candidates`, `popular` and
  `items` have been read to their ends once, NOT_SERVING while shutting down) and server
  reflection.
- Optional TLS (serving.tls_cert + tls_key) and an optional bearer token on the
  `authorization` metadata (serving.auth_token; UNAUTHENTICATED otherwise; health stays open
  so that probes need no secret).
- SIGTERM/SIGINT: NOT_SERVING, still answering for drain_s (load balancers that poll health
  move away), then in-flight calls finish within shutdown_grace_s; the store is snapshotted
  when snapshot_path is set and the server followed the topics to their ends.

Throughput: one Python process serves a few thousand unary calls per second per core, so
`--workers N` starts N processes on the same port (SO_REUSEPORT; the kernel spreads
connections), each following the topic on its own and binding the port only once caught up
(binding is listening, and a health probe reaches one process of the N). Each holds its own
store: memory is N times one process's. A follower that ends (a defect, a setting it cannot
use) stops its process with an error (FollowerStopped), and the supervisor stops the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hmac
import logging
import multiprocessing
import multiprocessing.connection
from multiprocessing import resource_tracker
import signal
import sys
import threading
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recsys.settings import Settings, get_settings
from serving._proto import candidates_pb2 as pb
from serving._proto import candidates_pb2_grpc as pb_grpc
from serving.eligibility import Eligibility
from serving.fallback import PopularityFallback
from serving.store import CandidateStore, MalformedCandidates, SnapshotInfo, SurfaceList, UserCandidates

__all__ = [
    "CandidatesServicer",
    "Limits",
    "TokenAuthInterceptor",
    "build_response",
    "FollowerStopped",
    "create_server",
    "encode_candidates",
    "main",
    "run_event_loop",
    "serve",
    "validate_request",
]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Candidates"].full_name  # "recsys.v1.Candidates"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


class Limits:
    """What a valid request is; read once from settings so that handlers do no lookups."""

    __slots__ = ("default_limit", "max_batch", "max_id_length", "max_limit", "max_message_bytes", "surfaces")

    def __init__(self, settings: Settings) -> None:
        self.surfaces = frozenset(settings.events.surfaces)
        self.max_id_length = settings.events.max_id_length
        self.max_limit = settings.serving.max_limit
        self.default_limit = settings.serving.default_limit
        self.max_batch = settings.serving.max_batch
        self.max_message_bytes = settings.serving.max_message_bytes


def validate_request(request: pb.GetCandidatesRequest, limits: Limits) -> str | None:
    """None when the request is valid, else the reason (an INVALID_ARGUMENT detail)."""
    if not request.user_id:
        return "user_id is empty"
    if len(request.user_id.encode()) > limits.max_id_length:  # bytes, as the streams count them
        return f"user_id is longer than {limits.max_id_length} bytes (UTF-8)"
    if request.surface not in limits.surfaces:
        return f"unknown surface {request.surface[:64]!r}; known: {', '.join(sorted(limits.surfaces))}"
    if not 0 <= request.limit <= limits.max_limit:
        return f"limit {request.limit} is outside [0, {limits.max_limit}] (0 = default {limits.default_limit})"
    return None


def encode_candidates(lists: SurfaceList) -> tuple[bytes, array[int]]:
    """A list as the wire bytes of `GetCandidatesResponse.candidates`, and the byte offset at
    which each entry ends (offsets[k] = end of the first k), so the first k candidates are
    `encoded[:offsets[k]]`. Memoised on the list: encoding 100 candidates costs ~60 us in
    Python, merging a prefix of the bytes ~5 us (protobuf merges repeated fields by
    concatenation), so a list served again costs next to nothing.
    """
    if (cached := lists.memo.get("pb")) is not None:
        return cached  # type: ignore[no-any-return]
    message = pb.GetCandidatesResponse()
    add = message.candidates.add  # ~2x cheaper than building Candidate objects and extending
    for item_id, score in zip(lists.items, lists.scores, strict=True):
        add(item_id=item_id, score=score)
    encoded = message.SerializeToString()
    offsets, pos = [0], 0
    while pos < len(encoded):  # each entry: tag 0x1a (field 3, length-delimited), varint length, body
        pos, length, shift = pos + 1, 0, 0
        while True:
            byte = encoded[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        pos += length
        offsets.append(pos)
    # An array, not a tuple of ints: 101 offsets as int objects in a tuple cost ~3 KB, as uint32
    # 0.4 KB (a served list's memo 4.9 -> 2.0 KiB: benchmarks/serving_memory.py).
    lists.memo["pb"] = result = (encoded, array("I", offsets))
    return result


def build_response(
    request: pb.GetCandidatesRequest,
    record: UserCandidates | None,
    fallback: PopularityFallback,
    limits: Limits,
    eligibility: Eligibility | None = None,
) -> pb.GetCandidatesResponse:
    """The answer to a valid request: the user's list for the surface, less the items withdrawn
    from it since (`eligibility`), else the fallback (also for an empty list: the worker
    publishes one when the store had nothing eligible to return, e.g. a catalogue not loaded
    yet, and no candidates is no answer)."""
    # max_limit bounds every answer, a default or fallback configured longer than it included.
    limit = min(request.limit or limits.default_limit, limits.max_limit)
    lists: SurfaceList | None = record.surfaces.get(request.surface) if record is not None else None
    if lists is not None and eligibility is not None:
        lists = eligibility.filter(lists, request.surface)
    if record is not None and lists is not None and len(lists.items) > 0:
        response = pb.GetCandidatesResponse(
            user_id=request.user_id,
            surface=request.surface,
            model_version=record.model_version,
            generated_at_ms=record.generated_at,
            source_event_ts_ms=record.source_event_ts,
        )
    else:
        lists, model_version, generated_at = fallback.entry(request.surface)
        if eligibility is not None:
            lists = eligibility.filter(lists, request.surface)
            if not lists.items:  # the worker's list all withdrawn since it was made: the model's table
                lists, model_version, generated_at = fallback.entry(request.surface, published=False)
                lists = eligibility.filter(lists, request.surface)
        response = pb.GetCandidatesResponse(
            user_id=request.user_id,
            surface=request.surface,
            model_version=model_version,
            generated_at_ms=generated_at,
            is_fallback=True,
        )
    encoded, offsets = encode_candidates(lists)
    response.MergeFromString(encoded[: offsets[min(limit, len(offsets) - 1)]])
    return response


class CandidatesServicer(pb_grpc.CandidatesServicer):
    """Thin: validate, look up, build; every failure is a status with a detail."""

    def __init__(self, store: CandidateStore, fallback: PopularityFallback, limits: Limits,
                 eligibility: Eligibility | None = None, ready: asyncio.Event | None = None) -> None:
        self.store = store
        self.fallback = fallback
        self.limits = limits
        self.eligibility = eligibility
        # Set once caught up (None: answers at once). Before, a user with a list would get the
        # fallback, and items withdrawn since a loaded snapshot (or from the fallback table)
        # would be served: the topics read so far cannot tell. UNAVAILABLE is the status
        # clients retry on, elsewhere or later. Checked inline: a call is ~300 us of CPU.
        self.ready = ready

    async def GetCandidates(
        self, request: pb.GetCandidatesRequest | None, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetCandidatesResponse:
        if self.ready is not None and not self.ready.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, _CATCHING_UP)
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE)
        if (error := validate_request(request, self.limits)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        return build_response(request, self.store.get(request.user_id), self.fallback, self.limits, self.eligibility)

    async def BatchGetCandidates(
        self, request: pb.BatchGetCandidatesRequest | None, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BatchGetCandidatesResponse:
        if self.ready is not None and not self.ready.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, _CATCHING_UP)
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _UNDECODABLE)
        if len(request.requests) > self.limits.max_batch:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.requests)} requests in one batch; at most {self.limits.max_batch}",
            )
        for index, item in enumerate(request.requests):
            if (error := validate_request(item, self.limits)) is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requests[{index}]: {error}")
        response = pb.BatchGetCandidatesResponse()
        for item in request.requests:
            # A batch is the one handler that does real work per call; stop once nobody waits.
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded mid-batch")
            response.responses.append(build_response(item, self.store.get(item.user_id), self.fallback, self.limits,
                                                     self.eligibility))
        # Each valid request is small, but max_batch of them with long ids can add up to an
        # answer gRPC would refuse to send with a bare "larger than max": say what to change.
        if (size := response.ByteSize()) > self.limits.max_message_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the answer is {size} bytes, over the {self.limits.max_message_bytes}-byte message limit: "
                "ask for fewer users or a smaller limit",
            )
        return response


_CATCHING_UP = "catching up with the candidates, popular and items topics (health: NOT_SERVING); retry"
_UNDECODABLE = "the request is not a valid protobuf message of this method (e.g. a string field with bad UTF-8)"


def _lenient(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer that returns None for bytes that do not parse, so the handler can
    answer INVALID_ARGUMENT; grpc would otherwise answer UNKNOWN with the DecodeError's text."""
    from google.protobuf.message import DecodeError

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            return None

    return parse


def _add_servicer(servicer: CandidatesServicer, server: grpc.aio.Server) -> None:
    """`add_CandidatesServicer_to_server` of the generated stubs, with lenient deserializers."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=_lenient(request),
            response_serializer=response.SerializeToString)
        for name, request, response in (
            ("GetCandidates", pb.GetCandidatesRequest, pb.GetCandidatesResponse),
            ("BatchGetCandidates", pb.BatchGetCandidatesRequest, pb.BatchGetCandidatesResponse),
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _deny(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    async def deny(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)  # raises: the call ends with this status

    return grpc.unary_unary_rpc_method_handler(deny)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call but the health service."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()
        self._denied = _deny(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(_HEALTH_PREFIX):
            return await continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                scheme, _, given = (value.encode() if isinstance(value, str) else value).partition(b" ")
                # The scheme is case-insensitive (RFC 7235); the token is compared in constant
                # time, so the comparison does not leak how much of it matched.
                if scheme.lower() == b"bearer" and hmac.compare_digest(given, self._expected):
                    return await continuation(handler_call_details)
                break
        return self._denied


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    cfg = settings.serving
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Several processes may share the port only when asked to; otherwise a second server on
        # a busy port must fail loudly rather than silently split the traffic. (With workers > 1
        # a second such deployment on the same port shares it silently.)
        ("grpc.so_reuseport", 1 if cfg.workers > 1 else 0),
        ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
        ("grpc.keepalive_time_ms", cfg.keepalive_time_ms),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from serving.tls_cert + tls_key, None without TLS; a ValueError or
    OSError for a half-given pair or a file that cannot be read."""
    cfg = settings.serving
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ValueError("serving.tls_cert and serving.tls_key go together (both or neither)")
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    return grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())])


def create_server(
    settings: Settings,
    store: CandidateStore,
    fallback: PopularityFallback,
    *,
    health_servicer: health.aio.HealthServicer | None = None,
    eligibility: Eligibility | None = None,
    ready: asyncio.Event | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Build and bind (not start) the server; returns it with the bound port (host:0 picks one).

    Without a health_servicer one is made that reports the server ("") SERVING; serve() passes
    its own and flips it once the topic is caught up, and ``ready``, set then: until it is, the
    Candidates calls are answered UNAVAILABLE (None: answered at once).
    """
    cfg = settings.serving
    interceptors = [TokenAuthInterceptor(cfg.auth_token)] if cfg.auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=_server_options(settings),
        maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
    )
    _add_servicer(CandidatesServicer(store, fallback, Limits(settings), eligibility, ready), server)
    if health_servicer is None:
        health_servicer = health.aio.HealthServicer()  # reports "" (the whole server) SERVING
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    address = f"{cfg.host}:{cfg.port}"
    credentials = server_credentials(settings)
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return server, port


class FollowerStopped(RuntimeError):
    """A topic follower of a server process ended; the process stopped with it."""


def freeze_long_lived() -> None:
    """Collect, then move every object alive now out of the cyclic GC's later passes: done
    once, at catch-up, over the store as read from the topic.

    CPython runs a full pass whenever the long-lived objects have grown by a quarter, and a
    pass over a store of candidate lists stops the event loop (~0.6 s at 100k users here,
    health probes included). Frozen objects are still freed by reference counting; the lists
    make no reference cycles (tests/serving/test_candidate_store.py), so freezing them leaks
    nothing. Not repeated: collecting and freezing every 60 s while following the topic raised
    the freshness benchmark's p99 from ~140 to 270-360 ms (BENCHMARKS.md, "Freshness")."""
    gc.collect()
    gc.freeze()


async def _set_health(servicer: health.aio.HealthServicer, *, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):  # "" = the whole server, as probes ask by default
        await servicer.set(name, status)


def load_snapshot(settings: Settings, store: CandidateStore) -> SnapshotInfo | None:
    """Load `serving.snapshot_path` into the store; its header, from whose positions the
    candidates follower goes on (None: nothing loaded). The age bound guards against deletions
    compacted away on a topic the server follows; one that only serves its snapshot (follow
    off) misses nothing by its age. A damaged file is read past by a server that follows the
    topic (it reads the topic whole) and refused by one that serves the snapshot alone."""
    cfg = settings.serving
    if cfg.snapshot_path is None:
        return None
    try:
        loaded, info = store.load(cfg.snapshot_path, max_age_ms=settings.kafka.tombstone_retention_ms if cfg.follow else None)
    except MalformedCandidates as exc:
        if not cfg.follow:
            raise
        store.clear()
        log.warning("%s; not loaded, the topic is read whole", exc)
        return None
    if info is not None and cfg.follow and info.topic not in (None, settings.topics.candidates):
        store.clear()  # another topic's users, which this one's deletions never reach
        log.warning("snapshot %s was read from topic %r, not %r: not loaded, the topic is read whole",
                    cfg.snapshot_path, info.topic, settings.topics.candidates)
        return None
    log.info("loaded %d users from snapshot %s", loaded, cfg.snapshot_path)
    return info


async def serve(settings: Settings, *, ready: Callable[[int], None] | None = None) -> None:
    """Run one server process until SIGTERM/SIGINT (or cancellation); `ready(port)` once bound
    (with serving.workers > 1: once running, as it binds only after catch-up). Raises, after
    shutting down, what stopped it: FollowerStopped, or what failed binding the port."""
    from serving.follower import CandidatesFollower, EligibilityFollower, PopularFollower  # aiokafka only where a topic is followed

    cfg = settings.serving
    server_credentials(settings)  # a TLS mistake fails now, not after the catch-up (workers > 1)
    store = CandidateStore(cfg.max_users, max_items=cfg.max_limit)
    snapshot = load_snapshot(settings, store)
    fallback = PopularityFallback(settings.inference.model_dir, settings.events.surfaces, cfg.fallback_size)
    health_servicer = health.aio.HealthServicer()
    await _set_health(health_servicer, serving=False)
    caught_up = asyncio.Event()  # the Candidates calls wait for it (UNAVAILABLE before), as health does
    eligibility = Eligibility(settings.events.surfaces)
    server: grpc.aio.Server | None = None
    port = cfg.port

    async def listen() -> None:
        nonlocal server, port
        server, port = create_server(settings, store, fallback, health_servicer=health_servicer, eligibility=eligibility,
                                     ready=caught_up)
        await server.start()

    candidates = CandidatesFollower(settings, store, start=snapshot)
    followers = [candidates, PopularFollower(settings, fallback)] if cfg.follow else []
    if cfg.follow and cfg.follow_items:
        followers.append(EligibilityFollower(settings, eligibility))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def mark_serving() -> None:
        for follower in followers:
            await follower.caught_up.wait()
        freeze_long_lived()  # the whole store is long-lived now: one pass, before any call waits on it
        frozen.append(True)
        if server is None:
            # Processes sharing a port are handed connections as soon as they bind (binding
            # listens), and a health probe reaches only one of them: each binds once caught up.
            await listen()
        caught_up.set()
        await _set_health(health_servicer, serving=True)
        log.info("serving on port %d (%d users)", port, len(store))

    failed: list[str] = []
    frozen: list[bool] = []

    async def watch_followers() -> None:
        # A follower that ends leaves the store frozen while health says SERVING, or NOT_SERVING
        # for ever before catch-up: the process stops and exits non-zero for its supervisor.
        waits = [asyncio.create_task(f.stopped()) for f in followers]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        failed.extend("ended without an error" if d.result() is None else repr(d.result()) for d in done)
        log.error("a follower stopped (%s): shutting down", "; ".join(failed))
        stop.set()

    async def refresh_fallback() -> None:
        while True:  # a newly exported model changes the popularity list without a restart
            await asyncio.sleep(cfg.fallback_refresh_s)
            try:
                # Off the event loop: reading a new model's items.npz and sorting it takes ~0.3 s
                # at a million items, during which no RPC (health checks included) would be answered.
                await asyncio.to_thread(fallback.refresh)
            except Exception:  # noqa: BLE001 - the last good list keeps serving; retried next time
                log.exception("popularity fallback: refresh failed")

    if cfg.workers == 1:
        await listen()  # at once: health answers NOT_SERVING until caught up
    for follower in followers:
        await follower.start()
    serving = asyncio.create_task(mark_serving())
    # Binding after catch-up (workers > 1) can fail (the port taken by a server that does not
    # share it): the process stops with that error rather than live on unbound.
    serving.add_done_callback(lambda t: stop.set() if not t.cancelled() and t.exception() else None)
    tasks = [serving, asyncio.create_task(refresh_fallback())]
    if followers:
        tasks.append(asyncio.create_task(watch_followers()))
    if ready is not None:
        ready(port)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: NOT_SERVING, %.1f s drain, %.1f s grace for in-flight calls",
                 cfg.drain_s, cfg.shutdown_grace_s)
        await health_servicer.enter_graceful_shutdown()
        # Still answering (health Check says NOT_SERVING) while load balancers that poll it move
        # the traffic away: server.stop refuses every new call at once, probes included.
        if server is not None:
            await asyncio.sleep(cfg.drain_s)
            await server.stop(cfg.shutdown_grace_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for follower in followers:
            await follower.stop()
        if cfg.snapshot_path is not None and frozen and followers:
            info = candidates.snapshot_info()
            log.info("snapshot: %d users -> %s", store.save(cfg.snapshot_path, info), cfg.snapshot_path)
        elif cfg.snapshot_path is not None:
            # Nothing newer than the file to save: a server that never caught up (the topic out
            # of reach), or one that does not follow it. (Saving it again would also date a
            # snapshot of the first format, whose age is its file's time, now.)
            log.warning("snapshot: %s; %s left as it was",
                        "not following the topics" if not followers else "not caught up with the topics", cfg.snapshot_path)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if frozen:
            gc.unfreeze()  # the process's collector as serve() found it (in-process callers, tests)
    if failed:
        raise FollowerStopped("; ".join(failed))
    if serving.done() and not serving.cancelled() and (error := serving.exception()) is not None:
        raise error


def run_event_loop(main: Coroutine[Any, Any, None], settings: Settings) -> None:
    """asyncio.run(main), on uvloop when serving.uvloop asks for it and it is installed
    (measured: ~15% less server CPU per call than the default loop, same behaviour)."""
    if settings.serving.uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed; using the default asyncio loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def _run_worker(settings_json: str, started: Any) -> None:
    """Entry point of one process of `--workers N` (spawned: grpc must not be forked).
    ``started`` is set once SIGTERM stops this process cleanly (its handlers are in)."""
    # Inherited blocked (`_supervise`), so a Ctrl-C while this process imported is pending: it
    # is the supervisor's to act on (it stops every process), dropped here; serve() takes the next.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(message)s")
    settings = Settings.model_validate_json(settings_json)
    run_event_loop(serve(settings, ready=lambda port: started.set()), settings)


def _supervise(settings: Settings) -> int:
    """Start `workers` server processes on one port; forward SIGTERM/SIGINT; wait for all.

    A SIGTERM reaches each process only once it has started (spawning and importing take a
    second or more): one still starting would die of it (exit -15, failing the whole command)
    instead of stopping cleanly."""
    ctx = multiprocessing.get_context("spawn")
    blob = settings.model_dump_json()
    started = [ctx.Event() for _ in range(settings.serving.workers)]
    procs = [ctx.Process(target=_run_worker, args=(blob, ev), name=f"serve-{i}") for i, ev in enumerate(started)]
    stopping = threading.Event()
    # SIGINT (a Ctrl-C) stops them all, as SIGTERM does. The terminal sends it to the children
    # too: they inherit it blocked (`_run_worker`), so one still importing does not die of it.
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.set())
    print(f"recsys serve: starting {len(procs)} server processes on port {settings.serving.port}", flush=True)
    # Before the mask: multiprocessing starts its resource tracker with SIGINT unblocked in the
    # calling thread, which a first start inside proc.start() would do under it.
    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for proc in procs:
            proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    told: set[int] = set()
    crashed = False
    while any(proc.is_alive() for proc in procs):
        # Exit 0 is a clean stop (the terminal's Ctrl-C reaches every process itself).
        if not stopping.is_set() and (dead := [p for p in procs if p.exitcode not in (None, 0)]):
            # One process down means a replica at part of its capacity that looks healthy to its
            # supervisor (compose, Kubernetes): stop the others and exit non-zero, so it restarts.
            print(f"recsys serve: {dead[0].name} exited ({dead[0].exitcode}); stopping the others", flush=True)
            crashed = True
            stopping.set()
        if stopping.is_set():
            for i, proc in enumerate(procs):
                if i not in told and proc.is_alive() and started[i].is_set():
                    proc.terminate()  # SIGTERM: each drains its calls and stops on its own
                    told.add(i)
        multiprocessing.connection.wait([proc.sentinel for proc in procs if proc.is_alive()], timeout=0.1)
    code = max((abs(p.exitcode or 0) for p in procs), default=0)
    return code or (1 if crashed else 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys serve", description="Run the gRPC GetCandidates server.")
    parser.add_argument("--host", help="bind address (serving.host)")
    parser.add_argument("--port", type=int, help="port (serving.port; 0 = any, one worker only)")
    parser.add_argument("--workers", type=int, help="server processes sharing the port (serving.workers)")
    parser.add_argument("--no-follow", action="store_true", help="do not read the candidates topic")
    parser.add_argument("--snapshot", type=Path, help="load/save the store here (serving.snapshot_path)")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (kafka.bootstrap_servers)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    settings = get_settings()
    serving_updates = {
        k: v
        for k, v in {"host": args.host, "port": args.port, "workers": args.workers, "snapshot_path": args.snapshot}.items()
        if v is not None
    }
    if args.no_follow:
        serving_updates["follow"] = False
    settings = settings.model_copy(
        update={
            "serving": settings.serving.model_copy(update=serving_updates),
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": args.bootstrap or settings.kafka.bootstrap_servers}),
        }
    )
    if settings.serving.workers < 1:
        parser.error("--workers must be >= 1")
    if settings.serving.workers > 1:
        if settings.serving.port == 0:
            parser.error("--workers > 1 needs a fixed --port (the processes share it)")
        if settings.serving.snapshot_path is not None:
            parser.error("--snapshot is for one worker (the processes would overwrite each other's file)")
        return _supervise(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_event_loop(serve(settings, ready=lambda port: print(f"recsys serve: listening on port {port}", flush=True)), settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
