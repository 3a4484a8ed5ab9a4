"""The synthetic generator and the file readers of `recsys produce` (no broker needed)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from recsys.settings import Settings
from streams.produce import to_record, read_events
from streams.schema import ActionEvent, decode_event, now_ms
from streams.synthetic import item_cluster, synthetic_events, user_interests

S = Settings()


def test_synthetic_events_are_valid_deterministic_and_time_ordered() -> None:
    a = list(synthetic_events(2_000, 50, 300, seed=3, start_ts_ms=1_700_000_000_000))
    b = list(synthetic_events(2_000, 50, 300, seed=3, start_ts_ms=1_700_000_000_000))
    assert a == b
    assert a != list(synthetic_events(2_000, 50, 300, seed=4, start_ts_ms=1_700_000_000_000))
    assert all(x.ts < y.ts for x, y in zip(a, a[1:], strict=False))
    for e in a:
        assert decode_event(to_record(e)[1], S, now=a[-1].ts) == e
    assert {e.surface for e in a} == set(S.events.surfaces)
    assert {e.action for e in a} == set(S.events.actions)
    assert all(e.query for e in a if e.surface == "search")


def test_synthetic_default_times_end_now_and_pass_validation() -> None:
    events = list(synthetic_events(100, 5, 20))
    assert abs(events[-1].ts - now_ms()) < 60_000
    for e in events:
        decode_event(to_record(e)[1], S)


def test_synthetic_users_mostly_act_on_their_planted_interests() -> None:
    events = list(synthetic_events(5_000, 100, 800, seed=1, noise=0.1, n_clusters=8))
    on = Counter(item_cluster(int(e.item_id), 8) in user_interests(int(e.user_id), n_clusters=8, seed=1) for e in events)
    assert on[True] / len(events) > 0.85
    # Saves concentrate on interests far more than hides do.
    saves = [e for e in events if e.action == "save"]
    hides = [e for e in events if e.action == "hide"]
    share = lambda es: sum(item_cluster(int(e.item_id), 8) in user_interests(int(e.user_id), n_clusters=8, seed=1) for e in es) / len(es)  # noqa: E731
    assert share(saves) > share(hides) + 0.2


def test_user_prefix_namespaces_users() -> None:
    assert all(str(e.user_id).startswith("t-") for e in synthetic_events(50, 5, 20, user_prefix="t-"))


def test_movielens_ratings_become_saves_and_clicks_in_time_order(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n244\t51\t5\t880606923\n")
    events = list(read_events(path))
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    assert events[0] == ActionEvent(22, 377, "click", "home", 878_887_116_000)
    assert events[1] == ActionEvent(244, 51, "save", "home", 880_606_923_000)
    for e in events:
        decode_event(to_record(e)[1], S)  # MovieLens dates (1997) are valid event times


def test_jsonl_and_csv_are_read_as_event_maps(tmp_path: Path) -> None:
    good = {"user_id": 1, "item_id": "a", "action": "click", "surface": "home", "ts": 1_700_000_000_000}
    jsonl = tmp_path / "events.jsonl"
    jsonl.write_text(json.dumps(good) + "\n\nnot json\n[1]\n" + json.dumps({**good, "user_id": "x"}) + "\n")
    assert list(read_events(jsonl)) == [good, {**good, "user_id": "x"}]

    csv_path = tmp_path / "events.csv"
    csv_path.write_text("user_id,item_id,action,surface,ts,query\n1,a,click,home,1700000000000,\n2,17,save,search,1700000000001,hats\n")
    rows = list(read_events(csv_path))
    assert rows[0] == good
    assert rows[1] == {"user_id": 2, "item_id": 17, "action": "save", "surface": "search", "ts": 1_700_000_000_001, "query": "hats"}
    key, value = to_record(rows[1])
    assert key == b"2" and decode_event(value, S, now=1_700_000_000_001).query == "hats"


def test_csv_cells_that_only_look_numeric_stay_text(tmp_path: Path) -> None:
    """str.isdigit says yes to "²" and full-width digits, int() says no to "--5": such a cell
    is kept as text (the worker dead-letters it with a reason), never a crash of the replay."""
    csv_path = tmp_path / "events.csv"
    csv_path.write_text("user_id,item_id,action,surface,ts\n--5,²,click,home,１２\n-7,+3,click,home,1_000\n",
                        encoding="utf-8")
    rows = list(read_events(csv_path))
    assert [(r["user_id"], r["item_id"], r["ts"]) for r in rows] == [("--5", "²", "１２"), (-7, "+3", "1_000")]


def test_format_is_sniffed_from_content_when_the_name_says_nothing(tmp_path: Path) -> None:
    ml = tmp_path / "ratings"
    ml.write_text("1\t2\t5\t881250949\n")
    assert list(read_events(ml)) == [ActionEvent(1, 2, "save", "home", 881_250_949_000)]
    js = tmp_path / "dump"
    js.write_text('{"user_id": 1}\n')
    assert list(read_events(js)) == [{"user_id": 1}]
