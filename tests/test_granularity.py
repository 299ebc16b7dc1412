"""Granularity resolved once (issue 16): the frozen granularity values, the resolved Grouping (group count, ragged
tail, pad / unpad / mask), one meaning and one stored layout for ``group_size=-1``, and old files still loading."""
import math

import pytest
import torch

import lowbit
from lowbit.algorithms.grid import columns, dequantize_groups, group_bounds, quantize_groups, make_grid, to_state
from lowbit.tensor.granularity import (GROUP_SIZE_RULE, Grouping, Layout, PerBlock, PerChannel, PerGroup, PerTensor,
                                       canonical_layout, granularity, pad_groups, resolve_layout, unpad_groups)


def test_granularity_values_and_one_message():
    assert granularity(group_size=128) == PerGroup(128)
    assert granularity(group_size=-1) == PerChannel(0)
    assert granularity(axis=1) == PerChannel(1)
    assert granularity(block_size=64) == PerBlock(64)
    assert granularity() == PerTensor()
    assert granularity(PerGroup(32)) == PerGroup(32)  # a value passes through
    for bad in (0, -5, 2.5, True, "128"):
        with pytest.raises(ValueError, match=r"group_size=.*" + GROUP_SIZE_RULE.replace("(", r"\(").replace(")", r"\)")):
            granularity(group_size=bad)
    with pytest.raises(ValueError, match="only one of group_size= and axis="):
        granularity(group_size=64, axis=0)
    with pytest.raises(ValueError, match="block_size=0"):
        granularity(block_size=0)
    # the algorithms and the tensor layer raise the same message
    for call in (lambda: group_bounds(64, 0), lambda: columns(64, -3),
                 lambda: lowbit.quantize(torch.randn(4, 8), "int4", group_size=0)):
        with pytest.raises(ValueError, match=GROUP_SIZE_RULE.replace("(", r"\(").replace(")", r"\)")):
            call()


