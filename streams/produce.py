"""`recsys produce`: replay a file or a synthetic stream into the `actions` topic.

As a library call, `produce(events, bootstrap, topic, rate=...)` sends any iterable of
`ActionEvent`s, maps (encoded as they are: tools and tests use them to send bad events) or
raw `(key, bytes)` records, keyed by the user id so that each user's events stay in order on
one partition. Inputs:

- JSONL: one event map per line (the wire schema, JSON-typed).
- CSV: a header naming the fields; `ts`, `dwell_ms` and ids in canonical decimal ("7", not
  "007") are read as ints when msgpack can carry them.
- MovieLens `u.data` (user, item, rating, unix seconds; tab-separated): rating >= 4 is a
  "save", below a "click", all on surface "home", replayed in time order.
- `--synthetic N`: `streams.synthetic.synthetic_events` (users with planted interests).

The producer does not validate: the stream processor does, and dead-letters what it rejects.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack

from recsys.settings import get_settings
from streams.schema import ActionEvent, encode_event
from streams.synthetic import synthetic_events

__all__ = [
    "Record",
    "ensure_topic",
    "main",
    "produce",
    "read_csv",
    "read_events",
    "read_jsonl",
    "read_movielens",
    "to_record",
]

log = logging.getLogger(__name__)

# What `produce` accepts: an event, a map sent as it is, or a raw (key, value) record.
Record = ActionEvent | Mapping[str, Any] | tuple[str | bytes | None, bytes]
_INT_FIELDS = ("ts", "dwell_ms")
_ID_FIELDS = ("user_id", "item_id", "context_item")
# The ints msgpack can carry (int64 or uint64); the decoder accepts every one of them as an int.
_WIRE_INT_MIN, _WIRE_INT_MAX = -(1 << 63), (1 << 64) - 1


def ensure_topic(bootstrap: str, topic: str, partitions: int, replication_factor: int = 1) -> bool:
    """Create `topic` with `partitions` unless it exists; True when it was created.

    The Faust app refuses a source topic whose partition count differs from its changelog's,
    so the topic must not be left to the broker's auto-creation defaults.
    """
    from kafka import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    try:
        if topic in admin.list_topics():
            return False
        admin.create_topics(
            {topic: {"num_partitions": partitions, "replication_factor": replication_factor}},
            wait_for_metadata=True,
        )
        return True
    except TopicAlreadyExistsError:  # a concurrent creator won the race
        return False
    finally:
        admin.close()


def to_record(item: Record) -> tuple[bytes | None, bytes]:
    """The Kafka (key, value) of one item: events and maps keyed by str(user_id), raw records as given."""
    if isinstance(item, tuple):
        key, value = item
        return (key.encode() if isinstance(key, str) else key), value
    if isinstance(item, ActionEvent):
        key = item.key
    else:
        user_id = item.get("user_id")
        key = None if user_id is None else str(user_id)
    try:
        return (None if key is None else key.encode()), encode_event(item)
    except (UnicodeEncodeError, OverflowError):
        pass
    # The producer does not validate, so what msgpack cannot carry is sent in a form it can
    # rather than aborting the replay halfway or being dropped here; the event is on record
    # either way:
    # - an int beyond 64 bits goes as its decimal text: the worker accepts it as a str id (the
    #   same item by vector_store's point_id) or dead-letters it with a reason ("ts must be an
    #   int"); the key is unchanged (str of the int is the text), so partition and order stay;
    # - a lone surrogate ("\ud800" is valid JSON) goes as the bytes it names, which the worker
    #   refuses as "not msgpack" (not UTF-8).
    log.warning("user %.40r: an int beyond 64 bits or a lone surrogate; sent for the worker to judge", key)
    wire = _wire_safe(item.to_wire() if isinstance(item, ActionEvent) else dict(item))
    value = msgpack.packb(wire, use_bin_type=True, unicode_errors="surrogatepass")
    return (None if key is None else key.encode("utf-8", "surrogatepass")), value


def _wire_safe(value: Any) -> Any:
    """`value` with every int outside msgpack's range, at any depth, replaced by its decimal text."""
    if isinstance(value, int) and not _WIRE_INT_MIN <= value <= _WIRE_INT_MAX:
        return str(value)
    if isinstance(value, Mapping):
        return {k: _wire_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_wire_safe(v) for v in value]
    return value


