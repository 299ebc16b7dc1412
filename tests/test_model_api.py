"""Model API (quanto workflow): quantize / Calibration / QAT / freeze / quantization_map / requantize."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.nn import Linear4bit, QConv2d, QLinear, quantized_nbytes


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _state_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_cnn_quanto_workflow_end_to_end(tmp_path: Path):
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(8, 3, 16, 16)
    ref = model(x).detach()
    before = _state_bytes(model)
    lowbit.quantize(model, weights=lowbit.qint8, activations=lowbit.qint8)
    assert isinstance(model.features[0], QConv2d) and isinstance(model.classifier, QLinear)
    with lowbit.Calibration(momentum=0.9):
        model(x)
        model(x * 0.5)
    assert model.features[0].input_scale > 0 and model.classifier.input_scale > 0
    y = model(x).detach()
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()
    lowbit.freeze(model)
    assert torch.equal(model(x), y)
    assert _state_bytes(model) < 0.4 * before
    qmap = lowbit.quantization_map(model)
    assert json.loads(json.dumps(qmap)) == qmap
    assert qmap["classifier"]["weights"] == "qint8" and qmap["classifier"]["activations"] == "qint8"
    save_file(model.state_dict(), str(tmp_path / "cnn.safetensors"))
    (tmp_path / "qmap.json").write_text(json.dumps(qmap))
    with torch.device("meta"):
        empty = SmallCNN()
    restored = lowbit.requantize(empty, load_file(str(tmp_path / "cnn.safetensors")),
                                 json.loads((tmp_path / "qmap.json").read_text()), device="cpu")
    assert torch.equal(restored(x), y)


def test_calibration_records_moving_average_of_absmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    lowbit.quantize(model, weights=None, activations="qint8")
    xs = [torch.randn(5, 8) * s for s in (1.0, 3.0, 0.5)]
    with lowbit.Calibration(momentum=0.9):
        for x in xs:
            model(x)
    lo, hi = float(xs[0].min()), float(xs[0].max())
    for x in xs[1:]:
        lo, hi = 0.9 * lo + 0.1 * float(x.min()), 0.9 * hi + 0.1 * float(x.max())
    assert model[0].input_scale.item() == pytest.approx(max(-lo, hi) / 127, rel=1e-5)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "histogram"])
def test_calibration_observers(observer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8))
    lowbit.quantize(model, weights="qint8", activations="qint8")
    x = torch.randn(64, 32)
    x[0, 0] = 50.0
    with lowbit.Calibration(observer=observer, percentile=99.0):
        model(x)
    s = model[0].input_scale.item()
    if observer == "minmax":
        assert s == pytest.approx(50.0 / 127)
    else:
        assert s < 50.0 / 127  # the outlier is clipped
    with pytest.raises(ValueError, match="registered"):
        lowbit.Calibration(observer="entropy")


def test_include_exclude_and_default_lm_head():
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model.gate = nn.Linear(4, 4)
    model.lm_head = nn.Linear(4, 4)
    lowbit.quantize(model, weights="qint8")
    assert isinstance(model.body[0], QLinear) and isinstance(model.gate, QLinear)
    assert type(model.lm_head) is nn.Linear  # excluded by default
    m2 = nn.Module()
    m2.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    m2.gate = nn.Linear(4, 4)
    lowbit.quantize(m2, weights="qint4", include=["body.*"], exclude=["body.1"])
    assert isinstance(m2.body[0], QLinear) and type(m2.body[1]) is nn.Linear and type(m2.gate) is nn.Linear
    # quantizing twice does not wrap twice
    lowbit.quantize(m2, weights="qint4")
    assert isinstance(m2.body[0], QLinear) and not isinstance(m2.body[0].weight, QLinear)


def test_quantize_arguments_validated():
    with pytest.raises(ValueError, match="unknown weights type"):
        lowbit.quantize(nn.Linear(4, 4), weights="qint3")
    with pytest.raises(ValueError, match="activations"):
        lowbit.quantize(nn.Sequential(nn.Linear(4, 4)), activations="qint4")
    with pytest.raises(ValueError, match="nothing to quantize"):
        lowbit.quantize(nn.Sequential(nn.Linear(4, 4)), weights=None)
    q = lowbit.quantize(nn.Linear(4, 4), weights="qint8")  # a bare Linear is replaced and returned
    assert isinstance(q, QLinear)


@pytest.fixture
def one_thread():
    # tiny matmuls: one thread avoids oversubscription on a shared 2-core CI box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_qat_loss_down_and_accuracy_recovers(one_thread):
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(16, 4, generator=g)
    X = torch.randn(3000, 16, generator=g)
    Y = (X @ w_true).argmax(1)
    xtr, ytr, xte, yte = X[:2000], Y[:2000], X[2000:], Y[2000:]
    torch.manual_seed(0)

    def train(m, steps, lr):
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        for _ in range(steps):
            idx = torch.randint(0, 2000, (128,), generator=g)
            loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    def evaluate(m):
        with torch.no_grad():
            return (m(xte).argmax(1) == yte).float().mean().item(), F.cross_entropy(m(xtr), ytr).item()

    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    train(model, 150, 1e-2)
    acc_float, _ = evaluate(model)
    lowbit.quantize(model, weights="qint2", exclude=None)
    acc_ptq, loss_ptq = evaluate(model)
    model.train()
    train(model, 150, 3e-3)  # gradients flow through the fake quantization (STE)
    acc_qat, loss_qat = evaluate(model)
    assert loss_qat < 0.7 * loss_ptq
    assert acc_qat > acc_ptq and abs(acc_float - acc_qat) < abs(acc_float - acc_ptq)
    lowbit.freeze(model)
    assert evaluate(model)[0] == acc_qat


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers, cfg


def test_tiny_llama_weight_only_freeze_save_requantize(tmp_path: Path):
    transformers, cfg = _tiny_llama()
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    before = _state_bytes(model)
    lowbit.quantize(model, weights="qint4")
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, QLinear)
    lowbit.freeze(model)
    with torch.no_grad():
        y = model(ids).logits
    assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.99
    assert _state_bytes(model) < 0.75 * before and quantized_nbytes(model) > 0
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    qmap = json.loads(json.dumps(lowbit.quantization_map(model)))
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        empty = transformers.LlamaForCausalLM(cfg).eval()
    restored = lowbit.requantize(empty, load_file(str(tmp_path / "m.safetensors")), qmap, device="cpu")
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, y)


def test_requantize_reports_meta_leftovers():
    transformers, cfg = _tiny_llama()
    model = transformers.LlamaForCausalLM(cfg).eval()
    lowbit.quantize(model, weights="qint8")
    lowbit.freeze(model)
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(RuntimeError, match="meta device.*init_empty_weights"):
        lowbit.requantize(empty, model.state_dict(), lowbit.quantization_map(model))


def test_mixed_module_types_roundtrip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    model[0] = Linear4bit.from_module(model[0], quant_type="fp4", double_quant=True)
    model[2] = lowbit.nn.Linear8bitLt.from_module(model[2])
    lowbit.quantize(model, weights="qfloat8", activations="qint8", act_dynamic=True)
    lowbit.freeze(model)
    x = torch.randn(3, 16)
    y = model(x)
    qmap = lowbit.quantization_map(model)
    assert [qmap[k]["class"] for k in ("0", "2", "4")] == ["Linear4bit", "Linear8bitLt", "QLinear"]
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    restored = lowbit.requantize(empty, {k: v.clone() for k, v in model.state_dict().items()}, qmap)
    assert torch.equal(restored(x), y)


@pytest.mark.slow
def test_smollm2_qint8_perplexity_and_roundtrip(tmp_path: Path):
    pytest.importorskip("transformers")
    from lowbit.model.loading import load_model

    wiki = Path(__file__).resolve().parents[2].joinpath("shared/data/wikitext-2/test.txt")
    if not wiki.exists():
        pytest.skip(f"{wiki} not found (the WikiText-2 copy beside the repository, ../shared)")
    model, tok = load_model("default", dtype=torch.float32)  # converted float model, cached outside the repo
    text = wiki.read_text()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :128]

    def nll(m):
        with torch.no_grad():
            return m(ids, labels=ids).loss.item()

    base = nll(model)
    lowbit.quantize(model, weights="qint8")
    lowbit.freeze(model)
    q = nll(model)
    assert q < base + 0.05  # int8 weights: perplexity within ~5%
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    save_file(sd, str(tmp_path / "smol.safetensors"))
    qmap = json.loads(json.dumps(lowbit.quantization_map(model)))
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        empty = type(model)(model.config).eval()
    restored = lowbit.requantize(empty, load_file(str(tmp_path / "smol.safetensors")), qmap, device="cpu",
                                 strict=False)
    assert restored.lm_head.weight is restored.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(restored(ids[:, :32]).logits, model(ids[:, :32]).logits)


@pytest.mark.cuda
def test_cuda_cnn_workflow_and_requantize_to_cuda():
    torch.manual_seed(0)
    model = SmallCNN().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    lowbit.quantize(model, weights="qint4", activations="qint8")
    with lowbit.Calibration():
        model(x)
    lowbit.freeze(model)
    y = model(x)
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        empty = SmallCNN()
    restored = lowbit.requantize(empty, sd, lowbit.quantization_map(model), device="cuda")
    assert torch.equal(restored(x), y)


@pytest.mark.cuda
@pytest.mark.parametrize("method,opts", [("bnb-nf4", {"double_quant": True, "compute_dtype": "bfloat16"}),
                                         ("bnb-int8", {}), ("int8-dynamic", {}), ("bf16", {})])
def test_cuda_methods_on_tiny_llama(method, opts):
    transformers, cfg = _tiny_llama()
    model = transformers.LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 128, (2, 24), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
        lowbit.quantize(model, method=method, **opts)
        y = model(ids).logits.float()
    assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.98
