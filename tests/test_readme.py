"""The README documents every setting and the two commands it promises."""

from __future__ import annotations

import re
from pathlib import Path

from recsys.settings import documented_fields

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [env for env, _, _ in documented_fields() if f"`{env}`" not in README]
    assert not missing, f"run `python scripts/sync_readme.py`; undocumented: {missing}"


def test_every_setting_has_an_explanation() -> None:
    bare = [env for env, _, comment in documented_fields() if not comment]
    assert not bare, f"settings without a comment in recsys/settings.py: {bare}"


def test_the_two_commands_exist() -> None:
    root = Path(__file__).resolve().parents[1]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"{script}" in README and (root / script).exists()


def test_the_settings_table_is_current_and_every_row_has_three_cells() -> None:
    from recsys.config_cli import markdown_table

    table = markdown_table()
    assert table in README, "run `python scripts/sync_readme.py`"
    for row in table.splitlines():
        cells = re.split(r"(?<!\\)\|", row)[1:-1]  # an escaped \| stays inside its cell
        assert len(cells) == 3, row


def test_the_profiling_benchmarks_find_py_spy() -> None:
    """BENCHMARKS.md's `--profile` commands: py-spy is installed in the shared base environment,
    on neither PATH nor the clone's .venv/bin, where they looked for it."""
    import os
    import subprocess

    from benchmarks.results_io import py_spy

    spy = py_spy()
    assert os.access(spy, os.X_OK)
    assert subprocess.run([spy, "--version"], capture_output=True, text=True, check=True).stdout.startswith("py-spy")


def test_a_settings_caveat_written_above_a_field_reaches_its_readme_row() -> None:
    """A field with a comment of its own lost the block above it: the README did not say that
    the HNSW settings apply only to a store created after them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (row,) = [line for line in readme.splitlines() if line.startswith("| `RECSYS_VECTOR_STORE__HNSW_M`")]
    assert "changing them later does not change a store that exists" in row
