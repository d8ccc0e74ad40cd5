"""Public API behaviour (docs/math.md §8, §13): token_logprobs, group_advantages, GRPOLoss, LossOutput."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lambda_grpo as lg
from tests._compare import assert_close_to_truth, make_batch, max_err

BACKENDS = ("reference", "torch")


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------


def _logp_truth(logits, tokens, tau):
    """log_softmax(logits / tau)[tokens] in float64 with its gradient for upstream `up`."""
    x = logits.detach().double().requires_grad_(True)
    lp = torch.log_softmax(x / tau, -1).gather(-1, tokens[..., None]).squeeze(-1)
    return x, lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape, tau", [((3, 5, 13), 1.0), ((2, 4, 1), 0.7), ((1, 1, 2), 1.5), ((2, 3, 3001), 0.9)])
def test_token_logprobs_value_and_gradient(backend, dtype, shape, tau):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:2], generator=g)
    up = torch.randn(shape[:2], generator=g, dtype=torch.float64)

    xt, truth = _logp_truth(logits, tokens, tau)
    (truth * up).sum().backward()
    # plain torch in the logits' dtype with fp32 math: the baseline of the tolerance rule
    # (on an fp32 leaf holding the same values: its fp32 gradient is plain torch before the rounding
    # to the logits' dtype, which the element-wise rule needs; rounded, it is the dtype's gradient)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    xb = logits.detach().to(cdt).requires_grad_(True)
    base = torch.log_softmax(xb / tau, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (base * up.to(cdt)).sum().backward()

    x = logits.detach().clone().requires_grad_(True)
    lp = lg.token_logprobs(x, tokens, temperature=tau, backend=backend)
    assert lp.shape == shape[:2] and lp.dtype == cdt
    (lp * up.to(cdt)).sum().backward()
    assert x.grad.dtype == dtype
    assert_close_to_truth("logp", lp.detach(), truth.detach(), base.detach(), dtype)
    assert_close_to_truth("dlogits", x.grad, xt.grad, xb.grad.to(dtype), dtype, compute=xb.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_real_vocab_and_shift_invariance(backend):
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(2, 3, 151936, generator=g)
    tokens = torch.randint(0, 151936, (2, 3), generator=g)
    _, truth = _logp_truth(logits, tokens, 1.0)
    lp = lg.token_logprobs(logits, tokens, backend=backend)
    base = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert_close_to_truth("logp", lp, truth.detach(), base, torch.float32)
    shifted = lg.token_logprobs(logits + 1000.0, tokens, backend=backend)
    assert max_err(shifted, lp) < 1e-3  # a shift of 1000 costs ~1e-4 of fp32 resolution


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_matches_grpo_loss_logp(backend):
    # dapo, beta > 0, k1 estimator: kl_mean = mean(logp - ref) so the loss's logp is observable
    inp = make_batch(B=4, T=5, V=9, G=2, dtype=torch.float64, seed=2, mask="full", with_ref=True)
    cfg = lg.LossConfig(aggregation="dapo", beta=0.1, kl_estimator="k1", temperature=0.8)
    out = lg.grpo_loss(**inp, config=cfg, backend=backend)
    lp = lg.token_logprobs(inp["logits"], inp["tokens"], temperature=0.8, backend=backend)
    want = (lp - inp["ref_logp"].double()).mean()
    assert abs(float(out.metrics["kl_mean"]) - float(want)) < 1e-12


# --------------------------------------------------------------------------------------------
# group_advantages (TRL GRPOTrainer: A = (r - mean_g) / (std_g + 1e-4), std unbiased)
# --------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = lg.group_advantages(r, 4)
    # group 0: mean 0.25, unbiased std = sqrt(((0.75)^2 + 3 (0.25)^2) / 3) = 0.5
    want0 = np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4)
    np.testing.assert_allclose(a[:4].numpy(), want0, rtol=1e-6)
    assert torch.equal(a[4:], torch.zeros(4))  # equal rewards: zero advantages, no nan
    assert a.dtype == torch.float32
    np.testing.assert_allclose(lg.group_advantages(r, 4, scale="none")[:4].numpy(), [0.75, -0.25, -0.25, -0.25])
    # batch scale: divide by the std of all 8 rewards (unbiased)
    want_b = (r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)).reshape(-1) / (float(np.std(r.numpy(), ddof=1)) + 1e-4)
    np.testing.assert_allclose(lg.group_advantages(r, 4, scale="batch").numpy(), want_b.numpy(), rtol=1e-6)


@pytest.mark.parametrize("G", [1, 2, 8])
def test_group_advantages_vs_numpy(G):
    rng = np.random.default_rng(G)
    r = rng.normal(size=8 * (8 // G) if G < 8 else 16)
    a = lg.group_advantages(torch.tensor(r), G)
    assert a.dtype == torch.float64 and a.shape == (len(r),)
    rg = r.reshape(-1, G)
    std = rg.std(1, ddof=1, keepdims=True) if G > 1 else np.zeros((len(rg), 1))
    want = ((rg - rg.mean(1, keepdims=True)) / (std + 1e-4)).reshape(-1)
    np.testing.assert_allclose(a.numpy(), want, rtol=1e-12, atol=1e-15)
    # each group's advantages sum to zero
    assert np.all(np.abs(a.numpy().reshape(-1, G).sum(1)) < 1e-9)


# --------------------------------------------------------------------------------------------
# GRPOLoss module
# --------------------------------------------------------------------------------------------


def test_module_owns_lambda_parameter():
    m = lg.GRPOLoss(lg.LossConfig(aggregation="lambda_grpo"), backend="reference")
    assert isinstance(m.lam, torch.nn.Parameter) and m.lam.requires_grad
    assert m.lam.dim() == 0 and float(m.lam.detach()) == 0.0
    assert [n for n, _ in m.named_parameters()] == ["lam"]
    assert "lam" in m.state_dict()
    assert float(lg.GRPOLoss(lg.LossConfig(), lam_init=0.5).lam.detach()) == 0.5
    for agg in ("grpo", "bnpo", "dapo", "dr_grpo"):
        assert list(lg.GRPOLoss(lg.LossConfig(aggregation=agg)).parameters()) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_equals_functional_and_lambda_learns(backend):
    inp = make_batch(B=6, T=5, V=8, G=3, dtype=torch.float32, seed=3, mask="prefix")
    cfg = lg.LossConfig(aggregation="lambda_grpo", beta=0.05)
    m = lg.GRPOLoss(cfg, backend=backend, lam_init=0.3)
    out = m(**inp)
    lam = torch.tensor(0.3, requires_grad=True)
    ref = lg.grpo_loss(**inp, lam=lam, config=cfg, backend=backend)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    out.loss.backward()
    ref.loss.backward()
    assert m.lam.grad is not None and torch.isfinite(m.lam.grad)
    torch.testing.assert_close(m.lam.grad, lam.grad, rtol=0, atol=0)
    # an optimiser step moves lambda against its gradient
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = float(m.lam.detach())
    opt.step()
    assert float(m.lam.detach()) == pytest.approx(before - 0.1 * float(lam.grad))
    assert float(m(**inp).metrics["lambda"]) == pytest.approx(float(m.lam.detach()))


def test_module_explicit_normalisers_and_default_backend():
    inp = make_batch(B=4, T=5, V=8, G=2, dtype=torch.float32, seed=4, mask="holes")
    m = lg.GRPOLoss(lg.LossConfig(aggregation="dapo"))  # backend "auto": torch on CPU
    a = m(**inp)
    b = m(**inp, num_tokens=2 * int(inp["mask"].sum()))
    torch.testing.assert_close(b.loss, a.loss / 2, rtol=1e-6, atol=1e-8)
    r = lg.grpo_loss(**inp, config=lg.LossConfig(aggregation="dapo"), backend="reference")
    torch.testing.assert_close(a.loss, r.loss, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------
# LossOutput and metrics (docs/math.md §8)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_output_dtypes_and_metric_keys(backend, dtype):
    inp = make_batch(B=4, T=5, V=8, G=2, dtype=dtype, seed=5, mask="holes", with_ref=True)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    base = {"clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "seq_weight"}
    cases = [
        (lg.LossConfig(aggregation="dapo"), dict(ref_logp=None), base),
        (lg.LossConfig(aggregation="dapo"), dict(), base | {"kl_mean"}),  # ref given, beta = 0
        (lg.LossConfig(aggregation="grpo", entropy_coef=0.01), dict(ref_logp=None), base | {"entropy_mean"}),
        (lg.LossConfig(aggregation="bnpo", compute_entropy=True), dict(), base | {"entropy_mean", "kl_mean"}),
        (lg.LossConfig(aggregation="lambda_grpo"), dict(ref_logp=None), base | {"lambda"}),
    ]
    for cfg, over, keys in cases:
        lam = torch.tensor(0.5) if cfg.aggregation == "lambda_grpo" else None
        out = lg.grpo_loss(**dict(inp, **over), lam=lam, config=cfg, backend=backend)
        loss, metrics = out  # LossOutput unpacks
        assert loss.dim() == 0 and loss.dtype == out_dtype
        assert set(metrics) == keys, (cfg.aggregation, sorted(metrics))
        for k, v in metrics.items():
            assert not v.requires_grad and v.dtype == out_dtype, k
            assert v.shape == ((4,) if k == "seq_weight" else ()), k
        if cfg.aggregation != "lambda_grpo":
            assert torch.equal(metrics["seq_weight"], torch.ones(4, dtype=out_dtype))
        else:
            assert float(metrics["seq_weight"].view(2, 2).sum(1).sub(2).abs().max()) < 1e-5  # f sums to G
        assert float(metrics["clip_frac"]) == pytest.approx(float(metrics["clip_frac_low"] + metrics["clip_frac_high"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_empty(backend):
    # no valid token at all: loss 0, gradient 0, metrics 0 (max(1, .) normalisers), nothing nan
    inp = make_batch(B=4, T=3, V=5, G=2, dtype=torch.float32, seed=6, mask="full", with_ref=True)
    inp["mask"] = torch.zeros(4, 3, dtype=torch.bool)
    for agg in ("grpo", "bnpo", "dapo", "dr_grpo", "lambda_grpo"):
        x = inp["logits"].clone().requires_grad_(True)
        lam = torch.tensor(2.0, requires_grad=True) if agg == "lambda_grpo" else None
        out = lg.grpo_loss(**dict(inp, logits=x), lam=lam, config=lg.LossConfig(aggregation=agg, beta=0.1,
                           entropy_coef=0.1, trace="both"), backend=backend)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and torch.all(x.grad == 0), agg
        for k, v in out.metrics.items():
            assert torch.isfinite(v).all(), (agg, k)
        if lam is not None:
            assert float(lam.grad) == 0.0


def test_public_names():
    for name in ("LossConfig", "LossOutput", "GRPOLoss", "grpo_loss", "token_logprobs", "group_advantages"):
        assert hasattr(lg, name), name
    cfg = lg.LossConfig()
    assert (cfg.aggregation, cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.beta, cfg.kl_estimator) == (
        "lambda_grpo", 0.2, 0.2, None, 0.0, "k3")
    assert (cfg.temperature, cfg.entropy_coef, cfg.trace, cfg.trace_decay, cfg.trace_mode) == (
        1.0, 0.0, None, 0.99, "ratio")
    assert cfg.length_r == pytest.approx(1 / 9) and cfg.adv_clamp_min is None and cfg.max_completion_length is None
    assert math.isclose(cfg.length_r, 1 / 9)
