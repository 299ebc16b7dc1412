"""A native checkpoint (:mod:`lowbit.io.native`) written one block at a time, for streaming quantization.

:func:`lowbit.model.streaming.quantize_streaming` hands every finished decoder block to
:meth:`NativeStreamWriter.write` (one safetensors shard per block, written at once, so the block can be
dropped) and the rest of the model to :meth:`NativeStreamWriter.finish` (the last shard, the
quantization map, the config and the index, written last as the marker). The directory is replaced
atomically when the ``with`` block ends without an error, as :func:`lowbit.io.native.save` does; the
result loads with :func:`lowbit.load` like any native checkpoint.

Example::

    >>> with NativeStreamWriter("out") as sink:                                       # doctest: +SKIP
    ...     summary = quantize_streaming("model_dir", sink, method="gptq", calib_dataset=ids)
    >>> model = lowbit.load("out")                                                    # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from lowbit.io import native
from lowbit.io._files import (atomic_directory, atomic_write_json, dedupe_tensors, hf_config_dict, sha256_file,
                              shard_names, tensor_sha256, write_safetensors)


class NativeStreamWriter:
    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        self._ctx = None
        self.tmp: Optional[Path] = None
        self.tensors: Dict[str, Dict[str, Any]] = {}
        self.qmap: Dict[str, Any] = {}
        self.files: list = []
        self.names: list = []
        self.count = 0

    def __enter__(self) -> "NativeStreamWriter":
        self._ctx = atomic_directory(self.directory, owned=native._owned_names(self.directory))
        self.tmp = self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> Any:
        return self._ctx.__exit__(*exc)

    def start(self, n_blocks: int) -> None:
        """The run will write ``n_blocks`` blocks, then the rest (one shard each)."""
        self.names = shard_names(native.SHARD_PREFIX, n_blocks + 1)

    def _write(self, tensors: Dict[str, torch.Tensor], buffers: set) -> None:
        if self.tmp is None:
            raise RuntimeError("NativeStreamWriter is used as a context manager: with NativeStreamWriter(dir) as w")
        fname = self.names[self.count] if self.count < len(self.names) else \
            f"{native.SHARD_PREFIX}-extra-{self.count:05d}.safetensors"
        self.count += 1
        write_safetensors(self.tmp / fname, tensors, {"format": "pt", "producer": native.FORMAT_NAME})
        self.files.append(fname)
        for k, t in tensors.items():
            self.tensors[k] = {"file": fname, "dtype": native._dtype_name(t.dtype), "shape": list(t.shape),
                               "buffer": k in buffers, "sha256": tensor_sha256(t)}

    def write(self, prefix: str, module: nn.Module) -> None:
        """Write one finished block (its state dict and non-persistent buffers, names under ``prefix``)."""
        from lowbit.model.api import quantization_map

        sd = {prefix + k: v for k, v in module.state_dict().items()}
        buffers = {prefix + k: v for k, v in native._nonpersistent_buffers(module).items() if prefix + k not in sd}
        tensors, aliases = dedupe_tensors({**sd, **buffers})
        if aliases:
            raise ValueError(f"block {prefix!r} ties tensors to each other ({aliases}); not supported by streaming")
        self._write(tensors, set(buffers))
        self.qmap.update({prefix + k: v for k, v in quantization_map(module).items()})

    def finish(self, model: nn.Module) -> None:
        """Write the tensors outside the blocks, the quantization map, the config and the index (last)."""
        import lowbit
        from lowbit.model.api import quantization_map

        sd = dict(model.state_dict())
        buffers = {k: v for k, v in native._nonpersistent_buffers(model).items() if k not in sd}
        tensors, aliases = dedupe_tensors({**sd, **buffers})
        self._write(tensors, set(buffers))
        self.qmap.update(quantization_map(model))
        tmp = self.tmp
        files = list(self.files)
        atomic_write_json(tmp / native.QMAP, {"format": native.FORMAT_NAME, "version": native.FORMAT_VERSION,
                                              "quantization_map": dict(sorted(self.qmap.items()))})
        files.append(native.QMAP)
        hf_cfg = hf_config_dict(model)
        model_config = None
        if hf_cfg is not None:
            atomic_write_json(tmp / native.HF_CONFIG, hf_cfg)
            files.append(native.HF_CONFIG)
            model_config = native.HF_CONFIG
        index = {
            "format": native.FORMAT_NAME,
            "version": native.FORMAT_VERSION,
            "lowbit_version": lowbit.__version__,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_config": model_config,
            "tensors": dict(sorted(self.tensors.items())),
            "aliases": aliases,
            "files": {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files},
        }
        index["index_sha256"] = native._index_digest(index)
        atomic_write_json(tmp / native.INDEX, index)


__all__ = ["NativeStreamWriter"]
