"""The local broker is a real Kafka: records round-trip, and start/stop are idempotent."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from recsys.kafka_broker import BrokerError, LocalBroker, free_port
from recsys.settings import KafkaSettings

pytestmark = pytest.mark.kafka


def test_records_round_trip(kafka_bootstrap: str, unique: str) -> None:
    topic = f"roundtrip-{unique}"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(10):
        producer.send(topic, key=str(i % 3).encode(), value=f"v{i}".encode())
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    values = sorted(m.value for m in consumer)
    consumer.close()
    assert values == sorted(f"v{i}".encode() for i in range(10))


def test_start_stop_idempotent(tmp_path: Path) -> None:
    broker = LocalBroker(KafkaSettings(data_dir=tmp_path, port=free_port(), controller_port=free_port()))
    assert broker.stop() is False  # nothing to stop yet
    first = broker.start()
    pid = broker.pid()
    assert broker.start() == first and broker.pid() == pid  # second start reuses the process
    # The same data dir asked for other ports (a demo rerun after one that was killed): said at once.
    moved = LocalBroker(KafkaSettings(data_dir=tmp_path, port=free_port(), controller_port=free_port(),
                                      start_timeout_s=5))
    with pytest.raises(BrokerError, match=f"pid {pid}\\) is still running, on port {broker.cfg.port}"):
        moved.start()
    assert broker.stop() is True
    assert broker.pid() is None
    assert broker.stop() is False
    broker.destroy()
    assert not tmp_path.exists()


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither java nor mvn on PATH
    broker = LocalBroker(KafkaSettings(data_dir=tmp_path / "d", jars_dir=tmp_path / "jars",
                                       port=free_port(), controller_port=free_port()))
    with pytest.raises(BrokerError, match="`mvn` is not on PATH"):
        broker.start()


def _cached_jars(tmp_path: Path) -> KafkaSettings:
    cfg = KafkaSettings(data_dir=tmp_path / "d", jars_dir=tmp_path / "jars", port=free_port(), controller_port=free_port())
    home = cfg.jars_dir / f"kafka_{cfg.scala_version}-{cfg.version}"
    home.mkdir(parents=True)
    (home / ".complete").write_text(cfg.version)  # jars cached: what a user with no java meets next
    return cfg


def test_no_java_with_the_jars_cached_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(BrokerError, match="`java` is not on PATH"):
        LocalBroker(_cached_jars(tmp_path)).start()


@pytest.mark.parametrize(("version_line", "error"), [
    ('openjdk version "11.0.2" 2019-01-15', "needs Java 17 or later; `java` is version 11"),
    ("no version here", "could not read the Java version"),
])
def test_an_old_or_unreadable_java_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version_line: str, error: str
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")  # `java -version` writes to stderr
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(BrokerError, match=error):
        LocalBroker(_cached_jars(tmp_path)).start()


def test_destroy_refuses_a_directory_that_is_not_a_brokers(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not kafka's")
    with pytest.raises(BrokerError, match="does not hold a local broker's state"):
        LocalBroker(KafkaSettings(data_dir=tmp_path, port=free_port(), controller_port=free_port())).destroy()
    assert (tmp_path / "precious.txt").exists()


def test_a_port_held_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    """Readiness only asks "does something answer on the port": a port another broker holds
    would pass it while this JVM died of address-in-use."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = LocalBroker(KafkaSettings(data_dir=tmp_path, port=port, controller_port=free_port()))
        with pytest.raises(BrokerError, match=f"port {port} is in use"):
            broker.start()
        assert broker.pid() is None
