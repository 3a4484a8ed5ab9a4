"""The dead-letter record: what a refused Kafka record becomes on a `.dlq` topic.

One contract for every topic the project reads from outside: the streams worker dead-letters
`actions` to `actions.dlq`, the items follower dead-letters `items` to `items.dlq`. The value is
a msgpack map: `reason` (a stable string), `detail` (for humans), the `original` bytes (cut to
a budget: `original_size`, `truncated`), where it came from (`topic`, `partition`, `offset`),
`at` (epoch ms), and `key_size` / `key_truncated` for the key.
"""

from __future__ import annotations

import time
from typing import Protocol

import msgpack

__all__ = ["DETAIL_MAX_CHARS", "Refusal", "bounded_detail", "dead_letter", "dlq_key", "dlq_record"]

# A detail is for humans; the DLQ record carries the original bytes for anything longer.
DETAIL_MAX_CHARS = 1000


def bounded_detail(detail: str) -> str:
    """A refusal's detail cut to DETAIL_MAX_CHARS: it quotes hostile input, and its size must
    not follow that input's (a 900 KB field quoted whole would push the DLQ record past the
    broker's limit, and the refused record would never leave)."""
    if len(detail) > DETAIL_MAX_CHARS:
        return detail[:DETAIL_MAX_CHARS] + f"... ({len(detail)} chars)"
    return detail


class Refusal(Protocol):
    """Why a record was refused (streams' InvalidEvent, the indexer's BadItemMessage)."""

    reason: str
    detail: str


def dead_letter(refusal: Refusal, *, key: bytes | None, original: bytes | None, topic: str, partition: int,
                offset: int, max_key: int, max_original: int) -> tuple[bytes | None, bytes]:
    """The (Kafka key, value) of the DLQ record of a refused record. The kept key's bytes come
    out of the original's budget, so key + value stay under the broker's limit."""
    kept = dlq_key(key, max_key)
    return kept, dlq_record(refusal, original=original, topic=topic, partition=partition, offset=offset,
                            max_original=max(0, max_original - len(kept or b"")), key=key, max_key=max_key)


def dlq_record(
    refusal: Refusal,
    *,
    original: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    max_original: int,
    key: bytes | None = None,
    max_key: int | None = None,
) -> bytes:
    """The DLQ value. An original longer than `max_original` is cut (`truncated`) so that the
    record stays under the broker's message size limit; (topic, partition, offset) still find
    it whole.

    The DLQ record's Kafka key is the original key cut to `max_key` bytes (`dlq_key`): a key
    can be nearly as large as a message, and the key plus this value would then pass the
    broker's limit. `key_size` is the original key's full size and `key_truncated` whether the
    DLQ record's key is cut (0 and False for a record without a key)."""
    original = original or b""
    key_size = len(key or b"")
    return msgpack.packb(
        {
            "reason": refusal.reason,
            "detail": bounded_detail(refusal.detail),
            "original": original[:max_original],
            "original_size": len(original),
            "truncated": len(original) > max_original,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "at": time.time_ns() // 1_000_000,
            "key_size": key_size,
            "key_truncated": max_key is not None and key_size > max_key,
        },
        use_bin_type=True,
    )


def dlq_key(key: bytes | None, max_key: int) -> bytes | None:
    """The Kafka key of a DLQ record: the original key's first `max_key` bytes (None stays None)."""
    return key if key is None else key[:max_key]
