"""λ-GRPO's group weights in one launch (docs/math.md §5): f_i, df_i/dλ and the loss weight w_i.

The torch engine and the row math compute the same three numbers with ~50 small torch ops
(`lambda_grpo._rowmath.lambda_grpo_weights_and_grad`, float64 on B numbers); on a GPU each is a
launch and host time, so the Triton engine computes them here, one program per row, in float64,
with the same formulas (the torch function is the one this kernel is tested against, element by
element, extreme λ included: tests/test_triton_groups.py):

    μ, σ = mean, std (ddof 0) of the group's lengths; z = (n - μ) / σ, 0 when σ < 1e-6
    h = max(1 + r z, 1e-6); u = λ ln h; u* = max over the group; δ = u - u*
    v = h^λ - e^{u*} = -exp(u* + ln(-expm1(δ)))  (0 at the maximum: never overflows)
    p = softmax(v); f = G p; e_j = exp(δ_j) ln h_j
    df_i/dλ = exp(u*) f_i Σ_j p_j (e_i - e_j)     (exactly 0 when that sum is 0: the overflow case)

Each row reads its group's G lengths: rows [⌊i/G⌋G, ⌊i/G⌋G + G) of `lengths` (contiguous
groups), or row i of `group_lengths` (B, G) with its own index `group_index[i]` (groups spread
over ranks and micro-batches). Outputs (B,) fp32: f, df / max(1, N_tok), w = f / max(1, N_tok).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..config import LENGTH_H_MIN, LENGTH_SIGMA_MIN
from ._config import MAX_GROUP_BLOCK, group_launch
from ._launch import zeros1

SIGMA_MIN = tl.constexpr(LENGTH_SIGMA_MIN)
H_MIN = tl.constexpr(LENGTH_H_MIN)


@triton.jit
def _expm1(d):
    """exp(d) - 1 for float64 d <= 0, accurate where exp(d) - 1 cancels: a Taylor series for
    |d| < 1e-3 (its first omitted term d^6/720 is below 2e-21 relative), exp(d) - 1 beyond."""
    taylor = d * (1.0 + d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0)))))
    return tl.where(tl.abs(d) < 1e-3, taylor, tl.exp(d) - 1.0)


@triton.jit(do_not_specialize=["G", "has_gl"])
def group_weights_kernel(len_ptr, gl_ptr, gi_ptr, lam_ptr, ntok_ptr, f_ptr, df_ptr, w_ptr,
                         G, length_r: tl.float64, has_gl, BLOCK_G: tl.constexpr):
    """One row: f, df/dλ / max(1, N_tok) and w of row `program_id` (see the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_G)
    jm = j < G
    use_gl = (tl.zeros([BLOCK_G], tl.int32) + has_gl) != 0
    gbase = (row // G) * G
    n_con = tl.load(len_ptr + gbase + j, mask=jm & ~use_gl, other=0).to(tl.float64)
    n_spread = tl.load(gl_ptr + row * G + j, mask=jm & use_gl, other=0).to(tl.float64)
    n = tl.where(use_gl, n_spread, n_con)
    # gi_ptr holds a dummy 0 without group_lengths (a runtime int cannot mask a scalar load here)
    own = tl.where(has_gl != 0, tl.load(gi_ptr + row * has_gl), row - gbase)
    lam = tl.load(lam_ptr)
    Gf = G.to(tl.float64)
    mu = tl.sum(tl.where(jm, n, 0.0), 0) / Gf
    dev = tl.where(jm, n - mu, 0.0)
    sigma = tl.sqrt(tl.sum(dev * dev, 0) / Gf)
    z = tl.where(sigma < SIGMA_MIN, 0.0, dev / tl.maximum(sigma, SIGMA_MIN))
    h = tl.maximum(1.0 + length_r * z, H_MIN)
    log_h = tl.log(h)
    u = lam * log_h
    u_max = tl.max(tl.where(jm, u, float("-inf")), 0)
    delta = tl.where(jm, u - u_max, float("-inf"))
    at_max = delta == 0.0
    safe = tl.where(at_max | ~jm, -1.0, delta)
    # capped at exp(709) (-inf in the torch function): the softmax gives such rows exactly 0 either way
    arg = u_max + tl.log(-_expm1(safe))
    v = tl.where(at_max, 0.0, -tl.exp(tl.where(arg > 709.0, 709.0, arg)))  # where(), not minimum: NaN stays NaN
    v = tl.where(jm, v, float("-inf"))
    ev = tl.exp(v - tl.max(v, 0))
    p = ev / tl.sum(ev, 0)
    e = tl.where(jm, tl.exp(tl.where(jm, delta, 0.0)) * log_h, 0.0)
    e_own = tl.sum(tl.where(j == own, e, 0.0), 0)
    p_own = tl.sum(tl.where(j == own, p, 0.0), 0)
    f = Gf * p_own
    bracket = f * tl.sum(tl.where(jm, p * (e_own - e), 0.0), 0)
    # past u* = 709 exp(u*) overflows float64, and there the bracket is exactly 0 (every p_j off
    # the maximum is 0): the capped exponent changes nothing and forms no inf * 0
    df = tl.where(bracket == 0.0, 0.0, bracket * tl.exp(tl.where(u_max > 709.0, 709.0, u_max)))
    nt = tl.load(ntok_ptr).to(tl.float64)
    inv = 1.0 / tl.where(nt < 1.0, 1.0, nt)  # max(1, N_tok) that keeps a NaN normaliser NaN (as torch.clamp)
    tl.store(f_ptr + row, f.to(tl.float32))
    tl.store(df_ptr + row, (df * inv).to(tl.float32))
    tl.store(w_ptr + row, (f * inv).to(tl.float32))


def launch_group_weights(lengths: torch.Tensor, group_size: int, lam: torch.Tensor, r: float, n_tok: torch.Tensor,
                         group_lengths: Optional[torch.Tensor] = None, group_index: Optional[torch.Tensor] = None
                         ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(w, f, df / max(1, N_tok)) (B,) fp32, or None for a group too large for one program (the
    caller then uses the torch function). lengths (B,) int32 n_i; lam a 0-d tensor; n_tok a 0-d
    tensor; group_lengths (B, G) int64 and group_index (B,) int64 (in [0, G)) or None."""
    B = lengths.shape[0]
    G = group_size if group_lengths is None else group_lengths.shape[1]
    launch = group_launch(G)
    if launch is None:
        return None
    dev = lengths.device
    # three tensors, not views of one (each view is host time); lam and N_tok are read as scalars
    f, df, w = (torch.empty(B, dtype=torch.float32, device=dev) for _ in range(3))
    if B > 0:
        lam64 = lam if (lam.dtype == torch.float64 and lam.device == dev) else lam.to(device=dev, dtype=torch.float64)
        if lam64.requires_grad:
            lam64 = lam64.detach()
        if n_tok.requires_grad:
            n_tok = n_tok.detach()
        has_gl = group_lengths is not None
        dummy = zeros1(torch.int64, dev)
        group_weights_kernel[(B,)](lengths, group_lengths if has_gl else dummy, group_index if has_gl else dummy,
                                   lam64, n_tok, f, df, w, int(G), float(r), int(has_gl), **launch.kwargs())
    return w, f, df


__all__ = ["group_weights_kernel", "launch_group_weights", "MAX_GROUP_BLOCK"]
