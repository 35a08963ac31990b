"""The pruned U-Net in the `ldm` form the WebUI builds from a yaml `unet_config.target`."""

from __future__ import annotations

from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel


class BKUNetModel(UNetModel):
    """`ldm`'s UNetModel that can also be built without its middle block (BK-SDM Small, Tiny).

    Base and Tiny differ from SD only in `num_res_blocks` and `channel_mult`, which UNetModel takes
    as they are. An empty TimestepEmbedSequential passes its input through, so `forward` (and every
    WebUI patch of UNetModel.forward) works unchanged.
    """

    def __init__(self, *args, middle_block: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if not middle_block:
            self.middle_block = TimestepEmbedSequential()
