"""The fused low-bit matmul v2 (``lowbit.kernels.triton.lowbit_mm``) on the CPU: its tables, configs and op.

* the byte-pair table of the NF4/FP4 kernels decodes every byte to the exact float32 code values of its two
  nibbles (even element = high nibble);
* ``config_mm`` picks the GEMV at M <= 4, the GEMM up to 256 rows and dequantize + cuBLAS above, honours
  ``TUNED_MM`` rows and resolves ``split_k = 0``;
* the ``lowbit::mm_lowbit`` op's CPU implementation equals ``F.linear`` on the dequantized weight, and its fake
  passes ``opcheck``;
* with ``TRITON_INTERPRET=1`` and Triton installed, the kernels themselves (GEMV, GEMM, dequantize) run in
  Triton's interpreter against the reference (fp16: the interpreter rounds bf16 casts toward zero and
  mis-computes bf16 dots, so bf16 is checked on the GPU only, tests/test_kernels_cuda.py).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import linear as L
from lowbit.kernels import triton_configs as TC
from lowbit.tensor.functional import quantize_tensor

FORMATS = [("nf4", dict(block_size=64)), ("fp4", dict(block_size=64)), ("int4", dict(group_size=32)),
           ("int4", dict(group_size=128)), ("int4_asym", dict(group_size=64)), ("q4_0", {}), ("q4_1", {}),
           ("q8_0", {}), ("int8", dict(axis=0))]


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_byte_pair_table_exact(name):
    from lowbit.formats import codebook

    code = codebook.get_code(name).float()
    t = L.byte_pair_table(code)
    assert t.dtype == torch.int64 and t.shape == (256,)
    lo = (t & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    hi = (t >> 32).to(torch.int32).view(torch.float32)
    b = torch.arange(256)
    assert torch.equal(lo, code[b >> 4]) and torch.equal(hi, code[b & 15])


def test_config_mm_buckets_and_tuned_rows(monkeypatch):
    assert TC.config_mm(4, 0, 1, 4096, 4096)[0] == "gemvqs"  # the shipped M = 1 rows: the multi-group GEMV
    assert TC.config_mm(4, 1, 4, 4096, 4096)[0] in ("gemv", "gemvg", "v1")
    assert TC.config_mm(4, 0, 512, 4096, 4096) == ("dense",)
    cfg = TC.config_mm(4, 1, 1, 4096, 4096)
    assert cfg[0].startswith("gemvq") and cfg[3] >= 1  # the committed table; split resolved
    assert TC.config_mm(4, 2, 1, 28672, 8192, 128)[0] == "gemvqm" and TC.config_mm(8, 1, 1, 28672, 8192)[0] == "gemvqm"
    assert TC.config_mm(8, 1, 1, 8192, 8192)[0] == "gemvq"  # no TMA where its launch cost showed in eager calls
    monkeypatch.setattr(TC, "TUNED_MM", {})
    assert TC.default_mm(4, 1, 16, 4096, 4096) == ("dense",)
    assert TC.config_mm(4, 0, 4, 8192, 8192) == TC.default_mm(4, 0, 4, 8192, 8192)  # no rows: the default
    assert TC.default_mm(8, 1, 1, 4096, 4096)[0] == "gemvg"
    monkeypatch.setitem(TC.TUNED_MM, (4, "codebook"), [(1, 4096, 4096, ("gemv", 64, 16, 0, 4, 2))])
    got = TC.config_mm(4, 0, 1, 4096, 4096)
    assert got[:3] == ("gemv", 64, 16) and got[3] == TC._auto_split(64, 4096 // 8 // 16, 8 * TC.SM_COUNT)
    assert TC.config_mm(4, 0, 1, 8192, 8192) == TC.default_mm(4, 0, 1, 8192, 8192)  # row does not match


def _interp_case(scheme, kw, N, K, seed):
    """A random ``[N, K]`` weight (seed ``seed``) quantized as ``scheme``, its CUDA layout built on the CPU, the
    float32 reference and the format's ``TUNED_MM`` key: the set-up of the Triton-interpreter tests."""
    torch.manual_seed(seed)
    st = quantize_tensor(torch.randn(N, K) * 0.02, scheme, **kw)
    p = L._prepare_cuda(st)
    return st, p, L.dequantize_state(st).float(), (p.bits, "codebook" if p.kind == 0 else "int")


@pytest.mark.parametrize("scheme,kw", FORMATS, ids=[f"{s}-{k}" for s, k in FORMATS])
def test_mm_op_cpu_equals_reference(scheme, kw):
    import lowbit.kernels.ops  # noqa: F401

    torch.manual_seed(0)
    st = quantize_tensor(torch.randn(32, 256), scheme, **kw)
    p = L._prepare_cuda(st)  # the CUDA layout, built on the CPU
    assert p is not None
    ref = L.dequantize_state(st).float()
    x = torch.randn(3, 256)
    b = torch.randn(32)
    y = torch.ops.lowbit.mm_lowbit(x, p.words, p.scales, p.zeros, p.table, b, p.n, p.k, p.bits, p.group, p.kind,
                                   p.zero)
    torch.testing.assert_close(y, F.linear(x, ref, b), rtol=1e-5, atol=1e-5)
    if p.kind == 0:
        assert p.table2 is not None and p.table2.shape == (256,)


