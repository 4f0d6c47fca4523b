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
    duplicate_pairs,
    find_duplicates,
    group_pairs,
    mutual_pairs,
    nearest_distances,
    pca_whitening,
    top_k_neighbours,
    unit_rows,
    whitened_unit_rows,
)
from edgessl.scripts import load_script
from edgessl.workflows.embed import check_out, read_embeddings, write_embeddings

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


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_duplicate_pairs_and_groups_in_closed_form(chunk):
    # rows 0 and 3 equal; 1, 4, 5 a chain (1~4 at cos 0.96, 4~5 at 0.96, 1~5 at 0.8432 < 0.9); 2 and 6 alone
    a = np.deg2rad(16.26)  # cos 16.26 deg = 0.96
    x = np.zeros((7, 4))
    x[0] = x[3] = [1, 0, 0, 0]
    x[1], x[4], x[5] = [0, 1, 0, 0], [0, np.cos(a), np.sin(a), 0], [0, np.cos(2 * a), np.sin(2 * a), 0]
    x[2], x[6] = [0, 0, 0, 1], [0.6, 0, 0, -0.8]
    pairs, cos = duplicate_pairs(unit_rows(x), 0.9, chunk=chunk)
    assert pairs.tolist() == [[0, 3], [1, 4], [4, 5]]
    np.testing.assert_allclose(cos, [1.0, 0.96, 0.96], atol=1e-4)
    assert group_pairs(7, pairs).tolist() == [1, 2, 2]


def test_group_pairs_numbers_groups_by_lowest_image():
    pairs = np.array([[4, 5], [0, 3], [3, 1], [2, 5]])
    assert group_pairs(6, pairs).tolist() == [2, 1, 1, 2]


def _copy_beside_a_look_alike():
    """0 an original, 1 its pixel twin, 2 its copy at cos 0.98, 3 a look-alike at cos 0.95 from the copy (0.869 from
    the original), 4 far from all."""
    g, d = np.arccos(0.98), np.arccos(0.95)
    return unit_rows(np.array([[1, 0, 0], [1, 0, 0], [np.cos(g), np.sin(g), 0],
                               [np.cos(g + d), np.sin(g + d), 0], [0, 0, 1.0]]))


def test_nearest_distances_skip_twins():
    x = _copy_beside_a_look_alike()
    np.testing.assert_allclose(nearest_distances(x, use_faiss=False), [0.02, 0.02, 0.02, 0.05, 1.0], atol=1e-6)
    # k = 1: row 0's only candidate is its twin, so only twins stay near it
    assert nearest_distances(x, k=1, use_faiss=False)[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("ratio, kept", [
    (0.0, [[0, 1], [0, 2], [1, 2]]),   # mutual nearest (the twin counts as one with the original)
    (0.75, [[0, 1], [0, 2], [1, 2]]),  # copy-look-alike: 0.05 > 1.75 x 0.02, the copy's own nearest distance
    (2.0, [[0, 1], [0, 2], [1, 2], [2, 3]]),  # 0.05 <= 3 x 0.02 and <= 3 x 0.05; 0-3 at 0.131 > 3 x 0.02
])
def test_mutual_pairs_in_closed_form(ratio, kept):
    x = _copy_beside_a_look_alike()
    pairs, cos = duplicate_pairs(x, 0.85)
    assert pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    keep = mutual_pairs(pairs, cos, nearest_distances(x, use_faiss=False), ratio)
    assert pairs[keep].tolist() == kept
    found, found_cos, candidates = find_duplicates(x, 0.85, ratio, use_faiss=False)
    assert found.tolist() == kept and candidates == 6 and (found_cos == cos[keep]).all()
    assert group_pairs(5, found).tolist() == [1] * len(kept)


def test_duplicate_pairs_refuses_a_threshold_that_matches_too_many():
    with pytest.raises(UserError) as e:
        duplicate_pairs(_random_unit(50), -1.0, chunk=8, max_pairs=100)
    assert str(e.value) == ("More than 100 pairs of images reach cosine -1; "
                            "raise --duplicates (e.g. 0.95) to find near-duplicates.")


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
         "error: --duplicates is a cosine between -1 and 1 (e.g. 0.95), not 1.5."),
        (["--out", str(tmp_path / "e.npz"), "--threads", "2"],
         "error: --manifest and --threads are for an .onnx source; SOURCE here is a run directory."),
        (["--out", str(tmp_path / "e.npz"), "--duplicates", "0.9", "--whiten", "0"],
         "error: --whiten must be a positive number of directions (e.g. 128), not 0."),
        (["--out", str(tmp_path / "e.npz"), "--whiten", "8"],
         "error: --whiten changes the --neighbours and --duplicates search: pass one of them too."),
        (["--out", str(tmp_path / "e.npz"), "--duplicates", "0.9", "--mutual", "-1"],
         "error: --mutual is a distance ratio of at least 0 (e.g. 0.75), not -1.0."),
        (["--out", str(tmp_path / "e.npz"), "--neighbours", "2", "--mutual", "0.5"],
         "error: --mutual filters the --duplicates pairs: pass --duplicates too."),
    ]
    for extra, message in cases:
        res = runner.invoke(app, ["embed", str(demo_run), "--data", str(tiny_data), *extra])
        assert res.exit_code == 2, res.output
        assert res.output.strip() == message
    assert not (tmp_path / "e.npz").exists()


