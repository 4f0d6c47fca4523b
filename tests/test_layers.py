"""The house has one way up, package by package:

    _version, errors, seeding, fileio, rundir, demo, recipes, devicecheck, scripts, runtime, loggers, options, config,
    report -> data -> models -> method -> train -> evaluate -> deploy -> workflows -> api -> commands -> cli

Every import of an edgessl module (at the top of a file or inside a function, absolute or relative) points to its
own package or to one on its left; no two packages import each other, and no module imports itself back through
others (no circle, inside a package either). The same holds for benchmarks/. The AST is read, nothing is imported."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "edgessl"
ORDER = ["_names", "_version", "errors", "network", "seeding", "fileio", "rundir", "demo", "recipes", "devicecheck",
         "scripts", "runtime", "loggers", "options", "config", "report", "data", "models", "method", "train",
         "evaluate", "deploy", "workflows", "api", "commands", "cli", "_entry", "__main__",
         ""]  # "": edgessl/__init__.py, the package's front door (its API imported on first use)
MAX_LINES = 400
REASON = "Over 400 lines:"  # what a longer file's docstring says, with its reason


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path):
    """(line, imported module) of every import in the file, relative ones made absolute. `from a import b` yields
    a.b when a/b is a module or package of the tree, else a."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = root.parent.joinpath(*f"{base}.{a.name}".split("."))
                yield node.lineno, f"{base}.{a.name}" if sub.with_suffix(".py").is_file() or sub.is_dir() else base


def top(module: str) -> str | None:
    parts = module.split(".")
    return (parts[1] if len(parts) > 1 else "") if parts[0] == "edgessl" else None


def wrong_way(root: Path = PACKAGE, order: list[str] = ORDER) -> list[str]:
    """Every import that points to a package on the right of its own."""
    wrong = []
    for path in sorted(root.rglob("*.py")):
        here = top(module_name(path, root))
        for line, target in imports(path, root):
            there = top(target)
            if there is not None and there != here and order.index(there) > order.index(here):
                wrong.append(f"{path.relative_to(root.parent)}:{line} imports {target}")
    return wrong


def circles(root: Path) -> list[list[str]]:
    """The import circles between the modules of one tree (each a list of modules, first = last)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {m: sorted({t for _, t in imports(p, root) if t in modules and t != m}) for m, p in modules.items()}
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for t in graph[m]:
            if state.get(t) == "open":
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_every_top_level_module_has_a_place_in_the_order():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").exists() or p.name in ("devicecheck", "recipes")}
    assert names - {"__init__"} <= set(ORDER), names - set(ORDER)


def test_imports_only_point_left():
    wrong = wrong_way()
    assert not wrong, "imports of a package on the right:\n" + "\n".join(wrong)


@pytest.mark.parametrize("tree", ["edgessl", "benchmarks"])
def test_no_import_circle(tree):
    found = circles(REPO / tree)
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_long_file_without_a_reason():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES
            and REASON not in (ast.get_docstring(ast.parse(p.read_text())) or "")]
    assert not long, "files over 400 lines without a reason in their docstring: " + ", ".join(long)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "edgessl"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_sees_a_package_loop_and_a_circle(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "evaluate/__init__.py": "",
        "evaluate/embed.py": "def f():\n    from edgessl.deploy.check import load\n",  # inside a function
        "deploy/__init__.py": "",
        "deploy/check.py": "from ..evaluate import embed\n",  # relative, and back: a package loop
        "train/__init__.py": "",
        "train/a.py": "from edgessl.train import b\n",
        "train/b.py": "import edgessl.train.a\n",
    })
    assert wrong_way(root) == ["edgessl/evaluate/embed.py:2 imports edgessl.deploy.check"]
    found = {tuple(c) for c in circles(root)}
    assert ("edgessl.train.a", "edgessl.train.b", "edgessl.train.a") in found
    assert ("edgessl.deploy.check", "edgessl.evaluate.embed", "edgessl.deploy.check") in found


def test_the_order_names_the_design():
    """The docstring of this file and docs/architecture.md draw the same order as ORDER."""
    arrows = "data -> models -> method -> train -> evaluate -> deploy -> workflows -> api -> commands -> cli"
    assert arrows in (REPO / "docs" / "architecture.md").read_text() and arrows in sys.modules[__name__].__doc__
