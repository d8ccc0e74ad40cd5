"""Analytic per-token math over the small (B, T) tensors, shared by the fast backends.

Everything here is O(B * T) (plus O(B * T * block) for the blocked trace scans); nothing touches
the vocabulary. Given the per-token log-probs (and entropies) it returns the loss, the metrics,
d(loss)/d(logp), d(loss)/d(H) and d(loss)/d(lambda) in closed form, without autograd. The
reference backend (autograd over the formulas of docs/math.md) is the truth these are tested against.

Layout conventions: (B, T) tensors in the compute dtype (fp32, or float64 for float64 logits);
masked positions carry zeros. Trace scans run over the *valid-token ordinals* of each row, so
holes neither break nor decay a trace: rows are compacted (valid tokens moved left, in order),
scanned, and scattered back. The scans run in float64 whatever the compute dtype: they are
O(B T), and a recurrence over thousands of tokens in fp32 carries an error of about
eps |z| / (1 - a) (1e-5 at a = 0.99), ten times what plain torch's fp32 matrix form of the same
sums gets (measured on an H200 at T = 8192; the Triton row kernel scans in float64 too).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, NamedTuple, Optional

import torch

from .config import (LENGTH_H_MIN, LENGTH_SIGMA_MIN, LOG_RATIO_CLAMP, VESPO_LAMBDA_MIN, VESPO_LOG_W_MIN,
                     LossConfig)
from ._batch import Batch, as_dtype

SCAN_BLOCK = 128  # block length of the blocked linear scan (an L x L matrix per block)


# --------------------------------------------------------------------------------------------
# Constants that depend only on the mask, the advantages and the config
# --------------------------------------------------------------------------------------------
@dataclass
class TokenConstants:
    """What the loss needs besides the log-probs: it depends only on the mask, the advantages,
    lambda, the normalisers and the config, so it is known before the vocabulary pass (which is
    what lets the fused schedules write dlogits in the forward). (B, T) tensors are in the
    compute dtype and zero where masked unless noted."""

    mask: torch.Tensor  # (B, T) bool
    adv: torch.Tensor  # (B, T) advantages after adv_clamp_min, NOT masked (maybe a broadcast view)
    w_row: torch.Tensor  # (B,) W_{i,t} of every valid token of row i (0 for an empty row; maybe a broadcast view)
    coef: Optional[torch.Tensor]  # c_t multiplying the surrogate (weight-mode trace x token weights), or None
    count: torch.Tensor  # 0-d, local number of valid tokens
    seq_weight: torch.Tensor  # (B,) f_i (ones unless lambda_grpo)
    dseq_weight: Optional[torch.Tensor]  # (B,) d f_i / d lambda / max(1, N_tok), lambda_grpo only
    known_lengths: Optional[torch.Tensor] = None  # `lengths`, when the aggregation needed them already

    @cached_property
    def lengths(self) -> torch.Tensor:
        """(B,) int32 n_i (made when first read: DAPO's fused schedule never reads them)."""
        if self.known_lengths is not None:
            return self.known_lengths
        return self.mask.sum(dim=1, dtype=torch.int32)

    # The masked (B, T) forms, made when first read: the Triton kernels read `adv` and `w_row` at
    # valid tokens only (with their strides), and every op here is host time.
    @cached_property
    def A(self) -> torch.Tensor:
        """(B, T) advantages after adv_clamp_min, zero where masked."""
        return torch.where(self.mask, self.adv, 0.0)

    @cached_property
    def W(self) -> torch.Tensor:
        """(B, T) w_row broadcast over the valid tokens, zero where masked."""
        return torch.where(self.mask, self.w_row[:, None], 0.0)


def lambda_grpo_weights_and_grad(lengths: torch.Tensor, group_size: int, lam: torch.Tensor, r: float):
    """f = G softmax(h^lam) per group and df/dlam in closed form, all in float64 (docs/math.md §5).

    df_i/dlam = f_i (v_i ln h_i - sum_j p_j v_j ln h_j), v = h^lam, p = softmax(v).
    lengths: (B,) float64; lam: 0-d float64. Returns two (B,) float64 tensors.

    Any finite lam gives finite f and df: v_i = exp(u_i), u_i = lam ln h_i, overflows float64
    once u_i > 709 (lam = 1e4, or lam = -60 with h = 1e-6), so the softmax is taken of the
    shifted values v_i - v* = -exp(u* + ln(-expm1(u_i - u*))) (u* = max_j u_j, 0 at the
    maximum), which never overflow; and v_i ln h_i - sum_j p_j v_j ln h_j is evaluated as
    exp(u*) sum_j p_j (e_i - e_j) with e_i = exp(u_i - u*) ln h_i. The sum is bounded, and once
    exp(u*) overflows (u* > 709) every p_j off the maximum is exactly 0 and the sum is exactly
    0 (rows tied at the maximum have equal e), so df is then 0, as it is to float64 precision.
    """
    n = lengths.view(-1, group_size)
    mu = n.mean(dim=1, keepdim=True)
    sigma = ((n - mu) ** 2).mean(dim=1, keepdim=True).sqrt()
    z = torch.where(sigma < LENGTH_SIGMA_MIN, torch.zeros_like(n), (n - mu) / sigma.clamp(min=LENGTH_SIGMA_MIN))
    h = torch.clamp(1 + r * z, min=LENGTH_H_MIN)
    log_h = torch.log(h)
    u = lam * log_h  # ln(h^lam)
    u_max = u.amax(dim=1, keepdim=True)
    delta = u - u_max  # <= 0
    at_max = delta == 0
    shifted = torch.where(at_max, torch.zeros_like(u),
                          -torch.exp(u_max + torch.log(-torch.expm1(torch.where(at_max, -torch.ones_like(u), delta)))))
    p = torch.softmax(shifted, dim=1)
    f = group_size * p
    e = torch.exp(delta) * log_h
    # e_i - sum_j p_j e_j written as sum_j p_j (e_i - e_j): exactly 0 for rows tied at the maximum
    bracket = f * (p[:, None, :] * (e[:, :, None] - e[:, None, :])).sum(dim=2)
    df = torch.where(bracket == 0, torch.zeros_like(bracket), bracket * torch.exp(u_max))
    return f.reshape(-1), df.reshape(-1)


def aggregation_weights(cfg: LossConfig, lengths: torch.Tensor, count: torch.Tensor, n_tok: torch.Tensor,
                        n_seq: Optional[torch.Tensor], T: int, lam: Optional[torch.Tensor], group_size: int, dtype,
                        group_lengths: Optional[torch.Tensor] = None, group_index: Optional[torch.Tensor] = None,
                        group_weights=None, rows: Optional[int] = None):
    """docs/math.md §6, the one copy every fast backend uses: the weight W_{i,t} = w_i of each
    valid token of row i, f_i and df_i/dlambda / max(1, N_tok).

    lengths (B,) n_i (None is allowed for the aggregations that do not read them, all but grpo and
    lambda_grpo: then `rows` = B); count: 0-d local number of valid tokens; n_tok: 0-d normaliser (global, or
    the local count); n_seq: 0-d global number of sequences, or None for the local B; T the padded
    length (dr_grpo's default L). lambda-GRPO's groups are contiguous runs of group_size rows, or,
    when group_lengths (B, G) and group_index (B,) are given, row i's group has the lengths
    group_lengths[i] and row i is its member group_index[i] (rows of one group may then sit in
    other micro-batches or on other ranks). Returns (w (B,), f (B,), df (B,) or None) in `dtype`
    (f, df computed in float64). w is finite for every row, an empty one included (dr_grpo's L is
    at least 1, grpo's n_i is clamped at 1), so an empty row's sum 0 contributes exactly 0.
    group_weights: an engine's one-launch implementation of the lambda-GRPO branch (the Triton
    engine's lambda_grpo/kernels/groups.py, tested against lambda_grpo_weights_and_grad), fp32;
    it may decline (None) a group it cannot take.
    """
    B = lengths.shape[0] if lengths is not None else rows
    dev = count.device
    f = torch.ones(B, dtype=dtype, device=dev)
    df = None
    agg = cfg.aggregation
    if n_seq is None and agg in ("grpo", "dr_grpo", "seq_mean_token_sum"):
        n_seq = torch.full((), float(B), dtype=dtype, device=dev)
    if agg == "grpo":
        w = 1 / (n_seq * torch.clamp(lengths.to(dtype), min=1))
    elif agg == "bnpo":
        w = torch.clamp(count, min=1).reciprocal().expand(B)
    elif agg == "dapo":
        w = torch.clamp(n_tok, min=1).reciprocal().expand(B)
    elif agg == "dr_grpo":
        L = cfg.max_completion_length if cfg.max_completion_length is not None else max(T, 1)
        w = (1 / (n_seq * L)).expand(B)
    elif agg == "token_sum":
        w = f
    elif agg == "seq_mean_token_sum":
        w = n_seq.reciprocal().expand(B)
    elif agg == "lambda_grpo":
        fast = None
        if group_weights is not None and dtype == torch.float32:
            fast = group_weights(lengths, group_size, lam, cfg.length_r, n_tok, group_lengths, group_index)
        if fast is not None:
            w, f, df = fast
            return w, f, df
        lam64 = lam.detach().to(device=lengths.device, dtype=torch.float64)
        if group_lengths is None:
            f64, df64 = lambda_grpo_weights_and_grad(lengths.to(torch.float64), group_size, lam64, cfg.length_r)
        else:
            G = group_lengths.shape[1]
            f_all, df_all = lambda_grpo_weights_and_grad(group_lengths.reshape(-1).to(torch.float64), G, lam64,
                                                         cfg.length_r)
            pick = group_index.reshape(B, 1)
            f64, df64 = f_all.view(B, G).gather(1, pick).squeeze(1), df_all.view(B, G).gather(1, pick).squeeze(1)
        inv = 1 / torch.clamp(n_tok.to(torch.float64), min=1)
        f, df, w = f64.to(dtype), (df64 * inv).to(dtype), (f64 * inv).to(dtype)
    else:  # LossConfig validates the name; this is a guard for a new aggregation added in one place only
        raise ValueError(f"aggregation: no weights for {agg!r}")
    return w, f, df  # w may be a broadcast view (stride 0): the consumers index it


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


def token_constants(batch: Batch, cfg: LossConfig, dtype, group_weights=None) -> TokenConstants:
    """TokenConstants of a validated batch (see the class); no host sync. group_weights: the
    engine's lambda-GRPO weights in one launch, or None (see aggregation_weights)."""
    mask = batch.mask
    B, T = mask.shape
    # n_i only where the aggregation reads them (grpo's 1/n_i, lambda-GRPO's groups); else later,
    # if ever (TokenConstants.lengths): every op here is host time
    lengths = mask.sum(dim=1, dtype=torch.int32) if cfg.aggregation in ("grpo", "lambda_grpo") else None
    count = mask.sum(dtype=dtype) if lengths is None else lengths.sum(dtype=dtype)
    n_tok = count if batch.num_tokens is None else as_dtype(batch.num_tokens, dtype)
    n_seq = None if batch.num_sequences is None else as_dtype(batch.num_sequences, dtype)
    adv = as_dtype(batch.advantages, dtype)
    if cfg.adv_clamp_min is not None:
        adv = torch.clamp(adv, min=cfg.adv_clamp_min)
    w_row, seq_weight, dseq = aggregation_weights(cfg, lengths, count, n_tok, n_seq, T, batch.lam, batch.group_size,
                                                  dtype, batch.group_lengths, batch.group_index, group_weights, rows=B)
    # c_t multiplies the surrogate of token t: the weight-mode trace coefficient times the
    # per-token importance weight, whichever are present (None: both absent, c = 1)
    coef = weight_trace_coefficients(mask, cfg, dtype) if cfg.weight_trace else None
    if batch.token_weights is not None:
        tw = torch.where(mask, batch.token_weights.to(dtype), 0.0)
        coef = tw if coef is None else coef * tw
    return TokenConstants(mask, adv, w_row, coef, count, seq_weight, dseq, known_lengths=lengths)


class FusedInputs(NamedTuple):
    """Per-token inputs of a fused vocab pass in the compute dtype: what a token's d(loss)/d(logp)
    needs besides its own logp and entropy when there is no ratio-mode trace. Only valid tokens
    are read. In the row layout (`fused_inputs`): A (B, T) any strides (a broadcast view of
    per-sequence advantages), W (B,) per row (`per_token` spreads it), coef, old_logp, ref_logp
    (B, T) contiguous, indexed flat; or all gathered to the N tokens of a packed batch or a
    chunk of valid tokens (lambda_grpo/_compute.py, _linear.py), (N,) each."""

    A: torch.Tensor
    W: torch.Tensor
    coef: Optional[torch.Tensor]
    old_logp: Optional[torch.Tensor]
    ref_logp: Optional[torch.Tensor]


def fused_inputs(consts: TokenConstants, batch: Batch, dtype) -> FusedInputs:
    """FusedInputs in the row layout (no masking, no copy where none is needed: each is host time)."""
    def rows(x):
        return None if x is None else as_dtype(x, dtype).contiguous()

    return FusedInputs(consts.adv, consts.w_row, rows(consts.coef), rows(batch.old_logp), rows(batch.ref_logp))


def broadcast_rows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x as a tensor of like's shape: a per-row (B,) x broadcast over the T tokens of each row of a
    (B, T) `like` (a view), any other x as it is."""
    return x if x.shape == like.shape else x[:, None].expand_as(like)


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
        n = blk.shape[1]
        r = blk @ M[:n, :n].T
        if carry is not None:
            r = r + carry[:, None] * carry_w[:n]
        out[:, s:s + n] = r
        carry = r[:, -1]
    return out


def _powers(T: int, a: float, dtype, device) -> torch.Tensor:
    return (a ** torch.arange(T + 1, device=device, dtype=torch.float64)).to(dtype)


def _shift_gather(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """v[:, index] with index in [-1, T): index -1 (and beyond T-1) reads 0."""
    B, T = v.shape
    edge = torch.zeros(B, 1, dtype=v.dtype, device=v.device)
    padded = torch.cat([edge, v, edge], dim=1)
    return padded.gather(1, (index + 1).clamp(0, T + 1))


def trace_forward(x: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Ratio mode z_t = sum_{k<=t} w(t, k) x_k (docs/math.md §3), (B, T) -> (B, T), zeros at holes.

    recent: z = R.  both: z_t = P_{m-1} + R_t - a^(t-m+1) R_{m-1}, m = ceil(t/2),
    with R_t = x_t + a R_{t-1} and P_t = P_{t-1} + a^t x_t.
    """
    a = cfg.trace_decay
    xc = compact(x.to(torch.float64), mask)  # scans in float64 (O(B T), see the module docstring)
    R = linear_scan(xc, a)
    if cfg.trace == "recent":
        return uncompact(R, mask).to(x.dtype)
    B, T = xc.shape
    pw = _powers(T, a, xc.dtype, x.device)
    P = torch.cumsum(pw[:T] * xc, dim=1)
    t = torch.arange(T, device=x.device).expand(B, T)
    m = (t + 1) // 2
    z = _shift_gather(P, m - 1) + R - pw[t - m + 1] * _shift_gather(R, m - 1)
    return uncompact(z, mask).to(x.dtype)


def trace_backward(g: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Adjoint of `trace_forward`: given g = dL/dz (B, T), return dL/dx (B, T).

    recent: U_k = g_k + a U_{k+1}, dL/dx_k = U_k.
    both: with e = min(2k, n-1), dL/dx_k = U_k - a^(e-k+1) U_{e+1} + a^k Q_{2k+1},
    Q_k = g_k + Q_{k+1}; indices past n-1 read 0.
    """
    a = cfg.trace_decay
    gc = compact(g.to(torch.float64), mask)
    U = linear_scan(gc, a, reverse=True)
    if cfg.trace == "recent":
        return uncompact(U, mask).to(g.dtype)
    B, T = gc.shape
    pw = _powers(T, a, gc.dtype, g.device)
    Q = torch.flip(torch.cumsum(torch.flip(gc, [1]), dim=1), [1])
    k = torch.arange(T, device=g.device).expand(B, T)
    n = mask.sum(dim=1, keepdim=True)
    e = torch.minimum(2 * k, n - 1).clamp(min=0)
    # U and Q are zero past n - 1 because gc is zero there; index T reads 0 via _shift_gather.
    dx = U - pw[(e - k + 1).clamp(0, T)] * _shift_gather(U, e + 1) + pw[k] * _shift_gather(Q, (2 * k + 1).clamp(max=T))
    return uncompact(dx, mask).to(g.dtype)


def log_ratio(logp: torch.Tensor, batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    """x = logp - old (B, T), zeros where masked; on-policy x = logp - logp (0, NaN for a
    non-finite logp)."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    old = logp if batch.old_logp is None else torch.where(mask, batch.old_logp.to(logp.dtype), zero)
    return torch.where(mask, logp - old, zero)


def sequence_log_ratio(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's z_i = sum_t m_t x_t / max(1, n_i), broadcast over the row's valid tokens (B, T)."""
    n = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
    zbar = torch.where(mask, x, torch.zeros_like(x)).sum(dim=1, keepdim=True) / n
    return torch.where(mask, zbar.expand_as(x), torch.zeros_like(x))


def ratio_map(x: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The log-ratio z that enters rho = exp(clamp(z)): the ratio-mode trace of x, GSPO's
    sequence mean, or x itself (docs/math.md §2)."""
    if cfg.ratio_trace:
        return trace_forward(x, mask, cfg)
    if cfg.sequence_ratio:
        return sequence_log_ratio(x, mask)
    return x


def ratio_map_backward(g: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """VJP of `ratio_map`: g = dL/dz (B, T) -> dL/dx. The sequence mean's adjoint spreads the
    row's sum of g evenly: dL/dx_k = sum_t g_t / max(1, n_i) at every valid k."""
    if cfg.ratio_trace:
        return trace_backward(g, mask, cfg)
    if cfg.sequence_ratio:
        return sequence_log_ratio(g, mask)  # the mean operator is symmetric (m m^T / n)
    return g


def vespo_weight(x: torch.Tensor, mask: torch.Tensor, A: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """VESPO's detached weight phi (B, T) (TRL 1.16's get_gamma_weights): with the row's
    log w = clamp(sum_t m clamp(x_t, +-20), ln 1e-8, 20), phi = exp(l + k log w - l e^(log w)),
    (k, l) by the sign of the token's advantage (A >= 0: the _pos pair), l >= 1e-4. Zeros where
    masked. A non-finite x gives a non-finite phi (TRL maps it to 0; here it must reach the loss)."""
    xc = torch.clamp(x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_w = torch.where(mask, xc, torch.zeros_like(xc)).sum(dim=1, keepdim=True)
    log_w = torch.clamp(log_w, VESPO_LOG_W_MIN, LOG_RATIO_CLAMP)
    pos = A >= 0
    k = torch.where(pos, torch.full_like(A, cfg.vespo_k_pos), torch.full_like(A, cfg.vespo_k_neg))
    lam = torch.where(pos, torch.full_like(A, max(cfg.vespo_lambda_pos, VESPO_LAMBDA_MIN)),
                      torch.full_like(A, max(cfg.vespo_lambda_neg, VESPO_LAMBDA_MIN)))
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.where(mask, phi, torch.zeros_like(phi))


def row_coefficients(x: torch.Tensor, consts: "TokenConstants", cfg: LossConfig):
    """(c, phi): the token coefficient c that multiplies the surrogate, with VESPO's phi folded in
    (it depends on the row's log-probs, so it is known only after the vocabulary pass), and phi
    itself for the `phi_mean` metric (None unless surrogate="vespo")."""
    if cfg.surrogate != "vespo":
        return consts.coef, None
    phi = vespo_weight(x, consts.mask, consts.A, cfg)
    return (phi if consts.coef is None else consts.coef * phi), phi


# --------------------------------------------------------------------------------------------
# Elementwise token terms
# --------------------------------------------------------------------------------------------
@dataclass
class TokenTerms:
    """Per-token terms and partials; every field has the shape of the inputs ((B, T) or flat)."""

    loss: torch.Tensor  # l_t (unweighted per-token loss)
    g_z: torch.Tensor  # W * d l / d z (through the ratio; includes c_t)
    g_logp: torch.Tensor  # W * d l / d logp at fixed z (the KL term; CISPO's log-prob factor)
    g_entropy: Optional[torch.Tensor]  # W * d l / d H, or None
    rho: torch.Tensor
    kl: Optional[torch.Tensor]  # the KL as it enters the loss (times rho when kl_ratio_weighted)
    clip_low: torch.Tensor  # bool: the token counts in clip_frac_low (per surrogate, docs/math.md §8)
    clip_high: torch.Tensor
    clip_dual: torch.Tensor  # bool: the dual clip (or TRL's delta) sets s


def token_terms(z, logp, ref, entropy, A, W, coef, cfg: LossConfig) -> TokenTerms:
    """l = -c s(rho(z), logp) + beta kl(logp) [rho] - entropy_coef H, elementwise, with its partials.

    All arguments have one shape ((B, T), or flat (n,) in a vocab chunk): z the (traced)
    log-ratio, logp, ref, entropy, A (clamped advantages), W (loss weights), coef (c_t, or None).
    rho = exp(clamp(z, -20, 20)), drho/dz = rho inside the clamp, else 0. Surrogates:
    - clip: s = min(rho A, clip(rho) A), then max(s, c A) where A < 0 (dual clip; TRL's delta is
      the same rule, LossConfig.dual_floor). ds/drho = A unless the clipped or dual-clipped
      branch is the active one, where it is 0; at a tie the unclipped slope (autograd of
      torch.minimum splits it).
    - cispo: s = w A logp with w = min(rho, eps_high) a constant: ds/dz = 0, ds/dlogp = w A.
      cispo_two_sided (verl's): w = clip(rho, 1 - eps_low, 1 + eps_high); its clip fractions
      count rho outside either bound, whatever the sign of A (verl's pg_clipfrac).
    - sapo: s = sigmoid(tau (rho - 1)) 4 / tau A: ds/drho = 4 sig (1 - sig) A.
    - vespo: s = A logp: ds/dz = 0, ds/dlogp = A; its weight phi arrives in coef
      (`row_coefficients`).
    The KL term times rho (kl_ratio_weighted) adds beta kl drho/dz to the z-slope.
    """
    zc = torch.clamp(z, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    rho = torch.exp(zc)
    drho = torch.where(z.abs() <= LOG_RATIO_CLAMP, rho, torch.zeros_like(rho))
    zero = torch.zeros_like(A)
    no = torch.zeros_like(A, dtype=torch.bool)
    ds_dlogp = None
    if cfg.surrogate == "clip":
        lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
        s = torch.minimum(rho * A, torch.clamp(rho, lo, hi) * A)
        clip_low, clip_high = (A < 0) & (rho < lo), (A > 0) & (rho > hi)
        slope = torch.where(clip_low | clip_high, zero, A)
        dual = no
        if cfg.dual_floor is not None:  # the dual clip, and TRL's delta (LossConfig.dual_floor)
            floor = cfg.dual_floor * A
            dual = (A < 0) & (s < floor)
            s = torch.where(dual, floor, s)
            slope = torch.where(dual, zero, slope)
        ds_dz = slope * drho
    elif cfg.surrogate == "cispo":
        w = torch.clamp(rho, max=cfg.eps_high)
        s, ds_dz, ds_dlogp = w * A * logp, zero, w * A
        clip_low, clip_high = no, (A > 0) & (rho > cfg.eps_high)
    elif cfg.surrogate == "cispo_two_sided":
        lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
        w = torch.clamp(rho, lo, hi)
        s, ds_dz, ds_dlogp = w * A * logp, zero, w * A
        clip_low, clip_high = rho < lo, rho > hi
    elif cfg.surrogate == "vespo":
        s, ds_dz, ds_dlogp = A * logp, zero, A
        clip_low = clip_high = no
    else:  # sapo
        tau = torch.where(A > 0, torch.full_like(A, cfg.sapo_tau_pos), torch.full_like(A, cfg.sapo_tau_neg))
        sig = torch.sigmoid(tau * (rho - 1))
        s = sig * (4 / tau) * A
        ds_dz = 4 * sig * (1 - sig) * A * drho
        clip_low = clip_high = no
    if coef is not None:
        s, ds_dz = coef * s, coef * ds_dz
        ds_dlogp = None if ds_dlogp is None else coef * ds_dlogp
    loss = -s
    g_z = -W * ds_dz
    g_logp = torch.zeros_like(g_z) if ds_dlogp is None else -W * ds_dlogp
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
            if cfg.kl_ratio_weighted:  # beta rho kl: d/dlogp = beta rho dkl, d/dz = beta kl drho
                g_z = g_z + W * (cfg.beta * kl * drho)
                g_logp = g_logp + W * (cfg.beta * rho * dkl)
            else:
                g_logp = g_logp + W * (cfg.beta * dkl)
        if cfg.kl_ratio_weighted:
            kl = rho * kl
        if cfg.beta != 0:
            loss = loss + cfg.beta * kl
    g_ent = None
    if entropy is not None and cfg.entropy_coef != 0:
        loss = loss - cfg.entropy_coef * entropy
        g_ent = W * (-cfg.entropy_coef)
    return TokenTerms(loss, g_z, g_logp, g_ent, rho, kl, clip_low, clip_high,
                      dual if cfg.surrogate == "clip" else no)


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
    per_token: Optional[Dict[str, torch.Tensor]] = None  # PER_TOKEN_KEYS -> (B, T), when asked
    # the metrics other than seq_weight as one (K,) tensor in metric_names order, when the engine
    # made them so (the Triton engine's finish kernels); `metrics` then holds views of it, or only
    # seq_weight (the fused schedule's finish_fused: the ops read the vector, never the names)
    metric_vector: Optional[torch.Tensor] = None
    # the engine made loss and dlam NaN under batch.poison already (the Triton finish kernel)
    poisoned: bool = False


# l_t, rho_t, kl_t, H_t and the clip flags of docs/math.md §8 (0/1: the token counts in clip_frac_low,
# clip_frac_high; the dual clip or TRL's delta sets its surrogate); zeros where masked or absent
PER_TOKEN_KEYS = ("loss", "ratio", "kl", "entropy", "clip_low", "clip_high", "clip_dual")
CLIP_CODES = {"clip_low": 1, "clip_high": 2, "clip_dual": 4}  # how the Triton row kernel packs the flags


def row_pass(logp: torch.Tensor, entropy: Optional[torch.Tensor], batch: Batch, cfg: LossConfig,
             consts: Optional[TokenConstants] = None, per_token: bool = False) -> RowPass:
    """Loss, metrics and closed-form partials from per-token logp (B, T) (and H (B, T)).

    Non-finite log-probs of a valid token give a non-finite loss: on-policy x = logp - logp is
    NaN for a NaN or infinite logp, and the +-20 clamp passes NaN through."""
    dtype = logp.dtype
    k = token_constants(batch, cfg, dtype) if consts is None else consts
    mask = k.mask
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    logp = torch.where(mask, logp, zero)
    x = log_ratio(logp, batch, mask)
    z = ratio_map(x, mask, cfg)
    coef, phi = row_coefficients(x, k, cfg)
    ref = None if batch.ref_logp is None else torch.where(mask, batch.ref_logp.to(dtype), zero)
    terms = token_terms(z, logp, ref, entropy, k.A, k.W, coef, cfg)
    token_loss = torch.where(mask, terms.loss, zero)
    loss = (k.W * token_loss).sum()
    g_x = ratio_map_backward(terms.g_z, mask, cfg)
    dlogp = torch.where(mask, g_x + terms.g_logp, zero)
    dent = None if terms.g_entropy is None else torch.where(mask, terms.g_entropy, zero)
    dlam = None
    if k.dseq_weight is not None:
        dlam = (token_loss.sum(dim=1) * k.dseq_weight).sum()

    cnt = torch.clamp(k.count, min=1)

    def masked(v):
        return torch.where(mask, v.to(dtype), zero)

    def mean(v):
        return masked(v).sum() / cnt

    rho = terms.rho
    low, high = mean(terms.clip_low), mean(terms.clip_high)
    metrics = {"clip_frac_low": low, "clip_frac_high": high, "clip_frac": low + high, "ratio_mean": mean(rho)}
    if terms.kl is not None:
        metrics["kl_mean"] = mean(terms.kl)
    if entropy is not None:
        metrics["entropy_mean"] = mean(entropy)
    if cfg.surrogate == "vespo":
        metrics["phi_mean"] = mean(phi)
    if cfg.uses_lambda:
        metrics["lambda"] = batch.lam.detach().to(device=logp.device, dtype=dtype)
    metrics["seq_weight"] = k.seq_weight
    tokens = None
    if per_token:
        tokens = {"loss": token_loss, "ratio": masked(rho),
                  "kl": masked(terms.kl) if terms.kl is not None else torch.zeros_like(token_loss),
                  "entropy": masked(entropy) if entropy is not None else torch.zeros_like(token_loss),
                  "clip_low": masked(terms.clip_low), "clip_high": masked(terms.clip_high),
                  "clip_dual": masked(terms.clip_dual)}
    return RowPass(loss, dlogp, dent, dlam, metrics, tokens)
