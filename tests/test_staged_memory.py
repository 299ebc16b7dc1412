"""The staged pipeline lets go of what a finished block no longer needs (issue 18/20, the GPU peak grew with the
layers): the replaced ``nn.Linear`` objects (whose float weights stayed on the device), and the tensors outside
the blocks once block 0's inputs are captured. CPU checks of the references; the device bytes are measured in
bench/results/multi_gpu.md."""
import gc
import math
import weakref

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from lowbit.model import _ptq_staged  # noqa: E402
from lowbit.model.sequential import quantize_model_ptq  # noqa: E402
from tests.test_sequential import _ids, _tiny_llama  # noqa: E402


def _four_layers():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_replaced_linears_are_released_block_by_block(monkeypatch):
    model = _four_layers()
    refs = {n: weakref.ref(m) for n, m in model.named_modules() if type(m) is nn.Linear and "layers." in n}
    seen = []
    orig = _ptq_staged._states_follow

    def follow(states, names, model_, home):
        orig(states, names, model_, home)
        gc.collect()
        done = {n.split(".")[2] for n in names}
        alive = [n for n, r in refs.items() if r() is not None and n.split(".")[2] in done]
        seen.append((sorted(done), alive))

    monkeypatch.setattr(_ptq_staged, "_states_follow", follow)
    quantize_model_ptq(model, method="gptq", bits=4, group_size=32, sym=False, calib_dataset=_ids(6, 16),
                       micro_batch=2, progress=False)
    assert [d for d, _ in seen] == [["0"], ["1"], ["2"], ["3"]]
    # after its block finished, no replaced linear of it is referenced any more (its weight could stay on a GPU)
    assert all(alive == [] for _, alive in seen), seen


def test_codes_unchanged_by_the_release():
    """The same codes as a run that keeps every reference (the release only drops references)."""
    a = quantize_model_ptq(_tiny_llama(), method="gptq", bits=4, group_size=32, sym=False,
                           calib_dataset=_ids(6, 16), micro_batch=2, progress=False)
    keep = []
    orig = _ptq_staged._drop_replaced
    try:
        _ptq_staged._drop_replaced = lambda selected, sel, model: keep.extend(sel[n] for n in sel)
        b = quantize_model_ptq(_tiny_llama(), method="gptq", bits=4, group_size=32, sym=False,
                               calib_dataset=_ids(6, 16), micro_batch=2, progress=False)
    finally:
        _ptq_staged._drop_replaced = orig
    assert keep
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_head_only_and_device_bytes():
    untied = _four_layers()
    ids = _ptq_staged._head_only(untied)
    assert ids == {id(untied.lm_head.weight)}
    tied = _tiny_llama()
    assert _ptq_staged._head_only(tied) == set()  # the head is the input embedding: needed for the capture
    kept = [(untied.lm_head.weight, None, None, untied.lm_head.weight.data)]
    assert _ptq_staged._device_bytes(kept, untied, untied.model.layers, torch.device("cpu")) == 128 * 64 * 4


def test_damped_and_chunked_hessian_are_bit_identical():
    """``_damped`` (no identity matrix) equals ``H + damp * eye`` bit for bit, signed zeros included; the row-sliced
    float32 Hessian equals ``hessian().float()``; the in-place factor equals the copying one."""
    from lowbit.algorithms import gptq
    from lowbit.algorithms.stats import InputStats

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 80, generator=g)
    X[:, 5] = 0.0
    H = X.T @ X / 300
    H[H.abs() < 0.05] = -0.0
    for damp in (0.0, 0.37):
        ref = H + damp * torch.eye(80)
        assert torch.equal(gptq._damped(H, damp).view(torch.int32), ref.view(torch.int32))
    st = InputStats(80, hessian=True, absmean=False, dtype=torch.float64)
    st.add_samples(X.reshape(3, 100, 80))
    assert torch.equal(st.hessian_as(torch.float32), st.hessian().float())
    a = gptq.gptq_factor(H, 0.01, True)
    b = gptq.gptq_factor(H.clone(), 0.01, True, inplace=True)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)


