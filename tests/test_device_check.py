"""export/device_check.py: preprocessing identical to edgessl's, runs without torch, reports what it promises, and
refuses manifests that do not match the model. Uses the exports built once per session (conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
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
    assert "latency batch 1" in proc.stdout and "kNN accuracy (leave-one-out)" in proc.stdout
    assert "reference vote accuracy" in proc.stdout and "model load" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["latency_ms"]) >= {"p50", "p90", "p99"} and report["latency_ms"]["runs"] >= 100
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p90"] <= report["latency_ms"]["p99"]
    assert isinstance(report["throughput_per_s"], float) and report["throughput_per_s"] > 0
    assert report["model_bytes"] == (export / "encoder.onnx").stat().st_size
    assert isinstance(report["peak_rss_bytes"], int) and report["peak_rss_bytes"] > 10 * 2**20
    # a fresh process: the imports (numpy, Pillow, onnxruntime) are the baseline, the model and images come above it
    above = report["peak_rss_above_baseline_bytes"]
    assert isinstance(above, int) and 0 < above < report["peak_rss_bytes"]
    assert above + report["baseline_rss_bytes"] == report["peak_rss_bytes"]
    assert 0 < report["model_load_seconds"] < 60
    assert report["execution_provider"] == "CPUExecutionProvider" and report["format"] == "onnx"
    entry = next(m for m in json.loads((export / "manifest.json").read_text())["models"] if m["file"] == "encoder.onnx")
    assert report["mobile"] == entry["mobile"] and set(report["mobile"]) >= {"nnapi", "coreml_mlprogram"}
    assert 0.0 <= report["reference_vote_accuracy"] <= 1.0 and 0.0 <= report["knn_accuracy"] <= 1.0
    assert report["reference_vote_detail"]["images"] == report["images"]["count"]
    assert not {"agreement", "agreement_detail", "knn_loo_accuracy"} & set(report)
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
def test_manifest_entry_without_sha256(script, copy, capsys):
    _edit_manifest(copy, lambda m: next(e for e in m["models"] if e["file"] == "encoder.onnx").pop("sha256"))
    assert _main(script, copy / "encoder.onnx", "--manifest", copy / "manifest.json") == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: Manifest '{copy / 'manifest.json'}' gives no sha256 for encoder.onnx, so it "
                           "cannot tell whether this is the file it describes: export again (this file's sha256 is ")
    assert "None" not in line


@pytest.mark.slow
def test_input_shape_mismatch(script, copy, capsys):
    def change(data):
        for entry in data["models"]:
            entry["input"]["shape"] = ["batch", 3, 48, 48]

    _edit_manifest(copy, change)
    assert _main(script, copy / "encoder.onnx") == 2
    line = _error_line(capsys)
    assert "does not match the manifest: input" in line and "48" in line


def test_a_preprocess_that_cannot_feed_the_model_is_one_line(script, copy, capsys):
    """An edited manifest: another image size had ended in an onnxruntime traceback (exit 1), a mean that is not
    numbers in a ValueError, a std of 0 in inf/NaN embeddings written without a word. Now exit 2, one line."""
    size = json.loads((copy / "manifest.json").read_text())["models"][0]["preprocess"]["image_size"]
    cases = [("image_size", 2 * size, f"encoder.onnx does not match the manifest: its input is [{size}, {size}] "
                                      f"pixels, the manifest's preprocess.image_size {2 * size}."),
             ("mean", "abc", "the manifest's preprocess.mean 'abc' is not one number per input channel of "
                             "encoder.onnx."),
             ("std", [0, 0, 0], "the manifest's preprocess.std [0, 0, 0] is not one positive number per input "
                                "channel of encoder.onnx.")]
    for key, value, message in cases:
        original = (copy / "manifest.json").read_text()
        _edit_manifest(copy, lambda d, k=key, v=value: [e["preprocess"].__setitem__(k, v) for e in d["models"]])
        assert _main(script, copy / "encoder.onnx", "--runs", "2", "--warmup", "0") == 2
        assert _error_line(capsys) == f"error: {message}"
        (copy / "manifest.json").write_text(original)


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


def test_a_check_that_cannot_compare_outputs_says_so(script, copy, capsys):
    """The .onnx copied without its reference file, or without the manifest: timings only, and a warning (it had
    passed with exit 0 and no word that the outputs were never checked)."""
    next(copy.glob("encoder.reference.npz")).unlink()
    assert _main(script, copy / "encoder.onnx", "--runs", "2", "--warmup", "0", "--batch", "2") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["warning: the reference file 'encoder.reference.npz' the manifest names is not beside it: timings "
                   "only, the outputs are not checked against the export's. Copy manifest.json and the "
                   ".reference.npz files beside the model."]
    (copy / "manifest.json").unlink()
    assert _main(script, copy / "encoder.onnx", "--runs", "2", "--warmup", "0", "--batch", "2") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"warning: no manifest (none at '{copy / 'manifest.json'}'): timings only, the outputs are not "
                   "checked against the export's. Copy manifest.json and the .reference.npz files beside the model."]


def test_a_damaged_reference_is_one_line_exit_2(script, copy, capsys):
    """A reference file cut short (a copy that stopped), or one without the outputs: exit code 2 and one line, not
    a traceback with exit code 1 (which says "outside the bounds")."""
    reference = next(copy.glob("encoder.reference.npz"))
    whole = reference.read_bytes()
    reference.write_bytes(whole[:1000])
    assert _main(script, copy / "encoder.onnx", "--runs", "2", "--warmup", "0", "--batch", "2") == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: the reference '{reference}' cannot be read (") and line.endswith(
        "): export again, or move it away to check timings only.")
    import numpy as np

    np.savez(reference, images=np.zeros((1, 3, 8, 8), np.uint8))
    assert _main(script, copy / "encoder.onnx", "--runs", "2", "--warmup", "0", "--batch", "2") == 2
    assert _error_line(capsys) == (f"error: the reference '{reference}' lacks outputs: export again, or move it away "
                                   "to check timings only.")


@pytest.mark.slow
def test_edgessl_check_command(exports, copy, tmp_path, capfd):
    from typer.testing import CliRunner

    from edgessl.cli import app

    out = tmp_path / "check.json"
    result = CliRunner().invoke(app, ["check", str(exports["export"] / "encoder.onnx"), "--json", str(out),
                                      "--batch", "4", "--ep", "cpu"])
    assert result.exit_code == 0, capfd.readouterr().err
    report = json.loads(out.read_text())
    assert "p50" in report["latency_ms"] and report["execution_provider"] == "CPUExecutionProvider"
    assert "latency batch 1" in capfd.readouterr().out
    import torch  # noqa: F401 - this process holds torch, the script's process does not: its peak is its own

    from edgessl.scripts import load_script

    assert report["peak_rss_bytes"] < load_script()._statm_rss()  # ru_maxrss had carried this process's peak over
    with open(copy / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    result = CliRunner().invoke(app, ["check", str(copy / "encoder.onnx")])
    assert result.exit_code == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "sha256" in err[0]


# ------------------------------------------------------------------------------------------------ memory: streaming


def test_normalize_in_place_equals_the_four_array_formula(script):
    """normalize works in place on one float32 copy: bit for bit the old (x / 255 - mean) / std of four arrays."""
    images = np.random.default_rng(1).integers(0, 256, (5, 9, 9, 3), dtype=np.uint8)
    pre = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    old = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255.0)
    old = (old - np.asarray(pre["mean"], np.float32).reshape(1, -1, 1, 1)) / np.asarray(
        pre["std"], np.float32).reshape(1, -1, 1, 1)
    new = script.normalize(images, pre)
    assert new.dtype == np.float32 and new.flags.c_contiguous and np.array_equal(new, old)


def _knn_vote_whole(query, memory, labels, classes, k, t=0.1, exclude_self=False):
    """The kNN vote as it was: one argsort of the whole (N, M) similarity matrix."""
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    m = memory / np.maximum(np.linalg.norm(memory, axis=1, keepdims=True), 1e-12)
    sim = q @ m.T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    k = max(1, min(k, memory.shape[0] - (1 if exclude_self else 0)))
    top = np.argsort(-sim, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, top, axis=1) / t)
    scores = np.zeros((len(q), classes))
    for j in range(k):
        np.add.at(scores, (np.arange(len(q)), labels[top[:, j]]), weights[:, j])
    return scores.argmax(1)


@pytest.mark.parametrize("n", [5, 600])
def test_knn_vote_in_blocks_equals_one_sort(script, n):
    rng = np.random.default_rng(n)
    outputs = rng.standard_normal((n, 24)).astype(np.float32)
    outputs[1] = outputs[0]  # ties
    labels = rng.integers(0, 4, n)
    for exclude in (True, False):
        got = script.knn_vote(outputs, outputs, labels, 4, k=20, exclude_self=exclude)
        assert np.array_equal(got, _knn_vote_whole(outputs, outputs, labels, 4, k=20, exclude_self=exclude))
    memory, memory_labels = rng.standard_normal((50, 24)).astype(np.float32), rng.integers(0, 4, 50)
    got = script.knn_vote(outputs, memory, memory_labels, 4, k=10)
    assert np.array_equal(got, _knn_vote_whole(outputs, memory, memory_labels, 4, k=10))


def test_knn_vote_leaves_out_the_memory_row_each_query_names(script):
    memory = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    query = memory[:1].copy()  # memory row 0 itself: its own vote (similarity 1) would win at k = 1
    assert script.knn_vote(query, memory, labels, 2, k=1)[0] == 0
    assert script.knn_vote(query, memory, labels, 2, k=1, exclude=np.array([0]))[0] == 1
    assert script.knn_vote(query, memory, labels, 2, k=1, exclude=np.array([-1]))[0] == 0


def test_the_reference_vote_leaves_out_an_image_identical_to_a_reference_image(script):
    """A checked image that is also a reference image had voted for itself (similarity 1, weight e^10): the vote
    read 0.67 where the leave-one-out kNN among the same images read 0.27."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 3, 2, 2), dtype=np.uint8)
    outputs = np.array([[1.0, 0.0], [0.95, 0.05], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    reference = {"images": images, "outputs": outputs, "labels": np.array([0, 1, 1, 0]), "classes": ["a", "b"]}
    sha1 = [hashlib.sha1(img.tobytes()).hexdigest() for img in images]
    data = {"sha1": sha1[:1], "labels": ["a"]}  # the reference's first image, labelled a; its neighbours say b
    res = script.image_figures({"kind": "encoder"}, outputs[:1], data, reference)
    assert res["reference_vote_accuracy"] == 0.0 and res["reference_vote_detail"]["left_out"] == 1
    assert res["reference_files"]["matched"] == 1


def test_a_classifier_check_names_the_folders_it_left_out(script):
    data = {"sha1": ["x"] * 4, "labels": ["cat", "Cat", "dogs", "ship"]}
    outputs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    res = script.image_figures({"kind": "classifier", "classes": ["cat", "ship"]}, outputs, data, None)
    assert res["accuracy"] == 1.0 and res["accuracy_images"] == 2 and res["folders_not_classes"] == ["Cat", "dogs"]


def test_the_leave_one_out_k_stays_below_the_smallest_class(script):
    """Left out of its own vote, an image's class has one voter fewer: k = n - 1 on 20 identical outputs in 4 classes
    of 5 votes 4 against 5 for every other class, and had scored exactly 0.0 (chance: 0.25)."""
    assert script.loo_k(np.array([0] * 30 + [1] * 30)) == 20
    assert script.loo_k(np.array([0] * 6 + [1] * 6)) == 5 and script.loo_k(np.array([0, 0, 1])) == 1
    assert script.smallest_class(np.array([0, 0, 2, 2, 2, -1])) == 2  # absent classes and unlabelled rows skipped
    labels = np.repeat(np.arange(4), 5)
    same = np.ones((20, 3), dtype=np.float32)
    assert (script.knn_vote(same, same, labels, 4, k=19, exclude_self=True) != labels).all()  # the old k: all wrong


def test_few_images_report_the_k_used_and_a_missing_reference_says_so(script, capsys):
    """12 images had been reported at k=20 (11 neighbours exist), and a missing reference file as 'the reference
    embeddings carry no matching labels'."""
    outputs = np.eye(12, 4, dtype=np.float32) + 0.1
    data = {"sha1": [str(i) for i in range(12)], "labels": ["a", "b"] * 6}
    res = script.image_figures({"kind": "encoder"}, outputs, data, None)
    assert res["knn_k"] == 5 and res["reference_vote_accuracy"] is None  # one less than a class's 6 (loo_k)
    assert res["reference_vote_detail"] == {"note": "no reference file to vote over"}
    reference = {"classes": np.array(["x"]), "labels": np.array([0]), "outputs": outputs[:1], "images": np.zeros(1)}
    other = script.image_figures({"kind": "encoder"}, outputs, data, reference)["reference_vote_detail"]
    assert other == {"note": "the reference embeddings carry no labels matching these class folders"}
    report = {"model": "m.onnx", "input_shape": [1, 3, 8, 8], "onnxruntime": "1", "execution_provider": "cpu",
              "threads": 1, "model_load_seconds": 0.1, "latency_ms": {"p50": 1.0, "p90": 1.0, "p99": 1.0, "runs": 5},
              "throughput_batch": 4, "throughput_per_s": 10.0, "model_bytes": 10, "peak_rss_bytes": 2**20, **res}
    script.print_table(report)
    out = capsys.readouterr().out
    assert "(k=5, among the images; k capped by the smallest class)" in out
    assert "n/a (no reference file to vote over)" in out


def test_max_images_below_one_and_the_json_line(script, exports, tmp_path, capsys):
    model = exports["export"] / "encoder.onnx"
    assert _main(script, model, "--images", exports["data"], "--max-images", 0) == 2
    assert capsys.readouterr().err.strip() == ("error: --max-images must be positive (leave it out to use every "
                                               "image), not 0.")
    out = tmp_path / "check.json"
    assert _main(script, model, "--json", out, "--runs", 2, "--warmup", 0, "--batch", 2) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {out}"
    # a folder or a path below a file as --json: one line and exit 2 before anything is timed (it was a traceback
    # and exit 1, the code of outputs outside the bounds, after the whole measurement)
    assert _main(script, model, "--json", tmp_path, "--runs", 2) == 2
    assert capsys.readouterr().err == f"error: --json '{tmp_path}' is a folder: give a file name, e.g. {out}.\n"
    assert _main(script, model, "--json", out / "sub" / "x.json", "--runs", 2) == 2
    assert capsys.readouterr().err == (f"error: --json '{out / 'sub' / 'x.json'}' cannot be written: '{out}' is a "
                                       "file, not a folder.\n")


def test_a_bad_argument_is_one_line_and_exit_2(script, capsys):
    with pytest.raises(SystemExit) as e:
        _main(script, "model.onnx", "--ep", "cuda")
    assert e.value.code == 2
    err = capsys.readouterr().err  # the choices are quoted or not by Python's version
    assert err.startswith("error: argument --ep: invalid choice: 'cuda' (choose from ")
    assert err.endswith(") (see --help)\n") and "xnnpack" in err and err.count("\n") == 1


def test_rss_now_and_peak(script):
    now, peak = script.current_rss_bytes(), script.peak_rss_bytes()
    if peak is None:
        pytest.skip("no resource module (Windows)")
    assert 0 < now <= peak


class _FakeSession:
    """Stands in for onnxruntime.InferenceSession: records what it was given."""

    made: list = []

    def __init__(self, path, sess_options=None, providers=None, provider_options=None):
        self.path, self.options, self.providers, self.provider_options = path, sess_options, providers, provider_options
        _FakeSession.made.append(self)

    def get_providers(self):
        return list(self.providers)


def test_session_options_for_low_memory_and_xnnpack(script, monkeypatch, tmp_path):
    import onnxruntime as ort

    _FakeSession.made = []
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    script.open_session(tmp_path / "m.onnx", 2)
    cpu = _FakeSession.made[-1]
    assert cpu.providers == ["CPUExecutionProvider"] and cpu.provider_options == [{}]
    assert not cpu.options.enable_cpu_mem_arena and not cpu.options.enable_mem_pattern
    assert cpu.options.intra_op_num_threads == 2
    assert script.open_session(tmp_path / "m.onnx", 2, low_memory=False).options.enable_cpu_mem_arena

    monkeypatch.setattr(ort, "get_available_providers", lambda: [script.XNNPACK, "CPUExecutionProvider"])
    xnn = script.open_session(tmp_path / "m.onnx", 4, "xnnpack")
    assert xnn.providers == ["XnnpackExecutionProvider", "CPUExecutionProvider"]
    assert xnn.provider_options == [{"intra_op_num_threads": "4"}, {}] and xnn.options.intra_op_num_threads == 1
    assert xnn.options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_ep_xnnpack_missing_is_one_line(script, monkeypatch, tmp_path, capsys):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    model = tmp_path / "encoder.onnx"
    model.write_bytes(b"not read: the provider is checked first")
    assert _main(script, model, "--ep", "xnnpack") == 2
    assert _error_line(capsys) == (
        "error: this onnxruntime build has no XNNPACK execution provider (it has: AzureExecutionProvider, "
        "CPUExecutionProvider); use --ep cpu or an onnxruntime build with XNNPACK")
    assert script.providers("cpu") == ["CPUExecutionProvider"]


def test_manifest_entry_of_an_ort_file(script, tmp_path):
    from edgessl.fileio import sha256_file

    ort_file = tmp_path / "encoder.int8.ort"
    ort_file.write_bytes(b"an .ort model")
    shared = {"input": {"name": "images", "shape": ["batch", 3, 32, 32]}, "preprocess": {"image_size": 32}}
    manifest = {"models": [
        {"file": "encoder.onnx", "sha256": "0" * 64, **shared},
        {"file": "encoder.int8.onnx", "sha256": "1" * 64, "precision": "int8", "bounds": {"min_cosine": 0.75},
         "reference": "encoder.reference.npz", "mobile": {"ignored": True},
         "ort": {"file": "encoder.int8.ort", "sha256": sha256_file(ort_file), "bytes": 13}, **shared},
    ]}
    entry = script.manifest_entry(ort_file, manifest, tmp_path / "manifest.json")
    assert entry["file"] == "encoder.int8.onnx" and entry["precision"] == "int8"
    assert entry["bounds"] == {"min_cosine": 0.75} and entry["reference"] == "encoder.reference.npz"
    manifest["models"][1]["ort"]["sha256"] = "f" * 64
    with pytest.raises(script.CheckError, match=r"encoder.int8.ort does not match manifest .*sha256"):
        script.manifest_entry(ort_file, manifest, tmp_path / "manifest.json")
    other = tmp_path / "encoder.ort"
    other.write_bytes(b"x")
    with pytest.raises(script.CheckError, match=r"does not list encoder.ort \(it lists .ort files: encoder.int8.ort\)"):
        script.manifest_entry(other, manifest, tmp_path / "manifest.json")


def _folder_with_unreadable(exports, dst: Path) -> Path:
    """The export's images plus unreadable files among them (so that streaming's batches must skip them)."""
    shutil.copytree(exports["data"], dst)
    classes = sorted(p for p in dst.iterdir() if p.is_dir())
    for i, cls in enumerate(classes[:3]):
        (cls / f"{'a' if i else 'z'}_broken.png").write_bytes(b"not an image")
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("batch", [32, 7])
def test_streaming_gives_the_outputs_of_all_at_once(script, exports, tmp_path, batch):
    """run_images (decode, normalise, run `batch` images at a time) = the session on the stacked array of every
    decoded image, bit for bit; the sha1 of each image and the skipped count as before."""
    folder = _folder_with_unreadable(exports, tmp_path / "imgs")
    export = exports["export"]
    for model in ("encoder.onnx", "encoder.int8.onnx"):
        entry = script.manifest_entry(export / model, script.load_manifest(export / "manifest.json"),
                                      export / "manifest.json")
        pre = entry["preprocess"]
        sess = script.open_session(export / model, 1)
        paths = script.image_files(folder)
        data = script.run_images(sess, folder, paths, pre, batch)
        decoded = [(p, script.decode(p, pre)) for p in paths if not p.name.endswith("_broken.png")]
        stacked = np.stack([arr for _, arr in decoded])
        assert np.array_equal(data["outputs"], script.run_batches(sess, script.normalize(stacked, pre), batch))
        assert data["outputs"].dtype == np.float32 and data["outputs"].flags.c_contiguous
        assert data["rel"] == [p.relative_to(folder).as_posix() for p, _ in decoded] and data["skipped"] == 3
        assert data["sha1"] == [hashlib.sha1(arr.tobytes()).hexdigest() for _, arr in decoded]
        assert sorted(set(data["labels"])) == sorted(p.name for p in folder.iterdir())
        reference = script.load_reference(entry, export)
        assert np.array_equal(script.run_decoded(sess, reference["images"], pre, batch),
                              script.run_batches(sess, script.normalize(reference["images"], pre), batch))


@pytest.mark.slow
def test_figures_unchanged_by_streaming(script, exports, tmp_path):
    """The report's figures on a folder with unreadable files are those of the outputs of all images at once."""
    folder = _folder_with_unreadable(exports, tmp_path / "imgs")
    out = tmp_path / "r.json"
    export = exports["export"]
    assert _main(script, export / "encoder.onnx", "--images", folder, "--runs", "5", "--batch", "4", "--json", out,
                 "--quiet") == 0
    report = json.loads(out.read_text())
    entry = script.manifest_entry(export / "encoder.onnx", script.load_manifest(export / "manifest.json"),
                                  export / "manifest.json")
    pre = entry["preprocess"]
    paths = [p for p in script.image_files(folder) if not p.name.endswith("_broken.png")]
    stacked = np.stack([script.decode(p, pre) for p in paths])
    outputs = script.run_batches(script.open_session(export / "encoder.onnx", 1), script.normalize(stacked, pre))
    data = {"labels": [p.parent.name for p in paths], "sha1": [hashlib.sha1(a.tobytes()).hexdigest() for a in stacked]}
    expected = script.image_figures(entry, outputs, data, script.load_reference(entry, export))
    for key in ("knn_accuracy", "reference_vote_accuracy", "reference_files"):
        assert report[key] == expected[key], key
    assert report["images"] == {"folder": str(folder), "count": len(paths), "skipped": 3, "labelled": True}


# ------------------------------------------------------------------------------------------------ .ort models


def _write_ort(onnx_file: Path, folder: Path) -> Path:
    """onnx_file converted to onnxruntime's .ort format in folder (<stem>.ort), on a copy in a temporary folder."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    work = folder / "ort-work"
    work.mkdir()
    src = work / onnx_file.name
    shutil.copy(onnx_file, src)
    convert_onnx_models_to_ort(src, output_dir=work / "out", optimization_styles=[OptimizationStyle.Fixed])
    made = next((work / "out").rglob("*.ort"))
    target = folder / (onnx_file.stem + ".ort")
    shutil.copy(made, target)
    shutil.rmtree(work)
    return target


@pytest.mark.slow
def test_ort_model(script, exports, copy, tmp_path, capsys):
    from edgessl.fileio import sha256_file

    ort_file = _write_ort(copy / "encoder.int8.onnx", copy)
    ort_entry = {"file": ort_file.name, "sha256": sha256_file(ort_file), "bytes": ort_file.stat().st_size}

    def add(data):
        next(m for m in data["models"] if m["file"] == "encoder.int8.onnx")["ort"] = ort_entry

    _edit_manifest(copy, add)
    capsys.readouterr()
    out = tmp_path / "ort.json"
    assert _main(script, ort_file, "--images", exports["data"], "--runs", "10", "--batch", "4", "--json", out) == 0
    assert "kNN accuracy (leave-one-out)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["format"] == "ort" and report["precision"] == "int8"
    assert report["model_bytes"] == ort_file.stat().st_size and report["model_load_seconds"] > 0
    assert report["reference"]["within_bounds"] and report["reference_files"]["matched"] >= 24
    out_onnx = tmp_path / "onnx.json"
    assert _main(script, copy / "encoder.int8.onnx", "--images", exports["data"], "--runs", "10", "--batch", "4",
                 "--json", out_onnx, "--quiet") == 0
    onnx_report = json.loads(out_onnx.read_text())
    assert report["reference"]["min_cosine"] == pytest.approx(onnx_report["reference"]["min_cosine"], abs=1e-4)
    # the .ort file's own sha256 is checked, not the .onnx's
    with open(ort_file, "ab") as f:
        f.write(b"\0")
    assert _main(script, ort_file) == 2
    line = _error_line(capsys)
    assert "encoder.int8.ort does not match manifest" in line and "sha256" in line
    shutil.copy(ort_file, copy / "encoder.ort")
    assert _main(script, copy / "encoder.ort") == 2
    assert "does not list encoder.ort (it lists .ort files: encoder.int8.ort)" in _error_line(capsys)


# ------------------------------------------------------------------------------------------------ the README, verbatim
def _readme_lines(*starts: str) -> list[str]:
    """The README's command lines that start with one of `starts` (comments cut), in order."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return [line.split("  #")[0].strip() for line in readme.splitlines() if line.startswith(starts)]


def _device_venv(venv: Path, packages: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
    """A fresh venv holding `packages`: made by uv where the test environment has it (a second instead of half a
    minute: CI installs with uv, so the wheels are in its cache), else by venv + pip. Returns (python, the install)."""
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv:
        made = subprocess.run([uv, "venv", "-q", str(venv)], capture_output=True, text=True, timeout=120)
        pip = subprocess.run([uv, "pip", "install", "-q", "--python", str(python), *packages], capture_output=True,
                             text=True, timeout=600)
        if made.returncode == 0 and pip.returncode == 0:
            return python, pip
        shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    return python, subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], capture_output=True,
                                  text=True, timeout=600)


@pytest.mark.slow
def test_readme_export_and_device_check_run_verbatim_in_a_torch_free_venv(demo_run, labelled_demo, tmp_path):
    """The README's export line, then its device-check line in a fresh venv holding only onnxruntime, numpy and
    Pillow (what the README tells a device to install), with runs/<name>, ./my_images and ./val as real folders."""
    export_line = next(line for line in _readme_lines("edgessl export runs/<name> --int8"))
    check_line = next(line for line in _readme_lines("python export/device_check.py"))
    work = tmp_path / "work"
    shutil.copytree(demo_run, work / "runs" / "demo")
    shutil.copytree(labelled_demo / "train", work / "my_images")
    shutil.copytree(labelled_demo / "test", work / "val")
    shutil.copytree(SCRIPT.parent, work / "export")
    edgessl_argv = shlex.split(export_line.replace("<name>", "demo"))[1:]
    proc = subprocess.run([sys.executable, "-m", "edgessl", *edgessl_argv], cwd=work, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    python, pip = _device_venv(tmp_path / "device-venv", ["onnxruntime", "numpy", "pillow"])
    if pip.returncode != 0:
        pytest.skip(f"pip cannot install onnxruntime numpy pillow here (offline?): {pip.stderr.strip()[-200:]}")
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0  # torch-free
    argv = shlex.split(check_line.replace("<name>", "demo"))
    assert argv[0] == "python"
    proc = subprocess.run([str(python), *argv[1:]], cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "latency batch 1" in proc.stdout and "kNN accuracy (leave-one-out)" in proc.stdout
