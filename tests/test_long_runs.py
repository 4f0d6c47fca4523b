"""Long runs on a real machine: SIGTERM checkpoints the step it stops at (exit 143) and the resume continues bit for
bit; --checkpoint-every checkpoints inside an epoch, so a kill -9 in the middle of one loses only the last minutes."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import edgessl
from edgessl.errors import Interrupted
from edgessl.train.checkpoint import load_checkpoint

TINY = dict(image_size=32, batch_size=4, head_hidden=32, feature_dim=16, quiet=True, workers=1, eval_every=0,
            deterministic=True, seed=3, negatives=10)  # 24 images: 6 steps per epoch; 10 < 24: sampled columns


def _same_run(a_dir, b_dir, a_history, b_history):
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"] == 0
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5), k
    assert torch.allclose(a["method"]["bank.weight"], b["method"]["bank.weight"], atol=1e-5)
    assert [r["loss"] for r in a_history] == pytest.approx([r["loss"] for r in b_history], abs=1e-5)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_it_stops_at_and_the_resume_matches_a_straight_run(tiny_data, tmp_path):
    full = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "full"), epochs=3, **TINY)

    def term(info):
        if info.epoch == 1 and info.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; the handler only asks the loop to stop

    with pytest.raises(Interrupted) as stopped:
        edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "cut"), epochs=3, on_step=term, **TINY)
    assert stopped.value.exit_code == 143
    assert str(stopped.value) == (f"Stopped by SIGTERM. 1 completed epoch and 2 steps of epoch 2 checkpointed in "
                                  f"{tmp_path / 'cut'}: continue with edgessl pretrain --resume {tmp_path / 'cut'}")
    assert stopped.value.kept == (f"Stopped by SIGTERM. 1 completed epoch and 2 steps of epoch 2 checkpointed in "
                                  f"{tmp_path / 'cut'}")  # what prune says before its own advice
    cut = load_checkpoint(tmp_path / "cut")
    assert (cut["epoch"], cut["step"]) == (1, 2) and cut["meter"]["seen"] == 8
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    resumed = edgessl.pretrain(resume=str(tmp_path / "cut"), quiet=True)
    _same_run(full.run_dir, resumed.run_dir, full.history, resumed.history)
    assert [bool(r.get("resumed")) for r in resumed.history] == [False, True, False]  # curves.png marks epoch 2


def _checkpoint_step(run):
    try:
        ckpt = load_checkpoint(run)
    except (OSError, RuntimeError, EOFError):
        return None
    return ckpt["epoch"], ckpt["step"]


@pytest.mark.slow
def test_a_kill_9_inside_an_epoch_resumes_from_the_mid_epoch_checkpoint(tiny_data, tmp_path):
    opts = dict(TINY, batch_size=2)  # 12 steps per epoch
    full = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "full"), epochs=4, **opts)
    run = tmp_path / "cut"
    flags = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}" for k, v in opts.items()]
    cmd = [sys.executable, "-m", "edgessl", "pretrain", "--data", str(tiny_data), "--out", str(run), "--epochs", "4",
           "--checkpoint-every", "0.0005", *" ".join(flags).split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, where = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        where = _checkpoint_step(run)
        if where is not None and where[0] >= 1 and where[1] > 0:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert where is not None and where[1] > 0, f"no mid-epoch checkpoint seen: {where}, {proc.stderr.read()[-500:]}"
    resumed = edgessl.pretrain(resume=str(run), quiet=True)
    _same_run(full.run_dir, resumed.run_dir, full.history, resumed.history)


@pytest.mark.slow
def test_the_cli_exits_143_on_sigterm_with_the_resume_line(tiny_data, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgessl", "pretrain", "--data", str(tiny_data), "--out", str(run), "--epochs", "50",
           "--image-size", "32", "--batch-size", "4", "--head-hidden", "32", "--feature-dim", "16", "--quiet",
           "--eval-every", "0", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Stopped by SIGTERM.") and lines[0].endswith(
        f"continue with edgessl pretrain --resume {run}")
    assert _checkpoint_step(run)[0] >= 1


@pytest.mark.slow
def test_removing_or_fixing_skipped_files_never_blocks_a_resume(tiny_data, tmp_path):
    import shutil

    from edgessl.errors import UserError

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    cls = sorted(p for p in data.iterdir() if p.is_dir())[0]
    (cls / "empty.png").write_bytes(b"")
    (cls / "notes.jpg").write_text("not an image")
    (cls / "broken.png").write_bytes(b"\x89PNG broken")
    opts = dict(TINY, epochs=1)
    edgessl.pretrain(data=str(data), out=str(tmp_path / "run"), **opts)
    (cls / "empty.png").unlink()  # as the warning invites
    (cls / "notes.jpg").unlink()
    shutil.copy(next(p for p in sorted(cls.iterdir()) if p.suffix == ".png" and p.stat().st_size > 100),
                cls / "broken.png")  # fixed: readable now, but the run never trained on it
    resumed = edgessl.pretrain(resume=str(tmp_path / "run"), epochs=2, quiet=True)
    assert len(resumed.history) == 2 and load_checkpoint(resumed.run_dir)["num_images"] == 24
    again = edgessl.pretrain(resume=str(tmp_path / "run"), epochs=3, quiet=True)  # the record keeps them skipped
    assert len(again.history) == 3
    trained = next(p for p in sorted(cls.iterdir()) if p.name not in ("broken.png",))
    trained.write_bytes(trained.read_bytes() + b"\0")  # any other change still refuses, as before
    with pytest.raises(UserError, match=r"does not hold the images it was trained on .*1 file changed"):
        edgessl.pretrain(resume=str(tmp_path / "run"), epochs=4, quiet=True)


@pytest.mark.slow
def test_extending_a_finished_run_follows_the_schedule_of_the_longer_run(tiny_data, tmp_path, monkeypatch):
    """--resume RUN --epochs 3 on a 2-epoch run: no warm-up again; every step of epoch 3 gets the learning rate a
    3-epoch run has there (the cosine re-stretched over 3 epochs)."""
    import edgessl.train.run as run_module

    optimizers = []
    real = run_module.new_state

    def spying(*a, **k):
        state = real(*a, **k)
        optimizers.append(state.optimizer)
        return state

    monkeypatch.setattr(run_module, "new_state", spying)

    def lr_of(into):
        return lambda info: into.append((info.epoch, info.step, optimizers[-1].param_groups[0]["lr"]))

    straight, extended = [], []
    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "long"), epochs=3, on_step=lr_of(straight), **TINY)
    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "short"), epochs=2, **TINY)
    edgessl.pretrain(resume=str(tmp_path / "short"), epochs=3, on_step=lr_of(extended), quiet=True)
    third = [x for x in straight if x[0] == 2]
    assert len(third) == 6 and [x[:2] for x in extended] == [x[:2] for x in third]
    assert [x[2] for x in extended] == pytest.approx([x[2] for x in third], rel=1e-6)
    assert load_checkpoint(tmp_path / "short")["epoch"] == 3


def test_a_restored_state_takes_the_learning_rate_of_its_own_schedule():
    """The first step after an extension already runs at the longer schedule's rate (not the last rate of the shorter
    run that the optimiser's checkpoint holds)."""
    from edgessl.train.optim import warmup_cosine
    from edgessl.train.state import TrainState

    def state(total):
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.4)
        return TrainState(model, None, opt, warmup_cosine(opt, 2, total), torch.amp.GradScaler("cpu", enabled=False),
                          4)

    short = state(10)
    for _ in range(10):
        short.optimizer.step()
        short._advance_schedule()
    ckpt = short.checkpoint(8, {}, 1)
    assert short.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # the end of its cosine
    longer = state(20)
    longer.restore(ckpt, None, 8)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 8 / 18)))


