"""Benchmark data: the shared CIFAR-10 and emoji archives, extracted once into benchmarks/.cache (git-ignored).

Subsets are folders of symbolic links, stratified and seeded, so nothing is copied twice; a greyscale twin of a
colour set (greyscale_copy) is the one real copy. All are made under a
file lock: processes that need the same folder at once (the test suite's two pytest-xdist workers) wait for one
another instead of extracting into each other.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CACHE = REPO / "benchmarks" / ".cache"


@contextlib.contextmanager
def locked(name: str):
    """An exclusive lock on <cache>/.<name>.lock for the block (fcntl; no lock where it is missing)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "a") as f:
        try:
            import fcntl
        except ImportError:  # Windows: one process at a time is the caller's business
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class SharedDataMissing(FileNotFoundError):
    """A shared data set is not here (nor fetched): the runner prints its message as one line."""


def extract(archive: str) -> Path:
    """Extract ../shared/data/<archive> into the cache once; returns the cache folder."""
    src = SHARED / archive
    if not src.is_file():
        raise SharedDataMissing(f"{src} not found: the benchmarks need the shared data sets next to the repo.")
    marker = CACHE / f".{archive}.done"
    if not marker.exists():
        with locked(archive):
            if not marker.exists():  # another process may have extracted it while this one waited
                if not _system_tar(src):
                    with tarfile.open(src) as tar:
                        tar.extractall(CACHE, filter="data")
                marker.touch()
    return CACHE


def _system_tar(src: Path) -> bool:
    """Extract with the system's tar when there is one (CIFAR-10's 55,000 files: about 13 s less CPU than tarfile;
    creating the files costs the same), after checking that every member is a plain file or folder inside the cache;
    False: use tarfile."""
    tar = shutil.which("tar")
    if tar is None:
        return False
    listing = subprocess.run([tar, "-tvzf", str(src)], capture_output=True, text=True)
    if listing.returncode != 0:
        return False
    for line in listing.stdout.splitlines():
        name = line.split(maxsplit=5)[-1]
        if line[0] not in "-d" or name.startswith("/") or ".." in Path(name).parts:
            return False  # a link, a device or a path outside the cache: tarfile's "data" filter decides
    return subprocess.run([tar, "-xzf", str(src), "-C", str(CACHE), "--no-same-owner", "--no-same-permissions"],
                          capture_output=True).returncode == 0


def made_once(out: Path, lock: str, make) -> Path:
    """`out`, made by make(out) unless it exists, under the lock `lock` (another process may be making it)."""
    if not out.exists():
        with locked(lock):
            if not out.exists():  # made while this process waited
                make(out)
    return out


def stratified_subset(split_dir: Path, per_class: int, seed: int, name: str) -> Path:
    """A folder <cache>/subsets/<name> with `per_class` randomly chosen images of each class (symlinks)."""
    make = lambda out: _make_subset(split_dir, per_class, seed, out)  # noqa: E731
    return made_once(CACHE / "subsets" / name, f"subset-{name}", make)


def _make_subset(split_dir: Path, per_class: int, seed: int, out: Path) -> None:
    rng = random.Random(seed)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():  # left by a process that was killed
        import shutil

        shutil.rmtree(tmp)
    for cls in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        pick = sorted(rng.sample(files, min(per_class, len(files))))
        (tmp / cls.name).mkdir(parents=True, exist_ok=True)
        for f in pick:
            os.symlink(f, tmp / cls.name / f.name)
    tmp.rename(out)


def greyscale_copy(src: Path, name: str) -> Path:
    """A folder <cache>/subsets/<name>: every image of `src` (its class subfolders kept) as a single-channel PNG, the
    greyscale twin of a colour set (the domains suite asks whether a rule for scans holds for greyscale photos)."""
    return made_once(CACHE / "subsets" / name, f"subset-{name}", lambda out: _derived(src, out, _grey_png))


def mirrored_double(src: Path, name: str) -> Path:
    """A folder <cache>/subsets/<name> twice the size of `src`: each image (a symbolic link) and beside it its
    left-right mirror `<stem>_mirror.jpg` (JPEG quality 90; a flip is not in the copy model): a folder of 100,000
    from CIFAR-10's 50,000, for the cost of `embed --duplicates` at the size the issue names."""
    return made_once(CACHE / "subsets" / name, f"subset-{name}", lambda out: _derived(src, out, _with_mirror))


