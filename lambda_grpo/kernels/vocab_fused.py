"""Fused forward + backward vocab pass (no ratio-mode trace): one kernel per token writes
logp, entropy and dlogits.

Applies when z_t = x_t (no trace, or trace_mode="weight"): then dL/dlogp_t depends only on
the token's own logp, its old/ref log-probs, its advantage, its loss weight W_{i,t} and the
weight-mode trace coefficient c_t, all of which are known before the vocabulary pass (they
depend on the mask, lambda and the normalisers only: `lambda_grpo._rowmath.token_constants`). A ratio-mode trace
couples every token of a row to the ones before it, so there the coefficient needs the
whole row's logp first and the two-kernel path runs instead.

VJP written here, per valid token (x = logits / tau, p = softmax(x), W = W_{i,t}):
    l = -c s(logp - old) + beta kl(ref - logp) - ent_coef H
    g  = dL/dlogp = W (-c ds/dz + beta dkl/dlogp)
    gh = dL/dH    = -W ent_coef
    dL/dlogits_j = (g (1[j = tok] - p_j) - gh p_j (log p_j + H)) / tau
The kernel walks the row twice (online lse/entropy, then the gradient tiles) but as one
program right after itself, so the second walk of a row (<= 300 KB at V = 151 936 in bf16)
is served from L2 rather than HBM; dlogits is written once. The gradient is written for an
upstream gradient of 1; the backward rescales it if that is not 1 (`scale_rows` in place when
the caller asked for an in-place backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import KL_CODES, SURROGATE_CODES, code, vocab_launch
from ._launch import check_out, check_rows, check_vec, row_layout, token_strides, zeros1
from ._tokenmath import clip_code, kl_terms, surrogate, token_loss
from ._vocab import flag_bad_token, load_token, lse_entropy, write_grad, write_zero


@triton.jit(do_not_specialize=["T", "adv_sb", "adv_st", "w_sb", "w_st",
                               "kl_est", "surr", "kl_rw", "has_old", "has_ref", "has_c", "write_tok", "check_ids"])
def vocab_fused_kernel(logits_ptr, dlogits_ptr, tokens_ptr, mask_ptr, old_ptr, ref_ptr, adv_ptr, c_ptr,
                       w_ptr, logp_ptr, ent_ptr, tok_ptr, flag_ptr,
                       T, stride_batch, stride_in, stride_out, adv_sb, adv_st, w_sb, w_st, V, inv_temp,
                       eps_low, eps_high, dual_clip, tau_pos, tau_neg, beta, ent_coef,
                       kl_est, surr, kl_rw, has_old, has_ref, has_c, write_tok, check_ids,
                       BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    plane = tl.num_programs(0).to(tl.int64)  # N: the per-token planes of tok_ptr (write_tok)
    row_out = dlogits_ptr + pid * stride_out
    valid = tl.load(mask_ptr + pid) != 0
    if valid:
        r = pid // T  # token pid = r T + t (A and W are read with their own strides)
        t = pid % T
        row_in = logits_ptr + r * stride_batch + t * stride_in
        tok = load_token(tokens_ptr, pid, V)
        m, log_s, ent = lse_entropy(row_in, V, inv_temp, BLOCK_V, WITH_ENTROPY)
        flag_bad_token(tokens_ptr, pid, V, flag_ptr, check_ids)  # after the walk: nothing more live across it
        logp = (tl.load(row_in + tok).to(tl.float32) * inv_temp - m) - log_s
        tl.store(logp_ptr + pid, logp)
        if WITH_ENTROPY:
            tl.store(ent_ptr + pid, ent)
        # runtime int flags as int1 tensors (the interpreter cannot mask with a Python bool)
        use_old = (tl.zeros([], tl.int32) + has_old) != 0
        use_ref = (tl.zeros([], tl.int32) + has_ref) != 0
        use_c = (tl.zeros([], tl.int32) + has_c) != 0
        # per-token coefficient (same math as the row kernel's no-trace branch)
        old = tl.where(use_old, tl.load(old_ptr + pid, mask=use_old, other=0.0), logp)
        x = logp - old  # on-policy logp - logp: 0, or NaN for a non-finite logp
        A = tl.load(adv_ptr + r * adv_sb + t * adv_st)
        s, ds, dsl, rho, drho, clo, chi, cdu = surrogate(x, logp, A, eps_low, eps_high, dual_clip, surr, tau_pos,
                                                         tau_neg)
        c = tl.load(c_ptr + pid, mask=use_c, other=1.0)
        ref = tl.load(ref_ptr + pid, mask=use_ref, other=0.0)
        kl, bkl, bdkl, bkz = kl_terms(logp, ref, kl_est, beta, use_ref, rho, drho, kl_rw)
        w = tl.load(w_ptr + r * w_sb + t * w_st)
        g = w * (bdkl - c * dsl + bkz - c * ds)  # z = logp - old: both slopes land on logp
        gh = -w * ent_coef
        # the token's terms, for the sums of the loss and the metrics (finish_tokens_kernel), stored
        # before the gradient walk: none of them stays live across its loop (no spills, ptxas -v)
        if write_tok != 0:
            tl.store(tok_ptr + pid, token_loss(bkl, c, s, ent_coef, ent))
            tl.store(tok_ptr + plane + pid, rho)
            tl.store(tok_ptr + 2 * plane + pid, kl)
            tl.store(tok_ptr + 3 * plane + pid, clip_code(clo, chi, cdu))
        write_grad(row_in, row_out, V, inv_temp, m, log_s, tok, g, gh, ent, BLOCK_V, WITH_ENTROPY)
    else:
        write_zero(row_out, V, BLOCK_V)
        if write_tok != 0:
            for k in tl.static_range(4):
                tl.store(tok_ptr + k * plane + pid, 0.0)


def vocab_fused(logits, tokens, mask, advantages, weight, temperature, *, old_logp, ref_logp, trace_coef,
                eps_low, eps_high, dual_clip, surrogate, sapo_tau_pos, sapo_tau_neg, beta, kl_estimator,
                kl_ratio_weighted, entropy_coef, with_entropy, out=None, terms_out=None, id_flag=None):
    """One kernel: logp, entropy and dlogits (for an upstream gradient of 1), and, into `terms_out`
    (4 N contiguous fp32, e.g. (4, B, T)) when given, each token's loss l_t, ratio, KL and clip
    code (zeros where masked), for `rows.launch_finish_tokens`. id_flag: one bool on the device,
    set by the kernel when a counted token id is outside [0, V) (the caller's ids unchecked; the
    kernel reads them clamped either way), or None.

    logits (N, V) or (B, T, V) (N = B T; rows may be strided) fp32/bf16/fp16; tokens (N,) int64;
    mask (N,) bool; tokens, mask, old_logp, ref_logp, trace_coef: N contiguous elements ((N,) or
    (B, T)); advantages (clamped; only valid tokens are read): (B, T) any strides or N contiguous;
    weight (W_{i,t}: the aggregation weight with the normaliser): the same, or (B,) per row;
    trace_coef = c_t of weight mode (None: absent); all float32 but the tokens and the mask.
    Every hyper-parameter is required (the defaults live in LossConfig).
    Returns (logp (N,) (the shape of mask), entropy like logp or None, dlogits (N, V) = `out` if given).
    """
    check_rows(logits)
    N, V, T, batch_stride, row_stride = row_layout(logits)
    dev = logits.device
    check_vec(tokens, "tokens", N, torch.int64, dev)
    check_vec(mask, "mask", N, torch.bool, dev)
    for name, v in (("old_logp", old_logp), ("ref_logp", ref_logp), ("trace_coef", trace_coef)):
        if v is not None:
            check_vec(v, name, N, torch.float32, dev)
    logp = torch.zeros(mask.shape, device=dev, dtype=torch.float32)  # (N,), or (B, T) as the mask
    ent = torch.zeros_like(logp) if with_entropy else None
    out = check_out(out, logits, N, V)
    if terms_out is not None:
        check_vec(terms_out, "terms_out", 4 * N, torch.float32, dev)
    if id_flag is not None:
        check_vec(id_flag, "id_flag", 1, torch.bool, dev)
    if N > 0:
        B = N // T
        adv_sb, adv_st = token_strides(advantages, "advantages", B, T, torch.float32, dev)
        w_sb, w_st = token_strides(weight, "weight", B, T, torch.float32, dev, per_row=True)
        cfg = vocab_launch(with_entropy)
        vocab_fused_kernel[(N,)](
            logits, out, tokens, mask, logp if old_logp is None else old_logp,
            logp if ref_logp is None else ref_logp, advantages, logp if trace_coef is None else trace_coef,
            weight, logp, logp if ent is None else ent, logp if terms_out is None else terms_out,
            zeros1(torch.bool, dev) if id_flag is None else id_flag,
            T, batch_stride, row_stride, out.stride(-2), adv_sb, adv_st, w_sb, w_st, V, 1.0 / temperature,
            float(eps_low), float(eps_high), float("inf") if dual_clip is None else float(dual_clip),
            float(sapo_tau_pos), float(sapo_tau_neg),
            float(beta), float(entropy_coef), code(KL_CODES, "kl_estimator", kl_estimator),
            code(SURROGATE_CODES, "surrogate", surrogate),
            int(kl_ratio_weighted), int(old_logp is not None), int(ref_logp is not None), int(trace_coef is not None),
            int(terms_out is not None), int(id_flag is not None), **cfg.kwargs())
    return logp, ent, out
