"""Error-compensated GGUF: RTN / GPTQ / AWQ quantizing straight onto llama.cpp's block grids.

Oracle: gguf-py. The file's blocks must dequantize (``gguf.quants.dequantize``) to exactly the weights
lowbit's model computes with, GPTQ/AWQ on the Q4_0 grid must beat llama.cpp's own rounding (RTN)
on the model's output, and one run must write GGUF, GPTQ and compressed-tensors from the same weights.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lowbit  # noqa: E402
from lowbit.formats import gguf as fmt  # noqa: E402
from lowbit.io._affine import AffineWeight, UnsupportedWeight, quantized_linears  # noqa: E402
from lowbit.model.loading import tiny_llama, tiny_tokenizer  # noqa: E402
from lowbit.model.sequential import quantize_model_ptq  # noqa: E402

pytestmark = pytest.mark.oracle


def _model():
    return tiny_llama(hidden=64, layers=2, seed=0, intermediate=128).eval()


def _calib(n=8, L=64, seed=1):
    return torch.randint(0, 256, (n, L), generator=torch.Generator().manual_seed(seed))


def _bits(t):
    return t.float().contiguous().view(torch.int32)


def _oracle_dequant(entry):
    raw = entry.data.numpy().astype(np.uint8)
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[entry.qtype]).copy()).float()


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_ptq_on_gguf_grid_writes_exact_blocks(tmp_path, method, qtype):
    from lowbit.io.gguf import load_gguf_quant_states
    from lowbit.io.multi import export_all

    m = _model()
    quantize_model_ptq(m, method=method, calib_dataset=_calib(), gguf_type=qtype, progress=False)
    q = quantized_linears(m)
    assert q and all(st.layout == "gguf" and st.scheme == qtype.lower() for _, st in q.values())
    rep = export_all(m, tmp_path, ["gguf"], tokenizer=tiny_tokenizer())  # a vocabulary without merges
    assert rep["gguf"]["summary"] == {"exact (gguf state)": len(q)}
    states = load_gguf_quant_states(tmp_path / "model.gguf")
    for name, (mod, st) in q.items():
        e = states[f"{name}.weight"]
        assert e.qtype == qtype
        assert torch.equal(e.data, st.data), name  # the very blocks, byte for byte
        assert torch.equal(_bits(_oracle_dequant(e)), _bits(lowbit.dequantize(st))), name


def test_rtn_on_gguf_grid_is_llama_cpp_reference():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    from lowbit.algorithms.rtn import rtn_quantize

    for qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        st = rtn_quantize(w, gguf_type=qtype)
        ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(st.data.numpy(), ref), qtype


def _out_err(m, ref, ids):
    with torch.no_grad():
        return float((m(ids).logits - ref(ids).logits).pow(2).mean())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gptq_and_awq_on_gguf_grid_beat_llama_cpp_rounding(qtype):
    """On a model whose activations have outlier channels, the calibrated methods on the exact block
    grid give a smaller logit error than llama.cpp's rounding of the same weights (RTN)."""
    ref = _model()
    with torch.no_grad():  # outlier input channels, as in real LLMs
        for blk in ref.model.layers:
            g = torch.ones(64)
            g[:4] = 8.0
            blk.input_layernorm.weight.mul_(g)
            blk.post_attention_layernorm.weight.mul_(g)
    calib, test = _calib(16, 64, 1), _calib(8, 64, 2)
    errs = {}
    for method in ("rtn", "gptq", "awq"):
        m = _model()
        m.load_state_dict(ref.state_dict())
        quantize_model_ptq(m, method=method, calib_dataset=calib, gguf_type=qtype, progress=False)
        errs[method] = _out_err(m, ref, test)
    assert errs["gptq"] < errs["rtn"], errs
    assert errs["awq"] < errs["rtn"], errs


