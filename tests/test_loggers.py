"""--logger tensorboard,mlflow,wandb (edgessl.loggers), read back offline: TensorBoard event files, MLflow's local
SQLite store, W&B's offline run files."""

import importlib.util
import io
import json
import time

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

import edgessl
from edgessl import loggers
from edgessl.cli import app
from edgessl.config import resolve
from edgessl.errors import UserError

TINY = dict(image_size=32, batch_size=8, head_hidden=64, feature_dim=16, quiet=True, workers=1)
OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}


@pytest.fixture(scope="module")
def logged_run(tiny_data, tmp_path_factory):
    """1 epoch, a resume to 2 (the same MLflow run continues), then eval and finetune log to the same runs."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    root = tmp_path_factory.mktemp("logged")
    out = root / "runs" / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.chdir(root)  # nothing may land in the working directory
        edgessl.pretrain(data=str(tiny_data), out=str(out), labels_from_folders=True, epochs=1,
                         logger="tensorboard,mlflow", **TINY)
        first = json.loads((out / loggers.RECORD).read_text())
        edgessl.pretrain(resume=out, epochs=2, quiet=True)
        edgessl.evaluate_encoder(out, tiny_data, test_fraction=0.25, labels_per_class="1,all", seeds=1, quiet=True)
        edgessl.finetune(out, tiny_data, test_fraction=0.25, labels_per_class=2, epochs=1, batch_size=4, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "knn_top1" in rows[0]
    assert sorted(p.name for p in root.iterdir()) == ["runs"]
    return out, rows, first


@pytest.mark.slow
def test_tensorboard_receives_every_metrics_key_plots_and_config(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows, _ = logged_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    for key in rows[0]:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2], key
        assert [e.value for e in events] == pytest.approx([float(r[key]) for r in rows], rel=1e-6), key
    tags = acc.Tags()
    assert {"curves", "eval", "finetune-lpc2/confusion"} <= set(tags["images"])
    assert [e.step for e in acc.Images("curves")] == [1, 2]
    assert {"eval/pretrained/knn_k20/lpc1/top1", "eval/pretrained/linear/all/macro_f1",
            "finetune-lpc2/top1"} <= set(tags["scalars"])
    text = acc.Tensors("config.yaml/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "backbone: mobilenetv3_small" in text and "logger: tensorboard,mlflow" in text


def test_mlflow_receives_every_metrics_key_params_and_artifacts(logged_run, tmp_path):
    from mlflow.tracking import MlflowClient

    out, rows, first = logged_run
    record = json.loads((out / loggers.RECORD).read_text())["mlflow"]
    assert record == first["mlflow"]  # the resume, eval and finetune continued the same run
    assert record["tracking_uri"] == f"sqlite:///{out.parent.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    for key in rows[0]:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows], rel=1e-6), key
    assert "finetune-lpc2/top1" in run.data.metrics and "eval/pretrained/knn_k200/all/top1" in run.data.metrics
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert run.data.params == {k: str(v) for k, v in {**config, "epochs": 1}.items()}  # as the run started
    copy = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert open(copy).read() == (out / "config.yaml").read_text()  # as it is now (epochs: 2)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "eval.png", "finetune-lpc2"} <= files
    assert [a.path for a in client.list_artifacts(run.info.run_id, "finetune-lpc2")] == ["finetune-lpc2/confusion.png"]
    assert (out.parent / "mlartifacts").is_dir()


@pytest.mark.slow
def test_wandb_offline_run_gets_the_rows(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    out = tmp_path / "run"
    console = Console(file=io.StringIO(), width=400)
    edgessl.pretrain(data=str(tiny_data), out=str(out), epochs=1, logger="wandb", eval_every=0, console=console,
                     **{**TINY, "quiet": False})
    run_id = json.loads((out / loggers.RECORD).read_text())["wandb"]["id"]
    assert (f"Logging to W&B: project edgessl, run {run_id}, offline files in {out / 'wandb'} (wandb sync to "
            "upload)") in console.file.getvalue()
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    deadline = time.time() + 30
    while (logged := _wandb_history_keys(run_file)) is None and time.time() < deadline:
        time.sleep(0.2)  # W&B's service process may still be writing its log when finish() returns on a busy machine
    row = json.loads((out / "metrics.jsonl").read_text())
    assert set(row) <= logged and "curves/_type" in logged  # an image's keys are nested


def _wandb_history_keys(path) -> set[str] | None:
    """Every key of the history records in a W&B transaction log, None until its exit record is written (.wandb: a
    7-byte ':W&B' header, then LevelDB-log style chunks in 32 KiB blocks, each 4-byte CRC, 2-byte length, 1-byte type
    (1 full, 2 first, 3 middle, 4 last))."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, keys = 7, b"", set()
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's zero-padded tail
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # still being written
            return None
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(buf)
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            if record.WhichOneof("record_type") == "exit":
                return keys
            buf = b""
    return None


