"""What this machine's CPU computes natively: read at run time, never assumed (the pipeline's machines differ)."""
from __future__ import annotations

import functools
import sys


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it oneDNN emulates bf16 convolutions,
    so slowly that one small batch's backward pass takes minutes (seen on an AVX2-only EPYC): ``bf16: true`` in
    params then trains and evaluates in fp32 instead (``tasks.training.autocast`` says so)."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def host_tags() -> dict[str, str]:
    """What of the machine changes a stage's arithmetic or its ``auto`` choices, as MLflow tags: the CPU's vector
    extension as PyTorch dispatches to it, and whether it computes bf16 natively (bf16 autocast,
    ``teacher_runtime: auto``). Empty for a process that does not compute with PyTorch (it is not imported)."""
    if "torch" not in sys.modules:
        return {}
    import torch

    return {"host.cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "host.native_bf16": str(native_bf16()).lower()}
