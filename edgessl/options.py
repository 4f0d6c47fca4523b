"""Every option of every command, written once: its name (the field), type, default and help.

A command's options are a dataclass whose fields come from `option(...)`. From that one definition come the Python
API's keyword arguments and their defaults (edgessl.workflows), the CLI's flags and `--help` (edgessl.cli builds
each typer command from the dataclass) and, for pretraining, config.yaml's keys. Settings that travel together
through several layers are small dataclasses of their own (Decode: how a folder is decoded and cached; Compute:
device and CPU threads), mixed into each command that has them and handed down as one object (`group`).

Over 400 lines: this is the one place every option of every command after pretraining is written (the mechanics
take a third of it); splitting it would scatter what the module exists to gather.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from edgessl.errors import UserError, with_near_names

T = TypeVar("T")
META = "edgessl"


@dataclass(frozen=True)
class Spec:
    """What the CLI needs beyond the field: the help text, how --help shows the default (`shown`, None: the value),
    the flag declaration when it is not --<name> (e.g. "--cache/--no-cache", or "--no-x" alone: a switch that turns
    a default-on option off), whether the option is required, and whether it is a CLI flag at all (False: API
    only)."""

    @property
    def turns_off(self) -> bool:
        """A single "--no-..." switch: given, the option is False."""
        return bool(self.flag) and self.flag.startswith("--no-") and "/" not in self.flag

    help: str
    shown: str | None = None
    flag: str | None = None
    required: bool = False
    cli: bool = True


def option(default: Any = None, help: str = "", *, shown: str | None = None, flag: str | None = None,
           required: bool = False, cli: bool = True) -> Any:
    """A dataclass field that is a command option (see the module docstring); a required one has no default."""
    metadata = {META: Spec(help, shown, flag, required, cli)}
    return field(metadata=metadata) if required else field(default=default, metadata=metadata)


def specs(cls: type) -> list[tuple[dataclasses.Field, Spec]]:
    """(field, Spec) of every option of an options dataclass, in field order."""
    return [(f, f.metadata[META]) for f in fields(cls) if META in f.metadata]


def names(cls: type) -> list[str]:
    return [f.name for f, _ in specs(cls)]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_text(f: dataclasses.Field, spec: Spec) -> str:
    """How --help shows a default: `shown`, 'on'/'off' for switches, a float with %g, the value otherwise."""
    if spec.shown is not None:
        return spec.shown
    value = f.default if f.default is not MISSING else None
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_text(f: dataclasses.Field, spec: Spec) -> str:
    """--help of an option: its meaning and, unless it is a switch or required, its default."""
    if spec.required or (isinstance(f.default, bool) and spec.flag is None):
        return spec.help
    return f"{spec.help} [default: {default_text(f, spec)}]"


def cli_type(cls: type, name: str) -> Any:
    """The type a CLI flag parses: the field's type without None (str | int -> str: the command parses it)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if not args:
        return hint
    return args[0] if len(args) == 1 else str


def check_known(cls: type, given: dict[str, Any], what: str = "") -> None:
    unknown = sorted(set(given) - set(names(cls)))
    if unknown:
        raise UserError(f"Unknown {what + ' ' if what else ''}options: {with_near_names(unknown, names(cls))}.")


def check_types(cls: type, values: dict[str, Any], switches: bool = True) -> None:
    """UserError when a setting has the wrong type for its option (the CLI's flags are typed by typer; a config
    file's, a recipe's or the API's are not): a number for `lr: fast`, a whole number for `batch_size: 1.5` or
    `opset="18a"`, true/false for `deterministic: "false"` (a truthy string; switches=False: not checked, for the
    commands whose switch also takes a mode's name, as export's `int8="strict"`); a whole number is a number."""
    for f, spec in specs(cls):
        value, kind, flag = values.get(f.name), str(f.type), spec.flag or flag_name(f.name)
        if f.name not in values or (value is None and kind.endswith("| None")):
            continue
        kind = kind.removesuffix(" | None")
        if kind == "bool" and switches and not isinstance(value, bool):
            raise UserError(f"{flag} must be true or false, not {value!r}.")
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"{flag} must be a whole number, not {value!r}.")
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise UserError(f"{flag} must be a number, not {value!r}.")


