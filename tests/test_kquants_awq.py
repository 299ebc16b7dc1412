"""AWQ onto llama.cpp's K-quant grids (``awq_search(gguf_type="Q4_K")``, the PTQ pipeline's per-linear
``gguf_type`` mapping of a recipe such as Q4_K_M, and the CLI).

Oracles: gguf-py (``gguf.quants.dequantize`` of the written blocks equals the weights lowbit computes with),
llama.cpp's reference rounding (``lowbit.formats.kquants.quantize_rows``, byte-identical with llama.cpp): at
``alpha = 0`` without clipping AWQ writes exactly its bytes, and the search never ends above its layer-output
error ``tr(E H E^T)``, and ends well below it where a few input channels carry outlier activations.
"""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from lowbit.algorithms.awq import awq_search  # noqa: E402
from lowbit.formats import kquants as kq  # noqa: E402

pytestmark = pytest.mark.oracle


def _oracle(raw: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    arr = raw.cpu().numpy().astype(np.uint8)
    return torch.from_numpy(gguf.quants.dequantize(arr, gguf.GGMLQuantizationType[qtype.upper()]).copy()).float().reshape(shape)


def _outlier_input(K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * K, K, generator=g) * torch.rand(K, generator=g).add(0.3)
    X[:, torch.randperm(K, generator=g)[:6]] *= 25.0  # a few channels with outlier activations
    return X.t() @ X / X.shape[0], X.abs().mean(0)


def _err(E: torch.Tensor, H: torch.Tensor) -> float:
    E = E.double()
    return float(((E @ H.double()) * E).sum())


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_awq_on_kquant_grid_exact_blocks_and_beats_reference_rounding(qtype):
    K = 256
    H, mean = _outlier_input(K)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(24, K, generator=g), torch.randn(8, K, generator=g) * 0.5]
    res = awq_search(ws, H, mean, gguf_type=qtype, n_grid=10, clip_grid=6)
    s = res.input_scales
    total_rtn = 0.0
    for w, st, w_eff in zip(ws, res.states, res.effective_weights):
        assert st.layout == "gguf" and st.scheme == qtype.lower() and st.block_size == 256
        assert tuple(st.shape) == tuple(w.shape)
        # the written blocks are what lowbit computes with: gguf-py's dequantization of them, over s
        assert torch.equal(_oracle(st.data, qtype, w.shape) / s, w_eff)
        total_rtn += _err(kq.dequantize_rows(kq.quantize_rows(w, qtype), qtype) - w, H)
    total_awq = sum(_err(w_eff - w, H) for w, w_eff in zip(ws, res.effective_weights))
    assert res.losses[0] == pytest.approx(total_rtn, rel=1e-4)  # alpha = 0: llama.cpp's own rounding
    assert total_awq == pytest.approx(res.loss, rel=1e-4)
    assert res.alpha > 0 and total_awq < 0.6 * total_rtn, (qtype, total_awq, total_rtn)
    # no scale search, no clip: exactly llama.cpp's reference bytes
    plain = awq_search(ws, H, mean, gguf_type=qtype, scale_search=False, clip=False)
    for w, st in zip(ws, plain.states):
        assert torch.equal(st.data, kq.quantize_rows(w, qtype))


