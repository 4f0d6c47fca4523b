#!/usr/bin/env python3
"""On-device check of an ONNX model written by `edgessl export`: latency, throughput, size, memory, and agreement.

Copy this one file to the device together with the export folder (the .onnx, manifest.json and the
.reference.npz files). It needs only onnxruntime, numpy and Pillow (never torch or edgessl):

    pip install onnxruntime numpy pillow
    python device_check.py encoder.onnx --manifest manifest.json [--images ./val] [--threads 4] [--json out.json]

What it measures
    latency at batch 1 (warm-up, then --runs runs, default 100: p50/p90/p99 ms), throughput at --batch (default 32),
    model file size, peak resident memory of this process, and - when the manifest ships reference outputs - the
    model's outputs on the shipped reference images against the PyTorch outputs recorded at export.
    With --images: images are decoded and normalised exactly as the manifest says (the same rules as edgessl's
    decode_image + test_transform); images that decode to the same pixels as a shipped reference image are compared
    with its recorded output ("reference_files"). With class subfolders: "accuracy" for a classifier (folder names =
    classes); "agreement" for an encoder (kNN vote over the shipped reference embeddings agrees with the folder
    label) plus the leave-one-out kNN accuracy of the images among themselves.

Exit codes
    0 done; 1 the outputs on the reference images are outside the bounds the manifest states;
    2 bad input: a missing file, a model that fails to load, a manifest that does not match the model
      (sha256, input name or shape), no readable image in --images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

RESIZE_POLICY = "shorter_side_center_crop"
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files fail loudly, as in edgessl


class CheckError(Exception):
    """Bad input: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing: a copy of edgessl.data.folder.decode_image + edgessl.data.augment.test_transform (numpy/PIL only).


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        elif arr.max() > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        img = Image.alpha_composite(canvas, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def decode(path: str | Path, pre: dict) -> np.ndarray:
    """One image file -> (S, S, 3) uint8 RGB by the manifest's `preprocess` rules."""
    size = int(pre["image_size"])
    with Image.open(path) as img:
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{img.width}x{img.height} pixels exceeds the limit of {MAX_PIXELS}")
        if img.format == "JPEG" and pre.get("jpeg_draft", True):
            img.draft("RGB", (size, size))
        img.load()
        if pre.get("exif_transpose", True):
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img, tuple(pre.get("background", (255, 255, 255))))
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8).copy()


def normalize(images: np.ndarray, pre: dict) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32: (x / 255 - mean) / std."""
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(pre.get("scale", 255.0))
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def preprocess(path: str | Path, pre: dict) -> np.ndarray:
    """One file -> (3, S, S) float32 model input."""
    return normalize(decode(path, pre)[None], pre)[0]


# ----------------------------------------------------------------------------------------------------------------
# Images


def scan(root: Path) -> list[Path]:
    """Image files below root (recursive, hidden entries skipped, extensions Pillow knows), sorted."""
    Image.init()
    exts = {e.lower() for e in Image.registered_extensions()}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts]
    return sorted(found)


def load_images(root: Path, pre: dict, limit: int | None) -> dict:
    """Decode the images of root: {"rel": [...], "images": uint8 (N,S,S,3), "labels": folder names or None,
    "skipped": n}. Folder names are labels when every image lies in a first-level subfolder."""
    if not root.is_dir():
        raise CheckError(f"--images '{root}' is not a folder.")
    paths = scan(root)
    if limit and len(paths) > limit:
        paths = [paths[int(round(i))] for i in np.linspace(0, len(paths) - 1, limit)]
    rel, arrays, skipped = [], [], 0
    for p in paths:
        try:
            arrays.append(decode(p, pre))
            rel.append(p.relative_to(root).as_posix())
        except (OSError, ValueError, SyntaxError):
            skipped += 1
    if not arrays:
        raise CheckError(f"--images '{root}' has no readable image ({len(paths)} image file(s) found).")
    labelled = all("/" in r for r in rel) and len({r.split("/")[0] for r in rel}) >= 2
    labels = [r.split("/")[0] for r in rel] if labelled else None
    return {"rel": rel, "images": np.stack(arrays), "labels": labels, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------------
# Manifest and model


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: Path) -> dict:
    if not path.is_file():
        raise CheckError(f"Manifest '{path}' not found.")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckError(f"Manifest '{path}' is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CheckError(f"Manifest '{path}' has no 'models' list (not written by `edgessl export`?).")
    return data


def manifest_entry(model: Path, manifest: dict, manifest_path: Path) -> dict:
    """The manifest's entry for this model file, after checking its sha256."""
    entry = next((m for m in manifest["models"] if m.get("file") == model.name), None)
    if entry is None:
        listed = ", ".join(m.get("file", "?") for m in manifest["models"]) or "none"
        raise CheckError(f"Manifest '{manifest_path}' does not list {model.name} (it lists: {listed}).")
    digest = sha256(model)
    if digest != entry.get("sha256"):
        raise CheckError(
            f"{model.name} does not match manifest '{manifest_path}': "
            f"sha256 {digest[:12]}... != {str(entry.get('sha256'))[:12]}... "
            "(a different export of this file?)."
        )
    for key in ("input", "preprocess"):
        entry.setdefault(key, manifest.get(key))
    if not entry.get("input") or not entry.get("preprocess"):
        raise CheckError(f"Manifest '{manifest_path}' gives no input/preprocess description for {model.name}.")
    if entry["preprocess"].get("resize_policy", RESIZE_POLICY) != RESIZE_POLICY:
        raise CheckError(f"Unknown resize_policy '{entry['preprocess']['resize_policy']}' in '{manifest_path}'.")
    return entry


