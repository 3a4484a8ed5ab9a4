"""Regenerate the README's settings table from recsys/settings.py (run after adding a setting)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from recsys.config_cli import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- settings-table:start -->\n).*?(<!-- settings-table:end -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + markdown_table() + "\n" + m.group(2), text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only say whether the table is stale (exit 1), write nothing")
    args = parser.parse_args()
    text = README.read_text()
    new = render(text)
    if args.check:
        sys.exit(0 if new == text else "README settings table is stale: run scripts/sync_readme.py")
    README.write_text(new)
