"""Where the calibration activations live: on the device while they fit a budget, else offloaded.

The block-by-block pipeline keeps, per micro-batch, the block's inputs (and its outputs, the next
block's inputs) plus a replay cache of sub-module outputs. :class:`ActivationStore` places every
tensor it is given in the first tier with room under its budget:

1. the compute device (``budget`` bytes);
2. host memory (pinned when the device is a GPU; only when the device is not the CPU itself,
   ``host_budget`` bytes);
3. a disk spill: one raw file per tensor under ``spill_dir`` (a temporary directory created on
   first use, deleted by :meth:`close`).

``get`` brings the tensors back to the device (a fresh tensor for offloaded ones), so values are
bit-identical whatever the tier.

Example::

    >>> st = ActivationStore(torch.device("cpu"), budget=0)           # everything spills to disk
    >>> k = st.put((torch.arange(4.0), None))
    >>> st.get(k)[0].tolist(), st.tier_bytes()["disk"]
    ([0.0, 1.0, 2.0, 3.0], 16)
    >>> st.close()
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

_UNIT = {"": 1, "B": 1, "K": 2 ** 10, "KB": 2 ** 10, "KIB": 2 ** 10, "M": 2 ** 20, "MB": 2 ** 20, "MIB": 2 ** 20,
         "G": 2 ** 30, "GB": 2 ** 30, "GIB": 2 ** 30, "T": 2 ** 40, "TB": 2 ** 40, "TIB": 2 ** 40}


def parse_bytes(value: Any) -> Optional[int]:
    """``"1.5GB"`` / ``"800MB"`` / ``"2GiB"`` / a number of bytes -> int bytes (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"max_memory={value!r}: must be >= 0 bytes")
        return int(value)
    s = str(value).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        x = float(num)
    except ValueError:
        raise ValueError(f"max_memory={value!r}: expected a size such as '1.5GB', '800MB' or a number of bytes")
    if unit not in _UNIT or x < 0:
        raise ValueError(f"max_memory={value!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB)")
    return int(x * _UNIT[unit])


def current_rss() -> int:
    """Resident set size of this process now (bytes; 0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def host_available() -> int:
    """``MemAvailable`` from /proc/meminfo (bytes), or 8 GiB where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere): freed tensors
    of a block otherwise stay in the resident set, which a CPU run under ``max_memory`` counts."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def device_in_use(device: torch.device) -> int:
    """Bytes this process holds on ``device`` now (CUDA: allocated; CPU: resident set)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return current_rss()


def device_total_free(device: torch.device) -> int:
    """What ``device`` could still give this process, plus what it holds already (the default budget)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_allocated(device))
    return host_available() + current_rss()


