"""The house has one way up: data -> models -> method -> train -> {evaluate, slim, deploy} -> api -> cli.

Every import of an edgessl module (at the top of a file or inside a function) must point to the same layer or a
lower one. Layer 0 holds the helpers every layer may use (errors, config, seeding, file writing, run directories,
threads and devices, plots, the bundled demo)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgessl"
LAYERS = {
    "_version": 0, "errors": 0, "seeding": 0, "fileio": 0, "rundir": 0, "runtime": 0, "config": 0, "demo": 0,
    "report": 0, "recipes": 0, "devicecheck": 0, "loggers": 0,
    "data": 1, "models": 2, "method": 3, "train": 4, "evaluate": 5, "slim": 5, "deploy": 5,
    "api": 6, "cli": 7, "commands": 7, "__main__": 7, "": 7,  # "": the package itself (edgessl/__init__.py)
}


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "edgessl":
        return None
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_every_package_module_has_a_layer():
    top = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert top - {"__init__"} <= set(LAYERS), top - set(LAYERS)


def test_imports_never_run_back_up_a_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = layer(module_name(path))
        for line, target in imports(path):
            there = layer(target)
            if there is not None and there > here:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "imports from a later layer:\n" + "\n".join(wrong)


def test_the_checker_sees_a_backward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from edgessl.api import pretrain\n")
    assert [layer(t) for _, t in imports(bad)] == [6] and layer("edgessl.models.head") == 2
