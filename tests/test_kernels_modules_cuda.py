"""Every quantized module x kernel path on CUDA against the CPU reference (skipped without CUDA).

The module is built and frozen on the CPU, its reference output is ``F.linear`` on the CPU-dequantized
weight in float64 (the oracle), then it is moved to CUDA and run in bf16 / fp16 at M in {1, 2, 3, 4}
(fused GEMV), 16 and 64 (4-bit tensor-core GEMM or dequantize + cuBLAS) and 300 (dequantize + cuBLAS),
eagerly and under a CUDA graph. Tolerance: relative Frobenius error below what bf16/fp16 rounding of the
inputs and output gives (<= 1.5e-2 bf16, 4e-3 fp16; dynamic-activation paths add the activation
quantization: 3e-2 int8, 8e-2 fp8).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import Linear4bit, QLinear
from lowbit.tensor.functional import quantize_tensor

pytestmark = pytest.mark.cuda
triton = pytest.importorskip("triton")

MS = [1, 2, 3, 4, 16, 64, 300]
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3}


def _lin(n=384, k=512, seed=0):
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
            out.append((f"Linear4bit-{qt}{'-dq' if dq else ''}", m, None))
    for w in ("qint2", "qint4", "qint8", "qfloat8"):
        m = QLinear.from_module(_lin(), weights=w)
        m.freeze()
        out.append((f"QLinear-{w}", m, None))
    for act in ("qint8", "qfloat8"):
        w = "qint8" if act == "qint8" else "qfloat8"
        m = QLinear.from_module(_lin(), weights=w, activations=act, act_dynamic=True)
        m.freeze()
        out.append((f"QLinear-{w}-dyn-{act}", m, act))
    m = QLinear.from_module(_lin(), weights="qint8", activations="qint8")
    m.input_scale.fill_(0.02)
    m.freeze()
    out.append(("QLinear-qint8-static", m, "static"))
    for scheme, kw in (("int4", dict(group_size=128)), ("int4_asym", dict(group_size=64)),
                       ("int4_asym", dict(group_size=32)), ("q4_0", {}), ("q4_1", {}), ("q5_0", {}), ("q5_1", {}),
                       ("q8_0", {})):
        lin = _lin()
        st = quantize_tensor(lin.weight.detach(), scheme, **kw)
        out.append((f"from_quant_state-{scheme}-{kw.get('group_size', 32)}", QLinear.from_quant_state(lin, st), None))
    m = lowbit.nn.Linear8bitLt.from_module(_lin(), threshold=6.0)
    m.freeze()
    out.append(("Linear8bitLt", m, "llm_int8"))
    return out


MODULES = _modules()


def _reference(mod, x_cpu, act):
    """float64 oracle on the CPU: quantized activations (as the module defines them) x dequantized weight."""
    with torch.no_grad():
        xd = x_cpu.double()
        if act == "qint8":
            s = xd.abs().amax(-1, keepdim=True) / 127
            xd = torch.clamp(torch.round(xd / s), -127, 127) * s
        elif act == "qfloat8":
            s = xd.abs().amax(-1, keepdim=True) / 448
            xd = torch.clamp(xd / s, -448, 448).float().to(torch.float8_e4m3fn).double() * s
        elif act == "static":
            s = mod.input_scale.double()
            xd = torch.clamp(torch.round(xd / s), -127, 127) * s
        if act == "llm_int8":
            return mod(x_cpu.float()).double()
        w = mod.weight.detach().double()
        return F.linear(xd, w, mod.bias.detach().double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,mod,act", MODULES, ids=[m[0] for m in MODULES])
def test_module_kernels_match_cpu_reference(name, mod, act, dtype):
    cpu = mod
    gpu = __import__("copy").deepcopy(mod).cuda()
    gpu.bias.data = gpu.bias.data.to(dtype)
    tol = TOL[dtype] + {"qint8": 2e-2, "qfloat8": 7e-2, "static": 2e-2, "llm_int8": 2e-2}.get(act, 0.0)
    for M in MS:
        torch.manual_seed(M)
        x = torch.randn(M, cpu.in_features).to(dtype)
        ref = _reference(cpu, x.float(), act)
        with torch.no_grad():
            y = gpu(x.cuda())
        assert y.dtype == dtype and y.shape == (M, cpu.out_features)
        assert torch.isfinite(y).all()
        err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < tol, f"{name} M={M} {dtype}: rel err {err:.3g} >= {tol}"


@pytest.mark.parametrize("name,mod,act", [m for m in MODULES if m[2] is None], ids=[m[0] for m in MODULES if m[2] is None])
def test_module_kernels_under_cuda_graph(name, mod, act):
    gpu = __import__("copy").deepcopy(mod).cuda().to(torch.bfloat16)
    for M in (1, 4, 16):
        x = torch.randn(M, mod.in_features, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            eager = gpu(x)  # prepares the layout
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                gpu(x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = gpu(x)
            x.copy_(torch.randn_like(x))
            g.replay()
            again = gpu(x)
        torch.cuda.synchronize()
        assert torch.equal(out, again), f"{name} M={M}: graph replay differs from eager"
        assert eager.shape == out.shape


def test_fused_gemv_is_used_and_prepared_once():
    from lowbit.kernels import linear as L

    m = Linear4bit.from_module(_lin(), quant_type="nf4")
    m.freeze()
    m = m.cuda().to(torch.bfloat16)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m(x)
        p1 = L.prepare_linear(m.qstate)
        m(x)
        p2 = L.prepare_linear(m.qstate)
    assert p1 is not None and p1 is p2 and p1.plans  # one launch plan per M, made on the first call
    # moving the module drops the derived layout with the state
    m.cpu()
    assert L._cached(m.qstate, "linear") is None


def test_compile_decode_step_matches_eager():
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    lowbit.quantize(model, method="bnb-nf4")
    model = model.cuda().to(torch.bfloat16)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
