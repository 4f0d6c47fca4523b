"""`edgessl slim`, `edgessl export --width`, the per-width report (widths.json, widths.png) and their errors.

One 2-epoch `--widths 1.0,0.5` run at 32 px on the tiny labelled demo split (train + --val test) serves every test
here (module fixture `slim_run`); tests that write into a run use a copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import edgessl
from edgessl.cli import app
from edgessl.models.backbone import read_encoder_meta

runner = CliRunner()
REPORT_KEYS = ["width", "params", "macs", "latency_ms", "knn_top1"]
SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def slim_run(labelled_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("slim") / "run"
    edgessl.pretrain(data=str(labelled_demo / "train"), labels_from_folders=True, val=str(labelled_demo / "test"),
                     out=str(out), epochs=2, image_size=SIZE, batch_size=8, head_hidden=64, feature_dim=16,
                     eval_every=0, quiet=True, workers=1, widths="1.0,0.5")
    return out


def _copy(run: Path, dst: Path) -> Path:
    """The files slimming reads (not the width-* folders or exports)."""
    dst.mkdir(parents=True)
    for name in ("encoder.safetensors", "encoder.json", "widths.safetensors", "config.yaml", "checkpoint.pt"):
        shutil.copy(run / name, dst / name)
    return dst


def _slimmable(run: Path):
    """The trained SlimmableEncoder, rebuilt from config.yaml + checkpoint.pt (independently of `edgessl slim`)."""
    import yaml

    from edgessl.models.backbone import create_backbone, output_dim
    from edgessl.models.head import Encoder, ProjectionHead
    from edgessl.models.slimmable import SlimmableEncoder
    from edgessl.train.checkpoint import load_checkpoint

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    meta = read_encoder_meta(run)
    backbone, _ = create_backbone(cfg["backbone"], small_input=meta["stem"] is not None)
    head = ProjectionHead(output_dim(backbone, SIZE), cfg["feature_dim"], cfg["head_hidden"], cfg["head"])
    model = SlimmableEncoder(Encoder(backbone, head), meta["widths"], torch.zeros(2, 3, SIZE, SIZE))
    model.load_state_dict(load_checkpoint(run, map_location="cpu")["model"])
    return model.eval()


def _real_images(folder: Path) -> torch.Tensor:
    from edgessl.data.augment import test_transform
    from edgessl.data.folder import decode_image
    from edgessl.data.signature import scan_images

    meta_mean, meta_std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    arrays = np.stack([decode_image(p, SIZE) for p in scan_images(folder)])
    return test_transform(torch.from_numpy(arrays).permute(0, 3, 1, 2), meta_mean, meta_std)


def _one_line_error(res, start: str):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), res.output
    assert "Traceback" not in res.output


# ------------------------------------------------------------------------------------------------ slim


@pytest.mark.slow
def test_slim_equals_the_width_subnetwork(slim_run, labelled_demo, tmp_path):
    out = tmp_path / "half"
    res = runner.invoke(app, ["slim", str(slim_run), "--width", "0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "width 0.5" in res.output and str(out) in " ".join(res.output.split())
    model = edgessl.load_encoder(out)  # rebuilt from timm + the stored channel counts
    full = edgessl.load_encoder(slim_run)
    meta = model.edgessl_meta
    assert meta["width"] == 0.5 and meta["pruned"] and meta["source_run"] == str(slim_run.resolve())
    assert "widths" not in meta and meta["timm_name"] == full.edgessl_meta["timm_name"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 0.5 * sum(p.numel() for p in full.parameters())
    x = torch.cat([_real_images(labelled_demo / "train"), torch.randn(4, 3, SIZE, SIZE)])
    slimmable = _slimmable(slim_run)
    with torch.no_grad():
        got, want = model(x), slimmable.features(x, 0.5)
        assert torch.equal(full(x), slimmable.features(x, 1.0))
    assert got.shape == want.shape == (len(x), meta["feature_dim"])
    assert meta["feature_dim"] < full.edgessl_meta["feature_dim"]
    assert (got - want).abs().max().item() <= 1e-5
    # the physically pruned layers really are smaller (not masked): some conv has fewer output channels
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    full_convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.out_channels for c in convs) < sum(c.out_channels for c in full_convs)
    # the report wrote the default folder during training, made from the same weights
    default = edgessl.load_encoder(slim_run / "width-0.5")
    assert all(torch.equal(a, b)
               for a, b in zip(default.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.mark.slow
def test_width_report_json_and_plot(slim_run):
    from edgessl.models.prune import count_params_macs

    entries = json.loads((slim_run / "widths.json").read_text())
    assert [e["width"] for e in entries] == [1.0, 0.5]
    for e in entries:
        assert list(e)[: len(REPORT_KEYS)] == REPORT_KEYS
        assert isinstance(e["params"], int) and isinstance(e["macs"], int) and e["latency_ms"] > 0
        assert 0.0 <= e["knn_top1"] <= 1.0 and 0.0 <= e["linear_top1"] <= 1.0  # labelled train + --val
        assert e["latency_runtime"]
    assert entries[1]["params"] < entries[0]["params"] and entries[1]["macs"] < entries[0]["macs"]
    half = edgessl.load_encoder(slim_run / "width-0.5")
    assert count_params_macs(half, torch.zeros(1, 3, SIZE, SIZE)) == (entries[1]["params"], entries[1]["macs"])
    assert (slim_run / "widths.png").stat().st_size > 0


@pytest.mark.slow
def test_width_report_without_labels_and_without_onnxruntime(slim_run, tmp_path, monkeypatch):
    from edgessl.deploy import onnx as ox
    from edgessl.deploy.widths import width_report

    run = _copy(slim_run, tmp_path / "run")
    monkeypatch.setattr(ox, "runtime_available", lambda: False)
    entries = width_report(run)
    assert [e["width"] for e in entries] == [1.0, 0.5]
    assert all(e["knn_top1"] is None and e["linear_top1"] is None for e in entries)
    assert all(e["latency_runtime"].startswith("pytorch") for e in entries)
    assert json.loads((run / "widths.json").read_text()) == entries
    assert (run / "widths.png").stat().st_size > 0 and (run / "width-0.5" / "encoder.json").is_file()


@pytest.mark.slow
def test_export_width_reuses_up_to_date_slim_and_passes_parity(slim_run, tmp_path, labelled_demo):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from edgessl.deploy import manifest as mf
    from edgessl.deploy import onnx as ox
    from edgessl.models.widths import ensure_slimmed

    run = _copy(slim_run, tmp_path / "run")
    res = runner.invoke(app, ["export", str(run), "--width", "0.5"])
    assert res.exit_code == 0, res.output
    assert "slimmed into" in res.output
    export = run / "width-0.5" / "export"
    entry = mf.find_entry(mf.read_manifest(export / "manifest.json"), "encoder.onnx")
    assert entry["parity"]["rel_max_abs_diff"] <= 1e-4 and entry["parity"]["min_cosine"] >= 0.99999
    meta = read_encoder_meta(run / "width-0.5")
    x = _real_images(labelled_demo / "test")
    out = ox.run(ox.session(export / "encoder.onnx"), x.numpy())
    with torch.no_grad():
        want = _slimmable(slim_run).features(x, 0.5).numpy()
    fig = ox.compare(want, out)
    assert out.shape[1] == meta["feature_dim"]
    assert fig["rel_max_abs_diff"] <= 1e-4 and fig["min_cosine"] >= 0.99999, (fig, entry)
    # up to date: reused; weights changed: slimmed again
    assert ensure_slimmed(run, 0.5)[1] is True
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "widths.safetensors"))
    key = next(k for k in state if k.endswith("running_mean"))
    state[key] = state[key] + 1.0
    save_file(state, str(run / "widths.safetensors"))
    assert ensure_slimmed(run, 0.5)[1] is False


@pytest.mark.slow
def test_eval_accepts_the_slimmed_folder(slim_run, labelled_demo, tmp_path):
    folder = tmp_path / "half"
    _slim(slim_run, folder)
    res = runner.invoke(app, ["eval", str(folder), "--train", str(labelled_demo / "train"), "--test",
                              str(labelled_demo / "test"), "--labels-per-class", "all", "--seeds", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads((folder / "eval.json").read_text())["results"]
    assert rows and all(0.0 <= r["top1"] <= 1.0 for r in rows)


def _slim(run: Path, folder: Path) -> Path:
    return edgessl.slim_encoder(run, 0.5, folder)  # the Python API


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.slow
def test_slim_and_export_bad_widths_are_one_line_exit_2(slim_run, demo_run, tmp_path):
    cases = [
        (["slim", str(slim_run), "--width", "0.3"],
         f"width 0.3 was not trained in '{slim_run}': its widths are 1, 0.5."),
        (["slim", str(slim_run), "--width", "1.5"], "a width must be in (0, 1], not 1.5."),
        (["slim", str(slim_run), "--width", "0"], "a width must be in (0, 1], not 0."),
        (["slim", str(demo_run), "--width", "0.5"], f"'{demo_run}' was not trained with --widths"),
        (["slim", str(tmp_path), "--width", "0.5"], f"No encoder in '{tmp_path}'"),
        (["slim", str(tmp_path / "nonexist"), "--width", "0.5"],  # had been "No encoder in" the missing folder
         f"'{tmp_path / 'nonexist'}' does not exist: pass a run directory of `edgessl pretrain`."),
        (["prune", str(demo_run), "--ratio", "0.5", "--out", str(demo_run), "--overwrite"],  # its report named itself
         f"--out '{demo_run}' is the run being pruned: the pruned encoder goes into a folder of its own (default "
         f"{demo_run / 'pruned-0.5'})."),
        (["slim", str(slim_run), "--width", "0.5", "--out", str(slim_run)], "the slimmed encoder cannot be written"),
        (["export", str(slim_run), "--width", "0.3"], f"width 0.3 was not trained in '{slim_run}'"),
        (["export", str(slim_run), "--width", "1.5"], "a width must be in (0, 1], not 1.5."),
    ]
    for args, start in cases:
        _one_line_error(runner.invoke(app, args), start)
    assert not (demo_run / "width-0.5").exists()
    # a slimmed folder is one width only
    folder = _slim(slim_run, tmp_path / "half")
    _one_line_error(runner.invoke(app, ["slim", str(folder), "--width", "0.5"]), f"'{folder}' holds a slimmed encoder")
    # --out holding another run or encoder: refused (it had replaced another run's encoder without a word); the
    # same width of the same run again refreshes it
    other = Path(shutil.copytree(demo_run, tmp_path / "other"))
    before = (other / "encoder.safetensors").read_bytes()
    _one_line_error(runner.invoke(app, ["slim", str(slim_run), "--width", "0.5", "--out", str(other)]),
                    f"--out '{other}' holds a run (checkpoint.pt)")
    (other / "checkpoint.pt").unlink()
    _one_line_error(runner.invoke(app, ["slim", str(slim_run), "--width", "0.5", "--out", str(other)]),
                    f"--out '{other}' holds another encoder (encoder.json, encoder.safetensors), not this run's width "
                    "0.5")
    assert (other / "encoder.safetensors").read_bytes() == before
    _one_line_error(runner.invoke(app, ["slim", str(slim_run), "--width", "1", "--out", str(folder)]),
                    f"--out '{folder}' holds another encoder")
    assert runner.invoke(app, ["slim", str(slim_run), "--width", "0.5", "--out", str(folder)]).exit_code == 0
    # a folder of other files, or a file where the folder would go: refused, nothing written
    (tmp_path / "labelled" / "train").mkdir(parents=True)
    _one_line_error(runner.invoke(app, ["slim", str(slim_run), "--width", "0.5", "--out", str(tmp_path / "labelled")]),
                    f"--out '{tmp_path / 'labelled'}' is a folder of other files")
    assert sorted(p.name for p in (tmp_path / "labelled").iterdir()) == ["train"]
    (tmp_path / "afile").write_text("hi")
    for out in (tmp_path / "afile", tmp_path / "afile" / "half"):
        _one_line_error(runner.invoke(app, ["slim", str(slim_run), "--width", "0.5", "--out", str(out)]),
                        f"--out '{out}': '{tmp_path / 'afile'}' is a file, not a folder; choose another --out.")


def test_slim_help_has_examples():
    res = runner.invoke(app, ["slim", "--help"])
    assert res.exit_code == 0 and "Examples" in res.output


# ------------------------------------------------------------------------------------------------ prune


@pytest.mark.slow
def test_prune_then_recover_writes_a_smaller_encoder_and_the_same_report(demo_run, labelled_demo, tmp_path):
    pytest.importorskip("torch_pruning")
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", str(demo_run), "--ratio", "0.5", "--epochs", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert f"Pruned encoder: {out}" in " ".join(res.output.split())
    small, full = edgessl.load_encoder(out), edgessl.load_encoder(demo_run)
    n_small, n_full = (sum(p.numel() for p in m.parameters()) for m in (small, full))
    assert n_small < 0.5 * n_full  # half the channels of every group: about a quarter of the weights
    meta = read_encoder_meta(out)
    assert meta["prune_ratio"] == 0.5 and meta["criterion"] == "magnitude" and meta["pruned"]
    # the loaded architecture is rebuilt from timm + the stored counts and runs at the training resolution
    assert small(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, meta["feature_dim"])
    entries = json.loads((out / "widths.json").read_text())
    assert [e["width"] for e in entries] == [1.0, 0.5]
    assert all(list(e)[:5] == REPORT_KEYS for e in entries)
    assert entries[1]["params"] == n_small and entries[0]["params"] == n_full
    assert (out / "widths.png").is_file() and (out / "metrics.jsonl").is_file()
    # a pruned run again: one line (its config.yaml builds the source architecture: it was a state-dict traceback)
    _one_line_error(runner.invoke(app, ["prune", str(out), "--ratio", "0.5", "--out", str(tmp_path / "again")]),
                    f"'{out}' is a pruned run (--ratio 0.5 of {demo_run}): prune the source run with a larger --ratio "
                    "instead.")
    # nor can it be resumed or extended (PyTorch's state-dict error, cut at its colon, had said "options changed")
    _one_line_error(runner.invoke(app, ["pretrain", "--resume", str(out), "--epochs", "3"]),
                    f"Cannot resume '{out}': it is a pruned run (edgessl prune), whose recovery distils from "
                    f"{demo_run}; a resume does not rebuild that. Prune again instead: edgessl prune {demo_run} "
                    f"--ratio 0.5 --out {out} --overwrite (with the --epochs you want).")


@pytest.mark.slow
def test_an_interrupted_prune_says_to_prune_again_not_to_resume(demo_run, tmp_path, monkeypatch):
    pytest.importorskip("torch_pruning")
    from edgessl.errors import Interrupted
    from edgessl.workflows import prune as prune_workflow

    def stopped(cfg, **kw):
        kept = f"Stopped by SIGTERM. 1 completed epoch checkpointed in {cfg.out}"
        raise Interrupted(f"{kept}: continue with edgessl pretrain --resume {cfg.out}", 143, kept=kept)

    monkeypatch.setattr(prune_workflow, "pretrain", stopped)
    out = tmp_path / "pruned"
    with pytest.raises(Interrupted) as e:
        edgessl.prune_encoder(demo_run, 0.5, epochs=1, out=out, quiet=True)
    assert e.value.exit_code == 143 and str(e.value) == (
        f"Stopped by SIGTERM. 1 completed epoch checkpointed in {out}. A pruned run cannot be resumed (its recovery "
        f"distils from {demo_run}): run the same edgessl prune again with --overwrite.")


@pytest.mark.slow
def test_prune_taylor_and_bad_options(demo_run, tmp_path):
    pytest.importorskip("torch_pruning")
    result = edgessl.prune_encoder(demo_run, 0.25, "taylor", epochs=1, out=tmp_path / "taylor", quiet=True)
    assert result.report[1]["params"] < result.report[0]["params"]
    _one_line_error(runner.invoke(app, ["prune", str(demo_run), "--ratio", "1.0"]), "--ratio must be in (0, 1)")
    _one_line_error(runner.invoke(app, ["prune", str(demo_run), "--ratio", "0.5", "--criterion", "random"]),
                    "--criterion must be magnitude or taylor")
    _one_line_error(runner.invoke(app, ["prune", str(demo_run), "--ratio", "0.5", "--epochs", "0"]),
                    "--epochs must be positive, not 0 (leave it out for a quarter of the run's epochs).")
    _one_line_error(runner.invoke(app, ["prune", str(demo_run), "--ratio", "0.5", "--threads", "0"]),
                    "--threads must be auto or a positive number, not '0'.")  # had run, then broken config.yaml
    again = tmp_path / "taylor"  # prune has no --resume: the refusal does not advise it
    _one_line_error(runner.invoke(app, ["prune", str(demo_run), "--ratio", "0.25", "--out", str(again)]),
                    f"--out '{again}' already holds a run: pass another --out, or pass --overwrite to move it aside")
    _one_line_error(runner.invoke(app, ["prune", str(tmp_path), "--ratio", "0.5"]),
                    f"'{tmp_path}' is not a pretraining run")
    moved = Path(shutil.copytree(demo_run, tmp_path / "moved"))  # its images gone: named as config.yaml names them
    config = (moved / "config.yaml").read_text()
    data = next(line for line in config.splitlines() if line.startswith("data:")).split(": ", 1)[1]
    (moved / "config.yaml").write_text(config.replace(f"data: {data}", f"data: {tmp_path / 'gone'}"))
    _one_line_error(runner.invoke(app, ["prune", str(moved), "--ratio", "0.5", "--out", str(tmp_path / "p")]),
                    f"the run's training folder '{tmp_path / 'gone'}' (data in its config.yaml) is gone: prune trains "
                    "the pruned encoder on it again. Put the images back there, then prune.")
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_resnet18_widths_export_with_parity(labelled_demo, tmp_path):
    """The issue's second backbone: a resnet18 --widths run (CIFAR stem at 32 px), every sub-width exported."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from edgessl.deploy import manifest as mf

    run = tmp_path / "r18"
    edgessl.pretrain(data=str(labelled_demo / "train"), out=str(run), backbone="resnet18", epochs=1, image_size=SIZE,
                     batch_size=8, feature_dim=16, eval_every=0, quiet=True, workers=1, widths="1.0,0.5,0.25",
                     slow_start=0)
    for w in ("0.5", "0.25"):
        res = runner.invoke(app, ["export", str(run), "--width", w])
        assert res.exit_code == 0, res.output
        entry = mf.find_entry(mf.read_manifest(run / f"width-{w}" / "export" / "manifest.json"), "encoder.onnx")
        assert entry["parity"]["rel_max_abs_diff"] <= 1e-4 and entry["parity"]["min_cosine"] >= 0.99999
        assert read_encoder_meta(run / f"width-{w}")["feature_dim"] == {"0.5": 256, "0.25": 128}[w]


