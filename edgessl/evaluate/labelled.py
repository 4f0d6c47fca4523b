"""Labelled image folders (one subfolder per class, ImageFolder layout) for `edgessl eval` and `edgessl finetune`:
option parsing, folder checks with one-line errors, and the train/test pairing (two folders, or one folder split
by --test-fraction)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from edgessl.data.folder import ImageSet, load_image_folder
from edgessl.data.signature import check_folder, image_extensions, scan_images
from edgessl.errors import UserError
from edgessl.evaluate.subsets import class_counts, stratified_split
from edgessl.options import Decode


def parse_labels_per_class(text: str | int | Sequence, option: str = "--labels-per-class") -> list[int | None]:
    """'1,5,10,all' -> [1, 5, 10, None] (None = every label), ascending, duplicates dropped, 'all' last.
    Raises UserError for anything but positive integers and 'all'."""
    parts = [text] if isinstance(text, (int, str)) else list(text)
    tokens = [t.strip() for p in parts for t in str(p).split(",") if t.strip()]
    if not tokens:
        raise UserError(f"{option} is empty: give positive integers and/or 'all', e.g. 1,5,10,all.")
    values: set[int] = set()
    want_all = False
    for tok in tokens:
        if tok.lower() == "all":
            want_all = True
            continue
        try:
            value = int(tok)
        except ValueError:
            raise UserError(f"{option} must be positive integers or 'all' (e.g. 1,5,10,all), not '{tok}'.") from None
        if value < 1:
            raise UserError(f"{option} must be at least 1 (or 'all'), not {value}.")
        values.add(value)
    return sorted(values) + ([None] if want_all else [])


def lpc_name(per_class: int | None) -> int | str:
    """The value written to eval.json and tables: the integer, or 'all'."""
    return "all" if per_class is None else per_class


SPLIT_NAMES = {"train", "test", "val", "valid", "validation"}  # folders of a split, never a class


def class_folders(root: str | Path, what: str) -> tuple[Path, list[str]]:
    """Check the ImageFolder layout: no image directly in `root`, every (non-hidden) subfolder holds image files.

    Returns (root, sorted class names). Raises UserError naming the first problem."""
    root = check_folder(root, what)
    exts = image_extensions()
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    loose = [e for e in entries if (root / e).is_file() and os.path.splitext(e)[1].lower() in exts]
    if loose:
        raise UserError(
            f"{what} '{root}' must hold one subfolder per class, but the image '{loose[0]}' lies directly in it. "
            "Move the images into class folders."
        )
    classes = [e for e in entries if (root / e).is_dir()]
    if not classes:
        raise UserError(f"{what} '{root}' has no class subfolders. Put each class's images in its own subfolder.")
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if splits:
        train = next((c for c in splits if c.lower() == "train"), None)
        held = next((c for c in splits if c.lower() != "train"), None)
        hint = (f"--train {root / train} --test {root / held}" if train and held
                else f"{what} {root / (train or held)}")
        raise UserError(f"{what} '{root}' holds the split folder{'s' * (len(splits) > 1)} {', '.join(splits)}, not "
                        f"class folders: pass the split itself, e.g. {hint}.")
    for name in classes:
        if not scan_images(root / name, what):
            raise UserError(f"{what} class folder '{name}' has no readable image (it holds no image files).")
    return root, classes


def check_readable_classes(images: ImageSet, expected: Sequence[str], what: str) -> None:
    """UserError when a class folder lost all its images to unreadable files."""
    missing = [c for c in expected if c not in (images.classes or [])]
    if missing:
        name = missing[0]
        bad = [p for p, _ in images.skipped if p.relative_to(images.root).parts[0] == name]
        reason = f"; {len(bad)} unreadable file(s), e.g. {bad[0].name}: {dict(images.skipped)[bad[0]]}" if bad else ""
        raise UserError(f"{what} class folder '{name}' has no readable image{reason}.")


def skipped_warning(images: ImageSet, what: str) -> str | None:
    """The warning for the unreadable files a labelled folder skipped (None when it skipped none)."""
    if not images.skipped:
        return None
    path, reason = images.skipped[0]
    return f"{what}: skipped {len(images.skipped)} unreadable file(s), first: {path} ({reason})."


def load_labelled_folder(root: str | Path, size: int, what: str, decode: Decode | None = None) -> ImageSet:
    """Decode a labelled folder (labels = first-level subfolders) after the class_folders checks (through the
    decoded-image cache `cache_dir`, see edgessl.data.cache)."""
    root, classes = class_folders(root, what)
    images = load_image_folder(root, size, labels=True, decode=decode, min_images=1, what=what)
    check_readable_classes(images, classes, what)
    return images


def map_test_labels(train_classes: Sequence[str], test_classes: Sequence[str], what: str = "--test",
                    against: str = "--train") -> Tensor:
    """(C_test,) long: the training-class index of every test class. UserError when a test class is not a
    training class (its images could never be predicted right)."""
    missing = [c for c in test_classes if c not in train_classes]
    if missing:
        shown = ", ".join(f"'{c}'" for c in missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise UserError(f"{what} has class folder(s) that {against} lacks: {shown}. Both need the same class names.")
    return torch.tensor([list(train_classes).index(c) for c in test_classes], dtype=torch.long)


def check_labels_per_class(
    values: Sequence[int | None], labels: Tensor, classes: Sequence[str]
) -> dict[int, dict[str, int]]:
    """Refuse a labels-per-class value above what every class has; report the classes short of a value.

    labels: (N,) training labels. Returns {value: {class name: images it has}} for the values some class is
    short of (those classes use all their images)."""
    counts = class_counts(labels, len(classes)).tolist()
    largest = max(counts)
    short: dict[int, dict[str, int]] = {}
    for v in values:
        if v is None:
            continue
        if v > largest:
            raise UserError(
                f"--labels-per-class {v}: no class of --train has that many images (the largest has {largest}). "
                "Use a smaller value or 'all'."
            )
        lacking = {classes[c]: n for c, n in enumerate(counts) if n < v}
        if lacking:
            short[v] = lacking
    return short


def check_split_options(test: str | Path | None, test_fraction: float | None) -> None:
    if test is not None and test_fraction is not None:
        raise UserError("Give either --test (a folder) or --test-fraction (split --train), not both.")
    if test is None and test_fraction is None:
        raise UserError("No test data: give --test <folder> (one subfolder per class) or --test-fraction 0.2.")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction must be between 0 and 1 (exclusive), not {test_fraction}.")


@dataclass
class Split:
    """Which rows of the --train folder are training and test images when one folder is split."""

    train_idx: Tensor  # (N_train,) long
    test_idx: Tensor  # (N_test,) long
    fraction: float
    seed: int
    untested: list[int] = field(default_factory=list)  # classes of one image: kept for training, none tested

    def describe(self) -> dict:
        return {"test_fraction": self.fraction, "seed": self.seed, "n_train": len(self.train_idx),
                "n_test": len(self.test_idx),
                "rule": "per class round(fraction * n) held out, at least 1, at most n - 1"}


def split_folder(labels: Tensor, fraction: float, seed: int) -> Split:
    """Stratified, seeded split of one labelled folder (labels (N,)) into train and test rows."""
    train_idx, test_idx = stratified_split(labels, fraction, seed)
    if len(test_idx) == 0:
        raise UserError(
            f"--test-fraction {fraction} leaves no test image: every class needs at least 2 images to be split."
        )
    untested = [c for c, n in enumerate(torch.bincount(labels).tolist()) if n == 1]
    return Split(train_idx, test_idx, fraction, seed, untested)


def untested_note(split: Split | None, classes: list[str]) -> str | None:
    """The note eval and finetune print when --test-fraction left classes without a test image (one image each):
    the scores then say nothing about them."""
    if split is None or not split.untested:
        return None
    names = ", ".join(classes[c] for c in split.untested[:5]) + (", ..." if len(split.untested) > 5 else "")
    return (f"note: {len(split.untested)} class(es) have a single image, kept for training, so none of them is "
            f"tested: {names}. Add images to them, or pass a --test folder.")


@dataclass
class LabelledFolders:
    """The labelled folders of eval and finetune once checked (nothing decoded yet)."""

    train_root: Path
    train_classes: list[str]  # the class folders of --train
    test_root: Path | None  # None: the test images are split off --train (--test-fraction)
    file_labels: Tensor  # (files,) the class of every image file of --train, before decoding


def labelled_folders(train: str | Path, test: str | Path | None, test_fraction: float | None) -> LabelledFolders:
    """The checks eval and finetune make before decoding anything (UserError): --test or --test-fraction, the class
    folders of --train (and --test, with the same class names)."""
    check_split_options(test, test_fraction)
    train_root, train_classes = class_folders(train, "--train")
    if len(train_classes) < 2:  # one class: every prediction is right, and "100.0" would say nothing
        raise UserError(f"--train '{train_root}' has one class folder ('{train_classes[0]}'): a classifier needs at "
                        "least two classes, one subfolder each.")
    test_root = None
    if test is not None:
        test_root, test_classes = class_folders(test, "--test")
        map_test_labels(train_classes, test_classes)
    counts = torch.tensor([len(scan_images(train_root / c)) for c in train_classes])
    return LabelledFolders(train_root, train_classes, test_root, torch.arange(len(train_classes)).repeat_interleave(
        counts))
