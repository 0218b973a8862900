"""The import direction written in parsl_chat/__init__.py holds for every module, lazy imports included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import parsl_chat

PACKAGE = Path(parsl_chat.__file__).parent


def _layers() -> tuple[dict[str, str], dict[str, set[str]]]:
    """(module or package prefix -> its layer, layer -> the layers it may import) from the package docstring."""
    owner: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}
    for line in (parsl_chat.__doc__ or "").splitlines():
        found = re.fullmatch(r" {4}(\w+)\s+([\w ]+?)\s*(?:->\s*([\w ]+))?", line)
        if not found:
            continue
        layer, modules, below = found.group(1), found.group(2).split(), (found.group(3) or "").split()
        owner.update(dict.fromkeys(modules, layer))
        allowed[layer] = {layer, *below}
    return owner, allowed


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The parsl_chat modules ``path`` imports (relative to the package; '' is the package itself)."""
    name = _module_name(path)
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [a.name for a in node.names] if node.module is None else [""]
            found |= {".".join(p for p in [*target, n] if p) for n in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("parsl_chat"):
            found.add((node.module or "").removeprefix("parsl_chat").lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("parsl_chat").lstrip(".") for a in node.names if a.name.startswith("parsl_chat")}
    return found - {""}


def _layer_of(module: str, owner: dict[str, str]) -> str | None:
    """A module's layer: its own entry, or its package's (``backends.parsl`` is in ``backends``)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in owner:
            return owner[".".join(parts[:end])]
    return None


def test_the_table_names_every_module_and_only_known_layers() -> None:
    owner, allowed = _layers()
    assert {"base", "core", "worker", "backends", "report", "run", "cli"} <= set(allowed)
    assert all(below <= set(allowed) for below in allowed.values())
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")} - {""}
    unplaced = sorted(m for m in modules if _layer_of(m, owner) is None)
    assert not unplaced, f"give these modules a layer in parsl_chat/__init__.py: {unplaced}"


def test_every_import_goes_down_the_layers() -> None:
    owner, allowed = _layers()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if not module:
            continue
        mine = _layer_of(module, owner)
        for target in sorted(_imports(path)):
            theirs = _layer_of(target, owner)
            if theirs is not None and mine is not None and theirs not in allowed[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the layers of parsl_chat/__init__.py:\n" + "\n".join(wrong)


def test_nothing_imports_the_cli() -> None:
    users = [_module_name(p) for p in PACKAGE.rglob("*.py") if "cli" in _imports(p)]
    assert users == ["__main__"]


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    """The checker itself: a report module importing the runner is caught (so the tests above can fail)."""
    owner, allowed = _layers()
    fake = PACKAGE / "report" / "summary.py"
    imports = _imports(fake) | {"run"}
    assert any(_layer_of(t, owner) not in allowed["report"] for t in imports)
