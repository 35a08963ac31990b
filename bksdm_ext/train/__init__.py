"""Training jobs: BK-SDM distillation and DreamBooth, on one shared training core (`core.py`)."""
