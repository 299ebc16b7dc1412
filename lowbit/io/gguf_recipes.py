"""llama.cpp's K-quant mixture recipes (``Q4_K_M``, ``Q4_K_S``, ``Q5_K_M``, ``Q5_K_S``, ``Q3_K_S/M/L``, ``Q6_K``).

Reference: ggml-org/llama.cpp ``src/llama-quant.cpp`` (``llama_tensor_get_type_impl``,
``tensor_type_fallback``, ``llama_ftype_get_default_type``, ``tensor_allows_quantization``), read for
the facts; only the rules that apply to dense Llama-architecture models (no experts, no fused QKV,
not Falcon, not the 70B special case) and files written without an importance matrix are encoded.

A recipe is data: the file's default type plus, per tensor category, a rule choosing a type from the
tensor's position. :func:`recipe_types` applies it in file order (llama.cpp counts ``attn_v`` tensors
as it meets them) and then llama.cpp's fallback for rows that are not a multiple of the type's block
(``Q4_K -> Q5_0``, ``Q5_K -> Q5_1``, ``Q6_K -> Q8_0``, ``Q2_K/Q3_K -> Q4_0``, F16 when even that does
not fit). SmolLM2-135M's rows of 576 make 180 of its 272 tensors fall back.

Example:
    >>> names = [("token_embd.weight", (49152, 576)), ("blk.0.ffn_down.weight", (576, 1536))]
    >>> recipe_types("Q4_K_M", names, n_layer=1)
    {'token_embd.weight': 'Q8_0', 'blk.0.ffn_down.weight': 'Q6_K'}
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

__all__ = ["RECIPES", "FILE_TYPE_IDS", "FALLBACK", "BLOCK_SIZE", "is_recipe", "recipe_types", "use_more_bits",
           "fallback_type", "output_type_for"]

# ggml block sizes of the types a recipe can produce
BLOCK_SIZE = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q2_K": 256, "Q3_K": 256,
              "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "F16": 1, "F32": 1, "BF16": 1}

# tensor_type_fallback: a 256-block type on a row that is not a multiple of 256
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# llama_ftype values written to general.file_type
FILE_TYPE_IDS = {"Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
                 "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}

# Rules, per category: a type, or (kind, arg, type_if, type_else) where kind is
#   "more_bits": use_more_bits(i, n)                   (i: layer index / attn_v counter)
#   "first":     i < arg                               (a count)
#   "first_frac": i < n // arg                         (a fraction of the layers)
# ``None`` as type_else keeps the default type.
RECIPES: dict[str, dict] = {
    "Q3_K_S": {"default": "Q3_K"},
    "Q3_K_M": {"default": "Q3_K", "attn_v": ("first", 2, "Q5_K", "Q4_K"),
               "ffn_down": ("first_frac", 16, "Q5_K", "Q4_K"), "attn_output": "Q4_K"},
    "Q3_K_L": {"default": "Q3_K", "attn_v": "Q5_K", "ffn_down": "Q5_K", "attn_output": "Q5_K"},
    "Q4_K_S": {"default": "Q4_K", "attn_v": ("first", 4, "Q5_K", None), "ffn_down": ("first_frac", 8, "Q5_K", None)},
    "Q4_K_M": {"default": "Q4_K", "attn_v": ("more_bits", None, "Q6_K", None),
               "ffn_down": ("more_bits", None, "Q6_K", None)},
    "Q5_K_S": {"default": "Q5_K"},
    "Q5_K_M": {"default": "Q5_K", "attn_v": ("more_bits", None, "Q6_K", None),
               "ffn_down": ("more_bits", None, "Q6_K", None)},
    "Q6_K": {"default": "Q6_K"},
}

_CATEGORIES = (("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
               ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
               ("ffn_down", "ffn_down"))


def is_recipe(name: str) -> bool:
    """True for a mixture name (any case), e.g. ``"Q4_K_M"``.

    >>> is_recipe("q4_k_m"), is_recipe("Q4_0")
    (True, False)
    """
    return str(name).upper() in RECIPES


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every third.

    >>> [i for i in range(16) if use_more_bits(i, 16)]
    [0, 1, 4, 7, 10, 13, 14, 15]
    """
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback_type(typ: str, ncols: int) -> str:
    """The type llama.cpp writes for a row of ``ncols`` when ``typ`` does not fit it.

    >>> fallback_type("Q4_K", 576), fallback_type("Q4_K", 1536), fallback_type("Q5_K", 100)
    ('Q5_0', 'Q4_K', 'F16')
    """
    if ncols % BLOCK_SIZE[typ] == 0:
        return typ
    out = FALLBACK.get(typ, typ)
    return out if ncols % BLOCK_SIZE[out] == 0 else "F16"


