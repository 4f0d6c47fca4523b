"""CLI command groups. Each module defines `register(app)` adding its typer commands; edgessl.cli calls them."""
