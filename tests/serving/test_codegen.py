"""The committed stubs in serving/_proto/ are exactly what serving/codegen.py makes now."""

from __future__ import annotations

from serving import codegen


def test_committed_stubs_are_up_to_date() -> None:
    ok, diffs = codegen.is_up_to_date()
    assert ok, f"stale or missing generated files {diffs}: run `python -m serving.codegen`"


def test_generated_service_keeps_its_proto_package() -> None:
    from serving._proto import candidates_pb2

    # reflection and ghz find the service by this name and file
    assert candidates_pb2.DESCRIPTOR.name == "recsys/v1/candidates.proto"
    assert candidates_pb2.DESCRIPTOR.services_by_name["Candidates"].full_name == "recsys.v1.Candidates"
