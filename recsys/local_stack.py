"""The whole system on one machine, as real processes: what the demo, the end-to-end tests
and the freshness benchmark run.

    broker (recsys.kafka_broker)  ->  `recsys index` (bulk-load the exported item table)
    -> `recsys streams`  +  `recsys worker` (also follows `items`)  +  `recsys serve`

Every process gets its settings as `RECSYS_*` variables, so each one runs exactly the entry
point docker-compose.yml runs. The stack needs an exported model in `model_dir`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.kafka_broker import LocalBroker, free_port
from recsys.processes import Service, settings_env
from recsys.settings import get_settings

__all__ = ["LocalStack"]

PLAINTEXT_ONLY = ("serving.auth_token", "serving.tls_cert", "serving.tls_key")  # see LocalStack.env


class LocalStack:
    """Start with `with LocalStack(work_dir, model_dir) as stack:`; `stack.grpc_target`."""

    def __init__(
        self,
        work_dir: Path,
        model_dir: Path,
        *,
        bootstrap: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        partitions: int = 2,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.model_dir = Path(model_dir).resolve()
        self.partitions = partitions
        self.broker: LocalBroker | None = None
        self.bootstrap = bootstrap
        self.grpc_port = free_port()
        # Fixed for the stack's life, as in a deployment: a Faust worker restarted with static
        # membership (streams.instance_id) gets its old assignment back, whose metadata names
        # the worker's web URL, and faust's assignor asserts that it is unchanged.
        self.streams_web_port = free_port()
        self.overrides = dict(overrides or {})
        self.services: dict[str, Service] = {}

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def env(self) -> dict[str, str | None]:
        """The services' settings, on top of the caller's environment. Authentication and TLS
        are off unless given in `overrides`: the stack's own clients (its health wait, the demo,
        the tests) speak plaintext without a token, and a shell's RECSYS_SERVING__AUTH_TOKEN
        would leave each of their calls UNAUTHENTICATED."""
        assert self.bootstrap is not None, "start the broker first"
        base = {
            "kafka.bootstrap_servers": self.bootstrap,
            "kafka.partitions": self.partitions,
            "inference.model_dir": self.model_dir,
            "vector_store.backend": "edge",
            "vector_store.path": self.work_dir / "qdrant",
            "streams.data_dir": self.work_dir / "streams",
            "streams.web_port": self.streams_web_port,
            "serving.port": self.grpc_port,
        }
        unset: dict[str, str | None] = {name: None for name in settings_env(dict.fromkeys(PLAINTEXT_ONLY, ""))}
        return {**unset, **settings_env({**base, **self.overrides})}

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> LocalStack:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.bootstrap is None:
            # The shell's broker settings (start timeout, heap, version, jars) hold; only where
            # it lives and listens is the stack's.
            self.broker = LocalBroker(get_settings().kafka.model_copy(update={
                "data_dir": self.work_dir / "kafka", "port": free_port(), "controller_port": free_port(),
                "partitions": self.partitions,
            }))
            self.bootstrap = self.broker.start()
        self._create_topics()
        # A Service runs in its own session: one left running (a hung index) would outlive us.
        with Service("index", ["index"], self.env(), self.work_dir / "logs") as index:
            if index.proc is not None and index.proc.wait(300) != 0:
                raise RuntimeError(f"`recsys index` failed:\n{index.log_tail()}")
        for name in ("streams", "worker", "serve"):
            self.start_service(name)
        self.wait_serving()
        self.check_alive()
        return self

    def check_alive(self) -> None:
        """Fail with the log tail of any service that has exited."""
        for name, service in self.services.items():
            if not service.running:
                raise RuntimeError(f"{name} exited:\n{service.log_tail()}")

    def _create_topics(self) -> None:
        from recsys.settings import TopicSettings
        from recsys.topics import ensure_topics, topic_configs

        names = {k.split(".", 1)[1]: v for k, v in self.overrides.items() if k.startswith("topics.")}
        retention = int(self.overrides.get("kafka.tombstone_retention_ms", get_settings().kafka.tombstone_retention_ms))
        ensure_topics(self.bootstrap, topic_configs(TopicSettings(**names), retention), self.partitions)

    def start_service(self, name: str) -> Service:
        service = Service(name, [name], self.env(), self.work_dir / "logs").start()
        self.services[name] = service
        return service

    def restart(self, name: str, *, kill: bool = False) -> Service:
        """Stop a service (SIGTERM, or SIGKILL with kill=True) and start it again."""
        old = self.services[name]
        old.kill() if kill else old.stop()
        service = self.start_service(name)
        if name == "serve":
            self.wait_serving()
        return service

    def wait_serving(self, timeout_s: float = 120.0) -> None:
        """Until gRPC health says SERVING (the server has caught up with `candidates`)."""
        def healthy() -> bool:
            with grpc.insecure_channel(self.grpc_target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        self.services["serve"].wait_until(healthy, timeout_s, "gRPC health SERVING")

    def stop(self) -> None:
        """Stop every service, then the broker. Each runs in a session of its own, so whatever
        this misses outlives us: a second Ctrl-C while the clean stop waits kills the rest
        instead of leaving them running (the next run would meet a broker on the old ports and
        a worker holding the Edge shard's lock)."""
        try:
            for service in reversed(list(self.services.values())):
                service.stop()
            if self.broker is not None:
                self.broker.stop()
        except KeyboardInterrupt:
            for service in self.services.values():
                service.kill()
            if self.broker is not None:
                self.broker.stop(timeout_s=0)
            raise

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until truthy or the timeout; returns whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False