def test_a_ratio_that_leaves_groups_whole_is_warned_about():
    """--ratio 0.999 had pruned nothing (every group would have fallen below 8 channels) and reported success; now
    every group keeps at least one channel, which the warning says."""
    from edgessl.workflows.prune import shallow_prune

    assert shallow_prune(0.5, 392_448 / 1_517_856) is None and shallow_prune(0.9, 36_752 / 1_517_856) is None
    assert shallow_prune(0.999, 0.02) == ("--ratio 0.999 kept 2% of the parameters, more than 1 - ratio: every "
                                          "channel group keeps at least one channel and the layers outside the "
                                          "groups stay whole.")


def test_a_full_width_copy_made_from_earlier_weights_is_made_again(slim_run, tmp_path):
    """`slim RUN --width 1` writes RUN/width-1/; after a --resume the width report re-slimmed the other widths but
    left that copy with the old weights."""
    from edgessl.deploy.widths import refresh_full_copy
    from edgessl.models.widths import is_up_to_date, slim_encoder, source_digest

    run = _copy(slim_run, tmp_path / "run")
    folder = slim_encoder(run, 1.0)
    assert folder == run / "width-1" and is_up_to_date(folder, run, 1.0)
    meta = json.loads((folder / "encoder.json").read_text())
    (folder / "encoder.json").write_text(json.dumps({**meta, "source_digest": "earlier weights"}))
    refresh_full_copy(run)
    assert read_encoder_meta(folder)["source_digest"] == source_digest(run, 1.0)
    refresh_full_copy(tmp_path / "none")  # no copy: nothing to do
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_a_signal_during_prunes_report_says_the_encoder_is_complete(demo_run, tmp_path, monkeypatch):
    """SIGTERM after "Done." had ended with a bare "Stopped by SIGTERM.": nothing said the encoder was whole."""
    pytest.importorskip("torch_pruning")
    from edgessl.errors import Terminated
    from edgessl.workflows import prune as prune_mod

    def stopped(*args, **kwargs):
        raise Terminated()

    monkeypatch.setattr(prune_mod, "encoders_report", stopped)
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", str(demo_run), "--ratio", "0.5", "--epochs", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 143, res.output
    assert " ".join(res.output.split()).endswith(
        f"Stopped by SIGTERM during the report: the pruned encoder in {out} is complete; only its comparison with the "
        "source (widths.json, widths.png) is missing.")
    assert edgessl.load_encoder(out) is not None and not (out / "widths.json").exists()
