"""One home for every default: PretrainConfig. The CLI's help is generated from it, the method module's defaults and
the flags table in docs/method.md agree with it."""

import inspect
from dataclasses import fields
from pathlib import Path

from typer.testing import CliRunner

from edgessl.cli import app
from edgessl.config import FIELD_HELP, PretrainConfig, default_text

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {f.name: f.default for f in fields(PretrainConfig)}


def test_every_option_has_help_and_no_flag_hard_codes_a_default():
    assert set(FIELD_HELP) == set(DEFAULTS)
    source = inspect.getsource(__import__("edgessl.cli", fromlist=["pretrain"]).pretrain)
    assert "[default:" not in source  # every default shown comes from PretrainConfig through flag_help


def test_pretrain_help_shows_the_config_defaults():
    res = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    text = " ".join(res.output.replace("│", " ").split())
    for name in ("epochs", "batch_size", "lr", "temperature", "negatives", "sd_weight", "bank_lr", "threads", "data"):
        assert f"[default: {default_text(name)}]" in text, name


def _doc_value(cell: str):
    cell = cell.strip().strip("`")
    try:
        return float(cell)
    except ValueError:
        return {"on": True, "off": False}.get(cell, cell)


def test_docs_flags_table_matches_the_config():
    table = (REPO / "docs" / "method.md").read_text().split("## Every switch of `edgessl pretrain`")[1]
    checked = 0
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`--"):
            continue
        flags = [f.strip().strip("`").removeprefix("--").replace("-", "_") for f in cells[0].split(",")]
        values = [v for v in cells[1].split(",")]
        if len(flags) != len(values):
            continue
        for flag, value in zip(flags, values, strict=True):
            if flag not in DEFAULTS or DEFAULTS[flag] is None:
                continue
            assert _doc_value(value) == DEFAULTS[flag], (flag, value, DEFAULTS[flag])
            checked += 1
    assert checked >= 25, checked
