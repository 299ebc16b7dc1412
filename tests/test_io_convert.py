"""Lossless conversion of integer checkpoints to GGUF, proven bit for bit against gguf-py's dequantization
(the oracle), plus transformers' GGUF loader giving the source model's logits, and the multi-format writer."""
import json

import numpy as np
import pytest
import torch
from torch import nn

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lowbit  # noqa: E402
from lowbit.formats import gguf as fmt  # noqa: E402
from lowbit.io import convert, gptq  # noqa: E402
from lowbit.io._affine import AffineWeight  # noqa: E402
from lowbit.io.convert import NotLossless, affine_to_gguf  # noqa: E402
from lowbit.model.loading import tiny_llama  # noqa: E402
from lowbit.nn import QLinear  # noqa: E402


def _oracle(blocks):
    """gguf-py's dequantization of the packed blocks (float32 [R, K])."""
    raw = blocks.raw().numpy()
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[blocks.qtype]).copy()).float()


def _bits(t):
    return t.float().contiguous().view(torch.int32)


def _state(scheme, g=32, shape=(64, 256), scale_dtype=torch.float16, seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return lowbit.quantize(w, scheme, group_size=g, scale_dtype=scale_dtype)


def _check_exact(w: AffineWeight, qtype="auto"):
    blocks = affine_to_gguf(w, qtype)
    assert torch.equal(_bits(_oracle(blocks)), _bits(w.dequantize()))
    return blocks


@pytest.mark.parametrize("scheme,g,expect", [
    ("int4", 32, "Q4_0"), ("int4", 128, "Q4_0"), ("int4", -1, "Q4_0"),
    ("int3", 64, "Q4_0"), ("int2", 32, "Q4_0"),  # narrower codes re-centred into Q4_0
    ("int8", 32, "Q8_0"), ("int8", -1, "Q8_0"),
    ("int4_asym", 32, "Q5_0"),  # always exact in Q5_0; Q4_1 is not for every block (see below)
])
def test_exact_types(scheme, g, expect):
    st = _state(scheme, g)
    w = AffineWeight.from_state(st)
    blocks = _check_exact(w)
    assert blocks.qtype == expect
    assert torch.equal(_bits(_oracle(blocks)), _bits(lowbit.dequantize(st)))


def test_gptq_symmetric_codes_including_zero_fit_q4_0():
    # GPTQ's symmetric grid may use code 0 (-8 * s); Q4_0 holds all 16 codes around 8
    codes = torch.arange(16, dtype=torch.uint8).repeat(8, 4)
    w = AffineWeight(codes, torch.full((8, 1), 0.0123, dtype=torch.float16), None, 4, 64)
    assert _check_exact(w, "Q4_0").qtype == "Q4_0"


def test_q4_1_exact_when_m_is_an_fp16_number():
    # zero points 0, 1, 2, 4, 8 make m = -z*s a power-of-two multiple of s: always exact
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (32, 128), generator=gen).to(torch.uint8)
    scales = (torch.rand(32, 4, generator=gen) + 0.1).half()
    zeros = torch.tensor([0, 1, 2, 4, 8])[torch.randint(0, 5, (32, 4), generator=gen)].to(torch.uint8)
    blocks = _check_exact(AffineWeight(codes, scales, zeros, 4, 32), "Q4_1")
    assert blocks.qtype == "Q4_1"
    # llama.cpp's own choice m = -z*s is used when it is exact
    m = blocks.m.float().reshape(32, 4)
    assert torch.equal(m, (-(zeros.float()) * scales.float()) + 0.0)


def test_q4_1_refusal_names_the_block():
    st = _state("int4_asym", 32, seed=3)
    w = AffineWeight.from_state(st)
    with pytest.raises(NotLossless, match=r"Q4_1: \d+ of 512 blocks are not exact, e.g. row \d+, columns .*fp16 number"):
        affine_to_gguf(w, "Q4_1")


def test_asymmetric_int8_codes_that_do_not_fit_q8_0():
    st = _state("int8_asym", 32)
    with pytest.raises(NotLossless, match="Q8_0: .* do not fit Q8_0's 0..255 around 128"):
        affine_to_gguf(AffineWeight.from_state(st), "Q8_0")


