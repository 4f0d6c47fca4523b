"""Domains suite: which resolution and how many epochs fit a folder, on a real domain (NEU-DET steel scans) with emoji
for contrast. `python -m benchmarks.run domains [--only epochs,sizes,peers] [--image-size S --epochs E] [--tiny]`.

Parts (each row is kept in domains.json until a rerun of the same row replaces it):
  epochs  edgessl, mobilenetv3_small at 64 px, trained for 15, 30 and 60 epochs on NEU-DET and on emoji (each a
          run of its own length, cosine schedule): the final kNN / linear probe per length and the kNN curve every
          5 epochs, so "how long" reads off where the lengths stop paying;
  sizes   edgessl on NEU-DET at 96 and 128 px for 15 epochs (64 px: the epochs part's 15-epoch row), and each size
          with random weights; resnet18 at 64 px beside them (--backbones; its run is kept in benchmarks/.cache as
          the teacher suite's "trained on this folder" teacher);
  peers   at --image-size and --epochs (what `auto` picks for NEU-DET): lightly's SimCLR at equal epochs (training
          seeds PEER_SEEDS; edgessl's other seeds are the temperature part's) and at equal wall-clock (the epochs its
          s/epoch allows in edgessl's time, each of PEER_SEEDS, measured again on each run), and a supervised run
          with all labels (the ceiling); the other rows kept in domains.json are not run again (remove them to
          measure again);
  teacher resnet18 teachers trained on NEU-DET and on emoji, distilled into the 64 px student (--teachers);
  temperature  edgessl at tau 0.1 and 0.2 on NEU-DET, emoji, CIFAR-10 subsets (500 and 150 per class), the first
          one's greyscale twin, scikit-learn's digits and Twemoji (another vendor's emoji, fetched from the npm
          registry; not in --tiny): two folders no rule was tuned on; each at the size and epochs `auto` picks
          for it (the real rule on the real folder), training seeds TEMPERATURE_SETS, with the folder's look-alike
          score: whether a softer instance loss pays, and whether `--temperature auto` (the
          score against its threshold) predicts it;
  bank    the bank's step size eta (--bank-lr) and width d (--feature-dim) against eta 1 and d 128: each
          setting of BANK_SETTINGS on the folders of BANK_SETS (tau 0.2 under `auto`: NEU-DET, emoji, digits,
          Twemoji), each at the size and epochs `auto` picks, training seeds of BANK_SETS; the old defaults (eta 1,
          d 128) run again on the folders of BANK_AGAIN, else the temperature part's tau 0.2 rows stand for them.
Every row: kNN (k = 200) and the linear probe at 10 and all labels per class on the test split (--seeds label
subsets), wall seconds, s/epoch, the load average before it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

LENGTHS = (15, 30, 60)
SIZES = (64, 96, 128)
SIZE_EPOCHS = 15
PARTS = ("epochs", "sizes", "peers", "teacher", "temperature", "bank")
TEMPERATURES = (0.1, 0.2)
PEER_SEEDS = (0, 1, 2, 3, 4)  # SimCLR's training seeds at equal epochs (--tiny: the first)
TEMPERATURE_SETS = {"neu-det": (0, 1, 2, 3, 4), "emoji": (0, 1), "cifar10-5k": (0, 1), "cifar10-5k-grey": (0,),  # seeds
                    "cifar10-1.5k": (0, 1), "digits": (0, 1), "twemoji": (0, 1)}
FETCHED = {"twemoji"}  # downloaded from the npm registry on first use: left out of --tiny (the tests never download)
BANK_SETTINGS = ({"bank_lr": 0.5}, {"feature_dim": 256})  # d 256 at the default eta of its day (NEU-DET's rows: 1,
# before --bank-lr auto; the other folders': auto's 0.5); the table names each row's eta as its run recorded it
OLD_DEFAULTS = {"bank_lr": 1.0}  # eta before `--bank-lr auto` (d 128 still is the default)
BANK_AGAIN = {"emoji", "digits", "twemoji"}  # their temperature-part rows predate channels_last steps: the old
# defaults run again in the bank part (NEU-DET's tau 0.2 rows are today's code: seeds 1, 2 reproduced to the digit)
BANK_SETS = {"emoji": (0, 1), "digits": (0, 1), "twemoji": (0, 1), "neu-det": (0, 1, 2, 3, 4)}  # training seeds
CIFAR_SUBSETS = {"cifar10-5k": 500, "cifar10-1.5k": 150}  # images per class
TEACHERS = ("neu-det", "emoji")  # resnet18 teachers at 64 px for SIZE_EPOCHS epochs: on the folder, on another one
KEPT = Path(__file__).resolve().parent / ".cache" / "domains-runs"  # runs other suites reuse (the NEU-DET teacher)


def folders(name: str, tiny: bool) -> tuple[Path, Path]:
    """(train, test) folders of one of the suite's data sets (--tiny: 3 train and 2 test images per class)."""
    from benchmarks.datasets import cifar10, digits, emoji, greyscale_copy, neu_det, stratified_subset, twemoji

    base = name.removesuffix("-grey")
    if base in CIFAR_SUBSETS:
        train, test = cifar10(per_class=CIFAR_SUBSETS[base])
    else:
        train, test = {"neu-det": neu_det, "emoji": emoji, "digits": digits, "twemoji": twemoji}[base]()
    if tiny:
        train, test = (stratified_subset(train, 3, 0, f"{base}-train-tiny"),
                       stratified_subset(test, 2, 0, f"{base}-test-tiny"))
    if name.endswith("-grey"):
        tag = "-tiny" if tiny else ""
        train, test = greyscale_copy(train, f"{name}-train{tag}"), greyscale_copy(test, f"{name}-test{tag}")
    return train, test


