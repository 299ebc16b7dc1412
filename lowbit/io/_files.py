"""File plumbing shared by lowbit's checkpoint writers: atomic writes, safetensors shards, HF configs.

Every file is written to a temporary name in its destination directory, flushed and ``fsync``-ed,
then renamed into place with :func:`os.replace` (atomic on POSIX and Windows). A checkpoint
directory additionally has a *marker* file (``lowbit_index.json`` for the native format,
``config.json`` for Hugging Face style exports) that is removed before anything else is written
and written last, so an interrupted save never leaves a directory that loads as valid.

Tensors are stored with safetensors only (no pickle; loading never executes code), in shards of
at most ``max_shard_size`` bytes with Hugging Face's ``*.safetensors.index.json`` when there is
more than one shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from lowbit._deps import require

PathLike = Union[str, os.PathLike]
DEFAULT_MAX_SHARD_SIZE = 2 * 1024 ** 3  # bytes


class CheckpointError(ValueError):
    """A checkpoint directory or file that is incomplete, corrupted or inconsistent."""


# ---------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _temp_path(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; final files get the usual permissions
    return Path(tmp)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """``json.dumps(obj, indent=2, sort_keys=True)`` written atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_marker(path: PathLike) -> None:
    """Delete a checkpoint's marker before rewriting the checkpoint (so that it is invalid meanwhile)."""
    path = Path(path)
    if path.exists():
        path.unlink()
        _fsync_dir(path.parent)


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# safetensors shards


def _storage_key(t: torch.Tensor) -> Tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def dedupe_tensors(tensors: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Drop exact duplicates (tied weights): ``(unique tensors, {alias: kept name})``.

    Tensors that share storage without being the same view are cloned (safetensors refuses shared
    storage). Every returned tensor is contiguous and on the CPU.
    """
    seen: Dict[Tuple, str] = {}
    storages: Dict[int, str] = {}
    out: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no data to save")
        t = t.detach()
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in storages:
            t = t.clone()
        elif ptr is not None:
            storages[ptr] = name
        out[name] = t.to("cpu").contiguous()
    return out, aliases


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_size: int) -> List[List[str]]:
    """Names per shard, in order, each shard at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    if not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r}: must be a positive number of bytes")
    shards: List[List[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def shard_names(prefix: str, count: int) -> List[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Dict[str, str]] = None) -> Path:
    """One safetensors file, written atomically."""
    st = require("safetensors.torch", "writing safetensors checkpoints")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        st.save_file(dict(tensors), str(tmp), metadata=metadata)
        os.chmod(tmp, _FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_sharded(directory: PathLike, tensors: Mapping[str, torch.Tensor], prefix: str = "model",
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, metadata: Optional[Dict[str, str]] = None,
                  hf_index: bool = True) -> Dict[str, str]:
    """Write ``tensors`` (already deduplicated, contiguous) as shards; returns ``{tensor name: file name}``.

    With more than one shard and ``hf_index``, ``{prefix}.safetensors.index.json`` (Hugging Face's
    ``weight_map``) is written too. Shard files of an earlier save with the same prefix that are not
    part of this one are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    groups = plan_shards(tensors, max_shard_size)
    names = shard_names(prefix, len(groups))
    weight_map: Dict[str, str] = {}
    for fname, group in zip(names, groups):
        write_safetensors(directory / fname, {k: tensors[k] for k in group}, metadata)
        weight_map.update({k: fname for k in group})
    index = directory / f"{prefix}.safetensors.index.json"
    if len(names) > 1 and hf_index:
        total = sum(_nbytes(t) for t in tensors.values())
        atomic_write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    elif index.exists():
        index.unlink()
    keep = set(names)
    for old in directory.glob(f"{prefix}*.safetensors"):
        if old.name not in keep and (old.name == f"{prefix}.safetensors" or old.name.startswith(f"{prefix}-")):
            old.unlink()
    return weight_map


def _safetensors_error():
    st = require("safetensors", "reading safetensors checkpoints")
    return st.SafetensorError


def read_safetensors(path: PathLike, names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Tensors of one safetensors file; a truncated or corrupted file raises :class:`CheckpointError`."""
    st = require("safetensors", "reading safetensors checkpoints")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    err = st.SafetensorError
    try:
        with st.safe_open(str(path), framework="pt") as f:
            keys = list(f.keys()) if names is None else list(names)
            return {k: f.get_tensor(k) for k in keys}
    except (err, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None


def read_safetensors_metadata(path: PathLike) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """``{name: (dtype name, shape)}`` from a safetensors header, without reading the data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > os.path.getsize(path) - 8:
                raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size "
                                      f"({os.path.getsize(path)} bytes): truncated or not a safetensors file")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header: {e}") from None
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def hf_weight_files(directory: PathLike) -> List[Path]:
    """The safetensors files of a Hugging Face style directory (through the index when sharded)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        return [directory / f for f in dict.fromkeys(wm.values())]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{directory}: no .safetensors files found")
    return found


def read_hf_tensors(directory: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a Hugging Face style directory."""
    out: Dict[str, torch.Tensor] = {}
    for f in hf_weight_files(directory):
        out.update(read_safetensors(f))
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face configs and empty models


def hf_config_dict(model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """The model's Hugging Face config as a dict (None for models without a ``config``)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    d = cfg.to_dict()
    d.pop("quantization_config", None)
    if d.get("dtype", d.get("torch_dtype")) is None:
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        if floats:
            set_config_dtype(d, max(set(floats), key=floats.count))
    if getattr(cfg, "architectures", None) in (None, []):
        d["architectures"] = [type(model).__name__]
    if not d.get("model_type"):  # AutoConfig / AutoModel refuse a config.json without it
        mt = getattr(type(cfg), "model_type", None) or getattr(getattr(type(model), "config_class", None),
                                                                 "model_type", None)
        if mt:
            d["model_type"] = mt
    return d


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def set_config_dtype(cfg: Dict[str, Any], dtype: torch.dtype) -> None:
    """Record the checkpoint's float dtype (``dtype`` for transformers >= 5, ``torch_dtype`` before)."""
    cfg["dtype"] = torch_dtype_name(dtype)
    cfg["torch_dtype"] = torch_dtype_name(dtype)


def empty_hf_model(config: Mapping[str, Any], dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """A Hugging Face model built from a config dict with parameters on the meta device.

    Buffers (rotary tables) are real, as :func:`lowbit.requantize` needs. The class is the
    config's first ``architectures`` entry (else ``AutoModelForCausalLM``).
    """
    tf = require("transformers", "rebuilding a Hugging Face model from its config")
    acc = require("accelerate", "building an empty model")
    cfg_dict = {k: v for k, v in dict(config).items() if k != "quantization_config"}
    model_type = cfg_dict.get("model_type")
    if model_type is None:
        raise CheckpointError("the model config has no 'model_type'; pass a model_factory to build the model")
    cfg = tf.AutoConfig.for_model(**cfg_dict)
    arch = (cfg_dict.get("architectures") or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    with acc.init_empty_weights():
        if cls is not None:
            model = cls(cfg)
        else:
            model = tf.AutoModelForCausalLM.from_config(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
