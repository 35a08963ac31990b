"""Issue 13's tab for people, on stand-ins (no WebUI): grouped, labelled forms with closed accordions,
presets, model and folder pickers, Check data, the Jobs view's behaviour, Use in txt2img, the Models view."""

import json
from pathlib import Path

import gradio as gr
import pytest
from jobs_helpers import make_runner, queued_request, write_tiny_dataset

from bksdm_ext import kinds
from bksdm_ext.errors import BKSDMError
from bksdm_ext.job import JobFolder
from bksdm_ext.job_config import GROUPS
from bksdm_ext.jobs.guard import AccessGuard
from bksdm_ext.train.config import DistillConfig, DreamBoothConfig
from bksdm_ext.ui import presets
from bksdm_ext.ui.app import known_checkpoints
from bksdm_ext.ui.data_check import check_data
from bksdm_ext.ui.tab import (TabContext, buttons_for, build_tab, form_groups, job_checkpoint, list_folders,
                              model_table, recommended_settings, describe_recommended,
                              sample_gallery, use_in_txt2img, UP)


def raw_names() -> set[str]:
    names = set()
    for kind in kinds.all().values():
        for s in kind.config_class().settings():
            names |= {s.name, s.name.replace("_", " ")}
    return names


@pytest.fixture
def held(tmp_path):
    """A runner whose GPU queue holds its jobs: a convert-like kind on the GPU, no GPU slot."""
    convert = kinds.get("convert")
    held = kinds.Kind("held", "Held", convert.config, convert.run, gpu=True)
    r = make_runner(tmp_path / "data", kinds={**kinds.all(), "held": held}, max_gpu_jobs=0)
    yield r
    r.close()


@pytest.fixture
def runner(tmp_path):
    r = make_runner(tmp_path / "data", kinds=kinds.all())
    yield r
    r.close()


def by_id(tab, elem_id):
    return next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == elem_id)


OWN = queued_request(None)  # the tab's own page, as gradio's queue hands it to a handler


def handler(tab, elem_id, event="click"):
    """The function gradio calls for `event` on the component `elem_id`."""
    target = by_id(tab, elem_id)._id
    for dep, fn in zip(tab.dependencies, tab.fns):
        if target in dep["targets"] and dep["trigger"] == event:
            return fn.fn
    raise KeyError(elem_id)


def test_every_setting_of_every_kind_has_a_human_label_and_a_group():
    for name, kind in kinds.all().items():
        for s in kind.config_class().settings():
            assert s.labelled, f"{name}.{s.name} has no label"
            assert s.label not in (s.name, s.name.replace("_", " ")), f"{name}.{s.name}: label is the raw name"
            assert s.group in GROUPS, f"{name}.{s.name}"


def test_no_visible_label_in_the_tab_is_a_raw_field_name(runner):
    tab = build_tab(TabContext(runner, AccessGuard()))
    labels = {getattr(b, "label", None) for b in tab.blocks.values()} | {
        getattr(b, "value", None) for b in tab.blocks.values() if isinstance(b, (gr.Button, gr.Markdown))}
    assert labels & raw_names() == set()
    # the group headings are there, in order
    headings = [b.value for b in tab.blocks.values() if isinstance(b, gr.HTML) and "bksdm-group" in str(b.value)]
    assert any(">Model<" in h for h in headings) and any(">Speed &amp; memory<" in h for h in headings)


def test_advanced_settings_sit_in_closed_accordions_and_everyday_ones_do_not(runner):
    tab = build_tab(TabContext(runner, AccessGuard()))
    for name, kind in kinds.all().items():
        for s in kind.config_class().settings():
            block = by_id(tab, f"bksdm_{name}_{s.name}")
            parents = []
            while block is not None:
                block = getattr(block, "parent", None)
                parents.append(block)
            accordions = [p for p in parents if isinstance(p, gr.Accordion)]
            assert bool(accordions) == s.advanced, f"{name}.{s.name}"
            assert all(a.open is False for a in accordions)