def test_logger_option_is_parsed_and_checked():
    assert resolve({"logger": "MLflow, tensorboard,mlflow"}).logger == "mlflow,tensorboard"
    assert resolve({}).logger == "none" and resolve({"logger": "none"}).logger == "none"
    with pytest.raises(UserError) as e:
        resolve({"logger": "tensorboard,comet"})
    assert str(e.value) == ("--logger must be none or a comma-separated subset of tensorboard, mlflow, wandb, "
                            "not 'tensorboard,comet'.")


def test_a_missing_logger_package_is_one_line_naming_the_extra(tiny_data, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out), "--logger", "mlflow",
                                   "--epochs", "1", "--quiet"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert lines == ["error: --logger mlflow needs the mlflow package: pip install 'edgessl[mlflow]'."]
    assert not out.exists()


def test_help_describes_logger_and_mps():
    res = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    text = " ".join(res.output.replace("│", " ").split())
    assert "--logger" in text and "tensorboard,mlflow,wandb" in text and "[default: none]" in text
    assert "cuda | mps (auto: cuda, else mps on Apple silicon, else cpu)" in text


@pytest.mark.slow
def test_a_failing_logger_is_dropped_with_one_warning_and_training_goes_on(tiny_data, tmp_path, monkeypatch):
    class NoLogin:
        def __init__(self, *args):
            raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore")

    monkeypatch.setitem(loggers.ADAPTERS, "wandb", NoLogin)
    monkeypatch.setattr(loggers, "check_installed", lambda names: None)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out), "--logger", "wandb",
                                   "--epochs", "2", "--image-size", "32", "--batch-size", "8", "--eval-every", "0",
                                   "--head-hidden", "64", "--feature-dim", "16", "--workers", "1"],
                             env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    warning = ("warning: --logger wandb failed and is off for this command: RuntimeError: api_key not configured "
               "(no-tty). call wandb.login(key=[your_api_key])")
    assert [line.strip() for line in res.output.splitlines() if "--logger" in line] == [warning]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 and not (out / loggers.RECORD).exists()


@pytest.mark.slow
def test_mlflow_keeps_its_info_lines_out_of_the_console(tmp_path):
    """MLflow logs "Creating initial MLflow database tables..." at INFO through its own handler: edgessl sets the
    mlflow and alembic loggers to WARNING before it opens the store."""
    import logging

    pytest.importorskip("mlflow")
    (tmp_path / "run").mkdir()
    logging.getLogger("mlflow").setLevel(logging.INFO)
    loggers.MLflow(tmp_path / "run", {"epochs": 1}, {})
    assert logging.getLogger("mlflow").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("alembic").getEffectiveLevel() == logging.WARNING


