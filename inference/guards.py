"""What the worker does with input it cannot use and with a vector store that is down.

Two promises of the worker loop (issue 6), kept here so that inference/worker.py stays a
straight read:

- **No input ends the loop.** `clean_update` turns a raw `user-updates` record into a
  well-formed update or None. Defined answers:

      not msgpack / not a map / no usable user id   -> None (counted as malformed, skipped)
        (a str id longer than events.max_id_length
        bytes is not one, as in the streams: it goes
        into the candidates record's key and value)
      an event without a usable item_id, action,
        surface or integer ts                        -> that event dropped, the rest kept
      no events left (an empty history)             -> None: no candidates record is written,
                                                       so the server keeps the user's last list
                                                       (or the surface's popularity fallback)
      more events than the worker needs             -> the newest `keep` events
      unknown items (never exported nor indexed)    -> kept: the model reads their action,
                                                       surface and time with a zero item vector
      an action the model does not know             -> that event dropped: a token without an
                                                       action is padding to the model, and as the
                                                       newest event it would be the position the
                                                       user's state is read from; its item is
                                                       still kept out of the candidates
                                                       ("unread_items")
      a last_event_ts that is no epoch ms            -> the newest event's ts
      unknown surface names                         -> kept: the model's padding index (0)

  Anything else a user's data makes the model or the planning raise is isolated by the
  worker: the batch is recomputed user by user and only the failing users are skipped
  (logged, counted in `Worker.users_failed`). A store call that fails for good
  (`StoreCallFailed`: a bug, a bad argument such as a non-finite query from a broken model)
  is not a user's fault: it stops the worker with the batch uncommitted.

- **A store outage costs latency, never an update.** `call_with_retry` repeats a store call
  with exponential back-off (inference.store_retry_initial_s doubling up to
  store_retry_max_s) for as long as the store fails with a *transient* error (connection
  refused, timeouts, the engine failing on I/O) and the worker is not stopping. The worker
  commits a batch's offsets only after its candidates are written, so a batch that waits
  here is neither committed nor lost: if the worker is stopped meanwhile, `StoreUnavailable`
  ends the loop without a commit and the batch is delivered again. Errors that retrying
  cannot fix (bad arguments, a dimension mismatch) are raised at once.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import msgpack

from recsys.settings import EventSettings, StreamsSettings
from vector_store.errors import CorruptPointError, DimensionMismatchError

__all__ = ["RetryingStore", "StoreUnavailable", "call_with_retry", "clean_update", "is_transient"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_RECORD_BYTES = 4 << 20  # a user-updates record is ~50 events (a few KB); anything near this is hostile
_MAX_TS = 2**53  # integer event times beyond this are not epoch ms (and lose precision as floats)


class StoreUnavailable(RuntimeError):
    """Raised when the worker is asked to stop while the vector store is still failing."""


class StoreCallFailed(RuntimeError):
    """A store call failed in a way repeating cannot fix (the call or the code is wrong). Not
    one user's data: the worker stops with the batch uncommitted instead of skipping users."""


_MAX_ID_BYTES = EventSettings.model_fields["max_id_length"].default  # the streams' own bound


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def _is_user_id(value: Any, max_bytes: int) -> bool:
    return _is_id(value) and not (isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) > max_bytes)


def _clean_event(event: Any) -> dict[str, Any] | None:
    if not isinstance(event, dict):
        return None
    item, action, surface, ts = event.get("item_id"), event.get("action"), event.get("surface"), event.get("ts")
    if not _is_id(item) or not isinstance(action, str) or not isinstance(surface, str):
        return None
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= _MAX_TS:
        return None
    return {"item_id": item, "action": action, "surface": surface, "ts": ts}


_MAX_HIDDEN = StreamsSettings.model_fields["max_hidden"].default  # the streams' own bound


