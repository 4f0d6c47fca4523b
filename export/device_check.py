#!/usr/bin/env python3
"""On-device check of a model written by `edgessl export` (.onnx, or the same model in onnxruntime's .ort format):
latency, throughput, size, memory, and whether its outputs are still the exported model's.

Copy this one file to the device together with the export folder (the .onnx or .ort, manifest.json and the
.reference.npz files). It needs only onnxruntime, numpy and Pillow (never torch or edgessl) and Python 3.8+:

    pip install onnxruntime numpy pillow
    python device_check.py encoder.onnx --manifest manifest.json [--images ./val] [--threads 4] [--json out.json]
    python device_check.py encoder.int8.ort --ep xnnpack ...   # an .ort file; the XNNPACK execution provider

What it measures
    latency at batch 1 (warm-up, then --runs runs, default 100: p50/p90/p99 ms), throughput at --batch (default 32),
    model file size, the time to load the model, the peak resident memory of this process (and how far it rose
    above the memory right after the imports, before the model loads), and - when the manifest ships reference
    outputs - the model's outputs on the shipped reference images against the PyTorch outputs recorded at export.
    With --images: images are decoded and normalised exactly as the manifest says (the same rules as edgessl's
    decode_image + test_transform), 32 at a time (decoded, normalised and run, then freed: memory does not grow
    with the number of images beyond the (N, D) outputs); images that decode to the same pixels as a shipped
    reference image are compared with its recorded output ("reference_files"). With class subfolders (folder names
    = labels): "accuracy" for a classifier (the folder names are its classes); for an encoder "knn_accuracy", the
    leave-one-out kNN accuracy of the model's outputs on the images among themselves (k=20), and
    "reference_vote_accuracy", the share of images whose kNN vote over the shipped reference embeddings (k=10)
    agrees with their folder label (null when the reference embeddings carry no matching labels).

Report (--json; the table says the same)
    model, format (onnx | ort), precision, kind, input_shape, threads, execution_provider (the session's first
    provider), mobile (the manifest entry's NNAPI / Core ML usability, as the export recorded it), onnxruntime,
    model_bytes, model_load_seconds (creating the session), latency_ms {p50, p90, p99, mean,
    runs, low, high}, throughput_per_s at throughput_batch, peak_rss_bytes (the process's peak resident memory),
    baseline_rss_bytes (its resident memory right after the imports, before the model loads) and
    peak_rss_above_baseline_bytes (the difference: what the model, the images and the measurements took; meaningful
    in a fresh process, as a device and `edgessl check` run it), reference {images, max_abs_diff, rel_max_abs_diff,
    min_cosine, mean_cosine, [top1_agreement], bounds, within_bounds}; with --images: images {folder, count, skipped,
    labelled}, reference_files, accuracy + accuracy_images | knn_accuracy + reference_vote_accuracy +
    reference_vote_detail.

Memory
    onnxruntime runs without its CPU memory arena and memory pattern (each tensor is allocated when needed and freed
    after, so the memory of the batch-32 runs goes back to numpy): for MobileNetV3-Small int8 at 64 px on 1,000
    images the peak is about 105-110 MiB (269 MiB before it streamed), of which about 55 MiB are the interpreter,
    numpy, Pillow and onnxruntime themselves (benchmarks/device_check_memory.py).

Manifest
    An .onnx file is the entry whose "file" is its name; an .ort file the entry whose "ort": {"file", "sha256"}
    names it (its sha256 is checked against that one; input, preprocess, bounds and reference are the entry's).

Exit codes
    0 done; 1 the outputs on the reference images are outside the bounds the manifest states;
    2 bad input: a missing file, a model that fails to load, a manifest that does not match the model
      (sha256, input name or shape), no readable image in --images, --ep xnnpack on a build without XNNPACK.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

RESIZE_POLICY = "shorter_side_center_crop"
BATCH = 32  # images decoded, normalised and run at a time (--images, the reference images)
XNNPACK = "XnnpackExecutionProvider"
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
        if pre.get("greyscale"):  # trained on a greyscale folder: colour input is turned grey as training saw it
            img = img.convert("L").convert("RGB")
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8).copy()


def normalize(images: np.ndarray, pre: dict) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32: (x / 255 - mean) / std (in place on one float32 copy: the same
    float32 operations, one array instead of four)."""
    x = images.transpose(0, 3, 1, 2).astype(np.float32, order="C")
    x /= np.float32(pre.get("scale", 255.0))
    x -= np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    x /= np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return x