@pytest.mark.parametrize("K,g", [(576, 128), (512, 128), (100, 32), (7, 3), (5, 8), (1, 1)])
def test_grouping_against_a_float64_reference(K, g):
    gr = PerGroup(g).resolve((3, K))
    G = math.ceil(K / g)
    assert (gr.rows, gr.length, gr.group, gr.n_groups) == (3, K, g, G)
    assert gr.pad == G * g - K and gr.tail == K - (G - 1) * g and gr.ragged == (K % g != 0)
    assert gr.bounds() == [(a, min(a + g, K)) for a in range(0, K, g)]
    assert torch.equal(gr.group_index(), torch.tensor([i // g for i in range(K)]))
    v = torch.randn(3, K, dtype=torch.float64)
    p = gr.pad_rows(v)
    assert p.shape == (3, G, g)
    assert torch.equal(gr.unpad(p), v)
    # edge padding leaves min / max / absmax of every group unchanged
    for gi, (a, b) in enumerate(gr.bounds()):
        assert torch.equal(p[:, gi].amax(-1), v[:, a:b].amax(-1)) and torch.equal(p[:, gi].amin(-1), v[:, a:b].amin(-1))
    z = gr.pad_rows(v, fill="zero").reshape(3, -1)
    assert torch.equal(z[:, K:], torch.zeros(3, gr.pad, dtype=torch.float64))
    m = gr.mask()
    if gr.pad:
        assert m.shape == (G, g) and int(m.sum()) == K and bool((m.reshape(-1)[K:] == 0).all())
    else:
        assert m is None
    params = torch.randn(3, G)
    assert torch.equal(gr.expand(params), params[:, torch.arange(K) // g])
    # the older helpers are the same thing
    assert torch.equal(pad_groups(v, g), p) and torch.equal(unpad_groups(p, K), v)


def test_minus_one_means_one_group_per_output_channel():
    for gs in (-1, None):
        gr = Grouping.of_columns(320, gs, rows=4)
        assert gr.per_channel and gr.n_groups == 1 and gr.group == 320 and not gr.ragged
        assert canonical_layout(gr) == Layout("channel", axis=0)
    assert canonical_layout(Grouping.of_columns(320, 128)) == Layout("group", block_size=128)
    assert resolve_layout((8, 16), None, -1, None) == Layout("channel", axis=0)
    assert PerChannel(0).resolve((8, 16)) == Grouping(8, 16, 16, per_channel=True)
    assert PerTensor().resolve((8, 16)).n_groups == 1 and PerBlock(64).resolve((8, 16)).n_groups == 2


def _w(R=16, K=100, seed=0):
    return torch.randn(R, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sym", [True, False])
def test_minus_one_gives_one_stored_layout_on_every_path(sym):
    from lowbit.algorithms.gptq import gptq_quantize
    from lowbit.algorithms.rtn import rtn_quantize

    w = _w()
    X = torch.randn(256, 100, generator=torch.Generator().manual_seed(1))
    H = X.t() @ X / 256
    states = {"tensor": lowbit.quantize(w, "int4" if sym else "int4_asym", group_size=-1),
              "rtn": rtn_quantize(w, 4, -1, sym),
              "gptq": gptq_quantize(w, H, 4, -1, sym).state}
    for name, st in states.items():
        assert (st.layout, st.axis, tuple(st.scales.shape)) == ("channel", 0, (16,)), name
    # round to nearest with one group per row: the tensor API and the PTQ path agree bit for bit
    assert torch.equal(lowbit.dequantize(states["tensor"]), lowbit.dequantize(states["rtn"]))


def test_old_group_form_of_minus_one_still_loads(tmp_path, monkeypatch):
    """Checkpoints written before the canonical layout (``group`` with one group per row) load unchanged."""
    transformers = pytest.importorskip("transformers")
    import lowbit.tensor.functional as F
    import lowbit.tensor.integer as I
    from lowbit.io._affine import quantized_linears
    from lowbit.model.loading import tiny_llama

    real = F.affine_state

    def old_form(*a, **kw):  # what the PTQ path wrote before issue 16
        kw["canonical"] = False
        return real(*a, **kw)

    model = tiny_llama(vocab_size=64, hidden=64, layers=1)
    with monkeypatch.context() as mp:
        mp.setattr(I, "affine_state", old_form)  # the PTQ path builds its states through AffineWeight
        lowbit.quantize(model, method="rtn", bits=4, group_size=-1, progress=False)
    lowbit.freeze(model)
    old = {n: st for n, (_, st) in quantized_linears(model).items()}
    assert old and all(st.layout == "group" and st.block_size == st.shape[1] for st in old.values())
    lowbit.save(model, tmp_path / "old")
    loaded = lowbit.load(tmp_path / "old")
    new = {n: st for n, (_, st) in quantized_linears(loaded).items()}
    assert set(new) == set(old)
    for n in old:
        assert new[n].layout == "group" and torch.equal(lowbit.dequantize(new[n]), lowbit.dequantize(old[n]))
    # and the exporters read both forms into the same integer weight
    from lowbit.io._affine import AffineWeight

    st = next(iter(old.values()))
    a = AffineWeight.from_state(st)
    b = AffineWeight.from_state(AffineWeight.from_state(st).to_state())
    assert b.to_state().layout == "channel"
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and a.group_size == b.group_size


def test_grid_round_trip_ragged_and_per_channel():
    grid = make_grid(4, False, "minmax")
    w = _w(8, 576)
    for gs in (128, -1, 1000):
        codes, scales, zeros = quantize_groups(w, grid, gs)
        G = columns(576, gs).n_groups
        assert scales.shape == (8, G)
        ref = torch.cat([((codes[:, a:b].double() - zeros[:, [i]].double()) * scales[:, [i]].double())
                         for i, (a, b) in enumerate(columns(576, gs).bounds())], 1)
        assert torch.allclose(dequantize_groups(codes, scales, zeros, gs).double(), ref, atol=1e-6)
        st = to_state(codes, scales, zeros, 4, gs, False)
        assert st.layout == ("group" if G > 1 else "channel")
        assert torch.allclose(lowbit.dequantize(st).double(), ref, atol=1e-6)


def test_awq_per_channel_folds_into_channel_states():
    """AWQ folds its input scales into the preceding linear's per-row scales: [out] for the channel layout."""
    pytest.importorskip("transformers")
    from lowbit.io._affine import quantized_linears
    from lowbit.model.loading import tiny_llama

    model = tiny_llama(vocab_size=64, hidden=64, layers=1)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = model(ids[:1]).logits
    lowbit.quantize(model, method="awq", bits=8, group_size=-1, calib_dataset=ids, progress=False)
    lowbit.freeze(model)
    states = {n: st for n, (_, st) in quantized_linears(model).items()}
    assert states and all(st.layout == "channel" for st in states.values())
    out = model(ids[:1]).logits
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.05 * ref.abs().max()
