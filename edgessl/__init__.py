"""edgessl: single-branch, single-crop self-supervised pretraining of small timm encoders for edge devices.

Python API (mirrors the CLI):
    edgessl.pretrain(backbone="mobilenetv3_small", data="./my_images", epochs=20) -> PretrainResult
    edgessl.load_encoder("runs/<name>") -> torch.nn.Module (eval mode, `.edgessl_meta` holds input size, mean/std)
    edgessl.export("runs/<name>", int8=True) -> ExportResult (ONNX files + manifest.json in runs/<name>/export)
    edgessl.evaluate_encoder("runs/<name>", train="./labeled/train", test="./labeled/test", baseline="random")
    edgessl.finetune("runs/<name>", train="./labeled/train", test="./labeled/test", labels_per_class=10)
    edgessl.load_classifier("runs/<name>/finetune-lpc10") -> torch.nn.Module (logits; `.edgessl_meta["classes"]`)
    edgessl.pretrain(..., widths="1.0,0.5,0.25"); edgessl.slim_encoder("runs/<name>", 0.5) -> Path (a smaller encoder)
    edgessl.prune_encoder("runs/<name>", ratio=0.5) -> PretrainResult (pruned + recovered encoder, widths.json report)
    edgessl.embed("runs/<name>", data="./my_images", out="emb.npz", neighbours=5, duplicates=0.95) -> EmbedResult
"""

from edgessl._names import API_NAMES
from edgessl._version import __version__

__all__ = ["__version__", *API_NAMES]  # edgessl.api's names, offered without importing torch


def __getattr__(name: str):
    """The API's functions, imported on first use (edgessl.api pulls in torch): `import edgessl` stays cheap, and the
    command line's entry point (edgessl._entry) can catch a Ctrl-C while torch loads."""
    if name in __all__ and name != "__version__":
        from edgessl import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgessl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
