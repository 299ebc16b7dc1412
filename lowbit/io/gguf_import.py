"""GGUF import: a file's tensors as QuantStates, and Llama models holding the file's own blocks (split from
:mod:`lowbit.io.gguf`, which re-exports every name)."""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Union

import numpy as np
import torch

from lowbit._deps import require
from lowbit.formats import gguf as fmt
from lowbit.formats import kquants as kfmt
from lowbit.model.file_checks import check_gguf
from lowbit.io.gguf_names import hf_name, unpermute_qk_rows


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
