#!/usr/bin/env python
"""Coverage-guided fuzzing of the event decoder, the DLQ record and the sequence fold (atheris).

    python scripts/fuzz_events.py --seconds 600              # the long form
    python scripts/fuzz_events.py --runs 20000 --seed 1      # short and reproducible (tests/fuzz)
    python scripts/fuzz_events.py --seconds 600 --corpus var/fuzz-corpus   # keep what it finds

An input is a sequence of raw `actions` values, each framed by a 2-byte big-endian length
(so that the seed corpus - valid events and the hostile payloads of `hostile_payloads` - is
easy to write and libFuzzer's mutations stay inside events). For every value:

- `decode_event` returns an `ActionEvent` or raises `InvalidEvent` with one of `REASONS` and a
  message; any other exception is a finding (libFuzzer stops and writes the input as crash-*);
- a value longer than `events.max_event_bytes` is "oversized" (rejected before unpacking);
- a valid event satisfies the schema, keeps no value nested deeper than `events.max_nesting`
  and re-encodes to the same bytes; an invalid one gives a DLQ record (`recsys.dead_letters.dlq_record`)
  that unpacks to its reason and the original, cut to `dlq_max_original_bytes`;
- the valid events, in input order, are folded into one sequence by the reference fold and by
  the worker's `PackedSeq`: same outcomes, same `TooLate`, same events and bytes, and the
  sequence is sorted, duplicate-free and within its count and age bounds.

No hang: libFuzzer's per-input watchdog (`--timeout`, seconds) reports an input that runs
longer as a finding. Memory: its RSS limit (`--rss-limit-mb`) does the same for inputs that
make the process grow (a huge container header must be refused, not allocated).

Exit status 0: no finding. Findings are written to the working directory (or `--artifacts`)
and reproduce with `python scripts/fuzz_events.py crash-<hash>`.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a file from a clone

from recsys.settings import Settings

NOW = 1_700_000_000_000  # the decoder's wall clock, fixed: results do not depend on the day
# Small bounds, so that short inputs reach every branch of the fold (full, aged-out, late).
SETTINGS = Settings(streams={"max_sequence_len": 5, "max_age_ms": 10_000, "lateness_ms": 1_000, "dlq_max_original_bytes": 1024},
                    events={"max_future_ms": 1_000})
GOOD: dict[str, Any] = {"user_id": 7, "item_id": "sku-1", "action": "click", "surface": "home", "ts": NOW - 1_000}


# ---------------------------------------------------------------- inputs


def frame(values: list[bytes]) -> bytes:
    """Values as one fuzzer input (each prefixed by its length, 2 bytes big-endian)."""
    return b"".join(len(v).to_bytes(2, "big") + v for v in values)


def unframe(data: bytes) -> Iterator[bytes]:
    while len(data) >= 2:
        n = int.from_bytes(data[:2], "big")
        yield data[2 : 2 + n]
        data = data[2 + n :]


def _nested(depth: int, leaf: Any = 1) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def hostile_payloads(settings: Settings, now: int, seed: int = 0) -> list[tuple[str, bytes | None, str]]:
    """(kind, raw value, the reason it must be rejected with) of bad `actions` values.

    The seed corpus of the fuzzer and what the real-broker test sends through the worker
    (tests/streams/test_streams_worker.py). `None` is a Kafka null value (a tombstone)."""
    cfg = settings.events
    rng = random.Random(seed)
    good = {**GOOD, "ts": now - 1_000}
    packed = msgpack.packb(good)

    def pack(obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    out: list[tuple[str, bytes | None, str]] = [
        ("null value", None, "not msgpack"),
        ("empty", b"", "not msgpack"),
        ("reserved byte", b"\xc1", "not msgpack"),
        ("truncated", packed[:-3], "not msgpack"),
        ("trailing bytes", packed + b"\x00", "not msgpack"),
        ("bad utf-8", b"\x81\xa7user_id\xa2\xff\xfe", "not msgpack"),
        ("int map key", pack({**good, 5: 1}), "wrong type"),
        ("too many fields", pack({**good, **{f"k{i}": i for i in range(cfg.max_fields)}}), "oversized"),
        ("deeper than the unpacker", b"\x81\xa1x" + b"\x91" * 3000 + b"\xc0", "not msgpack"),
        ("huge array header", b"\xdd\xff\xff\xff\xff", "oversized"),
        ("huge map header", b"\xdf\xff\xff\xff\xff", "oversized"),
        ("huge str header", b"\xdb\xff\xff\xff\xff" + b"x" * 10, "not msgpack"),
        ("huge bin header", b"\x81\xa1x\xc6\xff\xff\xff\xff", "not msgpack"),
        ("huge ext header", b"\x81\xa1x\xc9\xff\xff\xff\xff\x05", "oversized"),
        ("array", pack([1, 2, 3]), "not a map"),
        ("string", pack("user_id"), "not a map"),
        ("nil", pack(None), "not a map"),
        ("float", pack(1.5), "not a map"),
        ("missing surface", pack({k: v for k, v in good.items() if k != "surface"}), "missing field"),
        ("nil ts", pack({**good, "ts": None}), "missing field"),
        ("float ts", pack({**good, "ts": float(now)}), "wrong type"),
        ("bool user", pack({**good, "user_id": True}), "wrong type"),
        ("bytes item", pack({**good, "item_id": b"\x00\x01"}), "wrong type"),
        ("list action", pack({**good, "action": ["click"]}), "wrong type"),
        ("ext surface", pack({**good, "surface": msgpack.ExtType(5, b"home")}), "wrong type"),
        ("deep action", pack({**good, "action": _nested(500, "click")}), "wrong type"),
        # A duplicated key: msgpack allows it and the last one wins (here a str ts).
        ("duplicate key", b"\x86" + packed[1:] + pack("ts") + pack("soon"), "wrong type"),
        ("empty user", pack({**good, "user_id": ""}), "bad value"),
        ("long user", pack({**good, "user_id": "u" * (cfg.max_id_length + 1)}), "bad value"),
        ("negative dwell", pack({**good, "dwell_ms": -5}), "bad value"),
        ("deep extras", pack({**good, "x": _nested(cfg.max_nesting + 1)}), "bad value"),
        ("very deep extras", pack({**good, "x": _nested(500)}), "bad value"),
        ("unknown action", pack({**good, "action": "purchase"}), "unknown action"),
        ("unknown surface", pack({**good, "surface": "tv"}), "unknown surface"),
        ("future", pack({**good, "ts": now + 10 * cfg.max_future_ms}), "ts in the future"),
        ("uint64 ts", pack({**good, "ts": 2**64 - 1}), "ts in the future"),
        ("seconds not ms", pack({**good, "ts": now // 1000}), "ts too old"),
        ("negative ts", pack({**good, "ts": -1}), "ts too old"),
        ("oversized event", pack({**good, "pad": "x" * cfg.max_event_bytes}), "oversized"),
        ("oversized garbage", bytes(rng.randrange(256) for _ in range(cfg.max_event_bytes + 1)), "oversized"),
    ]
    for i in range(12):  # random bytes; the 0xc1 (never used) first byte keeps them invalid
        raw = b"\xc1" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        out.append((f"random {i}", raw, "not msgpack"))
    return out


def valid_events(now: int, n: int = 6) -> list[bytes]:
    """Valid values with the optional fields and an unknown key (seeds)."""
    base = {**GOOD, "ts": now - 5_000}
    return [
        msgpack.packb({**base, "ts": now - 5_000 + 700 * i, "item_id": i % 3, "surface": ("home", "search", "related")[i % 3],
                       **({"query": "q", "dwell_ms": 10 * i, "context_item": "c", "client": {"os": [i]}} if i % 2 else {})})
        for i in range(n)
    ]  # fmt: skip


def seed_corpus(directory: Path) -> None:
    """Write the seed inputs: each valid event and each hostile payload alone, and mixes."""
    valid = valid_events(NOW)
    hostile = [raw for _, raw, _ in hostile_payloads(SETTINGS, NOW) if raw is not None]
    seeds = [[v] for v in valid] + [[h] for h in hostile] + [valid, valid[::-1], [valid[0], *hostile[:8], valid[1]]]
    for i, values in enumerate(seeds):
        (directory / f"seed-{i:03d}").write_bytes(frame(values))


MSGPACK_DICTIONARY = [  # libFuzzer tokens: the schema's keys and values, msgpack-encoded
    *(msgpack.packb(s) for s in ("user_id", "item_id", "action", "surface", "ts", "query", "context_item", "dwell_ms")),
    *(msgpack.packb(s) for s in ("click", "save", "hide", "home", "search", "related")),
    msgpack.packb(NOW), msgpack.packb(NOW - 1_000), b"\xc0", b"\xc2", b"\xc3", b"\xdc\x00\x10", b"\xde\x00\x10",
]  # fmt: skip


# ---------------------------------------------------------------- the checks


def check_input(data: bytes) -> None:
    """Every invariant of the module docstring, for one fuzzer input; raises on a violation."""
    from recsys.dead_letters import dlq_record
    from streams.errors import REASONS, InvalidEvent, TooLate
    from streams.schema import ActionEvent, _depth, decode_event, encode_event
    from streams.sequences import PackedSeq, SeqEvent, UserState, fold_event, order_key, user_update

    cfg, scfg = SETTINGS.events, SETTINGS.streams
    seq: tuple[SeqEvent, ...] = ()
    packed = PackedSeq("u", 0, [], [], b"")
    for raw in unframe(data):
        try:
            event = decode_event(raw, SETTINGS, now=NOW)
        except InvalidEvent as exc:
            assert exc.reason in REASONS and str(exc), f"bad InvalidEvent {exc!r}"
            if len(raw) > cfg.max_event_bytes:
                assert exc.reason == "oversized", f"{len(raw)} bytes rejected as {exc.reason!r}"
            record = msgpack.unpackb(
                dlq_record(exc, original=raw, topic="actions", partition=0, offset=1,
                           max_original=scfg.dlq_max_original_bytes), raw=False)  # fmt: skip
            assert record["reason"] == exc.reason and record["original"] == raw[: scfg.dlq_max_original_bytes]
            assert record["original_size"] == len(raw) and record["truncated"] == (len(raw) > scfg.dlq_max_original_bytes)
            continue
        assert isinstance(event, ActionEvent) and len(raw) <= cfg.max_event_bytes
        assert isinstance(event.ts, int) and not isinstance(event.ts, bool)
        assert cfg.min_ts_ms <= event.ts <= NOW + cfg.max_future_ms
        assert event.action in cfg.actions and event.surface in cfg.surfaces
        for id_ in (event.user_id, event.item_id):
            assert isinstance(id_, int | str) and not isinstance(id_, bool) and str(id_).strip()
        assert all(_depth(v, cfg.max_nesting) <= cfg.max_nesting for v in event.extra.values())
        again = encode_event(event)  # bytes, not objects: NaN in an unknown key is not == itself
        assert encode_event(decode_event(again, SETTINGS, now=NOW)) == again

        try:
            want = fold_event(seq, event, SETTINGS)
        except TooLate:
            try:
                packed.fold(event, SETTINGS)
            except TooLate:
                continue
            raise AssertionError("the reference fold says too late, PackedSeq does not") from None
        assert packed.fold(event, SETTINGS) is want.outcome, "PackedSeq and the reference disagree"
        seq = want.seq
        assert packed.events() == seq
        keys = [order_key(e) for e in seq]
        assert keys == sorted(set(keys)), "sequence not sorted or with duplicates"
        assert len(seq) <= scfg.max_sequence_len and seq[0].ts >= seq[-1].ts - scfg.max_age_ms
    state = UserState("u", 0, seq)
    assert PackedSeq.decode(packed.encode()).events() == seq
    assert packed.update(last_event_ts=1, emitted_at=2) == msgpack.packb(user_update(state, last_event_ts=1, emitted_at=2))


# ---------------------------------------------------------------- main


def _escaped(token: bytes) -> str:
    return "".join(f"\\x{b:02x}" for b in token)  # libFuzzer dictionary syntax


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, help="stop after this long (libFuzzer -max_total_time)")
    p.add_argument("--runs", type=int, help="stop after this many inputs (libFuzzer -runs)")
    p.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed (0: a random one)")
    p.add_argument("--corpus", type=Path, help="corpus folder to read and grow (default: a temporary one)")
    p.add_argument("--artifacts", type=Path, help="where findings are written (default: the working directory)")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may run before it is a finding (hang)")
    p.add_argument("--rss-limit-mb", type=int, default=2048, help="memory that makes an input a finding")
    p.add_argument("inputs", nargs="*", type=Path, help="inputs to run once (e.g. a crash-* file), no fuzzing")
    args = p.parse_args(argv)
    if args.inputs:
        for path in args.inputs:
            check_input(path.read_bytes())
            print(f"{path}: ok")
        return 0

    import atheris

    # Coverage feedback from this package's code (what check_input calls); faust and msgpack,
    # imported by streams.app, are not instrumented.
    with atheris.instrument_imports(include=["streams"]):
        for module in ("streams.schema", "streams.sequences", "streams.app"):
            importlib.import_module(module)

    with tempfile.TemporaryDirectory(prefix="fuzz-events-") as tmp_name:
        tmp = Path(tmp_name)
        corpus = args.corpus or tmp / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        seed_corpus(corpus)
        dictionary = tmp / "msgpack.dict"
        dictionary.write_text("".join(f'"{_escaped(token)}"\n' for token in MSGPACK_DICTIONARY))
        flags = [
            f"-seed={args.seed}", f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}",
            f"-max_len={3 * SETTINGS.events.max_event_bytes}", f"-dict={dictionary}", "-print_final_stats=1",
        ]  # fmt: skip
        if args.seconds:
            flags.append(f"-max_total_time={args.seconds}")
        if args.runs is not None:
            flags.append(f"-runs={args.runs}")
        if args.artifacts:
            args.artifacts.mkdir(parents=True, exist_ok=True)
            flags.append(f"-artifact_prefix={args.artifacts}/")
        atheris.Setup([sys.argv[0], *flags, str(corpus)], check_input)
        atheris.Fuzz()  # exits the process: 0 when the budget ran out without a finding
    return 0


if __name__ == "__main__":
    sys.exit(main())
