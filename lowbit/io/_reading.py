"""Reading checkpoints safely: JSON files, safetensors headers and tensors, Hugging Face folders and their
configs (split from :mod:`lowbit.io._files`, which re-exports every name)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from lowbit._deps import require
from lowbit.model.file_checks import (  # noqa: F401  (re-exported: lowbit.io._files is where io code finds them)
    DIR_CHECKSUMS,
    FILE_CHECKSUM_SUFFIX,
    CheckpointError,
    check_checksums,
    check_dir_checksums,
    check_file_checksum,
    file_checksum_path,
    parse_checksums,
    sha256_file,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
DEFAULT_MAX_SHARD_SIZE = 2 * 1024 ** 3  # bytes


# ---------------------------------------------------------------------------------------------
# reading JSON safely


def read_json_file(path: PathLike, what: str = "file") -> Any:
    """Parse a JSON file; any I/O, encoding or syntax problem is a one-line :class:`CheckpointError`."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupted {what}, not valid JSON ({msg[:200]})") from None


def read_json_object(path: PathLike, what: str = "file") -> Dict[str, Any]:
    obj = read_json_file(path, what)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: corrupted {what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _safetensors_error():
    st = require("safetensors", "reading safetensors checkpoints")
    return st.SafetensorError


#: safetensors dtype names -> bytes per element
ST_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1}


def read_safetensors_header(path: PathLike) -> Tuple[Dict[str, Dict[str, Any]], int]:
    """``({name: {"dtype", "shape", "data_offsets"}}, data start)`` of a safetensors file, validated.

    Checks what the format defines: the header length, JSON, every entry's dtype, shape and
    offsets (inside the file, matching the dtype and shape, contiguous without holes or overlaps).
    Any violation raises :class:`CheckpointError` naming the file (and the tensor).
    """
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_n = f.read(8)
            if len(raw_n) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
            n = int.from_bytes(raw_n, "little")
            if n <= 0 or n > size - 8:
                raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size "
                                      f"({size} bytes): truncated or not a safetensors file")
            header = json.loads(f.read(n).decode("utf-8"))
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable safetensors header, corrupted ({msg[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_len = size - 8 - n
    out: Dict[str, Dict[str, Any]] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise CheckpointError(f"{path}: corrupted safetensors header (__metadata__ is not a string map)")
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: tensor {name!r}: corrupted header entry")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in ST_DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype {dt!r} (corrupted header)")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r}: invalid shape {shape!r} (corrupted header)")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                   for o in offs)):
            raise CheckpointError(f"{path}: tensor {name!r}: invalid data_offsets {offs!r} (corrupted header)")
        a, b = offs
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= a <= b <= data_len:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offs} outside the data section "
                                  f"({data_len} bytes): truncated or corrupted")
        if b - a != numel * ST_DTYPE_SIZES[dt]:
            raise CheckpointError(f"{path}: tensor {name!r}: {b - a} bytes for {dt} {shape} "
                                  f"({numel * ST_DTYPE_SIZES[dt]} expected): corrupted header")
        out[name] = {"dtype": dt, "shape": shape, "data_offsets": [a, b]}
        spans.append((a, b, name))
    pos = 0
    for a, b, name in sorted(spans):
        if a != pos:
            raise CheckpointError(f"{path}: tensor {name!r}: data starts at {a}, expected {pos} "
                                  f"({'overlap' if a < pos else 'hole'} in the data section: corrupted header)")
        pos = b
    if pos != data_len:
        raise CheckpointError(f"{path}: the tensors cover {pos} of {data_len} data bytes "
                              "(trailing bytes: corrupted or not a safetensors file)")
    return out, 8 + n


