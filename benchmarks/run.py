"""Benchmark runner: `python -m benchmarks.run <suite> [--tiny] [--epochs E] [--results DIR]`.

Suites (each writes <results>/<suite>.json, then benchmarks/README.md is regenerated from every JSON present):
  cost      step time, images/s and peak RSS per method and backbone (each in its own process); the supervised
            cross-entropy floor; end-to-end vs model-only images/s
  accuracy  kNN (k=200, t=0.1, last and best epoch) and linear probe after the same epochs, emoji (64 px) and a
            10,000-image CIFAR-10 subset (32 px), edgessl vs NPID vs lightly MoCo v2 and SimCLR
  ablation  each component of the method off (and CutMix on), kNN after the same epochs, 3 seeds, emoji
  data      10/25/50 % of the CIFAR-10 subset, edgessl vs MoCo v2 (100 %: the accuracy suite's runs, added by
            the report)
  slim      one --widths 1.0,0.5 run vs separately trained widths vs prune-then-recover (emoji), benchmarks/slim.py
  budget    equal wall-clock: each method trains for the time SimCLR's `--epochs` took in the accuracy suite
  shared-cpu  demo pretrain images/s and eval seconds, idle and beside a competing 2-thread PyTorch job, with the
            thread policy vs the old behaviour (benchmarks/shared_cpu.py); run it on an otherwise idle machine
  midway    a competitor that arrives and leaves in the middle of a demo pretraining: images/s per phase with the
            threads following the load vs fixed (benchmarks/shared_cpu.py); on an otherwise idle machine
  eval      seconds of `edgessl eval` (CIFAR-10 5k/5k, 10 and all labels, 3 seeds, random baseline) with the probe
            before and after its speed-ups, and every top-1 difference (benchmarks/eval_speed.py)
  export    the int8 search of `edgessl export --int8` for mobilenetv3_small (64 px) and resnet18 (32 px) after 1
            and 15 epochs on emoji: candidates, parity, int8 vs fp32 latency (benchmarks/export_search.py)
  init      `--init RUN`: an emoji-pretrained encoder continued on CIFAR-10 5k vs from scratch, kNN per epoch
            (benchmarks/init_transfer.py)
  teacher   --teacher: mobilenetv3_small on CIFAR-10 5k without a teacher, with the one-pass teacher bank of a
            longer-trained resnet18 (also as the initial bank), and with the per-step teacher: kNN, linear at 10 and
            all labels, wall time (benchmarks/teacher.py)
  duplicates  `embed --duplicates auto` on emoji, NEU-DET and CIFAR-10 2k, clean and with 50 planted copies:
            precision, recall and the estimates it printed; its cost on CIFAR-10's 50,000 (benchmarks/duplicates.py)
  copy-score  the pixel copy score alone: planted copies against each folder's look-alike pairs, with and without
            the colour blur a JPEG copy needs (benchmarks/copy_score.py)
  domains   NEU-DET steel scans (emoji for contrast): edgessl for 15/30/60 epochs, at 64/96/128 px, random weights,
            SimCLR at equal epochs and equal wall-clock, supervised ceiling (benchmarks/domains.py; --only)
  lookalike the look-alike score of random subsets of 20-1,000 images per folder against the size-aware threshold of
            --temperature auto (benchmarks/lookalike.py)
  loader    cold/warm start, cache-building RSS, loader images/s (RAM, memory map, streaming), end-to-end vs
            model-only, monitor seconds at N = 20,000 (benchmarks/loader.py)
  all       every suite above
  gpu       (not in all) the consumer-GPU claim in about 8 minutes on one GPU: the data path vs the model at 224 px,
            edgessl vs SimCLR vs supervised step times, a time-boxed CIFAR-10 run with kNN per epoch
            (benchmarks/gpu.py; --device, --minutes, --only data,steps,cifar)
--tiny runs a suite in seconds (a few images, one epoch, two steps) so the runner cannot rot (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, datasets, machine, peak_rss_bytes, probe, train_and_eval
from benchmarks.datasets import SharedDataMissing
from benchmarks.domains import PARTS as DOMAIN_PARTS

SUITES = ("cost", "accuracy", "ablation", "data", "budget", "slim", "shared-cpu", "midway", "eval", "loader", "export",
          "init", "teacher", "duplicates", "copy-score", "domains", "lookalike")
# ---------------------------------------------------------------- suites
def suite_cost(args) -> list[dict]:
    rows = []
    for backbone, size in (("mobilenetv3_small", 64), ("resnet18", 32))[: 1 if args.tiny else 2]:
        for method in ("edgessl", "npid", "mocov2", "simclr", "supervised"):
            argv = ["cost-one", "--method", method, "--backbone", backbone, "--image-size", str(size)]
            rows.append(probe("benchmarks.run", argv + (["--tiny"] if args.tiny else []), args.tiny))
            print(f"cost {backbone} {method}: {rows[-1]['images_per_s']:.0f} img/s", flush=True)
    floor = {(r["backbone"]): r["step_s"] for r in rows if r["method"] == "supervised"}
    for r in rows:
        r["step_over_supervised"] = r["step_s"] / floor[r["backbone"]]
    if not args.tiny:
        from benchmarks.throughput import measure

        for backbone, size in (("mobilenetv3_small", 64), ("resnet18", 32)):
            rows.append({"kind": "throughput", **measure(backbone, size, 128, 10, None)})
    return rows


def cost_one(args) -> None:
    """One method's step cost in this (fresh) process; prints one JSON line."""
    from benchmarks.datasets import emoji, stratified_subset
    from benchmarks.peers import train_peer
    from edgessl.data.folder import load_image_folder

    train, _ = emoji()
    if args.tiny:
        train = stratified_subset(train, 4, 0, "emoji-train-tiny")
    images = load_image_folder(train, args.image_size, labels=True)
    batch = 8 if args.tiny else 128
    warm, timed = (1, 1) if args.tiny else (2, 10)
    train_peer(args.method, images, args.backbone, 1, batch, max_steps=warm)  # warm-up (allocations, caches)
    t0 = time.time()
    train_peer(args.method, images, args.backbone, 1, batch, max_steps=timed)
    step = (time.time() - t0) / timed
    print(json.dumps({"method": args.method, "backbone": args.backbone, "image_size": args.image_size,
                      "batch_size": batch, "step_s": step, "images_per_s": batch / step,
                      "s_per_epoch_5k": step * 5000 / batch, "peak_rss_bytes": peak_rss_bytes()}))


