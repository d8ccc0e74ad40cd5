"""Argument checks shared by the launchers (the kernels trust what these let through)."""

from __future__ import annotations

import torch

from ._config import LOGITS_DTYPES


def check_rows(logits: torch.Tensor, name: str = "logits") -> None:
    """logits: (N, V) with unit stride along V (rows may be strided)."""
    if logits.dim() != 2:
        raise ValueError(f"{name}: expected shape (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise ValueError(f"{name}: expected dtype in {LOGITS_DTYPES}, got {logits.dtype}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride along V, got stride {logits.stride()}")


def check_vec(x: torch.Tensor, name: str, n: int, dtype: torch.dtype, device) -> None:
    if x.shape != (n,) or x.dtype != dtype or x.device != device or (n > 1 and x.stride(0) != 1):
        raise ValueError(f"{name}: expected contiguous ({n},) {dtype} on {device}, "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device} with stride {x.stride()}")


def as_u8(mask: torch.Tensor) -> torch.Tensor:
    """bool mask -> uint8 view (no copy), which every Triton version loads the same way."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask
