"""Teacher suite: a large teacher for the price of one forward pass? `python -m benchmarks.run teacher [--tiny]`.

Teacher: resnet18 at 32 px (stride-1 stem) pretrained by edgessl for TEACHER_EPOCHS epochs on a CIFAR-10 subset of
5,000 training images (500 per class), kept in benchmarks/.cache/ (trained by the suite when missing or shorter).
Student: mobilenetv3_small at 32 px on the same 5,000 images for `--epochs` (batch 128, seed 0), trained (RUNS)
  - without a teacher;
  - with the teacher bank only as its initial bank (--bank-init teacher --teacher-weight 0);
  - with the one-pass teacher bank's relational KL only (--bank-init forward);
  - with both (the default of --teacher), and with a cosine loss to the teacher's row through a predictor on top;
  - with the per-step teacher (--teacher-per-step: the teacher run on every crop, as SEED and LightlyTrain do),
    KL only and with the bank initialisation.
Each is evaluated as the accuracy suite does (kNN k=200 and the linear probe at 10 and all labels per class against
the 5,000 CIFAR-10 test images, `--seeds` label subsets); wall time covers the teacher pass and the training.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import run_line

TEACHER_EPOCHS = 30
CACHE = Path(__file__).resolve().parent / ".cache"
RUNS = (
    ("no teacher", {}),
    ("teacher bank as initial bank only", {"teacher": True, "teacher_weight": 0.0, "bank_init": "teacher"}),
    ("one-pass teacher, KL only", {"teacher": True, "bank_init": "forward"}),
    ("one-pass teacher (KL + bank init, the default)", {"teacher": True}),
    ("one-pass teacher + predictor", {"teacher": True, "teacher_predictor": 1.0}),
    ("per-step teacher, KL only", {"teacher": True, "bank_init": "forward", "teacher_per_step": True}),
    ("per-step teacher + bank init", {"teacher": True, "teacher_per_step": True}),
)
ONE_PASS, PER_STEP = "one-pass teacher (KL + bank init, the default)", "per-step teacher + bank init"

TEACHER_ROW = "teacher: resnet18"
TINY_RUNS = ("no teacher", ONE_PASS, PER_STEP)  # --tiny: the rows the summary compares (the others are tested)


def row_order(row: dict[str, Any]) -> int:
    """Where a row sits in the table: the teacher, then RUNS' order; -1 for a label no longer in RUNS."""
    labels = [TEACHER_ROW] + [label for label, _ in RUNS]
    return labels.index(row["run"]) if row["run"] in labels else -1


