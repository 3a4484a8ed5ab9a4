#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine, idempotently:
#  - a base virtualenv with the heavy dependencies (torch, onnxruntime-gpu, ...), cached OUTSIDE
#    the clone ($RECSYS_CACHE, default ~/.cache/recsys) so every clone and CI run reuses it;
#  - a thin .venv in the clone that sees the base packages and holds the project (editable);
#  - the Kafka broker jars from Maven Central (also cached).
# Needs: python3.11, Java 17+, Maven.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE=${RECSYS_CACHE:-$HOME/.cache/recsys}
if [ -n "${PYTHON:-}" ]; then  # asked for by name: that one or none, not a quiet fallback
    command -v "$PYTHON" >/dev/null || { echo "bootstrap: PYTHON=$PYTHON not found" >&2; exit 1; }
    PY=$PYTHON
else
    PY=python3.11
    command -v "$PY" >/dev/null || PY=python3
fi
# Said plainly here rather than as a tomllib ImportError or a half-made venv further down.
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || { echo "bootstrap: needs Python 3.11+ (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 1; }
"$PY" -c 'import ensurepip, venv' 2>/dev/null \
    || { echo "bootstrap: $PY has no venv/ensurepip module; on Debian or Ubuntu: apt-get install python3.11-venv" >&2; exit 1; }
version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
# One base per Python: a clone bootstrapped with another one (PYTHON=python3.12) must not replace
# the base every other clone's .venv points into.
VER=$(version "$PY")
BASE="$CACHE/venv"
[ "$VER" = "3.11" ] || BASE="$CACHE/venv-$VER"
mkdir -p "$CACHE"

# The dependency list (runtime + dev) decides whether the base venv needs a pip run.
DEPS=$("$PY" - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))
PY
)
HASH=$(printf '%s' "$DEPS" | sha256sum | cut -c1-16)

# Two clones (or CI beside a developer) bootstrapping at once must not pip-install into the
# shared base virtualenv together: one at a time.
mkdir -p "$CACHE"
exec 9>"$CACHE/.bootstrap.lock"
flock 9
# A venv that cannot run pip is rebuilt, not reused: one half made (python3-venv missing when it
# was created), or one whose interpreter was upgraded or removed since (a dangling symlink, which
# `python -m venv` over it would keep).
# So is one of another Python than its name says (made by an earlier bootstrap that kept one base
# for every Python).
if ! "$BASE/bin/python" -I -m pip --version >/dev/null 2>&1 || [ "$(version "$BASE/bin/python")" != "$VER" ]; then
    echo "bootstrap: creating the base virtualenv in $BASE"
    rm -rf "$BASE"
    "$PY" -m venv "$BASE"
    "$BASE/bin/pip" install -q --upgrade pip
fi
if [ ! -f "$BASE/.deps-$HASH" ]; then
    echo "bootstrap: installing dependencies into $BASE (first run downloads torch: a few minutes)"
    printf '%s\n' "$DEPS" > "$CACHE/requirements-$HASH.txt"
    "$BASE/bin/pip" install -q -r "$CACHE/requirements-$HASH.txt"
    rm -f "$BASE"/.deps-*
    touch "$BASE/.deps-$HASH"
fi

# The clone's own venv: base packages through a .pth line, the project editable on top.
if ! .venv/bin/python -c pass 2>/dev/null || [ "$(version .venv/bin/python)" != "$(version "$BASE/bin/python")" ]; then
    rm -rf .venv
    "$BASE/bin/python" -m venv --without-pip .venv
fi
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BASE_SITE=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$BASE_SITE" > "$SITE/_recsys_base.pth"
# -P: without it the current directory comes first on sys.path and `import recsys` would find
# ./recsys whatever the editable install points at (a copied clone would run the original's code).
if ! .venv/bin/python -P -c 'import recsys, sys; sys.exit(0 if recsys.__file__.startswith(sys.argv[1] + "/") else 1)' "$ROOT" 2>/dev/null \
   || [ ! -x .venv/bin/recsys ] || [ "$(head -1 .venv/bin/recsys)" != "#!$ROOT/.venv/bin/python" ]; then
    "$BASE/bin/pip" --python .venv/bin/python install -q --no-deps --no-build-isolation -e . 
fi

.venv/bin/recsys kafka fetch >/dev/null
echo "bootstrap: ready (.venv, Kafka jars in $CACHE/kafka)"
