"""Commands of this group are registered on the main typer app by `register(app)`."""


def register(app) -> None:
    """Add this module's commands to the typer app."""
