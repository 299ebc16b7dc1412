"""The tensor-core low-bit GEMM "tc" (``lowbit.kernels.triton.lowbit_mm._tc_kernel``) behind every quantized
module on CUDA, against the CPU reference (skipped without CUDA).

Each module is built and frozen on the CPU; its float64 oracle is ``F.linear`` on the CPU-dequantized weight. On
CUDA, ``TUNED_MM`` is pointed at "tc" configs (one split-K-free, one with split-K summed in the kernel, BM 16 and
64) so that M in 5..64 runs the tensor-core GEMM, asserted through the cached plan; results in bf16 / fp16 within
the rounding of the inputs and output. Also: the shipped table routes the Llama-shape M = 16 call to "tcb", a CUDA
graph replay equals the eager call, and a config the GPU cannot hold (shared memory) falls back to dequantize +
cuBLAS with the same result.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import linear as L
from lowbit.kernels import triton_configs as TC
from lowbit.nn import Linear4bit, QLinear
from lowbit.tensor.functional import quantize_tensor

pytestmark = pytest.mark.cuda
triton = pytest.importorskip("triton")

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3}
CFGS = [("tc", 16, 64, 16, 1, 4, 3), ("tc", 16, 128, 32, 3, 4, 3), ("tc", 64, 128, 16, 2, 4, 3),
        ("tc", 32, 64, 16, 1, 4, 2)]


def _lin(n=384, k=1024, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.bias.mul_(0.1)
    return lin


def _modules():
    out = []
    for qt in ("nf4", "fp4", "int4"):
        for dq in (False, True):
            m = Linear4bit.from_module(_lin(), quant_type=qt, double_quant=dq)
            m.freeze()
            out.append((f"Linear4bit-{qt}{'-dq' if dq else ''}", m))
    for w in ("qint4", "qint8"):
        m = QLinear.from_module(_lin(), weights=w)
        m.freeze()
        out.append((f"QLinear-{w}", m))
    for scheme, kw in (("int4", dict(group_size=128)), ("int4", dict(group_size=64)), ("int4_asym", dict(group_size=128)),
                       ("int4_asym", dict(group_size=32)), ("q4_0", {}), ("q4_1", {}), ("q8_0", {}),
                       ("int8", dict(axis=0))):
        lin = _lin()
        st = quantize_tensor(lin.weight.detach(), scheme, **kw)
        out.append((f"from_quant_state-{scheme}-{kw.get('group_size', kw.get('axis', 32))}",
                    QLinear.from_quant_state(lin, st)))
    return out


MODULES = _modules()


def _force(monkeypatch, cfg):
    for key in ((4, "codebook"), (4, "int"), (8, "int")):
        monkeypatch.setitem(TC.TUNED_MM, key, [(4, 1 << 30, 1 << 30, ("gemvg", 128, 8, 1, 4, 2)),
                                               (64, 1 << 30, 1 << 30, cfg)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,mod", MODULES, ids=[m[0] for m in MODULES])
def test_module_tc_gemm_matches_cpu_reference(name, mod, dtype, monkeypatch):
    from lowbit.kernels.triton import lowbit_mm as lm

    with torch.no_grad():
        wd = mod.weight.detach().double()
    gpu = copy.deepcopy(mod).cuda()
    gpu.bias.data = gpu.bias.data.to(dtype)
    for cfg in CFGS:
        _force(monkeypatch, cfg)
        for p in [L.prepare_linear(s) for s in _states(gpu)]:
            if p is not None:
                p.plans.clear()
        for M in (5, 16, 33, 64):
            if M > 16 and cfg[1] == 16 and cfg[4] == 1:
                continue
            torch.manual_seed(M)
            x = torch.randn(M, mod.in_features).to(dtype)
            ref = F.linear(x.double(), wd, mod.bias.detach().double())
            with torch.no_grad():
                y = gpu(x.cuda())
            assert y.dtype == dtype and y.shape == (M, mod.out_features)
            err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
            assert err < TOL[dtype], f"{name} {cfg} M={M} {dtype}: rel err {err:.3g}"
        plans = [v for p in [L.prepare_linear(s) for s in _states(gpu)] if p is not None for v in p.plans.values()]
        assert any(isinstance(v, lm.TcPlan) for v in plans), f"{name}: the tc GEMM did not run ({plans})"


def _states(mod):
    return list(mod._qstates.values())


def test_tc_under_cuda_graph_and_shipped_rows(monkeypatch):
    assert TC.config_mm(4, 1, 16, 8192, 8192, 128)[0] == "tcb"  # the shipped table: tcb at M = 16 on 8192^2
    assert TC.config_mm(4, 1, 300, 8192, 8192, 128) == ("dense",)
    mod = QLinear.from_quant_state(_lin(1024, 2048), quantize_tensor(_lin(1024, 2048).weight.detach(), "int4_asym",
                                                                        group_size=128))
    gpu = copy.deepcopy(mod).cuda().to(torch.bfloat16)
    _force(monkeypatch, ("tc", 16, 128, 16, 4, 4, 3))  # split-K: the in-kernel fixup re-arms its counters
    x = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = gpu(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            gpu(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = gpu(x)
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            g.replay()
            again = gpu(x)
            torch.cuda.synchronize()
            assert torch.equal(out, again)
    assert eager.shape == out.shape


def test_tc_config_too_large_falls_back_to_dense(monkeypatch):
    st = quantize_tensor(torch.randn(512, 1024), "nf4", block_size=64).to("cuda")
    p = L.prepare_linear(st)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x.float(), p.dense(torch.float32))
    _force(monkeypatch, ("tc", 256, 256, 64, 1, 8, 4))  # far more shared memory than any GPU has
    y = L.prepared_linear(x, p)
    assert p.plans[(64, torch.bfloat16, False, True)] is L._DENSE
    assert ((y.float() - want).norm() / want.norm()).item() < 1e-2


TCB_MODULES = [m for m in MODULES if m[0] in ("Linear4bit-int4", "from_quant_state-int4-128",
                                              "from_quant_state-int4_asym-32", "from_quant_state-q4_1-32",
                                              "Linear4bit-nf4")]
TCB_CFGS = [("tcb", 16, 128, 16, 4, 4, 3), ("tcb", 64, 128, 16, 1, 4, 3), ("tcbd", 16, 128, 16, 4, 4, 3),
            ("tcbd", 64, 128, 16, 2, 4, 3)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,mod", TCB_MODULES, ids=[m[0] for m in TCB_MODULES])
def test_module_tcb_packed_pairs_match_cpu_reference(name, mod, dtype, monkeypatch):
    """The packed-pair configs ("tcb": 4-bit codes dequantized two weights per PTX op in the activation dtype;
    NF4 by shuffles from the table in registers) behind the modules, M = 5 / 16 / 33 / 64 with bias, against the
    float64 CPU reference; asserts that the packed PTX ran."""
    from lowbit.kernels.triton import lowbit_mm as lm

    with torch.no_grad():
        wd = mod.weight.detach().double()
    gpu = copy.deepcopy(mod).cuda()
    gpu.bias.data = gpu.bias.data.to(dtype)
    for cfg in TCB_CFGS:
        _force(monkeypatch, cfg)
        for p in [L.prepare_linear(s) for s in _states(gpu)]:
            if p is not None:
                p.plans.clear()
        for M in (5, 16, 33, 64):
            if M > 16 and cfg[1] == 16 and cfg[4] == 1:
                continue
            torch.manual_seed(M)
            x = torch.randn(M, mod.in_features).to(dtype)
            ref = F.linear(x.double(), wd, mod.bias.detach().double())
            with torch.no_grad():
                y = gpu(x.cuda())
            err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
            assert err < TOL[dtype], f"{name} {cfg} M={M} {dtype}: rel err {err:.3g}"
        plans = [v for p in [L.prepare_linear(s) for s in _states(gpu)] if p is not None for v in p.plans.values()]
        tcs = [v for v in plans if isinstance(v, lm.TcPlan)]
        assert tcs, f"{name}: the tc GEMM did not run ({plans})"
        packed = [lm.packed_ok(p.group, v.consts["BKW"], p.bits) for p in [L.prepare_linear(s) for s in _states(gpu)]
                  if p is not None for v in p.plans.values() if isinstance(v, lm.TcPlan)]
        assert all((bool(v.consts["PASM"]) and v.pdt == dtype) == ok for v, ok in zip(tcs, packed)), name


@pytest.mark.parametrize("scheme,kw", [("int4_asym", dict(group_size=128)), ("nf4", dict(block_size=64)),
                                       ("int4", dict(group_size=32))], ids=["int4_asym-128", "nf4-64", "int4-32"])
@pytest.mark.parametrize("N,K", [(8192, 8192), (28672, 8192), (14336, 4096)], ids=["8192x8192", "28672x8192",
                                                                                       "14336x4096"])
def test_shipped_rows_on_llama_shapes(scheme, kw, N, K):
    """The shipped TUNED_MM rows (no forcing) on the measured Llama shapes at M = 16 / 64 / 200 (bf16, and fp16 with
    bias at M = 200: the 256-row tiles sit near the shared-memory limit, where a config the GPU cannot hold falls
    back to dequantize + cuBLAS) against the float32 product with the dequantized weight."""
    from lowbit.kernels.triton import lowbit_mm as lm

    torch.manual_seed(N + K)
    st = quantize_tensor(torch.randn(N, K, device="cuda") * 0.02, scheme, **kw)
    p = L.prepare_linear(st)
    wref = L.dequantize_state(st).float()
    for M, dt, bias in ((16, torch.bfloat16, False), (64, torch.bfloat16, False), (200, torch.bfloat16, False),
                        (200, torch.float16, True)):
        x = torch.randn(M, K, device="cuda").to(dt)
        b = (torch.randn(N, device="cuda") * 0.1).to(dt) if bias else None
        ref = x.float() @ wref.T + (b.float() if bias else 0)
        y = L.prepared_linear(x, p, b)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < TOL[dt], f"{scheme} {N}x{K} M={M} {dt}: rel err {err:.3g}"
        cfg = TC.config_mm(p.bits, p.kind, M, N, K, p.group)
        plan = p.plans[(M, dt, bias, True)]
        if cfg[0].startswith("tc"):
            assert isinstance(plan, lm.TcPlan) or plan is L._DENSE, plan  # dense: the resource fallback
            if isinstance(plan, lm.TcPlan):
                assert bool(plan.consts["PASM"]) == (cfg[0] != "tc" and lm.packed_ok(p.group, plan.consts["BKW"], 4))
        else:
            assert plan is L._DENSE
