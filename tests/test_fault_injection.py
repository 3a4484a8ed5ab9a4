"""Crashes under load, short form (the long form: `python -m benchmarks.reliability`).

The whole system as real processes with its own broker takes a steady stream of actions
while the Faust worker, the inference worker and the gRPC server are each SIGKILLed and
restarted, and the broker is restarted. The final state must equal what an uninterrupted run
ends in (recsys/faults.py: every user's sequence, every user's served source_event_ts on
every surface): no event and no update lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from recsys.faults import FaultNotInjected, FaultRun, make_events

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]


def test_crashing_every_process_and_restarting_the_broker_under_load_loses_nothing(
    small_model_dir: Path, tmp_path: Path
) -> None:
    run = FaultRun(
        tmp_path / "run", small_model_dir,
        faults=["kill:streams", "kill:worker", "kill:serve", "restart:broker"],
        users=50, events_per_s=50, seconds=12, downtime_s=0.5, converge_timeout_s=120,
    )
    report = run.run()
    assert [f["fault"] for f in report.faults_injected] == ["kill:streams", "kill:worker", "kill:serve", "restart:broker"]
    assert report.events_acked == report.events_sent, report
    # As JSON: pytest cuts a dict's repr short, and which events went missing (their ts: before
    # or after which fault) is what a failure needs to be understood.
    assert report.events_lost == 0, json.dumps(report.details)
    assert report.updates_lost == 0, json.dumps(report.details)
    assert report.converged_s is not None


class _Unkillable:
    def kill(self) -> None:
        raise ProcessLookupError("no such process")


def test_a_fault_that_cannot_be_applied_fails_the_run_instead_of_being_reported_as_injected(
    kafka_bootstrap: str, unique: str, tmp_path: Path
) -> None:
    # The stack stands in for LocalStack's process handling only; the load goes to the real broker.
    stack = SimpleNamespace(bootstrap=kafka_bootstrap, overrides={"topics.actions": f"actions-{unique}"},
                            services={"worker": _Unkillable()})
    run = FaultRun(tmp_path, tmp_path, faults=["kill:worker"], events_per_s=50, seconds=0.5, downtime_s=0.0)
    events = make_events(20, 5, ["i1", "i2"], seed=0, start_ts=1_700_000_000_000)
    with pytest.raises(FaultNotInjected, match="ProcessLookupError: no such process"):
        run._send_with_faults(stack, events)
