"""Model size in memory and on disk, and bits per weight.

* :func:`model_size_bytes`: parameters + buffers at their true storage size (packed ``uint8``
  codes count one byte each), each tensor counted once (tied embeddings, shared buffers), plus
  the tensors of QuantStates held outside parameters and buffers (lowbit's frozen modules keep
  them in ``.qstate`` / ``.quant_states()``).
* :func:`bits_per_weight`: ``8 * bytes / weights`` over the quantized linear weights, scales,
  zero points and nested scale states included (``QuantState.nbytes``; shared codebooks are not
  counted, as in bitsandbytes). A model without quantized modules reports the float width of its
  ``nn.Linear`` weights (32 or 16).
* :func:`dir_size_bytes`: bytes of the files under a folder (a checkpoint on disk).

Example::

    >>> import torch
    >>> m = torch.nn.Linear(64, 32, bias=False)
    >>> model_size_bytes(m), bits_per_weight(m)
    (8192, 32.0)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator, Tuple, Union

import torch
from torch import nn


def _tensor_key(t: torch.Tensor) -> Tuple:
    """Identity of a tensor's memory: tied weights and repeated buffers share it."""
    if t.device.type == "meta":
        return ("id", id(t))
    try:
        return ("ptr", t.data_ptr(), t.numel(), t.dtype, t.device.type, t.device.index)
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain data pointer
        return ("id", id(t))


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _state_tensors(state) -> Iterator[torch.Tensor]:
    """Every tensor of a QuantState (or a dict of them), nested states included, codebooks excluded."""
    if isinstance(state, dict):
        for s in state.values():
            yield from _state_tensors(s)
        return
    for f in ("data", "scales", "zeros"):
        t = getattr(state, f, None)
        if isinstance(t, torch.Tensor):
            yield t
    nested = getattr(state, "nested", None)
    if nested is not None:
        yield from _state_tensors(nested)


def quant_states(model: nn.Module) -> Iterator[Tuple[str, object]]:
    """``(qualified name, QuantState)`` for every quantized weight of ``model``.

    Uses ``module.quant_states()`` when a module has it (several quantized parameters), else
    ``module.qstate`` (anything with ``.nbytes`` and ``.shape``).
    """
    for name, mod in model.named_modules():
        states = None
        getter = getattr(mod, "quant_states", None)
        if callable(getter):
            states = getter()
        else:
            st = getattr(mod, "qstate", None)
            if st is not None:
                states = {"weight": st}
        if not states:
            continue
        for pname, st in states.items():
            if st is not None and hasattr(st, "nbytes") and hasattr(st, "shape"):
                yield (f"{name}.{pname}" if name else pname), st


def model_size_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``: unique parameters and buffers plus out-of-band QuantState tensors.

    Example::

        >>> model_size_bytes(torch.nn.Embedding(10, 4))
        160
    """
    seen = set()
    total = 0
    tensors = list(model.parameters()) + list(model.buffers())
    for _, st in quant_states(model):
        tensors.extend(_state_tensors(st))
    for t in tensors:
        key = _tensor_key(t)
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(t)
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def bits_per_weight(model: nn.Module, include_unquantized: bool = False) -> float:
    """Average storage bits per weight element of the quantized linear weights.

    ``include_unquantized=True`` averages over all ``nn.Linear`` weights instead (float ones at
    their dtype's width), e.g. to include a float ``lm_head``. A model with no quantized weight
    reports the width of its float linear weights.

    Example::

        >>> bits_per_weight(torch.nn.Linear(8, 8).half())
        16.0
    """
    q_bits = 0
    q_numel = 0
    quantized_modules = set()
    for name, st in quant_states(model):
        q_bits += 8 * int(st.nbytes)
        q_numel += _numel(st.shape)
        quantized_modules.add(name.rsplit(".", 1)[0] if "." in name else "")
    f_bits = 0
    f_numel = 0
    if include_unquantized or q_numel == 0:
        for name, mod in model.named_modules():
            if name in quantized_modules or not isinstance(mod, nn.Linear):
                continue
            w = mod._parameters.get("weight")
            if isinstance(w, torch.Tensor) and w.is_floating_point():
                f_bits += 8 * _tensor_bytes(w)
                f_numel += w.numel()
    bits, numel = q_bits + f_bits, q_numel + f_numel
    if numel == 0:
        raise ValueError(f"{type(model).__name__} has no linear weights (quantized or float) to measure")
    return bits / numel


def size_report(model: nn.Module) -> Dict[str, float]:
    """``{"size_bytes", "bits_per_weight", "n_quantized"}`` in one call."""
    n_q = sum(1 for _ in quant_states(model))
    return {"size_bytes": model_size_bytes(model), "bits_per_weight": bits_per_weight(model),
            "n_quantized": n_q}


def dir_size_bytes(path: Union[str, os.PathLike]) -> int:
    """Total bytes of the regular files under ``path`` (or of ``path`` itself if it is a file).

    Symbolic links are not followed (a checkpoint's size is what it stores).

    Example::

        >>> dir_size_bytes("/definitely/missing")   # doctest: +SKIP
        FileNotFoundError: ...
    """
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is neither a file nor a folder")
    total = 0
    for root, _dirs, files in os.walk(p, followlinks=False):
        for f in files:
            fp = os.path.join(root, f)
            if not os.path.islink(fp):
                total += os.stat(fp).st_size
    return total
