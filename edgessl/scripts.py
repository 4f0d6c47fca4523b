"""The torch-free scripts of export/ (device_check.py, embed_onnx.py), found and loaded as modules.

There is one source of truth, export/device_check.py. An installed wheel ships it as the package data module
`edgessl.devicecheck.device_check` (pyproject maps that package to the export/ folder); an editable or source
checkout finds it beside the package. edgessl.deploy uses its functions too (device_check_module), so that the
export and the device measure agreement and speed the same way; `edgessl check` runs it (edgessl.workflows.check).
"""

from __future__ import annotations

import functools
import importlib.util
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
    repo = Path(__file__).resolve().parents[1] / "export" / script
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
