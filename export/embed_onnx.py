#!/usr/bin/env python3
"""Embeddings of a folder of images from an ONNX encoder written by `edgessl export`, without torch or edgessl.

Copy this file and device_check.py (its decoding and preprocessing) beside the export folder on the device:

    pip install onnxruntime numpy pillow
    python embed_onnx.py encoder.onnx --data ./images --out embeddings.npz [--manifest manifest.json]

Every image below --data (recursively, hidden entries skipped) is decoded and normalised exactly as the manifest
says; the output holds one row per readable image: `paths` (N,) and `embeddings` (N, D) float32, the model's
output (pooled backbone features, not L2-normalised). Unreadable files are listed in skipped_files.txt beside
--out, one '<path>\\t<reason>' line each, with the reasons `edgessl pretrain` gives. Images are decoded and run in
batches, so memory does not grow with the number of images beyond the (N, D) output.
`edgessl embed encoder.onnx ...` runs this same code and adds neighbours, duplicates and the .parquet format.

Exit codes: 0 done; 2 bad input (a missing file, a manifest that does not match the model, no readable image).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def device_check():
    """device_check.py from this file's folder (its decode, normalize, manifest and session helpers)."""
    name = "edgessl_device_check_for_embed"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("device_check.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def try_decode(path: Path, pre: dict):
    """(uint8 (S, S, 3) image, None) or (None, reason): the reasons of edgessl.data.folder (`edgessl pretrain`)."""
    try:
        return device_check().decode(path, pre), None
    except Image.DecompressionBombError as e:
        return None, f"decompression bomb: {e}"
    except PermissionError:
        return None, "permission denied"
    except ValueError as e:
        if "exceeds the limit of" in str(e):  # device_check.decode's own pixel limit, worded as in edgessl
            return None, f"decompression bomb: {e} (decompression bomb?)"
        return _unreadable(path, e)
    except (OSError, SyntaxError) as e:
        return _unreadable(path, e)


def _unreadable(path: Path, e: Exception):
    if not os.path.exists(path):
        return None, "broken link" if os.path.islink(path) else "missing (removed while reading?)"
    if os.path.getsize(path) == 0:
        return None, "empty file (0 bytes)"
    return None, f"unreadable: {str(e) or type(e).__name__}"


def open_model(model: Path, manifest: Path | None = None, threads: int | None = None):
    """(onnxruntime session, the manifest's entry for the model) after checking sha256, input name and shape; a
    classifier's file is refused (its outputs are logits, not embeddings)."""
    dc = device_check()
    if not model.is_file():
        raise dc.CheckError(f"Model '{model}' not found: `edgessl export RUN` writes RUN/export/encoder.onnx.")
    manifest = manifest or model.parent / "manifest.json"
    entry = dc.manifest_entry(model, dc.load_manifest(manifest), manifest)
    if entry.get("kind") == "classifier" or entry.get("classes"):  # its outputs are logits, one per class
        raise dc.CheckError(f"{model.name} is a classifier (logits, one per class); embeddings need an encoder "
                            "export (`edgessl export RUN` writes encoder.onnx).")
    sess = dc.open_session(model, threads)
    dc.check_input(sess, entry, model)
    return sess, entry


def embed_folder(sess, pre: dict, root: Path, batch: int = 64, progress=None):
    """Embed every image below root in batches of `batch`.

    Returns (paths: readable files, root-joined, in scan order; embeddings (N, D) float32; skipped: [(path, reason)]).
    progress: optional callable(done, total)."""
    dc = device_check()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise dc.CheckError(f"--data '{root}' is not a folder.")
    files = dc.scan(root)
    paths, outputs, skipped = [], [], []
    for start in range(0, len(files), batch):
        arrays = []
        for path in files[start : start + batch]:
            arr, why = try_decode(path, pre)
            if arr is None:
                skipped.append((path, why))
            else:
                arrays.append(arr)
                paths.append(path)
        if arrays:
            outputs.append(dc.run_batches(sess, dc.normalize(np.stack(arrays), pre), batch))
        if progress is not None:
            progress(min(start + batch, len(files)), len(files))
    if not paths:
        raise dc.CheckError(f"--data '{root}' has no readable image ({len(files)} image file(s) found).")
    return paths, np.concatenate(outputs).astype(np.float32), skipped


def write_npz(out: Path, paths, embeddings: np.ndarray) -> Path:
    """out (.npz): `paths` (N,) str and `embeddings` (N, D) float32; written to a temporary file, then renamed."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(tmp, paths=np.array([str(p) for p in paths]), embeddings=embeddings.astype(np.float32))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def write_skipped(skipped, path: Path) -> Path:
    """One line per skipped file: '<path>\\t<reason>' (the format of edgessl's skipped_files.txt)."""
    path.write_text("".join(f"{p}\t{why}\n" for p, why in skipped))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="embed_onnx.py", description="Embeddings of an image folder from an edgessl "
                                "ONNX encoder (no torch).")
    p.add_argument("model", type=Path, help="the encoder's .onnx (or .ort) file")
    p.add_argument("--data", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    p.add_argument("--manifest", type=Path, default=None, help="manifest.json [default: beside the model]")
    p.add_argument("--batch", type=int, default=64, help="images per onnxruntime call (default 64)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    args = p.parse_args(argv)
    dc = device_check()
    try:
        if args.out.suffix != ".npz":
            raise dc.CheckError(f"--out must end in .npz, not '{args.out.name}'.")
        if args.batch < 1 or (args.threads is not None and args.threads < 1):  # as device_check.py
            raise dc.CheckError(f"--batch and --threads must be positive, not {args.batch} and {args.threads}.")
        sess, entry = open_model(args.model, args.manifest, args.threads)
        paths, emb, skipped = embed_folder(sess, entry["preprocess"], args.data, args.batch)
    except dc.CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(args.out, paths, emb)
    if skipped:
        listed = write_skipped(skipped, args.out.parent / "skipped_files.txt")
        print(f"warning: skipped {len(skipped)} unreadable file(s); all are listed in {listed}.",
              file=sys.stderr)
    print(f"{len(paths)} embeddings of dimension {emb.shape[1]} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
