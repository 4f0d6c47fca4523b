"""Deployment: ONNX export with parity checks (onnx.py), int8/fp16 conversion (quantize.py), the manifest that
describes the exported files (manifest.py), the export pipeline (export.py) and the on-device check (check.py,
which runs the repository's export/device_check.py).

onnx, onnxruntime and onnxscript are the optional extra `edgessl[export]`; they are imported inside functions so
that `import edgessl` works without them.
"""
