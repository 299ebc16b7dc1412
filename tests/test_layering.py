"""The folder tree is the architecture: each layer imports only from the layers below it.

Direction (docs/architecture.md): _registry, _deps, data are leaves; formats <- tensor <- config <- {kernels,
observers, config} <- {nn, algorithms} <- model <- {io, eval, integrations} <- cli. Algorithms never
import nn or model. Function-level (lazy) imports count too.
"""
import ast
import subprocess
import sys
from pathlib import Path

import lowbit

ROOT = Path(lowbit.__file__).parent
LEVEL = {"_registry": 0, "_deps": 0, "data": 0, "formats": 1, "tensor": 2, "kernels": 3.5, "observers": 3.5,
         "config": 3, "config_ptq": 3, "nn": 4, "algorithms": 4, "model": 5, "io": 6, "eval": 6, "integrations": 6, "workflow": 6.5, "cli": 7,
         "__main__": 8}
# the public facade may reach everything lazily
FACADES = {"__init__"}


def _part(modname: str) -> str:
    parts = modname.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for a in node.names:
                yield f"{node.module}.{a.name}"


def test_import_direction():
    bad = []
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        src = ".".join(rel.parts)
        src_part = _part(src)
        if src_part in FACADES or src_part not in LEVEL:
            continue
        for imp in _imports(f):
            if not imp.startswith("lowbit.") and imp != "lowbit":
                continue
            dst = _part(imp)
            if dst in FACADES or dst not in LEVEL or dst == src_part:
                continue
            if src_part == "algorithms" and dst in ("nn", "model"):
                bad.append(f"{src} imports {imp} (algorithms never import nn or model)")
            elif LEVEL[dst] > LEVEL[src_part]:
                bad.append(f"{src} imports {imp} ({src_part} is below {dst})")
            elif LEVEL[dst] == LEVEL[src_part] and LEVEL[dst] in (3.5, 4):
                bad.append(f"{src} imports {imp} (siblings {src_part} and {dst} are independent)")
    assert not bad, "\n".join(sorted(set(bad)))


def test_import_is_light_and_never_touches_cuda():
    code = ("import sys, lowbit; import lowbit.tensor.functional; "
            "heavy = [m for m in ('transformers', 'gguf', 'matplotlib', 'triton', 'bitsandbytes') if m in sys.modules]; "
            "import torch; assert not torch.cuda.is_initialized(); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_architecture_doc_matches_the_tree():
    """docs/architecture.md names every module of the package and no module or package that does not exist."""
    import re

    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    tree = doc.split("```", 2)[1]  # the first code block: the tree
    named_files = set(re.findall(r"([A-Za-z_][\w]*\.py)\b", tree))
    named_dirs = set(re.findall(r"lowbit/(\w+)/", tree)) | set(re.findall(r"^\s+(\w+)/\s", tree, re.M))
    actual_files = {f.name for f in ROOT.rglob("*.py") if f.name != "__init__.py"}
    actual_dirs = {d.name for d in ROOT.rglob("*") if d.is_dir() and d.name != "__pycache__"}
    assert not named_files - actual_files - {"__init__.py"}, f"the doc names modules that do not exist: " \
                                                             f"{sorted(named_files - actual_files)}"
    assert not named_dirs - actual_dirs, f"the doc names packages that do not exist: {sorted(named_dirs - actual_dirs)}"
    missing = sorted(actual_files - named_files)
    assert not missing, f"modules missing from docs/architecture.md: {missing}"
    assert not actual_dirs - named_dirs, f"packages missing from docs/architecture.md: {sorted(actual_dirs - named_dirs)}"
    # the documented direction is the one test_import_direction enforces
    order = ["formats", "tensor", "config", "kernels", "observers", "nn", "algorithms", "model", "io", "eval",
             "integrations", "cli"]
    assert "formats <- tensor <- config <- {kernels, observers} <- {nn, algorithms} <- model <- {io, eval, integrations}" \
        in " ".join(doc.split())
    assert [LEVEL[p] for p in order] == sorted(LEVEL[p] for p in order)
