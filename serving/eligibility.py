"""Where each item may still be served: the server's view of the `items` topic's surfaces.

A user's lists are computed when the user acts; an item withdrawn afterwards (`surfaces: []` on
`items`, say a takedown) or taken off one surface would otherwise stay in every list that holds
it until each of those users acts again, for an inactive user for good. The server follows
`items` (compacted: the newest record per item) and drops such items from what it answers, on
the surfaces they left. Only restricted items are kept (eligible on fewer than every configured
surface); an item whose newest record names every surface, or none (missing = all), is not.

Records are decoded by the indexer's own `decode_item` (and its key check): a record it refuses
is not looked at here either (the indexer dead-letters it) and the item keeps its last valid
eligibility, as in the vector store. Left: a record the indexer accepts but its encoder then
refuses ("cannot embed") still counts here.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from serving.store import SurfaceList

__all__ = ["Eligibility"]

log = logging.getLogger(__name__)


class Eligibility:
    """item id -> the surfaces it may be served on, for the items not eligible everywhere."""

    def __init__(self, surfaces: Sequence[str]) -> None:
        self.surfaces = frozenset(surfaces)
        self.restricted: dict[str, frozenset[str]] = {}
        self.version = 0  # bumped at every change: lists filtered under an older one are redone

    def apply(self, item_id: str, surfaces: Sequence[str] | None) -> None:
        """An item's newest surfaces (None: every surface), from a record the indexer accepts."""
        allowed = self.surfaces if surfaces is None else frozenset(surfaces) & self.surfaces
        before = self.restricted.get(item_id, self.surfaces)
        if allowed == before:
            return
        if allowed == self.surfaces:
            del self.restricted[item_id]
        else:
            self.restricted[item_id] = allowed
        self.version += 1

    def clear(self) -> None:
        """Every item eligible everywhere again (the catalogue is read afresh)."""
        if self.restricted:
            self.restricted.clear()
            self.version += 1

    def filter(self, lists: SurfaceList, surface: str) -> SurfaceList:
        """``lists`` less the items not eligible on ``surface``; the same object when none is
        dropped. Memoised on the list until the next change, so a list served again costs a
        dict lookup."""
        restricted = self.restricted
        if not restricted:
            return lists
        memo_key = "eligible:" + surface  # the model table's fallback list is one object for every surface
        cached = lists.memo.get(memo_key)
        if cached is not None and cached[0] == self.version:
            return lists if cached[1] is None else cached[1]  # type: ignore[no-any-return]
        keep = [k for k, item in enumerate(lists.items)
                if (allowed := restricted.get(item)) is None or surface in allowed]
        if len(keep) == len(lists.items):
            # None, not `lists`: a list holding itself is a reference cycle, freed only by the
            # cyclic collector, whose full passes over a large store stall every call.
            lists.memo[memo_key] = (self.version, None)
            return lists
        out = SurfaceList(tuple(lists.items[k] for k in keep), array("f", (lists.scores[k] for k in keep)))
        lists.memo[memo_key] = (self.version, out)
        return out
