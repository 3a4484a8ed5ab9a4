#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole fast test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# pytest exits 5 when it collects nothing: that is a failure here, never a pass.
exec .venv/bin/python -m pytest "$@"
