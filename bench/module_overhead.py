"""Host-side cost of one quantized linear *module* call on the CUDA path, measured on the CPU (no GPU needed).

``module(x)`` from ``forward`` down to the kernel launch, per module kind, at M = 1 (decode), bf16, 4096 x 4096:
``Linear4bit`` nf4 / int4, ``QLinear`` qint4 (int4 g128) / qint8 weight-only / int8-dynamic / fp8-dynamic, the
GPTQ-format module (``QLinear`` with an int4_asym g128 state and fp16 scales, what ``load_gptq`` builds) and the
GGUF Q4_0 module (``QLinear`` with a ``layout="gguf"`` state). The CUDA layout is derived on the CPU by the same
functions and stored on the state; the input is a CPU tensor whose ``is_cuda`` reads True (a subclass without
``__torch_function__``, so ops on it cost what they cost on a plain tensor); the driver launches are stubbed out:
lowbit's direct launches (``lowbit_mm._launch``, ``gemv._launch``) and, for the dynamic-activation paths, the
Triton launcher itself (``kernel[grid](...)`` of the activation quantization and the scaled GEMM; the launcher's
own Python cost is then not in the figures) and ``torch._scaled_mm`` (fp8, backend native); the backend selection
is asked for a CUDA device. The floor: an ``nn.Module`` call that only allocates the output (what any module
costs before its kernel) and ``nn.Linear(16, 16)`` in bf16 on the CPU (module call + ``F.linear`` dispatch with
negligible math: ``F.linear``'s host cost; on CUDA its cuBLAS launch adds to it). Rows interleaved; the box
may be shared, so read the ratios.

    python bench/module_overhead.py [--out bench/results/module_overhead.md] [--compare REF]

``--compare REF``: a second copy of the repository (e.g. a ``git worktree`` of the commit before) timed in the same
process, interleaved (its ``lowbit`` imported under another name).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class _FakeCuda(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl
    is_cuda = True
    is_cpu = False


class _Stub:
    def __getitem__(self, grid):
        return _noop

    def __call__(self, *a, **k):
        return None


def _noop(*a, **k):
    return None


def setup():
    """Stubs and the modules of the imported lowbit tree: {row name: module}, input."""
    from lowbit import nn as lnn
    from lowbit.kernels import linear as L
    from lowbit.kernels import native as nat
    from lowbit.kernels import select as sel
    from lowbit.kernels.triton import gemv as gv
    from lowbit.kernels.triton import lowbit_mm as lm
    from lowbit.kernels.triton import scaled_gemm as sg
    from lowbit.tensor import functional as tf
    token = object()
    lm._launch = lambda fn, compiled, *a: token
    lm._stream = lambda dev: 0
    gv._launch = _noop
    sg._act_quant_kernel = _Stub()
    sg._scaled_gemm_kernel = _Stub()
    sg._scaled_gemm_tma_kernel = _Stub()
    sel.resolve = lambda op, device, backend=None: _resolve_cuda(sel, op, backend)
    sel.available = lambda backend, device: True
    nat.torch = _TorchScaledStub()
    L._SCALED_MM = _TorchScaledStub._scaled_mm

    K = N = 4096

    def lin(seed=0):
        torch.manual_seed(seed)
        return nn.Linear(K, N, bias=False)

    mods_out = {}
    for qt in ("nf4", "int4"):
        m = lnn.Linear4bit.from_module(lin(), quant_type=qt)
        m.freeze()
        mods_out[f"Linear4bit {qt} (block 64)"] = (m, None)
    m = lnn.QLinear.from_module(lin(), weights="qint4", group_size=128)
    m.freeze()
    mods_out["QLinear qint4 (int4 g128)"] = (m, None)
    m = lnn.QLinear.from_module(lin(), weights="qint8")
    m.freeze()
    mods_out["QLinear qint8 weight-only"] = (m, None)
    m = lnn.QLinear.from_module(lin(), weights="qint8", activations="qint8", act_dynamic=True)
    m.freeze()
    mods_out["QLinear int8-dynamic"] = (m, "int8")
    m = lnn.QLinear.from_module(lin(), weights="qfloat8", activations="qfloat8", act_dynamic=True)
    m.freeze()
    mods_out["QLinear fp8-dynamic"] = (m, "fp8")
    w = lin().weight.detach()
    st = tf.quantize_tensor(w, "int4_asym", group_size=128, scale_dtype=torch.float16)
    mods_out["GPTQ-format QLinear (int4_asym g128, fp16 scales)"] = (lnn.QLinear.from_quant_state(lin(), st), None)
    st = tf.quantize_tensor(w, "q4_0")
    mods_out["GGUF Q4_0 QLinear"] = (lnn.QLinear.from_quant_state(lin(), st), None)
    x = torch.randn(1, 1, K, dtype=torch.bfloat16).as_subclass(_FakeCuda)
    rows = {}
    for name, (m, act) in mods_out.items():
        m = m.to(torch.bfloat16)
        st = m.qstate
        if act is None:
            p = L._prepare_cuda(st)
            assert p is not None, name
            L._store(st, "linear", p)
        with torch.no_grad():
            y = m(x)  # first call: plan, compile stub
            assert y is not None and y.shape[-1] == N, name
            if act is None:
                assert L._cached(st, "linear").plans, f"{name}: the prepared path did not run"
        rows[name] = m
    return rows, x


def _resolve_cuda(sel, op, backend):
    want = backend or sel.get_backend(op)
    if want == "auto":
        return sel._AUTO_CUDA[op][0]
    return want


class _TorchScaledStub:
    """``torch`` as lowbit.kernels.native sees it, with ``_scaled_mm`` / ``_int_mm`` answering an empty output."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _scaled_mm(a, b, scale_a=None, scale_b=None, bias=None, out_dtype=None, use_fast_accum=False):
        return torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype or a.dtype)