def test_groups_keep_the_order_of_the_issue():
    groups = [g for g, _, _ in form_groups(DistillConfig.settings())]
    assert groups == ["Model", "Data", "Losses", "Recipe", "Speed & memory", "Output"]
    everyday = {s.name for _, e, _ in form_groups(DistillConfig.settings()) for s in e}
    assert {"teacher", "data", "max_steps"} <= everyday and "adam_beta1" not in everyday


# --- presets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["distill", "dreambooth"])
def test_every_preset_applies_through_the_config_class(kind):
    cls = kinds.get(kind).config_class()
    for preset in presets.builtin(kind):
        values, _ = presets.preset_values(cls, preset, bnb=True)
        assert values and set(values) <= {s.name for s in cls.settings()}
        cls.from_dict(values).to_dict()  # a valid config once data and model are set


def test_presets_values():
    quick = presets.find("distill", "Quick test")
    values, notes = presets.preset_values(DistillConfig, quick)
    assert values["max_steps"] == 64 and values["resolution"] == 256 and not notes
    paper, _ = presets.preset_values(DistillConfig, presets.find("distill", presets.PAPER))
    assert paper["max_steps"] == 50_000 and paper["train_batch_size"] * paper["gradient_accumulation_steps"] == 256
    for title in ("Single 24 GB GPU", "Single 12 GB GPU"):
        preset = presets.find("distill", title)
        assert "estimate" in preset.help and "not yet measured on a GPU" in preset.help
        with_bnb, notes = presets.preset_values(DistillConfig, preset, bnb=True)
        assert with_bnb["optimizer"] == "adamw8bit" and with_bnb["gradient_checkpointing"] and with_bnb["cache"]
        assert with_bnb["train_batch_size"] * with_bnb["gradient_accumulation_steps"] == 256 and not notes
        without, notes = presets.preset_values(DistillConfig, preset, bnb=False)
        assert without["optimizer"] == "adamw" and "AdamW instead of 8-bit Adam" in notes[0]


def test_a_preset_naming_an_unknown_setting_is_an_error():
    bad = presets.Preset("Bad", "", {"distill": {"max_stepz": 3}})
    with pytest.raises(BKSDMError, match="Unknown distill settings: max_stepz"):
        presets.preset_values(DistillConfig, bad)
    with pytest.raises(BKSDMError, match="no dreambooth settings"):
        presets.preset_values(DreamBoothConfig, presets.Preset("Only distill", "", {"distill": {"max_steps": 3}}))


def test_user_presets_are_plain_named_toml_files(tmp_path):
    values = {**DistillConfig().to_dict(), "max_steps": 123, "teacher": "/secret/teacher", "learning_rate": 1e-4}
    path = presets.save_user(tmp_path, DistillConfig, "my run", values)
    assert path == tmp_path / "presets" / "distill" / "my run.toml"
    assert "/secret/teacher" not in path.read_text() and 'kind = "distill"' in path.read_text()
    assert presets.user_presets(tmp_path, "distill") == ["my run"]
    loaded, _ = presets.preset_values(DistillConfig, presets.find("distill", "my run", tmp_path))
    assert loaded["max_steps"] == 123 and loaded["learning_rate"] == 1e-4 and "teacher" not in loaded
    for name in ("../evil", "a/b", ".hidden", "", "C:x", "Quick test", "x" * 65):
        with pytest.raises(BKSDMError):
            presets.save_user(tmp_path, DistillConfig, name, values)
    assert sorted(p.name for p in (tmp_path / "presets" / "distill").iterdir()) == ["my run.toml"]


def test_the_preset_choice_sets_the_form(runner):
    tab = build_tab(TabContext(runner, AccessGuard()))
    out = handler(tab, "bksdm_distill_preset", "input")("Quick test")
    fields = DistillConfig.settings()
    steps = out[1 + [s.name for s in fields].index("max_steps")]
    assert "Quick test" in out[0] and steps == 64
    assert out[1 + [s.name for s in fields].index("teacher")] == gr.update()  # a preset keeps the paths