def open_session(model: Path, threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckError(f"onnxruntime {ort.__version__} cannot load {model.name}: {first}") from None


def check_input(sess, entry: dict, model: Path) -> list[int]:
    """The model's (C, H, W), after checking its input name and shape against the manifest."""
    inp = sess.get_inputs()[0]
    want = entry["input"]
    got_shape = [d if isinstance(d, int) else None for d in inp.shape]
    want_shape = [d if isinstance(d, int) else None for d in want["shape"]]
    if inp.name != want["name"] or got_shape[1:] != want_shape[1:]:
        raise CheckError(
            f"{model.name} does not match the manifest: input {inp.name} {list(inp.shape)} != "
            f"{want['name']} {list(want['shape'])}."
        )
    return got_shape[1:]


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def run_batches(sess, x: np.ndarray, batch: int = 32) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outputs = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outputs).astype(np.float32)


def latency(sess, x1: np.ndarray, runs: int, warmup: int) -> dict:
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x1})
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x1})
        times[i] = (time.perf_counter() - t) * 1000.0
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(times.mean()), "runs": runs,
            "warmup": warmup}


def throughput(sess, xb: np.ndarray, min_seconds: float = 1.0, min_iters: int = 3) -> float:
    """Images per second at batch len(xb): one warm-up run, then at least min_iters runs and min_seconds."""
    name = sess.get_inputs()[0].name
    sess.run(None, {name: xb})
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        sess.run(None, {name: xb})
        iters += 1
    return iters * len(xb) / (time.perf_counter() - start)


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS); None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.where((na == 0) & (nb == 0), 1.0, (a * b).sum(axis=1) / np.maximum(na * nb, 1e-30))


def compare(reference: np.ndarray, output: np.ndarray, logits: bool) -> dict:
    diff = np.abs(reference.astype(np.float64) - output)
    scale = float(np.abs(reference).max()) or 1.0
    cos = cosines(reference, output)
    fig = {"images": int(len(reference)), "max_abs_diff": float(diff.max()),
           "rel_max_abs_diff": float(diff.max() / scale), "min_cosine": float(cos.min()),
           "mean_cosine": float(cos.mean())}
    if logits:
        fig["top1_agreement"] = float((reference.argmax(1) == output.argmax(1)).mean())
    return fig


def within(fig: dict, bounds: dict) -> list[str]:
    """The bounds `fig` misses."""
    missed = []
    for key, bound in bounds.items():
        if key in fig and not (fig[key] <= bound if key.startswith("rel_max") else fig[key] >= bound):
            missed.append(f"{key} {fig[key]:.6g} (bound {bound:g})")
    return missed


