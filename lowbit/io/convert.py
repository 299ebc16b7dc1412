"""Lossless conversion of already-quantized integer weights into llama.cpp's GGUF block formats.

GPTQ / AWQ / compressed-tensors / lowbit checkpoints store ``W = (q - z) * s`` with fp16 (or
other) scales per group of input columns; GGUF's legacy types store, per block of 32 consecutive
columns, an fp16 ``d`` (and for the ``_1`` types an fp16 ``m``) and unsigned codes ``q'``:

* ``Q4_0 / Q5_0 / Q8_0``: ``W = (q' - Z0) * d`` with ``Z0 = 8 / 16 / 128`` and ``q' <= 15 / 31 / 255``;
* ``Q4_1 / Q5_1``:        ``W = q' * d + m``.

Both sides evaluate in fp32 (llama.cpp's ``dequantize_row_*``, gguf-py, and lowbit's
``(q - z) * s``). Every product involved is exact in fp32 (a code of at most 8 bits times an fp16
significand of 11 bits fits in fp32's 24), so two representations give bit-identical weights as
soon as they denote the same real numbers. For one block with scale ``s``, zero ``z`` and codes in
``[qlo, qhi]`` this gives exact rules (:func:`affine_to_gguf`):

* ``d = s`` must be an fp16 number (true for every GPTQ/AWQ checkpoint; for lowbit states quantize
  with ``scale_dtype=torch.float16``); with ``d = -s`` and reversed codes when that fits better.
* ``_0`` types: ``q' = q - z + Z0`` must lie in ``[0, qmax]``: **always** for symmetric weights
  (``z = 2**(b-1)``, b <= the type's bits), e.g. symmetric int4 -> Q4_0, int8 -> Q8_0, and for
  any 4-bit weight (even asymmetric) -> Q5_0; for an asymmetric block only when its codes stay
  within ``[z - Z0, z - Z0 + qmax]``.
* ``_1`` types: ``q' = q - c`` for a shift ``c`` with ``0 <= q - c <= qmax`` and ``m = (c - z) * s``
  exactly representable in fp16 (then ``q' * d + m`` is exactly ``(q - z) * s``, including
  ``+0.0`` at ``q = z``). ``c = 0`` gives llama.cpp's own ``m = -z * s``, exact e.g. when
  ``z`` is 0, 1, 2, 4 or 8, or when ``s`` has enough trailing zero bits; otherwise another shift
  or the reversed orientation (``d = -s``, ``q' = c - q``) is searched. Asymmetric int4 -> Q4_1 is
  therefore lossless for most blocks but not guaranteed; such inputs are refused with the
  first failing block, and ``"auto"`` falls back to Q5_0, which always works.
* A block must not straddle two groups with different ``(s, z)`` in a row: group sizes that are
  multiples of 32 always work; act-order (``g_idx``) checkpoints work when each 32-column block
  sees one scale and zero per row ("re-grouped when exact"), and are refused otherwise.

:func:`convert_to_gguf` applies this to a whole checkpoint directory and then *proves* the result:
it reads the written file back with ``gguf.GGUFReader`` and checks every converted tensor, as
dequantized by ``gguf.quants``, against the source's ``(q - z) * s`` bit for bit.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lowbit._deps import require
from lowbit.formats import gguf as fmt
from lowbit.io._affine import AffineWeight, UnsupportedWeight, exact_cast
from lowbit.io._files import CheckpointError, PathLike, empty_hf_model

__all__ = ["affine_to_gguf", "convert_to_gguf", "NotLossless", "AUTO_ORDER", "detect_format", "read_checkpoint"]

logger = logging.getLogger(__name__)

#: GGUF types tried by ``"auto"``, smallest first
AUTO_ORDER = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
BLOCK = fmt.GGUF_BLOCK


class NotLossless(UnsupportedWeight):
    """The weight has no exact representation in the requested GGUF type (the message says where and why)."""


@dataclass
class GGUFBlocks:
    """The exact GGUF form of one weight: unsigned codes ``[R, K]``, fp16 ``d`` (and ``m``) ``[R, K/32]``."""

    qtype: str
    codes: torch.Tensor
    d: torch.Tensor
    m: Optional[torch.Tensor]

    def as_quant_state_entry(self) -> Dict[str, Any]:
        """The dict form :func:`lowbit.io.gguf.export_gguf` accepts in ``quant_states``."""
        return {"qtype": self.qtype, "codes": self.codes, "d": self.d, "m": self.m}

    def raw(self) -> torch.Tensor:
        return fmt.pack_blocks(self.codes, self.d, self.m, self.qtype)

    def dequantize(self) -> torch.Tensor:
        return fmt.dequantize_rows(self.raw(), self.qtype)


def _first(mask: torch.Tensor) -> Tuple[int, int]:
    idx = torch.nonzero(mask)[0].tolist()
    return int(idx[0]), int(idx[1])


def _block_params(w: AffineWeight, round_scales: bool):
    """Per-block ``(scale fp32, zero int64, codes int64 [R, nb, 32])`` after the consistency checks."""
    R, K = w.shape
    if K % BLOCK:
        raise NotLossless(f"rows of {K} values are not a multiple of GGUF's block of {BLOCK}")
    nb = K // BLOCK
    s_col, z_col = w.column_params()
    S = s_col.reshape(R, nb, BLOCK)
    Z = z_col.reshape(R, nb, BLOCK)
    mixed = (S != S[..., :1]).any(-1) | (Z != Z[..., :1]).any(-1)
    if bool(mixed.any()):
        r, b = _first(mixed)
        how = ("act-order g_idx puts columns of different groups into it" if not w.has_trivial_g_idx()
               else f"group_size={w.group_size} is not a multiple of {BLOCK}")
        raise NotLossless(f"block of columns {b * BLOCK}..{b * BLOCK + BLOCK - 1} in row {r} spans several "
                          f"(scale, zero) pairs ({how}); {int(mixed.sum())} of {mixed.numel()} blocks do")
    s = S[..., 0].contiguous()
    z = Z[..., 0].to(torch.int64)
    scale_change = 0.0
    s16 = s.to(torch.float16)
    if not bool(torch.isfinite(s16).all()):
        r, b = _first(~torch.isfinite(s16))
        raise NotLossless(f"scale {float(s[r, b]):.6g} (row {r}, block {b}) overflows fp16")
    if not exact_cast(s, torch.float16):
        if not round_scales:
            bad = s16.float() != s
            r, b = _first(bad)
            raise NotLossless(f"{int(bad.sum())} block scales are not fp16 numbers (e.g. row {r}, columns "
                              f"{b * BLOCK}.., scale {float(s[r, b])!r} -> fp16 {float(s16[r, b])!r}); GGUF stores "
                              "fp16 scales. Quantize with scale_dtype=torch.float16, or pass round_scales=True")
        scale_change = float(((s16.float() - s).abs() / s.abs().clamp_min(1e-30)).max())
        s = s16.float()
    q = w.codes.to(torch.int64).reshape(R, nb, BLOCK)
    return s, z, q, scale_change


def _solve_0(t: fmt.GGUFType, s, z, q):
    qlo, qhi = q.amin(-1), q.amax(-1)
    Z0, Qm = t.zero, t.qmax
    direct = (qlo - z + Z0 >= 0) & (qhi - z + Z0 <= Qm)
    has_zero = (q == z.unsqueeze(-1)).any(-1)
    flipped = ~direct & (Z0 + z - qhi >= 0) & (Z0 + z - qlo <= Qm) & ~has_zero  # d = -s would give -0.0 at q = z
    ok = direct | flipped
    codes = torch.where(direct.unsqueeze(-1), q - z.unsqueeze(-1) + Z0, Z0 + z.unsqueeze(-1) - q)
    d = torch.where(direct, s, -s)
    return ok, codes, d, None, qlo, qhi


def _solve_1(t: fmt.GGUFType, s, z, q):
    qlo, qhi = q.amin(-1), q.amax(-1)
    Qm = t.qmax
    ok = torch.zeros_like(z, dtype=torch.bool)
    shift = torch.zeros_like(z)
    flip = torch.zeros_like(ok)
    m = torch.zeros_like(s)
    # llama.cpp's own form first: q' = q, m = -z * s
    mv = -z.to(s.dtype) * s
    take = (qhi <= Qm) & (qlo >= 0) & (mv.to(torch.float16).float() == mv)
    ok |= take
    m = torch.where(take, mv, m)
    span = 2 * Qm
    for delta in sorted(range(-span, span + 1), key=lambda v: (abs(v), v)):
        mv = delta * s  # exact in fp32: |delta| < 2**6, s an fp16 number
        exact = mv.to(torch.float16).float() == mv
        c = z + delta
        for is_flip in (False, True):
            if is_flip:
                fits = (c >= qhi) & (c <= qlo + Qm)
            else:
                fits = (c <= qlo) & (c >= qhi - Qm)
            take = fits & exact & ~ok
            if bool(take.any()):
                ok |= take
                shift = torch.where(take, c, shift)
                flip = torch.where(take, torch.full_like(flip, is_flip), flip)
                m = torch.where(take, mv, m)
        if bool(ok.all()):
            break
    c = shift.unsqueeze(-1)
    codes = torch.where(flip.unsqueeze(-1), c - q, q - c)
    d = torch.where(flip, -s, s)
    m = torch.where(m == 0, torch.zeros_like(m), m)  # +0.0, never -0.0
    return ok, codes, d, m, qlo, qhi


def affine_to_gguf(w: AffineWeight, qtype: str = "auto", *, round_scales: bool = False,
                   verify: bool = True) -> GGUFBlocks:
    """The exact GGUF representation of an integer weight, or :class:`NotLossless` with the reason.

    Args:
        w: the integer weight (any bits, group size, act-order ``g_idx``).
        qtype: ``"Q4_0"``, ``"Q4_1"``, ``"Q5_0"``, ``"Q5_1"``, ``"Q8_0"`` or ``"auto"`` (the smallest of
            :data:`AUTO_ORDER` that is exact).
        round_scales: round scales that are not fp16 numbers to fp16 instead of refusing (then the
            result is exact for the rounded scales, not for the original ones).
        verify: dequantize the blocks (llama.cpp's formulas) and compare with ``w.dequantize()`` bit
            for bit (always true by construction; kept as a guard).

    Example::

        >>> st = lowbit.quantize(torch.randn(64, 128), "int4", group_size=64, scale_dtype=torch.float16)
        >>> affine_to_gguf(AffineWeight.from_state(st)).qtype
        'Q4_0'
    """
    s, z, q, change = _block_params(w, round_scales)
    if qtype.lower() == "auto":
        candidates = [t for t in AUTO_ORDER]
    else:
        candidates = [fmt.gguf_type(qtype).name]
    reasons = []
    for name in candidates:
        t = fmt.gguf_type(name)
        solver = _solve_1 if t.asymmetric else _solve_0
        ok, codes, d, m, qlo, qhi = solver(t, s, z, q)
        if not bool(ok.all()):
            r, b = _first(~ok)
            zr, sr = int(z[r, b]), float(s[r, b])
            if t.asymmetric:
                why = (f"no shift c puts codes {int(qlo[r, b])}..{int(qhi[r, b])} in 0..{t.qmax} with m = (c - {zr}) * "
                       f"{sr!r} an fp16 number (llama.cpp's m = -z*s = {-zr * sr!r})")
            else:
                why = (f"codes {int(qlo[r, b])}..{int(qhi[r, b])} with zero point {zr} do not fit "
                       f"{t.name}'s 0..{t.qmax} around {t.zero}")
            reasons.append(f"{t.name}: {int((~ok).sum())} of {ok.numel()} blocks are not exact, e.g. row {r}, "
                           f"columns {b * BLOCK}..{b * BLOCK + BLOCK - 1}: {why}")
            continue
        R, K = w.shape
        blocks = GGUFBlocks(t.name, codes.reshape(R, K).to(torch.uint8), d.to(torch.float16),
                            None if m is None else m.to(torch.float16))
        if verify:
            ref = w.dequantize() if not change else _rounded(w)
            got = blocks.dequantize()
            if not torch.equal(got.view(torch.int32), ref.view(torch.int32)):
                bad = got.view(torch.int32) != ref.view(torch.int32)
                raise AssertionError(f"internal error: {t.name} blocks differ from the source in {int(bad.sum())} "
                                     "values")
        if change:
            logger.info("scales rounded to fp16 (largest relative change %.2e)", change)
        return blocks
    raise NotLossless("; ".join(reasons))


def _rounded(w: AffineWeight) -> torch.Tensor:
    return AffineWeight(w.codes, w.scales.to(torch.float16), w.zeros, w.bits, w.group_size, w.g_idx).dequantize()


# ---------------------------------------------------------------------------------------------
# checkpoint directories


def detect_format(directory: PathLike) -> str:
    """``"native"``, ``"gptq"``, ``"awq"`` or ``"compressed-tensors"`` for a checkpoint directory."""
    from lowbit.io import native

    from lowbit.io._files import read_json_object, recover_interrupted

    directory = Path(directory)
    if not directory.exists():
        recover_interrupted(directory)
    if native.has_marker(directory):  # a damaged marker too: the native reader says what is wrong
        return "native"
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: neither a lowbit native checkpoint nor a Hugging Face directory with "
                              "config.json")
    cfg = read_json_object(cfg_path, "config")
    qc = cfg.get("quantization_config")
    if qc is None and (directory / "quantize_config.json").is_file():
        qc = read_json_object(directory / "quantize_config.json", "quantization config")
        qc.setdefault("quant_method", "gptq")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_path}: corrupted config: quantization_config is a {type(qc).__name__}")
    method = (qc or {}).get("quant_method")
    if method in ("gptq", "awq", "compressed-tensors"):
        return method
    raise CheckpointError(f"{directory}: quantization method {method!r} is not one of gptq, awq, compressed-tensors")


def read_checkpoint(directory: PathLike):
    """``(format, QuantizedCheckpoint)`` for a GPTQ / AWQ / compressed-tensors directory."""
    from lowbit.io.compressed_tensors import read_compressed_tensors
    from lowbit.io.gptq import read_awq, read_gptq

    kind = detect_format(directory)
    readers = {"gptq": read_gptq, "awq": read_awq, "compressed-tensors": read_compressed_tensors}
    if kind not in readers:
        raise CheckpointError(f"{directory}: {kind} checkpoints are read with lowbit.io.native.load")
    return kind, readers[kind](directory)


def _source_float_type(tensors: Iterable[torch.Tensor]) -> str:
    dtypes = {t.dtype for t in tensors if t.is_floating_point() and t.dim() >= 2}
    if dtypes == {torch.float16}:
        return "F16"
    if dtypes == {torch.bfloat16}:
        return "BF16"
    return "F32"


def _hf_model_for_gguf(config: Mapping[str, Any], dense: Mapping[str, torch.Tensor],
                       meta_weights: Mapping[str, Tuple[int, ...]]) -> nn.Module:
    """A Hugging Face model holding ``dense`` tensors, with meta placeholders for the converted weights."""
    model = empty_hf_model(config)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in dense.items()}
    for name, shape in meta_weights.items():
        sd[name] = torch.empty(shape, device="meta")
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"tensors {result.unexpected_keys[:5]} do not belong to the model")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and n not in meta_weights]
    if missing:
        raise CheckpointError(f"tensors missing from the checkpoint: {missing[:5]}")
    return model


def _tokenizer(directory: Path, tokenizer):
    if tokenizer != "auto":
        return tokenizer
    if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tf = require("transformers", "reading the checkpoint's tokenizer")
        return tf.AutoTokenizer.from_pretrained(str(directory))
    logger.warning("%s has no tokenizer files: the GGUF gets no tokenizer (llama.cpp cannot run it; pass "
                   "tokenizer= a Hugging Face tokenizer or a GGUF file to copy it from)", directory)
    return None


def verify_gguf(path: PathLike, expected: Mapping[str, torch.Tensor]) -> int:
    """Dequantize tensors of a written GGUF with ``gguf.quants`` and compare with ``expected`` bit for bit.

    ``expected`` maps Hugging Face weight names to fp32 tensors. Returns the number checked.
    """
    gguf = require("gguf", "verifying GGUF files")
    from lowbit.io.gguf import load_gguf_quant_states

    entries = load_gguf_quant_states(path)
    import numpy as np

    for name, ref in expected.items():
        if name not in entries:
            raise AssertionError(f"{path}: tensor for {name!r} missing")
        e = entries[name]
        arr = gguf.quants.dequantize(e.data.numpy().astype(np.uint8), gguf.GGMLQuantizationType[e.qtype])
        got = torch.from_numpy(np.ascontiguousarray(arr)).float().reshape(ref.shape)
        if not torch.equal(got.view(torch.int32), ref.float().view(torch.int32)):
            n = int((got.view(torch.int32) != ref.float().view(torch.int32)).sum())
            raise AssertionError(f"{path}: {name} ({e.qtype}) differs from the source in {n} values")
    return len(expected)


def convert_to_gguf(input_dir: PathLike, output: PathLike, *, gguf_type: str = "auto",
                    float_type: Optional[str] = None, tokenizer: Any = "auto", tokenizer_pre: Optional[str] = None,
                    round_scales: bool = False, verify: bool = True) -> Dict[str, Any]:
    """Convert a GPTQ / AWQ / compressed-tensors / lowbit checkpoint of a Llama model into GGUF, losslessly.

    Quantized Linear weights are written block for block (codes and fp16 scales carried over, no
    float round trip; see the module docstring for what is exact), lowbit GGUF-scheme states as
    they are; the unquantized tensors (embeddings, norms, an unquantized ``lm_head``) keep their
    stored precision (``float_type`` None: F16 for fp16 checkpoints, BF16 for bf16, else F32), or
    are quantized llama.cpp-style when ``float_type`` is a block type.

    Args:
        input_dir: the checkpoint directory.
        output: the ``.gguf`` file to write (atomically).
        gguf_type: ``"auto"`` (per tensor, the smallest exact type of :data:`AUTO_ORDER`) or one type
            for every quantized weight (refused with the reason if a weight has no exact form in it).
        float_type: type of the unquantized 2-D tensors (see above).
        tokenizer: ``"auto"`` (from the checkpoint directory when it has one), a HF tokenizer, the
            path of a GGUF file to copy tokenizer keys from, or None.
        tokenizer_pre: llama.cpp pre-tokenizer name for a HF tokenizer (e.g. ``"smollm"``).
        round_scales: accept scales that are not fp16 numbers by rounding them (not lossless).
        verify: read the written file back and compare every converted tensor, dequantized with
            ``gguf.quants``, with the source's ``(q - z) * s`` bit for bit.

    Returns:
        A report: ``{"output", "source_format", "types" {name: type}, "float_type", "verified"}``.

    Example::

        >>> convert_to_gguf("llama-gptq-4bit-128g", "llama.gguf")["types"]      # doctest: +SKIP
        {'model.layers.0.self_attn.q_proj.weight': 'Q4_0', ...}
    """
    from lowbit.io.gguf import export_gguf

    src = Path(input_dir)
    kind = detect_format(src)
    gguf_states: Dict[str, Any] = {}
    expected: Dict[str, torch.Tensor] = {}
    types: Dict[str, str] = {}
    if kind == "native":
        model, dense, config, weights, passthrough = _from_native(src)
    else:
        _, ck = read_checkpoint(src)
        if ck.extra.get("fp8"):
            raise NotLossless(f"fp8 layers ({sorted(ck.extra['fp8'])[:3]}) have no GGUF block type")
        weights = ck.weights
        dense = dict(ck.tensors)
        for n, b in ck.bias.items():
            dense[f"{n}.bias"] = b
        config = ck.config
        passthrough = {}
    problems = []
    for name, w in weights.items():
        try:
            blocks = affine_to_gguf(w, gguf_type, round_scales=round_scales, verify=False)
        except NotLossless as e:
            problems.append(f"{name}: {e}")
            continue
        key = f"{name}.weight"
        gguf_states[key] = blocks.as_quant_state_entry()
        expected[key] = w.dequantize() if not round_scales else _rounded(w)
        types[key] = blocks.qtype
    if problems:
        raise NotLossless(f"{len(problems)} weights cannot be converted losslessly to {gguf_type}:\n  "
                          + "\n  ".join(problems[:10]))
    for key, st in passthrough.items():
        gguf_states[key] = st
        types[key] = st.scheme.upper()
        expected[key] = _dequant_state(st)
    if float_type is None:
        float_type = _source_float_type(dense.values())
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v["codes"].shape)
              for k, v in expected.items()}
    if kind == "native":
        hf = model
    else:
        hf = _hf_model_for_gguf(config, dense, shapes)
    tok = _tokenizer(src, tokenizer)
    path = export_gguf(hf, output, gguf_type=float_type, tokenizer=tok, quant_states=gguf_states,
                       tokenizer_pre=tokenizer_pre)
    report: Dict[str, Any] = {"output": str(path), "source_format": kind, "types": types, "float_type": float_type,
                              "type_counts": dict(Counter(types.values())), "bytes": os.path.getsize(path),
                              "lossless": not round_scales, "verified": 0}
    if verify:
        report["verified"] = verify_gguf(path, expected)
    return report


def _dequant_state(st) -> torch.Tensor:
    from lowbit.tensor.functional import dequantize

    return dequantize(st).float()


def _from_native(src: Path):
    """A native lowbit checkpoint: the HF model (quantized weights as meta), integer weights, GGUF states."""
    from lowbit.io import native
    from lowbit.io._affine import quantized_linears

    qmodel = native.load(src)
    cfg = getattr(qmodel, "config", None)
    if cfg is None:
        raise CheckpointError(f"{src}: GGUF conversion needs a Hugging Face Llama model")
    from lowbit.io._files import hf_config_dict

    config = hf_config_dict(qmodel)
    weights: Dict[str, AffineWeight] = {}
    passthrough: Dict[str, Any] = {}
    quantized = quantized_linears(qmodel)
    for name, (m, st) in quantized.items():
        if st.layout == "gguf":
            passthrough[f"{name}.weight"] = st
        else:
            try:
                weights[name] = AffineWeight.from_state(st)
            except UnsupportedWeight as e:
                raise NotLossless(f"{name}: {e}") from None
    from lowbit.io._affine import plain_tensors

    dense = plain_tensors(qmodel, list(quantized))
    for name, (m, _) in quantized.items():
        if getattr(m, "bias", None) is not None:
            dense[f"{name}.bias"] = m.bias.detach()
    shapes = {f"{n}.weight": w.shape for n, w in weights.items()}
    shapes.update({k: tuple(st.shape) for k, st in passthrough.items()})
    hf = _hf_model_for_gguf(config, dense, shapes)
    return hf, dense, config, weights, passthrough
