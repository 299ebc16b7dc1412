"""QLoRA through peft on lowbit's quantized linears, and merging adapters back (float or re-quantized)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lowbit  # noqa: E402
import lowbit.integrations.peft as lbp  # noqa: E402
from lowbit.model.loading import tiny_llama  # noqa: E402
from lowbit.nn import Linear4bit, QLinear, QModuleMixin  # noqa: E402
from lowbit.tensor.functional import dequantize, quantize_tensor  # noqa: E402

LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(b: int = 4, n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_float")
    tiny_llama(vocab_size=256, hidden=96, layers=2, intermediate=160, seed=0).save_pretrained(d)
    return d


def _load(float_dir, **cfg):
    return transformers.AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=lowbit.LowbitConfig(**cfg)
    )


def _states(model):
    return {
        n: m.qstate for n, m in model.named_modules() if isinstance(m, QModuleMixin) and m.qstate is not None
    }


def _train(model, steps: int = 8, lr: float = 2e-2, seed: int = 0):
    """A few AdamW steps on one repeated batch; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    x = _ids(2, 16, seed=seed)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_get_peft_model_wraps_quantized_linears(float_dir):
    model = _load(float_dir, method="nf4")
    before = model(_ids()).logits.detach()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    wrapped = [m for m in pm.modules() if isinstance(m, lbp.LowbitLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS)
    assert all(type(m.base_layer) is Linear4bit for m in wrapped)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(TARGETS)
    # lora_B starts at zero: outputs unchanged; layer.weight is the dequantized base weight
    assert torch.equal(pm(_ids()).logits.detach(), before)
    w = wrapped[0]
    assert torch.equal(w.weight, dequantize(w.base_layer.qstate))


@pytest.mark.parametrize(
    "cfg",
    [dict(method="nf4", double_quant=True), dict(method="int4", group_size=32, sym=False)],
    ids=["nf4-dq", "int4-g32"],
)
def test_qlora_training_lowers_loss_and_keeps_base_frozen(cfg, float_dir):
    model = _load(float_dir, **cfg)
    frozen = {n: copy.deepcopy(s) for n, s in _states(model).items()}
    torch.manual_seed(0)  # LoRA's A matrices come from the global RNG: the loss curve must not depend on test order
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    losses = _train(pm, steps=8)
    # lr 2e-2 on one batch oscillates after a few steps: judge the best of the last four, not the very last
    assert min(losses[-4:]) < losses[0] - 0.3, losses
    after = _states(pm)
    assert len(after) == len(frozen)
    for name, st in frozen.items():
        new = after["base_model.model." + name + ".base_layer"]
        assert all(torch.equal(a, b) for a, b in zip(st.state_dict().values(), new.state_dict().values()))


def test_gradient_checkpointing_gives_the_same_gradients(float_dir):
    def grads(checkpointing: bool):
        model = _load(float_dir, method="nf4")
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        torch.manual_seed(0)
        pm = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        pm.train()
        x = _ids()
        pm(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 4 * len(TARGETS)
    for n in plain:
        assert ckpt[n] is not None and torch.allclose(plain[n], ckpt[n], rtol=1e-4, atol=1e-6), n
    assert any(g.abs().sum() > 0 for n, g in plain.items() if "lora_A" in n)


def test_recompute_base_keeps_no_float_weight_for_backward():
    """Autograd must not hold the dequantized weights until the backward pass (the point of QLoRA)."""
    # a plain quantized stack (no adapters): the modules alone keep no float weight either
    torch.manual_seed(0)
    plain = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    lowbit.quantize(plain, method="bnb-nf4", exclude=[])
    saved = []
    xp = torch.randn(8, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        yp = plain(xp)
    yp.square().sum().backward()
    assert sum(saved) < 4 * 256 * 256 // 8, saved
    w = [lowbit.dequantize(m.qstate) for m in plain]
    ref = xp.detach().requires_grad_()
    h = ref
    for m, wi in zip(plain, w):
        h = torch.nn.functional.linear(h, wi, m.bias)
    h.square().sum().backward()
    assert torch.allclose(xp.grad, ref.grad, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    mlp = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    lowbit.quantize(mlp, method="bnb-nf4", exclude=[])
    pm = get_peft_model(mlp, LoraConfig(r=4, target_modules=["0", "1", "2", "3"], init_lora_weights=False))
    x = torch.randn(8, 256, requires_grad=True)

    def run(recompute: bool):
        lbp.LowbitLoraLinear.recompute_base = recompute
        saved = []
        try:
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t
            ):
                y = pm(x)
        finally:
            lbp.LowbitLoraLinear.recompute_base = False
        y.square().sum().backward()
        grads = [p.grad.clone() for p in pm.parameters() if p.requires_grad] + [x.grad.clone()]
        pm.zero_grad()
        x.grad = None
        return y.detach(), grads, sum(saved)

    y1, g1, n1 = run(True)
    y0, g0, n0 = run(False)
    assert torch.equal(y1, y0)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g1, g0))
    # neither path keeps the four dequantized float weights (4 x 256 x 256 values) for backward: the
    # base layers re-dequantize in backward (frozen_linear); checkpointing on top changes nothing
    assert 4 * 256 * 256 > 8 * n0 and 4 * 256 * 256 > 8 * n1, (n0, n1)


def test_merge_float_equals_adapter_outputs(float_dir):
    model = _load(float_dir, method="nf4")
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    _train(pm, steps=4)
    x = _ids(2, 16, seed=3)
    with torch.no_grad():
        ref = pm(x).logits
    lora = {n: m for n, m in pm.named_modules() if isinstance(m, lbp.LowbitLoraLinear)}
    expected_w = {
        n: (dequantize(m.base_layer.qstate) + m.get_delta_weight("default")).detach() for n, m in lora.items()
    }
    merged = lbp.merge_lora(pm, requantize=False)
    assert isinstance(merged, transformers.LlamaForCausalLM)
    assert not any(
        isinstance(m, (QModuleMixin, peft.tuners.tuners_utils.BaseTunerLayer)) for m in merged.modules()
    )
    for n, w in expected_w.items():
        lin = merged.get_submodule(n.replace("base_model.model.", "", 1))
        assert type(lin) is nn.Linear and torch.allclose(lin.weight, w, atol=1e-6)
    with torch.no_grad():
        out = merged(x).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()
    # nothing quantized is left: the model is a plain float model again
    assert getattr(merged.config, "quantization_config", None) is None


def test_merge_requantize_uses_the_base_scheme_and_saves(float_dir, tmp_path):
    model = _load(float_dir, method="int4", group_size=32, sym=False)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    _train(pm, steps=4)
    x = _ids(2, 16, seed=3)
    with torch.no_grad():
        ref = pm(x).logits
    lora = {
        n.replace("base_model.model.", "", 1): m
        for n, m in pm.named_modules()
        if isinstance(m, lbp.LowbitLoraLinear)
    }
    merged_w = {
        n: (dequantize(m.base_layer.qstate) + m.get_delta_weight("default")).detach() for n, m in lora.items()
    }
    untouched = {
        n: copy.deepcopy(m.qstate)
        for n, m in pm.named_modules()
        if isinstance(m, QModuleMixin) and ("v_proj" in n or "gate_proj" in n)
    }
    merged = lbp.merge_lora(pm, requantize=True)
    for n, w in merged_w.items():
        q = merged.get_submodule(n)
        assert type(q) is QLinear
        expected = quantize_tensor(w, "int4_asym", group_size=32)
        assert all(
            torch.equal(a, b) for a, b in zip(q.qstate.state_dict().values(), expected.state_dict().values())
        )
    assert len(untouched) == 4
    for n, st in untouched.items():
        q = merged.get_submodule(n.replace("base_model.model.", "", 1))
        assert torch.equal(q.qstate.data, st.data)
    with torch.no_grad():
        out = merged(x).logits
    # re-quantization adds at most the quantization error of one more rounding
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    # the merged, re-quantized model saves and reloads like any lowbit checkpoint
    merged.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)


