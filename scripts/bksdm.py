"""WebUI entry of sd-webui-bk-sdm: registers the loader patch, the BK-SDM tab and API, the timings.

The WebUI puts the extension folder on sys.path only while scripts load; importing our package
here keeps it importable afterwards (the BK yamls name `bksdm_ext.ldm_unet.BKUNetModel`).
"""

from modules import scripts

from bksdm_ext.webui import extension, timings

extension.setup()


class BKSDM(scripts.Script):
    """Always on, no UI: the BK layout in the infotext, the timing of every generation, and the model
    brought back to the GPU for a generation while a training job holds it."""

    def title(self):
        return "BK-SDM"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def before_process(self, p, *args):
        extension.lend_model_for_generation()

    def process(self, p, *args):
        extension.infotext(p)
        timings.begin(p)

    def process_batch(self, p, *args, **kwargs):
        extension.process_batch(p)

    def before_hr(self, p, *args):
        timings.before_hr(p)

    def postprocess_batch(self, p, *args, **kwargs):
        timings.batch_done(p)

    def postprocess(self, p, processed, *args):
        timings.end(p)
