"""The policy losses beyond PPO-clip (issue 12): CISPO, SAPO, TRL's two-sided delta clip, the KL
times the ratio, verl's token-sum aggregations, GSPO's sequence-level ratio and VESPO, on every
backend.

Grid, and why each case is there:
- by hand: one row of 3 tokens with ratios 1, 2, 4 (old_logp set so), equal logits over V = 2
  (logp = -ln 2), worked out in the comments; every backend against those numbers;
- gradcheck in float64 of the reference for each variant, traced and not (the truth's own check);
- every fast backend against the float64 reference over variants x trace style/mode x
  aggregations x masks (fixed examples), fp32 and bf16 on Triton at small shapes;
- the configurations a variant cannot take are refused with a ValueError naming the field.
TRL parity of the same variants: tests/test_trl_formulas.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import lambda_grpo as lg
from lambda_grpo._validate import validate
from lambda_grpo.reference import reference_loss
from tests._compare import assert_backend_matches, make_batch
from tests.test_linear import tiny_chunks  # noqa: F401  (the fixture: chunks of 3 tokens)

BACKENDS = ("reference", "torch", "triton")
LN2 = math.log(2.0)


def _row(backend, cfg, adv, ref_shift=None, ratios=(1.0, 2.0, 4.0)):
    """One row, V = 2, equal logits: logp = -ln 2 for every token; old = logp - ln(ratio)."""
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    tokens = torch.tensor([[0, 1, 0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    old = torch.tensor([[-LN2 - math.log(r) for r in ratios]])
    ref = None if ref_shift is None else torch.full((1, 3), -LN2 + ref_shift)
    out = lg.grpo_loss(logits, tokens, mask, torch.tensor([adv]), group_size=1, old_logp=old, ref_logp=ref,
                       config=cfg, backend=backend)
    out.loss.backward()
    # d logp_t / d logits_tj = 1[j = y_t] - 1/2: dlogits_t = dlogp_t (+1/2, -1/2) at the token, mirrored
    g = logits.grad[0]
    dlogp = torch.where(tokens[0] == 0, g[:, 0], g[:, 1]) * 2
    return float(out.loss.detach()), dlogp, out.metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_by_hand(backend):
    # cap eps_high = 3: w = min(rho, 3) = (1, 2, 3), constants. A = 1, dapo over 3 tokens.
    # l_t = -w_t A logp_t = w_t ln 2: loss = (1 + 2 + 3) ln 2 / 3 = 2 ln 2.
    # dL/dlogp_t = -w_t A / 3 = (-1/3, -2/3, -1). clip_frac_high: rho = 4 > 3 for 1 of 3 tokens.
    loss, dlogp, m = _row(backend, lg.LossConfig(aggregation="dapo", surrogate="cispo", eps_high=3.0), 1.0)
    assert loss == pytest.approx(2 * LN2, rel=1e-6)
    torch.testing.assert_close(dlogp, torch.tensor([-1 / 3, -2 / 3, -1.0]), rtol=1e-5, atol=1e-6)
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 3) and float(m["clip_frac_low"]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_two_sided_by_hand(backend):
    # verl's cispo, eps_low = eps_high = 0.5: w = clip(rho, 0.5, 1.5) = (0.5, 1, 1.5) for rho =
    # (0.25, 1, 4), constants. A = 1, dapo over 3 tokens: l_t = -w_t A logp_t = w_t ln 2, loss =
    # (0.5 + 1 + 1.5) ln 2 / 3 = ln 2; dL/dlogp_t = -w_t / 3. rho = 0.25 below and 4 above: 1/3 each.
    cfg = lg.LossConfig(aggregation="dapo", surrogate="cispo_two_sided", eps_low=0.5, eps_high=0.5)
    loss, dlogp, m = _row(backend, cfg, 1.0, ratios=(0.25, 1.0, 4.0))
    assert loss == pytest.approx(LN2, rel=1e-6)
    torch.testing.assert_close(dlogp, torch.tensor([-1 / 6, -1 / 3, -0.5]), rtol=1e-5, atol=1e-6)
    assert float(m["clip_frac_low"]) == pytest.approx(1 / 3) and float(m["clip_frac_high"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sapo_by_hand(backend):
    # A = 1 > 0: tau = tau_pos = 1. s_t = sigmoid(rho_t - 1) 4 A = 4 sig(0, 1, 3).
    # loss (dapo) = -mean(s). ds/dlogp = ds/drho rho = 4 sig (1 - sig) rho: dL/dlogp = -that / 3.
    sig = torch.sigmoid(torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64))
    rho = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    loss, dlogp, m = _row(backend, lg.LossConfig(aggregation="dapo", surrogate="sapo"), 1.0)
    assert loss == pytest.approx(float(-(4 * sig).mean()), rel=1e-6)
    torch.testing.assert_close(dlogp.double(), -4 * sig * (1 - sig) * rho / 3, rtol=1e-5, atol=1e-6)
    assert float(m["clip_frac"]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_by_hand(backend):
    # A = -1, eps 0.2, delta 3. Unclipped min(rho, 3) A = (-1, -2, -3); clipped clip(rho) A =
    # (-1, -1.2, -1.2); s = min = (-1, -2, -3); loss (dapo) = -mean(s) = 2. Slopes ds/dlogp:
    # token 0 inside the clip range: A rho = -1; token 1 unclipped branch below delta: A rho = -2;
    # token 2 capped at delta: 0. dL/dlogp = -slope / 3 = (1/3, 2/3, 0).
    loss, dlogp, _ = _row(backend, lg.LossConfig(aggregation="dapo", delta=3.0), -1.0)
    assert loss == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(dlogp, torch.tensor([1 / 3, 2 / 3, 0.0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_ratio_weighted_by_hand(backend):
    # A = 0: only the KL term. ref = logp + ln 2: d = ref - logp = ln 2, k3 kl = e^d - d - 1 = 1 - ln 2,
    # dkl/dlogp = 1 - e^d = -1. Term beta rho kl: loss (dapo) = beta (1 - ln 2) mean(rho) = beta (1 - ln 2) 7/3.
    # d/dlogp = beta (rho dkl + kl drho/dlogp) = beta rho (-1 + 1 - ln 2) = -beta rho ln 2, / 3 tokens.
    beta = 0.5
    cfg = lg.LossConfig(aggregation="dapo", beta=beta, kl_ratio_weighted=True)
    loss, dlogp, m = _row(backend, cfg, 0.0, ref_shift=LN2)
    assert loss == pytest.approx(beta * (1 - LN2) * 7 / 3, rel=1e-6)
    torch.testing.assert_close(dlogp, -beta * LN2 * torch.tensor([1.0, 2.0, 4.0]) / 3, rtol=1e-5, atol=1e-6)
    assert float(m["kl_mean"]) == pytest.approx((1 - LN2) * 7 / 3, rel=1e-6)  # the KL as it enters the loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_sum_aggregations_by_hand(backend):
    # Two rows (3 and 1 valid tokens), on-policy, V = 2 equal logits: l_t = -A_i (rho = 1, nothing clipped).
    # token_sum: sum_t l = -(3 A_0 + A_1); seq_mean_token_sum: that / B = / 2.
    logits = torch.zeros(2, 3, 2)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[True, True, True], [False, True, False]])
    adv = torch.tensor([0.5, 2.0])
    for agg, want in (("token_sum", -(3 * 0.5 + 2.0)), ("seq_mean_token_sum", -(3 * 0.5 + 2.0) / 2)):
        out = lg.grpo_loss(logits, tokens, mask, adv, group_size=2, config=lg.LossConfig(aggregation=agg),
                           backend=backend)
        assert float(out.loss) == pytest.approx(want, rel=1e-6), agg


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_ratio_by_hand(backend):
    # GSPO. x = ln(1, 2, 4) = (0, ln 2, 2 ln 2): mean ln 2, so rho = 2 for every token. A = -1:
    # s = min(-2, -clip(2) = -1.2) = -2 (unclipped), loss (dapo) = -mean(s) = 2. dL/dz_t =
    # W (-A rho) = 2/3 for each t; dz_t/dx_k = 1/3: dL/dlogp_k = 3 * 2/3 * 1/3 = 2/3 for every k
    # (token-level: loss 7/3, dL/dlogp = (1, 2, 4)/3). clip_frac_low: rho = 2 is not < 0.8: 0.
    cfg = lg.LossConfig(aggregation="dapo", importance_sampling="sequence")
    loss, dlogp, m = _row(backend, cfg, -1.0)
    assert loss == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(dlogp, torch.full((3,), 2 / 3), rtol=1e-5, atol=1e-6)
    assert float(m["ratio_mean"]) == pytest.approx(2.0, rel=1e-6) and float(m["clip_frac"]) == 0
    # A = +1: s = min(2, 1.2) = 1.2 clipped for all three: loss -1.2, no gradient, clip_frac_high 1
    loss, dlogp, m = _row(backend, cfg, 1.0)
    assert loss == pytest.approx(-1.2, rel=1e-6)
    torch.testing.assert_close(dlogp, torch.zeros(3), rtol=0, atol=1e-7)
    assert float(m["clip_frac_high"]) == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vespo_by_hand(backend):
    # VESPO. ratios (1, 2, 1): log w = sum x = ln 2, w = 2. A = -1 < 0: k = 3, lambda = 2 (TRL's
    # _neg defaults): phi = exp(2 + 3 ln 2 - 2 * 2) = 8 e^-2. l_t = -phi A logp_t = -phi ln 2;
    # loss (dapo) = -phi ln 2. phi is detached: dL/dlogp_t = -phi A / 3 = phi / 3.
    phi = 8 * math.exp(-2.0)
    loss, dlogp, m = _row(backend, lg.LossConfig(aggregation="dapo", surrogate="vespo"), -1.0, ratios=(1.0, 2.0, 1.0))
    assert loss == pytest.approx(-phi * LN2, rel=1e-6)
    torch.testing.assert_close(dlogp, torch.full((3,), phi / 3), rtol=1e-5, atol=1e-6)
    assert float(m["phi_mean"]) == pytest.approx(phi, rel=1e-6) and float(m["clip_frac"]) == 0
    # A = +1: k = 2, lambda = 3: phi = exp(3 + 2 ln 2 - 6) = 4 e^-3; loss = phi ln 2, dL/dlogp = -phi / 3
    phi = 4 * math.exp(-3.0)
    loss, dlogp, _ = _row(backend, lg.LossConfig(aggregation="dapo", surrogate="vespo"), 1.0, ratios=(1.0, 2.0, 1.0))
    assert loss == pytest.approx(phi * LN2, rel=1e-6)
    torch.testing.assert_close(dlogp, torch.full((3,), -phi / 3), rtol=1e-5, atol=1e-6)


VARIANTS = {
    "cispo": dict(surrogate="cispo", eps_high=1.4),
    "cispo_two_sided": dict(surrogate="cispo_two_sided", eps_low=0.1, eps_high=0.15),
    "sapo": dict(surrogate="sapo", sapo_tau_pos=1.5, sapo_tau_neg=0.8),
    "delta": dict(delta=1.35, eps_high=0.25, dual_clip=3.0),
    "kl_x_ratio": dict(kl_ratio_weighted=True, beta=0.2),
    "token_sum": dict(aggregation="token_sum"),
    "seq_mean_token_sum": dict(aggregation="seq_mean_token_sum", beta=0.1),
    "gspo": dict(importance_sampling="sequence", kl_ratio_weighted=True, beta=0.1),
    "gspo_sapo": dict(importance_sampling="sequence", surrogate="sapo"),
    "vespo": dict(surrogate="vespo", vespo_k_neg=1.5),
}
# a ratio-mode trace defines the ratio: with GSPO's sequence ratio or VESPO it is refused, so
# those run with the weight-mode trace instead (the refusal is tested below)
TRACES = [(None, "ratio"), ("both", "ratio"), ("recent", "weight")]


def _traces(variant):
    if variant.startswith(("gspo", "vespo")):
        return [(None, "ratio"), ("both", "weight"), ("recent", "weight")]
    return TRACES


def _grid(variants):
    return [(v, t) for v in variants for t in _traces(v)]


# VESPO's phi is detached by definition and depends on every log-prob of its row: its gradient
# is not the loss's derivative anywhere phi is not constant, so it has no gradcheck (its gradient
# is checked by hand above and the fast backends against the reference below).
@pytest.mark.parametrize("variant,trace", _grid([v for v in VARIANTS if v != "vespo"]))
def test_reference_gradcheck(variant, trace):
    kw = dict(VARIANTS[variant])
    if variant == "cispo":
        # CISPO's weight min(rho, eps_high) is detached by definition (its gradient is not the
        # loss's derivative) except where it is constant: a cap below every ratio makes it so.
        kw["eps_high"] = 0.01
    if variant == "cispo_two_sided":  # the same: bounds 1 - 0 = 1 + 0 make w = 1 for every ratio
        kw.update(eps_low=0.0, eps_high=0.0)
    cfg = lg.LossConfig(**{**dict(aggregation="lambda_grpo", beta=0.05, entropy_coef=0.01, trace=trace[0],
                                  trace_mode=trace[1]), **kw})
    inp = make_batch(B=4, T=3, V=3, G=2, dtype=torch.float64, seed=3, mask="holes")
    inp["old_logp"] = inp["old_logp"].double() - 0.2

    def f(x, lam):
        batch = validate(x, inp["tokens"], inp["mask"], inp["advantages"], 2, inp["old_logp"],
                         inp["ref_logp"].double(), lam, cfg, None, None)
        return reference_loss(batch, cfg).loss

    x = inp["logits"].clone().requires_grad_(True)
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, lam), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant,trace", _grid(VARIANTS))
@pytest.mark.parametrize("agg", ["lambda_grpo", "grpo"])
def test_fast_backends_match_reference(backend, variant, trace, agg):
    cfg = lg.LossConfig(**{**dict(aggregation=agg, beta=0.05, entropy_coef=0.01, trace=trace[0],
                                  trace_mode=trace[1]), **VARIANTS[variant]})
    for seed, mask in ((1, "empty_rows"), (2, "len1")):
        inp = make_batch(B=4, T=6, V=13, G=2, seed=seed, mask=mask)
        inp["old_logp"] = inp["old_logp"] - 0.2  # ratios past every cap occur
        assert_backend_matches(backend, inp, cfg, lam=0.6)


@pytest.mark.parametrize("variant", ["cispo", "sapo", "delta", "kl_x_ratio", "gspo", "vespo"])
def test_triton_bf16(variant):
    mode = _traces(variant)[2][1]
    cfg = lg.LossConfig(**{**dict(aggregation="dapo", beta=0.05, trace="recent", trace_mode=mode), **VARIANTS[variant]})
    inp = make_batch(B=4, T=5, V=37, G=2, seed=4, mask="holes", dtype=torch.bfloat16)
    assert_backend_matches("triton", inp, cfg, lam=0.0)


@pytest.mark.parametrize("kw,field", [
    (dict(surrogate="ppo"), "surrogate"),
    (dict(delta=1.1, eps_high=0.2), "delta"),
    (dict(delta=2.0, surrogate="sapo"), "delta"),
    (dict(dual_clip=3.0, surrogate="cispo"), "dual_clip"),
    (dict(surrogate="cispo", eps_high=0.0), "eps_high"),
    (dict(sapo_tau_pos=0.0), "sapo_tau_pos"),
    (dict(sapo_tau_neg=float("inf")), "sapo_tau_neg"),
    (dict(kl_ratio_weighted=1), "kl_ratio_weighted"),
    (dict(aggregation="token-sum"), "aggregation"),
    (dict(importance_sampling="seq"), "importance_sampling"),
    (dict(importance_sampling="sequence", trace="both"), "importance_sampling"),  # ratio-mode trace
    (dict(importance_sampling="sequence", surrogate="vespo"), "importance_sampling"),
    (dict(surrogate="vespo", trace="recent"), "trace_mode"),
    (dict(surrogate="vespo", dual_clip=2.0), "dual_clip"),
    (dict(vespo_k_pos=float("nan")), "vespo_k_pos"),
    (dict(vespo_lambda_neg=True), "vespo_lambda_neg"),
])
def test_refused_configurations(kw, field):
    with pytest.raises(ValueError, match=f"LossConfig.{field}"):
        lg.LossConfig(**kw)


# --------------------------------------------------------------------------------------------
# The other two entry points (log-probs, hidden states + LM head) take every variant too
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,trace", _grid(VARIANTS))
def test_from_logprobs_variants_match_reference(variant, trace):
    from tests.test_entry_points import _logp_inputs, _rows_run
    from tests._compare import assert_close_to_truth

    cfg = lg.LossConfig(**{**dict(aggregation="lambda_grpo", beta=0.05, entropy_coef=0.01, trace=trace[0],
                                  trace_mode=trace[1]), **VARIANTS[variant]})
    inputs = _logp_inputs(6, 5, 7, 3, 17, "holes", torch.float32, with_entropy=True, token_weights=True)
    inputs["old_logp"] = inputs["old_logp"] - 0.2
    truth = _rows_run(inputs, cfg, 0.7, torch.float64)
    base = _rows_run(inputs, cfg, 0.7, torch.float32)
    got = _rows_run(inputs, cfg, 0.7)
    for k in ("loss", "dlogp", "dH", "dlam"):
        if truth[k] is not None:  # dlam: lambda_grpo only
            assert_close_to_truth(k, got[k], truth[k], base[k], torch.float32)
    assert set(got["metrics"]) == set(truth["metrics"])


@pytest.mark.usefixtures("tiny_chunks")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant,trace", _grid(["gspo", "vespo", "cispo", "delta"]))
def test_hidden_variants_match_reference(backend, variant, trace):
    from tests.test_linear import _baseline, _case, _compare, _run

    cfg = lg.LossConfig(**{**dict(aggregation="grpo", beta=0.05, entropy_coef=0.01, trace=trace[0],
                                  trace_mode=trace[1]), **VARIANTS[variant]})
    c = _case(4, 5, 6, 37, 2, 23, "empty_rows", torch.float32, True, True)
    truth, base = _baseline(c, cfg, 0.6)
    _compare(_run(backend, c, cfg, 0.6), truth, base, torch.float32)