def suite_accuracy(args) -> list[dict]:
    rows = []
    for name, (train, test, backbone, size) in datasets(args.tiny).items():
        if args.datasets and name not in args.datasets:
            continue
        for method in ("edgessl", "npid", "mocov2", "simclr"):
            rows.append({**train_and_eval(method, train, test, backbone, size, args.epochs, 0, args.seeds, args.tiny,
                                          eval_every=args.eval_every), "data": name})
            print(f"accuracy {name} {method}: kNN last {rows[-1]['knn_last']}", flush=True)
    return rows


ABLATIONS = {
    "full": {},
    "random bank init": {"bank_init": "random"},
    "momentum bank update": {"bank_update": "momentum"},
    "no self-distillation": {"sd_weight": 0.0},
    "with CutMix 0.5": {"cutmix": 0.5, "cutmix_lam": "beta"},
    "with CutMix 0.5, max(lam, 1-lam)": {"cutmix": 0.5, "cutmix_lam": "max"},
}


def suite_ablation(args) -> list[dict]:
    train, test, backbone, size = datasets(args.tiny)["emoji"]
    rows = []
    for label, overrides in ABLATIONS.items():
        if args.ablations and label not in args.ablations:
            continue
        for seed in range(1 if args.tiny else 3):
            r = train_and_eval("edgessl", train, test, backbone, size, args.epochs, seed, 1, args.tiny, overrides,
                               eval_every=args.eval_every)
            rows.append({"ablation": label, **r})
            print(f"ablation {label} seed {seed}: kNN {r['knn_last']}", flush=True)
    return rows


