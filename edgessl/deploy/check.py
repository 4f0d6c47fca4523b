"""`edgessl check`: run the on-device check script (the repository's export/device_check.py).

There is one source of truth, export/device_check.py. An installed wheel ships it as the package data module
`edgessl.devicecheck.device_check` (pyproject maps that package to the export/ folder); an editable or source
checkout finds it beside the package. edgessl.deploy.onnx uses its functions too (device_check_module), so that the
export and the device measure agreement the same way.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from edgessl.errors import UserError

SCRIPT = "device_check.py"


def script_path(script: str = SCRIPT) -> Path:
    """Where device_check.py (or another script of export/, e.g. embed_onnx.py) is: the installed
    `edgessl.devicecheck` package, else the repository's export/."""
    try:
        spec = importlib.util.find_spec("edgessl.devicecheck")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / script).is_file():
            return Path(folder) / script
    repo = Path(__file__).resolve().parents[2] / "export" / script
    if repo.is_file():
        return repo
    raise UserError(
        f"{script} is missing from this installation; reinstall edgessl or copy export/{script} from its repository."
    )


def load_script(script: str = SCRIPT) -> ModuleType:
    """The device-check script (or another script of export/) as a module (decode, normalize, preprocess, main, ...)."""
    path = script_path(script)
    spec = importlib.util.spec_from_file_location(f"edgessl_{Path(script).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def device_check_module() -> ModuleType:
    """export/device_check.py as a module, loaded once per process: the installed `edgessl.devicecheck.device_check`
    (a wheel), else the file script_path finds (an editable install or a source checkout, where the import fails:
    setuptools' editable finder cannot import the namespace package edgessl.devicecheck inside the regular package
    edgessl)."""
    try:  # inside the function: only a wheel has this package-data module, and its import runs the script
        from edgessl.devicecheck import device_check
    except ImportError:
        return load_script()
    return device_check


def run_device_check(argv: list[str]) -> int:
    """Run the script with these arguments in a fresh interpreter (so that its peak-memory figure is the script's,
    not this process's with torch loaded); its output goes to this terminal. Returns its exit code."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError(
            "`edgessl check` needs onnxruntime: pip install onnxruntime (part of the `export` extra)."
        ) from None
    return subprocess.run([sys.executable, str(script_path()), *argv], check=False).returncode