def clean_update(raw: bytes | None, keep: int, keep_hidden: int = _MAX_HIDDEN,
                 actions: Collection[str] | None = None, max_id_bytes: int = _MAX_ID_BYTES) -> dict[str, Any] | None:
    """A `user-updates` record as the worker can use it, or None (see the module docstring):
    of the newest ``keep`` events those whose action is one of ``actions`` (the model's; None:
    any), and ``keep_hidden`` hidden items (the streams' bounds; a record from elsewhere could
    carry a million, all going into the store's exclusion filter); a user id of at most
    ``max_id_bytes`` (events.max_id_length, as the streams accept)."""
    if raw is None or len(raw) > _MAX_RECORD_BYTES:
        return None
    try:
        update = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(update, dict) or not _is_user_id(update.get("user_id"), max_id_bytes):
        return None
    events = update.get("events")
    if not isinstance(events, list):
        return None
    well_formed = [e for e in (_clean_event(e) for e in events[-keep:]) if e is not None] if keep > 0 else []
    clean = [e for e in well_formed if actions is None or e["action"] in actions]
    if not clean:
        return None
    version = update.get("version")
    last_ts = update.get("last_event_ts")
    hidden = update.get("hidden")
    return {
        **update,
        "events": clean,
        # Items the user hid, kept out of their candidates; an update without them hides nothing.
        "hidden": [str(i) for i in hidden[-keep_hidden:] if _is_id(i)] if isinstance(hidden, list) and keep_hidden > 0
        else [],
        "version": version if isinstance(version, int) and not isinstance(version, bool) else 0,
        # Items of events the model does not read (an action added since it was trained): the
        # user engaged with them all the same, so they stay out of the candidates too.
        "unread_items": [str(e["item_id"]) for e in well_formed if e["action"] not in actions]
        if actions is not None and len(well_formed) > len(clean) else [],
        "last_event_ts": last_ts if isinstance(last_ts, int) and not isinstance(last_ts, bool) and 0 < last_ts <= _MAX_TS
        else max(e["ts"] for e in clean),
    }


def is_transient(exc: BaseException) -> bool:
    """Whether a failed store call may succeed if repeated (the store down, not the call wrong)."""
    # The call or the code is wrong, not the store down: repeating cannot help (a NameError
    # once had the worker "waiting for the store" forever).
    if isinstance(exc, (ValueError, TypeError, LookupError, AttributeError, AssertionError, NameError,
                        ArithmeticError, ImportError, NotImplementedError, DimensionMismatchError,
                        CorruptPointError)):
        return False
    code = getattr(exc, "code", None)  # grpc.RpcError: only the codes of an unreachable/overloaded server
    if callable(code):
        try:
            name = getattr(code(), "name", "")
        except Exception:  # noqa: BLE001 - a code() that fails says nothing about the call
            name = ""
        if name in {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
                    "UNAUTHENTICATED", "FAILED_PRECONDITION", "OUT_OF_RANGE", "UNIMPLEMENTED"}:
            return False
    status = getattr(exc, "status_code", None)  # qdrant_client UnexpectedResponse (REST)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return False
    return isinstance(exc, Exception)


def call_with_retry(
    call: Callable[[], T],
    *,
    what: str,
    initial_s: float,
    max_s: float,
    stopping: threading.Event,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """``call()``, repeated with exponential back-off while it fails transiently.

    Waits initial_s, 2*initial_s, ... capped at max_s between attempts; returns the first
    success; raises a non-transient error at once, and StoreUnavailable when ``stopping`` is
    set before the store came back.
    """
    delay = max(1e-3, initial_s)
    failures = 0
    while True:
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_transient(exc):
                raise
            failures += 1
            if on_retry is not None:
                on_retry(failures, exc)
            level = logging.WARNING if failures == 1 or math.log2(failures).is_integer() else logging.DEBUG
            log.log(level, "%s failed (%d in a row: %s: %s); retrying in %.2f s",
                    what, failures, type(exc).__name__, str(exc)[:200], delay)
            if stopping.wait(delay):
                raise StoreUnavailable(f"{what}: stopping while the store is still failing") from exc
            delay = min(max_s, delay * 2)
            continue
        if failures:
            log.warning("%s succeeded again after %d failures", what, failures)
        return result


class RetryingStore:
    """A vector store whose every call (but close) goes through `call_with_retry`.

    Wraps the worker's store and the `items` follower's, so that neither the worker loop nor
    the follower thread dies when the store is down; ``stopping`` ends a wait.
    """

    def __init__(self, store: Any, *, initial_s: float, max_s: float, stopping: threading.Event | None = None) -> None:
        self._store = store
        self._initial_s = initial_s
        self._max_s = max_s
        self.stopping = stopping if stopping is not None else threading.Event()
        self.failures = 0  # transient failures seen so far (all calls)

    def _count(self, attempt: int, exc: BaseException) -> None:
        self.failures += 1

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name == "close":
            return attr

        def retried(*args: Any, **kwargs: Any) -> Any:
            try:
                return call_with_retry(lambda: attr(*args, **kwargs), what=f"vector store {name}",
                                       initial_s=self._initial_s, max_s=self._max_s,
                                       stopping=self.stopping, on_retry=self._count)
            except StoreUnavailable:
                raise
            except Exception as exc:  # non-transient (call_with_retry raised it at once)
                raise StoreCallFailed(f"vector store {name}: {type(exc).__name__}: {exc}") from exc

        return retried
