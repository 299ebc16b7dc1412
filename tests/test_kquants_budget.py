"""Mixed precision under a budget (lowbit.model.budget): the knapsack against brute force, sensitivities
against a float64 re-computation, budgets respected, plans exported as GGUF and native states."""
import itertools

import pytest
import torch

import lowbit
from lowbit.model import budget as bud


def test_allocate_matches_brute_force_on_convex_instances():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        sens = {}
        for n in range(5):
            sizes = sorted(torch.randint(1, 50, (4,), generator=g).unique().tolist())
            errs = sorted((torch.rand(len(sizes), generator=g) * 100).tolist(), reverse=True)
            sens[f"w{n}"] = {f"t{i}": (errs[i], sizes[i]) for i in range(len(sizes))}
        budget = int(sum(min(b for _, b in v.values()) for v in sens.values()) + torch.randint(0, 80, (1,), generator=g))
        got = bud.allocate(sens, budget)
        assert sum(sens[n][t][1] for n, t in got.items()) <= budget
        best = min(
            (sum(sens[n][t][0] for n, t in zip(sens, combo)), combo)
            for combo in itertools.product(*[list(v) for v in sens.values()])
            if sum(sens[n][t][1] for n, t in zip(sens, combo)) <= budget)
        err = sum(sens[n][t][0] for n, t in got.items())
        # the Lagrangian + greedy solution is within a small margin of the exact optimum
        assert err <= best[0] * 1.25 + 1e-9, (trial, err, best)
    with pytest.raises(ValueError, match="below the smallest"):
        bud.allocate({"a": {"x": (1.0, 10)}}, 5)


def test_parse_size():
    assert bud.parse_size("90MB") == 90_000_000 and bud.parse_size("1.5 MiB") == 1_572_864
    with pytest.raises(ValueError, match="expected a number"):
        bud.parse_size("lots")


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_budget_plan_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    from lowbit.io import gguf as io

    model = _tiny()
    calib = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    H = bud.input_hessians(model, calib)
    assert H["model.layers.0.self_attn.q_proj.weight"] is H["model.layers.0.self_attn.k_proj.weight"]  # shared input
    # the Gram matrix of the inputs, re-derived in float64 for one layer
    xs = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: xs.append(i[0].double()))
    with torch.no_grad():
        model(calib[:1]), model(calib[1:])
    h.remove()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
    assert torch.allclose(H["model.layers.1.mlp.down_proj.weight"].double(), X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-6)
    cands = ("Q4_0", "Q4_K", "Q6_K", "Q8_0")
    sens = bud.sensitivities(model, H, cands)
    assert "model.embed_tokens.weight" in sens and "lm_head.weight" not in sens  # tied: scored as the output
    w = model.model.layers[0].mlp.up_proj.weight.detach().double()
    e = lowbit.dequantize(lowbit.quantize(w.float(), "q4_k")).double() - w
    Hd = H["model.layers.0.mlp.up_proj.weight"].double()
    assert sens["model.layers.0.mlp.up_proj.weight"]["Q4_K"][0] == pytest.approx(float(((e @ Hd) * e).sum()), rel=1e-4)
    errs = []
    for bits in (4.6, 5.5, 7.0):
        plan = bud.budget_plan(model, None, bits_budget=bits, sens=sens, candidates=cands)
        assert plan.total_bytes <= plan.budget_bytes and plan.bits_per_weight <= bits
        errs.append(sum(plan.errors.values()))
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]
    plan = bud.budget_plan(model, None, bits_budget=5.5, sens=sens, candidates=cands)
    path = io.export_gguf(model, tmp_path / "b.gguf", "Q8_0", quant_states=bud.plan_quant_states(model, plan))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    for n, t in plan.types.items():
        assert types[io.gguf_name(n)] == t
    saved = plan.save(tmp_path / "plan.json").read_text()
    assert '"bits_per_weight"' in saved
    # native integer groups
    nplan = bud.budget_plan(model, calib, bits_budget=4.0, candidates=bud.NATIVE_CANDIDATES, hessians=H)
    assert set(nplan.types.values()) <= set(bud.NATIVE_CANDIDATES) and nplan.total_bytes <= nplan.budget_bytes
    with pytest.raises(ValueError, match="exactly one"):
        bud.budget_plan(model, None, sens=sens)


def test_cli_bits_budget_and_kquant_mixture(tmp_path):
    pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    import json
    import os
    import subprocess
    import sys

    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    tiny_llama(hidden=256, layers=2, intermediate=512).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")

    def run(*argv):
        p = subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    common = ("--model", str(tmp_path / "tiny"), "--calib-dataset", str(tmp_path / "text.txt"), "--n-samples", "2",
              "--calib-seq-len", "32", "--quiet")
    run("quantize", *common, "--format", "gguf", "--bits-budget", "5", "--output", str(tmp_path / "b"))
    plan = json.loads((tmp_path / "b" / "budget_plan.json").read_text())
    assert plan["bits_per_weight"] <= 5 and plan["total_bytes"] <= plan["budget_bytes"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "b" / "model.gguf")).tensors}
    from lowbit.io.gguf import gguf_name

    assert all(types[gguf_name(n)] == v["type"] for n, v in plan["weights"].items())
    run("quantize", *common, "--format", "native", "--size-budget", "0.5MB", "--output", str(tmp_path / "n"))
    assert json.loads((tmp_path / "n" / "budget_plan.json").read_text())["total_bytes"] <= 500_000
    # rtn needs no calibration data: passing the calibration flags to it is an error (issue 16)
    run("quantize", "--model", str(tmp_path / "tiny"), "--quiet", "--method", "rtn", "--format", "gguf", "--gguf-type",
        "q4_k_m", "--output", str(tmp_path / "k"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "k" / "model.gguf")).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
