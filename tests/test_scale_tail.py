"""The staged pipeline's tail replay: a module whose output is its last linear's output (attention -> o_proj,
MLP -> down_proj) is rebuilt in the next pass from the input saved where the micro-batch stopped, instead of being
computed again; the codes are those of the run that recomputes everything."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.test_scale import _snapshot  # noqa: E402
from tests.test_sequential import _ids, _tiny_llama  # noqa: E402

from lowbit.model import _ptq_staged  # noqa: E402
from lowbit.model.sequential import quantize_model_ptq  # noqa: E402


def _run(monkeypatch, replay, **kw):
    monkeypatch.setattr(_ptq_staged._RunConfig, "replay", replay)
    model = _tiny_llama()
    quantize_model_ptq(model, method="gptq", bits=4, group_size=32, sym=False, calib_dataset=_ids(10, 32),
                       progress=False, pipeline="staged", **kw)
    return _snapshot(model), model.ptq_summary


def test_tail_replay_used_and_codes_unchanged(monkeypatch):
    ref, s0 = _run(monkeypatch, False, micro_batch=10)
    assert s0["tail_replays"] == 0
    for kw in (dict(micro_batch=3), dict(micro_batch=4, max_memory=0)):
        snap, s = _run(monkeypatch, True, **kw)
        # 2 blocks x (attention, MLP) x the micro-batches after the first (which checks the structure)
        n_mb = -(-10 // kw["micro_batch"])
        assert s["tail_replays"] == 2 * 2 * (n_mb - 1), kw
        bad = [k for k in ref if not torch.equal(ref[k], snap[k])]
        assert snap.keys() == ref.keys() and not bad, (kw, bad[:5])


def test_no_tail_replay_when_the_module_does_more_after_its_last_linear(monkeypatch):
    """An MLP that scales down_proj's output: its output is not down_proj's, so it is computed in full."""
    import transformers.models.llama.modeling_llama as llama

    orig = llama.LlamaMLP.forward

    def forward(self, x):
        return orig(self, x) * 0.5

    monkeypatch.setattr(llama.LlamaMLP, "forward", forward)
    ref, _ = _run(monkeypatch, False, micro_batch=10)
    snap, s = _run(monkeypatch, True, micro_batch=3)
    assert s["tail_replays"] == 2 * (4 - 1)  # the attention only
    bad = [k for k in ref if not torch.equal(ref[k], snap[k])]
    assert not bad, bad[:5]
