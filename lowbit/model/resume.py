"""Per-block checkpoints of the calibrated pipeline, so that an interrupted run resumes.

After block ``i`` is quantized, :class:`BlockCheckpoints` writes, each file to a temporary name
then ``os.replace``-d into place (atomic on POSIX):

* ``block_<i>.pt``: the block's quantized states and its other tensors (norm weights after AWQ's
  folding), written by rank 0;
* ``acts_<i>_r<rank>.pt``: this rank's next-block inputs (one record per micro-batch);
* ``progress.json``: ``{"done": i, "fingerprint": ...}``, written last; then the previous block's
  activations are removed.

``load`` restores blocks ``0..done`` into the model and returns the saved activations, so the run
goes on from block ``done + 1`` with exactly the tensors the uninterrupted run had: the result is
bit-identical. The fingerprint (method, options, samples, micro-batch, world size, the token ids,
the model's tensor names and shapes) must match, else a ``ValueError`` names the directory.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BlockCheckpoints:
    def __init__(self, directory: str, fingerprint: str) -> None:
        from lowbit.model.distributed import rank_world

        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.rank, self.world = rank_world()
        self.dir.mkdir(parents=True, exist_ok=True)

    def _progress(self) -> Optional[Dict[str, Any]]:
        p = self.dir / "progress.json"
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def save(self, index: int, block: nn.Module, prefix: str, states: Dict[str, Any], acts: List[Any]) -> None:
        from lowbit.model.distributed import barrier

        if self.rank == 0:
            quantized = {n[len(prefix):] for n in states}
            other = {k: v.detach().cpu() for k, v in block.state_dict().items()
                     if not any(k == q or k.startswith(q + ".") for q in quantized)}
            _atomic_save({"index": index, "states": {n: s.to("cpu") for n, s in states.items()}, "other": other},
                         self.dir / f"block_{index}.pt")
        _atomic_save([_cpu(a) for a in acts], self.dir / f"acts_{index}_r{self.rank}.pt")
        barrier()
        if self.rank == 0:
            tmp = self.dir / "progress.json.tmp"
            tmp.write_text(json.dumps({"done": index, "fingerprint": self.fingerprint, "world": self.world}))
            os.replace(tmp, self.dir / "progress.json")
        barrier()
        old = self.dir / f"acts_{index - 1}_r{self.rank}.pt"
        if old.exists():
            old.unlink()

    def load(self, model: nn.Module, blocks: nn.ModuleList, blocks_name: str, selected: Dict[str, nn.Linear],
             states: Dict[str, Any]) -> Optional[Tuple[int, List[Any]]]:
        """Restore the finished blocks; ``(next block index, activations)`` or None (nothing to resume)."""
        from lowbit.model.sequential import _install

        prog = self._progress()
        if prog is None:
            return None
        if prog.get("fingerprint") != self.fingerprint:
            raise ValueError(f"checkpoint {str(self.dir)!r} was written by a different run (other model, method, "
                             f"options, samples, micro-batch or number of processes); delete it or drop resume")
        done = int(prog["done"])
        for i in range(done + 1):
            path = self.dir / f"block_{i}.pt"
            if not path.is_file():
                raise ValueError(f"checkpoint {str(self.dir)!r} lacks {path.name} (block {i}); delete it")
            rec = torch.load(path, map_location="cpu", weights_only=False)
            block = blocks[i]
            dev = next(block.parameters()).device
            prefix = f"{blocks_name}.{i}." if blocks_name else f"{i}."
            missing = block.load_state_dict(rec["other"], strict=False)
            del missing
            for n, st in rec["states"].items():
                lin = selected[n]
                st = st.to(dev)
                _install(model, n, lin, st)
                states[n] = st
            del prefix
        apath = self.dir / f"acts_{done}_r{self.rank}.pt"
        if not apath.is_file():
            raise ValueError(f"checkpoint {str(self.dir)!r} lacks {apath.name}; delete it")
        acts = torch.load(apath, map_location="cpu", weights_only=False)
        return done + 1, acts

    def finish(self) -> None:
        """The run completed: remove the checkpoints."""
        from lowbit.model.distributed import barrier

        barrier()
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, tuple):
        return tuple(_cpu(o) for o in obj)
    if isinstance(obj, list):
        return [_cpu(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return obj


__all__ = ["BlockCheckpoints"]
