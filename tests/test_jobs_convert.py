"""The Import / Convert job kind through the runner: a tiny diffusers folder in, WebUI and diffusers forms out."""

import json
from pathlib import Path

import pytest
from jobs_helpers import make_runner, wait_for

from bksdm_ext.errors import BKSDMError
from bksdm_ext import kinds

pytestmark = pytest.mark.slow


@pytest.fixture
def runner(tmp_path):
    runner = make_runner(tmp_path / "data", kinds=kinds.all())
    yield runner
    runner.close()


def test_import_a_diffusers_folder_for_the_webui_and_back(runner, tiny_pipeline_v1, tmp_path):
    models = tmp_path / "models" / "BK-SDM"
    webui = runner.submit("convert", {"source": str(tiny_pipeline_v1), "name": "tiny teacher", "half": False,
                                      "output_dir": str(models)})
    second = runner.submit("convert", {"source": str(tiny_pipeline_v1), "to": "diffusers", "version": "v1"})
    assert (webui.state, second.state) == ("running", "running")  # not GPU jobs: they do not queue
    webui = wait_for(runner, webui.id, ("done", "failed"))
    assert webui.state == "done", webui.message
    single = models / "tiny-teacher.safetensors"
    assert single.is_file() and single.with_suffix(".yaml").is_file()
    assert runner.progress(webui.id)["output"] == str(single)
    assert "Wrote" in runner.log_tail(webui.id)

    second = wait_for(runner, second.id, ("done", "failed"))
    folder = Path(second.folder) / "output" / tiny_pipeline_v1.name
    assert second.state == "done", second.message
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]

    # the same name again: the job fails with the reason, nothing is overwritten
    again = runner.submit("convert", {"source": str(tiny_pipeline_v1), "name": "tiny teacher", "half": True,
                                      "output_dir": str(models)})
    again = wait_for(runner, again.id, ("done", "failed"))
    assert again.state == "failed" and "already exists" in again.message


def test_bad_sources_are_refused_before_a_job_exists(runner, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for values, message in (({}, "Set source"), ({"source": str(tmp_path / "nowhere")}, "does not exist"),
                            ({"source": str(tmp_path / "notes.txt")}, "not a .safetensors"),
                            ({"source": str(tmp_path), "to": "onnx"}, "to must be one of")):
        with pytest.raises(BKSDMError, match=message):
            runner.submit("convert", values)
    assert runner.list() == []
