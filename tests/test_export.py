"""`edgessl export`: parity of the exported encoder and classifier, int8/fp16 bounds, the manifest, the exporter
fallback and the bad-input errors. One short pretraining run and one export of each model serve every test here
and in test_device_check.py (the `exports` fixture of conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edgessl.deploy import manifest as mf  # noqa: E402
from edgessl.deploy import onnx as ox  # noqa: E402
from edgessl.errors import UserError  # noqa: E402
from edgessl.fileio import sha256_file  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # what pretraining writes into encoder.json

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _images(folder: Path, size: int = 32) -> np.ndarray:
    """Real images preprocessed by edgessl itself (decode_image + test_transform)."""
    from edgessl.data.augment import test_transform
    from edgessl.data.folder import decode_image
    from edgessl.data.signature import scan_images

    arrays = np.stack([decode_image(p, size) for p in scan_images(folder)])
    return test_transform(torch.from_numpy(arrays).permute(0, 3, 1, 2), MEAN, STD).numpy()


def _entry(export: Path, file: str) -> dict:
    manifest = mf.read_manifest(export / "manifest.json")
    entry = mf.find_entry(manifest, file)
    assert entry is not None, f"{file} not in manifest"
    return entry


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    return ox.run(ox.session(path), x)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.slow
def test_encoder_fp32_parity(exports):
    from edgessl.models.backbone import load_encoder

    entry = _entry(exports["export"], "encoder.onnx")
    assert entry["precision"] == "fp32" and entry["kind"] == "encoder"
    assert entry["parity"]["images"] >= 64
    assert entry["parity"]["rel_max_abs_diff"] <= 1e-4 and entry["parity"]["min_cosine"] >= 0.99999
    assert entry["exporter"] in (ox.DYNAMO, ox.TORCHSCRIPT)
    # independent re-check on the real images, with two batch sizes (dynamic batch axis)
    x = _images(exports["data"])
    with torch.no_grad():
        ref = load_encoder(exports["run"])(torch.from_numpy(x)).numpy()
    sess = ox.session(exports["export"] / "encoder.onnx")
    name = sess.get_inputs()[0].name
    assert name == entry["input"]["name"] and sess.get_outputs()[0].name == entry["output"]["name"] == "features"
    out = np.concatenate([sess.run(None, {name: x[:1]})[0], sess.run(None, {name: x[1:]})[0]])
    fig = ox.compare(ref, out)
    assert fig["rel_max_abs_diff"] <= 1e-4 and fig["min_cosine"] >= 0.99999
    assert out.shape == (len(x), entry["output"]["shape"][1])


@pytest.mark.slow
def test_classifier_fp32_parity_and_top1(exports):
    from edgessl.models.classifier import load_classifier

    entry = _entry(exports["export"], "classifier.onnx")
    assert entry["kind"] == "classifier" and entry["output"]["name"] == "logits"
    assert entry["classes"] == sorted(p.name for p in exports["data"].iterdir())
    assert entry["parity"]["top1_agreement"] == 1.0
    x = _images(exports["data"])
    with torch.no_grad():
        ref = load_classifier(exports["classifier"])(torch.from_numpy(x)).numpy()
    out = _run_onnx(exports["export"] / "classifier.onnx", x)
    fig = ox.compare(ref, out, logits=True)
    assert fig["rel_max_abs_diff"] <= 1e-4 and fig["min_cosine"] >= 0.99999 and fig["top1_agreement"] == 1.0
    assert "accuracy" in entry["comparison"]  # folders are named like the classes


@pytest.mark.slow
def test_int8_runs_within_bound(exports):
    from edgessl.models.backbone import load_encoder

    entry = _entry(exports["export"], "encoder.int8.onnx")
    bound = ox.BOUNDS["int8"]
    assert entry["precision"] == "int8" and entry["bounds"] == bound
    assert entry["parity"]["min_cosine"] >= bound["min_cosine"]
    x = _images(exports["data"])
    with torch.no_grad():
        ref = load_encoder(exports["run"])(torch.from_numpy(x)).numpy()
    out = _run_onnx(exports["export"] / "encoder.int8.onnx", x)
    cos = ox.cosines(ref, out)
    assert cos.min() >= bound["min_cosine"] and cos.mean() >= bound["mean_cosine"]
    comp = entry["comparison"]
    assert comp["size_ratio"] < 0.5 and comp["latency_ratio"] > 0
    assert comp["latency_verdict"] in ("faster", "slower", "no clear difference")
    assert set(comp["knn_accuracy"]) >= {"fp32", "int8", "fp16"}  # the data has class folders
    assert entry["conversion"]["format"] == "QDQ" and entry["conversion"]["per_channel"] is True
    import onnx

    ops = {n.op_type for n in onnx.load(str(exports["export"] / "encoder.int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    clf = _entry(exports["export"], "classifier.int8.onnx")
    assert clf["parity"]["min_cosine"] >= bound["min_cosine"] and "top1_agreement" in clf["parity"]


@pytest.mark.slow
def test_fp16_within_bound(exports):
    entry = _entry(exports["export"], "encoder.fp16.onnx")
    assert entry["precision"] == "fp16"
    assert entry["parity"]["rel_max_abs_diff"] <= ox.BOUNDS["fp16"]["rel_max_abs_diff"]
    assert entry["parity"]["min_cosine"] >= ox.BOUNDS["fp16"]["min_cosine"]
    sess = ox.session(exports["export"] / "encoder.fp16.onnx")
    assert sess.get_inputs()[0].type == "tensor(float)"  # float32 input kept


# ------------------------------------------------------------------------------------------------ manifest


@pytest.mark.slow
def test_manifest_round_trip(exports):
    export = exports["export"]
    raw = json.loads((export / "manifest.json").read_text())
    manifest = mf.read_manifest(export / "manifest.json")
    assert manifest == raw
    import edgessl

    assert manifest["edgessl_version"] == edgessl.__version__
    files = {m["file"] for m in manifest["models"]}
    # the classifier export kept the encoder's entries in the same manifest
    assert files == {"encoder.onnx", "encoder.int8.onnx", "encoder.fp16.onnx",
                     "classifier.onnx", "classifier.int8.onnx"}
    for entry in manifest["models"]:
        assert entry["precision"] in ("fp32", "int8", "fp16")
        assert entry["sha256"] == sha256_file(export / entry["file"])
        assert isinstance(entry["parity"]["max_abs_diff"], float) and isinstance(entry["parity"]["min_cosine"], float)
        assert entry["input"] == {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW",
                                  "channels": "RGB"}
        pre = entry["preprocess"]
        assert pre["mean"] == MEAN and pre["std"] == STD and pre["background"] == [255, 255, 255]
        assert pre["resize_policy"] == mf.RESIZE_POLICY and pre["image_size"] == 32
        assert entry["exporter"] in (ox.DYNAMO, ox.TORCHSCRIPT) and entry["output"]["meaning"]
        assert (export / entry["reference"]).is_file()
    with np.load(export / "encoder.reference.npz") as ref:
        assert ref["images"].dtype == np.uint8 and ref["images"].shape[1:] == (32, 32, 3)
        assert ref["outputs"].shape[0] == ref["images"].shape[0] == len(ref["paths"]) >= 24
    # rewriting keeps unchanged entries and drops entries whose file changed since
    copy = export.parent / "manifest-copy"
    shutil.copytree(export, copy)
    entry = mf.find_entry(manifest, "classifier.onnx")
    (copy / "encoder.fp16.onnx").write_bytes(b"changed")
    mf.write_manifest(copy, [entry], manifest["source"])
    again = mf.read_manifest(copy / "manifest.json")
    assert {m["file"] for m in again["models"]} == files - {"encoder.fp16.onnx"}
    shutil.rmtree(copy)

    # each file names the export that wrote it: the encoder's none, the classifier's its folder
    sources = {m["file"]: m["source"] for m in manifest["models"]}
    assert sources["encoder.onnx"]["classifier"] is None and sources["encoder.int8.onnx"]["classifier"] is None
    assert sources["classifier.onnx"]["classifier"] == manifest["source"]["classifier"] is not None
    assert sources["encoder.onnx"]["run"] == sources["classifier.onnx"]["run"] == str(exports["run"].resolve())


def test_read_manifest_rejects_non_manifest(tmp_path):
    from edgessl.errors import UserError

    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        mf.read_manifest(tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps({"models": [{"file": "x.onnx"}]}))
    with pytest.raises(UserError, match="lacks precision, sha256, parity"):
        mf.read_manifest(tmp_path / "m.json")


# ------------------------------------------------------------------------------------------------ exporter


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


def test_torchscript_fallback_is_used_and_recorded(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("torch.export cannot trace this")

    monkeypatch.setenv(ox.EXPORTER_ENV, "dynamo")  # the default order (conftest.py sets torchscript)
    monkeypatch.setattr(ox, "_export_dynamo", broken)
    path = tmp_path / "tiny.onnx"
    assert ox.export_model(_tiny(), path, 8, 17) == ox.TORCHSCRIPT
    ox.check_model(path)
    assert ox.model_opset(path) == 17
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = _tiny()(torch.from_numpy(x)).numpy()
    assert ox.compare(ref, _run_onnx(path, x))["rel_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("value, first", [(None, "dynamo"), ("", "dynamo"), ("dynamo", "dynamo"),
                                          ("TorchScript", "torchscript")])
def test_exporter_order_follows_the_environment(tmp_path, monkeypatch, value, first):
    tried = []

    def fake(name):
        def export(model, example, path, *args):
            tried.append(name)
            Path(path).write_bytes(b"")
        return export

    monkeypatch.setattr(ox, "_export_dynamo", fake("dynamo"))
    monkeypatch.setattr(ox, "export_torchscript", fake("torchscript"))
    if value is None:
        monkeypatch.delenv(ox.EXPORTER_ENV, raising=False)
    else:
        monkeypatch.setenv(ox.EXPORTER_ENV, value)
    expected = ox.DYNAMO if first == "dynamo" else ox.TORCHSCRIPT
    assert ox.export_model(_tiny(), tmp_path / "t.onnx", 8, 18) == expected and tried == [first]
    tried.clear()
    assert ox.export_model(_tiny(), tmp_path / "t.onnx", 8, 18, fast=True) == ox.TORCHSCRIPT  # timing-only files
    assert tried == ["torchscript"]


def test_an_unknown_exporter_is_one_line(tmp_path, monkeypatch):
    from edgessl.errors import UserError

    monkeypatch.setenv(ox.EXPORTER_ENV, "tflite")
    with pytest.raises(UserError) as err:
        ox.export_model(_tiny(), tmp_path / "t.onnx", 8, 18)
    assert str(err.value) == "EDGESSL_ONNX_EXPORTER='tflite': use dynamo (the default) or torchscript."


@pytest.mark.slow
def test_the_default_exporter_is_torch_export_with_parity(demo_run, tmp_path, monkeypatch):
    """The product's default path (the other export tests run TorchScript first, ~1 s instead of ~20 s)."""
    import edgessl

    monkeypatch.delenv(ox.EXPORTER_ENV, raising=False)
    edgessl.export(demo_run, out=tmp_path / "out", quiet=True)
    entry = _entry(tmp_path / "out", "encoder.onnx")
    assert entry["exporter"] == ox.DYNAMO
    assert entry["parity"]["rel_max_abs_diff"] <= 1e-4 and entry["parity"]["min_cosine"] >= 0.99999


