"""The one way a command prints: Say(console, quiet) is a callable that prints a line (rich markup on, no syntax
highlighting) unless quiet, with .warn for a yellow warning line (printed under quiet too, as pretraining's are: a
skipped file is not progress) and .table for a rich table. Say() is silent."""

from __future__ import annotations

from rich.markup import escape


class Say:
    def __init__(self, console=None, quiet: bool = False):
        self.console = None if quiet else console
        self.warnings = console  # warnings are not silenced by quiet

    def __bool__(self) -> bool:
        return self.console is not None

    def __call__(self, message: str, markup: bool = True) -> None:
        """One line; markup=False prints the text as it is (paths and messages that hold brackets)."""
        if self.console is not None:
            self.console.print(message, highlight=False, markup=markup, soft_wrap=True)

    def warn(self, message: str) -> None:
        if self.warnings is not None:
            self.warnings.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)

    def table(self, table) -> None:
        if self.console is not None:
            self.console.print(table)
