"""Memory of the on-device check (export/device_check.py) for MobileNetV3-Small int8 on 1,000 images, before and after
it streamed its images.

    python -m benchmarks.device_check_memory [--export DIR] [--images DIR] [--before REV|FILE] [--repeats 3]
                                            [--threads 1] [--runs 100]

Model: without --export, mobilenetv3_small at 64 px (stride-1 stem, --small-input on) pretrained 1 epoch on the
bundled demo images and exported with int8 "strict" (one calibration, checked against its bound), calibrated on the
benchmark images, into a temporary folder. (1 epoch on the CIFAR-10 images themselves gives an int8 copy that misses
the int8 bound, min cosine 0.3-0.6, so the export does not write it; the demo-trained model passes. Memory does not
depend on the weights.) --export DIR takes an export folder holding encoder.int8.onnx and manifest.json.

Images: 1,000 CIFAR-10 test images, 100 per class (seed 0; 32 px JPEG, decoded to the model's 64 px), from the shared
archive (benchmarks/datasets.py), or --images DIR.

Every measurement is a fresh process (`/usr/bin/time -v python device_check.py MODEL --images DIR --threads T --json
...`), the two versions taking turns (before, after, before, ...) --repeats times: peak RSS (time's "Maximum resident
set size", and the script's own peak_rss_bytes), RSS above the baseline after the imports (the after version reports
it; for the before version it is its peak minus the after version's median baseline: both import the same modules),
model load seconds (after only: the before version does not report it), batch-1 latency p50 and throughput. The
before version is `git show REV:export/device_check.py` (default HEAD) or a file. Then the session options (the after
version with onnxruntime's CPU memory arena and memory pattern each on or off), and a breakdown of
where the memory goes, stage by stage in one fresh process (/proc/self/status VmRSS and VmHWM: Linux only). The load
average (1, 5, 15 min) is recorded before and after.

Writes benchmarks/results/device_check_memory.json and prints a summary.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_name

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "export" / "device_check.py"
RESULTS = REPO / "benchmarks" / "results" / "device_check_memory.json"
MODEL = "encoder.int8.onnx"
GOAL_MIB = 120
MIB = 2**20

# One fresh process: the after version with onnxruntime's session options changed (argv: mode, then the script's
# own arguments). Its JSON report is the measurement.
VARIANT = r"""
import importlib.util, sys
import onnxruntime as ort
mode = sys.argv[1]
real = ort.InferenceSession
def session(path, sess_options=None, **kw):
    sess_options.enable_cpu_mem_arena = mode in ("arena", "both")
    sess_options.enable_mem_pattern = mode in ("pattern", "both")
    return real(path, sess_options=sess_options, **kw)
ort.InferenceSession = session
spec = importlib.util.spec_from_file_location("device_check", sys.argv[2])
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)
sys.exit(dc.main(sys.argv[3:]))
"""

# One fresh process: the after version's steps one by one, the resident memory after each (VmRSS) and the peak so far
# (VmHWM), in MiB. argv: script, model, images folder, threads.
BREAKDOWN = r"""
import json, sys, time
from pathlib import Path
def mem():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            d[key] = int(value.split()[0]) / 1024
    return {"rss_mib": round(d["VmRSS"], 1), "peak_mib": round(d["VmHWM"], 1)}
stages = [("python interpreter", mem())]
import numpy as np
stages.append(("+ numpy", mem()))
from PIL import Image, ImageFile, ImageOps
stages.append(("+ Pillow", mem()))
import onnxruntime as ort
stages.append(("+ onnxruntime", mem()))
import importlib.util
spec = importlib.util.spec_from_file_location("device_check", sys.argv[1])
dc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dc)
stages.append(("+ device_check.py (argparse, json, hashlib, platform): the baseline", mem()))
model, folder, threads = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
manifest = model.parent / "manifest.json"
entry = dc.manifest_entry(model, dc.load_manifest(manifest), manifest)
stages.append(("manifest and sha256", mem()))
sess = dc.open_session(model, threads)
stages.append(("onnxruntime session (model loaded)", mem()))
pre = entry["preprocess"]
reference = dc.load_reference(entry, model.parent)
stages.append(("reference .npz", mem()))
paths = dc.image_files(folder)
stages.append(("scan (Pillow's plugins load)", mem()))
x1 = dc.normalize(dc.first_image(folder, paths, pre)[None], pre)
stages.append(("first image", mem()))
dc.latency(sess, x1, 100, 10)
stages.append(("batch-1 latency runs", mem()))
dc.throughput(sess, np.repeat(x1, 32, axis=0))
stages.append(("throughput at batch 32", mem()))
out = dc.run_decoded(sess, reference["images"], pre)
stages.append(("reference images run", mem()))
data = dc.run_images(sess, folder, paths, pre)
stages.append((f"{len(data['rel'])} images streamed (outputs {data['outputs'].shape[0]} x {data['outputs'].shape[1]})",
               mem()))
