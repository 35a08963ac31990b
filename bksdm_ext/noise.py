"""Third-party import noise kept out of our output (the CLI's, a job's log).

bitsandbytes' CPU backend warns at import, on CPUs with AVX512-BF16, that a 4-bit matmul kernel (a hub
download) is missing: "Failed to load CPU gemm_4bit_forward". Nothing here uses 4-bit matmuls, and
diffusers/transformers/peft import bitsandbytes whenever it is installed, so every command printed it.
"""

from __future__ import annotations

import logging

BITSANDBYTES_CPU = "bitsandbytes.backends.cpu.ops"


def unused_kernel(record: logging.LogRecord) -> bool:
    """A logging filter (logging takes plain callables): False drops the record."""
    return "gemm_4bit_forward" not in record.getMessage()


def quiet_imports() -> None:
    """Drop the known import warnings for the rest of this process."""
    logger = logging.getLogger(BITSANDBYTES_CPU)
    if unused_kernel not in logger.filters:
        logger.addFilter(unused_kernel)