def preprocess(path: str | Path, pre: dict) -> np.ndarray:
    """One file -> (3, S, S) float32 model input."""
    return normalize(decode(path, pre)[None], pre)[0]


# ----------------------------------------------------------------------------------------------------------------
# Images


def scan(root: Path) -> list[Path]:
    """Image files below root (recursive, hidden entries skipped, extensions Pillow knows), sorted; linked folders
    followed, each real folder once (a loop adds nothing), as edgessl's scan_images."""
    Image.init()
    exts = {e.lower() for e in Image.registered_extensions()}
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts]
    return sorted(found)


def image_files(root: Path, limit: int | None = None) -> list[Path]:
    """The image files of --images (at most `limit`, spread evenly)."""
    if not root.is_dir():
        raise CheckError(f"--images '{root}' is not a folder.")
    paths = scan(root)
    if limit and len(paths) > limit:
        paths = [paths[int(round(i))] for i in np.linspace(0, len(paths) - 1, limit)]
    return paths


def readable(paths, pre: dict):
    """(path, decoded (S, S, 3) uint8) for every file of `paths` that decodes, in order; the unreadable are left out
    (count them as len(paths) minus the pairs)."""
    for p in paths:
        try:
            arr = decode(p, pre)
        except (OSError, ValueError, SyntaxError):
            continue
        yield p, arr


def first_image(root: Path, paths: list[Path], pre: dict) -> np.ndarray:
    """The first readable image of `paths`, decoded; CheckError when none is."""
    for _, arr in readable(paths, pre):
        return arr
    raise CheckError(f"--images '{root}' has no readable image ({len(paths)} image file(s) found).")


