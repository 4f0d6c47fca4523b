"""`edgessl pretrain`: options (PretrainConfig, with recipes and a reloaded config.yaml) -> the training run
(edgessl.train.run) with the kNN monitor and, after a --widths run, the per-width report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgessl.config import FIELD_NAMES, PretrainConfig, load_recipe, read_yaml, replace, resolve, save_config
from edgessl.deploy import manifest as mf
from edgessl.deploy.widths import width_report
from edgessl.errors import UserError
from edgessl.evaluate.monitor import Monitor
from edgessl.options import check_paths
from edgessl.report.say import Say
from edgessl.rundir import CHECKPOINT, plural, resume_problem
from edgessl.train.checkpoint import load_checkpoint
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

    resume: a run directory; its config.yaml is reloaded and `options` may change how long, where and how it runs
    (RESUME_FREE: --epochs, --threads, --device, ...); another training setting, --recipe, --config or another --out
    is refused (check_resume_options, check_unchanged). A different data folder (other files than the run recorded)
    is refused; a moved copy of the same files is accepted.
    config: a run's own config.yaml starts a new run with its settings in a new folder (its out and quiet not taken;
    so does such a file given as the recipe).
    overwrite: a non-empty `out` is moved aside to <out>.old-<time> (otherwise it is refused).
    Nothing is written before every check has passed. Returns a PretrainResult (run_dir, history)."""
    check_paths({"resume": resume, "config": config, "recipe": recipe})
    if resume is not None:
        restore_config(Path(resume), Say(console, bool(options.get("quiet"))))
        problem = resume_problem(resume) or pruned_problem(Path(resume))
        if problem:
            raise UserError(problem)
        if overwrite:
            raise UserError("--resume continues a run and --overwrite starts a new one: pass one of them.")
        check_resume_options(Path(resume), recipe, config, options.get("out"))
        config = Path(resume) / "config.yaml"
        options.pop("out", None)
    cfg = resolve(options, recipe=recipe, config=str(config) if config is not None else None)
    reloaded = [f for f in (config, recipe) if f is not None and run_of(Path(f)) is not None]
    if resume is not None or reloaded:  # a run's own config.yaml (as --config or --recipe):
        cfg = replace(cfg, quiet=bool(options.get("quiet", False)))  # display is not a setting
        if resume is None and "out" not in options:  # reloaded for a new run, not into the run it came from
            cfg = replace(cfg, out=None)
    if recipe is not None and recipe not in reloaded:
        say_recipe(recipe, options, Say(console, cfg.quiet))
    if resume is not None:
        before = read_yaml(Path(config), "Config")
        check_unchanged(Path(resume), before, cfg)
        say_shorter(Path(resume), before.get("epochs"), cfg, Say(console, cfg.quiet))
    result = train_run(cfg, resume=resume, console=console, on_step=on_step, overwrite=overwrite,
                       evaluation=standard_evaluation())
    if not result.already_complete:
        say_stale_export(result.run_dir, Say(console, cfg.quiet))
    return result


# What a resumed run may change: where and how it runs, how long, what it reports. Anything else (the loss, the bank,
# the optimiser, the batch, the augmentations, the seed) would make config.yaml describe one part of the run only;
# the architecture, the input size and the teacher are refused by their own checks (edgessl.train.prepare);
# --widths here, by name (the checkpoint's check could not name it).
RESUME_FREE = {"data", "val", "labels_from_folders", "cache_mb", "cache_dir", "cache_max", "workers", "threads",
               "epochs", "device", "precision", "deterministic", "sync_bn", "checkpoint_every", "eval_every",
               "monitor_queries", "logger", "quiet", "out", "image_size", "small_input", "backbone", "head",
               "head_hidden", "feature_dim", "init", "teacher", "teacher_backbone", "teacher_image_size"}


def check_resume_options(run: Path, recipe, config, out) -> None:
    """UserError for options --resume cannot honour: --recipe and --config (the run keeps its own config.yaml), an
    --out other than the run (it continues in its own folder)."""
    if recipe is not None or config is not None:
        flag = "--recipe" if recipe is not None else "--config"
        raise UserError(f"Cannot resume '{run}' with {flag}: a run keeps its config.yaml. Resume without {flag}, or "
                        f"start a new run from its weights: --init {run} {flag} {recipe or config}.")
    if out is not None and Path(out).resolve() != run.resolve():
        raise UserError(f"Cannot resume '{run}' into --out '{out}': a run continues in its own folder. Resume without "
                        f"--out, or start a new run from its weights: --init {run} --out {out}.")


