"""Quantize a model stored as safetensors shards without ever holding it whole in memory.

The skeleton is built on the meta device (parameters without storage; buffers such as rotary tables
real); the tensors outside the decoder blocks (embeddings, final norm, head) are read; then each
block's weights are read from the shards when its turn comes, the block is quantized (calibrated
methods through the micro-batched pipeline of :mod:`lowbit.model.sequential`), handed to ``sink``
(which writes it out) and dropped before the next block is read. Peak host memory is about the
non-block tensors + one float block + its quantized copy + the calibration state (the block inputs
and outputs of every sample, or ``max_memory`` of them with the rest spilled to files).

Tensors are read with plain file reads (no memory map), so the address space stays bounded too
(``ulimit -v``). A GGUF file (a Llama-family model, e.g. ``--model default``) streams the same way through
a reader passed as the source, :class:`lowbit.io.gguf_stream.GGUFReader`: the configuration comes from its
metadata, and each tensor is dequantized from the file when its block's turn comes.

The writer lives with the formats (:class:`lowbit.io.stream.NativeStreamWriter`): this module only
calls ``sink.write(prefix, module)`` for every finished block, then ``sink.finish(model)`` with the
rest of the model (its blocks emptied).

Example::

    >>> from lowbit.io.stream import NativeStreamWriter                       # doctest: +SKIP
    >>> with NativeStreamWriter("out") as sink:                               # doctest: +SKIP
    ...     quantize_streaming("Llama-3-8B/", sink, method="gptq", calib_dataset=ids)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorReader:
    """What the streaming loop reads tensors through: ``entries`` by name (each reader's own record),
    ``in``, ``names``, ``nbytes`` / ``get`` (per reader) and the running ``bytes_read``."""

    entries: Dict[str, Any]
    bytes_read: int = 0

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> List[str]:
        return list(self.entries)


class ShardReader(TensorReader):
    """Tensors of a Hugging Face safetensors directory (``model.safetensors.index.json`` + shards, or one
    ``model.safetensors``), read one at a time by name with ``seek`` + ``readinto``."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index (no 'weight_map'): {e}") from None
        elif (self.dir / "model.safetensors").is_file():
            wm = None
        else:
            raise ValueError(f"{self.dir}: no model.safetensors.index.json nor model.safetensors")
        files = sorted(set(wm.values())) if wm is not None else ["model.safetensors"]
        self.entries: Dict[str, Tuple[Path, str, Tuple[int, ...], int, int]] = {}
        for fname in files:
            if os.path.isabs(fname) or ".." in Path(fname).parts:
                raise ValueError(f"{index}: shard {fname!r} is outside the directory")
            path = self.dir / fname
            for name, (dt, shape, a, b) in _header(path).items():
                self.entries[name] = (path, dt, shape, a, b)
        if wm is not None:
            missing = [k for k in wm if k not in self.entries]
            if missing:
                raise ValueError(f"{index}: tensor {missing[0]!r} is not in its shard {wm[missing[0]]!r}")
        self.bytes_read = 0

    def nbytes(self, name: str) -> int:
        _, _, _, a, b = self.entries[name]
        return b - a

    def get(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise KeyError(f"{self.dir}: no tensor {name!r} in the shards")
        path, dt, shape, a, b = self.entries[name]
        out = torch.empty(shape, dtype=_ST_DTYPES[dt])
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(path, "rb") as f:
            f.seek(a)
            if f.readinto(buf) != b - a:
                raise ValueError(f"{path}: tensor {name!r} truncated")
        self.bytes_read += b - a
        return out


def _open_source(source):
    """``(reader, config or None)`` of a safetensors directory, or a reader object (e.g.
    :class:`lowbit.io.gguf_stream.GGUFReader`) with ``names``/``get``/``nbytes``/``bytes_read`` and a ``config``."""
    if not isinstance(source, (str, os.PathLike)):
        if not all(hasattr(source, a) for a in ("names", "get", "nbytes", "config")):
            raise TypeError(f"source {type(source).__name__}: expected a safetensors directory or a reader "
                            f"(names, get, nbytes, config), e.g. lowbit.io.gguf_stream.GGUFReader")
        return source, source.config
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ValueError(f"{path}: a GGUF file streams through its reader: "
                         f"quantize_streaming(lowbit.io.gguf_stream.GGUFReader(path), sink, ...) or "
                         f"lowbit.io.gguf_stream.quantize_gguf_streaming(path, sink, ...)")
    if path.is_file():
        raise ValueError(f"{path}: a file but not a .gguf; streaming reads a safetensors directory or a GGUF file")
    return ShardReader(str(path)), None


def _header(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...], int, int]]:
    size = path.stat().st_size if path.is_file() else -1
    if size < 8:
        raise ValueError(f"{path}: missing or too short for a safetensors file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > size - 8:
            raise ValueError(f"{path}: safetensors header length {n} exceeds the file size ({size} bytes)")
        try:
            head = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    start = 8 + n
    out = {}
    for name, v in head.items():
        if name == "__metadata__":
            continue
        dt, shape, (a, b) = v["dtype"], tuple(v["shape"]), v["data_offsets"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dt!r}, which streaming does not read")
        numel = 1
        for s in shape:
            numel *= s
        if b - a != numel * _ST_DTYPES[dt].itemsize or start + b > size:
            raise ValueError(f"{path}: tensor {name!r} has offsets [{a}, {b}) that do not match its shape/file")
        out[name] = (dt, shape, start + a, start + b)
    return out


def _empty_model(directory: Path, dtype: Optional[torch.dtype], cfg=None) -> nn.Module:
    """The model of ``directory/config.json`` (or of ``cfg``) with its parameters on the meta device (buffers real)."""
    from lowbit._deps import require

    tf = require("transformers", "streaming quantization")
    acc = require("accelerate", "building an empty model")
    from lowbit.model.loading import _dtype_kwargs
    if cfg is None:
        cfg = tf.AutoConfig.from_pretrained(str(directory))
    with acc.init_empty_weights():
        model = tf.AutoModelForCausalLM.from_config(cfg, **_dtype_kwargs(dtype)) if dtype is not None else \
            tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def _set_tensor(root: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, key = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if key in mod._parameters:
        mod._parameters[key] = nn.Parameter(t, requires_grad=False)
    elif key in mod._buffers:
        mod._buffers[key] = t
    else:
        raise ValueError(f"the model has no tensor {name!r} (found in the shards)")


def _load_tensors(root: nn.Module, reader: ShardReader, prefix: str, dtype: Optional[torch.dtype]) -> int:
    """Read every parameter/persistent buffer of ``root`` (names under ``prefix`` in the shards); bytes read."""
    n = 0
    persistent = [(k, t) for k, t in root.state_dict(keep_vars=True).items()]
    seen = set()
    for k, t in persistent:
        if id(t) in seen:
            continue
        seen.add(id(t))
        full = prefix + k
        if full not in reader:
            if t.device.type == "meta":
                raise ValueError(f"{reader.dir}: tensor {full!r} of the model is not in the shards")
            continue
        x = reader.get(full)
        if tuple(x.shape) != tuple(t.shape):
            raise ValueError(f"{reader.dir}: tensor {full!r} has shape {tuple(x.shape)}, the model expects "
                             f"{tuple(t.shape)}")
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        _set_tensor(root, k, x)
        n += x.numel() * x.element_size()
    return n


class _Sized:
    """What the run's summary needs of a quantized state that has been written out and dropped."""

    def __init__(self, st) -> None:
        self.nbytes, self.numel = st.nbytes, st.numel


class BlockStream:
    """The pipeline's hook (``_RunConfig.stream``): reads block ``i`` before its turn, writes and drops it after."""

    def __init__(self, model: nn.Module, reader: ShardReader, blocks_name: str, sink, dtype) -> None:
        self.model, self.reader, self.blocks_name, self.sink, self.dtype = model, reader, blocks_name, sink, dtype
        self.block_bytes = 0
        self.peak_rss = 0
        self.linears: List[nn.Module] = []

    def load_block(self, i: int, block: nn.Module, prefix: str) -> None:
        self.block_bytes = max(self.block_bytes, _load_tensors(block, self.reader, prefix, self.dtype))
        # the pipeline keeps references to the float linears it replaces: emptied in finish_block
        self.linears = [m for m in block.modules() if isinstance(m, nn.Linear)]

    def finish_block(self, i: int, block: nn.Module, prefix: str, states: Dict[str, Any]) -> None:
        from lowbit.model.offload import current_rss

        self.peak_rss = max(self.peak_rss, current_rss())
        self.sink.write(prefix, block)
        for n in states:  # the summary keeps sizes only
            states[n] = _Sized(states[n])
        blocks = self.model.get_submodule(self.blocks_name)
        blocks[i] = nn.Module()  # drop the block (its quantized states included)
        for m in self.linears:  # and the float weights of the replaced linears
            for key, t in list(m._parameters.items()):
                if t is not None:
                    m._parameters[key] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"),
                                                      requires_grad=False)
        self.linears = []


def _vm_peak() -> int:
    """The process's peak address-space size (``VmPeak``, what ``ulimit -v`` bounds), 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset the process's ``VmHWM`` (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def quantize_streaming(directory: str, sink, method: str = "gptq", bits: int = 4, group_size: int = 128,
                       sym: bool = True, include: Optional[Sequence[str]] = None,
                       exclude: Optional[Sequence[str]] = ("lm_head",), calib_dataset: Any = None,
                       n_samples: int = 128, seq_len: int = 512, seed: int = 0, tokenizer: Any = None,
                       dtype: Optional[torch.dtype] = None, progress: bool = True, **kw: Any) -> Dict[str, Any]:
    """Quantize the safetensors model in ``directory`` (or read by the reader ``directory``, see the module doc)
    block by block, writing through ``sink``; returns the
    run's summary (``quantize_model_ptq``'s, plus ``peak_rss_bytes``: the process's peak resident memory
    during the run, ``max_block_bytes``, ``streamed_bytes``). ``kw``: ``quantize_model_ptq``'s other
    arguments (``micro_batch``, ``max_memory``, method options...)."""
    from lowbit.model.plan import measure_peak_rss
    from lowbit.model.sequential import CALIBRATED, _select_linears, find_blocks, quantize_model_ptq

    if kw.get("checkpoint_dir") or kw.get("resume"):
        raise ValueError("streaming quantization does not write per-block checkpoints (resume): drop "
                         "checkpoint_dir/resume")
    t0 = time.perf_counter()
    reset = reset_peak_rss()
    reader, cfg = _open_source(directory)
    directory = Path(getattr(reader, "dir", directory))
    model = _empty_model(directory, dtype, cfg)
    blocks_name, blocks = find_blocks(model)
    if blocks is None:
        raise ValueError(f"{directory}: no list of decoder blocks found; load this model whole instead")
    # the tensors outside the blocks
    inside_ids = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for name, t in list(model.state_dict(keep_vars=True).items()):
        if id(t) in inside_ids or name not in reader:
            continue  # a block's (read in its turn), or tied (lm_head) / absent: checked after tie_weights
        x = reader.get(name)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        _set_tensor(model, name, x)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in inside_ids]
    if left:
        raise ValueError(f"{directory}: tensor {left[0]!r} is not in the shards")
    selected = _select_linears(model, include, exclude)
    prefix_all = blocks_name + "."
    if any(not n.startswith(prefix_all) for n in selected):
        bad = next(n for n in selected if not n.startswith(prefix_all))
        raise ValueError(f"streaming quantizes the decoder blocks only; {bad!r} is outside them (exclude it)")
    stream = BlockStream(model, reader, blocks_name, sink, dtype)
    if hasattr(sink, "start"):
        sink.start(len(blocks))
    if method.lower() in CALIBRATED:
        quantize_model_ptq(model, method=method, bits=bits, group_size=group_size, sym=sym, include=include,
                           exclude=exclude, calib_dataset=calib_dataset, n_samples=n_samples, seq_len=seq_len,
                           seed=seed, tokenizer=tokenizer, progress=progress, pipeline="staged", _stream=stream, **kw)
        summary = dict(model.ptq_summary)
    else:  # data-free: block by block, layer by layer
        model = quantize_model_ptq(model, method=method, bits=bits, group_size=group_size, sym=sym,
                                   include=include, exclude=exclude, progress=progress, _stream=stream, **kw)
        summary = dict(model.ptq_summary)
    sink.finish(model)
    summary.update(peak_rss_bytes=measure_peak_rss(), peak_vm_bytes=_vm_peak(), peak_rss_reset=reset, max_block_bytes=stream.block_bytes,
                   streamed_bytes=reader.bytes_read, time_s=time.perf_counter() - t0, streaming=True)
    return summary


__all__ = ["ShardReader", "BlockStream", "quantize_streaming", "reset_peak_rss"]
