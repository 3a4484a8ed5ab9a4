"""`recsys config`: the effective settings as JSON, or every setting as a Markdown table."""

from __future__ import annotations

import argparse
import json

from recsys.settings import documented_fields, get_settings

# Printed as "<set>": the effective settings end up in terminals, logs and bug reports.
SECRETS = (("serving", "auth_token"), ("vector_store", "api_key"))


def markdown_table() -> str:
    rows = ["| environment variable | default | meaning |", "|---|---|---|"]
    # A `|` inside a cell would end it: "a | b" choices in comments are escaped.
    rows += [f"| `{env}` | `{default}` | {comment.replace('|', chr(92) + '|')} |" for env, default, comment in documented_fields()]
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys config", description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the settings table for the README")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
    else:
        settings = get_settings().model_dump(mode="json")
        for section, name in SECRETS:
            if settings[section][name] is not None:
                settings[section][name] = "<set>"
        print(json.dumps(settings, indent=2))
    return 0
