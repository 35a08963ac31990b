"""The BK-SDM tab (gradio 3.41): the same Blocks in the WebUI and in `bksdm app`."""
