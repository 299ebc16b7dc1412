"""``lowbit verify``: check files lowbit wrote against the checksums it wrote with them.

* a native checkpoint directory: the index (and its own digest), every file's size and sha256,
  every tensor's header entry against the index, per-tensor digests naming a corrupted tensor,
  the quantization map (version included), without building the model;
* a directory exported as GPTQ / AWQ / compressed-tensors: its ``lowbit-checksums.sha256`` and the
  structure its reader checks (tensor dtypes and shapes against the config);
* a GGUF file: its ``<file>.lowbit-sha256`` sidecar and :func:`lowbit.io.gguf.check_gguf`;
* any directory: every checkpoint and GGUF file directly inside it (the layout ``lowbit quantize
  --format native,gguf,gptq,compressed-tensors`` writes).

Files without a lowbit checksum (written by other tools) get the structural checks only, which the
report says (``"checksum": False``).

Example::

    >>> from lowbit.io.verify import verify
    >>> verify("out")                    # doctest: +SKIP
    [{'path': 'out', 'kind': 'lowbit-native', 'files': 4, 'checksum': True}, ...]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from lowbit.io._files import (
    DIR_CHECKSUMS,
    CheckpointError,
    PathLike,
    check_checksums,
    check_file_checksum,
    file_checksum_path,
    read_hf_tensors_with_origin,
    read_json_object,
    read_safetensors_header,
    recover_interrupted,
)

__all__ = ["verify", "verify_all"]


def _native(d: Path) -> Dict[str, Any]:
    from lowbit.io import native

    index = native.read_index(d)
    native._check_files(d, index, True)
    native.read_quantization_map(d)
    by_file: Dict[str, list] = {}
    for name, info in index["tensors"].items():
        by_file.setdefault(info["file"], []).append(name)
    for fname, names in by_file.items():
        header, _ = read_safetensors_header(d / fname)
        for n in names:
            h = header.get(n)
            if h is None:
                raise CheckpointError(f"{d / fname}: tensor {n!r} missing")
            want = index["tensors"][n]
            if list(h["shape"]) != list(want["shape"]):
                raise CheckpointError(f"{d / fname}: tensor {n!r} has shape {h['shape']}, the index says "
                                      f"{want['shape']}")
    return {"kind": native.FORMAT_NAME, "files": len(index["files"]), "checksum": True}


def _hf_dir(d: Path) -> Dict[str, Any]:
    checked = check_checksums(d / DIR_CHECKSUMS) if (d / DIR_CHECKSUMS).is_file() else None
    kind = "safetensors"
    if (d / "config.json").is_file():
        cfg = read_json_object(d / "config.json", "config")
        qc = cfg.get("quantization_config")
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if method in ("gptq", "awq", "compressed-tensors"):
            from lowbit.io.compressed_tensors import read_compressed_tensors
            from lowbit.io.gptq import read_awq, read_gptq

            {"gptq": read_gptq, "awq": read_awq, "compressed-tensors": read_compressed_tensors}[method](d)
            kind = method
        elif any(d.glob("*.safetensors")):
            read_hf_tensors_with_origin(d)
    elif any(d.glob("*.safetensors")):
        read_hf_tensors_with_origin(d)
    return {"kind": kind, "files": len(checked) if checked is not None else None, "checksum": checked is not None}


def _file(p: Path) -> Dict[str, Any]:
    if p.suffix == ".gguf":
        from lowbit.io.gguf import check_gguf

        check_gguf(p)
        return {"kind": "gguf", "files": 1, "checksum": file_checksum_path(p).is_file()}
    has = check_file_checksum(p)
    if p.suffix == ".safetensors":
        read_safetensors_header(p)
    elif p.suffix == ".json":
        read_json_object(p)
    if not has and p.suffix not in (".safetensors", ".json"):
        raise CheckpointError(f"{p}: no lowbit checksum ({file_checksum_path(p).name}) to check it against")
    return {"kind": p.suffix.lstrip(".") or "file", "files": 1, "checksum": has}


def _is_checkpoint_dir(d: Path) -> bool:
    return any((d / n).is_file() for n in ("lowbit_index.json", DIR_CHECKSUMS, "config.json")) or \
        any(d.glob("*.safetensors"))


def _targets(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    out = []
    if _is_checkpoint_dir(path):
        out.append(path)
    for p in sorted(path.iterdir()):
        if p.is_file() and p.suffix == ".gguf":
            out.append(p)
        elif p.is_dir() and not p.name.startswith(".") and _is_checkpoint_dir(p):
            out.append(p)
    return out


def verify_all(path: PathLike) -> List[Dict[str, Any]]:
    """Check everything under ``path``; one result per checkpoint or file, with ``"error"`` (one line
    naming the file) for the bad ones. Raises :class:`CheckpointError` when there is nothing to check."""
    path = Path(path)
    if not path.exists():
        recover_interrupted(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    targets = _targets(path)
    if not targets:
        raise CheckpointError(f"{path}: no lowbit checkpoint, export or checksum file found to verify")
    results = []
    for t in targets:
        from lowbit.io import native

        try:
            if t.is_file():
                r = _file(t)
            elif native.has_marker(t):
                r = _native(t)
            else:
                r = _hf_dir(t)
            r["path"] = str(t)
        except CheckpointError as e:
            r = {"path": str(t), "error": str(e).splitlines()[0]}
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, json.JSONDecodeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            r = {"path": str(t), "error": f"{t}: {msg}"}
        results.append(r)
    return results


def verify(path: PathLike) -> List[Dict[str, Any]]:
    """Like :func:`verify_all`, but raises :class:`CheckpointError` (naming the file) at the first bad one."""
    results = verify_all(path)
    for r in results:
        if "error" in r:
            raise CheckpointError(r["error"])
    return results


class _CallableModule(__import__("types").ModuleType):
    """``lowbit.io.verify(path)`` works whether or not this module was imported (then it is the attribute)."""

    def __call__(self, path: PathLike) -> List[Dict[str, Any]]:
        return verify(path)


__import__("sys").modules[__name__].__class__ = _CallableModule
