"""edgessl: single-branch, single-crop self-supervised pretraining of small timm encoders for edge devices.

Python API (mirrors the CLI):
    edgessl.pretrain(backbone="mobilenetv3_small", data="./my_images", epochs=20) -> PretrainResult
    edgessl.load_encoder("runs/<name>") -> torch.nn.Module (eval mode, `.edgessl_meta` holds input size, mean/std)
"""

__version__ = "0.1.0"

from edgessl.api import load_encoder, pretrain  # noqa: E402

__all__ = ["__version__", "pretrain", "load_encoder"]