def suite_data(args) -> list[dict]:
    from benchmarks.datasets import stratified_subset

    train, test, backbone, size = datasets(args.tiny)["cifar10k"]
    per_class = 4 if args.tiny else 1000
    rows = []
    # the 100 % point is the accuracy suite's cifar10k run (same data, epochs and protocol): the report adds it
    for frac in (0.1, 0.25, 0.5):
        sub = stratified_subset(train, max(2, int(per_class * frac)), 0, f"{train.name}-{frac}")
        for method in ("edgessl", "mocov2"):
            r = train_and_eval(method, sub, test, backbone, size, args.epochs, 0, 1, args.tiny,
                               eval_every=args.eval_every)
            rows.append({"fraction": frac, **r})
            print(f"data {frac} {method}: kNN {r['knn_last']}", flush=True)
    return rows


def suite_budget(args) -> list[dict]:
    """Equal wall-clock: every method gets the time SimCLR needed for `epochs` epochs in the accuracy suite, i.e.
    as many epochs as its own s/epoch there allows (same machine state); SimCLR's row is reused."""
    acc = args.results / "accuracy.json"
    if not acc.exists():
        raise SystemExit("the budget suite needs benchmarks/results/accuracy.json: run the accuracy suite first")
    rec = json.loads(acc.read_text())
    rows = []
    for name, (train, test, backbone, size) in datasets(args.tiny).items():
        if args.datasets and name not in args.datasets:
            continue
        by = {r["method"]: r for r in rec["rows"] if r["data"] == name}
        if "simclr" not in by:
            continue
        budget = by["simclr"]["s_per_epoch"] * by["simclr"]["epochs"]
        rows.append({**by["simclr"], "budget_s": budget, "reused_from": "accuracy"})
        for method in ("edgessl", "npid", "mocov2"):
            if method not in by:
                continue
            epochs = max(1, int(budget // by[method]["s_per_epoch"]))
            r = train_and_eval(method, train, test, backbone, size, epochs, 0, args.seeds, args.tiny,
                               eval_every=max(1, epochs // 5))
            rows.append({**r, "data": name, "budget_s": budget})
            print(f"budget {name} {method}: {epochs} epochs, kNN last {r['knn_last']}", flush=True)
    return rows


def suite_eval(args) -> list[dict]:
    from benchmarks.eval_speed import suite_eval as run

    return run(args)


def suite_shared_cpu(args) -> list[dict]:
    from benchmarks.shared_cpu import suite_shared_cpu as run

    return run(args)


def suite_midway(args) -> list[dict]:
    from benchmarks.shared_cpu import suite_midway as run

    return run(args)


def suite_init(args) -> list[dict]:
    from benchmarks.init_transfer import suite_init as run

    return run(args)


def suite_teacher(args) -> list[dict]:
    from benchmarks.teacher import suite_teacher as run

    return run(args)


def suite_duplicates(args) -> list[dict]:
    from benchmarks.duplicates import suite_duplicates as run

    return run(args)


def suite_copy_score(args) -> list[dict]:
    from benchmarks.copy_score import suite_copy_score as run

    return run(args)


def suite_domains(args) -> list[dict]:
    from benchmarks.domains import suite_domains as run

    return run(args)


def suite_lookalike(args) -> list[dict]:
    from benchmarks.lookalike import suite_lookalike as run

    return run(args)


def suite_export(args) -> list[dict]:
    from benchmarks.export_search import suite_export as run

    return run(args)


def suite_loader(args) -> list[dict]:
    from benchmarks.loader import suite_loader as run

    return run(args)


def suite_gpu(args) -> list[dict]:
    from benchmarks.gpu import suite_gpu as run

    return run(args)


def suite_slim(args) -> list[dict]:
    from benchmarks.slim import suite_slim as run

    return run(args)


@contextlib.contextmanager
def smoke_probe(tiny: bool):
    """--tiny: the linear probe's cheapest settings (a few L-BFGS steps per CV fit, never the exact float64 sweep), so a
    smoke run checks the code, not the numbers."""
    from edgessl.evaluate import linear

    saved = linear.PROBE
    if tiny:
        linear.PROBE = linear.ProbeSettings(exact_up_to=0, cv_max_iter=3, patience=1)
    try:
        yield
    finally:
        linear.PROBE = saved


@contextlib.contextmanager
def own_cache():
    """A temporary decoded-image cache for the run (EDGESSL_CACHE_DIR, inherited by every process a suite starts):
    the user's cache is left as it was found."""
    saved = os.environ.get("EDGESSL_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="edgessl-bench-cache-") as tmp:
        os.environ["EDGESSL_CACHE_DIR"] = tmp
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("EDGESSL_CACHE_DIR", None)
            else:
                os.environ["EDGESSL_CACHE_DIR"] = saved


def record_head(earlier: Path | None, command: str, seconds: float) -> tuple[str, float, dict[str, Any]]:
    """(command, seconds, machine) of a suite's record. A partial rerun (earlier: the suite's JSON, kept rows)
    appends its command to the earlier ones (each command once, in the order first run) and adds its seconds; a
    note on where the earlier rows ran (the machine's "note", written by hand) stays with them."""
    mach = machine()
    if earlier is not None and earlier.exists():
        rec = json.loads(earlier.read_text())
        parts = list(dict.fromkeys([*rec["command"].split("; then "), command]))
        command, seconds = "; then ".join(parts), rec["seconds"] + seconds
        if rec["machine"].get("note"):
            mach["note"] = rec["machine"]["note"]
    return command, seconds, mach


ONLY_SUITES = ("gpu", "domains", "duplicates")  # the suites --only selects parts of
DATASET_SUITES = ("accuracy", "budget", "export")  # ... --datasets, whose rows carry "data"
ABLATION_SUITES = ("ablation", "teacher")  # ... --ablations
PEER_SUITES = ("cost", "accuracy", "data", "budget")  # lightly's methods in every row (domains: its peers part)


def check_args(args, suites: tuple[str, ...]) -> None:
    """SystemExit (one line) before anything runs: an option the chosen suites do not read, or lightly missing where
    a suite compares with it (a suite would otherwise fail at its first lightly row and throw away what it had
    trained). Each suite checks its own --only parts as it starts."""
    for flag, takers in (("only", ONLY_SUITES), ("datasets", DATASET_SUITES), ("ablations", ABLATION_SUITES)):
        if getattr(args, flag) and not set(suites) & set(takers):
            raise SystemExit(f"--{flag} is read by the {', '.join(takers)} suites, not by {args.suite}")
    if args.only and args.suite == "all":
        raise SystemExit("--only names parts of one suite: run that suite alone (gpu, domains or duplicates)")
    peers = [s for s in suites if s in PEER_SUITES or (s == "domains" and "peers" in (args.only or DOMAIN_PARTS))]
    if peers and importlib.util.find_spec("lightly") is None:
        raise SystemExit(f"{', '.join(peers)}: compared with lightly's methods, which are not installed: "
                         "pip install -e '.[bench]'")


def outputs(args) -> None:
    """--results and --readme when not given: the committed benchmarks/results and README, except under --tiny,
    which never writes over them: a temporary folder (and the README in --results when only that was given)."""
    if not args.tiny or args.suite in ("report", "slim-cost", "cost-one"):
        args.results = args.results or RESULTS
        args.readme = args.readme or REPO / "benchmarks" / "README.md"
        return
    if args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix="edgessl-bench-tiny-"))
        print(f"--tiny: results go to {args.results} (benchmarks/results is left as it is)", flush=True)
    args.readme = args.readme or args.results / "README.md"


def earlier_rows(old: Path, tiny: bool) -> list[dict]:
    """The rows a partial rerun keeps: those of the suite's JSON when it ran at the same scale (a tiny run never
    mixes with real rows)."""
    if not old.exists():
        return []
    rec = json.loads(old.read_text())
    return rec["rows"] if bool(rec.get("tiny")) == tiny else []


def main(argv: list[str] | None = None) -> None:
    try:
        with own_cache():
            _main(argv)
    except SharedDataMissing as e:  # its one line, not a traceback
        raise SystemExit(f"error: {e}") from None


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="edgessl benchmarks")
    ap.add_argument("suite", choices=(*SUITES, "all", "gpu", "cost-one", "report", "slim-cost"))
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke run")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 15; 1 with --tiny)")
    ap.add_argument("--seeds", type=int, default=3, help="label-subset seeds of the final evaluation")
    ap.add_argument("--eval-every", type=int, default=1, help="kNN monitor every N epochs (and after the last)")
    ap.add_argument("--datasets", nargs="*", default=None, help="accuracy suite: only these (emoji, cifar10k)")
    ap.add_argument("--ablations", nargs="*", default=None,
                    help="ablation and teacher suites: only these rows (labels of ABLATIONS, of teacher.RUNS)")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder of the suites' JSON (default benchmarks/results; --tiny: a temporary folder)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="the report (default benchmarks/README.md; --tiny: README.md in --results)")
    ap.add_argument("--method", default="edgessl")
    ap.add_argument("--backbone", default="mobilenetv3_small")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--device", default="auto", help="gpu suite: auto (cuda when available), cuda or cpu")
    ap.add_argument("--minutes", type=float, default=None, help="gpu suite: the whole budget (default 8; tiny 1)")
    ap.add_argument("--only", type=lambda v: [p for p in v.split(",") if p], default=None,
                    help="gpu, domains and duplicates suites: only these parts, comma-separated (gpu: data, steps, "
                         f"cifar; domains: {', '.join(DOMAIN_PARTS)}; duplicates: encoder epochs, e.g. 30, and scale)")
    ap.add_argument("--teachers", nargs="*", default=None, help="domains suite: teachers' folders (neu-det, emoji)")
    ap.add_argument("--backbones", nargs="*", default=None, help="domains suite: more backbones at 64 px (resnet18)")
    args = ap.parse_args(argv)
    outputs(args)
    if args.suite == "cost-one":
        return cost_one(args)
    if args.suite == "slim-cost":  # re-measure the slim suite's encoders, then regenerate the README
        from benchmarks.report import write_readme
        from benchmarks.slim import recost

        recost(args.results)
        return write_readme(args.results, args.readme)
    args.epochs = args.epochs or (1 if args.tiny else 15)
    if args.tiny:
        args.seeds = 1
    suites = SUITES if args.suite == "all" else () if args.suite == "report" else (args.suite,)
    check_args(args, suites)
    args.results.mkdir(parents=True, exist_ok=True)
    for suite in suites:
        t0 = time.time()
        load_before = list(os.getloadavg())
        with smoke_probe(args.tiny):
            rows = globals()[f"suite_{suite.replace('-', '_')}"](args)
        old = args.results / f"{suite}.json"
        earlier = earlier_rows(old, args.tiny)
        if suite in DATASET_SUITES and args.datasets:  # a partial rerun keeps the other data sets' rows
            rows = [r for r in earlier if r.get("data") not in args.datasets] + rows
        if suite == "duplicates" and args.only and not args.tiny and earlier:  # ... the other encoders' rows
            from benchmarks.duplicates import merged

            rows = merged(rows, earlier)
        if suite in ABLATION_SUITES and args.ablations:  # ... and the other rows
            key = "ablation" if suite == "ablation" else "run"
            rows = [r for r in earlier if r.get(key) not in args.ablations] + rows
            if suite == "teacher":  # in the suite's order; rows of retired labels go
                from benchmarks.teacher import row_order

                rows = sorted((r for r in rows if row_order(r) >= 0), key=row_order)
        command = "python -m benchmarks.run " + shlex.join(argv or sys.argv[1:])
        seconds = time.time() - t0
        partial = earlier and ((suite in DATASET_SUITES and args.datasets)
                               or (suite in ABLATION_SUITES and args.ablations)
                               or (suite == "domains" and not args.tiny)  # it keeps earlier rows (domains.py)
                               or (suite == "duplicates" and args.only and not args.tiny))
        command, seconds, mach = record_head(old if partial else None, command, seconds)
        record = {"suite": suite, "machine": mach, "load_average_before": load_before, "command": command,
                  "epochs": args.epochs, "tiny": args.tiny, "seconds": seconds, "rows": rows}
        (args.results / f"{suite}.json").write_text(json.dumps(record, indent=1) + "\n")
    from benchmarks.report import write_readme

    write_readme(args.results, args.readme)
    print(f"wrote {args.readme}")


if __name__ == "__main__":
    main()