def test_eval_and_finetune_refuse_split_folders_as_classes(tmp_path, demo_run):
    from typer.testing import CliRunner

    from edgessl.cli import app

    for split in ("train", "test"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
    for command in ("eval", "finetune"):
        res = CliRunner().invoke(app, [command, str(demo_run), "--train", str(tmp_path / "data"), "--test-fraction",
                                       "0.2"])
        assert res.exit_code == 2 and res.output.strip() == (
            f"error: --train '{tmp_path / 'data'}' holds the split folders test, train, not class folders: pass the "
            f"split itself, e.g. --train {tmp_path / 'data' / 'train'} --test {tmp_path / 'data' / 'test'}.")


@pytest.mark.slow
def test_eval_keeps_an_earlier_eval_and_names_the_classes(run_copy, labelled_demo):
    from typer.testing import CliRunner

    from edgessl.cli import app

    args = ["eval", str(run_copy), "--train", str(labelled_demo / "train"), "--test", str(labelled_demo / "test"),
            "--labels-per-class", "1", "--seeds", "1"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "3 classes: activities, animals_and_nature, flags" in first.output
    before = (run_copy / "eval.json").read_text()
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "An earlier eval.json is kept as eval.old-" in second.output
    kept = sorted(run_copy.glob("eval.old-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == before and len(list(run_copy.glob("eval.old-*.png"))) == 1


@pytest.mark.slow
def test_threads_follow_the_load_between_steps_and_metrics_log_the_change(tiny_data, tmp_path, monkeypatch):
    """A governor with scripted readings: a competitor arrives during epoch 1 and leaves in epoch 2; the count
    changes between steps (as torch sees it), each change is printed and logged in that epoch's metrics row."""
    import json

    from edgessl.train import run as run_module

    seen, load = [], {"others": 0.0}

    def competitor(info):
        load["others"] = 1.0 if (info.epoch, info.step) >= (0, 2) and info.epoch == 0 else 0.0

    monkeypatch.setattr(run_module, "thread_governor", _scripted_governor(seen, lambda looks: load["others"]))
    opts = {**TINY, "deterministic": False}
    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "run"), epochs=2, on_step=competitor, **opts)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert seen == [1, 2]
    assert rows[0]["thread_changes"] == [{"epoch": 1, "step": 3, "threads": 1, "other_cores": 1.0}]
    assert rows[1]["thread_changes"] == [{"epoch": 2, "step": 1, "threads": 2, "other_cores": 0.0}]
    assert rows[0]["threads"] == 1 and rows[1]["threads"] == 2


def _scripted_governor(seen: list, others):
    """A ThreadGovernor factory whose every look is due (10 s apart) and sees other work keep others(looks so far)
    cores busy beside this run's one; `seen` collects the counts it applies."""
    from edgessl import runtime
    from edgessl.runtime import ThreadChoice

    load = {"looks": 0, "t": 0.0, "busy": 0.0, "total": 0.0, "cpu": 0.0}

    def clock():
        load["looks"] += 1
        load["t"] += 10.0
        load["busy"] += min(2.0, others(load["looks"]) + 1.0) * 1000
        load["total"] += 2000
        load["cpu"] += 10.0
        return load["t"]

    def governor(choice, deterministic=False):
        return runtime.ThreadGovernor(ThreadChoice(2, "auto: machine idle"), True, base=2, cores=2,
                                      counters=lambda: (load["busy"], load["total"]), own_cpu=lambda: load["cpu"],
                                      clock=clock, apply=seen.append)

    return governor


def test_eval_and_embed_follow_the_load_between_batches(demo_run, run_copy, labelled_demo, tmp_path, monkeypatch):
    """eval and embed (a run directory's encoder) let the governor look between batches and fits: a competitor
    that arrives midway drops the count to 1, printed ('from batch N') and, for eval, listed in eval.json."""
    import json

    import edgessl
    from edgessl.workflows import embed_sources
    from edgessl.workflows import eval as eval_workflow

    seen, lines = [], []
    from_second_look = lambda looks: 1.0 if looks > 1 else 0.0  # noqa: E731  a competitor takes one core
    monkeypatch.setattr(eval_workflow, "thread_governor", _scripted_governor(seen, from_second_look))
    edgessl.evaluate_encoder(run_copy, labelled_demo / "train", test_fraction=0.34, seeds=1, labels_per_class="1",
                             cache=False)
    report = json.loads((run_copy / "eval.json").read_text())
    assert seen == [1] and report["thread_changes"] == [{"step": 2, "threads": 1, "other_cores": 1.0}]

    seen.clear()
    monkeypatch.setattr(embed_sources, "thread_governor", _scripted_governor(seen, from_second_look))
    edgessl.embed(demo_run, data=str(labelled_demo / "train"), out=str(tmp_path / "e.npz"), batch_size=8,
                  say=lines.append)
    assert seen == [1] and lines == ["CPU: 1 thread (auto: 1.0 of 2 cores busy with other work) from batch 2"]


@pytest.mark.slow
def test_curves_are_drawn_after_the_first_and_last_epochs_and_when_a_run_stops(tiny_data, tmp_path, monkeypatch):
    """curves.png costs ~0.8 s to draw: between the first and the last epoch at most every PLOT_SECONDS; a run that
    stops early (here Ctrl-C in epoch 3 of 4) still leaves it showing every finished epoch."""
    import edgessl.train.output as output

    drawn = []
    monkeypatch.setattr(output, "plot_curves", lambda history, path, title: drawn.append(len(history)))
    monkeypatch.setattr(output, "PLOT_SECONDS", 1e9)
    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "full"), epochs=3, **TINY)
    assert drawn == [1, 3]
    monkeypatch.setattr(output, "PLOT_SECONDS", 0.0)
    drawn.clear()
    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "every"), epochs=3, **TINY)
    assert drawn == [1, 2, 3]

    def stop(info):
        if info.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(output, "PLOT_SECONDS", 1e9)
    drawn.clear()
    with pytest.raises(Interrupted):
        edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "cut"), epochs=4, on_step=stop, **TINY)
    assert drawn == [1, 2]  # epoch 1, then the two finished epochs when it stopped
    drawn.clear()
    edgessl.pretrain(resume=str(tmp_path / "cut"), quiet=True)
    assert drawn == [3, 4]  # the resume's first epoch and its last