def teacher_run(train: Path, test: Path, tiny: bool, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The teacher's run directory (trained when missing or shorter than TEACHER_EPOCHS) and its record."""
    import edgessl

    epochs = 1 if tiny else TEACHER_EPOCHS
    run_dir = workdir / "teacher-tiny" if tiny else CACHE / "teacher-resnet18-c5k"
    meta = run_dir / "encoder.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("epochs_trained", 0) < epochs:
        edgessl.pretrain(data=str(train), val=str(test), labels_from_folders=True, backbone="resnet18", image_size=32,
                         epochs=epochs, batch_size=8 if tiny else 128, seed=0, eval_every=5, quiet=True,
                         out=str(run_dir), overwrite=True, threads=_threads(tiny))
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, {"epochs": len(history), "train_seconds": sum(h["seconds"] for h in history),
                     "knn_curve": [(h["epoch"], h["knn_top1_k200"]) for h in history if "knn_top1_k200" in h]}


def _threads(tiny: bool) -> str:
    """Every core for every run (comparable wall times); --tiny: the policy's choice (a smoke run in a test tier
    that runs two at once on two cores)."""
    return "auto" if tiny else str(os.cpu_count())


def forget_teacher_banks(train: Path) -> None:
    """Remove the teacher banks the decoded-image cache keeps for `train` (a previous run's pass)."""
    from edgessl.data.cache import TEACHERS, cache_folder, teacher_entries

    store = cache_folder("auto")
    for entry in teacher_entries(store):
        if entry["root"] == os.path.abspath(train):
            for path in (store.parent / TEACHERS).glob(f"{entry['name']}.*"):
                path.unlink()


def suite_teacher(args) -> list[dict[str, Any]]:
    import edgessl
    from benchmarks.common import final_eval, train_and_eval
    from benchmarks.datasets import cifar10, stratified_subset
    from edgessl.data.folder import load_image_folder

    train, test = cifar10(per_class=500)
    if args.tiny:
        train = stratified_subset(train, 4, 0, "cifar10-train-tiny")
        test = stratified_subset(test, 2, 0, "cifar10-test-tiny")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher, record = teacher_run(train, test, args.tiny, Path(tmp))
        if not args.ablations or TEACHER_ROW in args.ablations:
            train_set, test_set = load_image_folder(train, 32, labels=True), load_image_folder(test, 32, labels=True)
            rows.append({"run": TEACHER_ROW, **record, "load_average_1min": os.getloadavg()[0],
                         "final": final_eval(edgessl.load_encoder(teacher), train_set, test_set, "teacher",
                                             args.seeds)})
        for label, extra in RUNS:
            if (args.ablations and label not in args.ablations) or (args.tiny and label not in TINY_RUNS):
                continue
            overrides = {**extra, **({"teacher": str(teacher)} if extra.get("teacher") else {}),
                         "threads": _threads(args.tiny)}
            forget_teacher_banks(train)  # every run pays its own teacher pass: honest wall times
            load = os.getloadavg()[0]
            res = train_and_eval("edgessl", train, test, "mobilenetv3_small", 32, args.epochs, 0, args.seeds,
                                 args.tiny, overrides, Path(tmp), eval_every=args.epochs)
            res["overrides"] = {k: ("RUN" if k == "teacher" else v) for k, v in overrides.items()}
            rows.append({"run": label, "load_average_1min": load, **res})
            print(f"teacher {label}: {json.dumps({k: round(v['mean'], 4) for k, v in res['final'].items()})} "
                  f"wall {res['wall_s']:.0f} s", flush=True)
    return rows


def _row_summary(rec: dict[str, Any]) -> dict[str, Any]:
    """Gains over no teacher, the share of the per-step gain the one-pass teacher keeps, and cost ratios."""
    by = {r["run"]: r for r in rec["rows"]}
    base, one, step = by["no teacher"], by[ONE_PASS], by[PER_STEP]
    out = {}
    for key in ("knn@all", "linear@10", "linear@all"):
        if key not in base["final"]:
            continue
        g1 = one["final"][key]["mean"] - base["final"][key]["mean"]
        gs = step["final"][key]["mean"] - base["final"][key]["mean"]
        out[key] = {"gain_one_pass": g1, "gain_per_step": gs, "kept": g1 / gs if gs > 0 else None}
    out["cost_one_pass"] = one["wall_s"] / base["wall_s"]
    out["pass_share"] = next((h["teacher_pass_seconds"] for h in one["history"] if "teacher_pass_seconds" in h),
                             0.0) / one["wall_s"]
    out["cost_per_step"] = step["wall_s"] / base["wall_s"]
    return out


def teacher_section(rec: dict[str, Any]) -> str:
    t = rec["rows"][0]
    out = ["## Teacher: one pass of a large teacher vs a teacher on every step\n",
           f"{run_line(rec)}. Teacher: resnet18 at 32 px pretrained by edgessl for {t['epochs']} epochs "
           f"({t['train_seconds'] / 60:.0f} min) on 5,000 CIFAR-10 training images. Student: mobilenetv3_small at "
           f"32 px, {rec['epochs']} epochs on the same images, batch 128, seed 0. kNN (k = 200) and linear probe at "
           "10 and all labels per class against the 5,000 test images (mean of the label-subset seeds); wall time "
           "from start to the last epoch, teacher pass and bank initialisation included.\n",
           "| run | kNN | linear @10 | linear @all | wall s | teacher pass s | vs no teacher |",
           "|---|---|---|---|---|---|---|"]
    base = next((r["wall_s"] for r in rec["rows"] if r["run"] == "no teacher"), None)
    for r in rec["rows"]:
        f, wall = r["final"], r.get("wall_s")
        cells = [f"{f[k]['mean']:.3f}" if k in f else "-" for k in ("knn@all", "linear@10", "linear@all")]
        pass_s = next((h["teacher_pass_seconds"] for h in r.get("history", []) if "teacher_pass_seconds" in h), None)
        cells += [f"{wall:.0f}" if wall else "-", f"{pass_s:.1f}" if pass_s is not None else "-",
                  f"{wall / base:.2f}x" if wall and base else "-"]
        out.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    if all(any(r["run"] == n for r in rec["rows"]) for n in ("no teacher", ONE_PASS, PER_STEP)):
        s = _row_summary(rec)
        kept = ", ".join(f"{k} {v['kept']:.0%}" if v["kept"] is not None
                         else f"{k} - (no per-step gain)" for k, v in s.items()
                         if isinstance(v, dict))
        out += ["", f"Share of the per-step teacher's gain the one-pass teacher keeps (the default against the "
                f"per-step teacher with the same bank initialisation): {kept}. Cost over no teacher: one pass "
                f"{s['cost_one_pass']:.2f}x (its teacher pass is {s['pass_share']:.0%} of its wall time), per step "
                f"{s['cost_per_step']:.2f}x."]
    return "\n".join(out) + "\n"