def test_mm_op_opcheck():
    import lowbit.kernels.ops  # noqa: F401

    st = quantize_tensor(torch.randn(16, 64), "nf4", block_size=64)
    p = L._prepare_cuda(st)
    torch.library.opcheck(torch.ops.lowbit.mm_lowbit.default,
                          (torch.randn(2, 64), p.words, p.scales, p.zeros, p.table, None, p.n, p.k, p.bits, p.group,
                           p.kind, p.zero))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton interpreter)")
@pytest.mark.parametrize("scheme,kw", FORMATS, ids=[f"{s}-{k}" for s, k in FORMATS])
def test_v2_kernels_in_triton_interpreter(scheme, kw, monkeypatch):
    pytest.importorskip("triton")
    N, K = 48, 256
    st, p, ref, _ = _interp_case(scheme, kw, N, K, 1)
    assert torch.equal(p.dense(torch.float16), ref.to(torch.float16))  # row-contiguous dequantize, every format
    assert torch.equal(p.dense(torch.float32), ref)
    from lowbit.kernels.triton import lowbit_mm as lm

    if p.kind == 3 or p.p4 is None:  # the plane-order dequantize of the word layout
        assert torch.equal(lm.dequantize(p.words, p.scales, p.zeros, p.table2, N, K, K // p.group, p.bits, p.group,
                                         p.kind, p.zero, torch.float16), ref.to(torch.float16))
    from lowbit.kernels.triton import lowbit_mm as lm

    for M in (1, 3, 16):
        x = torch.randn(M, K).half()
        b = torch.randn(N).half() if M == 3 else None
        r = x.float() @ ref.T + (b.float() if b is not None else 0)
        cfgs = [("gemv", 16, 16, 2, 4, 1), ("gemvg", 32, 8, 2, 4, 1)] if M <= 4 else [("gemm", 16, 32, 16, 2, 4, 1)]
        if M <= 4:
            cfgs.append(("gemvgf", 32, 4, 3, 4, 1))  # register prefetch (3 splits of 1-4 steps: clamped last step)
            cfgs.append(("gemvgt", 32, 8, 2, 4, 1))  # scales / zeros from the transposed copy
            cfgs.append(("gemvgft", 32, 4, 1, 4, 1))
        if M <= 4 and p.kind == 0:
            cfgs.append(("gemvgp", 32, 8, 2, 4, 1))  # the byte-pair table in the group-step GEMV
        if M <= 4 and p.bits == 4 and p.kind == 0:
            cfgs.append(("gemvgsf", 32, 8, 2, 4, 1))  # shuffle config (reads the table in the interpreter)
            cfgs.append(("gemvgpf", 32, 8, 1, 4, 1))
        if M > 4 and p.p4 is not None and p.kind != 3:
            cfgs.insert(0, ("v1gemm", 32, 64, 2, 4, 1))  # the v1 tensor-core GEMM with an explicit config
        for cfg in cfgs:
            p.plans.clear()
            monkeypatch.setitem(TC.TUNED_MM, (p.bits, "codebook" if p.kind == 0 else "int"), [(M, N, K, cfg)])
            y = L.prepared_linear(x, p, b)
            assert ((y.float() - r).norm() / r.norm()).item() < 2e-3, cfg
        plan = lm.make_plan(M, N, K, p.bits, p.group, p.kind, p.zero, x.dtype, b is not None, cfgs[-1])
        assert plan.grid[1] == plan.split


@pytest.mark.parametrize("cfg", [("v1gemm", 64, 128, 2, 4, 2), ("v1",)])
def test_plan_routes_small_m_gemm_rows(cfg, monkeypatch):
    """TUNED_MM rows above M = 4 naming the v1 4-bit GEMM ("v1gemm" with a config, or "v1") apply to the 4-bit
    kinds 0-2 only; GGUF blocks (no 4-bit GEMM layout) fall back to dequantize + cuBLAS."""
    torch.manual_seed(0)
    x2 = torch.randn(16, 256)
    for scheme, kw, gemm in (("int4", dict(group_size=32), True), ("q4_0", {}, False), ("q4_1", {}, False)):
        p = L._prepare_cuda(quantize_tensor(torch.randn(32, 256), scheme, **kw))
        monkeypatch.setitem(TC.TUNED_MM, (4, "int"), [(16, 1 << 30, 1 << 30, cfg)])
        plan = L._plan(p, 16, x2, None)
        if not gemm:
            assert plan is L._DENSE, scheme
        elif cfg[0] == "v1gemm":
            assert type(plan) is L._V1Gemm and plan.cfg == ("gemm", 64, 128, 2, 4, 2)
        else:
            assert plan is L._V1


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton interpreter)")
@pytest.mark.parametrize("scheme,kw", [("nf4", dict(block_size=64)), ("int4", dict(group_size=32)), ("q8_0", {})])
def test_v1_gemv_plan_equals_v1_path(scheme, kw, monkeypatch):
    """TUNED_MM rows ("v1",) at M <= 4 go through gemv.GemvPlan (a cached plan): the same kernel, config and
    arguments as prepared_linear_v1, so the results are identical (split-K with the reduction kernel included)."""
    pytest.importorskip("triton")
    from lowbit.kernels.triton import gemv as gv

    torch.manual_seed(2)
    N, K = 40, 512
    p = L._prepare_cuda(quantize_tensor(torch.randn(N, K) * 0.02, scheme, **kw))
    monkeypatch.setitem(TC.TUNED_MM, (p.bits, "codebook" if p.kind == 0 else "int"), [(4, 1 << 30, 1 << 30, ("v1",))])
    for M, split in ((1, 4), (3, 1)):
        monkeypatch.setattr(TC, "config_gemv", lambda *a, split=split: (16, 64, split, 4, 1))
        x = torch.randn(M, K).half()
        b = torch.randn(N).half() if M == 3 else None
        p.plans.clear()
        y = L.prepared_linear(x, p, b)
        assert any(type(v) is gv.GemvPlan for v in p.plans.values())
        assert torch.equal(y, L.prepared_linear_v1(x, p, b))


