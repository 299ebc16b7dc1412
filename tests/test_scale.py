"""Memory-bounded calibration: micro-batch invariance of the codes, the activation store's tiers, budgets."""
import pytest
import torch

from lowbit.model.offload import ActivationStore, parse_bytes

transformers = pytest.importorskip("transformers")

from tests.test_sequential import _ids, _tiny_llama  # noqa: E402

from lowbit.model.sequential import quantize_model_ptq  # noqa: E402


def _snapshot(model):
    out = {}
    for n, m in model.named_modules():
        st = getattr(m, "qstate", None)
        if st is not None:
            out[n + ":codes"] = st.data.clone()
            out[n + ":scales"] = st.scales.clone()
            out[n + ":zeros"] = st.zeros.clone()
    for n, p in model.state_dict().items():
        if p.is_floating_point():
            out[n] = p.clone()
    return out


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_codes_do_not_depend_on_micro_batch_or_offload(method):
    """Bit-identical codes (and every other tensor) at micro-batch 1, 7 and all, on the device or spilled to disk."""
    ids = _ids(14, 32)
    runs = {}
    for label, kw in (("all", dict(micro_batch=14)), ("mb1", dict(micro_batch=1)), ("mb7", dict(micro_batch=7)),
                      ("mb7-disk", dict(micro_batch=7, max_memory=0)), ("mb3-noreplay", dict(micro_batch=3))):
        model = _tiny_llama()
        if label.endswith("noreplay"):
            from lowbit.model import sequential

            orig = sequential._RunConfig.replay
            sequential._RunConfig.replay = False
            try:
                quantize_model_ptq(model, method=method, bits=4, group_size=32, sym=False, calib_dataset=ids,
                                   progress=False, **kw)
            finally:
                sequential._RunConfig.replay = orig
        else:
            quantize_model_ptq(model, method=method, bits=4, group_size=32, sym=False, calib_dataset=ids,
                               progress=False, **kw)
        runs[label] = (_snapshot(model), model.ptq_summary)
    ref, _ = runs["all"]
    assert any(k.endswith(":codes") for k in ref)
    for label, (snap, summary) in runs.items():
        assert snap.keys() == ref.keys()
        bad = [k for k in ref if not torch.equal(ref[k], snap[k])]
        assert not bad, f"{label}: {bad[:5]}"
    assert runs["mb7-disk"][1]["offload_peak_bytes"]["disk"] > 0  # it really spilled
    assert runs["all"][1]["offload_peak_bytes"]["disk"] == 0


def test_gptq_matches_the_previous_pipeline_closely():
    """The float64 per-sample sums move the Hessian by rounding only: nearly all codes equal the previous pipeline's."""
    ids = _ids(16, 32)
    a = _snapshot(quantize_model_ptq(_tiny_llama(), method="gptq", bits=4, group_size=32, sym=False, calib_dataset=ids,
                                     progress=False))
    b = _snapshot(quantize_model_ptq(_tiny_llama(), method="gptq", bits=4, group_size=32, sym=False, calib_dataset=ids,
                                     progress=False, pipeline="threads"))
    codes = [k for k in a if k.endswith(":codes")]
    diff = sum(int((a[k] != b[k]).sum()) for k in codes)
    total = sum(a[k].numel() for k in codes)
    assert diff <= 0.001 * total


def test_auto_pipeline_is_the_staged_one():
    """``pipeline="auto"`` (the default) runs the staged pipeline (since issue 18, scale3): its exact codes."""
    ids = _ids(6, 16)
    m = quantize_model_ptq(_tiny_llama(), method="gptq", bits=4, group_size=32, sym=False, calib_dataset=ids,
                           progress=False)
    a = _snapshot(m)
    c = _snapshot(quantize_model_ptq(_tiny_llama(), method="gptq", bits=4, group_size=32, sym=False, calib_dataset=ids,
                                     progress=False, pipeline="staged"))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert m.ptq_summary["micro_batch"] == 8 and "offload_peak_bytes" in m.ptq_summary
    from lowbit.model.plan import plan

    assert plan(_tiny_llama(), "gptq", n_samples=6, seq_len=16)["pipeline"] == "staged"


def test_activation_store_tiers_round_trip(tmp_path):
    x = torch.randn(3, 5)
    y = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    obj = ((x, None, [y]), {"k": y, "n": 3})
    for budget, tier in ((None, "device"), (0, "disk")):
        st = ActivationStore(torch.device("cpu"), budget, spill_dir=str(tmp_path))
        ref = x.clone()
        key = st.put(obj)
        x.add_(1)  # the store holds a copy
        back = st.get(key)
        assert torch.equal(back[0][0], ref) and back[0][1] is None and torch.equal(back[0][2][0], y)
        assert torch.equal(back[1]["k"], y) and back[1]["n"] == 3 and back[1]["k"].dtype == torch.bfloat16
        assert st.tier_bytes()[tier] == x.numel() * 4 + 2 * y.numel() * 2
        st.get(key, pop=True)
        assert st.tier_bytes()[tier] == 0 and key not in st
        st.close()
        x.copy_(ref)
    assert not any(tmp_path.iterdir())  # spill files removed


def test_budget_parsing():
    assert parse_bytes("1.5GB") == int(1.5 * 2 ** 30)
    assert parse_bytes("800MB") == 800 * 2 ** 20
    assert parse_bytes(1234) == 1234 and parse_bytes(None) is None
    with pytest.raises(ValueError, match="max_memory"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="micro_batch"):
        quantize_model_ptq(_tiny_llama(), method="gptq", calib_dataset=_ids(2, 8), micro_batch=0)
