"""Derived kernel layouts: what the GPU keeps beside the saved state, and that saving never sees them.

* int8 weights with dynamic int8 activations read the stored uint8 codes (``code - 128`` = bit 7 flipped in the
  GEMM's registers): no signed int8 copy of the weight is derived (``lowbit.kernels.api.int8_codes`` is a view);
  the results equal those of the signed copy (``prepare_int8``), bit for bit.
* saved bytes (``state_dict``) are identical before and after the kernels prepared their layouts, on the CPU and
  on CUDA (CUDA-marked tests), and after moving back to the CPU.
* with ``TRITON_INTERPRET=1`` and Triton installed, the scaled GEMM itself (plain and TMA variants) on uint8 codes
  against the int8 copy.
"""
import copy
import os

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels import api, reference
from lowbit.nn import Linear4bit, QLinear
from lowbit.tensor.functional import quantize_tensor


def _int8_state(n=48, k=96, seed=0):
    torch.manual_seed(seed)
    return lowbit.quantize(torch.randn(n, k), "int8", axis=0)


def test_int8_codes_is_a_view_of_the_stored_codes():
    st = _int8_state()
    codes, s = api.int8_codes(st)
    assert codes.dtype == torch.uint8 and codes.shape == st.shape
    assert codes.untyped_storage().data_ptr() == st.data.untyped_storage().data_ptr()  # no copy
    assert api.int8_codes(st)[0] is codes  # cached on the state
    w8, s8 = api.prepare_int8(st)
    assert torch.equal(api.signed_int8(codes), w8) and torch.equal(s, s8)
    assert api.signed_int8(w8) is w8
    with pytest.raises(ValueError, match="symmetric int8 per-channel"):
        api.int8_codes(lowbit.quantize(torch.randn(8, 64), "int8", 64))


def test_int8_linear_dynamic_codes_equal_signed_copy_cpu():
    st = _int8_state(40, 64, 1)
    x = torch.randn(3, 5, 64)
    b = torch.randn(40)
    got = api.int8_linear_dynamic(x, st, b)
    want = reference.int8_linear_dynamic(x, *api.prepare_int8(st), b)
    assert torch.equal(got, want)
    assert torch.equal(api.int8_linear_dynamic(x, api.int8_codes(st), b), want)
    # the op under torch.compile takes the codes too (its reference branch converts them)
    from lowbit.kernels import ops  # noqa: F401

    assert torch.equal(torch.ops.lowbit.int8_linear_dynamic(x, *api.int8_codes(st), b), want)


def _sd_bytes(module):
    return {k: (v.dtype, tuple(v.shape), v.detach().cpu().contiguous().view(torch.uint8).clone())
            for k, v in module.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0] and a[k][1] == b[k][1] and torch.equal(a[k][2], b[k][2]), k


def _lin(n=64, k=128, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def _module_zoo():
    out = []
    for qt in ("nf4", "int4"):
        m = Linear4bit.from_module(_lin(), quant_type=qt)
        m.freeze()
        out.append(m)
    for w, act in (("qint4", None), ("qint8", None), ("qint8", "qint8"), ("qfloat8", "qfloat8")):
        m = QLinear.from_module(_lin(), weights=w, activations=act, act_dynamic=act is not None)
        m.freeze()
        out.append(m)
    for scheme, kw in (("q4_0", {}), ("q8_0", {}), ("int4_asym", dict(group_size=32, scale_dtype=torch.float16))):
        lin = _lin()
        out.append(QLinear.from_quant_state(lin, quantize_tensor(lin.weight.detach(), scheme, **kw)))
    return out


def test_saved_bytes_unchanged_by_kernel_preparation_cpu():
    for m in _module_zoo():
        before = _sd_bytes(m)
        with torch.no_grad():
            for M in (1, 40):
                m(torch.randn(M, 128))
        _same(before, _sd_bytes(m))


@pytest.mark.cuda
def test_saved_bytes_unchanged_by_kernel_preparation_cuda():
    for m in _module_zoo():
        before = _sd_bytes(m)
        g = copy.deepcopy(m).cuda().to(torch.bfloat16)
        with torch.no_grad():
            for M in (1, 3, 40, 300):
                g(torch.randn(M, 128, device="cuda", dtype=torch.bfloat16))
        after = _sd_bytes(g)
        for k in list(before):  # the float bias follows .to(bfloat16); the packed state does not
            if k.endswith("bias"):
                before.pop(k), after.pop(k)
        _same(before, after)
        _same(before, {k: v for k, v in _sd_bytes(g.cpu()).items() if not k.endswith("bias")})


@pytest.mark.cuda
def test_int8_dynamic_module_keeps_no_signed_copy_cuda():
    pytest.importorskip("triton")
    from lowbit.kernels.api import _CACHE_ATTR

    m = QLinear.from_module(_lin(384, 512), weights="qint8", activations="qint8", act_dynamic=True)
    m.freeze()
    m = m.cuda().to(torch.bfloat16)
    st = m.qstate
    for M in (1, 4, 17, 300):
        x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = m(x)
        want = api.int8_linear_dynamic(x, api.prepare_int8(st), m.bias)  # the signed copy, made for comparison
        assert torch.equal(y, want), f"M={M}"
    own = {t.untyped_storage().data_ptr() for t in (st.data, st.scales) if t is not None}
    cache = st.__dict__[_CACHE_ATTR]
    for key, entry in cache.items():
        if key == "int8":
            continue  # prepare_int8 called by this test itself
        for t in (entry[2] if isinstance(entry[2], tuple) else ()):
            if isinstance(t, torch.Tensor) and t.numel() >= st.numel:
                assert t.untyped_storage().data_ptr() in own, f"{key}: a derived copy of the weight"


def _interp_index_fix(monkeypatch):
    """numpy >= 2.4 refuses int() of a one-element 1-d array, which the Triton interpreter's tensor.__index__ does
    (``range(0, tl.cdiv(K, BK))`` in a kernel): take the element."""
    import triton.runtime.interpreter as interp

    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton interpreter)")
