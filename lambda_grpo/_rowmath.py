"""Analytic per-token math over the small (B, T) tensors, shared by the fast backends.

Everything here is O(B * T) (plus O(B * T * block) for the blocked trace scans); nothing touches
the vocabulary. Given the per-token log-probs (and entropies) it returns the loss, the metrics,
d(loss)/d(logp), d(loss)/d(H) and d(loss)/d(lambda) in closed form, without autograd. The
reference backend (autograd over SPEC formulas) is the truth these are tested against.

Layout conventions: (B, T) tensors in the compute dtype (fp32, or float64 for float64 logits);
masked positions carry zeros. Trace scans run over the *valid-token ordinals* of each row, so
holes neither break nor decay a trace: rows are compacted (valid tokens moved left, in order),
scanned, and scattered back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .config import LENGTH_H_MIN, LENGTH_SIGMA_MIN, LOG_RATIO_CLAMP, LossConfig
from ._validate import Batch

SCAN_BLOCK = 128  # block length of the blocked linear scan (an L x L matrix per block)


# --------------------------------------------------------------------------------------------
# Constants that depend only on the mask, the advantages and the config
# --------------------------------------------------------------------------------------------
@dataclass
class TokenConstants:
    """Per-token constants; all (B, T) in the compute dtype unless noted."""

    mask: torch.Tensor  # bool
    A: torch.Tensor  # advantages after adv_clamp_min
    W: torch.Tensor  # aggregation weight W_{i,t} (0 where masked)
    coef: Optional[torch.Tensor]  # weight-mode trace coefficient c_t, or None
    n_tok: torch.Tensor  # 0-d, N_tok (global or local)
    count: torch.Tensor  # 0-d, local number of valid tokens
    seq_weight: torch.Tensor  # (B,) f_i (ones unless lambda_grpo)
    dseq_weight: Optional[torch.Tensor]  # (B,) d f_i / d lambda / max(1, N_tok), lambda_grpo only


def lambda_grpo_weights_and_grad(lengths: torch.Tensor, group_size: int, lam: torch.Tensor, r: float):
    """f = G softmax(h^lam) per group and df/dlam in closed form, all in float64 (SPEC §5).

    df_i/dlam = f_i (h_i^lam ln h_i - sum_j p_j h_j^lam ln h_j), p = softmax(h^lam).
    lengths: (B,) float64; lam: 0-d float64. Returns two (B,) float64 tensors.
    """
    n = lengths.view(-1, group_size)
    mu = n.mean(dim=1, keepdim=True)
    sigma = ((n - mu) ** 2).mean(dim=1, keepdim=True).sqrt()
    z = torch.where(sigma < LENGTH_SIGMA_MIN, torch.zeros_like(n), (n - mu) / sigma.clamp(min=LENGTH_SIGMA_MIN))
    h = torch.clamp(1 + r * z, min=LENGTH_H_MIN)
    log_h = torch.log(h)
    v = torch.exp(lam * log_h)  # h^lam
    p = torch.softmax(v, dim=1)
    f = group_size * p
    dv = v * log_h  # d(h^lam)/dlam
    df = f * (dv - (p * dv).sum(dim=1, keepdim=True))
    return f.reshape(-1), df.reshape(-1)


def geometric_sum(m: torch.Tensor, a: float) -> torch.Tensor:
    """sum_{j < m} a^j for integer-valued float64 m >= 0."""
    if a == 1.0:
        return m
    return (1 - a**m) / (1 - a)


def weight_trace_coefficients(mask: torch.Tensor, cfg: LossConfig, dtype) -> torch.Tensor:
    """c_k = sum_{t=k}^{n-1} w(t, k) in closed form (float64 internally), 0 where masked.

    recent: sum_{j=0}^{n-1-k} a^j.
    both:   w(t, k) = a^(t-k) while t <= 2k, then a^k:  geom(min(k, n-1-k) + 1) + a^k max(0, n-1-2k).
    """
    a = cfg.trace_decay
    k = (torch.cumsum(mask, dim=1) - 1).to(torch.float64)  # valid-token ordinal
    n = mask.sum(dim=1, keepdim=True).to(torch.float64)
    if cfg.trace == "recent":
        c = geometric_sum(n - k, a)
    else:
        c = geometric_sum(torch.minimum(k, n - 1 - k) + 1, a) + a**k * torch.clamp(n - 1 - 2 * k, min=0)
    return torch.where(mask, c, torch.zeros_like(c)).to(dtype)


def token_constants(batch: Batch, cfg: LossConfig, dtype) -> TokenConstants:
    mask = batch.mask
    B, T = mask.shape
    maskf = mask.to(dtype)
    lengths = maskf.sum(dim=1)
    count = maskf.sum()
    n_tok = count if batch.num_tokens is None else batch.num_tokens.to(dtype)
    n_seq = torch.full((), float(B), dtype=dtype, device=mask.device) if batch.num_sequences is None else batch.num_sequences.to(dtype)
    A = torch.where(mask, batch.advantages.to(dtype), torch.zeros((), dtype=dtype, device=mask.device))
    if cfg.adv_clamp_min is not None:
        A = torch.clamp(A, min=cfg.adv_clamp_min)
    seq_weight = torch.ones(B, dtype=dtype, device=mask.device)
    dseq = None
    agg = cfg.aggregation
    if agg == "grpo":
        w_row = 1 / (n_seq * torch.clamp(lengths, min=1))
    elif agg == "bnpo":
        w_row = (1 / torch.clamp(count, min=1)).expand(B)
    elif agg == "dapo":
        w_row = (1 / torch.clamp(n_tok, min=1)).expand(B)
    elif agg == "dr_grpo":
        L = cfg.max_completion_length if cfg.max_completion_length is not None else T
        w_row = (1 / (n_seq * L)).expand(B)
    else:
        lam = batch.lam.detach().to(device=mask.device, dtype=torch.float64)
        f, df = lambda_grpo_weights_and_grad(lengths.to(torch.float64), batch.group_size, lam, cfg.length_r)
        inv = 1 / torch.clamp(n_tok.to(torch.float64), min=1)
        seq_weight, dseq = f.to(dtype), (df * inv).to(dtype)
        w_row = (f * inv).to(dtype)
    W = w_row[:, None] * maskf
    coef = weight_trace_coefficients(mask, cfg, dtype) if cfg.weight_trace else None
    return TokenConstants(mask, A, W, coef, n_tok, count, seq_weight, dseq)


# --------------------------------------------------------------------------------------------
# Trace scans over valid-token ordinals
# --------------------------------------------------------------------------------------------
def compact(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Move each row's valid entries to the left, in order; zeros after them."""
    B, T = mask.shape
    ordinal = torch.cumsum(mask, dim=1) - 1
    dest = torch.where(mask, ordinal, torch.full_like(ordinal, T))  # holes go to a dump column
    out = torch.zeros(B, T + 1, dtype=x.dtype, device=x.device)
    out.scatter_(1, dest, torch.where(mask, x, torch.zeros_like(x)))
    return out[:, :T]


