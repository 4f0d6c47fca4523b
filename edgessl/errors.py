"""Errors meant for the user: the CLI prints their message on one line and exits with code 2, no traceback."""


class UserError(Exception):
    """Bad input (paths, options, data). The message says what is wrong and what to do."""

    exit_code = 2


class TrainingDiverged(Exception):
    """Training stopped after repeated non-finite losses; the last good checkpoint was kept."""

    exit_code = 1


class Interrupted(Exception):
    """Ctrl-C: the message says what was kept (checkpointed epochs) and how to continue."""

    exit_code = 130