@pytest.mark.slow
def test_a_stop_after_the_last_epoch_leaves_nothing_unwritten_for_the_resume(tiny_data, tmp_path, monkeypatch):
    """A Ctrl-C after the last epoch's checkpoint (written first) and before its encoder and metrics had left those a
    epoch behind, and the resume had found "nothing to resume": the checkpoint is written last now."""
    import json

    from edgessl.train import output

    real, calls = output.save_encoder, []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the epoch-2 files are written
        return real(*args, **kwargs)

    monkeypatch.setattr(output, "save_encoder", stopped_at_the_second)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        edgessl.pretrain(data=str(tiny_data), out=str(run), epochs=2, **TINY)
    assert "1 completed epoch checkpointed" in str(e.value) and load_checkpoint(run)["epoch"] == 1
    monkeypatch.setattr(output, "save_encoder", real)
    edgessl.pretrain(resume=str(run))
    assert json.loads((run / "encoder.json").read_text())["epochs_trained"] == 2
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_sigterm_stops_a_run_whose_epochs_are_one_step(tiny_data, tmp_path):
    """With one step per epoch there is no step between steps, where the stop was looked for: SIGTERM had been
    ignored to the end. It stops at the epoch's end now, checkpointed."""
    def term(info):
        if info.epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    import shutil

    few = tmp_path / "few"  # 12 images at batch 8: one step per epoch
    for path in sorted(tiny_data.rglob("*.png"))[:12]:
        (few / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, few / path.parent.name / path.name)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        edgessl.pretrain(data=str(few), out=str(run), epochs=4, on_step=term, **{**TINY, "batch_size": 8})
    assert e.value.exit_code == 143 and load_checkpoint(run)["epoch"] == 1
    assert str(e.value) == (f"Stopped by SIGTERM. 1 completed epoch checkpointed in {run}: continue with edgessl "
                            f"pretrain --resume {run}")


