"""Atomic checkpoint writes: a save killed at any moment leaves the target absent, the previous
checkpoint or the new one (never a half-written directory that loads), the next save removes the
leftovers, and unrelated files in a checkpoint directory survive an overwrite."""
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lowbit  # noqa: E402
from lowbit.io import _files, native  # noqa: E402
from lowbit.io._files import CheckpointError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability_files as R  # noqa: E402


@pytest.fixture(scope="module")
def models():
    return R.quantized_model(1), R.quantized_model(2)


def _logits(m):
    with torch.no_grad():
        return m(R.IDS).logits


def _leftovers(target: Path):
    return R._siblings_and_temps(target)


def test_overwrite_keeps_foreign_files_and_drops_old_shards(tmp_path, models):
    old, new = models
    d = tmp_path / "ck"
    native.save(old, d, max_shard_size=20_000)  # several shards
    (d / "tokenizer.json").write_text("{}")
    (d / "notes").mkdir()
    (d / "notes" / "a.txt").write_text("keep me")
    (d / ".lowbit_model.safetensors.x1y2.tmp").write_bytes(b"legacy temp file of an old version")
    native.save(new, d)  # one shard now
    assert (d / "tokenizer.json").read_text() == "{}" and (d / "notes" / "a.txt").read_text() == "keep me"
    shards = sorted(p.name for p in d.glob("lowbit_model*.safetensors"))
    assert shards == ["lowbit_model.safetensors"]
    assert not (d / ".lowbit_model.safetensors.x1y2.tmp").exists()
    assert torch.equal(_logits(native.load(d)), _logits(new))
    assert _leftovers(d) == []


def test_interrupted_swap_fallback_recovers_previous(tmp_path, models, monkeypatch):
    """Without renameat2(RENAME_EXCHANGE), a kill between the two renames leaves no target: load restores it."""
    old, new = models
    d = tmp_path / "ck"
    native.save(old, d)
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # target -> .old done, .new -> target not yet: "killed" here
            raise KeyboardInterrupt("killed between the renames")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        native.save(new, d)
    monkeypatch.setattr(os, "rename", real)
    assert not d.exists() and any(".lowbit-old-" in p.name for p in tmp_path.iterdir())
    m = native.load(d)  # restores the previous checkpoint (with a warning) and loads it
    assert torch.equal(_logits(m), _logits(old))
    native.save(new, d)
    assert torch.equal(_logits(native.load(d)), _logits(new))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_stale_temporary_dirs_of_dead_processes_are_removed(tmp_path, models):
    old, _ = models
    d = tmp_path / "ck"
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".ck.lowbit-new-{dead}-deadbeef"
    stale.mkdir()
    (stale / "lowbit_model.safetensors").write_bytes(b"half written")
    live = tmp_path / f".ck.lowbit-new-{os.getppid()}-cafebabe"  # a live process: left alone
    live.mkdir()
    native.save(old, d)
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("fmt", ["native", "gptq", "gguf"])
def test_sigkill_during_save_and_overwrite(tmp_path, models, fmt):
    """5 SIGKILLs at random moments (fresh and overwrite): target absent / previous / new, never broken;
    the next save leaves no temporary file."""
    tok = R.tokenizer() if fmt == "gguf" else None
    if fmt == "gguf":
        old, new = R.float_model(1, vocab=len(tok)), R.float_model(2, vocab=len(tok))
    else:
        old, new = models
    refs = {}
    for which, m in (("old", old), ("new", new)):
        p = tmp_path / f"ref-{which}" / ("m.gguf" if fmt == "gguf" else "ck")
        p.parent.mkdir()
        t0 = time.perf_counter()
        R.write(fmt, m, p, tok)
        dt = time.perf_counter() - t0
        refs[which] = R.fingerprint(fmt, p)[0]
    rnd = __import__("random").Random(0)
    for i in range(5):
        target = tmp_path / f"k{i}" / ("m.gguf" if fmt == "gguf" else "ck")
        target.parent.mkdir()
        overwrite = i % 2 == 1
        if overwrite:
            R.write(fmt, old, target, tok)
        pid = os.fork()
        if pid == 0:
            try:
                R.write(fmt, new, target, tok)
            finally:
                os._exit(0)
        time.sleep(rnd.uniform(0, dt * 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _files.recover_interrupted(target)
        if not target.exists():
            assert not overwrite, "the previous checkpoint was lost"
        else:
            got = R.fingerprint(fmt, target)[0]
            assert torch.equal(got, refs["new"]) or (overwrite and torch.equal(got, refs["old"]))
        R.write(fmt, new, target, tok)
        assert _leftovers(target) == [], _leftovers(target)


def test_gguf_sidecar_matches_at_every_step(tmp_path):
    """The sidecar accepts the old and the new digest while the file is being replaced."""
    a = tmp_path / "a.bin"
    a.write_bytes(b"old")
    side = _files.file_checksum_path(a)
    side.write_text(f"{_files.sha256_bytes(b'old')}  a.bin\n")
    tmp = tmp_path / "new.tmp"
    tmp.write_bytes(b"new")
    cm = _files.replacing_file_with_checksum(a, tmp)
    cm.__enter__()
    assert _files.check_file_checksum(a)  # killed here: old file, sidecar lists both
    cm.__exit__(None, None, None)
    assert a.read_bytes() == b"new" and _files.check_file_checksum(a)
    assert len(_files.parse_checksums(side)["a.bin"]) == 1
    a.write_bytes(b"neW")
    with pytest.raises(CheckpointError, match="a.bin: sha256 does not match a.bin.lowbit-sha256"):
        _files.check_file_checksum(a)


def test_save_refuses_a_file_target(tmp_path, models):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        lowbit.save(models[0], f)
    assert f.read_text() == "x"


def test_save_into_the_current_directory(tmp_path, models, monkeypatch):
    d = tmp_path / "cwd"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    monkeypatch.chdir(d)
    lowbit.save(models[0], ".")
    lowbit.save(models[1], ".")
    assert Path.cwd() == d and (d / "keep.txt").read_text() == "x"
    assert torch.equal(_logits(lowbit.load(".")), _logits(models[1]))
