"""PyTorch -> ONNX: export (torch.export first, TorchScript as the fallback), the structural check, ONNX Runtime
sessions, and the figures that compare an exported model with PyTorch against per-precision bounds."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgessl.errors import UserError
from edgessl.scripts import device_check_module

DYNAMO = "torch.export (torch.onnx.export dynamo=True)"
TORCHSCRIPT = "TorchScript (torch.onnx.export dynamo=False)"
MIN_OPSET = 9
INT8_MIN_OPSET = 13  # int8 is per-channel QDQ: DequantizeLinear's `axis` came in opset 13
EXPORTER_ENV = "EDGESSL_ONNX_EXPORTER"  # which exporter is tried first: dynamo (unset: the default) or torchscript
EXPORTERS = ("dynamo", "torchscript")

# What an exported model must reach against PyTorch fp32 on real images. rel_max_abs_diff is the largest absolute
# difference divided by the output scale (the largest |PyTorch output|); cosines are per image.
BOUNDS: dict[str, dict[str, float]] = {
    "fp32": {"rel_max_abs_diff": 1e-4, "min_cosine": 0.99999},
    "fp16": {"rel_max_abs_diff": 1e-2, "min_cosine": 0.999},
    # int8 catches a broken quantisation, not the usual loss: ResNets keep cosines above 0.999, MobileNetV3 (hard-swish,
    # squeeze-excite, wide activation ranges) typically lands at a mean of 0.94-0.99 with kNN accuracy unchanged.
    "int8": {"min_cosine": 0.75, "mean_cosine": 0.93},
}


class ValidationFailed(UserError):
    """The exported file fails its check or its parity bounds (exit code 3, distinct from bad input's 2)."""

    exit_code = 3


def require_export_deps() -> None:
    """UserError naming the missing package when the `export` extra is not installed."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(
                f"ONNX export needs the optional packages onnx, onnxruntime and onnxscript ({name} is missing): "
                "pip install onnx onnxruntime onnxscript (the `export` extra of edgessl)."
            ) from None


def max_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int, int8: bool = False) -> None:
    """UserError when the installed onnx cannot write this opset, or (int8) per-channel int8 cannot use it."""
    import onnx

    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise UserError(
            f"--opset {opset} cannot be written by the installed onnx {onnx.__version__}: "
            f"choose an opset from {MIN_OPSET} to {top} (18 is the default)."
        )
    if int8 and opset < INT8_MIN_OPSET:  # else every int8 candidate fails onnx's checker, after a minute
        raise UserError(f"--int8 needs --opset {INT8_MIN_OPSET} or higher (per-channel int8: DequantizeLinear's axis), "
                        f"not {opset}; leave --opset out for 18.")


def model_opset(path: str | Path) -> int:
    """The default-domain opset a saved model declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def quiet_exporters():
    """Silence the exporters' progress lines, warnings and log records (kept out of the user's terminal)."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
    levels = {n: logging.getLogger(n).level for n in names}
    buf = io.StringIO()
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def first_line(e: BaseException, limit: int = 200) -> str:
    """First line of an exception for a one-line error; square brackets become parentheses so that the CLI's rich
    console does not read them as markup."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
    return f"{type(e).__name__}: {text.replace('[', '(').replace(']', ')')}"


def _export_dynamo(model, example, path: Path, opset: int, input_name: str, output_name: str) -> None:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model, (example,), str(path), dynamo=True, opset_version=opset, input_names=[input_name],
        output_names=[output_name], dynamic_shapes=({0: batch},), external_data=False, verbose=False,
    )
    written = model_opset(path)
    if written != opset:
        raise RuntimeError(f"it wrote opset {written}, not the requested {opset}")


def export_torchscript(model, example, path: Path, opset: int, input_name: str, output_name: str) -> None:
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
        output_names=[output_name], dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        do_constant_folding=True, verbose=False,
    )


def first_exporter() -> str:
    """The exporter export_model tries first: $EDGESSL_ONNX_EXPORTER (dynamo or torchscript), else dynamo. On 2 CPU
    cores torch.export takes 15-20 s for a MobileNetV3 and TorchScript about a second (the test suite sets
    torchscript; tests of the torch.export path set dynamo). UserError for any other value."""
    value = os.environ.get(EXPORTER_ENV, "").strip().lower() or "dynamo"
    if value not in EXPORTERS:
        raise UserError(f"{EXPORTER_ENV}={os.environ[EXPORTER_ENV]!r}: use dynamo (the default) or torchscript.")
    return value


