"""Window recall per user and the paired bootstrap gap the multi-token benchmark reports."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.evaluate import paired_gap, per_user_window_recall, window_recall


def test_per_user_recall_is_the_share_of_the_window_in_the_list_and_nan_without_a_window() -> None:
    lists = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6])]
    future = [np.array([2, 9]), np.array([], dtype=np.int64), np.array([6])]
    got = per_user_window_recall(lists, future)
    assert got[0] == 0.5 and np.isnan(got[1]) and got[2] == 1.0
    assert window_recall(lists, future) == 0.75  # the user without a window does not count
    assert window_recall(lists[1:2], future[1:2]) == 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=200), st.floats(-0.5, 0.5))
def test_a_constant_shift_is_the_gap_with_no_spread(base: list[float], shift: float) -> None:
    b = np.array(base)
    gap, lo, hi = paired_gap(b + shift, b, n_boot=200)
    assert gap == pytest.approx(shift, abs=1e-9)
    assert lo == pytest.approx(shift, abs=1e-9) and hi == pytest.approx(shift, abs=1e-9)


def test_the_interval_separates_a_planted_gain_from_noise_that_averages_out() -> None:
    rng = np.random.default_rng(7)
    b = rng.uniform(0, 1, 900)  # users differ much more than the models do
    noise = rng.uniform(0, 0.2, 450)
    even = b + np.concatenate([noise, -noise])  # differences symmetric around 0: no gain
    gap, lo, hi = paired_gap(even, b)
    assert gap == pytest.approx(0.0, abs=1e-12) and lo < 0 < hi
    better = b + 0.02 + np.concatenate([noise, -noise])  # +0.02 for everyone, same noise
    gap, lo, hi = paired_gap(better, b)
    assert gap == pytest.approx(0.02) and 0 < lo < gap < hi


def test_users_either_model_cannot_score_are_left_out_of_the_gap() -> None:
    a = np.array([0.5, np.nan, 1.0])
    b = np.array([0.25, 0.5, np.nan])
    assert paired_gap(a, b)[0] == 0.25
    assert all(np.isnan(paired_gap(np.array([np.nan]), np.array([0.1]))))  # nothing measured, not a gap of 0
    with pytest.raises(ValueError, match="one shape"):
        paired_gap(np.array([0.5]), np.array([0.1, 0.2]))
