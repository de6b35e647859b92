"""The core knows nothing of FUSE or of the layers above it (imports go cli -> fs -> core)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tinyfs.core

pytestmark = pytest.mark.core

FORBIDDEN = ("pyfuse3", "trio", "tinyfs.fs", "tinyfs.cli")


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of the tinyfs.core package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ["tinyfs", "core"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                names = [node.module]
            found.extend((node.lineno, name) for name in names)
    return found


def test_core_imports_neither_fuse_nor_upper_layers():
    core = Path(tinyfs.core.__file__).parent
    files = sorted(core.glob("*.py"))
    assert len(files) > 5
    bad = [f"{f.name}:{line}: imports {name}" for f in files for line, name in imported_modules(f)
           if any(name == x or name.startswith(x + ".") for x in FORBIDDEN)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from ..fs import view\nfrom .. import cli\nimport trio\nfrom . import layout\n")
    names = [name for _line, name in imported_modules(sample)]
    assert names == ["tinyfs.fs", "tinyfs.cli", "trio", "tinyfs.core.layout"]