def produce(
    events: Iterable[Record],
    bootstrap: str,
    topic: str,
    rate: float | None = None,
    progress: bool = True,
    *,
    total: int | None = None,
    partitions: int | None = None,
    replication_factor: int = 1,
) -> int:
    """Send `events` to `topic`, at most `rate` per second; return how many were sent.

    With `partitions`, the topic is created first if missing. Blocks until every record is
    acknowledged by the broker; then raises `NotDelivered` if any could not be (too large for
    the broker, or for the producer's 8 MiB request: the other records are sent all the same).
    """
    from kafka import KafkaProducer
    from kafka.errors import MessageSizeTooLargeError
    from tqdm import tqdm

    if partitions is not None:
        ensure_topic(bootstrap, topic, partitions, replication_factor)
    errors: list[BaseException] = []
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","),
        acks="all",
        linger_ms=5,  # small batches: throughput without hurting the replay's pacing
        max_request_size=8 << 20,  # oversized events must reach the DLQ, not fail here
    )
    sent = 0
    start = time.monotonic()
    try:
        with tqdm(total=total, unit="ev", disable=not progress, desc=f"produce -> {topic}") as bar:
            for item in events:
                key, value = to_record(item)
                try:
                    producer.send(topic, key=key, value=value).add_errback(errors.append)
                except MessageSizeTooLargeError as exc:  # over max_request_size: refused before it left
                    errors.append(exc)  # reported with the others; the replay goes on
                sent += 1
                bar.update()
                if rate:
                    # Pace against the start, not the previous send, so sleeps do not drift.
                    ahead = start + sent / rate - time.monotonic()
                    if ahead > 0.002:
                        time.sleep(ahead)
        producer.flush()
    finally:
        producer.close()
    if errors:
        raise NotDelivered(f"{len(errors)} of {sent} records were not delivered; first: {errors[0]!r}")
    return sent


class NotDelivered(RuntimeError):
    """Records of a replay the broker did not take (`recsys produce` exits 1, the rest sent)."""


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """One JSON object per non-empty line (or a file that is one JSON array of objects); a line
    or element that is not an object is reported and skipped."""
    # A byte-order mark is not part of line 1. Bytes that are not UTF-8 go on as lone
    # surrogates (the record is then not msgpack-encodable as text and is dead-lettered): a strict
    # decode would abort the replay, losing the valid lines of the chunk before them too.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        if _starts_with(f, "["):  # a JSON array of objects (an export's .json), not one per line
            yield from _json_array(path, f)
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_int=_json_int)
            except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested thousands deep
                log.warning("%s:%d: not JSON (%s); skipped", path, n, exc)
                continue
            if not isinstance(obj, dict):
                log.warning("%s:%d: not a JSON object; skipped", path, n)
                continue
            yield obj


class UnreadableFile(ValueError):
    """A replay file none of whose records can be told apart (`recsys produce` exits 1)."""


def _starts_with(f: Any, char: str) -> bool:
    """Whether the text file's first non-blank character is ``char``; the file is rewound."""
    head = ""
    while not head and (chunk := f.read(4096)):
        head = chunk.lstrip()
    f.seek(0)
    return head.startswith(char)


def _json_array(path: Path, f: Any) -> Iterator[dict[str, Any]]:
    try:
        items = json.load(f, parse_int=_json_int)
    except (json.JSONDecodeError, RecursionError) as exc:
        # Unlike a JSONL file, nothing of it can be told apart: refused whole, not "0 events".
        raise UnreadableFile(f"{path}: a JSON array that cannot be read ({exc})") from None
    for n, obj in enumerate(items):
        if isinstance(obj, dict):
            yield obj
        else:
            log.warning("%s: element %d is not a JSON object; skipped", path, n)


def _json_int(text: str) -> int | str:
    # Python refuses int() on over 4300 digits, which would abort the whole file; such a
    # number goes on as its text, as any int beyond 64 bits does (see `to_record`).
    try:
        return int(text)
    except ValueError:
        return text


def _maybe_int(value: str, pattern: re.Pattern[str]) -> int | str:
    """A cell matching `pattern` and within msgpack's int range as an int; anything else
    ("--5", "²", full-width digits, 2**64) as the text, for the worker to accept or
    dead-letter with a reason."""
    text = value.strip()
    # 20 digits hold 2**64 - 1; the bound also keeps int() off huge cells.
    if pattern.fullmatch(text) and len(text.lstrip("-0")) <= 20:
        number = int(text)
        if _WIRE_INT_MIN <= number <= _WIRE_INT_MAX:
            return number
    return text


# An id is an int only in its canonical form: "007", "-0" and 7 are distinct ids elsewhere
# (JSONL, vector_store's point_id), so reading "007" as 7 would merge two users or items.
_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]*")
# A quantity (ts, dwell_ms) has no identity to lose: "0500" ms is 500 ms.
_ASCII_INT = re.compile(r"-?[0-9]+")


