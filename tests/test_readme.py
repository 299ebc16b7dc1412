"""Every ```python block of README.md runs as written (issue 17), so the README cannot drift from the code.

Each block runs in a fresh interpreter, in a temporary folder, after a prelude that binds only the names the
README leaves to the reader (the fixture mapping below); nothing in the block itself is changed:

==================  =====================================================================================
README name         bound to
==================  =====================================================================================
``torch``, ``lowbit``  imported (later blocks use them as the first blocks left them)
``model``           a tiny random ``LlamaForCausalLM`` (:func:`lowbit.model.loading.tiny_llama`, hidden 64,
                    2 layers, vocabulary 256)
``tok``             its byte-level tokenizer (:func:`lowbit.model.loading.tiny_tokenizer`)
``path``            a folder holding that model and tokenizer (``save_pretrained``)
``build_model()``   builds the same tiny architecture again (for ``requantize`` on the meta device)
``calibration_batch``  a batch of 2 x 32 token ids
``"valid.txt"``     a text file in the working folder (an English paragraph repeated)
``w = randn(4096, 4096)``  kept as written
==================  =====================================================================================
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

PRELUDE = textwrap.dedent("""
    import torch
    import lowbit
    from lowbit.model.loading import tiny_llama, tiny_tokenizer
    def build_model():
        return tiny_llama(hidden=64, layers=2, intermediate=192)
    model, tok = build_model(), tiny_tokenizer()
    path = "tiny-model"
    model.save_pretrained(path); tok.save_pretrained(path)
    calibration_batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    open("valid.txt", "w").write("The quick brown fox jumps over the lazy dog while the models are quantized. " * 1500)
""")


#: README blocks known not to run as written, by their first line: the README line to change is in the reason
KNOWN_BROKEN: dict = {}


def _blocks():
    text = README.read_text()
    out = []
    for i, m in enumerate(re.finditer(r"```python\n(.*?)```", text, re.S)):
        line = text[:m.start()].count("\n") + 1
        code = m.group(1)
        first = code.strip().splitlines()[0].strip()
        marks = [pytest.mark.xfail(reason=KNOWN_BROKEN[first], strict=True)] if first in KNOWN_BROKEN else []
        out.append(pytest.param(code, id=f"README.md:{line}", marks=marks))
    return out


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 5


@pytest.mark.parametrize("code", _blocks())
def test_readme_block_runs_as_written(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(PRELUDE + "\n# ---- README block, as written ----\n" + code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", LOWBIT_NO_CACHE="1")
    root = str(README.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{p.stderr[-3000:]}"