def check_unchanged(run: Path, before: dict[str, Any], cfg) -> None:
    """UserError naming each training setting that differs from the run's config.yaml (`before`; a value left to
    `auto` is resolved again and not compared)."""
    after = cfg.to_dict()
    text = lambda v: "none" if v is None else v  # noqa: E731 - a run without --widths, --init, ...
    changed = [f"--{k.replace('_', '-')} {text(before[k])}, not {text(after[k])}" for k in after
               if k not in RESUME_FREE and k in before and after[k] != before[k] and after[k] != "auto"]
    if changed:
        which = "that option" if len(changed) == 1 else "those options"
        raise UserError(f"Cannot resume '{run}': it trains with {'; '.join(changed)}: a run keeps its settings. Resume "
                        f"without {which}, or start a new run from its weights: --init {run}.")


def say_shorter(run: Path, planned, cfg, say) -> None:
    """A line when --epochs ends a resumed run before the length it was set for (`planned`, its config.yaml's): the
    cosine schedule is that of the shorter run, so the learning rate falls to 0 sooner (an extended run's is
    stretched alike; docs/data.md)."""
    done = epochs_trained(run)
    if isinstance(planned, int) and done < cfg.epochs < planned:
        say(f"--epochs {cfg.epochs} ends the run before the {planned} it was set for: its learning rate follows the "
            f"schedule of a run of {cfg.epochs} epochs and falls to 0 by epoch {cfg.epochs}.", markup=False)


def pruned_problem(run: Path) -> str | None:
    """Why a run `edgessl prune` wrote cannot be resumed (None for any other run): its recovery distils from the
    source run's encoder and starts from the pruned architecture, neither of which a resume rebuilds (it had failed
    with PyTorch's state-dict error)."""
    meta = run_record(run)
    if "pruned" not in meta:
        return None
    source = meta.get("source_run", "RUN")
    return (f"Cannot resume '{run}': it is a pruned run (edgessl prune), whose recovery distils from {source}; a "
            f"resume does not rebuild that. Prune again instead: edgessl prune {source} --ratio "
            f"{meta.get('prune_ratio', 'R')} --out {run} --overwrite (with the --epochs you want).")


def run_record(run: Path) -> dict[str, Any]:
    """A run's encoder.json, {} when there is none yet or it cannot be read (what the resume's lines consult)."""
    try:
        meta = json.loads((run / "encoder.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def epochs_trained(run: Path) -> int:
    """encoder.json's epochs_trained (0 when it cannot be read)."""
    done = run_record(run).get("epochs_trained", 0)
    return done if isinstance(done, int) else 0


def say_stale_export(run: Path, say) -> None:
    """A line when the run's own export folder holds an encoder exported after fewer (or more) epochs than the run
    has now trained: a resumed or extended run leaves its earlier export behind (export names the epochs in its
    manifest's source)."""
    try:
        entries = json.loads((run / "export" / mf.MANIFEST).read_text()).get("models") or []
        exported = {e["source"]["epochs_trained"] for e in entries
                    if not (e.get("source") or {}).get("classifier") and "epochs_trained" in (e.get("source") or {})}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return
    now = epochs_trained(run)
    old = sorted(e for e in exported if isinstance(e, int) and e != now)
    if old:
        say(f"{run / 'export'} holds the encoder exported after {plural(old[-1], 'epoch')}; the run has now trained "
            f"{now}: export it again (edgessl export {run}).", markup=False)


def restore_config(run: Path, say) -> None:
    """Write back a run's config.yaml from its checkpoint, which holds the same settings, when the file is gone (a
    resume had stopped at "its config.yaml is missing", with no way on)."""
    if not (run / CHECKPOINT).is_file() or (run / "config.yaml").exists():
        return
    settings = load_checkpoint(run).get("config")
    if isinstance(settings, dict):
        save_config(PretrainConfig(**{k: v for k, v in settings.items() if k in FIELD_NAMES}), run / "config.yaml")
        say(f"config.yaml was missing in {run}: written back from checkpoint.pt, which holds the settings it ran "
            "with.", markup=False)


def say_recipe(recipe: str, options: dict[str, Any], say) -> None:
    """One line before the banner: the settings the recipe set and the flags given over it (nothing had named the
    recipe: its numbers simply replaced the banner's auto lines)."""
    keys = sorted(load_recipe(recipe))
    given = {k for k, v in options.items() if v is not None}
    over = [f"--{k.replace('_', '-')}" for k in keys if k in given]
    say(f"Recipe: {recipe} sets {', '.join(k for k in keys if k not in given) or 'nothing'}"
        + (f" ({', '.join(over)} given over it)" if over else "") + ".", markup=False)


def run_of(config: Path) -> Path | None:
    """The run directory whose own config.yaml `config` is (its `out` is the file's folder), else None."""
    try:
        out = read_yaml(config, "Config").get("out")
    except UserError:
        return None
    folder = config.resolve().parent
    return folder if out and Path(out).resolve() == folder and config.name == "config.yaml" else None
