"""Checks the package layout that ARCHITECTURE.md promises (run by .ci/lint):

- no import cycle among pylandmark's modules, counting imports inside functions and under
  ``if TYPE_CHECKING`` (import-linter's layer contract checks the direction between layers; this
  checks every module, inside a layer too);
- at most 10 Python modules directly under ``pylandmark/`` besides ``__init__``, ``__main__``
  and ``_version`` (new work goes into the stage packages);
- no Python file over 600 lines.

Exits 1 with one line per finding.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pylandmark"
MAX_TOP_LEVEL = 10
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The pylandmark modules ``name`` imports anywhere in its body (the longest known prefix of
    each imported name; ``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("pylandmark") and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def main() -> int:
    files = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {name: {t for t in imports_of(name, path, set(files)) if not (path.name == "__init__.py"
                                                                          and t.startswith(name + "."))}
             for name, path in files.items()}
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem not in ("__init__", "__main__", "_version"))
    if len(top) > MAX_TOP_LEVEL:
        problems.append(f"{len(top)} modules directly under pylandmark/ (at most {MAX_TOP_LEVEL}): {', '.join(top)}")
    for path in files.values():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{path.relative_to(ROOT.parent)}: {lines} lines (at most {MAX_LINES})")
    for line in problems:
        print(line)
    print(f"layout: {len(files)} modules, {len(top)} directly under pylandmark/, "
          f"{'no import cycle' if not any(p.startswith('import cycle') for p in problems) else 'CYCLES'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
