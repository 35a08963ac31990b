"""WebUI entry of sd-webui-bk-sdm: registers the loader patch, the BK-SDM tab and API, the infotext.

The WebUI puts the extension folder on sys.path only while scripts load; importing our package
here keeps it importable afterwards (the BK yamls name `bksdm_ext.ldm_unet.BKUNetModel`).
"""

from modules import scripts

from bksdm_ext.webui import extension

extension.setup()


class BKSDMInfotext(scripts.Script):
    def title(self):
        return "BK-SDM"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        extension.infotext(p)
