"""The bundled demo data: 360 Noto emoji (64 px RGBA PNG), 40 from each of 9 Unicode categories.

Used by `edgessl pretrain` when no --data is given, and by the tests and examples. See LICENSE.md here.
"""

from pathlib import Path


def demo_images() -> Path:
    """Folder of the demo images, one subfolder per category."""
    return Path(__file__).parent / "images"