# --- pickers, data check ------------------------------------------------------------------------

def test_model_pickers_offer_the_known_checkpoints_and_map_titles_to_files(runner, tmp_path):
    models = runner.data_dir / "models"
    (models / "teacher-folder").mkdir(parents=True)
    (models / "teacher-folder" / "model_index.json").write_text("{}")
    (models / "bk.safetensors").write_bytes(b"x")
    (models / "notes.txt").write_text("x")
    assert known_checkpoints(runner) == {"models/bk.safetensors": str(models / "bk.safetensors"),
                                         "models/teacher-folder": str(models / "teacher-folder")}
    context = TabContext(runner, AccessGuard(), checkpoints=lambda refresh=False: known_checkpoints(runner))
    tab = build_tab(context)
    teacher = by_id(tab, "bksdm_distill_teacher")
    assert isinstance(teacher, gr.Dropdown) and "models/teacher-folder" in teacher.choices
    # a picked title is launched as its file; a typed path as typed (here: refused, the data is missing)
    fields = DistillConfig.settings()
    raw = [s.default if s.type != "list" else "\n".join(s.default) for s in fields]
    raw[[s.name for s in fields].index("teacher")] = "models/teacher-folder"
    message, job = handler(tab, "bksdm_launch_distill")(OWN, *raw)
    assert "Data folder" in message and job == ""  # got past the teacher: its title became a real folder
    assert handler(tab, "bksdm_distill_teacher_refresh")(OWN)["choices"] == list(known_checkpoints(runner))


def test_folder_picker_lists_server_folders_behind_the_guard(runner, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    (tmp_path / "a" / "file.txt").write_text("x")
    here, subs = list_folders(str(tmp_path / "a" / "missing" / "deeper"))
    assert here == str((tmp_path / "a").resolve()) and subs == [UP, "b"]
    tab = build_tab(TabContext(runner, AccessGuard()))
    path, listing, note = handler(tab, "bksdm_distill_data_browse")(str(tmp_path / "a"), OWN)
    assert path == str((tmp_path / "a").resolve()) and listing["choices"] == [UP, "b"]
    path, listing, _ = handler(tab, "bksdm_distill_data_folders", "input")(path, "b", OWN)
    assert path == str((tmp_path / "a" / "b").resolve())
    # a server others can reach lists nothing
    exposed = build_tab(TabContext(runner, AccessGuard(listen=True)))
    path, listing, note = handler(exposed, "bksdm_distill_data_browse")(str(tmp_path / "a"), OWN)
    assert path == gr.update() and "Listing server folders is refused" in note["value"]


def test_check_data_reports_images_captions_skips_and_thumbnails(runner, tmp_path):
    data = write_tiny_dataset(tmp_path / "data", count=5)
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
        f.write(json.dumps({"file_name": "0.png", "text": ""}) + "\n")
    report = check_data(DistillConfig.settings(), {"data": str(data)})
    assert report.text.startswith("5 images with captions") and "2 skipped (1 missing file, 1 missing caption)" in report.text
    assert len(report.thumbnails) == 4 and report.thumbnails[0][1] == "a photo of square number 0"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    with pytest.raises(BKSDMError, match="no usable pair"):
        check_data(DistillConfig.settings(), {"data": str(tmp_path / "empty")})
    # the button itself, and the launch, say the same
    tab = build_tab(TabContext(runner, AccessGuard()))
    fields = DistillConfig.settings()
    raw = [s.default if s.type != "list" else "\n".join(s.default) for s in fields]
    raw[[s.name for s in fields].index("data")] = str(data)
    message, thumbs = handler(tab, "bksdm_distill_check")(OWN, *raw)
    assert "5 images with captions" in message and thumbs["visible"] and len(thumbs["value"]) == 4
    raw[[s.name for s in fields].index("data")] = str(tmp_path / "empty")
    message, thumbs = handler(tab, "bksdm_distill_check")(OWN, *raw)
    assert "no usable pair" in message and not thumbs["visible"]


def test_dreambooth_check_reads_subject_photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32)).save(folder / f"{i}.jpg")
    report = check_data(DreamBoothConfig.settings(), {"instance_data": str(folder), "instance_prompt": "a sks dog"})
    assert report.text.startswith("3 subject photos") and len(report.thumbnails) == 3
    (folder / "notes.txt").write_text("x")
    with pytest.raises(BKSDMError, match="not images"):
        check_data(DreamBoothConfig.settings(), {"instance_data": str(folder)})


