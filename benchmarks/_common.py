"""Helpers shared by the model benchmarks: provenance (command, git commit) and JSON output."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "inference", "benchmarks"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def write_result(name: str, metrics: dict[str, Any], path: Path | None = None) -> Path:
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {**metrics, "command": command(), "git_commit": git_commit()}
    path.write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
    return path
