"""The package's shape: imports run one way, down the floors, and no module imports itself round a circle.

Floors, ground first: errors; labels and config (which checks itself, raising errors); the run directory,
packed attention and the fused norms; models, data and adapters (separate rooms that do not import each
other); evaluation; training; the commands, the Python API and the sweep machinery (separate rooms); the CLI
and the package's list of public names. A module may import its own floor's room or any floor below, never
one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "malora_train"

FLOORS = {
    "malora_train.errors": 0,
    "malora_train.labels": 1, "malora_train.config": 1,
    "malora_train.run_dir": 2, "malora_train.attention": 2, "malora_train.fused_norms": 2,
    "malora_train.models": 3, "malora_train.data": 3, "malora_train.adapters": 3,
    "malora_train.eval": 4,
    "malora_train.train": 5,
    "malora_train.commands": 6, "malora_train.api": 6, "malora_train.sweep": 6,
    "malora_train.cli": 7, "malora_train": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def room(module: str) -> str:
    """The FLOORS key a module belongs to (its longest matching prefix)."""
    matches = [key for key in FLOORS if module == key or module.startswith(key + ".")]
    assert matches, f"{module} is on no floor: add it to FLOORS"
    return max(matches, key=len)


def imports(module: str) -> set[str]:
    """The package modules ``module`` imports anywhere in its file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("malora_train")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("malora_train"):
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return found - {module}


def test_every_module_is_on_a_floor() -> None:
    for module in MODULES:
        room(module)


def test_imports_never_run_up_a_floor_or_across_rooms() -> None:
    wrong = []
    for module in MODULES:
        mine = room(module)
        for target in imports(module):
            theirs = room(target)
            if FLOORS[theirs] > FLOORS[mine] or (FLOORS[theirs] == FLOORS[mine] and theirs != mine):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports running up or across: " + ", ".join(sorted(wrong))


def test_no_import_circles() -> None:
    graph = {module: imports(module) for module in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                circle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_each_kernel_module_holds_its_operation_whole() -> None:
    """One module per operation of the fast path: its Triton kernels and its autograd Function together
    (``common`` holds what they share and defines neither); Triton is imported only where kernels are."""
    kernels = PACKAGE / "adapters" / "kernels"
    operations = sorted(p for p in kernels.glob("*.py") if p.stem not in ("__init__", "common"))
    assert operations
    for path in [*operations, kernels / "common.py"]:
        tree = ast.parse(path.read_text())
        functions = [node.name for node in tree.body if isinstance(node, ast.ClassDef)
                     and any(ast.unparse(base) == "torch.autograd.Function" for base in node.bases)]
        jitted = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  and any(ast.unparse(d).startswith("triton.jit") for d in node.decorator_list)]
        triton_imported = any(isinstance(node, ast.Import) and any(a.name == "triton" for a in node.names)
                              for node in ast.walk(tree))
        is_operation = path in operations
        assert bool(functions) == is_operation, f"{path.name}: autograd Functions {functions}"
        assert bool(jitted) == is_operation, f"{path.name}: Triton kernels {jitted}"
        assert triton_imported == is_operation, f"{path.name} imports triton: {triton_imported}"
