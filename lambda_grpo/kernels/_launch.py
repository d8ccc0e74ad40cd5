"""Argument checks shared by the launchers (the kernels trust what these let through)."""

from __future__ import annotations

import torch

from ._config import LOGITS_DTYPES


def check_rows(logits: torch.Tensor, name: str = "logits") -> None:
    """logits: (N, V) or (B, T, V) with unit stride along V (rows may be strided)."""
    if logits.dim() not in (2, 3):
        raise ValueError(f"{name}: expected shape (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGITS_DTYPES:
        raise ValueError(f"{name}: expected dtype in {LOGITS_DTYPES}, got {logits.dtype}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride along V, got stride {logits.stride()}")


def row_layout(logits: torch.Tensor):
    """(N, V, T, batch_stride, row_stride) of checked (N, V) or (B, T, V) logits: vocabulary row
    j = b T + t starts at b * batch_stride + t * row_stride (kernels/_vocab.py:row_start). The
    (B, T, V) form lets the kernels read a slice such as `model(ids).logits[:, P-1:-1]` where it
    lies: flattening it to (N, V) would copy the whole tensor."""
    V = logits.shape[-1]
    if logits.dim() == 2:
        return logits.shape[0], V, max(logits.shape[0], 1), 0, logits.stride(0)
    B, T = logits.shape[0], logits.shape[1]
    return B * T, V, max(T, 1), logits.stride(0), logits.stride(1)


def check_out(out, logits: torch.Tensor, N: int, V: int) -> torch.Tensor:
    """The (N, V) gradient buffer: a new one when `out` is None, else `out` checked (any row
    stride, unit stride along V; e.g. the logits themselves for an in-place gradient)."""
    if out is None:  # the logits' own shape: (N, V), or a contiguous (B, T, V)
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    shaped = out.shape == (N, V) and (V == 1 or out.stride(1) == 1)  # any row stride
    shaped = shaped or (out.dim() == 3 and out.shape[0] * out.shape[1] == N and out.shape[2] == V
                        and out.is_contiguous())  # row stride V: out.stride(-2) is the row stride either way
    if not shaped or out.dtype != logits.dtype or out.device != logits.device:
        raise ValueError(f"out: expected ({N}, {V}) {logits.dtype} on {logits.device} with unit stride along V (or "
                         f"a contiguous (B, T, V)), got {tuple(out.shape)} {out.dtype} on {out.device} stride "
                         f"{out.stride()}")
    return out


def check_vec(x: torch.Tensor, name: str, n: int, dtype: torch.dtype, device) -> None:
    """x: n contiguous elements of `dtype` on `device`, any shape ((N,), or (B, T) of a padded
    batch: the kernels index it flat, and a view to (N,) would be one more op of host time)."""
    if x.numel() != n or x.dtype != dtype or x.device != device or not x.is_contiguous():
        raise ValueError(f"{name}: expected {n} contiguous elements (shape ({n},) or (B, T)) of {dtype} on {device}, "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device} with stride {x.stride()}")


def token_strides(x: torch.Tensor, name: str, B: int, T: int, dtype: torch.dtype, device, per_row: bool = False):
    """(row stride, token stride) of a per-token input of a batch of B rows of T tokens, for a
    kernel that reads token pid = r T + t at x + r * row_stride + t * token_stride:
    a (B, T) tensor with any strides (a broadcast view of per-sequence values included), or B T
    contiguous elements of another shape ((N,)); per_row=True also takes a (B,) tensor of one
    value per row (token stride 0)."""
    if x.dtype != dtype or x.device != device:
        raise ValueError(f"{name}: expected {dtype} on {device}, got {x.dtype} on {x.device}")
    if x.dim() == 2 and tuple(x.shape) == (B, T):
        return x.stride(0), x.stride(1)
    if per_row and x.dim() == 1 and x.shape[0] == B:
        return x.stride(0), 0
    if x.numel() == B * T and x.is_contiguous():
        return T, 1
    raise ValueError(f"{name}: expected shape ({B}, {T}) with any strides, {B * T} contiguous elements"
                     + (f" or ({B},) per row" if per_row else "") + f", got {tuple(x.shape)} stride {x.stride()}")


_ZEROS1: dict = {}


def zeros1(dtype: torch.dtype, device) -> torch.Tensor:
    """A one-element zero (False for bool) on `device`, made once per dtype and device (an
    allocation per call is host time): a pointer argument the kernel never touches, or the
    poison of inputs without value rules. Never written."""
    key = (dtype, device)
    if key not in _ZEROS1:
        _ZEROS1[key] = torch.zeros(1, dtype=dtype, device=device)
    return _ZEROS1[key]
