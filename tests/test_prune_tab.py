"""The tab's one-click prune of the checkpoint selected in the WebUI, on stand-ins of the WebUI's checkpoint
list: the job runs for real (the `prune` kind) on a tiny SD single file."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from jobs_helpers import make_runner, queued_request, wait_for

from bksdm_ext import io, kinds
from bksdm_ext.convert import convert
from bksdm_ext.job import JobFolder
from bksdm_ext.job_config import read_toml
from bksdm_ext.jobs.guard import AccessGuard
from bksdm_ext.jobs.origin import OriginPolicy
from bksdm_ext.ui.tab import TabContext, build_tab

EVIL = "http://evil.example"


def _handlers(tab) -> dict:
    handlers = {}
    for block_fn, dep in zip(tab.fns, tab.dependencies):
        for target in dep["targets"]:
            handlers.setdefault(getattr(tab.blocks[target], "elem_id", None), block_fn.fn)
    return handlers


def _form_values(tab, kind: str) -> list:
    """The Prune form's components' values in the order the launch handler takes them."""
    dep = next(d for d in tab.dependencies if any(getattr(tab.blocks[t], "elem_id", None) == f"bksdm_{kind}_current"
                                                  for t in d["targets"]))
    return [tab.blocks[i].value for i in dep["inputs"]]


@pytest.fixture
def webui(tmp_path, tiny_pipeline_v1):
    """A WebUI stand-in: its models folder with one SD single file, selected in its dropdown."""
    models = tmp_path / "models" / "Stable-diffusion"
    selected = models / "tiny-sd.safetensors"
    convert(tiny_pipeline_v1, selected)
    state = SimpleNamespace(selected=selected, listings=0)

    def checkpoints(refresh: bool = False) -> dict[str, str]:  # the WebUI lists models/Stable-diffusion/**
        state.listings += refresh
        return {str(p.relative_to(models)): str(p) for p in sorted(models.rglob("*.safetensors"))}

    cmd_opts = SimpleNamespace(listen=False, share=False, server_name=None, cors_allow_origins=None,
                               cors_allow_origins_regex=None)
    guard = AccessGuard.from_cmd_opts(cmd_opts, environ={})
    runner = make_runner(tmp_path / "data", kinds={"prune": kinds.get("prune")})
    context = TabContext(runner, guard, origin=OriginPolicy.from_cmd_opts(cmd_opts, guard.bound_host),
                         checkpoints=checkpoints, current_checkpoint=lambda: state.selected and str(state.selected),
                         form_defaults={"prune": {"output_dir": str(models / "BK-SDM")}})
    tab = build_tab(context)
    try:
        yield SimpleNamespace(runner=runner, tab=tab, handlers=_handlers(tab), models=models, state=state,
                              checkpoints=checkpoints)
    finally:
        runner.close()


def test_one_click_prunes_the_selected_checkpoint_into_the_models_folder(webui):
    prune_current = webui.handlers["bksdm_prune_current"]
    form = _form_values(webui.tab, "prune")
    for request in (queued_request(EVIL), queued_request(None, host="attacker.example:7860"), None):
        message, made, _ = prune_current(request, *form)
        assert "Launching a job is refused" in message and made == ""
    assert webui.runner.list() == []

    message, made, shown = prune_current(queued_request("http://127.0.0.1:7860"), *form)
    assert "follow it in the Jobs tab" in message and made, message
    assert shown == "tiny-sd.safetensors"  # the form names the checkpoint it launched on, as the list titles it
    job = webui.runner.get(made)
    assert job.kind == "prune"
    assert read_toml(JobFolder(job.folder).config)["source"] == str(webui.state.selected)
    job = wait_for(webui.runner, made, ("done", "failed"), timeout=300)
    assert job.state == "done", webui.runner.log_tail(made)

    written = sorted(p.relative_to(webui.models) for p in (webui.models / "BK-SDM").iterdir())
    assert written == [Path("BK-SDM/tiny-sd-sd-nomid.safetensors"), Path("BK-SDM/tiny-sd-sd-nomid.yaml")]
    assert io.read_metadata(webui.models / written[0])["bksdm.layout"] == "sd-nomid"
    assert "BK-SDM/tiny-sd-sd-nomid.safetensors" in webui.checkpoints(refresh=True)
    assert webui.state.selected.name == "tiny-sd.safetensors"  # the selection is the user's still
    # the page refreshes the WebUI's checkpoint list when the done marker changes (javascript/bksdm.js)
    views = webui.handlers["bksdm_refresh"](None, {}, queued_request(None))
    assert made in str(views[7])


def test_nothing_selected_is_a_clear_message_and_no_job(webui):
    webui.state.selected = None
    message, made, _ = webui.handlers["bksdm_prune_current"](queued_request("http://127.0.0.1:7860"),
                                                             *_form_values(webui.tab, "prune"))
    assert "No checkpoint is selected in the WebUI" in message and made == ""
    assert webui.runner.list() == []


def test_bksdm_app_has_no_selected_checkpoint_button(tmp_path):
    runner = make_runner(tmp_path / "data", kinds={"prune": kinds.get("prune")})
    try:
        tab = build_tab(TabContext(runner, AccessGuard.from_cmd_opts(SimpleNamespace(
            listen=False, share=False, server_name=None, cors_allow_origins=None, cors_allow_origins_regex=None),
            environ={})))
        assert "bksdm_prune_current" not in _handlers(tab) and "bksdm_launch_prune" in _handlers(tab)
    finally:
        runner.close()
