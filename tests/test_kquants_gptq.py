"""GPTQ onto llama.cpp's K-quant grids, wired through ``gptq_quantize(gguf_type="Q4_K")``, the PTQ
pipeline's per-linear ``gguf_type`` mapping (recipes, budget plans) and the CLI.

Oracles: gguf-py (``gguf.quants.dequantize`` of the written blocks equals the weights lowbit computes
with), lowbit's byte-exact K-quant packer (the blocks unpack/repack to the same bytes), and llama.cpp's
reference rounding (``lowbit.formats.kquants.quantize_rows``, byte-identical with llama.cpp) as the
baseline GPTQ must beat on the layer-output error ``tr(E H E^T)``.
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

from lowbit.algorithms.gptq import gptq_quantize  # noqa: E402
from lowbit.formats import kquants as kq  # noqa: E402

pytestmark = pytest.mark.oracle


def _oracle(raw: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    arr = raw.numpy().astype(np.uint8)
    return torch.from_numpy(gguf.quants.dequantize(arr, gguf.GGMLQuantizationType[qtype.upper()]).copy()).float().reshape(shape)


def _hessian(K: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K ** 0.5)
    X = X * torch.rand(K, generator=g).mul(3).add(0.2)  # uneven input scales, as in real layers
    return X.t() @ X / X.shape[0]


def _err(E: torch.Tensor, H: torch.Tensor) -> float:
    E = E.double()
    return float(((E @ H.double()) * E).sum())


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gptq_on_kquant_grid_valid_blocks_and_beats_reference_rounding(qtype):
    K = 512
    H = _hessian(K)
    w = torch.randn(48, K, generator=torch.Generator().manual_seed(1)) * 0.05
    res = gptq_quantize(w, H, gguf_type=qtype)
    st = res.state
    t = kq.kquant_type(qtype)
    assert st.layout == "gguf" and st.scheme == qtype.lower() and tuple(st.shape) == (48, K)
    assert tuple(st.data.shape) == (48, K // 256 * t.type_size)
    # valid super-blocks: they unpack and repack to the very same bytes, and gguf-py reads exactly the
    # weights lowbit computes with
    codes, p = kq.unpack_kblocks(st.data, t)
    assert torch.equal(kq.pack_kblocks(codes, p, t), st.data)
    w_hat = res.dequantize()
    assert torch.equal(_oracle(st.data, qtype, w.shape), w_hat)
    # lower layer-output error than llama.cpp's own rounding of the same weights
    rtn = kq.dequantize_rows(kq.quantize_rows(w, t), t)
    e_gptq, e_rtn = _err(w_hat - w, H), _err(rtn - w, H)
    assert e_gptq < 0.9 * e_rtn, (qtype, e_gptq, e_rtn)


def test_kquant_target_falls_back_like_llama_cpp_on_other_rows():
    assert kq.kquant_fallback("Q4_K", 576) == "Q5_0" and kq.kquant_fallback("q6_k", 1536) == "Q6_K"
    assert kq.kquant_fallback("Q3_K", 96) == "Q4_0" and kq.kquant_fallback("Q5_K", 100) == "F16"
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))
    res = gptq_quantize(w, _hessian(96), gguf_type="Q4_K")
    assert res.state.layout == "gguf" and res.state.scheme == "q5_0"
    assert torch.equal(_oracle(res.state.data, "Q5_0", w.shape), res.dequantize())


def test_pipeline_per_linear_gguf_types_write_exact_blocks(tmp_path):
    from lowbit.io.gguf import export_gguf, load_gguf_quant_states
    from lowbit.io._affine import quantized_linears
    from lowbit.model.loading import tiny_llama, tiny_tokenizer
    from lowbit.model.sequential import quantize_model_ptq

    m = tiny_llama(hidden=64, layers=2, seed=0, intermediate=256).eval()
    ref = tiny_llama(hidden=64, layers=2, seed=0, intermediate=256).eval()
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    types = {n: ("Q4_K" if n.endswith("down_proj") else "Q8_0" if n.endswith("v_proj") else "Q4_0") for n in names}
    with pytest.raises(ValueError, match="no type for the linear"):
        quantize_model_ptq(ref, method="gptq", calib_dataset=calib, progress=False,
                           gguf_type={k: v for k, v in types.items() if "layers.1.mlp" not in k})
    quantize_model_ptq(m, method="gptq", calib_dataset=calib, gguf_type=types, progress=False)
    q = quantized_linears(m)
    assert {n: st.scheme for n, (_, st) in q.items()} == {n: t.lower() for n, t in types.items()}
    export_gguf(m, tmp_path / "m.gguf", "Q8_0", tokenizer=tiny_tokenizer())
    states = load_gguf_quant_states(tmp_path / "m.gguf")
    for name, (mod, st) in q.items():
        e = states[f"{name}.weight"]
        assert e.qtype == types[name]
        if "q_proj" in name or "k_proj" in name:
            continue  # written with llama.cpp's row permutation of the attention heads
        got = _oracle(e.data, e.qtype, tuple(st.shape))
        from lowbit import dequantize

        assert torch.equal(got, dequantize(st).float()), name


def _cli(*argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True, env=env, timeout=600)


def test_cli_gptq_kquant_recipe_and_budget(tmp_path):
    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    tiny_llama(hidden=256, layers=2, intermediate=512).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    common = ("--model", str(tmp_path / "tiny"), "--calib-dataset", str(tmp_path / "text.txt"), "--n-samples", "2",
              "--calib-seq-len", "32", "--quiet", "--format", "gguf")
    p = _cli("quantize", *common, "--method", "gptq", "--gguf-type", "Q4_K_M", "--output", str(tmp_path / "gptq"))
    assert p.returncode == 0, p.stderr[-3000:]
    from lowbit.io.gguf import gguf_tensor_plan
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny"), dtype=torch.float32)
    plan = {g: (n, t) for n, (g, t) in gguf_tensor_plan(ref, "Q4_K_M").items()}
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "gptq" / "model.gguf")).tensors}
    # llama.cpp's per-tensor choices (export_gguf's recipe, byte-identical with llama-quantize's in tests/test_kquants*.py)
    assert {k: v.tensor_type.name for k, v in tensors.items()} == {g: t for g, (_, t) in plan.items()}
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q6_K"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_K"
    params = dict(ref.named_parameters())
    changed = 0
    for g, v in tensors.items():
        typ = v.tensor_type.name
        if not typ.endswith("_K"):
            continue
        raw = torch.from_numpy(np.asarray(v.data).copy())
        assert np.isfinite(gguf.quants.dequantize(raw.numpy(), v.tensor_type)).all(), g  # valid blocks
        if "attn_q" in g or "attn_k" in g:
            continue  # rows permuted for llama.cpp's rope
        w = params[plan[g][0]].detach().float()
        changed += not torch.equal(raw.reshape(w.shape[0], -1), kq.quantize_rows(w, typ))
    assert changed >= 6  # GPTQ chose other blocks than llama.cpp's rounding
    # AWQ onto the K grids (tests/test_kquants_awq.py): every linear written on its Q4_K type
    p = _cli("quantize", *common, "--method", "awq", "--gguf-type", "Q4_K", "--output", str(tmp_path / "awq"))
    assert p.returncode == 0, p.stderr[-3000:]
    awq_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "awq" / "model.gguf")).tensors}
    assert all(awq_types[g] == "Q4_K" for g in plan if g.startswith("blk.") and "norm" not in g), awq_types
    # budget plan + GPTQ onto the plan's types
    p = _cli("quantize", *common, "--budget-method", "gptq", "--budget-types", "Q4_0,Q4_K,Q8_0", "--bits-budget", "5",
             "--output", str(tmp_path / "b"))
    assert p.returncode == 0, p.stderr[-3000:]
    plan = json.loads((tmp_path / "b" / "budget_plan.json").read_text())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "b" / "model.gguf")).tensors}
    from lowbit.io.gguf import gguf_name

    assert all(types[gguf_name(n)] == v["type"] for n, v in plan["weights"].items())
    assert plan["method"] == "gptq"


def test_budget_gptq_sensitivities_states_and_pipeline_plan(tmp_path):
    from lowbit.io.gguf import export_gguf, gguf_name
    from lowbit.model import budget as bud
    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    model = tiny_llama(hidden=256, layers=2, intermediate=512, tie_word_embeddings=True).eval()
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    H = bud.input_hessians(model, calib)
    names = ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    cands = ("Q3_K", "Q4_0", "Q4_K", "Q5_1")
    rtn = bud.sensitivities(model, H, cands, names=names)
    kept: dict = {}
    gq = bud.sensitivities(model, H, cands, names=names, method="gptq", keep_states=kept)
    for n in names:
        for t in cands:
            assert gq[n][t][1] == rtn[n][t][1]  # same type, same bytes
            assert gq[n][t][0] < rtn[n][t][0], (n, t)  # GPTQ leaves less layer-output error than rounding
            assert kept[n][t].layout == "gguf" and kept[n][t].scheme == t.lower()
    plan = bud.budget_plan(model, None, sens={**bud.sensitivities(model, H, cands), **gq}, bits_budget=5.0)
    states = bud.plan_quant_states(model, plan, kept)
    assert all(states[n] is kept[n][plan.types[n]] for n in names)
    cache: dict = {}
    solved = bud.gptq_plan_states(model, plan, H, cache=cache)
    for n in names:  # one GPTQ solve per weight on its own Hessian, the same blocks as the sensitivities'
        assert torch.equal(solved[n].data, kept[n][plan.types[n]].data)
    emb = "model.embed_tokens.weight"
    assert torch.equal(solved[emb].data, bud.plan_quant_states(model, plan)[emb].data)  # the tied embedding: RTN
    assert bud.gptq_plan_states(model, plan, H, cache=cache)[names[0]] is solved[names[0]]
    # the sequential pipeline onto the plan's types (GPTQ per linear, K-quants included)
    states = bud.quantize_plan(model, plan, "gptq", calib)
    export_gguf(model, tmp_path / "p.gguf", "Q8_0", tokenizer=tiny_tokenizer(), quant_states=states)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "p.gguf")).tensors}
    assert all(types[gguf_name(n)] == t for n, t in plan.types.items())
    with pytest.raises(ValueError, match="native integer types"):
        bud.quantize_plan(model, bud.BudgetPlan(types={names[0]: "int4"}, bytes={}, errors={}, budget_bytes=0))
