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

FLOAT_TYPES = ("F32", "F16", "BF16")
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
_FILE_TYPE.update({"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18})  # plain K types
_FILE_TYPE.update(recipes.FILE_TYPE_IDS)  # llama.cpp mixtures (Q4_K_M = 15, ...)
_GGML_FLOAT_ID = {"F32": 0, "F16": 1, "BF16": 30}
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Hugging Face name (per layer) -> llama.cpp name
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(hf_name: str) -> str:
    """llama.cpp tensor name of a Hugging Face Llama parameter name.

    Example:
        >>> gguf_name("model.layers.3.self_attn.q_proj.weight")
        'blk.3.attn_q.weight'
    """
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"parameter {hf_name!r} has no llama.cpp tensor name (expected a LlamaForCausalLM parameter)")


def hf_name(gguf_tensor_name: str) -> str:
    """Inverse of :func:`gguf_name`.

    Example:
        >>> hf_name("blk.0.ffn_down.weight")
        'model.layers.0.mlp.down_proj.weight'
    """
    for k, v in _GLOBAL_NAMES.items():
        if v == gguf_tensor_name:
            return k
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_tensor_name)
    if m:
        for k, v in _LAYER_NAMES.items():
            if v == m.group(2):
                return f"model.layers.{m.group(1)}.{k}"
    raise ValueError(f"GGUF tensor {gguf_tensor_name!r} has no Hugging Face Llama name")


# ---------------------------------------------------------------------------------------------
# Q/K permutation (rows only; each row is a whole input vector, so whole blocks move)


