"""Run the system's services as real processes (`python -m recsys <command>`).

The demo, the end-to-end tests and the benchmarks start the same entry points that
docker-compose.yml runs, each in its own process with its settings passed as `RECSYS_*`
environment variables, its output in a log file, and a clean SIGTERM (or a SIGKILL, to test
crash recovery) to stop it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

__all__ = ["Service", "settings_env"]


def settings_env(overrides: Mapping[str, object]) -> dict[str, str]:
    """`{"kafka.bootstrap_servers": "h:1"}` -> `{"RECSYS_KAFKA__BOOTSTRAP_SERVERS": "h:1"}`;
    lists and dicts as JSON, which pydantic-settings parses."""
    import json

    env: dict[str, str] = {}
    for key, value in overrides.items():
        section, field = key.split(".", 1)
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        env[f"RECSYS_{section.upper()}__{field.upper()}"] = text
    return env


class Service:
    """One `recsys <command>` process with its own log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str | None], log_dir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.args = args
        # On top of this process's environment; a variable given as None is left out.
        merged = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.log_path = Path(log_dir) / f"{name}.log"
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recsys", *self.args], env=self.env, stdout=log,
            stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True,
        )
        log.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``ready`` until it is true; fail with the log tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited ({self.proc and self.proc.returncode}) before {what}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - readiness probes fail until the service is up
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {what} within {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int | None:
        """SIGKILL: the crash the system must survive."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