PATH_OPTIONS = frozenset({"run", "run_dir", "source", "data", "val", "train", "test", "out", "images", "calib",
                          "classifier", "manifest", "json_out", "cache_dir", "init", "teacher", "config", "recipe",
                          "resume"})  # the API arguments that name a folder or a file (or a word such as "timm")


def check_paths(values: dict[str, Any], required: bool = False) -> None:
    """UserError when an argument that names a folder or file (PATH_OPTIONS) holds something else, e.g. an int: one
    line instead of a TypeError from deep inside ("expected str, bytes or os.PathLike object, not int"); with
    `required` (a function's leading arguments, as export's run) None is refused too."""
    for name, value in values.items():
        if name in PATH_OPTIONS and value is None and required:
            raise UserError(f"{name} is required: a path (str or pathlib.Path), not None.")
        if name in PATH_OPTIONS and value is not None and not isinstance(value, str | os.PathLike):
            raise UserError(f"{name} must be a path (str or pathlib.Path), not {type(value).__name__} "
                            f"{str(value)[:60]}.")
        if name in PATH_OPTIONS and isinstance(value, str) and not value.strip():  # Path("") is ".", this folder
            raise UserError(f"{flag_name(name)} is empty: pass a path.")


def build(cls: type[T], given: dict[str, Any], what: str = "") -> T:
    """cls from the options given (None = not given: the default), after refusing unknown names, missing required
    ones and paths of another type (UserError)."""
    check_known(cls, given, what)
    check_paths(given)
    values = {k: v for k, v in given.items() if v is not None}
    check_types(cls, values, switches=False)
    missing = [f.name for f, spec in specs(cls) if spec.required and f.name not in values]
    if missing:
        raise UserError(f"{flag_name(missing[0])} is required.")
    return cls(**values)


def takes_options(cls: type, lead: tuple[str, ...] = (), positional: tuple[str, ...] = (),
                  extra: dict[str, Any] | None = None):
    """Decorator: fn(*lead, opts: cls, **extra) becomes the API function fn(*lead, *positional options, **options,
    **extra): the options in `positional` may also be passed by position, every other option by keyword, all with
    the defaults of `cls` (its one definition); `extra` names the non-option keyword arguments and their defaults
    (console, callbacks). The signature (help(), tab completion) is generated from `cls`."""
    extra = dict(extra or {})

    def wrap(fn):
        @functools.wraps(fn)
        def api(*args, **kwargs):
            if len(args) > len(lead) + len(positional):
                raise TypeError(f"{fn.__name__}() takes {len(lead) + len(positional)} positional arguments")
            for name, value in zip(positional, args[len(lead):], strict=False):
                if name in kwargs:
                    raise TypeError(f"{fn.__name__}() got multiple values for argument '{name}'")
                kwargs[name] = value
            leading = dict(zip(lead, args, strict=False))
            for name in lead[len(leading):]:  # a leading argument passed by keyword, as the signature allows
                if name not in kwargs:
                    raise TypeError(f"{fn.__name__}() missing required argument: '{name}'")
                leading[name] = kwargs.pop(name)
            check_paths(leading, required=True)
            given = {k: kwargs.pop(k, v) for k, v in extra.items()}
            return fn(*leading.values(), build(cls, kwargs), **given)

        api.__signature__ = _signature(cls, lead, positional, extra)
        return api

    return wrap


