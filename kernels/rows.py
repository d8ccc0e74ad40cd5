"""Row/group passes over the small (B, T) tensors (SPEC §4-§6).

`group_kernel` (one program per group of G rows, mask only): lengths n_i, the λ-GRPO weights
f_i and df_i/dλ in float64 and the row weights w_i of every aggregation; `trace_coef_kernel`
(one program per row, mask only): the weight-mode trace coefficients c_t. Both run before
the vocab pass, which is what lets the fused kernel know its coefficient in the forward.

`row_kernel` (one program per row, T in chunks): the ratio-mode trace scans, ratio, clipping,
KL, per-token loss, per-row sums S_i and metric sums, and the per-token coefficients
dL/dlogp and dL/dH. A ratio-mode trace is computed on the row's valid tokens compacted by
ordinal (holes skipped by construction) in a scratch buffer; the phases that read values
other threads wrote are separated by `tl.debug_barrier()` (a CTA barrier, which orders global
memory within the program) and read with volatile loads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._config import KL_CODES, TRACE_CODES, group_launch, row_launch, trace_coef_launch
from ._launch import as_u8
from ._tokenmath import kl_and_grad, surrogate

AGG_CODES = {"grpo": 0, "bnpo": 1, "dapo": 2, "dr_grpo": 3, "lambda_grpo": 4}
PARTS = 8  # per-row sums: w_i S_i, S_i, clip_low, clip_high, rho, kl, entropy, (unused)


@triton.jit
def _geo(m, ln_a, inv_1ma, a_is_one):
    """sum_{j<m} a^j in float64 (m float64 >= 0); inv_1ma = 1 / (1 - a), unused when a == 1."""
    return tl.where(a_is_one != 0, m, (1.0 - tl.exp(m * ln_a)) * inv_1ma)


@triton.jit(do_not_specialize=["T", "G", "agg"])
def group_kernel(mask_ptr, lam_ptr, len_ptr, f_ptr, df_ptr, roww_ptr,
                 T, G, r: tl.float64, agg,
                 BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    gid = tl.program_id(0).to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    gm = gi < G
    rows = gid * G + gi
    base = rows * T
    n = tl.zeros([BLOCK_G], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        m2 = gm[:, None] & (cols < T)[None, :]
        mk = tl.load(mask_ptr + base[:, None] + cols[None, :], mask=m2, other=0)
        n += tl.sum((mk != 0).to(tl.int32), 1)
    tl.store(len_ptr + rows, n, mask=gm)
    nf = n.to(tl.float64)
    if agg == 4:
        # λ-GRPO weights (SPEC §5), float64: h^λ may be huge for large |λ|.
        lam = tl.load(lam_ptr).to(tl.float64)
        Gf = tl.sum(tl.where(gm, 1.0, 0.0).to(tl.float64), 0)
        mu = tl.sum(tl.where(gm, nf, 0.0), 0) / Gf
        dev = tl.where(gm, nf - mu, 0.0)
        sigma = tl.sqrt(tl.sum(dev * dev, 0) / Gf)
        small = sigma < 1e-6
        z = tl.where(small, 0.0, dev / tl.where(small, 1.0, sigma))
        h = tl.maximum(1.0 + r * z, 1e-6)
        ln_h = tl.log(h)
        hl = tl.exp(lam * ln_h)
        hl = tl.where(gm, hl, float("-inf"))
        e = tl.exp(hl - tl.max(hl, 0))
        p = e / tl.sum(e, 0)
        f = Gf * p
        q = tl.where(gm, hl * ln_h, 0.0)
        df = f * (q - tl.sum(p * q, 0))
        tl.store(f_ptr + rows, f, mask=gm)
        tl.store(df_ptr + rows, df, mask=gm)
        w = f.to(tl.float32)
    elif agg == 0:
        w = 1.0 / tl.maximum(nf, 1.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_G], 1.0, tl.float32)
    tl.store(roww_ptr + rows, w, mask=gm)


@triton.jit(do_not_specialize=["T", "a_is_one", "trace_style"])
def trace_coef_kernel(mask_ptr, len_ptr, c_ptr, T, ln_a: tl.float64, inv_1ma: tl.float64, a_is_one, trace_style,
                      BLOCK_T: tl.constexpr):
    """Weight mode: c_k = sum_{t=k}^{n-1} w(t, k) per valid token, closed form in float64.

    recent: geo(n - k);  both: geo(min(k, n-1-k) + 1) + max(0, n-1-2k) a^k,
    with geo(m) = sum_{j<m} a^j and k the valid-token ordinal. One program per row.
    """
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    nf = tl.load(len_ptr + row).to(tl.float64)
    cnt = tl.zeros([], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        cols = t0 + tl.arange(0, BLOCK_T)
        cm = cols < T
        mk = tl.load(mask_ptr + base + cols, mask=cm, other=0) != 0
        cum = tl.cumsum(mk.to(tl.int32), 0) + cnt
        cnt += tl.sum(mk.to(tl.int32), 0)
        k = (cum - 1).to(tl.float64)
        rest = nf - 1.0 - k
        if trace_style == 1:
            c = _geo(rest + 1.0, ln_a, inv_1ma, a_is_one)
        else:
            c = (_geo(tl.minimum(k, rest) + 1.0, ln_a, inv_1ma, a_is_one)
                 + tl.maximum(rest - k, 0.0) * tl.exp(k * ln_a))
        tl.store(c_ptr + base + cols, tl.where(mk, c, 0.0).to(tl.float32), mask=cm)


@triton.jit
def _lin(a1, v1, a2, v2):
    """Composition of y -> a y + v steps: the linear-recurrence scan operator."""
    return a1 * a2, v1 * a2 + v2


@triton.jit(do_not_specialize=["T", "kl_est", "has_old", "has_ref", "has_ent", "has_c", "write_coef"])
def row_kernel(logp_ptr, ent_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, c_ptr, len_ptr, roww_ptr,
               coef_lp_ptr, coef_h_ptr, part_ptr, scr_ptr, pos_ptr,
               T, a, ln_a, eps_low, eps_high, dual_clip, adv_min, beta, ent_coef,
               kl_est, has_old, has_ref, has_ent, has_c, write_coef,
               BLOCK_T: tl.constexpr, TRACE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    # scratch: 4 planes of (B, T) fp32, indexed by valid-token ordinal within the row
    plane = tl.num_programs(0).to(tl.int64) * T
    s0 = scr_ptr + base            # x, then z (both)
    s1 = scr_ptr + plane + base    # R (z for recent), then U (both)
    s2 = scr_ptr + 2 * plane + base  # P, then Q (both)
    s3 = scr_ptr + 3 * plane + base  # g = dL/dz
    pos = pos_ptr + base
    n = tl.load(len_ptr + row)
    w = tl.load(roww_ptr + row)
    ar = tl.arange(0, BLOCK_T)
    # runtime int flags as int1 tensors (the interpreter cannot mask with a Python bool)
    use_old = (tl.zeros([BLOCK_T], tl.int32) + has_old) != 0
    use_ref = (tl.zeros([BLOCK_T], tl.int32) + has_ref) != 0
    use_ent = (tl.zeros([BLOCK_T], tl.int32) + has_ent) != 0
    use_c = (tl.zeros([BLOCK_T], tl.int32) + has_c) != 0
    if TRACE != 0:
        # phase A: compact x_t = logp_t - old_t of the valid tokens by ordinal
        carry = tl.zeros([], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + ar
            mk = tl.load(mask_ptr + base + cols, mask=cols < T, other=0) != 0
            lp = tl.load(logp_ptr + base + cols, mask=mk, other=0.0)
            old = tl.load(old_ptr + base + cols, mask=mk & use_old, other=0.0)
            x = tl.where(mk & use_old, lp - old, 0.0)
            o = tl.cumsum(mk.to(tl.int32), 0) + carry - 1
            tl.store(s0 + o, x, mask=mk)
            tl.store(pos + o, cols, mask=mk)
            carry += tl.sum(mk.to(tl.int32), 0)
        tl.debug_barrier()
        # phase B: R_k = x_k + a R_{k-1} (linear scan), P_k = P_{k-1} + a^k x_k, over k < n
        Rc = tl.zeros([], tl.float32)
        Pc = tl.zeros([], tl.float32)
        for k0 in range(0, n, BLOCK_T):
            k = k0 + ar
            km = k < n
            x = tl.load(s0 + k, mask=km, other=0.0, volatile=True)
            xin = tl.where(k == k0, x + a * Rc, x)
            _, R = tl.associative_scan((tl.full([BLOCK_T], 1.0, tl.float32) * a, xin), 0, _lin)
            tl.store(s1 + k, R, mask=km)
            Rc = tl.sum(tl.where(k == k0 + BLOCK_T - 1, R, 0.0), 0)
            if TRACE == 2:
                P = tl.cumsum(tl.exp(k.to(tl.float32) * ln_a) * x, 0) + Pc
                tl.store(s2 + k, P, mask=km)
                Pc = tl.sum(tl.where(k == k0 + BLOCK_T - 1, P, 0.0), 0)
        tl.debug_barrier()
        if TRACE == 2:
            # phase C: z_k = P_{m-1} + R_k - a^(k-m+1) R_{m-1}, m = ceil(k/2)
            for k0 in range(0, n, BLOCK_T):
                k = k0 + ar
                km = k < n
                m = (k + 1) // 2
                has = km & (k >= 1)
                Rm = tl.load(s1 + (m - 1), mask=has, other=0.0, volatile=True)
                Pm = tl.load(s2 + (m - 1), mask=has, other=0.0, volatile=True)
                Rk = tl.load(s1 + k, mask=km, other=0.0, volatile=True)
                z = Pm + Rk - tl.exp((k - m + 1).to(tl.float32) * ln_a) * Rm
                tl.store(s0 + k, z, mask=km)
            tl.debug_barrier()
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
        A = tl.maximum(tl.load(adv_ptr + base + cols, mask=mk, other=0.0), adv_min)
        if TRACE == 0:
            old = tl.load(old_ptr + base + cols, mask=mk & use_old, other=0.0)
            z = tl.where(mk & use_old, lp - old, 0.0)
        else:
            o = tl.cumsum(mk.to(tl.int32), 0) + carry - 1
            carry += tl.sum(mk.to(tl.int32), 0)
            if TRACE == 1:
                z = tl.load(s1 + o, mask=mk, other=0.0, volatile=True)
            else:
                z = tl.load(s0 + o, mask=mk, other=0.0, volatile=True)
        s, ds, rho = surrogate(z, A, eps_low, eps_high, dual_clip)
        c = tl.load(c_ptr + base + cols, mask=mk & use_c, other=1.0)
        ref = tl.load(ref_ptr + base + cols, mask=mk & use_ref, other=0.0)
        kl, dkl = kl_and_grad(lp, ref, kl_est)
        kl = tl.where(use_ref, kl, 0.0)
        dkl = tl.where(use_ref, dkl, 0.0)
        H = tl.load(ent_ptr + base + cols, mask=mk & use_ent, other=0.0)
        loss = beta * kl - c * s - ent_coef * H
        acc_s += tl.where(mk, loss, 0.0)
        acc_lo += tl.where(mk & (A < 0) & (rho < 1.0 - eps_low), 1.0, 0.0)
        acc_hi += tl.where(mk & (A > 0) & (rho > 1.0 + eps_high), 1.0, 0.0)
        acc_rho += tl.where(mk, rho, 0.0)
        acc_kl += tl.where(mk, kl, 0.0)
        acc_h += tl.where(mk, H, 0.0)
        if TRACE == 0:
            if write_coef != 0:
                tl.store(coef_lp_ptr + base + cols, tl.where(mk, w * (beta * dkl - c * ds), 0.0), mask=cm)
        else:
            tl.store(coef_lp_ptr + base + cols, tl.where(mk, w * beta * dkl, 0.0), mask=cm)
            tl.store(s3 + o, -ds, mask=mk)
        if write_coef != 0:
            tl.store(coef_h_ptr + base + cols, tl.where(mk, -w * ent_coef, 0.0), mask=cm)
    S = tl.sum(acc_s, 0)
    tl.store(part_ptr + row * 8 + 0, w * S)
    tl.store(part_ptr + row * 8 + 1, S)
    tl.store(part_ptr + row * 8 + 2, tl.sum(acc_lo, 0))
    tl.store(part_ptr + row * 8 + 3, tl.sum(acc_hi, 0))
    tl.store(part_ptr + row * 8 + 4, tl.sum(acc_rho, 0))
    tl.store(part_ptr + row * 8 + 5, tl.sum(acc_kl, 0))
    tl.store(part_ptr + row * 8 + 6, tl.sum(acc_h, 0))
    tl.store(part_ptr + row * 8 + 7, 0.0)
    if TRACE != 0:
        # VJP of the ratio-mode trace z_t = sum_{k<=t} w(t, k) x_k, given g_t = dl_t/dz_t:
        #   dL/dx_k = sum_{t>=k} w(t, k) g_t.
        #   recent, w = a^(t-k): the reverse scan U_k = g_k + a U_{k+1}.
        #   both, w = a^min(t-k, k): a^(t-k) for t <= 2k, a^k beyond, so with e = min(2k, n-1)
        #   dL/dx_k = (U_k - a^(e-k+1) U_{e+1}) + a^k Q_{2k+1}, Q_k = sum_{t>=k} g_t.
        # dx_k/dlogp_k = 1 (old is a constant), so this adds w_i dL/dx_k to the token's
        # coefficient next to its direct KL term.
        tl.debug_barrier()
        # phase E: reverse scans U_k = g_k + a U_{k+1}, Q_k = g_k + Q_{k+1} over k < n
        Uc = tl.zeros([], tl.float32)
        Qc = tl.zeros([], tl.float32)
        nchunks = tl.cdiv(n, BLOCK_T)
        for j in range(0, nchunks):
            k0 = (nchunks - 1 - j) * BLOCK_T
            k = k0 + ar
            km = k < n
            g = tl.load(s3 + k, mask=km, other=0.0, volatile=True)
            gin = tl.where(k == k0 + BLOCK_T - 1, g + a * Uc, g)
            _, U = tl.associative_scan((tl.full([BLOCK_T], 1.0, tl.float32) * a, gin), 0, _lin, reverse=True)
            Uc = tl.sum(tl.where(k == k0, U, 0.0), 0)
            if TRACE == 1:
                # recent: dL/dx_k = U_k, added to the token's direct (KL) coefficient
                p = tl.load(pos + k, mask=km, other=0, volatile=True)
                cur = tl.load(coef_lp_ptr + base + p, mask=km, other=0.0, volatile=True)
                tl.store(coef_lp_ptr + base + p, cur + w * U, mask=km)
            else:
                Q = tl.cumsum(g, 0, reverse=True) + Qc
                Qc = tl.sum(tl.where(k == k0, Q, 0.0), 0)
                tl.store(s1 + k, U, mask=km)
                tl.store(s2 + k, Q, mask=km)
        if TRACE == 2:
            tl.debug_barrier()
            # phase F: dL/dx_k = U_k - a^(e-k+1) U_{e+1} + a^k Q_{2k+1}, e = min(2k, n-1)
            for k0 in range(0, n, BLOCK_T):
                k = k0 + ar
                km = k < n
                e = tl.minimum(2 * k, n - 1)
                U = tl.load(s1 + k, mask=km, other=0.0, volatile=True)
                Ue = tl.load(s1 + (e + 1), mask=km & (e + 1 < n), other=0.0, volatile=True)
                Q2 = tl.load(s2 + (2 * k + 1), mask=km & (2 * k + 1 < n), other=0.0, volatile=True)
                kf = k.to(tl.float32)
                dx = U - tl.exp((e - k + 1).to(tl.float32) * ln_a) * Ue + tl.exp(kf * ln_a) * Q2
                p = tl.load(pos + k, mask=km, other=0, volatile=True)
                cur = tl.load(coef_lp_ptr + base + p, mask=km, other=0.0, volatile=True)
                tl.store(coef_lp_ptr + base + p, cur + w * dx, mask=km)


def group_pass(mask: torch.Tensor, group_size: int, aggregation: str, lam=None, length_r: float = 1.0 / 9.0,
               trace_style=None, trace_decay: float = 0.99):
    """mask (B, T) bool -> lengths (B,) int32, f (B,) fp64, df/dλ (B,) fp64, w (B,) fp32, c (B, T) fp32 or None.

    f/df are only filled for aggregation "lambda_grpo" (ones/zeros otherwise); c only when
    trace_style is given (weight mode). lam: 0-d tensor on the mask's device (read in-kernel).
    """
    B, T = mask.shape
    dev = mask.device
    a = float(trace_decay)
    if B % group_size != 0:
        raise ValueError(f"group_size: expected a divisor of B = {B}, got {group_size}")
    lengths = torch.zeros(B, device=dev, dtype=torch.int32)
    f = torch.ones(B, device=dev, dtype=torch.float64)
    df = torch.zeros(B, device=dev, dtype=torch.float64)
    w = torch.empty(B, device=dev, dtype=torch.float32)
    c = torch.zeros(B, T, device=dev, dtype=torch.float32) if trace_style is not None else None
    if aggregation == "lambda_grpo":
        if lam is None:
            raise ValueError("lam: expected a 0-d tensor for aggregation='lambda_grpo', got None")
        lam_arg = lam.detach().reshape(1).to(device=dev, dtype=torch.float64)
    else:
        lam_arg = f
    if B > 0:
        cfg = group_launch(group_size)
        m8 = as_u8(mask.contiguous())
        group_kernel[(B // group_size,)](m8, lam_arg, lengths, f, df, w, T, group_size, float(length_r),
                                         AGG_CODES[aggregation], **cfg.kwargs())
        if c is not None:
            trace_coef_kernel[(B,)](m8, lengths, c, T, math.log(a), 0.0 if a == 1.0 else 1.0 / (1.0 - a),
                                    int(a == 1.0), TRACE_CODES[trace_style], **trace_coef_launch().kwargs())
    return lengths, f, df, w, c


def row_pass(logp, mask, advantages, lengths, row_weight, *, entropy=None, old_logp=None, ref_logp=None,
             trace_coef=None, ratio_trace=None, trace_decay=0.99, eps_low=0.2, eps_high=0.2, dual_clip=None,
             adv_clamp_min=None, beta=0.0, kl_estimator="k3", entropy_coef=0.0, write_coef=True):
    """Per-token loss math over (B, T) fp32 tensors.

    Returns (coef_logp (B, T) = dL/dlogp / norm, coef_entropy (B, T) = dL/dH / norm,
    parts (B, 8) per-row sums [w_i S_i, S_i, clip_low, clip_high, rho, kl, entropy, 0]).
    `norm` is the aggregation's global normaliser, applied by the caller. ratio_trace: None,
    "recent" or "both" (trace_mode="ratio"); weight mode passes trace_coef instead.
    """
    B, T = mask.shape
    dev = mask.device
    if kl_estimator not in KL_CODES:
        raise ValueError(f"kl_estimator: expected one of {tuple(KL_CODES)}, got {kl_estimator!r}")
    coef_lp = torch.zeros(B, T, device=dev, dtype=torch.float32)
    coef_h = torch.zeros(B, T, device=dev, dtype=torch.float32)
    parts = torch.zeros(B, 8, device=dev, dtype=torch.float32)
    scratch = torch.empty((4, B, T) if ratio_trace else (1,), device=dev, dtype=torch.float32)
    pos = torch.empty((B, T) if ratio_trace else (1,), device=dev, dtype=torch.int32)
    if B > 0 and T > 0:
        cfg = row_launch(ratio_trace)
        row_kernel[(B,)](logp, logp if entropy is None else entropy, logp if old_logp is None else old_logp,
                         logp if ref_logp is None else ref_logp, advantages, as_u8(mask),
                         logp if trace_coef is None else trace_coef, lengths, row_weight,
                         coef_lp, coef_h, parts, scratch, pos,
                         T, float(trace_decay), math.log(float(trace_decay)), float(eps_low), float(eps_high),
                         float("inf") if dual_clip is None else float(dual_clip),
                         float("-inf") if adv_clamp_min is None else float(adv_clamp_min),
                         float(beta), float(entropy_coef), KL_CODES[kl_estimator],
                         int(old_logp is not None), int(ref_logp is not None), int(entropy is not None),
                         int(trace_coef is not None), int(write_coef), **cfg.kwargs())
    return coef_lp, coef_h, parts
