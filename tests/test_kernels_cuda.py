"""GPU kernels against the CPU reference (run on the H100; skipped without CUDA).

Quantization: bit-identical codes, scales and zero points to the CPU path. Dequantization: equal to
the CPU float32 result rounded once to the output dtype. Matmuls: close to float64 math on the same
quantized operands, in eager mode, under CUDA graphs and under torch.compile.
"""
import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import kernels
from lowbit.kernels import reference, select

pytestmark = pytest.mark.cuda
triton = pytest.importorskip("triton")

SCHEMES = ["nf4", "fp4", "int4", "int4_asym", "int8", "int8_asym"]


def _x(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).add(0.1)
    x.view(-1)[70:200] = 0  # an all-zero block
    return x.to(dtype)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape,block", [((4096, 1100), 64), ((37, 63), 64), ((3, 2048), 4096), ((5, 77), 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_bit_identical_and_dequantize(scheme, shape, block, dtype):
    x = _x(shape, dtype, seed=hash((scheme, shape, block)) % 1000)
    ref = lowbit.quantize(x, scheme, block)
    got = kernels.quantize(x.cuda(), scheme, block, backend="triton")
    assert torch.equal(got.data.cpu(), ref.data)
    assert torch.equal(got.scales.cpu(), ref.scales)
    if ref.zeros is not None:
        assert torch.equal(got.zeros.cpu(), ref.zeros)
    for out in (torch.float16, torch.bfloat16, torch.float32):
        d = kernels.dequantize(got, out, backend="triton")
        assert d.dtype == out and d.shape == x.shape
        assert torch.equal(d.cpu(), reference.dequantize(ref, out))


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
@pytest.mark.parametrize("n", [4096 * 1100, 64 * 999 + 17])
def test_double_quant_matches_cpu(scheme, n):
    x = _x((n,), torch.bfloat16, seed=n % 97)
    ref = lowbit.quantize(x, scheme, 64, double_quant=True)
    got = kernels.quantize(x.cuda(), scheme, 64, double_quant=True, backend="triton")
    assert torch.equal(got.data.cpu(), ref.data)
    # the offset is the mean of the absmax: float64-accumulated here, float32 on the CPU
    assert abs(got.offset - ref.offset) <= 2 * abs(ref.offset) * 2.0 ** -24
    from lowbit.formats import codebook

    qa, a2 = codebook.quantize_blockwise_lut(lowbit.quantize(x, scheme, 64).scales - got.offset,
                                             codebook.dynamic_map(), 256)
    assert torch.equal(got.nested.data.cpu(), qa) and torch.equal(got.nested.scales.cpu(), a2)
    for out in (torch.bfloat16, torch.float32):
        d = kernels.dequantize(got, out, backend="triton")
        assert torch.equal(d.cpu(), reference.dequantize(got.cpu(), out))
    # states from the CPU path dequantize identically on the GPU
    d = kernels.dequantize(ref.cuda(), torch.float16, backend="triton")
    assert torch.equal(d.cpu(), reference.dequantize(ref, torch.float16))


def test_quantize_rejects_non_finite(monkeypatch):
    # strict mode (keyword or LOWBIT_STRICT=1) keeps the synchronous check and its message
    x = torch.randn(1000, device="cuda")
    x[17] = float("nan")
    x[400] = float("inf")
    for scheme in ("nf4", "int4", "int8_asym"):
        with pytest.raises(ValueError, match=r"non-finite values \(2 NaN/Inf\)"):
            kernels.quantize(x, scheme, 64, backend="triton", strict=True)
    monkeypatch.setenv("LOWBIT_STRICT", "1")
    with pytest.raises(ValueError, match="non-finite"):
        kernels.quantize(x, "nf4", 64, double_quant=True, backend="triton")