def _signature(cls: type, lead, positional, extra) -> inspect.Signature:
    p = inspect.Parameter
    params = [p(name, p.POSITIONAL_OR_KEYWORD) for name in lead]
    by_name = {f.name: f for f, _ in specs(cls)}
    params += [p(name, p.POSITIONAL_OR_KEYWORD, default=_default(by_name[name])) for name in positional]
    params += [p(f.name, p.KEYWORD_ONLY, default=_default(f)) for f, _ in specs(cls) if f.name not in positional]
    params += [p(name, p.KEYWORD_ONLY, default=value) for name, value in extra.items()]
    return inspect.Signature(params)  # ValueError if a required option follows one with a default


def _default(f: dataclasses.Field) -> Any:
    return inspect.Parameter.empty if f.default is MISSING else f.default


def shared(cls: type, name: str) -> Any:
    """The option `name` of group `cls` as a field of another options dataclass (the same default and help: one
    definition), so a command lists a group's options where it wants them."""
    f = next(f for f in fields(cls) if f.name == name)
    return field(metadata=f.metadata) if f.default is MISSING else field(default=f.default, metadata=f.metadata)


def group(obj: Any, cls: type[T]) -> T:
    """The settings of group `cls` (e.g. Decode) out of any options object that has them."""
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})


def positive_count(value: Any, flag: str, auto: str = "auto") -> str:
    """'auto' or a positive whole number as text; UserError otherwise."""
    text = str(value)
    if text != auto and not (text.isdigit() and int(text) > 0):
        raise UserError(f"{flag} must be {auto} or a positive number, not '{text}'.")
    return text


UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, source: str = "--cache-max") -> int | None:
    """'5G', '500M', '20GiB', '1.5g', '1000000' -> bytes; 'none' -> None (no budget). UserError otherwise, naming
    `source` (the flag, or the environment variable the value came from)."""
    value = str(text).strip()
    if value.lower() == "none":
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", value.upper())
    if not found:
        raise UserError(f"{source} must be auto, none or a size such as 20G or 500M, not '{text}'.")
    return int(float(found.group(1)) * UNITS[found.group(2)])


def check_groups(obj: Any) -> None:
    """Normalise and check the shared settings an options object has (--workers, --threads, --cache-max)."""
    for name in ("workers", "threads"):
        if isinstance(getattr(obj, name, None), (str, int)):
            setattr(obj, name, positive_count(getattr(obj, name), flag_name(name)))
    if getattr(obj, "cache_max", "auto") != "auto":
        parse_size(obj.cache_max)


# ---------------------------------------------------------------- groups shared by several commands
CACHE_DIR_HELP = ("Decoded-image cache: auto (EDGESSL_CACHE_DIR, else $XDG_CACHE_HOME/edgessl or ~/.cache/edgessl), "
                  "a folder, or none (no disk cache). Each folder is decoded once; `edgessl cache list|clear` shows "
                  "and frees it.")


@dataclass(kw_only=True)
class Decode:
    """How an image folder is decoded and cached (edgessl.data.cache, edgessl.data.folder)."""

    cache_mb: float = option(4096.0, "RAM for decoded images in MiB; a larger data set is memory-mapped from the disk "
                                     "cache (or, with --cache-dir none, decoded again at every step).")
    cache_dir: str = option("auto", CACHE_DIR_HELP)
    cache_max: str = option("auto", "Size budget of the decoded-image cache: auto (the smaller of 20 GiB and 10 % of "
                                    "its disk; EDGESSL_CACHE_MAX overrides it), a size such as 5G or 500M, or none. "
                                    "When a new folder would exceed it, stale entries go first, then the least "
                                    "recently used.")
    workers: str = option("auto", "Decoding threads: auto (one per available core, at most 8) or a number.")


@dataclass(kw_only=True)
class Compute:
    """Where the network runs: the device and the CPU threads (edgessl.runtime)."""

    device: str = option("auto", "auto | cpu | cuda | mps (auto: cuda, else mps on Apple silicon, else cpu).")
    threads: str = option("auto", "CPU threads for the network: auto (all cores when the machine is idle, fewer when "
                                  "other jobs keep them busy) or a number.")


