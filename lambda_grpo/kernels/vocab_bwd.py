"""Backward vocab pass: dlogits from the per-token coefficients, optionally in place.

VJP (x = logits / tau, p = softmax(x), per token with g = dL/dlogp, gh = dL/dH):
    logp = x_tok - lse              => d logp / d x_j = 1[j = tok] - p_j
    H = -sum_j p_j log p_j          => d H / d x_j    = -p_j (log p_j + H)
    dL/dlogits_j = (g (1[j = tok] - p_j) - gh p_j (log p_j + H)) / tau
p_j = exp((x_j - max) - log sum) is recomputed from the saved pair lse = [max, log sum] (kept
apart for precision, see _vocab.lse_entropy): the backward reads the logits once and
writes dlogits once. `scale` (a device scalar: the upstream gradient; the coefficients already hold the loss weights)
is loaded in the kernel, so no host sync is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import scale_launch, vocab_launch
from ._launch import check_out, check_rows, check_vec, row_layout, zeros1
from ._vocab import load_token, row_start, write_grad, write_zero


@triton.jit(do_not_specialize=["T"])
def vocab_bwd_kernel(logits_ptr, dlogits_ptr, tokens_ptr, mask_ptr, max_ptr, logs_ptr, ent_ptr, coef_lp_ptr,
                     coef_h_ptr,
                     scale_ptr, T, stride_batch, stride_in, stride_out, V, inv_temp,
                     BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row_out = dlogits_ptr + pid * stride_out
    valid = tl.load(mask_ptr + pid) != 0
    if valid:
        row_in = row_start(logits_ptr, pid, T, stride_batch, stride_in)
        tok = load_token(tokens_ptr, pid, V)
        scale = tl.load(scale_ptr).to(tl.float32)
        g = tl.load(coef_lp_ptr + pid) * scale
        m = tl.load(max_ptr + pid)
        log_s = tl.load(logs_ptr + pid)
        if WITH_ENTROPY:
            gh = tl.load(coef_h_ptr + pid) * scale
            ent = tl.load(ent_ptr + pid)
        else:
            gh = 0.0
            ent = 0.0
        write_grad(row_in, row_out, V, inv_temp, m, log_s, tok, g, gh, ent, BLOCK_V, WITH_ENTROPY)
    else:
        write_zero(row_out, V, BLOCK_V)


@triton.jit
def scale_kernel(d_ptr, mask_ptr, scale_ptr, poison_ptr, stride_row, V, BLOCK_V: tl.constexpr):
    """d *= scale on valid rows; returns at once when scale == 1 (the usual loss.backward()).
    poison (a bool: the value rules of the inputs failed) makes the scale NaN.

    Used after the fused forward, which wrote dlogits for an upstream gradient of 1.
    """
    pid = tl.program_id(0).to(tl.int64)
    scale = tl.where(tl.load(poison_ptr) != 0, float("nan"), tl.load(scale_ptr).to(tl.float32))
    valid = tl.load(mask_ptr + pid) != 0
    if valid & (scale != 1.0):
        row = d_ptr + pid * stride_row
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            vm = cols < V
            v = tl.load(row + cols, mask=vm, other=0.0).to(tl.float32)
            tl.store(row + cols, (v * scale).to(d_ptr.dtype.element_ty), mask=vm)


def vocab_backward(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor,
                   coef_logp: torch.Tensor, scale: torch.Tensor, temperature: float,
                   entropy: torch.Tensor = None, coef_entropy: torch.Tensor = None,
                   out: torch.Tensor = None) -> torch.Tensor:
    """dlogits (N, V) in the logits dtype.

    logits (N, V) or (B, T, V) (N = B T; rows may be strided); tokens (N,) int64; mask (N,) bool;
    lse (2, N) fp32 = [max, log sum] of vocab_forward, or that pair as two (N,) tensors;
    coef_logp, entropy, coef_entropy (N,) fp32; scale: a one-element device tensor multiplying
    both coefficients. Pass entropy and coef_entropy together to include the entropy gradient.
    out: (N, V) buffer to write into, e.g. `logits` itself for an in-place gradient (default: a
    new tensor of the logits' shape, contiguous).
    """
    check_rows(logits)
    N, V, T, batch_stride, row_stride = row_layout(logits)
    dev = logits.device
    check_vec(tokens, "tokens", N, torch.int64, dev)
    check_vec(mask, "mask", N, torch.bool, dev)
    if isinstance(lse, torch.Tensor):
        if tuple(lse.shape) != (2, N) or lse.dtype != torch.float32 or lse.device != dev:
            raise ValueError(f"lse: expected (2, {N}) float32 on {dev}, "
                             f"got {tuple(lse.shape)} {lse.dtype} on {lse.device}")
        m, log_s = lse[0].contiguous(), lse[1].contiguous()
    else:  # the pair [max, log sum] as two tensors
        m, log_s = lse
        check_vec(m, "lse[0]", N, torch.float32, dev)
        check_vec(log_s, "lse[1]", N, torch.float32, dev)
    check_vec(coef_logp, "coef_logp", N, torch.float32, dev)
    with_entropy = entropy is not None
    if with_entropy != (coef_entropy is not None):
        raise ValueError("entropy, coef_entropy: expected both or neither, got one")
    if with_entropy:
        check_vec(entropy, "entropy", N, torch.float32, dev)
        check_vec(coef_entropy, "coef_entropy", N, torch.float32, dev)
    if scale.numel() != 1 or scale.device != dev:
        raise ValueError(f"scale: expected a 1-element tensor on {dev}, "
                         f"got shape {tuple(scale.shape)} on {scale.device}")
    out = check_out(out, logits, N, V)
    if N > 0:
        cfg = vocab_launch(with_entropy)
        vocab_bwd_kernel[(N,)](logits, out, tokens, mask, m, log_s, entropy if with_entropy else m,
                               coef_logp, coef_entropy if with_entropy else coef_logp, scale,
                               T, batch_stride, row_stride, out.stride(-2), V, 1.0 / temperature, **cfg.kwargs())
    return out


def scale_rows(d: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, poison: torch.Tensor = None) -> torch.Tensor:
    """In place: d[mask] *= scale (a one-element device tensor), NaN where `poison` (one bool on
    the device, or None) is set; no work at all when scale == 1 and no poison.
    d: (N, V) with any row stride, or a contiguous (B, T, V) (N = B T)."""
    check_rows(d, "d")
    V = d.shape[-1]
    if d.dim() == 3 and not d.is_contiguous():
        raise ValueError(f"d: expected (N, V) or a contiguous (B, T, V), got stride {d.stride()}")
    N = d.numel() // V if V else d.shape[0] * (d.shape[1] if d.dim() == 3 else 1)
    check_vec(mask, "mask", N, torch.bool, d.device)
    if N > 0:
        if poison is None:
            poison = zeros1(torch.bool, d.device)  # False
        scale_kernel[(N,)](d, mask, scale, poison, d.stride(-2), V, **scale_launch().kwargs())
    return d
