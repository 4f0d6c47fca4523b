"""Every option is written once: PretrainConfig (pretraining) and the options dataclasses of edgessl.options (every
other command). The CLI's flags and --help, the API's keyword arguments and config.yaml's keys come from them; the
method module's defaults and the flags table in docs/method.md agree with them."""

import dataclasses
import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

import edgessl
import edgessl.api
from edgessl.cli import app
from edgessl.commands.common import cli_parameters
from edgessl.config import PretrainConfig, PretrainControl, save_config
from edgessl.errors import UserError
from edgessl.options import (
    CacheClearOptions,
    CacheOptions,
    CheckOptions,
    EmbedOptions,
    EvalOptions,
    ExportOptions,
    FinetuneOptions,
    PruneOptions,
    SlimOptions,
    default_text,
    help_text,
    names,
    option,
    specs,
    takes_options,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {f.name: f.default for f in fields(PretrainConfig)}


COMMANDS = {  # command -> (its options classes, the API function, the parameters that are not options)
    "pretrain": ((PretrainControl, PretrainConfig), edgessl.api.pretrain, {"console", "on_step"}),
    "eval": ((EvalOptions,), edgessl.api.evaluate_encoder, {"run_dir", "console"}),
    "finetune": ((FinetuneOptions,), edgessl.api.finetune, {"run_dir", "console"}),
    "export": ((ExportOptions,), edgessl.api.export, {"run", "console"}),
    "embed": ((EmbedOptions,), edgessl.api.embed, {"source", "use_faiss", "warn", "say"}),
    "prune": ((PruneOptions,), edgessl.api.prune_encoder, {"run_dir", "console"}),
    "slim": ((SlimOptions,), edgessl.api.slim, {"run_dir"}),
}


def _cli_params(*command: str) -> dict:
    group = typer.main.get_group(app)
    for name in command:
        group = group.commands[name]
    return {p.name: p for p in group.params}


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["check", "cache list", "cache clear"])
def test_every_flag_comes_from_the_one_definition(command):
    """Each CLI flag of a command is an option of its options dataclass (name, default None = "not given", help with
    the dataclass default), plus only its positional arguments."""
    classes = COMMANDS[command][0] if command in COMMANDS else {
        "check": (CheckOptions,), "cache list": (CacheOptions,), "cache clear": (CacheClearOptions,)}[command]
    params = _cli_params(*command.split())
    flags = {n: p for n, p in params.items() if isinstance(p, typer.core.TyperOption)}
    expected = {f.name: (f, spec) for cls in classes for f, spec in specs(cls) if spec.cli}
    assert set(flags) == set(expected)
    for name, (f, spec) in expected.items():
        assert flags[name].help == help_text(f, spec), name
        assert flags[name].default in (None, ...) or flags[name].required, name  # the dataclass holds the default
    arguments = {n for n, p in params.items() if isinstance(p, typer.core.TyperArgument)}
    assert arguments <= {"run_dir", "run", "source", "model", "folder"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_api_argument_comes_from_the_one_definition(command):
    classes, function, extra = COMMANDS[command]
    params = inspect.signature(function).parameters
    if command == "pretrain":  # options travel as **options into PretrainConfig (resolve refuses unknown names)
        assert set(params) == {*names(PretrainControl), "console", "on_step", "options"}
        return
    option_names = {n for cls in classes for n in names(cls)}
    assert set(params) == option_names | extra
    for cls in classes:
        for f, _ in specs(cls):
            default = params[f.name].default
            assert default == (inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default), f.name


def test_config_yaml_keys_are_the_options(tmp_path):
    path = save_config(PretrainConfig(), tmp_path / "config.yaml")
    keys = [k for k in yaml.safe_load(path.read_text())]
    assert keys == names(PretrainConfig)


def test_an_unknown_api_option_is_one_line(tmp_path):
    with pytest.raises(UserError, match="Unknown options: epochz"):
        edgessl.finetune(tmp_path, train=str(tmp_path), epochz=3)
    with pytest.raises(UserError, match="--train is required"):
        edgessl.evaluate_encoder(tmp_path)


def test_api_options_of_the_wrong_type_and_near_misses_are_one_line(tmp_path):
    """opset="18a", seeds="3x" had ended in Python's ValueError; `neighbors=` gave no hint of `neighbours`."""
    with pytest.raises(UserError) as e:
        edgessl.export(tmp_path, opset="18a")
    assert str(e.value) == "--opset must be a whole number, not '18a'."
    with pytest.raises(UserError) as e:
        edgessl.evaluate_encoder(tmp_path, train=str(tmp_path), seeds=1.5)
    assert str(e.value) == "--seeds must be a whole number, not 1.5."
    with pytest.raises(UserError) as e:
        edgessl.finetune(tmp_path, train=str(tmp_path), epochs=3, lr="fast")
    assert str(e.value) == "--lr must be a number, not 'fast'."
    with pytest.raises(UserError) as e:
        edgessl.embed(tmp_path, str(tmp_path), str(tmp_path / "e.npz"), neighbors=5, zzz=1)
    assert str(e.value) == "Unknown options: neighbors (did you mean neighbours?), zzz."


def test_a_path_of_another_type_is_one_line_and_leading_arguments_go_by_keyword(tmp_path):
    with pytest.raises(UserError, match=r"^data must be a path \(str or pathlib\.Path\), not int 123\.$"):
        edgessl.pretrain(data=123, out=str(tmp_path / "run"))
    (tmp_path / "c.yaml").write_text("data: 7\n")
    with pytest.raises(UserError, match=r"^Config '.*c\.yaml': data must be a path \(str or pathlib\.Path\), "
                                        r"not int 7\.$"):
        edgessl.pretrain(config=tmp_path / "c.yaml", out=str(tmp_path / "run"))
    with pytest.raises(UserError, match=r"^resume must be a path \(str or pathlib\.Path\), not int 3\.$"):
        edgessl.pretrain(resume=3)
    with pytest.raises(UserError, match=r"^train must be a path \(str or pathlib\.Path\), not list \['a'\]\.$"):
        edgessl.evaluate_encoder(tmp_path, train=["a"])
    with pytest.raises(UserError, match=r"^run must be a path \(str or pathlib\.Path\), not int 7\.$"):
        edgessl.export(7)
    with pytest.raises(UserError, match=r"^run is required: a path \(str or pathlib\.Path\), not None\.$"):
        edgessl.export(None, quiet=True)
    with pytest.raises(UserError, match=r"^run_dir is required: a path \(str or pathlib\.Path\), not None\.$"):
        edgessl.slim(None, 0.5)
    # the signature says run / run_dir may be given by keyword: they reach the command (here: no encoder there)
    with pytest.raises(UserError, match=f"^No encoder in '{tmp_path}'"):
        edgessl.export(run=tmp_path)
    with pytest.raises(UserError, match="--train is required"):
        edgessl.evaluate_encoder(run_dir=tmp_path)
    with pytest.raises(TypeError, match=r"export\(\) missing required argument: 'run'"):
        edgessl.export()
    assert not (tmp_path / "run").exists()


def test_adding_an_option_is_one_edit():
    """A field made with option() becomes a flag with its help and default, an API keyword and a config key."""

    @dataclasses.dataclass(kw_only=True)
    class Demo:
        ratio: float = option(0.25, "A new knob.")
        loud: bool = option(False, "A new switch.")

    params = {p.name: p for p in cli_parameters(Demo)}
    assert params["ratio"].default.help == "A new knob. [default: 0.25]"
    assert params["loud"].default.help == "A new switch."
    assert params["loud"].default.param_decls == ("--loud",)

    @takes_options(Demo, lead=("run",), positional=("ratio",))
    def tool(run, opts):
        return run, opts

    assert tool("r", 0.5) == ("r", Demo(ratio=0.5))
    assert str(inspect.signature(tool)) == "(run, ratio=0.25, *, loud=False)"


def test_pretrain_help_shows_the_config_defaults():
    res = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    text = " ".join(res.output.replace("│", " ").split())
    fields_by_name = dict(specs(PretrainConfig))
    by_name = {f.name: f for f in fields_by_name}
    for name in ("epochs", "batch_size", "lr", "temperature", "negatives", "sd_weight", "bank_lr", "threads", "data"):
        f = by_name[name]
        assert f"[default: {default_text(f, fields_by_name[f])}]" in text, name


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


def test_usage_errors_are_one_line_on_stderr_with_exit_code_2():
    """typer had drawn a box under two lines of usage for a mistyped flag or a missing argument; every other edgessl
    error is one line. No arguments at all still print the help (exit code 2, as before)."""
    runner = CliRunner()
    cases = {("pretrain", "--bogus"): "error: No such option: --bogus (Possible options: --blur, --out). See "
                                      "'edgessl pretrain --help'.\n",
             ("export",): "error: Missing argument 'run'. See 'edgessl export --help'.\n",
             ("bogus",): "error: No such command 'bogus'. See 'edgessl --help'.\n"}
    for argv, expected in cases.items():
        res = runner.invoke(app, list(argv))
        assert (res.exit_code, res.output) == (2, expected), argv
    res = runner.invoke(app, [])
    assert res.exit_code == 2 and "Usage: edgessl [OPTIONS] COMMAND [ARGS]..." in res.output
    assert runner.invoke(app, ["--version"]).output == f"edgessl {edgessl.__version__}\n"


def test_an_empty_path_is_refused_not_read_as_this_folder(tmp_path, monkeypatch):
    """`--config ''` had been ignored (a full pretraining on the demo into ./runs) and `--recipe ''` read as the
    folder '.'."""
    monkeypatch.chdir(tmp_path)
    for name in ("config", "recipe", "data", "out"):
        with pytest.raises(UserError) as e:
            edgessl.pretrain(**{name: " " if name == "out" else ""}, epochs=1)
        assert str(e.value) == f"--{name} is empty: pass a path."
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written