def run_images(sess, root: Path, paths: list[Path], pre: dict, batch: int = BATCH) -> dict:
    """Decode, normalise and run the images `paths` below root, `batch` readable images at a time (the batches the
    model sees are those of run_batches on all of them stacked, so the outputs are the same); only one batch of
    pixels is held at a time. Returns {"rel": [...], "outputs": (N, D) float32, "labels": folder names or None,
    "sha1": [sha1 of each decoded image] (to find the shipped reference images), "skipped": n}. Folder names are
    labels when every image lies in a first-level subfolder."""
    rel, sha1, pending = [], [], []
    name = sess.get_inputs()[0].name
    outputs = None  # (len(paths), D) float32, filled batch by batch

    def flush():
        nonlocal outputs
        out = sess.run(None, {name: normalize(np.stack(pending), pre)})[0]
        if outputs is None:
            outputs = np.empty((len(paths), *out.shape[1:]), dtype=np.float32)
        outputs[len(rel) - len(pending) : len(rel)] = out
        del pending[:]

    for p, arr in readable(paths, pre):
        rel.append(p.relative_to(root).as_posix())
        sha1.append(hashlib.sha1(arr.tobytes()).hexdigest())
        pending.append(arr)
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    if not rel:
        raise CheckError(f"--images '{root}' has no readable image ({len(paths)} image file(s) found).")
    labelled = all("/" in r for r in rel) and len({r.split("/")[0] for r in rel}) >= 2
    labels = [r.split("/")[0] for r in rel] if labelled else None
    outputs = outputs if len(rel) == len(paths) else outputs[: len(rel)].copy()
    return {"rel": rel, "outputs": outputs, "labels": labels, "sha1": sha1,
            "skipped": len(paths) - len(rel)}


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
        raise CheckError(f"Manifest '{path}' not found: pass --manifest with the manifest.json `edgessl export` "
                         "wrote beside the model.")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckError(f"Manifest '{path}' is not valid JSON ({e}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise CheckError(f"Manifest '{path}' has no 'models' list (not written by `edgessl export`?).")
    return data


def _ort_file(entry: dict) -> dict:
    """The entry's "ort" field ({"file", "sha256", "bytes"}: the same model in onnxruntime's .ort format), or {}."""
    ort_file = entry.get("ort")
    return ort_file if isinstance(ort_file, dict) else {}


def is_ort(model: Path) -> bool:
    return model.suffix.lower() == ".ort"


def manifest_entry(model: Path, manifest: dict, manifest_path: Path) -> dict:
    """The manifest's entry for this model file, after checking its sha256. An .onnx file is the entry whose "file"
    is its name; an .ort file the entry whose "ort"["file"] is, checked against "ort"["sha256"] (the entry's input,
    preprocess, bounds and reference apply to both)."""
    if is_ort(model):
        entry = next((m for m in manifest["models"] if _ort_file(m).get("file") == model.name), None)
        listed = [_ort_file(m)["file"] for m in manifest["models"] if _ort_file(m).get("file")]
    else:
        entry = next((m for m in manifest["models"] if m.get("file") == model.name), None)
        listed = [m.get("file", "?") for m in manifest["models"]]
    if entry is None:
        kind = ".ort files" if is_ort(model) else ""
        raise CheckError(f"Manifest '{manifest_path}' does not list {model.name} "
                         f"(it lists{' ' + kind if kind else ''}: {', '.join(listed) or 'none'}).")
    expected = _ort_file(entry).get("sha256") if is_ort(model) else entry.get("sha256")
    digest = sha256(model)
    if not expected:
        raise CheckError(f"Manifest '{manifest_path}' gives no sha256 for {model.name}, so it cannot tell whether "
                         f"this is the file it describes: export again (this file's sha256 is {digest}).")
    if digest != expected:
        raise CheckError(
            f"{model.name} does not match manifest '{manifest_path}': "
            f"sha256 {digest[:12]}... != {str(expected)[:12]}... "
            "(a different export of this file?)."
        )
    for key in ("input", "preprocess"):
        entry.setdefault(key, manifest.get(key))
    if not entry.get("input") or not entry.get("preprocess"):
        raise CheckError(f"Manifest '{manifest_path}' gives no input/preprocess description for {model.name}.")
    if entry["preprocess"].get("resize_policy", RESIZE_POLICY) != RESIZE_POLICY:
        raise CheckError(f"Unknown resize_policy '{entry['preprocess']['resize_policy']}' in '{manifest_path}'.")
    return entry


def providers(ep: str = "cpu") -> list:
    """onnxruntime providers for --ep: cpu, or xnnpack (XNNPACK first, the CPU provider for the rest); CheckError
    when this onnxruntime build has no XNNPACK."""
    import onnxruntime as ort

    if ep == "cpu":
        return ["CPUExecutionProvider"]
    if ep != "xnnpack":
        raise CheckError(f"--ep must be cpu or xnnpack, not '{ep}'.")
    available = ort.get_available_providers()
    if XNNPACK not in available:
        raise CheckError(f"this onnxruntime build has no XNNPACK execution provider (it has: {', '.join(available)}); "
                         "use --ep cpu or an onnxruntime build with XNNPACK")
    return [XNNPACK, "CPUExecutionProvider"]


def open_session(model: Path, threads: int | None, ep: str = "cpu", low_memory: bool = True):
    """An onnxruntime session on `model` (.onnx or .ort). low_memory: no CPU memory arena and no memory pattern
    (onnxruntime then allocates each tensor as it needs it instead of keeping the largest batch's buffers for the
    session's life; measured: 6-30 MiB less, batch-1 latency within the run-to-run spread;
    benchmarks/results/device_check_memory.json). With --ep xnnpack and --threads N: XNNPACK's own pool has the N
    threads and the session's runs on one, without spinning (onnxruntime's advice against the two pools contending)."""
    import onnxruntime as ort

    chosen = providers(ep)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if low_memory:
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
    options = [{} for _ in chosen]
    if chosen[0] == XNNPACK:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options[0] = {"intra_op_num_threads": str(threads)}
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
    elif threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(model), sess_options=opts, providers=chosen, provider_options=options)
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
    check_preprocess(entry.get("preprocess"), got_shape[1:], model)
    return got_shape[1:]


