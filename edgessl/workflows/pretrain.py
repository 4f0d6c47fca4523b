"""`edgessl pretrain`: options (PretrainConfig, with recipes and a reloaded config.yaml) -> the training run
(edgessl.train.run) with the kNN monitor and, after a --widths run, the per-width report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgessl.config import resolve
from edgessl.deploy.widths import width_report
from edgessl.errors import UserError
from edgessl.evaluate.monitor import Monitor
from edgessl.options import check_paths
from edgessl.report.say import Say
from edgessl.rundir import resume_problem
from edgessl.train.run import pretrain as train_run
from edgessl.train.types import Evaluation, PretrainResult
from edgessl.workflows.slim import widths_table


def standard_evaluation() -> Evaluation:
    """What pretraining measures besides training: the kNN monitor, and after a --widths run the per-width report
    (widths.json, widths.png and a table)."""
    return Evaluation(monitor=Monitor, widths_report=report_widths)


def report_widths(run_dir, widths, labelled, val, device, console) -> None:
    """Per-width params, MACs, latency, accuracy -> widths.json + widths.png (slimmed encoders in width-<w>/)."""
    report = width_report(run_dir, widths, labelled=labelled, test=val, device=device, console=console)
    Say(console).table(widths_table(report))


def pretrain(
    recipe: str | None = None,
    config: str | Path | None = None,
    resume: str | Path | None = None,
    console=None,
    on_step=None,
    overwrite: bool = False,
    **options: Any,
) -> PretrainResult:
    """Pretrain an encoder. Options are PretrainConfig fields (backbone, data, epochs, bank_lr, ...).

    resume: a run directory; its config.yaml is reloaded and `options` override it. A different data folder
    (other files than the run recorded) is refused; a moved copy of the same files is accepted.
    overwrite: a non-empty `out` is moved aside to <out>.old-<time> (otherwise it is refused).
    Nothing is written before every check has passed. Returns a PretrainResult (run_dir, history)."""
    check_paths({"resume": resume, "config": config, "recipe": recipe})
    if resume is not None:
        problem = resume_problem(resume)
        if problem:
            raise UserError(problem)
        if overwrite:
            raise UserError("--resume continues a run and --overwrite starts a new one: pass one of them.")
        if config is None:
            config = Path(resume) / "config.yaml"
        options.pop("out", None)
    cfg = resolve(options, recipe=recipe, config=str(config) if config else None)
    return train_run(cfg, resume=resume, console=console, on_step=on_step, overwrite=overwrite,
                     evaluation=standard_evaluation())
