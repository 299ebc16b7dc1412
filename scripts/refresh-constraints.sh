#!/usr/bin/env bash
# Re-pin constraints.txt on purpose: install the newest releases that pyproject.toml allows into a fresh venv
# (torch stays 2.13.0, the CPU build), run the whole suite there (as CI does: pytest -q -n 2, slow tests
# included), and only if it passes rewrite constraints.txt with that venv's exact versions.
#   bash scripts/refresh-constraints.sh            # fresh venv in a temporary folder, removed afterwards
#   REFRESH_VENV=DIR bash scripts/refresh-constraints.sh   # keep the venv in DIR
#   REFRESH_PYTEST_ARGS="-m 'not slow'" ...        # other pytest arguments (default: -q -n 2)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REFRESH_VENV:-$(mktemp -d)/venv}
cleanup() { [ -n "${REFRESH_VENV:-}" ] || rm -rf "$(dirname "$VENV")"; }
trap cleanup EXIT
echo "refresh-constraints: resolving the newest releases into $VENV"
LOWBIT_VENV="$VENV" LOWBIT_CONSTRAINTS= bash scripts/install.sh
echo "refresh-constraints: running the suite"
if ! eval "\"$VENV/bin/python\" -m pytest ${REFRESH_PYTEST_ARGS:--q -n 2}"; then
  echo "refresh-constraints: the suite fails with the newest releases; constraints.txt left unchanged" >&2
  exit 1
fi
NEW=$(mktemp)
{
  sed -n '1,/^[^#]/{/^#/p}' constraints.txt
  "$VENV/bin/python" -m pip freeze --all --exclude-editable | grep -iv '^lowbit\b' | grep -v '^#\|^-e' \
    | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > "$NEW"
if cmp -s "$NEW" constraints.txt; then
  echo "refresh-constraints: suite passed; pins unchanged"
else
  diff -u constraints.txt "$NEW" || true
  mv "$NEW" constraints.txt
  echo "refresh-constraints: suite passed; constraints.txt rewritten (review the diff above and commit it)"
fi
rm -f "$NEW"
