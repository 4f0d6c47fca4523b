"""Writing files so that a reader never sees half of one: a temporary file in the same folder, then a rename.
Also the one sha256 of a file's bytes (export/device_check.py keeps its own copy: it runs on devices without edgessl).

Every file edgessl writes gets the mode a plain `open(..., "w")` would give (0644 under the usual umask 022), also
when the writer (safetensors, tempfile) creates it 0600.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from safetensors.torch import save_file


def default_mode() -> int:
    """0666 minus the process umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) fills a temporary file next to `path`; it is then given the default mode and renamed over `path`.
    On any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors.torch.save_file through a temporary file (mode 0644, not safetensors' 0600)."""
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


HASH_BLOCK = 1 << 20  # files are hashed in 1 MiB blocks


def sha256_files(paths: Iterable[str | Path]) -> str:
    """Hex sha256 of the files' bytes read one after the other (of one file: its sha256), in 1 MiB blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(HASH_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    return sha256_files([path])
