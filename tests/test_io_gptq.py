"""GPTQ / AWQ checkpoints: packing against hand-computed words (formats-checkpoints.md sections 1-2),
v1/v2 zero points, act-order g_idx, model export -> re-import bit-exact, fp16 scale handling."""
import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lowbit  # noqa: E402
from lowbit.io import gptq  # noqa: E402
from lowbit.io._affine import AffineWeight, UnsupportedWeight, pack_int32, unpack_int32  # noqa: E402
from lowbit.model.loading import tiny_llama  # noqa: E402
from lowbit.nn import QLinear  # noqa: E402


def u32(t):
    return [int(v) & 0xFFFFFFFF for v in t.reshape(-1).tolist()]


def _weight(out_f, in_f, bits, g, sym=True, seed=0, scale_dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    G = -(-in_f // g)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen, dtype=torch.int64).to(torch.uint8)
    scales = (torch.rand(out_f, G, generator=gen) * 0.1 + 0.01).to(scale_dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (out_f, G), generator=gen).to(torch.uint8)
    return AffineWeight(codes, scales, zeros, bits, g)


# ---------------------------------------------------------------------------------------------
# hand-computed words


def test_qweight_words_by_hand():
    # one output column; input channels packed LSB first along `in`
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] * 4] * 32, dtype=torch.uint8)  # [out=32, in=32]
    w = AffineWeight(codes, torch.ones(32, 1, dtype=torch.float16), None, 4, 32)
    qw = gptq.pack_gptq(w)["qweight"]
    assert qw.shape == (4, 32) and qw.dtype == torch.int32
    assert set(u32(qw)) == {0x87654321}
    codes2 = torch.tensor([[0, 1, 2, 3] * 8] * 32, dtype=torch.uint8)
    qw2 = gptq.pack_gptq(AffineWeight(codes2, torch.ones(32, 1, dtype=torch.float16), None, 2, 32))["qweight"]
    assert qw2.shape == (2, 32) and set(u32(qw2)) == {0xE4E4E4E4}  # byte 0b11_10_01_00
    codes8 = torch.tensor([[1, 2, 3, 4] * 8] * 32, dtype=torch.uint8)
    qw8 = gptq.pack_gptq(AffineWeight(codes8, torch.ones(32, 1, dtype=torch.float16), None, 8, 32))["qweight"]
    assert qw8.shape == (8, 32) and set(u32(qw8)) == {0x04030201}


# 3-bit: code 3 (0b011) at bits 3k..3k+2 of a 96-bit little-endian integer, i.e. the LSB-first bit
# string "110" repeated; cut into three 32-bit words by hand:
THREE_BIT_011 = [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]


