"""File plumbing shared by lowbit's checkpoint writers: atomic writes, safetensors shards, HF configs.

Every file is written to a temporary name in its destination directory (``.<name>.lowbit-new-<pid>-*``),
flushed and ``fsync``-ed, then renamed into place with :func:`os.replace` (atomic on POSIX and
Windows). A checkpoint *directory* is written complete into a sibling temporary directory and then
swapped with the target in one step (:func:`atomic_directory`: ``renameat2(RENAME_EXCHANGE)`` on
Linux, else two renames with :func:`recover_interrupted` covering the gap), so a save killed at any
moment leaves the target absent, the previous version or the new one; the next save to the same
target removes what killed saves left behind (:func:`cleanup_stale`). Files of other tools already in
the directory are carried over.

Exports in formats without checksums of their own get a ``sha256sum``-style sidecar
(``lowbit-checksums.sha256`` in a directory, ``<file>.lowbit-sha256`` beside a file) that the
readers and ``lowbit verify`` check. Readers validate what the formats define (safetensors headers:
dtypes, shapes, offsets; JSON) and raise :class:`CheckpointError` with one line naming the file and
the tensor.

Tensors are stored with safetensors only (no pickle; loading never executes code), in shards of
at most ``max_shard_size`` bytes with Hugging Face's ``*.safetensors.index.json`` when there is
more than one shard.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple, Union

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
from lowbit.io._reading import (  # noqa: E402,F401  (moved; importable from here as before)
    read_json_file,
    read_json_object,
    _safetensors_error,
    ST_DTYPE_SIZES,
    read_safetensors_header,
    read_safetensors,
    read_safetensors_metadata,
    hf_weight_files,
    _hf_weight_map,
    read_hf_tensors_with_origin,
    read_hf_tensors,
    hf_config_dict,
    torch_dtype_name,
    set_config_dtype,
    _check_config_types,
    empty_hf_model,
)


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


def _file_mode() -> int:
    """The mode a plain ``open`` would give a new file under the user's current umask."""
    return 0o666 & ~_umask()


def _temp_path(path: Path) -> Path:
    """A new temporary file beside ``path``, named ``.<name>.lowbit-new-<pid>-<random>.tmp`` so that the
    next write of ``path`` can remove the leftovers of a killed process (:func:`cleanup_stale`)."""
    cleanup_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_NEW_TAG}{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _file_mode())  # mkstemp creates 0600; final files get the usual permissions
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


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (contiguous, little-endian, on the CPU)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# atomic directory replacement
#
# A checkpoint directory is written complete into a sibling temporary directory
# ``.<name>.lowbit-new-<pid>-<rand>``, fsync-ed, then swapped with the target in one step:
# ``renameat2(RENAME_EXCHANGE)`` where the kernel and file system offer it (Linux), otherwise
# ``target -> .<name>.lowbit-old-<pid>-<rand>`` and ``new -> target``. The previous version is then
# deleted. A kill at any moment leaves the target absent (fresh save), the previous version, or the
# new one; the only window without a target (between the two renames of the fallback) leaves the
# previous version as ``.lowbit-old-``, which :func:`recover_interrupted` (called by every loader
# and by the next save) renames back. Leftovers of killed saves are removed by the next save to the
# same target.

_NEW_TAG = ".lowbit-new-"
_OLD_TAG = ".lowbit-old-"
_ACTIVE: Set[str] = set()  # temporary directories of saves in progress in this process


def _sibling(target: Path, tag: str) -> Path:
    return target.parent / f".{target.name}{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _siblings(target: Path) -> List[Tuple[Path, str, int]]:
    """``(path, "new"|"old", pid)`` of the temporary siblings of ``target`` left by saves."""
    out = []
    prefix = f".{target.name}"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return out
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        rest = p.name[len(prefix):]
        for tag, kind in ((_NEW_TAG, "new"), (_OLD_TAG, "old")):
            if rest.startswith(tag):
                try:
                    pid = int(rest[len(tag):].split("-", 1)[0])
                except ValueError:
                    continue
                out.append((p, kind, pid))
    return out


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def recover_interrupted(target: PathLike) -> Optional[Path]:
    """Restore ``target`` when a save was killed between the two renames of a directory swap.

    Returns the target when it was restored (with a warning), else None. Nothing happens when the
    target exists or no previous version was left behind.
    """
    target = Path(os.path.abspath(target))
    if target.exists() or target.is_symlink():
        return None
    olds = sorted((p for p, kind, pid in _siblings(target)
                   if kind == "old" and (pid == os.getpid() or not _pid_alive(pid))),
                  key=lambda p: p.stat().st_mtime)
    if not olds:
        return None
    try:
        os.rename(olds[-1], target)
    except OSError as e:
        raise CheckpointError(f"{target} is missing: an interrupted save left its previous version at "
                              f"{olds[-1]}, which could not be restored ({e}); rename it to {target.name}") from None
    _fsync_dir(target.parent)
    logger.warning("%s: restored the previous version left by an interrupted save", target)
    return target