@pytest.mark.parametrize("M,N,K,cfg", [(1, 64, 128, (16, 64, 64, 8, 4, 2)), (5, 96, 200, (16, 32, 64, 8, 4, 2)),
                                       (40, 64, 256, (32, 64, 64, 8, 4, 2, "tma"))])
def test_scaled_gemm_reads_uint8_codes_interpreter(monkeypatch, M, N, K, cfg):
    pytest.importorskip("triton")
    _interp_index_fix(monkeypatch)
    from lowbit.kernels.triton import scaled_gemm as sg

    torch.manual_seed(M)
    q, sx = sg.quantize_rows(torch.randn(M, K), False)
    codes = torch.randint(0, 256, (N, K), dtype=torch.uint8)
    sw, bias = torch.rand(N) + 0.1, torch.randn(N)
    a = sg.scaled_gemm(q, api.signed_int8(codes), sx, sw, bias, torch.float32, cfg)
    b = sg.scaled_gemm(q, codes, sx, sw, bias, torch.float32, cfg)
    assert torch.equal(a, b)
    ref = reference._rescale((q.double() @ api.signed_int8(codes).double().T).float(), sx, sw, bias, torch.float32)
    torch.testing.assert_close(b, ref, rtol=1e-6, atol=1e-5)
    with pytest.raises(TypeError, match="int8 activations"):
        sg.scaled_gemm(q.float().to(torch.float8_e4m3fn), codes, sx, sw, bias, torch.float32, cfg)


# ---------------------------------------------------------------------------------------------
# GGUF blocks held only in the kernel layout (lowbit.kernels.linear.ResidentState)


def _gguf_state(scheme, n=64, k=128, seed=0):
    torch.manual_seed(seed)
    return quantize_tensor(torch.randn(n, k) * 0.05, scheme)


def _make_resident_cpu(st):
    """What prepare_linear does on CUDA, done on the CPU (the same functions)."""
    from lowbit.kernels import linear as L

    p = L._prepare_gguf(st)
    L._store(st, "linear", p)
    L._make_resident(st, p)
    return p


@pytest.mark.parametrize("scheme", ["q4_0", "q4_1", "q8_0"])
def test_gguf_resident_layout_replaces_the_blocks_and_gives_them_back(scheme):
    from lowbit.kernels import linear as L

    st = _gguf_state(scheme)
    orig = st.data.clone()
    nbytes = st.nbytes
    p = _make_resident_cpu(st)
    assert type(st) is L.ResidentState
    assert st.__dict__["data"] is p.words  # the blocks are no longer held: the layout is the storage
    assert st.nbytes == nbytes and st.device == orig.device and st.shape == (64, 128)
    assert L._cached(st, "linear") is p
    sd = st.state_dict("w.")  # reading data gives the blocks back, bit for bit, and the state is plain again
    assert type(st) is lowbit.QuantState and st.__dict__["data"] is sd["w.data"]
    assert torch.equal(sd["w.data"], orig) and sd["w.data"].dtype == torch.uint8
    assert L._cached(st, "linear") is p  # the layout stays valid (a CUDA graph may hold its pointers)
    assert L.prepare_linear(st) is p and type(st) is L.ResidentState  # the next preparation: one copy again
    assert st.__dict__["data"] is p.words
    st.state_dict()
    # every way out sees the original blocks
    for get in (lambda s: s.to("cpu").data, lambda s: copy.deepcopy(s).data, lambda s: s.cpu().data,
                lambda s: __import__("pickle").loads(__import__("pickle").dumps(s)).data,
                lambda s: lowbit.dequantize(s)):
        _make_resident_cpu(st)
        got = get(st)
        want = orig if got.dtype == torch.uint8 else lowbit.dequantize(_gguf_state(scheme))
        assert torch.equal(got, want)
    # an in-place edit through .data reaches the stored blocks (the calibration's scale_rows does this)
    _make_resident_cpu(st)
    st.data.copy_(torch.zeros_like(orig))
    assert type(st) is lowbit.QuantState and int(st.data.sum()) == 0
    assert L._cached(st, "linear") is None  # the edit invalidated the layout


