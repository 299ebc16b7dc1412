"""Hugging Face <-> llama.cpp tensor names and the Q/K row permutation (split from :mod:`lowbit.io.gguf`, which
re-exports every name)."""
from __future__ import annotations

import re
from typing import Optional

import torch

from lowbit.io import gguf_recipes as recipes


FLOAT_TYPES = ("F32", "F16", "BF16")
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
_FILE_TYPE.update({"Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18})  # plain K types
_FILE_TYPE.update(recipes.FILE_TYPE_IDS)  # llama.cpp mixtures (Q4_K_M = 15, ...)
_GGML_FLOAT_ID = {"F32": 0, "F16": 1, "BF16": 30}

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