def load_reference(entry: dict, folder: Path) -> dict | None:
    name = entry.get("reference")
    if not name or not (folder / name).is_file():
        return None
    with np.load(folder / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def knn_vote(query: np.ndarray, memory: np.ndarray, labels: np.ndarray, classes: int, k: int, t: float = 0.1,
             exclude_self: bool = False) -> np.ndarray:
    """Weighted kNN prediction (cosine, weights exp(sim / t)) as in edgessl.evaluate.knn."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    m = memory / np.maximum(np.linalg.norm(memory, axis=1, keepdims=True), 1e-12)
    sim = q @ m.T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    k = max(1, min(k, memory.shape[0] - (1 if exclude_self else 0)))
    top = np.argsort(-sim, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, top, axis=1) / t)
    scores = np.zeros((len(q), classes))
    for j in range(k):
        np.add.at(scores, (np.arange(len(q)), labels[top[:, j]]), weights[:, j])
    return scores.argmax(1)


def image_figures(entry: dict, outputs: np.ndarray, data: dict, reference: dict | None) -> dict:
    """accuracy (classifier) or agreement (encoder) of labelled images; matched reference files."""
    res: dict = {}
    if reference is not None:  # images identical (after decoding) to reference images: end-to-end agreement
        index = {hashlib.sha1(img.tobytes()).hexdigest(): i for i, img in enumerate(reference["images"])}
        keys = [hashlib.sha1(img.tobytes()).hexdigest() for img in data["images"]]
        rows = [(r, index[k]) for r, k in enumerate(keys) if k in index]
        if rows:
            mine, theirs = zip(*rows)
            cos = cosines(reference["outputs"][list(theirs)], outputs[list(mine)])
            res["reference_files"] = {"matched": len(rows), "min_cosine": float(cos.min()),
                                      "mean_cosine": float(cos.mean())}
    names = data["labels"]
    if names is None:
        return res
    if entry.get("kind") == "classifier" or entry.get("classes"):
        lookup = {c: i for i, c in enumerate(entry.get("classes") or [])}
        rows = [r for r, n in enumerate(names) if n in lookup]
        if not rows:
            raise CheckError(f"None of the class folders in --images ({', '.join(sorted(set(names))[:5])}, ...) "
                             f"is a class of this classifier ({', '.join(list(lookup)[:5])}, ...).")
        target = np.array([lookup[names[r]] for r in rows])
        res["accuracy"] = float((outputs[rows].argmax(1) == target).mean())
        res["accuracy_images"] = len(rows)
        return res
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    if len(labels) > 2:
        pred = knn_vote(outputs, outputs, labels, len(classes), k=20, exclude_self=True)
        res["knn_loo_accuracy"] = float((pred == labels).mean())
    ref_classes = [str(c) for c in reference["classes"]] if reference is not None else []
    known = [r for r, n in enumerate(names) if n in ref_classes]
    ref_ok = reference is not None and (reference["labels"] >= 0).all()
    if known and ref_ok:
        pred = knn_vote(outputs[known], reference["outputs"], reference["labels"], len(ref_classes), k=10)
        target = np.array([ref_classes.index(names[r]) for r in known])
        res["agreement"] = float((pred == target).mean())
        res["agreement_detail"] = {"images": len(known), "reference_embeddings": int(len(reference["outputs"])),
                                   "method": "kNN vote (k=10, cosine, weights exp(sim/0.1)) over the reference "
                                             "embeddings agrees with the image's folder label"}
    else:
        res["agreement"] = None
        res["agreement_detail"] = {"note": "the reference embeddings carry no labels matching these class folders"}
    return res


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def print_table(report: dict) -> None:
    lat = report["latency_ms"]
    rows = [
        ("model", f"{report['model']} ({report.get('precision') or '?'}, {report.get('kind') or '?'})"),
        ("input", " x ".join(str(d) for d in report["input_shape"])),
        ("onnxruntime", f"{report['onnxruntime']} (threads: {report['threads'] or 'runtime default'})"),
        ("latency batch 1",
         f"p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  p99 {lat['p99']:.2f} ms  ({lat['runs']} runs)"),
        (f"throughput batch {report['throughput_batch']}", f"{report['throughput_per_s']:.1f} images/s"),
        ("model size", _fmt_bytes(report["model_bytes"])),
        ("peak RSS", _fmt_bytes(report["peak_rss_bytes"])),
    ]
    ref = report.get("reference")
    if ref:
        rows.append(("reference outputs", f"{ref['images']} images: min cosine {ref['min_cosine']:.6f}, max abs diff "
                     f"{ref['max_abs_diff']:.3g} ({'within' if ref['within_bounds'] else 'OUTSIDE'} bounds)"))
    if "images" in report:
        img = report["images"]
        skipped = f" ({img['skipped']} unreadable)" if img["skipped"] else ""
        rows.append(("images", f"{img['count']} from {img['folder']}" + skipped))
    if "accuracy" in report:
        rows.append(("accuracy", f"{report['accuracy']:.4f} on {report['accuracy_images']} labelled images"))
    if "agreement" in report:
        value = report["agreement"]
        rows.append(("agreement", f"{value:.4f} (kNN over the reference embeddings)" if value is not None else "n/a"))
    if "knn_loo_accuracy" in report:
        rows.append(("kNN leave-one-out", f"{report['knn_loo_accuracy']:.4f}"))
    if "reference_files" in report:
        rf = report["reference_files"]
        rows.append(("reference images found",
                     f"{rf['matched']}: min cosine {rf['min_cosine']:.6f} to their recorded outputs"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="device_check.py", description="On-device check of an edgessl ONNX export.")
    p.add_argument("model", type=Path, help="the .onnx file")
    p.add_argument("--manifest", type=Path, default=None, help="manifest.json [default: beside the model]")
    p.add_argument("--images", type=Path, default=None, help="folder of images (class subfolders = labels)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: runtime's choice]")
    p.add_argument("--json", type=Path, default=None, dest="json_path", help="write the report as JSON here")
    p.add_argument("--runs", type=int, default=100, help="timed batch-1 runs (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed batch-1 runs first (default 10)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the throughput measurement (default 32)")
    p.add_argument("--max-images", type=int, default=None,
                   help="use at most this many images of --images, spread evenly")
    p.add_argument("--quiet", action="store_true", help="no table; only --json and the exit code")
    return p.parse_args(argv)


def check(args) -> tuple[dict, int]:
    """Run the check; returns (report, exit code 0 or 1). Raises CheckError on bad input."""
    import onnxruntime as ort

    model = args.model
    if not model.is_file():
        raise CheckError(f"Model '{model}' not found.")
    if args.runs < 1 or args.batch < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise CheckError("--runs, --batch and --threads must be positive, --warmup zero or positive.")
    manifest_path = args.manifest or model.parent / "manifest.json"
    entry = None
    if args.manifest is not None or manifest_path.is_file():
        entry = manifest_entry(model, load_manifest(manifest_path), manifest_path)
    elif args.images is not None:
        raise CheckError(f"--images needs the manifest (preprocessing); none given and none at '{manifest_path}'.")
    sess = open_session(model, args.threads)
    if entry is not None:
        chw = check_input(sess, entry, model)
    else:
        chw = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape[1:]]
    pre = entry["preprocess"] if entry else None
    logits = bool(entry and (entry.get("kind") == "classifier" or entry.get("classes")))
    reference = load_reference(entry, manifest_path.parent) if entry else None
    data = load_images(args.images, pre, args.max_images) if args.images is not None else None

    if data is not None:
        sample = normalize(data["images"][:1], pre)
    elif reference is not None:
        sample = normalize(reference["images"][:1], pre)
    else:
        sample = np.random.default_rng(0).standard_normal((1, *chw)).astype(np.float32)
    report: dict = {
        "model": str(model), "precision": entry.get("precision") if entry else None,
        "kind": entry.get("kind") if entry else None,
        "manifest": str(manifest_path) if entry else None, "input_shape": [1, *chw], "threads": args.threads,
        "onnxruntime": ort.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "machine": platform.machine(),
        "model_bytes": model.stat().st_size,
    }
    report["latency_ms"] = latency(sess, sample, args.runs, args.warmup)
    report["throughput_batch"] = args.batch
    report["throughput_per_s"] = throughput(sess, np.repeat(sample, args.batch, axis=0))
    code = 0
    if reference is not None:
        out = run_batches(sess, normalize(reference["images"], pre))
        fig = compare(reference["outputs"], out, logits)
        missed = within(fig, entry.get("bounds") or {})
        report["reference"] = {**fig, "bounds": entry.get("bounds"), "within_bounds": not missed}
        if missed:
            code = 1
            print(f"warning: outputs on the reference images are outside the manifest's bounds: {'; '.join(missed)}",
                  file=sys.stderr)
    if data is not None:
        outputs = run_batches(sess, normalize(data["images"], pre))
        report["images"] = {"folder": str(args.images), "count": int(len(outputs)), "skipped": data["skipped"],
                            "labelled": data["labels"] is not None}
        report.update(image_figures(entry, outputs, data, reference))
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report, code


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report, code = check(args)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print_table(report)
    if args.json_path is not None:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