def test_a_damaged_checkpoint_is_one_line_that_says_what_is_left(tmp_path):
    """A truncated checkpoint.pt had been a traceback from torch.load (OSError: Invalid argument)."""
    from edgessl.errors import UserError

    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 1, "model": {"w": torch.zeros(1000)}}, ckpt)
    assert load_checkpoint(tmp_path)["epoch"] == 1
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    (tmp_path / "encoder.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    message = str(e.value)
    assert message.startswith(f"'{ckpt}' is damaged or not an edgessl checkpoint (")
    assert message.endswith("): nothing can be resumed from it; its encoder of the last finished epoch is there: start "
                            f"a new run from it with --init {tmp_path}.")
    torch.save([1, 2], ckpt)
    with pytest.raises(UserError, match=r"\(no epoch\): nothing can be resumed"):
        load_checkpoint(tmp_path)


def test_init_from_a_run_whose_checkpoint_is_damaged_takes_its_encoder_and_a_new_head(tmp_path):
    """--init RUN, the advice for a damaged checkpoint, reads the head from that checkpoint when it can."""
    from edgessl.models.head import _run_head

    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    assert _run_head(torch.nn.Linear(2, 2), tmp_path) == "new (its checkpoint.pt is unreadable)"


def test_a_second_resume_of_a_run_in_training_is_refused(tmp_path):
    """Two resumes of one run had both trained it, writing the same checkpoint and metrics."""
    from edgessl.rundir import run_lock

    code = ("import sys\nfrom edgessl.rundir import run_lock\nfrom edgessl.errors import UserError\n"
            "try:\n    with run_lock(sys.argv[1]): print('got it')\nexcept UserError as e: print(e)")
    with run_lock(tmp_path):
        held = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert held.stdout.strip() == (f"'{tmp_path}' is in use: another edgessl process is training it. Wait for that "
                                   "one to end (or stop it), then resume.")
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert free.stdout.strip() == "got it" and list(tmp_path.iterdir()) == []  # released; nothing written
    with run_lock(None), run_lock(tmp_path / "gone"):  # nothing to lock: the resume's own checks speak
        pass


def test_overwrite_refuses_a_folder_another_process_is_training(tmp_path):
    """--overwrite had moved a training run aside: it went on writing into the new run's folder, whose config.yaml
    said 1 epoch beside its 12-epoch checkpoint, and the new run's own result was lost."""
    from edgessl.errors import UserError
    from edgessl.rundir import check_out, claim, in_use, run_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"x")
    code = ("import sys, time\nfrom edgessl.rundir import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert in_use(run)
        with pytest.raises(UserError) as e:
            check_out(run, overwrite=True)
        assert str(e.value) == (f"--out '{run}' is in use: another edgessl process is training it. Wait for that one "
                                "to end (or stop it) before --overwrite moves it aside, or pass another --out.")
        with pytest.raises(UserError):
            claim(run, overwrite=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing moved
    finally:
        holder.kill()
        holder.wait()
    assert not in_use(run) and claim(run, overwrite=True).moved_to is not None  # free: moved aside as before
    with run_lock(tmp_path / "gone"):
        assert not in_use(tmp_path / "gone")


@pytest.mark.slow
def test_a_resume_writes_back_a_missing_config_from_the_checkpoint(tiny_data, tmp_path):
    """A run whose config.yaml was deleted had been a dead end ("its config.yaml is missing")."""
    import json

    run = tmp_path / "run"
    edgessl.pretrain(data=str(tiny_data), out=str(run), epochs=1, **TINY)
    before = (run / "config.yaml").read_text()
    (run / "config.yaml").unlink()
    edgessl.pretrain(resume=str(run), epochs=2)
    settings = lambda text: [x for x in text.splitlines()[1:] if x.split(":")[0] not in ("epochs", "quiet")]  # noqa: E731
    assert settings((run / "config.yaml").read_text()) == settings(before)  # all but how long and how it prints
    assert json.loads((run / "encoder.json").read_text())["epochs_trained"] == 2


@pytest.mark.slow
def test_a_run_in_training_cannot_be_resumed_by_another_process(tiny_data, tmp_path):
    """The first process of a run held no lock: a resume started beside it would have trained the same folder."""
    code = ("import sys\nfrom edgessl.rundir import run_lock\nfrom edgessl.errors import UserError\n"
            "try:\n    with run_lock(sys.argv[1]): print('got it')\nexcept UserError as e: print(e)")
    run, seen = tmp_path / "run", []

    def probe(info):
        if info.epoch == 1 and info.step == 0:  # after the first checkpoint: a resume would be possible
            seen.append(subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True,
                                       text=True).stdout.strip())

    edgessl.pretrain(data=str(tiny_data), out=str(run), epochs=2, on_step=probe, **TINY)
    assert seen == [f"'{run}' is in use: another edgessl process is training it. Wait for that one to end (or stop "
                    "it), then resume."]
    after = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True)
    assert after.stdout.strip() == "got it"  # released when pretraining returned