def _derived(src: Path, out: Path, write) -> None:
    """`out` made from every image f of `src` (class subfolders kept) by write(f, dst), dst: f's place in `out`."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process that was killed
    for f in sorted(src.rglob("*")):
        if f.suffix.lower() in (".png", ".jpg", ".jpeg"):
            dst = tmp / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            write(f, dst)
    tmp.rename(out)


def _grey_png(f: Path, dst: Path) -> None:
    from PIL import Image

    with Image.open(f) as img:
        img.convert("L").save(dst.with_suffix(".png"))


def _with_mirror(f: Path, dst: Path) -> None:
    from PIL import Image, ImageOps

    os.symlink(f.resolve(), dst)
    with Image.open(f) as img:
        ImageOps.mirror(img.convert("RGB")).save(dst.with_name(f"{f.stem}_mirror.jpg"), quality=90)


def cifar10(per_class: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(train folder, test folder) of CIFAR-10; train limited to per_class images of each class."""
    root = extract("cifar10.tar.gz") / "cifar10"
    train = root / "train"
    if per_class is not None:
        train = stratified_subset(train, per_class, seed, f"cifar10-train-{per_class}pc-s{seed}")
    return train, root / "test"


def emoji() -> tuple[Path, Path]:
    root = extract("emoji-google.tar.gz") / "emoji-google"
    return root / "train", root / "test"


def neu_det() -> tuple[Path, Path]:
    """NEU steel-surface defects: 6 classes of greyscale scans stored as 416 px RGB JPEG (1,440 train, 359 test)."""
    root = extract("neu-det.tar.gz") / "neu-det"
    return root / "train", root / "test"


def digits() -> tuple[Path, Path]:
    """scikit-learn's bundled handwritten digits (1,797 8 x 8 greyscale images, 10 classes; read from the package,
    no download) as single-channel PNGs, a seeded 80/20 split per class: a folder none of the project's rules was
    tuned on (1,442 train, 355 test)."""
    out = made_once(CACHE / "digits", "digits", _make_digits)
    return out / "train", out / "test"


def _make_digits(out: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data, rng = load_digits(), np.random.default_rng(0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process that was killed
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(data.target == c))
        for k, i in enumerate(rows):
            folder = tmp / ("test" if k < len(rows) // 5 else "train") / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((data.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    tmp.rename(out)


TWEMOJI_URL = "https://registry.npmjs.org/emoji-datasource-twitter/-/emoji-datasource-twitter-16.0.0.tgz"
TWEMOJI_SHA1 = "e2bd39a8acb77e158106f8249dd7b4cd93fa1b14"  # the npm registry's shasum of that tarball


def twemoji() -> tuple[Path, Path]:
    """Another vendor's emoji (Twitter's Twemoji, 64 px RGBA PNG, graphics CC-BY 4.0) for the same 1,906 emoji as
    emoji-google, in the same 9 Unicode categories, a seeded 80/20 split per category: the folder the issues' "emoji
    the project never saw" came from. Fetched once from the npm package registry (emoji-datasource-twitter 16.0.0,
    sha1-checked) into the cache; only a benchmark that names it downloads it."""
    out = made_once(CACHE / "twemoji", "twemoji", _make_twemoji)
    return out / "train", out / "test"


def _make_twemoji(out: Path) -> None:
    import hashlib
    import json
    import urllib.request

    archive = CACHE / "emoji-datasource-twitter-16.0.0.tgz"
    if not archive.is_file():
        try:
            with urllib.request.urlopen(TWEMOJI_URL, timeout=120) as r:
                data = r.read()
        except OSError as e:
            raise SharedDataMissing(f"could not fetch {TWEMOJI_URL} ({e}); put the tarball at {archive}") from None
        if hashlib.sha1(data).hexdigest() != TWEMOJI_SHA1:
            raise ValueError(f"{TWEMOJI_URL}: sha1 differs from {TWEMOJI_SHA1}")
        archive.write_bytes(data)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process that was killed
    rng = random.Random(0)
    with tarfile.open(archive) as tar:
        emoji = json.load(tar.extractfile("package/emoji.json"))
        by_class: dict[str, list[str]] = {}
        for e in emoji:
            if e["has_img_twitter"] and e["category"] != "Component":
                name = e["category"].lower().replace(" & ", "_and_").replace(" ", "_")
                by_class.setdefault(name, []).append(e["image"])
        for name, images in sorted(by_class.items()):
            images = sorted(images)
            rng.shuffle(images)
            for k, image in enumerate(images):
                dst = tmp / ("test" if k < len(images) // 5 else "train") / name / image
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tar.extractfile(f"package/img/twitter/64/{image}").read())
    tmp.rename(out)