def output_type_for(default: str, ncols: int) -> str:
    """Type of ``output.weight`` (or a tied ``token_embd.weight``): Q8_0 when the row does not fit
    the default type's block, else Q6_K (Q8_0 stays Q8_0)."""
    if ncols % BLOCK_SIZE[default]:
        return "Q8_0"
    return default if default == "Q8_0" else "Q6_K"


def _category(name: str) -> Optional[str]:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in _CATEGORIES:
        if key in name:
            return cat
    return None


def _loader_key(name: str):
    m = re.match(r"^blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def _quantizable(name: str, shape: Sequence[int]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _apply(rule, default: str, i: int, n: int) -> str:
    if rule is None:
        return default
    if isinstance(rule, str):
        return rule
    kind, arg, yes, no = rule
    hit = {"more_bits": lambda: use_more_bits(i, n), "first": lambda: i < arg,
           "first_frac": lambda: i < n // arg}[kind]()
    return yes if hit else (default if no is None else no)


def recipe_types(recipe: str, tensors: Iterable[tuple[str, Sequence[int]]], n_layer: int,
                 source_types: Optional[dict] = None) -> dict[str, str]:
    """``{gguf_name: type}`` that ``llama-quantize`` writes for ``recipe``, tensors given in file order.

    Args:
        recipe: a key of :data:`RECIPES` (any case).
        tensors: ``(gguf name, shape)`` in file order; ``shape`` in PyTorch order (the row length,
            GGUF ``ne[0]``, is ``shape[-1]``).
        n_layer: the model's block count (``ffn_down`` rules use the layer index out of it).
        source_types: the types of the tensors that are not quantized (default F32).

    Tied embeddings (no ``output.weight`` among the tensors) give ``token_embd.weight`` the output rule.
    """
    key = str(recipe).upper()
    if key not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: expected one of {sorted(RECIPES)}")
    spec = RECIPES[key]
    default = spec["default"]
    # llama-quantize visits tensors sorted as its loader's weights_map: non-layer tensors first, then by
    # layer number, by name within a layer (the attn_v / ffn_down counters follow this order)
    tensors = sorted(((n, tuple(s)) for n, s in tensors), key=lambda t: _loader_key(t[0]))
    tied = not any(n == "output.weight" for n, _ in tensors)
    n_wv = sum(1 for n, _ in tensors if _category(n) == "attn_v")
    i_wv = 0
    i_down = 0
    out: dict[str, str] = {}
    for name, shape in tensors:
        if not _quantizable(name, shape):
            out[name] = (source_types or {}).get(name, "F32")
            continue
        cat = _category(name)
        ncols = int(shape[-1])
        typ = default
        if cat == "output" or (tied and cat == "token_embd"):
            typ = output_type_for(default, ncols)
        elif cat == "attn_v":
            typ = _apply(spec.get("attn_v"), default, i_wv, n_wv)
            i_wv += 1
        elif cat == "ffn_down":
            i_layer = i_down  # llama.cpp counts ffn_down tensors (dense models: the layer index)
            typ = _apply(spec.get("ffn_down"), default, i_layer, n_layer)
            i_down += 1
        elif cat in ("attn_output",):
            typ = _apply(spec.get(cat), default, 0, n_layer)
        out[name] = fallback_type(typ, ncols)
    return out
