"""Checkpoints that hold only tensors and plain values, and the RNG states an exact resume needs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgessl.errors import UserError
from edgessl.fileio import DAMAGED_TORCH_FILE, safe_torch_load

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (a checkpoint loads with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a --device cpu run leaves CUDA untouched
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state(); also the tuples that checkpoints of edgessl 0.2 hold."""
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(n)
    if isinstance(p, dict):
        p = (p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"])
    random.setstate(p)
    if "cuda" in state and torch.cuda.is_available():  # as many GPUs as both machines see (another count had been
        for index, gpu_state in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):  # an IndexError)
            torch.cuda.set_rng_state(gpu_state, index)


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A run's checkpoint.pt, read without running anything from it (edgessl.fileio.safe_torch_load); a damaged
    one (truncated, overwritten) is a UserError that says what is left (it had been a traceback from torch.load)."""
    path = Path(run_dir) / CHECKPOINT
    try:
        ckpt = safe_torch_load(path, "the checkpoint", map_location)
    except DAMAGED_TORCH_FILE as e:
        if isinstance(e, OSError) and not path.is_file():
            raise
        ckpt = e
    if not isinstance(ckpt, dict) or "epoch" not in ckpt:
        why = (f"{type(ckpt).__name__}: {(str(ckpt).splitlines() or [''])[0][:80]}" if isinstance(ckpt, Exception)
               else "no epoch")
        kept = (f"; its encoder of the last finished epoch is there: start a new run from it with --init {run_dir}"
                if (Path(run_dir) / "encoder.safetensors").is_file() else "")
        raise UserError(f"'{path}' is damaged or not an edgessl checkpoint ({why}): nothing can be resumed from "
                        f"it{kept}.")
    return ckpt
