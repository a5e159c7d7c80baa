"""The house rules of docs/design.md ("Structure"), checked on the source itself (no engine):

- the product (the plugin, the algorithm, the KV tier, the host tier, the chat API) never imports a tool
  (``slkv_sglang/tools/``: evaluation, calibration, benchmarks, the device check, the reference);
- no module-level state: no ``global`` statement, and nothing writes into a module-level container after import,
  so state lives in objects handed to whoever needs them (``SchedulerSide``, the backends, ``KvTier``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("slkv_sglang", "offload", "api")
TOOLS = "slkv_sglang.tools"
MUTATORS = frozenset({"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add",
                      "remove", "discard", "__setitem__", "__delitem__"})
CONTAINERS = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)


def _modules() -> dict[str, ast.Module]:
    """Every module of the three packages by dotted name."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imported(name: str, tree: ast.Module, is_package: bool) -> set[str]:
    """The absolute names of the modules ``tree`` imports (relative imports resolved, at any depth)."""
    found = set()
    here = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_the_product_never_imports_a_tool():
    modules = _modules()
    product = {name: tree for name, tree in modules.items()
               if not (name == TOOLS or name.startswith(TOOLS + ".") or name == "slkv_sglang.cli")}
    assert "slkv_sglang.plugin" in product and "slkv_sglang.tools.evaluate" not in product
    offenders = {name: sorted(m for m in _imported(name, tree, (ROOT / name.replace(".", "/")).is_dir())
                              if m == TOOLS or m.startswith(TOOLS + "."))
                 for name, tree in product.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_module_level_state():
    modules = _modules()
    globals_ = [f"{name}:{node.lineno}" for name, tree in modules.items() for node in ast.walk(tree)
                if isinstance(node, ast.Global)]
    assert globals_ == []
    containers = {target.id for tree in modules.values() for node in tree.body
                  if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, CONTAINERS)
                  for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                  if isinstance(target, ast.Name) and target.id != "__all__"}
    assert "SUBCOMMANDS" in containers  # the scan sees module-level containers

    def named(node: ast.AST) -> str | None:
        return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None

    writes = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
                [node.target] if isinstance(node, ast.AugAssign) else []
            for target in targets:
                if isinstance(target, ast.Subscript) and named(target.value) in containers:
                    writes.append(f"{name}:{node.lineno} {named(target.value)}[...]")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                    and named(node.func.value) in containers):
                writes.append(f"{name}:{node.lineno} {named(node.func.value)}.{node.func.attr}()")
    assert writes == []
