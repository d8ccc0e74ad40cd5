"""Parity with Liger-Kernel 0.8.5's `LigerFusedLinearGRPOLoss` (issue 12): the same hidden states,
LM head and inputs through Liger's chunked loss (on the CPU, `compiled=False`) and through
`fused_linear_grpo_loss`, for every loss type both offer. Loss, dhidden and dW agree to Liger's
fp32 roundoff (see TOL).

Grid, and why each case is there: every Liger `loss_type` with the LossConfig that computes it
(`bench/trl_formula.lambda_grpo_config_for`, TRL's names), with β > 0 (Liger's k3 KL) and β = 0,
ratios pushed past the clip / CISPO cap / delta so each branch is active, TRL's
`use_bias_correction_kl` and delta, sequence-level importance sampling for the clip types and
luspo. Not compared: Liger's `luspo` at the token level or with β > 0: it multiplies each
position's loss by its row length and sums over *all* T positions, masked ones included, divided
by B·T (its comment says it matches TRL, which it does only for a per-row loss: sequence level,
β = 0); lambda_grpo follows TRL: Σ_t m ℓ_t / B (tests/test_trl_formulas.py). Rows here have empty and partial masks.
"""

from __future__ import annotations

import pytest
import torch

import lambda_grpo as lg
from bench.trl_formula import lambda_grpo_config_for

chunked = pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V, G = 6, 7, 8, 11, 3
# Liger computes its chunks' logits, log-softmax and loss in fp32 whatever the input dtype (its loss
# comes back fp32), ours here in float64: the comparison is at fp32 roundoff, 2^-16 of the largest
# element of each result (measured: at most 2.2e-6 relative, VESPO's; gradients <= 6e-7). A formula
# difference is far larger: Liger's luspo with beta > 0, which adds the per-token KL before summing
# every position (masked ones included), is 3.5e-3 relative off TRL's on these inputs.
TOL = 2.0 ** -16

CASES = [
    ("grpo", dict(beta=0.04)),
    ("bnpo", dict(beta=0.0)),
    ("dapo", dict(beta=0.04)),
    ("dr_grpo", dict(beta=0.04)),
    ("cispo", dict(beta=0.04, epsilon_high=1.15)),
    ("sapo", dict(beta=0.04, sapo_temperature_pos=1.5, sapo_temperature_neg=1.25)),
    ("vespo", dict(beta=0.04)),
    ("vespo", dict(beta=0.0, vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=1.0)),
    ("dapo", dict(beta=0.04, delta=1.25, epsilon_high=0.1)),
    ("grpo", dict(beta=0.1, use_bias_correction_kl=True)),
    ("grpo", dict(beta=0.04, importance_sampling_level="sequence", use_bias_correction_kl=True)),
    ("dapo", dict(beta=0.0, importance_sampling_level="sequence")),
    ("luspo", dict(beta=0.0, importance_sampling_level="sequence")),
]


def _inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False  # an empty row
    mask[4, 1:] = False  # a row of one token
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, tokens[..., None]).squeeze(-1)
    # old / ref log-probs near the policy's, pushed so that ratios pass 1 + eps, the caps and delta
    old = logp - 0.15 + 0.3 * torch.rand(B, T, generator=g, dtype=torch.float64) - 0.15
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return hidden, weight, tokens, mask, adv, old, ref


@pytest.mark.parametrize("loss_type,kw", CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
def test_matches_liger_fused_linear_grpo(loss_type, kw):
    hidden, weight, tokens, mask, adv, old, ref = _inputs()
    kw = dict(kw)
    beta = kw.pop("beta")
    eps_high = kw.pop("epsilon_high", 0.2)
    liger = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=beta > 0, chunk_size=2,
                                             epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type,
                                             max_completion_length=T, **kw)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want, _ = liger(h1, w1, tokens, mask.to(torch.int64), adv, ref_per_token_logps=ref if beta > 0 else None,
                    old_per_token_logps=old)
    want.backward()

    cfg = lambda_grpo_config_for(
        loss_type, beta=beta, eps_low=0.2, eps_high=eps_high, delta=kw.get("delta"),
        kl_ratio_weighted=kw.get("use_bias_correction_kl", False), max_completion_length=T,
        importance_sampling=kw.get("importance_sampling_level", "token"),
        sapo_tau_pos=kw.get("sapo_temperature_pos", 1.0), sapo_tau_neg=kw.get("sapo_temperature_neg", 1.05),
        **{k: v for k, v in kw.items() if k.startswith("vespo_")})
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got = lg.fused_linear_grpo_loss(h2, w2, tokens, mask, adv, group_size=G, old_logp=old,
                                    ref_logp=ref if beta > 0 else None, config=cfg, backend="torch")
    got.loss.backward()
    for name, g, w in (("loss", got.loss.detach(), want.detach().double()), ("dhidden", h2.grad, h1.grad),
                       ("dweight", w2.grad, w1.grad)):
        err, scale = (g - w).abs().max(), w.abs().max()
        assert err <= TOL * scale, f"{name}: max |ours - Liger| = {float(err):.3e} > {TOL:.1e} x {float(scale):.3e}"
    assert want.detach().abs() > 1e-3  # a loss that is not trivially 0
