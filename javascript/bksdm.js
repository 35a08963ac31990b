// BK-SDM tab: refresh the job views every 2 s while they are on screen, and refresh the WebUI's
// checkpoint dropdown when a job finishes (its checkpoint appears without a restart).
// Loaded by the WebUI from javascript/, and by `bksdm app` through a load event; written to run once.
// "Use in txt2img" (the tab's Jobs view): `plan` is the JSON of ui/tab.py's txt2img_use. It selects the
// checkpoint through the WebUI's selectCheckpoint (javascript/ui.js) and sets txt2img's sampler, steps and
// CFG through their elem_ids (txt2img_sampling, txt2img_steps, txt2img_cfg_scale: WebUI 1.6-1.10), as a
// user's own input, so the WebUI's handlers see the change.
window.bksdmUseInTxt2img = function (plan) {
    var use;
    try { use = JSON.parse(plan); } catch (e) { return; }
    var app = typeof gradioApp === "function" ? gradioApp() : document;

    function fire(el, type) {
        if (type === "input" && typeof updateInput === "function") { updateInput(el); return; }
        el.dispatchEvent(new Event(type, {bubbles: true}));
    }

    function setNumber(id, value) {  // a gradio Slider: its number box and its range
        var box = app.querySelector("#" + id);
        if (!box || value === null || value === undefined) return;
        box.querySelectorAll("input[type=number], input[type=range]").forEach(function (input) {
            input.value = value;
            fire(input, "input");
        });
    }

    function setSampler(name) {
        var box = app.querySelector("#txt2img_sampling");
        if (!box || !name) return;
        // the "sampler as radio buttons" setting: click the option
        var radio = box.querySelector("input[type=radio][value='" + name.replace(/'/g, "\\'") + "']");
        if (radio) { radio.click(); return; }
        // gradio 3.41's Dropdown: type the name, then Enter picks the first (exact, here) match
        var input = box.querySelector("input");
        if (!input) return;
        input.focus();
        input.value = name;
        fire(input, "input");
        setTimeout(function () {
            input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true}));
        }, 50);
    }

    if (use.checkpoint && typeof selectCheckpoint === "function") selectCheckpoint(use.checkpoint);
    if (use.sampler) setSampler(use.sampler);
    setNumber("txt2img_steps", use.steps);
    setNumber("txt2img_cfg_scale", use.cfg_scale);
};

(function () {
    if (window.bksdmStarted) return;
    window.bksdmStarted = true;

    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        var app = document.querySelector("gradio-app");
        return app ? (app.shadowRoot || app) : document;
    }

    function visible(el) {
        return el && el.offsetParent !== null;
    }

    var lastDone = null;
    var busy = false;
    var ticks = 0;

    function tick() {
        if (document.hidden) return;
        var r = root();
        var refresh = r.querySelector("#bksdm_refresh");
        var jobs = r.querySelector("#bksdm_tab_jobs");
        // A click while the previous refresh still runs would queue requests behind a slow server.
        var pending = r.querySelector("#bksdm_status .pending, #bksdm_jobs_table .pending");
        ticks += 1;
        // Off screen, refresh only every 20 s: enough to notice a finished job for the checkpoint list.
        var due = visible(jobs) || (ticks % 10 === 0 && r.querySelector("#refresh_sd_model_checkpoint"));
        if (refresh && due && !pending && !busy) {
            busy = true;
            refresh.click();
            setTimeout(function () { busy = false; }, 1500);
        }
        // Show the newest log lines, unless the user is reading or selecting in the log.
        var log = r.querySelector("#bksdm_log textarea");
        if (log && document.activeElement !== log && log.getRootNode().activeElement !== log) {
            log.scrollTop = log.scrollHeight;
        }
        var marker = r.querySelector("#bksdm_done_marker textarea, #bksdm_done_marker input");
        if (marker) {
            var done = marker.value;
            if (lastDone !== null && done !== lastDone) {
                var webuiRefresh = r.querySelector("#refresh_sd_model_checkpoint");
                if (webuiRefresh) webuiRefresh.click();
            }
            lastDone = done;
        }
    }

    setInterval(tick, 2000);
})();
