"""The job contract (bksdm_ext.job), the kind registry (bksdm_ext.kinds) and the config base (job_config)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bksdm_ext import job, job_config, kinds
from bksdm_ext.errors import BKSDMError
from bksdm_ext.job_config import JobConfig, setting


@dataclass
class EchoConfig(JobConfig):
    kind = "echo"

    models: list = setting((), "Models to read.", label="Models", group="Model", positional=True, nargs="+",
                           kind="model")
    steps: int = setting(2, "Steps.", label="Steps", group="Recipe", min=1, max=10)
    side: int = setting(64, "Side.", label="Side", group="Recipe", min=64, max=2048, multiple_of=8)
    rate: float | None = setting(None, "Rate (empty = auto).", label="Rate", group="Recipe", min=0.0)
    mode: str = setting("a", "Mode.", label="Mode", group="Recipe", choices=("a", "b"))
    fail: str = setting("", "Raise this (tests).", label="Fail with", group="Recipe", advanced=True)


def run_echo(config: EchoConfig, job_dir: Path, resume):
    folder = job.JobFolder(job_dir)
    if config.fail == "user":
        raise BKSDMError("a readable reason")
    if config.fail == "bug":
        raise ZeroDivisionError("division by zero")
    folder.write_progress(job.Progress(state="done", step=config.steps, total_steps=config.steps, message="Echoed."))
    return "done"


ECHO = kinds.Kind("echo", "Echo", f"{__name__}:EchoConfig", f"{__name__}:run_echo", gpu=False, help="echo (tests)")


@pytest.fixture
def echo():
    kinds.register(ECHO)
    yield ECHO
    kinds.unregister("echo")


# --- progress -----------------------------------------------------------------------------------


def test_progress_reads_defaults_from_a_missing_half_written_or_invalid_file(tmp_path):
    folder = job.JobFolder(tmp_path)
    assert folder.read_progress() == job.Progress()
    for text in ('{"state": "runn', "[1, 2]", "", '{"step": "three", "state": "running", "losses": 3}'):
        folder.progress_file.write_text(text)
        progress = folder.read_progress()
        assert progress.step == 0 and progress.losses == {}
    assert progress.state == "running"  # the valid fields of a damaged file are kept
    folder.write_progress(job.Progress(state="done", step=3, total_steps=3, losses={"task": 0.5}).update(message="ok"))
    back = folder.read_progress()
    assert (back.state, back.step, back.losses, back.message) == ("done", 3, {"task": 0.5}, "ok") and back.updated > 0
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    with pytest.raises(KeyError):
        job.Progress().update(bogus=1)


def test_a_complete_checkpoint_is_step_int_with_state_json(tmp_path):
    folder = job.JobFolder(tmp_path)
    for name, complete in (("step-9", True), ("step-10", True), ("step-x", True), (".tmp-step-11", True),
                           ("step-12", False), ("notes", True)):
        (folder.checkpoints / name).mkdir(parents=True)
        if complete:
            (folder.checkpoints / name / "state.json").write_text("{}")
    assert [p.name for p in folder.complete_checkpoints()] == ["step-9", "step-10"]
    assert folder.find_checkpoint("latest").name == "step-10" and folder.has_checkpoint()
    with pytest.raises(BKSDMError, match="No complete checkpoint"):
        folder.find_checkpoint("step-12")
    folder.remove_partial_checkpoints()
    assert not (folder.checkpoints / ".tmp-step-11").exists()
    assert not job.JobFolder(tmp_path / "none").has_checkpoint()


def test_cancel_request_is_written_seen_and_cleared(tmp_path):
    folder = job.JobFolder(tmp_path)
    assert not folder.cancel_requested()
    folder.request_cancel()
    assert folder.cancel_requested()
    folder.clear_cancel()
    folder.clear_cancel()  # twice is fine
    assert not folder.cancel_requested()


def test_outputs_a_continued_job_replaces_its_own_never_a_foreign_file(tmp_path):
    models = tmp_path / "models"
    out = job.Outputs(job.JobFolder(tmp_path / "job").create(), models, "m")
    assert (out.single, out.yaml) == (models / "m.safetensors", models / "m.yaml")
    assert out.diffusers == tmp_path / "job" / "output" / "m"  # the diffusers copy never goes to models/
    out.check_free(out.single, out.diffusers)
    out.claim(out.single, out.yaml, out.diffusers)
    models.mkdir()
    out.single.write_text("first")
    out.diffusers.mkdir()
    again = job.Outputs(tmp_path / "job", models, "m")
    again.claim(again.single, again.yaml, again.diffusers)  # its own: replaced
    assert not out.single.exists() and not out.diffusers.exists()
    foreign = models / "other.safetensors"
    foreign.write_text("not ours")
    other = job.Outputs(tmp_path / "job", models, "other")
    with pytest.raises(BKSDMError, match="already exists"):
        other.claim(other.single, other.diffusers)
    assert foreign.read_text() == "not ours"
    with pytest.raises(BKSDMError, match="already exists"):
        job.Outputs(tmp_path / "job2", models, "m").check_free(models / "other.safetensors")


# --- kinds --------------------------------------------------------------------------------------


def test_an_unknown_kind_is_an_error_naming_the_known_ones():
    with pytest.raises(BKSDMError, match=r"Unknown job kind 'nope'; choose one of distill, dreambooth, convert"):
        kinds.get("nope")
    assert list(kinds.all())[:3] == ["distill", "dreambooth", "convert"]
    assert kinds.get("convert").gpu is False and kinds.get("distill").gpu is True


def test_run_job_of_an_unknown_kind_fails_with_the_reason(tmp_path, capsys):
    assert job.run_job("nope", tmp_path) == 1
    progress = job.JobFolder(tmp_path).read_progress()
    assert progress.state == "failed" and "Unknown job kind 'nope'" in progress.message


def test_a_registered_kind_runs_through_run_job(echo, tmp_path, capsys):
    folder = job.JobFolder(tmp_path / "j").create()
    EchoConfig(models=["a"], steps=3).save(folder.config)
    assert job_config.read_toml(folder.config)["kind"] == "echo"
    assert job.run_job("echo", folder.root) == 0
    assert folder.read_progress().state == "done" and folder.read_progress().step == 3
    for fail, message in (("user", "a readable reason"), ("bug", "ZeroDivisionError: division by zero")):
        EchoConfig(models=["a"], fail=fail).save(folder.config)
        assert job.run_job("echo", folder.root) == 1
        assert folder.read_progress().state == "failed" and folder.read_progress().message == message
    assert "Traceback" in capsys.readouterr().err  # a bug's traceback goes to the log
    EchoConfig(models=["a"], steps=11).save(folder.config)
    assert job.run_job("echo", folder.root) == 1 and "steps must be at most 10" in folder.read_progress().message


def test_the_job_entry_point_runs_a_kind_declared_in_its_own_module(tmp_path):
    """A new kind is its own module plus one registry line; the job process finds it via the environment."""
    import subprocess

    (tmp_path / "echo_kind.py").write_text(
        "from bksdm_ext import kinds\n"
        "kinds.register(kinds.Kind('echo', 'Echo', 'test_job_contract:EchoConfig', 'test_job_contract:run_echo'))\n")
    folder = job.JobFolder(tmp_path / "j").create()
    EchoConfig(models=["a"], steps=4).save(folder.config)
    tests, repo = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": f"{tmp_path}:{tests}:{repo}", kinds.MODULES_ENV: "echo_kind", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, *job.job_command("echo", folder.root, False)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert folder.read_progress().step == 4


# --- the config base ----------------------------------------------------------------------------


def test_settings_describe_each_field_and_validate_checks_them(tmp_path):
    described = {s.name: s for s in EchoConfig.settings()}
    assert list(described) == ["models", "steps", "side", "rate", "mode", "fail"]
    s = described["side"]
    assert (s.type, s.default, s.label, s.group, s.min, s.max, s.multiple_of) == ("int", 64, "Side", "Recipe", 64,
                                                                                  2048, 8)
    assert described["rate"].optional and described["rate"].type == "float"
    assert described["models"].positional and described["models"].nargs == "+" and described["models"].kind == "model"
    assert described["mode"].choices == ("a", "b") and described["fail"].advanced
    EchoConfig(models=["x"]).validate()
    for change, message in ((dict(steps=0), "steps must be at least 1"), (dict(steps=11), "at most 10"),
                            (dict(side=100), "side must be a multiple of 8"), (dict(mode="c"), "one of a, b"),
                            (dict(rate=-1.0), "rate must be at least 0.0"), (dict(steps=True), "must be a int")):
        with pytest.raises(BKSDMError, match=message):
            EchoConfig(**change).validate()


def test_from_dict_coerces_and_refuses_what_is_not_its_type(tmp_path):
    config = EchoConfig.from_dict({"kind": "echo", "models": ("a", "b"), "steps": "3", "side": 128.0, "rate": "0.5"})
    assert (config.models, config.steps, config.side, config.rate) == (["a", "b"], 3, 128, 0.5)
    for values, message in (({"steps": "three"}, "steps must be a int"), ({"steps": 2.5}, "steps must be a int"),
                            ({"models": "a"}, "models must be a list"), ({"bogus": 1}, "Unknown echo settings: bogus"),
                            ({"kind": "distill"}, "is a 'distill' job config")):
        with pytest.raises(BKSDMError, match=message):
            EchoConfig.from_dict(values)


def test_toml_and_json_round_trip_with_the_kind(tmp_path):
    config = EchoConfig(models=['C:\\m "1"', "ünï"], rate=0.25)
    for name in ("c.toml", "c.json"):
        config.save(tmp_path / name)
        assert EchoConfig.load(tmp_path / name) == config
    assert json.loads((tmp_path / "c.json").read_text())["kind"] == "echo"
    assert "rate" not in EchoConfig().to_dict()  # None has no TOML form: the default comes back
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(BKSDMError, match="not valid TOML"):
        EchoConfig.load(tmp_path / "bad.toml")


def test_convert_config_coerces_types_like_the_other_kinds():
    from bksdm_ext.jobs.convert_job import ConvertConfig

    config = ConvertConfig.from_dict({"kind": "convert", "source": Path("/m/x.safetensors"), "half": "false"})
    assert config.source == "/m/x.safetensors" and config.half is False
    with pytest.raises(BKSDMError, match="half must be a bool"):
        ConvertConfig.from_dict({"half": "maybe"})
    assert all(s.labelled and s.group for s in ConvertConfig.settings())


# --- CLI and tab from one description -----------------------------------------------------------


def _parser():
    import argparse

    from bksdm_ext.commands import train as train_commands

    parser = argparse.ArgumentParser(prog="bksdm")
    train_commands.add_commands(parser.add_subparsers(dest="command"))
    return parser


def _cli_settings(parser, kind: str) -> list[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[kind]
    prefix = "setting_"
    return [a.dest[len(prefix):] for a in sub._actions if a.dest.startswith(prefix)]


@pytest.mark.parametrize("name", ["distill", "dreambooth", "lcm", "count"])
def test_the_tab_and_the_cli_agree_on_the_settings_and_which_are_the_kind_own(name):
    import count_job  # noqa: F401  (registers the test kind)

    from bksdm_ext.ui.tab import form_fields

    cls = kinds.get(name).config_class()
    fields = form_fields(cls)
    assert _cli_settings(_parser(), name) == [f.name for f in fields]
    own = [f.name for f in fields if f.own]
    assert own == [s.name for s in cls.settings() if s.own]
    if name == "dreambooth":  # its own recipe defaults are still the shared recipe's settings
        assert "resolution" not in own and "base_model" in own and "max_steps" not in own
    for s in cls.settings():  # every setting has a human label and a group
        assert s.labelled and s.label != s.name.replace("_", " ") and s.group in job_config.GROUPS, s.name


def test_the_captioned_image_settings_are_declared_once_and_are_each_kinds_own():
    import dataclasses

    from bksdm_ext.train.config import CaptionedImages
    from bksdm_ext.ui.tab import form_groups

    names = [f.name for f in dataclasses.fields(CaptionedImages)]
    assert names == ["data", "caption_column", "image_column"]
    described = []
    for name in ("distill", "lcm"):
        settings = kinds.get(name).config_class().settings()
        assert [s.name for s in settings if s.own and s.name in names] == names
        everyday, advanced = next((e, a) for group, e, a in form_groups(settings) if group == "Data")
        # the form's Data group shows the kind's own first: the folder, then resolution; the columns, then cropping
        assert [s.name for s in everyday][:2] == ["data", "resolution"]
        assert [s.name for s in advanced][:3] == ["caption_column", "image_column", "center_crop"]
        described.append([s for s in settings if s.name in names])
    assert described[0] == described[1]


def test_positional_and_multi_value_settings_become_positional_arguments(echo, tmp_path):
    from bksdm_ext import cli

    args = cli.build_parser().parse_args(["echo", "a.safetensors", "b", "--steps", "3", "--job-dir",
                                          str(tmp_path / "j"), "--write-only"])
    assert args.run(args) == 0
    assert EchoConfig.load(tmp_path / "j" / "config.toml") == EchoConfig(models=["a.safetensors", "b"], steps=3)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["echo", "--steps", "3"])  # MODEL [MODEL ...] is required


# --- one home for each fact ---------------------------------------------------------------------


def _code_strings(path: Path):
    """(node, parent) of string constants in a module's code, docstrings left out."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            if isinstance(child, ast.Constant) and isinstance(child.value, str) and id(child) not in docstrings:
                yield child, parent


def test_the_job_folder_names_and_the_list_of_kinds_live_in_one_module_each():
    import ast

    package = Path(job.__file__).resolve().parent
    names = set(kinds.all())
    found: dict[str, set[str]] = {"progress.json": set(), "cancel": set(), "kind list": set(), "kind test": set()}
    for path in sorted(package.rglob("*.py")):
        module = str(path.relative_to(package))
        for node, parent in _code_strings(path):
            if "progress.json" in node.value:
                found["progress.json"].add(module)
            if node.value == "cancel":
                found["cancel"].add(module)
            if isinstance(parent, ast.Compare) and node.value in names:
                found["kind test"].add(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                if len({i.value for i in items if isinstance(i, ast.Constant) and i.value in names}) >= 2:
                    found["kind list"].add(module)
    assert found == {"progress.json": {"job.py"}, "cancel": {"job.py"}, "kind list": set(), "kind test": set()}
    assert "register(Kind(" in Path(kinds.__file__).read_text()  # the built-in kinds, one line each


def test_the_contract_modules_import_nothing_from_the_layers_above():
    import ast

    for module in (job, kinds, job_config):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.lstrip(".").split(".")[0] in ("train", "jobs", "ui", "webui", "torch")]
