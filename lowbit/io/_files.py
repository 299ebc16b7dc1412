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
