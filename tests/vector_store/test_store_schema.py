"""Item ids -> Qdrant point ids: stable, int-compatible, collision-free in practice."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vector_store.schema import ItemRecord, from_payload, normalise, point_id, to_payload


def test_point_ids() -> None:
    assert point_id(0) == 0
    assert point_id(42) == 42 == point_id("42")  # the wire's str key is the same item
    assert isinstance(point_id("042"), uuid.UUID)  # not the same as 42
    assert isinstance(point_id(-1), uuid.UUID) and point_id(-1) == point_id("-1")
    assert isinstance(point_id(2**64), uuid.UUID)  # beyond Qdrant's integer ids
    assert point_id("abc") == point_id("abc") != point_id("abd")
    assert isinstance(point_id("٣"), uuid.UUID)  # a non-ASCII digit is text, not 3
    with pytest.raises(TypeError):
        point_id(True)
    with pytest.raises(TypeError):
        point_id(1.5)  # type: ignore[arg-type]


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_int_and_its_text_are_one_item(i: int) -> None:
    assert point_id(i) == point_id(str(i))


@given(st.lists(st.one_of(st.integers(), st.text(min_size=1)), unique_by=str, max_size=50))
def test_distinct_ids_get_distinct_points(ids: list[int | str]) -> None:
    assert len({point_id(i) for i in ids}) == len(ids)


def test_payload_round_trip_and_normalise() -> None:
    rec = ItemRecord("x", ("home", "search"), 123, 0.25)
    assert from_payload(to_payload(rec)) == rec
    x = normalise(np.array([[3, 4], [0, 0]], np.float64))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.6, 0.8], [0, 0]])


def test_huge_int_ids_are_stored_as_text() -> None:
    from vector_store.schema import payload_item_id

    assert payload_item_id(2**63 - 1) == 2**63 - 1
    assert payload_item_id(2**64) == str(2**64)
    assert point_id(payload_item_id(2**64)) == point_id(2**64)
    assert payload_item_id(-(2**63) - 1) == str(-(2**63) - 1)
