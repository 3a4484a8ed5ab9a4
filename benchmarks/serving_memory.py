"""Memory of the serving store per user: benchmarks/results/serving_memory.json.

The server keeps every user's lists in memory (serving/store.py, bounded by
`serving.max_users`) and, once a surface has been served, its memoised protobuf encoding
(serving/server.py `encode_candidates`). This measures both with tracemalloc on the real code
path: N users x 3 surfaces x 100 items applied as `candidates` records, then every surface
encoded once. Item ids are drawn from a 50,000-item catalogue, so the interned ids are shared
between users as in a real catalogue.

    python -m benchmarks.serving_memory            # ~10 s
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc

from benchmarks.results_io import write_result
from recsys.settings import Settings
from serving.server import encode_candidates
from serving.store import CandidateStore

CATALOGUE = 50_000  # distinct item ids the lists draw from
LIST_LEN = 100


def record(user: int, surfaces: tuple[str, ...]) -> dict[str, object]:
    return {"user_id": f"user-{user}", "version": 1, "model_version": "m", "source_event_ts": 1, "generated_at": 1,
            "surfaces": {s: {"items": [str((user * 7 + i * 13 + k) % CATALOGUE) for k in range(LIST_LEN)],
                             "scores": [1.0 - k / LIST_LEN for k in range(LIST_LEN)]}
                         for i, s in enumerate(surfaces)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=20_000)
    args = p.parse_args(argv)
    settings = Settings()
    surfaces = tuple(settings.events.surfaces)
    tracemalloc.start()
    store = CandidateStore(args.users, max_items=settings.serving.max_limit)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    for user in range(args.users):
        store.apply(record(user, surfaces))
    gc.collect()
    stored = tracemalloc.get_traced_memory()[0]
    for user in range(args.users):
        got = store.get(f"user-{user}")
        assert got is not None
        for lists in got.surfaces.values():
            encode_candidates(lists)
    gc.collect()
    served = tracemalloc.get_traced_memory()[0]
    per_user = (stored - base) / args.users
    per_list = (served - stored) / (args.users * len(surfaces))
    metrics = {
        "users": args.users, "surfaces": len(surfaces), "list_length": LIST_LEN, "catalogue": CATALOGUE,
        "stored_kib_per_user": round(per_user / 1024, 2),
        "served_kib_per_list": round(per_list / 1024, 2),
        "all_served_kib_per_user": round((per_user + len(surfaces) * per_list) / 1024, 2),
        "max_users_default": settings.serving.max_users,
        "all_served_gib_at_max_users": round((per_user + len(surfaces) * per_list) * settings.serving.max_users / 2**30, 2),
    }
    print(write_result("serving_memory", metrics).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
