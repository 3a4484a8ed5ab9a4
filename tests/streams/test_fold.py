"""The sequence fold, without a broker: order, bounds, duplicates, lateness, replay safety."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from recsys.settings import Settings
from streams.errors import TooLate
from streams.schema import ActionEvent
from streams.sequences import (
    Hidden,
    Outcome,
    PackedSeq,
    SeqEvent,
    UserState,
    decode_state,
    encode_state,
    fold_event,
    fold_hidden,
    order_key,
    user_update,
)

S = Settings(streams={"max_sequence_len": 5, "max_age_ms": 10_000, "lateness_ms": 1_000},
             events={"max_future_ms": 1_000})
T0 = 1_700_000_000_000


def ev(ts: int, item: int | str = 1, action: str = "click", surface: str = "home") -> ActionEvent:
    return ActionEvent(user_id="u", item_id=item, action=action, surface=surface, ts=T0 + ts)


def fold_all(events: Iterable[ActionEvent], settings: Settings = S) -> tuple[SeqEvent, ...]:
    seq: tuple[SeqEvent, ...] = ()
    for e in events:
        seq = fold_event(seq, e, settings).seq
    return seq


def ts_of(seq: tuple[SeqEvent, ...]) -> list[int]:
    return [e.ts - T0 for e in seq]


def test_in_order_events_are_appended_and_only_the_last_n_kept() -> None:
    seq = fold_all(ev(i * 10, item=i) for i in range(8))
    assert ts_of(seq) == [30, 40, 50, 60, 70]
    assert [e.item_id for e in seq] == [3, 4, 5, 6, 7]


def test_out_of_order_events_within_lateness_are_inserted_in_order() -> None:
    seq = fold_all([ev(100, 1), ev(900, 2), ev(300, 3), ev(500, 4), ev(0, 5)])
    assert ts_of(seq) == [0, 100, 300, 500, 900]


def test_exact_duplicate_is_dropped_and_the_same_sequence_returned() -> None:
    seq = fold_all([ev(0), ev(10)])
    folded = fold_event(seq, ev(0), S)
    assert folded.outcome is Outcome.DUPLICATE and folded.seq is seq
    # Same time, other item / action / surface: not a duplicate.
    for other in (ev(0, item=2), ev(0, action="save"), ev(0, surface="search")):
        assert fold_event(seq, other, S).outcome is Outcome.APPLIED


def test_ids_compare_as_strings() -> None:
    seq = fold_all([ev(0, item=5)])
    assert fold_event(seq, ev(0, item="5"), S).outcome is Outcome.DUPLICATE


def test_event_beyond_lateness_that_would_enter_is_too_late() -> None:
    seq = fold_all([ev(0), ev(5_000)])
    with pytest.raises(TooLate) as info:
        fold_event(seq, ev(3_999, item=9), S)
    assert info.value.reason == "too late"
    assert fold_event(seq, ev(4_000, item=9), S).outcome is Outcome.APPLIED  # exactly at the bound


def test_event_that_would_fall_off_at_once_is_stale_not_too_late() -> None:
    full = fold_all(ev(5_000 + i, item=i) for i in range(5))
    folded = fold_event(full, ev(1_000, item=99), S)  # older than all of a full sequence
    assert folded.outcome is Outcome.STALE and folded.seq is full
    beyond_age = fold_all([ev(20_000)])
    assert fold_event(beyond_age, ev(5_000), S).outcome is Outcome.STALE


def test_age_bound_drops_events_older_than_max_age_behind_the_newest() -> None:
    seq = fold_all([ev(0, 1), ev(500, 2), ev(10_600, 3)])
    assert ts_of(seq) == [10_600]  # 0 and 500 are more than 10 s behind 10_600
    seq = fold_all([ev(0, 1), ev(600, 2), ev(10_600, 3)])
    assert ts_of(seq) == [600, 10_600]  # exactly max_age behind is kept


def test_equal_timestamps_have_a_total_order_independent_of_arrival() -> None:
    a = fold_all([ev(0, "b"), ev(0, "a"), ev(0, "a", "save")])
    b = fold_all([ev(0, "a", "save"), ev(0, "b"), ev(0, "a")])
    assert a == b == tuple(sorted(a, key=order_key))


def test_state_and_update_wire_forms() -> None:
    state = UserState("u", 3, fold_all([ev(0, 1), ev(10, "x", "save", "search")]))
    assert decode_state(encode_state(state)) == state
    update = user_update(state, last_event_ts=T0 + 10, emitted_at=T0 + 20)
    assert update == {
        "user_id": "u",
        "version": 3,
        "events": [
            {"item_id": 1, "action": "click", "surface": "home", "ts": T0},
            {"item_id": "x", "action": "save", "surface": "search", "ts": T0 + 10},
        ],
        "last_event_ts": T0 + 10,
        "emitted_at": T0 + 20,
        "hidden": [],
    }


def test_a_hidden_item_stays_hidden_after_the_hide_leaves_the_sequence() -> None:
    """Kept once per item at its newest hide, the newest max_hidden, with no age bound: a hide
    must keep the item out of the user's candidates for good, not for 50 events."""
    settings = Settings(streams={"max_sequence_len": 3, "max_hidden": 2})
    packed = PackedSeq("u", 0, [], [], b"")
    for e in [ev(0, "a", "hide"), ev(1, 7, "hide"), ev(2, "a", "hide"), ev(3, "x"), ev(4, "y"), ev(5, "z")]:
        packed.fold(e, settings)
    assert [e.item_id for e in packed.events()] == ["x", "y", "z"]  # every hide has left the sequence
    assert packed.hidden == ((T0 + 1, 7), (T0 + 2, "a"))
    packed.fold(ev(6, "b", "hide"), settings)
    assert packed.hidden == ((T0 + 2, "a"), (T0 + 6, "b"))  # 7, the oldest hide, makes room
    update = msgpack.unpackb(packed.update(last_event_ts=1, emitted_at=2), raw=False)
    assert update["hidden"] == ["a", "b"]
    assert decode_state(packed.encode()).hidden == ((T0 + 2, "a"), (T0 + 6, "b"))
    # A hide too late for the sequence is dead-lettered there but still taken: hides are a set.
    late = Settings(streams={"max_sequence_len": 3, "max_hidden": 2, "lateness_ms": 1}, events={"max_future_ms": 1})
    with pytest.raises(TooLate):
        packed.fold(ev(4, "zz", "hide"), late)  # would enter the sequence, 2 ms behind its newest
    assert packed.hidden == ((T0 + 4, "zz"), (T0 + 6, "b"))
    # Lowering max_hidden takes effect at the next hide.
    packed.fold(ev(7, "d", "hide"), Settings(streams={"max_hidden": 1}))
    assert packed.hidden == ((T0 + 7, "d"),)
    # The table value written before hides were kept is still read: nobody hidden.
    older = msgpack.packb({"user_id": "u", "version": 1, "ts": [], "sizes": [], "events": b""})
    assert PackedSeq.decode(older).hidden == ()