def child(tree: str, rounds: int) -> dict:
    sys.path.insert(0, tree)
    import lowbit

    assert Path(lowbit.__file__).resolve().parents[1] == Path(tree).resolve(), lowbit.__file__
    torch.set_num_threads(1)
    rows, x = setup()
    floor = _Floor()
    xm = torch.randn(1, 1, 4096, dtype=torch.bfloat16)
    lin16 = nn.Linear(16, 16, bias=False, dtype=torch.bfloat16)
    x16 = torch.randn(1, 1, 16, dtype=torch.bfloat16)
    fns = {FLOOR: lambda: floor(xm), FLOOR2: lambda: lin16(x16)}
    for name, m in rows.items():
        fns[name] = (lambda m: lambda: m(x))(m)
    res = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():  # warm-up
            for _ in range(300):
                f()
        for _ in range(rounds):  # rows interleaved round by round (the box's load drifts)
            for k, f in fns.items():
                t = time.perf_counter()
                for _ in range(400):
                    f()
                res[k].append((time.perf_counter() - t) / 400 * 1e6)
    return res


FLOOR = "floor: an nn.Module call that allocates the [1, 1, 4096] output (torch.empty)"
FLOOR2 = "nn.Linear(16, 16) bf16 on the CPU (module call + F.linear dispatch; a 16 x 16 weight, negligible math)"


class _Floor(nn.Module):
    def forward(self, x):
        return torch.empty((*x.shape[:-1], 4096), dtype=x.dtype)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "module_overhead.md"))
    ap.add_argument("--compare", default=None, help="another repository copy (the code before), timed interleaved")
    ap.add_argument("--passes", type=int, default=3, help="child processes per tree, alternating")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, 15)))
        return
    trees = [("now", str(ROOT))] + ([("before", str(Path(args.compare).resolve()))] if args.compare else [])
    res = {}
    for _ in range(args.passes):
        for label, tree in trees:  # alternating processes: the box's load drifts
            out = subprocess.run([sys.executable, __file__, "--child", tree], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                     [tree] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])))
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                raise RuntimeError(f"{label} child failed:\n{out.stderr[-3000:]}")
            for k, v in json.loads(line[0][7:]).items():
                res.setdefault((label, k), []).extend(v)
    names = [k for (lab, k) in res if lab == "now" and k not in (FLOOR, FLOOR2)]
    med = {k: min(v) for k, v in res.items()}  # the uncontended cost: the box is shared (contended rounds read ~2x)
    mid = {k: statistics.median(v) for k, v in res.items()}
    fl = med[("now", FLOOR)]
    lines = ["# Host cost of one quantized linear module call on the CUDA path (CPU, launches stubbed)", "",
             "Written by `python bench/module_overhead.py" + (" --compare <worktree of the code before>" if args.compare
                                                              else "") + "` (numbers from the run, never edited). "
             "`module(x)` at M = 1, bf16, 4096 x 4096, from `forward` down to the (stubbed) kernel launch; see the "
             "script's docstring for what is stubbed (for int8-/fp8-dynamic the Triton launcher itself is stubbed, "
             "so its own per-launch cost is not in the figures). Shared 2-core box: compare rows within the run; "
             f"15 rounds x 400 calls per row (rows interleaved round by round) in each of {args.passes} child "
             f"processes "
             f"per tree, processes alternating between the trees; the figures are the fastest round (the uncontended "
             f"cost: on this shared box a round that competes for its core reads about twice as long), medians "
             f"beside them. torch {torch.__version__}.", ""]
    if args.compare:
        lines += ["| module | µs per call, before | µs per call, now | now / before | now − floor (µs) | "
                  "medians: before "
                  "/ now (µs) |", "|---|---|---|---|---|---|"]
        for n in names:
            b, a = med[("before", n)], med[("now", n)]
            lines.append(f"| {n} | {b:.1f} | {a:.1f} | {a / b:.2f} | {a - fl:.1f} | {mid[('before', n)]:.1f} / "
                         f"{mid[('now', n)]:.1f} |")
        lines.append(f"| {FLOOR} | {med[('before', FLOOR)]:.1f} | {fl:.1f} | | | |")
        lines.append(f"| {FLOOR2} | {med[('before', FLOOR2)]:.1f} | {med[('now', FLOOR2)]:.1f} | | "
                     f"{med[('now', FLOOR2)] - fl:.1f} | |")
    else:
        lines += ["| module | µs per call | − floor (µs) |", "|---|---|---|"]
        for n in names:
            lines.append(f"| {n} | {med[('now', n)]:.1f} | {med[('now', n)] - fl:.1f} |")
        lines.append(f"| {FLOOR} | {fl:.1f} | |")
        lines.append(f"| {FLOOR2} | {med[('now', FLOOR2)]:.1f} | {med[('now', FLOOR2)] - fl:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
