"""Experiment loggers: TensorBoard, MLflow and W&B, fed the rows of metrics.jsonl (each an optional extra).

`--logger tensorboard,mlflow,wandb` (any subset; default none). Each logger gets every numeric key of every
metrics.jsonl row (step = the epoch), curves.png after the last epoch, config.yaml as hyper-parameters, and later
the eval/finetune results and their eval.png / confusion.png (`edgessl eval` and `edgessl finetune` log to the
loggers named in the run's config.yaml). Only rank 0 logs. The loggers open at the first logged row, after the
first checkpoint, so a run interrupted in its first epoch leaves nothing behind. Where they write:

- tensorboard: RUN/tensorboard/ (`tensorboard --logdir runs`);
- mlflow: $MLFLOW_TRACKING_URI, else a local SQLite store next to the run directory (RUN/../mlflow.db, artifacts
  in RUN/../mlartifacts), experiment $MLFLOW_EXPERIMENT_NAME or edgessl, run name = the run directory's name;
- wandb: project $WANDB_PROJECT or edgessl, files in RUN/wandb/; WANDB_MODE=offline for no network.

RUN/loggers.json keeps the MLflow store and run id and the W&B run id, so `--resume`, `eval` and `finetune`
continue the same experiment runs. Imports of the logger packages happen inside functions only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from edgessl.errors import UserError
from edgessl.fileio import atomic_write_text
from edgessl.network import PROBE_SECONDS, reachable, url_host

LOGGERS = ("tensorboard", "mlflow", "wandb")
# the modules each logger needs (the default MLflow store is SQLite: sqlalchemy + alembic)
MODULES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic"), "wandb": ("wandb",)}
RECORD = "loggers.json"


def parse_loggers(text: str | None) -> list[str]:
    """'tensorboard,mlflow' -> ['tensorboard', 'mlflow']; None, '' or 'none' -> []."""
    names = [n.strip().lower() for n in str(text or "").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if any(n not in LOGGERS for n in names):
        raise UserError(f"--logger must be none or a comma-separated subset of {', '.join(LOGGERS)}, not '{text}'.")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """A one-line error naming the extra when a chosen logger's package is not installed."""
    for name in names:
        missing = [m for m in MODULES[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"--logger {name} needs the {', '.join(missing)} package{'s' * (len(missing) > 1)}: "
                            f"pip install 'edgessl[{name}]'.")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row (every metrics.jsonl key is one)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


def earlier_rows(metrics: Path, step: int) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl of the epochs before `step` (none when the file is missing)."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if isinstance(r.get("epoch"), int) and r["epoch"] < step]


def _png(path: Path):
    """(H, W, 3) uint8 array of an image file."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class TensorBoard:
    """RUN/tensorboard/: scalars, images, and the config as hparams + text (written once, by the first writer)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], record: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = run_dir / "tensorboard"
        self.log_dir = log_dir
        new = not log_dir.exists()
        self.writer = SummaryWriter(log_dir=str(log_dir))
        if new and config:
            hp = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
            for summary in hparams(hp, {"loss": 0.0}):
                self.writer.file_writer.add_summary(summary)
            text = yaml.safe_dump(config, sort_keys=False)
            self.writer.add_text("config.yaml", "    " + text.replace("\n", "\n    "))  # markdown code block

    def log(self, values: dict[str, float], step: int, images: dict[str, Path]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        for name, path in images.items():
            self.writer.add_image(name, _png(path), step, dataformats="HWC")
        self.writer.flush()

    def where(self) -> str:
        return f"TensorBoard: {self.log_dir} (tensorboard --logdir {self.log_dir})"

    def close(self, ok: bool) -> None:
        self.writer.close()


class MLflow:
    """An MLflow run: metrics, params (the config, once), config.yaml and the PNGs as artifacts."""

    def __init__(self, run_dir: Path, config: dict[str, Any], record: dict[str, Any]):
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # its INFO lines ("Creating initial MLflow database tables...") stay out
            logging.getLogger(name).setLevel(logging.WARNING)
        root = run_dir.resolve().parent
        uri = record.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        scheme = uri.split(":", 1)[0]
        if scheme in ("http", "https") and not reachable(url_host(uri), scheme=scheme):  # else minutes of retries
            raise ConnectionError(f"the tracking server {uri} does not answer (a {PROBE_SECONDS:g}-second "
                                  "connection probe); start it or set MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = record.get("run_id")
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "edgessl")
            exp = self.client.get_experiment_by_name(name)
            local = uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI")
            eid = exp.experiment_id if exp else self.client.create_experiment(
                name, artifact_location=(root / "mlartifacts").as_uri() if local else None)
            self.run_id = self.client.create_run(eid, run_name=run_dir.name).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in config.items()])
        else:  # MLflow's params cannot change: a --resume with other options updates only the config.yaml artifact
            self.client.update_run(self.run_id, status="RUNNING")
        if (run_dir / "config.yaml").is_file():
            self.client.log_artifact(self.run_id, str(run_dir / "config.yaml"))
        record.update(tracking_uri=uri, run_id=self.run_id)
        self.uri = uri

    def where(self) -> str:
        view = f" (mlflow ui --backend-store-uri {self.uri})" if self.uri.startswith("sqlite:///") else ""
        return f"MLflow: run {self.run_id} in {self.uri}{view}"

    def log(self, values: dict[str, float], step: int, images: dict[str, Path]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        for name, path in images.items():  # "finetune-lpc10/confusion" -> finetune-lpc10/confusion.png
            self.client.log_artifact(self.run_id, str(path), artifact_path=str(Path(name).parent).strip(".") or None)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandB:
    """A W&B run (files in RUN/wandb/): the rows, images and the config (given when the run is created)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], record: dict[str, Any]):
        import wandb

        self.wandb = wandb
        run_id = record.get("id")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "edgessl"), name=run_dir.name,
                              dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
                              config=None if run_id else config)
        record.update(id=self.run.id, project=self.run.project)
        self.run_dir = run_dir

    def where(self) -> str:
        url = getattr(self.run, "url", None)  # None offline (WANDB_MODE=offline): `wandb sync` uploads the files
        return f"W&B: {url}" if url else (f"W&B: project {self.run.project}, run {self.run.id}, offline files in "
                                          f"{self.run_dir / 'wandb'} (wandb sync to upload)")

    def log(self, values: dict[str, float], step: int, images: dict[str, Path]) -> None:
        data = {**values, **{name: self.wandb.Image(str(path)) for name, path in images.items()}}
        if step >= self.run.step:
            self.run.log(data, step=step)
        else:  # eval/finetune after the last epoch: W&B's steps only go up, so its next step
            self.run.log(data)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


ADAPTERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


class Loggers:
    """The chosen loggers of one run directory (rank 0 only; Loggers() logs nothing). Opened at the first log(),
    closed by close(). config: the resolved config (hyper-parameters of a new experiment run). A logger that fails
    (no W&B login, an unreachable MLflow server) is dropped with one warning: training goes on, metrics.jsonl keeps
    every row."""

    def __init__(self, names: list[str] | tuple = (), run_dir: Path | None = None,
                 config: dict[str, Any] | None = None, warn: Callable[[str], None] = _warn,
                 say: Callable[[str], None] | None = None):
        self.names, self.run_dir, self.config, self.warn = list(names), run_dir, config or {}, warn
        self.say = say  # where each logger writes, said once when it opens (pretraining's console)
        self.adapters: dict[str, Any] | None = None

    def log(self, row: dict[str, Any], images: dict[str, Path] | None = None, step: int | None = None) -> None:
        """Every numeric value of `row` at `step` (default: row['epoch']), and the image files that exist."""
        if not self.names:
            return
        step = int(row.get("epoch", 0)) if step is None else step
        if self.adapters is None:
            self.adapters = self._open(step)
        values = scalars(row)
        shown = {name: Path(p) for name, p in (images or {}).items() if Path(p).is_file()}
        for name, adapter in list(self.adapters.items()):
            self._guard(name, lambda a=adapter: a.log(values, step, shown))

    def _guard(self, name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - any failure of a logger package: drop that logger, keep training
            self.warn(f"--logger {name} failed and is off for this command: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            (self.adapters or {}).pop(name, None)

    def _open(self, step: int) -> dict[str, Any]:
        """Open each logger; one this run directory has not logged to before (first named at a --resume) is sent
        the metrics.jsonl rows of the epochs before `step` first."""
        path = self.run_dir / RECORD
        record = json.loads(path.read_text()) if path.is_file() else {}
        self.adapters = {}
        for name in self.names:
            new = name not in record
            mine = dict(record.get(name, {}))  # recorded only once it opens: a failed one stays "new" for a resume
            adapter = self._guard(name, lambda n=name, m=mine: ADAPTERS[n](self.run_dir, self.config, m))
            if adapter is not None:
                self.adapters[name] = adapter
                record[name] = mine
                atomic_write_text(path, json.dumps(record, indent=2) + "\n")
                if self.say is not None:
                    self.say(f"Logging to {adapter.where()}")
                for earlier in earlier_rows(self.run_dir / "metrics.jsonl", step) if new else []:
                    self._guard(name, lambda a=adapter, r=earlier: a.log(scalars(r), int(r["epoch"]), {}))
        return self.adapters

    def close(self, ok: bool = True) -> None:
        for name, adapter in list((self.adapters or {}).items()):
            self._guard(name, lambda a=adapter: a.close(ok))
        self.adapters = None


def run_loggers(run_dir: str | Path) -> Loggers:
    """The loggers named in a run directory's config.yaml (`edgessl eval` and `finetune` log to them); Loggers()
    when it has none (or no config.yaml). A missing package is the one-line error of check_installed."""
    path = Path(run_dir) / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError:
        config = {}
    names = parse_loggers((config or {}).get("logger"))
    try:
        check_installed(names)
    except UserError as e:  # eval and finetune have no --logger flag: say where the setting lives
        raise UserError(f"{run_dir} logs to its config.yaml's logger ({', '.join(names)}): {e} Or set "
                        f"`logger: none` in {path} to run without it.") from None
    return Loggers(names, Path(run_dir), config)
