"""The int8 search of `edgessl export --int8` (issue #15): the candidate order, the decision and its one line, the
manifest's record of the candidates, the "int8 is slower, kept fp32" path and that no failed candidate stays on
disk. The order and the decision are tested with injected parity and timings (no model); the export tests use the
tiny `demo_run` (32 px) with the parity or the timing injected where the outcome must not depend on the machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import edgessl
from edgessl.deploy import int8search as i8

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _parity(mean: float, low: float = 0.9) -> dict:
    return {"min_cosine": low, "mean_cosine": mean, "max_abs_diff": 0.5, "rel_max_abs_diff": 0.1}


def _fake_attempt(means: dict[str, float], log: list[str]):
    """attempt(candidate) with a mean cosine per candidate label (default 0.9: fails the 0.93 bound)."""
    from edgessl.deploy import onnx as ox

    def attempt(c: i8.Candidate) -> i8.Attempt:
        log.append(c.label)
        parity = _parity(means.get(c.label, 0.9))
        return i8.Attempt(c, parity, ox.failed_bounds(parity, "int8"), 1.0)

    return attempt


TAILS = [{"share": 0.125, "nodes": ("c",)}, {"share": 0.25, "nodes": ("b", "c")},
         {"share": 0.5, "nodes": ("a", "b", "c")}]


# ------------------------------------------------------------------------------------------------ order


def test_search_order_methods_then_tails_of_the_closest_and_stops_at_the_first_pass():
    log, asked = [], []

    def tails_for(closest):
        asked.append(closest.candidate.label)
        return TAILS

    means = {"minmax": 0.90, "percentile": 0.92, "moving-average": 0.91, "percentile + 2 nodes in float": 0.95}
    tried = i8.search("minmax", _fake_attempt(means, log), tails_for)
    assert log == ["minmax", "percentile", "moving-average", "percentile + 1 nodes in float",
                   "percentile + 2 nodes in float"]  # the 3-node tail is never built
    assert asked == ["percentile"]  # the closest method is measured, once
    assert [a.passed for a in tried] == [False, False, False, False, True]
    assert tried[-1].candidate == i8.Candidate("percentile", ("b", "c"), 0.25)


def test_search_starts_with_the_users_method_and_stops_when_it_passes():
    log = []
    tried = i8.search("percentile", _fake_attempt({"percentile": 0.97}, log), lambda closest: pytest.fail("measured"))
    assert log == ["percentile"] and tried[-1].passed
    log.clear()
    i8.search("entropy", _fake_attempt({}, log), lambda closest: [])
    assert log == ["entropy", "minmax", "percentile", "moving-average"]  # entropy only when asked for


def test_search_without_a_built_candidate_or_measurement_ends_after_the_methods():
    def broken(c):
        return i8.Attempt(c, missed=["ValidationFailed: int8 quantisation of encoder.onnx failed: boom"])

    tried = i8.search("minmax", broken, lambda closest: pytest.fail("nothing to measure"))
    assert [a.candidate.method for a in tried] == ["minmax", "percentile", "moving-average"]
    ship, line = i8.decide(tried, "search", None)
    assert not ship and "quantisation failed for every candidate" in line and "boom" in line


def test_shortfall_ranks_the_closest_candidate():
    assert i8.shortfall(_parity(0.95)) < 0 < i8.shortfall(_parity(0.92)) < i8.shortfall(_parity(0.90))
    assert i8.shortfall(_parity(0.99, low=0.5)) == pytest.approx(0.25)  # the min bound (0.75) decides


# ------------------------------------------------------------------------------------------------ decision


def _tried(*means: float) -> list[i8.Attempt]:
    from edgessl.deploy import onnx as ox

    out = []
    for j, m in enumerate(means):
        parity = _parity(m)
        out.append(i8.Attempt(i8.Candidate("minmax", tuple("n" * j)), parity, ox.failed_bounds(parity, "int8")))
    return out


def test_decide_no_candidate_passes_keeps_fp32_in_one_line():
    ship, line = i8.decide(_tried(0.90, 0.91, 0.92), "search", None, "fp32 and fp16")
    assert not ship and "\n" not in line
    assert "none of 3 candidates" in line and "mean_cosine >= 0.93" in line and "0.9200" in line
    assert "Kept fp32 and fp16" in line


def _speed(median: float, low: float, high: float) -> dict:
    return {"batch1_ms": {"p50": median, "p90": high, "low": low, "high": high, "runs": 50}}


def test_decide_writes_a_passing_int8_whatever_this_machine_s_speed():
    tried = _tried(0.90, 0.96)
    for mode in ("search", "keep-slow"):
        ship, line = i8.decide(tried, mode, None)
        assert ship and line == "int8: minmax + 1 nodes in float passes (mean cosine 0.9600, min 0.9000) after 2 " \
                                "candidates."
    fp32, slow = _speed(0.5, 0.48, 0.52), _speed(0.8, 0.78, 0.83)
    ship, line = i8.decide(tried, "faster-here", (fp32, slow, "slower"))
    assert not ship and "\n" not in line and "not clearly faster than fp32 on this machine" in line
    assert "int8 0.8 ms vs fp32 0.5 ms, slower" in line and "--int8-mode faster-here" in line
    assert "; ranges 0.78-0.83 ms and 0.48-0.52 ms, timed for this decision)" in line
    record = i8.search_record("faster-here", tried, False, line, None, (fp32, slow, "slower"))
    assert record["decision_speed"] == {"fp32": fp32["batch1_ms"], "int8": slow["batch1_ms"], "verdict": "slower"}
    assert "decision_speed" not in i8.search_record("search", tried, True, line, None)
    ship, line = i8.decide(tried, "faster-here", (fp32, _speed(0.49, 0.45, 0.51), "no clear difference"))
    assert not ship and "no clear difference" in line
    ship, _ = i8.decide(tried, "faster-here", (fp32, _speed(0.3, 0.29, 0.31), "faster"))
    assert ship


def test_the_latency_routine_names_no_winner_when_the_spreads_overlap(monkeypatch):
    """timed_rounds with injected clock readings: a takes 1.0-1.2 ms per round, b 1.1-1.3 ms (overlap: no clear
    difference); c 2.0 ms every round (slower than a)."""
    from edgessl.scripts import device_check_module

    dc = device_check_module()
    durations = {"a": iter([1.0, 1.2, 1.1] * 10), "b": iter([1.3, 1.1, 1.2] * 10), "c": iter([2.0] * 30)}
    clock = {"t": 0.0, "current": None}

    def fn(name):
        def run():
            clock["current"] = name
        return run

    def perf_counter():  # called before and after each run: the second call adds the run's duration
        if clock["current"] is not None:
            clock["t"] += next(durations[clock["current"]]) / 1000
            clock["current"] = None
        return clock["t"]

    monkeypatch.setattr(dc.time, "perf_counter", perf_counter)
    res = dc.timed_rounds({"a": fn("a"), "b": fn("b"), "c": fn("c")}, rounds=3, runs=1, warmup=0)
    assert (res["a"]["low_ms"], res["a"]["high_ms"]) == pytest.approx((1.0, 1.2))
    assert (res["b"]["low_ms"], res["b"]["high_ms"]) == pytest.approx((1.1, 1.3))
    assert res["a"]["median_ms"] == pytest.approx(1.1) and res["a"]["runs"] == 3
    assert dc.verdict(res["a"], res["b"]) == "no clear difference" == dc.verdict(res["b"], res["a"])
    assert dc.verdict(res["a"], res["c"]) == "faster" and dc.verdict(res["c"], res["a"]) == "slower"


def test_mode_argument():
    assert i8.int8_mode(True) == "search" and i8.int8_mode(False) is None and i8.int8_mode(None) is None
    assert i8.int8_mode("strict") == "strict" and i8.int8_mode("keep-slow") == "keep-slow"
    assert i8.int8_mode("faster-here") == "faster-here"
    from edgessl.errors import UserError

    with pytest.raises(UserError, match="--int8-mode must be one of search, keep-slow, faster-here, strict"):
        i8.int8_mode("fast")


# ------------------------------------------------------------------------------------------------ sensitivity


def _graph():
    """x -> A (Relu) -> B (Neg) -> C (Add a, b) -> D (Relu) -> y: a residual block between two single tensors."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="A"), helper.make_node("Neg", ["a"], ["b"], name="B"),
             helper.make_node("Add", ["a", "b"], ["c"], name="C"), helper.make_node("Relu", ["c"], ["y"], name="D")]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", [info[0]], [info[1]]))
    onnx.checker.check_model(model)
    return model


