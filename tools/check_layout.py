"""Layout rules the CI enforces (``make lint``), beside ruff:

1. no import cycle between the modules of ``orchestrator`` and ``tips_model``, counting the
   imports inside functions (they hide cycles; only ``if TYPE_CHECKING:`` blocks are exempt);
2. ``tips_model`` is pure torch: it never imports ``ray`` or ``orchestrator``;
3. no function in ``orchestrator`` or ``tips_model`` is longer than 80 lines (its docstring
   not counted): split it into named steps.

    python tools/check_layout.py            # exit 1 and one line per violation
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "tips_model")
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _is_package_of(parent: str, child: str) -> bool:
    return child.startswith(parent + ".")


def check_imports() -> list[str]:
    modules = project_modules()
    graph = {}
    problems = []
    for name, path in modules.items():
        # a package's __init__ importing its own submodules is how packages re-export
        graph[name] = {t for t in imports_of(name, path, modules) if not _is_package_of(name, t)}
        if name.startswith("tips_model"):
            text = path.read_text()
            tree = ast.parse(text)
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                for n in names:
                    if n.split(".")[0] in ("ray", "orchestrator"):
                        problems.append(
                            f"{path.relative_to(ROOT)}:{node.lineno}: tips_model imports {n} "
                            "(tips_model is pure torch)"
                        )
    for cycle in find_cycles(graph):
        problems.append(f"import cycle: {' <-> '.join(cycle)}")
    return problems


def check_function_lengths() -> list[str]:
    problems = []
    for path in project_modules().values():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(
                getattr(first, "value", None), ast.Constant
            ):
                lines -= (first.end_lineno or first.lineno) - first.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                problems.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} has {lines} lines "
                    f"(> {MAX_FUNCTION_LINES}; docstring not counted)"
                )
    return problems


def main() -> int:
    problems = check_imports() + check_function_lengths()
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