def test_awq_fold_into_gguf_upstream_rescales_blocks():
    raw = fmt.quantize_rows(torch.randn(6, 64, generator=torch.Generator().manual_seed(0)), "q4_1")
    f = torch.rand(6, generator=torch.Generator().manual_seed(1)) + 0.5
    codes, d, m = fmt.unpack_blocks(raw, "q4_1")
    codes2, d2, m2 = fmt.unpack_blocks(fmt.scale_rows(raw, "q4_1", f), "q4_1")
    assert torch.equal(codes, codes2)
    assert torch.equal(d2, (d.float() / f[:, None]).half()) and torch.equal(m2, (m.float() / f[:, None]).half())
    with pytest.raises(ValueError, match="positive"):
        fmt.scale_rows(raw, "q4_1", -f)


def test_q4_0_and_q8_0_blocks_are_exact_integer_weights():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for qtype in ("q4_0", "q8_0"):
        st = lowbit.quantize(w, scheme=qtype)
        aw = AffineWeight.from_state(st)
        assert aw.group_size == 32 and aw.zeros is None and aw.scales.dtype == torch.float16
        assert torch.equal(_bits(aw.dequantize()), _bits(lowbit.dequantize(st)))
    with pytest.raises(UnsupportedWeight, match="fractional zero point"):
        AffineWeight.from_state(lowbit.quantize(w, scheme="q4_1"))


def _cli(*argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_one_run_writes_gguf_gptq_and_compressed_tensors(tmp_path):
    """``--method gptq --format gguf,gptq,compressed-tensors --gguf-type Q4_0``: the GGUF blocks, the GPTQ
    checkpoint and the compressed-tensors checkpoint all hold the same weights, bit for bit."""
    from lowbit.io import gptq
    from lowbit.io.gguf import load_gguf_quant_states

    _model().save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "q"
    p = _cli("quantize", "--model", str(tmp_path / "tiny"), "--method", "gptq", "--format",
             "native,gguf,gptq,compressed-tensors", "--gguf-type", "Q4_0", "--calib-dataset",
             str(tmp_path / "text.txt"), "--n-samples", "4", "--calib-seq-len", "64", "--output", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((out / "lowbit_run.json").read_text())
    assert meta["gguf_type"] == "Q4_0" and meta["gguf_weights"] == {"exact (gguf state)": 14}
    states = load_gguf_quant_states(out / "model.gguf")
    g = gptq.read_gptq(out / "gptq")
    assert len(g.weights) == 14
    for name, w in g.weights.items():
        e = states[f"{name}.weight"]
        assert e.qtype == "Q4_0"
        assert torch.equal(_bits(_oracle_dequant(e)), _bits(w.dequantize())), name
    from transformers import AutoModelForCausalLM

    from lowbit.io import native

    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = native.load(out).eval()(ids).logits
        ct = AutoModelForCausalLM.from_pretrained(str(out / "compressed-tensors"), dtype=torch.float32).eval()
        hf = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf", dtype=torch.float32).eval()
        assert torch.equal(ct(ids).logits, ref)
    # transformers' GGUF loader sees the very weights lowbit computes with (the unquantized embedding and
    # lm_head are written as llama.cpp does for Q4_0 files, so the logits are not compared)
    nat = native.load(out)
    for name, (mod, st) in quantized_linears(nat).items():
        assert torch.equal(_bits(hf.get_submodule(name).weight), _bits(lowbit.dequantize(st))), name


def test_gguf_target_needs_rows_of_32_columns():
    m = tiny_llama(hidden=64, layers=1, seed=0, intermediate=170)
    with pytest.raises(ValueError, match="in_features=170"):
        quantize_model_ptq(m, method="rtn", gguf_type="Q4_0", progress=False)


def test_cli_refuses_inexact_multi_format(tmp_path):
    tiny_llama(hidden=64, layers=2).save_pretrained(tmp_path / "tiny")
    p = _cli("quantize", "--model", str(tmp_path / "tiny"), "--method", "rtn", "--format", "gguf,gptq",
             "--gguf-type", "Q4_1", "--output", str(tmp_path / "q"))
    assert p.returncode != 0 and "Q4_1 blocks have no exact gptq form" in p.stderr