def export_model(model, path: str | Path, image_size: int, opset: int, input_name: str = "input",
                 output_name: str = "features", fast: bool = False) -> str:
    """Export an eval-mode module taking (B, 3, S, S) float32 to one self-contained .onnx file with a dynamic
    batch axis. Tries the torch.export-based exporter, falls back to TorchScript (fast, or $EDGESSL_ONNX_EXPORTER=
    torchscript: TorchScript first, about a second, e.g. for a file that is only timed); returns which one wrote
    it. Raises ValidationFailed when both fail."""
    path = Path(path)
    model = model.eval()
    example = torch.zeros(2, 3, image_size, image_size)
    errors = []
    order = ((DYNAMO, _export_dynamo), (TORCHSCRIPT, export_torchscript))
    for name, fn in order[::-1] if fast or first_exporter() == "torchscript" else order:
        path.unlink(missing_ok=True)
        try:
            with quiet_exporters(), torch.no_grad():
                fn(model, example, path, opset, input_name, output_name)
            return name
        except Exception as e:  # noqa: BLE001 - any exporter failure means: try the next one
            errors.append(f"{name.split(' ')[0]}: {first_line(e)}")
    path.unlink(missing_ok=True)
    raise ValidationFailed(f"ONNX export failed with both exporters ({'; '.join(errors)}).")


def check_model(path: str | Path) -> None:
    """onnx.checker with full_check (shape inference included); ValidationFailed on a malformed graph."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ValidationFailed(f"{Path(path).name} fails onnx.checker (full_check): {first_line(e)}") from None


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session; UserError when the installed runtime cannot load the file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"onnxruntime {ort.__version__} cannot load {Path(path).name} ({first_line(e)}); try a lower --opset."
        ) from None


def run(sess, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Outputs of the session's first output for x (N, 3, S, S) float32, in chunks of `batch`."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity in float64 (two all-zero rows count as identical): export/device_check.py's
    `cosines`, the one the device runs."""
    return device_check_module().cosines(a, b)


def compare(reference: np.ndarray, output: np.ndarray, logits: bool = False) -> dict[str, Any]:
    """Parity figures of `output` against `reference` (both (N, D)).

    max_abs_diff, output_scale (max |reference|), rel_max_abs_diff, min/mean cosine, images; for logits also
    top1_agreement and top1_real_disagreements (disagreements where the reference's top-2 margin exceeds twice the
    max abs diff, i.e. not numerical near-ties).

    Not device_check.compare: the figures are the same, but this one adds output_scale and
    top1_real_disagreements (failed_bounds needs them) and orders the keys as manifest.json's "parity" has them."""
    diff = np.abs(reference.astype(np.float64) - output.astype(np.float64))
    scale = float(np.abs(reference).max()) or 1.0
    cos = cosines(reference, output)
    fig: dict[str, Any] = {
        "max_abs_diff": float(diff.max()),
        "output_scale": scale,
        "rel_max_abs_diff": float(diff.max() / scale),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "images": int(len(reference)),
    }
    if logits:
        ref_top, out_top = reference.argmax(axis=1), output.argmax(axis=1)
        fig["top1_agreement"] = float((ref_top == out_top).mean())
        if reference.shape[1] > 1:
            top2 = np.sort(reference, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
        else:
            margin = np.full(len(reference), np.inf)
        fig["top1_real_disagreements"] = int(((ref_top != out_top) & (margin > 2 * diff.max())).sum())
    return fig


def failed_bounds(figures: dict[str, Any], precision: str) -> list[str]:
    """Human-readable list of the bounds that `figures` miss (empty when the model passes)."""
    missed = []
    for key, bound in BOUNDS[precision].items():
        value = figures[key]
        ok = value <= bound if key == "rel_max_abs_diff" else value >= bound
        if not ok:
            missed.append(f"{key} {value:.6g} (bound {'<=' if key == 'rel_max_abs_diff' else '>='} {bound:g})")
    if precision == "fp32" and figures.get("top1_real_disagreements", 0) > 0:
        missed.append(f"top-1 differs on {figures['top1_real_disagreements']} image(s) that are not near-ties")
    return missed


def assert_within_bounds(figures: dict[str, Any], precision: str, file: str) -> None:
    """ValidationFailed naming the missed bounds."""
    missed = failed_bounds(figures, precision)
    if missed:
        raise ValidationFailed(
            f"{file} ({precision}) does not match PyTorch on {figures['images']} images: {'; '.join(missed)}. "
            "The file was removed."
        )


def runtime_available() -> bool:
    """Whether onnx, onnxruntime and onnxscript (the `export` extra) are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True
