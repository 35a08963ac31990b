import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tiny_pipeline_v1(tmp_path_factory):
    """A tiny SD-v1 teacher pipeline folder, written once per test session."""
    from tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("sd-v1-tiny"), "teacher", "v1")
