"""edgessl embed: chunked top-k and duplicate groups (closed forms), files, the run and ONNX routes, the CLI."""

import csv
import shutil
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from edgessl.cli import app
from edgessl.data.folder import _try_decode
from edgessl.errors import UserError
from edgessl.evaluate.neighbours import (
    group_pairs,
    pca_whitening,
    top_k_neighbours,
    unit_rows,
    whitened_unit_rows,
)
from edgessl.scripts import load_script
from edgessl.workflows.embed_files import check_out, read_embeddings, write_embeddings

runner = CliRunner()


def _random_unit(n=300, d=8, seed=0):
    return unit_rows(np.random.default_rng(seed).standard_normal((n, d)))


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_top_k_is_the_brute_force_top_k_without_self(chunk):
    x = _random_unit()
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    want = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    idx, cos = top_k_neighbours(x, 5, chunk=chunk, use_faiss=False)
    assert (idx == want).all()
    np.testing.assert_allclose(cos, np.take_along_axis(sim, want, axis=1), atol=1e-6)


def test_top_k_clips_k_breaks_ties_by_index_and_never_returns_self():
    x = unit_rows(np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    idx, cos = top_k_neighbours(x, 10, chunk=2, use_faiss=False)
    assert idx.shape == (4, 3)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    np.testing.assert_allclose(cos[0], [1.0, 1.0, 0.0], atol=1e-6)


def test_faiss_gives_the_numpy_neighbours():
    pytest.importorskip("faiss")
    x = _random_unit(200, 16)
    a, ca = top_k_neighbours(x, 4, use_faiss=False)
    b, cb = top_k_neighbours(x, 4, use_faiss=True)
    assert (a == b).all()
    np.testing.assert_allclose(ca, cb, atol=1e-5)


def test_group_pairs_numbers_groups_by_lowest_image():
    pairs = np.array([[4, 5], [0, 3], [3, 1], [2, 5]])
    assert group_pairs(6, pairs).tolist() == [2, 1, 1, 2]


def test_pca_whitening_in_closed_form():
    # four points (+-4, 0), (0, +-1): mean 0, covariance diag(8, 0.5); directions x then y, scaled by 1/sqrt(var)
    x = np.array([[4.0, 0], [-4, 0], [0, 1], [0, -1]]) + [10, -3]
    mean, proj = pca_whitening(x, 2)
    np.testing.assert_allclose(mean, [10, -3], atol=1e-6)
    np.testing.assert_allclose(proj, [[1 / np.sqrt(8), 0], [0, 1 / np.sqrt(0.5)]], atol=1e-6)
    np.testing.assert_allclose(whitened_unit_rows(x, mean, proj), [[1, 0], [-1, 0], [0, 1], [0, -1]], atol=1e-6)


@pytest.mark.parametrize("chunk", [7, 65536])
def test_pca_whitening_is_the_svd_whitening_with_identity_covariance(chunk):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 6)) * [5, 3, 2, 1, 0.5, 0.1]) @ np.linalg.qr(rng.standard_normal((6, 6)))[0] + 2
    mean, proj = pca_whitening(x.astype(np.float32), 4, chunk=chunk)
    y = (x - mean) @ proj
    np.testing.assert_allclose(y.T @ y / len(x), np.eye(4), atol=1e-4)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    expected = vt[:4].T * np.sqrt(len(x)) / s[:4]
    np.testing.assert_allclose(np.abs(proj), np.abs(expected), rtol=1e-4, atol=1e-5)
    assert (proj[np.abs(proj).argmax(0), np.arange(4)] > 0).all()  # each direction's largest entry positive
    np.testing.assert_allclose(np.linalg.norm(whitened_unit_rows(x, mean, proj, chunk=chunk), axis=1), 1, atol=1e-6)


