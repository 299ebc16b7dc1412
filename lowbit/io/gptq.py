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

GPTQ_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output channel 8c + AWQ_ORDER[i]
_BLOCK_RE = re.compile(r"^(.*\.(?:layers|h|blocks|block|decoder\.layers)\.\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------
# tensor-level packing


def _v1_correction_word(bits: int) -> int:
    """The per-word constant GPTQModel subtracts (v2 -> v1) / adds (v1 -> v2), for 2, 4, 8 bits."""
    return sum(1 << (k * bits) for k in range(32 // bits))


def pack_gptq(w: AffineWeight, checkpoint_format: str = "gptq", scale_dtype: torch.dtype = torch.float16
              ) -> Dict[str, torch.Tensor]:
    """``{"qweight", "qzeros", "scales", "g_idx"}`` of one Linear weight.

    Args:
        w: the integer weight (2, 3, 4 or 8 bits; ``in`` and ``out`` multiples of 32).
        checkpoint_format: ``"gptq"`` (v1: ``qzeros`` holds ``z - 1``) or ``"gptq_v2"`` (``z``).
        scale_dtype: dtype of ``scales`` (fp16 in every GPTQ writer).

    Example::

        >>> w = AffineWeight(torch.full((32, 32), 8, dtype=torch.uint8), torch.ones(32, 1), None, 4, 32)
        >>> hex(pack_gptq(w)["qzeros"][0, 0].item() & 0xFFFFFFFF)
        '0x77777777'
    """
    if w.bits not in GPTQ_BITS:
        raise UnsupportedWeight(f"{w.bits}-bit codes: GPTQ packs {GPTQ_BITS} bits")
    out_f, in_f = w.shape
    if in_f % 32 or out_f % 32:
        raise UnsupportedWeight(f"weight of shape {w.shape}: GPTQ packing needs in and out features that are "
                                "multiples of 32")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format={checkpoint_format!r}: expected 'gptq' or 'gptq_v2'")
    zeros = w.zeros_or_implicit().to(torch.int64)  # [out, G]
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise UnsupportedWeight("a zero point of 0 cannot be stored in GPTQ v1 (z - 1 = -1 borrows into the "
                                    "neighbouring field); write checkpoint_format='gptq_v2'")
        zeros = zeros - 1
    qweight = pack_int32(w.codes.t(), w.bits, dim=0)  # [in*b/32, out]
    qzeros = pack_int32(zeros.t(), w.bits, dim=1)  # [G, out*b/32]
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": w.scales.t().to(scale_dtype).contiguous(),
        "g_idx": w.group_index().to(torch.int32).contiguous(),
    }


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: Optional[torch.Tensor],
                bits: Optional[int] = None, checkpoint_format: str = "gptq", group_size: Optional[int] = None,
                dtype: torch.dtype = torch.float16) -> AffineWeight:
    """The :class:`AffineWeight` of one GPTQ Linear (scales kept in their stored dtype).

    ``bits`` defaults to what the shapes imply (``qweight`` rows ``= in * bits / 32``, with ``in``
    from ``g_idx``). v1 zero points are restored the way GPTQModel does (adding ``0x11111111``-style
    constants word by word for 2/4/8 bits, which also undoes a borrow; field by field for 3 bits).
    """
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    G, out_f = scales.shape
    if qweight.shape[1] != out_f:
        raise CheckpointError(f"qweight has {qweight.shape[1]} output columns, scales {out_f}")
    if g_idx is not None:
        in_f = g_idx.numel()
    elif bits is not None:
        in_f = qweight.shape[0] * 32 // bits
    else:
        raise CheckpointError("unpack_gptq needs g_idx or bits to know the input features")
    if bits is None:
        bits = qweight.shape[0] * 32 // in_f
    if bits not in GPTQ_BITS or qweight.shape[0] * 32 != in_f * bits:
        raise CheckpointError(f"qweight of shape {tuple(qweight.shape)} does not hold {in_f} input features at "
                              f"{bits} bits (expected {in_f * bits // 32} rows)")
    if tuple(qzeros.shape) != (G, out_f * bits // 32):
        raise CheckpointError(f"qzeros has shape {tuple(qzeros.shape)}, expected {(G, out_f * bits // 32)}")
    codes = unpack_int32(qweight, bits, in_f, dim=0).t().contiguous()  # [out, in]
    zw = qzeros
    if checkpoint_format == "gptq":
        if bits == 3:
            z = (unpack_int32(zw, bits, out_f, dim=1).to(torch.int64) + 1) & 7
        else:
            words = (zw.to(torch.int64) + _v1_correction_word(bits)) & 0xFFFFFFFF
            words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
            z = unpack_int32(words, bits, out_f, dim=1).to(torch.int64)
    elif checkpoint_format == "gptq_v2":
        z = unpack_int32(zw, bits, out_f, dim=1).to(torch.int64)
    else:
        raise CheckpointError(f"checkpoint_format {checkpoint_format!r}: expected 'gptq' or 'gptq_v2'")
    zeros = z.t().to(torch.uint8).contiguous()  # [out, G]
    gi = None if g_idx is None else g_idx.to(torch.int64)
    if group_size in (None, -1):
        group_size = in_f if G <= 1 else -(-in_f // G)
    return AffineWeight(codes=codes, scales=scales.t().contiguous(), zeros=zeros, bits=bits, group_size=group_size,
                        g_idx=gi, dtype=dtype)


def pack_awq(w: AffineWeight, scale_dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """AWQ GEMM ``{"qweight", "qzeros", "scales"}`` of a 4-bit weight with consecutive groups."""
    if w.bits != 4:
        raise UnsupportedWeight(f"{w.bits}-bit codes: AWQ GEMM stores 4-bit weights only")
    out_f, in_f = w.shape
    if out_f % 8 or in_f % w.group_size:
        raise UnsupportedWeight(f"weight of shape {w.shape} with group_size {w.group_size}: AWQ needs out % 8 == 0 "
                                "and groups that divide in")
    if not w.has_trivial_g_idx():
        raise UnsupportedWeight("AWQ has no g_idx: act-order weights cannot be stored")
    pos2ch = torch.tensor([8 * (j // 8) + AWQ_ORDER[j % 8] for j in range(out_f)])
    qweight = pack_int32(w.codes.t()[:, pos2ch], 4, dim=1)  # [in, out/8]
    qzeros = pack_int32(w.zeros_or_implicit().t()[:, pos2ch], 4, dim=1)  # [G, out/8]
    return {"qweight": qweight, "qzeros": qzeros, "scales": w.scales.t().to(scale_dtype).contiguous()}


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float16) -> AffineWeight:
    """The :class:`AffineWeight` of one AWQ GEMM Linear."""
    G, out_f = scales.shape
    in_f = qweight.shape[0]
    if qweight.shape[1] * 8 != out_f or tuple(qzeros.shape) != (G, out_f // 8):
        raise CheckpointError(f"AWQ tensors of shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                              f"scales {tuple(scales.shape)} do not agree")
    pos2ch = torch.tensor([8 * (j // 8) + AWQ_ORDER[j % 8] for j in range(out_f)])
    ch2pos = torch.argsort(pos2ch)
    codes = unpack_int32(qweight, 4, out_f, dim=1)[:, ch2pos].t().contiguous()
    zeros = unpack_int32(qzeros, 4, out_f, dim=1)[:, ch2pos].t().contiguous()
    return AffineWeight(codes=codes, scales=scales.t().contiguous(), zeros=zeros, bits=4,
                        group_size=in_f // G if G else in_f, dtype=dtype)


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
# import


@dataclass
class QuantizedCheckpoint:
    """What :func:`read_gptq` / :func:`read_awq` (and compressed-tensors' reader) return.

    ``weights``: ``{module name: AffineWeight}``; ``bias``: their biases; ``tensors``: every other
    tensor of the checkpoint; ``config``: ``config.json`` (with ``quantization_config``).
    """

    config: Dict[str, Any]
    weights: Dict[str, AffineWeight]
    bias: Dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def quantization_config(self) -> Dict[str, Any]:
        return self.config.get("quantization_config", {})


def _open_checkpoint_dir(directory: Path) -> None:
    """Restore an interrupted replacement, then check the checksum sidecar when lowbit wrote one."""
    if not directory.is_dir():
        recover_interrupted(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    check_dir_checksums(directory)


def _read_config(directory: Path) -> Dict[str, Any]:
    p = directory / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{directory}: config.json missing (not a Hugging Face checkpoint, or an interrupted "
                              "export)")
    cfg = read_json_object(p, "config")
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{p}: corrupted config: quantization_config is a {type(qc).__name__}")
    return cfg


def _quant_config(directory: Path, cfg: Dict[str, Any]) -> Dict[str, Any]:
    qc = cfg.get("quantization_config")
    side = directory / "quantize_config.json"
    if qc is not None and side.is_file():  # AutoGPTQ-style readers use this copy: it must agree
        other = read_json_object(side, "quantization config")
        for key in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "version",
                    "zero_point"):
            if key in qc and key in other and qc[key] != other[key]:
                raise CheckpointError(f"{side}: {key}={other[key]!r} disagrees with config.json's "
                                      f"quantization_config ({qc[key]!r}): corrupted")
    if qc is None:
        for name in ("quantize_config.json", "quant_config.json"):
            if (directory / name).is_file():
                qc = read_json_object(directory / name, "quantization config")
                break
    if qc is None:
        raise CheckpointError(f"{directory}: no quantization_config in config.json and no quantize_config.json")
    return qc


def _where(origin: Dict[str, Path], directory: Path, *names: str) -> str:
    """The file holding the first of ``names`` (the single weight file, else the directory)."""
    for n in names:
        if n in origin:
            return str(origin[n])
    files = set(origin.values())
    return str(files.pop()) if len(files) == 1 else str(directory)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    if isinstance(e, KeyError) and e.args:
        return f"missing {e.args[0]!r}"
    return s.splitlines()[0][:300] if s else type(e).__name__


def _cfg_int(qc: Dict[str, Any], key: str, where: Path, allowed=None, default=None) -> Optional[int]:
    v = qc.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or (allowed is not None and v not in allowed):
        raise CheckpointError(f"{where}: quantization_config {key}={v!r} is not valid")
    return v


def _check_qtensor(origin, directory, name: str, t: torch.Tensor, dtypes, dims: int) -> None:
    if t.dtype not in dtypes or t.dim() != dims:
        raise CheckpointError(f"{_where(origin, directory, name)}: tensor {name!r} is {str(t.dtype).replace('torch.', '')} "
                              f"{list(t.shape)}, expected a {dims}-D "
                              f"{'/'.join(str(d).replace('torch.', '') for d in dtypes)} tensor")


def _check_scale_dtype(origin, directory, name: str, t: torch.Tensor, cfg: Dict[str, Any], extra=()) -> None:
    want = _config_dtype(cfg)
    allowed = {d for d in (want, *extra) if d is not None}
    if not t.is_floating_point() or (allowed and t.dtype not in allowed):
        raise CheckpointError(f"{_where(origin, directory, name)}: tensor {name!r} is "
                              f"{str(t.dtype).replace('torch.', '')}, expected "
                              f"{'/'.join(sorted(str(d).replace('torch.', '') for d in allowed)) or 'a float'}")


def read_gptq(directory: PathLike) -> QuantizedCheckpoint:
    """Read a GPTQ checkpoint (v1 or v2, any of 2/3/4/8 bits, act-order or not) without converting to float.

    Everything the format defines is checked (dtypes and shapes of ``qweight``/``qzeros``/``scales``/
    ``g_idx`` against each other and the config's bits and group size; the sidecar checksums when
    lowbit wrote the directory); errors name the file and the tensor.

    Example::

        >>> ck = read_gptq("some-gptq-model")                             # doctest: +SKIP
        >>> ck.weights["model.layers.0.mlp.down_proj"].dequantize().shape  # doctest: +SKIP
    """
    directory = Path(directory)
    _open_checkpoint_dir(directory)
    cfg = _read_config(directory)
    cfg_path = directory / "config.json"
    qc = _quant_config(directory, cfg)
    if qc.get("quant_method", "gptq") != "gptq":
        raise CheckpointError(f"{cfg_path}: quant_method {qc.get('quant_method')!r}, expected 'gptq'")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{cfg_path}: GPTQ format {fmt!r} is not supported (expected 'gptq' or 'gptq_v2')")
    _cfg_int(qc, "bits", cfg_path, GPTQ_BITS)
    gs = _cfg_int(qc, "group_size", cfg_path)
    if gs is not None and gs != -1 and gs <= 0:
        raise CheckpointError(f"{cfg_path}: quantization_config group_size={gs} is not valid")
    tensors, origin = read_hf_tensors_with_origin(directory)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    weights: Dict[str, AffineWeight] = {}
    bias: Dict[str, torch.Tensor] = {}
    for n in names:
        where = _where(origin, directory, f"{n}.qweight")
        for part in ("qzeros", "scales"):
            if f"{n}.{part}" not in tensors:
                raise CheckpointError(f"{where}: GPTQ module {n!r} lacks tensor '{n}.{part}'")
        qw, qz, sc = tensors.pop(f"{n}.qweight"), tensors.pop(f"{n}.qzeros"), tensors.pop(f"{n}.scales")
        g_idx = tensors.pop(f"{n}.g_idx", None)
        try:
            _check_qtensor(origin, directory, f"{n}.qweight", qw, (torch.int32,), 2)
            _check_qtensor(origin, directory, f"{n}.qzeros", qz, (torch.int32,), 2)
            _check_scale_dtype(origin, directory, f"{n}.scales", sc, cfg, (torch.float16,))
            if sc.dim() != 2:
                raise CheckpointError(f"{where}: tensor '{n}.scales' has shape {list(sc.shape)}, expected 2-D")
            gsize = _module_group_size(qc, n)
            bits = _module_bits(qc, n)
            if bits is not None and (not isinstance(bits, int) or bits not in GPTQ_BITS):
                raise CheckpointError(f"{cfg_path}: module {n!r}: bits={bits!r} is not valid for GPTQ")
            if bits is None and g_idx is None:
                raise CheckpointError(f"{where}: module {n!r}: no g_idx and no bits in the config")
            in_f = qw.shape[0] * 32 // bits if bits else g_idx.numel()
            if g_idx is not None:
                _check_qtensor(origin, directory, f"{n}.g_idx", g_idx, (torch.int32, torch.int64), 1)
                if g_idx.numel() != in_f:
                    raise CheckpointError(f"{where}: tensor '{n}.g_idx' has {g_idx.numel()} entries, qweight holds "
                                          f"{in_f} input features at {bits} bits")
            G = sc.shape[0]
            if gsize not in (None, -1):
                if not isinstance(gsize, int) or gsize <= 0:
                    raise CheckpointError(f"{cfg_path}: module {n!r}: group_size={gsize!r} is not valid")
                want_G = -(-in_f // gsize)
                if G != want_G:
                    raise CheckpointError(f"{where}: tensor '{n}.scales' has {G} groups, group_size {gsize} over "
                                          f"{in_f} inputs gives {want_G}")
            elif g_idx is None and G != 1:
                raise CheckpointError(f"{where}: tensor '{n}.scales' has {G} groups for a per-channel config")
            if g_idx is None:
                g = in_f if gsize in (None, -1) else gsize
                g_idx = torch.arange(in_f) // g
            w = unpack_gptq(qw, qz, sc, g_idx, bits=bits, checkpoint_format=fmt, group_size=gsize, dtype=sc.dtype)
        except CheckpointError as e:
            msg = str(e)
            if msg.startswith(str(directory)):
                raise
            raise CheckpointError(f"{where}: module {n!r}: {msg}") from None
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{where}: module {n!r}: {_first_line(e)}") from None
        weights[n] = w
        if f"{n}.bias" in tensors:
            bias[n] = tensors.pop(f"{n}.bias")
    if not weights:
        raise CheckpointError(f"{directory}: no '*.qweight' tensors found")
    return QuantizedCheckpoint(config=cfg, weights=weights, bias=bias, tensors=tensors,
                               extra={"format": fmt, "origin": origin, "directory": directory})


def _dynamic_override(qc: Dict[str, Any], name: str) -> Dict[str, Any]:
    for pattern, override in (qc.get("dynamic") or {}).items():
        sign = "+"
        if pattern[:2] in ("+:", "-:"):
            sign, pattern = pattern[0], pattern[2:]
        if re.match(pattern, name):
            return {} if sign == "-" else dict(override or {})
    return {}


def _module_group_size(qc: Dict[str, Any], name: str) -> Optional[int]:
    return _dynamic_override(qc, name).get("group_size", qc.get("group_size"))


def _module_bits(qc: Dict[str, Any], name: str) -> Optional[int]:
    return _dynamic_override(qc, name).get("bits", qc.get("bits"))


def read_awq(directory: PathLike) -> QuantizedCheckpoint:
    """Read an AWQ GEMM checkpoint (4-bit) without converting to float (checked like :func:`read_gptq`)."""
    directory = Path(directory)
    _open_checkpoint_dir(directory)
    cfg = _read_config(directory)
    cfg_path = directory / "config.json"
    qc = _quant_config(directory, cfg)
    if qc.get("quant_method", "awq") != "awq":
        raise CheckpointError(f"{cfg_path}: quant_method {qc.get('quant_method')!r}, expected 'awq'")
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if version != "gemm":
        raise CheckpointError(f"{cfg_path}: AWQ version {version!r} is not supported (only 'gemm')")
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise CheckpointError(f"{cfg_path}: AWQ with {bits} bits; only 4-bit GEMM checkpoints exist")
    gs = _cfg_int(qc, "group_size", cfg_path, default=qc.get("q_group_size"))
    tensors, origin = read_hf_tensors_with_origin(directory)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    weights, bias = {}, {}
    for n in names:
        where = _where(origin, directory, f"{n}.qweight")
        for part in ("qzeros", "scales"):
            if f"{n}.{part}" not in tensors:
                raise CheckpointError(f"{where}: AWQ module {n!r} lacks tensor '{n}.{part}'")
        qw, qz, sc = tensors.pop(f"{n}.qweight"), tensors.pop(f"{n}.qzeros"), tensors.pop(f"{n}.scales")
        try:
            _check_qtensor(origin, directory, f"{n}.qweight", qw, (torch.int32,), 2)
            _check_qtensor(origin, directory, f"{n}.qzeros", qz, (torch.int32,), 2)
            _check_scale_dtype(origin, directory, f"{n}.scales", sc, cfg, (torch.float16,))
            if sc.dim() != 2:
                raise CheckpointError(f"{where}: tensor '{n}.scales' has shape {list(sc.shape)}, expected 2-D")
            in_f, G = qw.shape[0], sc.shape[0]
            if gs not in (None, -1) and (G * gs != in_f):
                raise CheckpointError(f"{where}: tensor '{n}.scales' has {G} groups, group_size {gs} over "
                                      f"{in_f} inputs needs {in_f // gs if gs else '?'}")
            if G == 0 or in_f % G:
                raise CheckpointError(f"{where}: tensor '{n}.scales' has {G} groups for {in_f} inputs")
            weights[n] = unpack_awq(qw, qz, sc, dtype=sc.dtype)
        except CheckpointError as e:
            if str(e).startswith(str(directory)):
                raise
            raise CheckpointError(f"{where}: module {n!r}: {e}") from None
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{where}: module {n!r}: {_first_line(e)}") from None
        if f"{n}.bias" in tensors:
            bias[n] = tensors.pop(f"{n}.bias")
    if not weights:
        raise CheckpointError(f"{directory}: no '*.qweight' tensors found")
    return QuantizedCheckpoint(config=cfg, weights=weights, bias=bias, tensors=tensors,
                               extra={"format": "awq", "origin": origin, "directory": directory})


def build_model(ck: QuantizedCheckpoint, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu"
                ) -> nn.Module:
    """A lowbit model from an imported checkpoint: quantized Linears become frozen ``QLinear``s holding the
    exact QuantStates (:meth:`AffineWeight.to_state`), the rest is loaded as stored (cast to ``dtype`` if given).

    Every tensor is checked against the model built from ``config.json`` (name, shape, float dtype
    against the config's), every parameter must come from the checkpoint; errors name the file.
    """
    from lowbit.nn import QLinear

    origin = ck.extra.get("origin", {})
    directory = Path(ck.extra.get("directory", "."))
    cfg_path = directory / "config.json"

    def where(*names: str) -> str:
        return _where(origin, directory, *names) if origin else str(directory)

    try:
        model = empty_hf_model(ck.config)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except Exception as e:  # transformers rejecting a damaged config, in any of its ways
        raise CheckpointError(f"{cfg_path}: cannot build the model from this config (corrupted?): "
                              f"{_first_line(e)}") from None
    state_dtype = dtype or _config_dtype(ck.config)
    cfg_dtype = _config_dtype(ck.config)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    for k, v in ck.tensors.items():
        if k not in expected:
            raise CheckpointError(f"{where(k)}: tensor {k!r} does not belong to the model built from {cfg_path}")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{where(k)}: tensor {k!r} has shape {list(v.shape)}, the model expects "
                                  f"{list(expected[k].shape)}")
        if v.is_floating_point() != expected[k].is_floating_point() or (
                v.is_floating_point() and cfg_dtype is not None and v.dtype != cfg_dtype):
            raise CheckpointError(f"{where(k)}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}, expected "
                                  f"{str(cfg_dtype or expected[k].dtype).replace('torch.', '')}")
    dense = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ck.tensors.items()}
    model.load_state_dict(dense, strict=False, assign=True)
    for name, w in ck.weights.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where(name + '.qweight', name + '.weight_packed', name + '.weight')}: "
                                  f"quantized module {name!r} is not in the model") from None
        if not isinstance(lin, nn.Linear) or (lin.out_features, lin.in_features) != w.shape:
            raise CheckpointError(f"{where(name + '.qweight', name + '.weight_packed', name + '.weight')}: "
                                  f"quantized module {name!r}: weight {w.shape} does not fit {lin}")
        state = w.to_state()
        if state_dtype is not None:
            state.dtype = state_dtype
        q = QLinear.from_quant_state(lin, state)
        if name in ck.bias:
            b = ck.bias[name]
            if tuple(b.shape) != (lin.out_features,) or not b.is_floating_point():
                raise CheckpointError(f"{where(name + '.bias')}: tensor '{name}.bias' is {b.dtype} {list(b.shape)}, "
                                      f"expected a float [{lin.out_features}]")
            q.bias = nn.Parameter(b.to(dtype) if dtype is not None else b, requires_grad=False)
        elif q.bias is not None and q.bias.is_meta:
            raise CheckpointError(f"{where(name + '.qweight')}: quantized module {name!r} has a bias in the model "
                                  "but none in the checkpoint")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where()}: tensor {left[0]!r} missing from the checkpoint"
                              + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                              + f"; the model built from {cfg_path} has it")
    return model.to(device).eval()


def _config_dtype(cfg: Dict[str, Any]) -> Optional[torch.dtype]:
    name = cfg.get("dtype", cfg.get("torch_dtype"))
    d = getattr(torch, str(name).replace("torch.", ""), None) if name else None
    return d if isinstance(d, torch.dtype) and d.is_floating_point else None


def load_gptq(directory: PathLike, *, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
              return_checkpoint: bool = False):
    """Import a GPTQ checkpoint into lowbit: a model whose quantized Linears are frozen ``QLinear``s.

    Codes, zero points and the fp16 scales are kept exactly, so every weight dequantizes to
    ``scales * (q - z)`` bit for bit. Act-order checkpoints are re-grouped exactly (see
    :meth:`AffineWeight.to_state`). ``return_checkpoint=True`` also returns the raw
    :class:`QuantizedCheckpoint` (``(model, checkpoint)``).

    Example::

        >>> model = load_gptq("out/gptq", dtype=torch.float32)     # doctest: +SKIP
    """
    ck = read_gptq(directory)
    model = build_model(ck, dtype=dtype, device=device)
    return (model, ck) if return_checkpoint else model


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
