"""Packed (varlen) inputs: the one place that turns a packed batch into the Batch's two layouts.

A packed batch concatenates B completions of varying length into N tokens, as TRL's
``padding_free`` and verl's ``use_remove_padding`` do; ``cu_seqlens`` (B+1,) holds the cumulative
segment offsets (flash-attn's name): segment i is tokens cu_seqlens[i]:cu_seqlens[i+1], and each
segment is one row of the loss (traces never cross a boundary, lengths and groups come from the
segments). Per-token inputs are (N,), the logits (N, V), the hidden states (N, H).

Packing changes an index map only. The row math (aggregation weights, λ-GRPO, trace scans, the
Triton row kernel) runs on a padded (B, T_max) layout of the *small* per-token tensors (O(N)
values scattered, zeros elsewhere, masked out), with T_max the longest segment; the vocabulary
passes run on the packed rows of the logits or hidden states as they are (they already work on
flat rows), and d(loss)/d(logp) is gathered back to packed order. No (B, T_max, V) or
(B, T_max, H) tensor is ever made: the large tensors are never copied or padded. The reference
backend pads the per-token log-probs explicitly (plain autograd index ops).

`pos` (N,) int64 is the map: packed token j sits at flat index pos[j] of the (B, T_max) layout,
pos[j] = i * T_max + (j - cu_seqlens[i]) for the segment i holding j. It is increasing, so the
valid tokens come in the same order in both layouts (the chunked passes see the same chunks).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._batch import to_rows

PACKED_HINT = "(packed: cu_seqlens given)"


def _fail(name: str, expected: str, actual) -> None:
    raise ValueError(f"{name}: expected {expected}, got {actual}")


def packing_map(cu_seqlens, N: int, device) -> Tuple[torch.Tensor, int, int]:
    """Validate cu_seqlens for N packed tokens on `device`; return (pos (N,) int64, B, T_max).

    Rules: a 1-d integer tensor on `device` with B + 1 >= 1 entries, cu_seqlens[0] = 0,
    non-decreasing (empty segments allowed), cu_seqlens[-1] = N. One host read (the checks and
    T_max, which sizes the row layout)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        _fail("cu_seqlens", "a torch.Tensor of shape (B + 1,)", type(cu_seqlens).__name__)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail("cu_seqlens", "shape (B + 1,) with at least one entry", f"shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        _fail("cu_seqlens", "an integer dtype (int32 or int64)", cu_seqlens.dtype)
    if cu_seqlens.device.type == "meta":
        _fail("cu_seqlens", "a tensor with values (cpu, cuda, ...)", "a tensor on the meta device (shape only)")
    if cu_seqlens.device != torch.device(device):
        _fail("cu_seqlens", f"device {device} (that of the packed tokens)", cu_seqlens.device)
    cu = cu_seqlens.long()
    host = cu.tolist()  # the one host read
    if host[0] != 0:
        _fail("cu_seqlens", "cu_seqlens[0] = 0", f"cu_seqlens[0] = {host[0]}")
    for i in range(1, len(host)):
        if host[i] < host[i - 1]:
            _fail("cu_seqlens", "non-decreasing offsets", f"cu_seqlens[{i}] = {host[i]} < cu_seqlens[{i - 1}] = "
                  f"{host[i - 1]}")
    if host[-1] != N:
        _fail("cu_seqlens", f"cu_seqlens[-1] = N = {N} (the number of packed tokens)", f"cu_seqlens[-1] = {host[-1]}")
    B = len(host) - 1
    lengths = cu[1:] - cu[:-1]
    T = max((host[i + 1] - host[i] for i in range(B)), default=0)
    seg = torch.repeat_interleave(torch.arange(B, device=cu.device), lengths, output_size=N)
    pos = seg * T + (torch.arange(N, device=cu.device) - cu[:-1].index_select(0, seg)) if N else seg
    return pos, B, T


def check_packed(x, name: str, N: int, device, what: str, B: Optional[int] = None) -> None:
    """A packed per-token input: a tensor of shape (N,) (or (B,) per sequence when B is given) on
    `device`. Dtypes are checked later by the row-layout rules, which name the argument too."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        _fail(name, "a torch.Tensor", type(x).__name__)
    shapes = [(N,)] + ([(B,)] if B is not None else [])
    if tuple(x.shape) not in shapes:
        want = f"shape ({N},) (N tokens of {what})" + (f" or ({B},) (B segments of cu_seqlens)" if B is not None
                                                        else "")
        _fail(name, f"{want} {PACKED_HINT}", f"shape {tuple(x.shape)}")
    if x.device != device:
        _fail(name, f"device {device} (that of {what})", x.device)


def unpack_inputs(cu_seqlens, N: int, device, what: str, mask: torch.Tensor, tokens: Optional[torch.Tensor],
                  per_token: Dict[str, Optional[torch.Tensor]], advantages) -> tuple:
    """The one normalisation step of every entry point with packed inputs.

    Checks cu_seqlens and the packed shapes of `per_token` ((N,) each), of `advantages` ((B,) or
    (N,)), and returns (pos, B, T, mask (B, T) bool, tokens (B, T) int64 or None, per_token dict
    of (B, T) tensors, advantages (B,) or (B, T)). `mask` must already be a checked (N,) bool
    tensor and `tokens` a checked (N,) integer tensor (the entry points check them with their
    vocabulary size). A 1-d advantages of length B is per segment, also when B == N (where it
    equals per token only if every segment holds one token)."""
    pos, B, T = packing_map(cu_seqlens, N, device)
    mask_bt = to_rows(mask, pos, B, T, fill=False)
    tokens_bt = None if tokens is None else to_rows(tokens.long(), pos, B, T)
    out = {}
    for name, x in per_token.items():
        check_packed(x, name, N, device, what)
        out[name] = None if x is None else to_rows(x.detach(), pos, B, T)
    if advantages is not None:
        check_packed(advantages, "advantages", N, device, what, B=B)
        if not (advantages.dim() == 1 and advantages.shape[0] == B):
            advantages = to_rows(advantages.detach(), pos, B, T)
    return pos, B, T, mask_bt, tokens_bt, out, advantages
