"""Writing a benchmark's result: a flat metric -> number object plus how it was produced.

Every script calls `write_result(name, metrics)`; the JSON lands in benchmarks/results/ with
the exact command line, the git commit, the machine and the time, so BENCHMARKS.md can quote
each figure with the command that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "cpu_snapshot", "cpu_window", "git_commit", "py_spy", "write_result"]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS_DIR.parent, check=True).stdout.strip()
        # results/ itself does not count: a run writes its PNG before its JSON, and a series of
        # runs rewrites the results of the ones before.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)benchmarks/results"], capture_output=True,
                               text=True, cwd=RESULTS_DIR.parent).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def py_spy() -> str:
    """The py-spy executable of the dev extra. Installed by scripts/bootstrap.sh into the shared
    base environment, so neither PATH nor the clone's .venv/bin has it: found from its package."""
    import importlib.metadata
    import shutil

    try:
        files = importlib.metadata.distribution("py-spy").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "py-spy" and (path := Path(str(f.locate())).resolve()).exists():
            return str(path)
    if found := shutil.which("py-spy"):
        return found
    raise SystemExit("py-spy not found: install the dev extra (scripts/bootstrap.sh does)")


def cpu_snapshot() -> list[int]:
    """The machine's CPU time counters (/proc/stat, all cores; empty where there is none)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return []


def cpu_window(before: list[int], after: list[int]) -> dict[str, float]:
    """Share of the machine's CPU time between two snapshots spent busy (user, nice, system,
    irq, softirq) and stolen by the hypervisor for other guests (steal): on this shared VM a
    latency figure means little without the CPU it actually got."""
    if len(before) < 8 or len(after) < 8:
        return {}
    d = [b - a for a, b in zip(before, after)]
    total = sum(d[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    if total <= 0:
        return {}
    busy = d[0] + d[1] + d[2] + d[5] + d[6]
    return {"cpu_busy_pct": round(100 * busy / total, 1), "cpu_steal_pct": round(100 * d[7] / total, 1)}


def write_result(name: str, metrics: dict[str, Any], *, command: str | None = None) -> Path:
    """Write benchmarks/results/<name>.json and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        **metrics,
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


# What a benchmark's trained model depends on besides its recipe: a model cached by an older
# version of these is trained again, not measured as if it were today's.
MODEL_CODE = ("inference/model.py", "inference/train.py", "inference/export.py", "inference/data.py",
              "inference/items.py")


def reusable_model(model_dir: Path, recipe: dict[str, Any]) -> bool:
    """True when ``model_dir`` holds an exported model made from ``recipe`` (the settings and
    arguments it was trained with) by today's model code; otherwise clears it for a new one and
    records the fingerprint the new one will be made under."""
    import hashlib
    import shutil

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for name in MODEL_CODE:
        digest.update((root / name).read_bytes())
    mark = model_dir / "bench_fingerprint.txt"
    if (model_dir / "meta.json").exists() and mark.exists() and mark.read_text() == digest.hexdigest():
        return True
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    mark.write_text(digest.hexdigest())
    return False