def test_both_exporters_failing_is_one_line(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no\nmore lines")

    monkeypatch.setattr(ox, "_export_dynamo", broken)
    monkeypatch.setattr(ox, "export_torchscript", broken)
    with pytest.raises(ox.ValidationFailed) as err:
        ox.export_model(_tiny(), tmp_path / "t.onnx", 8, 18)
    assert "\n" not in str(err.value) and "both exporters" in str(err.value)
    assert not (tmp_path / "t.onnx").exists()


def test_parity_bounds_fail_with_exit_code_3():
    ref = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    fig = ox.compare(ref, ref + 1e-3)
    assert ox.failed_bounds(fig, "fp32") and not ox.failed_bounds(fig, "fp16")
    with pytest.raises(ox.ValidationFailed, match="does not match PyTorch") as err:
        ox.assert_within_bounds(fig, "fp32", "encoder.onnx")
    assert err.value.exit_code == 3
    flipped = ref.copy()
    flipped[0] = -flipped[0]
    assert ox.compare(ref, flipped, logits=True)["top1_agreement"] == 7 / 8
    tie = np.array([[1.0, 1.0 - 1e-7, 0.0]], dtype=np.float32)  # a numerical near-tie may flip
    assert ox.compare(tie, tie[:, [1, 0, 2]], logits=True)["top1_real_disagreements"] == 0


def test_parity_figures_match_device_check():
    """ox.cosines is export/device_check.py's; ox.compare (which adds output_scale and top1_real_disagreements)
    agrees with the script's compare on every figure both report."""
    from edgessl.scripts import device_check_module

    dc = device_check_module()
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((8, 5)).astype(np.float32)
    out = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    ref[0] = out[0] = 0.0  # two all-zero rows count as identical
    cos = ox.cosines(ref, out)
    np.testing.assert_array_equal(cos, dc.cosines(ref, out))
    assert cos[0] == 1.0 and cos.dtype == np.float64
    for logits in (False, True):
        mine, theirs = ox.compare(ref, out, logits=logits), dc.compare(ref, out, logits)
        assert {k: mine[k] for k in theirs} == theirs


# ------------------------------------------------------------------------------------------------ bad input


def _cli(*args: str):
    from edgessl.cli import app

    return CliRunner().invoke(app, list(args))


def _one_line_error(result, code: int, *needles: str) -> None:
    err = result.stderr if hasattr(result, "stderr") else result.output
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_error_run_without_encoder(tmp_path):
    _one_line_error(_cli("export", str(tmp_path)), 2, "No encoder in")


@pytest.mark.slow
def test_error_opset_onnx_cannot_write(exports):
    _one_line_error(_cli("export", str(exports["run"]), "--opset", str(ox.max_opset() + 1)), 2,
                    "cannot be written by the installed onnx")
    _one_line_error(_cli("export", str(exports["run"]), "--opset", "3"), 2, "--opset 3")
    _one_line_error(_cli("export", str(exports["run"]), "--int8", "--opset", "12"), 2,
                    "--int8 needs --opset 13 or higher (per-channel int8: DequantizeLinear's axis), not 12; "
                    "leave --opset out for 18.")


@pytest.mark.slow
def test_error_calibration_folder_without_readable_image(exports, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "broken.png").write_bytes(b"not a png at all")
    (calib / "empty.jpg").write_bytes(b"")
    _one_line_error(_cli("export", str(exports["run"]), "--int8", "--calib", str(calib), "--out", str(tmp_path / "x")),
                    2, "--calib", "no readable image")
    _one_line_error(_cli("export", str(exports["run"]), "--int8", "--calib", str(tmp_path / "missing")),
                    2, "does not exist")
    (tmp_path / "nothing").mkdir()
    _one_line_error(_cli("export", str(exports["run"]), "--int8", "--calib", str(tmp_path / "nothing")), 2,
                    "holds no image files")


@pytest.mark.slow
def test_error_bad_classifier_folder(exports, demo_run, tmp_path):
    _one_line_error(_cli("export", str(exports["run"]), "--classifier", str(tmp_path)), 2, "No classifier in")
    clf = exports["classifier"]  # fine-tuned from exports["run"]: another run would be named in the manifest
    _one_line_error(_cli("export", str(demo_run), "--classifier", str(clf), "--out", str(tmp_path / "x")), 2,
                    f"--classifier '{clf}' was fine-tuned from the run '{exports['run']}', not '{demo_run}'",
                    f"edgessl export {exports['run']} --classifier {clf}")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_error_training_folder_gone(exports, tmp_path):
    run = tmp_path / "moved"
    run.mkdir()
    for name in ("encoder.safetensors", "encoder.json"):
        shutil.copy(exports["run"] / name, run / name)
    (run / "config.yaml").write_text(f"data: {tmp_path / 'gone'}\n")
    _one_line_error(_cli("export", str(run)), 2, "no longer exists", "--images")


@pytest.mark.slow
def test_error_unknown_calibration_method(exports, tmp_path):
    _one_line_error(_cli("export", str(exports["run"]), "--int8", "--calib-method", "median", "--out", str(tmp_path)),
                    2, "--calib-method must be one of")


@pytest.mark.slow
def test_torchscript_fallback_end_to_end(exports, tmp_path, monkeypatch):
    """When torch.export fails the TorchScript exporter writes the file, the manifest says so, and a file that
    misses its parity bounds is removed with exit code 3."""
    def broken(*args, **kwargs):
        raise RuntimeError("torch.export cannot trace this")

    monkeypatch.setenv(ox.EXPORTER_ENV, "dynamo")
    monkeypatch.setattr(ox, "_export_dynamo", broken)
    out = tmp_path / "ts"
    result = _cli("export", str(exports["run"]), "--out", str(out), "--quiet")
    assert result.exit_code == 0, result.output
    entry = _entry(out, "encoder.onnx")
    assert entry["exporter"] == ox.TORCHSCRIPT and entry["parity"]["min_cosine"] >= 0.99999
    monkeypatch.setitem(ox.BOUNDS, "fp32", {"rel_max_abs_diff": 1e-4, "min_cosine": 1.5})
    failing = tmp_path / "fail"
    _one_line_error(_cli("export", str(exports["run"]), "--out", str(failing)),
                    3, "does not match PyTorch", "min_cosine")
    assert not (failing / "encoder.onnx").exists()


def test_an_export_folder_of_another_run_is_not_replaced(tmp_path):
    from edgessl.workflows.export import check_not_another_export

    ours = {"run": "/runs/b", "classifier": None}
    check_not_another_export(tmp_path / "none", ours)  # no folder yet
    earlier = {"models": [], "source": {"run": "/runs/a", "classifier": None}}
    (tmp_path / "manifest.json").write_text(json.dumps(earlier))
    with pytest.raises(UserError) as e:
        check_not_another_export(tmp_path, ours)
    assert str(e.value) == (f"--out '{tmp_path}' holds the export of another run (/runs/a): exporting here would "
                            "replace its files; choose another --out, or remove that folder first.")
    check_not_another_export(tmp_path, {"run": "/runs/a", "classifier": None})  # the same run: refreshed
    check_not_another_export(tmp_path, {"run": "/runs/a", "classifier": "/runs/a/finetune-x"})  # and its classifier
    (tmp_path / "manifest.json").write_text(json.dumps({"models": []}))  # an older manifest: no source to compare
    check_not_another_export(tmp_path, ours)


def test_an_out_that_would_replace_files_no_export_wrote_is_refused_before_any_work(tmp_path):
    import edgessl

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "export"):  # checked before the run is even read
        with pytest.raises(UserError) as e:
            edgessl.export(tmp_path / "no-run", out=str(out))
        assert str(e.value) == f"--out '{out}': '{blocker}' is a file, not a folder; choose another --out."
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "encoder.onnx").write_text("precious")
    (mine / "encoder.int8.onnx").write_text("keep")
    with pytest.raises(UserError) as e:
        edgessl.export(tmp_path / "no-run", out=str(mine))
    assert str(e.value) == (f"--out '{mine}' holds encoder.onnx, encoder.int8.onnx but no manifest.json: files that "
                            "no edgessl export wrote (or whose manifest is gone) would be replaced; choose another "
                            "--out, or move them first.")
    assert (mine / "encoder.onnx").read_text() == "precious" and (mine / "encoder.int8.onnx").read_text() == "keep"
    from edgessl.workflows.export import check_out_folder

    check_out_folder(mine, tmp_path / "run", "classifier")  # a classifier's files would replace none of them


