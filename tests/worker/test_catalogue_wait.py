"""The worker consumes only once the store holds its model's whole catalogue: this model's
queries against another model's vectors, or an empty store, would publish lists that replace
every active user's good ones."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from inference.worker import wait_for_catalogue
from recsys.settings import Settings
from worker_helpers import create_topics
from vector_store import ItemRecord, open_store


def test_an_edge_shard_without_the_models_catalogue_stops_the_worker_with_what_to_run(tmp_path: Path) -> None:
    settings = Settings(vector_store={"path": tmp_path / "shard"}, inference={"model_dir": tmp_path / "no-model"})
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
def test_a_qdrant_server_is_waited_for_until_the_indexer_has_loaded_it(tmp_path: Path) -> None:
    settings = Settings(vector_store={"backend": "server", "url": ":memory:"},
                        inference={"store_retry_max_s": 0.05, "model_dir": tmp_path / "no-model"})
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


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_a_running_worker_stops_when_another_models_load_starts(kafka_bootstrap: str, small_model_dir: Path,
                                                              tmp_path: Path, unique: str) -> None:
    """`recsys index` of a newer model over a shared store clears the marker first: the older
    model's worker stops instead of publishing its queries' hits among the newer vectors. A
    reload of its own model's table stops it too (its items follower must rejoin)."""
    from inference.guards import RetryingStore
    from inference.runtime import ModelRuntime
    from inference.worker import Worker
    from vector_store.indexer import ItemTable, index_item_table

    settings = Settings(kafka={"bootstrap_servers": kafka_bootstrap},
                        topics={"user_updates": f"uu-{unique}", "candidates": f"cand-{unique}", "popular": f"pop-{unique}"},
                        inference={"group_id": f"w-{unique}", "catalogue_check_every_s": 0.2, "max_wait_ms": 5},
                        vector_store={"path": tmp_path / "shard"})
    create_topics(kafka_bootstrap, settings.topics.user_updates)
    runtime = ModelRuntime.load(small_model_dir, "cpu")
    store = open_store(settings, dim=runtime.dim)
    index_item_table(store, ItemTable.load(small_model_dir), settings.events.surfaces)
    store.mark_catalogue(runtime.version)
    worker = Worker(settings, runtime, RetryingStore(store, initial_s=0.05, max_s=0.2))
    # As main sets it, before the items follower's catch-up: the catalogue its lists are for.
    worker.catalogue = (runtime.version, store.catalogue_load())
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and worker.catalogue_changed is None  # its own catalogue: it runs
        store.mark_catalogue(None)  # the other model's load begins
        thread.join(30)
        assert not thread.is_alive()
        assert worker.catalogue_changed == "no whole catalogue (a load under way)"
        # A reload of its own model's table seen only once over (a small table loads in less
        # than a check's period; or it ended during the follower's catch-up, before run()
        # began): the items follower must join the new load's group.
        store.mark_catalogue(runtime.version)  # --reindex of the same model, done
        worker.catalogue_changed = None
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive() and worker.catalogue_changed == f"a new load of model {runtime.version}'s"
    finally:
        worker.stopping.set()
        thread.join(30)
        worker.close()
        store.close()


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local:UserWarning")
def test_a_wait_for_a_model_the_model_directory_no_longer_holds_ends(tmp_path: Path) -> None:
    """The worker loaded v1 and waits for its catalogue; meanwhile v2 was exported where v1 was
    and indexed. The v1 load would never come: the worker stops, and its restart loads v2."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "meta.json").write_text('{"version": "v2"}')
    settings = Settings(vector_store={"backend": "server", "url": ":memory:"},
                        inference={"store_retry_max_s": 0.01, "model_dir": model_dir})
    with open_store(settings, dim=4) as store:
        store.mark_catalogue("v2")
        with pytest.raises(SystemExit, match="now holds model v2, not the loaded v1"):
            wait_for_catalogue(store, "v1", settings, threading.Event())
        assert wait_for_catalogue(store, "v2", settings, threading.Event())
