"""What this machine's CPU computes natively: read at run time, never assumed (the pipeline's machines differ)."""
from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@functools.cache
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), or with ``device_type`` "cuda", whether the GPU
    does. Without it oneDNN emulates bf16 convolutions, so slowly that one small batch's backward pass takes minutes
    (seen on an AVX2-only EPYC): ``bf16: true`` in params then trains and evaluates in fp32 instead
    (``tasks.training.autocast`` says so)."""
    import torch

    if device_type == "cuda":   # computed, not emulated (a T4 or V100 emulates it)
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache
def native_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids): where oneDNN's bf16 kernels differ most
    (``tasks.conv_grad``)."""
    import torch

    return torch.cpu._is_amx_tile_supported()


def training_device(name: str, where: str = "device") -> torch.device:
    """The device a training run's ``device`` knob names: ``auto`` is the first CUDA device when this PyTorch sees
    one, else the CPU; ``cuda`` without one is a ``ConfigError`` naming ``where`` (the knob's params key)."""
    import torch

    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        from tasks.errors import ConfigError

        raise ConfigError(f"{where}: cuda, but this PyTorch ({torch.__version__}) sees no CUDA device; "
                          "set it to auto or cpu")
    return torch.device("cpu")


def check_device(key: str, block: Any) -> None:
    """Refuse, before a stage starts, its training block (``key`` in params) asking for a device this machine lacks."""
    if getattr(block, "device", "auto") == "cuda":
        training_device("cuda", f"{key}.device")


def host_tags() -> dict[str, str]:
    """What of the machine changes a stage's arithmetic or its ``auto`` choices, as MLflow tags: the CPU's vector
    extension as PyTorch dispatches to it, whether it computes bf16 natively (bf16 autocast,
    ``teacher_runtime: auto``), and how many CUDA devices ``device: auto`` finds (0: it trains on the CPU). Empty
    for a process that does not compute with PyTorch (it is not imported)."""
    if "torch" not in sys.modules:
        return {}
    import torch

    # the count, not the GPU's name: asking for that would start a CUDA context in every stage process
    return {"host.cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "host.native_bf16": str(native_bf16()).lower(), "host.cuda_devices": str(torch.cuda.device_count())}