_ASSERT_SCRIPT = """
import sys, torch
from lowbit import kernels
x = torch.randn(4096, device="cuda")
x[int(sys.argv[2])] = float(sys.argv[3])
try:
    st = kernels.quantize(x, sys.argv[1], 64, double_quant=sys.argv[4] == "1", backend="triton")
    torch.cuda.synchronize()
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
    sys.exit(3)
print("NO ERROR")
"""


@pytest.mark.parametrize("scheme,value,dq", [("nf4", "nan", "0"), ("fp4", "-inf", "1")])
def test_quantize_non_finite_fails_a_device_assertion(scheme, value, dq):
    # the default CUDA path does not synchronise: a non-finite input fails a device-side assertion, raised at
    # the next synchronisation (it poisons the CUDA context, hence a subprocess)
    import os
    import subprocess
    import sys

    env = dict(os.environ, LOWBIT_STRICT="0")
    r = subprocess.run([sys.executable, "-c", _ASSERT_SCRIPT, scheme, "1000", value, dq], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 3, (r.stdout, r.stderr[-2000:])
    assert "RAISED" in r.stdout and "assert" in r.stdout.lower(), r.stdout


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_and_dequantize_do_not_synchronise(scheme, dq, dtype, monkeypatch):
    monkeypatch.delenv("LOWBIT_STRICT", raising=False)
    if dq and scheme not in ("nf4", "fp4"):
        pytest.skip("double quantization of the Triton path: codebook schemes")
    x = _x((256, 1100), dtype, seed=5).cuda()
    ref = kernels.quantize(x, scheme, 64, double_quant=dq, backend="triton", strict=True)  # warm-up (compiles)
    kernels.dequantize(ref, dtype, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        st = kernels.quantize(x, scheme, 64, double_quant=dq, backend="triton")
        d = kernels.dequantize(st, dtype, backend="triton")
        d2 = kernels.dequantize(st, torch.float32, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if dq:
        assert st.__dict__.get("_offset") is None  # the offset stayed on the device
        assert st.offset == ref.offset and isinstance(st.offset, float)
        assert torch.equal(st.nested.data, ref.nested.data) and torch.equal(st.nested.scales, ref.nested.scales)
    else:
        assert torch.equal(st.scales, ref.scales)
    assert torch.equal(st.data, ref.data)
    assert torch.equal(d, kernels.dequantize(ref, dtype, backend="triton"))
    assert torch.equal(d2.cpu(), reference.dequantize(ref.cpu(), torch.float32))


@pytest.mark.parametrize("scheme,dq", [("nf4", True), ("fp4", False), ("int4_asym", False), ("int8", False)])
def test_quantize_captures_in_a_cuda_graph(scheme, dq, monkeypatch):
    # no host synchronisation: quantize (and dequantize of its state) capture into one CUDA graph
    monkeypatch.delenv("LOWBIT_STRICT", raising=False)
    x = _x((512, 1024), torch.bfloat16, seed=9).cuda()
    ref = kernels.quantize(x, scheme, 64, double_quant=dq, backend="triton")
    want = kernels.dequantize(ref, torch.bfloat16, backend="triton")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            kernels.dequantize(kernels.quantize(x, scheme, 64, double_quant=dq, backend="triton"), torch.bfloat16,
                               backend="triton")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        st = kernels.quantize(x, scheme, 64, double_quant=dq, backend="triton")
        out = kernels.dequantize(st, torch.bfloat16, backend="triton")
    x.copy_(x * 0.5)
    g.replay()
    torch.cuda.synchronize()
    ref2 = lowbit.quantize(x.cpu(), scheme, 64, double_quant=dq)
    assert torch.equal(st.data.cpu(), ref2.data)
    assert torch.equal(out.cpu(), reference.dequantize(st.cpu(), torch.bfloat16))
    assert not torch.equal(out, want)


FORMATS = [("nf4", dict(block_size=64)), ("fp4", dict(block_size=64, double_quant=True)),
           ("int4", dict(group_size=128)), ("int4_asym", dict(group_size=128))]


def _graph_replay(fn):
    """``fn()`` captured in a CUDA graph, its output zeroed and the graph replayed once: the replayed output."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    return out


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("scheme,kw", FORMATS)
@pytest.mark.parametrize("M", [1, 3, 16, 33, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_4bit_all_paths(scheme, kw, M, dtype):
    if dtype == torch.float16 and scheme != "nf4":
        pytest.skip("fp16 activations are covered with NF4")
    N, K = 384, 1024
    w = torch.randn(N, K, device="cuda")
    st = lowbit.quantize(w, scheme, **kw)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    b = torch.randn(N, device="cuda", dtype=dtype)
    wd = lowbit.dequantize(st).to(dtype)  # the weight the reference multiplies by
    want = F.linear(x.double(), wd.double(), b.double())
    got = kernels.linear_4bit(x, st, b)
    assert got.dtype == dtype and got.shape == (M, N)
    assert _rel(got, want) < 4e-3
    # every kernel config kind on this M
    from lowbit.kernels.triton import gemm_4bit as gk

    p = kernels.prepare_4bit(st)
    kinds = [("gemm", 64, 128, 1, 4, 3), ("gemm3", 32, 256, 4, 4, 2)]
    if M <= 4:
        kinds += [("gemv", 32, 256, 1, 4, 1), ("gemv3", 64, 512, 4, 4, 1)]
    for cfg in kinds:
        for cache in (None, p.launch_cache, p.launch_cache):  # Triton's launch, then the cached fast path
            y = gk.launch(x, p.qweight, p.scales, p.zeros, p.values, b, N, K, p.group, p.kind, cfg, cache)
            assert _rel(y, want) < 4e-3, cfg


def test_linear_4bit_cuda_graph_and_compile():
    N, K = 512, 1024
    st = lowbit.quantize(torch.randn(N, K, device="cuda"), "nf4", 64, double_quant=True)
    kernels.prepare_4bit(st)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    eager = kernels.linear_4bit(x, st)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        kernels.linear_4bit(x, st)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = kernels.linear_4bit(x, st)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.testing.assert_close(out, kernels.linear_4bit(x, st))
    assert not torch.equal(out, eager)
    f = torch.compile(lambda t: kernels.linear_4bit(t, st), fullgraph=True)
    torch.testing.assert_close(f(x), kernels.linear_4bit(x, st), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_activation_quant_matches_reference(fp8, dtype):
    from lowbit.kernels.triton import scaled_gemm as sg

    x = _x((67, 4096 + 24), dtype, seed=3) * 10
    q, s = sg.quantize_rows(x.cuda(), fp8)
    qr, sr = reference.quantize_rows(x, fp8)
    assert torch.equal(s.cpu(), sr)
    assert torch.equal(q.cpu().view(torch.uint8), qr.view(torch.uint8))


@pytest.mark.parametrize("M", [1, 16, 17, 300])
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_int8_and_fp8_linear(M, backend):
    N, K = 512, 1024
    w = torch.randn(N, K, device="cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    st8 = lowbit.quantize(w, "int8", axis=0)
    want = reference.int8_linear_dynamic(x.cpu(), *[t.cpu() for t in kernels.prepare_int8(st8)], b.cpu())
    got = kernels.int8_linear_dynamic(x, st8, b, backend=backend)
    assert _rel(got.cpu(), want) < 4e-3
    stf = lowbit.quantize(w, "fp8_e4m3", axis=0)
    want = reference.fp8_linear_dynamic(x.cpu(), *[t.cpu() for t in kernels.prepare_fp8(stf)], b.cpu())
    got = kernels.fp8_linear_dynamic(x, stf, b, backend=backend)
    assert _rel(got.cpu(), want) < 4e-3


def test_int8_linear_cuda_graph():
    st = lowbit.quantize(torch.randn(256, 512, device="cuda"), "int8", axis=0)
    w = kernels.prepare_int8(st)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    kernels.int8_linear_dynamic(x, w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = kernels.int8_linear_dynamic(x, w)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.testing.assert_close(out, kernels.int8_linear_dynamic(x, w))


def test_select_falls_back_to_reference_when_asked():
    st = lowbit.quantize(torch.randn(64, 128, device="cuda"), "nf4", 64)
    x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
    with select.use("reference"):
        a = kernels.linear_4bit(x, st)
    b = kernels.linear_4bit(x, st)
    assert _rel(a, b) < 4e-3


# ---------------------------------------------------------------------------------------------
# fused low-bit matmul v2 (lowbit.kernels.triton.lowbit_mm) through lowbit.kernels.linear.prepared_linear

_V2_FORMATS = [("nf4", dict(block_size=64)), ("fp4", dict(block_size=64)), ("int4", dict(group_size=32)),
               ("int4", dict(group_size=64)), ("int4", dict(group_size=128)), ("int4_asym", dict(group_size=32)),
               ("int4_asym", dict(group_size=64)), ("int4_asym", dict(group_size=128)), ("q4_0", {}), ("q4_1", {}),
               ("q8_0", {}), ("int8", dict(axis=0))]


@pytest.mark.parametrize("scheme,kw", _V2_FORMATS, ids=[f"{s}-{k}" for s, k in _V2_FORMATS])
def test_v2_fused_matmul_all_formats(scheme, kw):
    from lowbit.kernels import linear as L
    from lowbit.tensor.functional import quantize_tensor

    torch.manual_seed(3)
    N, K = 200, 1024  # N not a multiple of the tiles: masked rows
    st = quantize_tensor(torch.randn(N, K, device="cuda") * 0.02, scheme, **kw)
    p = L.prepare_linear(st)
    assert p is not None
    ref = L.dequantize_state(st).float()
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(p.dense(dt), ref.to(dt)), f"{scheme} dense {dt}"
        for M in (1, 2, 3, 4, 7, 16, 64, 256):
            x = torch.randn(M, K, device="cuda").to(dt)
            b = (torch.randn(N, device="cuda") * 0.1).to(dt) if M % 2 else None
            r = x.double() @ ref.double().T + (b.double() if b is not None else 0)
            for _ in range(3):  # later calls: the direct launch of the cached plan, reused split-K buffers
                y = L.prepared_linear(x, p, b)
                err = ((y.double() - r).norm() / r.norm()).item()
                assert err < (1e-2 if dt == torch.bfloat16 else 2e-3), f"{scheme} M={M} {dt}: {err}"


_V3_FORMATS = _V2_FORMATS[:8]  # the 4-bit kinds 0-2 (nf4 / fp4 codebooks, int4 sym / asym groups)


@pytest.mark.parametrize("scheme,kw", _V3_FORMATS, ids=[f"{s}-{k}" for s, k in _V3_FORMATS])
def test_pair_table_gemv_and_v1gemm_configs(scheme, kw, monkeypatch):
    """The byte-pair group-step GEMV ("gemvgp", codebooks, M <= 4), its register-prefetch variants ("gemvgf",
    "gemvgpf"), their in-kernel split-K fixup (splits 2 and 4) and the v1 tensor-core GEMM with explicit
    TUNED_MM configs ("v1gemm", M 5..16) through prepared_linear, eagerly and replayed in a CUDA graph."""
    from lowbit.kernels import linear as L
    from lowbit.kernels import triton_configs as TC
    from lowbit.tensor.functional import quantize_tensor

    torch.manual_seed(4)
    N, K = 200, 1024
    st = quantize_tensor(torch.randn(N, K, device="cuda") * 0.02, scheme, **kw)
    p = L.prepare_linear(st)
    ref = L.dequantize_state(st).double()
    cls = "codebook" if p.kind == 0 else "int"
    cases = [(M, ("gemvgp", 64, 4, 2, 4, 2)) for M in (1, 3, 4)] if p.kind == 0 else []
    cases += [(1, ("gemvgf", 128, 8, 4, 4, 3)), (4, ("gemvgf", 64, 4, 1, 4, 2))]
    if p.kind == 0:
        cases.append((1, ("gemvgpf", 128, 8, 2, 4, 2)))
    cases += [(M, ("v1gemm", 64, 128, sk, 4, 2)) for M, sk in ((5, 1), (8, 2), (16, 4))]
    for M, cfg in cases:
        monkeypatch.setitem(TC.TUNED_MM, (4, cls), [(16, 1 << 30, 1 << 30, cfg)])
        p.plans.clear()
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(M, K, device="cuda").to(dt)
            b = (torch.randn(N, device="cuda") * 0.1).to(dt) if M % 2 else None
            r = x.double() @ ref.T + (b.double() if b is not None else 0)
            tol = 1e-2 if dt == torch.bfloat16 else 2e-3
            for _ in range(4):  # first call: launcher; then the direct launch on cached buffers (counters re-armed)
                y = L.prepared_linear(x, p, b)
                assert ((y.double() - r).norm() / r.norm()).item() < tol, f"{cfg} M={M} {dt}"
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                yg = L.prepared_linear(x, p, b)
            for _ in range(3):
                yg.zero_()
                g.replay()
                torch.cuda.synchronize()
                assert ((yg.double() - r).norm() / r.norm()).item() < tol, f"graph {cfg} M={M} {dt}"


# NF4 / FP4 with the codebook held in registers (warp shuffles, "gemvgs*"), scale layouts, no derived copies


def _codebook_state(qt, dq, n=200, k=1024, seed=6):
    from lowbit.nn import Linear4bit

    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    m = Linear4bit.from_module(lin, quant_type=qt, double_quant=dq)
    m.freeze()
    return m.cuda().qstate


@pytest.mark.parametrize("qt,dq", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_shuffle_codebook_gemv_matches_table_gemv(qt, dq, monkeypatch):
    """The group-step GEMV reading the 16-entry codebook from registers by warp shuffles equals the same config
    reading the float32 table from memory (the same float32 values and summation order; the compiler may pair
    the two products of a byte into FMUL / FFMA differently: at most a rounding of the float32 accumulator, far
    below one unit of the output dtype), and both match float64 math on the CPU-dequantized weight
    (double-quantized absmax decoded once at prepare), eagerly and replayed in a CUDA graph (bit-identical to
    eager), splits 1-8, with and without the transposed scale copy."""
    from lowbit.kernels import linear as L
    from lowbit.kernels import triton_configs as TC

    st = _codebook_state(qt, dq)
    assert (st.nested is not None) == dq
    p = L.prepare_linear(st)
    ref = L.dequantize_state(st).cpu().double()
    N, K = p.n, p.k
    cases = [(1, ("gemvgs", 64, 8, 1, 4, 2)), (1, ("gemvgsf", 128, 8, 4, 4, 2)), (3, ("gemvgs", 64, 4, 2, 4, 2)),
             (4, ("gemvgsf", 64, 8, 8, 4, 3)), (1, ("gemvgsft", 128, 8, 2, 4, 2)), (1, ("gemvgs", 256, 8, 4, 8, 2))]
    for M, cfg in cases:
        plain = (cfg[0].replace("s", "", 1),) + cfg[1:]  # the same config reading the table from memory
        assert "s" not in plain[0][5:]
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(M, K, device="cuda").to(dt)
            b = (torch.randn(N, device="cuda") * 0.1).to(dt) if M % 2 else None
            r = x.cpu().double() @ ref.T + (b.cpu().double() if b is not None else 0)
            ys = {}
            for c in (cfg, plain):
                monkeypatch.setitem(TC.TUNED_MM, (4, "codebook"), [(4, 1 << 30, 1 << 30, c)])
                p.plans.clear()
                for _ in range(3):  # launcher, then direct launches on cached split-K buffers
                    ys[c] = L.prepared_linear(x, p, b)
            d = (ys[cfg].double() - ys[plain].double()).abs().max().item()
            unit = torch.finfo(dt).eps * ys[plain].double().abs().max().item()
            assert d <= unit, f"{cfg} vs {plain} M={M} {dt}: max diff {d:.3g} > {unit:.3g}"
            err = ((ys[cfg].cpu().double() - r).norm() / r.norm()).item()
            assert err < (1e-2 if dt == torch.bfloat16 else 2e-3), f"{cfg} M={M} {dt}: {err}"
            monkeypatch.setitem(TC.TUNED_MM, (4, "codebook"), [(4, 1 << 30, 1 << 30, cfg)])
            p.plans.clear()
            L.prepared_linear(x, p, b)
            yg = _graph_replay(lambda: L.prepared_linear(x, p, b))
            assert torch.equal(yg, ys[cfg]), f"graph {cfg} M={M} {dt}"


@pytest.mark.parametrize("scheme,kw", [("int4_asym", dict(group_size=128)), ("int4", dict(group_size=32)),
                                       ("nf4", dict(block_size=64))])
def test_state_layout_and_transposed_scales_agree(scheme, kw, monkeypatch):
    """Scales / uint8 zero points read from the state's own [N, K / G] tensors ("gemvgf") or from transposed
    copies ("gemvgft"): the same numbers in the same order, outputs equal within one unit of the output dtype
    (the arithmetic is the same; only the addressing of the scale loads differs)."""
    from lowbit.kernels import linear as L
    from lowbit.kernels import triton_configs as TC
    from lowbit.tensor.functional import quantize_tensor

    torch.manual_seed(7)
    st = quantize_tensor(torch.randn(200, 1024, device="cuda") * 0.02, scheme, **kw)
    p = L.prepare_linear(st)
    cls = "codebook" if p.kind == 0 else "int"
    for M in (1, 4):
        x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
        ys = []
        for name in ("gemvgf", "gemvgft"):
            monkeypatch.setitem(TC.TUNED_MM, (4, cls), [(4, 1 << 30, 1 << 30, (name, 64, 4, 4, 4, 2))])
            p.plans.clear()
            ys.append(L.prepared_linear(x, p))
        d = (ys[0].double() - ys[1].double()).abs().max().item()
        assert d <= torch.finfo(torch.bfloat16).eps * ys[1].double().abs().max().item(), f"{scheme} M={M}: {d}"


@pytest.mark.parametrize("kind", ["Linear4bit-nf4", "QLinear-int4-g128-asym"])
def test_no_derived_copies_of_scales_on_the_device(kind):
    """After forwards at M = 1, 4, 16 and 300 with the shipped configs, the device holds the state (codes, float32
    scales, uint8 zero points) plus launch workspaces only: no float / transposed copy of scales or zeros."""
    import lowbit
    from lowbit.kernels import linear as L
    from lowbit.nn import Linear4bit

    torch.manual_seed(8)
    lin = torch.nn.Linear(4096, 4096, bias=False)
    if kind.startswith("Linear4bit"):
        m = Linear4bit.from_module(lin, quant_type="nf4")
        m.freeze()
    else:
        m = torch.nn.Sequential(lin)
        lowbit.quantize(m, method="rtn", bits=4, group_size=128, sym=False, progress=False)
        m = m[0]
    m = m.cuda().to(torch.bfloat16)
    # cuBLAS allocates its workspace (32 MiB on Hopper) through the caching allocator at the first GEMM of the
    # process: make it exist before measuring (the dequantize + cuBLAS paths below would otherwise count it)
    wb = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    for M in (1, 4, 16, 300):
        F.linear(torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16), wb, wb[0, :64].clone())
        F.linear(torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16), wb)
    del wb
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    st = m.qstate
    with torch.no_grad():
        for M in (1, 4, 16, 300):
            m(torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    delta = torch.cuda.memory_allocated() - before
    p = L.prepare_linear(st)
    assert p.sT is None and p.zT is None
    assert p.scales.data_ptr() == st.scales.data_ptr()
    if st.zeros is not None:
        assert p.zeros.data_ptr() == st.zeros.data_ptr() and p.p4.zeros.data_ptr() == st.zeros.data_ptr()
    ws = 0
    for plan in p.plans.values():
        for v in getattr(plan, "ws", {}).values():
            for t in (v if isinstance(v, tuple) else (v,)):
                ws += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    scale_bytes = st.scales.numel() * 4
    assert delta <= ws + 64 * 1024 + 8 * 1024, (delta, ws, scale_bytes)  # + tables / small buffers
    assert delta < scale_bytes // 2 + ws


def test_dense_linear_row_blocks_cuda(monkeypatch):
    """Dequantize + cuBLAS in row blocks (a small LOWBIT_DENSE_CHUNK_MB) matches the whole-weight path and the
    float64 reference (each block's weight rows are the whole weight's rows, bit for bit)."""
    from lowbit.kernels import linear as L
    from lowbit.tensor.functional import quantize_tensor

    torch.manual_seed(9)
    for scheme, kw in (("nf4", dict(block_size=64)), ("int4_asym", dict(group_size=128)), ("int8", dict(axis=0)),
                       ("q4_0", {})):
        st = quantize_tensor(torch.randn(1024, 512, device="cuda") * 0.02, scheme, **kw)
        p = L.prepare_linear(st)
        whole = p.dense(torch.bfloat16)
        assert torch.equal(p.dense(torch.bfloat16, 256, 640), whole[256:640]), scheme
        x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(1024, device="cuda", dtype=torch.bfloat16) * 0.1
        monkeypatch.setenv("LOWBIT_DENSE_CHUNK_MB", "0.25")  # 256 rows of 512 bf16 per block: 4 blocks
        y = L.dense_linear(x, p, b)
        monkeypatch.setenv("LOWBIT_DENSE_CHUNK_MB", "0")
        y0 = L.dense_linear(x, p, b)
        r = x.double() @ whole.double().T + b.double()
        for t in (y, y0):
            assert ((t.double() - r).norm() / r.norm()).item() < 1e-2, scheme
        torch.testing.assert_close(y, y0, rtol=1.6e-2, atol=1e-3)


_INT4_SHFL = [("int4", dict(group_size=32)), ("int4", dict(group_size=128)), ("int4_asym", dict(group_size=64)),
              ("int4_asym", dict(group_size=128)), ("q4_0", {}), ("q4_1", {})]


@pytest.mark.parametrize("scheme,kw", _INT4_SHFL, ids=[f"{s}-{k}" for s, k in _INT4_SHFL])
def test_shuffle_table_gemv_integer_codes(scheme, kw, monkeypatch):
    """Integer 4-bit codes through the shuffle-table GEMV ("gemvgsf": exact code values q - 8 / q from registers,
    ``s (sum q x - z sum x)`` per group) against float64 math on the dequantized weight, eagerly and in a graph."""
    from lowbit.kernels import linear as L
    from lowbit.kernels import triton_configs as TC
    from lowbit.tensor.functional import quantize_tensor

    torch.manual_seed(10)
    st = quantize_tensor(torch.randn(200, 1024, device="cuda") * 0.02, scheme, **kw)
    p = L.prepare_linear(st)
    assert p.kind != 0 and p.itable is not None
    ref = L.dequantize_state(st).double()
    for M, cfg in ((1, ("gemvgsf", 128, 8, 4, 4, 2)), (3, ("gemvgs", 64, 4, 2, 4, 2)), (4, ("gemvgsf", 256, 4, 8, 8, 2)),
                   (1, ("gemvgsft", 128, 4, 1, 4, 3))):
        monkeypatch.setitem(TC.TUNED_MM, (4, "int"), [(4, 1 << 30, 1 << 30, cfg)])
        p.plans.clear()
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(M, 1024, device="cuda").to(dt)
            b = (torch.randn(200, device="cuda") * 0.1).to(dt) if M % 2 else None
            r = x.double() @ ref.T + (b.double() if b is not None else 0)
            tol = 1e-2 if dt == torch.bfloat16 else 2e-3
            for _ in range(3):
                y = L.prepared_linear(x, p, b)
                assert ((y.double() - r).norm() / r.norm()).item() < tol, f"{cfg} M={M} {dt}"
            yg = _graph_replay(lambda: L.prepared_linear(x, p, b))
            assert torch.equal(yg, y), f"graph {cfg} M={M} {dt}"


_GEMVQ = [("nf4", dict(block_size=64)), ("int4", dict(group_size=128)), ("int4_asym", dict(group_size=128)),
          ("int4", dict(group_size=32)), ("q4_1", {}), ("q8_0", {}), ("int8", dict(axis=0))]


@pytest.mark.parametrize("scheme,kw", _GEMVQ, ids=[f"{s}-{k}" for s, k in _GEMVQ])
def test_multi_group_gemv(scheme, kw, monkeypatch):
    """The multi-group GEMV ("gemvq*": several scale groups per step, exact integer decode, codebooks by warp
    shuffles; register prefetch, TMA and cp.async pipelining; in-kernel split-K) against float64 math on the
    dequantized weight (ragged N = 200), M = 1..4, bf16 and fp16, bias at odd M, eagerly (launcher, then direct
    launches) and replayed in a CUDA graph (bit-identical to eager); words 4 bytes off 16-byte alignment take the
    plain-load twin of a TMA plan."""
    from lowbit.kernels import linear as L
    from lowbit.kernels import triton_configs as TC
    from lowbit.kernels.triton import lowbit_mm as lm
    from lowbit.tensor.functional import quantize_tensor

    torch.manual_seed(11)
    N, K = 200, 1024
    st = quantize_tensor(torch.randn(N, K, device="cuda") * 0.02, scheme, **kw)
    p = L.prepare_linear(st)
    ref = L.dequantize_state(st).double()
    key = (p.bits, "codebook" if p.kind == 0 else "int")
    s = "s" if p.kind == 0 else ""
    for M, cfg, dt in ((1, (f"gemvq{s}m", 128, 32, 4, 4, 3), torch.bfloat16),
                       (3, (f"gemvq{s}f", 64, 32, 2, 4, 1), torch.bfloat16),
                       (4, (f"gemvq{s}", 64, 64, 1, 4, 3), torch.float16),
                       (1, (f"gemvq{s}ff", 128, 16, 8, 4, 1), torch.bfloat16),
                       (2, (f"gemvq{s}mx", 128, 32, 2, 8, 3), torch.float16)):
        monkeypatch.setitem(TC.TUNED_MM, key, [(4, 1 << 30, 1 << 30, cfg)])
        p.plans.clear()
        x = torch.randn(M, K, device="cuda").to(dt)
        b = (torch.randn(N, device="cuda") * 0.1).to(dt) if M % 2 else None
        r = x.double() @ ref.T + (b.double() if b is not None else 0)
        tol = 1e-2 if dt == torch.bfloat16 else 2e-3
        for _ in range(3):
            y = L.prepared_linear(x, p, b)
            assert ((y.double() - r).norm() / r.norm()).item() < tol, f"{cfg} M={M} {dt}"
        yg = _graph_replay(lambda: L.prepared_linear(x, p, b))
        assert torch.equal(yg, y), f"graph {cfg} M={M} {dt}"
        plan = next(iter(p.plans.values()))
        assert plan.q and plan.consts["SHFL"] == (p.kind == 0)
        if plan.tma:
            w2 = torch.empty(p.words.numel() + 1, dtype=torch.int32, device="cuda")[1:].view_as(p.words)
            w2.copy_(p.words)
            t = p.table if p.table is not None else p.itable
            y2 = lm.run_plan(plan, x, w2, p.scales, p.zeros, t, b, N, K, K // p.group, 32 // p.bits)
            assert ((y2.double() - r).norm() / r.norm()).item() < tol, f"unaligned {cfg}"