def _meta_llama(layers=2, hidden=256, inter=512, vocab=1000, tie=True):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=tie)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_staged_device_bytes_follows_the_pipeline():
    from lowbit.model._ptq_staged import DEVICE_WORK_MARGIN, _device_work, _graph_statics, _stage_shapes
    from lowbit.model.plan import staged_device_bytes

    m = _meta_llama()
    free = staged_device_bytes(m, 64, 128, 8)  # no budget: the whole store on the device
    assert free["store"] == free["store_demand"] == 64 * 128 * 2 * 6 * 256
    assert free["total"] == max(free["capture"], free["blocks"] + free["store"] + free["work"])
    two = staged_device_bytes(m, 64, 128, 8, world=2)
    # two ranks: half the store each, no more work than one apart from what the solve's CUDA graphs keep
    statics = _graph_statics(_stage_shapes(m.model.layers[0], {n: x for n, x in m.named_modules()
                                                               if type(x) is nn.Linear and
                                                               n.startswith("model.layers.0.")}, "model.layers.0."), 2)
    assert statics > 0
    assert two["store"] == free["store"] / 2 and two["work"] - statics <= free["work"]
    # a budget: the store gets what the pipeline's reserve leaves
    block = free["block"]
    b0 = m.model.layers[0]
    sel = {n: x for n, x in m.named_modules() if type(x) is nn.Linear and n.startswith("model.layers.0.")}
    shapes = _stage_shapes(b0, sel, "model.layers.0.")
    assert shapes == [(256, 512), (256, 256), (256, 1024), (512, 256)]  # q/k/v, o, gate/up, down
    work = _device_work(b0, shapes, 8, 128, 2, 256)
    # the down_proj input's accumulation: float64 sums, 8 per-sample products at once, the input, the activations
    assert work == 8 * 512 ** 2 + 4 * 512 ** 2 * 8 + 8 * 128 * 512 * 6 + 8 * 128 * 2 * (2 * 256 + 512)
    # the peak: the samples of one product in fp32, the residual stream beside the input
    assert free["work"] == _device_work(b0, shapes, 8, 128, 2, 256, accurate=True) == \
        8 * 512 ** 2 + 4 * 512 ** 2 * 8 + 8 * 128 * 512 * 2 + 8 * 128 * 512 * 4 + 8 * 128 * 2 * 2 * 256 < work
    reserve = int(work * (1 + DEVICE_WORK_MARGIN)) + 2 * block + block // 3
    assert free["reserve"] == reserve
    outside = free["outside"]
    capped = staged_device_bytes(m, 64, 128, 8, budget=reserve + outside + 10_000)
    assert capped["store"] == 10_000 + outside  # the non-block tensors go home after the capture
    # streamed (no prefetch): one block fewer; the untied head stays home
    assert staged_device_bytes(m, 64, 128, 8, prefetch=False)["blocks"] == free["blocks"] - block
    untied = _meta_llama(tie=False)
    assert staged_device_bytes(untied, 64, 128, 8)["outside"] == free["outside"]
    assert staged_device_bytes(untied, 64, 128, 8, outside_selected=True)["outside"] == 2 * free["outside"] - 256 * 2


