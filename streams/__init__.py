"""streams/: action events in, per-user sequences out (the Faust layer of the data flow).

    schema.py     ActionEvent, msgpack codec, validating decoder
    errors.py     the exception hierarchy (InvalidEvent reasons = DLQ reasons)
    sequences.py  the pure fold behind the `sequences` table; table and user-updates wire forms
    synthetic.py  a synthetic stream with planted user interests
    produce.py    `recsys produce`: replay files / synthetic events into `actions`
    app.py        `recsys streams`: the Faust worker (imports faust; not imported here)
    delivery.py   Faust's consumer handing `actions` to the worker a window at a time
    outbox.py     a window's output records, one record batch per partition
"""

from streams.errors import REASONS, InvalidEvent, StreamsError, TooLate
from streams.schema import ActionEvent, decode_event, encode_event
from streams.sequences import Outcome, SeqEvent, UserState, fold_event

__all__ = [
    "REASONS",
    "ActionEvent",
    "InvalidEvent",
    "Outcome",
    "SeqEvent",
    "StreamsError",
    "TooLate",
    "UserState",
    "decode_event",
    "encode_event",
    "fold_event",
]
