"""The row pass over the small (B, T) tensors (docs/math.md §2-§8): `row_kernel`, one program per row.

It computes the ratio-mode trace scans, ratio, clipping, KL, per-token loss, per-row sums and
metric sums, and the per-token coefficients dL/dlogp and dL/dH, from the per-token log-probs
(and entropies) of the vocab pass and the per-token constants of `lambda_grpo._rowmath.
token_constants` (clamped advantages A, the aggregation weight w_i of the row, weight-mode trace
coefficients c_t): the aggregation table and the lambda-GRPO weights are not here, they exist
once, in torch. The torch engine computes the same thing with `_rowmath.row_pass`; both are
tested against the float64 reference and against each other (tests/test_triton_rows.py).

A ratio-mode trace is computed on the row's valid tokens compacted by ordinal (holes skipped by
construction) in a scratch buffer; the phases that read values other threads wrote are separated
by `tl.debug_barrier()` (a CTA barrier, which orders global memory within the program) and read
with volatile loads. Phases: A compact x, B forward scans (R, P), C "both" z, D token terms and
sums, E reverse scans (U, Q), F "both" adjoint.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._config import KL_CODES, SURROGATE_CODES, code, finish_launch, finish_tokens_launch, row_launch
from ._launch import check_vec, token_strides, zeros1
from ._tokenmath import clip_code, kl_terms, surrogate, token_loss

# Per-row sums written by the kernel, (B, NPARTS) fp32, by name.
PARTS = ("wS", "S", "clip_low", "clip_high", "ratio", "kl", "entropy")  # wS = w_i S_i, S = sum_t l_t
PART = {name: i for i, name in enumerate(PARTS)}
NPARTS = len(PARTS)
# the same offsets as constexprs, for the kernel (Triton reads only constexpr globals)
P_WS, P_S, P_LO, P_HI, P_RHO, P_KL, P_H = (tl.constexpr(i) for i in range(NPARTS))
K_NPARTS = tl.constexpr(NPARTS)


@triton.jit
def _lin(a1, v1, a2, v2):
    """Composition of y -> a y + v steps: the linear-recurrence scan operator."""
    return a1 * a2, v1 * a2 + v2


# --------------------------------------------------------------------------------------------
# Phases of the ratio-mode trace (docs/math.md §3), over the valid-token ordinals k < n of one row.
# Scratch planes are float64 rows indexed by ordinal; `pos` maps an ordinal back to its column.
# --------------------------------------------------------------------------------------------
@triton.jit
def _compact_log_ratio(logp_row, old_row, mask_row, T, x_out, pos_out, use_old, BLOCK_T: tl.constexpr):
    """Phase A: x_k = logp - old of the valid tokens, compacted by ordinal into x_out (float64),
    their columns into pos_out. On-policy (no old) x = lp - lp: 0, or NaN for a non-finite lp."""
    ar = tl.arange(0, BLOCK_T)
    carry = tl.zeros([], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + ar
        mk = tl.load(mask_row + cols, mask=cols < T, other=0) != 0
        lp = tl.load(logp_row + cols, mask=mk, other=0.0)
        old = tl.where(use_old, tl.load(old_row + cols, mask=mk & use_old, other=0.0), lp)
        x = tl.where(mk, lp - old, 0.0)
        o = tl.cumsum(mk.to(tl.int32), 0) + carry - 1
        tl.store(x_out + o, x.to(tl.float64), mask=mk)
        tl.store(pos_out + o, cols, mask=mk)
        carry += tl.sum(mk.to(tl.int32), 0)


@triton.jit
def _trace_forward(s_x, s_r, s_p, n, a, ln_a, BLOCK_T: tl.constexpr, TRACE: tl.constexpr):
    """Phases B and C: the traced log-ratio z of every ordinal. B: R_k = x_k + a R_{k-1} (a linear
    scan) into s_r, and for "both" P_k = P_{k-1} + a^k x_k into s_p. C ("both"):
    z_k = P_{m-1} + R_k - a^(k-m+1) R_{m-1}, m = ceil(k/2), into s_x. z is then s_r ("recent") or
    s_x ("both")."""
    ar = tl.arange(0, BLOCK_T)
    Rc = tl.zeros([], tl.float64)
    Pc = tl.zeros([], tl.float64)
    for k0 in range(0, n, BLOCK_T):
        k = k0 + ar
        km = k < n
        x = tl.load(s_x + k, mask=km, other=0.0, volatile=True)
        xin = tl.where(k == k0, x + a * Rc, x)
        _, R = tl.associative_scan((tl.full([BLOCK_T], 1.0, tl.float64) * a, xin), 0, _lin)
        tl.store(s_r + k, R, mask=km)
        Rc = tl.sum(tl.where(k == k0 + BLOCK_T - 1, R, 0.0), 0)
        if TRACE == 2:
            P = tl.cumsum(tl.exp(k.to(tl.float64) * ln_a) * x, 0) + Pc
            tl.store(s_p + k, P, mask=km)
            Pc = tl.sum(tl.where(k == k0 + BLOCK_T - 1, P, 0.0), 0)
    tl.debug_barrier()
    if TRACE == 2:
        for k0 in range(0, n, BLOCK_T):
            k = k0 + ar
            km = k < n
            m = (k + 1) // 2
            has = km & (k >= 1)
            Rm = tl.load(s_r + (m - 1), mask=has, other=0.0, volatile=True)
            Pm = tl.load(s_p + (m - 1), mask=has, other=0.0, volatile=True)
            Rk = tl.load(s_r + k, mask=km, other=0.0, volatile=True)
            z = Pm + Rk - tl.exp((k - m + 1).to(tl.float64) * ln_a) * Rm
            tl.store(s_x + k, z, mask=km)
        tl.debug_barrier()


@triton.jit
def _trace_adjoint(s_g, s_u, s_q, pos, coef_row, n, w, a, ln_a, BLOCK_T: tl.constexpr, TRACE: tl.constexpr):
    """Phases E and F: the VJP of the ratio-mode trace z_t = sum_{k<=t} w(t, k) x_k, given
    g_t = dl_t/dz_t (s_g, by ordinal): dL/dx_k = sum_{t>=k} w(t, k) g_t, added (times the row
    weight w) to coef_row at the token's column (dx_k/dlogp_k = 1: old is a constant).
    - recent, w = a^(t-k): the reverse scan U_k = g_k + a U_{k+1} (phase E), dL/dx_k = U_k.
    - both, w = a^min(t-k, k): a^(t-k) for t <= 2k, a^k beyond, so with e = min(2k, n-1)
      dL/dx_k = (U_k - a^(e-k+1) U_{e+1}) + a^k Q_{2k+1}, Q_k = sum_{t>=k} g_t: E writes U and Q
      into s_u and s_q, F combines them."""
    ar = tl.arange(0, BLOCK_T)
    Uc = tl.zeros([], tl.float64)
    Qc = tl.zeros([], tl.float64)
    nchunks = tl.cdiv(n, BLOCK_T)
    for j in range(0, nchunks):
        k0 = (nchunks - 1 - j) * BLOCK_T
        k = k0 + ar
        km = k < n
        g = tl.load(s_g + k, mask=km, other=0.0, volatile=True)
        gin = tl.where(k == k0 + BLOCK_T - 1, g + a * Uc, g)
        _, U = tl.associative_scan((tl.full([BLOCK_T], 1.0, tl.float64) * a, gin), 0, _lin, reverse=True)
        Uc = tl.sum(tl.where(k == k0, U, 0.0), 0)
        if TRACE == 1:
            p = tl.load(pos + k, mask=km, other=0, volatile=True)
            cur = tl.load(coef_row + p, mask=km, other=0.0, volatile=True)
            tl.store(coef_row + p, cur + (w * U).to(tl.float32), mask=km)
        else:
            Q = tl.cumsum(g, 0, reverse=True) + Qc
            Qc = tl.sum(tl.where(k == k0, Q, 0.0), 0)
            tl.store(s_u + k, U, mask=km)
            tl.store(s_q + k, Q, mask=km)
    if TRACE == 2:
        tl.debug_barrier()
        for k0 in range(0, n, BLOCK_T):
            k = k0 + ar
            km = k < n
            e = tl.minimum(2 * k, n - 1)
            U = tl.load(s_u + k, mask=km, other=0.0, volatile=True)
            Ue = tl.load(s_u + (e + 1), mask=km & (e + 1 < n), other=0.0, volatile=True)
            Q2 = tl.load(s_q + (2 * k + 1), mask=km & (2 * k + 1 < n), other=0.0, volatile=True)
            kf = k.to(tl.float64)
            dx = U - tl.exp((e - k + 1).to(tl.float64) * ln_a) * Ue + tl.exp(kf * ln_a) * Q2
            p = tl.load(pos + k, mask=km, other=0, volatile=True)
            cur = tl.load(coef_row + p, mask=km, other=0.0, volatile=True)
            tl.store(coef_row + p, cur + (w * dx).to(tl.float32), mask=km)


@triton.jit(do_not_specialize=["T", "adv_sb", "adv_st", "w_s", "kl_est", "has_old", "has_ref", "has_ent", "has_c",
                               "has_z", "write_coef",
                                "write_tok", "surr", "kl_rw"])
def row_kernel(logp_ptr, ent_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, c_ptr, len_ptr, roww_ptr, z_ptr,
               coef_lp_ptr, coef_h_ptr, gz_ptr, part_ptr, scr_ptr, pos_ptr, tok_ptr,
               T, adv_sb, adv_st, w_s, a: tl.float64, ln_a: tl.float64, eps_low, eps_high, dual_clip, tau_pos, tau_neg,
               beta, ent_coef, kl_est, surr, kl_rw, has_old, has_ref, has_ent, has_c, has_z, write_coef, write_tok,
               BLOCK_T: tl.constexpr, TRACE: tl.constexpr):
    """One row. Inputs (B, T) fp32 unless noted: logp, entropy, old/ref log-probs, A (clamped),
    mask (bool), c (weight-mode coefficients); len (B,) int32 n_i; roww (B,) fp32 w_i (the loss
    weight of each valid token of the row, normaliser included). Outputs: coef_lp = dL/dlogp,
    coef_h = dL/dH (B, T) when write_coef; parts (B, NPARTS) per-row sums; per-token l, rho, kl
    (B, T) when write_tok. A disabled dual clip is +inf; absent inputs are flagged by has_*.
    has_z (no ratio-mode trace): z (B, T) is given (the sequence ratio, computed in torch from
    the row's log-ratios) instead of logp - old; coef_lp then holds only the direct slope and
    gz = w dl/dz (B, T) is written for the caller's VJP of that z."""
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    # scratch: 4 planes of (B, T) float64, indexed by valid-token ordinal within the row. The
    # trace scans run in float64: an fp32 recurrence over thousands of tokens carries an error of
    # about eps |z| / (1 - a), ten times that of plain torch's fp32 matrix form (seen on an H200
    # at T = 8192); the rest of the row math is fp32 (docs/math.md §2).
    plane = tl.num_programs(0).to(tl.int64) * T
    s0 = scr_ptr + base            # x, then z (both)
    s1 = scr_ptr + plane + base    # R (z for recent), then U (both)
    s2 = scr_ptr + 2 * plane + base  # P, then Q (both)
    s3 = scr_ptr + 3 * plane + base  # g = dL/dz
    pos = pos_ptr + base
    # per-token outputs (write_tok): 4 planes of (B, T) in one buffer: l, rho, kl, clip code
    tok_loss_ptr = tok_ptr
    tok_rho_ptr = tok_ptr + plane
    tok_kl_ptr = tok_ptr + 2 * plane
    tok_clip_ptr = tok_ptr + 3 * plane
    n = tl.load(len_ptr + row)
    w = tl.load(roww_ptr + row * w_s)
    ar = tl.arange(0, BLOCK_T)
    # runtime int flags as int1 tensors (the interpreter cannot mask with a Python bool)
    use_old = (tl.zeros([BLOCK_T], tl.int32) + has_old) != 0
    use_ref = (tl.zeros([BLOCK_T], tl.int32) + has_ref) != 0
    use_ent = (tl.zeros([BLOCK_T], tl.int32) + has_ent) != 0
    use_c = (tl.zeros([BLOCK_T], tl.int32) + has_c) != 0
    use_z = (tl.zeros([BLOCK_T], tl.int32) + has_z) != 0
    if TRACE != 0:
        _compact_log_ratio(logp_ptr + base, old_ptr + base, mask_ptr + base, T, s0, pos, use_old, BLOCK_T)
        tl.debug_barrier()
        _trace_forward(s0, s1, s2, n, a, ln_a, BLOCK_T, TRACE)
    # phase D: per-token loss, sums, direct coefficients
    acc_s = tl.zeros([BLOCK_T], tl.float32)
    acc_lo = tl.zeros([BLOCK_T], tl.float32)
    acc_hi = tl.zeros([BLOCK_T], tl.float32)
    acc_rho = tl.zeros([BLOCK_T], tl.float32)
    acc_kl = tl.zeros([BLOCK_T], tl.float32)
    acc_h = tl.zeros([BLOCK_T], tl.float32)
    carry = tl.zeros([], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + ar
        cm = cols < T
        mk = tl.load(mask_ptr + base + cols, mask=cm, other=0) != 0
        lp = tl.load(logp_ptr + base + cols, mask=mk, other=0.0)
        A = tl.load(adv_ptr + row * adv_sb + cols * adv_st, mask=mk, other=0.0)
        if TRACE == 0:
            old = tl.where(use_old, tl.load(old_ptr + base + cols, mask=mk & use_old, other=0.0), lp)
            z = tl.where(mk, tl.where(use_z, tl.load(z_ptr + base + cols, mask=mk & use_z, other=0.0), lp - old), 0.0)
        else:
            o = tl.cumsum(mk.to(tl.int32), 0) + carry - 1
            carry += tl.sum(mk.to(tl.int32), 0)
            if TRACE == 1:
                z = tl.load(s1 + o, mask=mk, other=0.0, volatile=True).to(tl.float32)
            else:
                z = tl.load(s0 + o, mask=mk, other=0.0, volatile=True).to(tl.float32)
        s, ds, dsl, rho, drho, clo, chi, cdu = surrogate(z, lp, A, eps_low, eps_high, dual_clip, surr, tau_pos, tau_neg)
        c = tl.load(c_ptr + base + cols, mask=mk & use_c, other=1.0)
        ref = tl.load(ref_ptr + base + cols, mask=mk & use_ref, other=0.0)
        kl, bkl, bdkl, bkz = kl_terms(lp, ref, kl_est, beta, use_ref, rho, drho, kl_rw)
        H = tl.load(ent_ptr + base + cols, mask=mk & use_ent, other=0.0)
        loss = token_loss(bkl, c, s, ent_coef, H)
        acc_s += tl.where(mk, loss, 0.0)
        acc_lo += tl.where(mk & clo, 1.0, 0.0)
        acc_hi += tl.where(mk & chi, 1.0, 0.0)
        acc_rho += tl.where(mk, rho, 0.0)
        acc_kl += tl.where(mk, kl, 0.0)
        acc_h += tl.where(mk, H, 0.0)
        if write_tok != 0:
            tl.store(tok_loss_ptr + base + cols, tl.where(mk, loss, 0.0), mask=cm)
            tl.store(tok_rho_ptr + base + cols, tl.where(mk, rho, 0.0), mask=cm)
            tl.store(tok_kl_ptr + base + cols, tl.where(mk, kl, 0.0), mask=cm)
            tl.store(tok_clip_ptr + base + cols, tl.where(mk, clip_code(clo, chi, cdu), 0.0), mask=cm)
        if TRACE == 0:
            if write_coef != 0:
                # z = logp - old: the z-slope and the direct slope both land on logp; a given z
                # (has_z): the z-slope goes to gz for the caller's VJP
                gz = w * (bkz - c * ds)
                tl.store(coef_lp_ptr + base + cols, tl.where(mk, w * (bdkl - c * dsl) + tl.where(use_z, 0.0, gz), 0.0),
                         mask=cm)
                tl.store(gz_ptr + base + cols, tl.where(mk, gz, 0.0), mask=cm & use_z)
        else:
            tl.store(coef_lp_ptr + base + cols, tl.where(mk, w * (bdkl - c * dsl), 0.0), mask=cm)
            tl.store(s3 + o, (bkz - c * ds).to(tl.float64), mask=mk)  # g = dl/dz (c: token weights in ratio mode)
        if write_coef != 0:
            tl.store(coef_h_ptr + base + cols, tl.where(mk, -w * ent_coef, 0.0), mask=cm)
    S = tl.sum(acc_s, 0)
    parts = part_ptr + row * K_NPARTS
    tl.store(parts + P_WS, w * S)
    tl.store(parts + P_S, S)
    tl.store(parts + P_LO, tl.sum(acc_lo, 0))
    tl.store(parts + P_HI, tl.sum(acc_hi, 0))
    tl.store(parts + P_RHO, tl.sum(acc_rho, 0))
    tl.store(parts + P_KL, tl.sum(acc_kl, 0))
    tl.store(parts + P_H, tl.sum(acc_h, 0))
    if TRACE != 0:
        tl.debug_barrier()
        _trace_adjoint(s3, s1, s2, pos, coef_lp_ptr + base, n, w, a, ln_a, BLOCK_T, TRACE)


@triton.jit(do_not_specialize=["B", "has_ref", "has_ent", "has_dlam"])
def finish_kernel(part_ptr, len_ptr, dseq_ptr, poison_ptr, loss_ptr, dlam_ptr, met_ptr, B, has_ref, has_ent,
                  has_dlam, BLOCK_B: tl.constexpr):
    """One program: the batch's loss, dL/dlambda and metric means from the per-row parts
    (B, NPARTS) of `row_kernel`, summed over rows in a fixed order in float64 (a launch of its
    own, so that no program of the row kernel waits on another's writes; what it replaces is a
    dozen small torch ops of host work per step).
    loss = sum_i w_i S_i; dlam = sum_i S_i dseq_i (has_dlam: lambda-GRPO's df_i/dlam / max(1, N_tok));
    metrics in lambda_grpo.output.metric_names order: clip_frac_low, clip_frac_high, clip_frac,
    ratio_mean, then kl_mean (has_ref) and entropy_mean (has_ent), each a sum over valid tokens
    divided by max(1, the local count sum_i n_i). poison (a bool: the value rules of the inputs
    failed, lambda_grpo/_validate.py) makes the loss and dlam NaN."""
    ar = tl.arange(0, BLOCK_B)
    a_ws = tl.zeros([BLOCK_B], tl.float64)
    a_lo = tl.zeros([BLOCK_B], tl.float64)
    a_hi = tl.zeros([BLOCK_B], tl.float64)
    a_rho = tl.zeros([BLOCK_B], tl.float64)
    a_kl = tl.zeros([BLOCK_B], tl.float64)
    a_h = tl.zeros([BLOCK_B], tl.float64)
    a_dl = tl.zeros([BLOCK_B], tl.float64)
    a_n = tl.zeros([BLOCK_B], tl.int64)
    use_dl = (tl.zeros([BLOCK_B], tl.int32) + has_dlam) != 0
    for b0 in range(0, B, BLOCK_B):
        r = b0 + ar
        rm = r < B
        p = part_ptr + r.to(tl.int64) * K_NPARTS
        a_ws += tl.load(p + P_WS, mask=rm, other=0.0).to(tl.float64)
        a_lo += tl.load(p + P_LO, mask=rm, other=0.0).to(tl.float64)
        a_hi += tl.load(p + P_HI, mask=rm, other=0.0).to(tl.float64)
        a_rho += tl.load(p + P_RHO, mask=rm, other=0.0).to(tl.float64)
        a_kl += tl.load(p + P_KL, mask=rm, other=0.0).to(tl.float64)
        a_h += tl.load(p + P_H, mask=rm, other=0.0).to(tl.float64)
        a_n += tl.load(len_ptr + r, mask=rm, other=0).to(tl.int64)
        S = tl.load(p + P_S, mask=rm & use_dl, other=0.0).to(tl.float64)
        a_dl += S * tl.load(dseq_ptr + r, mask=rm & use_dl, other=0.0).to(tl.float64)
    _finish_store(a_ws, a_lo, a_hi, a_rho, a_kl, a_h, a_dl, a_n, poison_ptr, loss_ptr, dlam_ptr, met_ptr, has_ref,
                  has_ent)


@triton.jit
def _finish_store(a_ws, a_lo, a_hi, a_rho, a_kl, a_h, a_dl, a_n, poison_ptr, loss_ptr, dlam_ptr, met_ptr, has_ref,
                  has_ent):
    """The stores of the finish kernels, from their float64 accumulators (int64 a_n: valid tokens)."""
    count = tl.maximum(tl.sum(a_n, 0), 1).to(tl.float64)
    lo = tl.sum(a_lo, 0) / count
    hi = tl.sum(a_hi, 0) / count
    bad = tl.load(poison_ptr) != 0
    tl.store(loss_ptr, tl.where(bad, float("nan"), tl.sum(a_ws, 0).to(tl.float32)))
    tl.store(dlam_ptr, tl.where(bad, float("nan"), tl.sum(a_dl, 0).to(tl.float32)))
    tl.store(met_ptr + 0, lo.to(tl.float32))
    tl.store(met_ptr + 1, hi.to(tl.float32))
    tl.store(met_ptr + 2, (lo + hi).to(tl.float32))
    tl.store(met_ptr + 3, (tl.sum(a_rho, 0) / count).to(tl.float32))
    if has_ref != 0:
        tl.store(met_ptr + 4, (tl.sum(a_kl, 0) / count).to(tl.float32))
    if has_ent != 0:
        tl.store(met_ptr + 4 + has_ref, (tl.sum(a_h, 0) / count).to(tl.float32))


@triton.jit(do_not_specialize=["N", "T", "w_sb", "w_st", "d_sb", "d_st", "has_ref", "has_ent", "has_dlam"])
def finish_tokens_kernel(term_ptr, ent_ptr, mask_ptr, w_ptr, dseq_ptr, poison_ptr, loss_ptr, dlam_ptr, met_ptr,
                         N, T, w_sb, w_st, d_sb, d_st, has_ref, has_ent, has_dlam, BLOCK_N: tl.constexpr):
    """`finish_kernel` from the tokens' own terms instead of per-row parts: the fused schedule's
    vocabulary kernel wrote l_t, rho_t, kl_t and the clip code of every token (planes of N in
    term_ptr; vocab_fused.py), so no row pass is needed. Token i = r T + t has the row weight
    w[r * w_sb + t * w_st] and dseq[r * d_sb + t * d_st] (the strides of a (B,) per-row tensor are
    (1, 0); of a per-token (N,) one, (T, 1)). One program, tokens summed in a fixed order in
    float64: loss = sum_t w_t l_t = sum_i w_i S_i, dlam = sum_t dseq_t l_t = sum_i S_i dseq_i; the
    metrics and the poison as in `finish_kernel`."""
    ar = tl.arange(0, BLOCK_N)
    a_ws = tl.zeros([BLOCK_N], tl.float64)
    a_lo = tl.zeros([BLOCK_N], tl.float64)
    a_hi = tl.zeros([BLOCK_N], tl.float64)
    a_rho = tl.zeros([BLOCK_N], tl.float64)
    a_kl = tl.zeros([BLOCK_N], tl.float64)
    a_h = tl.zeros([BLOCK_N], tl.float64)
    a_dl = tl.zeros([BLOCK_N], tl.float64)
    a_n = tl.zeros([BLOCK_N], tl.int64)
    use_ent = (tl.zeros([BLOCK_N], tl.int32) + has_ent) != 0
    use_dl = (tl.zeros([BLOCK_N], tl.int32) + has_dlam) != 0
    for i0 in range(0, N, BLOCK_N):
        i = i0 + ar.to(tl.int64)
        mk = tl.load(mask_ptr + i, mask=i < N, other=0) != 0
        r = i // T
        t = i % T
        lt = tl.load(term_ptr + i, mask=mk, other=0.0).to(tl.float64)
        code = tl.load(term_ptr + 3 * N + i, mask=mk, other=0.0).to(tl.int32)
        a_ws += lt * tl.load(w_ptr + r * w_sb + t * w_st, mask=mk, other=0.0).to(tl.float64)
        a_dl += lt * tl.load(dseq_ptr + r * d_sb + t * d_st, mask=mk & use_dl, other=0.0).to(tl.float64)
        a_lo += tl.where((code & 1) != 0, 1.0, 0.0)
        a_hi += tl.where((code & 2) != 0, 1.0, 0.0)
        a_rho += tl.load(term_ptr + N + i, mask=mk, other=0.0).to(tl.float64)
        a_kl += tl.load(term_ptr + 2 * N + i, mask=mk, other=0.0).to(tl.float64)
        a_h += tl.load(ent_ptr + i, mask=mk & use_ent, other=0.0).to(tl.float64)
        a_n += mk.to(tl.int64)
    _finish_store(a_ws, a_lo, a_hi, a_rho, a_kl, a_h, a_dl, a_n, poison_ptr, loss_ptr, dlam_ptr, met_ptr, has_ref,
                  has_ent)


def launch_rows(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, lengths: torch.Tensor,
                row_weight: torch.Tensor, *, entropy: Optional[torch.Tensor], old_logp: Optional[torch.Tensor],
                ref_logp: Optional[torch.Tensor], trace_coef: Optional[torch.Tensor], z: Optional[torch.Tensor],
                ratio_trace: Optional[str],
                trace_decay: float, eps_low: float, eps_high: float, dual_clip: Optional[float],
                surrogate: str, sapo_tau_pos: float, sapo_tau_neg: float, beta: float,
                kl_estimator: str, kl_ratio_weighted: bool, entropy_coef: float, write_coef: bool,
                write_tokens: bool, coef_buffers: bool = True):
    """Launch `row_kernel` over (B, T) fp32 tensors: contiguous (any shape of B T elements), but
    advantages ((B, T) with any strides, e.g. a broadcast view; only valid tokens are read) and
    row_weight ((B,) any stride); mask bool, lengths int32 (B,). Every hyper-parameter is
    required: the defaults live in LossConfig.

    Returns (coef_lp (B, T), coef_h (B, T), parts (B, NPARTS), tokens (3, B, T) [l, rho, kl]
    or None, gz (B, T) or None, clip (B, T) or None: the clip flags per token, coded 1 low + 2 high
    + 4 dual, when write_tokens). ratio_trace: None, "recent" or "both" (trace_mode="ratio");
    weight mode passes trace_coef instead. z: the log-ratio of each token when it is not
    logp - old (the sequence ratio; not with ratio_trace): coef_lp is then the direct slope
    only and gz = dL/dz is returned (when write_coef). coef_buffers=False with write_coef=False
    and no ratio_trace: coef_lp and coef_h are neither allocated nor returned (None; the fused
    schedule, whose vocabulary pass wrote the gradient already).
    """
    B, T = mask.shape
    dev = mask.device
    adv_sb, adv_st = token_strides(advantages, "advantages", B, T, torch.float32, dev)
    if row_weight.shape != (B,) or row_weight.dtype != torch.float32 or row_weight.device != dev:
        raise ValueError(f"row_weight: expected ({B},) float32 on {dev}, got {tuple(row_weight.shape)} "
                         f"{row_weight.dtype} on {row_weight.device}")
    w_s = row_weight.stride(0)
    if coef_buffers or write_coef or ratio_trace:
        coef_lp = torch.zeros(B, T, device=dev, dtype=torch.float32)
        coef_h = torch.zeros(B, T, device=dev, dtype=torch.float32)
    else:  # the kernel writes neither (write_coef = 0, TRACE = 0): one stand-in pointer
        coef_lp = coef_h = None
    if z is not None and ratio_trace:
        raise ValueError(f"z: expected None with ratio_trace={ratio_trace!r} (the trace defines the ratio)")
    gz = torch.zeros(B, T, device=dev, dtype=torch.float32) if z is not None and write_coef else None
    parts = torch.zeros(B, NPARTS, device=dev, dtype=torch.float32)
    toks = torch.zeros(4, B, T, device=dev, dtype=torch.float32) if write_tokens else None
    stand_in = parts  # for pointers the kernel does not touch
    if ratio_trace:
        scratch = torch.empty((4, B, T), device=dev, dtype=torch.float64)
        pos = torch.empty((B, T), device=dev, dtype=torch.int32)
    else:
        scratch, pos = zeros1(torch.float64, dev), zeros1(torch.int32, dev)
    if B > 0 and T > 0:
        cfg = row_launch(ratio_trace)
        row_kernel[(B,)](logp, logp if entropy is None else entropy, logp if old_logp is None else old_logp,
                         logp if ref_logp is None else ref_logp, advantages, mask,
                         logp if trace_coef is None else trace_coef, lengths, row_weight, logp if z is None else z,
                         stand_in if coef_lp is None else coef_lp, stand_in if coef_h is None else coef_h,
                         stand_in if gz is None else gz, parts, scratch, pos, stand_in if toks is None else toks,
                         T, adv_sb, adv_st, w_s, float(trace_decay), math.log(float(trace_decay)), float(eps_low),
                         float(eps_high),
                         float("inf") if dual_clip is None else float(dual_clip),
                         float(sapo_tau_pos), float(sapo_tau_neg),
                         float(beta), float(entropy_coef), code(KL_CODES, "kl_estimator", kl_estimator),
                         code(SURROGATE_CODES, "surrogate", surrogate),
                         int(kl_ratio_weighted),
                         int(old_logp is not None), int(ref_logp is not None), int(entropy is not None),
                         int(trace_coef is not None), int(z is not None), int(write_coef), int(write_tokens),
                         **cfg.kwargs())
    if toks is None:
        return coef_lp, coef_h, parts, None, gz, None
    return coef_lp, coef_h, parts, toks[:3], gz, toks[3]


def launch_finish(parts: torch.Tensor, lengths: torch.Tensor, dseq: Optional[torch.Tensor], has_ref: bool,
                  has_ent: bool, n_metrics: int, poison: Optional[torch.Tensor] = None):
    """Launch `finish_kernel` on the row kernel's parts (B, NPARTS) fp32 and lengths (B,) int32;
    dseq (B,) fp32 or None; poison a one-element bool on the device or None. Returns (loss 0-d,
    dlam 0-d (0 without dseq), metrics (n_metrics,)) fp32, loss and dlam NaN where poison is set;
    the kernel writes the first 4 + has_ref + has_ent metrics, the caller any after them."""
    dev = parts.device
    B = parts.shape[0]
    if dseq is not None and (dseq.shape != (B,) or dseq.dtype != torch.float32 or dseq.device != dev):
        raise ValueError(f"dseq: expected ({B},) float32 on {dev}, got {tuple(dseq.shape)} {dseq.dtype} on "
                         f"{dseq.device}")
    loss = torch.empty((), device=dev, dtype=torch.float32)
    dlam = torch.empty((), device=dev, dtype=torch.float32)
    metrics = torch.empty(n_metrics, device=dev, dtype=torch.float32)
    if poison is None:
        poison = zeros1(torch.bool, dev)  # False
    elif poison.numel() != 1 or poison.dtype != torch.bool or poison.device != dev:
        raise ValueError(f"poison: expected one bool on {dev}, got {tuple(poison.shape)} {poison.dtype} on "
                         f"{poison.device}")
    finish_kernel[(1,)](parts, lengths, parts if dseq is None else dseq, poison, loss, dlam, metrics, B,
                        int(has_ref), int(has_ent), int(dseq is not None), **finish_launch().kwargs())
    return loss, dlam, metrics


def launch_finish_tokens(terms: torch.Tensor, entropy: Optional[torch.Tensor], mask: torch.Tensor, weight: torch.Tensor,
                         dseq: Optional[torch.Tensor], has_ref: bool, n_metrics: int, T: int,
                         poison: Optional[torch.Tensor] = None):
    """Launch `finish_tokens_kernel` on the terms (4 N fp32: l, rho, kl, clip code) a fused
    vocabulary kernel wrote. mask: N bool (contiguous, any shape); entropy: N fp32 or None;
    weight and dseq: (B,) per row or N per token (see `_launch.token_strides`), B = N / T;
    poison as in `launch_finish`. Returns (loss, dlam, metrics) as `launch_finish` does."""
    dev = mask.device
    N = mask.numel()
    check_vec(terms, "terms", 4 * N, torch.float32, dev)
    if entropy is not None:
        check_vec(entropy, "entropy", N, torch.float32, dev)
    B = N // T if T else 0
    w_sb, w_st = token_strides(weight, "weight", B, T, torch.float32, dev, per_row=True) if N else (0, 0)
    d_sb, d_st = (0, 0) if dseq is None or not N else token_strides(dseq, "dseq", B, T, torch.float32, dev,
                                                                     per_row=True)
    if poison is None:
        poison = zeros1(torch.bool, dev)  # False
    loss = torch.empty((), device=dev, dtype=torch.float32)
    dlam = torch.empty((), device=dev, dtype=torch.float32)
    metrics = torch.empty(n_metrics, device=dev, dtype=torch.float32)
    finish_tokens_kernel[(1,)](terms, terms if entropy is None else entropy, mask, weight,
                               terms if dseq is None else dseq, poison, loss, dlam, metrics, N, max(T, 1), w_sb, w_st,
                               d_sb, d_st, int(has_ref), int(entropy is not None), int(dseq is not None),
                               **finish_tokens_launch().kwargs())
    return loss, dlam, metrics