class HasDecode:
    """Mixed into an options dataclass that has Decode's options: `.decode` hands them down as one object."""

    @property
    def decode(self) -> Decode:
        return group(self, Decode)


# ---------------------------------------------------------------- the commands after pretraining
@dataclass(kw_only=True)
class Labelled:
    """Labelled images for eval and finetune: --train and --test folders, or --train split by --test-fraction."""

    train: str = option(help="Labelled training images: one subfolder per class.", required=True)
    test: str | None = option(None, "Labelled test images, the same class names as --train.", shown="none")
    test_fraction: float | None = option(None, "Instead of --test: hold out this fraction of every --train class.",
                                         shown="none")
    split_seed: int = option(0, "Seed of the --test-fraction split.")


@dataclass(kw_only=True)
class EvalOptions(HasDecode):
    """`edgessl eval` (edgessl.workflows.eval)."""

    train: str = shared(Labelled, "train")
    test: str | None = shared(Labelled, "test")
    test_fraction: float | None = shared(Labelled, "test_fraction")
    labels_per_class: str | None = option(None, "Comma-separated labels per class; 'all' = every label.",
                                          shown="1,5,10,all, leaving out values that no class reaches")
    seeds: int = option(3, "Subsets drawn per labels-per-class value (seeds 0..N-1); mean ± std over them.")
    baseline: str = option("none", "random: also evaluate a randomly initialised encoder of the same architecture.")
    split_seed: int = shared(Labelled, "split_seed")
    device: str = shared(Compute, "device")
    threads: str = shared(Compute, "threads")
    cache: bool = option(True, "Reuse features cached in the run directory's features/ folder.",
                         flag="--cache/--no-cache")
    cache_mb: float = shared(Decode, "cache_mb")
    cache_dir: str = shared(Decode, "cache_dir")
    cache_max: str = shared(Decode, "cache_max")
    workers: str = shared(Decode, "workers")
    quiet: bool = option(False, "No table or log lines (eval.json and eval.png are still written).")


@dataclass(kw_only=True)
class FinetuneOptions(HasDecode):
    """`edgessl finetune` (edgessl.workflows.finetune; the recipe in edgessl.evaluate.finetune)."""

    train: str = shared(Labelled, "train")
    test: str | None = shared(Labelled, "test")
    test_fraction: float | None = shared(Labelled, "test_fraction")
    labels_per_class: str = option("10", "Labels per class (a number or 'all'); the held-out images come out of them.")
    epochs: int = option(30, "Maximum epochs (early stopping may end sooner).")
    freeze_backbone: bool = option(False, "Train only the new linear layer.")
    init: str | None = option(None, "Start the encoder (the run's architecture) from other weights instead of the "
                                    "run's: timm (its pretrained weights; downloads), a .safetensors/.pth file or "
                                    "another run, e.g. an ImageNet baseline. Output: finetune-TAG-init-...",
                              shown="none")
    batch_size: int = option(64, "Images per step.")
    lr: float = option(1e-3, "AdamW learning rate of the new layer.")
    backbone_lr_scale: float = option(0.1, "Backbone learning rate = --lr x this.")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    label_smoothing: float = option(0.1, "Label smoothing of the cross-entropy.")
    val_fraction: float = option(0.2, "Part of each class's labelled images held out for early stopping.")
    patience: int = option(10, "Stop after this many epochs without a lower held-out loss.")
    seed: int = option(0, "Seed of the labelled subset, the held-out part, the new layer and the augmentation.")
    split_seed: int = shared(Labelled, "split_seed")
    device: str = shared(Compute, "device")
    threads: str = shared(Compute, "threads")
    out: str | None = option(None, "Output folder.", shown="finetune-TAG in the run directory")
    cache_mb: float = shared(Decode, "cache_mb")
    cache_dir: str = shared(Decode, "cache_dir")
    cache_max: str = shared(Decode, "cache_max")
    workers: str = shared(Decode, "workers")
    quiet: bool = option(False, "No log lines.")


