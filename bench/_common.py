"""Helpers shared by the benchmark scripts under ``bench/`` (run as scripts: this folder is on sys.path)."""
from __future__ import annotations


def n_params(model) -> int:
    """Parameters of ``model``, tied ones counted once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
