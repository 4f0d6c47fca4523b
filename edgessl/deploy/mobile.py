"""Will the exported model run on a phone's accelerator? onnxruntime's own mobile usability checker (its
tools.mobile_helpers.usability_checker: what `python -m onnxruntime.tools.check_onnx_model_mobile_usability` prints)
asked per execution provider: how many partitions the graph splits into, how many nodes the provider takes,
which operators it does not, and onnxruntime's verdict (YES: should perform well, MAYBE, NO). And the .ort format
(onnxruntime's `convert_onnx_models_to_ort`) that mobile builds load.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgessl.deploy.onnx import first_line, quiet_exporters

PROVIDERS = {  # name in the report -> the checker's configuration
    "nnapi": None,
    "coreml_neuralnetwork": "coreml_supported_neuralnetwork_ops.md",
    "coreml_mlprogram": "coreml_supported_mlprogram_ops.md",
}


def _partitions(model, provider: str, fixed: bool):
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    if PROVIDERS[provider] is None:
        return uc.check_nnapi_partitions(model, fixed)
    return uc.check_coreml_partitions(model, fixed, PROVIDERS[provider])


def mobile_usability(path: str | Path) -> dict[str, Any]:
    """{provider: {"verdict", "partitions", "nodes", "nodes_supported", "coverage", "ops_not_supported"}} for NNAPI
    and Core ML (neural network and ML program), with the batch axis fixed to 1 as a phone runs it; {"error": ...}
    when the checker cannot read the model."""
    try:
        from onnxruntime.tools.mobile_helpers import usability_checker as uc

        with tempfile.TemporaryDirectory() as tmp, quiet_exporters():
            logging.getLogger("usability_checker").setLevel(logging.ERROR)
            optimized = Path(tmp) / "model.onnx"
            uc.optimize_model(Path(path), optimized, use_external_initializers=True)
            model = uc.ModelProtoWithShapeInfo(optimized).model_with_shape_info
            out = {}
            for provider in PROVIDERS:
                info = _partitions(model, provider, False)  # as if the input shape were fixed (batch 1)
                out[provider] = {
                    "verdict": info.suitability().name, "partitions": int(info.num_partitions),
                    "nodes": int(info.num_nodes), "nodes_supported": int(info.num_supported_nodes),
                    "coverage": round(info.num_supported_nodes / max(info.num_nodes, 1), 4),
                    "ops_not_supported": sorted(info.unsupported_ops),
                }
            return out
    except Exception as e:  # noqa: BLE001 - a report field, never a reason to fail the export
        return {"error": first_line(e)}


def write_ort(path: str | Path, out_dir: str | Path) -> Path:
    """The .ort (ORT format) copy of an .onnx file beside it in out_dir (<name>.ort), by onnxruntime's converter."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    path, out_dir = Path(path), Path(out_dir)
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp, quiet_exporters():
        src = Path(tmp) / path.name
        shutil.copyfile(path, src)
        convert_onnx_models_to_ort(src, output_dir=Path(tmp) / "ort", optimization_styles=[OptimizationStyle.Fixed])
        made = next((Path(tmp) / "ort").rglob("*.ort"))
        target = out_dir / (path.stem + ".ort")
        shutil.copyfile(made, target)
    return target