# Events of one user: small ranges so that duplicates and equal timestamps are common.
events = st.lists(
    st.builds(ev, st.integers(0, 3_000), st.integers(0, 6), st.sampled_from(["click", "save"])), max_size=40
)


def hidden_reference(evs: list[ActionEvent], settings: Settings) -> Hidden:
    """The newest max_hidden distinct hidden items, each at its newest hide."""
    newest: dict[str, tuple[int, Any]] = {}
    for e in evs:
        if e.action in settings.train.negative_actions and e.ts > newest.get(str(e.item_id), (-1, None))[0]:
            newest[str(e.item_id)] = (e.ts, e.item_id)
    return tuple(sorted(newest.values(), key=lambda h: (h[0], str(h[1])))[-settings.streams.max_hidden:])


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.builds(ev, st.integers(0, 3_000), st.integers(0, 9), st.sampled_from(["click", "hide"])), max_size=40),
       st.randoms(use_true_random=False))
def test_the_hidden_items_do_not_depend_on_arrival_order_or_replays(evs: list[ActionEvent], rnd) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(streams={"max_hidden": 3})
    shuffled = evs + evs[: len(evs) // 2]  # and a replay of the first half
    rnd.shuffle(shuffled)
    folded: Hidden = ()
    for e in shuffled:
        folded = fold_hidden(folded, e, settings)
    assert folded == hidden_reference(evs, settings)


def reference(evs: list[ActionEvent], settings: Settings) -> tuple[SeqEvent, ...]:
    """What the fold must keep when nothing is too late: the last N distinct events by the total order."""
    distinct = sorted({order_key(s): s for s in (SeqEvent(e.ts, e.item_id, e.action, e.surface) for e in evs)}.values(), key=order_key)
    if not distinct:
        return ()
    cutoff = distinct[-1].ts - settings.streams.max_age_ms
    return tuple([e for e in distinct if e.ts >= cutoff][-settings.streams.max_sequence_len :])


@hsettings(max_examples=300, deadline=None)
@given(events, st.randoms(use_true_random=False))
def test_without_late_events_the_result_does_not_depend_on_arrival_order(evs: list[ActionEvent], rnd) -> None:  # type: ignore[no-untyped-def]
    lenient = Settings(streams={"max_sequence_len": 5, "max_age_ms": 2_000, "lateness_ms": 10**9})
    shuffled = list(evs)
    rnd.shuffle(shuffled)
    assert fold_all(evs, lenient) == fold_all(shuffled, lenient) == reference(evs, lenient)


@hsettings(max_examples=300, deadline=None)
@given(events, st.data())
def test_replaying_from_an_earlier_offset_changes_nothing_and_dead_letters_nothing_new(evs, data) -> None:  # type: ignore[no-untyped-def]
    """A crash: the state after event k is recovered, events from an earlier offset j <= k are
    re-delivered. The result equals the uninterrupted run, and an event accepted the first
    time is never rejected the second time."""
    k = data.draw(st.integers(0, len(evs)))
    j = data.draw(st.integers(0, k))
    seq: tuple[SeqEvent, ...] = ()
    accepted_at: set[int] = set()
    for i, e in enumerate(evs[:k]):
        try:
            seq = fold_event(seq, e, S).seq
            accepted_at.add(i)
        except TooLate:
            pass
    uninterrupted = seq
    for e in evs[k:]:
        try:
            uninterrupted = fold_event(uninterrupted, e, S).seq
        except TooLate:
            pass
    replayed = seq
    for i, e in enumerate(evs[j:], start=j):
        try:
            replayed = fold_event(replayed, e, S).seq
        except TooLate:
            assert i not in accepted_at, "a re-delivered, once accepted event was dead-lettered"
    assert replayed == uninterrupted


# ---------------------------------------------------------------- PackedSeq: the worker's form


def test_packed_update_is_the_contract_update_byte_for_byte() -> None:
    state = UserState(42, 7, fold_all([ev(0, 1), ev(10, "x", "save", "search"), ev(20, 3)]))
    packed = PackedSeq.decode(encode_state(state))
    assert packed.update(last_event_ts=T0 + 20, emitted_at=T0 + 30) == msgpack.packb(
        user_update(state, last_event_ts=T0 + 20, emitted_at=T0 + 30)
    )


def test_the_earlier_table_form_is_still_read() -> None:
    seq = fold_all([ev(0, 1), ev(10, "x", "save", "search")])
    earlier = msgpack.packb({"user_id": "u", "version": 3, "events": [list(e) for e in seq]})
    assert decode_state(earlier) == UserState("u", 3, seq)


# Sequences long enough (17 > 15 entries) to cross msgpack's short-array header.
long_settings = Settings(streams={"max_sequence_len": 17, "max_age_ms": 2_500, "lateness_ms": 800},
                         events={"max_future_ms": 800})


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.builds(ev, st.integers(0, 3_000), st.integers(0, 6) | st.text(max_size=3),
                          st.sampled_from(["click", "save", "hide"]), st.sampled_from(["home", "search"])), max_size=60),
       st.sampled_from([S, long_settings]))  # fmt: skip