def check_preprocess(pre, chw: list, model: Path) -> None:
    """CheckError when the manifest's preprocess cannot feed this model: an image size other than its input's, or a
    mean/std that is not one positive number per channel (an edited manifest had ended in an onnxruntime traceback
    or, with std 0, in embeddings of inf and NaN)."""
    if not isinstance(pre, dict):
        raise CheckError(f"the manifest entry of {model.name} has no 'preprocess' mapping.")
    size = pre.get("image_size")
    if any(isinstance(d, int) and d != size for d in chw[1:]):
        raise CheckError(f"{model.name} does not match the manifest: its input is {chw[1:]} pixels, the manifest's "
                         f"preprocess.image_size {size!r}.")
    for key in ("mean", "std"):
        values = pre.get(key)
        ok = isinstance(values, list) and len(values) == (chw[0] if isinstance(chw[0], int) else len(values))
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not ok or (key == "std" and min(values) <= 0):
            raise CheckError(f"the manifest's preprocess.{key} {values!r} is not one {'positive ' * (key == 'std')}"
                             f"number per input channel of {model.name}.")


# ----------------------------------------------------------------------------------------------------------------
# Measurements


def run_batches(sess, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """The model's outputs (N, D) float32 on the model inputs x (N, C, H, W), `batch` at a time."""
    name = sess.get_inputs()[0].name
    outputs = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outputs).astype(np.float32)


def run_decoded(sess, images: np.ndarray, pre: dict, batch: int = BATCH) -> np.ndarray:
    """run_batches on decoded uint8 images (N, S, S, 3), normalised one batch at a time (the same outputs)."""
    name = sess.get_inputs()[0].name
    outputs = [np.asarray(sess.run(None, {name: normalize(images[i : i + batch], pre)})[0], dtype=np.float32)
               for i in range(0, len(images), batch)]
    return np.concatenate(outputs)


def _statm_rss() -> int | None:
    """Resident set size now from /proc/self/statm (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def current_rss_bytes() -> int | None:
    """Resident set size of this process now: /proc/self/statm on Linux; elsewhere the peak so far (ru_maxrss), which
    right after the imports is close to it; None where neither exists (Windows)."""
    now = _statm_rss()
    return now if now is not None else peak_rss_bytes()


def timed_rounds(fns, rounds=5, runs=10, warmup=3):
    """The one latency routine (edgessl's export, slim and this check use it): every callable in `fns` ({name:
    fn()}) is warmed up, then timed in `rounds` rounds that take turns (a, b, a, b, ...: a machine whose load
    changes slows every model alike), `runs` calls each per round. Returns {name: {"median_ms" (of every call),
    "low_ms", "high_ms" (the lowest and highest round median: the spread), "p90_ms", "p99_ms", "mean_ms", "runs",
    "rounds"}}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            batch = []
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                batch.append((time.perf_counter() - t) * 1000.0)
            times[name].append(batch)
    out = {}
    for name, per_round in times.items():
        every = np.array([t for r in per_round for t in r])
        medians = [float(np.median(r)) for r in per_round]
        p50, p90, p99 = np.percentile(every, [50, 90, 99])
        out[name] = {"median_ms": float(p50), "low_ms": min(medians), "high_ms": max(medians), "p90_ms": float(p90),
                     "p99_ms": float(p99), "mean_ms": float(every.mean()), "runs": int(every.size),
                     "rounds": rounds}
    return out