# --- the Jobs view --------------------------------------------------------------------------------

def test_buttons_follow_the_job_state():
    view = lambda state, resumable=False: {"state": state, "resumable": resumable}  # noqa: E731
    assert buttons_for(None, True) == dict.fromkeys(["stop", "resume", "relaunch", "delete", "open", "use"], False)
    assert buttons_for(view("running"), True) == {"stop": True, "resume": False, "relaunch": True, "delete": False,
                                                   "open": True, "use": False}
    assert buttons_for(view("queued"), True)["stop"] and buttons_for(view("queued"), True)["delete"]
    assert not buttons_for(view("cancelling"), True)["stop"] and not buttons_for(view("cancelling"), True)["delete"]
    assert buttons_for(view("cancelled", True), True)["resume"] and not buttons_for(view("cancelled"), True)["resume"]
    assert buttons_for(view("failed", True), True)["resume"] and not buttons_for(view("done", True), True)["resume"]
    assert buttons_for(view("done"), True)["use"] and not buttons_for(view("done"), False)["use"]


def test_samples_show_step_and_prompt_beside_the_teacher(tmp_path):
    names = ["teacher-0", "teacher-1", "step-000010-0", "step-000010-1", "step-000020-0", "step-000020-1", "junk"]
    paths = [tmp_path / f"{n}.png" for n in names]
    shown = sample_gallery(paths, ["a cat", "a dog"])
    assert [caption for _, caption in shown] == ["teacher: a cat", "step 20: a cat", "teacher: a dog",
                                                  "step 20: a dog", "teacher: a cat", "step 10: a cat",
                                                  "teacher: a dog", "step 10: a dog"]
    assert shown[1][0].endswith("step-000020-0.png")
    assert sample_gallery(paths[:2], ["a cat"]) == [(str(paths[0]), "teacher: a cat"), (str(paths[1]), "teacher: prompt 2")]