@pytest.mark.parametrize("scheme,kw", [("int4_asym", dict(group_size=128)), ("int4", dict(group_size=64)),
                                       ("nf4", dict(block_size=64))])
def test_prepared_layout_shares_the_state_tensors(scheme, kw):
    """The kernel layout holds no second copy of scales or zero points: float32 scales and uint8 zero points are
    the state's own tensors (the kernels widen uint8 zeros when they load them); the transposed copies exist only
    once a config asks for them (suffix "t")."""
    st = quantize_tensor(torch.randn(64, 512), scheme, **kw)
    p = L._prepare_cuda(st)
    assert p.scales.data_ptr() == st.scales.data_ptr() and p.scales.dtype == torch.float32
    assert p.words.data_ptr() == st.data.data_ptr()
    if st.zeros is not None:
        assert p.zeros.dtype == torch.uint8 and p.zeros.data_ptr() == st.zeros.data_ptr()
        assert p.p4.zeros.data_ptr() == st.zeros.data_ptr() and p.p4.zeros_u8.data_ptr() == st.zeros.data_ptr()
    assert p.p4.scales.data_ptr() == st.scales.data_ptr()
    assert p.sT is None and p.zT is None
    if p.kind != 0:  # the exact code values of the integer shuffle GEMV (kind 1: q - 8; kind 2: q)
        q = torch.arange(16, dtype=torch.float32)
        assert torch.equal(p.itable, q - 8 if p.kind == 1 else q)
    p.transposed()
    assert torch.equal(p.sT, st.scales.reshape(64, -1).t())
    if st.zeros is not None:
        assert p.zT.dtype == torch.uint8 and torch.equal(p.zT, st.zeros.reshape(64, -1).t())


def test_make_plan_config_names():
    pytest.importorskip("triton")
    from lowbit.kernels.triton import lowbit_mm as lm

    for name, flags in (("gemvg", (False, False, False, False)), ("gemvgsf", (False, True, True, False)),
                        ("gemvgft", (False, True, False, True)), ("gemvgpf", (True, True, False, False)),
                        ("gemvgs", (False, False, True, False))):
        plan = lm.make_plan(1, 256, 1024, 4, 64, 0, 0.0, torch.bfloat16, False, (name, 64, 8, 2, 4, 2))
        c = plan.consts
        if os.environ.get("TRITON_INTERPRET") == "1":  # no inline PTX in the interpreter: the table is read
            flags = (flags[0], flags[1], False, flags[3])
        assert (c["PAIRT"], c["PF"], c["SHFL"], plan.tsc) == flags, name
        assert plan.tr and c["FIX"]
    assert not lm.is_gemvg("gemvgps") and not lm.is_gemvg("gemvgx") and lm.is_gemvg("gemvgsft")
    with pytest.raises(ValueError, match="codebooks only"):
        lm.make_plan(1, 256, 1024, 4, 128, 1, 8.0, torch.bfloat16, False, ("gemvgp", 64, 8, 2, 4, 2))
    with pytest.raises(ValueError, match="4-bit table"):
        lm.make_plan(1, 256, 1024, 8, 128, 1, 128.0, torch.bfloat16, False, ("gemvgs", 64, 8, 2, 4, 2))
    plan = lm.make_plan(1, 256, 1024, 4, 128, 2, 8.0, torch.bfloat16, False, ("gemvgsf", 64, 8, 2, 4, 2))
    assert plan.consts["SHFL"] == lm.shuffle_supported()  # integer codes: exact values from the shuffle table


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton interpreter)")
@pytest.mark.parametrize("scheme,kw", [("nf4", dict(block_size=64)), ("int4_asym", dict(group_size=32)),
                                       ("q8_0", {})])
def test_dense_linear_row_blocks_equal_whole(scheme, kw, monkeypatch):
    """Dequantize + cuBLAS in row blocks (LOWBIT_DENSE_CHUNK_MB) gives the whole-weight result: each block's
    dequantized rows equal the whole weight's rows exactly."""
    pytest.importorskip("triton")
    torch.manual_seed(5)
    N, K = 384, 256
    p = L._prepare_cuda(quantize_tensor(torch.randn(N, K) * 0.02, scheme, **kw))
    whole = p.dense(torch.float16)
    for n0, n1 in ((0, 128), (128, 384), (256, 384)):
        assert torch.equal(p.dense(torch.float16, n0, n1), whole[n0:n1])
    x = torch.randn(5, K).half()
    b = torch.randn(N).half()
    monkeypatch.setenv("LOWBIT_DENSE_CHUNK_MB", "0.01")  # 10 KiB: 128-row blocks (3 of them)
    y = L.dense_linear(x.float(), p, b.float())
    torch.testing.assert_close(y, F.linear(x.float(), p.dense(torch.float32), b.float()), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("LOWBIT_DENSE_CHUNK_MB", "x")
    with pytest.raises(ValueError, match="LOWBIT_DENSE_CHUNK_MB"):
        L.dense_chunk_bytes()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton interpreter)")
