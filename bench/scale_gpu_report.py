"""Writes ``bench/results/multi_gpu.md`` (issue 20) and the GPU section of ``bench/scale.md`` (issue 18)
from the device runs' JSON (``bench/results/scale_gpu_run*.json``, written by ``bench/scale_gpu.py``).

Only the section ``## Llama-3-8B shape on the H200 ...`` of ``bench/scale.md`` is replaced (up to the
next ``## `` heading); the other sections (CPU, HQQ, targets, notes) belong to ``bench/scale_report.py``.

    python bench/scale_gpu_report.py
"""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
GPU_HEADING = "## Llama-3-8B shape on the H200"


def _f(x, nd=1):
    return "-" if x is None else f"{x:,.{nd}f}"


def load_runs(paths):
    """{run name: run} of the given JSON files, later files replacing earlier runs of the same name."""
    runs = {}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        for name, r in d.get("gpu", {}).items():
            if r.get("ranks"):
                runs[name] = dict(r, source=os.path.basename(path), device=d.get("device"),
                                  rowsplit=d.get("rowsplit"))
    return runs


def _wall(r):
    return max(x["wall_s"] for x in r["ranks"])


def _t(r, key):
    return [x.get("timers", {}).get(key) for x in r["ranks"]]


def plan_80(shape: str, method: str = "gptq"):
    """`plan`'s prediction for the whole model (80 layers for the 70B shape, 32 for 8B), meta device."""
    import torch
    import transformers

    from lowbit.model.plan import plan

    shapes = {"8b": (32, dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)),
              "70b": (80, dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8))}
    layers, kw = shapes[shape]
    cfg = transformers.LlamaConfig(vocab_size=128256, num_hidden_layers=layers, max_position_embeddings=2048,
                                   tie_word_embeddings=True, **kw)
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    return layers, plan(m, method, bits=4, group_size=128, n_samples=128, seq_len=2048, device="cuda")


