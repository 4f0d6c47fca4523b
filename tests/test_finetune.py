"""`edgessl finetune`: outputs, reloadable classifier with the same logits, frozen backbone, early stopping, errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import edgessl
from edgessl.cli import app
from edgessl.data import augment
from edgessl.data.folder import load_image_folder
from edgessl.evaluate.finetune import EarlyStopping, finetune_tag, param_groups
from edgessl.models.classifier import Classifier

runner = CliRunner()


@pytest.fixture()
def run_copy(demo_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(demo_run, dst)
    return dst


def _test_batch(folder, meta):
    images = load_image_folder(folder, meta["image_size"], labels=True)
    return augment.test_transform(images.images, meta["mean"], meta["std"]), images


@pytest.mark.slow
def test_finetune_outputs_and_classifier_reproduces_logits(run_copy, labelled_demo):
    train, test = labelled_demo / "train", labelled_demo / "test"
    result = edgessl.finetune(run_copy, train, test, labels_per_class=3, epochs=3, batch_size=4, patience=5,
                              quiet=True)
    out = run_copy / "finetune-lpc3"
    assert result.out_dir == out
    for name in ("classifier.safetensors", "classifier.json", "metrics.json", "confusion.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["classes"] == ["activities", "animals_and_nature", "flags"] and meta["num_classes"] == 3
    assert meta["train_data"] == str(train.resolve())
    assert meta["input_size"] == [3, 32, 32] and len(meta["mean"]) == 3 and len(meta["std"]) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("top1", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert set(metrics["per_class"]) == set(meta["classes"])
    assert all({"precision", "recall", "f1", "support"} <= set(v) for v in metrics["per_class"].values())
    # 3 labels of each class, round(0.2 * 3) = 1 of each held out for early stopping
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (6, 3, 9)
    assert sum(map(sum, metrics["confusion"])) == 9 and metrics["early_stopping"] is True
    # the kept epoch is the best held-out (lowest loss, then higher top-1, then earliest) of the history
    hist = metrics["history"]
    best = max(range(len(hist)), key=lambda i: (-hist[i]["val_loss"], hist[i]["val_top1"], -i))
    assert metrics["best_epoch"] == best + 1 and metrics["epochs_run"] == len(hist) == 3

    loaded = edgessl.load_classifier(out)
    assert loaded.edgessl_meta["classes"] == meta["classes"] and not loaded.training
    x, images = _test_batch(test, meta)
    with torch.no_grad():
        logits = loaded(x)
        assert torch.allclose(logits, result.model(x), atol=1e-5)
    top1 = float((logits.argmax(dim=1) == images.labels).float().mean())
    assert top1 == pytest.approx(metrics["top1"])
    # the same fine-tuning again: the earlier one is kept aside (it had been overwritten), never lost
    first = (out / "classifier.safetensors").read_bytes()
    edgessl.finetune(run_copy, train, test, labels_per_class=3, epochs=1, batch_size=4, quiet=True)
    kept = list(run_copy.glob("finetune-lpc3.old-*"))
    assert len(kept) == 1 and (kept[0] / "classifier.safetensors").read_bytes() == first


@pytest.mark.slow
def test_frozen_finetune_via_cli_leaves_the_encoder_untouched(run_copy, labelled_demo):
    res = runner.invoke(app, ["finetune", str(run_copy), "--train", str(labelled_demo / "train"),
                              "--test-fraction", "0.34", "--labels-per-class", "all", "--epochs", "2",
                              "--freeze-backbone", "--quiet"])
    assert res.exit_code == 0, res.output
    out = run_copy / "finetune-all-frozen"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["freeze_backbone"] is True and metrics["split"]["test_fraction"] == 0.34
    assert metrics["n_test"] == 5 and metrics["n_train"] + metrics["n_val"] == 10
    encoder = load_file(str(run_copy / "encoder.safetensors"))
    classifier = load_file(str(out / "classifier.safetensors"))
    for k, v in encoder.items():  # weights and BatchNorm running statistics alike
        assert torch.equal(classifier[f"backbone.{k}"], v), k
    assert set(classifier) == {f"backbone.{k}" for k in encoder} | {"fc.weight", "fc.bias"}


def test_early_stopping_keeps_best_and_waits_patience():
    stop = EarlyStopping(patience=2)
    seen = []
    for epoch, score in enumerate([(0.5, -1.0), (0.6, -1.0), (0.6, -0.9), (0.6, -0.95), (0.55, 0.0)], start=1):
        seen.append((stop.update(epoch, score), stop.stop))
    assert seen == [(True, False), (True, False), (True, False), (False, False), (False, True)]
    assert stop.best_epoch == 3 and stop.best == (0.6, -0.9)


def test_a_fine_tuning_still_improving_at_its_end_says_more_epochs_may_help():
    """A NEU-DET fine-tuning had ended at 'best epoch 30/30', its held-out loss still falling, without a word."""
    from edgessl.workflows.finetune import still_improving

    falling = [{"val_loss": v} for v in (0.9, 0.8, 0.75, 0.71)]
    assert still_improving(falling, 4)
    assert not still_improving(falling, 3)  # an earlier epoch was best: it had settled
    assert not still_improving(falling[:2], 2)  # too short to tell
    assert not still_improving([{"val_loss": v} for v in (0.8, 0.81, 0.7)], 3)  # not falling throughout
    assert not still_improving([{"train_loss": 1.0}] * 3, 3)  # no held-out images


def test_param_groups_scale_the_backbone_lr():
    model = Classifier(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5)), 5, 3)
    groups = param_groups(model, 1e-3, 0.1, freeze_backbone=False)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-3), ("backbone", pytest.approx(1e-4))]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g["name"] for g in param_groups(model, 1e-3, 0.1, freeze_backbone=True)] == ["head"]
    tags = [finetune_tag(10, False), finetune_tag(None, False), finetune_tag(1, True)]
    assert tags == ["lpc10", "all", "lpc1-frozen"]


def test_finetune_bad_input_is_one_line_exit_2(run_copy, labelled_demo, tmp_path):
    train, test = str(labelled_demo / "train"), str(labelled_demo / "test")
    no_encoder = tmp_path / "not_a_run"
    no_encoder.mkdir()
    cases = [
        ([str(run_copy), "--train", train, "--test", test, "--labels-per-class", "0"],
         "--labels-per-class must be at least 1 (or 'all'), not 0."),
        ([str(run_copy), "--train", train, "--test", test, "--labels-per-class", "5,10"],
         "finetune takes one --labels-per-class value (a number or 'all'), not '5,10'."),
        ([str(run_copy), "--train", train, "--test", test, "--labels-per-class", "40"],
         "--labels-per-class 40: no class of --train has that many images (the largest has 6). "
         "Use a smaller value or 'all'."),
        ([str(no_encoder), "--train", train, "--test", test],
         f"No encoder in '{no_encoder}': expected encoder.safetensors and encoder.json "
         "(a run directory of `edgessl pretrain`)."),
        ([str(run_copy), "--train", train, "--test", test, "--test-fraction", "0.2"],
         "Give either --test (a folder) or --test-fraction (split --train), not both."),
        ([str(run_copy), "--train", train, "--test", test, "--labels-per-class", "3", "--out", str(run_copy)],
         f"--out '{run_copy}' holds a run or an encoder (checkpoint.pt): choose another --out (fine-tuning writes "
         "classifier.safetensors, metrics.json and confusion.png into its own folder)."),
    ]
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "encoder.onnx").write_bytes(b"onnx")
    cases.append(([str(run_copy), "--train", train, "--test", test, "--labels-per-class", "3", "--out", str(exported)],
                  f"--out '{exported}' holds an ONNX export (encoder.onnx): choose another --out (fine-tuning writes "
                  "classifier.safetensors, metrics.json and confusion.png into its own folder)."))
    for args, message in cases:
        res = runner.invoke(app, ["finetune", *args, "--quiet"])
        assert res.exit_code == 2, res.output
        assert [line for line in res.output.splitlines() if line.strip()] == [f"error: {message}"], res.output
    assert not list(run_copy.glob("finetune-*"))


def test_finetune_help_has_examples():
    res = runner.invoke(app, ["finetune", "--help"])
    assert res.exit_code == 0 and "Examples" in res.output
    for flag in ("--train", "--test", "--labels-per-class", "--epochs", "--freeze-backbone"):
        assert flag in res.output, flag


def test_finetune_and_eval_warn_of_skipped_files_even_when_quiet(run_copy, labelled_demo, tmp_path):
    """finetune had skipped unreadable files without a word; eval's warning had been hidden by --quiet."""
    data = tmp_path / "data"
    shutil.copytree(labelled_demo, data)
    cls = sorted(p.name for p in (data / "train").iterdir())[0]
    (data / "train" / cls / "corrupt.png").write_bytes(b"not a png")
    (data / "test" / cls / "half.png").write_bytes(b"\x89PNG\r\n")
    res = runner.invoke(app, ["finetune", str(run_copy), "--train", str(data / "train"), "--test", str(data / "test"),
                              "--labels-per-class", "2", "--epochs", "1", "--batch-size", "4", "--workers", "1",
                              "--cache-dir", "none", "--quiet"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert [line.split(", first: ")[0] for line in lines] == [
        "warning: --train: skipped 1 unreadable file(s)", "warning: --test: skipped 1 unreadable file(s)"]
    assert f"{cls}/corrupt.png" in lines[0] and f"{cls}/half.png" in lines[1]
    res = runner.invoke(app, ["eval", str(run_copy), "--train", str(data / "train"), "--test", str(data / "test"),
                              "--labels-per-class", "2", "--seeds", "1", "--workers", "1", "--cache-dir", "none",
                              "--quiet"])
    assert res.exit_code == 0, res.output
    assert [line.split(", first: ")[0] for line in res.output.splitlines() if line.strip()] == [
        "warning: --train: skipped 1 unreadable file(s)", "warning: --test: skipped 1 unreadable file(s)"]


@pytest.mark.slow
def test_a_signal_during_fine_tuning_says_nothing_was_written_and_the_earlier_output_stands(run_copy, labelled_demo,
                                                                                           monkeypatch):
    """SIGTERM had printed a bare "Stopped by SIGTERM.": nothing said whether the earlier fine-tuning was touched."""
    from edgessl.errors import Terminated
    from edgessl.workflows import finetune as finetune_mod

    def stopped(*args, **kwargs):
        raise Terminated()

    earlier = run_copy / "finetune-all-frozen"
    earlier.mkdir()
    (earlier / "metrics.json").write_text("{}")
    monkeypatch.setattr(finetune_mod, "train_classifier", stopped)
    res = runner.invoke(app, ["finetune", str(run_copy), "--train", str(labelled_demo / "train"), "--test-fraction",
                              "0.34", "--labels-per-class", "all", "--epochs", "2", "--freeze-backbone", "--quiet"])
    assert res.exit_code == 143, res.output
    assert " ".join(res.output.split()) == (
        f"Stopped by SIGTERM: a fine-tuning writes nothing until its last epoch, so nothing was written; the earlier "
        f"{earlier} is as it was. Run the same command again.")
    assert [p.name for p in earlier.iterdir()] == ["metrics.json"] and len(list(run_copy.glob("finetune-*"))) == 1


def test_the_confusion_title_fits_the_figure():
    """A 2-class plot titled with a long run name had cut the title off at 'test top-1 4'."""
    from edgessl.report.eval_plots import confusion_figure

    title = "mobilenetv3_small_100 - mobilenetv3_small-20261130-120000 - finetune-lpc1-frozen: test top-1 45.0%"
    fig = confusion_figure([[3, 1], [2, 4]], ["a", "b"], title)
    renderer = fig.canvas.get_renderer()
    box, text = fig.get_window_extent(renderer), fig._suptitle.get_window_extent(renderer)
    assert fig._suptitle.get_text().replace("\n", " ") == title and box.x0 <= text.x0 and text.x1 <= box.x1


def test_per_class_scores_of_a_class_without_test_images_are_null_not_zero():
    """A class with no test image had reported recall 0.0 (and precision 0.0 when never predicted)."""
    from edgessl.evaluate.finetune import per_class_rows

    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 0]])  # b: no test image, predicted once; c: never right
    rows = per_class_rows(cm, ["a", "b", "c"])
    assert rows["a"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert rows["b"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}  # predicted once, wrongly
    assert rows["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per_class_rows(torch.tensor([[2, 0], [0, 0]]), ["a", "b"])["b"]["precision"] is None  # never predicted