@pytest.mark.parametrize("scheme,kw", FORMATS, ids=[f"{s}-{k}" for s, k in FORMATS])
def test_tc_gemm_in_triton_interpreter(scheme, kw, monkeypatch):
    """The tensor-core GEMM "tc" through prepared_linear (plan, plane-major activations, split-K summed in the
    kernel by the last program of a tile, clamped M / N edges, bias) against the float32 reference: every format,
    BM smaller and larger than M, 1 and 3 splits (fp16: the interpreter mis-computes bf16 dots)."""
    pytest.importorskip("triton")
    from lowbit.kernels.triton import lowbit_mm as lm

    N, K = 80, 512
    st, p, ref, key = _interp_case(scheme, kw, N, K, 3)
    for M, cfg in ((5, ("tc", 16, 32, 16, 1, 4, 1)), (20, ("tc", 16, 64, 32, 3, 4, 1)),
                   (33, ("tc", 32, 32, 16, 2, 4, 1))):
        p.plans.clear()
        monkeypatch.setitem(TC.TUNED_MM, key, [(64, 1 << 30, 1 << 30, cfg)])
        x = torch.randn(M, K).half()
        b = torch.randn(N).half() if M != 20 else None
        r = x.float() @ ref.half().float().T + (b.float() if b is not None else 0)
        y = L.prepared_linear(x.view(1, M, K), p, b)
        assert y.shape == (1, M, N) and y.dtype == torch.float16
        assert ((y.view(M, N).float() - r).norm() / r.norm()).item() < 2e-3, cfg
        plan = next(iter(p.plans.values()))
        assert isinstance(plan, lm.TcPlan) and plan.grid[2] == plan.split and plan.consts["FIX"] == (plan.split > 1)
        assert not plan.consts["SHFL"]  # no inline PTX in the interpreter: the table is read from memory


def test_tc_plan_shapes_and_table_asm(monkeypatch):
    """tc plans: BKW at least 16 words (the MMA's K per plane) and dividing K's words; shapes the kernel cannot step
    over go to dequantize + cuBLAS; the shuffle-lookup PTX carries the table's exact float32 bits."""
    pytest.importorskip("triton")
    from lowbit.formats import codebook
    from lowbit.kernels.triton import lowbit_mm as lm

    plan = lm.make_tc_plan(16, 4096, 4096, 4, 128, 2, 8.0, False, ("tc", 16, 128, 64, 4, 4, 3))
    assert plan.consts["BKW"] == 64 and plan.split == 4 and plan.grid == (32, 1, 4) and plan.n_iter * 64 * 4 == 512
    plan = lm.make_tc_plan(64, 256, 384, 4, 32, 1, 8.0, True, ("tc", 64, 64, 64, 8, 4, 3))  # 48 words: BKW 16
    assert plan.consts["BKW"] == 16 and plan.split == 3
    with pytest.raises(ValueError, match="divisible by 16"):
        lm.make_tc_plan(16, 256, 96, 4, 32, 1, 8.0, False, ("tc", 16, 64, 16, 1, 4, 3))
    p = L._prepare_cuda(quantize_tensor(torch.randn(64, 96), "int4", group_size=32))  # 12 words per row
    monkeypatch.setitem(TC.TUNED_MM, (4, "int"), [(64, 1 << 30, 1 << 30, ("tc", 16, 64, 16, 1, 4, 3))])
    assert L._plan(p, 16, torch.randn(16, 96), None) is L._DENSE
    code = codebook.get_code("nf4").float()
    asm = lm.table_asm(code)
    imms = [int(t, 16) for t in asm.replace(";", " ").replace(",", " ").split() if t.startswith("0x")]
    assert imms[:16] == [b & 0xFFFFFFFF for b in code.view(torch.int32).tolist()] and imms[16:] == [0xFFFFFFFF]
    assert asm.count("selp.b32") == 15 and "shfl.sync.idx.b32 $0, t, $1" in asm
    with pytest.raises(ValueError, match="16-entry"):
        lm.table_asm(torch.zeros(8))
    # the shipped rows: tc at M = 5..64 on the Llama-3 shapes where it measured faster, dequantize + cuBLAS above
    assert TC.config_mm(4, 2, 16, 8192, 8192, 128)[0] == "tc" and TC.config_mm(8, 1, 64, 14336, 4096)[0] == "tc"
    assert TC.config_mm(4, 0, 128, 8192, 8192, 64) == ("dense",)


