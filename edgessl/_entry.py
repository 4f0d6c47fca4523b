"""The `edgessl` command's entry point: a Ctrl-C while the command line loads (torch and timm take seconds to import)
exits with code 130 and one line, as a Ctrl-C during a command does, instead of a traceback from inside an import."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from edgessl.cli import main as cli_main
    except KeyboardInterrupt:
        print("Interrupted while loading; nothing was run.", file=sys.stderr)
        raise SystemExit(130) from None
    cli_main()