def test_scales_must_be_fp16_numbers():
    st = _state("int4", 32, scale_dtype=torch.float32)
    w = AffineWeight.from_state(st)
    with pytest.raises(NotLossless, match="block scales are not fp16 numbers .*scale_dtype=torch.float16"):
        affine_to_gguf(w)
    blocks = affine_to_gguf(w, round_scales=True)  # exact for the fp16-rounded scales
    rounded = AffineWeight(w.codes, w.scales.half(), None, 4, 32).dequantize()
    assert torch.equal(_bits(_oracle(blocks)), _bits(rounded))


def test_groups_must_cover_whole_blocks():
    st = _state("int4", 16)
    with pytest.raises(NotLossless, match="spans several .*group_size=16 is not a multiple of 32"):
        affine_to_gguf(AffineWeight.from_state(st))


def test_act_order_regrouped_when_exact_refused_otherwise():
    gen = torch.Generator().manual_seed(0)
    R, K, g = 32, 256, 64
    codes = torch.randint(0, 16, (R, K), generator=gen).to(torch.uint8)
    scales = (torch.rand(R, K // g, generator=gen) + 0.1).half()
    # act-order whose groups are unions of whole 32-column blocks: exact
    block_perm = torch.randperm(K // 32, generator=gen)
    g_idx = (torch.arange(K // 32)[block_perm] * 32 // g).repeat_interleave(32)
    w = AffineWeight(codes, scales, None, 4, g, g_idx=g_idx)
    assert not w.has_trivial_g_idx()
    assert _check_exact(w).qtype == "Q4_0"
    # a column-level permutation mixes groups inside blocks: refused, with the reason
    perm = torch.randperm(K, generator=gen)
    g_idx2 = torch.empty(K, dtype=torch.int64)
    g_idx2[perm] = torch.arange(K) // g
    with pytest.raises(NotLossless, match="act-order g_idx puts columns of different groups into it"):
        affine_to_gguf(AffineWeight(codes, scales, None, 4, g, g_idx=g_idx2))


# ---------------------------------------------------------------------------------------------
# whole checkpoints


def _model(scheme, g=32, scale_dtype=torch.float16):
    m = tiny_llama(vocab_size=128, hidden=64, layers=2, intermediate=128)
    for name, mod in list(m.named_modules()):
        for cn, c in list(mod.named_children()):
            if type(c) is nn.Linear and cn != "lm_head":
                st = lowbit.quantize(c.weight.detach(), scheme, group_size=g, scale_dtype=scale_dtype)
                setattr(mod, cn, QLinear.from_quant_state(c, st))
    return m.eval()


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _hf_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _logits(m):
    with torch.no_grad():
        return m(_ids()).logits


@pytest.mark.oracle
def test_gptq_checkpoint_to_q4_0_same_logits(tmp_path):
    m = _model("int4")
    gptq.export_gptq(m, tmp_path / "g")  # fp16 checkpoint, symmetric v1
    out = tmp_path / "g.gguf"
    rep = convert.convert_to_gguf(tmp_path / "g", out, tokenizer=None)
    assert rep["source_format"] == "gptq" and rep["float_type"] == "F16" and rep["lossless"]
    assert rep["type_counts"] == {"Q4_0": 14} and rep["verified"] == 14
    ref = gptq.load_gptq(tmp_path / "g", dtype=torch.float32)
    assert torch.equal(_logits(_hf_gguf(out)), _logits(ref))
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "F16"
    assert types["output.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.oracle
def test_awq_and_compressed_tensors_checkpoints(tmp_path):
    from lowbit.io.compressed_tensors import export_compressed_tensors

    m = _model("int4_asym", 32)
    gptq.export_awq(m, tmp_path / "a")
    rep = convert.convert_to_gguf(tmp_path / "a", tmp_path / "a.gguf", tokenizer=None)
    assert rep["source_format"] == "awq" and rep["verified"] == 14
    assert set(rep["type_counts"]) <= {"Q4_1", "Q5_0"}
    with pytest.raises(NotLossless, match="cannot be converted losslessly to Q4_0"):
        convert.convert_to_gguf(tmp_path / "a", tmp_path / "x.gguf", gguf_type="Q4_0", tokenizer=None)
    assert not (tmp_path / "x.gguf").exists()

    m8 = _model("int8", -1, scale_dtype=torch.float32)
    export_compressed_tensors(m8, tmp_path / "ct")  # fp32 model: fp32 scales
    with pytest.raises(NotLossless, match="not fp16 numbers"):
        convert.convert_to_gguf(tmp_path / "ct", tmp_path / "ct.gguf", tokenizer=None)
    m8h = _model("int8", -1)
    export_compressed_tensors(m8h, tmp_path / "ct")
    rep = convert.convert_to_gguf(tmp_path / "ct", tmp_path / "ct.gguf", tokenizer=None)
    assert rep["source_format"] == "compressed-tensors" and rep["type_counts"] == {"Q8_0": 14}
    assert rep["float_type"] == "F32"
    assert torch.equal(_logits(_hf_gguf(tmp_path / "ct.gguf")), _logits(m8h))


@pytest.mark.oracle
def test_native_checkpoint_with_gguf_states(tmp_path):
    m = _model("int4", 64)
    lowbit.quantize(m, weights="q4_1", include=["lm_head"], exclude=[])  # a GGUF-scheme state: passed through
    lowbit.freeze(m)
    lowbit.save(m, tmp_path / "n")
    rep = convert.convert_to_gguf(tmp_path / "n", tmp_path / "n.gguf", tokenizer=None)
    assert rep["source_format"] == "native" and rep["type_counts"] == {"Q4_0": 14, "Q4_1": 1}
    assert rep["verified"] == 15
    assert torch.equal(_logits(_hf_gguf(tmp_path / "n.gguf")), _logits(m))


def test_detect_format_errors(tmp_path):
    from lowbit.io._files import CheckpointError

    with pytest.raises(CheckpointError, match="neither a lowbit native checkpoint"):
        convert.detect_format(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="quantization method None"):
        convert.detect_format(tmp_path)


@pytest.mark.oracle
def test_export_all_formats_agree(tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.io import native
    from lowbit.io.multi import export_all

    m = _model("int4", 32)
    ref = _logits(m)
    rep = export_all(m, tmp_path, gguf_requantize_type="F32")
    assert set(rep) == {"native", "gguf", "compressed-tensors", "gptq"}
    assert rep["gguf"]["summary"] == {"exact": 14}
    assert torch.equal(_logits(native.load(tmp_path / "native")), ref)
    assert torch.equal(_logits(_hf_gguf(tmp_path / "model.gguf")), ref)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "compressed-tensors"),
                                                                     dtype=torch.float32).eval()), ref)
    g = gptq.read_gptq(tmp_path / "gptq")
    for name, w in g.weights.items():
        assert torch.equal(_bits(w.dequantize()), _bits(lowbit.dequantize(m.get_submodule(name).qstate)))
    # fp32 scales: GGUF and GPTQ hold the same fp16-rounded scales, with the same codes
    m32 = _model("int4", 32, scale_dtype=torch.float32)
    with pytest.warns(UserWarning, match="rounded"):
        rep = export_all(m32, tmp_path / "b", ["gguf", "gptq"])
    assert rep["gguf"]["summary"] == {"rounded scales": 14}
    from lowbit.io.gguf import load_gguf_quant_states

    states = load_gguf_quant_states(tmp_path / "b" / "model.gguf")
    g = gptq.read_gptq(tmp_path / "b" / "gptq")
    for name, w in g.weights.items():
        e = states[f"{name}.weight"]
        got = gguf.quants.dequantize(e.data.numpy().astype(np.uint8), gguf.GGMLQuantizationType[e.qtype])
        assert torch.equal(_bits(torch.from_numpy(got.copy())), _bits(w.dequantize())), name


@pytest.mark.slow
@pytest.mark.oracle
def test_smollm2_gptq_to_gguf_lossless(tmp_path):
    """SmolLM2-135M, int4 g64 RTN with fp16 scales -> GPTQ checkpoint -> GGUF: all 210 weights Q4_0 and
    verified bit for bit; transformers' GGUF loader gives the GPTQ model's logits exactly."""
    from transformers import AutoModelForCausalLM

    from lowbit.model.loading import load_model

    model, tok = load_model("default", dtype=torch.float32)
    for name, mod in list(model.named_modules()):
        for cn, c in list(mod.named_children()):
            if type(c) is nn.Linear and cn != "lm_head":
                st = lowbit.quantize(c.weight.detach(), "int4", group_size=64, scale_dtype=torch.float16)
                setattr(mod, cn, QLinear.from_quant_state(c, st))
    gptq.export_gptq(model, tmp_path / "g", tokenizer=tok)
    rep = convert.convert_to_gguf(tmp_path / "g", tmp_path / "s.gguf", tokenizer_pre="smollm")
    assert rep["type_counts"] == {"Q4_0": 210} and rep["verified"] == 210 and rep["float_type"] == "F16"
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building.",
              return_tensors="pt").input_ids
    ref = gptq.load_gptq(tmp_path / "g", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="s.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref(ids).logits)