def test_gemvq_plan_names_tiles_and_errors():
    """The multi-group GEMV ("gemvq"): names, sub-tiles (WPG words inside one scale group, 1 / 2 / 4 per step,
    dividing the row), the loop's pipelining depth, TMA only where the words allow it (16-byte rows and boxes, with
    a plain-load twin for unaligned words), and clear errors for configs the weight cannot take."""
    pytest.importorskip("triton")
    from lowbit.kernels.triton import lowbit_mm as lm

    assert lm.is_gemvq("gemvq") and lm.is_gemvq("gemvqsf") and lm.is_gemvq("gemvqsm")
    assert not lm.is_gemvq("gemvqfm") and not lm.is_gemvq("gemvqt") and not lm.is_gemvg("gemvq")
    assert lm.is_gemvq("gemvqff") and lm.is_gemvq("gemvqmx") and not lm.is_gemvq("gemvqfff")
    plan = lm.make_plan(1, 4096, 8192, 4, 128, 2, 8.0, torch.bfloat16, False, ("gemvqff", 128, 64, 4, 4, 1))
    assert plan.consts["PF"] == 2 and plan.consts["BKW"] == plan.consts["WPG"] == 16  # one sub-tile per step
    assert lm.make_plan(1, 4096, 8192, 4, 128, 2, 8.0, torch.bfloat16, False, ("gemvqmx", 128, 16, 4, 4, 3)).consts["X16"]
    assert lm.gemvq_tiles(1024, 128, 8, 64) == (64, 16)  # int4 g128: 4 groups of 16 words per step
    assert lm.gemvq_tiles(1024, 128, 8, 8) == (8, 8)  # half a group per step
    assert lm.gemvq_tiles(1024, 64, 8, 128) == (32, 8)  # at most 4 sub-tiles
    assert lm.gemvq_tiles(1024, 32, 8, 32) == (16, 4)
    assert lm.gemvq_tiles(48, 128, 8, 64) == (16, 16)  # 3 groups per row: one per step
    assert lm.gemvq_tiles(96, 96, 8, 32) == (16, 4)  # 12-word groups: 4-word sub-tiles
    assert lm.gemvq_tiles(2048, 8192, 4, 64) == (64, 64)  # int8 per channel (one group per row)
    plan = lm.make_plan(1, 4096, 8192, 4, 128, 2, 8.0, torch.bfloat16, False, ("gemvqm", 128, 32, 4, 4, 3))
    c = plan.consts
    assert plan.q and plan.tr and (c["BKW"], c["WPG"], c["LS"], c["FIX"]) == (32, 16, 3, True)
    assert plan.tma == c["TMA"] is True and plan.alt is not None and not plan.alt.tma
    assert plan.alt.consts["BKW"] == 32 and plan.split == 4 and plan.grid == (32, 4)
    assert plan.alt.consts["PF"] == 1 and plan.alt.consts["LS"] == 1  # the twin: register prefetch, no pipelining
    plan = lm.make_plan(2, 256, 48, 4, 16, 1, 8.0, torch.float16, True, ("gemvqm", 64, 16, 1, 4, 3))  # 6 words a row
    assert not plan.tma and plan.alt is None and plan.consts["WPG"] == 2 and plan.consts["BM"] == 2
    for G, tma in ((32, False), (64, False), (128, True)):  # TMA from 16-word sub-tiles (64-byte box rows) up
        plan = lm.make_plan(1, 256, 1024, 4, G, 1, 8.0, torch.float16, False, ("gemvqm", 64, 64, 1, 4, 3))
        assert plan.tma == tma and plan.consts["PF"] == (0 if tma else 1) and plan.consts["LS"] == (3 if tma else 1)
    assert lm.make_plan(1, 256, 2048, 8, 2048, 1, 128.0, torch.float16, False, ("gemvqmx", 64, 32, 1, 4, 3)).tma
    plan = lm.make_plan(1, 256, 1024, 4, 64, 0, 0.0, torch.bfloat16, False, ("gemvqsf", 64, 16, 2, 4, 1))
    assert plan.consts["SHFL"] == lm.shuffle_supported() and plan.consts["PF"] and plan.consts["LS"] == 1
    with pytest.raises(ValueError, match="codebooks only"):
        lm.make_plan(1, 256, 1024, 4, 128, 1, 8.0, torch.bfloat16, False, ("gemvqs", 64, 8, 2, 4, 1))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (Triton interpreter)")
@pytest.mark.parametrize("scheme,kw", FORMATS + [("int4_asym", dict(group_size=128))],
                         ids=[f"{s}-{k}" for s, k in FORMATS + [("int4_asym", dict(group_size=128))]])