def test_eval_of_a_run_whose_logger_package_is_missing_says_where_the_setting_lives(tmp_path, monkeypatch):
    from edgessl.loggers import run_loggers

    (tmp_path / "config.yaml").write_text("logger: mlflow\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError) as e:
        run_loggers(tmp_path)
    assert str(e.value) == (f"{tmp_path} logs to its config.yaml's logger (mlflow): --logger mlflow needs the mlflow "
                            f"package: pip install 'edgessl[mlflow]'. Or set `logger: none` in "
                            f"{tmp_path / 'config.yaml'} to run without it.")


def test_each_logger_says_where_it_writes_when_it_opens(tmp_path, monkeypatch):
    """The run had logged to RUN/tensorboard or an MLflow store without naming either."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    lines = []
    logs = loggers.Loggers(["tensorboard", "mlflow"], run, {"epochs": 1}, say=lines.append)
    logs.log({"epoch": 1, "loss": 2.5})
    logs.log({"epoch": 2, "loss": 2.0})  # said once, when they open
    run_id = json.loads((run / loggers.RECORD).read_text())["mlflow"]["run_id"]
    logs.close()
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert lines == [f"Logging to TensorBoard: {run / 'tensorboard'} (tensorboard --logdir {run / 'tensorboard'})",
                     f"Logging to MLflow: run {run_id} in {uri} (mlflow ui --backend-store-uri {uri})"]


def test_an_mlflow_server_that_does_not_answer_is_refused_in_seconds(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI at a server that was down had held training for about 4 minutes of MLflow's retries."""
    import socket

    pytest.importorskip("mlflow")
    from edgessl import network

    for v in network.PROXY_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    tried = []

    def refuse(address, timeout):
        tried.append((address, timeout))
        raise OSError("connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    (tmp_path / "run").mkdir()
    with pytest.raises(ConnectionError, match=r"^the tracking server http://tracking.example:5000 does not answer "
                                              r"\(a 3-second connection probe\); start it or set MLFLOW_TRACKING_URI$"):
        loggers.MLflow(tmp_path / "run", {"epochs": 1}, {})
    assert tried == [(("tracking.example", 5000), network.PROBE_SECONDS)]
    assert network.reachable(("tracking.example", 5000), scheme="https") is False
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")  # an http server behind an http proxy: only it can tell
    assert network.reachable(("tracking.example", 5000), scheme="http") is True
    assert network.reachable(("tracking.example", 443), scheme="https") is False and len(tried) == 3


def test_a_logger_first_named_at_a_resume_gets_the_earlier_epochs_once(tmp_path, monkeypatch):
    """A logger added at --resume had received only the epochs after the resume, though the docs promise every
    metrics.jsonl row."""
    seen = []

    class Fake:
        def __init__(self, run_dir, config, record):
            record["opened"] = True

        def where(self):
            return "fake"

        def log(self, values, step, images):
            seen.append((step, values.get("loss")))

    monkeypatch.setitem(loggers.ADAPTERS, "fake", Fake)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 10.0 - e}) + "\n" for e in (1, 2, 3)))
    loggers.Loggers(["fake"], run).log({"epoch": 3, "loss": 7.0})  # the first row it logs: epoch 3 of a resume
    assert seen == [(1, 9.0), (2, 8.0), (3, 7.0)]
    seen.clear()
    loggers.Loggers(["fake"], run).log({"epoch": 4, "loss": 6.0})  # a later resume: it has the earlier rows
    assert seen == [(4, 6.0)]

    class Down(Fake):
        def __init__(self, run_dir, config, record):
            record["half"] = True  # a logger that fails part-way is not recorded as opened
            raise ConnectionError("the server does not answer")

    monkeypatch.setitem(loggers.ADAPTERS, "down", Down)
    warned = []
    loggers.Loggers(["down", "fake"], run, warn=warned.append).log({"epoch": 5, "loss": 5.0})
    assert "down" not in json.loads((run / loggers.RECORD).read_text()) and len(warned) == 1
    monkeypatch.setitem(loggers.ADAPTERS, "down", Fake)  # back up at the next resume: gets the earlier epochs too
    seen.clear()
    loggers.Loggers(["down"], run).log({"epoch": 6, "loss": 4.0})
    assert [step for step, _ in seen] == [1, 2, 3, 6]  # metrics.jsonl's rows before 6 (the file has 1-3), then 6