def uncompact(xc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of `compact`: entry t of a row takes ordinal cumsum(mask)-1; zeros at holes."""
    ordinal = torch.clamp(torch.cumsum(mask, dim=1) - 1, min=0)
    return torch.where(mask, xc.gather(1, ordinal), torch.zeros_like(xc))


def linear_scan(x: torch.Tensor, a: float, reverse: bool = False) -> torch.Tensor:
    """R_t = x_t + a R_{t-1} along dim 1 (reverse: R_t = x_t + a R_{t+1}).

    Blocked: inside a block of L steps R = x @ M^T with M[t, k] = a^(t-k) (k <= t), and the
    carry enters as a^(j+1) R_prev. Only non-negative powers of a appear, so it is stable for
    any 0 < a <= 1 in fp32; the work is O(T * L).
    """
    if reverse:
        return linear_scan(x.flip(1), a, False).flip(1)
    B, T = x.shape
    L = min(T, SCAN_BLOCK)
    if L == 0:
        return x.clone()
    idx = torch.arange(L, device=x.device, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    M = torch.where(diff >= 0, a ** diff.clamp(min=0), torch.zeros_like(diff)).to(x.dtype)
    carry_w = (a ** (idx + 1)).to(x.dtype)  # a^(j+1)
    out = torch.empty_like(x)
    carry = None
    for s in range(0, T, L):
        blk = x[:, s:s + L]
        l = blk.shape[1]
        r = blk @ M[:l, :l].T
        if carry is not None:
            r = r + carry[:, None] * carry_w[:l]
        out[:, s:s + l] = r
        carry = r[:, -1]
    return out


def _powers(T: int, a: float, dtype, device) -> torch.Tensor:
    return (a ** torch.arange(T + 1, device=device, dtype=torch.float64)).to(dtype)


def _shift_gather(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """v[:, index] with index in [-1, T): index -1 (and beyond T-1) reads 0."""
    B, T = v.shape
    padded = torch.cat([torch.zeros(B, 1, dtype=v.dtype, device=v.device), v, torch.zeros(B, 1, dtype=v.dtype, device=v.device)], dim=1)
    return padded.gather(1, (index + 1).clamp(0, T + 1))


def trace_forward(x: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Ratio mode z_t = sum_{k<=t} w(t, k) x_k (SPEC §4), (B, T) -> (B, T), zeros at holes.

    recent: z = R.  both: z_t = P_{m-1} + R_t - a^(t-m+1) R_{m-1}, m = ceil(t/2),
    with R_t = x_t + a R_{t-1} and P_t = P_{t-1} + a^t x_t.
    """
    a = cfg.trace_decay
    xc = compact(x, mask)
    R = linear_scan(xc, a)
    if cfg.trace == "recent":
        return uncompact(R, mask)
    B, T = xc.shape
    pw = _powers(T, a, x.dtype, x.device)
    P = torch.cumsum(pw[:T] * xc, dim=1)
    t = torch.arange(T, device=x.device).expand(B, T)
    m = (t + 1) // 2
    z = _shift_gather(P, m - 1) + R - pw[t - m + 1] * _shift_gather(R, m - 1)
    return uncompact(z, mask)


def trace_backward(g: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Adjoint of `trace_forward`: given g = dL/dz (B, T), return dL/dx (B, T).

    recent: U_k = g_k + a U_{k+1}, dL/dx_k = U_k.
    both: with e = min(2k, n-1), dL/dx_k = U_k - a^(e-k+1) U_{e+1} + a^k Q_{2k+1},
    Q_k = g_k + Q_{k+1}; indices past n-1 read 0.
    """
    a = cfg.trace_decay
    gc = compact(g, mask)
    U = linear_scan(gc, a, reverse=True)
    if cfg.trace == "recent":
        return uncompact(U, mask)
    B, T = gc.shape
    pw = _powers(T, a, g.dtype, g.device)
    Q = torch.flip(torch.cumsum(torch.flip(gc, [1]), dim=1), [1])
    k = torch.arange(T, device=g.device).expand(B, T)
    n = mask.sum(dim=1, keepdim=True)
    e = torch.minimum(2 * k, n - 1).clamp(min=0)
    # U and Q are zero past n - 1 because gc is zero there; index T reads 0 via _shift_gather.
    dx = U - pw[(e - k + 1).clamp(0, T)] * _shift_gather(U, e + 1) + pw[k] * _shift_gather(Q, (2 * k + 1).clamp(max=T))
    return uncompact(dx, mask)


# --------------------------------------------------------------------------------------------
# Elementwise token terms
# --------------------------------------------------------------------------------------------
@dataclass
class TokenTerms:
    loss: torch.Tensor  # l_t (unweighted per-token loss)
    g_z: torch.Tensor  # W * d l / d z (through the surrogate; includes c_t in weight mode)
    g_logp: torch.Tensor  # W * d l / d logp through the KL term (direct dependence)
    g_entropy: Optional[torch.Tensor]  # W * d l / d H, or None
    rho: torch.Tensor
    kl: Optional[torch.Tensor]


def token_terms(z, logp, ref, entropy, A, W, coef, cfg: LossConfig) -> TokenTerms:
    """l = -c s(rho(z)) + beta kl(logp) - entropy_coef H, elementwise, with its partials.

    s = min(rho A, clip(rho) A): ds/drho = A unless the clipped branch is the active one
    (A > 0 and rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low), where it is 0; dual clip
    (A < 0, s < cA) pins s = cA with zero slope. drho/dz = rho inside the +-20 clamp, else 0.
    """
    zc = torch.clamp(z, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    rho = torch.exp(zc)
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    s = torch.minimum(rho * A, torch.clamp(rho, lo, hi) * A)
    clipped = ((A > 0) & (rho > hi)) | ((A < 0) & (rho < lo))
    slope = torch.where(clipped, torch.zeros_like(A), A)
    if cfg.dual_clip is not None:
        floor = cfg.dual_clip * A
        dual = (A < 0) & (s < floor)
        s = torch.where(dual, floor, s)
        slope = torch.where(dual, torch.zeros_like(slope), slope)
    ds_dz = slope * torch.where(z.abs() <= LOG_RATIO_CLAMP, rho, torch.zeros_like(rho))
    if coef is not None:
        s, ds_dz = coef * s, coef * ds_dz
    loss = -s
    g_z = -W * ds_dz
    g_logp = torch.zeros_like(g_z)
    kl = None
    if ref is not None:
        d = ref - logp
        if cfg.kl_estimator == "k3":
            ed = torch.exp(d)
            kl, dkl = ed - d - 1, 1 - ed
        elif cfg.kl_estimator == "k1":
            kl, dkl = -d, torch.ones_like(d)
        else:
            kl, dkl = d * d / 2, -d
        if cfg.beta != 0:
            loss = loss + cfg.beta * kl
            g_logp = W * (cfg.beta * dkl)
    g_ent = None
    if entropy is not None and cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * entropy
        g_ent = W * (-cfg.entropy_coef)
    return TokenTerms(loss, g_z, g_logp, g_ent, rho, kl)


# --------------------------------------------------------------------------------------------
# The whole row pass
# --------------------------------------------------------------------------------------------
@dataclass
class RowPass:
    loss: torch.Tensor  # 0-d
    dlogp: torch.Tensor  # (B, T) d loss / d logp
    dentropy: Optional[torch.Tensor]  # (B, T) d loss / d H, or None
    dlam: Optional[torch.Tensor]  # 0-d d loss / d lambda (lambda_grpo), or None
    metrics: Dict[str, torch.Tensor]


def row_pass(logp: torch.Tensor, entropy: Optional[torch.Tensor], batch: Batch, cfg: LossConfig,
             consts: Optional[TokenConstants] = None) -> RowPass:
    """Loss, metrics and closed-form partials from per-token logp (B, T) (and H (B, T))."""
    dtype = logp.dtype
    k = token_constants(batch, cfg, dtype) if consts is None else consts
    mask = k.mask
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)
    old = logp if batch.old_logp is None else torch.where(mask, batch.old_logp.to(dtype), zero)
    x = torch.where(mask, logp - old, zero)
    z = trace_forward(x, mask, cfg) if cfg.ratio_trace else x
    ref = None if batch.ref_logp is None else torch.where(mask, batch.ref_logp.to(dtype), zero)
    terms = token_terms(z, logp, ref, entropy, k.A, k.W, k.coef, cfg)
    token_loss = torch.where(mask, terms.loss, zero)
    loss = (k.W * token_loss).sum()
    g_x = trace_backward(terms.g_z, mask, cfg) if cfg.ratio_trace else terms.g_z
    dlogp = torch.where(mask, g_x + terms.g_logp, zero)
    dent = None if terms.g_entropy is None else torch.where(mask, terms.g_entropy, zero)
    dlam = None
    if k.dseq_weight is not None:
        dlam = (token_loss.sum(dim=1) * k.dseq_weight).sum()

    cnt = torch.clamp(k.count, min=1)

    def mean(v):
        return torch.where(mask, v.to(dtype), zero).sum() / cnt

    rho = terms.rho
    low = mean((k.A < 0) & (rho < 1 - cfg.eps_low))
    high = mean((k.A > 0) & (rho > 1 + cfg.eps_high))
    metrics = {"clip_frac_low": low, "clip_frac_high": high, "clip_frac": low + high, "ratio_mean": mean(rho)}
    if terms.kl is not None:
        metrics["kl_mean"] = mean(terms.kl)
    if entropy is not None:
        metrics["entropy_mean"] = mean(entropy)
    if cfg.aggregation == "lambda_grpo":
        metrics["lambda"] = batch.lam.detach().to(device=logp.device, dtype=dtype)
    metrics["seq_weight"] = k.seq_weight
    return RowPass(loss, dlogp, dent, dlam, metrics)
