"""GPTQ and AWQ (GEMM) checkpoints: export from lowbit, import into lowbit.

References: ``shared/docs/formats-checkpoints.md`` sections 1 and 2, read from ModelCloud/GPTQModel
(``GPTQQuantLinear``, ``pack_block``, ``convert_gptq_v{1,2}_to_v{2,1}_format_module``), AutoGPTQ
(``qlinear_cuda_old.py``), vLLM (``gptq.py``, ``awq.py``) and AutoAWQ (``gemm.py``,
``packing_utils.py``).

GPTQ tensors of a Linear ``<m>`` with ``b`` bits, ``G`` groups (``W[o, i] = scales[g, o] * (q - z)``
with ``g = g_idx[i]``):

=============  =======  ====================  ===================================================
key            dtype    shape                 content
=============  =======  ====================  ===================================================
``qweight``    int32    ``[in*b/32, out]``    codes packed along ``in``, LSB first (3-bit: 32
                                              codes in 3 words)
``qzeros``     int32    ``[G, out*b/32]``     zero points packed along ``out``; v1 (``gptq``)
                                              stores ``z - 1``, v2 (``gptq_v2``) stores ``z``
``scales``     float16  ``[G, out]``
``g_idx``      int32    ``[in]``              ``i // group_size``, or the act-order group
``bias``       float16  ``[out]``             when the Linear has one
=============  =======  ====================  ===================================================

Exactness. Codes, zero points and ``g_idx`` are carried over exactly in both directions. GPTQ
scales are fp16: :func:`export_gptq` writes ``scales.half()``, which is exact when the QuantState's
scales are fp16-representable (quantize with ``scale_dtype=torch.float16``, or any state imported
from a GPTQ/AWQ checkpoint) and otherwise rounds each scale to the nearest fp16 (relative error at
most 2**-11, codes unchanged; a warning reports the largest change). :func:`load_gptq` keeps the
fp16 scales as they are, so ``export -> load`` dequantizes bit for bit like the exported state
with fp16 scales.

Symmetric checkpoints are written as v1 (``format: "gptq"``, ``qzeros`` = ``z - 1``, so 4-bit words
are all ``0x77777777``); asymmetric ones as ``gptq_v2`` (v1 cannot hold a zero point of 0 without
borrowing into the neighbouring field, and GPTQModel refuses asymmetric v1 checkpoints).
Both ``format`` and ``checkpoint_format`` are written (vLLM reads only the latter).

AWQ GEMM (4-bit only): ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` ``[G, out/8]`` packed along
``out`` in the nibble order ``[0, 2, 4, 6, 1, 3, 5, 7]``, true zero points, ``scales`` fp16
``[G, out]``, no ``g_idx``.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from lowbit.io._affine import (
    AffineWeight,
    UnsupportedWeight,
    exact_cast,
    pack_int32,
    plain_tensors,
    quantized_linears,
    unpack_int32,
)
from lowbit.io._files import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointError,
    PathLike,
    atomic_write_json,
    dedupe_tensors,
    empty_hf_model,
    hf_config_dict,
    DIR_CHECKSUMS,
    atomic_directory,
    check_dir_checksums,
    read_hf_tensors_with_origin,
    read_json_object,
    recover_interrupted,
    set_config_dtype,
    write_dir_checksums,
    torch_dtype_name,
    write_sharded,
)

__all__ = [
    "GPTQ_BITS",
    "pack_gptq",
    "unpack_gptq",
    "export_gptq",
    "read_gptq",
    "load_gptq",
    "pack_awq",
    "unpack_awq",
    "export_awq",
    "read_awq",
    "QuantizedCheckpoint",
]

logger = logging.getLogger(__name__)
from lowbit.io.gptq_packing import (  # noqa: E402,F401  (moved; importable from here as before)
    GPTQ_BITS,
    AWQ_ORDER,
    _BLOCK_RE,
    _v1_correction_word,
    pack_gptq,
    unpack_gptq,
    pack_awq,
    unpack_awq,
)
from lowbit.io.gptq_import import (  # noqa: E402,F401  (moved; importable from here as before)
    QuantizedCheckpoint,
    _open_checkpoint_dir,
    _read_config,
    _quant_config,
    _where,
    _first_line,
    _cfg_int,
    _check_qtensor,
    _check_scale_dtype,
    read_gptq,
    _dynamic_override,
    _module_group_size,
    _module_bits,
    read_awq,
    build_model,
    _config_dtype,
    load_gptq,
)

# ---------------------------------------------------------------------------------------------
# model-level export


def _require_frozen(model: nn.Module) -> None:
    from lowbit.nn import QModuleMixin

    for name, m in model.named_modules():
        if isinstance(m, QModuleMixin) and m.quantized_param_names() and not m.frozen:
            raise ValueError(f"module {name!r} is quantized but not frozen; call lowbit.freeze(model) before exporting")


def _scale_report(states: Dict[str, AffineWeight], dtype: torch.dtype, fmt: str) -> None:
    worst, where = 0.0, None
    for name, w in states.items():
        s = w.scales.float()
        if exact_cast(s, dtype):
            continue
        r = s.to(dtype).float()
        if not bool(torch.isfinite(r).all()):
            raise UnsupportedWeight(f"{name}: scales overflow {dtype} (largest {float(s.abs().max()):.4g})")
        rel = float(((r - s).abs() / s.abs().clamp_min(1e-30)).max())
        if rel > worst:
            worst, where = rel, name
    if where is not None:
        warnings.warn(f"{fmt} stores {torch_dtype_name(dtype)} scales: fp32 scales were rounded (largest relative change "
                      f"{worst:.2e}, in {where}); codes and zero points are exact. Quantize with "
                      "scale_dtype=torch.float16 for a bit-exact export.", stacklevel=3)


def _collect_affine(model: nn.Module, unsupported: str, fmt: str) -> Tuple[Dict[str, AffineWeight], Dict[str, nn.Module], Dict[str, Any]]:
    """Quantized Linears as AffineWeights, plus modules written dense (with the reason)."""
    if unsupported not in ("error", "dense"):
        raise ValueError(f"unsupported={unsupported!r}: expected 'error' or 'dense'")
    _require_frozen(model)
    weights: Dict[str, AffineWeight] = {}
    modules: Dict[str, nn.Module] = {}
    dense: Dict[str, Any] = {}
    for name, (m, st) in quantized_linears(model).items():
        if not isinstance(m, nn.Linear):
            reason = f"{type(m).__name__} is not a Linear"
        else:
            try:
                weights[name] = AffineWeight.from_state(st)
                modules[name] = m
                if getattr(m, "activations", None):
                    warnings.warn(f"{fmt} has no activation quantization: {name} is written weight-only",
                                  stacklevel=3)
                continue
            except UnsupportedWeight as e:
                reason = str(e)
        if unsupported == "error":
            raise UnsupportedWeight(f"{name}: cannot be written as {fmt}: {reason} "
                                    "(pass unsupported='dense' to write it unquantized)")
        dense[name] = (m, reason)
    return weights, modules, dense


def _dense_tensors(model: nn.Module, skip: List[str], dense: Dict[str, Any], dtype: Optional[torch.dtype]
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    sd = plain_tensors(model, list(skip) + list(dense))
    for name, (m, _) in dense.items():
        sd[f"{name}.weight"] = m.weight.detach()
        if getattr(m, "bias", None) is not None:
            sd[f"{name}.bias"] = m.bias.detach()
    sd, aliases = dedupe_tensors(sd)  # tied weights are written once (before a cast copies them apart)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    return sd, aliases


def _write_hf_dir(directory: Path, tensors: Dict[str, torch.Tensor], config: Dict[str, Any],
                  extra_json: Dict[str, Any], max_shard_size: int, tokenizer) -> Path:
    """Shards, extra JSON files, tokenizer, ``config.json``, then the checksum sidecar
    (:data:`lowbit.io._files.DIR_CHECKSUMS`), all in a temporary sibling directory that replaces
    ``directory`` atomically (files of other tools already in ``directory`` are kept)."""
    owned_json = {"config.json", "model.safetensors.index.json", DIR_CHECKSUMS, *extra_json}

    def owned(name: str) -> bool:
        return name in owned_json or (name.startswith("model") and name.endswith(".safetensors"))

    with atomic_directory(directory, owned=owned) as tmp:
        write_sharded(tmp, tensors, prefix="model", max_shard_size=max_shard_size, metadata={"format": "pt"})
        for name, obj in extra_json.items():
            atomic_write_json(tmp / name, obj)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "config.json", config)
        write_dir_checksums(tmp)
    return directory


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _exact_name_regex(name: str) -> str:
    return "^" + re.escape(name) + "$"


def export_gptq(model: nn.Module, directory: PathLike, *, checkpoint_format: Optional[str] = None,
                dtype: Optional[torch.dtype] = torch.float16, unsupported: str = "error", tokenizer=None,
                max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a frozen lowbit model as a GPTQ checkpoint directory (Hugging Face layout).

    Every lowbit Linear holding an integer affine QuantState (2, 3, 4 or 8 bits, sym or asym,
    group / channel / tensor layout) becomes ``qweight/qzeros/scales/g_idx(/bias)``; the rest of the
    model is written as is. ``config.json`` gets the ``quantization_config`` and
    ``quantize_config.json`` the same dict; the most common (bits, group size) is the global one and
    other layers get ``dynamic`` overrides (GPTQModel / vLLM), unquantized Linears inside the blocks
    a ``"-:"`` (skip) entry.

    Args:
        checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``; default v1 when every layer is
            symmetric, else v2 (asymmetric v1 is refused, see the module docstring).
        dtype: dtype of the unquantized tensors and biases (fp16 as GPTQ writers do; None keeps them).
        unsupported: ``"error"`` (default) or ``"dense"``: what to do with quantized modules GPTQ cannot
            hold (NF4, fp8, shapes not multiple of 32): raise, or write their dequantized weight.
        tokenizer: saved beside the weights when given.

    Returns:
        The directory.

    Example::

        >>> export_gptq(model, "out/gptq")                # doctest: +SKIP
    """
    weights, modules, dense = _collect_affine(model, unsupported, "GPTQ")
    if not weights:
        raise ValueError("the model has no integer-quantized Linear layer to write as GPTQ")
    for name, w in list(weights.items()):
        try:
            if w.bits not in GPTQ_BITS or w.shape[0] % 32 or w.shape[1] % 32:
                raise UnsupportedWeight(f"{w.bits}-bit weight of shape {w.shape}: GPTQ needs {GPTQ_BITS} bits and "
                                        "in/out features that are multiples of 32")
        except UnsupportedWeight as e:
            if unsupported == "error":
                raise UnsupportedWeight(f"{name}: {e} (pass unsupported='dense' to write it unquantized)") from None
            dense[name] = (modules.pop(name), str(e))
            del weights[name]
    all_sym = all(w.symmetric for w in weights.values())
    fmt = checkpoint_format or ("gptq" if all_sym else "gptq_v2")
    if fmt == "gptq" and not all_sym:
        raise UnsupportedWeight("asymmetric weights cannot be written as GPTQ v1 (checkpoint_format='gptq'); "
                                "use 'gptq_v2'")
    _scale_report(weights, torch.float16, "GPTQ")

    tensors: Dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for k, v in pack_gptq(w, fmt).items():
            tensors[f"{name}.{k}"] = v
        bias = getattr(modules[name], "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to(dtype or bias.dtype)
    plain, _aliases = _dense_tensors(model, list(weights), dense, dtype)
    tensors.update(plain)

    def gsize(name: str, w: AffineWeight) -> int:
        return -1 if w.group_size >= w.shape[1] else w.group_size

    keys = {n: (w.bits, gsize(n, w)) for n, w in weights.items()}
    bits, group_size = _most_common(keys.values())
    dynamic: Dict[str, Dict[str, Any]] = {}
    for n, (b, g) in keys.items():
        if (b, g) != (bits, group_size):
            dynamic["+:" + _exact_name_regex(n)] = {"bits": b, "group_size": g}
    for n, (m, reason) in dense.items():
        dynamic["-:" + _exact_name_regex(n)] = {}
    for n, m in model.named_modules():
        if type(m) is nn.Linear and _BLOCK_RE.match(n) and n not in weights:
            dynamic.setdefault("-:" + _exact_name_regex(n), {})
    in_block = sorted({_BLOCK_RE.match(n).group(2) for n in weights if _BLOCK_RE.match(n)})
    import lowbit

    qcfg: Dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": any(not w.has_trivial_g_idx() for w in weights.values()),
        "sym": all_sym,
        "format": fmt,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "static_groups": False,
        "true_sequential": True,
        "lm_head": any(not _BLOCK_RE.match(n) and n.endswith("lm_head") for n in weights),
        "meta": {"quantizer": [f"lowbit:{lowbit.__version__}"]},
    }
    if dynamic:
        qcfg["dynamic"] = dynamic
    if in_block:
        qcfg["modules_in_block_to_quantize"] = [in_block]
    cfg = hf_config_dict(model) or {}
    if dtype is not None:
        set_config_dtype(cfg, dtype)
    cfg["quantization_config"] = qcfg
    return _write_hf_dir(Path(directory), tensors, cfg, {"quantize_config.json": qcfg}, max_shard_size, tokenizer)