def test_pca_whitening_refuses_more_directions_than_the_data_has():
    x = np.random.default_rng(0).standard_normal((10, 2)) @ np.ones((2, 4)) * [1, 2, 3, 4]  # rank 1 after centring
    x[:, 1] += np.arange(10)  # rank 2
    with pytest.raises(UserError) as e:
        pca_whitening(x, 3)
    assert str(e.value) == "--whiten 3: these embeddings vary along only 2 directions; pass --whiten 2 or less."
    with pytest.raises(UserError) as e:
        pca_whitening(x, 10)
    assert str(e.value) == "--whiten 10: between 1 and 4 (the embedding's dimensions and images - 1)."


def test_npz_round_trip(tmp_path):
    emb = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    out = write_embeddings(tmp_path / "e.npz", ["a/1.png", "b,2.png", "ü.png"], emb)
    paths, back = read_embeddings(out)
    assert paths == ["a/1.png", "b,2.png", "ü.png"] and back.dtype == np.float32 and (back == emb).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz"]  # no temporary file left


@pytest.mark.slow
def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    emb = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    paths, back = read_embeddings(write_embeddings(tmp_path / "e.parquet", list("abcd"), emb))
    assert paths == list("abcd") and (back == emb).all()


def test_parquet_without_pyarrow_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UserError) as e:
        check_out(tmp_path / "e.parquet")
    assert str(e.value) == "Writing .parquet needs pyarrow: pip install 'edgessl[parquet]' (or write .npz)."