def test_exporting_again_names_the_earlier_files_it_does_not_write_again(tmp_path):
    from edgessl.deploy.convert import _remove_previous

    for name in ("encoder.onnx", "encoder.int8.onnx", "encoder.fp16.onnx", "encoder.reference.npz",
                 "classifier.onnx"):
        (tmp_path / name).write_text("x")
    assert _remove_previous(tmp_path, "encoder", {".onnx", ".reference.npz", ".int8.onnx"}) == ["encoder.fp16.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.onnx"]  # the other model's file stays


def test_export_warns_of_few_calibration_images_and_neighbours_that_moved(tmp_path):
    from edgessl.deploy.images import Sample
    from edgessl.workflows.export import export_warnings as warnings

    def source(calib: int | None):
        sample = Sample(tmp_path, [tmp_path / f"{i}.png" for i in range(calib or 0)], np.zeros((0, 1, 1, 3)))
        return type("Src", (), {"calib": sample if calib is not None else None})()

    entry = lambda p, a: {"file": f"encoder.{p}.onnx", "precision": p,  # noqa: E731
                          "comparison": {"agreement_with_pytorch": {"fp32": 1.0, p: a, "images": 30}}}
    assert warnings(source(None), [entry("fp32", 1.0)]) == []
    assert warnings(source(256), [entry("int8", 0.8)]) == []
    assert warnings(source(3), [entry("int8", 0.1)]) == [
        f"warning: int8 was calibrated on 3 images from {tmp_path}: activation ranges from so few may miss what the "
        "device sees; pass --calib with a few hundred typical images.",
        "warning: encoder.int8.onnx gives 10% of the 30 labelled images the kNN label PyTorch's features give "
        "(below 80%): its cosines meet the bound, but the neighbours it finds differ; calibrate on more typical "
        "images (--calib) or ship fp32."]
    # fp32, equal to PyTorch to rounding, below 1 too: the labels sit on ties (a sweep's 2-epoch run had been told
    # to ship fp32, whose agreement was 0.94, for an int8 file at cosine 0.9999)
    tied = {"file": "encoder.int8.onnx", "precision": "int8",
            "comparison": {"agreement_with_pytorch": {"fp32": 0.94, "int8": 0.5, "images": 32}}}
    assert warnings(source(256), [tied]) == [
        "note: encoder.int8.onnx gives 50% of the 32 labelled images the kNN label PyTorch's features give, but fp32 "
        "itself only 94%: these images' kNN labels sit on near ties (as a barely trained encoder's do), so this "
        "figure says little; judge the file by its cosines."]


