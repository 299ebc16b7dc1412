#!/usr/bin/env bash
# Seventh session (lead): bench/user_decode.py once more for the 4-bit rows after the LOWBIT_DENSE_CHUNK_MB default
# became 128 (peak GB during generate against bitsandbytes nf4; prefill 512 with 128 vs 32 side by side), GPU 0
# alone (helper kern4's int4 row ran beside gpu.py's start on the other GPU and read slow).
#   cd <copy of the repo> && WHL=.dev-lead/whl bash bench/lead_call6.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
W=${WHL:-.dev-lead/whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site
mkdir -p $OUT/decode
CUDA_VISIBLE_DEVICES=0 timeout ${T:-130} taskset -c 0-15 python3 bench/user_decode.py --layers 8 --reps 3 \
  --only bf16,bnb,int4,nf4,gptq --graph bf16,bnb,int4,nf4,gptq --prefill-chunks 128,32 --time-budget ${B:-100} \
  --out-dir $OUT/decode > $OUT/decode.log 2>&1
echo "decode rc=$?" >> $OUT/decode.log
find $OUT/decode -type f ! -name "*.json" -delete
grep -vE "Warning|warn\(|return forward_call|^\s*$|Configuration class" $OUT/decode.log | cut -c1-260 | tail -16
