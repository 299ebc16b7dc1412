"""GGUF legacy block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): byte identity with gguf-py's quantizer,
value identity with its dequantizer, a hand-written C-reference port on small blocks, pack/unpack round trips."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.formats import gguf as G

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def _oracle():
    return pytest.importorskip("gguf")


def _ref_quantize(x: torch.Tensor, name: str) -> np.ndarray:
    gguf = _oracle()
    with np.errstate(all="ignore"):
        return gguf.quants.quantize(x.float().numpy(), gguf.GGMLQuantizationType[name.upper()])


def _ref_dequantize(raw: np.ndarray, name: str) -> np.ndarray:
    gguf = _oracle()
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name.upper()])


def _inputs():
    g = torch.Generator().manual_seed(1)
    normal = torch.randn(96, 512, generator=g)
    heavy = torch.distributions.StudentT(1.5).sample((64, 256))  # Cauchy-like tails
    zeros = torch.randn(16, 128, generator=g)
    zeros[:, 32:64] = 0.0  # all-zero blocks between non-zero ones
    zeros[3] = 0.0
    # many ties: small integer grids, |max| occurring with both signs, repeated extremes
    ties = (torch.randint(-4, 5, (64, 128), generator=g).float() * 0.25)
    ties[0, :32] = torch.tensor([2.0, -2.0] * 16)
    ties[1, :32] = torch.tensor([-2.0, 2.0] * 16)
    ties[2, :32] = 1.0
    scaled = torch.randn(8, 64, generator=g) * torch.logspace(-6, 4, 8).unsqueeze(1)
    return {"normal": normal, "heavy": heavy, "zeros": zeros, "ties": ties, "scaled": scaled,
            "single": torch.randn(1, 32, generator=g)}


INPUTS = _inputs()


# ---------------------------------------------------------------------------------------------
# independent reference: a literal port of ggml-quants.c quantize_row_*_ref, one block at a time


def _c_block(x: list, name: str) -> tuple:
    f32 = np.float32
    x = [f32(v) for v in x]
    t = G.gguf_type(name)
    if name == "q8_0":
        amax = max(abs(v) for v in x)
        d = f32(amax / f32(127))
        idv = f32(1) / d if d else f32(0)
        q = []
        for v in x:
            p = f32(v * idv)
            q.append(int(math.copysign(math.floor(abs(float(p)) + 0.5), p)))  # roundf, exact in float64
        return [v + 128 for v in q], np.float16(d), None
    if t.asymmetric:
        lo, hi = x[0], x[0]
        for v in x[1:]:
            lo = v if v < lo else lo
            hi = v if v > hi else hi
        d = f32((hi - lo) / f32(t.qmax))
        idv = f32(1) / d if d else f32(0)
        q = [min(t.qmax, int(f32(f32((v - lo) * idv) + f32(0.5)))) for v in x]
        return q, np.float16(d), np.float16(lo)
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    d = f32(mx / f32(-(1 << (t.bits - 1))))
    idv = f32(1) / d if d else f32(0)
    q = [min(t.qmax, int(f32(f32(v * idv) + f32(t.zero + 0.5)))) for v in x]
    return q, np.float16(d), None


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_codes_match_c_reference_port(name, kind):
    x = INPUTS[kind][:6, :128]
    codes, d, m = G.quantize_codes(x, name)
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            q, dr, mr = _c_block(x[r, b * 32:(b + 1) * 32].tolist(), name)
            assert codes[r, b * 32:(b + 1) * 32].tolist() == q, (r, b)
            assert d[r, b].item() == float(dr) or (d[r, b].item() == 0 and float(dr) == 0)
            if mr is not None:
                assert m[r, b].item() == float(mr)


def test_hand_computed_q4_0_block():
    # max element is -2 (first of largest |x|) -> d = 0.25, codes floor(x/0.25 ... ) per the rule
    x = torch.tensor([[-2.0, 2.0, 1.0, 0.1] + [0.0] * 28])
    codes, d, _ = G.quantize_codes(x, "q4_0")
    assert d.item() == 0.25
    # id = 1/0.25 = 4: -2*4+8.5 -> 0 ; 2*4+8.5=16.5 -> 16 -> clamped 15 ; 1*4+8.5 -> 12 ; 0.4+8.5 -> 8
    assert codes[0, :4].tolist() == [0, 15, 12, 8]
    raw = G.quantize_rows(x, "q4_0")
    assert raw.shape == (1, 18)
    assert raw[0, :2].tolist() == list(np.float16(0.25).tobytes())
    assert raw[0, 2] == (0 | (8 << 4))  # element 0 low nibble, element 16 (0.0 -> 8) high nibble
    assert G.dequantize_rows(raw, "q4_0")[0, :4].tolist() == [-2.0, 1.75, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# oracle: gguf-py


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_quantize_bytes_identical_to_gguf(name, kind):
    x = INPUTS[kind]
    ref = _ref_quantize(x, name)
    raw = G.quantize_rows(x, name)
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == ref.shape
    assert np.array_equal(raw.numpy(), ref)


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["normal", "heavy", "zeros", "ties"])
def test_dequantize_identical_to_gguf(name, kind):
    ref_raw = _ref_quantize(INPUTS[kind], name)
    ref = _ref_dequantize(ref_raw, name)
    out = G.dequantize_rows(torch.from_numpy(ref_raw), name)
    assert out.dtype == torch.float32
    assert np.array_equal(out.numpy().view(np.uint32), ref.view(np.uint32))  # bitwise, signed zeros too


@pytest.mark.oracle
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_arbitrary_bytes_identical_to_gguf(name):
    # any byte pattern (except NaN/inf scales) is a valid block: covers codes the quantizer never emits
    t = G.gguf_type(name)
    g = torch.Generator().manual_seed(7)
    raw = torch.randint(0, 256, (16, 4 * t.type_size), dtype=torch.uint8, generator=g)
    blocks = raw.view(16, 4, t.type_size)
    scale_bytes = 4 if t.asymmetric else 2
    blocks[..., 1:scale_bytes:2] &= 0x3B  # keep fp16 exponents finite and moderate
    ref = _ref_dequantize(raw.numpy(), name)
    assert np.array_equal(G.dequantize_rows(raw, name).numpy().view(np.uint32), ref.view(np.uint32))
    assert torch.equal(G.pack_blocks(*G.unpack_blocks(raw, name), name), raw)


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", TYPES)
def test_low_precision_inputs_cast_to_fp32(name, dtype):
    x = INPUTS["normal"][:16].to(dtype)
    ref = _ref_quantize(x.float(), name)  # gguf-py casts to float32 first
    assert np.array_equal(G.quantize_rows(x, name).numpy(), ref)


@pytest.mark.oracle
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (5, 2048), (128, 64)])
def test_shapes(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    for name in TYPES:
        raw = G.quantize_rows(x, name)
        assert raw.shape == (shape[0], shape[1] // 32 * G.gguf_type(name).type_size)
        assert np.array_equal(raw.numpy(), _ref_quantize(x, name))


_finite = st.one_of(
    st.just(0.0),
    st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False,
              width=32).filter(lambda v: v == 0 or abs(v) > 1e-20),
    st.sampled_from([0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 0.25, 3.0, -3.0]),  # ties on grid points
)


@pytest.mark.oracle
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), blocks=st.integers(1, 2), data=st.data(), name=st.sampled_from(TYPES))
def test_property_matches_gguf(rows, blocks, data, name):
    vals = data.draw(st.lists(_finite, min_size=rows * blocks * 32, max_size=rows * blocks * 32))
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, blocks * 32) + 0.0  # no -0.0 (see docstring)
    raw = G.quantize_rows(x, name)
    ref = _ref_quantize(x, name)
    assert np.array_equal(raw.numpy(), ref)
    assert np.array_equal(G.dequantize_rows(raw, name).numpy(), _ref_dequantize(ref, name))
    assert torch.equal(G.pack_blocks(*G.unpack_blocks(raw, name), name), raw)


# ---------------------------------------------------------------------------------------------
# pack / unpack and the split rule


@pytest.mark.parametrize("name", TYPES)
def test_pack_unpack_round_trip(name):
    t = G.gguf_type(name)
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, t.qmax + 1, (7, 96), dtype=torch.uint8, generator=g)
    d = torch.randn(7, 3, generator=g).half()
    m = torch.randn(7, 3, generator=g).half() if t.asymmetric else None
    raw = G.pack_blocks(codes, d, m, name)
    assert raw.shape == (7, 3 * t.type_size)
    c2, d2, m2 = G.unpack_blocks(raw, name)
    assert torch.equal(c2, codes) and torch.equal(d2.view(torch.int16), d.view(torch.int16))
    if t.asymmetric:
        assert torch.equal(m2.view(torch.int16), m.view(torch.int16))
    else:
        assert m2 is None
    assert torch.equal(G.pack_blocks(c2, d2, m2, name), raw)
    # values follow the documented formulas
    deq = G.dequantize_rows(raw, name).reshape(7, 3, 32)
    cb = codes.reshape(7, 3, 32).float()
    if t.asymmetric:
        expect = d.float().unsqueeze(-1) * cb + m.float().unsqueeze(-1)
    else:
        expect = d.float().unsqueeze(-1) * (cb - t.zero)
    assert torch.equal(deq, expect)


@pytest.mark.parametrize("name", TYPES)
def test_quantize_codes_equals_unpacked_bytes(name):
    x = INPUTS["heavy"][:8]
    codes, d, m = G.quantize_codes(x, name)
    c2, d2, m2 = G.unpack_blocks(G.quantize_rows(x, name), name)
    assert torch.equal(codes, c2) and torch.equal(d.view(torch.int16), d2.view(torch.int16))


@pytest.mark.parametrize("name", TYPES)
def test_column_by_column_encoding_reproduces_rule(name):
    """The GPTQ path: fix each block's params, then encode one column at a time."""
    x = INPUTS["normal"][:8, :64]
    p = G.block_params(x, name)
    cols = []
    for j in range(64):
        b = j // 32
        cols.append(G.encode_values(x[:, j], p.inv[:, b], None if p.base is None else p.base[:, b], name))
    codes = torch.stack(cols, 1)
    assert torch.equal(G.pack_blocks(codes, p.d, p.m, name), G.quantize_rows(x, name))
    deq = G.decode_values(codes, p.d.repeat_interleave(32, 1), None if p.m is None else p.m.repeat_interleave(32, 1),
                          name)
    assert torch.equal(deq, G.dequantize_rows(G.quantize_rows(x, name), name))


