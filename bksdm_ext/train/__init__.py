"""Training jobs: BK-SDM distillation and DreamBooth on one shared loop (loop.py, checkpoints.py, speed.py)."""
