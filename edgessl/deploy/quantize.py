"""Reduced-precision copies of an exported fp32 model: static int8 (ONNX Runtime, QDQ, per-channel weights,
calibrated on the user's own images) and fp16 weights (float32 inputs and outputs kept)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgessl.deploy.onnx import ValidationFailed, first_line, quiet_exporters
from edgessl.errors import UserError

INT8_SETTINGS = {
    "format": "QDQ",
    "per_channel": True,
    "weights": "int8 (symmetric, per output channel)",
    "activations": "uint8 (asymmetric, per tensor)",
    "pre_process": "onnxruntime.quantization.quant_pre_process (shape inference + graph optimisation)",
}
# --calib-method -> (onnxruntime CalibrationMethod name, extra_options)
CALIBRATION_METHODS = {
    "minmax": ("MinMax", {}),
    "moving-average": ("MinMax", {"CalibMovingAverage": True}),
    "percentile": ("Percentile", {}),
    "entropy": ("Entropy", {}),
}


def check_calibration_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise UserError(f"--calib-method must be one of {', '.join(CALIBRATION_METHODS)}, not '{method}'.")


def equal_batch(n: int, most: int = 16) -> int:
    """The largest batch size up to `most` that divides n: every calibration batch the same size (onnxruntime's
    percentile and entropy collectors stack the batches, and 60 images in batches of 16 failed with 'inhomogeneous
    shape'; minmax did not mind)."""
    return next(b for b in range(min(most, max(n, 1)), 0, -1) if n % b == 0)


class _Batches:
    """onnxruntime CalibrationDataReader over an in-memory (N, 3, S, S) float32 array, in equal batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 16):
        batch = equal_batch(len(x), batch)
        self._it = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # not needed by quantize_static, present for API completeness
        pass


def _pre_process(src: Path, dst: Path) -> bool:
    """quant_pre_process src -> dst; False (dst not written) when it fails, then src is quantised as is."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with quiet_exporters():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return dst.is_file()
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation, quantisation works without it
        dst.unlink(missing_ok=True)
        return False


def prepare_source(fp32_path: str | Path, dst: str | Path) -> bool:
    """Write the model that int8 candidates are quantised from to dst: fp32_path after quant_pre_process (when that
    works), every node named (nodes_to_exclude selects nodes by name; the exporters leave some unnamed). Returns
    whether pre-processing was applied."""
    import onnx

    fp32_path, dst = Path(fp32_path), Path(dst)
    pre_processed = _pre_process(fp32_path, dst)
    model = onnx.load(str(dst if pre_processed else fp32_path))
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    onnx.save(model, str(dst))
    return pre_processed


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, input_name: str,
                  method: str = "minmax", exclude: Sequence[str] = (), source: str | Path | None = None,
                  pre_processed: bool | None = None) -> dict[str, Any]:
    """Static int8 quantisation of fp32_path into out_path, calibrated on `calib` (preprocessed float32 images)
    with a CALIBRATION_METHODS method; the nodes named in `exclude` stay in float. `source`: the model to quantise,
    written by prepare_source (with `pre_processed` its return value); by default prepared here from fp32_path.
    Returns the settings for the manifest. ValidationFailed (nothing written) when quantisation fails."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    check_calibration_method(method)
    calibrate, extra = CALIBRATION_METHODS[method]
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    own = source is None
    if own:
        source = out_path.with_name(out_path.stem + ".pre.onnx")
        pre_processed = prepare_source(fp32_path, source)
    try:
        with quiet_exporters():
            quantize_static(
                str(source), str(out_path), _Batches(calib, input_name), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude), calibrate_method=getattr(CalibrationMethod, calibrate),
                extra_options=dict(extra),
            )
    except Exception as e:  # noqa: BLE001
        out_path.unlink(missing_ok=True)
        raise ValidationFailed(f"int8 quantisation of {fp32_path.name} failed: {first_line(e)}") from None
    finally:
        if own:
            Path(source).unlink(missing_ok=True)
    return {**INT8_SETTINGS, "calibration": method, "pre_processed": bool(pre_processed),
            "calibration_images": int(len(calib)), "nodes_in_float": list(exclude)}


def topological_sort(graph) -> None:
    """Reorder graph.node so that every node comes after the producers of its inputs (the float16 converter
    appends its input casts at the end, which onnx.checker rejects)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph cannot be ordered: node {rest[0].name!r} has inputs nobody produces")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """float16 weights and compute, float32 inputs and outputs (keep_io_types). Returns settings for the manifest."""
    import onnx

    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        tool = "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"
    except ImportError:  # pragma: no cover - older/slim onnxruntime builds
        from onnxconverter_common.float16 import convert_float_to_float16

        tool = "onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)"
    try:
        with quiet_exporters():
            model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
            topological_sort(model.graph)
            onnx.save(model, str(out_path))
    except Exception as e:  # noqa: BLE001
        Path(out_path).unlink(missing_ok=True)
        raise ValidationFailed(f"fp16 conversion of {Path(fp32_path).name} failed: {first_line(e)}") from None
    return {"tool": tool, "io": "float32 inputs and outputs, float16 inside"}
