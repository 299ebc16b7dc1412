"""GGUF export and import for Llama-architecture models (llama.cpp's file format).

References:
    * ggml-org/llama.cpp ``convert_hf_to_gguf.py`` / ``conversion/llama.py`` (metadata keys, tensor
      names, the Q/K row permutation, which tensors stay F32) and ``src/llama-quant.cpp``
      (``llama-quantize`` keeps the output projection above the file's type: Q6_K, or Q8_0 when a row
      is not a multiple of 256); ``gguf-py`` (``GGUFWriter``, ``GGUFReader``, ``gguf.quants``).
    * ``shared/docs/formats-bnb-gguf.md`` Part B1/B4/B5.

What :func:`export_gguf` writes, mirroring ``convert_hf_to_gguf.py`` followed by ``llama-quantize``:

* ``general.*`` and ``llama.*`` hyperparameters, ``general.file_type`` and ``quantization_version``;
* the tokenizer (``tokenizer.ggml.*``) built from a Hugging Face tokenizer (BPE vocabularies as
  ``"gpt2"``: tokens, token types, merges, special ids), or copied verbatim from another GGUF file;
* tensors under llama.cpp's names; ``attn_q``/``attn_k`` rows permuted from Hugging Face's
  rotate-half layout to llama.cpp's interleaved RoPE layout *before* quantization (rows are whole
  blocks, so the permutation commutes with block quantization); norms and every 1-D tensor in F32;
  2-D weights in the requested type, falling back to F16 when the row length is not a multiple of 32;
  ``output.weight`` (or ``token_embd.weight`` when embeddings are tied, since it is then the output
  projection) in Q8_0 for the 4/5-bit types (``output_type``).
* Already quantized weights (``quant_states``: GPTQ/AWQ codes on the exact GGUF grid, lowbit
  ``QuantState`` objects of a GGUF scheme, or entries from :func:`load_gguf_quant_states`) are written
  block for block, without any float round trip.

The file is written to a temporary file in the destination directory and renamed into place, so an
interrupted export never leaves a partial ``.gguf`` under the final name.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch

from lowbit._deps import require
from lowbit.formats import gguf as fmt
from lowbit.formats import kquants as kfmt
from lowbit.io import gguf_recipes as recipes
from lowbit.model.file_checks import check_gguf, open_gguf  # noqa: F401  (public here too)
from lowbit.io.gguf_names import (  # noqa: E402,F401  (moved; importable from here as before)
    FLOAT_TYPES,
    _FILE_TYPE,
    _GGML_FLOAT_ID,
    _LAYER_NAMES,
    _GLOBAL_NAMES,
    _LAYER_RE,
    gguf_name,
    hf_name,
    permute_qk_rows,
    unpermute_qk_rows,
    _qk_heads,
)
from lowbit.io.gguf_import import (  # noqa: E402,F401  (moved; importable from here as before)
    GGUFTensor,
    load_gguf_quant_states,
    to_quant_state,
    BLOCK_IMPORT_TYPES,
    load_gguf_model,
)
from lowbit.io.gguf_metadata import (  # noqa: E402,F401  (moved; importable from here as before)
    _TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED, _TOKEN_BYTE,
    _rope_theta,
    _rope_scaling,
    _model_metadata,
    _CACHE_KEY_RE,
    _display_name,
    _GENERAL_OWN,
    gguf_source_metadata,
    tokenizer_metadata,
    gguf_file_tokenizer_metadata,
    _source_gguf,
    _PRE_BY_STRUCTURE,
    _pre_structure,
    derive_tokenizer_pre,
    _tokenizer_kv,
)

__all__ = [
    "export_gguf",
    "gguf_tensor_plan",
    "dequantized_state_dict",
    "tokenizer_metadata",
    "gguf_file_tokenizer_metadata",
    "gguf_source_metadata",
    "derive_tokenizer_pre",
    "gguf_name",
    "hf_name",
    "load_gguf_quant_states",
    "GGUFTensor",
    "to_quant_state",
    "permute_qk_rows",
    "unpermute_qk_rows",
    "FLOAT_TYPES",
    "check_gguf",
    "open_gguf",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# per-tensor plan


def _norm_type(t: str) -> str:
    up = str(t).upper()
    if up in FLOAT_TYPES or recipes.is_recipe(up):
        return up
    if kfmt.is_kquant(up):
        return kfmt.kquant_type(up).name
    return fmt.gguf_type(up).name


def _block_of(typ: str) -> int:
    """Elements per block of a quantized type (32 legacy, 256 K-quants)."""
    return kfmt.QK_K if kfmt.is_kquant(typ) else fmt.GGUF_BLOCK


def _type_size(typ: str) -> int:
    return kfmt.kquant_type(typ).type_size if kfmt.is_kquant(typ) else fmt.gguf_type(typ).type_size


def _rows_module(typ: str):
    """The formats module with ``quantize_rows``/``dequantize_rows`` for ``typ``."""
    return kfmt if kfmt.is_kquant(typ) else fmt


def _kquant_plan(model, gguf_type: str, quant_states) -> dict:
    """Per-tensor types of a llama.cpp mixture (Q4_K_M, ...) or a plain K type, in llama-quantize's rules."""
    tied = _tied(model)
    params = dict(model.state_dict())
    names = []
    for name, t in params.items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and tied):
            continue
        names.append((name, gguf_name(name), tuple(t.shape)))
    if recipes.is_recipe(gguf_type):
        types = recipes.recipe_types(gguf_type, [(g, s) for _, g, s in names], model.config.num_hidden_layers)
    else:  # a plain K type: every 2-D weight at that type, the output rule, llama.cpp's fallbacks
        types = {}
        for _, g, shp in names:
            if len(shp) < 2 or g.endswith("_norm.weight"):
                types[g] = "F32"
            elif g == "output.weight" or (g == "token_embd.weight" and tied):
                types[g] = recipes.fallback_type(recipes.output_type_for(gguf_type, shp[-1]), shp[-1])
            else:
                types[g] = recipes.fallback_type(gguf_type, shp[-1])
    plan = {}
    for name, g, shp in names:
        typ = _state_type(quant_states[name]) if name in quant_states else types[g]
        plan[name] = (g, typ)
    return plan


