"""The learning-rate schedule both of the world's trainers use (`train_clip`, `train_diffusion`)."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """The learning rate at 0-based STEP of STEPS: linear warmup to LR over WARMUP steps, then cosine decay to 0
    (open_clip training/scheduler.py cosine_lr)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * progress))
