"""Hostile events, the short form run by the test suite (the long one: `scripts/fuzz_events.py
--seconds 600`): every hostile payload is rejected with its reason, hypothesis and a few
seconds of atheris check the fuzzer's invariants, and the fuzzer does report a planted bug.

The invariants (no exception but `InvalidEvent`, a reason for every rejection, the DLQ record,
size and nesting bounds, the worker's fold equal to the reference fold) live in one place,
`check_input` of scripts/fuzz_events.py; the real-broker counterpart, the same payloads
through a running worker into the DLQ, is in tests/streams/test_streams_worker.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from recsys.dead_letters import dlq_record
from streams.errors import REASONS, InvalidEvent
from streams.schema import decode_event

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "fuzz_events.py"
_spec = importlib.util.spec_from_file_location("fuzz_events", SCRIPT)
assert _spec is not None and _spec.loader is not None
fuzz: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

HOSTILE = fuzz.hostile_payloads(fuzz.SETTINGS, fuzz.NOW)
VALID = fuzz.valid_events(fuzz.NOW)


@pytest.mark.parametrize(("raw", "reason"), [(raw, reason) for _, raw, reason in HOSTILE], ids=[k for k, _, _ in HOSTILE])
def test_every_hostile_payload_is_rejected_with_its_reason_and_dead_lettered_whole(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw, fuzz.SETTINGS, now=fuzz.NOW)
    assert info.value.reason == reason and reason in REASONS
    cut = fuzz.SETTINGS.streams.dlq_max_original_bytes
    record = msgpack.unpackb(
        dlq_record(info.value, original=raw, topic="actions", partition=3, offset=9, max_original=cut), raw=False
    )
    assert record["reason"] == reason and record["detail"] == info.value.detail
    assert record["original"] == (raw or b"")[:cut] and record["original_size"] == len(raw or b"")


def test_the_hostile_set_covers_every_decoder_reason() -> None:
    # "wrong key" and "too late" need the Kafka key / the user's sequence: the worker test.
    assert {reason for _, _, reason in HOSTILE} == set(REASONS) - {"wrong key", "too late"}


def _splice(args: tuple[bytes, int, bytes, int]) -> bytes:
    base, at, insert, cut = args
    at %= len(base) + 1
    return base[:at] + insert + base[at + cut :]


_seeds = [raw for _, raw, _ in HOSTILE if raw is not None] + VALID
_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
_value = st.recursive(_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=12)
_map = st.fixed_dictionaries(
    {"user_id": st.integers(0, 5) | st.sampled_from(["u1", "u2"]), "action": st.sampled_from(["click", "save", "buy"]),
     "surface": st.sampled_from(["home", "search", "tv"]), "item_id": st.integers(0, 4) | _value,
     "ts": st.integers(fuzz.NOW - 20_000, fuzz.NOW + 400_000) | _value},
    optional={"query": _value, "dwell_ms": st.integers(-3, 5) | _value, "extra": _value},
)  # fmt: skip
raw_values = st.one_of(
    st.binary(max_size=400),
    st.sampled_from(_seeds),
    st.tuples(st.sampled_from(_seeds), st.integers(0, 5_000), st.binary(max_size=6), st.integers(0, 6)).map(_splice),
    _map.map(lambda m: msgpack.packb(m, use_bin_type=True)),
)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(raw_values, max_size=12))
def test_generated_hostile_streams_keep_every_fuzzer_invariant(values: list[bytes]) -> None:
    fuzz.check_input(fuzz.frame(values))


def _fuzz(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--artifacts", str(tmp_path / "findings"), *args],
        cwd=tmp_path, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=240, check=False,
    )  # fmt: skip


def test_a_short_reproducible_atheris_run_finds_nothing(tmp_path: Path) -> None:
    proc = _fuzz(tmp_path, "--runs", "20000", "--seed", "1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Done 20000 runs" in proc.stdout
    assert not list((tmp_path / "findings").glob("*")), "the fuzzer wrote findings"


def test_the_fuzzer_reports_a_planted_bug_as_a_finding(tmp_path: Path) -> None:
    # A decoder that raises something other than InvalidEvent for a seed input: the fuzzer
    # must exit non-zero and leave the input behind (a harness that swallowed it would not).
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import streams.schema as s\n"
        "_decode = s.decode_event\n"
        "def decode_event(raw, settings, *, now=None):\n"
        "    if raw and b'related' in raw:\n"
        "        raise KeyError('planted')\n"
        "    return _decode(raw, settings, now=now)\n"
        "s.decode_event = decode_event\n"
    )
    proc = _fuzz(tmp_path, "--runs", "2000", "--seed", "1", env={"PYTHONPATH": f"{plant}{os.pathsep}{ROOT}"})
    assert proc.returncode != 0 and "KeyError: 'planted'" in proc.stdout
    findings = list((tmp_path / "findings").glob("crash-*"))
    assert findings
    replay = subprocess.run([sys.executable, str(SCRIPT), str(findings[0])], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": f"{plant}{os.pathsep}{ROOT}"}, timeout=120)  # fmt: skip
    assert replay.returncode != 0 and "KeyError: 'planted'" in replay.stderr