@dataclass(kw_only=True)
class ExportOptions:
    """`edgessl export` (edgessl.workflows.export)."""

    classifier: str | None = option(None, "Fine-tuned classifier folder (runs/NAME/finetune-TAG): export logits "
                                          "instead of features.", shown="none")
    opset: int = option(18, "ONNX opset to write.")
    threads: int | None = option(None, "onnxruntime threads of this machine's speed figures (e.g. the device's core "
                                       "count).", shown="onnxruntime's default")
    int8: bool = option(False, "Also write a static int8 model (QDQ, per-channel weights), calibrated on --calib: "
                               "searched until it meets the int8 bound, and written whenever it does (this "
                               "machine's speed is reported, never a reason to withhold it).")
    int8_mode: str | None = option(None, "search (the default: try calibration methods, then keep the most sensitive "
                                         "tail of the network in float; write int8 when it meets the bound) | "
                                         "faster-here (the same, written only when clearly faster than fp32 on this "
                                         "machine) | strict (only --calib-method, exit 3 when it misses the bound). "
                                         "keep-slow is search's old name. Implies --int8.", shown="search")
    calib: str | None = option(None, "Unlabeled images for int8 calibration (up to 256 used).",
                               shown="the training folder")
    calib_method: str = option("minmax", "int8 activation ranges: minmax | moving-average | percentile | entropy (the "
                                         "search tries it first).")
    fp16: bool = option(False, "Also write a model with float16 weights (float32 input and output).")
    ort: bool = option(False, "Also write each model in onnxruntime's .ort format (what mobile builds load), beside "
                              "the .onnx; manifest.json lists it under the model's \"ort\".")
    images: str | None = option(None, "Images for the parity check (up to 256 used).",
                                shown="the classifier's or the run's training folder")
    out: str | None = option(None, "Export folder.", shown="RUN/export")
    name: str | None = option(None, "Base name of the model files.", shown="encoder or classifier")
    width: float | None = option(None, "Export this width of a `--widths` run: slimmed into RUN/width-W/ first (reused "
                                       "when up to date), exported to RUN/width-W/export.", shown="the full width")
    quiet: bool = option(False, "Print only the summary table, the int8 outcome, warnings and the manifest's path.")


@dataclass(kw_only=True)
class CheckOptions:
    """`edgessl check`: the arguments of export/device_check.py (edgessl.workflows.check)."""

    manifest: str | None = option(None, "manifest.json.", shown="beside the model")
    images: str | None = option(None, "Images (class subfolders = labels) for accuracy or kNN accuracy.", shown="none")
    threads: int | None = option(None, "onnxruntime intra-op threads.", shown="the runtime's choice")
    ep: str = option("cpu", "Execution provider: cpu, or xnnpack (XNNPACK first, CPU for the rest; needs an "
                            "onnxruntime build with it).")
    json_out: str | None = option(None, "Write the report as JSON here.", flag="--json", shown="none")
    runs: int = option(100, "Timed batch-1 runs.")
    batch: int = option(32, "Batch size of the throughput measurement.")
    max_images: int | None = option(None, "Use at most this many images of --images.", shown="all")


