"""lowbit's on-disk cache (float conversions of GGUF files): size, listing, clearing, a size cap.

Every ``.gguf`` model that lowbit evaluates or quantizes is converted once to a float model and kept
under :func:`lowbit.model.loading.cache_dir` ``/gguf-plain`` (about 0.5 GB for SmolLM2-135M). The
cache is bounded: after each new entry the least recently used entries are removed until the total
is at most ``$LOWBIT_CACHE_MAX_GB`` (default 4 GB; ``0`` keeps only the newest entry). ``lowbit cache``
shows the entries and their size, ``lowbit cache --clear`` removes them.

Example::

    >>> from lowbit.model import cache
    >>> cache.cache_size_bytes() >= 0
    True
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

logger = logging.getLogger(__name__)

DEFAULT_MAX_GB = 4.0
_SUBDIRS = ("gguf-plain",)


def _root() -> Path:
    from lowbit.model.loading import cache_dir

    return cache_dir()


def _dir_bytes(p: Path) -> int:
    total = 0
    for f in p.rglob("*"):
        try:
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
        except OSError:
            pass
    return total


def cache_entries() -> List[Dict[str, object]]:
    """``[{"path", "bytes", "last_used"}]`` for every cache entry (complete or stale temporary), oldest first."""
    out = []
    for sub in _SUBDIRS:
        d = _root() / sub
        if not d.is_dir():
            continue
        for e in d.iterdir():
            if not e.is_dir():
                continue
            stamp = e / "COMPLETE"
            try:
                used = (stamp if stamp.is_file() else e).stat().st_mtime
            except OSError:
                continue
            out.append({"path": str(e), "bytes": _dir_bytes(e), "last_used": used,
                        "complete": stamp.is_file()})
    return sorted(out, key=lambda r: r["last_used"])


def cache_size_bytes() -> int:
    """Total bytes held by the cache entries."""
    return sum(int(e["bytes"]) for e in cache_entries())


def clear_cache() -> Dict[str, int]:
    """Remove every cache entry; returns ``{"entries": n, "bytes": freed}``."""
    entries = cache_entries()
    for e in entries:
        shutil.rmtree(str(e["path"]), ignore_errors=True)
    return {"entries": len(entries), "bytes": sum(int(e["bytes"]) for e in entries)}


def max_cache_bytes() -> int:
    """The size cap: ``$LOWBIT_CACHE_MAX_GB`` (GB = 2**30 bytes), default :data:`DEFAULT_MAX_GB`."""
    raw = os.environ.get("LOWBIT_CACHE_MAX_GB", "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        logger.warning("LOWBIT_CACHE_MAX_GB=%r is not a number; using %s", raw, DEFAULT_MAX_GB)
        gb = DEFAULT_MAX_GB
    return max(0, int(gb * 2 ** 30))


def touch_cache_entry(path: Path) -> None:
    """Mark an entry as just used (least-recently-used eviction reads the ``COMPLETE`` stamp's mtime)."""
    try:
        os.utime(Path(path) / "COMPLETE", None)
    except OSError:
        pass


def enforce_cache_limit(keep: Optional[Path] = None, stale_after_s: float = 3600.0) -> List[str]:
    """Evict least recently used entries until the cache fits :func:`max_cache_bytes`; never ``keep``.

    Incomplete temporary folders older than ``stale_after_s`` (left by a killed conversion) go first.
    Returns the paths removed.
    """
    limit = max_cache_bytes()
    keep_s = str(Path(keep)) if keep is not None else None
    removed = []
    entries = cache_entries()
    now = time.time()
    for e in list(entries):
        if not e["complete"] and now - float(e["last_used"]) > stale_after_s and e["path"] != keep_s:
            shutil.rmtree(str(e["path"]), ignore_errors=True)
            removed.append(str(e["path"]))
            entries.remove(e)
    total = sum(int(e["bytes"]) for e in entries)
    for e in entries:  # oldest first
        if total <= limit:
            break
        if e["path"] == keep_s or not e["complete"]:
            continue
        shutil.rmtree(str(e["path"]), ignore_errors=True)
        removed.append(str(e["path"]))
        total -= int(e["bytes"])
    for p in removed:
        logger.info("lowbit cache: removed %s (cache above LOWBIT_CACHE_MAX_GB=%.2f)", p, limit / 2 ** 30)
    return removed