@pytest.mark.slow
def test_export_refuses_the_out_folder_of_another_run(exports, demo_run):
    before = (exports["export"] / "manifest.json").read_bytes()
    _one_line_error(_cli("export", str(demo_run), "--out", str(exports["export"])), 2,
                    f"--out '{exports['export']}' holds the export of another run ({exports['run'].resolve()})")
    assert (exports["export"] / "manifest.json").read_bytes() == before


def test_export_threads_time_every_file_at_that_count(tmp_path, monkeypatch):
    """export had no --threads: its speed table used onnxruntime's default (every core of a shared machine)."""
    from edgessl.deploy import convert

    made = []
    monkeypatch.setattr(convert.ox, "session", lambda path, threads=None: made.append(threads) or path)
    speed = {"batch1_ms": {"p50": 1.0, "low": 0.9, "high": 1.1}, "throughput": {"batch": 32, "images_per_s": 100.0}}
    monkeypatch.setattr(convert.sp, "measure", lambda sessions, x: {p: dict(speed) for p in sessions})
    monkeypatch.setattr(convert.sp, "verdict", lambda a, b: "no clear difference")
    entries = [{"precision": "fp32", "file": "e.onnx", "bytes": 2**20},
               {"precision": "int8", "file": "e.int8.onnx", "bytes": 2**19}]
    lines = []
    convert.timed_speeds(entries, tmp_path, np.zeros((1, 3, 8, 8), np.float32), lines.append, threads=2)
    assert made == [2, 2] and [e["speed"]["threads"] for e in entries] == [2, 2]
    assert lines[0].startswith("fp32 on this machine (threads: 2): batch 1 1 ms [0.9-1.1]")
    _one_line_error(_cli("export", str(tmp_path), "--threads", "0"), 2,
                    "--threads must be positive (leave it out for onnxruntime's default), not 0.")


def test_exporting_again_removes_the_earlier_ort_copies_too(tmp_path):
    """After `export --ort`, a plain `export` had left encoder.ort and encoder.int8.ort beside newer .onnx files (and
    out of the manifest): a folder copied to a phone would ship stale models."""
    from edgessl.deploy.convert import _remove_previous

    for name in ("encoder.onnx", "encoder.ort", "encoder.int8.onnx", "encoder.int8.ort", "encoder.reference.npz"):
        (tmp_path / name).write_text("x")
    assert _remove_previous(tmp_path, "encoder", {".onnx", ".reference.npz"}) == [
        "encoder.int8.onnx", "encoder.ort", "encoder.int8.ort"]
    assert list(tmp_path.iterdir()) == []
