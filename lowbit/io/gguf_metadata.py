"""GGUF metadata: model hyperparameters, display names, source-file metadata and the tokenizer
(``tokenizer.ggml.*``) (split from :mod:`lowbit.io.gguf`, which re-exports every name)."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from lowbit._deps import require
from lowbit.io.gguf_names import _FILE_TYPE
from lowbit.model.file_checks import open_gguf

logger = logging.getLogger("lowbit.io.gguf")

# llama.cpp's token types (tokenizer.ggml.token_type)
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 2, 3, 4, 5, 6



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
