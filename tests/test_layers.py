"""The import directions that make the folders the architecture's diagram.

The core knows nothing of FUSE, the daemon, the command line or any provider by name; the
provider API and the small leaf modules depend on nothing of isofs; views know nothing of the
core; providers use only the API. Checked on the source (every import statement, function-level
ones included) and, for the core, on what importing it really loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package (dotted prefix) -> imports it must not make (dotted prefixes).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "isofs.core": (
        "pyfuse3", "isofs.fuse", "isofs.daemon", "isofs.cli", "isofs.maintenance",
        "isofs.source", "isofs.cli.provider_flags", "isofs.cli.passphrases",
    ),
    "isofs.views": ("pyfuse3", "isofs.core", "isofs.fuse", "isofs.daemon", "isofs.cli",
                    "isofs.maintenance"),
    "isofs.fuse": ("isofs.daemon", "isofs.cli", "isofs.maintenance"),
    "isofs.maintenance": ("pyfuse3", "isofs.fuse", "isofs.cli"),
    "isofs.daemon": ("isofs.cli", "isofs.maintenance"),
    "isofs_providers": ("pyfuse3", "trio", "isofs.core", "isofs.fuse", "isofs.views",
                        "isofs.daemon", "isofs.cli", "isofs.maintenance", "isofs.source"),
}  # fmt: skip
#: Modules that import nothing of isofs at all.
LEAVES = ("isofs.provider", "isofs.durable", "isofs.mountinfo")


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in ("isofs", "isofs_providers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, path))
    return found


def imports_of(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_there_are_modules_to_check() -> None:
    names = [name for name, _ in modules()]
    assert "isofs.core.volume" in names and "isofs_providers.encrypt" in names


@pytest.mark.parametrize(("module", "path"), modules(), ids=[name for name, _ in modules()])
def test_imports_run_the_right_way(module: str, path: Path) -> None:
    imported = imports_of(path, module)
    wrong = []
    for package, forbidden in FORBIDDEN.items():
        if _matches(module, package):
            wrong += [f"{name} (from {package})" for name in imported
                      if any(_matches(name, f) for f in forbidden)]  # fmt: skip
    if module.startswith("isofs.") or module == "isofs":
        wrong += [name for name in imported if _matches(name, "isofs_providers")
                  or _matches(name, "isofs_xorpad")]  # fmt: skip
    if module in LEAVES:
        wrong += [name for name in imported if _matches(name, "isofs") and name != module]
    assert not wrong, f"{module} imports {sorted(set(wrong))}"


def test_importing_the_core_loads_no_fuse_daemon_or_provider() -> None:
    code = (
        "import sys, isofs.core.volume, isofs.core.sections, isofs.core.sizecache;"
        "bad = [m for m in sys.modules if m == 'pyfuse3' or m.startswith(("
        "'isofs.fuse', 'isofs.daemon', 'isofs.cli', 'isofs.maintenance', 'isofs_providers'))];"
        "print(','.join(sorted(bad)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
