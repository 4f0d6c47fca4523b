"""Every pretraining option in one dataclass; recipes (YAML), reloadable resolved configs and CLI overrides.
Over 400 lines: one job, every pretraining option with its checks (as edgessl.options for the other commands).

Precedence, lowest first: defaults < --recipe < --config < the --method preset < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

import edgessl.recipes
from edgessl._version import __version__
from edgessl.errors import UserError, named_source, with_near_names
from edgessl.fileio import atomic_write_text, load_yaml_unique
from edgessl.loggers import parse_loggers
from edgessl.options import Compute, Decode, HasDecode, check_groups, check_paths, names, option, shared
from edgessl.options import check_types as options_check_types


@dataclass(kw_only=True)
class PretrainConfig(HasDecode):
    """Every option of `edgessl pretrain` (the CLI flags, the API's keyword arguments, config.yaml's keys)."""

    # data
    data: str | None = option(None, "Folder of images, searched recursively.", shown="the bundled demo images")
    image_size: int | str = option("auto", "Training resolution in pixels, or auto: the images' own size (median "
                                           "shorter side, rounded down; at least 32), larger images at 128 px.")
    val: str | None = option(None, "Labelled folder (one subfolder per class) for the online kNN monitor.",
                             shown="none")
    labels_from_folders: bool = option(False, "Use --data's subfolders as labels for the kNN monitor.")
    cache_mb: float = shared(Decode, "cache_mb")
    cache_dir: str = shared(Decode, "cache_dir")
    cache_max: str = shared(Decode, "cache_max")
    workers: str = shared(Decode, "workers")
    threads: str = shared(Compute, "threads")
    # model
    backbone: str = option("mobilenetv3_small", "timm model name or alias (mobilenetv3_small, mobilenetv3_large, "
                                                "resnet18, ...).")
    init: str | None = option(None, "Start the backbone from other weights: timm (timm's pretrained weights; "
                                    "downloads), a local .safetensors or .pth state dict, or an edgessl run directory "
                                    "(its encoder continues on --data with a new bank).")
    small_input: str = option("auto", "auto | on | off: stride-1 stem for small images (auto: on at <= 32 px).")
    head: str = option("linear", "Projection head: linear | mlp.")
    head_hidden: int = option(2048, "Hidden units of the MLP head.")
    feature_dim: int = option(128, "Output dimension d of the head (bank width).")
    # several widths of one network (SlimCLR): None = one width
    widths: str | None = option(None, "Train one weight-sharing network at several widths, e.g. 1.0,0.75,0.5,0.25 "
                                      "(SlimCLR); pick one later with `edgessl slim`.", shown="one width")
    slow_start: float = option(0.5, "With --widths: fraction of the epochs trained at full width only before the "
                                    "sub-widths join.")
    width_distill: float = option(0.5, "With --widths: weight of each sub-width's distillation from the full width "
                                       "(0 = off).")
    width_reweight: bool = option(True, "With --widths: the full width's loss weighs 1 + sum of the sub-widths "
                                        "(--no-width-reweight: every width weighs 1).",
                                  flag="--no-width-reweight")
    # a frozen teacher, run once over the training images (teacher-bank distillation): None = no teacher
    teacher: str | None = option(None, "Distil a frozen teacher run once over the training images: an edgessl run "
                                       "directory, timm:NAME (timm's pretrained weights of model NAME; downloads), or "
                                       "a local weights file with --teacher-backbone. Its features are computed once "
                                       "and kept with the run (teacher.safetensors).")
    teacher_backbone: str | None = option(None, "With --teacher FILE: the file's timm architecture (e.g. resnet50).")
    teacher_image_size: int | None = option(None, "The teacher's input size in pixels (default: the teacher's own: a "
                                                  "run's image size, timm's pretrained input size).")
    teacher_weight: float = option(1.0, "w_t of the relational KL to the teacher's distribution over the bank "
                                        "columns; 0 = unused.")
    teacher_temperature: float = option(0.05, "tau_t of the teacher's distribution softmax(t_i . T^T / tau_t).")
    teacher_per_step: bool = option(False, "Ablation: run the teacher on every crop of every step (as SEED and "
                                           "LightlyTrain do) instead of reading its bank.")
    teacher_predictor: float = option(0.0, "Variant: weight of a cosine loss between a small predictor of the "
                                           "student's feature and the teacher's row of the image (0 = off; one "
                                           "process only).")
    # method
    method: str = option("edgessl", "edgessl (the full method) | npid (random init, momentum update, tau 0.1, no "
                                    "L_sd).")
    temperature: float | str = option("auto", "tau of the instance loss, or auto: 0.2 for a folder whose images look "
                                              "alike (scans, icons), else 0.1 (docs/method.md).")
    negatives: int = option(16384, "Whole bank up to batch rows + this many rows, else batch rows + this many "
                                   "distinct sampled rows.")
    bank_init: str = option("auto", "auto (teacher with --teacher and a --teacher-weight above 0, else forward) | "
                                    "forward (one pass of the untrained network) | random | teacher (the --teacher "
                                    "bank, projected to --feature-dim by its top singular directions).")
    bank_update: str = option("grad", "grad (every column in use moves) | momentum (NPID).")
    bank_lr: float | str = option("auto", "eta of the gradient bank update, or auto: 0.1 / tau (1 at tau 0.1, 0.5 at "
                                          "tau 0.2: the same step in units of the loss's gradient; docs/method.md).")
    bank_momentum: float = option(0.5, "m of the momentum bank update.")
    sd_weight: float = option(5.0, "lambda of the self-distillation loss; 0 turns it off.")
    sd_temperature: float = option(1.0, "tau_sd of the self-distillation loss.")
    sd_alpha: float = option(0.5, "alpha of the self-distillation target normalize(p^alpha).")
    cutmix: float = option(0.0, "CutMix Beta(alpha, alpha) inside the batch; 0 = off.")
    cutmix_lam: str = option("max", "beta: the kept area lambda ~ Beta(alpha, alpha) | max: max(lambda, 1 - lambda) "
                                    "(the image keeps the larger part, as the authors' code).")
    blur: float = option(0.0, "Probability of a Gaussian blur.")
    greyscale: str = option("auto", "auto | on | off: a greyscale folder (every image R = G = B) trains without the "
                                    "augmentations that act only on colour (saturation, hue, random grayscale), and "
                                    "its export turns colour input grey (auto: detected on the folder).")
    # optimisation
    epochs: int | str = option("auto", "Epochs, or auto: about 45,000 image views (45,000 / number of images), "
                                       "15 to 100.")
    batch_size: int = option(128, "Images per step; under torchrun the global batch over all processes.")
    lr: float = option(0.2, "Learning rate per 256 images (scaled by batch-size/256).")
    optimizer: str = option("sgd", "sgd | adamw | lars.")
    momentum: float = option(0.9, "SGD/LARS momentum.")
    weight_decay: float = option(5e-4, "AdamW/SGD weight decay.")
    warmup_epochs: float = option(1.0, "Linear warm-up before the cosine decay.")
    # run
    out: str | None = option(None, "Run directory.", shown="runs/BACKBONE-TIME")
    seed: int = option(0, "Seed of the weights, the epoch order, the crops and the sampled negatives.")
    device: str = shared(Compute, "device")
    precision: str = option("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 or fp16 on CUDA, fp32 on CPU and MPS).")
    deterministic: bool = option(False, "Deterministic algorithms (bit-exact resume on CPU).")
    sync_bn: bool = option(False, "Under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm). No "
                                  "effect on one process.")
    checkpoint_every: float = option(0.0, "Minutes between checkpoints inside an epoch (0: at each epoch's end "
                                          "only); a resume continues from the last one bit for bit. SIGTERM always "
                                          "checkpoints the step it stops at.")
    eval_every: int = option(1, "kNN monitor every N epochs (0 = off).")
    monitor_queries: int = option(5000, "The kNN monitor classifies at most this many labelled images (the same "
                                        "random subset every epoch; the kNN memory keeps all of them); 0 = all.")
    logger: str = option("none", "Experiment loggers: none, or any of tensorboard,mlflow,wandb (comma-separated; each "
                                 "an extra, e.g. pip install 'edgessl[tensorboard]'). Each gets the metrics.jsonl "
                                 "rows, the plots and config.yaml; eval and finetune log to the run's loggers too.")
    quiet: bool = option(False, "No progress bar, banner or closing lines: the epoch lines and warnings only.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class PretrainControl:
    """The arguments of `edgessl pretrain` that choose where options come from and which run to write or continue;
    not training options (not in config.yaml)."""

    recipe: str | None = option(None, "Recipe name (recipes/*.yaml) or YAML path; flags override it.", shown="none")
    config: str | None = option(None, "A resolved config.yaml to reload; flags override it.", shown="none")
    resume: str | None = option(None, "Continue a run directory after its last completed epoch (on the same files; "
                                      "--data may point at a moved copy).", shown="none")
    overwrite: bool = option(False, "Start a new run in a non-empty --out: the old contents are moved aside to "
                                    "OUT.old-TIME (nothing is deleted).")


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
    "greyscale": ("auto", "on", "off"),
}

FIELD_NAMES = set(names(PretrainConfig))


def recipes_dir() -> Path:
    """The recipes shipped with the package (the repository's recipes/ folder)."""
    return Path(edgessl.recipes.__path__[0])


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def read_yaml(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        hint = f"did you mean {path / 'config.yaml'}?" if (path / "config.yaml").is_file() else "pass a .yaml file."
        raise UserError(f"{what} '{path}' is a folder: {hint}")
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found.")
    try:
        data = load_yaml_unique(path.read_text()) or {}
    except UnicodeDecodeError:
        raise UserError(f"{what} '{path}' is not a text (YAML) file.") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} '{path}' is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' must be a mapping of option: value.")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise UserError(f"{what} '{path}' has an option name that is not text: {odd[0]!r} (option: value lines, "
                        "e.g. epochs: 30).")
    data = {k.replace("-", "_"): v for k, v in data.items() if k not in ("description", "resolved_by")}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise UserError(f"{what} '{path}' has unknown options: {with_near_names(unknown, FIELD_NAMES)}.")
    return data


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by name (recipes/<name>.yaml) or by path."""
    path = Path(name_or_path)
    if not path.exists():
        candidate = recipes_dir() / f"{str(name_or_path).removesuffix('.yaml')}.yaml"
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
        raise UserError(f"Unknown options: {with_near_names(unknown, FIELD_NAMES)}.")
    check_paths({"recipe": recipe, "config": config})
    files = [(load_recipe(recipe), f"Recipe '{recipe}'")] if recipe is not None else []
    files += [(read_yaml(config, "Config"), f"Config '{config}'")] if config is not None else []
    values: dict[str, Any] = {k: v for read, _ in files for k, v in read.items()}
    sources = {k: name for read, name in files for k in read if k not in overrides}  # the file a setting came from
    method = overrides.get("method", values.get("method", PretrainConfig.method))
    if method not in METHOD_PRESETS:
        raise UserError(f"--method must be one of {', '.join(METHOD_PRESETS)}, not '{method}'.")
    # a method switched on the command line replaces the file's settings; a file's own (config.yaml) stand above it
    values = {**values, **METHOD_PRESETS[method]} if "method" in overrides else {**METHOD_PRESETS[method], **values}
    values.update(overrides)
    try:
        check_paths(values)  # the API's arguments, and a config file's `data: 123`
        cfg = PretrainConfig(**values)
        validate(cfg)
    except UserError as e:  # a file's `blur: 2` had been "--blur is ...", a flag nobody typed
        raise UserError(named_source(str(e), sources)) from None
    return cfg


def check_types(cfg: PretrainConfig) -> None:
    """UserError when a setting of a config file, a recipe or the API has the wrong type (edgessl.options)."""
    options_check_types(PretrainConfig, {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def validate(cfg: PretrainConfig) -> None:
    check_types(cfg)
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name)
        if value not in allowed:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be one of {', '.join(allowed)}, not '{value}'.")
    for name in ("epochs", "image_size"):
        setattr(cfg, name, auto_or_int(getattr(cfg, name), name))
    cfg.temperature = auto_or_float(cfg.temperature, "temperature")
    cfg.bank_lr = auto_or_float(cfg.bank_lr, "bank_lr")
    positive = ["batch_size", "negatives", "feature_dim", "head_hidden", "sd_temperature"]
    positive += [name for name in ("epochs", "image_size", "temperature") if getattr(cfg, name) != "auto"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {getattr(cfg, name)}.")
    for name in ("bank_lr", "sd_weight", "cutmix", "lr", "weight_decay", "warmup_epochs", "blur"):
        if getattr(cfg, name) != "auto" and getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be zero or positive, not {getattr(cfg, name)}.")
    check_ranges(cfg)
    check_batch_memory(cfg.image_size, cfg.batch_size)
    if cfg.widths is not None:
        cfg.widths = ",".join(f"{w:g}" for w in parse_widths(cfg.widths))
    else:  # the width options change nothing without --widths: a silent no-op had looked like a setting
        given = [f for f in ("slow_start", "width_distill", "width_reweight") if getattr(cfg, f) != DEFAULTS[f]]
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs --widths (e.g. --widths 1.0,0.5).")
    check_groups(cfg)
    cfg.logger = ",".join(parse_loggers(cfg.logger)) or "none"
    validate_teacher(cfg)


def check_ranges(cfg: PretrainConfig) -> None:
    """UserError for a value outside its range: probabilities, fractions, momenta, minutes and counts."""
    if not 0 <= cfg.blur <= 1:
        raise UserError(f"--blur is a probability between 0 and 1, not {cfg.blur}.")
    if cfg.sd_alpha < 0:
        raise UserError(f"--sd-alpha must be zero (a uniform target) or positive, not {cfg.sd_alpha}.")
    if not 0 <= cfg.bank_momentum < 1:
        raise UserError(f"--bank-momentum must be in [0, 1), not {cfg.bank_momentum}.")
    if not 0 <= cfg.slow_start < 1:
        raise UserError(f"--slow-start must be in [0, 1) (a fraction of the epochs), not {cfg.slow_start}.")
    if not 0 <= cfg.width_distill <= 1:
        raise UserError(f"--width-distill must be in [0, 1], not {cfg.width_distill}.")
    if cfg.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be zero (epoch ends only) or positive minutes, not "
                        f"{cfg.checkpoint_every}.")
    if cfg.eval_every < 0:
        raise UserError("--eval-every must be zero (off) or positive.")
    if cfg.monitor_queries < 0:
        raise UserError("--monitor-queries must be zero (all) or positive.")


def auto_or_int(value: Any, name: str) -> int | str:
    """'auto' or a whole number (a CLI string, a YAML or API int) -> 'auto' or int; UserError otherwise."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"--{name.replace('_', '-')} must be a whole number or auto, not '{value}'.") from None


