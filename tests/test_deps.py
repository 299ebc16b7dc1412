"""Optional dependencies: a missing or too old package is refused with a message naming the extra."""
from __future__ import annotations

import pytest
import torch

from lowbit._deps import _release, require


def test_release_parsing():
    assert _release("5.23.0") == (5, 23, 0)
    assert _release("5.23.0.dev0") == (5, 23, 0)
    assert _release("2.13.0+cpu") == (2, 13, 0)
    assert _release("1.0rc1") == (1, 0)
    assert _release("5.17.1") < _release("5.23") <= _release("5.23.0") < _release("5.24.0")


def test_missing_package_names_the_extra():
    with pytest.raises(ImportError, match=r"'no_such_pkg_lowbit' is not installed.*pip install 'lowbit\[all\]'"):
        require("no_such_pkg_lowbit", "a test")


def test_too_old_package_is_refused():
    with pytest.raises(ImportError, match=r"torch .* is installed but lowbit needs torch>=999.1 \(needed for a test\)"):
        require("torch", "a test", min_version="999.1")
    assert require("torch", min_version="2.0") is torch
