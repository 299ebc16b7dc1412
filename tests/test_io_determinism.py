"""Equal checkpoints are equal bytes: safetensors writes ``__metadata__`` in a per-process hash-map order,
which lowbit rewrites in sorted key order (found by the resume test's byte comparison across processes)."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from lowbit.io._files import write_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _metadata_keys(path: Path) -> list:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return list(json.loads(raw[8:8 + n])["__metadata__"])


def test_metadata_written_in_sorted_order(tmp_path):
    meta = {"producer": "lowbit-native", "format": "pt", "b": "2", "a": "1"}
    p = write_safetensors(tmp_path / "x.safetensors", {"w": torch.arange(6.0).reshape(2, 3)}, metadata=meta)
    assert _metadata_keys(p) == sorted(meta)
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:  # still a valid file with the same metadata and tensor
        assert f.metadata() == meta and torch.equal(f.get_tensor("w"), torch.arange(6.0).reshape(2, 3))


def test_same_bytes_across_processes(tmp_path):
    code = ("import sys, torch; from lowbit.io._files import write_safetensors; "
            "write_safetensors(sys.argv[1], {'w': torch.ones(3)}, metadata={'producer': 'p', 'format': 'pt', "
            "'x': '1', 'y': '2'})")
    outs = []
    for i in range(4):
        out = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=str(ROOT))
        outs.append(out.read_bytes())
    assert all(o == outs[0] for o in outs)
