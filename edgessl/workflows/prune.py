"""`edgessl prune`: prune a single-width encoder, then recover with a short pretraining distilled from the original.

Route 2 to a smaller model (route 1: `--widths` + `edgessl slim`). The pruned network keeps the run's bank and
head output; the recovery runs the same training loop with the same single-branch loss, plus a soft
cross-entropy toward the unpruned encoder's distribution over the same bank columns (weight `distill`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from edgessl.config import replace, resolve
from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment_batch
from edgessl.data.folder import load_image_folder
from edgessl.demo import demo_images
from edgessl.deploy.widths import encoders_report
from edgessl.errors import Interrupted, UserError, stopped
from edgessl.method.instance import InstanceDiscrimination
from edgessl.models.head import build_encoder
from edgessl.models.prune import prune_by_importance
from edgessl.models.slimmable import last_layer
from edgessl.options import PruneOptions, check_groups, takes_options
from edgessl.report.say import Say
from edgessl.rundir import check_out
from edgessl.train.checkpoint import load_checkpoint
from edgessl.train.run import pretrain
from edgessl.train.types import PretrainResult, WarmStart
from edgessl.workflows.pretrain import standard_evaluation
from edgessl.workflows.slim import widths_table


def load_run_encoder(run_dir: Path):
    """(config, Encoder with the run's last weights, checkpoint) of a pretraining run directory."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "checkpoint.pt").is_file():
        raise UserError(f"'{run_dir}' is not a pretraining run directory (config.yaml and checkpoint.pt are needed).")
    meta = json.loads((run_dir / "encoder.json").read_text()) if (run_dir / "encoder.json").is_file() else {}
    if meta.get("pruned"):  # its config.yaml builds the source architecture, not the pruned one
        raise UserError(f"'{run_dir}' is a pruned run (--ratio {meta.get('prune_ratio', '?')} of "
                        f"{meta.get('source_run', 'its source run')}): prune the source run with a larger --ratio "
                        "instead.")
    cfg = resolve(config=str(run_dir / "config.yaml"))
    ckpt = load_checkpoint(run_dir)
    encoder, _, _ = build_encoder(cfg)
    state = ckpt["model"]
    if any(k.startswith("encoder.") for k in state):  # a --widths run: its full width
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    encoder.load_state_dict(state)
    return cfg, encoder, ckpt


@takes_options(PruneOptions, lead=("run_dir",), positional=("ratio", "criterion", "epochs", "distill", "out"),
               extra={"console": None})
def prune_encoder(run_dir: str | Path, opts: PruneOptions, console=None) -> PretrainResult:
    """Prune `ratio` of every channel group of the run's encoder (projection output kept), recover for `epochs`
    (default a quarter of the run's epochs, at least 1) and save it as a run directory (default
    <run>/pruned-<ratio>/) whose encoder.json rebuilds the pruned architecture. Options:
    edgessl.options.PruneOptions (`edgessl prune`'s flags). Returns the recovery's PretrainResult (`.run_dir`,
    `.history`, `.report` = its widths.json entries)."""
    run_dir = Path(run_dir)
    ratio, criterion, epochs, distill, out = opts.ratio, opts.criterion, opts.epochs, opts.distill, opts.out
    quiet, seed, overwrite = opts.quiet, opts.seed, opts.overwrite
    check_groups(opts)  # --threads 0 had run and gone into config.yaml, which then failed to load
    if not 0 < ratio < 1:
        raise UserError(f"--ratio must be in (0, 1) (the fraction of channels removed), not {ratio:g}.")
    if not 0 <= distill <= 1:
        raise UserError(f"--distill must be in [0, 1], not {distill:g}.")
    if epochs is not None and epochs <= 0:  # 0 is not "the default length"
        raise UserError(f"--epochs must be positive, not {epochs} (leave it out for a quarter of the run's epochs).")
    cfg, teacher, ckpt = load_run_encoder(run_dir)
    if cfg.data is not None and not Path(cfg.data).is_dir():
        raise UserError(f"the run's training folder '{cfg.data}' (data in its config.yaml) is gone: prune trains the "
                        "pruned encoder on it again. Put the images back there, then prune.")
    out = Path(out or run_dir / f"pruned-{ratio:g}")
    if out.resolve() == Path(run_dir).resolve():  # with --overwrite the run moved aside and the report named itself
        raise UserError(f"--out '{out}' is the run being pruned: the pruned encoder goes into a folder of its own "
                        f"(default {Path(run_dir) / f'pruned-{ratio:g}'}).")
    check_out(out, overwrite, resume="")  # before the pruning, not after it; prune has no --resume
    size = cfg.image_size
    example = torch.zeros(2, 3, size, size)
    student = copy.deepcopy(teacher)
    bank = ckpt["method"]["bank.weight"]

    def taylor_batch() -> None:  # one batch of the training loss, for the Taylor importance

        images = load_image_folder(cfg.data or str(demo_images()), size, labels=False)
        idx = torch.arange(min(len(images), cfg.batch_size))
        x = augment_batch(images.get(idx), idx, 0, cfg.seed, AugmentConfig(), IMAGENET_MEAN, IMAGENET_STD)
        method = InstanceDiscrimination(len(bank), bank.shape[1], cfg.temperature, cfg.negatives,
                                        sd_weight=cfg.sd_weight)
        method.bank.weight.copy_(bank)
        student.train()
        method(F.normalize(student(x), dim=1), idx).loss.backward()

    counts = prune_by_importance(student, example, ratio, criterion, keep_outputs=[last_layer(student.head)],
                                 taylor_batch=taylor_batch)
    backbone_counts = {k[len("backbone."):]: v for k, v in counts.items() if k.startswith("backbone.")}
    rcfg = replace(cfg, epochs=max(1, round(cfg.epochs / 4)) if epochs is None else epochs, widths=None,
                   out=str(out), quiet=quiet, threads=str(opts.threads) if opts.threads is not None else cfg.threads,
                   seed=cfg.seed if seed is None else seed)
    meta = {"pruned": backbone_counts, "prune_ratio": ratio, "criterion": criterion, "source_run": str(run_dir)}
    warm = WarmStart(student, meta=meta, teacher=teacher, bank=bank, distill=distill)
    try:
        result = pretrain(rcfg, console=console, warm=warm, overwrite=overwrite, evaluation=standard_evaluation())
    except Interrupted as e:  # its "continue with edgessl pretrain --resume" cannot work for a pruned run
        kept = e.kept or str(e).rstrip(".")
        raise Interrupted(f"{kept}. A pruned run cannot be resumed (its recovery distils from {run_dir}): run the "
                          "same edgessl prune again with --overwrite.", e.exit_code) from None
    # the report of a --widths run, for the original (width 1.0) and the pruned encoder (width = kept fraction)

    labelled = (cfg.data or str(demo_images())) if (cfg.labels_from_folders or cfg.data is None) else None
    try:
        report = encoders_report(result.run_dir, [(1.0, run_dir), (round(1 - ratio, 6), result.run_dir)],
                                 labelled=labelled, test=cfg.val, console=None if rcfg.quiet else console)
    except KeyboardInterrupt as e:  # after "Done.": say the encoder is whole and only the comparison is missing
        raise stopped(e, f" during the report: the pruned encoder in {result.run_dir} is complete; only its "
                         "comparison with the source (widths.json, widths.png) is missing.") from None
    say = Say(console, rcfg.quiet)
    say.table(widths_table(report))
    if caution := shallow_prune(ratio, report[1]["params"] / max(report[0]["params"], 1)):
        say.warn(caution)
    result.report = report
    return result


def shallow_prune(ratio: float, kept: float) -> str | None:
    """A warning when the pruned encoder keeps more than 1 - ratio of the parameters (kept: its share): every group
    keeps at least one channel and the layers outside the groups (the stem's input, the projection output) stay
    whole, so a --ratio near 1 prunes less than it says."""
    if kept <= 1 - ratio:
        return None
    return (f"--ratio {ratio:g} kept {kept:.0%} of the parameters, more than 1 - ratio: every channel group keeps at "
            "least one channel and the layers outside the groups stay whole.")
