"""Resume: `lowbit quantize` killed with SIGKILL after a random block, then `--resume`, writes byte-identical files."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

# the CLI, with every checkpoint followed by a pause so that the kill lands between two blocks
SLOW = ("import sys, time\n"
        "from lowbit.model import resume\n"
        "orig = resume.BlockCheckpoints.save\n"
        "def save(self, *a, **k):\n"
        "    orig(self, *a, **k)\n"
        "    time.sleep(0.4)\n"
        "resume.BlockCheckpoints.save = save\n"
        "from lowbit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")


def _argv(model, out, *extra):
    return ["quantize", "--model", str(model), "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym",
            "--output", str(out), "--n-samples", "6", "--calib-seq-len", "32", "--micro-batch", "4", "--quiet", *extra]


def _files(d: Path):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "lowbit_run.json"}


def test_kill9_then_resume_is_byte_identical(tmp_path):
    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    model = tmp_path / "tiny"
    tiny_llama(hidden=64, layers=5).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ref = tmp_path / "ref"
    p = subprocess.run([sys.executable, "-m", "lowbit", *_argv(model, ref)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (ref / ".lowbit-checkpoint").exists()  # removed once the run completed

    out = tmp_path / "out"
    kill_after = random.Random().randrange(0, 4)  # a random block of 0..3 (of 5)
    proc = subprocess.Popen([sys.executable, "-c", SLOW, *_argv(model, out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    prog = out / ".lowbit-checkpoint" / "progress.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(prog.read_text())["done"] >= kill_after:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before block {kill_after} was killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(prog.read_text())["done"]
    assert done < 4 and not (out / "model.safetensors").exists()

    p = subprocess.run([sys.executable, "-m", "lowbit", *_argv(model, out, "--resume")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _files(ref), _files(out)
    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    for name in a:
        assert a[name] == b[name], name
    assert not (out / ".lowbit-checkpoint").exists()


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    import torch

    from lowbit.model.loading import tiny_llama
    from lowbit.model.sequential import quantize_model_ptq

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    ck = tmp_path / "ck"
    from lowbit.model import resume

    orig = resume.BlockCheckpoints.finish
    resume.BlockCheckpoints.finish = lambda self: None  # keep the checkpoint of a finished run
    try:
        quantize_model_ptq(tiny_llama(layers=2), method="gptq", bits=4, group_size=32, calib_dataset=ids,
                           progress=False, checkpoint_dir=str(ck))
    finally:
        resume.BlockCheckpoints.finish = orig
    with pytest.raises(ValueError, match="different run"):
        quantize_model_ptq(tiny_llama(layers=2), method="gptq", bits=3, group_size=32, calib_dataset=ids,
                           progress=False, checkpoint_dir=str(ck), resume=True)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        quantize_model_ptq(tiny_llama(layers=2), method="gptq", calib_dataset=ids, resume=True)
