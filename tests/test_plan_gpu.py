"""plan's GPU time model (lowbit.model.plan_gpu): structure, the row pieces it assumes, and its predictions
against the H200 runs committed in bench/results (the rates each run measured are in its JSON)."""
import json
from pathlib import Path

import pytest
import torch

from lowbit.model import plan_gpu
from lowbit.model._ptq_blocks import _block_stages, _select_linears, find_blocks
from lowbit.model._ptq_solve import _row_pieces

transformers = pytest.importorskip("transformers")
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SHAPES = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
          "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)}


def _meta_llama(shape, layers):
    cfg = transformers.LlamaConfig(vocab_size=128256, num_hidden_layers=layers, max_position_embeddings=2048,
                                   tie_word_embeddings=True, **SHAPES[shape])
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


def test_parts_add_up_and_scale_with_ranks_and_blocks():
    m = _meta_llama("8b", 4)
    one = plan_gpu.gpu_seconds(m, "gptq", 128, 2048, world=1)
    two = plan_gpu.gpu_seconds(m, "gptq", 128, 2048, world=2)
    for p in (one, two):
        parts = p["forward_s"] + p["hessian_s"] + p["factor_s"] + p["solve_s"] + p["comm_s"]
        assert p["per_block_s"] == pytest.approx(parts)
        assert p["seconds"] == pytest.approx(4 * p["per_block_s"])
    assert two["forward_s"] < one["forward_s"] and two["hessian_s"] == pytest.approx(one["hessian_s"] / 2)
    assert two["factor_s"] < one["factor_s"]  # the triangular inverse shared out (run 8 on)
    assert plan_gpu.gpu_seconds(m, "gptq", 128, 2048, world=2, shared_factor=False)["factor_s"] == one["factor_s"]
    assert one["comm_s"] == 0 < two["comm_s"]
    assert plan_gpu.gpu_seconds(m, "gptq", 128, 2048, n_blocks=80)["seconds"] == pytest.approx(80 * one["per_block_s"])
    awq = plan_gpu.gpu_seconds(m, "awq", 128, 2048, world=2)
    assert awq["factor_s"] == 0 and awq["solve_s"] == plan_gpu.gpu_seconds(m, "awq", 128, 2048)["solve_s"]


def test_errors():
    m = _meta_llama("8b", 1)
    with pytest.raises(ValueError, match="gptq and awq"):
        plan_gpu.gpu_seconds(m, "hqq")
    with pytest.raises(ValueError, match="world"):
        plan_gpu.gpu_seconds(m, "gptq", world=0)
    with pytest.raises(ValueError, match="factor='lu'"):
        plan_gpu.gpu_seconds(m, "gptq", factor="lu")


def test_pieces_are_the_pipelines_row_pieces():
    m = _meta_llama("8b", 1)
    name, blocks = find_blocks(m)
    sel = _select_linears(m, None, ["lm_head"])
    mods = {n: sel[n] for n in sel}
    for stage in _block_stages(blocks[0], sel, f"{name}.0."):
        for world in (2, 3, 4):
            got = plan_gpu._pieces([mods[n].out_features for n in stage.names], world)
            want = [[hi - lo for n, lo, hi, r in _row_pieces(stage, mods, world) if r == rank] for rank in range(world)]
            assert got == want
            from lowbit.model._ptq_solve import _solve_batches

            for rank in range(world):  # the calls each rank makes (its aligned pieces stacked)
                mine = [(j, p) for j, p in enumerate(_row_pieces(stage, mods, world)) if p[3] == rank]
                calls = [sum(p[2] - p[1] for _, p in b) for b in _solve_batches(mine)]
                assert plan_gpu._batched(got[rank]) == calls


def test_flip_factor_and_stacked_pieces_shrink_the_prediction():
    m = _meta_llama("8b", 1)
    new = plan_gpu.gpu_seconds(m, "gptq", 128, 2048, world=2)
    old = plan_gpu.gpu_seconds(m, "gptq", 128, 2048, world=2, factor="inverse", batch_pieces=False)
    assert new["factor_s"] < old["factor_s"] / 2 and new["solve_s"] < old["solve_s"]
    assert plan_gpu._batched([1024, 2048, 500, 1024, 7]) == [3572, 1031]


def test_plan_reports_gpu_seconds_on_cuda():
    from lowbit.model.plan import plan

    m = _meta_llama("8b", 2)
    p = plan(m, "gptq", n_samples=128, seq_len=2048, device="cuda", n_gpus=2)
    rates = plan_gpu.measure_rates("cuda") if torch.cuda.is_available() else None
    assert p["gpu_time"]["world"] == 2
    if rates is None:
        assert p["gpu_seconds"] == pytest.approx(plan_gpu.gpu_seconds(m, "gptq", 128, 2048, world=2)["seconds"])
    assert "gpu_seconds" not in plan(m, "gptq", n_samples=8, seq_len=64, device="cpu")
    assert "gpu_seconds" not in plan(m, "rtn", device="cuda")


@pytest.mark.parametrize("run,name,tol", [("scale_gpu_run6.json", "gptq_8b_1gpu", 0.25),
                                          ("scale_gpu_run6.json", "gptq_8b_2gpu", 0.25),
                                          ("scale_gpu_run6.json", "awq_8b_1gpu", 0.25),
                                          ("scale_gpu_run5.json", "gptq_70b_2gpu", 0.15),
                                          ("scale_gpu_run7.json", "gptq_8b_1gpu", 0.15),
                                          ("scale_gpu_run7.json", "gptq_8b_2gpu", 0.15),
                                          # run 8 on: the forward constants fitted on the 8B rows of runs 8
                                          # (store on the host) and 9 (on the device); the 70B rows out of sample
                                          ("scale_gpu_run8.json", "gptq_8b_1gpu", 0.15),
                                          ("scale_gpu_run8.json", "gptq_8b_2gpu", 0.15),
                                          ("scale_gpu_run8.json", "gptq_70b_1gpu", 0.15),
                                          ("scale_gpu_run8.json", "gptq_70b_2gpu", 0.15),
                                          ("scale_gpu_run9.json", "gptq_8b_1gpu", 0.15),
                                          ("scale_gpu_run9.json", "gptq_8b_2gpu", 0.15),
                                          ("scale_gpu_run9.json", "gptq_70b_1gpu", 0.15),
                                          ("scale_gpu_run9.json", "awq_8b_1gpu", 0.15),
                                          ("scale_gpu_run9.json", "awq_8b_2gpu", 0.15)])
def test_predictions_against_the_h200_runs(run, name, tol):
    """The model with the rates each run measured (recorded in its JSON) against the run's wall time."""
    path = RESULTS / run
    if not path.exists():
        pytest.skip(f"{path} not committed")
    r = json.loads(path.read_text())["gpu"][name]
    spec = r["spec"]
    m = _meta_llama(spec["shape"], spec["layers"])
    wall = max(x["wall_s"] for x in r["ranks"])
    n = int(run.split("run")[1].split(".")[0])
    kw = dict(factor="flip" if n >= 7 else "inverse", batch_pieces=n >= 7, shared_factor=n >= 8, legacy_forward=n < 8)
    peak = r["ranks"][0]["summary"].get("offload_peak_bytes", {"host": 1, "device": 0})
    kw["host_fraction"] = 1.0 if n < 8 else peak["host"] / max(peak["host"] + peak["device"], 1)
    pred = max(plan_gpu.gpu_seconds(m, spec["method"], 128, 2048, world=spec["nproc"], rates=x["rates"], **kw)["seconds"]
               for x in r["ranks"])
    assert abs(pred - wall) <= tol * wall, (pred, wall)