def test_gguf_resident_module_saves_identical_files(tmp_path):
    from lowbit.io import native
    from lowbit.kernels import linear as L

    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    lowbit.quantize(model, weights="q4_0")
    lowbit.freeze(model)
    native.save(model, tmp_path / "a")
    states = [m.qstate for m in model.modules() if getattr(m, "qstate", None) is not None]
    assert states
    for st in states:
        _make_resident_cpu(st)
        assert type(st) is L.ResidentState
    native.save(model, tmp_path / "b")
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_gguf_resident_keeps_the_blocks_when_not_invertible():
    from lowbit.kernels import linear as L

    st = _gguf_state("q4_0")
    raw = st.data.clone()
    raw[0, 0:2] = torch.tensor([0x01, 0x7D], dtype=torch.uint8)  # a signalling-NaN fp16 scale (payload 0x101)
    st.data = raw
    p = L._prepare_gguf(st)
    L._store(st, "linear", p)
    L._make_resident(st, p)
    # either the payload survived float32 and back (then the state is resident and gives it back) or it stayed
    assert torch.equal(st.data, raw)
    if type(st) is lowbit.QuantState and L._cached(st, "linear") is p:  # not invertible: not tried on every call
        calls = []
        orig = L._gguf_blocks
        try:
            L._gguf_blocks = lambda *a: calls.append(1) or orig(*a)
            L.prepare_linear(st)
        finally:
            L._gguf_blocks = orig
        assert not calls


@pytest.mark.cuda
@pytest.mark.parametrize("scheme", ["q4_0", "q4_1", "q8_0"])
def test_gguf_resident_on_cuda(scheme, monkeypatch):
    pytest.importorskip("triton")
    from lowbit.kernels import linear as L

    lin = _lin(384, 512)
    cpu = QLinear.from_quant_state(lin, quantize_tensor(lin.weight.detach(), scheme))
    orig = _sd_bytes(cpu)
    outs = {}
    for resident in ("0", "1"):
        monkeypatch.setenv("LOWBIT_GGUF_RESIDENT", resident)
        g = copy.deepcopy(cpu).cuda().to(torch.bfloat16)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        res = []
        for M in (1, 3, 16, 64, 300):
            torch.manual_seed(M)
            x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                res.append(g(x))
        torch.cuda.synchronize()
        grew = torch.cuda.memory_allocated() - before - sum(r.numel() * r.element_size() for r in res)
        outs[resident] = (res, grew, g)
        assert (type(g.qstate) is L.ResidentState) == (resident == "1")
    for a, b in zip(outs["0"][0], outs["1"][0]):
        assert torch.equal(a, b)  # the same kernels on the same layout
    blocks = cpu.qstate.data.numel()
    assert outs["0"][1] >= blocks // 2  # the layout beside the blocks
    assert outs["0"][1] - outs["1"][1] >= 0.9 * blocks  # resident: the blocks were freed
    g = outs["1"][2]
    p = L._cached(g.qstate, "linear")
    after = {k: v for k, v in _sd_bytes(g).items() if not k.endswith("bias")}
    _same({k: v for k, v in orig.items() if not k.endswith("bias")}, after)
    assert type(g.qstate) is lowbit.QuantState  # state_dict gave the blocks back
    assert L._cached(g.qstate, "linear") is p  # the layout kept (same pointers: CUDA-graph safe)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(g(x), outs["0"][2](x))
    L.prepare(g.qstate)  # one copy again
    assert type(g.qstate) is L.ResidentState and L._cached(g.qstate, "linear") is p
    with torch.no_grad():
        assert torch.equal(g(x), outs["0"][2](x))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton interpreter)")
@pytest.mark.parametrize("act", ["int8"])
def test_dynamic_hot_path_equals_the_api_interpreter(monkeypatch, act):
    """The eager hot path of dynamic-activation modules (``_dyn_linear`` on the ``_DynLinear`` views) launches what
    ``int8_linear_dynamic`` launches: equal outputs (Triton interpreter; fp8 kernels do not run in the interpreter,
    the fp8 hot path is checked on CUDA by tests/test_kernels_modules_cuda.py)."""
    pytest.importorskip("triton")
    _interp_index_fix(monkeypatch)
    from lowbit.kernels import linear as L

    torch.manual_seed(0)
    scheme = "int8" if act == "int8" else "fp8_e4m3"
    st = lowbit.quantize(torch.randn(48, 128) * 0.1, scheme, axis=0)
    pair = api.int8_codes(st) if act == "int8" else api.prepare_fp8(st)
    d = L._DynLinear(act, *pair)
    assert d.w.untyped_storage().data_ptr() == st.data.untyped_storage().data_ptr()
    x = torch.randn(2, 3, 128).to(torch.float16)
    bias = torch.randn(48).to(torch.float16)
    got = L._dyn_linear(x, d, bias)
    want = api._scaled_linear_triton(x, *pair, bias, fp8=act == "fp8")
    assert got.shape == (2, 3, 48) and torch.equal(got, want)
    ref = (reference.int8_linear_dynamic(x.float(), api.signed_int8(pair[0]), pair[1], bias.float()) if act == "int8"
           else reference.fp8_linear_dynamic(x.float(), *pair, bias.float()))
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
