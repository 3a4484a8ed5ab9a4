"""Shared fixtures: one real Kafka broker per test session, unique names per test."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.kafka_broker import LocalBroker, free_port
from recsys.settings import RUN_SWITCHES, KafkaSettings


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a cancelled CI run, `timeout`) as Ctrl-C: pytest then runs the fixtures' teardown,
    # which stops the session's broker and the stacks' services. Without it they outlived the run:
    # they are started in sessions of their own.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    _keep_shell_settings_out()


# Switches of the test run itself, not settings of the code under test; a config file named in
# the shell (RECSYS_CONFIG) would change every test's settings, so it goes with them.
_RUN_SWITCHES = RUN_SWITCHES - {"RECSYS_CONFIG"}
_shell_settings: dict[str, str] = {}


def _keep_shell_settings_out() -> None:
    """A RECSYS_* setting exported in the shell would reach the tests' Settings() (module-level
    ones too, read at collection) and the processes they start, and make expected answers and
    services disagree: removed for the run, put back after it."""
    for k in [k for k in os.environ if k.startswith("RECSYS_") and k not in _RUN_SWITCHES]:
        _shell_settings[k] = os.environ.pop(k)


def pytest_unconfigure(config: pytest.Config) -> None:
    os.environ.update(_shell_settings)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("RECSYS_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; set RECSYS_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real single-node KRaft broker on free ports, removed after the session."""
    data_dir: Path = tmp_path_factory.mktemp("kafka")
    cfg = KafkaSettings(data_dir=data_dir, port=free_port(), controller_port=free_port(), partitions=2)
    broker = LocalBroker(cfg)
    bootstrap = broker.start()
    try:
        yield bootstrap
    finally:
        broker.destroy()


@pytest.fixture
def unique() -> str:
    """A short suffix that keeps topics, groups and app ids of one test apart from others."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small exported model (~15 s to train and export, once per session) for the tests of the
    worker's and the system's behaviour, not of the model's quality. Bounded by the demo's
    epochs, not the clock (no max_seconds; the tests' timeout is the failure bound): a time cap
    made the model depend on the machine's load, and a failure on CI could not be reproduced
    with the same model."""
    from inference.train import train_small_demo_model
    from recsys.settings import Settings
    from streams.synthetic import N_CLUSTERS, cluster_features, synthetic_events

    events = [e.to_wire() for e in synthetic_events(2000, 100, 64, seed=5)]
    return train_small_demo_model(events, Settings(train={"num_threads": 1}), tmp_path_factory.mktemp("small-model"),
                                  max_seconds=None, item_features={str(i): cluster_features(i, N_CLUSTERS) for i in range(64)})
