"""`recsys <command> ...`: one entry point, each command owned by the component that runs it."""

from __future__ import annotations

import importlib
import sys

from pydantic import ValidationError

# command -> (module:function taking argv, one-line help). Each component parses its own flags.
COMMANDS: dict[str, tuple[str, str]] = {
    "kafka": ("recsys.kafka_broker:main", "start | stop | status | fetch | destroy the local single-node Kafka broker"),
    "produce": ("streams.produce:main", "replay a file or a synthetic stream into `actions`"),
    "streams": ("streams.app:main", "run the Faust worker (sequences table, DLQ, user-updates)"),
    "train": ("inference.train:main", "pretrain / fine-tune the generative retriever"),
    "evaluate": ("inference.evaluate:main", "offline Recall@K / NDCG@K of a checkpoint"),
    "export": ("inference.export:main", "export a checkpoint to ONNX + the item table"),
    "index": ("vector_store.indexer:main", "index item embeddings; follow the `items` topic"),
    "worker": ("inference.worker:main", "run the ONNX Runtime worker (user-updates -> candidates)"),
    "serve": ("serving.server:main", "run the gRPC GetCandidates server"),
    "config": ("recsys.config_cli:main", "print the effective settings (or the README table)"),
    "demo": ("recsys.demo:main", "set everything up locally and show candidates changing live"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: recsys <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"recsys: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        # A typo in a RECSYS_* variable is the operator's to fix: what is wrong, not a traceback.
        print(f"recsys {name}: invalid settings (RECSYS_* environment, .env, --set):\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