def _tied(model) -> bool:
    cfg = model.config
    if "lm_head.weight" not in dict(model.named_parameters(remove_duplicate=False)):
        return True
    tied = getattr(cfg, "tie_word_embeddings", None)
    if tied is None and hasattr(cfg, "get_text_config"):
        tied = getattr(cfg.get_text_config(), "tie_word_embeddings", False)
    if tied:
        return True
    return model.lm_head.weight is model.model.embed_tokens.weight


def gguf_tensor_plan(
    model,
    gguf_type: str = "Q4_0",
    output_type: Optional[str] = "auto",
    quant_states: Optional[Mapping[str, Any]] = None,
) -> dict[str, tuple[str, str]]:
    """``{hf_name: (gguf_name, type)}`` for every tensor :func:`export_gguf` writes, in file order.

    Types: ``"F32"`` for norms and 1-D tensors; ``output_type`` for ``output.weight`` (or the tied
    ``token_embd.weight``) where ``"auto"`` means Q8_0 when ``gguf_type`` is a 4/5-bit type and
    ``gguf_type`` otherwise (``None``: always ``gguf_type``); the quantized type of an entry of
    ``quant_states``; ``gguf_type`` for other 2-D weights, or F16 when their row length is not a
    multiple of 32.

    Example:
        >>> plan = gguf_tensor_plan(model, "Q4_0")       # doctest: +SKIP
        >>> plan["model.layers.0.self_attn.q_proj.weight"]  # doctest: +SKIP
        ('blk.0.attn_q.weight', 'Q4_0')
    """
    gguf_type = _norm_type(gguf_type)
    if (recipes.is_recipe(gguf_type) or kfmt.is_kquant(gguf_type)) and output_type == "auto":
        quant_states = quant_states or {}
        unknown = [k for k in quant_states if k not in dict(model.state_dict())]
        if unknown:
            raise ValueError(f"quant_states names {unknown[:5]} are not parameters of the model")
        plan = _kquant_plan(model, gguf_type, quant_states)
        order = {"token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}
        return dict(sorted(plan.items(), key=lambda kv: order.get(kv[1][0], 1)))
    if recipes.is_recipe(gguf_type):
        raise ValueError(f"gguf_type={gguf_type!r} is a llama.cpp mixture: its output type is part of the recipe "
                         f"(pass output_type='auto')")
    if output_type == "auto":
        low = gguf_type not in FLOAT_TYPES and _rows_module(gguf_type) is fmt and fmt.gguf_type(gguf_type).bits < 8
        output_type = "Q8_0" if low else gguf_type
    output_type = gguf_type if output_type is None else _norm_type(output_type)
    quant_states = quant_states or {}
    tied = _tied(model)
    params = dict(model.state_dict())
    unknown = [k for k in quant_states if k not in params]
    if unknown:
        raise ValueError(f"quant_states names {unknown[:5]} are not parameters of the model")
    plan: dict[str, tuple[str, str]] = {}
    for name, t in params.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and tied:
            continue
        g = gguf_name(name)
        if name in quant_states:
            typ = _state_type(quant_states[name])
        elif t.dim() <= 1 or g.endswith("_norm.weight"):
            typ = "F32"
        elif g == "output.weight" or (g == "token_embd.weight" and tied):
            typ = output_type
        else:
            typ = gguf_type
        if typ not in FLOAT_TYPES and kfmt.is_kquant(typ) and name not in quant_states:
            typ = recipes.fallback_type(typ, t.shape[-1])  # llama.cpp's per-tensor fallback
        if typ not in FLOAT_TYPES and t.shape[-1] % _block_of(typ):
            if name in quant_states:
                raise ValueError(f"{name}: row length {t.shape[-1]} is not a multiple of 32, so its "
                                 f"quantized state cannot be written as {typ}")
            logger.warning("%s: row length %d is not a multiple of 32; writing F16 instead of %s",
                           name, t.shape[-1], typ)
            typ = "F16"
        plan[name] = (g, typ)
    order = {"token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}
    return dict(sorted(plan.items(), key=lambda kv: order.get(kv[1][0], 1)))  # stable within blocks


# ---------------------------------------------------------------------------------------------
# already quantized inputs


def _state_type(state: Any) -> str:
    if isinstance(state, GGUFTensor):
        return _norm_type(state.qtype)
    if isinstance(state, Mapping):
        if "qtype" not in state:
            raise ValueError("a quant_states dict entry needs 'qtype' (e.g. 'Q4_0') besides 'codes', 'd', 'm'")
        return _norm_type(state["qtype"])
    scheme = getattr(state, "scheme", None)
    if scheme is not None and getattr(state, "layout", None) == "gguf":
        return _norm_type(scheme)
    raise TypeError(f"unsupported quant_states entry {type(state).__name__}: expected a dict with "
                    f"'qtype', 'codes', 'd' (and 'm'), a lowbit QuantState of a GGUF scheme, or a GGUFTensor")


def _state_raw(state: Any, shape: tuple, name: str) -> tuple[str, torch.Tensor]:
    """(type, raw block bytes [out, nbytes]) in Hugging Face row order."""
    typ = _state_type(state)
    if typ in FLOAT_TYPES:
        raise ValueError(f"{name}: quant_states entries must be quantized (got {typ})")
    rows, k = shape[0], int(np.prod(shape[1:]))
    if isinstance(state, GGUFTensor):
        raw = state.data
    elif isinstance(state, Mapping) and kfmt.is_kquant(typ):
        kp = kfmt.KParams(state["d"].reshape(rows, -1), None if state.get("dmin") is None else state["dmin"].reshape(rows, -1),
                          state["sc"].reshape(rows, -1), None if state.get("m") is None else state["m"].reshape(rows, -1))
        raw = kfmt.pack_kblocks(state["codes"].reshape(rows, k).to(torch.uint8), kp, typ)
    elif isinstance(state, Mapping):
        t = fmt.gguf_type(typ)
        codes = state["codes"].reshape(rows, k)
        raw = fmt.pack_blocks(codes.to(torch.uint8), state["d"].reshape(rows, -1),
                              None if state.get("m") is None else state["m"].reshape(rows, -1), t)
    else:
        if tuple(state.shape) != tuple(shape):
            raise ValueError(f"{name}: QuantState shape {tuple(state.shape)} does not match the parameter {shape}")
        raw = state.data
    raw = raw.reshape(rows, -1).to(torch.uint8)
    want = k // _block_of(typ) * _type_size(typ)
    if raw.shape[1] != want:
        raise ValueError(f"{name}: {raw.shape[1]} bytes per row, expected {want} for {typ} rows of {k}")
    return typ, raw.cpu()


def _encode(name: str, w: torch.Tensor, typ: str, config, quant_states) -> np.ndarray:
    """The array written for one tensor: float values, or raw uint8 blocks [out, nbytes]."""
    heads = _qk_heads(name, config)
    if name in quant_states:
        _, raw = _state_raw(quant_states[name], tuple(w.shape), name)
        if heads:
            raw = permute_qk_rows(raw, heads)
        return raw.numpy()
    w = w.detach().to("cpu", torch.float32)
    if heads:
        w = permute_qk_rows(w, heads)
    if typ == "F32":
        return w.numpy()
    if typ == "F16":
        return w.numpy().astype(np.float16)
    if typ == "BF16":
        gguf = require("gguf", "BF16 export")
        return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.BF16)
    return _rows_module(typ).quantize_rows(w.reshape(w.shape[0], -1), typ).numpy()


def _decode(arr: np.ndarray, typ: str, shape: tuple) -> torch.Tensor:
    if typ in ("F32", "F16"):
        return torch.from_numpy(np.ascontiguousarray(arr)).float().reshape(shape)
    if typ == "BF16":
        return torch.from_numpy(arr.copy()).view(torch.int16).view(torch.bfloat16).float().reshape(shape)
    return _rows_module(typ).dequantize_rows(torch.from_numpy(np.ascontiguousarray(arr)), typ).reshape(shape)


def dequantized_state_dict(
    model,
    gguf_type: str = "Q4_0",
    output_type: Optional[str] = "auto",
    quant_states: Optional[Mapping[str, Any]] = None,
) -> dict[str, torch.Tensor]:
    """fp32 weights (Hugging Face names and row order) that a GGUF written by :func:`export_gguf` holds.

    Load it into a copy of the model to get lowbit's fake-quantized model, which must give the same
    logits as the exported file loaded by transformers or llama.cpp. Tied ``lm_head`` follows
    ``embed_tokens``.

    Example:
        >>> sd = dequantized_state_dict(model, "Q4_0")   # doctest: +SKIP
        >>> model.load_state_dict(sd, strict=False)      # doctest: +SKIP
    """
    quant_states = quant_states or {}
    params = model.state_dict()
    out = {}
    for name, (_, typ) in gguf_tensor_plan(model, gguf_type, output_type, quant_states).items():
        w = params[name]
        arr = _encode(name, w, typ, model.config, quant_states)
        v = _decode(arr, typ, tuple(w.shape))
        heads = _qk_heads(name, model.config)
        out[name] = unpermute_qk_rows(v, heads) if heads else v
    if "lm_head.weight" in params and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _is_lowbit_quantized(model) -> bool:
    from lowbit.io._affine import quantized_linears

    return bool(quantized_linears(model))


def _export_quantized(model, path, gguf_type, tokenizer, quant_states, *, output_type, tokenizer_pre, name,
                      source_gguf):
    """A lowbit-quantized model: its quantized Linears written from their codes (no float round trip)."""
    from lowbit.io.multi import _dense_hf_model, gguf_quant_states

    if output_type != "auto":
        logger.info("output_type=%r applies to the unquantized output projection only", output_type)
    states, how = gguf_quant_states(model, "auto", "requantize")
    states.update(dict(quant_states or {}))
    requantized = [k for k, v in how.items() if v.startswith("requantized")]
    if requantized:
        logger.info("GGUF export: %d of %d quantized weights have no exact GGUF block form and are re-quantized "
                    "to %s from their dequantized values (first: %s: %s)", len(requantized), len(how),
                    _norm_type(gguf_type), requantized[0], how[requantized[0]])
    hf = _dense_hf_model(model, states)
    source = _source_gguf(model, tokenizer, source_gguf)
    if name is None and source is None:
        name = _display_name(model.config)
    return export_gguf(hf, path, gguf_type=gguf_type, tokenizer=tokenizer, quant_states=states,
                       output_type=output_type, tokenizer_pre=tokenizer_pre, name=name, source_gguf=source)


def export_gguf(
    model,
    path: Union[str, os.PathLike],
    gguf_type: str = "Q4_0",
    tokenizer=None,
    quant_states: Optional[Mapping[str, Any]] = None,
    *,
    output_type: Optional[str] = "auto",
    tokenizer_pre: Optional[str] = None,
    name: Optional[str] = None,
    source_gguf: Union[str, os.PathLike, None] = None,
) -> Path:
    """Write a llama.cpp-loadable GGUF file for a transformers ``LlamaForCausalLM``.

    Args:
        model: a Llama-architecture causal LM (``config.model_type`` "llama", "mistral" without sliding
            window, or SmolLM/TinyLlama-style checkpoints): float weights, or a lowbit-quantized /
            ``lowbit.load``-ed model, whose quantized Linears are written from their own codes
            (exactly where the GGUF grid allows, see :func:`lowbit.io.multi.gguf_quant_states`; others
            re-quantized to ``gguf_type``) through :func:`lowbit.io.multi.export_all`'s GGUF path.
        path: destination ``.gguf`` file (written atomically).
        gguf_type: "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32" or "BF16".
        tokenizer: a Hugging Face fast BPE tokenizer, the path of a GGUF file whose ``tokenizer.*``
            keys are copied verbatim, such keys already read (:func:`gguf_file_tokenizer_metadata`,
            :func:`tokenizer_metadata`), or None (no tokenizer keys: llama.cpp then cannot run the file).
        quant_states: optional ``{hf_weight_name: state}`` of already quantized weights, written block
            for block in Hugging Face row order (q/k rows are permuted here): a dict
            ``{"qtype", "codes" uint8 [out, in], "d" fp16 [out, in//32], "m" (Q4_1/Q5_1)}`` with the
            unsigned codes of :mod:`lowbit.formats.gguf`, a lowbit ``QuantState`` of a GGUF scheme, or a
            :class:`GGUFTensor` from :func:`load_gguf_quant_states`.
        output_type: type of ``output.weight`` / tied ``token_embd.weight`` (see :func:`gguf_tensor_plan`).
        tokenizer_pre: ``tokenizer.ggml.pre`` for an HF tokenizer (e.g. "smollm", "llama-bpe"); by
            default taken from the source GGUF file, else derived from the tokenizer's pre-tokenizer
            (:func:`derive_tokenizer_pre`).
        name: ``general.name`` (default: the source GGUF file's, else the config's ``_name_or_path``
            reduced to a model name, never a cache path).
        source_gguf: the GGUF file the model came from (default: the one recorded by
            :func:`lowbit.model.loading.load_gguf` on the model or tokenizer). Its ``general.*`` keys,
            its ``llama.*`` keys the config does not set, and, when the tokenizer's vocabulary and merges
            are the file's, its ``tokenizer.*`` keys verbatim (``tokenizer.ggml.pre``,
            ``add_space_prefix``, special ids, chat template) are carried into the export, as
            llama.cpp needs them to tokenize like the source.

    Returns:
        The path written.

    Example:
        >>> export_gguf(model, "smollm2-q4_0.gguf", "Q4_0", tokenizer=tok, tokenizer_pre="smollm")  # doctest: +SKIP
    """
    gguf = require("gguf", "GGUF export")
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"{type(model).__name__}: GGUF export needs a transformers Llama model (a model with a config)")
    if _is_lowbit_quantized(model):
        return _export_quantized(model, path, gguf_type, tokenizer, quant_states, output_type=output_type,
                                 tokenizer_pre=tokenizer_pre, name=name, source_gguf=source_gguf)
    mt = getattr(cfg, "model_type", "llama")
    if mt not in ("llama", "mistral"):
        raise NotImplementedError(f"model_type={mt!r}: GGUF export supports Llama-architecture models")
    gguf_type = _norm_type(gguf_type)
    quant_states = dict(quant_states or {})
    plan = gguf_tensor_plan(model, gguf_type, output_type, quant_states)
    params = model.state_dict()

    source = _source_gguf(model, tokenizer, source_gguf)
    kv = _model_metadata(cfg, gguf_type, name)
    if source is not None:
        for key, value in gguf_source_metadata(source, cfg).items():
            if key not in kv or (key == "general.name" and name is None):
                kv[key] = value
    if tokenizer is not None:
        kv.update(_tokenizer_kv(tokenizer, cfg, tokenizer_pre, source))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from lowbit.io._files import _temp_path, cleanup_stale, file_checksum_path

    cleanup_stale(file_checksum_path(path))  # leftovers of killed exports (the file's own: in _temp_path)
    tmp = str(_temp_path(path))
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        for key, (val, vtype, sub) in kv.items():
            w.add_key_value(key, val, vtype, sub)
        for hf, (g, typ) in plan.items():
            arr = _encode(hf, params[hf], typ, cfg, quant_states)
            raw_dtype = None
            if typ == "BF16":
                raw_dtype = gguf.GGMLQuantizationType.BF16
            elif typ not in FLOAT_TYPES:
                raw_dtype = gguf.GGMLQuantizationType[typ]
            w.add_tensor(g, arr, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        from lowbit.io._files import replacing_file_with_checksum

        with replacing_file_with_checksum(path, tmp):  # path.lowbit-sha256 always matches the file on disk
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# the export format registry (lowbit.io.registry)


def _write_format(model, path: Path, options) -> dict:
    """A lowbit-quantized model: its Linears' exact blocks where the GGUF grid allows
    (:func:`lowbit.io.multi.gguf_quant_states`), the rest by ``options.gguf_fallback``; a float model:
    re-quantized to ``options.gguf_requantize_type``."""
    if not options.from_states:
        p = export_gguf(model, path, gguf_type=options.gguf_requantize_type, tokenizer=options.tokenizer)
        return {"path": str(p), "bytes": os.path.getsize(p)}
    from lowbit.io.multi import _dense_hf_model, gguf_quant_states

    states, how = gguf_quant_states(model, options.gguf_type, options.gguf_fallback)
    hf = _dense_hf_model(model, states)
    source = _source_gguf(model, options.tokenizer, None)
    p = export_gguf(hf, path, gguf_type=options.gguf_requantize_type, tokenizer=options.tokenizer,
                    quant_states=states, tokenizer_pre=options.tokenizer_pre, source_gguf=source,
                    name=None if source else _display_name(model.config))
    kinds: dict = {}
    for v in how.values():
        k = v.split(":")[0]
        kinds[k] = kinds.get(k, 0) + 1
    return {"path": str(p), "bytes": os.path.getsize(p), "treatment": how, "summary": kinds}


def _detect_format(path: Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


from lowbit.io.registry import register_format  # noqa: E402

register_format("gguf", write=_write_format, read=load_gguf_model, detect=_detect_format, target="model.gguf",
                returns_tokenizer=True, description="llama.cpp GGUF (legacy Q4_0..Q8_0, K-quants, recipes)")
