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

from edgessl._version import __version__  # noqa: E402
from edgessl.api import (  # noqa: E402
    embed,
    evaluate_encoder,
    export,
    finetune,
    load_classifier,
    load_encoder,
    pretrain,
    prune_encoder,
    slim_encoder,
)

__all__ = ["__version__", "pretrain", "load_encoder", "evaluate_encoder", "finetune", "load_classifier", "export",
           "slim_encoder", "prune_encoder", "embed"]