def test_gemvq_in_triton_interpreter(scheme, kw, monkeypatch):
    """The multi-group GEMV through prepared_linear, every format: several scale groups per step, register
    prefetch, cp.async / TMA pipelining (tensor-descriptor loads; ragged N read as zeros), split-K summed in the
    kernel (1-3 splits), M = 1..4, bias, fp16 and bf16 activations, against the float32 reference; words that are
    not 16-byte aligned take the plain-load twin of a TMA plan."""
    pytest.importorskip("triton")
    from lowbit.kernels.triton import lowbit_mm as lm

    N, K = 40, 512
    st, p, ref, key = _interp_case(scheme, kw, N, K, 4)
    s = "s" if p.kind == 0 else ""
    cases = [(1, (f"gemvq{s}", 32, 32, 2, 4, 1), torch.float16), (2, (f"gemvq{s}f", 32, 16, 3, 4, 1), torch.float16),
             (3, (f"gemvq{s}m", 32, 32, 2, 4, 3), torch.float16), (4, (f"gemvq{s}", 16, 64, 1, 4, 3), torch.float16),
             (1, (f"gemvq{s}m", 64, 16, 1, 4, 2), torch.bfloat16), (3, (f"gemvq{s}f", 32, 8, 2, 4, 1), torch.bfloat16),
             (2, (f"gemvq{s}ff", 32, 16, 3, 4, 1), torch.float16), (1, (f"gemvq{s}mx", 32, 16, 2, 4, 3), torch.bfloat16),
             (4, (f"gemvq{s}x", 32, 32, 1, 4, 1), torch.float16)]
    for M, cfg, dt in cases:
        p.plans.clear()
        monkeypatch.setitem(TC.TUNED_MM, key, [(4, 1 << 30, 1 << 30, cfg)])
        x = torch.randn(M, K).to(dt)
        b = torch.randn(N).to(dt) if M == 3 else None
        r = x.float() @ ref.T + (b.float() if b is not None else 0)
        y = L.prepared_linear(x, p, b)
        assert y.dtype == dt and y.shape == (M, N)
        tol = 2e-3 if dt == torch.float16 else 1e-2  # (bf16: the interpreter rounds the output cast toward zero)
        assert ((y.float() - r).norm() / r.norm()).item() < tol, (cfg, M, dt)
        plan = next(iter(p.plans.values()))
        assert plan.q and plan.grid[1] == plan.split and plan.consts["FIX"] == (plan.split > 1)
        if cfg[0].endswith("m") and plan.tma:
            assert plan.descs  # the descriptor of p.words, built once
            w2 = torch.empty(p.words.numel() + 1, dtype=torch.int32)[1:].view_as(p.words)  # 4 bytes off 16
            w2.copy_(p.words)
            y2 = lm.run_plan(plan, x, w2, p.scales, p.zeros, p.table if p.table is not None else p.itable, b,
                             N, K, K // p.group, 32 // p.bits)
            assert ((y2.float() - r).norm() / r.norm()).item() < tol and len(plan.descs) == 1


    # the shipped rows (the patched table restored first): tcb / tc at M = 5..64 on the Llama-3 shapes where it
    # measured faster, dequantize + cuBLAS above; tcbd is never selected by default (see triton_configs)
    monkeypatch.undo()
    assert TC.config_mm(4, 2, 16, 8192, 8192, 128)[0] == "tcb" and TC.config_mm(8, 1, 64, 14336, 4096)[0] == "tc"
    assert TC.config_mm(4, 0, 16, 28672, 8192, 64)[0] == "tcb" and TC.config_mm(4, 0, 128, 28672, 8192) == ("dense",)
    assert not any(r[3][0] == "tcbd" for rows in TC.TUNED_MM.values() for r in rows)


def _run_ptx(asm: str, regs: dict, lanes: int = 1) -> list:
    """A tiny interpreter of the PTX subset :func:`lowbit_mm.packed_asm` / :func:`lowbit_mm.packed_table_asm` emit
    (prmt, shr, lop3, mov, and, setp.eq / selp, shfl.sync.idx, cvt.rn and fma.rn on bf16x2 / f16x2 pairs), run in
    lock step on ``lanes`` lanes of 32-bit registers held as Python ints (``regs``: the inputs, the same on every
    lane); returns each lane's registers."""
    import numpy as np

    rs = [dict(regs, **{"%laneid": i}) for i in range(lanes)]

    def half_bits(x, ty):
        t = torch.tensor([x], dtype=torch.float64)
        return t.to(torch.bfloat16 if ty == "bf16x2" else torch.float16).view(torch.int16).item() & 0xFFFF

    def pair(v, ty):
        lo, hi = v & 0xFFFF, v >> 16
        if ty == "bf16x2":
            return [float(np.array([x << 16], dtype=np.uint32).view(np.float32)[0]) for x in (lo, hi)]
        return [float(np.array([x], dtype=np.uint16).view(np.float16)[0]) for x in (lo, hi)]

    for ins in asm.strip("{} ").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg") or ins == "}":
            continue
        op, args = ins.split(None, 1)
        a = [t.strip() for t in args.split(",")]
        olds = [dict(r) for r in rs]
        for ln, r in enumerate(rs):
            def val(t):
                t = t.strip()
                return int(t, 16) if t.startswith("0x") else (int(t) if t.isdigit() else r[t])
            if op == "prmt.b32":
                x, y, sel = val(a[1]), val(a[2]), val(a[3])
                bts = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
                d = 0
                for i in range(4):
                    sn = (sel >> (4 * i)) & 0xF
                    b = bts[sn & 7]
                    d |= ((0xFF if b & 0x80 else 0) if sn & 8 else b) << (8 * i)
                r[a[0]] = d
            elif op == "shr.u32":
                r[a[0]] = val(a[1]) >> int(a[2])
            elif op in ("mov.b32", "mov.u32"):
                r[a[0]] = val(a[1])
            elif op == "and.b32":
                r[a[0]] = val(a[1]) & val(a[2])
            elif op == "setp.eq.u32":
                r[a[0]] = val(a[1]) == val(a[2])
            elif op == "selp.b32":
                r[a[0]] = val(a[1]) if r[a[3]] else val(a[2])
            elif op == "shfl.sync.idx.b32":
                r[a[0]] = olds[val(a[2]) & 31][a[1]]
            elif op == "lop3.b32":
                x, y, z, lut = val(a[1]), val(a[2]), val(a[3]), int(a[4], 16)
                d = 0
                for bit in range(32):
                    idx = (((x >> bit) & 1) << 2) | (((y >> bit) & 1) << 1) | ((z >> bit) & 1)
                    d |= ((lut >> idx) & 1) << bit
                r[a[0]] = d
            elif op.startswith("cvt.rn.") and op.endswith(".f32"):  # d = {hi: a, lo: b}
                ty = op.split(".")[2]
                f = [float(np.array([val(t)], dtype=np.uint32).view(np.float32)[0]) for t in a[1:3]]
                r[a[0]] = (half_bits(f[0], ty) << 16) | half_bits(f[1], ty)
            elif op.startswith("fma.rn."):
                ty = op.split(".")[-1]
                x, y, z = (pair(val(t), ty) for t in a[1:4])
                r[a[0]] = half_bits(x[0] * y[0] + z[0], ty) | (half_bits(x[1] * y[1] + z[1], ty) << 16)
            else:
                raise AssertionError(f"unexpected PTX op {op}")
    return rs


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tcb_packed_asm_dequantizes_word_pairs(kind, dtype):
    """The "tcb" packed-pair PTX, run by a small PTX interpreter on random word pairs: output plane e holds element e
    of word kw (low half) and of word kw + 1 (high half), each ((q - zero) * s) (kind 3: q * s + m) computed from
    the scale / zero / minimum rounded to the activation dtype with one final rounding; within a unit in the last
    place of the float32 reference."""
    pytest.importorskip("triton")
    import numpy as np

    from lowbit.kernels.triton import lowbit_mm as lm

    asm = lm.packed_asm(kind, dtype == torch.bfloat16)
    with pytest.raises(ValueError, match="integer kinds"):
        lm.packed_asm(0, True)
    g = torch.Generator().manual_seed(kind)
    mag = 128.0 if dtype == torch.bfloat16 else 1024.0
    for _ in range(24):
        A, B = (int(v) for v in torch.randint(0, 1 << 32, (2,), generator=g, dtype=torch.int64))
        s = float(torch.rand(1, generator=g) * 0.05 + 1e-3)
        z = float(torch.randint(0, 16, (1,), generator=g)) if kind == 2 else (8.0 if kind == 1 else -0.37 * s * 8)
        sq = torch.tensor([s]).to(dtype)
        cq = torch.tensor([-(mag + z) if kind != 3 else z]).to(dtype)
        sb = sq.view(torch.int16).item() & 0xFFFF
        cb = cq.view(torch.int16).item() & 0xFFFF
        out = _run_ptx(asm, {"$8": A, "$9": B, "$10": sb | (sb << 16), "$11": cb | (cb << 16)})[0]
        for e in range(8):
            pos = 8 * (e // 2) + 4 * (1 - e % 2)
            for half, word in ((0, A), (1, B)):
                q = (word >> pos) & 15
                bits = (out[f"${e}"] >> (16 * half)) & 0xFFFF
                got = torch.from_numpy(np.array([bits], dtype=np.uint16).view(np.int16)).view(dtype).double().item()
                if kind == 3:
                    want = q * sq.double().item() + cq.double().item()
                    exact = q * s + z
                else:
                    want = (q - z) * sq.double().item()
                    exact = (q - z) * s
                assert got == torch.tensor([want]).to(dtype).double().item(), (kind, e, half, q)
                scale = max(abs(exact), s) if kind != 3 else abs(q * s) + abs(z)  # kind 3: m rounded too
                assert abs(got - exact) <= 2 ** -7 * scale + 1e-12, (kind, e, half, q, got, exact)


def test_tcb_plan(monkeypatch):
    """"tcb" plans: the packed-pair PTX only for 4-bit codes where inline PTX runs (else the tc path), built
    for one activation dtype (its magic number) and refused for the other; unknown kernel names rejected."""
    pytest.importorskip("triton")
    from lowbit.kernels.triton import lowbit_mm as lm

    cfg = ("tcb", 16, 128, 16, 4, 4, 3)
    monkeypatch.setattr(lm, "shuffle_supported", lambda: False)
    assert lm.make_tc_plan(16, 4096, 4096, 4, 128, 2, 8.0, False, cfg).consts["PASM"] == ""
    monkeypatch.setattr(lm, "shuffle_supported", lambda: True)
    plan = lm.make_tc_plan(16, 4096, 4096, 4, 128, 2, 8.0, False, cfg, None, torch.float16)
    assert plan.consts["PASM"] == lm.packed_asm(2, False) and plan.consts["MAG"] == 1024.0
    assert plan.pdt == torch.float16
    with pytest.raises(ValueError, match="made for torch.float16"):
        lm.run_tc(plan, torch.zeros(16, 4096, dtype=torch.bfloat16), None, None, None, None, None, 4096, 4096, 32, 8)
    nf4 = lm.make_tc_plan(16, 4096, 4096, 4, 64, 0, 0.0, False, cfg, torch.linspace(-1, 1, 16))
    assert nf4.consts["PASM"] == lm.packed_table_asm(torch.linspace(-1, 1, 16), True) and not nf4.consts["SHFL"]
    assert nf4.pdt == torch.bfloat16
    assert lm.make_tc_plan(16, 4096, 4096, 4, 64, 0, 0.0, False, ("tc",) + cfg[1:], torch.linspace(-1, 1, 16)
                           ).consts["PASM"] == ""
    assert lm.make_tc_plan(16, 4096, 4096, 8, 4096, 1, 128.0, False, cfg).consts["PASM"] == ""
    with pytest.raises(ValueError, match="'tc', 'tcb' or 'tcbd'"):
        lm.make_tc_plan(16, 4096, 4096, 4, 128, 2, 8.0, False, ("tcx",) + cfg[1:])
    # "tcbd": one dot per step (packed PTX only)
    d = lm.make_tc_plan(16, 4096, 4096, 4, 128, 2, 8.0, False, ("tcbd",) + cfg[1:])
    assert d.consts["ONEDOT"] and not plan.consts["ONEDOT"] and d.consts["PASM"] == lm.packed_asm(2, True)
    monkeypatch.setattr(lm, "shuffle_supported", lambda: False)
    d = lm.make_tc_plan(16, 4096, 4096, 4, 128, 2, 8.0, False, ("tcbd",) + cfg[1:])
    assert not d.consts["ONEDOT"] and d.consts["PASM"] == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tcb_packed_table_asm_looks_up_codebooks(dtype):
    """The "tcb" codebook PTX (NF4) run on a 32-lane PTX interpreter: every lane builds table[lane % 16] from the
    immediates, plane e of each output pair is table[code] * s of element e of word kw (low half) / kw + 1 (high
    half), each value and the scale rounded to the activation dtype, the product rounded once."""
    pytest.importorskip("triton")
    import numpy as np

    from lowbit.formats import codebook
    from lowbit.kernels.triton import lowbit_mm as lm

    code = codebook.get_code("nf4").float()
    asm = lm.packed_table_asm(code, dtype == torch.bfloat16)
    with pytest.raises(ValueError, match="16-entry"):
        lm.packed_table_asm(torch.zeros(8), True)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        A, B = (int(v) for v in torch.randint(0, 1 << 32, (2,), generator=g, dtype=torch.int64))
        s = float(torch.rand(1, generator=g) * 0.05 + 1e-3)
        sq = torch.tensor([s]).to(dtype)
        sb = sq.view(torch.int16).item() & 0xFFFF
        outs = _run_ptx(asm, {"$8": A, "$9": B, "$10": sb | (sb << 16), "$11": 0}, lanes=32)
        for lane in (0, 7, 31):
            out = outs[lane]
            for e in range(8):
                pos = 8 * (e // 2) + 4 * (1 - e % 2)
                for half, word in ((0, A), (1, B)):
                    q = (word >> pos) & 15
                    bits = (out[f"${e}"] >> (16 * half)) & 0xFFFF
                    got = torch.from_numpy(np.array([bits], dtype=np.uint16).view(np.int16)).view(dtype).double()
                    want = torch.tensor([code[q].item()]).to(dtype).double() * sq.double()
                    assert got.item() == want.to(dtype).double().item(), (e, half, q)
                    assert abs(got.item() - code[q].item() * s) <= 2 ** -7 * abs(code[q].item() * s) + 1e-12


def test_tcb_packed_only_for_one_or_two_groups_per_step(monkeypatch):
    """The packed-pair path is used where a 128-element step holds one scale group per row or exactly two (NF4 b64,
    int4 g64); steps over 4+ groups (int4 g32, GGUF Q4_0 / Q4_1: wrong results seen on the H200 on large weights)
    run the plain tc path even under a "tcb" / "tcbd" row (in the earlier shipped tile shape; dense above 64 rows).
    """
    pytest.importorskip("triton")
    from lowbit.kernels.triton import lowbit_mm as lm

    monkeypatch.setattr(lm, "shuffle_supported", lambda: True)
    assert lm.packed_ok(128, 16, 4) and lm.packed_ok(64, 16, 4) and lm.packed_ok(256, 16, 4)
    assert not lm.packed_ok(32, 16, 4) and not lm.packed_ok(96, 16, 4) and lm.packed_ok(32, 8, 4)
    x = torch.randn(64, 1024, dtype=torch.bfloat16)
    for scheme, kw, packed in (("int4", dict(group_size=32), False), ("int4", dict(group_size=64), True),
                               ("int4_asym", dict(group_size=128), True), ("q4_0", {}, False),
                               ("nf4", dict(block_size=64), True)):
        p = L._prepare_cuda(quantize_tensor(torch.randn(256, 1024), scheme, **kw))
        key = (4, "codebook" if p.kind == 0 else "int")
        monkeypatch.setitem(TC.TUNED_MM, key, [(256, 1 << 30, 1 << 30, ("tcbd", 64, 128, 16, 1, 4, 3))])
        plan = L._plan(p, 64, x, None)
        assert isinstance(plan, lm.TcPlan) and bool(plan.consts["PASM"]) == packed, scheme
        assert plan.consts["ONEDOT"] == packed and plan.consts["SHFL"] == (p.kind == 0 and not packed)
        if not packed:  # the tc kernel in the earlier rows' shape (4 warps, BN 128), dense above 64 rows
            p.plans.clear()
            monkeypatch.setitem(TC.TUNED_MM, key, [(256, 1 << 30, 1 << 30, ("tcbd", 16, 256, 16, 2, 8, 3))])
            plan = L._plan(p, 16, x[:16], None)
            assert plan.warps == 4 and plan.consts["BN"] == 128 and plan.split == 2 and not plan.consts["PASM"]
            p.plans.clear()
            monkeypatch.setitem(TC.TUNED_MM, key, [(256, 1 << 30, 1 << 30, ("tcbd", 128, 256, 16, 1, 8, 3))])
            assert L._plan(p, 200, torch.randn(200, 1024, dtype=torch.bfloat16), None) is L._DENSE