def test_a_resume_without_its_data_record_says_the_folder_is_checked_by_count_only(tmp_path):
    """data.json deleted: a resume on a folder with one image swapped for another had gone on without a word."""
    from edgessl.train.prepare import check_same_data

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"x")
    said = []
    check_same_data(run, {"root": str(tmp_path), "files": [], "sha256": "0"}, warn=said.append)
    assert said == [f"{run / 'data.json'} is missing, so only the number of images is checked against the run's "
                    "training folder: an image replaced by another would go unnoticed (the resume writes a new "
                    "record)."]


def test_a_finished_run_without_its_checkpoint_is_not_sent_to_overwrite(tmp_path):
    """checkpoint.pt deleted from a finished run: the refusal had advised --overwrite, which moves the run aside."""
    from edgessl.rundir import resume_problem

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "encoder.safetensors", "encoder.json"):
        (run / name).write_text("x")
    assert resume_problem(run) == (f"Cannot resume '{run}': its checkpoint.pt is missing, so its training cannot "
                                   f"continue. Its encoder is whole: use it as it is, or start a new run from it with "
                                   f"--init {run}.")
    (run / "encoder.safetensors").unlink()  # a run killed in its first epoch: started again, as before
    assert resume_problem(run).startswith(f"Cannot resume '{run}': no epoch of it has completed")
