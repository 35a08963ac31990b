"""The tab's forms come from the typed job configs, and give back exactly what the config holds."""

import pytest
from jobs_helpers import make_runner

from bksdm_ext.jobs.guard import AccessGuard
from bksdm_ext import kinds
from bksdm_ext.train.config import DistillConfig, DreamBoothConfig
from bksdm_ext.ui.tab import TabContext, _guarded, _loss_frame, build_tab, form_fields, form_values


def as_form(field):
    """What the browser sends back for an untouched field (gradio Numbers are floats, lists are lines)."""
    if field.type in ("list", "tuple"):
        return "\n".join(field.default)
    if field.type in ("int", "float") and field.default is not None:
        return float(field.default)
    return field.default


@pytest.mark.parametrize("cls", [DistillConfig, DreamBoothConfig])
def test_untouched_form_is_the_default_config(cls):
    fields = form_fields(cls)
    assert cls.from_dict(form_values(fields, [as_form(f) for f in fields])).to_dict() == cls().to_dict()


def test_form_shows_the_kind_own_settings_first_with_help_and_choices():
    fields = {f.name: f for f in form_fields(DistillConfig)}
    names = list(fields)
    assert names[:3] == ["teacher", "layout", "data"] and fields["resolution"].own is False
    assert fields["layout"].choices == ("base", "small", "tiny") and fields["layout"].default == "small"
    assert fields["learning_rate"].default == 5e-5 and "AdamW" in fields["learning_rate"].help
    assert fields["sample_prompts"].type == "list"
    # an emptied number keeps the config's default; a typed list is one prompt a line
    values = form_values([fields["max_steps"], fields["sample_prompts"]], [None, "a cat\n\n  a dog \n"])
    assert values == {"sample_prompts": ["a cat", "a dog"]}


def test_tab_builds_for_every_kind_and_errors_are_text(tmp_path):
    runner = make_runner(tmp_path / "data", kinds=kinds.all())
    try:
        context = TabContext(runner, AccessGuard(listen=True))
        tab = build_tab(context)
        ids = {getattr(block, "elem_id", None) for block in tab.blocks.values()}
        assert {"bksdm_distill_teacher", "bksdm_dreambooth_base_model", "bksdm_convert_source", "bksdm_launch_distill", "bksdm_refresh",
                "bksdm_loss_plot", "bksdm_samples", "bksdm_log", "bksdm_cancel", "bksdm_resume",
                "bksdm_tab_timings"} <= ids
        banners = [b.value for b in tab.blocks.values() if isinstance(getattr(b, "value", None), str)]
        assert any("Jobs are disabled on this server: --listen binds 0.0.0.0" in v for v in banners)
        assert context.timings_path() == runner.data_dir / "timings.sqlite3"
    finally:
        runner.close()
    from bksdm_ext.errors import BKSDMError

    def user_error():
        raise BKSDMError("Set teacher: a diffusers folder.")

    def bug():
        raise KeyError("x")

    assert "Set teacher: a diffusers folder." in _guarded(user_error)
    assert "Unexpected error" in _guarded(bug) and "Traceback" not in _guarded(bug)


def test_user_mistakes_in_the_distill_form_are_readable_and_make_no_job(tmp_path):
    runner = make_runner(tmp_path / "data", kinds=kinds.all())
    try:
        from bksdm_ext.errors import BKSDMError

        for values, message in (
            ({"teacher": str(tmp_path / "nowhere")}, "teacher .*nowhere does not exist"),
            ({"teacher": str(tmp_path), "data": str(tmp_path)}, "without unet/config.json"),
            ({"layout": "huge"}, "huge"),
            ({"resolution": 100}, "multiple of 8"),
        ):
            with pytest.raises(BKSDMError, match=message):
                runner.submit("distill", values)
        assert runner.list() == []
    finally:
        runner.close()


def test_form_defaults_of_the_host_replace_the_config_defaults(tmp_path):
    runner = make_runner(tmp_path / "data", kinds=kinds.all())
    try:
        context = TabContext(runner, AccessGuard(), form_defaults={"distill": {"output_dir": "/models/Stable-diffusion"}})
        tab = build_tab(context)
        output = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "bksdm_distill_output_dir")
        assert output.value == "/models/Stable-diffusion"
    finally:
        runner.close()


def test_loss_chart_keeps_long_runs_light():
    rows = [(step, term, 1.0 / step) for step in range(1, 5001) for term in ("task", "out_kd")]
    frame = _loss_frame(rows)
    assert len(frame) <= 2 * 1001 and frame["step"].max() == 5000 and frame["step"].min() == 1
    assert set(frame["term"]) == {"task", "out_kd"}
    assert len(_loss_frame(rows[:20])) == 20 and _loss_frame([]) is None
