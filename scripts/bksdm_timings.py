"""Records the timing of every generation (BK-SDM timings); the logic is in bksdm_ext.webui.timings."""

from modules import scripts

from bksdm_ext.webui import timings

timings.install()


class BKSDMTimings(scripts.Script):
    def title(self):
        return "BK-SDM timings"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        timings.begin(p)

    def before_hr(self, p, *args):
        timings.before_hr(p)

    def postprocess_batch(self, p, *args, **kwargs):
        timings.batch_done(p)

    def postprocess(self, p, processed, *args):
        timings.end(p)