def test_packed_fold_matches_the_reference_fold(evs: list[ActionEvent], settings: Settings) -> None:
    """Same outcome, same TooLate, same sequence and hidden items, same table and update bytes,
    event by event."""
    seq: tuple[SeqEvent, ...] = ()
    hidden: Hidden = ()
    packed = PackedSeq("u", 0, [], [], b"")
    for e in evs:
        hidden = fold_hidden(hidden, e, settings)  # taken even when the sequence refuses the event
        try:
            want = fold_event(seq, e, settings)
        except TooLate:
            with pytest.raises(TooLate):
                packed.fold(e, settings)
            assert packed.hidden == hidden
            continue
        assert packed.fold(e, settings) is want.outcome
        seq = want.seq
        assert packed.events() == seq and packed.ts == [x.ts for x in seq] and packed.hidden == hidden
    state = UserState("u", 0, seq, hidden)
    assert packed.encode() == encode_state(state) and decode_state(packed.encode()) == state
    assert packed.update(last_event_ts=1, emitted_at=2) == msgpack.packb(user_update(state, last_event_ts=1, emitted_at=2))


def test_values_of_another_shape_are_refused_where_the_state_is_read() -> None:
    """`PackedSeq.decode` refuses what the fold would trip over later (the worker then starts
    the user afresh: streams.app.read_state), and reads its own values back."""
    now = 1_800_000_000_000
    wire = PackedSeq.of("u", now, [SeqEvent(now, "i", "click", "home")]).wire
    good = msgpack.unpackb(PackedSeq("u", now, [], [], b"").encode(), raw=False) | {"ts": [now], "sizes": [len(wire)],
                                                                                   "events": wire}
    assert PackedSeq.decode(msgpack.packb(good)).ts == [now]
    # ... and bytes that are not ours, which the fold's fast path copied into every update unread
    for bad in ({"ts": 5}, {"version": "7"}, {"sizes": [2, 1]}, {"ts": ["x"]}, {"sizes": ["3"]},
                {"sizes": [3], "events": b"abc"}, {"events": wire + b"x"}, {"ts": [now + 1]}):
        with pytest.raises((TypeError, ValueError)):
            PackedSeq.decode(msgpack.packb(good | bad))
    # The earlier form (events as a list), checked whole: these read fine and failed the fold.
    earlier = {"user_id": "u", "version": now, "events": [[now, "i", "click", "home"]]}
    assert PackedSeq.decode(msgpack.packb(earlier)).ts == [now]
    for bad in ({"version": "x"}, {"version": float("inf")}, {"events": [[None, "i", "click", "home"]]},
                {"events": [[now, "i", "click"]]}, {"events": [[now, 1.5, "click", "home"]]}):
        with pytest.raises((TypeError, ValueError)):
            PackedSeq.decode(msgpack.packb(earlier | bad))