def read_csv(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV file with a header; empty cells are left out, numbers become ints."""
    # utf-8-sig: a spreadsheet's export starts with a byte-order mark, which would otherwise
    # rename the first column ("\ufeffuser_id") and dead-letter every row as missing it.
    # The csv module refuses a cell over 128 KiB, which would abort the replay halfway: such an
    # event goes on, for the worker to dead-letter as oversized (up to the broker's record size;
    # beyond it the record is reported as not delivered, and the replay goes on).
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:  # as read_jsonl
        for row in csv.DictReader(f):
            event: dict[str, Any] = {}
            for name, value in row.items():
                if name is None or value is None or value == "":
                    continue
                if name in _ID_FIELDS:
                    event[name] = _maybe_int(value, _CANONICAL_INT)
                elif name in _INT_FIELDS:
                    event[name] = _maybe_int(value, _ASCII_INT)
                else:
                    event[name] = value
            yield event


def read_movielens(path: Path, *, save_min_rating: int = 4, surface: str = "home") -> list[ActionEvent]:
    """MovieLens `u.data` ratings as action events, in time order (ties: user, then item)."""
    rows: list[tuple[int, int, int, int]] = []
    with path.open(encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                user, item, rating, ts = (int(p) for p in parts)
            except ValueError:  # not four integers: skipped with its place, as read_jsonl does
                log.warning("%s:%d: not `user item rating timestamp`; skipped", path, n)
                continue
            rows.append((ts, user, item, rating))
    rows.sort()
    return [
        ActionEvent(user, item, "save" if rating >= save_min_rating else "click", surface, ts * 1000)
        for ts, user, item, rating in rows
    ]


def _detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".data"):
        return "movielens"
    with path.open(encoding="latin-1") as f:
        first = f.readline().strip()
    if first.startswith("{"):
        return "jsonl"
    parts = first.split("\t")
    return "movielens" if len(parts) == 4 and all(p.isdigit() for p in parts) else "csv"


def read_events(path: Path, fmt: str = "auto", *, movielens_surface: str = "home") -> Iterable[Record]:
    """The records of a file in one of the supported formats (`auto` guesses from the name);
    MovieLens ratings happen on `movielens_surface` (the first configured, as `recsys train
    --dataset ml100k` reads them)."""
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt == "movielens":
        return read_movielens(path, surface=movielens_surface)
    readers = {"jsonl": read_jsonl, "csv": read_csv}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; one of auto, {', '.join(readers)}, movielens")
    return readers[fmt](path)


def main(argv: list[str]) -> int:
    """`recsys produce --file F [--format auto] | --synthetic N [--users U --items I --seed S]`."""
    settings = get_settings()
    p = argparse.ArgumentParser(prog="recsys produce", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path, help="JSONL, CSV or MovieLens u.data file to replay")
    src.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic events")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "movielens"])
    # The defaults are `recsys train --dataset synthetic`'s (docker-compose's trainer): its model
    # knows these items.
    p.add_argument("--users", type=int, default=500, help="synthetic: number of users")
    p.add_argument("--items", type=int, default=300, help="synthetic: number of items")
    p.add_argument("--clusters", type=int, default=8, help="synthetic: number of interest clusters")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    p.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    p.add_argument("--bootstrap", default=settings.kafka.bootstrap_servers, help="Kafka bootstrap servers")
    p.add_argument("--topic", default=settings.topics.actions)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is a connection diary

    records: Iterable[Record]
    total: int | None = None
    if args.file is not None:
        if not args.file.is_file():
            print(f"recsys produce: no such file: {args.file}", file=sys.stderr)
            return 2
        records = read_events(args.file, args.format, movielens_surface=settings.events.surfaces[0])
        total = len(records) if isinstance(records, list) else None
    else:
        records = synthetic_events(
            args.synthetic, args.users, args.items, args.seed, n_clusters=args.clusters, events=settings.events
        )
        total = args.synthetic
    try:
        n = produce(
            records,
            args.bootstrap,
            args.topic,
            rate=args.rate,
            progress=not args.no_progress,
            total=total,
            partitions=settings.kafka.partitions,
            replication_factor=settings.streams.replication_factor,
        )
    except (UnreadableFile, NotDelivered) as exc:
        print(f"recsys produce: {exc}", file=sys.stderr)
        return 1
    print(f"produced {n} events to {args.topic}")
    return 0
