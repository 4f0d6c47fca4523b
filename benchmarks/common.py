"""What several benchmark suites share: the machine record, the data sets of the accuracy suites, one training run of
a method (edgessl or a lightly peer) and its final evaluation. The runner (run.py) and the report (report.py) import
this module; it imports neither, so the suites and the runner never import each other."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TEACHER_KEYS = ("loss_teacher", "teacher_pass_seconds", "teacher_ms_per_step")  # metrics.jsonl keys of --teacher


def run_line(rec: dict[str, Any]) -> str:
    """A results section's first words: "cpu, torch V, edgessl V, date; `command`" from a suite's record."""
    m = rec["machine"]
    return f"{m.get('cpu')}, torch {m.get('torch')}, edgessl {m.get('edgessl')}, {m.get('date')}; `{rec['command']}`"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import edgessl

    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "edgessl": edgessl.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    try:
        import lightly

        info["lightly"] = lightly.__version__
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------- data
def datasets(tiny: bool) -> dict[str, tuple[Path, Path, str, int]]:
    """name -> (train folder, test folder, backbone, image size)."""
    from benchmarks.datasets import cifar10, emoji, stratified_subset

    etrain, etest = emoji()
    ctrain, ctest = cifar10(per_class=1000)
    if tiny:
        etrain = stratified_subset(etrain, 4, 0, "emoji-train-tiny")
        etest = stratified_subset(etest, 2, 0, "emoji-test-tiny")
        ctrain = stratified_subset(ctrain, 4, 0, "cifar10-train-tiny")
        ctest = stratified_subset(ctest, 2, 0, "cifar10-test-tiny")
    return {"emoji": (etrain, etest, "mobilenetv3_small", 64), "cifar10k": (ctrain, ctest, "mobilenetv3_small", 32)}


# ---------------------------------------------------------------- evaluation shared by every method
def final_eval(backbone, train_set, test_set, name: str, seeds: int) -> dict[str, Any]:
    """kNN k=200 and linear probe at 10 and all labels per class (mean/std over seeds), the eval command's protocol."""
    from benchmarks.peers import backbone_features
    from edgessl.evaluate.protocol import FeatureSet, evaluate_features

    train_x = backbone_features(backbone, train_set)
    test_x = backbone_features(backbone, test_set)
    fs = FeatureSet(train_x, train_set.labels, train_set.classes, [str(p) for p in train_set.paths])
    test_y = torch.tensor([train_set.classes.index(test_set.classes[i]) for i in test_set.labels])
    rows = evaluate_features(fs, test_x, test_y, [10, None], list(range(seeds)), name)
    out = {}
    for r in rows:
        if r["protocol"] == "knn" and r["k"] != 200:
            continue
        key = f"{'knn' if r['protocol'] == 'knn' else 'linear'}@{r['labels_per_class']}"
        out.setdefault(key, []).append(r["top1"])
    return {k: {"mean": sum(v) / len(v), "std": float(torch.tensor(v).std()) if len(v) > 1 else 0.0}
            for k, v in out.items()}


def knn_monitor(train_set, test_set):
    from benchmarks.peers import backbone_features
    from edgessl.evaluate.knn import knn_top1

    test_y = torch.tensor([train_set.classes.index(test_set.classes[i]) for i in test_set.labels])

    def fn(backbone):
        mem, qry = backbone_features(backbone, train_set), backbone_features(backbone, test_set)
        return {"knn_top1_k200": knn_top1(qry, test_y, mem, train_set.labels, len(train_set.classes), 200, 0.1)}

    return fn


def train_and_eval(method: str, train: Path, test: Path, backbone: str, size: int, epochs: int, seed: int,
                   seeds: int, tiny: bool, overrides: dict[str, Any] | None = None, workdir: Path | None = None,
                   eval_every: int = 1) -> dict:
    """Train one method on `train`, evaluate on `test`; returns history (kNN per epoch), final eval and timings."""
    import yaml

    import edgessl
    from benchmarks.peers import train_peer
    from edgessl.data.folder import load_image_folder

    train_set = load_image_folder(train, size, labels=True)
    test_set = load_image_folder(test, size, labels=True)
    batch = 8 if tiny else 128
    t0 = time.time()
    if method in ("edgessl", "npid"):
        run = edgessl.pretrain(
            data=str(train), val=str(test), labels_from_folders=True, backbone=backbone, image_size=size,
            epochs=epochs, batch_size=batch, seed=seed, method=method, quiet=True, eval_every=eval_every,
            out=str((workdir or Path("/tmp/edgessl-bench")) / f"{method}-{train.name}-{seed}-{time.time_ns()}"),
            **(overrides or {}),
        )
        history, encoder = run.history, edgessl.load_encoder(run.run_dir)
        ran = yaml.safe_load((run.run_dir / "config.yaml").read_text())  # what ran (auto resolved)
        tau, knobs = ran["temperature"], {k: ran[k] for k in ("bank_lr", "feature_dim")}
    else:
        peer = train_peer(method, train_set, backbone, epochs, batch, seed=seed, max_steps=2 if tiny else None,
                          eval_fn=knn_monitor(train_set, test_set), eval_every=eval_every)
        history, encoder, tau, knobs = peer.history, peer.model.backbone, None, {}
    wall = time.time() - t0
    knn = [h.get("knn_top1_k200") for h in history if h.get("knn_top1_k200") is not None]
    return {
        "method": method, "data": train.name, "backbone": backbone, "image_size": size, "epochs": epochs,
        "seed": seed, "overrides": overrides or {}, **({"tau": tau} if tau is not None else {}), **knobs,
        "n_train": len(train_set), "n_test": len(test_set),
        "threads": torch.get_num_threads(), "wall_s": wall,
        "s_per_epoch": sum(h["seconds"] for h in history) / max(len(history), 1),
        "knn_last": knn[-1] if knn else None, "knn_best": max(knn) if knn else None,
        "history": [{**{k: h.get(k) for k in ("epoch", "loss", "seconds", "knn_top1_k200")},
                     **{k: h[k] for k in TEACHER_KEYS if k in h}} for h in history],
        "final": final_eval(encoder, train_set, test_set, method, seeds),
    }




def peak_rss_bytes() -> int:
    """This process's own peak RSS: VmHWM of /proc/self/status on Linux. ru_maxrss is not its own in a process that
    probe() starts: Linux carries the launcher's peak over the fork and exec (a probe started by a 3 GiB runner
    reports 3 GiB), so it is only the fallback elsewhere (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def probe(module: str, argv: list[str], tiny: bool) -> dict[str, Any]:
    """`python -m <module> <argv>` in a fresh process (what it measures is that process alone: its start-up, its peak
    RSS); returns the JSON of its last stdout line. tiny (the smoke run, where nothing is measured): the same entry
    point, `<module>.main(argv)`, runs in this process, so the suite's code runs without paying a process start each."""
    if tiny:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            importlib.import_module(module).main(argv)
        return json.loads(out.getvalue().strip().splitlines()[-1])
    res = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"python -m {module} {' '.join(argv)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
