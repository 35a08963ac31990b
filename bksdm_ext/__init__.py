"""sd-webui-bk-sdm: BK-SDM (block-removed, knowledge-distilled Stable Diffusion) for the WebUI.

The core (everything outside `bksdm_ext.webui`) never imports the WebUI and runs on its own.
"""

__version__ = "0.1.0"
