#!/usr/bin/env bash
# The README's main command: set up (idempotent) and run the whole system locally on the
# embedded default (local Kafka broker, Qdrant Edge, CPU inference), showing it live.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/recsys demo "$@"