def test_blocks_cut_at_single_live_tensors():
    pytest.importorskip("onnx")
    from edgessl.deploy import sensitivity as sn

    model = _graph()
    assert sn.blocks(model, {"a", "b", "c", "y"}) == [(["A"], "a"), (["B", "C"], "c"), (["D"], "y")]
    assert sn.blocks(model, {"y"}) == [(["A", "B", "C", "D"], "y")]  # only known tensors end a block
    assert sn.blocks(model, {"a"}) == [(["A"], "a"), (["B", "C", "D"], None)]


def test_float_tails_grow_from_the_output_and_skip_repeats():
    from edgessl.deploy import sensitivity as sn

    cut = [(["s"], "t0"), (["a1", "a2"], "t1"), (["b1"], "t2"), (["h", "unquantised"], "out")]
    errors = {"t0": 0.01, "t1": 0.05, "t2": 0.09, "out": 0.10}
    tails = sn.float_tails(cut, errors, ["s", "a1", "a2", "b1", "h"], shares=(0.05, 0.125, 0.5, 0.75, 0.95))
    assert [t["nodes"] for t in tails] == [("h",), ("b1", "h"), ("a1", "a2", "b1", "h"),
                                           ("s", "a1", "a2", "b1", "h")]
    assert [t["share"] for t in tails] == [0.05, 0.125, 0.5, 0.95]  # 0.75 repeats 0.5's tail
    assert sn.float_tails(cut, errors, []) == []


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture
def exporting(demo_run, monkeypatch, tmp_path):
    """Export demo_run with the int8 search into tmp_path/out; the search's temporary files go under
    tmp_path/scratch, the candidate files it builds are listed in `built`."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from edgessl.deploy import convert as ex
    from edgessl.deploy import speed as sp

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(ex, "SCRATCH", str(scratch))
    monkeypatch.setattr(sp, "ROUNDS", 2)
    monkeypatch.setattr(sp, "RUNS", 2)
    monkeypatch.setattr(sp, "THROUGHPUT_ROUNDS", 1)
    built: list[Path] = []
    real = ex._attempt

    def recording(candidate, file, *args, **kwargs):
        built.append(file)
        return real(candidate, file, *args, **kwargs)

    monkeypatch.setattr(ex, "_attempt", recording)

    def run(int8="search", **kwargs):
        return edgessl.export(demo_run, int8=int8, out=tmp_path / "out", **kwargs)

    run.scratch, run.built, run.out = scratch, built, tmp_path / "out"
    return run


def _pass_only(monkeypatch, rule):
    """Inject the parity verdict: a candidate passes when rule(candidate) holds (its real figures are kept)."""
    from edgessl.deploy import convert as ex

    inner = ex._attempt

    def judged(candidate, *args, **kwargs):
        a = inner(candidate, *args, **kwargs)
        if a.parity is not None:
            a.missed = [] if rule(candidate) else ["mean_cosine injected miss"]
        return a

    monkeypatch.setattr(ex, "_attempt", judged)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _no_leftovers(run) -> None:
    assert run.built and not any(p.exists() for p in run.built)
    assert list(run.scratch.iterdir()) == []
    assert not list(run.out.glob("*.part")) and not list(run.out.glob("*.pre.onnx"))


@pytest.mark.slow
def test_search_ships_the_first_passing_tail_and_records_every_candidate(exporting, monkeypatch):

    _pass_only(monkeypatch, lambda c: len(c.nodes_in_float) > 0)  # the methods fail, the first tail passes
    result = exporting()
    assert (exporting.out / "encoder.int8.onnx").is_file()
    manifest = _manifest(exporting.out)
    fp32, int8 = manifest["models"]
    record = fp32["int8_search"]
    names = [c["candidate"] for c in record["candidates"]]
    assert names[:3] == ["minmax", "percentile", "moving-average"] and len(names) == 4
    assert record["shipped"] == names[-1] and names[-1].endswith("nodes in float")
    for c in record["candidates"]:
        assert set(c) >= {"candidate", "calibration", "nodes_in_float", "parity", "passed", "missed"}
        assert 0 < c["parity"]["mean_cosine"] <= 1.0 + 1e-9
    tail = record["candidates"][-1]
    assert tail["passed"] and tail["nodes_in_float"] and tail["tail_share"] in (0.125, 0.25, 0.5, 0.75)
    assert record["sensitivity"]["blocks"] > 3 and record["sensitivity"]["images"] > 0
    assert int8["comparison"]["latency_verdict"] in ("faster", "slower", "no clear difference")
    assert int8["conversion"]["nodes_in_float"] == tail["nodes_in_float"]
    assert int8["conversion"]["calibration"] == tail["calibration"] and int8["conversion"]["candidate"] == names[-1]
    assert result.notes == [record["outcome"]] and record["outcome"].startswith("int8: ")
    # the shipped file is the one whose parity was recorded, and it keeps those nodes in float
    import onnx

    kept = {n.name for n in onnx.load(str(exporting.out / "encoder.int8.onnx")).graph.node}
    assert set(tail["nodes_in_float"]) <= kept
    assert int8["parity"]["mean_cosine"] == pytest.approx(tail["parity"]["mean_cosine"])
    for entry in manifest["models"]:  # each precision's figures
        speed = entry["speed"]
        assert speed["batch1_ms"]["low"] <= speed["batch1_ms"]["p50"] <= speed["batch1_ms"]["p90"]
        assert speed["throughput"]["batch"] == 32 and speed["throughput"]["images_per_s"] > 0 and entry["bytes"] > 0
        assert set(entry["mobile"]) == {"nnapi", "coreml_neuralnetwork", "coreml_mlprogram"}
        assert all(0 <= m["coverage"] <= 1 and m["verdict"] in ("YES", "MAYBE", "NO") for m in entry["mobile"].values())
        agree = entry["comparison"]["agreement_with_pytorch"] if "comparison" in entry else None
        assert agree is not None and 0 <= agree[entry["precision"]] <= 1
    assert fp32["comparison"]["agreement_with_pytorch"]["fp32"] == 1.0
    _no_leftovers(exporting)


@pytest.mark.slow
def test_int8_written_when_slower_here_unless_faster_here_mode(exporting, monkeypatch):
    from edgessl.deploy import speed as sp

    def slow_int8(sessions, x):  # int8 twice as slow as fp32, with spreads that do not overlap
        fig = {"fp32": 0.25, "int8": 0.5, "fp16": 0.3}
        return {k: {"batch1_ms": {"p50": fig[k], "p90": fig[k], "low": fig[k] * 0.95, "high": fig[k] * 1.05,
                                  "runs": 50},
                    "throughput": {"batch": 32, "images_per_s": 1.0 / fig[k], "low": 1.0, "high": 1.0}}
                for k in sessions}

    monkeypatch.setattr(sp, "measure", slow_int8)
    _pass_only(monkeypatch, lambda c: True)
    result = exporting(fp16=True)  # the default search mode: this machine's speed never withholds the file
    assert (exporting.out / "encoder.int8.onnx").is_file()
    manifest = _manifest(exporting.out)
    assert [m["precision"] for m in manifest["models"]] == ["fp32", "int8", "fp16"]
    int8 = manifest["models"][1]
    assert int8["comparison"]["latency_verdict"] == "slower" and int8["comparison"]["latency_ratio"] == 2.0
    assert manifest["models"][0]["int8_search"]["shipped"] == "minmax"
    assert result.notes == [manifest["models"][0]["int8_search"]["outcome"]]
    # faster-here keeps fp32 and says why, with the numbers
    result = exporting(int8="faster-here", fp16=True)
    assert not (exporting.out / "encoder.int8.onnx").exists()
    manifest = _manifest(exporting.out)
    assert [m["precision"] for m in manifest["models"]] == ["fp32", "fp16"]
    record = manifest["models"][0]["int8_search"]
    assert record["shipped"] is None and [c["candidate"] for c in record["candidates"]] == ["minmax"]
    (line,) = result.notes
    assert line == record["outcome"] and "\n" not in line
    assert "not clearly faster than fp32" in line and "int8 0.5 ms vs fp32 0.25 ms, slower" in line
    assert "kept fp32 and fp16 (--int8-mode faster-here)" in line
    _no_leftovers(exporting)


@pytest.mark.slow
def test_no_candidate_passes_exits_0_with_one_line_and_leaves_nothing(exporting, monkeypatch, demo_run):
    from typer.testing import CliRunner

    from edgessl.cli import app
    from edgessl.deploy import onnx as ox

    monkeypatch.setitem(ox.BOUNDS, "int8", {"min_cosine": 0.75, "mean_cosine": 1.5})  # unreachable
    res = CliRunner().invoke(app, ["export", str(demo_run), "--int8", "--out", str(exporting.out), "--quiet"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("int8 not written")]
    assert len(lines) == 1 and "none of" in lines[0] and "Kept fp32" in lines[0]
    record = _manifest(exporting.out)["models"][0]["int8_search"]
    assert record["shipped"] is None and len(record["candidates"]) > 3  # methods, then the float tails
    assert not any(c["passed"] for c in record["candidates"])
    shares = [c["tail_share"] for c in record["candidates"][3:]]
    assert shares == sorted(shares)
    sizes = [len(c["nodes_in_float"]) for c in record["candidates"][3:]]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert sorted(p.name for p in exporting.out.iterdir()) == ["encoder.onnx", "encoder.reference.npz",
                                                               "manifest.json"]
    _no_leftovers(exporting)
    # strict: today's single shot, exit 3, nothing left
    res = CliRunner().invoke(app, ["export", str(demo_run), "--int8-mode", "strict", "--out", str(exporting.out)])
    assert res.exit_code == 3 and "does not match PyTorch" in res.output
    assert not (exporting.out / "encoder.int8.onnx").exists()
    res = CliRunner().invoke(app, ["export", str(demo_run), "--int8-mode", "fastest", "--out", str(exporting.out)])
    assert res.exit_code == 2 and "--int8-mode must be one of" in res.output


@pytest.mark.slow
def test_a_search_interrupted_by_an_error_leaves_no_candidate(exporting, monkeypatch):
    from edgessl.deploy import convert as ex

    inner, calls = ex._attempt, []

    def breaking(candidate, *args, **kwargs):
        calls.append(candidate)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        a = inner(candidate, *args, **kwargs)
        a.missed = ["injected miss"]
        return a

    monkeypatch.setattr(ex, "_attempt", breaking)
    with pytest.raises(RuntimeError, match="interrupted"):
        exporting()
    assert len(exporting.built) == 1 and not exporting.built[0].exists()
    assert list(exporting.scratch.iterdir()) == [] and not (exporting.out / "encoder.int8.onnx").exists()


@pytest.mark.slow
def test_sensitivity_on_a_real_int8_model(demo_run, tmp_path):
    """Blocks of the exported MobileNetV3 end at tensors both models hold; the error grows towards the output and
    the tails only name nodes that the int8 model quantised."""
    pytest.importorskip("onnxruntime")
    import onnx

    from edgessl.deploy import quantize as qz
    from edgessl.deploy import sensitivity as sn

    edgessl.export(demo_run, out=tmp_path)
    src, q = tmp_path / "source.onnx", tmp_path / "q.onnx"
    pre = qz.prepare_source(tmp_path / "encoder.onnx", src)
    assert all(n.name for n in onnx.load(str(src)).graph.node)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    qz.quantize_int8(tmp_path / "encoder.onnx", q, x, "input", "minmax", source=src, pre_processed=pre)
    found = sn.sensitivity(src, q, x, "input")
    record, tails = found["record"], found["tails"]
    errors = [b["error"] for b in record["block_errors"] if b["error"] is not None]
    assert record["blocks"] > 3 and len(errors) >= 3 and all(math.isfinite(e) and e >= 0 for e in errors)
    assert errors[-1] > errors[0]
    quantised = set(sn.quantised_nodes(onnx.load(str(q))))
    assert tails and all(set(t["nodes"]) <= quantised for t in tails)
    assert [len(t["nodes"]) for t in tails] == sorted(len(t["nodes"]) for t in tails)


def test_calibration_batches_are_all_one_size():
    from edgessl.deploy.quantize import _Batches, equal_batch

    assert [equal_batch(n) for n in (256, 60, 61, 16, 7, 1, 0)] == [16, 15, 1, 16, 7, 1, 1]
    reader = _Batches(np.arange(60 * 3).reshape(60, 3, 1, 1).astype(np.float32), "input")
    batches = list(iter(reader.get_next, None))
    assert [len(b["input"]) for b in batches] == [15] * 4
    assert np.array_equal(np.concatenate([b["input"] for b in batches]).ravel(), np.arange(180))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_takes_a_sample_that_is_no_multiple_of_16(demo_run, tmp_path, method):
    """60 images (batches of 16 would end with 12): onnxruntime's histogram collectors stack the batches."""
    pytest.importorskip("onnxruntime")
    from edgessl.deploy import quantize as qz

    edgessl.export(demo_run, out=tmp_path)
    x = np.random.default_rng(0).standard_normal((60, 3, 32, 32)).astype(np.float32)
    qz.quantize_int8(tmp_path / "encoder.onnx", tmp_path / "q.onnx", x, "input", method)
    assert (tmp_path / "q.onnx").stat().st_size > 0