def auto_settings(train: Path) -> tuple[int, int, int]:
    """(image size, epochs) that `edgessl pretrain --data train` picks on a CPU, and the number of images."""
    from edgessl.data.auto import choose_epochs, choose_image_size, header_sizes
    from edgessl.data.signature import scan_images

    paths = scan_images(train)
    return choose_image_size(header_sizes(paths)).value, choose_epochs(len(paths)).value, len(paths)


def plan(args) -> list[dict[str, Any]]:
    """The rows to run: label, data, backbone, size, method, epochs (None: chosen from another row)."""
    parts = args.only or PARTS
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"domains: --only takes parts of {', '.join(PARTS)}, not {','.join(unknown)}")
    lengths, sizes = ((1, 2), (32, 48)) if args.tiny else (LENGTHS, SIZES)
    size_epochs = 1 if args.tiny else SIZE_EPOCHS
    rows = []
    if "epochs" in parts:
        rows += [{"part": "epochs", "data": d, "backbone": "mobilenetv3_small", "size": sizes[0], "method": "edgessl",
                  "epochs": e} for d in ("neu-det", "emoji") for e in lengths]
    if "sizes" in parts:
        for s in sizes:
            if s != sizes[0] or "epochs" not in parts:
                rows.append({"part": "sizes", "data": "neu-det", "backbone": "mobilenetv3_small", "size": s,
                             "method": "edgessl", "epochs": size_epochs, "reuse": True})
            rows.append({"part": "sizes", "data": "neu-det", "backbone": "mobilenetv3_small", "size": s,
                         "method": "random", "epochs": 0})
        for b in args.backbones or ():
            rows += [{"part": "sizes", "data": "neu-det", "backbone": b, "size": sizes[0], "method": m, "epochs": e,
                      "reuse": True} for m, e in (("edgessl", size_epochs), ("random", 0))]
    if "peers" in parts:
        size, epochs = (sizes[0], 1) if args.tiny else (args.image_size, args.epochs)
        base = {"part": "peers", "data": "neu-det", "backbone": "mobilenetv3_small", "size": size}
        seeds = PEER_SEEDS[:1] if args.tiny else PEER_SEEDS
        rows += [{**base, "method": m, "epochs": epochs, "reuse": True} for m in ("edgessl", "supervised")]
        rows += [{**base, "method": "simclr", "epochs": epochs, "reuse": True, **({"seed": s} if s else {})}
                 for s in seeds]
        rows += [{**base, "method": "simclr", "epochs": None, "budget_of": "edgessl", **({"seed": s} if s else {})}
                 for s in seeds]  # measured again on each run
    if "teacher" in parts:
        size, epochs = sizes[0], size_epochs
        base = {"part": "teacher", "data": "neu-det", "backbone": "mobilenetv3_small", "size": size}
        teachers = args.teachers or TEACHERS
        rows += [{"part": "teacher", "data": t, "backbone": "resnet18", "size": size, "method": "edgessl",
                  "epochs": epochs, "reuse": True} for t in teachers]  # trained unless an earlier part did
        rows += [{**base, "method": "edgessl", "epochs": epochs, "teacher": t} for t in teachers]
    if "temperature" in parts:
        rows += temperature_plan(args.tiny)
    if "bank" in parts:
        rows += bank_plan(args.tiny)
    return rows


