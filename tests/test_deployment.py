"""docker-compose.yml is valid for a real compose implementation and runs our entry points."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from recsys.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def _compose_binary() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True) if shutil.which("docker") else None
    return ["docker", "compose"] if probe is not None and probe.returncode == 0 else None


def test_compose_file_is_valid() -> None:
    binary = _compose_binary()
    if binary is None:
        if os.environ.get("RECSYS_REQUIRE_COMPOSE") == "1":
            pytest.fail("no compose implementation found, but RECSYS_REQUIRE_COMPOSE=1")
        pytest.skip("no compose implementation (install Debian's docker-compose)")
    proc = subprocess.run([*binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_services_run_the_project_entry_points() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"kafka", "qdrant", "streams", "worker", "server"} <= set(services)
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    ours = {name: svc for name, svc in services.items() if "build" in svc}
    assert {"streams", "worker", "server"} <= set(ours)
    for name, svc in ours.items():
        assert svc["command"][0] in COMMANDS, f"{name} runs {svc['command'][0]!r}, not a recsys command"
    # The long-running ones exit non-zero on what they cannot wait out (RELIABILITY.md) and
    # count on being started again; the one-shot trainer must not loop.
    for name in ("indexer", "streams", "worker", "server"):
        assert ours[name].get("restart") in ("on-failure", "always", "unless-stopped"), name
    assert "restart" not in ours["trainer"]
    # ... but every `up` starts it again: it must leave an exported model in place.
    assert "--unless-exported" in ours["trainer"]["command"]


def test_the_broker_keeps_its_topics_on_the_volume() -> None:
    """The apache/kafka image logs to /tmp unless told otherwise: a recreated container would
    lose every topic, the compacted catalogue and candidates included."""
    kafka = yaml.safe_load(COMPOSE.read_text())["services"]["kafka"]
    mounts = {volume.split(":")[1] for volume in kafka["volumes"]}
    assert kafka["environment"]["KAFKA_LOG_DIRS"] in mounts


def test_the_server_can_be_scaled() -> None:
    """`--scale server=N` (README): a fixed host port could be bound by one replica only."""
    (port,) = yaml.safe_load(COMPOSE.read_text())["services"]["server"]["ports"]
    host, container = port.rsplit(":", 1)
    assert container == "50051" and "-" in host, port


def test_the_qdrant_server_is_the_minor_version_of_the_pinned_client() -> None:
    """qdrant-client supports servers of its own minor version (it warns past one minor): a
    client upgrade without the image, or the reverse, shows here and not in production."""
    import re
    import tomllib

    image = yaml.safe_load(COMPOSE.read_text())["services"]["qdrant"]["image"]
    deps = tomllib.loads((COMPOSE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (client,) = [d for d in deps if d.startswith("qdrant-client==")]
    server_minor = re.fullmatch(r"qdrant/qdrant:v(\d+\.\d+)\.\d+", image)
    assert server_minor, image
    assert client.removeprefix("qdrant-client==").rsplit(".", 1)[0] == server_minor.group(1), (image, client)


def test_the_unauthenticated_stores_are_published_on_loopback_only_by_default() -> None:
    """Qdrant (no API key) and Kafka's host listener (no authentication) were published on every
    interface: anyone reaching the host could delete the catalogue."""
    import re

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("kafka", "qdrant"):
        for port in services[name]["ports"]:
            published = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", port)  # the defaults compose fills in
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port}"