def permute_qk_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face rotate-half row order -> llama.cpp interleaved order (``LlamaModel.permute``).

    Within each head of size hd, HF row ``j*hd/2 + i`` becomes row ``2*i + j``. Works on any tensor
    whose first dimension is the output dimension (weights, biases, codes, per-block scales, raw bytes).

    Example:
        >>> permute_qk_rows(torch.arange(8), 1).tolist()
        [0, 4, 1, 5, 2, 6, 3, 7]
    """
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def unpermute_qk_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk_rows` (what transformers' GGUF loader applies).

    Example:
        >>> unpermute_qk_rows(permute_qk_rows(torch.arange(8), 2), 2).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of even size")
    return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _qk_heads(hf: str, config) -> Optional[int]:
    if hf.endswith("self_attn.q_proj.weight") or hf.endswith("self_attn.q_proj.bias"):
        return config.num_attention_heads
    if hf.endswith("self_attn.k_proj.weight") or hf.endswith("self_attn.k_proj.bias"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


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


# ---------------------------------------------------------------------------------------------
# metadata


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta") if isinstance(rp, Mapping) else None
    if theta is None:
        theta = getattr(cfg, "rope_theta", 10000.0)
    return float(theta)


def _rope_scaling(cfg) -> Optional[Mapping]:
    rs = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if not rs:
        return None
    typ = rs.get("rope_type", rs.get("type", "default"))
    return None if typ == "default" else rs


def _model_metadata(cfg, gguf_type: str, name: Optional[str]) -> dict[str, Any]:
    """``general.*`` and ``llama.*`` keys derived from a transformers config, as ``{key: (value, type, sub)}``."""
    gguf = require("gguf", "GGUF export")
    VT = gguf.GGUFValueType
    arch = "llama"
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    u32 = lambda v: (int(v), VT.UINT32, None)  # noqa: E731
    f32 = lambda v: (float(v), VT.FLOAT32, None)  # noqa: E731
    meta: dict[str, Any] = {
        "general.name": (name or _display_name(cfg), VT.STRING, None),
        f"{arch}.vocab_size": u32(cfg.vocab_size),
        f"{arch}.context_length": u32(cfg.max_position_embeddings),
        f"{arch}.embedding_length": u32(cfg.hidden_size),
        f"{arch}.block_count": u32(cfg.num_hidden_layers),
        f"{arch}.feed_forward_length": u32(cfg.intermediate_size),
        f"{arch}.attention.head_count": u32(n_head),
        f"{arch}.attention.head_count_kv": u32(getattr(cfg, "num_key_value_heads", None) or n_head),
        f"{arch}.rope.freq_base": f32(_rope_theta(cfg)),
        f"{arch}.attention.layer_norm_rms_epsilon": f32(cfg.rms_norm_eps),
        f"{arch}.rope.dimension_count": u32(head_dim),
    }
    if head_dim != cfg.hidden_size // n_head:
        meta[f"{arch}.attention.key_length"] = u32(head_dim)
        meta[f"{arch}.attention.value_length"] = u32(head_dim)
    rs = _rope_scaling(cfg)
    if rs is not None:
        typ = rs.get("rope_type", rs.get("type"))
        if typ != "linear":
            raise NotImplementedError(f"rope_type={typ!r}: only 'default' and 'linear' RoPE are exported to GGUF")
        meta[f"{arch}.rope.scaling.type"] = ("linear", VT.STRING, None)
        meta[f"{arch}.rope.scaling.factor"] = f32(rs["factor"])
    meta["general.file_type"] = u32(_FILE_TYPE[gguf_type])
    meta["general.quantization_version"] = u32(2)
    return meta


_CACHE_KEY_RE = re.compile(r"-\d+-\d+-tf[\w.+-]+$")  # lowbit's GGUF conversion cache folder suffix


def _display_name(cfg) -> str:
    """``general.name`` from a config's ``_name_or_path``: a hub id as is, a path as its last component
    (a ``.gguf`` file as its stem, lowbit's conversion cache folder as the source file's stem)."""
    raw = str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or "").strip()
    if not raw:
        return "lowbit-export"
    looks_like_path = raw.startswith(("/", ".", "~")) or os.sep in raw and raw.count("/") != 1 or raw.endswith(".gguf")
    if not looks_like_path:
        return raw
    last = Path(raw.rstrip("/\\")).name
    if last.lower().endswith(".gguf"):
        last = last[:-5]
    return _CACHE_KEY_RE.sub("", last) or "lowbit-export"


#: ``general.*`` keys that describe the file, not the model: never carried from a source file
_GENERAL_OWN = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def gguf_source_metadata(path: Union[str, os.PathLike], cfg=None) -> dict[str, Any]:
    """The keys of a source GGUF file that an export of the same model carries over.

    ``general.*`` (name, organization, license, ... but not the file type) and, when ``cfg`` matches
    the file's hyperparameters (same block count and embedding length), every ``llama.*`` key;
    ``tokenizer.*`` keys are handled by :func:`gguf_file_tokenizer_metadata`. Returns
    ``{key: (value, GGUFValueType, sub_type)}``.
    """
    gguf = require("gguf", "reading GGUF metadata")
    VT = gguf.GGUFValueType
    reader = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None

    def same_model() -> bool:
        if cfg is None or arch != "llama":
            return False
        for key, attr in (("llama.block_count", "num_hidden_layers"), ("llama.embedding_length", "hidden_size")):
            f = fields.get(key)
            if f is None or int(f.contents()) != int(getattr(cfg, attr, -1)):
                return False
        return True

    carry_arch = same_model()
    meta = {}
    for key, field in fields.items():
        if key.startswith("general.") and key not in _GENERAL_OWN:
            pass
        elif key.startswith("llama.") and carry_arch:
            pass
        else:
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == VT.ARRAY else None
        meta[key] = (field.contents(), vtype, sub)
    return meta


def tokenizer_metadata(tokenizer, vocab_size: Optional[int] = None, pre: Optional[str] = None) -> dict[str, Any]:
    """``tokenizer.ggml.*`` keys for a Hugging Face fast BPE tokenizer (llama.cpp's ``"gpt2"`` model).

    Tokens by id (padded with ``[PAD{i}]`` UNUSED tokens up to ``vocab_size``), token types (special
    added tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL), merges as ``"a b"``,
    special token ids, ``add_bos_token``/``add_eos_token`` (observed by encoding a probe string) and the
    chat template. ``pre`` is llama.cpp's pre-tokenizer id (``tokenizer.ggml.pre``, e.g. ``"smollm"``);
    llama.cpp falls back to ``"default"`` when it is absent.

    Returns ``{key: (value, GGUFValueType, sub_type)}``.

    Example:
        >>> meta = tokenizer_metadata(tok, pre="smollm")   # doctest: +SKIP
        >>> meta["tokenizer.ggml.model"][0]                 # doctest: +SKIP
        'gpt2'
    """
    gguf = require("gguf", "GGUF tokenizer metadata")
    VT = gguf.GGUFValueType
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__}: a fast (tokenizers-backed) tokenizer is required")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise NotImplementedError(f"tokenizer model {model.get('type')!r}: only BPE (llama.cpp 'gpt2') "
                                  "tokenizers are exported; pass tokenizer='file.gguf' to copy one")
    vocab = tokenizer.get_vocab()
    n = max(vocab_size or 0, max(vocab.values()) + 1)
    tokens: list[Optional[str]] = [None] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    types = []
    for i in range(n):
        if tokens[i] is None:
            tokens[i] = f"[PAD{i}]"
            types.append(_TOKEN_UNUSED)
        elif i in added:
            types.append(_TOKEN_CONTROL if added[i].special else _TOKEN_USER)
        else:
            types.append(_TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": ("gpt2", VT.STRING, None),
    }
    if pre:
        meta["tokenizer.ggml.pre"] = (pre, VT.STRING, None)
    meta["tokenizer.ggml.tokens"] = (tokens, VT.ARRAY, VT.STRING)
    meta["tokenizer.ggml.token_type"] = (types, VT.ARRAY, VT.INT32)
    if merges:  # gguf-py cannot write an empty array (a byte-level vocabulary without merges)
        meta["tokenizer.ggml.merges"] = (merges, VT.ARRAY, VT.STRING)
    for attr, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("unk_token_id", "unknown"),
                      ("pad_token_id", "padding")):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = (int(v), VT.UINT32, None)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    meta["tokenizer.ggml.add_bos_token"] = (bool(probe and bos is not None and probe[0] == bos), VT.BOOL, None)
    meta["tokenizer.ggml.add_eos_token"] = (bool(probe and eos is not None and probe[-1] == eos), VT.BOOL, None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        meta["tokenizer.chat_template"] = (template, VT.STRING, None)
    return meta


def gguf_file_tokenizer_metadata(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """The ``tokenizer.*`` keys of an existing GGUF file, as ``{key: (value, GGUFValueType, sub_type)}``.

    Pass the result (or the path itself) as ``tokenizer=`` to :func:`export_gguf` to copy them verbatim;
    reading them once saves re-parsing a large vocabulary for every export.

    Example:
        >>> meta = gguf_file_tokenizer_metadata("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
        >>> meta["tokenizer.ggml.pre"][0]                                           # doctest: +SKIP
        'smollm'
    """
    gguf = require("gguf", "copying GGUF tokenizer metadata")
    VT = gguf.GGUFValueType
    reader = open_gguf(path)
    meta = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == VT.ARRAY else None
        try:
            meta[key] = (field.contents(), vtype, sub)
        except Exception as e:  # undecodable strings or arrays of a corrupted file
            from lowbit.io._files import CheckpointError

            raise CheckpointError(f"{path}: metadata key {key!r} is unreadable (corrupted): "
                                  f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if "tokenizer.ggml.model" not in meta:
        raise ValueError(f"{path}: has no tokenizer.ggml.* metadata to copy")
    return meta


# ---------------------------------------------------------------------------------------------
# export


def _source_gguf(model, tokenizer, explicit) -> Optional[str]:
    if explicit is not None:
        return str(explicit)
    for obj in (model, tokenizer):
        src = getattr(obj, "_lowbit_gguf_source", None)  # lowbit.model.loading.GGUF_SOURCE_ATTR
        if src and os.path.isfile(src):
            return str(src)
    return None


#: pre-tokenizer structure (tokenizer.json ``pre_tokenizer``) -> llama.cpp ``tokenizer.ggml.pre`` whose
#: pre-tokenizer splits text the same way: a GPT-2 byte-level regex alone ("gpt-2"), or preceded by a
#: split into single digits (llama.cpp's "smollm", the same split as its "starcoder"/"refact" types).
_PRE_BY_STRUCTURE = {
    ("ByteLevel:regex",): "gpt-2",
    ("Digits:individual", "ByteLevel:regex"): "smollm",
}


def _pre_structure(spec: Any) -> tuple:
    if not isinstance(spec, Mapping):
        return ()
    typ = spec.get("type")
    if typ == "Sequence":
        return tuple(x for p in spec.get("pretokenizers", []) for x in _pre_structure(p))
    if typ == "ByteLevel":
        return ("ByteLevel:regex" if spec.get("use_regex", True) and not spec.get("add_prefix_space") else "ByteLevel:other",)
    if typ == "Digits":
        return ("Digits:individual" if spec.get("individual_digits") else "Digits:grouped",)
    return (str(typ),)


def derive_tokenizer_pre(tokenizer) -> Optional[str]:
    """llama.cpp's ``tokenizer.ggml.pre`` for a Hugging Face BPE tokenizer, from its pre-tokenizer.

    llama.cpp's own converter identifies the pre-tokenizer by hashing the token ids of a probe text;
    lowbit recognises the structures whose llama.cpp equivalent is unambiguous (see
    ``_PRE_BY_STRUCTURE``) and returns None otherwise (llama.cpp then uses its "default" split, and
    :func:`export_gguf` warns). Pass ``tokenizer_pre=`` to set it explicitly.

    Example:
        >>> derive_tokenizer_pre(tok)   # doctest: +SKIP
        'gpt-2'
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    if spec.get("normalizer") not in (None, {}):
        return None
    return _PRE_BY_STRUCTURE.get(_pre_structure(spec.get("pre_tokenizer")))


def _tokenizer_kv(tokenizer, cfg, tokenizer_pre: Optional[str], source: Optional[str]) -> dict[str, Any]:
    if isinstance(tokenizer, (str, os.PathLike)):
        return gguf_file_tokenizer_metadata(tokenizer)
    if isinstance(tokenizer, Mapping):
        return dict(tokenizer)
    meta = tokenizer_metadata(tokenizer, cfg.vocab_size, tokenizer_pre)
    if source is not None and tokenizer_pre is None:
        try:
            src = gguf_file_tokenizer_metadata(source)
        except ValueError:
            src = None
        if src is not None:
            same = all(src.get(k, (None,))[0] == meta.get(k, (None,))[0]
                       for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
            if same:
                return src  # the tokenizer is the source file's: its keys, as llama.cpp's converter wrote them
            logger.warning("the tokenizer's vocabulary differs from the source file %s; its tokenizer keys "
                           "(tokenizer.ggml.pre, ...) are not carried", source)
    if "tokenizer.ggml.pre" not in meta:
        pre = derive_tokenizer_pre(tokenizer)
        if pre is not None:
            gguf = require("gguf", "GGUF tokenizer metadata")
            items = list(meta.items())
            items.insert(1, ("tokenizer.ggml.pre", (pre, gguf.GGUFValueType.STRING, None)))
            meta = dict(items)
        else:
            logger.warning("tokenizer.ggml.pre unknown for this tokenizer: llama.cpp will pre-tokenize with "
                           "its 'default' rules; pass tokenizer_pre= (e.g. 'llama-bpe', 'smollm') to set it")
    return meta


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
# import


class GGUFTensor(NamedTuple):
    """One tensor of a GGUF file in Hugging Face row order.

    ``qtype`` is the ggml type name ("Q4_0", "Q8_0", "F32", "Q6_K", ...); ``data`` holds raw block
    bytes ``uint8 [rows, nbytes]`` for block types and the values (of ``shape``) for F32/F16/BF16;
    ``shape`` is the element shape in PyTorch order.
    """

    qtype: str
    data: torch.Tensor
    shape: tuple


def load_gguf_quant_states(path: Union[str, os.PathLike, Any]) -> dict[str, GGUFTensor]:
    """Read a Llama GGUF file's tensors without converting them to float.

    ``path`` may also be an open ``gguf.GGUFReader``. Returns ``{hf_name: GGUFTensor(qtype, data, shape)}``;
    q/k rows (raw blocks, or values) are put back in Hugging Face order. Tied files (no
    ``output.weight``) have no ``lm_head.weight`` entry. :func:`to_quant_state` turns a Q4_0..Q8_0 entry into a lowbit ``QuantState``, and an entry can be
    passed back to :func:`export_gguf` through ``quant_states`` to rewrite the same blocks.

    Example:
        >>> states = load_gguf_quant_states("model.gguf")                       # doctest: +SKIP
        >>> states["model.layers.0.mlp.up_proj.weight"].qtype                   # doctest: +SKIP
        'Q4_1'
    """
    gguf = require("gguf", "GGUF import")
    reader = path if isinstance(path, gguf.GGUFReader) else check_gguf(path)

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv") or n_head
    out: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        hf = hf_name(t.name)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        qt = gguf.GGMLQuantizationType(int(t.tensor_type))
        arr = np.array(t.data)  # copy out of the memory map
        if qt.name in ("F32", "F16"):
            data = torch.from_numpy(arr).reshape(shape)
        elif qt.name == "BF16":
            data = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).reshape(shape)
        else:
            data = torch.from_numpy(arr.reshape(shape[0], -1))
        heads = None
        if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
            heads = n_head
        elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
            heads = n_kv
        if heads:
            data = unpermute_qk_rows(data, int(heads))
        out[hf] = GGUFTensor(qt.name, data, shape)
    return out


def to_quant_state(entry: GGUFTensor, dtype: torch.dtype = torch.float32):
    """A lowbit ``QuantState`` (layout "gguf", scheme "q4_0" ... "q8_0") holding the entry's blocks as is.

    Example:
        >>> st = to_quant_state(load_gguf_quant_states("m.gguf")["model.layers.0.mlp.up_proj.weight"])  # doctest: +SKIP
        >>> lowbit.dequantize(st).shape                                                                # doctest: +SKIP
        torch.Size([1536, 576])
    """
    from lowbit.tensor.state import QuantState

    if kfmt.is_kquant(entry.qtype):
        kt = kfmt.kquant_type(entry.qtype)
        return QuantState(scheme=kt.name.lower(), bits=kt.bits, shape=tuple(entry.shape), dtype=dtype, layout="gguf",
                          block_size=kfmt.QK_K, data=entry.data.reshape(entry.shape[0], -1).contiguous())
    t = fmt.gguf_type(entry.qtype)  # raises for F32, naming the type
    return QuantState(scheme=t.name.lower(), bits=t.bits, shape=tuple(entry.shape), dtype=dtype, layout="gguf",
                      block_size=fmt.GGUF_BLOCK, data=entry.data.reshape(entry.shape[0], -1).contiguous())


BLOCK_IMPORT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def load_gguf_model(path: Union[str, os.PathLike], types=BLOCK_IMPORT_TYPES, dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu"):
    """A Llama GGUF file as ``(model, tokenizer)`` whose Linear layers hold the file's own blocks.

    Every ``nn.Linear`` whose GGUF tensor is of one of ``types`` becomes a weight-only lowbit
    ``QLinear`` holding exactly those blocks (a ``layout="gguf"`` QuantState: no float round trip,
    so exporting the model again writes the same bytes); the other tensors (norms, embeddings,
    K-quant or float weights) come from the float conversion of :func:`lowbit.model.loading.load_gguf`.
    The model's ``_lowbit_gguf_kept`` lists the weights kept as blocks.

    Example:
        >>> model, tok = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")     # doctest: +SKIP
        >>> model.model.layers[0].mlp.up_proj.qstate.scheme                        # doctest: +SKIP
        'q4_1'
    """
    from torch import nn

    from lowbit.model.loading import load_gguf
    from lowbit.nn import QLinear

    wanted = {str(t).upper() for t in types}
    bad = wanted - set(BLOCK_IMPORT_TYPES)
    if bad:
        raise ValueError(f"types {sorted(bad)}: only {', '.join(BLOCK_IMPORT_TYPES)} blocks load as lowbit states")
    model, tok = load_gguf(path, dtype=dtype, device="cpu")
    entries = load_gguf_quant_states(path)
    kept = []
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        e = entries.get(f"{name}.weight")
        if e is None or e.qtype not in wanted:
            continue
        if tuple(e.shape) != tuple(mod.weight.shape):
            raise ValueError(f"{path}: {name}.weight has shape {tuple(e.shape)} in the file but "
                             f"{tuple(mod.weight.shape)} in the model")
        q = QLinear.from_quant_state(mod, to_quant_state(e, dtype=dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        kept.append(f"{name}.weight")
    model._lowbit_gguf_kept = kept
    return model.to(device).eval(), tok


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