def at_auto(sets: dict[str, tuple[int, ...]], part: str, tiny: bool):
    """(row base, training seeds) of each folder of `sets` ({name: seeds}) at the size and epochs `auto` picks
    there; --tiny: 32 px, one epoch, the first seed, no fetched folder."""
    for name, seeds in sets.items():
        if tiny and name in FETCHED:
            continue
        size, epochs = (32, 1) if tiny else auto_settings(folders(name, tiny)[0])[:2]
        yield ({"part": part, "data": name, "backbone": "mobilenetv3_small", "size": size, "method": "edgessl",
                "epochs": epochs}, seeds[:1] if tiny else seeds)


def bank_plan(tiny: bool) -> list[dict[str, Any]]:
    return [{**base, "overrides": o, "seed": seed, "reuse": True} for base, seeds in at_auto(BANK_SETS, "bank", tiny)
            for o in (BANK_SETTINGS[:1] if tiny else (OLD_DEFAULTS,) * (base["data"] in BANK_AGAIN) + BANK_SETTINGS)
            for seed in seeds]


def temperature_plan(tiny: bool) -> list[dict[str, Any]]:
    return [{**base, "temperature": t, "seed": seed, "reuse": True}
            for base, seeds in at_auto(TEMPERATURE_SETS, "temperature", tiny) for t in TEMPERATURES for seed in seeds]


def kept_run(data_name: str, backbone: str, kept: Path = KEPT) -> Path:
    """The kept run directory of `backbone` trained on `data_name` (its config.yaml names the folder)."""
    import yaml

    for cfg in sorted(kept.glob("*/config.yaml")):
        c = yaml.safe_load(cfg.read_text())
        if c["backbone"] == backbone and data_name in c["data"]:
            return cfg.parent
    raise FileNotFoundError(f"no kept {backbone} run on {data_name} in {kept}: run the sizes/teacher parts first")


def teacher_eval(run_dir: Path, train: Path, test: Path, size: int, seeds: int) -> dict[str, Any]:
    """The teacher's own kNN / linear probe on the student's folder (its features, the student's images)."""
    import edgessl
    from benchmarks.common import final_eval

    train_set, test_set = labelled_splits(train, test, size)
    return final_eval(edgessl.load_encoder(run_dir), train_set, test_set, "teacher", seeds)


def labelled_splits(train: Path, test: Path, size: int):
    """The train and test folders decoded at `size` with their folder labels (the two ImageSets final_eval takes)."""
    from edgessl.data.folder import load_image_folder

    return load_image_folder(train, size, labels=True), load_image_folder(test, size, labels=True)


def label(row: dict[str, Any]) -> str:
    budget = " (edgessl's time)" if row.get("budget_of") else ""
    teacher = f" teacher {row['teacher']} resnet18" if row.get("teacher") else ""
    seed = f" seed {row['seed']}" if row.get("seed") or "temperature" in row or "overrides" in row else ""
    tau = f" tau {row['temperature']:g}{seed}" if "temperature" in row else seed
    knobs = "".join(f" {k} {v:g}" for k, v in row.get("overrides", {}).items())
    return (f"{row['data']} {row['backbone']} {row['size']}px {row['method']} {row['epochs']}ep{budget}{teacher}"
            f"{knobs}{tau}")


def random_row(train: Path, test: Path, backbone: str, size: int, seeds: int) -> dict[str, Any]:
    from benchmarks.common import final_eval
    from benchmarks.peers import build

    train_set, test_set = labelled_splits(train, test, size)
    model, _ = build("supervised", backbone, size, len(train_set.classes))
    return {"n_train": len(train_set), "n_test": len(test_set), "wall_s": 0.0, "s_per_epoch": 0.0, "history": [],
            "final": final_eval(model.backbone.eval(), train_set, test_set, "random", seeds)}


