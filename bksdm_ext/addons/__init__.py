"""SD-1.x/2.x add-ons (LoRAs, ControlNet residuals) placed on BK-SDM layouts through the block map.

A BK student is its teacher with blocks removed, and every kept block is copied from a known teacher
block (`layouts.teacher_key`). The part of an add-on that acts on a kept teacher block goes to the
student block copied from it; the part for a removed block is dropped. No WebUI import here.
"""
