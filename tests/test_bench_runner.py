"""The benchmark runner's guards (benchmarks/run.py), without training anything: options a suite does not read,
lightly missing, --tiny kept away from the committed results, partial reruns that never mix scales, and the shared
data missing as one line."""

import importlib.util
import json
from types import SimpleNamespace

import pytest

import benchmarks.datasets as bench_data
import benchmarks.run as runner
from benchmarks.domains import curves_plot, plan
from benchmarks.gpu import suite_gpu


def _args(suite, **kw):
    base = {"suite": suite, "only": None, "datasets": None, "ablations": None, "tiny": True}
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize(("suite", "flag", "value", "message"), [
    ("cost", "only", ["30"], "--only is read by the gpu, domains, duplicates suites, not by cost"),
    ("ablation", "datasets", ["emoji"], "--datasets is read by the accuracy, budget, export suites, not by ablation"),
    ("cost", "ablations", ["full"], "--ablations is read by the ablation, teacher suites, not by cost"),
])
def test_an_option_the_suite_does_not_read_is_refused_before_anything_runs(suite, flag, value, message):
    with pytest.raises(SystemExit, match=f"^{message}$"):
        runner.check_args(_args(suite, **{flag: value}), (suite,))


def test_only_on_every_suite_at_once_is_refused():
    with pytest.raises(SystemExit, match="^--only names parts of one suite: run that suite alone"):
        runner.check_args(_args("all", only=["peers"]), runner.SUITES)


def test_a_suite_that_compares_with_lightly_says_so_before_training_when_it_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightly" else real(name, *a))
    with pytest.raises(SystemExit, match=r"^accuracy: compared with lightly's methods, which are not installed: "
                                         r"pip install -e '\.\[bench\]'$"):
        runner.check_args(_args("accuracy"), ("accuracy",))
    runner.check_args(_args("domains", only=["epochs"]), ("domains",))  # no SimCLR in that part: it runs
    with pytest.raises(SystemExit, match="^domains: compared"):
        runner.check_args(_args("domains", only=["peers"]), ("domains",))
    runner.check_args(_args("ablation"), ("ablation",))


def test_tiny_writes_to_a_temporary_folder_unless_told_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner.tempfile, "tempdir", str(tmp_path))
    args = _args("cost", results=None, readme=None)
    runner.outputs(args)
    assert args.results.parent == tmp_path and args.readme == args.results / "README.md"
    assert f"--tiny: results go to {args.results} (benchmarks/results is left as it is)" in capsys.readouterr().out
    told = _args("cost", results=tmp_path / "mine", readme=None)  # --results=DIR or --res DIR alike
    runner.outputs(told)
    assert told.results == tmp_path / "mine" and told.readme == tmp_path / "mine" / "README.md"
    only_readme = _args("cost", results=None, readme=tmp_path / "R.md")  # had left the committed results in place
    runner.outputs(only_readme)
    assert only_readme.results.parent == tmp_path and only_readme.readme == tmp_path / "R.md"
    full = _args("cost", tiny=False, results=None, readme=None)
    runner.outputs(full)
    assert full.results == runner.RESULTS and full.readme == runner.REPO / "benchmarks" / "README.md"


def test_a_partial_rerun_keeps_earlier_rows_only_of_the_same_scale(tmp_path):
    old = tmp_path / "accuracy.json"
    assert runner.earlier_rows(old, tiny=False) == []
    old.write_text(json.dumps({"tiny": False, "rows": [{"data": "emoji"}]}))
    assert runner.earlier_rows(old, tiny=False) == [{"data": "emoji"}]
    assert runner.earlier_rows(old, tiny=True) == []  # a smoke run never lands beside real rows


def test_an_unknown_part_is_refused_by_the_domains_and_gpu_suites():
    with pytest.raises(SystemExit, match=r"^domains: --only takes parts of epochs, sizes, peers, teacher, "
                                         r"temperature, bank, not bogus$"):
        plan(SimpleNamespace(only=["epochs", "bogus"], tiny=True))
    with pytest.raises(SystemExit, match=r"^gpu: --only takes parts of data, steps, cifar, not bogus$"):
        suite_gpu(SimpleNamespace(only=["bogus"], tiny=True, device="cpu", minutes=None))


def test_the_curves_plot_draws_with_no_rows(tmp_path):
    curves_plot([], tmp_path / "c.png")  # had failed: one Axes is not iterable
    assert (tmp_path / "c.png").stat().st_size > 0


def test_missing_shared_data_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_data, "SHARED", tmp_path / "absent")
    with pytest.raises(SystemExit) as e:
        runner.main(["ablation", "--tiny", "--results", str(tmp_path / "r")])
    assert str(e.value) == (f"error: {tmp_path / 'absent' / 'emoji-google.tar.gz'} not found: the benchmarks need "
                            "the shared data sets next to the repo.")


def test_the_export_suites_documented_dataset_rerun_is_accepted():
    """`python -m benchmarks.run export --datasets neu-det cifar10-1k` (benchmarks/README.md) had been refused."""
    runner.check_args(_args("export", datasets=["neu-det"]), ("export",))
    assert "export" in runner.DATASET_SUITES  # and its other data sets' rows are kept