@dataclass(kw_only=True)
class EmbedOptions(HasDecode):
    """`edgessl embed` (edgessl.workflows.embed)."""

    data: str = option(help="Folder of images to embed (searched recursively).", required=True)
    out: str = option(help="Output file: .npz (paths, embeddings) or .parquet (path, embedding; needs "
                           "edgessl[parquet]).", required=True)
    neighbours: int | None = option(None, "Write neighbours.csv and the gallery neighbours.png: every image's K "
                                          "nearest images by cosine.", shown="none")
    duplicates: str | None = option(None, "auto (the recommended setting): find exact twins and copies (the same "
                                          "picture re-encoded, resized, cropped a little, brighter or darker) with a "
                                          "rule chosen on synthetic copies of this folder's own images to reach "
                                          "--precision, and say how sure it is; or a threshold T on the copy score "
                                          "(the same estimates are printed for it). Writes duplicates.csv, "
                                          "duplicates.png, duplicates.json (the rule) and similar.csv (close in the "
                                          "embedding, never called duplicates).", shown="none")
    precision: float = option(0.95, "With --duplicates auto: the precision the rule must reach on the planted "
                                    "copies.")
    planted: int = option(400, "With --duplicates: synthetic copies planted to calibrate and estimate the rule (at "
                               "most the folder's size).")
    seed: int = option(0, "With --duplicates: the seed of the calibration's sample of images and of their synthetic "
                          "copies (another seed, another sample: how much the rule moves with it).")
    keep: str | None = option(None, "With --duplicates: write keep.txt, one image per duplicate group to keep: first "
                                    "(the first path) | largest (the most pixels). Nothing is ever deleted.",
                              shown="none")
    whiten: int | None = option(None, "Search (not store) the embeddings PCA-whitened on this folder, K directions "
                                      "(e.g. 128): applies to --neighbours and to the neighbours --duplicates "
                                      "compares.", shown="none")
    gallery_rows: int = option(8, "Query images (rows) in neighbours.png, spread evenly over the folder.")
    batch_size: int = option(64, "Images per forward pass.")
    device: str = option("auto", "A run directory's encoder runs on: auto (cuda when available), cpu or cuda.")
    cache_mb: float = shared(Decode, "cache_mb")
    cache_dir: str = shared(Decode, "cache_dir")
    cache_max: str = shared(Decode, "cache_max")
    workers: str = shared(Decode, "workers")
    manifest: str | None = option(None, "An .onnx source's manifest.json.", shown="beside the .onnx")
    threads: str | None = option(None, "CPU threads: auto or a number. A run directory's encoder follows the load "
                                 "between batches (auto) or keeps the number; an .onnx source: onnxruntime's "
                                 "intra-op threads (auto: its own choice).", shown="auto")


@dataclass(kw_only=True)
class PruneOptions:
    """`edgessl prune` (edgessl.workflows.prune)."""

    ratio: float = option(help="Fraction of the channels of every group to remove, in (0, 1).", required=True)
    criterion: str = option("magnitude", "magnitude (L2 norm of the group's weights) | taylor (|w * dL/dw| on one "
                                         "batch).")
    epochs: int | None = option(None, "Recovery epochs.", shown="a quarter of the run's, at least 1")
    distill: float = option(0.5, "Weight of the distillation from the unpruned encoder (0 = plain recovery).")
    out: str | None = option(None, "Output run directory.", shown="RUN/pruned-RATIO")
    overwrite: bool = option(False, "Move a non-empty --out aside (to OUT.old-TIME) instead of refusing it.")
    quiet: bool = option(False, "No progress bar, banner or closing lines: the epoch lines and warnings only.")
    threads: str | None = option(None, "CPU threads of the recovery run: auto or a number.", shown="the run's")
    seed: int | None = option(None, "Seed of the recovery run.", shown="the run's", cli=False)


@dataclass(kw_only=True)
class SlimOptions:
    """`edgessl slim` (edgessl.workflows.slim)."""

    width: float = option(help="One of the run's trained widths, e.g. 0.5.", required=True)
    out: str | None = option(None, "Output folder.", shown="RUN/width-W")


@dataclass(kw_only=True)
class CacheOptions:
    """`edgessl cache list` (edgessl.workflows.cache)."""

    cache_dir: str = option("auto", "The cache folder (default: $EDGESSL_CACHE_DIR, else $XDG_CACHE_HOME/edgessl or "
                                    "~/.cache/edgessl).",
                            shown="auto")


@dataclass(kw_only=True)
class CacheClearOptions:
    """`edgessl cache clear` (edgessl.workflows.cache)."""

    cache_dir: str = shared(CacheOptions, "cache_dir")
    stale: bool = option(False, "Only the stale entries: their folder is gone or holds other files now.")
