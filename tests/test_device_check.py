"""export/device_check.py: preprocessing identical to edgessl's, runs without torch, reports what it promises, and
refuses manifests that do not match the model. Uses the exports built once per session (conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "export" / "device_check.py"

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def script():
    from edgessl.scripts import load_script, script_path

    assert script_path() == SCRIPT
    return load_script()


def _main(script, *args) -> int:
    return script.main([str(a) for a in args])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------ preprocessing


def _odd_images(folder: Path) -> list[Path]:
    """Files that exercise every decoding rule: alpha, palette transparency, 16-bit, float, CMYK, EXIF rotation,
    JPEG draft scaling, 1-bit, grayscale."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    rgb = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8), "RGB")
    files = {}
    rgb.save(folder / "big.jpg", quality=90)
    files["big"] = folder / "big.jpg"
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    rgba.save(folder / "rgba.png")
    pal = rgb.resize((60, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    pal.save(folder / "pal.png", transparency=3)
    rgba.convert("LA").save(folder / "la.png")
    Image.fromarray(rng.integers(0, 65535, (45, 33), dtype=np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rng.standard_normal((40, 40)).astype(np.float32), "F").save(folder / "float.tiff")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("1").save(folder / "bits.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    rgb.resize((90, 50)).save(folder / "exif.jpg", exif=exif.tobytes())
    return sorted(folder.iterdir())


@pytest.mark.parametrize("size", [32, 37])
def test_preprocessing_equals_edgessl(script, tmp_path, size):
    from edgessl.data.augment import test_transform
    from edgessl.data.folder import decode_image
    from edgessl.data.signature import scan_images
    from edgessl.demo import demo_images
    from edgessl.deploy.manifest import preprocess_spec

    pre = preprocess_spec({"image_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    paths = _odd_images(tmp_path / "odd") + scan_images(demo_images())[::12]
    ours = np.stack([decode_image(p, size) for p in paths])
    theirs = np.stack([script.decode(p, pre) for p in paths])
    assert np.array_equal(ours, theirs)  # bit for bit
    x_ours = test_transform(torch.from_numpy(ours).permute(0, 3, 1, 2), pre["mean"], pre["std"]).numpy()
    x_theirs = script.normalize(theirs, pre)
    assert x_theirs.dtype == np.float32 and x_theirs.shape == x_ours.shape
    assert np.abs(x_ours - x_theirs).max() <= 1e-6
    assert np.abs(script.preprocess(paths[0], pre) - x_ours[0]).max() <= 1e-6


# ------------------------------------------------------------------------------------------------ without torch


def _no_torch_env(tmp_path: Path) -> dict:
    """PYTHONPATH with fake torch / edgessl / timm packages whose import fails."""
    fake = tmp_path / "fake"
    for name in ("torch", "edgessl", "timm", "torchvision"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported on the device')\n")
    return {**os.environ, "PYTHONPATH": str(fake)}


@pytest.mark.slow
def test_script_runs_without_torch(exports, tmp_path):
    env = _no_torch_env(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "must not be imported" in blocked.stderr
    out = tmp_path / "report.json"
    export = exports["export"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(export / "encoder.onnx"), "--manifest", str(export / "manifest.json"),
         "--images", str(exports["data"]), "--threads", "1", "--batch", "8", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "latency batch 1" in proc.stdout and "agreement" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["latency_ms"]) >= {"p50", "p90", "p99"} and report["latency_ms"]["runs"] >= 100
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p90"] <= report["latency_ms"]["p99"]
    assert isinstance(report["throughput_per_s"], float) and report["throughput_per_s"] > 0
    assert report["model_bytes"] == (export / "encoder.onnx").stat().st_size
    assert isinstance(report["peak_rss_bytes"], int) and report["peak_rss_bytes"] > 10 * 2**20
    assert 0.0 <= report["agreement"] <= 1.0 and 0.0 <= report["knn_loo_accuracy"] <= 1.0
    assert report["reference"]["within_bounds"] and report["reference"]["min_cosine"] >= 0.99999
    # the run's own images are the reference files: decoding on the "device" reproduces the export's outputs
    assert report["reference_files"]["matched"] >= 24 and report["reference_files"]["min_cosine"] >= 0.99999


@pytest.mark.slow
def test_classifier_accuracy_equals_pytorch(script, exports, tmp_path):
    from edgessl.data.augment import test_transform
    from edgessl.data.folder import load_image_folder
    from edgessl.models.classifier import load_classifier

    model = load_classifier(exports["classifier"])
    meta = model.edgessl_meta
    images = load_image_folder(exports["data"], 32, labels=True)
    with torch.no_grad():
        pred = model(test_transform(images.images, meta["mean"], meta["std"])).argmax(1)
    expected = float((pred == images.labels).float().mean())
    out = tmp_path / "clf.json"
    export = exports["export"]
    assert _main(script, export / "classifier.onnx", "--images", exports["data"], "--json", out, "--quiet") == 0
    report = json.loads(out.read_text())
    assert report["accuracy"] == pytest.approx(expected) and report["accuracy_images"] == len(images)
    assert report["reference"]["top1_agreement"] == 1.0 and report["kind"] == "classifier"


@pytest.mark.slow
def test_int8_model_on_device(script, exports, tmp_path):
    out = tmp_path / "int8.json"
    assert _main(script, exports["export"] / "encoder.int8.onnx", "--json", out, "--quiet", "--batch", "4") == 0
    report = json.loads(out.read_text())
    assert report["precision"] == "int8" and report["reference"]["within_bounds"]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def copy(exports, tmp_path) -> Path:
    """A private copy of the export folder to damage."""
    dst = tmp_path / "export"
    shutil.copytree(exports["export"], dst)
    return dst


def _edit_manifest(folder: Path, fn) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_sha256_mismatch(script, copy, capsys):
    with open(copy / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    assert _main(script, copy / "encoder.onnx", "--manifest", copy / "manifest.json") == 2
    assert "does not match manifest" in _error_line(capsys)


@pytest.mark.slow
def test_input_shape_mismatch(script, copy, capsys):
    def change(data):
        for entry in data["models"]:
            entry["input"]["shape"] = ["batch", 3, 48, 48]

    _edit_manifest(copy, change)
    assert _main(script, copy / "encoder.onnx") == 2
    line = _error_line(capsys)
    assert "does not match the manifest: input" in line and "48" in line


@pytest.mark.slow
def test_model_not_listed_or_unloadable(script, copy, capsys):
    shutil.copy(copy / "encoder.onnx", copy / "other.onnx")
    assert _main(script, copy / "other.onnx") == 2
    assert "does not list other.onnx" in _error_line(capsys)
    broken = copy / "broken.onnx"
    broken.write_bytes(b"this is not an onnx model")
    from edgessl.fileio import sha256_file

    entry = {"file": "broken.onnx", "sha256": sha256_file(broken)}
    _edit_manifest(copy, lambda d: d["models"].append({**d["models"][0], **entry}))
    assert _main(script, broken) == 2
    assert "cannot load broken.onnx" in _error_line(capsys)
    assert _main(script, copy / "missing.onnx") == 2
    assert "not found" in _error_line(capsys)


@pytest.mark.slow
def test_bad_manifest_and_images(script, copy, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{oops")
    assert _main(script, copy / "encoder.onnx", "--manifest", tmp_path / "bad.json") == 2
    assert "not valid JSON" in _error_line(capsys)
    unreadable = tmp_path / "imgs"
    unreadable.mkdir()
    (unreadable / "x.png").write_bytes(b"nope")
    assert _main(script, copy / "encoder.onnx", "--images", unreadable) == 2
    assert "no readable image" in _error_line(capsys)


@pytest.mark.slow
def test_edgessl_check_command(exports, copy, tmp_path, capfd):
    from typer.testing import CliRunner

    from edgessl.cli import app

    out = tmp_path / "check.json"
    result = CliRunner().invoke(app, ["check", str(exports["export"] / "encoder.onnx"), "--json", str(out),
                                      "--batch", "4"])
    assert result.exit_code == 0, capfd.readouterr().err
    assert "p50" in json.loads(out.read_text())["latency_ms"]
    assert "latency batch 1" in capfd.readouterr().out
    with open(copy / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    result = CliRunner().invoke(app, ["check", str(copy / "encoder.onnx")])
    assert result.exit_code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "sha256" in err[0]
