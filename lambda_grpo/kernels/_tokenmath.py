"""Per-token GRPO math shared by the row kernel and the fused vocab kernel (docs/math.md §2).

Everything here is elementwise on fp32 values; `kl_est` (1, 2, 3 for k1, k2, k3) and the
hyper-parameters are runtime scalars, so no choice here recompiles a kernel. A disabled dual
clip is passed as dual_clip = +inf. The advantages arrive clamped (adv_clamp_min is applied
once, in `lambda_grpo._rowmath.token_constants`). The torch engine's copy of this math is
`lambda_grpo._rowmath.token_terms`; the fixed constants come from `lambda_grpo.config`.
"""

import triton
import triton.language as tl

from ..config import LOG_RATIO_CLAMP as _CLAMP
from ._config import KL_CODES, SURROGATE_CODES

LOG_RATIO_CLAMP = tl.constexpr(_CLAMP)
# the codes of lambda_grpo/kernels/_config.py, the one table
S_CLIP = tl.constexpr(SURROGATE_CODES["clip"])
S_CISPO = tl.constexpr(SURROGATE_CODES["cispo"])
S_SAPO = tl.constexpr(SURROGATE_CODES["sapo"])
S_VESPO = tl.constexpr(SURROGATE_CODES["vespo"])
S_CISPO2 = tl.constexpr(SURROGATE_CODES["cispo_two_sided"])
K1 = tl.constexpr(KL_CODES["k1"])
K2 = tl.constexpr(KL_CODES["k2"])
K3 = tl.constexpr(KL_CODES["k3"])


@triton.jit
def surrogate(z, logp, A, eps_low, eps_high, dual_clip, surr, tau_pos, tau_neg):
    """The policy term s of one token and its partials (docs/math.md §2); the torch copy of this
    rule is lambda_grpo._rowmath.token_terms. Returns (s, ds/dz, ds/dlogp, rho, drho/dz,
    clip_low, clip_high, clip_dual): the clip flags of docs/math.md §8, clip_dual where the dual
    clip (or TRL's delta) sets s.

    surr (runtime int, SURROGATE_CODES in lambda_grpo/kernels/_config.py). All are computed and one
    is selected with where() (a handful of flops next to a vocabulary pass; no branch the
    interpreter or the compiler must specialise); a code none of them has gives NaN. A disabled dual clip is passed as
    +inf; TRL's delta arrives as the dual clip (LossConfig.dual_floor: the same rule).
    - clip: s = min(rho A, clip(rho) A), then max(s, c A) where A < 0. torch splits ties of
      min/max evenly and clamp passes its gradient on [lo, hi], so inside the clip range the two
      branches together give rho A; outside only the unclipped branch (when it is the min)
      carries a gradient.
    - cispo: s = w A logp with w = min(rho, eps_high) a constant (detached in the reference);
      cispo_two_sided: w = clip(rho, 1 - eps_low, 1 + eps_high), clip flags whatever the sign of A.
    - sapo: s = sigmoid(tau (rho - 1)) 4 / tau A, tau = tau_pos for A > 0 else tau_neg.
    - vespo: s = A logp; its detached sequence weight phi arrives in the token coefficient c
      (lambda_grpo._rowmath.vespo_weight), which multiplies s where the loss is formed.
    The clamp of z to [-20, 20] stops the gradient through rho outside.
    """
    # where() rather than minimum/maximum, which drop a NaN: a non-finite z must stay non-finite
    # (in the clamp, the clip and the min alike: min(NaN, clip(NaN) A) dropped to a finite lo A)
    zc = tl.where(z < -LOG_RATIO_CLAMP, -LOG_RATIO_CLAMP, tl.where(z > LOG_RATIO_CLAMP, LOG_RATIO_CLAMP, z))
    rho = tl.exp(zc)
    drho = tl.where(tl.abs(z) <= LOG_RATIO_CLAMP, rho, 0.0)
    code = tl.zeros_like(z).to(tl.int32) + surr
    is_clip = code == S_CLIP
    is_cispo = code == S_CISPO
    is_cispo2 = code == S_CISPO2
    is_sapo = code == S_SAPO
    is_pg = is_cispo | is_cispo2 | (code == S_VESPO)  # s = w A logp: the two cispo and vespo (w = 1)
    # clip (with the dual clip)
    clipped = tl.where(rho < 1.0 - eps_low, 1.0 - eps_low, tl.where(rho > 1.0 + eps_high, 1.0 + eps_high, rho))
    s1 = rho * A
    s2 = clipped * A
    s_clip = tl.where(s2 < s1, s2, s1)  # min(s1, s2) that keeps a NaN s1 (tl.minimum would drop it)
    g_clip = tl.where(s1 <= s2, A, 0.0)  # ds/drho
    # the product only where A < 0: a disabled dual clip (+inf) times A = 0 (a masked lane, or equal
    # rewards) would be NaN, harmless once where() drops it but reported by the interpreter (numpy)
    dual = tl.where(A < 0, dual_clip * tl.where(A < 0, A, -1.0), float("-inf"))
    use_dual = s_clip < dual
    s_clip = tl.where(use_dual, dual, s_clip)
    g_clip = tl.where(use_dual, 0.0, g_clip)
    # cispo
    w = tl.where(is_cispo, tl.where(rho > eps_high, eps_high, rho), tl.where(is_cispo2, clipped, 1.0))
    # sapo
    tau = tl.where(A > 0, tau_pos, tau_neg)
    sig = tl.sigmoid(tau * (rho - 1.0))
    nan = float("nan")
    s = tl.where(is_clip, s_clip, tl.where(is_pg, w * A * logp, tl.where(is_sapo, sig * (4.0 / tau) * A, nan)))
    ds_dz = tl.where(is_clip, g_clip, tl.where(is_pg, 0.0, tl.where(is_sapo, 4.0 * sig * (1.0 - sig) * A, nan))) * drho
    ds_dlogp = tl.where(is_pg, w * A, 0.0)
    clip_low = (is_clip & (A < 0) & (rho < 1.0 - eps_low)) | (is_cispo2 & (rho < 1.0 - eps_low))
    clip_high = ((is_clip & (A > 0) & (rho > 1.0 + eps_high)) | (is_cispo & (A > 0) & (rho > eps_high))
                 | (is_cispo2 & (rho > 1.0 + eps_high)))
    return s, ds_dz, ds_dlogp, rho, drho, clip_low, clip_high, is_clip & use_dual


