"""lowbit.kernels on CPU: selection and fallback, derived layouts, reference numerics, custom ops."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import kernels
from lowbit.kernels import reference, select


def _w(n=48, k=256, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


STATES_4BIT = [
    ("nf4", dict(block_size=64)),
    ("fp4", dict(block_size=64)),
    ("nf4", dict(block_size=64, double_quant=True)),
    ("int4", dict(group_size=128)),
    ("int4_asym", dict(group_size=128)),
    ("int4", dict(block_size=64)),
]


def test_import_does_not_load_triton_or_cuda():
    code = ("import sys, lowbit.kernels as k; k.select; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_select_resolution_and_errors():
    cpu = torch.device("cpu")
    assert select.resolve("gemm_4bit", cpu) == "reference"
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        select.resolve("gemm_4bit", cpu, "triton")
    with pytest.raises(ValueError, match="unknown kernel op"):
        select.resolve("gemm_8bit", cpu)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        select.set_backend("cutlass")
    with pytest.raises(ValueError, match="does not implement"):
        select.set_backend("native", "gemm_4bit")
    with select.use("reference", "gemm_4bit"):
        assert select.get_backend("gemm_4bit") == "reference"
    assert select.get_backend("gemm_4bit") in ("auto", "reference")


@pytest.mark.parametrize("scheme,kw", STATES_4BIT + [("int8", dict(block_size=64)), ("int8_asym", dict(group_size=32))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_out_dtype_is_one_rounding_of_float32(scheme, kw, dtype):
    st = lowbit.quantize(_w(), scheme, **kw)
    full = lowbit.dequantize(lowbit.quantize(_w().double().float(), scheme, **kw))
    got = kernels.dequantize(st, dtype)
    assert got.dtype == dtype and got.shape == st.shape
    assert torch.equal(got, full.to(dtype))


@pytest.mark.parametrize("scheme,kw", STATES_4BIT)
def test_prepared_4bit_layout_dequantizes_identically(scheme, kw):
    st = lowbit.quantize(_w(), scheme, **kw)
    p = kernels.prepare_4bit(st)
    assert p is not None
    assert torch.equal(p.dequantize(torch.float32), lowbit.dequantize(st))
    assert p.kind == {"nf4": 0, "fp4": 0, "int4": 1, "int4_asym": 2}[scheme]
    assert kernels.prepare_4bit(st) is p  # cached
    st.data = st.data.clone()
    assert kernels.prepare_4bit(st) is not p  # invalidated when the codes change


def test_prepare_4bit_declines_unsupported_states():
    assert kernels.prepare_4bit(lowbit.quantize(torch.randn(10, 100), "nf4", 64)) is None  # blocks straddle rows
    assert kernels.prepare_4bit(lowbit.quantize(torch.randn(256), "nf4", 64)) is None  # not 2-D
    assert kernels.prepare_4bit(lowbit.quantize(_w(), "int8", 64)) is None


@pytest.mark.parametrize("scheme,kw", STATES_4BIT)
def test_linear_4bit_reference(scheme, kw):
    st = lowbit.quantize(_w(), scheme, **kw)
    x = torch.randn(2, 3, 256)
    b = torch.randn(48)
    want = F.linear(x.double(), lowbit.dequantize(st).double(), b.double())
    got = kernels.linear_4bit(x, st, b)
    assert got.shape == (2, 3, 48)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # the custom op on the derived layout computes the same
    p = kernels.prepare_4bit(st)
    y = torch.ops.lowbit.gemm_4bit(x.reshape(-1, 256), p.qweight, p.scales, p.zeros, p.values, b, p.group, p.kind)
    torch.testing.assert_close(y.reshape(2, 3, 48), got)


@pytest.mark.parametrize("fp8", [False, True])
def test_quantize_rows_reference(fp8):
    x = torch.randn(7, 300) * torch.logspace(-3, 2, 7)[:, None]
    x[3] = 0
    q, s = reference.quantize_rows(x, fp8)
    qmax = 448.0 if fp8 else 127.0
    amax = x.abs().amax(1).clamp(min=1e-12)
    assert torch.equal(s, amax / qmax)
    assert float(q.float().abs().max()) <= qmax
    err = (q.float() * s[:, None] - x).abs()
    # int8: half a step; fp8 e4m3: half an ulp of 3 mantissa bits, relative
    bound = s[:, None] / 2 + 1e-7 if not fp8 else x.abs() * 2.0 ** -4 + s[:, None] * 2.0 ** -10
    assert bool((err <= bound).all())
    assert bool((q[3] == 0).all())


def test_int8_and_fp8_linear_reference_match_float64():
    w = _w(64, 128)
    x = torch.randn(5, 128)
    b = torch.randn(64)
    st8 = lowbit.quantize(w, "int8", axis=0)
    wq, ws = kernels.prepare_int8(st8)
    assert wq.dtype == torch.int8 and torch.equal(wq.float() * ws[:, None], lowbit.dequantize(st8))
    q, s = reference.quantize_rows(x, False)
    want = (q.double() @ wq.double().T) * s.double()[:, None] * ws.double()[None, :] + b.double()
    torch.testing.assert_close(kernels.int8_linear_dynamic(x, st8, b).double(), want, rtol=1e-5, atol=1e-5)
    stf = lowbit.quantize(w, "fp8_e4m3", axis=0)
    wf, wfs = kernels.prepare_fp8(stf)
    assert wf.dtype == torch.float8_e4m3fn
    qf, sf = reference.quantize_rows(x, True)
    want = (qf.double() @ wf.double().T) * sf.double()[:, None] * wfs.double()[None, :] + b.double()
    torch.testing.assert_close(kernels.fp8_linear_dynamic(x, stf, b).double(), want, rtol=1e-5, atol=1e-5)
    # and both stay close to the float linear
    ref = F.linear(x, w, b)
    assert (kernels.int8_linear_dynamic(x, st8, b) - ref).norm() / ref.norm() < 0.02
    with pytest.raises(ValueError, match="int8 per-channel"):
        kernels.prepare_int8(lowbit.quantize(w, "int8", 64))


def test_custom_ops_opcheck():
    st = lowbit.quantize(_w(), "int4_asym", group_size=128)
    p = kernels.prepare_4bit(st)
    x = torch.randn(3, 256)
    torch.library.opcheck(torch.ops.lowbit.gemm_4bit, (x, p.qweight, p.scales, p.zeros, p.values, None, 128, p.kind))
    sn = lowbit.quantize(_w(), "nf4", 64)
    args = (sn.data, sn.scales, None, sn.code, sn.numel, 64, 4, 0, torch.float16)
    torch.library.opcheck(torch.ops.lowbit.dequantize_blockwise, args)
    out = torch.ops.lowbit.dequantize_blockwise(*args)
    assert torch.equal(out.view(sn.shape), lowbit.dequantize(sn).half())
    torch.library.opcheck(torch.ops.lowbit.quantize_blockwise, (torch.randn(1000), "fp4", 64))
    w8, s8 = kernels.prepare_int8(lowbit.quantize(_w(32, 64), "int8", axis=0))
    torch.library.opcheck(torch.ops.lowbit.int8_linear_dynamic, (torch.randn(4, 64), w8, s8, None))


def test_linear_4bit_compiles_on_cpu():
    st = lowbit.quantize(_w(), "nf4", 64)
    kernels.prepare_4bit(st)
    x = torch.randn(4, 256)
    f = torch.compile(lambda t: kernels.linear_4bit(t, st), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), kernels.linear_4bit(x, st))


def test_api_quantize_falls_back_on_cpu():
    x = torch.randn(1000)
    a = kernels.quantize(x, "nf4", 64, double_quant=True)
    b = lowbit.quantize(x, "nf4", 64, double_quant=True)
    assert torch.equal(a.data, b.data) and torch.equal(a.nested.data, b.nested.data)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        kernels.quantize(x, "nf4", 64, backend="triton")


def test_state_offset_held_as_a_tensor_saves_the_same_bytes():
    # kernels.quantize on CUDA keeps the double-quant offset as a device tensor (no host sync); the state reads
    # it as the same float on first use, so its state_dict (and every file) is byte-identical
    import copy

    from lowbit.tensor.state import QuantState, _offset_key

    a = lowbit.quantize(torch.randn(1000, generator=torch.Generator().manual_seed(3)), "nf4", 64, double_quant=True)
    b = copy.copy(a)
    b.__dict__ = dict(a.__dict__)
    b.offset = torch.tensor([a.offset], dtype=torch.float32)
    assert b.__dict__["_offset"] is None and isinstance(b.offset_tensor(), torch.Tensor)
    key = _offset_key(b)
    assert key[0] == "t" and key != _offset_key(a)
    b.validate()  # an unread tensor offset validates without being read
    assert b.__dict__["_offset"] is None
    c = b.to("cpu")  # moves unread
    assert c.__dict__["_offset"] is None and c.offset == a.offset
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert isinstance(b.offset, float) and b.offset == a.offset and b == a and repr(b) == repr(a)
    assert torch.equal(lowbit.dequantize(c), lowbit.dequantize(a))
    assert torch.equal(a.offset_tensor(), torch.tensor([a.offset], dtype=torch.float32))
    assert QuantState.from_state_dict(sb).offset == a.offset
    # a cached derived layout follows a new offset
    st = kernels.quantize(torch.randn(64, 128), "nf4", 64, double_quant=True)
    p1 = kernels.prepare_4bit(st)
    st.offset = torch.tensor(st.offset + 1.0)
    p2 = kernels.prepare_4bit(st)
    assert p2 is not p1 and torch.allclose(p2.scales, p1.scales + 1.0)
    with pytest.raises(ValueError, match="one float value"):
        st.offset = torch.zeros(2)
    st.offset = None
    assert st.offset is None and st.offset_tensor() is None


def test_strict_mode_switch_and_cpu_messages_unchanged(monkeypatch):
    from lowbit.kernels.api import strict_mode

    monkeypatch.delenv("LOWBIT_STRICT", raising=False)
    assert strict_mode() is False and strict_mode(True) is True
    for v, want in (("1", True), ("true", True), ("0", False), ("", False)):
        monkeypatch.setenv("LOWBIT_STRICT", v)
        assert strict_mode() is want and strict_mode(False) is False
    x = torch.randn(1000)
    x[3] = float("nan")
    x[5] = float("inf")
    for strict in (None, True, False):  # the CPU path always checks synchronously, with its own message
        with pytest.raises(ValueError, match=r"non-finite values \(1 NaN, 1 Inf\)"):
            kernels.quantize(x, "nf4", 64, strict=strict)


def test_state_pickled_before_the_device_offset_still_reads_its_offset():
    # a QuantState pickled by an earlier lowbit kept ``offset`` as a plain instance attribute
    import pickle

    a = lowbit.quantize(torch.randn(500), "nf4", 64, double_quant=True)
    b = pickle.loads(pickle.dumps(a))
    assert b.offset == a.offset and b.__dict__.get("_offset_t") is None
    legacy = object.__new__(type(a))
    legacy.__dict__.update({k: v for k, v in a.__dict__.items() if not k.startswith("_offset")}, offset=a.offset)
    c = pickle.loads(pickle.dumps(legacy))
    assert c.offset == a.offset
    c.validate()
    assert torch.equal(lowbit.dequantize(c), lowbit.dequantize(a))
