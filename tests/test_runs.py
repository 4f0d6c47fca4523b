"""Nothing lost: run directories are never overwritten or mixed, a refused resume changes no byte, data identity,
honest messages (issue: safe run directories)."""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import edgessl
from edgessl.cli import app
from edgessl.data.signature import describe_difference, folder_signature, scan_images
from edgessl.demo import demo_images
from edgessl.errors import Interrupted, UserError
from edgessl.rundir import default_run_dir
from edgessl.train.checkpoint import load_checkpoint

TINY = dict(image_size=32, batch_size=8, head_hidden=32, feature_dim=16, quiet=True, workers=1, eval_every=0)
runner = CliRunner()


def folder_hash(root: Path) -> str:
    """sha256 over every file's relative path, bytes and mode below root."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(oct(p.stat().st_mode).encode())
    return h.hexdigest()


def copy_images(dst: Path, start: int, count: int) -> Path:
    dst.mkdir(parents=True)
    for f in sorted(demo_images().rglob("*.png"))[start : start + count]:
        shutil.copy2(f, dst / f.name)
    return dst


class Stop(Exception):
    pass


def stop_at(epoch: int, step: int = 0, exc=Stop):
    def on_step(info):
        if info.epoch == epoch and info.step == step:
            raise exc()

    return on_step


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return copy_images(tmp_path_factory.mktemp("data") / "images", 0, 24)


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A finished 1-epoch run (read-only: copy it before changing it)."""
    return edgessl.pretrain(data=str(images), out=str(tmp_path_factory.mktemp("finished") / "run"), epochs=1,
                            **TINY).run_dir


@pytest.fixture(scope="module")
def cut(images, tmp_path_factory):
    """A 2-epoch run killed during its second epoch: epoch 1 is checkpointed (read-only)."""
    out = tmp_path_factory.mktemp("cut") / "run"
    with pytest.raises(Stop):
        edgessl.pretrain(data=str(images), out=str(out), epochs=2, on_step=stop_at(1), **TINY)
    return out


def one_line_error(res, code=2) -> str:
    assert res.exit_code == code, res.output
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


# ---------------------------------------------------------------- 1. --out on an existing run
def test_out_on_an_existing_run_is_refused_and_changes_nothing(finished, images, tmp_path):
    run = shutil.copytree(finished, tmp_path / "copy")
    (run / "eval.json").write_text("{}")
    before = folder_hash(run)
    res = runner.invoke(app, ["pretrain", "--data", str(images), "--epochs", "1", "--out", str(run)])
    line = one_line_error(res)
    assert line == (f"error: --out '{run}' already holds a run: continue it with --resume {run}, or pass --overwrite "
                    f"to move it aside (to copy.old-<time>) and start a new run there.")
    assert folder_hash(run) == before
    started = tmp_path / "started"  # killed in its first epoch: config.yaml and data.json only
    started.mkdir()
    (started / "config.yaml").write_text("epochs: 1\n")
    (started / "data.json").write_text("{}")
    line = one_line_error(runner.invoke(app, ["pretrain", "--data", str(images), "--epochs", "1", "--out",
                                              str(started)]))
    assert line == (f"error: --out '{started}' holds a run stopped before its first checkpoint (nothing to resume): "
                    "pass --overwrite to start again there (it moves the folder aside to started.old-<time>), or "
                    "another --out.")  # had sent the user to --resume, which then sent them to --overwrite
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    line = one_line_error(runner.invoke(app, ["pretrain", "--data", str(images), "--out", str(other)]))
    assert line == (f"error: --out '{other}' already holds files: pass another --out, or pass --overwrite to move "
                    f"them aside (to notes.old-<time>) and start a new run there.")  # no run there to --resume
    assert (other / "todo.txt").read_text() == "mine"