@triton.jit
def kl_terms(logp, ref, kl_est, beta, use_ref, rho, drho, kl_rw):
    """(kl, beta kl, d(beta kl)/dlogp, d(beta kl)/dz): the KL as it enters the loss (times rho
    when kl_rw = 1, TRL's bias-corrected KL, whose d/dz is beta kl drho), and the loss term with
    its two slopes. The term is absent (0) without ref_logp and where beta = 0, also where kl
    overflows (beta kl would be 0 * inf = NaN): as in the reference, a term with coefficient 0 is
    not added. use_ref: an int1 tensor of logp's shape."""
    kl, dkl = kl_and_grad(logp, ref, kl_est)
    rw = (tl.zeros_like(logp).to(tl.int32) + kl_rw) != 0
    on = use_ref & ((tl.zeros_like(logp) + beta) != 0.0)
    kl_w = tl.where(rw, rho * kl, kl)
    dkl_w = tl.where(rw, rho * dkl, dkl)
    kz = tl.where(rw, kl * drho, 0.0)
    # beta multiplies only where the term is on: beta = 0 times an infinite kl (a legal -inf
    # ref_logp) is a NaN that where() drops, but the interpreter (numpy) reports it
    return (tl.where(use_ref, kl_w, 0.0), tl.where(on, beta * tl.where(on, kl_w, 0.0), 0.0),
            tl.where(on, beta * tl.where(on, dkl_w, 0.0), 0.0), tl.where(on, beta * tl.where(on, kz, 0.0), 0.0))


@triton.jit
def kl_and_grad(logp, ref, kl_est):
    """kl(d) with d = ref - logp for k1/k2/k3 (KL_CODES) and d kl / d logp; NaN for another code."""
    d = ref - logp
    ed = tl.exp(d)
    nan = float("nan")
    kl = tl.where(kl_est == K3, ed - d - 1.0, tl.where(kl_est == K1, -d, tl.where(kl_est == K2, 0.5 * d * d, nan)))
    dkl = tl.where(kl_est == K3, 1.0 - ed, tl.where(kl_est == K1, 1.0, tl.where(kl_est == K2, -d, nan)))
    return kl, dkl


@triton.jit
def token_loss(bkl, c, s, ent_coef, H):
    """l_t = beta kl - c s - entropy_coef H of one token (docs/math.md §2); a term whose coefficient
    is 0 is absent (as in the reference), so 0 * inf cannot arise."""
    return bkl - c * s - tl.where(ent_coef != 0.0, ent_coef * H, 0.0)


@triton.jit
def clip_code(clip_low, clip_high, clip_dual):
    """The clip flags of one token as one number: 1 low + 2 high + 4 dual
    (lambda_grpo._rowmath.CLIP_CODES)."""
    return tl.where(clip_low, 1.0, 0.0) + tl.where(clip_high, 2.0, 0.0) + tl.where(clip_dual, 4.0, 0.0)
