"""Every CLI misuse exits non-zero with one line naming the problem; the CLI never writes where it was not told
to (the current directory, the repository's tracked bench/results), leaves nothing behind when it fails, and
its cache is bounded and cleanable (issue 17)."""
import json
import os
from pathlib import Path

import pytest

from lowbit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("misuse")
    tiny_llama(hidden=64, layers=2, intermediate=192).save_pretrained(d / "tiny")
    tiny_tokenizer().save_pretrained(d / "tiny")
    (d / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return d


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and err[-1].startswith("lowbit: error:"), err
    return err[-1]


def test_plan_unknown_method_is_an_error(tiny, capsys):
    rc = main(["plan", "--model", str(tiny / "tiny"), "--method", "foo"])
    assert "unknown method 'foo'" in _one_line_error(capsys, rc)


def test_compare_without_methods_is_an_error(tiny, capsys):
    for methods, needle in (("", "names no method"), (" , ", "names no method"), ("fp32", "only the float baseline")):
        rc = main(["compare", "--model", str(tiny / "tiny"), "--methods", methods, "--quiet"])
        assert needle in _one_line_error(capsys, rc)


def test_group_size_rules(tiny, tmp_path, capsys):
    rc = main(["quantize", "--model", str(tiny / "tiny"), "--method", "rtn", "--group-size", "0",
               "--output", str(tmp_path / "g0"), "--quiet"])
    assert "--group-size 0" in _one_line_error(capsys, rc)
    assert not (tmp_path / "g0").exists()
    rc = main(["quantize", "--model", str(tiny / "tiny"), "--method", "rtn", "--group-size", "7",
               "--output", str(tmp_path / "g7"), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "lowbit: warning: --group-size 7" in err and "bits/weight" in err
    measured = json.loads((tmp_path / "g7" / "lowbit_run.json").read_text())["bits_per_weight"]
    assert f"{measured:.2f} bits/weight" in err  # the measured cost is announced too


def test_failed_quantize_leaves_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "a" / "b"
    # nf4 has no compressed-tensors form: the run fails after the output folder was made
    rc = main(["quantize", "--model", str(tiny / "tiny"), "--method", "nf4", "--format", "compressed-tensors",
               "--output", str(out), "--quiet"])
    assert "nf4" in _one_line_error(capsys, rc)
    assert not (tmp_path / "a").exists()
    # an existing folder is left as it was
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("x")
    rc = main(["quantize", "--model", str(tiny / "tiny"), "--method", "nf4", "--format", "compressed-tensors",
               "--output", str(keep), "--quiet"])
    assert rc == 2 and sorted(p.name for p in keep.iterdir()) == ["mine.txt"]


def test_convert_reason_is_given_in_one_line(tiny, tmp_path, capsys):
    q = tmp_path / "rtn"  # asymmetric groups of 64: not on a GGUF grid (blocks of 32, fp16 d/m)
    assert main(["quantize", "--model", str(tiny / "tiny"), "--method", "rtn", "--asym", "--group-size", "64",
                 "--output", str(q), "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["convert", "--input", str(q), "--output", str(tmp_path / "x.gguf")])
    line = _one_line_error(capsys, rc)
    assert "cannot be converted losslessly" in line
    assert not line.rstrip().endswith(":")  # the reason itself, not a cut-off header
    assert "model.layers.0" in line and "more)" in line


def test_compare_never_writes_into_the_current_directory(tiny, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc = main(["compare", "--model", str(tiny / "tiny"), "--methods", "rtn", "--group-size", "32",
               "--dataset", str(tiny / "text.txt"), "--max-windows", "2", "--seq-len", "32"])
    assert rc == 0
    assert list(cwd.iterdir()) == []
    err = capsys.readouterr().err
    where = Path(err.split("compare.md and compare.png go to ")[1].split()[0])
    assert (where / "compare.md").is_file()


def test_bench_never_rewrites_tracked_results(tmp_path, capsys):
    tracked = ROOT / "bench" / "results" / "schemes.md"
    if not (ROOT / "bench" / "schemes.py").exists():
        pytest.skip("no bench/ in this checkout")
    before = tracked.read_bytes() if tracked.exists() else None
    rc = main(["bench", "--output-dir", str(tmp_path / "b"), "schemes", "--size", "64"])
    assert rc == 0
    assert (tmp_path / "b" / "schemes.md").is_file()
    assert (tracked.read_bytes() if tracked.exists() else None) == before
    assert "results go to" in capsys.readouterr().err


def test_cache_show_clear_and_cap(tmp_path, monkeypatch, capsys):
    from lowbit.model import cache

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "c"))
    entries = []
    for i, size in enumerate((3000, 2000, 1000)):
        e = tmp_path / "c" / "gguf-plain" / f"m{i}-1-2-tf5"
        e.mkdir(parents=True)
        (e / "model.safetensors").write_bytes(b"\0" * size)
        (e / "COMPLETE").write_text("ok\n")
        os.utime(e / "COMPLETE", (1000 + i, 1000 + i))  # m0 is the least recently used
        entries.append(e)
    assert main(["cache", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["bytes"] >= 6000 and len(shown["entries"]) == 3
    # the cap evicts least recently used entries first, never the one just written
    monkeypatch.setenv("LOWBIT_CACHE_MAX_GB", str(4500 / 2 ** 30))
    cache.touch_cache_entry(entries[0])  # m0 used just now: m1 is now the oldest
    removed = cache.enforce_cache_limit(keep=entries[2])
    assert removed == [str(entries[1])]
    assert entries[0].exists() and entries[2].exists()
    assert main(["cache", "--clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert cache.cache_entries() == []
