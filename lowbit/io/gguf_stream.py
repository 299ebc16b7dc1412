"""Streaming quantization from a GGUF file: its tensors read one at a time (issue 18).

:class:`GGUFReader` gives :func:`lowbit.model.streaming.quantize_streaming` a Llama-family GGUF file's tensors
under their Hugging Face names, each dequantized to float32 when its block's turn comes (gguf-py's memory-mapped
reader and ``gguf.quants.dequantize``, q/k rows put back in Hugging Face order): the same values as transformers'
GGUF loader (:func:`lowbit.model.loading.load_gguf`) gives for the whole model, without the model ever being held
whole. The configuration comes from the file's metadata. The file is memory-mapped (its pages count in the address
space, and in the resident memory only while read).

Example::

    >>> from lowbit.io.stream import NativeStreamWriter                                   # doctest: +SKIP
    >>> with NativeStreamWriter("out") as sink:                                           # doctest: +SKIP
    ...     summary = quantize_gguf_streaming("SmolLM2.Q4_1.gguf", sink, method="gptq", calib_dataset=ids)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from lowbit._deps import require
from lowbit.io.gguf_names import hf_name, unpermute_qk_rows
from lowbit.model.file_checks import open_gguf
from lowbit.model.streaming import TensorReader, quantize_streaming


#: rows of a 2-D tensor dequantized at a time (gguf-py's dequantizers make several temporaries of their input's size)
ROWS_PER_CHUNK = 1024


class GGUFReader(TensorReader):
    """Tensors of a Llama-family GGUF file under their Hugging Face names, each dequantized to float32 on request
    (the interface of :class:`lowbit.model.streaming.ShardReader`: ``in``, ``names``, ``nbytes``, ``get``,
    ``bytes_read``), and the file's transformers ``config``."""

    def __init__(self, path: str) -> None:
        self.dir = self.path = Path(path)
        self.reader = open_gguf(self.path)  # header and tensor table only; tensors are read one by one

        def field(key):
            f = self.reader.fields.get(key)
            return None if f is None else f.contents()

        arch = field("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: GGUF architecture {arch!r}; streaming reads Llama-family files "
                             f"(general.architecture 'llama') only")
        n_head = field("llama.attention.head_count")
        n_kv = field("llama.attention.head_count_kv") or n_head
        self.config = _gguf_config(self.path)
        self.entries: Dict[str, Tuple[Any, Optional[int]]] = {}
        for t in self.reader.tensors:
            try:
                name = hf_name(t.name)
            except ValueError:
                raise ValueError(f"{self.path}: tensor {t.name!r} has no Hugging Face Llama name") from None
            heads = None
            if t.name.endswith(("attn_q.weight", "attn_q.bias")):
                heads = int(n_head)
            elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
                heads = int(n_kv)
            self.entries[name] = (t, heads)
        self.bytes_read = 0

    def nbytes(self, name: str) -> int:
        """The bytes of the tensor in float32 (what :meth:`get` returns)."""
        t, _ = self.entries[name]
        return int(t.n_elements) * 4

    def file_bytes(self, name: str) -> int:
        """The bytes of the tensor in the file (its own, possibly block-quantized, type)."""
        return int(self.entries[name][0].n_bytes)

    def get(self, name: str) -> torch.Tensor:
        import numpy as np

        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor {name!r} in the GGUF file")
        gguf = require("gguf", "streaming a GGUF file")
        t, heads = self.entries[name]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out = torch.empty(shape, dtype=torch.float32)
        data = t.data
        rows = ROWS_PER_CHUNK if data.ndim == 2 and len(shape) == 2 and data.shape[0] == shape[0] else None
        dst = out.numpy().reshape(shape[0], -1) if rows else out.numpy().reshape(-1)
        try:  # row chunks: the dequantizer's temporaries stay a few MB, not several copies of the embedding
            for a in range(0, shape[0], rows) if rows else (None,):
                src = data[a:a + rows] if rows else data
                arr = gguf.quants.dequantize(src, t.tensor_type)
                if rows:
                    dst[a:a + rows] = np.asarray(arr, dtype=np.float32).reshape(-1, dst.shape[1])
                else:
                    dst[:] = np.asarray(arr, dtype=np.float32).reshape(-1)
                del arr
        except (NotImplementedError, ValueError, TypeError) as e:
            raise ValueError(f"{self.path}: tensor {t.name!r} of type {getattr(t.tensor_type, 'name', t.tensor_type)} "
                             f"cannot be dequantized ({e})") from None
        x = out
        if heads:
            x = unpermute_qk_rows(x, heads).contiguous()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{self.path}: tensor {t.name!r} holds non-finite values (corrupted file?)")
        self.bytes_read += int(t.n_bytes)
        return x


def _gguf_config(path: Path):
    """The transformers configuration of a GGUF file (from its metadata; no tensor is read)."""
    tf = require("transformers", "streaming a GGUF file")
    cfg = tf.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    return cfg


def quantize_gguf_streaming(path: Union[str, os.PathLike], sink, **kw: Any) -> Dict[str, Any]:
    """:func:`lowbit.model.streaming.quantize_streaming` of the GGUF file ``path`` (same arguments and summary)."""
    return quantize_streaming(GGUFReader(str(path)), sink, **kw)


__all__ = ["GGUFReader", "quantize_gguf_streaming"]
