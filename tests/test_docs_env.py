"""docs/environment.md lists exactly the ``LOWBIT_*`` environment variables the package reads."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"LOWBIT_[A-Z0-9_]*[A-Z0-9]")


def _code_names():
    names = {}
    for path in sorted((ROOT / "lowbit").rglob("*.py")):
        for name in NAME.findall(path.read_text(encoding="utf-8")):
            names.setdefault(name, path.relative_to(ROOT).as_posix())
    return names


def _doc_names():
    text = (ROOT / "docs" / "environment.md").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^\| `(LOWBIT_[A-Z0-9_]+)` \|", text, flags=re.M)}


def test_every_variable_read_is_documented():
    code, doc = _code_names(), _doc_names()
    missing = {n: p for n, p in code.items() if n not in doc}
    assert not missing, f"LOWBIT_* variables read by the code but not in docs/environment.md: {missing}"


def test_no_documented_variable_is_stale():
    code, doc = _code_names(), _doc_names()
    assert len(doc) >= 20  # the table parsed (a format change would otherwise pass vacuously)
    stale = sorted(doc - set(code))
    assert not stale, f"docs/environment.md lists variables the code no longer reads: {stale}"