def cleanup_stale(target: PathLike) -> List[Path]:
    """Delete the temporary siblings of ``target`` left by killed saves (never those of a live save)."""
    target = Path(os.path.abspath(target))
    removed = []
    for p, kind, pid in _siblings(target):
        if str(p) in _ACTIVE or (pid != os.getpid() and _pid_alive(pid)):
            continue
        if kind == "old" and not target.exists():
            continue  # the only copy of the previous version: recover_interrupted restores it
        _rmtree(p)
        removed.append(p)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_exchange_ok: Optional[bool] = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    global _exchange_ok
    if _exchange_ok is False:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        _exchange_ok = False
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        _exchange_ok = True
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2 {a} <-> {b}: {os.strerror(err)}")


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _is_legacy_temp(name: str) -> bool:
    """Temporary files of earlier lowbit versions' in-place writes (``.<file>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def _carry_over(src: Path, dst: Path, owned: Callable[[str], bool], top: bool = True) -> None:
    """Hard-link (or copy) every entry of ``src`` that ``dst`` lacks, except top-level ``owned`` names."""
    for p in src.iterdir():
        if (top and owned(p.name)) or _is_legacy_temp(p.name) or _NEW_TAG in p.name or _OLD_TAG in p.name:
            continue
        q = dst / p.name
        if p.is_symlink():
            if not q.exists() and not q.is_symlink():
                os.symlink(os.readlink(p), q)
        elif p.is_dir():
            q.mkdir(exist_ok=True)
            _carry_over(p, q, owned, top=False)
        elif not q.exists():
            try:
                os.link(p, q)
            except OSError:
                shutil.copy2(p, q)


def _swap_into_place(new: Path, target: Path) -> None:
    try:
        cwd = os.getcwd()
    except OSError:  # pragma: no cover
        cwd = None
    inside = cwd is not None and (cwd == str(target) or cwd.startswith(str(target) + os.sep))
    _swap(new, target)
    if inside:  # the process was inside the replaced directory: follow the path to the new one
        with contextlib.suppress(OSError):
            os.chdir(cwd if os.path.isdir(cwd) else target)


def _swap(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        _fsync_dir(target.parent)
        return
    if _exchange(new, target):  # new now holds the previous version
        _fsync_dir(target.parent)
        _rmtree(new)
        return
    old = _sibling(target, _OLD_TAG)
    os.rename(target, old)
    os.rename(new, target)
    _fsync_dir(target.parent)
    _rmtree(old)


@contextlib.contextmanager
def atomic_directory(target: PathLike, owned: Optional[Callable[[str], bool]] = None) -> Iterator[Path]:
    """Write a directory atomically: ``with atomic_directory("ckpt") as tmp: <write files into tmp>``.

    On success the temporary directory replaces ``target`` in one step (see above); on an exception
    it is deleted and ``target`` is untouched. When ``target`` already exists, its entries that the
    new version does not write and that ``owned(name)`` does not claim (files of the previous
    version of the same checkpoint) are carried over (hard links), so that unrelated files in the
    directory (a tokenizer, other exports) are kept, as an in-place write would.
    """
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    cleanup_stale(target)
    tmp = _sibling(target, _NEW_TAG)
    tmp.mkdir()
    _ACTIVE.add(str(tmp))
    try:
        yield tmp
        if target.is_dir():
            _carry_over(target, tmp, owned or (lambda name: False))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
        except OSError:  # pragma: no cover
            pass
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        _rmtree(tmp)
        raise
    finally:
        _ACTIVE.discard(str(tmp))


# ---------------------------------------------------------------------------------------------
# checksum sidecars for exports (formats without checksums of their own)

def _sha256sum_lines(entries: Iterable[Tuple[str, str]]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in entries)


def write_dir_checksums(directory: PathLike, skip: Iterable[str] = ()) -> Path:
    """Write :data:`DIR_CHECKSUMS` listing the sha256 of every file under ``directory``."""
    directory = Path(directory)
    skip = set(skip) | {DIR_CHECKSUMS}
    entries = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and not p.is_symlink() and rel not in skip and not _is_legacy_temp(p.name):
            entries.append((rel, sha256_file(p)))
    return atomic_write_bytes(directory / DIR_CHECKSUMS, _sha256sum_lines(entries).encode())


@contextlib.contextmanager
def replacing_file_with_checksum(path: PathLike, tmp: PathLike) -> Iterator[None]:
    """Publish ``tmp`` (complete) as ``path`` together with its sidecar, safely against kills.

    The sidecar first accepts the new digest besides the current file's, then the file is
    renamed into place, then the sidecar keeps the new digest only: at every moment the file on
    disk matches its sidecar.
    """
    path, tmp = Path(path), Path(tmp)
    side = file_checksum_path(path)
    new = sha256_file(tmp)
    accepted = [(path.name, new)]
    if path.is_file():
        accepted.append((path.name, sha256_file(path)))
    atomic_write_bytes(side, _sha256sum_lines(accepted).encode())
    yield
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    atomic_write_bytes(side, _sha256sum_lines([(path.name, new)]).encode())


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


def _sort_safetensors_metadata(path: Path) -> None:
    """safetensors writes ``__metadata__`` from a hash map, in an order that changes from process to process:
    rewrite it in sorted key order (same keys, same length) so that equal checkpoints are equal bytes."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        meta = json.loads(raw).get("__metadata__")
        if not meta or len(meta) < 2:
            return
        old = json.dumps(meta, separators=(",", ":")).encode()
        new = json.dumps(dict(sorted(meta.items())), separators=(",", ":")).encode()
        at = raw.find(old)
        if at >= 0 and len(old) == len(new) and old != new:
            f.seek(8 + at)
            f.write(new)


def write_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Dict[str, str]] = None) -> Path:
    """One safetensors file, written atomically."""
    st = require("safetensors.torch", "writing safetensors checkpoints")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        st.save_file(dict(tensors), str(tmp), metadata=metadata)
        _sort_safetensors_metadata(tmp)
        os.chmod(tmp, _file_mode())
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