@pytest.mark.slow
def test_overwrite_moves_the_old_run_aside_and_never_mixes(finished, images, tmp_path):
    run = shutil.copytree(finished, tmp_path / "copy")
    (run / "eval.json").write_text("{}")
    before = folder_hash(run)
    res = runner.invoke(app, ["pretrain", "--data", str(images), "--epochs", "2", "--out", str(run), "--overwrite",
                              "--image-size", "32", "--batch-size", "8", "--head-hidden", "32", "--feature-dim", "16",
                              "--eval-every", "0", "--quiet", "--workers", "1"])
    assert res.exit_code == 0, res.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("copy.old-")]
    assert len(aside) == 1 and folder_hash(aside[0]) == before  # the old run, byte for byte
    assert "now in" in " ".join(res.output.split()) and aside[0].name in res.output
    assert not (run / "eval.json").exists()  # nothing of the old run is left in the new one
    assert json.loads((run / "encoder.json").read_text())["epochs_trained"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_default_run_name_stays_unique(tmp_path):
    first = default_run_dir("resnet18", tmp_path, stamp="20261130-120000")
    assert first == tmp_path / "resnet18-20261130-120000"
    first.mkdir()
    second = default_run_dir("resnet18", tmp_path, stamp="20261130-120000")
    assert second == tmp_path / "resnet18-20261130-120000-2"
    second.mkdir()
    assert default_run_dir("resnet18", tmp_path, stamp="20261130-120000").name == "resnet18-20261130-120000-3"


# ---------------------------------------------------------------- 2. a refused resume changes no byte
@pytest.mark.slow
def test_refused_resume_changes_no_byte_and_a_plain_resume_still_works(cut, tmp_path):
    run = shutil.copytree(cut, tmp_path / "run")
    other = copy_images(tmp_path / "corrupt", 100, 10)
    before = folder_hash(run)
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--data", str(other)]))
    assert line.startswith(f"error: Cannot resume '{run}': '{other}' does not hold the images it was trained on")
    assert folder_hash(run) == before  # config.yaml untouched, no skipped_files.txt
    # a model option that does not fit the checkpoint: refused before any write too
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--feature-dim", "32"]))
    assert "its checkpoint does not fit the model these options build" in line
    assert folder_hash(run) == before
    # the weights fit any size: another --image-size had trained on silently and recorded the new size for the run
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--image-size", "48"]))
    assert line == (f"error: Cannot resume '{run}': it trains with --image-size 32 px, not 48 px: a run keeps its "
                    f"input. Resume without that option, or start a new run from its weights: --init {run}.")
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--small-input", "off"]))
    assert "it trains with --small-input auto, not off: a run keeps its input" in line  # auto: on at 32 px
    # the teacher's bank is stored with the run: another --teacher was recorded in config.yaml but never used
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--teacher", str(run)]))
    assert line == (f"error: Cannot resume '{run}': it was trained without a teacher, not --teacher {run}: a run keeps "
                    f"its teacher. Resume without --teacher, or start a new run from its weights: --init {run} "
                    f"--teacher {run}.")
    assert folder_hash(run) == before
    res = runner.invoke(app, ["pretrain", "--resume", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(run)["epoch"] == 2


def test_resume_refuses_changed_training_settings_another_out_and_a_recipe(cut, tmp_path):
    """A resume had taken --lr, --method, --seed, --batch-size, --optimizer silently (config.yaml then described the
    new settings only), ignored --out and --recipe."""
    run = shutil.copytree(cut, tmp_path / "run")
    before = folder_hash(run)
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--lr", "1.0", "--method", "npid"]))
    assert line == (f"error: Cannot resume '{run}': it trains with --method edgessl, not npid; --temperature 0.2, "
                    "not 0.1; --bank-init forward, "
                    "not random; --bank-update grad, not momentum; --sd-weight 5.0, not 0.0; --lr 0.2, not 1.0: a "
                    f"run keeps its settings. Resume without those options, or start a new run from its weights: "
                    f"--init {run}.")
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--widths", "1.0,0.5"]))
    assert line == (f"error: Cannot resume '{run}': it trains with --widths none, not 1,0.5: a run keeps its "
                    f"settings. Resume without that option, or start a new run from its weights: --init {run}.")
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--optimizer", "adamw"]))
    assert line == (f"error: Cannot resume '{run}': it trains with --optimizer sgd, not adamw: a run keeps its "
                    f"settings. Resume without that option, or start a new run from its weights: --init {run}.")
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--out", str(tmp_path / "b")]))
    assert line == (f"error: Cannot resume '{run}' into --out '{tmp_path / 'b'}': a run continues in its own folder. "
                    f"Resume without --out, or start a new run from its weights: --init {run} --out {tmp_path / 'b'}.")
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--recipe", "resnet18_cifar"]))
    assert line == (f"error: Cannot resume '{run}' with --recipe: a run keeps its config.yaml. Resume without "
                    f"--recipe, or start a new run from its weights: --init {run} --recipe resnet18_cifar.")
    assert folder_hash(run) == before


def test_a_runs_config_reloads_into_a_new_run_and_not_quiet(finished, images, tmp_path, monkeypatch):
    """config.yaml's first line says `reload with: edgessl pretrain --config RUN/config.yaml`: that had always met
    its own run (`out` is in it), and a --quiet run's config had made every later run and resume quiet."""
    from edgessl.config import resolve
    from edgessl.workflows.pretrain import run_of

    config = finished / "config.yaml"
    assert run_of(config) == finished.resolve() and run_of(tmp_path / "none.yaml") is None
    seen = {}
    from edgessl.train.types import PretrainResult

    monkeypatch.setattr("edgessl.workflows.pretrain.train_run",
                        lambda cfg, **kw: PretrainResult(seen.setdefault("cfg", cfg).out or tmp_path))
    edgessl.pretrain(config=str(config))
    assert seen["cfg"].out is None and seen["cfg"].quiet is False  # a fresh runs/<backbone>-<time>
    assert resolve(config=str(config)).quiet is True  # what the file says, as any config file
    seen.clear()
    edgessl.pretrain(config=str(config), out=str(tmp_path / "new"), quiet=True)
    assert seen["cfg"].out == str(tmp_path / "new") and seen["cfg"].quiet is True
    seen.clear()  # the same file as --recipe: it had met its own run ("already holds a run ... --overwrite")
    edgessl.pretrain(recipe=str(config))
    assert seen["cfg"].out is None and seen["cfg"].quiet is False


def test_the_recipe_is_named_with_what_it_set_and_the_flags_over_it(tmp_path, monkeypatch):
    """Nothing had named the recipe: its numbers simply took the place of the banner's auto lines."""
    import io

    from rich.console import Console

    from edgessl.train.types import PretrainResult

    monkeypatch.setattr("edgessl.workflows.pretrain.train_run", lambda cfg, **kw: PretrainResult(tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nimage_size: 48\nlr: 0.1\n")
    out = io.StringIO()
    edgessl.pretrain(recipe=recipe, image_size=32, console=Console(file=out, width=200))
    assert out.getvalue().splitlines()[0] == f"Recipe: {recipe} sets epochs, lr (--image-size given over it)."
    out = io.StringIO()
    edgessl.pretrain(recipe="mobilenetv3_small_64px", quiet=True, console=Console(file=out, width=200))
    assert out.getvalue() == ""


def test_a_resume_that_shortens_the_run_says_its_learning_rate_falls_sooner(tmp_path):
    from types import SimpleNamespace

    from edgessl.workflows.pretrain import say_shorter

    (tmp_path / "encoder.json").write_text(json.dumps({"epochs_trained": 10}))
    lines = []
    say = lambda text, markup=True: lines.append(text)  # noqa: E731
    say_shorter(tmp_path, 200, SimpleNamespace(epochs=11), say)
    assert lines == ["--epochs 11 ends the run before the 200 it was set for: its learning rate follows the schedule "
                     "of a run of 11 epochs and falls to 0 by epoch 11."]
    for epochs in (10, 200, 300):  # nothing left to train, the length it was set for, an extension
        say_shorter(tmp_path, 200, SimpleNamespace(epochs=epochs), say)
    assert len(lines) == 1


def test_a_resumed_run_names_its_export_from_fewer_epochs(tmp_path):
    """A resume or extension had left run/export/ with the earlier encoder and said nothing."""
    from edgessl.workflows.pretrain import say_stale_export

    lines = []
    say = lambda text, markup=True: lines.append(text)  # noqa: E731
    say_stale_export(tmp_path, say)  # no export folder: nothing to say
    (tmp_path / "encoder.json").write_text(json.dumps({"epochs_trained": 12}))
    (tmp_path / "export").mkdir()
    entry = lambda epochs, classifier=None: {"file": "x.onnx", "source": {"epochs_trained": epochs,  # noqa: E731
                                                                          "classifier": classifier}}
    (tmp_path / "export" / "manifest.json").write_text(json.dumps({"models": [entry(12), entry(3, "clf")]}))
    say_stale_export(tmp_path, say)  # the encoder's export is current; a classifier's is its own
    assert lines == []
    (tmp_path / "export" / "manifest.json").write_text(json.dumps({"models": [entry(5), entry(1)]}))
    say_stale_export(tmp_path, say)
    assert lines == [f"{tmp_path / 'export'} holds the encoder exported after 5 epochs; the run has now trained 12: "
                     f"export it again (edgessl export {tmp_path})."]
    (tmp_path / "export" / "manifest.json").write_text("{not json")
    say_stale_export(tmp_path, say)
    assert len(lines) == 1


def test_a_run_started_with_init_names_its_weights_in_the_banner(finished, images, tmp_path):
    """--init had been named nowhere but encoder.json, and the bank line had said "the untrained network"."""
    res = runner.invoke(app, ["pretrain", "--data", str(images), "--init", str(finished), "--out",
                              str(tmp_path / "warm"), "--epochs", "1", "--batch-size", "8", "--workers", "1",
                              "--eval-every", "0"])
    assert res.exit_code == 0, res.output
    out = "".join(res.output.split())  # the console may fold a long path anywhere
    assert "".join((f"Init: weights of {finished.resolve()} (run; head new): its architecture comes with "
                    "them, stem included.").split()) in out
    assert "".join("Memory bank: 24 rows filled by a forward pass of the --init network".split()) in out


def test_a_config_files_own_method_settings_stand_above_the_method_preset(tmp_path):
    from edgessl.config import resolve

    cfg_file = tmp_path / "npid.yaml"
    cfg_file.write_text("method: npid\ntemperature: 0.07\nsd_weight: 0.5\n")
    cfg = resolve(config=str(cfg_file))
    assert (cfg.temperature, cfg.sd_weight, cfg.bank_update) == (0.07, 0.5, "momentum")
    cfg = resolve({"method": "npid"}, config=str(tmp_path / "npid.yaml"))  # switched on the command line: preset
    assert (cfg.temperature, cfg.sd_weight) == (0.1, 0.0)


# ---------------------------------------------------------------- 3. paths and data identity
def test_resume_refuses_a_different_folder_with_the_same_image_count(cut, images, tmp_path):
    run = shutil.copytree(cut, tmp_path / "run")
    twin = tmp_path / "twin"
    shutil.copytree(images, twin)
    victim = sorted(twin.glob("*.png"))[3]
    victim.unlink()
    shutil.copy2(sorted(demo_images().rglob("*.png"))[200], twin / "zzz_new.png")
    assert len(scan_images(twin)) == len(scan_images(images))
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--data", str(twin)]))
    assert line == (f"error: Cannot resume '{run}': '{twin}' does not hold the images it was trained on (from "
                    f"'{images}'): 1 file added (zzz_new.png), 1 file removed ({victim.name}). Pass --data with the "
                    "original files, or start a new run.")


def test_signature_names_changed_files():
    old = {"sha256": "a", "files": [["a.png", 10, 1], ["b.png", 10, 1], ["c.png", 10, 1]]}
    new = {"sha256": "b", "files": [["a.png", 11, 1], ["b.png", 10, 2], ["c.png", 10, 1]]}
    assert describe_difference(old, new) == "2 files changed (a.png, b.png)"
    assert describe_difference(old, dict(old)) == ""
    copied = {"sha256": "c", "files": [["a.png", 10, 5], ["b.png", 10, 5], ["c.png", 10, 5]]}  # cp -r: new times
    assert describe_difference(old, copied) == ("3 files changed (a.png, b.png, ...): the same sizes, other "
                                                "modification times (a copy that did not keep them, `cp -r` rather "
                                                "than `cp -a`?)")


@pytest.mark.slow
def test_config_stores_absolute_paths_and_resume_works_from_another_directory(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    copy_images(home / "my_images", 0, 24)
    copy_images(elsewhere / "my_images", 40, 24)  # a different folder of the same name and size
    monkeypatch.chdir(home)
    with pytest.raises(Stop):
        edgessl.pretrain(data="my_images", out="run", epochs=2, on_step=stop_at(1), **TINY)
    cfg = yaml.safe_load((home / "run" / "config.yaml").read_text())
    assert cfg["data"] == str(home / "my_images") and cfg["out"] == str(home / "run")
    monkeypatch.chdir(elsewhere)
    result = edgessl.pretrain(resume=str(home / "run"), quiet=True)
    assert result.data == home / "my_images" and load_checkpoint(home / "run")["epoch"] == 2


@pytest.mark.slow
def test_resume_accepts_a_moved_copy_of_the_same_files(tmp_path):
    data = copy_images(tmp_path / "before", 0, 24)
    with pytest.raises(Stop):
        edgessl.pretrain(data=str(data), out=str(tmp_path / "run"), epochs=2, on_step=stop_at(1), **TINY)
    moved = tmp_path / "after"
    data.rename(moved)
    line = one_line_error(runner.invoke(app, ["pretrain", "--resume", str(tmp_path / "run")]))
    assert line == (f"error: Cannot resume '{tmp_path / 'run'}': its data folder '{data}' does not exist any more. If "
                    "it moved, pass --data with its new location (the files are checked against the run's record).")
    res = runner.invoke(app, ["pretrain", "--resume", str(tmp_path / "run"), "--data", str(moved), "--quiet"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"] == str(moved)


def test_signature_ignores_the_root_but_not_the_files(tmp_path):
    a = copy_images(tmp_path / "a", 0, 5)
    b = tmp_path / "b"
    shutil.copytree(a, b)  # copy2: same sizes and mtimes
    sa, sb = folder_signature(a, scan_images(a)), folder_signature(b, scan_images(b))
    assert sa["sha256"] == sb["sha256"] and sa["root"] != sb["root"]
    os.utime(next(b.iterdir()), (1, 1))
    assert folder_signature(b, scan_images(b))["sha256"] != sa["sha256"]


# ---------------------------------------------------------------- 4. honest messages
@pytest.mark.slow
def test_interrupt_before_the_first_epoch_leaves_nothing(images, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as err:
        edgessl.pretrain(data=str(images), out=str(out), epochs=2, on_step=stop_at(0, 1, KeyboardInterrupt), **TINY)
    assert str(err.value) == (
        f"Interrupted before the first checkpoint: there is nothing to resume ({out} was removed)."
    )
    assert not out.exists()


@pytest.mark.slow
def test_a_failure_before_the_first_checkpoint_leaves_no_half_made_run(images, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="^a failing step$"):
        edgessl.pretrain(data=str(images), out=str(out), epochs=2,
                         on_step=stop_at(0, 1, lambda: RuntimeError("a failing step")), **TINY)
    assert not out.exists()  # the same command can run again
    edgessl.pretrain(data=str(images), out=str(out), epochs=1, **TINY)
    earlier = (out / "encoder.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="^a failing step$"):  # --overwrite had moved that run aside
        edgessl.pretrain(data=str(images), out=str(out), epochs=2, overwrite=True,
                         on_step=stop_at(0, 1, lambda: RuntimeError("a failing step")), **TINY)
    assert (out / "encoder.safetensors").read_bytes() == earlier  # back in its place
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]
    with pytest.raises(Interrupted) as err:
        edgessl.pretrain(data=str(images), out=str(out), epochs=2, overwrite=True,
                         on_step=stop_at(0, 1, KeyboardInterrupt), **TINY)
    assert str(err.value) == (f"Interrupted before the first checkpoint: there is nothing to resume (the earlier run "
                              f"is back in {out}).")
    assert (out / "encoder.safetensors").read_bytes() == earlier


@pytest.mark.slow
def test_a_run_started_with_init_resumes_when_its_source_is_gone_and_records_absolute_sources(images, tmp_path,
                                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    edgessl.pretrain(data=str(images), out="src", epochs=1, **TINY)
    with pytest.raises(Stop):
        edgessl.pretrain(data=str(images), out="run", epochs=2, init="src", on_step=stop_at(1, 0), **TINY)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["init"] == str(tmp_path / "src")  # from another folder a reloaded config still finds it
    record = json.loads((tmp_path / "run" / "encoder.json").read_text())["init"]
    shutil.rmtree(tmp_path / "src")  # its weights are in the run's checkpoint: a resume needs no --init source
    monkeypatch.chdir(images)
    edgessl.pretrain(resume=str(tmp_path / "run"), epochs=2, quiet=True)
    assert load_checkpoint(tmp_path / "run")["epoch"] == 2
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["init"] == record


@pytest.mark.slow
def test_interrupt_after_an_epoch_names_the_resume_command(images, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as err:
        edgessl.pretrain(data=str(images), out=str(out), epochs=3, on_step=stop_at(2, 0, KeyboardInterrupt), **TINY)
    assert str(err.value) == (f"Interrupted. 2 completed epochs checkpointed in {out}: continue with "
                              f"edgessl pretrain --resume {out}")


def test_cli_interrupt_exit_code_130(monkeypatch):
    def interrupted(**kwargs):
        raise Interrupted(
            "Interrupted. 1 completed epoch checkpointed in runs/x: continue with edgessl pretrain --resume runs/x"
        )

    monkeypatch.setattr(edgessl.api, "pretrain", interrupted)
    res = runner.invoke(app, ["pretrain"])
    assert res.exit_code == 130
    assert res.output.strip() == ("Interrupted. 1 completed epoch checkpointed in runs/x: continue with edgessl "
                                  "pretrain --resume runs/x")


@pytest.mark.parametrize("case", ["missing", "file", "no-checkpoint", "not-a-run"])
def test_resume_of_something_that_is_not_a_run(case, tmp_path):
    target = tmp_path / "target"
    expected = {
        "missing": f"error: Cannot resume '{target}': it does not exist.",
        "file": f"error: Cannot resume '{target}': it is a file, not a run directory.",
        "no-checkpoint": (f"error: Cannot resume '{target}': no epoch of it has completed (no checkpoint.pt). Start "
                          f"it again with --config {target / 'config.yaml'} --out {target} --overwrite."),
        "not-a-run": (f"error: Cannot resume '{target}': it is not an edgessl run directory "
                      "(no checkpoint.pt, no config.yaml)."),
    }[case]
    if case == "file":
        target.write_text("x")
    elif case != "missing":
        target.mkdir()
        (target / ("config.yaml" if case == "no-checkpoint" else "notes.txt")).write_text("epochs: 1\n")
    assert one_line_error(runner.invoke(app, ["pretrain", "--resume", str(target)])) == expected


def test_resume_of_a_finished_run_says_so(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "done")
    before = folder_hash(run)
    res = runner.invoke(app, ["pretrain", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert (f"Nothing to resume: {run} has completed all 1 epoch (encoder: {run / 'encoder.safetensors'})."
            in res.output)
    assert folder_hash(run) == before
    with pytest.raises(UserError, match="--resume continues a run and --overwrite starts a new one"):
        edgessl.pretrain(resume=str(run), overwrite=True)
    ckpt = load_checkpoint(run)  # a run longer than --epochs: said so, not "all N epochs" of the smaller number
    torch.save({**ckpt, "epoch": 3}, run / "checkpoint.pt")
    res = runner.invoke(app, ["pretrain", "--resume", str(run), "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert (f"Nothing to resume: {run} has completed 3 epochs, more than --epochs 2 (a larger --epochs continues it) "
            f"(encoder: {run / 'encoder.safetensors'})." in " ".join(res.output.split()))
    (run / "encoder.safetensors").unlink()  # deleted after training: it had named the very file that was missing
    res = runner.invoke(app, ["pretrain", "--resume", str(run), "--epochs", "3"])
    assert (f"Nothing to resume: {run} has completed all 3 epochs (but its encoder.safetensors is missing: --epochs "
            "4 trains one more epoch and writes the encoder again)." in " ".join(res.output.split()))


# ---------------------------------------------------------------- 6. smaller friction
def test_a_place_it_cannot_write_is_one_line_not_a_traceback(images, tmp_path):
    """An --out below a file (or on a read-only disk, or one it may not write) had ended in a Python traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = one_line_error(runner.invoke(app, ["pretrain", "--data", str(images), "--out", str(blocker / "run"),
                                              "--batch-size", "8", "--image-size", "32"]))
    assert line == (f"error: Not a directory: '{blocker / 'run'}'. edgessl could not write or read there: choose "
                    "another --out (or --cache-dir for the decoded-image cache; none keeps no cache), or check the "
                    "path and its permissions.")
    broken = tmp_path / "cache_link"  # a cache or run folder linked to a drive that is not mounted: a traceback
    broken.symlink_to(tmp_path / "not-mounted" / "cache")
    for flags in (["--cache-dir", str(broken), "--out", str(tmp_path / "r1")], ["--out", str(broken)]):
        line = one_line_error(runner.invoke(app, ["pretrain", "--data", str(images), "--batch-size", "8",
                                                  "--image-size", "32", *flags]))
        assert line.startswith(f"error: Broken symbolic link (to {tmp_path / 'not-mounted' / 'cache'}): '"), line
    with pytest.raises(UserError, match=r"^--cache-mb must be zero \(rows read from the disk cache\) or positive MiB, "
                                        r"not -1\.$"):
        edgessl.pretrain(data=str(images), out=str(tmp_path / "run"), epochs=1, cache_mb=-1, **TINY)
    with pytest.raises(UserError, match=r"^--cache-mb must be zero .* not nan\.$"):  # nan had been accepted
        edgessl.pretrain(data=str(images), out=str(tmp_path / "run"), epochs=1, cache_mb=float("nan"), **TINY)


def test_run_files_are_0644_and_classifier_too(finished, tmp_path):
    from edgessl.models.classifier import Classifier, save_classifier

    old = os.umask(0o022)
    try:
        for name in ("encoder.safetensors", "encoder.json", "config.yaml", "metrics.jsonl", "data.json",
                     "checkpoint.pt", "curves.png"):
            assert stat.S_IMODE((finished / name).stat().st_mode) == 0o644, name
        model = Classifier(edgessl.load_encoder(finished), 1024, 3)
        save_classifier(model, tmp_path / "clf", {"classes": ["a", "b", "c"]})
        assert stat.S_IMODE((tmp_path / "clf" / "classifier.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_version_and_flag_help():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"edgessl {edgessl.__version__}"
    res = runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "<bool>" not in res.output
    assert "--overwrite" in res.output and "--threads" in res.output


@pytest.mark.slow
def test_banner_singular_epoch_threads_and_next_commands(tmp_path):
    images = tmp_path / "labelled"
    for k, name in enumerate(("a", "b")):
        copy_images(images / name, 50 * k, 8)
    out = tmp_path / "run"
    res = runner.invoke(app, ["pretrain", "--data", str(images), "--epochs", "1", "--image-size", "32", "--batch-size",
                              "8", "--head-hidden", "32", "--feature-dim", "16", "--out", str(out), "--threads", "1",
                              "--labels-from-folders"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    banner = next(line for line in lines if line.startswith("edgessl pretrain "))
    assert "| 1 epoch |" in banner and "| 1 thread (--threads 1) |" in banner
    assert json.loads((out / "metrics.jsonl").read_text())["threads"] == 1
    # not a terminal: long lines are not wrapped at 80 columns
    assert len(banner) > 80 and f"run dir {out}" in banner
    assert f"  edgessl eval {out} --train {images} --test-fraction 0.2   # few-label kNN + linear probe" in lines
    assert any(line.startswith(f"  edgessl export {out}   #") for line in lines)


def test_curve_title_fits_the_figure():
    from edgessl.report.plots import curves_figure

    fig = curves_figure([{"epoch": 1, "loss": 1.0}], "mobilenetv3_small_100 - mobilenetv3_small-20261130-120000-2")
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    box = fig.get_window_extent(renderer)
    assert box.x0 <= title.x0 and title.x1 <= box.x1


def test_signature_of_a_folder_of_links(tmp_path):
    """Benchmarks build subsets as folders of symbolic links: files are named as listed, sized as their targets."""
    src = copy_images(tmp_path / "src", 0, 3)
    links = tmp_path / "links" / "cls"
    links.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        (links / f.name).symlink_to(f)
    sig = folder_signature(tmp_path / "links", scan_images(tmp_path / "links"))
    assert [f[0] for f in sig["files"]] == [f"cls/{p.name}" for p in sorted(src.iterdir())]
    assert [f[1] for f in sig["files"]] == [p.stat().st_size for p in sorted(src.iterdir())]


def test_curves_mark_a_resume_and_tick_whole_epochs():
    from edgessl.report.plots import curves_figure

    history = [{"epoch": e, "loss": 5.0 - e / 4, "knn_top1": 0.1 * e, **({"resumed": True} if e == 4 else {})}
               for e in range(1, 7)]
    fig = curves_figure(history)
    for ax in fig.axes:
        lines = [ln for ln in ax.get_lines() if ln.get_label() == "resumed"]
        assert len(lines) == 1 and list(lines[0].get_xdata()) == [3, 3]  # after epoch 3 was checkpointed
        assert "resumed" in [t.get_text() for t in ax.get_legend().get_texts()]
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 6]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_next_commands_quote_paths_and_guard_a_leading_dash():
    """`--out -run2` had printed `edgessl eval -run2 ...`, which fails with "No such option: -r"."""
    from types import SimpleNamespace

    from edgessl.commands.pretrain import next_commands

    lines = next_commands(SimpleNamespace(run_dir=Path("-run2"), data=Path("my images"), labelled=True))
    assert lines[1] == "  edgessl eval ./-run2 --train 'my images' --test-fraction 0.2   # few-label kNN + linear probe"
    assert lines[2].startswith("  edgessl export ./-run2   # ONNX + parity check; then edgessl check ./-run2/export/")


def test_curves_mark_where_the_smaller_widths_join_the_loss():
    """A --widths run's loss had jumped 4.9 -> 12.6 at --slow-start with nothing on the plot to say why."""
    from edgessl.report.plots import curves_figure

    history = [{"epoch": 1, "loss": 4.9}, {"epoch": 2, "loss": 12.6, "loss_ce_w0.5": 6.0},
               {"epoch": 3, "loss": 12.0, "loss_ce_w0.5": 5.8}]
    ax = curves_figure(history).axes[0]
    marks = [line for line in ax.get_lines() if line.get_label() == "smaller widths join the loss"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [1.5, 1.5]  # between epochs 1 and 2
    assert not [line for line in curves_figure(history[1:]).axes[0].get_lines() if "widths" in line.get_label()]


def test_a_resume_checks_its_checkpoints_batch_not_the_recorded_option(finished, tmp_path, monkeypatch):
    """A run started with --batch-size 9 (shrunk to 8) had been refused when resumed on 2 processes, the hint's
    --batch-size 8 then refused as another setting: the checkpoint's batch of 8 is what must divide."""
    from edgessl.train import distributed

    run = shutil.copytree(finished, tmp_path / "done")
    seen = []

    def checked(batch, world):
        seen.append(batch)
        raise UserError("checked")

    monkeypatch.setattr(distributed, "check_global_batch", checked)
    edgessl.pretrain(resume=str(run), quiet=True)  # "Nothing to resume": the option's batch was not checked
    assert seen == []  # the resume path's own check (resolve_batch with the checkpoint's batch) decides
    with pytest.raises(UserError, match="checked"):  # a new run's --batch-size still is, before anything else
        edgessl.pretrain(out=str(tmp_path / "new"), batch_size=9, quiet=True)
    assert seen == [9]
