"""Assemble BENCHMARKS.md from each benchmark's section (benchmarks/sections/*.md).

Each section is written by the owner of its benchmark and quotes benchmarks/results/<name>.json
with the command that produced it; this script only puts them in one page, in data-flow order.

    python -m benchmarks.summarise
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ROOT / "benchmarks" / "sections"
ORDER = ["model", "ingest", "inference", "ann", "freshness", "grpc", "serving_restart", "scaling"]

HEADER = """# Benchmarks

Every figure below was measured by a script in `benchmarks/` that writes
`benchmarks/results/<name>.json` (the metrics, the exact command, the git commit, the machine
and its load). The development machine has 2 shared cores and no GPU, and other jobs ran
beside most measurements: compare figures taken in one run, and trust ratios and medians over
absolute times. Regenerate this page with `python -m benchmarks.summarise`.
"""


def main() -> None:
    names = [n for n in ORDER if (SECTIONS / f"{n}.md").exists()]
    names += sorted(p.stem for p in SECTIONS.glob("*.md") if p.stem not in ORDER)
    parts = [HEADER] + [(SECTIONS / f"{n}.md").read_text().strip() + "\n" for n in names]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"BENCHMARKS.md: {', '.join(names)}")


if __name__ == "__main__":
    main()
