"""Every third-party module the code imports is declared in pyproject.toml, not merely installed because
another package brings it: the package's own code by the core dependencies, tests and scripts by those and
the test extra. An import guarded by ``except ImportError`` (or broader) is an optional feature and may be
left out (it says what to install when it is missing)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"slkv_sglang", "api", "offload", "tests"}


def _name(requirement: str) -> str:
    """PEP 503 normalised project name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0]).lower()


def _guarded(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a try whose handlers catch ImportError (or anything wider)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or (isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "Exception"))
                for h in node.handlers):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def _imports(folder: str) -> dict[str, str]:
    """Required (unguarded) top-level third-party modules imported under ``folder`` -> a file importing it."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        optional = _guarded(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - FIRST_PARTY - set(sys.stdlib_module_names):
                if id(node) not in optional:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _undeclared(modules: dict[str, str], declared: set[str]) -> list[str]:
    dists = packages_distributions()
    return [f"{module} ({where}): from {dists.get(module)}" for module, where in sorted(modules.items())
            if not {_name(d) for d in dists.get(module, [])} & declared]


def test_imports_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    test = core | {_name(r) for r in project["optional-dependencies"]["test"]}
    package = {m: w for folder in ("slkv_sglang", "api", "offload") for m, w in _imports(folder).items()}
    assert {"torch", "httpx", "prometheus_client", "psutil"} <= set(package)  # the scan sees the imports
    assert _undeclared(package, core) == []
    others = {m: w for folder in ("tests", "scripts") for m, w in _imports(folder).items()}
    assert _undeclared(others, test) == []