def test_graph_statics_counts_the_solve_graphs_copies(monkeypatch):
    """Session 11: a data-parallel GPTQ run on CUDA keeps, per distinct stage shape of a rank, fp32 copies of the
    weight piece, the codes, ``U``, the scales and zeros and the group index in its solve graphs (up to GRAPH_BYTES);
    the reserve counts them. None with one process, for AWQ, or with LOWBIT_GPTQ_GRAPH=0."""
    from lowbit.algorithms.gptq import GRAPH_BYTES
    from lowbit.model._ptq_staged import _device_work, _graph_statics

    monkeypatch.delenv("LOWBIT_GPTQ_GRAPH", raising=False)
    monkeypatch.delenv("LOWBIT_GPTQ_GRAPH_BYTES", raising=False)
    # the 8B shape: q/k/v, o, gate/up, down
    shapes = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]

    def need(rows, k):  # one graph's copies, counted by hand: W and the codes, U, scales and zeros, gidx
        return 2 * rows * k * 4 + k * k * 4 + 2 * rows * math.ceil(k / 128) * 4 + 8 * k

    assert _graph_statics(shapes, 1) == 0
    two = [need(3072, 4096), need(2048, 4096), need(14336, 4096), need(2048, 14336)]
    want = 0
    for n in two:  # admitted in stage order while the total fits
        if want + n <= GRAPH_BYTES:
            want += n
    assert _graph_statics(shapes, 2) == want
    assert 1.8e9 < want < 2.0e9  # the ~1.9 GB measured (peak 12.7 GB on 2 GPUs against 10.9 without graphs)
    assert want == sum(two)  # all four fit under the 3 GB cap
    # the same shape twice (two stages of one rank) is one graph
    assert _graph_statics(shapes + [(4096, 4096)], 2) == want
    # a cap that the gate/up graph would pass: it and the (larger) down_proj one are solved without graphs
    monkeypatch.setenv("LOWBIT_GPTQ_GRAPH_BYTES", str(sum(two[:2]) + two[2] - 1))
    assert _graph_statics(shapes, 2) == sum(two[:2])
    monkeypatch.setenv("LOWBIT_GPTQ_GRAPH_BYTES", str(need(3072, 4096)))
    assert _graph_statics(shapes, 2) == need(3072, 4096)
    monkeypatch.setenv("LOWBIT_GPTQ_GRAPH_BYTES", str(GRAPH_BYTES))
    monkeypatch.setenv("LOWBIT_GPTQ_GRAPH", "0")
    assert _graph_statics(shapes, 2) == 0
    monkeypatch.setenv("LOWBIT_GPTQ_GRAPH", "1")
    assert _graph_statics(shapes, 1) > 0  # forced on: one process keeps graphs too
    monkeypatch.setenv("LOWBIT_GPTQ_GRAPH", "yes")
    with pytest.raises(ValueError, match="LOWBIT_GPTQ_GRAPH"):
        _graph_statics(shapes, 2)
    monkeypatch.delenv("LOWBIT_GPTQ_GRAPH")
    monkeypatch.setenv("LOWBIT_DP_SPLIT", "units")  # whole linears per rank: no graphs by default
    assert _graph_statics(shapes, 2) == 0
    monkeypatch.delenv("LOWBIT_DP_SPLIT")
    # AWQ solves no graphs: its work does not count them
    m = _meta_llama()
    b0 = m.model.layers[0]
    from lowbit.model._ptq_staged import _stage_shapes
    sel = {n: x for n, x in m.named_modules() if type(x) is nn.Linear and n.startswith("model.layers.0.")}
    small = _stage_shapes(b0, sel, "model.layers.0.")
    g = _device_work(b0, small, 8, 128, 2, 256, world=2)
    statics = _graph_statics(small, 2)
    assert statics > 0
    monkeypatch.setenv("LOWBIT_GPTQ_GRAPH", "0")
    assert _device_work(b0, small, 8, 128, 2, 256, world=2) == g - statics
    a_off = _device_work(b0, small, 8, 128, 2, 256, world=2, awq=True)
    monkeypatch.delenv("LOWBIT_GPTQ_GRAPH")
    assert _device_work(b0, small, 8, 128, 2, 256, world=2, awq=True) == a_off


def test_plan_70b_class_fits_40gb():
    """Issue 18: the 70B class (hidden 8192, MLP 28,672) at 128 x 2048 under max_memory 40GB: plan's peak GPU
    (one H200) stays under 40 GB. Two layers suffice: the peak is per block."""
    from lowbit.model.plan import staged_device_bytes

    m = _meta_llama(layers=2, hidden=8192, inter=28672, vocab=128256)
    d = staged_device_bytes(m, 128, 2048, 8, budget=40 * 2 ** 30)
    assert d["total"] <= 40 * 2 ** 30
