"""Every pretraining option in one dataclass; recipes (YAML), reloadable resolved configs and CLI overrides.

Precedence, lowest first: defaults < --recipe < --config < the --method preset < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

import edgessl.recipes
from edgessl._version import __version__
from edgessl.errors import UserError
from edgessl.fileio import atomic_write_text
from edgessl.loggers import parse_loggers


@dataclass
class PretrainConfig:
    # data
    data: str | None = None  # None: the bundled demo images
    image_size: int = 64
    val: str | None = None
    labels_from_folders: bool = False
    cache_mb: float = 4096.0
    cache_dir: str = "auto"  # decoded-image cache on disk: auto (EDGESSL_CACHE_DIR or ~/.cache/edgessl), a folder, none
    workers: str = "auto"  # decoding threads: auto (one per available core, at most 8) or a number
    threads: str = "auto"  # CPU threads: auto (edgessl.runtime's policy) or a number
    # model
    backbone: str = "mobilenetv3_small"
    init: str | None = None  # start from: timm (its pretrained weights), a weights file, or an edgessl run
    small_input: str = "auto"
    head: str = "linear"
    head_hidden: int = 2048
    feature_dim: int = 128
    # several widths of one network (SlimCLR): None = one width
    widths: str | None = None  # e.g. "1.0,0.75,0.5,0.25"
    slow_start: float = 0.5  # fraction of the epochs before the sub-widths join
    width_distill: float = 0.5  # weight of the distillation from the full width in each sub-width's loss; 0 = off
    width_reweight: bool = True  # full width weighs 1 + sum of sub-widths
    # a frozen teacher, run once over the training images (teacher-bank distillation): None = no teacher
    teacher: str | None = None  # an edgessl run, timm:<name>, or a weights file (with teacher_backbone)
    teacher_backbone: str | None = None
    teacher_image_size: int | None = None  # None: the teacher's own input size
    teacher_weight: float = 1.0
    teacher_temperature: float = 0.05
    teacher_per_step: bool = False  # ablation: run the teacher on every crop instead of reading its bank
    teacher_predictor: float = 0.0  # variant: weight of a cosine loss to the teacher's row through a predictor
    # method
    method: str = "edgessl"
    temperature: float = 0.1
    negatives: int = 16384
    bank_init: str = "auto"  # teacher with --teacher (and teacher_weight > 0), else forward
    bank_update: str = "grad"
    bank_lr: float = 1.0
    bank_momentum: float = 0.5
    sd_weight: float = 5.0
    sd_temperature: float = 1.0
    sd_alpha: float = 0.5
    cutmix: float = 0.0
    cutmix_lam: str = "max"  # max: max(lambda, 1 - lambda), the authors' rule (measured better); beta: lambda
    blur: float = 0.0
    # optimisation
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.2  # per 256 images: the optimiser's lr is lr * batch_size / 256
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    # run
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    deterministic: bool = False
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (no effect on one process)
    eval_every: int = 1
    monitor_queries: int = 5000  # the kNN monitor classifies at most this many images (a fixed random subset); 0 = all
    logger: str = "none"  # experiment loggers: none or a subset of tensorboard,mlflow,wandb (edgessl.loggers)
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# What --method npid sets (unless a flag on the command line says otherwise).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "edgessl": {},
    "npid": {"bank_init": "random", "bank_update": "momentum", "temperature": 0.1, "sd_weight": 0.0},
}

CHOICES = {
    "method": tuple(METHOD_PRESETS),
    "bank_init": ("auto", "forward", "random", "teacher"),
    "bank_update": ("grad", "momentum"),
    "head": ("mlp", "linear"),
    "optimizer": ("sgd", "adamw", "lars"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "small_input": ("auto", "on", "off"),
    "cutmix_lam": ("beta", "max"),
}

FIELD_NAMES = {f.name for f in fields(PretrainConfig)}


# What each option means (the CLI's --help and docs/method.md); its default comes from PretrainConfig, nowhere else.
FIELD_HELP: dict[str, str] = {
    "data": "Folder of images, searched recursively.",
    "image_size": "Training resolution in pixels.",
    "val": "Labelled folder (one subfolder per class) for the online kNN monitor.",
    "labels_from_folders": "Use --data's subfolders as labels for the kNN monitor.",
    "cache_mb": "RAM for decoded images in MiB; a larger data set is memory-mapped from the disk cache (or, with "
                "--cache-dir none, decoded again at every step).",
    "cache_dir": "Decoded-image cache: auto (EDGESSL_CACHE_DIR, else ~/.cache/edgessl), a folder, or none (no disk "
                 "cache). Each folder is decoded once; `edgessl cache list|clear` shows and frees it.",
    "workers": "Decoding threads: auto (one per available core, at most 8) or a number.",
    "threads": "CPU threads for the network: auto (all cores when the machine is idle, fewer when other jobs keep them "
               "busy) or a number.",
    "backbone": "timm model name or alias (mobilenetv3_small, mobilenetv3_large, resnet18, ...).",
    "init": "Start the backbone from other weights: timm (timm's pretrained weights; downloads), a local .safetensors "
            "or .pth state dict, or an edgessl run directory (its encoder continues on --data with a new bank).",
    "small_input": "auto | on | off: stride-1 stem for small images (auto: on at <= 32 px).",
    "head": "Projection head: linear | mlp.",
    "head_hidden": "Hidden units of the MLP head.",
    "feature_dim": "Output dimension d of the head (bank width).",
    "widths": "Train one weight-sharing network at several widths, e.g. 1.0,0.75,0.5,0.25 (SlimCLR); pick one later "
              "with `edgessl slim`.",
    "slow_start": "With --widths: fraction of the epochs trained at full width only before the sub-widths join.",
    "width_distill": "With --widths: weight of each sub-width's distillation from the full width (0 = off).",
    "teacher": "Distil a frozen teacher run once over the training images: an edgessl run directory, timm:<name> "
               "(timm's pretrained weights; downloads), or a local weights file with --teacher-backbone. Its "
               "features are computed once and kept with the run (teacher.safetensors).",
    "teacher_backbone": "With --teacher FILE: the file's timm architecture (e.g. resnet50).",
    "teacher_image_size": "The teacher's input size in pixels (default: the teacher's own: a run's image size, "
                          "timm's pretrained input size).",
    "teacher_weight": "w_t of the relational KL to the teacher's distribution over the bank columns; 0 = unused.",
    "teacher_temperature": "tau_t of the teacher's distribution softmax(t_i . T^T / tau_t).",
    "teacher_per_step": "Ablation: run the teacher on every crop of every step (as SEED and LightlyTrain do) instead "
                        "of reading its bank.",
    "teacher_predictor": "Variant: weight of a cosine loss between a small predictor of the student's feature and the "
                         "teacher's row of the image (0 = off; one process only).",
    "method": "edgessl (the full method) | npid (random init, momentum update, tau 0.1, no L_sd).",
    "temperature": "tau of the instance loss.",
    "negatives": "Whole bank up to batch rows + this many rows, else batch rows + this many distinct sampled rows.",
    "bank_init": "auto (teacher with --teacher and a --teacher-weight above 0, else forward) | forward (one pass of "
                 "the untrained network) | random | teacher (the --teacher bank, projected to --feature-dim by its top "
                 "singular directions).",
    "bank_update": "grad (every column in use moves) | momentum (NPID).",
    "bank_lr": "eta of the gradient bank update.",
    "bank_momentum": "m of the momentum bank update.",
    "sd_weight": "lambda of the self-distillation loss; 0 turns it off.",
    "sd_temperature": "tau_sd of the self-distillation loss.",
    "cutmix": "CutMix Beta(alpha, alpha) inside the batch; 0 = off.",
    "cutmix_lam": "beta: the kept area lambda ~ Beta(alpha, alpha) | max: max(lambda, 1 - lambda) (the image keeps "
                  "the larger part, as the authors' code).",
    "blur": "Probability of a Gaussian blur.",
    "epochs": "Epochs.",
    "batch_size": "Images per step; under torchrun the global batch over all processes.",
    "lr": "Learning rate per 256 images (scaled by batch-size/256).",
    "optimizer": "sgd | adamw | lars.",
    "weight_decay": "AdamW/SGD weight decay.",
    "warmup_epochs": "Linear warm-up before the cosine decay.",
    "out": "Run directory.",
    "seed": "Seed of the weights, the epoch order, the crops and the sampled negatives.",
    "device": "auto | cpu | cuda | mps (auto: cuda, else mps on Apple silicon, else cpu).",
    "precision": "auto | fp32 | bf16 | fp16 (auto: bf16 or fp16 on CUDA, fp32 on CPU and MPS).",
    "deterministic": "Deterministic algorithms (bit-exact resume on CPU).",
    "sync_bn": "Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm). No effect on one process.",
    "eval_every": "kNN monitor every N epochs (0 = off).",
    "monitor_queries": "The kNN monitor classifies at most this many labelled images (the same random subset every "
                       "epoch; the kNN memory keeps all of them); 0 = all.",
    "quiet": "No progress bar; log lines only.",
    "logger": "Experiment loggers: none, or any of tensorboard,mlflow,wandb (comma-separated; each an extra, e.g. "
              "pip install 'edgessl[tensorboard]'). Each gets the metrics.jsonl rows, the plots and config.yaml; "
              "eval and finetune log to the run's loggers too.",
    "momentum": "SGD/LARS momentum.",
    "sd_alpha": "alpha of the self-distillation target normalize(p^alpha).",
    "width_reweight": "With --widths: the full width weighs 1 + sum of the sub-widths (--no-width-reweight: every "
                      "width weighs 1).",
}
DEFAULT_SHOWN = {"data": "the bundled demo images", "out": "runs/BACKBONE-TIME", "val": "none", "widths": "one width"}


def default_text(name: str) -> str:
    """How --help shows a field's default (from PretrainConfig): 'on'/'off' for switches, the value otherwise."""
    value = {f.name: f.default for f in fields(PretrainConfig)}[name]
    if name in DEFAULT_SHOWN:
        return DEFAULT_SHOWN[name]
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def flag_help(name: str) -> str:
    """--help text of a PretrainConfig field: its meaning and, for options that take a value, its default."""
    text = FIELD_HELP[name]
    if isinstance({f.name: f.default for f in fields(PretrainConfig)}[name], bool):
        return text
    return f"{text} [default: {default_text(name)}]"


