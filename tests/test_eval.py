"""`edgessl eval`: kNN, metrics, linear probe and subsets against closed forms; eval.json; bad input via the CLI."""

import json
import math
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

import edgessl
from edgessl.cli import app
from edgessl.errors import UserError
from edgessl.evaluate.knn import knn_predict
from edgessl.evaluate.labelled import parse_labels_per_class
from edgessl.evaluate.linear import choose_l2, fit_logistic, linear_probe, standardize, stratified_folds
from edgessl.evaluate.metrics import balanced_accuracy, confusion_matrix, macro_f1, per_class_scores, top1
from edgessl.evaluate.subsets import held_out_count, short_classes, stratified_split, stratified_subset

runner = CliRunner()
RESULT_KEYS = ["encoder", "protocol", "k", "labels_per_class", "seed", "top1", "balanced_accuracy", "macro_f1",
               "n_train", "n_test"]


# ---------------------------------------------------------------- kNN
def test_knn_matches_hand_computation():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    e = math.exp
    # k = 2, t = 0.5: query 0 meets item 0 (cos 1, class 0) and item 2 (cos 1/sqrt 2, class 1)
    got = knn_predict(query, memory, labels, 2, k=2, t=0.5)
    want = torch.tensor([[e(2.0), e(math.sqrt(2))], [0.0, e(2.0) + e(math.sqrt(2))]])
    assert torch.allclose(got, want, rtol=1e-5)
    # k = 200 is clipped to the 4 items: every item votes
    got = knn_predict(query, memory, labels, 2, k=200, t=0.5)
    want = torch.tensor([[e(2.0) + e(-2.0), e(0.0) + e(math.sqrt(2))], [e(0.0) + e(0.0), e(2.0) + e(math.sqrt(2))]])
    assert torch.allclose(got, want, rtol=1e-5)
    # leave-one-out: item 0's nearest other item is item 2 (class 1)
    got = knn_predict(memory, memory, labels, 2, k=1, t=0.5, exclude_self=True)
    assert torch.allclose(got[0], torch.tensor([0.0, e(math.sqrt(2))]), rtol=1e-5)


