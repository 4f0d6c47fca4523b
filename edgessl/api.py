"""The Python API; the CLI calls these and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgessl.config import resolve
from edgessl.errors import UserError
from edgessl.models.backbone import load_encoder, read_encoder_meta

__all__ = ["pretrain", "load_encoder", "read_encoder_meta"]


def pretrain(
    recipe: str | None = None,
    config: str | Path | None = None,
    resume: str | Path | None = None,
    console=None,
    on_step=None,
    **options: Any,
):
    """Pretrain an encoder. Options are PretrainConfig fields (backbone, data, epochs, bank_lr, ...).

    resume: a run directory; its config.yaml is reloaded and `options` override it.
    Returns a PretrainResult (run_dir, history)."""
    from edgessl.train.loop import pretrain as run

    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "checkpoint.pt").is_file():
            raise UserError(f"Cannot resume '{run_dir}': no checkpoint.pt in it (no epoch has completed yet?).")
        if config is None:
            config = run_dir / "config.yaml"
        options.pop("out", None)
    cfg = resolve(options, recipe=recipe, config=str(config) if config else None)
    return run(cfg, resume=resume, console=console, on_step=on_step)
