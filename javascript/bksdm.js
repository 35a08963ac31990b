// BK-SDM tab: refresh the job views every 2 s while they are on screen, and refresh the WebUI's
// checkpoint dropdown when a job finishes (its checkpoint appears without a restart).
// Loaded by the WebUI from javascript/, and by `bksdm app` through a load event; written to run once.
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