def test_bad_options_are_one_line_errors(tmp_path, demo_run, tiny_data):
    cases = [
        (["--out", str(tmp_path / "e.csv")], "error: --out must end in .npz or .parquet, not 'e.csv'."),
        (["--out", str(tmp_path / "e.npz"), "--neighbours", "0"],
         "error: --neighbours must be a positive number of neighbours, not 0."),
        (["--out", str(tmp_path / "e.npz"), "--duplicates", "1.5"],
         "error: --duplicates takes auto or a copy-score threshold between 0 and 1 (e.g. 0.9), not '1.5'."),
        (["--out", str(tmp_path / "e.npz"), "--duplicates", "-5"],
         "error: --duplicates takes auto or a copy-score threshold between 0 and 1 (e.g. 0.9), not '-5'."),
        (["--out", str(tmp_path / "afile" / "e.npz")],
         f"error: --out '{tmp_path / 'afile' / 'e.npz'}': '{tmp_path / 'afile'}' is a file, not a folder; choose "
         "another --out."),
        (["--out", str(tmp_path / "e.npz"), "--duplicates", "most"],
         "error: --duplicates takes auto or a copy-score threshold between 0 and 1 (e.g. 0.9), not 'most'."),
        (["--out", str(tmp_path / "e.npz"), "--duplicates", "auto", "--precision", "1"],
         "error: --precision is a target precision between 0 and 1 (e.g. 0.95), not 1.0."),
        (["--out", str(tmp_path / "e.npz"), "--duplicates", "auto", "--keep", "newest"],
         "error: --keep must be one of first, largest, not 'newest'."),
        (["--out", str(tmp_path / "e.npz"), "--keep", "first"],
         "error: --keep lists one image per duplicate group: pass --duplicates too."),
        (["--out", str(tmp_path / "e.npz"), "--manifest", str(tmp_path / "manifest.json")],
         "error: --manifest is for an .onnx source; SOURCE here is a run directory."),
        (["--out", str(tmp_path / "e.npz"), "--duplicates", "0.9", "--whiten", "0"],
         "error: --whiten must be a positive number of directions (e.g. 128), not 0."),
        (["--out", str(tmp_path / "e.npz"), "--whiten", "8"],
         "error: --whiten changes the --neighbours and --duplicates search: pass one of them too."),
        (["--out", str(tmp_path / "e.npz"), "--batch-size", "0"], "error: --batch-size must be at least 1, not 0."),
        (["--out", str(tmp_path / "e.npz"), "--threads", "0"], "error: --threads must be auto or a positive number, "
                                                               "not '0'."),
    ]
    (tmp_path / "afile").write_text("hi")
    for extra, message in cases:
        res = runner.invoke(app, ["embed", str(demo_run), "--data", str(tiny_data), *extra])
        assert res.exit_code == 2, res.output
        assert res.output.strip() == message
    assert not (tmp_path / "e.npz").exists()
    for threads in ("auto", "1"):  # the help's default, and a number (auto was refused as 'not a valid integer')
        res = runner.invoke(app, ["embed", str(demo_run), "--data", str(tiny_data), "--out",
                                  str(tmp_path / threads / "e.npz"), "--threads", threads])
        assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_whiten_searches_the_whitened_embeddings_and_stores_the_raw_ones(tmp_path, demo_run, tiny_data):
    res = runner.invoke(app, ["embed", str(demo_run), "--data", str(tiny_data), "--out", str(tmp_path / "e.npz"),
                              "--neighbours", "2", "--whiten", "8"])
    assert res.exit_code == 0, res.output
    paths, emb = read_embeddings(tmp_path / "e.npz")
    unit = whitened_unit_rows(emb, *pca_whitening(emb, 8))
    idx, cos = top_k_neighbours(unit, 2, use_faiss=False)
    with open(tmp_path / "neighbours.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["neighbour"] for r in rows] == [paths[j] for j in idx.ravel()]
    np.testing.assert_allclose([float(r["cosine"]) for r in rows], cos.ravel(), atol=2e-4)
    raw, _ = top_k_neighbours(unit_rows(emb), 2, use_faiss=False)
    assert not np.array_equal(raw, idx)  # the raw cosines would give other neighbours
    res = runner.invoke(app, ["embed", str(demo_run), "--data", str(tiny_data), "--out", str(tmp_path / "f.npz"),
                              "--neighbours", "2", "--whiten", "24"])
    assert res.exit_code == 2 and res.output.strip() == (
        "error: --whiten 24: between 1 and 23 (the embedding's dimensions and images - 1).")


def test_onnx_route_lists_unreadable_files_with_pretrainings_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    script = load_script("embed_onnx.py")
    pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    for name in ("empty.png", "junk.jpg"):
        assert script.try_decode(tmp_path / name, pre) == _try_decode(tmp_path / name, 32)
    assert script.try_decode(tmp_path / "empty.png", pre) == (None, "empty file (0 bytes)")


def test_onnx_route_refuses_a_batch_or_thread_count_below_one(tmp_path, capsys):
    """embed_onnx.py had accepted --threads 0 / -1 and --batch 0 (device_check.py refuses them): one line, exit 2,
    before any model is opened."""
    script = load_script("embed_onnx.py")
    for flags in (["--batch", "0"], ["--threads", "0"], ["--threads", "-1"]):
        code = script.main([str(tmp_path / "m.onnx"), "--data", str(tmp_path), "--out", str(tmp_path / "e.npz"),
                            *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: --batch and --threads must be positive")


def _with_bad_file(src, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(src, data)
    (data / "activities" / "broken.png").write_bytes(b"\x89PNG broken")
    return data


@pytest.mark.slow
def test_run_and_its_onnx_export_give_the_same_embeddings(demo_run, labelled_demo, tmp_path):
    import edgessl

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    edgessl.export(run)
    data = _with_bad_file(labelled_demo / "test", tmp_path)
    res = runner.invoke(app, ["embed", str(run), "--data", str(data), "--out", str(tmp_path / "a" / "e.npz"),
                              "--neighbours", "3", "--duplicates", "0.999", "--planted", "8", "--gallery-rows", "4"])
    assert res.exit_code == 0, res.output
    assert "Embedded 9 images" in res.output
    warned = []
    b = edgessl.embed(run / "export" / "encoder.onnx", data, tmp_path / "b" / "e.npz", neighbours=3, device="cuda",
                      warn=warned.append)  # --device had been ignored without a word on the .onnx route
    assert warned[0] == ("--device cuda is for a run directory's encoder: an .onnx runs on onnxruntime's CPU "
                         "provider.")
    paths, emb = read_embeddings(tmp_path / "a" / "e.npz")
    assert paths == b.paths and len(paths) == 9
    assert list(b.seconds) == ["embed"] and b.seconds["embed"] > 0  # no --duplicates: no other step timed
    cos = (unit_rows(emb) * unit_rows(b.embeddings)).sum(axis=1)
    assert cos.min() >= 0.9999
    broken = data / "activities" / "broken.png"
    skipped = [(tmp_path / d / "skipped_files.txt").read_text() for d in ("a", "b")]
    assert skipped[0] == skipped[1] == f"{broken}\t{_try_decode(broken, 32)[1]}\n"
    with open(tmp_path / "a" / "neighbours.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * 3 and rows[0]["query"] == paths[0] and rows[0]["rank"] == "1"
    assert (tmp_path / "a" / "neighbours.png").stat().st_size > 5000
    assert (tmp_path / "a" / "duplicates.csv").read_text().startswith(
        "group,kind,image,score,cosine,estimated_precision,keep")




def test_the_gallery_names_every_image_and_its_cosine(tmp_path, monkeypatch):
    from edgessl.report import gallery as g

    shown = {}

    def spy(fig, title):
        shown["title"] = title
        shown["labels"] = [ax.get_xlabel() for ax in fig.axes]

    monkeypatch.setattr(g, "fit_title", spy)
    img = np.zeros((8, 8, 3), np.uint8)
    g.plot_neighbour_gallery([img, img], [[img, img], [img, img]], np.array([[0.9, 0.8], [0.7, 0.6]]),
                             ["q0.png", "q1.png"], tmp_path / "n.png", neighbour_names=[["a.png", "b.png"],
                                                                                        ["c.png", "d.png"]],
                             space="whitened cosine, 8 directions")
    assert shown["title"] == "nearest neighbours (whitened cosine, 8 directions), 2 queries x 2"
    assert shown["labels"] == ["q0.png", "a.png", "b.png", "q1.png", "c.png", "d.png"]
    from edgessl.report.gallery import short_name  # a long name is cut in its middle, its number and extension kept

    assert short_name("pitted_surface_143.jpg") == "pitted_s…e_143.jpg" and short_name("x" * 18) == "x" * 18


def test_a_missing_model_or_manifest_says_where_they_come_from(tmp_path):
    """'Model ... not found.' and 'Manifest ... not found.' had said nothing of edgessl export or --manifest."""
    script = load_script("embed_onnx.py")
    dc = script.device_check()
    with pytest.raises(dc.CheckError) as e:
        script.open_model(tmp_path / "encoder.onnx")
    assert str(e.value) == (f"Model '{tmp_path / 'encoder.onnx'}' not found: `edgessl export RUN` writes "
                            "RUN/export/encoder.onnx.")
    with pytest.raises(dc.CheckError) as e:
        dc.load_manifest(tmp_path / "manifest.json")
    assert str(e.value) == (f"Manifest '{tmp_path / 'manifest.json'}' not found: pass --manifest with the "
                            "manifest.json `edgessl export` wrote beside the model.")


def test_embed_onnx_refuses_a_classifier(tmp_path):
    """embed_onnx.py had written a classifier's logits as "embeddings of dimension 4" without a word."""
    import hashlib
    import json

    script = load_script("embed_onnx.py")
    dc = script.device_check()
    model = tmp_path / "classifier.onnx"
    model.write_bytes(b"not read: the manifest refuses it first")
    pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [
        {"file": model.name, "sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "kind": "classifier",
         "classes": ["a", "b"], "input": {"name": "input"}, "preprocess": pre}]}))
    with pytest.raises(dc.CheckError) as e:
        script.open_model(model)
    assert str(e.value) == ("classifier.onnx is a classifier (logits, one per class); embeddings need an encoder "
                            "export (`edgessl export RUN` writes encoder.onnx).")
    code = script.main([str(model), "--data", str(tmp_path), "--out", str(tmp_path / "e.npz")])
    assert code == 2 and not (tmp_path / "e.npz").exists()

