"""Every benchmark suite runs in tiny mode (one epoch, a few images) so the runner cannot rot.

Needs the shared data sets (../shared/data) and the `bench` extra (lightly); skips cleanly without them.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_shared

pytestmark = [pytest.mark.slow, needs_shared("cifar10.tar.gz")]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pytest.importorskip("lightly")
    from benchmarks.run import main

    out = tmp_path_factory.mktemp("bench")

    def run(suite):
        main([suite, "--tiny", "--results", str(out), "--readme", str(out / "README.md")])
        return json.loads((out / f"{suite}.json").read_text()), (out / "README.md").read_text()

    run.out = out
    return run


def test_cost_suite(bench):
    rec, readme = bench("cost")
    methods = {(r["backbone"], r["method"]) for r in rec["rows"]}
    assert {m for _, m in methods} == {"edgessl", "npid", "mocov2", "simclr", "supervised"}
    assert all(r["step_s"] > 0 and r["peak_rss_bytes"] > 0 for r in rec["rows"])
    assert all(r["step_over_supervised"] == pytest.approx(r["step_s"] / next(
        s["step_s"] for s in rec["rows"] if s["method"] == "supervised" and s["backbone"] == r["backbone"]))
        for r in rec["rows"])
    assert "## Cost per step" in readme and "tiny smoke run" in readme


def test_accuracy_budget_and_data_suites(bench):
    """One test, so the accuracy suite runs once: the budget suite reads its s/epoch, the data suite its runs."""
    rec, readme = bench("accuracy")
    assert {(r["data"], r["method"]) for r in rec["rows"]} == {
        (d, m) for d in ("emoji", "cifar10k") for m in ("edgessl", "npid", "mocov2", "simclr")}
    for r in rec["rows"]:
        assert 0 <= r["knn_last"] <= 1 and set(r["final"]) == {"knn@10", "linear@10", "knn@all", "linear@all"}
    assert "## Accuracy at equal epochs" in readme and "convergence_" in readme
    simclr = {r["data"]: r["s_per_epoch"] * r["epochs"] for r in rec["rows"] if r["method"] == "simclr"}
    rec, readme = bench("budget")
    assert {(r["data"], r["method"]) for r in rec["rows"]} == {
        (d, m) for d in ("emoji", "cifar10k") for m in ("edgessl", "npid", "mocov2", "simclr")}
    for r in rec["rows"]:
        assert r["budget_s"] == pytest.approx(simclr[r["data"]])
    assert "## Accuracy at equal wall-clock" in readme
    rec, readme = bench("data")
    assert sorted({r["fraction"] for r in rec["rows"]}) == [0.1, 0.25, 0.5]
    data = readme.split("## Data efficiency")[1]
    assert "| 1.0 | edgessl |" in data and "| 1.0 | mocov2 |" in data  # the accuracy suite's cifar10k runs
    assert "## Data efficiency" in readme


def test_ablation_suite(bench):
    rec, readme = bench("ablation")
    assert [r["ablation"] for r in rec["rows"]] == ["full", "random bank init", "momentum bank update",
                                                    "no self-distillation", "with CutMix 0.5",
                                                    "with CutMix 0.5, max(lam, 1-lam)"]
    assert rec["rows"][-1]["overrides"] == {"cutmix": 0.5, "cutmix_lam": "max"}
    assert rec["rows"][2]["overrides"] == {"bank_update": "momentum"}
    assert "## Ablation (emoji)" in readme


def test_slim_suite(bench):
    pytest.importorskip("torch_pruning")
    rec, readme = bench("slim")
    assert [(r["route"], r["width"]) for r in rec["rows"]] == [
        ("slimmable", 1.0), ("slimmable", 0.5), ("separate", 1.0), ("separate", 0.5), ("prune+recover", 0.5)]
    half = [r for r in rec["rows"] if r["width"] == 0.5]
    full = [r for r in rec["rows"] if r["width"] == 1.0]
    assert max(r["params"] for r in half) < min(r["params"] for r in full)
    assert all(r["latency_ms"] > 0 and r["latency_runtime"] for r in rec["rows"])
    assert "## Slimmable widths vs separate training" in readme
    from benchmarks.run import main

    main(["slim-cost", "--results", str(bench.out), "--readme", str(bench.out / "README.md")])
    again = json.loads((bench.out / "slim.json").read_text())
    assert again["cost_command"] == "python -m benchmarks.run slim-cost"
    assert [r["params"] for r in again["rows"]] == [r["params"] for r in rec["rows"]]


@pytest.mark.slow
def test_shared_cpu_suite(bench):
    rec, readme = bench("shared-cpu")
    rows = {(r["workload"], r["setting"]): r for r in rec["rows"]}
    assert rows[("competitor alone", "-")]["competitor_steps_per_s"] > 0
    for work in ("pretrain", "eval"):
        r = rows[(work, "new")]
        assert r["images_per_s"] > 0 and r["threads"] >= 1 and r["competitor_steps_per_s"] > 0
    assert "## Shared CPU: the thread policy beside another job" in readme and "load average" in readme


def test_eval_suite(bench):
    rec, readme = bench("eval")
    before, after = rec["rows"]
    assert (before["probe"], after["probe"]) == ("before", "after") and before["seconds"] > 0
    assert before["settings"]["dtype"] == "torch.float64" and after["settings"]["dtype"] == "torch.float32"
    assert len(before["results"]) == len(after["results"]) > 0
    assert "## Eval: the linear probe's speed-ups" in readme


def test_loader_suite(bench):
    rec, readme = bench("loader")
    by = {(r["probe"], r.get("mode") or r.get("path") or r.get("monitor_queries")): r for r in rec["rows"]}
    assert {m for p, m in by if p == "start"} == {"no disk cache", "cold", "warm"}
    assert all(by[("start", m)]["seconds_to_first_step"] > 0 for m in ("cold", "warm"))
    assert all(by[("loader", p)]["images_per_s"] > 0 for p in ("ram", "mmap", "stream"))
    assert by[("e2e", None)]["timed_steps"] >= 1 and by[("cache-rss", None)]["images"] == 48
    assert "## Loader: decode once, memory-map, prefetch" in readme and "| memory map |" in readme


def test_export_suite(bench):
    rec, readme = bench("export")
    assert [(r["data"], r["backbone"], r["epochs"]) for r in rec["rows"]] == [("emoji", "mobilenetv3_small", 1)]
    for r in rec["rows"]:
        assert r["candidates"] and r["outcome"]
        assert r["int8_written"] == (r["shipped"] is not None)  # a file, or the one line that says why not
        assert r["int8_written"] or r["reason"].startswith("int8 not written: ")
        assert r["candidates"][0]["candidate"].startswith("minmax")  # the search starts at --calib-method
    assert "## Export: the int8 search on encoders it has not seen" in readme


def assert_tables_well_formed(markdown: str) -> None:
    """Every Markdown table: its separator row and each body row have as many cells as its header."""
    lines = markdown.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and lines[i + 1].startswith("|---"):
            width = line.count("|")
            assert lines[i + 1].count("|") == width, (line, lines[i + 1])
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                assert row.count("|") == width, (line, row)


def _listing(folder: str) -> list[tuple[str, int]]:
    root = Path(folder)
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def test_init_suite(bench, isolated_cache):
    before = _listing(isolated_cache)
    rec, readme = bench("init")
    assert _listing(isolated_cache) == before  # the suites decode into a cache of their own
    runs = [r["run"] for r in rec["rows"]]
    assert runs == ["source: emoji", "CIFAR-10 5k from scratch", "CIFAR-10 5k --init emoji run"]
    assert rec["rows"][2]["curve"][0]["knn_top1"] is not None
    assert "## Warm start: `--init RUN` on another folder" in readme


def test_teacher_suite(bench):
    rec, readme = bench("teacher")
    runs = [r["run"] for r in rec["rows"]]
    assert runs == ["teacher: resnet18", "no teacher", "one-pass teacher (KL + bank init, the default)",
                    "per-step teacher + bank init"]  # --tiny: the three rows the summary compares
    first = {r["run"]: r["history"][0] for r in rec["rows"][1:]}
    assert "loss_teacher" not in first["no teacher"]
    assert first[runs[2]]["teacher_pass_seconds"] > 0 and first[runs[3]]["loss_teacher"] > 0
    assert rec["rows"][0]["epochs"] == 1
    assert "## Teacher: one pass of a large teacher vs a teacher on every step" in readme
    assert "Share of the per-step teacher's gain the one-pass teacher keeps" in readme


def test_duplicates_score_in_closed_form(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from benchmarks.duplicates import score

    rng = np.random.default_rng(0)
    pixels = {n: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for n in "abcd"}
    pixels["e"] = pixels["a"]  # e: a pixel twin of a
    for n, x in pixels.items():
        Image.fromarray(x).save(tmp_path / f"{n}.png")
    Image.fromarray(pixels["a"]).save(tmp_path / "a_copy.png")
    Image.fromarray(pixels["b"]).save(tmp_path / "b_copy.png")
    paths = [str(tmp_path / f) for f in ("a.png", "a_copy.png", "b.png", "b_copy.png", "c.png", "d.png", "e.png")]
    truth = {paths[1]: paths[0], paths[3]: paths[2]}
    # flagged: (a_copy, e) right (e is a's twin), (a_copy, c) wrong, (c, d) holds no copy; b_copy is missed
    pairs = np.array([[1, 6], [1, 4], [4, 5]])
    found = SimpleNamespace(pairs=pairs, kinds=["copy"] * 3, scores=np.ones(3))
    r = score(SimpleNamespace(duplicates=found, paths=paths), truth)
    assert r == {"pairs": 3, "pairs_with_copies": 2, "right": 1, "precision": 0.5, "recall": 0.5}
    empty = SimpleNamespace(pairs=np.zeros((0, 2), int), kinds=[], scores=np.zeros(0))
    assert score(SimpleNamespace(duplicates=empty, paths=paths), truth)["precision"] == 1.0


def test_duplicates_suite_reruns_one_encoder_length_and_keeps_the_others():
    from types import SimpleNamespace

    from benchmarks.duplicates import DATASETS, EPOCHS, chosen_folders, encoder_lengths, merged, with_scale, with_spread

    args = SimpleNamespace(tiny=False, only=None)
    assert encoder_lengths(args) == EPOCHS == (10, 30) and with_scale(args) and with_spread(args)
    only_spread = SimpleNamespace(tiny=False, only=["spread"])
    assert encoder_lengths(only_spread) == () and with_spread(only_spread) and not with_scale(only_spread)
    assert not with_spread(SimpleNamespace(tiny=False, only=["30"])) and not with_spread(SimpleNamespace(tiny=True,
                                                                                                        only=None))
    assert encoder_lengths(SimpleNamespace(tiny=False, only=["30"])) == (30,)
    assert not with_scale(SimpleNamespace(tiny=False, only=["30"]))
    only_scale = SimpleNamespace(tiny=False, only=["scale"])
    assert encoder_lengths(only_scale) == () and with_scale(only_scale)
    assert encoder_lengths(SimpleNamespace(tiny=True, only=["30"])) == (1,)
    with pytest.raises(SystemExit, match=r"--only takes encoder epochs such as 10,30, scale, spread and folders "
                                         r"\(emoji, neu-det, cifar10-2k, cifar10-5k, twemoji\), not sizes"):
        encoder_lengths(SimpleNamespace(tiny=False, only=["sizes"]))
    one = SimpleNamespace(tiny=False, only=["twemoji"])  # a folder alone: both lengths, that folder, no scale
    assert encoder_lengths(one) == EPOCHS and chosen_folders(one) == ("twemoji",) and not with_scale(one)
    assert encoder_lengths(SimpleNamespace(tiny=False, only=["twemoji", "10"])) == (10,)
    assert chosen_folders(args) == DATASETS
    earlier = [{"data": d, "epochs": e, "sample": "clean"} for d in ("emoji", "neu-det") for e in (10, 30)]
    earlier.append({"part": "scale", "data": "cifar10-50k", "epochs": 10, "images": 50000})
    new = [{"data": d, "epochs": 30, "sample": "seed 1"} for d in ("neu-det", "emoji")]
    got = [(r["data"], r["epochs"], r.get("sample")) for r in merged(new, earlier)]
    assert got == [("emoji", 10, "clean"), ("emoji", 30, "seed 1"), ("neu-det", 10, "clean"),
                   ("neu-det", 30, "seed 1"), ("cifar10-50k", 10, None)]  # old 30-epoch rows replaced, the rest kept
    scale = [{"part": "scale", "data": "cifar10-50k", "epochs": 10, "images": 49000}]
    again = merged(scale, earlier)
    assert [r.get("images") for r in again] == [None] * 4 + [49000]  # a scale rerun replaces only the scale row
    spread = [{"part": "spread", "data": "twemoji", "epochs": 10, "seed": 0}]  # between the encoders' and scale rows
    assert [r.get("part") for r in merged(spread, again)] == [None] * 4 + ["spread", "scale"]
    assert [r.get("seed") for r in merged([dict(spread[0], seed=1)], merged(spread, earlier))][4] == 1  # replaced
    folder = [{"data": "twemoji", "epochs": 10, "sample": "clean"}]  # a new folder's rows join the others
    assert [(r["data"], r["epochs"]) for r in merged(folder, earlier)] == [
        ("emoji", 10), ("emoji", 30), ("neu-det", 10), ("neu-det", 30), ("twemoji", 10), ("cifar10-50k", 10)]


def test_the_spread_table_lists_each_calibration():
    from benchmarks.duplicates import duplicates_section, spread_section

    row = {"part": "spread", "data": "twemoji", "epochs": 10, "sample": "seed 1", "seed": 2, "threshold": 0.6994,
           "precision": 1.0, "recall": 0.96, "estimated_precision": 0.959, "estimated_recall": 0.979, "unsure": 0,
           "planted_for_calibration": 800, "calibration_seconds": 15.7}
    assert spread_section([{"data": "emoji", "epochs": 10, "sample": "clean"}]) == []
    lines = spread_section([row])
    assert lines[-1] == "| twemoji | 800 | 2 | 0.699 | 1.00 | 0.96 | 0.96 / 0.98 | 16 |  |  |"  # from before
    held = {"set_by": ["1f46f.png", "1f46e.png"], "set_by_score": 0.6981, "threshold_without": 0.6512,
            "estimated_recall_without": 0.991}
    assert spread_section([{**row, **held}])[-1].endswith("| 16 | 1f46f.png / 1f46e.png (0.698) | 0.651; 0.99 |")
    assert spread_section([{**row, "set_by": None}])[-1].endswith("| 16 | none |  |")
    text = duplicates_section({"rows": [row], "machine": {}, "command": "c", "seconds": 1.0})
    assert text.count("| twemoji |") == 1  # in the spread table only, not among the planted samples


def test_a_partial_rerun_appends_its_command_and_keeps_the_machine_note(tmp_path):
    import json

    from benchmarks.run import record_head

    old = tmp_path / "domains.json"
    old.write_text(json.dumps({"command": "python -m benchmarks.run domains", "seconds": 60.0,
                               "machine": {"cpu": "x", "note": "the first rows ran on another machine"}}))
    command, seconds, mach = record_head(old, "python -m benchmarks.run domains --only temperature", 30.0)
    assert command == "python -m benchmarks.run domains; then python -m benchmarks.run domains --only temperature"
    assert seconds == 90.0 and mach["note"] == "the first rows ran on another machine"
    old.write_text(json.dumps({"command": command, "seconds": seconds, "machine": {}}))
    again, seconds, _ = record_head(old, "python -m benchmarks.run domains --only temperature", 10.0)
    assert (again, seconds) == (command, 100.0)  # a command run again is listed once; its seconds count
    command, seconds, mach = record_head(None, "python -m benchmarks.run domains", 30.0)
    assert (command, seconds) == ("python -m benchmarks.run domains", 30.0) and "note" not in mach


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM: Linux only")
def test_a_probe_reports_its_own_peak_rss_not_its_launchers():
    """peak_rss_bytes in a process started by a larger one: its own high-water mark (ru_maxrss would report the
    launcher's, carried over the fork and exec)."""
    import subprocess
    import sys

    import numpy as np

    from benchmarks.common import REPO, peak_rss_bytes

    ballast = np.ones(2 * 2**30 // 8)  # 2 GiB touched in this process
    code = "from benchmarks.common import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    assert peak_rss_bytes() >= ballast.nbytes > child > 0


def test_duplicates_suite(bench):
    rec, readme = bench("duplicates")
    assert [r.get("sample") for r in rec["rows"]] == ["clean", "seed 1", None, None]
    clean, planted, scale, memory = rec["rows"]
    assert clean["images"] == 36 and 0 <= clean["flagged"] <= clean["images"]
    assert planted["copies"] == 4 and 0 <= planted["precision"] <= 1 and 0 <= planted["recall"] <= 1
    assert 0 <= planted["estimated_precision"] <= 1 and planted["threshold"] > 0
    assert 0 <= planted["estimated_precision_low"] <= planted["estimated_precision"] and planted["unsure"] >= 0
    assert planted["set_by"] is None or (len(planted["set_by"]) == 2 and planted["threshold_without"] < planted[
        "threshold"] and planted["set_by_score"] < planted["threshold"]  # the pair that held the threshold up,
        and planted["estimated_recall_without"] > planted["estimated_recall"])  # named only when it cost copies
    assert len(planted["missed"]) == round(planted["copies"] * (1 - planted["recall"]))  # each lost copy, with
    assert all({"copy", "crop_w", "scale", "quality", "score"} <= set(m) for m in planted["missed"])  # its draws
    assert scale["part"] == "scale" and scale["images"] == 36 and list(scale["plain_seconds"]) == ["embed"]
    assert set(scale["seconds"]) == {"embed", "pixels", "calibration", "search", "files"}
    assert all(v >= 0 for v in scale["seconds"].values()) and scale["seconds"]["calibration"] > 0
    assert memory["kind"] == "memory" and memory["size"] == 32 and memory["pairs"] > 0
    assert memory["peak_after_fit_mib"] >= memory["peak_after_coarse_mib"] >= memory["rss_after_setup_mib"] > 0
    assert "## Duplicates: `edgessl embed --duplicates auto`" in readme and "| emoji-tiny | 36 |" in readme
    assert "| 40 | 32 | " in readme  # the memory table
    assert_tables_well_formed(readme.split("## Duplicates")[1])


def test_lookalike_suite(bench):
    rec, readme = bench("lookalike")
    assert {r["data"] for r in rec["rows"]} == {"cifar10-5k", "neu-det", "emoji", "digits"}  # --tiny: nothing fetched
    assert {r["images"] for r in rec["rows"]} == {5, 10}
    for r in rec["rows"]:
        assert len(r["scores"]) == 2 and 0 <= r["right"] <= 2 and r["fitted_on"] == (r["data"] in ("cifar10-5k",
                                                                                                   "neu-det"))
    assert "## Look-alike score and folder size" in readme and "| neu-det | look-alike (fitted on) |" in readme
    assert_tables_well_formed(readme.split("## Look-alike score")[1])


def test_copy_score_suite(bench):
    import edgessl.evaluate.copies as cp

    kept = cp.CHROMA_SMOOTH
    rec, readme = bench("copy-score")
    assert [r["chroma"] for r in rec["rows"]] == [0.0, 0.5, 1.0, 1.5, kept]  # --tiny: the tiny emoji folder only
    assert [r["matched"] for r in rec["rows"]] == [False] * 4 + [True]  # the default at the pair's coarser size
    assert cp.CHROMA_SMOOTH == kept  # the suite puts the default back
    for r in rec["rows"]:
        assert r["data"] == "emoji" and r["images"] == 36 and r["copies"] == 8 and r["lookalike_pairs"] >= 20
        assert 0 <= r["recall_above_10th"] <= 1 and 0 <= r["recall_above_20th"] <= 1
        assert 0 <= r["copies_below_0.7"] <= 8 and r["lookalikes_above_0.7"] <= r["lookalike_pairs"]
    assert "## Copy score: colour compared" in readme and "| emoji | 36 |" in readme
    assert "| the pair's coarser |" in readme
    assert_tables_well_formed(readme.split("## Copy score")[1])


def test_midway_suite(bench):
    rec, readme = bench("midway")
    assert [r["setting"] for r in rec["rows"]] == ["follows the load (auto, the default)"]  # --tiny: one setting
    for r in rec["rows"]:
        assert len(r["threads_per_epoch"]) == 5 and r["idle_images_per_s"] > 0 and r["busy_over_idle"] > 0
        assert r["after_over_idle"] == pytest.approx(r["after_images_per_s"] / r["idle_images_per_s"])
    assert all(c["threads"] >= 1 for c in rec["rows"][0]["thread_changes"])
    assert "## Shared CPU, a competitor midway: threads that follow the load" in readme


def test_domains_peers_train_simclr_on_five_seeds_and_keep_earlier_rows():
    from types import SimpleNamespace

    from benchmarks.domains import PEER_SEEDS, label, plan

    args = SimpleNamespace(only=["peers"], tiny=False, image_size=96, epochs=31, backbones=None, teachers=None)
    rows = plan(args)
    simclr = [r for r in rows if r["method"] == "simclr" and not r.get("budget_of")]
    assert PEER_SEEDS == (0, 1, 2, 3, 4) and [label(r) for r in simclr] == [
        "neu-det mobilenetv3_small 96px simclr 31ep"] + [f"neu-det mobilenetv3_small 96px simclr 31ep seed {s}"
                                                         for s in (1, 2, 3, 4)]
    assert all(r["reuse"] for r in rows[:-5])  # the equal wall-clock rows, one per seed, are measured again
    assert [(r["budget_of"], r.get("seed", 0), "reuse" in r) for r in rows[-5:]] == [
        ("edgessl", s, False) for s in range(5)]
    assert [r.get("seed", 0) for r in plan(SimpleNamespace(**{**vars(args), "tiny": True}))
            if r["method"] == "simclr"] == [0, 0]  # --tiny: seed 0 at equal epochs, and the budget row


def test_domains_bank_part_runs_each_setting_on_the_auto_settings_and_seeds(monkeypatch):
    """The bank part: every setting on every folder at the size and epochs `auto` picks there (tau from auto: no
    temperature key), on that folder's training seeds; the labels name the setting and the seed."""
    from types import SimpleNamespace

    import benchmarks.domains as dm

    monkeypatch.setattr(dm, "folders", lambda name, tiny: (Path(name), Path(name)))
    monkeypatch.setattr(dm, "auto_settings", lambda train: ({"neu-det": 128}.get(str(train), 64), 31, 1440))
    rows = dm.plan(SimpleNamespace(only=["bank"], tiny=False))
    assert dm.BANK_SETTINGS == ({"bank_lr": 0.5}, {"feature_dim": 256}) and dm.BANK_AGAIN == {
        "emoji", "digits", "twemoji"}  # eta 1 again where the temperature part's rows are older code
    assert len(rows) == 2 * 5 + 3 * 2 * 3
    assert all("temperature" not in r and r["epochs"] == 31 for r in rows)
    assert [dm.label(r) for r in rows[:1] + rows[18:19] + rows[24:25]] == [
        "emoji mobilenetv3_small 64px edgessl 31ep bank_lr 1 seed 0",
        "neu-det mobilenetv3_small 128px edgessl 31ep bank_lr 0.5 seed 0",
        "neu-det mobilenetv3_small 128px edgessl 31ep feature_dim 256 seed 1"]
    assert {r["data"]: r["size"] for r in rows} == {"neu-det": 128, "emoji": 64, "digits": 64, "twemoji": 64}


def test_bank_table_sets_each_setting_against_the_temperature_parts_defaults_on_the_same_seeds():
    from benchmarks.domains import bank_rows

    def row(part, seed, lin, **kw):
        return {"part": part, "data": "neu-det", "size": 128, "epochs": 31, "seed": seed, **kw,
                "final": {"linear@10": {"mean": lin}, "knn@all": {"mean": 0.9}, "linear@all": {"mean": 0.95}}}

    rows = [row("temperature", 0, 0.80, temperature=0.2), row("temperature", 1, 0.70, temperature=0.2),
            row("temperature", 2, 0.10, temperature=0.2), row("temperature", 0, 0.5, temperature=0.1),
            row("bank", 0, 0.84, overrides={"bank_lr": 0.5}), row("bank", 1, 0.72, overrides={"bank_lr": 0.5})]
    table = bank_rows(rows)
    assert "| neu-det | 128 px, 31 ep | η 0.5 | 0.840, 0.720 | 0.780 | +0.030 | 0.900 | 0.950 |" in table
    assert "| neu-det | 128 px, 31 ep | η 1, d 128 (the old defaults; temperature part) | 0.800, 0.700 | 0.750 | " \
        "+0.000 | 0.900 | 0.950 |" in table  # seed 2 is not in the bank part: left out of both
    again = bank_rows(rows + [row("bank", 0, 0.82, overrides={"bank_lr": 1.0}),
                              row("bank", 1, 0.66, overrides={"bank_lr": 1.0})])
    assert "| neu-det | 128 px, 31 ep | η 0.5 | 0.840, 0.720 | 0.780 | +0.040 | 0.900 | 0.950 |" in again
    assert "| neu-det | 128 px, 31 ep | η 1, d 128 (the old defaults; this part) | 0.820, 0.660 | 0.740 | +0.000 |" in \
        " ".join(again)  # the defaults run in the bank part win over the temperature part's rows


def test_settings_are_told_apart_by_eta_and_width_as_recorded_or_overridden():
    """The suite's settings: a run's recorded eta and d, else its overrides, else the defaults of its time (1, 128)."""
    from benchmarks.domains import knobs_of, setting_means

    def row(seed, lin, **kw):
        return {"size": 128, "epochs": 31, "temperature": 0.2, "seed": seed, "final": {"linear@10": {"mean": lin}},
                **kw}

    rows = [row(0, 0.8), row(1, 0.7), row(0, 0.9, overrides={"bank_lr": 0.5}), row(1, 0.8, bank_lr=0.5),
            row(0, 0.6, overrides={"feature_dim": 256})]
    assert [knobs_of(r) for r in rows] == [(1.0, 128), (1.0, 128), (0.5, 128), (0.5, 128), (1.0, 256)]
    means = setting_means(rows)
    assert means[(128, 31, 0.2, 1.0, 128)] == pytest.approx((0.75, 2))
    assert means[(128, 31, 0.2, 0.5, 128)] == pytest.approx((0.85, 2))
    assert means[(128, 31, 0.2, 1.0, 256)] == pytest.approx((0.6, 1)) and len(means) == 3


def test_simclr_at_edgessls_time_takes_the_default_runs_seconds(monkeypatch, tmp_path):
    """The equal wall-clock row: edgessl's default peers run (not a temperature-part run at the same settings) and
    SimCLR's seed-0 s/epoch: round(167 / (343 / 31)) = 15 epochs."""
    from types import SimpleNamespace

    import benchmarks.common
    import benchmarks.domains as dm

    seen = {}

    def fake(method, train, test, backbone, size, epochs, *args, **kwargs):
        seen["epochs"] = epochs
        return {"wall_s": 1.0, "s_per_epoch": 1.0, "final": {"linear@10": {"mean": 0.5}, "knn@all": {"mean": 0.5}}}

    monkeypatch.setattr(dm, "folders", lambda name, tiny: (tmp_path, tmp_path))
    monkeypatch.setattr(benchmarks.common, "train_and_eval", fake)
    base = {"data": "neu-det", "backbone": "mobilenetv3_small", "size": 96}
    done = [{**base, "part": "temperature", "method": "edgessl", "epochs": 31, "temperature": 0.1, "seed": 0,
             "wall_s": 219.0},
            {**base, "part": "peers", "method": "edgessl", "epochs": 31, "wall_s": 167.0},
            {**base, "part": "peers", "method": "simclr", "epochs": 31, "seed": 1, "wall_s": 297.0},
            {**base, "part": "peers", "method": "simclr", "epochs": 31, "wall_s": 343.0}]
    row = {**base, "part": "peers", "method": "simclr", "epochs": None, "budget_of": "edgessl"}
    out = dm.run_row(row, done, SimpleNamespace(epochs=31, tiny=True, seeds=1), tmp_path)
    assert seen["epochs"] == out["epochs"] == 15 and out["budget_s"] == 167.0


@needs_shared("neu-det.tar.gz")
@needs_shared("emoji-google.tar.gz")
def test_domains_suite(bench):
    rec, readme = bench("domains")
    parts = {(r["part"], r["data"], r["method"]) for r in rec["rows"]}
    assert {("epochs", d, "edgessl") for d in ("neu-det", "emoji")} <= parts
    assert {("sizes", "neu-det", "random"), ("peers", "neu-det", "simclr"), ("peers", "neu-det", "supervised")} <= parts
    budget = next(r for r in rec["rows"] if r.get("budget_of"))  # SimCLR's epochs from edgessl's seconds
    ref = next(r for r in rec["rows"] if r["method"] == "edgessl" and r["size"] == budget["size"] and r["epochs"] == 1)
    simclr = next(r for r in rec["rows"] if r["method"] == "simclr" and not r.get("budget_of"))
    assert budget["epochs"] == max(1, round(ref["wall_s"] / simclr["wall_s"])) and budget["budget_s"] == ref["wall_s"]
    taught = [r for r in rec["rows"] if r.get("teacher")]  # a resnet18 teacher from this folder and from emoji
    assert sorted(r["teacher"] for r in taught) == ["emoji", "neu-det"]
    assert all(0 <= r["teacher_on_folder"]["knn@all"]["mean"] <= 1 for r in taught)
    temps = [r for r in rec["rows"] if r["part"] == "temperature"]  # each set at tau 0.1 and 0.2 (--tiny: seed 0)
    assert sorted((r["data"], r["temperature"]) for r in temps) == sorted(
        (d, t) for d in ("neu-det", "emoji", "cifar10-5k", "cifar10-5k-grey", "cifar10-1.5k", "digits")
        for t in (0.1, 0.2))
    assert all(0 <= r["lookalike"] <= 1 for r in temps)  # the score --temperature auto reads, on each folder
    grey = next(r for r in temps if r["data"] == "cifar10-5k-grey")
    assert grey["overrides"] == {"temperature": grey["temperature"]}
    from PIL import Image

    from benchmarks.domains import folders

    colour, twin = folders("cifar10-5k", True)[0], folders("cifar10-5k-grey", True)[0]  # the twin: same files, grey
    assert sorted(p.relative_to(twin).with_suffix("") for p in twin.rglob("*.png")) == sorted(
        p.relative_to(colour).with_suffix("") for p in colour.rglob("*.*"))
    assert {Image.open(p).mode for p in twin.rglob("*.png")} == {"L"}
    bank = [r for r in rec["rows"] if r["part"] == "bank"]  # --tiny: eta 0.5, seed 0
    assert sorted(r["data"] for r in bank) == ["digits", "emoji", "neu-det"]
    assert all(r["overrides"] == {"bank_lr": 0.5} and r["bank_lr"] == 0.5 for r in bank)
    assert "### The bank's step size" in readme and "| neu-det | 32 px, 1 ep | η 0.5 |" in readme
    assert len({r["row"] for r in rec["rows"]}) == len(rec["rows"])  # no row twice
    assert "## Domains" in readme and "### What `auto` picks" in readme and "### When the teacher pays" in readme
    assert "### Temperature" in readme and "| cifar10-5k-grey | 32 | 1 |" in readme
    assert_tables_well_formed(readme.split("## Domains")[1])
    assert (bench.out / "domains_curves.png").is_file()


@needs_shared("neu-det.tar.gz")
def test_gpu_suite_runs_every_part_on_the_cpu(bench):
    """`python -m benchmarks.run gpu --device cpu --tiny`: every part, its rows, the estimates printed before the
    start checked against what each part took, and the README's GPU section (format, tables, the time box)."""
    from benchmarks.run import main

    out = bench.out / "gpu"
    main(["gpu", "--tiny", "--device", "cpu", "--results", str(out), "--readme", str(out / "README.md")])
    rec = json.loads((out / "gpu.json").read_text())
    parts = [r["part"] for r in rec["rows"]]
    assert parts.count("data") == 4 and parts.count("steps") == 6 and parts[-1] == "plan"
    assert {r["method"] for r in rec["rows"] if r["part"] == "steps"} == {"edgessl", "simclr", "supervised"}
    for r in rec["rows"]:
        if r["part"] == "data":
            assert r["data_over_model"] == pytest.approx(r["data_images_per_s"] / r["model_images_per_s"])
    summary = next(r for r in rec["rows"] if r.get("summary"))
    curve = [r for r in rec["rows"] if r["part"] == "cifar" and not r.get("summary")]
    assert summary["epochs_done"] == len(curve) >= 1 and all(0 <= r["knn_top1"] <= 1 for r in curve)
    assert summary["stopped_by_time"] == (summary["epochs_done"] < summary["planned_epochs"])
    plan = rec["rows"][-1]
    assert set(plan["estimate_s"]) == set(plan["actual_s"]) == {"data", "steps", "cifar"}
    for part, seconds in plan["actual_s"].items():  # the estimates are within a factor of 10 of the smoke run
        assert plan["estimate_s"][part] / 10 <= seconds <= plan["estimate_s"][part] * 10, (part, seconds)
    readme = (out / "README.md").read_text()
    assert "## GPU" in readme and "| data path | precision |" in readme and "| epoch | training minutes |" in readme


def test_the_gpu_plan_fits_eight_minutes_on_paper():
    """The real run's estimates (an H100-class GPU) fit the default 8 minutes, the CIFAR-10 run taking the rest."""
    import torch

    from benchmarks.gpu import estimates, make_plan

    plan = make_plan(False, torch.device("cuda"))
    est = estimates(plan, 8.0, ("data", "steps", "cifar"))
    assert sum(est.values()) == pytest.approx(8 * 60) and est["cifar"] >= 4 * 60
    assert estimates(plan, 8.0, ("data", "steps")).keys() == {"data", "steps"}
