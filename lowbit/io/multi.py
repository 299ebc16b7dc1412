"""One quantized model, several checkpoint formats: native, GGUF, compressed-tensors, GPTQ.

:func:`export_all` writes each requested format from the *same* QuantStates, so the files agree
with each other wherever the formats allow it:

* ``native``: :func:`lowbit.io.native.save` (bit-exact).
* ``compressed-tensors``: :func:`lowbit.io.compressed_tensors.export_compressed_tensors` (exact).
* ``gptq``: :func:`lowbit.io.gptq.export_gptq` (codes exact; scales as fp16).
* ``gguf``: :func:`lowbit.io.gguf.export_gguf` (the GGUF engineer's writer) given, for every
  quantized Linear, the exact GGUF blocks of its integer weight (:func:`lowbit.io.convert.affine_to_gguf`):
  no re-rounding of the codes. A weight with no exact GGUF form (scales that are not fp16 numbers,
  groups that are not multiples of 32, ...) is, by ``gguf_fallback``: written from the same codes
  with fp16-rounded scales (``"round_scales"``, the default: the same numbers the GPTQ export
  holds), re-quantized from its dequantized values with ``gguf_type`` (``"requantize"``), or
  refused (``"error"``). The report says which weight got which treatment.

Example::

    >>> report = export_all(model, "out", ["native", "gguf", "compressed-tensors", "gptq"], tokenizer=tok)  # doctest: +SKIP
    >>> report["gguf"]["exact"]                                                                          # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from lowbit.io._affine import AffineWeight, UnsupportedWeight, plain_tensors, quantized_linears
from lowbit.io._files import PathLike, hf_config_dict

__all__ = ["export_all", "gguf_quant_states", "FORMATS"]

logger = logging.getLogger(__name__)

FORMATS = ("native", "gguf", "compressed-tensors", "gptq")
GGUF_FALLBACKS = ("round_scales", "requantize", "error")


def gguf_quant_states(model: nn.Module, gguf_type: str = "auto", fallback: str = "round_scales"):
    """``(quant_states for export_gguf, {weight name: how})`` for the quantized Linears of ``model``.

    ``how`` is ``"exact"``, ``"exact (gguf state)"``, ``"rounded scales"`` or ``"requantized: <reason>"``.
    """
    from lowbit.io.convert import NotLossless, affine_to_gguf

    if fallback not in GGUF_FALLBACKS:
        raise ValueError(f"gguf_fallback={fallback!r}: expected one of {GGUF_FALLBACKS}")
    states: Dict[str, Any] = {}
    how: Dict[str, str] = {}
    for name, (m, st) in quantized_linears(model).items():
        key = f"{name}.weight"
        if st.layout == "gguf":
            states[key] = st
            how[key] = "exact (gguf state)"
            continue
        try:
            w = AffineWeight.from_state(st)
            states[key] = affine_to_gguf(w, gguf_type).as_quant_state_entry()
            how[key] = "exact"
            continue
        except NotLossless as e:
            reason = str(e)
            if fallback == "round_scales":
                try:
                    states[key] = affine_to_gguf(w, gguf_type, round_scales=True).as_quant_state_entry()
                    how[key] = "rounded scales"
                    continue
                except NotLossless as e2:
                    reason = str(e2)
        except UnsupportedWeight as e:
            reason = str(e)
        if fallback == "error":
            raise UnsupportedWeight(f"{key}: no exact GGUF form: {reason}")
        how[key] = f"requantized: {reason.splitlines()[0][:200]}"
    return states, how


def _dense_hf_model(model: nn.Module, keep_quantized: Dict[str, Any]) -> nn.Module:
    """A plain Hugging Face copy of ``model``: dequantized weights for modules not in ``keep_quantized``
    (which get meta placeholders, their GGUF blocks being supplied separately)."""
    from lowbit.io.convert import _hf_model_for_gguf

    cfg = hf_config_dict(model)
    if cfg is None:
        raise ValueError("GGUF export needs a Hugging Face (Llama) model with a config")
    quantized = quantized_linears(model)
    dense = plain_tensors(model, list(quantized))
    metas = {}
    for name, (m, st) in quantized.items():
        key = f"{name}.weight"
        if key in keep_quantized:
            metas[key] = tuple(st.shape)
        else:
            dense[key] = m.weight.detach()
        if getattr(m, "bias", None) is not None:
            dense[f"{name}.bias"] = m.bias.detach()
    dense = {k: v for k, v in dense.items() if not k.endswith("input_scale")}
    return _hf_model_for_gguf(cfg, dense, metas)


def export_all(model: nn.Module, directory: PathLike, formats: Sequence[str] = FORMATS, *, tokenizer=None,
               gguf_type: str = "auto", gguf_fallback: str = "round_scales", gguf_requantize_type: str = "Q4_0",
               tokenizer_pre: Optional[str] = None, unsupported: str = "error") -> Dict[str, Any]:
    """Write a frozen lowbit model in several formats under ``directory``.

    Layout: ``native/``, ``model.gguf``, ``compressed-tensors/``, ``gptq/``.

    Args:
        formats: any registered format (:func:`lowbit.io.registry.format_names`: :data:`FORMATS`, ``awq``,
            ``sparse24``, and formats registered from outside); a comma-separated string works too.
        tokenizer: a Hugging Face tokenizer, saved with the directory formats and embedded in the GGUF.
        gguf_type: ``"auto"`` (smallest exact type per weight) or one GGUF type for the quantized weights.
        gguf_fallback: see the module docstring.
        gguf_requantize_type: type of re-quantized weights and of the unquantized 2-D tensors in the GGUF
            (``"F16"`` keeps those unquantized).
        unsupported: ``"error"`` or ``"dense"``, passed to the GPTQ and compressed-tensors exporters.

    Returns:
        ``{format: {"path", "bytes", ...}}``; the ``gguf`` entry has ``"treatment"`` per weight.
    """
    from lowbit.io.registry import ExportOptions, write_formats

    options = ExportOptions(tokenizer=tokenizer, from_states=True, gguf_type=gguf_type, gguf_fallback=gguf_fallback,
                            gguf_requantize_type=gguf_requantize_type, tokenizer_pre=tokenizer_pre,
                            unsupported=unsupported)
    return write_formats(model, directory, formats, options=options)


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