def run_row(row: dict[str, Any], done: list[dict[str, Any]], args, workdir: Path) -> dict[str, Any]:
    from benchmarks.common import train_and_eval

    train, test = folders(row["data"], args.tiny)
    if row.get("budget_of"):  # SimCLR (each seed) for the time edgessl took at the same size and epochs (its default
        # run: not a temperature or teacher row)
        ref = next(r for r in done if r["method"] == row["budget_of"] and r["size"] == row["size"]
                   and r["backbone"] == row["backbone"] and r["data"] == row["data"] and r["epochs"] == args.epochs
                   and part_of(r) != "temperature" and not r.get("teacher"))
        own = next(r for r in done if r["method"] == row["method"] and r["size"] == row["size"]
                   and r["epochs"] == ref["epochs"] and not r.get("budget_of") and not r.get("seed"))
        row = {**row, "epochs": max(1, round(ref["wall_s"] / (own["wall_s"] / own["epochs"]))),
               "budget_s": ref["wall_s"]}
    load = os.getloadavg()[0]
    if row["method"] == "random":
        result = random_row(train, test, row["backbone"], row["size"], args.seeds)
    else:
        every = 1 if args.tiny else 5
        keep = row["backbone"] == "resnet18" and row["method"] == "edgessl"
        kept = workdir / "kept" if args.tiny else KEPT
        teacher = {"teacher": str(kept_run(row["teacher"], "resnet18", kept))} if row.get("teacher") else None
        overrides = {**(teacher or {}), **({"temperature": row["temperature"]} if "temperature" in row else {}),
                     **row.get("overrides", {})}
        result = train_and_eval(row["method"], train, test, row["backbone"], row["size"], row["epochs"],
                                row.get("seed", 0), args.seeds, args.tiny, overrides or None,
                                workdir=kept if keep else workdir, eval_every=every)
        result = {k: v for k, v in result.items() if k not in ("method", "data", "backbone", "epochs")}
        if teacher:
            result["teacher_on_folder"] = teacher_eval(Path(teacher["teacher"]), train, test, row["size"], args.seeds)
        if row["method"] == "edgessl":
            result["lookalike"] = lookalike_of(train, row["size"])
    out = {**row, "row": label(row), "load_average_1min": load, **result}
    print(f"domains {out['row']}: linear@10 {out['final']['linear@10']['mean']:.3f} "
          f"kNN@all {out['final']['knn@all']['mean']:.3f} ({out['wall_s']:.0f} s)", flush=True)
    return out


def lookalike_of(train: Path, size: int) -> float:
    """The folder's look-alike score at `size` px, which `--temperature auto` reads (edgessl.data.lookalike)."""
    from edgessl.data.folder import load_image_folder
    from edgessl.data.lookalike import lookalike_score

    return lookalike_score(load_image_folder(train, size))


def suite_domains(args) -> list[dict[str, Any]]:
    import tempfile

    done: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgessl-domains-") as tmp:
        for row in plan(args):
            earlier = earlier_rows(args)
            if row.pop("reuse", False) and any(r["row"] == label(row) for r in done + earlier):
                continue  # edgessl at these settings ran already (an earlier part or run)
            done.append(run_row(row, done + earlier, args, Path(tmp)))
            save_partial(args, done)
    rows = merged(earlier_rows(args), done)
    (args.results / "domains.partial.json").unlink(missing_ok=True)  # the runner writes them to domains.json now
    return rows


def earlier_rows(args) -> list[dict[str, Any]]:
    """Rows of earlier runs of the suite (domains.json), and of this run so far (domains.partial.json)."""
    if args.tiny:
        return []
    rows = []
    for name in ("domains.json", "domains.partial.json"):
        path = args.results / name
        rows = merged(rows, json.loads(path.read_text())["rows"] if path.exists() else [])
    return rows