@pytest.mark.parametrize("name", TYPES)
def test_nearest_codes_is_nearest_grid_point(name):
    t = G.gguf_type(name)
    x = INPUTS["normal"][:8, :64]
    p = G.block_params(x, name)
    d = p.d.repeat_interleave(32, 1)
    m = None if p.m is None else p.m.repeat_interleave(32, 1)
    q = G.nearest_codes(x, d, m, name)
    grid = torch.arange(t.qmax + 1, dtype=torch.uint8)
    allv = G.decode_values(grid.view(1, 1, -1), d.unsqueeze(-1), None if m is None else m.unsqueeze(-1), name)
    best = (allv.double() - x.double().unsqueeze(-1)).abs().amin(-1)
    got = (G.decode_values(q, d, m, name).double() - x.double()).abs()
    assert torch.all(got <= best + 1e-12)
    # and never worse in squared error than the reference rule on the same grid
    ref_err = (G.dequantize_rows(G.quantize_rows(x, name), name).double() - x.double()).pow(2).sum()
    assert got.pow(2).sum() <= ref_err + 1e-12


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="K=40"):
        G.quantize_rows(torch.randn(2, 40), "q4_0")
    with pytest.raises(ValueError, match="qtype='q3_0'"):
        G.quantize_rows(torch.randn(2, 32), "q3_0")
    with pytest.raises(ValueError, match="multiple of the Q4_0 block size"):
        G.dequantize_rows(torch.zeros(2, 20, dtype=torch.uint8), "q4_0")
    with pytest.raises(ValueError, match="0..15"):
        G.pack_blocks(torch.full((1, 32), 16, dtype=torch.uint8), torch.ones(1, 1).half(), None, "q4_0")
    assert G.gguf_type("Q8_0") is G.GGUF_TYPES["q8_0"] and G.gguf_type(2).name == "Q4_0"


@pytest.mark.oracle
def test_type_table_matches_gguf_constants():
    gguf = _oracle()
    for key, t in G.GGUF_TYPES.items():
        qt = gguf.GGMLQuantizationType[t.name]
        assert int(qt) == t.ggml_type and key == t.name.lower()
        assert gguf.GGML_QUANT_SIZES[qt] == (t.block, t.type_size)


@pytest.mark.oracle
def test_large_tensor_vectorised():
    x = torch.randn(512, 4096, generator=torch.Generator().manual_seed(11))  # 2M elements
    for name in ("q4_0", "q8_0"):
        assert np.array_equal(G.quantize_rows(x, name).numpy(), _ref_quantize(x, name))
