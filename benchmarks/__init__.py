"""edgessl benchmarks: `python -m benchmarks.run <suite>` (see benchmarks/README.md)."""
