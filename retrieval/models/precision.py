"""Where and in what precision a model runs: the device rule, the precision rule, and mixed-precision autocast.

One rule for every model of the engine (the CLIP encoder, the diffusion backbone, the token trainer, the world's
trainers): fp32 weights and fp32 compute on the CPU (half precision is slow there); on a GPU, bf16 where the GPU
supports it, else fp16, applied as autocast over fp32 master weights when gradients are needed.
"""

from __future__ import annotations

import contextlib

import torch

from retrieval.models.clip import ModelLoadError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when a GPU is present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"`device={device}` asked for, but torch sees no CUDA GPU; use `device=cpu` or `device=auto`"
        )
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU (half is slow there)."""
    if precision != "auto":
        if precision not in DTYPES:
            raise ModelLoadError(f"`precision={precision}` is not one of auto, {', '.join(DTYPES)}")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """A context manager: bf16/fp16 autocast on GPU (mixed precision over fp32 weights); nothing in fp32 or on CPU."""
    precision = resolve_precision(precision, device)
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])