def export_awq(model: nn.Module, directory: PathLike, *, dtype: Optional[torch.dtype] = torch.float16,
               unsupported: str = "error", tokenizer=None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write a frozen lowbit model with 4-bit group weights as an AWQ GEMM checkpoint (AutoAWQ layout).

    All quantized layers must share one group size (AWQ's config has no per-layer override);
    symmetric layers are written with their implicit zero point 8 stored in ``qzeros``.

    Example::

        >>> export_awq(model, "out/awq")                  # doctest: +SKIP
    """
    weights, modules, dense = _collect_affine(model, unsupported, "AWQ")
    if not weights:
        raise ValueError("the model has no integer-quantized Linear layer to write as AWQ")
    sizes = {w.group_size for w in weights.values()}
    if len(sizes) != 1:
        raise UnsupportedWeight(f"AWQ needs one group size for every layer, got {sorted(sizes)}")
    _scale_report(weights, torch.float16, "AWQ")
    tensors: Dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for k, v in pack_awq(w).items():
            tensors[f"{name}.{k}"] = v
        bias = getattr(modules[name], "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to(dtype or bias.dtype)
    plain, _ = _dense_tensors(model, list(weights), dense, dtype)
    tensors.update(plain)
    not_converted = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear and n not in weights)
    qcfg = {"quant_method": "awq", "zero_point": True, "group_size": sizes.pop(), "bits": 4, "version": "gemm",
            "modules_to_not_convert": not_converted or None}
    cfg = hf_config_dict(model) or {}
    if dtype is not None:
        set_config_dtype(cfg, dtype)
    cfg["quantization_config"] = qcfg
    return _write_hf_dir(Path(directory), tensors, cfg, {}, max_shard_size, tokenizer)


# ---------------------------------------------------------------------------------------------
# the export format registry (lowbit.io.registry)


def _write_gptq_format(model: nn.Module, path: Path, options) -> Dict[str, Any]:
    from lowbit.io.registry import directory_size

    if options.from_states:
        p = export_gptq(model, path, tokenizer=options.tokenizer, unsupported=options.unsupported)
    else:  # a model without lowbit-quantized Linears (as the CLI always wrote it)
        p = export_gptq(model, path)
    return {"path": str(p), "bytes": directory_size(p)}


def _write_awq_format(model: nn.Module, path: Path, options) -> Dict[str, Any]:
    from lowbit.io.registry import directory_size

    p = export_awq(model, path, tokenizer=options.tokenizer, unsupported=options.unsupported)
    return {"path": str(p), "bytes": directory_size(p)}


def _detector(method: str):
    def detect(path: Path) -> bool:
        from lowbit.io.registry import hf_quantization_config

        qc = hf_quantization_config(path)
        return bool(qc) and qc.get("quant_method") == method

    return detect


def load_awq(directory: PathLike, *, dtype: Optional[torch.dtype] = None,
             device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Import an AWQ (GEMM) checkpoint into lowbit: a model whose quantized Linears are frozen ``QLinear``s."""
    return build_model(read_awq(directory), dtype=dtype, device=device)


from lowbit.io.registry import register_format  # noqa: E402

register_format("gptq", write=_write_gptq_format, read=load_gptq, detect=_detector("gptq"), target="gptq",
                description="GPTQ (AutoGPTQ / GPTQModel / transformers): qweight, qzeros, scales, g_idx")
register_format("awq", write=_write_awq_format, read=load_awq, detect=_detector("awq"), target="awq",
                description="AWQ GEMM (AutoAWQ layout), 4-bit groups")