def test_peft_merge_and_unload_requantizes_in_place(float_dir):
    model = _load(float_dir, method="nf4")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    _train(pm, steps=3)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    w = (dequantize(layer.base_layer.qstate) + layer.get_delta_weight("default")).detach()
    out = pm.merge_and_unload()
    q = out.model.layers[0].self_attn.q_proj
    assert type(q) is Linear4bit
    assert torch.equal(q.qstate.data, quantize_tensor(w, "nf4", block_size=64).data)


def test_custom_module_mapping_api_and_plain_torch_model():
    """Without transformers: lowbit.quantize(...) a plain MLP, then LoRA through the per-config peft API."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 8))
    lowbit.quantize(mlp, method="bnb-nf4", exclude=["4"])
    assert isinstance(mlp[0], Linear4bit) and type(mlp[4]) is nn.Linear
    cfg = LoraConfig(r=4, target_modules=["0", "2"])
    cfg._register_custom_module(lbp.LORA_MODULE_MAPPING)
    pm = get_peft_model(mlp, cfg)
    assert isinstance(pm.base_model.model[0], lbp.LowbitLoraLinear)
    x, y = torch.randn(32, 64), torch.randint(0, 8, (32,))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(10):
        loss = nn.functional.cross_entropy(pm(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
    with torch.no_grad():
        ref = pm(x)
    merged = lbp.merge_lora(pm)
    assert type(merged[0]) is nn.Linear
    with torch.no_grad():
        assert torch.allclose(merged(x), ref, atol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        dict(scheme="nf4", block_size=64),
        dict(scheme="nf4", block_size=64, double_quant=True),
        dict(scheme="int4_asym", group_size=32),
        dict(scheme="int3", group_size=-1),
        dict(scheme="int8", axis=0),
        dict(scheme="fp8_e4m3", block_size=None),
        dict(scheme="int4", group_size=64, scale_dtype=torch.float16),
        dict(scheme="q4_0"),
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_requantize_like_reproduces_the_granularity(kw):
    w0, w1 = torch.randn(48, 96, generator=torch.Generator().manual_seed(1)), torch.randn(48, 96)
    state = quantize_tensor(w0, **kw)
    again = lbp.requantize_like(state, w1)
    expected = quantize_tensor(w1, **kw)
    a, b = again.state_dict(), expected.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="shape"):
        lbp.requantize_like(state, torch.randn(96, 48))


def test_install_is_idempotent_and_leaves_float_layers_to_peft():
    lbp.install()
    lbp.install()
    mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    pm = get_peft_model(mlp, LoraConfig(r=2, target_modules=["0"]))
    assert type(pm.base_model.model[0]) is peft.tuners.lora.layer.Linear


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_smollm2_qlora_loss_falls():
    """SmolLM2-135M, NF4 base, LoRA r=8 on q_proj/v_proj: 24 steps over four short windows of text.

    Cost is dominated by dequantizing the 210 NF4 weights in every forward, so the windows are
    short (32 tokens) to stay near a minute or two on two CPU cores.
    """
    from lowbit.model.loading import load_model

    try:
        model, tok = load_model("default")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    lowbit.quantize(model, method="bnb-nf4")
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 30 * 7
    pm = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    assert sum(isinstance(m, lbp.LowbitLoraLinear) for m in pm.modules()) == 60
    text = open(_wikitext("valid.txt"), encoding="utf-8").read()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    seq, n_chunks = 32, 4
    chunks = [ids[i * seq : (i + 1) * seq].unsqueeze(0) for i in range(n_chunks)]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    pm.train()
    losses = []
    for step in range(24):
        x = chunks[step % n_chunks]
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # every window once in each
    assert last < first - 0.5, losses
    assert all(torch.isfinite(torch.tensor(losses))), losses


def _wikitext(name: str):
    from pathlib import Path

    p = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / name
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p
