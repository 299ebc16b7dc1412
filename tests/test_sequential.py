"""The block-by-block PTQ pipeline on a tiny random Llama (fast) and on a plain MLP (no block list)."""
import pytest
import torch
from torch import nn

from lowbit.model.sequential import _block_stages, find_blocks, quantize_model_ptq

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and outlier channels, as in trained models
        for blk in model.model.layers:
            blk.input_layernorm.weight.uniform_(0.5, 2.0)
            blk.post_attention_layernorm.weight.uniform_(0.5, 2.0)
            blk.input_layernorm.weight[:4] *= 6
    return model


def _ids(n=8, seq=32, seed=1):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _err(model, ref, ids):
    return float((_logits(model, ids) - ref).square().mean())


def test_find_blocks_and_stages():
    model = _tiny_llama()
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 2
    sel = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.0.")}
    stages = _block_stages(blocks[0], sel, "model.layers.0.")
    names = [[n.split(".")[-1] for n in st.names] for st in stages]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    folds = [st.fold.split(".", 3)[-1] if st.fold else None for st in stages]
    # GQA: v_proj has fewer outputs than o_proj has inputs: o_proj.s scales are tied per v_proj row
    assert folds == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    assert stages[1].tie is not None and stages[1].tie.tolist()[:3] == [0, 1, 2]


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq", "awq"])
def test_pipeline_int8_is_nearly_exact(method):
    # 8 bits: any wiring mistake (a wrong AWQ fold, a wrong GPTQ column order) shows up as a large error
    model = _tiny_llama()
    ids = _ids()
    ref = _logits(model, ids)
    quantize_model_ptq(model, method=method, bits=8, group_size=32, sym=False, calib_dataset=ids, progress=False)
    assert float((_logits(model, ids) - ref).abs().max()) < 0.05 * float(ref.abs().max())
    s = model.ptq_summary
    # fp32 step per group of 32, and a uint8 zero (hqq: a float32 one, zero_rounding="float")
    top = 10.0 if method == "hqq" else 9.25
    assert s["n_layers"] == 14 and s["bits_per_weight"] == pytest.approx(top) and s["peak_memory_bytes"] > 0
    assert type(model.lm_head) is nn.Linear  # lm_head excluded by default
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QLinear"


def test_calibrated_methods_beat_rtn_at_3_bits():
    ids = _ids(16, 32)
    held_out = _ids(8, 32, seed=7)
    ref = _logits(_tiny_llama(), held_out)
    errs = {}
    for method in ("rtn", "gptq", "awq"):
        model = quantize_model_ptq(_tiny_llama(), method=method, bits=3, group_size=32, sym=False, calib_dataset=ids,
                                   progress=False)
        errs[method] = _err(model, ref, held_out)
    assert errs["gptq"] < errs["rtn"] and errs["awq"] < errs["rtn"], errs


def test_include_exclude_and_errors():
    model = _tiny_llama()
    quantize_model_ptq(model, method="rtn", bits=4, group_size=-1, include=["*mlp*"], progress=False)
    assert model.ptq_summary["n_layers"] == 6
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(ValueError, match="method='nope'"):
        quantize_model_ptq(_tiny_llama(), method="nope")
    with pytest.raises(ValueError, match="does not accept"):
        quantize_model_ptq(_tiny_llama(), method="rtn", percdamp=0.1)
    with pytest.raises(ValueError, match="no nn.Linear selected"):
        quantize_model_ptq(_tiny_llama(), method="rtn", include=["nothing"])


def test_model_without_blocks_uses_whole_model_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 50))
    ids = _ids(8, 16) % 50
    with torch.no_grad():
        ref = model(ids)
    quantize_model_ptq(model, method="gptq", bits=4, group_size=16, sym=False, calib_dataset=ids, exclude=None,
                       progress=False)
    with torch.no_grad():
        out = model(ids)
    assert model.ptq_summary["n_layers"] == 2
    assert float((out - ref).square().mean()) < 0.05 * float(ref.square().mean())
