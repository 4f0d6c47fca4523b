"""Errors meant for the user: the CLI prints their message on one line and exits with code 2, no traceback."""


class UserError(Exception):
    """Bad input (paths, options, data). The message says what is wrong and what to do."""

    exit_code = 2


class TrainingDiverged(Exception):
    """Training stopped after repeated non-finite losses; the last good checkpoint was kept."""

    exit_code = 1


class Interrupted(Exception):
    """Ctrl-C (exit 130) or SIGTERM (exit 143): the message says what was kept and how to continue."""

    def __init__(self, message: str, exit_code: int = 130, kept: str | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.kept = kept  # what was checkpointed where, without the resume command (a caller may advise otherwise)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, a spot instance, `kill`) stops a run like Ctrl-C, at a step's end: exit code 143."""


def stop_words(e: BaseException | bool) -> tuple[int, str]:
    """(exit code, first words) of a stop: (143, "Stopped by SIGTERM") for Terminated (or True), else
    (130, "Interrupted")."""
    terminated = e if isinstance(e, bool) else isinstance(e, Terminated)
    return (143, "Stopped by SIGTERM") if terminated else (130, "Interrupted")


def stopped(e: KeyboardInterrupt, rest: str) -> Interrupted:
    """Interrupted("<stop words><rest>") with the stop's exit code (stop_words)."""
    code, what = stop_words(e)
    return Interrupted(f"{what}{rest}", code)


def with_near_names(unknown: list[str], known) -> str:
    """'batchsize (did you mean batch_size?), zzz': unknown option names, each with the closest known one if any."""
    import difflib

    near = {u: difflib.get_close_matches(u.lower(), list(known), n=1) for u in unknown}
    return ", ".join(f"{u} (did you mean {near[u][0]}?)" if near[u] else u for u in unknown)


def named_source(message: str, sources: dict[str, str]) -> str:
    """The message with the file its option came from in front ("Recipe 'r.yaml': --blur is ..."), when the option
    it starts with (--name or `name must be`) was set by a file; sources: option name -> that file's label."""
    import re

    found = re.match(r"--([a-z0-9-]+)|([a-z_]+) (?:must|is required)", message)
    name = found and (found.group(1) or found.group(2)).replace("-", "_")
    return f"{sources[name]}: {message}" if name in sources else message