def read_safetensors(path: PathLike, names: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Tensors of one safetensors file; a truncated or corrupted file raises :class:`CheckpointError`."""
    st = require("safetensors", "reading safetensors checkpoints")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    header, _ = read_safetensors_header(path)
    if names is not None:
        names = list(names)
        for k in names:
            if k not in header:
                raise CheckpointError(f"{path}: tensor {k!r} missing")
    err = st.SafetensorError
    try:
        with st.safe_open(str(path), framework="pt") as f:
            keys = list(f.keys()) if names is None else names
            return {k: f.get_tensor(k) for k in keys}
    except (err, OSError, RuntimeError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {msg}") from None


def read_safetensors_metadata(path: PathLike) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """``{name: (dtype name, shape)}`` from a safetensors header, without reading the data."""
    header, _ = read_safetensors_header(path)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def hf_weight_files(directory: PathLike) -> List[Path]:
    """The safetensors files of a Hugging Face style directory (through the index when sharded)."""
    return list(dict.fromkeys(_hf_weight_map(Path(directory))[1]))


def _hf_weight_map(directory: Path) -> Tuple[Optional[Dict[str, str]], List[Path]]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        doc = read_json_object(index, "safetensors index")
        wm = doc.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{index}: corrupted index (no 'weight_map' of tensor -> file names)")
        for f in set(wm.values()):
            if os.path.isabs(f) or ".." in Path(f).parts:
                raise CheckpointError(f"{index}: file {f!r} is outside the checkpoint")
        return wm, [directory / f for f in dict.fromkeys(wm.values())]
    single = directory / "model.safetensors"
    if single.is_file():
        return None, [single]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{single}: missing (no .safetensors file and no model.safetensors.index.json in "
                              f"{directory})")
    return None, found


def read_hf_tensors_with_origin(directory: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Path]]:
    """All tensors of a Hugging Face style directory and the file each one came from.

    A tensor stored twice, or placed by the index in a file that does not hold it, is an error.
    """
    directory = Path(directory)
    wm, files = _hf_weight_map(directory)
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, Path] = {}
    for f in files:
        for k, v in read_safetensors(f).items():
            if k in out:
                raise CheckpointError(f"{f}: tensor {k!r} is also stored in {origin[k].name}")
            if wm is not None and wm.get(k) != f.name:
                raise CheckpointError(f"{f}: tensor {k!r} is not listed for this file in model.safetensors.index.json")
            out[k] = v
            origin[k] = f
    if wm is not None:
        for k, fname in wm.items():
            if k not in out:
                raise CheckpointError(f"{directory / fname}: tensor {k!r} missing (listed in "
                                      "model.safetensors.index.json)")
    return out, origin


def read_hf_tensors(directory: PathLike) -> Dict[str, torch.Tensor]:
    """All tensors of a Hugging Face style directory."""
    return read_hf_tensors_with_origin(directory)[0]


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


def _check_config_types(cfg_dict: Mapping[str, Any], cls) -> None:
    """Values whose type contradicts the config class's default (a list where a number belongs ...):
    transformers accepts them and fails later, inside ``forward``."""
    try:
        defaults = cls()
    except Exception:  # noqa: BLE001 - a config class without usable defaults: nothing to compare
        return
    for key, value in cfg_dict.items():
        default = getattr(defaults, key, None)
        if default is None or value is None or key.startswith("_"):
            continue
        number = (int, float)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, number):
            ok = isinstance(value, number) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise CheckpointError(f"config key {key!r} is {value!r}, expected a {type(default).__name__} (corrupted)")


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
    _check_config_types(cfg_dict, type(cfg))
    arch = (cfg_dict.get("architectures") or [None])[0]
    if arch is not None and not isinstance(arch, str):
        raise CheckpointError(f"the model config's architectures {cfg_dict.get('architectures')!r} is not a list of "
                              "class names (corrupted)")
    cls = getattr(tf, arch, None) if arch else None
    with acc.init_empty_weights():
        if cls is not None:
            model = cls(cfg)
        else:
            model = tf.AutoModelForCausalLM.from_config(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
