"""Fixtures for the gRPC server tests: a model directory, a populated store, a running server.

Every server binds 127.0.0.1:0 and is reached with a real grpc.aio client (no fakes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.settings import Settings
from serving.fallback import PopularityFallback
from serving.server import create_server
from serving.store import CandidateStore

N_ITEMS = 50  # items in the test model's table; item "i<k>" has popularity k


def candidates_value(user_id: str, *, source_event_ts: int, generated_at: int | None = None, n: int = 20,
                     model_version: str = "m1", tag: str = "") -> dict[str, Any]:
    """A `candidates` record (the brief's wire contract) with distinct lists per surface."""
    surfaces = {
        s: {"items": [f"{s}{tag}-{user_id}-{k}" for k in range(n)], "scores": [float(n - k) for k in range(n)]}
        for s in ("home", "search", "related")
    }
    return {"user_id": user_id, "model_version": model_version, "source_event_ts": source_event_ts,
            "generated_at": source_event_ts + 1 if generated_at is None else generated_at, "surfaces": surfaces}


@pytest.fixture
def make_candidates() -> Callable[..., dict[str, Any]]:
    return candidates_value


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory with just what the fallback reads: items.npz and meta.json."""
    path = tmp_path / "model"
    path.mkdir()
    ids = np.array([f"i{k}" for k in range(N_ITEMS)])
    popularity = np.arange(N_ITEMS, dtype=np.float32)
    np.savez(path / "items.npz", ids=ids, popularity=popularity,
             embeddings=np.zeros((N_ITEMS, 4), dtype=np.float32))
    (path / "meta.json").write_text('{"version": "pop-v1"}')
    return path


@pytest.fixture
def settings(model_dir: Path) -> Settings:
    return Settings(serving={"host": "127.0.0.1", "port": 0, "max_limit": 50, "default_limit": 10,
                             "fallback_size": 20, "max_batch": 8, "max_concurrent_rpcs": 64},
                    inference={"model_dir": model_dir})


@pytest.fixture
def store() -> CandidateStore:
    store = CandidateStore(1000, max_items=50)
    for user in ("alice", "bob"):
        assert store.apply(candidates_value(user, source_event_ts=1_700_000_000_000))
    return store


ServerFactory = Callable[..., contextlib.AbstractAsyncContextManager[int]]


@pytest.fixture
def running_server(settings: Settings, store: CandidateStore) -> ServerFactory:
    """`async with running_server(settings=..., store=...) as port:` a started server."""

    @contextlib.asynccontextmanager
    async def run(settings: Settings = settings, store: CandidateStore = store) -> AsyncIterator[int]:
        fallback = PopularityFallback(settings.inference.model_dir, settings.events.surfaces,
                                      settings.serving.fallback_size)
        server, port = create_server(settings, store, fallback)
        await server.start()
        try:
            yield port
        finally:
            await server.stop(None)

    return run


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for localhost / 127.0.0.1 (made by openssl)."""
    if shutil.which("openssl") is None:
        if os.environ.get("RECSYS_REQUIRE_OPENSSL") == "1":  # CI: the TLS tests must run, not skip
            pytest.fail("openssl is needed to make a test certificate (RECSYS_REQUIRE_OPENSSL=1)")
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "server.pem", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key