# ---------------------------------------------------------------- metrics
def test_metrics_match_hand_computation():
    y_true = torch.tensor([0, 0, 0, 1, 1, 2])
    y_pred = torch.tensor([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    s = per_class_scores(cm)
    assert torch.allclose(s["precision"], torch.tensor([1.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(s["recall"], torch.tensor([2 / 3, 0.5, 1.0, 0.0], dtype=torch.float64))
    assert top1(y_true, y_pred) == pytest.approx(4 / 6)
    assert balanced_accuracy(y_true, y_pred, 4) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # class 3 absent
    assert macro_f1(y_true, y_pred, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # a class that is only predicted counts in macro F1 (F1 0), not in balanced accuracy
    y_true, y_pred = torch.tensor([0, 0]), torch.tensor([0, 3])
    assert balanced_accuracy(y_true, y_pred, 4) == pytest.approx(0.5)
    assert macro_f1(y_true, y_pred, 4) == pytest.approx((2 / 3 + 0.0) / 2)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_agree_with_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    y_true = torch.randint(0, 6, (300,), generator=g)
    y_pred = torch.where(torch.rand(300, generator=g) < 0.6, y_true, torch.randint(0, 7, (300,), generator=g))
    assert balanced_accuracy(y_true, y_pred, 7) == pytest.approx(sk.balanced_accuracy_score(y_true, y_pred))
    assert macro_f1(y_true, y_pred, 7) == pytest.approx(sk.f1_score(y_true, y_pred, average="macro"))


# ---------------------------------------------------------------- linear probe
def _blobs(n_per_class, seed, dim=6, classes=3, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = 4.0 * torch.eye(classes, dim)[y] + spread * torch.randn(len(y), dim, generator=g) + 7.0
    return x, y


def test_linear_probe_separates_separable_features():
    x, y = _blobs(20, seed=0)
    xt, yt = _blobs(100, seed=1)
    result = linear_probe(x, y, xt, 3, seed=0)
    assert result.logits.shape == (300, 3)
    assert (result.logits.argmax(dim=1) == yt).float().mean() >= 0.99
    assert result.choice.cross_validated and result.choice.folds == 5
    # every strength separates the blobs: the strongest wins the tie
    assert result.choice.l2 == 10.0 and set(result.choice.cv_top1.values()) == {1.0}


def test_fit_logistic_reaches_the_stationary_point():
    """At the minimiser of mean CE + l2/2 ||W||^2: X^T (P - Y) / N + l2 W = 0 and mean(P - Y) = 0."""
    x, y = _blobs(10, seed=2, spread=2.0)
    x = standardize(x.double())[0]
    l2 = 0.05
    w, b = fit_logistic(x, y, 3, l2, max_iter=500)
    residual = torch.softmax(x @ w + b, dim=1) - torch.nn.functional.one_hot(y, 3).double()
    assert (x.t() @ residual / len(y) + l2 * w).abs().max() < 1e-4
    assert residual.mean(dim=0).abs().max() < 1e-4


def test_probe_standardises_with_the_labelled_features_only():
    """Any per-feature affine change of the features (applied to train and test alike) is undone by the
    standardisation with the labelled set's own statistics: the logits do not move."""
    x, y = _blobs(6, seed=3, spread=2.0)
    x, xt = x.double(), _blobs(10, seed=4, spread=2.0)[0].double()
    scale, shift = torch.linspace(0.01, 100, 6, dtype=torch.float64), torch.linspace(-50, 50, 6, dtype=torch.float64)
    a = linear_probe(x, y, xt, 3, seed=0)
    b = linear_probe(x * scale + shift, y, xt * scale + shift, 3, seed=0)
    assert a.choice.l2 == b.choice.l2
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


def test_one_label_per_class_falls_back_to_fixed_strength():
    x, y = _blobs(1, seed=5)
    choice = choose_l2(x, y, 3, seed=0)
    assert not choice.cross_validated and choice.l2 == pytest.approx(1 / 3) and choice.folds == 0
    # two labels in every class: 2-fold CV
    x, y = _blobs(2, seed=5)
    choice = choose_l2(x, y, 3, seed=0)
    assert choice.cross_validated and choice.folds == 2


def test_stratified_folds_balance_every_class():
    y = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    folds = stratified_folds(y, 3, seed=1)
    for c, n in ((0, 7), (1, 5), (2, 3)):
        per_fold = torch.bincount(folds[y == c], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == n
    sizes = torch.bincount(folds, minlength=3)
    assert sizes.max() - sizes.min() <= 1
    assert torch.equal(folds, stratified_folds(y, 3, seed=1))


# ---------------------------------------------------------------- subsets
def test_stratified_subsets_exact_counts_reproducible_nested():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    sub = stratified_subset(labels, 5, seed=0)
    assert torch.bincount(labels[sub], minlength=3).tolist() == [5, 3, 5]  # class 1 has only 3
    assert len(set(sub.tolist())) == 13 and torch.equal(sub, sub.sort().values)
    assert torch.equal(sub, stratified_subset(labels, 5, seed=0))
    assert any(not torch.equal(sub, stratified_subset(labels, 5, seed=s)) for s in (1, 2, 3))
    one = set(stratified_subset(labels, 1, seed=0).tolist())
    assert torch.bincount(labels[sorted(one)], minlength=3).tolist() == [1, 1, 1]
    assert one <= set(sub.tolist())  # nested within a seed
    assert torch.equal(stratified_subset(labels, None, seed=7), torch.arange(20))
    assert short_classes(labels, 5, 3) == {1: 3} and short_classes(labels, None, 3) == {}
    with pytest.raises(ValueError):
        stratified_subset(labels, 0, seed=0)


def test_stratified_split_counts_and_disjointness():
    assert [held_out_count(n, f) for n, f in ((10, 0.2), (3, 0.2), (2, 0.9), (1, 0.5), (5, 0.5), (7, 0.0))] == \
        [2, 1, 1, 0, 3, 0]
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 1)
    kept, held = stratified_split(labels, 0.2, seed=4)
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    assert sorted(kept.tolist() + held.tolist()) == list(range(14))
    k2, h2 = stratified_split(labels, 0.2, seed=4)
    assert torch.equal(kept, k2) and torch.equal(held, h2)


def test_a_split_names_the_classes_it_cannot_test():
    """--test-fraction holds out round(fraction * n), at least 1 and at most n - 1, of each class: a class of one
    image is kept for training and never tested; the note names it (eval and finetune had scored on the other
    classes without a word)."""
    from edgessl.evaluate.labelled import split_folder, untested_note

    labels = torch.tensor([0, 0, 1, 2, 2, 2, 2, 3])
    split = split_folder(labels, 0.3, 0)
    assert split.untested == [1, 3] and set(labels[split.test_idx].tolist()) == {0, 2}
    assert untested_note(split, ["a", "b", "c", "d"]) == ("note: 2 class(es) have a single image, kept for training, "
                                                         "so none of them is tested: b, d. Add images to them, or "
                                                         "pass a --test folder.")
    assert untested_note(split_folder(torch.tensor([0, 0, 1, 1]), 0.5, 0), ["a", "b"]) is None


def test_parse_labels_per_class():
    assert parse_labels_per_class("1,5,10,all") == [1, 5, 10, None]
    assert parse_labels_per_class(" 10, 5,5 ,ALL") == [5, 10, None]
    assert parse_labels_per_class(3) == [3]
    for bad, msg in (("0", "must be at least 1 (or 'all'), not 0."), ("five", "not 'five'"), (",", "is empty")):
        with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            parse_labels_per_class(bad)


# ---------------------------------------------------------------- the command
@pytest.fixture()
def run_copy(demo_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(demo_run, dst)
    return dst


@pytest.mark.slow
def test_eval_json_table_plot_and_feature_cache(run_copy, labelled_demo):
    args = ["eval", str(run_copy), "--train", str(labelled_demo / "train"), "--test", str(labelled_demo / "test"),
            "--labels-per-class", "1,5,all", "--seeds", "2", "--baseline", "random"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "random init" in out and "gain" in out and "kNN k=200" in out
    assert "note: at 5 labels per class, 1 class(es) used all they have: flags (3)" in out
    report = json.loads((run_copy / "eval.json").read_text())
    rows = report["results"]
    # a progress line per scored subset ('all' is scored once, its second seed reuses it), never a silent grid
    progress = [line for line in res.output.splitlines() if line.startswith("  pretrained | ")]
    assert len(progress) == 5 and progress[0].startswith("  pretrained | 1 label/class, seed 0: kNN@20 ")
    assert re.fullmatch(r"  pretrained \| all labels/class, seed 0: kNN@20 [0-9.]+, linear [0-9.]+ "
                        r"\([0-9.]+ s so far\)", progress[-1])
    assert "kNN k=200 (3 used)" in out and "kNN k=20 (13 used)" in out  # 1 and 5 labels of 3 classes: k capped
    assert "CPU: " in res.output and report["threads"] >= 1
    # 2 encoders x 3 budgets x 2 seeds x (kNN k=20, kNN k=200, linear)
    assert len(rows) == 36
    for r in rows:
        assert list(r)[: len(RESULT_KEYS)] == RESULT_KEYS
        assert all(0.0 <= r[m] <= 1.0 for m in ("top1", "balanced_accuracy", "macro_f1"))
        assert r["n_test"] == 9 and r["k"] in (20, 200, None) and (r["k"] is None) == (r["protocol"] == "linear")
    assert {(r["encoder"], r["labels_per_class"], r["n_train"]) for r in rows} == {
        (e, lpc, n) for e in ("pretrained", "random") for lpc, n in ((1, 3), (5, 13), ("all", 15))}
    assert {r["seed"] for r in rows} == {0, 1}
    assert all(r["k_used"] == min(r["k"], r["n_train"]) for r in rows if r["protocol"] == "knn")
    assert all(not r["l2_cross_validated"] for r in rows if r["protocol"] == "linear" and r["labels_per_class"] == 1)
    # 'all' is one subset: the seeds agree exactly
    alls = {(r["encoder"], r["protocol"], r["k"], r["seed"]): r["top1"] for r in rows if r["labels_per_class"] == "all"}
    assert all(alls[(e, p, k, 0)] == alls[(e, p, k, 1)] for e, p, k, _ in alls)
    assert report["short_classes"] == {"5": {"flags": 3}}
    assert len(report["summary"]) == 18 and report["split"] is None and report["n_train"] == 15
    assert (run_copy / "eval.png").stat().st_size > 0
    assert len(list((run_copy / "features").glob("*.pt"))) == 4  # 2 folders x 2 encoders
    # second run: every feature from the cache, the same numbers
    res = runner.invoke(app, args[:7] + ["all", "--seeds", "1", "--baseline", "random"])
    assert res.exit_code == 0 and res.output.count("(cached)") == 4, res.output
    again = json.loads((run_copy / "eval.json").read_text())["results"]
    first = [r for r in rows if r["labels_per_class"] == "all" and r["seed"] == 0]
    assert len(again) == 6 and [r["top1"] for r in again] == [r["top1"] for r in first]


@pytest.mark.slow
def test_eval_test_fraction_split_is_recorded(run_copy, labelled_demo):
    result = edgessl.evaluate_encoder(run_copy, labelled_demo / "train", test_fraction=0.34, seeds=1, split_seed=3,
                                      quiet=True)
    report = json.loads(result.json_path.read_text())
    # per class round(0.34 n) held out: 6 -> 2, 6 -> 2, 3 -> 1
    assert report["split"]["test_fraction"] == 0.34 and report["split"]["seed"] == 3
    assert (report["n_train"], report["n_test"]) == (10, 5) and report["test"] is None
    assert {r["n_test"] for r in report["results"]} == {5}
    # the default budgets 1,5,10,all lose 5 and 10: no class has more than 4 training images after the split
    assert report["labels_per_class"] == [1, "all"] and report["labels_per_class_dropped"] == [5, 10]
    assert {(r["labels_per_class"], r["n_train"]) for r in report["results"]} == {(1, 3), ("all", 10)}


def _one_line_error(res, message):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert lines == [f"error: {message}"], res.output
    assert "Traceback" not in res.output


def test_eval_bad_input_is_one_line_exit_2(run_copy, labelled_demo, tmp_path):
    train, test = labelled_demo / "train", labelled_demo / "test"
    extra_test = tmp_path / "extra_test"
    shutil.copytree(test, extra_test)
    (extra_test / "zebras").mkdir()
    shutil.copy(next((test / "flags").glob("*.png")), extra_test / "zebras" / "z.png")
    broken = tmp_path / "broken_train"
    shutil.copytree(train, broken)
    (broken / "broken").mkdir()
    (broken / "broken" / "a.png").write_bytes(b"not a png")
    empty = tmp_path / "empty_train"
    shutil.copytree(train, empty)
    (empty / "nothing").mkdir()
    no_encoder = tmp_path / "not_a_run"
    no_encoder.mkdir()
    one_class = tmp_path / "one_class"
    shutil.copytree(train / "flags", one_class / "flags")
    cases = [
        ([str(run_copy), "--train", str(one_class), "--test-fraction", "0.5"],
         f"--train '{one_class}' has one class folder ('flags'): a classifier needs at least two classes, one "
         "subfolder each."),
        ([str(run_copy), "--train", str(train), "--test", str(extra_test)],
         "--test has class folder(s) that --train lacks: 'zebras'. Both need the same class names."),
        ([str(run_copy), "--train", str(broken), "--test", str(test)],
         "--train class folder 'broken' has no readable image; 1 unreadable file(s), e.g. a.png: "
         "unreadable: cannot identify image file"),
        ([str(run_copy), "--train", str(empty), "--test", str(test)],
         "--train class folder 'nothing' has no readable image (it holds no image files)."),
        ([str(run_copy), "--train", str(train), "--test", str(test), "--labels-per-class", "0"],
         "--labels-per-class must be at least 1 (or 'all'), not 0."),
        ([str(run_copy), "--train", str(train), "--test", str(test), "--labels-per-class", "1,7"],
         "--labels-per-class 7: no class of --train has that many images (the largest has 6). "
         "Use a smaller value or 'all'."),
        ([str(no_encoder), "--train", str(train), "--test", str(test)],
         f"No encoder in '{no_encoder}': expected encoder.safetensors and encoder.json "
         "(a run directory of `edgessl pretrain`)."),
        ([str(run_copy), "--train", str(train)],
         "No test data: give --test <folder> (one subfolder per class) or --test-fraction 0.2."),
        ([str(tmp_path / "notes.txt"), "--train", str(train), "--test", str(test)],  # had been named '<its folder>'
         f"'{tmp_path / 'notes.txt'}' is a file, not an encoder: pass a run directory of `edgessl pretrain` (or its "
         "encoder.safetensors)."),
    ]
    (tmp_path / "notes.txt").write_text("not a run")
    for args, message in cases:
        res = runner.invoke(app, ["eval", *args, "--quiet"])
        if "unreadable" in message:  # Pillow's own wording follows: compare the start
            assert res.exit_code == 2 and res.output.startswith(f"error: {message}"), res.output
            assert len(res.output.strip().splitlines()) == 1
        else:
            _one_line_error(res, message)
    assert not (run_copy / "eval.json").exists()


def test_eval_help_has_examples():
    res = runner.invoke(app, ["eval", "--help"])
    assert res.exit_code == 0 and "Examples" in res.output
    for flag in ("--train", "--test", "--test-fraction", "--labels-per-class", "--seeds", "--baseline"):
        assert flag in res.output, flag


@pytest.mark.parametrize("spread, l2", [(0.5, 1e-2), (0.5, 1e-1), (3.0, 1e-2), (3.0, 1.0)])
def test_probe_equals_scikit_learn_logistic_regression(spread, l2):
    """Separable (spread 0.5) and overlapping (3.0) blobs: the same minimiser as scikit-learn's multinomial
    LogisticRegression with C = 1 / (l2 N), i.e. the same probabilities on held-out points."""
    sk = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(40, seed=1, spread=spread)
    xt, _ = _blobs(20, seed=2, spread=spread)
    x, xt = standardize(x, xt)
    w, b = fit_logistic(x, y, 3, l2, max_iter=500)
    ref = sk.LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    ours = torch.softmax(xt @ w + b, dim=1)
    theirs = torch.from_numpy(ref.predict_proba(xt.numpy())).float()
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()
    assert torch.equal(ours.argmax(dim=1), theirs.argmax(dim=1))


def test_cv_sweep_stops_past_the_peak_and_subsets_large_sets():
    from edgessl.evaluate.linear import REFERENCE, ProbeSettings, cv_subset

    x, y = _blobs(30, seed=5, spread=2.0)
    full = choose_l2(x, y, 3, seed=0, settings=ProbeSettings(patience=99, exact_up_to=0))
    early = choose_l2(x, y, 3, seed=0, settings=ProbeSettings(patience=2, exact_up_to=0))
    assert ProbeSettings().for_size(90) == REFERENCE  # a small labelled set: the exact probe
    assert len(full.cv_top1) == 6 and early.cv_top1.items() <= full.cv_top1.items()  # the same scores, fewer fits
    strengths = sorted(full.cv_top1, reverse=True)
    best = strengths.index(early.l2)
    assert all(full.cv_top1[s] <= full.cv_top1[early.l2] for s in strengths[: best + 3])  # the peak of what it saw
    keep = cv_subset(y, 45, seed=0)
    assert len(keep) == 45 and torch.bincount(y[keep]).tolist() == [15, 15, 15]
    assert torch.equal(keep, cv_subset(y, 45, seed=0)) and not torch.equal(keep, cv_subset(y, 45, seed=1))


def test_knn_one_search_serves_every_k():
    from edgessl.evaluate.knn import knn_predict_many

    g = torch.Generator().manual_seed(0)
    mem, q = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    many = knn_predict_many(q, mem, labels, 5, (20, 200))
    for k in (20, 200):
        assert torch.allclose(many[k], knn_predict(q, mem, labels, 5, k), atol=1e-5)
    loo = knn_predict_many(mem, mem, labels, 5, (20, 400), exclude_self=True)
    assert torch.allclose(loo[400], knn_predict(mem, mem, labels, 5, 299, exclude_self=True), atol=1e-5)


def _exact_loo_top1(feats: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, k: int, t: float = 0.1) -> float:
    """Leave-one-out weighted kNN by brute force, one query at a time (the definition, no shared search)."""
    f = torch.nn.functional.normalize(feats, dim=1)
    right = 0
    for i in rows.tolist():
        sim = f @ f[i]
        sim[i] = -float("inf")
        top, idx = sim.topk(k)
        scores = torch.zeros(int(labels.max()) + 1).index_add_(0, labels[idx], (top / t).exp())
        right += int(scores.argmax() == labels[i])
    return right / len(rows)


class _Images:
    """An ImageSet stand-in for the monitor: N 'images' whose features are fixed vectors (the backbone is the
    identity on a flattened row)."""
    def __init__(self, feats, labels, classes):
        self.feats, self.labels, self.classes = feats, labels, classes

    def __len__(self):
        return len(self.feats)

    def get(self, index):
        return self.feats[index]


def test_monitor_knn_equals_the_exact_computation_and_subsamples_queries_above_the_bound(monkeypatch):
    from edgessl.evaluate import monitor as mon

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    feats = torch.randn(400, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 8)
    images = _Images(feats, labels, ["a", "b", "c", "d"])
    monkeypatch.setattr(mon, "extract_features", lambda model, imgs, mean, std, device, keep_on_device=False,
                        rows=None: imgs.feats if rows is None else imgs.feats[rows])
    full = mon.Monitor(images, None, max_queries=0)(None, "cpu", None, None)  # no subsampling: every image
    everyone = torch.arange(400)
    assert full["knn_top1"] == pytest.approx(_exact_loo_top1(feats, labels, everyone, 20))
    assert full["knn_top1_k200"] == pytest.approx(_exact_loo_top1(feats, labels, everyone, 200))
    assert mon.Monitor(images, None, max_queries=400).subset is None  # at the bound: still all of them
    sub = mon.Monitor(images, None, max_queries=100, seed=3)
    assert len(sub.subset) == 100 and torch.equal(sub.subset, mon.Monitor(images, None, 100, seed=3).subset)
    assert "100 of 400" in sub.describe() and "covers" not in sub.describe()
    assert mon.Monitor(None, images, off="--eval-every 0").describe() == "off (--eval-every 0)"  # not "no labels"
    assert mon.Monitor(None, None).describe() == "off (no labels: --labels-from-folders for class subfolders, or --val)"
    few = _Images(feats[:20], labels[:20], images.classes)
    assert mon.Monitor(few, None).describe() == ("leave-one-out on 20 labelled images (k = 20 covers all 19 other "
                                                 "images: each score is then a vote of every class, and means little)")
    fifty = _Images(feats[:50], labels[:50], images.classes)  # kNN@200 of 49 voters had read 0.02, no caveat
    assert mon.Monitor(fifty, None).describe() == ("leave-one-out on 50 labelled images (k = 200 covers all 49 other "
                                                   "images: kNN@200 is then a vote of every class, and means little)")
    got = sub(None, "cpu", None, None)  # the subset's queries against all 400 memory images, leaving each out
    assert got["knn_top1"] == pytest.approx(_exact_loo_top1(feats, labels, sub.subset, 20))
    assert got["knn_top1_k200"] == pytest.approx(_exact_loo_top1(feats, labels, sub.subset, 200))


def test_closed_form_gradient_equals_autograd():
    from edgessl.evaluate.linear import logistic_objective, objective_and_grad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (50,), generator=g)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    want = logistic_objective(x, y, w, b, 0.3)
    want.backward()
    loss, gw, gb = objective_and_grad(x, x.t().contiguous(), torch.nn.functional.one_hot(y, 4).double(),
                                      w.detach(), b.detach(), 0.3)
    assert torch.allclose(loss, want) and torch.allclose(gw, w.grad) and torch.allclose(gb, b.grad)


def test_fewer_images_than_dimensions_fit_in_the_row_space_with_the_same_answer():
    from edgessl.evaluate.linear import row_space

    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 100, generator=g, dtype=torch.float64)
    y = torch.arange(30) % 3
    xt = torch.randn(12, 100, generator=g, dtype=torch.float64)
    xr, xtr = row_space(x, xt)
    assert xr.shape == (30, 30) and xtr.shape == (12, 30)
    w, b = fit_logistic(x, y, 3, 0.05, max_iter=500)
    wr, br = fit_logistic(xr, y, 3, 0.05, max_iter=500)
    full, reduced = xt @ w + b, xtr @ wr + br  # the same minimiser, up to L-BFGS's stopping tolerance
    assert torch.allclose(full, reduced, atol=1e-3) and torch.equal(full.argmax(1), reduced.argmax(1))
    big = torch.randn(200, 10, generator=g)
    assert row_space(big)[0] is big  # more images than dimensions: unchanged


def test_the_probe_and_metrics_of_an_mps_encoder_run_on_the_cpu():
    """MPS has no float64, which the probe (up to 2,500 labels) and the metrics use: `eval --device mps` (what auto
    picks on Apple silicon) would have failed at its first fit. The rows are the CPU's."""
    import torch

    from edgessl.evaluate.protocol import FeatureSet, evaluate_features

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(8)
    features = torch.randn(24, 5, generator=g) + 2 * torch.nn.functional.one_hot(labels, 5)
    train = FeatureSet(features, labels, ["a", "b", "c"], [f"{i}.png" for i in range(24)])
    test_x, test_y = features[::2] + 0.1, labels[::2]
    cpu = evaluate_features(train, test_x, test_y, [4], [0], "pretrained", device="cpu")
    mps = evaluate_features(train, test_x, test_y, [4], [0], "pretrained", device=torch.device("mps"))
    assert mps == cpu and len(cpu) == 3  # kNN k=20, k=200, linear


@pytest.mark.slow
def test_a_run_folder_eval_cannot_write_is_refused_before_any_work(demo_run, labelled_demo, tmp_path, monkeypatch):
    """A read-only run had computed every feature, then failed on features/ advising an --out eval does not have."""
    import os

    from edgessl.workflows import eval as eval_mod

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    real = os.access
    monkeypatch.setattr(eval_mod.os, "access",  # run as root here: the folder's permissions would not stop it
                        lambda path, mode, **kw: real(path, mode, **kw) and not (mode == os.W_OK and
                                                                               os.path.abspath(path) == str(run)))
    res = CliRunner().invoke(app, ["eval", str(run), "--train", str(labelled_demo / "train"), "--test-fraction",
                                   "0.34", "--seeds", "1", "--threads", "1"])
    assert res.exit_code == 2, res.output
    assert " ".join(res.output.split()) == (
        f"error: '{run}' cannot be written: eval writes eval.json, eval.png and its feature cache there. Evaluate a "
        "copy of the run (cp -r RUN COPY), or make the folder writable.")
    assert not (run / "features").exists() and not (run / "eval.json").exists()


def test_the_leave_one_out_k_stays_below_the_smallest_class():
    """export's knn_accuracy used k = min(20, n - 1): with the image left out, its class has one voter fewer, and
    a k near the class size votes against it (0.0 on 20 identical outputs in 4 classes; chance 0.25)."""
    from edgessl.evaluate.knn import loo_k

    assert loo_k(torch.tensor([0] * 30 + [1] * 30)) == 20 and loo_k([0] * 6 + [1] * 6) == 5
    assert loo_k([0, 0, 2, 2, 2]) == 1 and loo_k([3]) == 1  # an absent class is no class; never below 1
    labels = torch.arange(4).repeat_interleave(5)
    same = torch.ones(20, 3)
    wrong = knn_predict(same, same, labels, 4, k=19, exclude_self=True).argmax(1) != labels
    assert wrong.all()  # the old k: every image voted out of its own class


def test_eval_notes_a_probe_that_could_not_cross_validate_above_one_label():
    """A class with one image had made every budget fall back to l2 = 1/N, and nothing said so."""
    from edgessl.workflows.eval import uncrossed_notes

    rows = [{"protocol": "linear", "labels_per_class": v, "l2_cross_validated": cv}
            for v, cv in ((1, False), (5, False), (5, False), ("all", False), (10, True))]
    rows.append({"protocol": "knn", "labels_per_class": 5})
    assert uncrossed_notes(rows) == [
        f"note: at {v} labels per class a class has a single labelled image, so the linear probe took l2 = 1/N "
        "without cross-validation (eval.json: l2_cross_validated false)." for v in (5, "all")]  # 1: always (docs)


def test_a_knn_panel_says_where_every_labelled_image_votes():
    """eval.png's panels had read 'kNN (k=200)' where 27 labelled images were all there were."""
    from edgessl.report.eval_plots import panel_title

    summary = [{"protocol": "knn", "k": 200, "labels_per_class": v, "n_train": n} for v, n in ((1, 9), (10, 90),
                                                                                             (20, 200), ("all", 1529))]
    assert panel_title(summary, "knn", 200, "kNN (k=200)") == \
        "kNN (k=200)\nall labelled images vote at 1, 10, 20/class"  # 200 images at k=200: all vote too
    assert panel_title(summary, "knn", 20, "kNN (k=20)") == "kNN (k=20)"  # no k=20 rows: nothing to say
    assert panel_title(summary, "linear", None, "linear probe") == "linear probe"