def test_awq_kquant_clip_search_never_above_unclipped_and_mixed_types():
    K = 256
    H, mean = _outlier_input(K, seed=3)
    w = torch.randn(16, K, generator=torch.Generator().manual_seed(4))
    clipped = awq_search([w], H, mean, gguf_type="Q3_K", n_grid=6, clip_grid=8)
    unclipped = awq_search([w], H, mean, gguf_type="Q3_K", n_grid=6, clip=False)
    assert clipped.alpha == unclipped.alpha and clipped.loss <= unclipped.loss + 1e-6
    # linears sharing one input but written with different types (llama.cpp's recipes: v_proj higher)
    res = awq_search([w, w[:8]], H, mean, gguf_type=["Q4_K", "Q8_0"], n_grid=4, clip_grid=4)
    assert [st.scheme for st in res.states] == ["q4_k", "q8_0"]
    for st, w_eff, t in zip(res.states, res.effective_weights, ["Q4_K", "Q8_0"]):
        assert torch.equal(_oracle(st.data, t, st.shape) / res.input_scales, w_eff)
    # llama.cpp's fallback on rows that are not a multiple of 256
    fb = awq_search([torch.randn(8, 96)], torch.eye(96), torch.ones(96), gguf_type="Q4_K", n_grid=2, clip_grid=2)
    assert fb.states[0].scheme == "q5_0"
    with pytest.raises(ValueError, match="2 types for 1 weights"):
        awq_search([w], H, mean, gguf_type=["Q4_K", "Q6_K"])


def test_scale_rows_kquant_divides_superblock_scales():
    from lowbit.formats.gguf import scale_rows

    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(5))
    f = torch.tensor([1.0, 2.0, 0.5, 3.0])
    for t in ("q4_k", "q6_k"):
        raw = kq.quantize_rows(w, t)
        codes, p = kq.unpack_kblocks(raw, t)
        out = scale_rows(raw, t, f)
        c2, p2 = kq.unpack_kblocks(out, t)
        assert torch.equal(c2, codes) and torch.equal(p2.sc, p.sc)
        assert torch.equal(p2.d, (p.d.float() / f[:, None]).half())
        got, ref = _oracle(out, t, w.shape), _oracle(raw, t, w.shape) / f[:, None]
        assert float((got - ref).abs().max()) <= 2e-3 * float(ref.abs().max())
    assert torch.equal(scale_rows(raw, "q6_k", torch.ones(4)), raw)


def test_pipeline_awq_onto_recipe_writes_the_model_it_holds(tmp_path):
    from lowbit import dequantize
    from lowbit.io._affine import quantized_linears
    from lowbit.io.gguf import export_gguf, gguf_name, load_gguf_quant_states
    from lowbit.model.loading import tiny_llama, tiny_tokenizer
    from lowbit.model.sequential import quantize_model_ptq
    from lowbit.workflow import gguf_linear_types

    m = tiny_llama(hidden=256, layers=2, seed=0, intermediate=512).eval()
    types = gguf_linear_types(m, "Q4_K_M")
    assert {"Q4_K", "Q6_K"} <= set(types.values())  # v_proj / one down_proj get Q6_K next to Q4_K q/k/o/gate/up
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_model_ptq(m, method="awq", calib_dataset=calib, gguf_type=types, progress=False, n_grid=4, clip_grid=3)
    q = quantized_linears(m)
    # every linear on its recipe type (lm_head: rounded by the recipe at export, not an AWQ linear)
    assert {n: st.scheme for n, (_, st) in q.items()} == {n: t.lower() for n, t in types.items() if n != "lm_head"}
    export_gguf(m, tmp_path / "m.gguf", "Q4_K_M", tokenizer=tiny_tokenizer())
    reader = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    states = load_gguf_quant_states(tmp_path / "m.gguf")
    for name, (_, st) in q.items():
        e = states[f"{name}.weight"]
        assert e.qtype == types[name]
        got = _oracle(e.data, e.qtype, tuple(st.shape))  # (q/k block rows back in Hugging Face order)
        assert torch.equal(got, dequantize(st).float()), name
    # AWQ's input scales folded into the norms: the file holds the model's (changed) norm weights
    for name, p in m.named_parameters():
        if name.endswith("layernorm.weight"):
            t = reader[gguf_name(name)]
            assert torch.equal(torch.from_numpy(np.asarray(t.data).copy()).float(), p.detach().float()), name
    ref = tiny_llama(hidden=256, layers=2, seed=0, intermediate=512).eval()
    assert not torch.equal(ref.model.layers[0].input_layernorm.weight, m.model.layers[0].input_layernorm.weight)