def source_file(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read: the job never runs here")
    return str(path)


def finished_job(runner, tmp_path):
    """A job made through the runner and marked done, with the checkpoint its outputs.json names."""
    from bksdm_ext.io import write_json

    job = runner.submit("held", {"source": source_file(tmp_path / "src.safetensors")})
    single = tmp_path / "out" / "bk.safetensors"
    single.parent.mkdir()
    single.write_bytes(b"x")
    write_json(JobFolder(job.folder).owned_outputs, {"outputs": [str(single), str(tmp_path / "out" / "bk.yaml")]})
    return job, single


def test_use_in_txt2img_selects_only_a_done_job_checkpoint(held, tmp_path):
    runner = held
    picked = []
    context = TabContext(runner, AccessGuard(), use_checkpoint=lambda p: picked.append(p) or f"BK-SDM/{p.stem}")
    with pytest.raises(BKSDMError, match="Select a job"):
        use_in_txt2img(context, "")
    job, single = finished_job(runner, tmp_path)
    assert runner.get(job.id).state == "queued"
    with pytest.raises(BKSDMError, match="no finished checkpoint"):
        use_in_txt2img(context, job.id)
    runner.store.update(job.id, state="done", message="Done.")
    assert job_checkpoint(runner, job.id) == single
    assert use_in_txt2img(context, job.id) == "BK-SDM/bk" and picked == [single]
    with pytest.raises(BKSDMError, match="no txt2img here"):
        use_in_txt2img(TabContext(runner, AccessGuard()), job.id)
    # the button: a message and the title the page hands to the WebUI's selectCheckpoint
    tab = build_tab(context)
    message, plan = handler(tab, "bksdm_use")(job.id, OWN)
    assert json.loads(plan)["checkpoint"] == "BK-SDM/bk" and "Selected BK-SDM/bk" in message
    assert json.loads(plan)["sampler"] is None  # no recommendation recorded: txt2img's sampling stays
    assert not by_id(build_tab(TabContext(runner, AccessGuard())), "bksdm_use").visible  # bksdm app: absent


def few_step_job(runner, tmp_path, lora: bool):
    """A finished job whose single file records the lcm kind's recommended sampling in its header."""
    import torch

    from bksdm_ext.io import write_safetensors
    from bksdm_ext.train.lcm_distill import RECOMMENDED

    job, single = finished_job(runner, tmp_path)
    metadata = {"bksdm.recommended": json.dumps(RECOMMENDED), **({"ss_network_module": "networks.lora"} if lora else {})}
    write_safetensors(single, {"w": torch.zeros(2)}, metadata)
    runner.store.update(job.id, state="done", message="Done.")
    return job, single


WEBUI_110 = ["Euler a", "DPM++ 2M", "LCM", "DDIM"]  # the LCM sampler: WebUI 1.8+
WEBUI_16 = ["Euler a", "DPM++ 2M", "DDIM"]


def test_a_few_step_checkpoint_shows_and_applies_its_recommended_sampling(held, tmp_path):
    runner = held
    job, single = few_step_job(runner, tmp_path, lora=False)
    assert recommended_settings(single)["sampler"] == "LCM"
    assert describe_recommended(recommended_settings(single)) == "Few-step model: LCM sampler, 4 steps (2-8), CFG 1-2"
    context = TabContext(runner, AccessGuard(), use_checkpoint=lambda p: f"BK-SDM/{p.stem}", samplers=lambda: WEBUI_110)
    tab = build_tab(context)
    status = build_follow(context)(job.id, {}, OWN)[3]
    assert "Few-step model: LCM sampler, 4 steps (2-8), CFG 1-2." in status and "no LCM sampler" not in status
    assert "&lt;lora:" not in status
    message, plan = handler(tab, "bksdm_use")(job.id, OWN)
    use = json.loads(plan)
    assert use["checkpoint"] == "BK-SDM/bk" and use["lora"] is None
    assert (use["sampler"], use["steps"], use["cfg_scale"]) == ("LCM", 4, 1.5)
    assert "Set txt2img to the LCM sampler, 4 steps and CFG 1.5" in message


def test_on_webui_16_the_tab_says_the_lcm_sampler_is_missing_and_sets_no_sampler(held, tmp_path):
    runner = held
    job, _ = few_step_job(runner, tmp_path, lora=False)
    context = TabContext(runner, AccessGuard(), use_checkpoint=lambda p: f"BK-SDM/{p.stem}", samplers=lambda: WEBUI_16)
    tab = build_tab(context)
    assert "This WebUI has no LCM sampler (it came with WebUI 1.8)" in build_follow(context)(job.id, {}, OWN)[3]
    message, plan = handler(tab, "bksdm_use")(job.id, OWN)
    use = json.loads(plan)
    assert use["checkpoint"] == "BK-SDM/bk" and use["sampler"] is None and use["steps"] is None
    assert "no LCM sampler" in message
    # bksdm app: no txt2img, no sampler list, nothing to say about it
    status = build_follow(TabContext(runner, AccessGuard()))(job.id, {}, OWN)[3]
    assert "Few-step model: LCM sampler" in status and "no LCM sampler" not in status


def build_follow(context):
    tab = build_tab(context)
    return next(fn.fn for fn in tab.fns if getattr(fn.fn, "__name__", "") == "follow")


def test_a_few_step_lora_shows_its_prompt_tag_instead_of_selecting_a_checkpoint(held, tmp_path):
    runner = held
    job, single = few_step_job(runner, tmp_path, lora=True)
    picked = []
    context = TabContext(runner, AccessGuard(), use_checkpoint=lambda p: picked.append(p) or "never",
                         samplers=lambda: WEBUI_110)
    assert "put &lt;lora:bk:1&gt; in the prompt" in build_follow(context)(job.id, {}, OWN)[3]
    message, plan = handler(build_tab(context), "bksdm_use")(job.id, OWN)
    use = json.loads(plan)
    assert use["checkpoint"] is None and use["lora"] == "<lora:bk:1>" and picked == []
    assert (use["sampler"], use["steps"]) == ("LCM", 4) and "put &lt;lora:bk:1&gt; in the prompt" in message


def test_a_model_without_a_readable_recommendation_records_none(tmp_path):
    from bksdm_ext.io import write_safetensors
    import torch

    path = tmp_path / "m.safetensors"
    for metadata in ({}, {"bksdm.recommended": "not json"}, {"bksdm.recommended": json.dumps({"steps": 4})}):
        write_safetensors(path, {"w": torch.zeros(1)}, metadata)
        assert recommended_settings(path) is None
    (tmp_path / "bad.safetensors").write_bytes(b"x")
    assert recommended_settings(tmp_path / "bad.safetensors") is None


def test_the_page_script_defines_what_the_use_button_calls():
    from bksdm_ext.ui.tab import JAVASCRIPT

    script = JAVASCRIPT.read_text()
    assert "window.bksdmUseInTxt2img = function" in script
    for elem_id in ("txt2img_sampling", "txt2img_steps", "txt2img_cfg_scale"):
        assert f'"{elem_id}' in script or f'#{elem_id}' in script


def test_the_jobs_view_follows_the_job_just_launched_and_sets_the_buttons(held, tmp_path):
    runner = held
    first = runner.submit("held", {"source": source_file(tmp_path / "a.safetensors")})
    tab = build_tab(TabContext(runner, AccessGuard()))
    second = runner.submit("held", {"source": source_file(tmp_path / "b.safetensors")})
    follow = next(fn.fn for fn in tab.fns if getattr(fn.fn, "__name__", "") == "follow")
    out = follow(first.id, {}, OWN)
    assert out[2]["value"] == first.id and f"<b>{first.id}</b>" in out[3]
    cancel, resume, relaunch, delete, _, use = out[8:14]
    assert runner.get(first.id).state == "queued"
    assert cancel["interactive"] and relaunch["interactive"] and delete["interactive"]
    assert resume["interactive"] is False and use["interactive"] is False
    runner.cancel(first.id)
    out = follow(first.id, {}, OWN)
    assert out[8]["interactive"] is False and out[12]["interactive"]  # cancelled: no Cancel; Delete yes
    out = follow(second.id, {}, OWN)
    assert out[2]["value"] == second.id
    assert follow("", {}, OWN) == [gr.update()] * len(out)  # a refused launch moves nothing


# --- the Models view ---------------------------------------------------------------------------

def test_models_table_reads_as_text():
    row = {"checkpoint": "BK-SDM/small", "layout_title": "BK-SDM-Small", "version": "v1",
           "unet_parameters": 482_000_000, "sd_unet_parameters": 860_000_000, "parameter_ratio": 0.56,
           "unet_macs": 218e9, "sd_unet_macs": 339e9, "macs_ratio": 0.64, "s_per_image": 1.234,
           "measured": "Euler, 20 steps, 512x512, cuda (10 images)", "speedup": 1.5, "problem": None}
    assert model_table([row]) == [["BK-SDM/small", "BK-SDM-Small", "v1", "482 M", "56%", "218 G", "64%", "1.23",
                                   "Euler, 20 steps, 512x512, cuda (10 images)", "1.50x", ""]]
    assert model_table([{**row, "s_per_image": None, "speedup": None}])[0][7] == "not measured"
    assert "No BK-SDM checkpoint" in model_table([])[0][0]


def test_models_view_lists_bk_checkpoints_of_the_app(runner, tmp_path):
    from bksdm_ext.ui.app import model_rows

    assert model_rows(runner) == []
    context = TabContext(runner, AccessGuard(), models_rows=lambda: [])
    tab = build_tab(context)
    table, message = handler(tab, "bksdm_models_refresh")(OWN)
    assert "No BK-SDM checkpoint" in table[0][0]


def test_an_optional_number_left_empty_keeps_its_automatic_default(runner):
    tab = build_tab(TabContext(runner, AccessGuard()))
    box = by_id(tab, "bksdm_dreambooth_learning_rate")
    assert isinstance(box, gr.Textbox) and box.value == ""
    from bksdm_ext.ui.tab import form_values

    lr = DreamBoothConfig.setting("learning_rate")
    assert form_values([lr], [""]) == {} and DreamBoothConfig.from_dict(form_values([lr], [" 2e-6 "])).lr == 2e-6
    with pytest.raises(BKSDMError, match="learning_rate must be a float"):
        DreamBoothConfig.from_dict(form_values([lr], ["fast"]))


def test_a_job_that_makes_a_lora_defaults_to_the_lora_folder_and_the_mode_moves_it(runner, tmp_path):
    """In the WebUI a LoRA in the checkpoint folder is refused at preflight: the lcm kind (LoRA mode by
    default) and DreamBooth in LoRA mode offer the Lora folder, checkpoints the checkpoint folder."""
    checkpoints, loras = str(tmp_path / "Stable-diffusion" / "BK-SDM"), str(tmp_path / "Lora")
    outputs = {"output_dir": checkpoints}
    tab = build_tab(TabContext(runner, AccessGuard(), lora_output_dir=loras,
                               form_defaults={name: outputs for name in ("distill", "dreambooth", "lcm", "prune")}))
    assert by_id(tab, "bksdm_lcm_mode").value == "lora" and by_id(tab, "bksdm_lcm_output_dir").value == loras
    assert by_id(tab, "bksdm_dreambooth_output_dir").value == checkpoints  # full mode by default
    assert by_id(tab, "bksdm_distill_output_dir").value == checkpoints  # no LoRA mode: untouched
    for kind, other in (("dreambooth", "lora"), ("lcm", "full")):
        follow = handler(tab, f"bksdm_{kind}_mode", "change")
        moved = follow(other, by_id(tab, f"bksdm_{kind}_output_dir").value)
        assert moved == (loras if other == "lora" else checkpoints)
        assert follow("lora" if other == "full" else "full", moved) == by_id(tab, f"bksdm_{kind}_output_dir").value
        assert follow(other, "/my/own/folder") == gr.update()  # a folder the user chose stays
    # without a LoRA folder (`bksdm app`) nothing follows the mode
    plain = build_tab(TabContext(runner, AccessGuard()))
    assert by_id(plain, "bksdm_lcm_output_dir").value == ""
    with pytest.raises(KeyError):
        handler(plain, "bksdm_lcm_mode", "change")


def test_in_the_webui_each_form_keeps_its_own_defaults(runner, tmp_path):
    """The WebUI's ui-config keys a field by the tab and its label alone: without care the lcm form showed
    DreamBooth's Mode (full) and LoRA rank, distill's batch size and learning rate, DreamBooth's folder."""
    from webui_standins import ui_loadsave

    loras = str(tmp_path / "Lora")
    outputs = {"output_dir": str(tmp_path / "Stable-diffusion" / "BK-SDM")}
    tab = build_tab(TabContext(runner, AccessGuard(), lora_output_dir=loras,
                               form_defaults={name: outputs for name in ("distill", "dreambooth", "lcm", "prune")}))
    settings = ui_loadsave(tab, "bksdm", {})  # a first start
    values = {name: by_id(tab, f"bksdm_lcm_{name}").value for name in ("mode", "lora_rank", "train_batch_size",
                                                                      "sample_steps", "output_dir", "learning_rate")}
    assert values == {"mode": "lora", "lora_rank": 64, "train_batch_size": 8, "sample_steps": 4, "output_dir": loras,
                      "learning_rate": ""}
    assert settings == {}  # nothing of ours is kept in ui-config.json, so no form takes another's values