def recipes_dir() -> Path:
    """The recipes shipped with the package (the repository's recipes/ folder)."""
    return Path(edgessl.recipes.__path__[0])


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} '{path}' is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' must be a mapping of option: value.")
    data = {k.replace("-", "_"): v for k, v in data.items() if k not in ("description", "resolved_by")}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise UserError(f"{what} '{path}' has unknown options: {', '.join(unknown)}.")
    return data


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by name (recipes/<name>.yaml) or by path."""
    path = Path(name_or_path)
    if not path.is_file():
        candidate = recipes_dir() / f"{name_or_path.removesuffix('.yaml')}.yaml"
        if not candidate.is_file():
            raise UserError(f"Recipe '{name_or_path}' not found. Known recipes: {', '.join(list_recipes())}.")
        path = candidate
    return read_yaml(path, "Recipe")


def resolve(
    overrides: dict[str, Any] | None = None, recipe: str | None = None, config: str | None = None
) -> PretrainConfig:
    """Build the final config. overrides: options given explicitly (CLI flags or API keyword arguments)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - FIELD_NAMES)
    if unknown:
        raise UserError(f"Unknown options: {', '.join(unknown)}.")
    values: dict[str, Any] = {}
    if recipe:
        values.update(load_recipe(recipe))
    if config:
        values.update(read_yaml(config, "Config"))
    method = overrides.get("method", values.get("method", PretrainConfig.method))
    if method not in METHOD_PRESETS:
        raise UserError(f"--method must be one of {', '.join(METHOD_PRESETS)}, not '{method}'.")
    values.update(METHOD_PRESETS[method])
    values.update(overrides)
    cfg = PretrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be one of {', '.join(allowed)}, not '{value}'.")
    positive = ["epochs", "batch_size", "image_size", "temperature", "negatives", "feature_dim", "sd_temperature"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {getattr(cfg, name)}.")
    for name in ("bank_lr", "sd_weight", "cutmix", "lr", "weight_decay", "warmup_epochs", "blur"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be zero or positive, not {getattr(cfg, name)}.")
    if not 0 <= cfg.bank_momentum < 1:
        raise UserError(f"--bank-momentum must be in [0, 1), not {cfg.bank_momentum}.")
    if cfg.widths is not None:
        cfg.widths = ",".join(f"{w:g}" for w in parse_widths(cfg.widths))
    if not 0 <= cfg.slow_start < 1:
        raise UserError(f"--slow-start must be in [0, 1) (a fraction of the epochs), not {cfg.slow_start}.")
    if not 0 <= cfg.width_distill <= 1:
        raise UserError(f"--width-distill must be in [0, 1], not {cfg.width_distill}.")
    if cfg.eval_every < 0:
        raise UserError("--eval-every must be zero (off) or positive.")
    if cfg.monitor_queries < 0:
        raise UserError("--monitor-queries must be zero (all) or positive.")
    cfg.workers = str(cfg.workers)
    if cfg.workers != "auto" and not (cfg.workers.isdigit() and int(cfg.workers) > 0):
        raise UserError(f"--workers must be auto or a positive number, not '{cfg.workers}'.")
    cfg.threads = str(cfg.threads)
    if cfg.threads != "auto" and not (cfg.threads.isdigit() and int(cfg.threads) > 0):
        raise UserError(f"--threads must be auto or a positive number, not '{cfg.threads}'.")
    cfg.logger = ",".join(parse_loggers(cfg.logger)) or "none"
    validate_teacher(cfg)


def validate_teacher(cfg: PretrainConfig) -> None:
    """The --teacher options: each needs --teacher, and the numbers must make sense; --bank-init auto resolved."""
    if cfg.teacher is None:
        given = [f for f in ("teacher_backbone", "teacher_image_size") if getattr(cfg, f) is not None]
        given += ["teacher_per_step"] if cfg.teacher_per_step else []
        given += ["teacher_predictor"] if cfg.teacher_predictor else []
        given += ["bank_init teacher"] if cfg.bank_init == "teacher" else []
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs --teacher (an edgessl run, timm:<name> or a "
                            "weights file).")
    for name in ("teacher_weight", "teacher_predictor"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be zero or positive, not {getattr(cfg, name)}.")
    if cfg.teacher_temperature <= 0:
        raise UserError(f"--teacher-temperature must be positive, not {cfg.teacher_temperature}.")
    if cfg.teacher_image_size is not None and cfg.teacher_image_size <= 0:
        raise UserError(f"--teacher-image-size must be positive, not {cfg.teacher_image_size}.")
    if cfg.bank_init == "auto":  # config.yaml records what ran
        cfg.bank_init = "teacher" if cfg.teacher and cfg.teacher_weight > 0 else "forward"


def check_width(width: float) -> float:
    if not (0 < width <= 1):
        raise UserError(f"a width must be in (0, 1], not {width:g}.")
    return width


def parse_widths(text: str | list | tuple) -> list[float]:
    """'1.0,0.5,0.25' -> [1.0, 0.5, 0.25] (descending, unique, 1.0 added when missing)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        widths = [float(str(w).strip()) for w in items if str(w).strip()]
    except ValueError:
        raise UserError(
            f"--widths must be comma-separated numbers in (0, 1], e.g. 1.0,0.75,0.5,0.25; got '{text}'."
        ) from None
    for w in widths:
        check_width(w)
    return sorted(set(widths) | {1.0}, reverse=True)


def save_config(cfg: PretrainConfig, path: str | Path) -> Path:
    """config.yaml: every option, reloadable with --config (written atomically). Returns the path."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    header = f"# resolved by edgessl {__version__}; reload with: edgessl pretrain --config {path}\n"
    return atomic_write_text(path, f"{header}{text}")


def replace(cfg: PretrainConfig, **changes: Any) -> PretrainConfig:
    return dataclasses.replace(cfg, **changes)
