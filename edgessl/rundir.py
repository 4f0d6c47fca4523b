"""Run directories that are never overwritten or mixed.

- A new run goes to `--out` only when that folder is absent or empty; otherwise it is refused (exit 2) unless
  `--overwrite` is given, which moves the old folder aside to `<out>.old-<time>` (nothing is deleted).
- The default name runs/<backbone>-<time> gets a -2, -3, ... suffix when it exists already.
- Nothing is written until every check of the command has passed: `check_out` only looks, `claim` writes.
- A run interrupted before its first checkpoint removes what it wrote (`RunDir.abandon`), so the same command can
  simply be run again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgessl.errors import UserError
from edgessl.fileio import atomic_write_text

CHECKPOINT = "checkpoint.pt"


def default_run_dir(backbone: str, root: str | Path = "runs", stamp: str | None = None) -> Path:
    """runs/<backbone>-<YYYYmmdd-HHMMSS>, with -2, -3, ... appended when that folder exists already."""
    base = Path(root) / f"{backbone}-{stamp or time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_out(out: str | Path, overwrite: bool = False, resume: str = "--resume") -> None:
    """Refuse (UserError) a new run in `out` when it is a file, or a non-empty folder and overwrite is off. resume:
    how the refusal says a run there is continued ("" where the command cannot: prune)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; pass a folder for the run.")
    if overwrite and out.is_dir() and in_use(out):  # moved aside under a training process, the two runs had mixed
        raise UserError(f"--out '{out}' is in use: another edgessl process is training it. Wait for that one to end "
                        "(or stop it) before --overwrite moves it aside, or pass another --out.")
    if overwrite or not out.exists() or _is_empty_dir(out):
        return
    run = (out / "config.yaml").is_file() or (out / CHECKPOINT).is_file()
    if run and not (out / CHECKPOINT).is_file() and not (out / "encoder.safetensors").is_file():
        raise UserError(f"--out '{out}' holds a run stopped before its first checkpoint (nothing to resume): pass "
                        f"--overwrite to start again there (it moves the folder aside to {out.name}.old-<time>), or "
                        "another --out.")  # a process killed in its first epoch leaves config.yaml behind
    keep = f"continue it with {resume} {out}" if run and resume else "pass another --out"
    raise UserError(
        f"--out '{out}' already holds {'a run' if run else 'files'}: {keep}, or pass --overwrite to move "
        f"{'it' if run else 'them'} aside (to {out.name}.old-<time>) and start a new run there."
    )


def move_aside(path: Path) -> Path:
    """Rename `path` to a unique sibling <name>.old-<YYYYmmdd-HHMMSS>[-k]; returns the new path."""
    target = default_run_dir(f"{path.name}.old", path.parent)
    path.rename(target)
    return target


def keep_aside(path: Path) -> Path:
    """Rename file `path` to a unique sibling <stem>.old-<YYYYmmdd-HHMMSS>[-k]<suffix> (eval.json ->
    eval.old-20261205-120000.json); returns the new path."""
    base, k = f"{path.stem}.old-{time.strftime('%Y%m%d-%H%M%S')}", 1
    target = path.with_name(base + path.suffix)
    while target.exists():
        k += 1
        target = path.with_name(f"{base}-{k}{path.suffix}")
    path.rename(target)
    return target


@dataclass
class RunDir:
    """A claimed run directory. created: this command made the folder; written: files this command wrote before
    the first checkpoint (removed again by `abandon`); moved_to: where --overwrite put the old run."""
    path: Path
    created: bool = False
    moved_to: Path | None = None
    written: list[Path] = field(default_factory=list)

    def write_text(self, name: str, text: str) -> Path:
        target = atomic_write_text(self.path / name, text)
        self.written.append(target)
        return target

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file()

    def abandon(self) -> bool:
        """Remove what this command wrote when no epoch was checkpointed (and the folder, if it made it); the run
        --overwrite had moved aside goes back in its place. Returns whether it did."""
        if self.has_checkpoint():
            return False
        for f in self.written:
            f.unlink(missing_ok=True)
        if self.created and self.path.is_dir():
            leftovers = [p for p in self.path.iterdir() if not p.name.startswith(".")]
            if not leftovers:
                shutil.rmtree(self.path, ignore_errors=True)
        if self.moved_to is not None and self.moved_to.is_dir() and not self.path.exists():
            self.moved_to.rename(self.path)
            return True
        return False


def claim(out: str | Path, overwrite: bool = False) -> RunDir:
    """Create the folder of a new run (after check_out and every other check has passed). With overwrite, a
    non-empty folder is first moved aside."""
    out = Path(out)
    check_out(out, overwrite)
    moved = None
    if out.exists() and not _is_empty_dir(out):
        moved = move_aside(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    return RunDir(out, created=created, moved_to=moved)


def resume_problem(run_dir: str | Path) -> str | None:
    """Why `run_dir` cannot be resumed (one line), or None."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return f"Cannot resume '{run_dir}': it does not exist."
    if not run_dir.is_dir():
        return f"Cannot resume '{run_dir}': it is a file, not a run directory."
    if not (run_dir / CHECKPOINT).is_file():
        if (run_dir / "encoder.safetensors").is_file():  # epochs finished, then the checkpoint was deleted
            return (f"Cannot resume '{run_dir}': its {CHECKPOINT} is missing, so its training cannot continue. Its "
                    f"encoder is whole: use it as it is, or start a new run from it with --init {run_dir}.")
        if (run_dir / "config.yaml").is_file():
            return (f"Cannot resume '{run_dir}': no epoch of it has completed (no {CHECKPOINT}). Start it again with "
                    f"--config {run_dir / 'config.yaml'} --out {run_dir} --overwrite.")
        return f"Cannot resume '{run_dir}': it is not an edgessl run directory (no {CHECKPOINT}, no config.yaml)."
    if not (run_dir / "config.yaml").is_file():
        return f"Cannot resume '{run_dir}': its config.yaml is missing."
    return None


@contextlib.contextmanager
def run_lock(run_dir: str | Path | None):
    """Hold an exclusive lock on a run directory while a run or a resume trains it (flock on the folder's own
    descriptor: no file is written into it). A resume of a run that another process is training is refused: both
    had trained and written the same checkpoint and metrics. Nothing is locked without a folder or without flock
    (Windows)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if run_dir is None or fcntl is None or not Path(run_dir).is_dir():
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"'{run_dir}' is in use: another edgessl process is training it. Wait for that one to "
                            "end (or stop it), then resume.") from None
        yield
    finally:
        os.close(fd)


def in_use(run_dir: str | Path) -> bool:
    """Whether another process holds run_lock on `run_dir` (trains it) now."""
    try:
        with run_lock(run_dir):
            return False
    except UserError:
        return True


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 epoch', '2 epochs' ('1 entry', '2 entries' with many="entries")."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def absolute(path: str | Path | None) -> str | None:
    """An absolute, user-expanded path (symlinks kept) for config.yaml, or None."""
    return None if path is None else os.path.abspath(os.path.expanduser(str(path)))


def absolute_source(value: str | None) -> str | None:
    """--init / --teacher for config.yaml: a folder or file as an absolute path (a config reloaded, or a run resumed,
    from another working directory finds it), timm's weights ("timm", "timm:NAME") as given."""
    return value if value is None or value == "timm" or value.startswith("timm:") else absolute(value)
