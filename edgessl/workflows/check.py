"""`edgessl check`: run the on-device check script (export/device_check.py) on an exported model, as a device would."""

from __future__ import annotations

import subprocess
import sys

from edgessl.errors import UserError
from edgessl.scripts import script_path


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
