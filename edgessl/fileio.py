"""Writing files so that a reader never sees half of one: a temporary file in the same folder, then a rename.
Also the one sha256 of a file's bytes (export/device_check.py keeps its own copy: it runs on devices without edgessl),
and the one way a torch file is read: safe_torch_load, which never runs code from the file.

Every file edgessl writes gets the mode a plain `open(..., "w")` would give (0644 under the usual umask 022), also
when the writer (safetensors, tempfile) creates it 0600.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgessl.errors import UserError


def default_mode() -> int:
    """0666 minus the process umask (0644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_folder_path(folder: str | Path, out: str | Path) -> None:
    """UserError naming --out `out` when a file stands where `folder` (out itself, or the folder it goes in) or a
    folder above it would be made: refused before any work, not as the system's error when writing."""
    for part in [Path(folder), *Path(folder).parents]:
        if part.exists():
            if not part.is_dir():
                raise UserError(f"--out '{out}': '{part}' is a file, not a folder; choose another --out.")
            return


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
    from safetensors.torch import save_file  # torch loads when a file is written, not when edgessl's CLI starts

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


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a reader (or a
    resume after a kill at any moment) sees the old file or the new one, never half of one."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs, and nothing that can run code: the array and dtype reconstructors."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    found += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object())) if n.endswith("DType")]
    return found


# what torch.load raises on a damaged or foreign file (truncated, overwritten): one tuple for every caller
DAMAGED_TORCH_FILE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError)


def safe_torch_load(path: str | Path, what: str = "", map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings and containers (and numpy arrays, which
    checkpoints of edgessl 0.2 hold), never an arbitrary object; a file that holds one is refused with a UserError
    naming it, and nothing in it runs. what: how the error names the file (e.g. "--init")."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise  # no object was refused: a damaged or foreign file, for the caller to name
        detail = f"GLOBAL {found.group(1)}"
        raise UserError(f"{what + ' ' if what else ''}'{path}' holds a pickled object that is not weights or plain "
                        f"data ({detail[:160]}); edgessl never runs code from a file, so it is refused. Use a run "
                        "directory or weights file you trust.") from None


def load_yaml_unique(text: str) -> Any:
    """yaml.safe_load that refuses a key given twice in one mapping (yaml.YAMLError naming it: safe_load keeps the
    last silently, so `epochs: 1` then `epochs: 2` had trained for 2 without a word), and reads 1e-3 as a number."""
    import yaml

    class Unique(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' is given twice (line "
                                                        f"{key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node, deep)

    Unique.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    # YAML 1.2's floats that YAML 1.1 (PyYAML) reads as text: 1e-3, 5E4, 2.5e3 (`lr: 1e-3` had been "not a number")
    Unique.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?"
                                                                       r"[eE][-+]?[0-9]+$"), list("-+0123456789."))
    return yaml.load(text, Loader=Unique)  # noqa: S506 - a SafeLoader subclass