def merged(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fresh = {r["row"] for r in new}
    return [r for r in old if r["row"] not in fresh] + new


def save_partial(args, done: list[dict[str, Any]]) -> None:
    """Each finished row at once (a stopped run keeps them; the runner writes domains.json at the end)."""
    if not args.tiny:
        path = args.results / "domains.partial.json"
        (path.parent / (path.name + ".tmp")).write_text(json.dumps({"rows": merged(earlier_rows(args), done)}) + "\n")
        (path.parent / (path.name + ".tmp")).replace(path)


# ---------------------------------------------------------------- the README section
def _cells(r: dict[str, Any]) -> str:
    f = r["final"]

    def ms(key: str) -> str:
        return f"{f[key]['mean']:.3f} ± {f[key]['std']:.3f}" if key in f else "–"

    return (f"{r['s_per_epoch']:.1f} | {r['wall_s'] / 60:.1f} | {ms('knn@10')} | {ms('linear@10')} | {ms('knn@all')} | "
            f"{ms('linear@all')} |")


def part_of(r: dict[str, Any]) -> str:
    """The row's part (rows of the first run carry none: its epochs part was the 64 px mobilenetv3_small edgessl
    rows)."""
    if "part" in r:
        return r["part"]
    return "epochs" if (r["method"], r["size"], r["backbone"]) == ("edgessl", 64, "mobilenetv3_small") else "sizes"


HEAD = "| s/epoch | train min | kNN@10 | linear@10 | kNN@all | linear@all |"


def _rule(header: str) -> str:
    """The Markdown separator row of a table header: one |---| per column."""
    return "|" + "---|" * (header.count("|") - 1)


def cached_train(name: str) -> Path:
    """Where a data set's training folder lies in the cache once a run has made it (nothing is extracted here)."""
    from benchmarks.datasets import CACHE

    base = name.removesuffix("-grey")
    if name.endswith("-grey"):
        return CACHE / "subsets" / f"{name}-train"
    if base in CIFAR_SUBSETS:
        return CACHE / "subsets" / f"cifar10-train-{CIFAR_SUBSETS[base]}pc-s0"
    return CACHE / {"neu-det": "neu-det", "emoji": "emoji-google"}.get(base, base) / "train"


def train_folder(name: str) -> Path | None:
    """A data set's training folder for the report's `auto` rules: the cached one, else extracted from the shared
    data as the suite would (never downloaded); None when neither is here."""
    from benchmarks.datasets import SharedDataMissing

    if cached_train(name).is_dir():
        return cached_train(name)
    if name.removesuffix("-grey") in FETCHED:
        return None
    try:
        return folders(name, False)[0]
    except SharedDataMissing as e:
        print(f"report: {name}: {e}", file=sys.stderr)
        return None


def tau_of(r: dict[str, Any]) -> float:
    """The temperature a row trained at (rows from before the temperature rule ran at 0.1)."""
    return r.get("temperature", r.get("tau", 0.1))


def knobs_of(r: dict[str, Any]) -> tuple[float, int]:
    """(eta, d) a row trained with: what its run recorded, else its overrides, else the defaults of its time (1, 128;
    --bank-lr auto came on 2026-12-07 with the bank part, whose rows name their eta)."""
    own = r.get("overrides") or {}
    return float(r.get("bank_lr", own.get("bank_lr", 1.0))), int(r.get("feature_dim", own.get("feature_dim", 128)))


Setting = tuple[int, int, float, float, int]  # size, epochs, tau, eta, d


def setting_means(rows: list[dict[str, Any]]) -> dict[Setting, tuple[float, int]]:
    """{(size, epochs, tau, eta, d): (mean linear@10 over its training seeds, seeds)}; a seed counted once."""
    runs = {(r["size"], r["epochs"], tau_of(r), *knobs_of(r), r.get("seed", 0)): r["final"]["linear@10"]["mean"]
            for r in rows}
    groups: dict[Setting, list[float]] = {}
    for (*key, _), value in runs.items():
        groups.setdefault(tuple(key), []).append(value)
    return {k: (sum(v) / len(v), len(v)) for k, v in groups.items()}


def auto_rows(rows: list[dict[str, Any]]) -> list[str]:
    """What `auto` picks for each data set of the suite (the real rules on the real folder: size, epochs and, from
    the recorded look-alike score, tau and from it eta) and where it lands against the best setting run on that data
    set with the same backbone (linear@10, mean over training seeds; the bank part's settings count too)."""
    from edgessl.data.lookalike import LOOKALIKE_SAMPLE, choose_temperature
    from edgessl.method.bank import auto_bank_lr

    out = ["| data | images | auto: size, epochs, τ, η | its setting: linear@10 | best setting: linear@10 | "
           "auto − best |", "|---|---|---|---|---|---|"]
    for name in sorted({r["data"] for r in rows}):
        same = [r for r in rows if r["data"] == name and r["backbone"] == "mobilenetv3_small"
                and r["method"] == "edgessl" and not r.get("teacher")]
        scores = [r["lookalike"] for r in same if "lookalike" in r]
        if not same or not scores:
            continue
        folder = train_folder(name)
        if folder is None:
            out.append(f"| {name} | – | its training folder is not here (the shared data, or {name} fetched once "
                       "by the suite) | – | – | – |")
            continue
        size, epochs, n = auto_settings(folder)
        tau = choose_temperature(scores[0], min(n, LOOKALIKE_SAMPLE)).value  # as pretrain on a folder of n
        eta = auto_bank_lr(tau)
        means = setting_means(same)
        best = max(means, key=lambda k: means[k][0])
        mine = [k for k in means if k[0] == size and k[2] == tau and abs(k[3] - eta) < 1e-9 and k[4] == 128
                and abs(k[1] - epochs) <= 0.25 * epochs]
        mine_text = f"{_setting(mine[0], means)}" if mine else "not run"
        gap = f"{means[mine[0]][0] - means[best][0]:+.3f}" if mine else "–"
        out.append(f"| {name} | {n:,} | {size} px, {epochs} ep, τ {tau:g}, η {eta:g} | {mine_text} | "
                   f"{_setting(best, means)} | {gap} |")
    return out


def _setting(key: Setting, means: dict[Setting, tuple[float, int]]) -> str:
    seeds = f", {means[key][1]} seeds" if means[key][1] > 1 else ""
    width = f", d {key[4]}" if key[4] != 128 else ""
    return f"{means[key][0]:.3f} ({key[0]} px, {key[1]} ep, τ {key[2]:g}, η {key[3]:g}{width}{seeds})"


def temperature_rows(rows: list[dict[str, Any]]) -> list[str]:
    """The temperature part: every run, then per data set the mean change from tau 0.1 to 0.2 over its seeds."""
    runs = [r for r in rows if part_of(r) == "temperature"]
    if not runs:
        return []
    head = "| data | px | epochs | τ | training seed " + HEAD
    out = ["", "### Temperature: τ 0.1 against 0.2, each folder at the size and epochs `auto` picks; the look-alike "
           "score `--temperature auto` reads (edgessl/data/lookalike.py) and what it picks\n",
           head, _rule(head)]
    for r in sorted(runs, key=lambda r: (r["data"], r["size"], r["temperature"], r["seed"])):
        out.append(f"| {r['data']} | {r['size']} | {r['epochs']} | {r['temperature']:g} | {r['seed']} | {_cells(r)}")
    from edgessl.data.lookalike import choose_temperature

    keys = ("linear@10", "knn@10", "knn@all", "linear@all")
    head = ("| data | px | seeds | look-alike score | `auto` picks | "
            + " | ".join(f"Δ {k} (0.2 − 0.1)" for k in keys) + " |")
    out += ["", head, _rule(head)]
    for name, size in sorted({(r["data"], r["size"]) for r in runs}):
        mine = [r for r in runs if r["data"] == name and r["size"] == size]
        seeds = len({r["seed"] for r in mine})
        score = mine[0].get("lookalike")
        picks = f"{score:.3f} | τ {choose_temperature(score).value:g}" if score is not None else "– | –"
        out.append(f"| {name} | {size} | {seeds} | {picks} | " + " | ".join(
            f"{_mean_at(mine, 0.2, k) - _mean_at(mine, 0.1, k):+.3f}" for k in keys) + " |")
    return out


def bank_rows(rows: list[dict[str, Any]]) -> list[str]:
    """The bank part: per folder, eta 1 and d 128 (its rows in this part, else the temperature part's tau 0.2 rows)
    and each setting: linear@10 per training seed, the means, and the change against eta 1 on the same seeds."""
    runs = [r for r in rows if part_of(r) == "bank"]
    if not runs:
        return []
    head = "| data | px, epochs | setting | linear@10 per training seed | mean | Δ | kNN@all | linear@all |"
    out = ["", "### The bank's step size and width (`--bank-lr`, `--feature-dim`)\n",
           "η 1 was the default until 2026-12-07; `auto` now takes 0.1 / τ (0.5 at τ 0.2); d 128 is the default. Each "
           "folder at the size, epochs and τ (0.2) `auto` picks; Δ: the change in the mean linear@10 against η 1, "
           "d 128 on the same training seeds; each row's η as its run recorded it.\n", head, _rule(head)]
    for name in sorted({r["data"] for r in runs}):
        mine = [r for r in runs if r["data"] == name]
        size, epochs = mine[0]["size"], mine[0]["epochs"]
        seeds = sorted({r["seed"] for r in mine})
        base = {r["seed"]: r for r in mine if r["overrides"] == OLD_DEFAULTS}  # run again here, else the
        where = "this part"  # temperature part's tau 0.2 rows (which ran with eta 1)
        if not base:
            where, base = "temperature part", {r.get("seed", 0): r for r in rows if part_of(r) == "temperature"
                                               and r["data"] == name and r["size"] == size and r["epochs"] == epochs
                                               and r["temperature"] == 0.2}
        settings = [(f"η 1, d 128 (the old defaults; {where})", base)]
        for o in sorted({json.dumps(r["overrides"], sort_keys=True) for r in mine if r["overrides"] != OLD_DEFAULTS}):
            group = {r["seed"]: r for r in mine if json.dumps(r["overrides"], sort_keys=True) == o}
            eta, width = knobs_of(next(iter(group.values())))  # as the run recorded it (auto resolved)
            settings.append((f"η {eta:g}" + (f", d {width}" if width != 128 else ""), group))
        for text, by_seed in settings:
            both = [s for s in seeds if s in by_seed and s in base]
            vals = [by_seed[s]["final"]["linear@10"]["mean"] for s in both]
            if not vals:
                continue
            delta = _seed_mean(by_seed, both, "linear@10") - _seed_mean(base, both, "linear@10")
            out.append(f"| {name} | {size} px, {epochs} ep | {text} | {', '.join(f'{v:.3f}' for v in vals)} | "
                       f"{sum(vals) / len(vals):.3f} | {delta:+.3f} | {_seed_mean(by_seed, both, 'knn@all'):.3f} | "
                       f"{_seed_mean(by_seed, both, 'linear@all'):.3f} |")
    return out


def _seed_mean(by_seed: dict[int, dict[str, Any]], seeds: list[int], key: str) -> float:
    """The mean of the final `key` over the rows of `seeds` ({training seed: row})."""
    return sum(by_seed[s]["final"][key]["mean"] for s in seeds) / len(seeds)


def _mean_at(runs: list[dict[str, Any]], tau: float, key: str) -> float:
    """The mean of `key` over the runs at temperature `tau` (their training seeds)."""
    vals = [r["final"][key]["mean"] for r in runs if r["temperature"] == tau]
    return sum(vals) / max(len(vals), 1)


def curves_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["data"] for r in rows if part_of(r) == "epochs"})
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(5 * (len(names) + 1), 3.6), squeeze=False)
    axes = axes[0]  # one row of axes, also when no data set has curves
    for ax, name in zip(axes, names, strict=False):
        for r in rows:
            if r["data"] != name or part_of(r) != "epochs":
                continue
            pts = [(h["epoch"], h["knn_top1_k200"]) for h in r["history"] if h.get("knn_top1_k200") is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{r['epochs']}-epoch run")
        ax.set_title(f"{name}: kNN vs epoch per run length")
    for r in (r for r in rows if part_of(r) == "peers" and not r.get("seed")):  # training seed 0 of each
        pts = [(h["seconds"], h.get("knn_top1_k200")) for h in r["history"]]
        cum, acc = 0.0, []
        for sec, knn in pts:
            cum += sec
            if knn is not None:
                acc.append((cum, knn))
        if acc:
            axes[-1].plot(*zip(*acc, strict=True), marker=".", label=f"{r['method']} {r['size']} px {r['epochs']} ep")
    axes[-1].set_title("neu-det: kNN vs training seconds (training seed 0)")
    for ax in axes:
        ax.set_ylabel("kNN top-1 (k=200)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("training seconds")
    for ax in axes[:-1]:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def peer_rows(rows: list[dict[str, Any]]) -> list[str]:
    """One table per size the peers part ran at: edgessl (its temperature part's seeds too, and the bank part's at
    the eta `auto` takes), SimCLR at equal epochs and at equal wall-clock, random weights, the supervised ceiling."""
    from edgessl.method.bank import auto_bank_lr

    out = []
    for size in sorted({r["size"] for r in rows if part_of(r) == "peers"}):
        peers = [r for r in rows if part_of(r) == "peers" and r["size"] == size]
        same = {p["epochs"] for p in peers if not p.get("budget_s")}
        mine = [r for r in rows if r["data"] == "neu-det" and r["size"] == size and r["backbone"] == "mobilenetv3_small"
                and (part_of(r) != "bank" or knobs_of(r) == (auto_bank_lr(tau_of(r)), 128))  # the bank part's
                and (r["method"] == "random" or (r["method"] == "edgessl" and r["epochs"] in same))]  # auto eta
        out += ["", f"### Against SimCLR, random weights and the supervised ceiling (NEU-DET, {size} px)\n",
                "| method | epochs " + HEAD, _rule("| method | epochs " + HEAD)]
        for r in sorted({r["row"]: r for r in mine + peers}.values(),
                        key=lambda r: (r["method"], r["epochs"], r.get("temperature", 0), part_of(r) == "bank",
                                       r.get("seed", 0))):
            budget = f" (edgessl's {r['budget_s']:.0f} s)" if r.get("budget_s") else ""
            seed = f", seed {r['seed']}" if r.get("seed") or "temperature" in r or part_of(r) == "bank" else ""
            tau = f", τ {r['temperature']:g}{seed} (temperature part)" if "temperature" in r else seed
            tau += f" (auto: τ {r['tau']:g})" if "temperature" not in r and "tau" in r else ""
            tau += f", η {knobs_of(r)[0]:g}" if r["method"] == "edgessl" else ""
            tau += " (bank part)" if part_of(r) == "bank" else ""
            out.append(f"| {r['method']}{budget}{tau} | {r['epochs']} | {_cells(r)}")
    return out


def domains_section(rec: dict[str, Any], results: Path) -> str:
    rows = rec["rows"]
    m = rec["machine"]
    out = ["## Domains: resolution and length from the folder (NEU-DET steel scans, emoji)\n",
           f"{m.get('cpu')}, torch {m.get('torch')}, lightly {m.get('lightly', '–')}, edgessl {m.get('edgessl')}, "
           f"{m.get('date')}; `{rec['command']}`; {rec['seconds'] / 60:.0f} min"
           + (f" ({m['note']})" if m.get("note") else "") + "; batch 128, seed 0 (the temperature "
           "part: the training seeds in its table), each row's load "
           "average in domains.json. Metrics on the test split: kNN (k = 200) and the linear probe at 10 labels per "
           "class (mean ± std over 3 label subsets) and all labels. edgessl rows use the folder's greyscale "
           "handling (NEU-DET: colour-only augmentations off); SimCLR (lightly) and supervised use the default "
           "colour augmentation.\n", "### How long: one run per length (mobilenetv3_small, 64 px, cosine schedule)\n",
           "| data | epochs | image views " + HEAD, "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if part_of(r) == "epochs"), key=lambda r: (r["data"], r["epochs"])):
        out.append(f"| {r['data']} | {r['epochs']} | {r['epochs'] * r['n_train']:,} | {_cells(r)}")
    out += ["", "### Which resolution, which backbone (NEU-DET)\n", "| backbone | px | method | epochs " + HEAD,
            "|---|---|---|---|---|---|---|---|---|---|"]
    first = min((r["epochs"] for r in rows if part_of(r) == "epochs"), default=0)
    for r in sorted((r for r in rows if r["data"] == "neu-det" and (part_of(r) == "sizes" or (
                    part_of(r) == "epochs" and r["epochs"] == first))),
                    key=lambda r: (r["backbone"], r["size"], r["method"])):
        out.append(f"| {r['backbone']} | {r['size']} | {r['method']} | {r['epochs']} | {_cells(r)}")
    out += peer_rows(rows)
    taught = [r for r in rows if part_of(r) == "teacher" and r.get("teacher")]
    if taught:
        base = [r for r in rows if part_of(r) == "epochs" and r["data"] == "neu-det"
                and r["epochs"] == taught[0]["epochs"]]
        out += ["", f"### When the teacher pays (NEU-DET student: mobilenetv3_small, {taught[0]['size']} px, "
                f"{taught[0]['epochs']} epochs; teachers: resnet18, same size and epochs, `--teacher RUN`)\n",
                "| teacher | its kNN@all on NEU-DET | its linear@10 on NEU-DET " + HEAD,
                _rule("| teacher | its kNN@all on NEU-DET | its linear@10 on NEU-DET " + HEAD)]
        for r in base + taught:
            t = r.get("teacher_on_folder")
            own = f"{t['knn@all']['mean']:.3f} | {t['linear@10']['mean']:.3f}" if t else "– | –"
            out.append(f"| {('trained on ' + r['teacher']) if r.get('teacher') else 'none'} | {own} | {_cells(r)}")
    out += temperature_rows(rows)
    out += bank_rows(rows)
    out += ["", "### What `auto` picks, against the best setting the suite ran (linear@10, mean over seeds)\n"]
    out += auto_rows(rows)
    png = results / "domains_curves.png"
    curves_plot(rows, png)
    out += ["", f"![domains curves](results/{png.name})", ""]
    return "\n".join(out) + "\n"
