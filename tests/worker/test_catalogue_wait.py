"""The worker consumes only once the store holds its model's whole catalogue: this model's
queries against another model's vectors, or an empty store, would publish lists that replace
every active user's good ones."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from inference.worker import wait_for_catalogue
from recsys.settings import Settings
from vector_store import ItemRecord, open_store


def test_an_edge_shard_without_the_models_catalogue_stops_the_worker_with_what_to_run(tmp_path: Path) -> None:
    settings = Settings(vector_store={"path": tmp_path / "shard"})
    with open_store(settings, dim=4) as store:
        store.upsert([ItemRecord("a", ("home",))], np.eye(4, dtype=np.float32)[:1])  # the follower's, say
        with pytest.raises(SystemExit, match="holds no whole catalogue, not model v2's: run `recsys index`"):
            wait_for_catalogue(store, "v2", settings, threading.Event())
        store.mark_catalogue("v1")
        with pytest.raises(SystemExit, match="holds model v1's"):
            wait_for_catalogue(store, "v2", settings, threading.Event())
        store.mark_catalogue("v2")
        assert wait_for_catalogue(store, "v2", settings, threading.Event())


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local:UserWarning")
def test_a_qdrant_server_is_waited_for_until_the_indexer_has_loaded_it() -> None:
    settings = Settings(vector_store={"backend": "server", "url": ":memory:"}, inference={"store_retry_max_s": 0.05})
    with open_store(settings, dim=4) as store:
        stopping = threading.Event()
        loader = threading.Timer(0.3, store.mark_catalogue, args=("v2",))  # the indexer, beside us
        loader.start()
        try:
            assert wait_for_catalogue(store, "v2", settings, stopping)
        finally:
            loader.cancel()
        store.mark_catalogue(None)
        stopping.set()
        assert wait_for_catalogue(store, "v2", settings, stopping) is False


def test_a_store_outage_during_the_wait_is_waited_out() -> None:
    """Reading the marker of a Qdrant server that is restarting fails like any store call:
    waited out, not the worker's end."""

    class Restarting:
        calls = 0

        def catalogue_version(self) -> str | None:
            self.calls += 1
            if self.calls < 3:
                raise ConnectionError("connection refused")
            return "v2"

    settings = Settings(vector_store={"backend": "server", "url": ":memory:"}, inference={"store_retry_max_s": 0.01})
    store = Restarting()
    assert wait_for_catalogue(store, "v2", settings, threading.Event())  # type: ignore[arg-type]
    assert store.calls == 3