def auto_or_float(value: Any, name: str) -> float | str:
    """'auto' or a number (a CLI string, a YAML or API number) -> 'auto' or float; UserError otherwise."""
    if value == "auto":
        return value
    try:
        number = float("nan") if isinstance(value, bool) else float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        return number
    except (TypeError, ValueError):
        raise UserError(f"--{name.replace('_', '-')} must be a number or auto, not '{value}'.") from None


def physical_memory() -> int | None:
    """This machine's RAM in bytes, or None where the system does not say (e.g. Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_batch_memory(image_size: int | str, batch_size: int) -> None:
    """UserError when one batch of crops (batch x 3 x size^2 float32) would not fit in this machine's RAM: a typo
    such as --image-size 100000 had failed deep inside the decoding with a 240 GB allocation."""
    ram = physical_memory()
    if image_size == "auto" or ram is None:
        return
    need = batch_size * 3 * int(image_size) ** 2 * 4
    if need > ram:
        raise UserError(f"--image-size {image_size}: one batch of {batch_size} crops at {image_size} px takes "
                        f"{need / 2**30:,.0f} GiB and this machine has {ram / 2**30:,.0f} GiB of RAM. Pass a "
                        "smaller --image-size (or --batch-size).")


DEFAULTS = {f.name: f.default for f in dataclasses.fields(PretrainConfig)}


def validate_teacher(cfg: PretrainConfig) -> None:
    """The --teacher options: each needs --teacher, and the numbers must make sense; --bank-init auto resolved."""
    if cfg.teacher is None:
        given = [f for f in ("teacher_backbone", "teacher_image_size") if getattr(cfg, f) is not None]
        given += ["teacher_per_step"] if cfg.teacher_per_step else []
        given += ["teacher_predictor"] if cfg.teacher_predictor else []
        given += ["bank_init teacher"] if cfg.bank_init == "teacher" else []
        given += [f for f in ("teacher_weight", "teacher_temperature") if getattr(cfg, f) != DEFAULTS[f]]
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
    """'1.0,0.5,0.25' -> [1.0, 0.5, 0.25] (descending, unique, 1.0 added when missing; a lone number, as a config
    file's `widths: 0.5`, is one width). UserError when no width below 1.0 is left: 1.0 alone is a plain run."""
    items = text.split(",") if isinstance(text, str) else [text] if isinstance(text, int | float) else list(text)
    try:
        widths = [float(str(w).strip()) for w in items if str(w).strip()]
    except ValueError:
        raise UserError(
            f"--widths must be comma-separated numbers in (0, 1], e.g. 1.0,0.75,0.5,0.25; got '{text}'."
        ) from None
    for w in widths:
        check_width(w)
    if not any(w < 1.0 for w in widths):
        raise UserError(f"--widths needs a width below 1.0, e.g. 1.0,0.5 (got '{text}'): the full width alone is a "
                        "plain run, so leave --widths out.")
    return sorted(set(widths) | {1.0}, reverse=True)


def save_config(cfg: PretrainConfig, path: str | Path) -> Path:
    """config.yaml: every option, reloadable with --config (written atomically). Returns the path."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    header = f"# resolved by edgessl {__version__}; reload with: edgessl pretrain --config {path}\n"
    return atomic_write_text(path, f"{header}{text}")


def replace(cfg: PretrainConfig, **changes: Any) -> PretrainConfig:
    return dataclasses.replace(cfg, **changes)