def verdict(a, b):
    """"faster", "slower" or "no clear difference": a against b (timed_rounds entries), by whether their spreads
    (lowest to highest round median) overlap; a winner is never picked from noise."""
    if a["high_ms"] < b["low_ms"]:
        return "faster"
    if a["low_ms"] > b["high_ms"]:
        return "slower"
    return "no clear difference"


def latency(sess, x1: np.ndarray, runs: int, warmup: int) -> dict:
    """Batch-1 latency of one session (timed_rounds: 5 rounds of runs / 5): p50/p90/p99 and the round spread."""
    name = sess.get_inputs()[0].name
    rounds = max(1, min(5, runs))
    t = timed_rounds({"model": lambda: sess.run(None, {name: x1})}, rounds, max(1, runs // rounds), warmup)["model"]
    return {"p50": t["median_ms"], "p90": t["p90_ms"], "p99": t["p99_ms"], "mean": t["mean_ms"], "runs": t["runs"],
            "warmup": warmup, "low": t["low_ms"], "high": t["high_ms"]}


def throughput(sess, xb: np.ndarray, min_seconds: float = 1.0, min_iters: int = 3) -> float:
    """Images per second at batch len(xb): one warm-up run, then at least min_iters runs and min_seconds."""
    name = sess.get_inputs()[0].name
    sess.run(None, {name: xb})
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        sess.run(None, {name: xb})
        iters += 1
    return iters * len(xb) / (time.perf_counter() - start)


def _status_hwm() -> int | None:
    """Peak resident set size from /proc/self/status's VmHWM (Linux): this program's own, where ru_maxrss keeps the
    peak of the process it was started from (`edgessl check` runs this script from a process with torch loaded:
    846 MiB reported against 105 MiB run alone); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (VmHWM on Linux; else ru_maxrss: bytes on macOS); None where
    unavailable."""
    hwm = _status_hwm()
    if hwm is not None:
        return max(hwm, _statm_rss() or 0)
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(peak if sys.platform == "darwin" else peak * 1024)
    return max(peak, _statm_rss() or 0)  # Linux updates ru_maxrss lazily: the size now can be above it for a while


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


def unchecked(entry: dict | None, reference: dict | None, manifest_path: Path) -> None:
    """A warning on stderr when the outputs will not be checked: no manifest, or its reference file is missing (a
    copy of the .onnx alone had passed with timings only and no word about it)."""
    if entry is None:
        why = f"no manifest (none at '{manifest_path}')"
    elif reference is None and entry.get("reference"):
        why = f"the reference file '{entry['reference']}' the manifest names is not beside it"
    else:
        return
    print(f"warning: {why}: timings only, the outputs are not checked against the export's. Copy manifest.json "
          "and the .reference.npz files beside the model.", file=sys.stderr)


def load_reference(entry: dict, folder: Path) -> dict | None:
    name = entry.get("reference")
    if not name or not (folder / name).is_file():
        return None
    try:
        with np.load(folder / name, allow_pickle=False) as z:
            reference = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # cut short, or not an .npz at all
        raise CheckError(f"the reference '{folder / name}' cannot be read ({e}): export again, or move it away to "
                         "check timings only.") from None
    missing = [k for k in ("images", "outputs") if k not in reference]
    if missing:
        raise CheckError(f"the reference '{folder / name}' lacks {', '.join(missing)}: export again, or move it away "
                         "to check timings only.")
    return reference


def loo_k(labels: np.ndarray, k: int = 20) -> int:
    """The leave-one-out kNN's k: 20, or one less than the smallest class's images. Left out of its own vote, an
    image's class has one voter fewer than the others, so a k near the class size votes against the right class:
    on 20 images in 4 classes k = 19 had scored 0.0 against a chance level of 0.25.

    >>> loo_k(np.array([0] * 30 + [1] * 30)), loo_k(np.array([0] * 6 + [1] * 6)), loo_k(np.array([0, 0, 1]))
    (20, 5, 1)
    """
    return max(1, min(k, smallest_class(labels) - 1))


def smallest_class(labels: np.ndarray) -> int:
    """The images of the smallest class present (labels >= 0)."""
    counts = np.bincount(labels[labels >= 0])
    return int(counts[counts > 0].min()) if counts.any() else 0


def knn_vote(query: np.ndarray, memory: np.ndarray, labels: np.ndarray, classes: int, k: int, t: float = 0.1,
             exclude_self: bool = False, exclude: np.ndarray | None = None) -> np.ndarray:
    """Weighted kNN prediction (cosine, weights exp(sim / t)) as in edgessl.evaluate.knn. exclude_self: query row i
    is memory row i, left out of its own vote; exclude: (Q,) the memory row each query leaves out (-1: none). The
    neighbours are sorted out `block` query rows at a time (each row's sort is the same as on the whole matrix; the
    (N, N) index matrix is never held)."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    m = memory / np.maximum(np.linalg.norm(memory, axis=1, keepdims=True), 1e-12)
    sim = q @ m.T
    del m
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    left_out = exclude_self
    if exclude is not None and (exclude >= 0).any():
        rows = np.flatnonzero(exclude >= 0)
        sim[rows, exclude[rows]] = -np.inf
        left_out = True
    k = max(1, min(k, memory.shape[0] - (1 if left_out else 0)))
    block = 256
    top = np.empty((len(q), k), dtype=np.intp)
    for a in range(0, len(q), block):
        top[a : a + block] = np.argsort(-sim[a : a + block], axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, top, axis=1) / t)
    scores = np.zeros((len(q), classes))
    for j in range(k):
        np.add.at(scores, (np.arange(len(q)), labels[top[:, j]]), weights[:, j])
    return scores.argmax(1)


def image_figures(entry: dict, outputs: np.ndarray, data: dict, reference: dict | None) -> dict:
    """accuracy (classifier), or knn_accuracy and reference_vote_accuracy (encoder), of labelled images; matched
    reference files. data: run_images's dict (its "sha1" and "labels")."""
    res: dict = {}
    index: dict = {}
    if reference is not None:  # images identical (after decoding) to reference images: end-to-end agreement
        index = {hashlib.sha1(img.tobytes()).hexdigest(): i for i, img in enumerate(reference["images"])}
        rows = [(r, index[k]) for r, k in enumerate(data["sha1"]) if k in index]
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
        res["folders_not_classes"] = sorted(set(names) - set(lookup))  # left out of the accuracy
        return res
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    if len(labels) > 2:
        k = loo_k(labels)
        pred = knn_vote(outputs, outputs, labels, len(classes), k=k, exclude_self=True)
        res["knn_accuracy"] = float((pred == labels).mean())
        res["knn_k"] = k
    ref_classes = [str(c) for c in reference["classes"]] if reference is not None else []
    known = [r for r, n in enumerate(names) if n in ref_classes]
    ref_ok = reference is not None and (reference["labels"] >= 0).all()
    if known and ref_ok:
        same = np.array([index.get(data["sha1"][r], -1) for r in known])  # a reference image is no vote for itself
        left_out = bool((same >= 0).any())  # an image that is a reference leaves its class a voter short
        k = max(1, min(10, smallest_class(reference["labels"]) - left_out))  # no class of references short of voters
        pred = knn_vote(outputs[known], reference["outputs"], reference["labels"], len(ref_classes), k=k,
                        exclude=same)
        target = np.array([ref_classes.index(names[r]) for r in known])
        res["reference_vote_accuracy"] = float((pred == target).mean())
        res["reference_vote_detail"] = {"images": len(known), "reference_embeddings": int(len(reference["outputs"])),
                                   "left_out": int((same >= 0).sum()), "k": k,
                                   "method": f"kNN vote (k={k}, cosine, weights exp(sim/0.1)) over the reference "
                                             "embeddings agrees with the image's folder label; an image identical to "
                                             "a reference image leaves that one out of its vote"}
    else:
        res["reference_vote_accuracy"] = None
        res["reference_vote_detail"] = {"note": "no reference file to vote over" if reference is None else
                                        "the reference embeddings carry no labels matching these class folders"}
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
        ("onnxruntime", f"{report['onnxruntime']} ({report['execution_provider']}, threads: "
                        f"{report['threads'] or 'runtime default'})"),
        ("model load", f"{report['model_load_seconds']:.3f} s"),
        ("latency batch 1",
         f"p50 {lat['p50']:.2f} ms  p90 {lat['p90']:.2f} ms  p99 {lat['p99']:.2f} ms  ({lat['runs']} runs)"),
        (f"throughput batch {report['throughput_batch']}", f"{report['throughput_per_s']:.1f} images/s"),
        ("model size", _fmt_bytes(report["model_bytes"])),
        ("peak RSS", _fmt_bytes(report["peak_rss_bytes"]) + (
            f" ({_fmt_bytes(report['peak_rss_above_baseline_bytes'])} above the "
            f"{_fmt_bytes(report['baseline_rss_bytes'])} after the imports)"
            if report.get("peak_rss_above_baseline_bytes") is not None else "")),
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
        other = report.get("folders_not_classes") or []
        left = (f" ({len(other)} folder{'s' if len(other) > 1 else ''} not among its classes left out: "
                f"{', '.join(other[:5])}{', ...' if len(other) > 5 else ''})") if other else ""
        rows.append(("accuracy", f"{report['accuracy']:.4f} on {report['accuracy_images']} labelled images{left}"))
    if "knn_accuracy" in report:
        rows.append(("kNN accuracy (leave-one-out)",
                     f"{report['knn_accuracy']:.4f} (k={report.get('knn_k', 20)}, among the images"
                     f"{'; k capped by the smallest class' if report.get('knn_k', 20) < 20 else ''})"))
    if "reference_vote_accuracy" in report:
        value = report["reference_vote_accuracy"]
        why = (report.get("reference_vote_detail") or {}).get("note", "no matching labels")
        k = (report.get("reference_vote_detail") or {}).get("k", 10)
        rows.append(("reference vote accuracy", f"{value:.4f} (k={k} vote over the reference embeddings = folder "
                     "label)" if value is not None else f"n/a ({why})"))
    if "reference_files" in report:
        rf = report["reference_files"]
        rows.append(("reference images found",
                     f"{rf['matched']}: min cosine {rf['min_cosine']:.6f} to their recorded outputs"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one `error:` line and exit code 2, as every other refusal of the check (not the usage)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = _Parser(prog="device_check.py", description="On-device check of an edgessl ONNX export.")
    p.add_argument("model", type=Path, help="the .onnx (or .ort) file")
    p.add_argument("--manifest", type=Path, default=None, help="manifest.json [default: beside the model]")
    p.add_argument("--images", type=Path, default=None, help="folder of images (class subfolders = labels)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: runtime's choice]")
    p.add_argument("--ep", choices=("cpu", "xnnpack"), default="cpu",
                   help="execution provider: cpu, or xnnpack (XNNPACK first, CPU for the rest; needs an onnxruntime "
                        "build with it) [default: cpu]")
    p.add_argument("--json", type=Path, default=None, dest="json_path", help="write the report as JSON here")
    p.add_argument("--runs", type=int, default=100, help="timed batch-1 runs (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed batch-1 runs first (default 10)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the throughput measurement (default 32)")
    p.add_argument("--max-images", type=int, default=None,
                   help="use at most this many images of --images, spread evenly")
    p.add_argument("--quiet", action="store_true", help="no table; only --json and the exit code")
    return p.parse_args(argv)


def check_json_path(path: Path | None) -> None:
    """CheckError, before anything is measured, when --json cannot be written: a folder, or below a file."""
    if path is None:
        return
    if path.is_dir():
        raise CheckError(f"--json '{path}' is a folder: give a file name, e.g. {path / 'check.json'}.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckError(f"--json '{path}' cannot be written: '{parent}' is a file, not a folder.")
            break


def check(args) -> tuple[dict, int]:
    """Run the check; returns (report, exit code 0 or 1). Raises CheckError on bad input."""
    import onnxruntime as ort

    baseline = current_rss_bytes()  # after the imports, before the model loads
    model = args.model
    if not model.is_file():
        raise CheckError(f"Model '{model}' not found.")
    if args.runs < 1 or args.batch < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise CheckError("--runs, --batch and --threads must be positive, --warmup zero or positive.")
    if args.max_images is not None and args.max_images < 1:
        raise CheckError(f"--max-images must be positive (leave it out to use every image), not {args.max_images}.")
    check_json_path(getattr(args, "json_path", None))
    ep = getattr(args, "ep", "cpu")
    providers(ep)  # no XNNPACK: say so before anything is read
    manifest_path = args.manifest or model.parent / "manifest.json"
    entry = None
    if args.manifest is not None or manifest_path.is_file():
        entry = manifest_entry(model, load_manifest(manifest_path), manifest_path)
    elif args.images is not None:
        raise CheckError(f"--images needs the manifest (preprocessing); none given and none at '{manifest_path}'.")
    start = time.perf_counter()
    sess = open_session(model, args.threads, ep)
    load_seconds = time.perf_counter() - start
    if entry is not None:
        chw = check_input(sess, entry, model)
    else:
        chw = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape[1:]]
    pre = entry["preprocess"] if entry else None
    logits = bool(entry and (entry.get("kind") == "classifier" or entry.get("classes")))
    reference = load_reference(entry, manifest_path.parent) if entry else None
    unchecked(entry, reference, manifest_path)
    paths = image_files(args.images, args.max_images) if args.images is not None else None

    if paths is not None:
        sample = normalize(first_image(args.images, paths, pre)[None], pre)
    elif reference is not None:
        sample = normalize(reference["images"][:1], pre)
    else:
        sample = np.random.default_rng(0).standard_normal((1, *chw)).astype(np.float32)
    report: dict = {
        "model": str(model), "format": "ort" if is_ort(model) else "onnx",
        "precision": entry.get("precision") if entry else None, "kind": entry.get("kind") if entry else None,
        "manifest": str(manifest_path) if entry else None, "input_shape": [1, *chw], "threads": args.threads,
        "execution_provider": sess.get_providers()[0],
        "onnxruntime": ort.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "machine": platform.machine(),
        "model_bytes": model.stat().st_size, "model_load_seconds": load_seconds,
        "mobile": entry.get("mobile") if entry else None,  # what the export's mobile usability check said
        "greyscale_input": bool(pre and pre.get("greyscale")),  # colour images turned grey, as in training
    }
    report["latency_ms"] = latency(sess, sample, args.runs, args.warmup)
    report["throughput_batch"] = args.batch
    report["throughput_per_s"] = throughput(sess, np.repeat(sample, args.batch, axis=0))
    code = 0
    if reference is not None:
        out = run_decoded(sess, reference["images"], pre)
        fig = compare(reference["outputs"], out, logits)
        missed = within(fig, entry.get("bounds") or {})
        report["reference"] = {**fig, "bounds": entry.get("bounds"), "within_bounds": not missed}
        if missed:
            code = 1
            print(f"warning: outputs on the reference images are outside the manifest's bounds: {'; '.join(missed)}",
                  file=sys.stderr)
    if paths is not None:
        data = run_images(sess, args.images, paths, pre)
        outputs = data["outputs"]
        report["images"] = {"folder": str(args.images), "count": int(len(outputs)), "skipped": data["skipped"],
                            "labelled": data["labels"] is not None}
        report.update(image_figures(entry, outputs, data, reference))
    peak = peak_rss_bytes()
    report["peak_rss_bytes"] = peak
    report["baseline_rss_bytes"] = baseline
    report["peak_rss_above_baseline_bytes"] = peak - baseline if peak is not None and baseline is not None else None
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
        try:
            args.json_path.parent.mkdir(parents=True, exist_ok=True)
            args.json_path.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            print(f"error: --json '{args.json_path}' could not be written: {e.strerror or e}.", file=sys.stderr)
            return 2
        if not args.quiet:
            print(f"report: {args.json_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
