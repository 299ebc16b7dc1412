"""Integrity checks shared by lowbit's loaders (model level) and its checkpoint writers (``lowbit.io``).

:class:`CheckpointError` is the one error type for a file or directory that is incomplete,
corrupted or inconsistent; its message is one line naming the file (and the tensor). Here live the
checks that :mod:`lowbit.model.loading` needs below the ``io`` layer: checksum sidecars written by
lowbit's exporters (``sha256sum`` format) and the structural validation of GGUF files
(:func:`check_gguf`). ``lowbit.io._files`` and ``lowbit.io.gguf`` re-export them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Set, Union

import numpy as np

from lowbit._deps import require
from lowbit.formats import gguf as fmt

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint directory or file that is incomplete, corrupted or inconsistent."""


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


#: the checksum file inside an exported directory (``sha256sum -c`` format, paths relative to it)
DIR_CHECKSUMS = "lowbit-checksums.sha256"
#: the suffix of the checksum file beside an exported single file (``model.gguf.lowbit-sha256``)
FILE_CHECKSUM_SUFFIX = ".lowbit-sha256"


def parse_checksums(path: PathLike) -> Dict[str, Set[str]]:
    """``{relative file name: {accepted sha256}}`` of a checksum file (``sha256sum`` format)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checksum file ({e})") from None
    out: Dict[str, Set[str]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, sep, name = line.partition("  ")
        name = name.lstrip("*")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise CheckpointError(f"{path}: line {i} is not '<sha256>  <file>' (corrupted checksum file)")
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: line {i} names {name!r}, outside the checkpoint")
        out.setdefault(name, set()).add(digest)
    if not out:
        raise CheckpointError(f"{path}: empty checksum file")
    return out


def check_checksums(checksum_file: PathLike, base: Optional[PathLike] = None) -> List[Path]:
    """Check every file a checksum file lists; returns the files checked.

    Raises :class:`CheckpointError` naming the first missing or mismatching file.
    """
    checksum_file = Path(checksum_file)
    base = Path(base) if base is not None else checksum_file.parent
    checked = []
    for name, digests in parse_checksums(checksum_file).items():
        f = base / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {checksum_file.name} but missing")
        if sha256_file(f) not in digests:
            raise CheckpointError(f"{f}: sha256 does not match {checksum_file.name}: the file is corrupted or "
                                  f"was modified after lowbit wrote it (if on purpose, delete {checksum_file.name})")
        checked.append(f)
    return checked


def file_checksum_path(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + FILE_CHECKSUM_SUFFIX)


def check_file_checksum(path: PathLike) -> bool:
    """Check ``path`` against its sidecar; False when there is none, raises on a mismatch."""
    path = Path(path)
    side = file_checksum_path(path)
    if not side.is_file():
        return False
    sums = parse_checksums(side)
    if path.name not in sums:
        raise CheckpointError(f"{side}: does not list {path.name}")
    if sha256_file(path) not in sums[path.name]:
        raise CheckpointError(f"{path}: sha256 does not match {side.name}: the file is corrupted or was modified "
                              f"after lowbit wrote it (if on purpose, delete {side.name})")
    return True


def check_dir_checksums(directory: PathLike) -> bool:
    """Check a directory against its :data:`DIR_CHECKSUMS`; False when there is none."""
    f = Path(directory) / DIR_CHECKSUMS
    if not f.is_file():
        return False
    check_checksums(f)
    return True


def open_gguf(path: Union[str, os.PathLike]):
    """``gguf.GGUFReader`` of ``path``; anything the reader trips on is a one-line ``CheckpointError`` naming the file."""
    gguf = require("gguf", "reading GGUF files")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file missing")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF'; corrupted?)")
        return gguf.GGUFReader(str(path))
    except CheckpointError:
        raise
    except Exception as e:  # ValueError, KeyError, IndexError, struct/numpy errors, UnicodeDecodeError, ...
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        culprit = _gguf_culprit(path)
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupted){culprit}: {msg}") from None


_KV_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes


def _gguf_culprit(path: Path) -> str:
    """Best-effort: the first tensor whose info is inconsistent (type, dimensions, data past the end)."""
    import struct

    try:
        gguf = require("gguf", "reading GGUF files")
        data = path.read_bytes()
        pos = 8
        n_t, n_kv = struct.unpack_from("<QQ", data, pos)
        pos += 16

        def string(pos):
            n = struct.unpack_from("<Q", data, pos)[0]
            return data[pos + 8: pos + 8 + n], pos + 8 + n

        def value(vt, pos):
            if vt == 8:
                return string(pos)[1]
            if vt == 9:
                sub, count = struct.unpack_from("<IQ", data, pos)
                pos += 12
                for _ in range(count):
                    pos = value(sub, pos)
                return pos
            return pos + _KV_SIZES[vt]

        for _ in range(n_kv):
            _, pos = string(pos)
            vt = struct.unpack_from("<I", data, pos)[0]
            pos = value(vt, pos + 4)
        infos = []
        for _ in range(n_t):
            name, pos = string(pos)
            name = name.decode("utf-8", "replace")
            nd = struct.unpack_from("<I", data, pos)[0]
            if not 1 <= nd <= 4:
                return f" (tensor {name!r}: {nd} dimensions)"
            dims = struct.unpack_from(f"<{nd}Q", data, pos + 4)
            typ, off = struct.unpack_from("<IQ", data, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            try:
                qt = gguf.GGMLQuantizationType(typ)
            except ValueError:
                return f" (tensor {name!r}: unknown type {typ})"
            bs, ts = gguf.GGML_QUANT_SIZES[qt]
            n = 1
            for d in dims:
                n *= d
            if dims[0] % bs:
                return f" (tensor {name!r}: rows of {dims[0]} are not whole {qt.name} blocks)"
            infos.append((name, off, n // bs * ts))
        start = -(-pos // 32) * 32
        for name, off, nbytes in infos:
            if start + off + nbytes > len(data):
                return f" (tensor {name!r}: data past the end of the file)"
    except Exception:  # noqa: BLE001 - a diagnosis only
        return ""
    return ""


_FLOAT_GGML = ("F32", "F16", "BF16")
# block types whose blocks start with fp16 scales: (bytes per block, number of leading fp16 values)
_BLOCK_SCALES = {"Q4_0": 1, "Q4_1": 2, "Q5_0": 1, "Q5_1": 2, "Q8_0": 1}


def check_gguf(path: Union[str, os.PathLike], *, verify_checksum: bool = True):
    """Validate a GGUF file as far as the format defines it; returns the open ``gguf.GGUFReader``.

    Checks: the sidecar checksum (``<file>.lowbit-sha256``) when lowbit wrote one; the header and
    metadata parse; every tensor's type, dimensions and data offset (aligned, inside the file, the
    tensors contiguous as ggml requires); for a Llama file, the tensor set and every shape against
    the hyperparameters (``block_count``, ``embedding_length``, ``feed_forward_length``, head
    counts, vocabulary); 1-D tensors in float types; float tensors and block scales finite.
    Raises :class:`lowbit.io._files.CheckpointError` naming the file and the tensor.
    """
    path = Path(path)
    if verify_checksum and path.is_file():
        check_file_checksum(path)
    reader = open_gguf(path)
    size = path.stat().st_size

    def kv(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            v = f.contents()
        except Exception:
            raise CheckpointError(f"{path}: metadata key {key!r} is unreadable (corrupted)") from None
        return v

    align = kv("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{path}: general.alignment={align!r} is not a power of two (corrupted)")
    start = int(reader.data_offset)
    spans = []
    for t in reader.tensors:
        typ = t.tensor_type.name
        dims = [int(d) for d in t.shape.tolist()]
        if not 1 <= len(dims) <= 4 or any(d <= 0 for d in dims):
            raise CheckpointError(f"{path}: tensor {t.name!r}: invalid dimensions {dims}")
        rel = int(t.data_offset) - start
        if rel % align:
            raise CheckpointError(f"{path}: tensor {t.name!r}: data offset {rel} is not aligned to {align}")
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise CheckpointError(f"{path}: tensor {t.name!r}: data ends past the end of the file (truncated)")
        if typ in _BLOCK_SCALES and dims[0] % fmt.GGUF_BLOCK:
            raise CheckpointError(f"{path}: tensor {t.name!r}: rows of {dims[0]} are not whole {typ} blocks")
        spans.append((rel, rel + int(t.n_bytes), t))
    pos = 0
    prev = None
    for a, b, t in spans:  # in declaration order, as ggml lays the data out and checks it
        if a != pos:
            after = f" after tensor {prev.name!r} ({prev.tensor_type.name} {[int(d) for d in prev.shape]})" \
                if prev is not None else ""
            raise CheckpointError(f"{path}: tensor {t.name!r}: data offset {a}, expected {pos}{after}: a changed "
                                  "offset, type or shape")
        pos = -(-b // align) * align
        prev = t
    arch = kv("general.architecture")
    if arch in ("llama", "mistral"):
        _check_llama_tensors(path, reader, kv, arch)
    for t in reader.tensors:
        typ = t.tensor_type.name
        if len(t.shape) == 1 and typ not in _FLOAT_GGML:
            raise CheckpointError(f"{path}: tensor {t.name!r}: 1-D tensor of type {typ} (norms and biases are float)")
        if typ in ("I8", "I16", "I32", "I64", "F64") and arch in ("llama", "mistral"):
            raise CheckpointError(f"{path}: tensor {t.name!r}: type {typ} is not a weight type of a {arch} model")
        data = np.asarray(t.data)
        if typ in ("F32", "F16"):
            bad = not np.isfinite(data).all()
        elif typ == "BF16":
            bad = not np.isfinite((data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)).all()
        elif typ in _BLOCK_SCALES:
            tsize = fmt.gguf_type(typ).type_size
            blocks = data.reshape(-1, tsize)
            scales = np.ascontiguousarray(blocks[:, : 2 * _BLOCK_SCALES[typ]]).view(np.float16)
            bad = not np.isfinite(scales).all()
        else:
            bad = False
        if bad:
            raise CheckpointError(f"{path}: tensor {t.name!r}: non-finite values or block scales (corrupted data)")
    return reader


def _check_llama_tensors(path: Path, reader, kv, arch: str) -> None:
    def hp(key, required=True):
        v = kv(f"{arch}.{key}")
        if v is None and not required:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointError(f"{path}: metadata {arch}.{key}={v!r} is missing or not a positive integer")
        return v

    n_layer, E, F = hp("block_count"), hp("embedding_length"), hp("feed_forward_length")
    H = hp("attention.head_count")
    Hkv = hp("attention.head_count_kv", required=False) or H
    hd = hp("attention.key_length", required=False) or (E // H)
    hdv = hp("attention.value_length", required=False) or hd
    tensors = {t.name: t for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    V = len(tokens.data) if tokens is not None else None
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' missing")
    if V is None:
        V = int(emb.shape[-1])
    want = {"token_embd.weight": [E, V], "output_norm.weight": [E]}
    if "output.weight" in tensors:
        want["output.weight"] = [E, V]
    for i in range(n_layer):
        b = f"blk.{i}."
        want.update({b + "attn_norm.weight": [E], b + "ffn_norm.weight": [E],
                     b + "attn_q.weight": [E, H * hd], b + "attn_k.weight": [E, Hkv * hd],
                     b + "attn_v.weight": [E, Hkv * hdv], b + "attn_output.weight": [H * hdv, E],
                     b + "ffn_gate.weight": [E, F], b + "ffn_up.weight": [E, F], b + "ffn_down.weight": [F, E]})
        for proj, n in (("attn_q", H * hd), ("attn_k", Hkv * hd), ("attn_v", Hkv * hdv), ("attn_output", E)):
            if b + proj + ".bias" in tensors:
                want[b + proj + ".bias"] = [n]
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: tensor {name!r} missing ({arch} with {n_layer} blocks)")
        got = [int(d) for d in t.shape.tolist()]
        if got != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has dimensions {got}, the metadata implies {shape}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise CheckpointError(f"{path}: tensor {extra[0]!r} is not a tensor of a {n_layer}-block {arch} model")