dc.image_figures(entry, data["outputs"], data, reference)
stages.append(("figures (kNN)", mem()))
print(json.dumps([{"stage": s, **m} for s, m in stages]))
"""


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def build_export(root: Path, calib: Path) -> Path:
    """mobilenetv3_small, 64 px, 1 epoch on the demo images; exported with int8 "strict" calibrated on `calib`."""
    import edgessl
    from edgessl.demo import demo_images

    run = root / "run"
    edgessl.pretrain(backbone="mobilenetv3_small", data=str(demo_images()), image_size=64, small_input="on",
                     epochs=1, batch_size=64, eval_every=0, quiet=True, out=str(run), workers=1)
    result = edgessl.export(run, int8="strict", calib=str(calib), quiet=True)
    return result.export_dir


def before_script(spec: str, dst: Path) -> dict:
    """The before version: a file, or `git show REV:export/device_check.py` (read-only)."""
    if Path(spec).is_file():
        text = Path(spec).read_text()
        source = str(Path(spec).resolve())
    else:
        text = subprocess.run(["git", "show", f"{spec}:export/device_check.py"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout
        rev = subprocess.run(["git", "rev-parse", spec], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout.strip()
        source = f"git show {spec}:export/device_check.py ({rev[:12]})"
    dst.write_text(text)
    return {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def measure(cmd: list[str], json_path: Path) -> dict:
    """One fresh process under /usr/bin/time -v: its report and time's maximum resident set size."""
    timed = ["/usr/bin/time", "-v", *cmd] if Path("/usr/bin/time").exists() else cmd
    proc = subprocess.run(timed, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    report = json.loads(json_path.read_text())
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    row = {"time_max_rss_bytes": int(found.group(1)) * 1024 if found else None,
           "peak_rss_bytes": report["peak_rss_bytes"], "latency_p50_ms": report["latency_ms"]["p50"],
           "throughput_per_s": report["throughput_per_s"]}
    for key in ("baseline_rss_bytes", "peak_rss_above_baseline_bytes", "model_load_seconds"):
        if key in report:
            row[key] = report[key]
    row["figures"] = {k: report.get(k) for k in ("reference", "reference_files", "images")}
    row["figures"]["knn_accuracy"] = report.get("knn_accuracy", report.get("knn_loo_accuracy"))
    row["figures"]["reference_vote_accuracy"] = report.get("reference_vote_accuracy", report.get("agreement"))
    return row


def median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summary(rows: list[dict]) -> dict:
    out = {k: median(rows, k) for k in ("time_max_rss_bytes", "peak_rss_bytes", "baseline_rss_bytes",
                                        "peak_rss_above_baseline_bytes", "model_load_seconds", "latency_p50_ms",
                                        "throughput_per_s")}
    out["peak_rss_mib"] = round(out["peak_rss_bytes"] / MIB, 1)
    out["peak_rss_mib_range"] = [round(min(r["peak_rss_bytes"] for r in rows) / MIB, 1),
                                 round(max(r["peak_rss_bytes"] for r in rows) / MIB, 1)]
    if out["peak_rss_above_baseline_bytes"] is not None:
        out["peak_rss_above_baseline_mib"] = round(out["peak_rss_above_baseline_bytes"] / MIB, 1)
    return out


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device_check_memory", description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, default=None, help="export folder with encoder.int8.onnx [default: build]")
    ap.add_argument("--images", type=Path, default=None,
                    help="image folder [default: 1,000 CIFAR-10 test images, 100 per class]")
    ap.add_argument("--before", default="HEAD", help="git revision or file of the before version [default: HEAD]")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per version [default: 3]")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads [default: 1]")
    ap.add_argument("--runs", type=int, default=100, help="timed batch-1 runs per process [default: 100]")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"result file [default: {RESULTS.relative_to(REPO)}]")
    return ap.parse_args(argv)


def image_folder(args) -> tuple[Path, str]:
    if args.images is not None:
        return args.images, str(args.images)
    from benchmarks.datasets import cifar10, stratified_subset

    _, test = cifar10()
    return (stratified_subset(test, 100, 0, "cifar10-test-100pc-s0"),
            "CIFAR-10 test, 100 images per class (seed 0), 32 px JPEG")