def table(runs, names):
    out = ["| run | GPUs | layers | split | wall | per layer | peak GPU per rank | peak host RSS | statistics sums "
           "(all-reduce) | solve broadcasts incl. waiting | GPTQ solve per rank | Hessian accumulation per rank | "
           "codes digest per layer |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = runs.get(name)
        if not r:
            continue
        rk, spec = r["ranks"], r["spec"]
        w = _wall(r)
        solve = " / ".join(_f(x, 1) for x in _t(r, "gptq_solve") + [] if x is not None) or "-"
        if spec["method"] == "awq":
            solve = "AWQ search " + (" / ".join(_f(x, 1) for x in _t(r, "awq_search") if x is not None) or "-")
        split = rk[0].get("dp_split", "-") if spec["nproc"] > 1 else "-"
        out.append(f"| {name} ({r['source']}) | {spec['nproc']} | {spec['layers']} | {split} | {w:.1f} s | "
                   f"{w / spec['layers']:.2f} s | "
                   f"{' / '.join(_f(x['peak_gpu_mb'], 0) for x in rk)} MB | "
                   f"{' / '.join(_f(x['peak_rss_mb'], 0) for x in rk)} MB | "
                   f"{' / '.join(_f(x['comm_s']['reduce'], 2) for x in rk)} s | "
                   f"{' / '.join(_f(x['comm_s']['broadcast'], 1) for x in rk)} s | {solve} s | "
                   f"{' / '.join(_f(x, 1) for x in _t(r, 'stats_add') if x is not None) or '-'} s | "
                   f"`{' '.join(rk[0]['digests'])}` |")
    return out + [""]


def breakdown(runs, names):
    """Where each rank's wall time went (runs with the nested timers of run 7 on), seconds over all layers."""
    out = ["| run | rank | wall | block runner | GPTQ stage: factor / solve / other | Hessians | activation store | "
           "rank agreement | forward passes (rest of the runner) | block moves | outside the runner |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = runs.get(name)
        if not r or "timers_nested" not in r["ranks"][0]:
            continue
        for x in r["ranks"]:
            t, n = x["timers"], x["timers_nested"]
            run_s, stage = n["block_runner"], n["gptq_stage"]
            fwd = run_s - stage - t["stats_add"] - t["activation_store"] - n["min_over_ranks"]
            outside = (x["wall_s"] - run_s - t["block_to"] - t["capture_block0"] - t["install_stages"]
                       - t.get("prefetch_wait", 0.0))
            out.append(f"| {name} ({r['source']}) | {x['rank']} | {x['wall_s']:.2f} | {run_s:.2f} | "
                       f"{t['gptq_factor']:.2f} / {t['gptq_solve']:.2f} / {stage - t['gptq_factor'] - t['gptq_solve']:.2f} | "
                       f"{t['stats_add']:.2f} | {t['activation_store']:.2f} | {n['min_over_ranks']:.2f} | {fwd:.2f} | "
                       f"{t['block_to']:.2f} (prefetch wait {t.get('prefetch_wait', 0.0):.2f}) | {outside:.2f} |")
    return out + [""]


def plan_table(runs, names):
    """`plan`'s GPU time model (lowbit.model.plan_gpu, rates measured in the same process) against the run."""
    out = ["| run | GPUs | layers | measured wall | predicted | error | predicted parts per layer: forward / Hessians / "
           "factor / solve / collectives |", "|---|---|---|---|---|---|---|"]
    for name in names:
        r = runs.get(name)
        if not r or "plan_gpu" not in r["ranks"][0]:
            continue
        p = max((x["plan_gpu"] for x in r["ranks"]), key=lambda q: q["seconds"])
        if "timers_nested" in r["ranks"][0]:  # run 7 on: the model as it is now (flip factor, stacked pieces)
            p = _plan_now(r) or p
        w = _wall(r)
        out.append(f"| {name} ({r['source']}) | {r['spec']['nproc']} | {r['spec']['layers']} | {w:.1f} s | "
                   f"{p['seconds']:.1f} s | {(p['seconds'] - w) / w * 100:+.0f}% | {p['forward_s']:.2f} / "
                   f"{p['hessian_s']:.2f} / {p['factor_s']:.2f} / {p['solve_s']:.2f} / {p['comm_s']:.2f} s |")
    return out + [""]


def _plan_now(r):
    """The current model (:func:`lowbit.model.plan_gpu.gpu_seconds`, defaults) with the rates the run measured."""
    try:
        import torch
        import transformers

        from lowbit.model import plan_gpu
    except ImportError:
        return None
    shapes = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
              "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)}
    spec = r["spec"]
    cfg = transformers.LlamaConfig(vocab_size=128256, num_hidden_layers=spec["layers"], max_position_embeddings=2048,
                                   tie_word_embeddings=True, **shapes[spec["shape"]])
    with torch.device("meta"):
        m = transformers.LlamaForCausalLM(cfg)
    return max((plan_gpu.gpu_seconds(m, spec["method"], 128, 2048, world=spec["nproc"], rates=x["rates"])
                for x in r["ranks"]), key=lambda q: q["seconds"])


def multi_gpu(runs, call_runs, path):
    L = ["# Multi-GPU data-parallel calibration (issue 20)", "",
         "Written by `bench/scale_gpu_report.py` from `bench/results/scale_gpu_run*.json` (`bench/scale_gpu.py` "
         "on `nvidia-h200-x2`: 2 H200 of one host, NCCL, `NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
         "NVSHMEM_DISABLE_NVLS=1`). Reproduce: `PYTHONPATH=$PWD bash bench/gpu_call_dp2.sh` (run 7; "
         "`bench/gpu_call_dp.sh` for runs 5-6) on the 2-GPU machine, copy `$OUT/gpu.json` to "
         "`bench/results/scale_gpu_runN.json`, then `python bench/scale_gpu_report.py`.", "",
         "Llama-3-8B-shaped decoder (hidden 4096, MLP 14336, 32/8 heads) and a 70B-class slice (hidden 8192, "
         "MLP 28672, 64/8 heads), random bf16 weights (drawn on the GPU, seed 0, the same in every process), "
         "model on the CPU, `device=\"cuda\"`, GPTQ int4 g128 asym, 128 x 2048 random calibration tokens "
         "(seed 1), `max_memory` 16 GB (8B) / 40 GB (70B). Wall = `quantize_model_ptq` alone (model build and "
         "process start excluded), the slower rank. Timers: device-synchronised seconds inside "
         "`gptq_quantize` (solve) and `InputStats.add*` (Hessian accumulation) per rank.", ""]
    for title, call in reversed(call_runs):  # latest first
        L += [f"## {title}", ""] + table(call, list(call))
    L += ["## Where the time goes (run 7 on: nested timers)", "",
          "Seconds over all layers, per rank, device-synchronised. 'block runner' is `_BlockRunner.run` (the passes "
          "over the micro-batches and every stage's solve); inside it the GPTQ stage (`_gptq_stage`: factorisation, "
          "solve, broadcasts and weight updates), the Hessian accumulation, the activation store (`get`/`put`; it "
          "also holds the captured block-0 inputs, outside the runner) and the per-pass rank agreement "
          "(`min_over_ranks`, waiting for the slower rank); 'forward passes' is the runner's rest. 'block moves' is "
          "the main thread's `block.to` (with the prefetch: block 0 and the moves home); 'outside the runner' is the "
          "wall time no timer covers (the non-block weights to the device and back, the pipeline's bookkeeping; and "
          "the stores of the block-0 inputs: the forward column subtracts the whole store time, so it is short by "
          "as much as these stores take).", ""]
    L += breakdown(runs, [n for n in ("gptq_8b_1gpu", "gptq_8b_2gpu", "gptq_70b_2gpu") if n in runs])
    L += ["## `plan`'s GPU time model against the runs (latest run of each name)", "",
          "Predicted in each worker before its run by `lowbit.model.plan_gpu.gpu_seconds` (the GEMM, bandwidth and "
          "sweep rates measured there in about 2 s by `measure_rates`; the forward, factorisation and AWQ-search "
          "constants fitted on `scale_gpu_run3/4.json`, before the fused sweep; from run 7 the factorisation "
          "constants of the flip method, measured in `run7_logs/check.json`, and a rank's aligned row pieces "
          "solved in one call); the slower rank's prediction. Run 7 is out of sample for the forward constants.", ""]
    L += plan_table(runs, ["gptq_8b_1gpu", "gptq_8b_2gpu", "awq_8b_1gpu", "awq_8b_2gpu", "gptq_70b_2gpu"])
    g1, g2 = runs.get("gptq_8b_1gpu"), runs.get("gptq_8b_2gpu")
    if g1 and g2 and g1["source"] != g2["source"]:  # compare runs of the same call (the same code)
        g2 = next((c[1]["gptq_8b_2gpu"] for c in call_runs if "gptq_8b_2gpu" in c[1]
                   and c[1]["gptq_8b_2gpu"]["source"] == g1["source"]), g2)
    a1, a2 = runs.get("awq_8b_1gpu"), runs.get("awq_8b_2gpu")
    t = []
    if g1 and g2:
        sp = _wall(g1) / g1["spec"]["layers"] / (_wall(g2) / g2["spec"]["layers"])
        same_len = g1["spec"]["layers"] == g2["spec"]["layers"]
        t.append(("2 GPUs >= 1.8x the 1-GPU speed, 8B GPTQ, same slice", f"{sp:.2f}x ({g1['spec']['layers']} vs "
                  f"{g2['spec']['layers']} layers, split `{g2['ranks'][0].get('dp_split')}`)",
                  "met" if sp >= 1.8 and same_len else "missed"))
        d1, d2 = g1["ranks"][0]["digests"], [x["digests"] for x in g2["ranks"]]
        n = min(len(d1), len(d2[0]))
        same = all(d[:n] == d1[:n] for d in d2)
        t.append(("codes bit-identical 1 vs 2 GPUs", f"layers 0-{n - 1}: {'identical' if same else 'DIFFERENT'} "
                  "digests on every rank", "met" if same else "missed"))
    if a1 and a2:
        sp = _wall(a1) / a1["spec"]["layers"] / (_wall(a2) / a2["spec"]["layers"])
        same = all(x["digests"] == a1["ranks"][0]["digests"] for x in a2["ranks"])
        t.append(("(AWQ 8B, 2 GPUs vs 1, same slice; codes)", f"{sp:.2f}x ({a1['source']} / {a2['source']}); "
                  f"{'identical' if same else 'DIFFERENT'} digests", ""))
    g70 = runs.get("gptq_70b_2gpu")
    if g70:
        layers, p = plan_80("70b")
        per = _wall(g70) / g70["spec"]["layers"]
        pk = max(x["peak_gpu_mb"] for x in g70["ranks"])
        pg = max((x["plan_gpu"] for x in g70["ranks"] if "plan_gpu" in x), key=lambda q: q["per_block_s"], default=None)
        if pg:
            err = (pg["per_block_s"] - per) / per
            t.append(("70B-class slice, 2 GPUs: extrapolation within 15% of `plan`", f"{per:.2f} s/layer -> "
                      f"{per * layers / 60:.1f} min for {layers} layers; `plan` (GPU model, 2 GPUs) "
                      f"{pg['per_block_s']:.2f} s/layer -> {pg['per_block_s'] * layers / 60:.1f} min ({err * 100:+.0f}%)",
                      "met" if abs(err) <= 0.15 else "missed"))
        t.append(("70B-class slice, 2 GPUs: peak GPU per rank vs `plan`", f"{pk:,.0f} MB measured vs "
                  f"{p['accelerator_mb']:,.0f} MB `plan` (accelerator_mb, for 1 process; {g70['spec']['layers']}-layer "
                  "slice: the peak is per block, so it holds for 80)",
                  "met" if abs(pk - p["accelerator_mb"]) <= 0.15 * pk else
                  f"missed ({(p['accelerator_mb'] - pk) / pk * 100:+.0f}%)"))
    rss = []
    for title, call in call_runs:
        r0 = next((r for r in call.values() if r.get("rowsplit")), None)
        if r0:
            rss.append((r0["source"], r0["rowsplit"]))
    if rss:
        L += ["## Row-split identity check (on GPU 1, before the 2-GPU runs of the same call)", "",
              "GPTQ of 8B-shaped linears (random weights, Hessian of random inputs) whole and in the two row "
              "pieces a 2-rank run solves; the 2-GPU runs fall back to whole linears per rank "
              "(`LOWBIT_DP_SPLIT=units`) when the pieces are not bit-identical. In the first call the block update "
              "was one product over all rows; in the second it ran in 1024-row chunks.", "",
              "| call | linear | shape | cut | identical | whole | two pieces, one after the other |",
              "|---|---|---|---|---|---|---|"]
        for src, rs in rss:
            for n, v in rs.items():
                if isinstance(v, dict) and "shape" in v:
                    L.append(f"| {src} | {n} | {v['shape'][0]} x {v['shape'][1]} | {v['cut']} | {v['identical']} | "
                             f"{v['whole_s']:.2f} s | {v['pieces_s']:.2f} s |")
        L += ["", "Times: the second call's check ran beside 15 cuSPARSELt test processes on the same GPU.", ""]
    if t:
        L += ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in t] + [""]
    L += NOTES
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


NOTES = [
    "## Notes", "",
    "- Fused sweep (runs 5-6): `lowbit.kernels.triton.gptq_sweep` quantizes one block of 128 columns per launch, "
    "a program holding 16 rows x 128 columns in registers (IEEE divisions, half-to-even rounding, the update as "
    "one fma); the lazy update beyond the block stays cuBLAS in 1024-row chunks. It runs when every group the "
    "block touches is already fitted (the default `static_groups=True`; otherwise the torch column loop). "
    "Against the torch loop on the H200 (`tests/test_gptq_sweep.py`, `bench/results/run6_logs/sweep_tests.jsonl`): "
    "codes differ in 1e-6 (int4 g128 asym, 1024 x 4096), 3.4e-5 (512 x 14336), 1.5e-4 (int4 sym), 8e-5 (int3 "
    "g64, no act_order), 0 (ragged g96) and 2.0e-3 (int8 per channel: 255 levels) of the weights, float-rounding "
    "ties; tr(E H E^T) within 2.7e-5 relative in every case. Scales and zeros are identical (fitted before the "
    "sweep). The kernel equals its torch emulation bit for bit on the GPU (3 block shapes).",
    "- Hessians (runs 5-6): bf16 inputs on CUDA form each sample's `x^T x` by a bf16 GEMM with fp32 accumulation "
    "and output (`bmm(..., out_dtype=float32)`) instead of an fp32 GEMM of the upcast values (the products of two "
    "bf16 values are exact in fp32; relative error to float64 8.5e-7, micro-batch invariance kept): the "
    "accumulation went from 10.9 s to 1.9 s per 4 8B layers. Codes therefore differ from runs 1-4 (new digests), "
    "and are identical between 1 and 2 GPUs.",
    "- Data parallel: each rank runs its contiguous share of the 128 samples through the block; per-sample "
    "Hessians are summed in float64 in sample order, the ranks' sums added in rank order, so every rank holds the "
    "same Hessian and factorisation. GPTQ split `rows`: a stage's output rows (its linears stacked) in one "
    "equal share per rank on multiples of 1024 rows, solved, then broadcast. AWQ (run 6): every rank runs the "
    "stage's search itself (same inputs, same result; identical digests), instead of one rank searching and "
    "broadcasting its pickled result, which cost 12-13 s per 2 layers in run 5 (`LOWBIT_DP_AWQ=owner` keeps that).",
    "- (Run 6, kept for the record) Why 2 GPUs gave 1.46x and not 1.8x (8B GPTQ, run 6, 4 layers): of the 1-GPU 14.2 s, the factorisation "
    "(1.1 s: every rank factors every stage's Hessian) and moving the blocks to the GPU and back (0.6 s) do not "
    "shrink with more ranks; the rest does (forward passes 5.5 -> 3.5 s, activation store 3.1 -> 1.4 s, Hessians "
    "1.9 -> 1.0 s, solve 2.0 -> 1.3/1.9 s per rank). Amdahl with 1.7 s serial out of 14.2 s bounds 2 GPUs at "
    "14.2 / (1.7 + 12.5 / 2) = 1.79x even if everything else halved exactly; measured 1.46x because the "
    "forward passes (5.5 -> 3.5 s) and the slower rank's solve (2.0 -> 1.9 s, its row pieces: v_proj/k_proj/"
    "q_proj tail) do not halve. Before the fused sweep the solve was 21 s of 42 s and did not shrink at all "
    "(1.20x). Ways further (not done): factor on one rank per stage while the other runs the next micro-batches "
    "(needs the pipeline to overlap stages), prefetch the next block to the GPU during the current one, and one "
    "Cholesky + one triangular inverse for the factor (today two Cholesky factorisations and an inverse).",
    "- Run 7 (`bench/gpu_call_dp2.sh`, `bench/results/run7_logs/`): 8B GPTQ 1 GPU 14.19 -> 12.22 s, 2 GPUs 9.74 -> "
    "8.05 s, 1.46x -> 1.52x; codes identical 1 vs 2 GPUs (new digests: the flip factorisation rounds differently "
    "from runs 5-6). What changed and what it bought: (1) factorisation `LOWBIT_GPTQ_FACTOR=flip`, the CUDA "
    "default: `J A J = L L^T`, `U = J L^-1 J` (one Cholesky and a triangular inverse in 2048-column chunks "
    "`L[a:, a:] X = I[a:, a:b]`, about a quarter of the flops of Cholesky + inverse + Cholesky): k = 14336 0.223 -> "
    "0.078 s, k = 4096 13.3 -> 5.5 ms, factors within 1.6e-6 relative of the old ones (`check.json`); 1.09 -> "
    "0.41 s per 4 layers on every rank. The CPU keeps `inverse` (CPU outputs unchanged). (2) No host sync per GPTQ "
    "block (the group index kept on the device, the fits' shrink factors cached on the device, no `isinf(...).any()` "
    "/ `(scale > 0).all()` checks on CUDA): 1-GPU solve 1.99 -> 1.58 s. (3) A rank's row pieces stacked into one "
    "`gptq_quantize` call where every piece but the last is a multiple of 1024 rows (`_solve_batches`; "
    "`LOWBIT_DP_BATCH=0` turns it off): the solve is per-call launch cost (`K / 128` blocks whatever the rows), so "
    "rank 1's q-tail + k + v took 74 ms in three calls and takes 27 ms stacked, the same as rank 0's one 3072-row "
    "piece (`check.json`; bit-identical to the pieces alone and to the whole linears); per rank 1.34 / 1.86 -> "
    "0.97 / 0.97 s. (4) The next block copied to the GPU in a background thread on a side stream while the "
    "current one calibrates (`LOWBIT_PREFETCH=0` turns it off; one more block of device memory budgeted): block "
    "moves 0.60 -> 0.39 s (what is left is the moves home and block 0), waiting for the prefetch 0.00 s. (5) A "
    "block's outputs become the next block's inputs inside the activation store (`ActivationStore.replace_first`, "
    "no copies) instead of two round trips through host memory: store 3.07 -> 2.69 s (1 GPU), 1.40 -> 1.28 s.",
    "- Why 2 GPUs give 1.52x and not 1.8x (run 7, 'Where the time goes'): every part that depends on the samples "
    "now halves (forward passes 2.56 -> 1.30 s, Hessians 1.86 -> 0.94 s, activation store 2.69 -> 1.28 s); what "
    "does not is about 4.5 s of the 2-GPU 8.05 s: about 2.5 s outside the block runner, the same on 1 and 2 GPUs "
    "(no timer of run 7 covers it: the 1 GB embedding moved to the device at the start and back at the end, "
    "through pageable memory, is the only sizeable device traffic there; the block-0 inputs' stores are in it too, "
    "but they halve with 2 ranks and the total does not; run 8's timers `run_calibrated` and `non_block_moves` "
    "will say), the solve (0.97 s per rank against 1.58 s on 1 GPU: launch-bound, each rank sweeps "
    "all `K / 128` blocks of its stage), the factorisation (0.41 s, every rank) and the moves home (0.38 s). "
    "On 1 GPU the halving parts are 7.1 s of 12.22 s: 8.05 = 4.5 + 7.1 / 2. 1.8x needs the 2-GPU run at 6.8 s, i.e. about 1.3 s less serial time with "
    "the 1-GPU run unchanged. After the call (not measured on the GPU): the weights outside the blocks are put back "
    "at the end instead of copied back (when nothing outside the blocks was quantized), and the finished blocks' "
    "quantized states follow their block home (the pipeline's `states` kept the device copies: every finished "
    "block's codes stayed on the GPU, about 0.12 GB per 8B block and 0.45 GB per 70B-shaped block, more than the "
    "40 GB budget over 80 blocks); the prefetch copies all go through one side stream (run 7 took a pooled stream "
    "per block, whose freed memory the caching allocator keeps per stream). Caveat on the ratio: the 1-process path still solves a stage's linears one call "
    "each (q, k, v: three calls, 123 ms per 8B layer in `check.json`); stacking them as the ranks do would make the "
    "1-GPU run about 0.5 s faster too (an estimate; not done, as it is not the data-parallel path), which would "
    "lower the ratio to about 1.46x.",
    "- `plan`'s GPU model (`lowbit.model.plan_gpu`): the 70B-class check is partly in-sample: the forward "
    "constants were fitted on the 8B runs of run 4 (the 70B slice of run 4 agreed within 3%) and the "
    "factorisation constants on the 8B and 70B runs of run 4; the Hessian and solve terms come from rates "
    "measured in the run's own process (about 2 s). Peak GPU memory: `plan`'s `accelerator_mb` is still one "
    "process without the `max_memory` budget (the 70B peak follows the 40 GB budget): missed, not part of this "
    "work.",
    "- 'solve broadcasts incl. waiting' is the time in the broadcasts of the solved pieces, including the wait "
    "for the slower rank's solve; 'statistics sums' is the rank-ordered all-reduce of the Hessians. Timers are "
    "device-synchronised; the other timers of a run (installs, block capture, activation store, block moves) are "
    "in the JSON.",
]


def scale_gpu_section(runs, md_path):
    names = [n for n in ("gptq_8b_1gpu", "gptq_8b_2gpu", "awq_8b_1gpu", "awq_8b_2gpu", "gptq_70b_2gpu") if n in runs]
    L = [f"{GPU_HEADING} (random bf16, model on the CPU, device cuda), 128 x 2048", "",
         "Written by `bench/scale_gpu_report.py` (this section only) from `bench/results/scale_gpu_run*.json` "
         "(`bench/scale_gpu.py`; the latest run of each name; reproduce: `PYTHONPATH=$PWD bash bench/gpu_call_dp.sh` "
         "on `nvidia-h200-x2`). One process per GPU; 2-GPU rows are `torchrun` NCCL runs. Peak GPU = "
         "`torch.cuda.max_memory_allocated` per rank; peak host RSS = `VmHWM` (the random model on the CPU "
         "included). See `bench/results/multi_gpu.md` for the 2-GPU details.", ""] + table(runs, names)
    t = []
    g1 = runs.get("gptq_8b_1gpu")
    if g1:
        pk = g1["ranks"][0]["peak_gpu_mb"]
        per = _wall(g1) / g1["spec"]["layers"]
        t.append(("8B GPTQ int4 g128, 1 H200: peak GPU <= 16 GB", f"{pk:,.0f} MB", "met" if pk <= 16384 else "missed"))
        t.append(("8B GPTQ, 1 H200: <= 5 min for 32 layers (<= 9.4 s/layer)", f"{per:.2f} s/layer over "
                  f"{g1['spec']['layers']} layers -> {per * 32 / 60:.1f} min for 32", "met" if per * 32 <= 300 else
                  "missed"))
        pg = g1["ranks"][0].get("plan_gpu")
        if pg:
            err = (pg["seconds"] - _wall(g1)) / _wall(g1)
            t.append(("`plan` within 25% of the time, 8B GPTQ, 1 H200", f"predicted {pg['seconds']:.1f} s, measured "
                      f"{_wall(g1):.1f} s ({err * 100:+.0f}%)", "met" if abs(err) <= 0.25 else "missed"))
        tm = g1["ranks"][0].get("timers", {})
        nt = g1["ranks"][0].get("timers_nested")
        if tm and nt:
            fwd = nt["block_runner"] - nt["gptq_stage"] - tm["stats_add"] - tm["activation_store"] - nt["min_over_ranks"]
            t.append(("(where the 1-GPU time goes, all layers)", f"GPTQ solve {tm['gptq_solve']:.1f} s, factorisation "
                      f"{tm['gptq_factor']:.1f} s, Hessian accumulation {tm['stats_add']:.1f} s, activation store "
                      f"{tm['activation_store']:.1f} s, forward passes {fwd:.1f} s, block moves {tm['block_to']:.1f} s, "
                      f"outside the block runner {_wall(g1) - nt['block_runner'] - tm['block_to']:.1f} s of "
                      f"{_wall(g1):.1f} s", ""))
        elif tm:
            t.append(("(where the 1-GPU time goes, all layers)", f"GPTQ solve {tm.get('gptq_solve', 0):.1f} s, "
                      f"factorisation {tm.get('gptq_factor', 0):.1f} s, Hessian accumulation "
                      f"{tm.get('stats_add', 0):.1f} s, activation store {tm.get('activation_store', 0):.1f} s, "
                      f"block moves {tm.get('block_to', 0):.1f} s, rest (forward passes) "
                      f"{_wall(g1) - sum(tm.values()):.1f} s of {_wall(g1):.1f} s", ""))
    a1 = runs.get("awq_8b_1gpu")
    if a1:
        pk = a1["ranks"][0]["peak_gpu_mb"]
        t.append(("8B AWQ, 1 H200: peak GPU <= 14 GB", f"{pk:,.0f} MB ({_wall(a1) / a1['spec']['layers']:.2f} s/layer)",
                  "met" if pk <= 14336 else "missed"))
    if t:
        L += ["GPU targets (issue 18):", "", "| target | measured | status |", "|---|---|---|"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in t] + [""]
    with open(md_path) as f:
        text = f.read()
    start = text.index(GPU_HEADING)
    nxt = text.find("\n## ", start + 1)
    new = text[:start] + "\n".join(L) + ("\n" + text[nxt + 1:] if nxt >= 0 else "\n")
    with open(md_path, "w") as f:
        f.write(new)


CALLS = {
    "scale_gpu_run1.json": "previous session, first call (pickled broadcasts; the 1-GPU runs failed on a script bug)",
    "scale_gpu_run2.json": "previous session, second call (2-GPU run timed out)",
    "scale_gpu_run3.json": "this session, first call: split `units` (the row pieces were not yet bit-identical on "
                           "the GPU, so the driver fell back to whole linears per rank)",
    "scale_gpu_run4.json": "this session, second call: split `rows` (block update in 1024-row chunks)",
    "scale_gpu_run5.json": "fused GPTQ sweep (Triton) and half-precision Hessian products, first call (the 1-GPU "
                           "runs crashed on `torch.cuda.set_device('cuda')` in the pipeline's worker thread; AWQ 2-GPU "
                           "still broadcast each stage's pickled search result)",
    "scale_gpu_run6.json": "fused GPTQ sweep, second call: 1-GPU runs (worker-thread device fixed), AWQ 2-GPU with "
                           "every rank searching",
    "scale_gpu_run7.json": "a rank's row pieces stacked into one solve, no host syncs per GPTQ block, the flip "
                           "factorisation, block outputs kept in the store as the next inputs, the next block "
                           "prefetched on a side stream (`bench/gpu_call_dp2.sh`; the 70B slice skipped: budget)",
}


def main():
    paths = sorted(glob.glob(os.path.join(RESULTS, "scale_gpu_run*.json")))
    runs = load_runs(paths)
    per_call = [(f"`{os.path.basename(p)}`: {CALLS.get(os.path.basename(p), '')}", load_runs([p])) for p in paths]
    multi_gpu(runs, per_call, os.path.join(RESULTS, "multi_gpu.md"))
    scale_gpu_section(runs, os.path.join(HERE, "scale.md"))


if __name__ == "__main__":
    main()