@pytest.mark.slow
def test_whiten_searches_the_whitened_embeddings_and_stores_the_raw_ones(tmp_path, demo_run, tiny_data):
    res = runner.invoke(app, ["embed", str(demo_run), "--data", str(tiny_data), "--out", str(tmp_path / "e.npz"),
                              "--neighbours", "2", "--duplicates", "0.5", "--whiten", "8"])
    assert res.exit_code == 0, res.output
    assert "at cosine >= 0.5 (whitened, 8 directions) in" in res.output
    paths, emb = read_embeddings(tmp_path / "e.npz")
    unit = whitened_unit_rows(emb, *pca_whitening(emb, 8))
    idx, cos = top_k_neighbours(unit, 2, use_faiss=False)
    with open(tmp_path / "neighbours.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["neighbour"] for r in rows] == [paths[j] for j in idx.ravel()]
    np.testing.assert_allclose([float(r["cosine"]) for r in rows], cos.ravel(), atol=2e-4)
    pairs, _ = duplicate_pairs(unit, 0.5)
    assert len(pairs) > 0 and f"{len(pairs)} pair" in res.output
    raw = unit_rows(emb) @ unit_rows(emb).T
    assert ((raw >= 0.5).sum() - len(emb)) // 2 != len(pairs)  # the raw cosines would give other pairs
    res = runner.invoke(app, ["embed", str(demo_run), "--data", str(tiny_data), "--out", str(tmp_path / "f.npz"),
                              "--neighbours", "2", "--whiten", "24"])
    assert res.exit_code == 2 and res.output.strip() == (
        "error: --whiten 24: between 1 and 23 (the embedding's dimensions and images - 1).")


def test_mutual_zero_keeps_the_mutual_nearest_pairs_of_the_threshold(tmp_path, demo_run, tiny_data):
    res = runner.invoke(app, ["embed", str(demo_run), "--data", str(tiny_data), "--out", str(tmp_path / "e.npz"),
                              "--duplicates", "0.3", "--mutual", "0"])
    assert res.exit_code == 0, res.output
    paths, emb = read_embeddings(tmp_path / "e.npz")
    sim = unit_rows(emb) @ unit_rows(emb).T
    np.fill_diagonal(sim, -np.inf)
    best = sim.max(axis=1)  # no pixel twins among these images
    want = {(paths[i], paths[j]) for i in range(len(paths)) for j in range(i + 1, len(paths))
            if sim[i, j] >= 0.3 and sim[i, j] >= best[i] - 1e-5 and sim[i, j] >= best[j] - 1e-5}
    with open(tmp_path / "duplicates.csv") as f:
        got = {(r["image_a"], r["image_b"]) for r in csv.DictReader(f)}
    candidates = int((sim >= 0.3).sum()) // 2
    assert got == want and 0 < len(got) < candidates
    assert f"{len(got)} pair" in res.output and f"mutual within 0 (of {candidates} at the threshold)" in res.output


def test_onnx_route_lists_unreadable_files_with_pretrainings_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    script = load_script("embed_onnx.py")
    pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    for name in ("empty.png", "junk.jpg"):
        assert script.try_decode(tmp_path / name, pre) == _try_decode(tmp_path / name, 32)
    assert script.try_decode(tmp_path / "empty.png", pre) == (None, "empty file (0 bytes)")


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
                              "--neighbours", "3", "--duplicates", "0.999", "--gallery-rows", "4"])
    assert res.exit_code == 0, res.output
    assert "Embedded 9 images" in res.output
    b = edgessl.embed(run / "export" / "encoder.onnx", data, tmp_path / "b" / "e.npz", neighbours=3)
    paths, emb = read_embeddings(tmp_path / "a" / "e.npz")
    assert paths == b.paths and len(paths) == 9
    cos = (unit_rows(emb) * unit_rows(b.embeddings)).sum(axis=1)
    assert cos.min() >= 0.9999
    broken = data / "activities" / "broken.png"
    skipped = [(tmp_path / d / "skipped_files.txt").read_text() for d in ("a", "b")]
    assert skipped[0] == skipped[1] == f"{broken}\t{_try_decode(broken, 32)[1]}\n"
    with open(tmp_path / "a" / "neighbours.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * 3 and rows[0]["query"] == paths[0] and rows[0]["rank"] == "1"
    assert (tmp_path / "a" / "neighbours.png").stat().st_size > 5000
    assert (tmp_path / "a" / "duplicates.csv").read_text().startswith("group,image_a,image_b,cosine")