def measure_all(args, images: Path, tmp: Path, load: dict) -> dict[str, Any]:
    """The before/after processes, the session-option variants and the breakdown, in one temporary folder."""
    export = args.export or build_export(tmp / "build", images)
    model = export / MODEL
    if not model.is_file():
        raise SystemExit(f"{model} not found (the export wrote no int8 model?)")
    old = tmp / "device_check_before.py"
    before_info = before_script(args.before, old)
    common = [str(model), "--images", str(images), "--threads", str(args.threads), "--runs", str(args.runs), "--quiet"]
    rows = {"before": [], "after": []}
    load["before_runs"] = loadavg()
    for i in range(args.repeats):
        for name, script in (("before", old), ("after", SCRIPT)):
            out = tmp / f"{name}-{i}.json"
            rows[name].append(measure([sys.executable, str(script), *common, "--json", str(out)], out))
            print(f"{name} {i + 1}/{args.repeats}: peak RSS {rows[name][-1]['peak_rss_bytes'] / MIB:.1f} MiB, "
                  f"p50 {rows[name][-1]['latency_p50_ms']:.2f} ms", flush=True)
    variants = {"arena off, pattern off (kept)": "low", "arena on, pattern off": "arena", "pattern on": "pattern",
                "both on (onnxruntime's default)": "both"}
    variant_rows = {label: [] for label in variants}
    driver = tmp / "variant.py"
    driver.write_text(VARIANT)
    for i in range(args.repeats):
        for label, mode in variants.items():
            out = tmp / f"variant-{mode}-{i}.json"
            variant_rows[label].append(measure([sys.executable, str(driver), mode, str(SCRIPT), *common,
                                                "--json", str(out)], out))
    load["after_runs"] = loadavg()
    breakdown = None
    if Path("/proc/self/status").exists():
        proc = subprocess.run([sys.executable, "-c", BREAKDOWN, str(SCRIPT), str(model), str(images),
                               str(args.threads)], capture_output=True, text=True, timeout=900, check=True)
        breakdown = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"rows": rows, "variants": variant_rows, "breakdown": breakdown, "before_info": before_info,
            "model_bytes": model.stat().st_size, "manifest": json.loads((export / "manifest.json").read_text())}


def make_record(args, argv, m: dict[str, Any], load: dict, images_note: str, count: int, started: float) -> dict:
    import onnxruntime

    rows = m["rows"]
    before, after = summary(rows["before"]), summary(rows["after"])
    if after["baseline_rss_bytes"] is not None:
        before["peak_rss_above_baseline_bytes"] = before["peak_rss_bytes"] - after["baseline_rss_bytes"]
        before["peak_rss_above_baseline_mib"] = round(before["peak_rss_above_baseline_bytes"] / MIB, 1)
        before["peak_rss_above_baseline_note"] = "its peak minus the after version's median baseline (same imports)"
    same = all(r["figures"] == rows["before"][0]["figures"] for r in rows["before"] + rows["after"])
    manifest = m["manifest"]
    return {
        "suite": "device_check_memory",
        "command": "python -m benchmarks.device_check_memory" + ("" if argv is None else " " + shlex.join(argv)),
        "date": time.strftime("%Y-%m-%d"),
        "minutes": round((time.time() - started) / 60, 1),
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
        "load_average_1_5_15": load,
        "model": {"file": MODEL, "bytes": m["model_bytes"],
                  "backbone": manifest.get("backbone") or "mobilenetv3_small",
                  "input": next((e.get("input") for e in manifest["models"] if e.get("file") == MODEL), None),
                  "export": str(args.export) if args.export else "built: 1 epoch on the demo images, int8 strict"},
        "images": {"folder": images_note, "count": count},
        "threads": args.threads,
        "goal": {"peak_rss_mib": GOAL_MIB, "met": after["peak_rss_mib_range"][1] <= GOAL_MIB},
        "before": {"script": m["before_info"], **before, "runs": rows["before"]},
        "after": {"script": {"source": "export/device_check.py",
                             "sha256": hashlib.sha256(SCRIPT.read_bytes()).hexdigest()}, **after,
                  "runs": rows["after"]},
        "same_figures": same,
        "session_options": {label: summary(r) for label, r in m["variants"].items()},
        "breakdown": m["breakdown"],
    }


def print_record(record: dict, out: Path) -> None:
    before, after = record["before"], record["after"]
    print(f"peak RSS: before {before['peak_rss_mib']} MiB, after {after['peak_rss_mib']} MiB (range "
          f"{after['peak_rss_mib_range']}; goal <= {GOAL_MIB}); above the baseline: before "
          f"{before.get('peak_rss_above_baseline_mib')} MiB, after {after.get('peak_rss_above_baseline_mib')} MiB; "
          f"p50 {before['latency_p50_ms']:.2f} -> {after['latency_p50_ms']:.2f} ms; same figures: "
          f"{record['same_figures']}")
    for label, s in record["session_options"].items():
        print(f"  session options {label}: peak {s['peak_rss_mib']} MiB {s['peak_rss_mib_range']}, "
              f"p50 {s['latency_p50_ms']:.2f} ms")
    for row in record["breakdown"] or []:
        print(f"  {row['stage']}: {row['rss_mib']} MiB (peak {row['peak_mib']})")
    print(f"-> {out}")


def main(argv=None) -> None:
    args = parse(argv)
    started = time.time()
    images, images_note = image_folder(args)
    count = sum(1 for _, _, files in os.walk(images, followlinks=True) for f in files if not f.startswith("."))
    load = {"at_start": loadavg()}
    with tempfile.TemporaryDirectory(prefix="device-check-memory-") as tmp:
        measured = measure_all(args, images, Path(tmp), load)
    record = make_record(args, argv, measured, load, images_note, count, started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print_record(record, args.out)


if __name__ == "__main__":
    main()