class ActivationStore:
    """Tensors keyed by an int, each kept on the device, in (pinned) host memory or on disk."""

    def __init__(self, device: torch.device, budget: Optional[int], host_budget: Optional[int] = None,
                 spill_dir: Optional[str] = None, pin: bool = True) -> None:
        self.device = torch.device(device)
        self.budget = float("inf") if budget is None else max(int(budget), 0)
        self.host_budget = float("inf") if host_budget is None else max(int(host_budget), 0)
        self.spill_root = spill_dir
        self._spill: Optional[str] = None
        self.pin = pin and self.device.type == "cuda"
        self._items: Dict[int, Any] = {}
        self._next = 0
        self.bytes = {"device": 0, "host": 0, "disk": 0}
        self.peak = {"device": 0, "host": 0, "disk": 0}
        self.spilled_files = 0
        # CPU store under a process budget: a tensor stays in memory only while the process's resident set plus
        # the tensor stays under this (checked at every put: the rest of the process grows and shrinks too)
        self.rss_limit: Optional[int] = None

    # -- placement --------------------------------------------------------------------------
    def _fits(self, n: int) -> bool:
        if self.bytes["device"] + n > self.budget:
            return False
        return self.rss_limit is None or current_rss() + n <= self.rss_limit

    def _place(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        if self._fits(n):
            tier, obj = "device", t.detach().to(self.device, copy=True)
        elif self.device.type != "cpu" and self.bytes["host"] + n <= self.host_budget:
            tier = "host"
            obj = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin) if self.pin else \
                torch.empty(t.shape, dtype=t.dtype)
            obj.copy_(t.detach())
        else:
            tier, obj = "disk", self._write(t)
        self.bytes[tier] += n
        self.peak[tier] = max(self.peak[tier], self.bytes[tier])
        return ("T", tier, n, obj, tuple(t.shape), t.dtype)

    def _write(self, t: torch.Tensor) -> str:
        if self._spill is None:
            if self.spill_root is not None:
                os.makedirs(self.spill_root, exist_ok=True)
            self._spill = tempfile.mkdtemp(prefix="lowbit-spill-", dir=self.spill_root)
        path = os.path.join(self._spill, f"{self.spilled_files}.bin")
        self.spilled_files += 1
        flat = t.detach().contiguous().reshape(-1).to("cpu").view(torch.uint8)
        with open(path, "wb") as f:
            f.write(memoryview(flat.numpy()))
        return path

    def _pack(self, obj):
        if isinstance(obj, torch.Tensor):
            return self._place(obj)
        if isinstance(obj, tuple):
            return ("tuple", [self._pack(o) for o in obj])
        if isinstance(obj, list):
            return ("list", [self._pack(o) for o in obj])
        if isinstance(obj, dict):
            return ("dict", {k: self._pack(v) for k, v in obj.items()})
        return ("V", obj)

    def _unpack(self, rec, release: bool):
        kind = rec[0]
        if kind == "T":
            _, tier, n, obj, shape, dtype = rec
            if tier == "device":
                out = obj if release else obj.clone()
            elif tier == "host":
                out = obj.to(self.device, non_blocking=False)
            else:
                out = torch.empty(shape, dtype=dtype)
                with open(obj, "rb") as f:
                    f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
                out = out.to(self.device)
            if release:
                self._free(rec)
            return out
        if kind == "tuple":
            return tuple(self._unpack(r, release) for r in rec[1])
        if kind == "list":
            return [self._unpack(r, release) for r in rec[1]]
        if kind == "dict":
            return {k: self._unpack(v, release) for k, v in rec[1].items()}
        return rec[1]

    def _free(self, rec) -> None:
        kind = rec[0]
        if kind == "T":
            _, tier, n, obj, _, _ = rec
            self.bytes[tier] -= n
            if tier == "disk":
                try:
                    os.unlink(obj)
                except OSError:
                    pass
        elif kind in ("tuple", "list"):
            for r in rec[1]:
                self._free(r)
        elif kind == "dict":
            for r in rec[1].values():
                self._free(r)

    # -- API --------------------------------------------------------------------------------
    def put(self, obj: Any) -> int:
        """Store ``obj`` (tensors, possibly nested in tuples/lists/dicts) and return its key.

        Tensors are copied, so later in-place changes of the caller's tensors do not reach the store."""
        key = self._next
        self._next += 1
        self._items[key] = self._pack(obj)
        return key

    def get(self, key: int, pop: bool = False) -> Any:
        """The object stored under ``key``, its tensors on the device (``pop``: and forget it)."""
        rec = self._items.pop(key) if pop else self._items[key]
        return self._unpack(rec, release=pop)

    def replace_first(self, key: int, first: int) -> int:
        """The object under ``key``, ``((x, *args), kwargs)``, with ``x`` replaced by the tensor stored under
        ``first``, as a new key (both old keys forgotten, ``x`` freed). No tensor is copied or moved: the
        pipeline makes a block's outputs the next block's inputs this way, where ``get``/``put`` took two
        round trips through host memory per micro-batch for offloaded activations."""
        rec, new = self._items[key], self._items[first]
        ok = (rec[0] == "tuple" and len(rec[1]) == 2 and rec[1][0][0] == "tuple" and rec[1][0][1]
              and new[0] == "T")
        if not ok:
            raise ValueError(f"replace_first: key {key} does not hold ((tensor, ...), kwargs) or key {first} "
                             f"no single tensor")
        del self._items[key], self._items[first]
        args = rec[1][0][1]
        self._free(args[0])
        k = self._next
        self._next += 1
        self._items[k] = ("tuple", [("tuple", [new] + list(args[1:])), rec[1][1]])
        return k

    def drop(self, key: int) -> None:
        rec = self._items.pop(key, None)
        if rec is not None:
            self._free(rec)

    def fits_device(self, obj: Any) -> bool:
        """Whether ``obj``'s tensors would all stay on the device (within the budget)."""
        return self._fits(_nbytes(obj))

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def tier_bytes(self) -> Dict[str, int]:
        return dict(self.bytes)

    def close(self) -> None:
        for key in list(self._items):
            self.drop(key)
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


__all__ = ["ActivationStore", "parse_bytes", "current_rss", "host_available", "device_in_use", "device_total_free"]
