"""Opening a run directory or a weights file never runs code: a planted pickle that would create a file is refused with
one line (exit 2) by --init, --teacher, --resume and prune, and the file is never created. Checkpoints hold only
tensors and plain values; one written by edgessl 0.2 (numpy's RNG state as an array) still loads and resumes."""

import random
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgessl.cli import app
from edgessl.errors import UserError
from edgessl.fileio import safe_torch_load
from edgessl.train.checkpoint import load_checkpoint, rng_state, set_rng_state

runner = CliRunner()
SMALL = ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--head-hidden", "32", "--feature-dim", "16",
         "--eval-every", "0", "--quiet", "--workers", "1"]


class Planted:
    """Unpickled by a loader that runs code, it creates `marker` (open(marker, "w"))."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker, payload=None):
    """Write `payload` (default: an empty checkpoint-like dict) with a Planted object inside to `path`."""
    torch.save({**(payload or {"model": {}}), "extra": Planted(marker)}, path)


def test_the_plant_is_live_and_safe_torch_load_refuses_it(tmp_path):
    marker, path = tmp_path / "created", tmp_path / "evil.pt"
    plant(path, marker)
    torch.load(path, weights_only=False)  # what edgessl 0.2 did with checkpoint.pt
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError) as e:
        safe_torch_load(path, "--init")
    assert "GLOBAL io.open" in str(e.value) and "never runs code" in str(e.value)
    assert "\n" not in str(e.value) and not marker.exists()


@pytest.fixture
def planted_run(demo_run, tmp_path):
    """A copy of the demo run whose checkpoint.pt also carries a Planted object (the rest of it intact)."""
    run = tmp_path / "shared-run"
    shutil.copytree(demo_run, run)
    marker = tmp_path / "created"
    plant(run / "checkpoint.pt", marker, load_checkpoint(run))
    return run, marker


def _refused(res, marker):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "GLOBAL io.open" in lines[0], res.output
    assert not marker.exists()


def test_init_resume_and_prune_refuse_a_planted_checkpoint(planted_run, labelled_demo, tmp_path):
    run, marker = planted_run
    data = str(labelled_demo / "train")
    _refused(runner.invoke(app, ["pretrain", "--init", str(run), "--data", data, "--out", str(tmp_path / "a"),
                                 *SMALL]), marker)
    _refused(runner.invoke(app, ["pretrain", "--resume", str(run), "--epochs", "2", "--quiet"]), marker)
    _refused(runner.invoke(app, ["prune", str(run), "--ratio", "0.5", "--epochs", "1", "--quiet"]), marker)


@pytest.mark.slow
def test_init_and_teacher_refuse_a_planted_weights_file(demo_run, labelled_demo, tmp_path):
    marker, weights = tmp_path / "created", tmp_path / "weights.pth"
    plant(weights, marker, {"state_dict": {"conv.weight": torch.zeros(1)}})
    data = str(labelled_demo / "train")
    _refused(runner.invoke(app, ["pretrain", "--init", str(weights), "--data", data, "--out", str(tmp_path / "a"),
                                 *SMALL]), marker)
    _refused(runner.invoke(app, ["pretrain", "--teacher", str(weights), "--teacher-backbone", "mobilenetv3_small_100",
                                 "--data", data, "--out", str(tmp_path / "b"), *SMALL]), marker)


def test_checkpoint_rng_state_is_plain_and_restores_every_generator():
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = rng_state()
    assert isinstance(state["numpy"], dict) and isinstance(state["python"]["internal"], torch.Tensor)
    expected = (torch.rand(2), np.random.rand(2), random.random(), np.random.standard_normal())
    set_rng_state(state)
    again = (torch.rand(2), np.random.rand(2), random.random(), np.random.standard_normal())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_a_checkpoint_of_edgessl_0_2_still_loads_and_restores(tmp_path):
    """edgessl 0.2 stored numpy's RNG state as a tuple holding an array, and Python's as a tuple: both load through
    the numpy allow-list (no other object) and restore the generators."""
    np.random.seed(11)
    random.seed(12)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save({"epoch": 3, "rng": old}, tmp_path / "checkpoint.pt")
    expected = (np.random.rand(3), random.random())
    loaded = load_checkpoint(tmp_path)
    assert loaded["epoch"] == 3
    set_rng_state(loaded["rng"])
    assert np.array_equal(np.random.rand(3), expected[0]) and random.random() == expected[1]
