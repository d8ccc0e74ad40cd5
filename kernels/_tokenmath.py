"""Per-token GRPO math shared by the row kernel and the fused vocab kernel (SPEC §4).

Everything here is elementwise on fp32 values; `kl_est` (1, 2, 3 for k1, k2, k3) and the
hyper-parameters are runtime scalars, so no choice here recompiles a kernel. A disabled dual
clip is passed as dual_clip = +inf. The advantages arrive clamped (adv_clamp_min is applied
once, in `lambda_grpo._rowmath.token_constants`). The torch engine's copy of this math is
`lambda_grpo._rowmath.token_terms`; the fixed constants come from `lambda_grpo.config`.
"""

import triton
import triton.language as tl

from ..config import LOG_RATIO_CLAMP as _CLAMP

LOG_RATIO_CLAMP = tl.constexpr(_CLAMP)


@triton.jit
def surrogate(z, A, eps_low, eps_high, dual_clip):
    """s(z) of SPEC §4 and ds/dz; returns (s, ds_dz, rho).

    s = min(rho*A, clip(rho)*A), then max(s, c*A) where A < 0. torch splits ties of min/max
    evenly and clamp passes its gradient on [lo, hi], so inside the clip range the two
    branches together give rho*A; outside only the unclipped branch (when it is the min)
    carries a gradient. The clamp of z to [-20, 20] stops the gradient outside.
    """
    # where() rather than minimum/maximum, which drop a NaN: a non-finite z must stay non-finite
    zc = tl.where(z < -LOG_RATIO_CLAMP, -LOG_RATIO_CLAMP, tl.where(z > LOG_RATIO_CLAMP, LOG_RATIO_CLAMP, z))
    rho = tl.exp(zc)
    clipped = tl.minimum(tl.maximum(rho, 1.0 - eps_low), 1.0 + eps_high)
    s1 = rho * A
    s2 = clipped * A
    # NaN-propagating min: the clip clamp above drops a NaN rho, so s2 is finite even then, and a
    # NaN-dropping min would return it (a finite loss for non-finite input, issue 8 finding 1)
    s = tl.minimum(s1, s2, propagate_nan=tl.PropagateNan.ALL)
    ds = tl.where(s1 <= s2, s1, 0.0)
    ds = tl.where(tl.abs(z) <= LOG_RATIO_CLAMP, ds, 0.0)
    dual = tl.where(A < 0, dual_clip * A, float("-inf"))
    use_dual = s < dual
    s = tl.where(use_dual, dual, s)
    ds = tl.where(use_dual, 0.0, ds)
    return s, ds, rho


@triton.jit
def kl_and_grad(logp, ref, kl_est):
    """kl(d) with d = ref - logp for k1/k2/k3 and d kl / d logp."""
    d = ref - logp
    ed = tl.exp(d)
    kl = tl.where(kl_est == 3, ed - d - 1.0, tl.where(kl_est == 1, -d, 0.5 * d * d))
    dkl = tl.where(kl_est == 3, 1.0 - ed, tl.where(kl_est == 1, 1.0, -d))
    return kl, dkl