def test_an_older_entry_the_fold_trips_over_starts_the_user_afresh() -> None:
    """`decode` checks a value's newest entries only: an older one that is not ours failed the
    fold, and the window, at every restart."""
    from streams.app import Counters, fold_or_start_afresh

    now, settings = 1_800_000_000_000, Settings()
    hidden = [[now - 5, "x1"], [now - 4, "x2"]]
    newest = PackedSeq.of("u", now, [SeqEvent(now, "j", "click", "home")]).wire
    stored = PackedSeq.decode(msgpack.packb({"user_id": "u", "version": now, "ts": [None, now], "sizes": [3, len(newest)],
                                             "events": b"abc" + newest, "hidden": hidden}))
    counters = Counters()
    seq, outcome = fold_or_start_afresh(stored, ActionEvent("u", "i", "click", "home", now + 1), settings, counters)
    assert outcome is Outcome.APPLIED and seq.events() == (SeqEvent(now + 1, "i", "click", "home"),)
    assert counters.unreadable == 1
    assert seq.hidden == ((now - 5, "x1"), (now - 4, "x2")) and seq.version == now  # the events start afresh, not the hides
    # Events of another release's shape (maps without `item_id`), read only out of order: a
    # KeyError, which failed the window as before.
    foreign = msgpack.packb({"item": "i", "ts": now, "action": "click", "surface": "home"})
    stored = PackedSeq.decode(msgpack.packb({"user_id": "u", "version": now, "ts": [now], "sizes": [len(foreign)],
                                             "events": foreign}))
    seq, outcome = fold_or_start_afresh(stored, ActionEvent("u", "j", "click", "home", now - 1), settings, counters)
    assert outcome is Outcome.APPLIED and counters.unreadable == 2


def test_hidden_items_not_ours_start_the_user_afresh_too() -> None:
    """`decode` takes any pair as a hide; the next hide's fold compared them and failed the window."""
    from streams.app import Counters, fold_or_start_afresh

    now, settings = 1_800_000_000_000, Settings()
    counters = Counters()
    for hidden in ([[None, "x"]], ["ab"]):
        stored = PackedSeq.decode(msgpack.packb({"user_id": "u", "version": now, "ts": [], "sizes": [], "events": b"",
                                                 "hidden": hidden}))
        seq, outcome = fold_or_start_afresh(stored, ActionEvent("u", "i", "hide", "home", now + 1), settings, counters)
        assert outcome is Outcome.APPLIED and seq.hidden == ((now + 1, "i"),)
    assert counters.unreadable == 2


def test_a_fold_failing_on_a_value_that_is_ours_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a value that fails the whole check starts afresh: a defect in the fold must not wipe
    every user it meets while the worker looks healthy."""
    from streams.app import Counters, fold_or_start_afresh

    now, settings = 1_800_000_000_000, Settings()
    good = PackedSeq.of("u", now, [SeqEvent(now, "i", "click", "home")])
    assert good.malformed() is None

    def broken(*args: Any) -> Any:
        raise TypeError("a defect")
    monkeypatch.setattr(PackedSeq, "_fold_sequence", broken)
    with pytest.raises(TypeError, match="a defect"):
        fold_or_start_afresh(good, ActionEvent("u", "j", "click", "home", now - 1), settings, Counters())
