"""Where HQQ's gain comes from on SmolLM2 int4 g64 (8-window perplexity screening, fake quantization).

Each variant replaces every linear weight (``lm_head`` excluded) by its dequantized value, then the
perplexity of the first ``NW`` (default 8) windows of 512 tokens of WikiText-2 ``test.txt`` (bench/ptq.py's
protocol with fewer windows, for speed on the shared 2-core CPU). Variants:

* ``pkg``: the hqq package's ``Quantizer.quantize`` (HQQLinear's defaults: axis 1, round_zero, float zero);
* ``float``: the HQQ solver with float zeros (written out here, beta growing by 1.01: the shrinkage is 0
  on these weights, so beta does not matter);
* ``round`` / ``round_ls`` / ``intproj``: integer zeros: the solved zero rounded (step kept), rounded with a
  least-squares step refit, or rounded at every iteration;
* ``cover_hqq`` / ``cover_rtn``: integer zero and the smallest step covering the HQQ grid's range / the
  group's range;
* ``float_minmax``: min/max grid with a float zero, no optimisation; ``int_rtn``: lowbit's RTN (integer zero).

Run: ``NW=8 PYTHONPATH=$PWD:/work/hqq-path python bench/hqq_screen.py float round ...`` (one JSON line per
variant; results in bench/results/hqq_screen.jsonl).
"""
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from ptq import WIKI, _linears, load_model, ppl  # noqa: E402

import lowbit  # noqa: E402
from lowbit.algorithms.grid import AffineGrid  # noqa: E402
from lowbit.algorithms.hqq import _cover, _grouped, hqq_optimize  # noqa: E402
from lowbit.algorithms.rtn import rtn_quantize  # noqa: E402
from lowbit.data.calibration import load_text  # noqa: E402
from lowbit.eval.perplexity import encode_text  # noqa: E402

M = 15


def shrink(x, beta, p=0.7):
    a = x.abs()
    return torch.sign(x) * torch.relu(a - (1.0 / beta) * a.pow(p - 1))


def hqq_float(W, g, mode, iters=20, beta=10.0, kappa=1.01):
    shape = W.shape
    W = W.float().reshape(-1, g)
    mn, mx = W.amin(1, keepdim=True), W.amax(1, keepdim=True)
    d = mx - mn
    s = torch.where(d.abs() <= 1e-4, torch.ones_like(d), M / d).clamp(max=2e4)
    z = torch.round(-mn * s)
    best = float("inf")
    for _ in range(iters):
        Wq = torch.round(W * s + z).clamp(0, M)
        Wr = (Wq - z) / s
        zn = torch.mean(Wq - (W - shrink(W - Wr, beta)) * s, 1, keepdim=True)
        z = zn.round().clamp(0, M) if mode == "intproj" else zn
        beta *= kappa
        err = float((W - Wr).abs().mean())
        if err < best:
            best = err
        else:
            break
    if mode in ("round", "round_ls"):
        z = z.round().clamp(0, M)
    Wq = torch.round(W * s + z).clamp(0, M)
    sc = 1.0 / s
    if mode == "round_ls":
        c = Wq - z
        den = (c * c).sum(1, keepdim=True)
        s2 = (c * W).sum(1, keepdim=True) / den.clamp_min(1e-30)
        sc = torch.where((den > 0) & (s2 > 0), s2, sc)
        Wq = torch.round(W / sc + z).clamp(0, M)
    return ((Wq - z) * sc).reshape(shape)


def variant(W, name):
    if name == "pkg":
        from hqq.core.quantize import Quantizer

        Wq, meta = Quantizer.quantize(W, nbits=4, group_size=64, optimize=True, round_zero=True, axis=1,
                                      bitpack=False, device="cpu", compute_dtype=torch.float32)
        meta["compute_dtype"] = torch.float32
        return Quantizer.dequantize(Wq, meta)
    if name == "int_rtn":
        return lowbit.dequantize(rtn_quantize(W, 4, 64, False))
    if name == "float_minmax":
        w = W.reshape(-1, 64)
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        s = M / (hi - lo)
        z = -lo * s
        return ((torch.round(w * s + z).clamp(0, M) - z) / s).reshape(W.shape)
    if name.startswith("cover"):
        wg, mask, _ = _grouped(W, 64)
        if name == "cover_rtn":
            lo, hi = wg.amin(-1), wg.amax(-1)
        else:
            s, z, _ = hqq_optimize(wg, mask, AffineGrid(4, False, "minmax"))
            lo, hi = -z / s, (M - z) / s
        t, zi = _cover(lo, hi, M)
        q = torch.round(wg / t.unsqueeze(-1) + zi.unsqueeze(-1)).clamp(0, M)
        return ((q - zi.unsqueeze(-1)) * t.unsqueeze(-1)).reshape(W.shape)
    return hqq_float(W, 64, name)


def main():
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    nw = int(os.environ.get("NW", "8"))
    base, tok = load_model("cpu")
    test = encode_text(tok, load_text(os.path.join(WIKI, "test.txt")))[: nw * 512 + 1]
    for name in sys.argv[1:]:
        m = copy.deepcopy(base)
        t = time.perf_counter()
        for _, lin in _linears(m):
            lin.weight.data = variant(lin.weight.data, name).to(lin.weight.dtype)
        r = dict(variant=name, windows=nw, quant_s=time.perf_counter() - t, load=os.getloadavg()[0])
        r["ppl"] = ppl(m, test, nw)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