@pytest.mark.parametrize("bits,v1_word,v2_word", [
    (4, [0x77777777], [0x88888888]),
    (2, [0x55555555], [0xAAAAAAAA]),
    (8, [0x7F7F7F7F], [0x80808080]),
    (3, THREE_BIT_011, None),
])
def test_symmetric_qzeros_words(bits, v1_word, v2_word):
    w = _weight(64, 64, bits, 32, sym=True)
    qz = gptq.pack_gptq(w, "gptq")["qzeros"]
    assert qz.shape == (2, 64 * bits // 32)
    words = u32(qz.reshape(2, -1, len(v1_word)))
    assert words == v1_word * (len(words) // len(v1_word))
    if v2_word is not None:
        assert set(u32(gptq.pack_gptq(w, "gptq_v2")["qzeros"])) == set(v2_word)
    # the independent check of the 3-bit words: the 96-bit integer sum of 3 << 3k
    big = sum(3 << (3 * k) for k in range(32))
    assert THREE_BIT_011 == [(big >> (32 * i)) & 0xFFFFFFFF for i in range(3)]


def test_asymmetric_v2_zero_words():
    zeros = torch.arange(8, dtype=torch.uint8).repeat(4).reshape(32, 1)  # output channels 0..7 -> z 0..7
    w = AffineWeight(torch.zeros(32, 32, dtype=torch.uint8), torch.ones(32, 1, dtype=torch.float16), zeros, 4, 32)
    assert set(u32(gptq.pack_gptq(w, "gptq_v2")["qzeros"])) == {0x76543210}
    with pytest.raises(UnsupportedWeight, match="zero point of 0 cannot be stored in GPTQ v1"):
        gptq.pack_gptq(w, "gptq")


def test_v1_reader_undoes_gptqmodel_word_subtraction():
    # GPTQModel converts v2 -> v1 by subtracting 0x11111111 from every word, borrowing on z = 0
    w = _weight(32, 64, 4, 32, sym=False, seed=3)
    w.zeros[0, 0] = 0
    v2 = gptq.pack_gptq(w, "gptq_v2")
    v1 = ((v2["qzeros"].to(torch.int64) - 0x11111111) & 0xFFFFFFFF)
    v1 = torch.where(v1 >= 2 ** 31, v1 - 2 ** 32, v1).to(torch.int32)
    back = gptq.unpack_gptq(v2["qweight"], v1, v2["scales"], v2["g_idx"], checkpoint_format="gptq")
    assert torch.equal(back.zeros, w.zeros)


def test_awq_order_by_hand():
    zeros = torch.arange(8, dtype=torch.uint8).repeat(4).reshape(32, 1)
    codes = torch.arange(8, dtype=torch.uint8).repeat(4).reshape(32, 1).expand(32, 32).contiguous()
    w = AffineWeight(codes, torch.ones(32, 1, dtype=torch.float16), zeros, 4, 32)
    t = gptq.pack_awq(w)
    assert t["qweight"].shape == (32, 4) and t["qzeros"].shape == (1, 4)
    # nibble i holds output channel AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7]
    assert set(u32(t["qweight"])) == {0x75316420} and set(u32(t["qzeros"])) == {0x75316420}
    back = gptq.unpack_awq(t["qweight"], t["qzeros"], t["scales"])
    assert torch.equal(back.codes, codes) and torch.equal(back.zeros, zeros)


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym,fmt", [(True, "gptq"), (True, "gptq_v2"), (False, "gptq_v2")])
@pytest.mark.parametrize("g", [32, 64, -1])
def test_pack_unpack_round_trip(bits, sym, fmt, g):
    w = _weight(96, 128, bits, 128 if g == -1 else g, sym=sym, seed=bits)
    t = gptq.pack_gptq(w, fmt)
    assert t["qweight"].shape == (128 * bits // 32, 96) and t["scales"].dtype == torch.float16
    back = gptq.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], checkpoint_format=fmt)
    assert back.bits == bits and torch.equal(back.codes, w.codes)
    assert torch.equal(back.zeros_or_implicit(), w.zeros_or_implicit())
    assert torch.equal(back.dequantize().view(torch.int32), w.dequantize().view(torch.int32))


def test_act_order_g_idx_and_exact_regrouping():
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, g = 64, 128, 32
    perm = torch.randperm(in_f, generator=gen)
    g_idx = torch.empty(in_f, dtype=torch.int64)
    g_idx[perm] = torch.arange(in_f) // g  # groups formed in permuted order, mapped back (GPTQModel)
    w = _weight(out_f, in_f, 4, g, sym=False, seed=1)
    w = AffineWeight(w.codes, w.scales, w.zeros, 4, g, g_idx=g_idx)
    t = gptq.pack_gptq(w, "gptq_v2")
    assert torch.equal(t["g_idx"].long(), g_idx)
    back = gptq.unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], checkpoint_format="gptq_v2",
                            group_size=g, dtype=torch.float32)
    ref = w.dequantize()
    assert torch.equal(back.dequantize(), ref)
    st = back.to_state()  # random order: one column per group, still exact
    assert st.block_size == 1 and torch.equal(lowbit.dequantize(st).view(torch.int32), ref.view(torch.int32))
    # static groups with relabelled group ids: regrouped at the original group size, exact
    relabel = torch.tensor([2, 0, 3, 1])
    w2 = AffineWeight(w.codes, w.scales, w.zeros, 4, g, g_idx=relabel[torch.arange(in_f) // g])
    st2 = w2.to_state()
    assert st2.block_size == g and torch.equal(lowbit.dequantize(st2), w2.dequantize())


def _gptq_model(scheme="int4", g=32, scale_dtype=torch.float16, overrides=None):
    m = tiny_llama(vocab_size=128, hidden=64, layers=2, intermediate=128)
    overrides = overrides or {}
    for name, mod in list(m.named_modules()):
        for cn, c in list(mod.named_children()):
            full = f"{name}.{cn}" if name else cn
            if type(c) is nn.Linear and cn != "lm_head":
                sch, gs = overrides.get(cn, (scheme, g))
                st = lowbit.quantize(c.weight.detach(), sch, group_size=gs, scale_dtype=scale_dtype)
                setattr(mod, cn, QLinear.from_quant_state(c, st))
    return m.eval()


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", ["int4", "int4_asym"])
def test_export_then_load_is_bit_exact(tmp_path, scheme):
    m = _gptq_model(scheme)
    gptq.export_gptq(m, tmp_path / "g", dtype=None)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    qc = cfg["quantization_config"]
    sym = scheme == "int4"
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is sym
    assert qc["format"] == qc["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    assert qc["desc_act"] is False
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text()) == qc
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "g" / "model.safetensors"))
    if sym:
        assert set(u32(sd["model.layers.0.mlp.up_proj.qzeros"])) == {0x77777777}
    assert sd["model.layers.0.mlp.up_proj.qweight"].shape == (64 * 4 // 32, 128)
    assert torch.equal(sd["model.layers.0.mlp.up_proj.g_idx"], (torch.arange(64) // 32).int())
    assert "lm_head.weight" in sd and "lm_head.qweight" not in sd

    m2, ck = gptq.load_gptq(tmp_path / "g", dtype=torch.float32, return_checkpoint=True)
    for name, w in ck.weights.items():
        ref = lowbit.dequantize(m.get_submodule(name).qstate)
        assert torch.equal(w.dequantize().view(torch.int32), ref.view(torch.int32)), name
        assert torch.equal(lowbit.dequantize(m2.get_submodule(name).qstate).view(torch.int32), ref.view(torch.int32))
    with torch.no_grad():
        assert torch.equal(m2(_ids()).logits, m(_ids()).logits)


def test_fp32_scales_are_rounded_to_fp16_codes_exact(tmp_path):
    m = _gptq_model("int4", scale_dtype=torch.float32)
    with pytest.warns(UserWarning, match="fp32 scales were rounded"):
        gptq.export_gptq(m, tmp_path / "g")
    ck = gptq.read_gptq(tmp_path / "g")
    for name, w in ck.weights.items():
        src = AffineWeight.from_state(m.get_submodule(name).qstate)
        assert torch.equal(w.codes, src.codes)  # exact
        assert torch.equal(w.zeros_or_implicit(), src.zeros_or_implicit())  # exact
        assert w.scales.dtype == torch.float16 and torch.equal(w.scales, src.scales.half())  # nearest fp16


def test_mixed_bits_use_dynamic_overrides(tmp_path):
    m = _gptq_model("int4", 32, overrides={"down_proj": ("int8", 64), "v_proj": ("int3", 32)})
    gptq.export_gptq(m, tmp_path / "g", dtype=None)
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["dynamic"][r"+:^model\.layers\.0\.mlp\.down_proj$"] == {"bits": 8, "group_size": 64}
    assert qc["dynamic"][r"+:^model\.layers\.1\.self_attn\.v_proj$"] == {"bits": 3, "group_size": 32}
    m2 = gptq.load_gptq(tmp_path / "g", dtype=torch.float32)
    assert m2.model.layers[0].mlp.down_proj.qstate.bits == 8
    with torch.no_grad():
        assert torch.equal(m2(_ids()).logits, m(_ids()).logits)


def test_unsupported_modules(tmp_path):
    m = _gptq_model("int4")
    lowbit.quantize(m, method="bnb-nf4", include=["lm_head"], exclude=[])
    lowbit.freeze(m)
    with pytest.raises(UnsupportedWeight, match="lm_head: cannot be written as GPTQ"):
        gptq.export_gptq(m, tmp_path / "g")
    gptq.export_gptq(m, tmp_path / "g", unsupported="dense", dtype=None)
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["dynamic"] == {r"-:^lm_head$": {}}
    m2 = gptq.load_gptq(tmp_path / "g", dtype=torch.float32)
    assert torch.equal(m2.lm_head.weight, m.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(m2(_ids()).logits, m(_ids()).logits)
    m3 = tiny_llama(vocab_size=128, hidden=64, layers=1)
    lowbit.quantize(m3, weights="qint4")
    with pytest.raises(ValueError, match="not frozen"):
        gptq.export_gptq(m3, tmp_path / "h")


def test_awq_export_read(tmp_path):
    m = _gptq_model("int4_asym", 32)
    gptq.export_awq(m, tmp_path / "a", dtype=None)
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    ck = gptq.read_awq(tmp_path / "a")
    for name, w in ck.weights.items():
        ref = lowbit.dequantize(m.get_submodule(name).qstate)
        assert torch.equal(w.dequantize().view(torch.int32), ref.view(torch.int32)), name


def test_read_errors(tmp_path):
    from lowbit.io._files import CheckpointError

    with pytest.raises(CheckpointError, match="config.json missing"):
        gptq.read_gptq(tmp_path)
    m = _gptq_model("int4")
    gptq.export_gptq(m, tmp_path / "g")
    from safetensors.torch import load_file, save_file

    p = tmp_path / "g" / "model.safetensors"
    sd = load_file(str(p))
    sd["model.layers.0.mlp.up_proj.qzeros"] = sd["model.layers.0.mlp.up_proj.qzeros"][:, :-1].contiguous()
    save_file(sd, str(p))
    with pytest.raises(CheckpointError, match="sha256 does not match lowbit-checksums.sha256"):
        gptq.read_gptq(tmp_path / "g")
    (tmp_path / "g" / "lowbit-checksums.sha256").unlink()  # as written by another tool: structure checked
    with pytest.raises(CheckpointError, match="module 'model.layers.0.mlp.up_proj': qzeros has shape"):
        gptq.read_gptq(tmp_path / "g")
