"""Whole-file identity for bench/kquants.py: every tensor of llama.cpp's files (``llamacpp-<TYPE>.gguf`` in the
workdir, from ``--stage llama``) re-quantized by lowbit from the same F16 GGUF values and compared byte for byte.

    python bench/kquants_identity.py Q4_K_M Q3_K_M Q6_K Q5_K_M Q4_K_S Q4_0 Q8_0   (writes WORKDIR/file_identity.json)
"""
import json
import os
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowbit.formats import gguf as fmt  # noqa: E402
from lowbit.formats import kquants as kq  # noqa: E402

WORK = os.environ.get("KQ_WORKDIR", "/tmp/kq-bench")
src = {t.name: t for t in gguf.GGUFReader(f"{WORK}/lowbit-F16.gguf").tensors}
res = {}
for typ in sys.argv[1:]:
    t0 = time.time()
    ll = gguf.GGUFReader(f"{WORK}/llamacpp-{typ}.gguf")
    n = same = 0
    bad = []
    for t in ll.tensors:
        n += 1
        q = t.tensor_type.name
        x = np.asarray(src[t.name].data)
        if q in ("F32", "F16"):
            ok = q == src[t.name].tensor_type.name and np.array_equal(np.asarray(t.data), x)
        else:
            w = torch.from_numpy(x.astype(np.float32)).reshape(-1, x.shape[-1])
            mod = kq if kq.is_kquant(q) else fmt
            ok = np.array_equal(mod.quantize_rows(w, q).numpy().reshape(-1), np.asarray(t.data).reshape(-1))
        same += ok
        if not ok: bad.append(t.name)
    res[typ] = {"tensors": n, "byte_identical": same, "differ": bad[:10], "s": time.time() - t0}
    print(typ, res[typ], flush=True)
json.dump(res, open(f"{WORK}/file_identity.json", "w"), indent=1)
