"""External formula check: grpo, bnpo, dapo and dr_grpo agree with TRL 1.16's GRPOTrainer loss.

`trl_loss` transcribes `GRPOTrainer._compute_loss` of trl 1.16.0 (token-level importance
sampling, no entropy mask, no vLLM correction, one process, no gradient accumulation) with
TRL's own `selective_log_softmax`. TRL's entropy bonus is a separate plain token mean whatever the
loss type, so it is not compared here; the KL term is TRL's k3.
"""

from __future__ import annotations

import pytest
import torch

import lambda_grpo as lg
from bench.trl_formula import lambda_grpo_config_for, trl_policy_loss
from tests._compare import make_batch

trl_utils = pytest.importorskip("trl.trainer.utils")


def trl_loss(logits, tokens, mask, advantages, old_logp, ref_logp, *, loss_type, temperature, **kw):
    """trl 1.16.0 GRPOTrainer._compute_loss on TRL's own selective_log_softmax and (vespo) its own
    get_gamma_weights (bench/trl_formula.py)."""
    from trl import GRPOTrainer

    per_token_logps = trl_utils.selective_log_softmax(logits / temperature, tokens)
    return trl_policy_loss(per_token_logps, mask, advantages, old_logp, ref_logp, loss_type=loss_type,
                           gamma_weights=GRPOTrainer.get_gamma_weights, **kw)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("setting", [
    dict(beta=0.0, eps_low=0.2, eps_high=0.2, temperature=1.0, off_policy=True, per_token=False),
    dict(beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.7, off_policy=True, per_token=False),
    dict(beta=0.1, eps_low=0.1, eps_high=0.3, temperature=1.3, off_policy=False, per_token=True),
], ids=["plain", "kl-asym-clip-temp", "on-policy-per-token"])
def test_matches_trl_loss_and_gradient(backend, loss_type, setting):
    s = dict(setting)
    off_policy, per_token = s.pop("off_policy"), s.pop("per_token")
    inp = make_batch(B=6, T=7, V=11, G=3, dtype=torch.float64, seed=21, mask="empty_rows",
                     off_policy=off_policy, per_token_adv=per_token, with_ref=True)
    max_len = 9
    # dapo: TRL divides by the generation batch's token count; ours comes in as num_tokens
    n_items = inp["mask"].sum() + 5
    cfg = lg.LossConfig(aggregation=loss_type, beta=s["beta"], eps_low=s["eps_low"], eps_high=s["eps_high"],
                        temperature=s["temperature"], max_completion_length=max_len)

    x1 = inp["logits"].clone().requires_grad_(True)
    want = trl_loss(x1, inp["tokens"], inp["mask"], inp["advantages"].double(),
                    None if inp["old_logp"] is None else inp["old_logp"].double(), inp["ref_logp"].double(),
                    loss_type=loss_type, max_completion_length=max_len, num_items_in_batch=n_items.double(), **s)
    want.backward()

    x2 = inp["logits"].clone().requires_grad_(True)
    got = lg.grpo_loss(**dict(inp, logits=x2), config=cfg, num_tokens=n_items if loss_type == "dapo" else None,
                       backend=backend)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_matches_trl_fp32(loss_type):
    # the dtype TRL users run: fp32 logits on the torch backend, tolerance of fp32 roundoff
    inp = make_batch(B=4, T=6, V=50, G=2, dtype=torch.float32, seed=22, mask="prefix", with_ref=True)
    n_items = inp["mask"].sum()
    s = dict(beta=0.04, eps_low=0.2, eps_high=0.28, temperature=1.0)
    want = trl_loss(inp["logits"], inp["tokens"], inp["mask"], inp["advantages"], inp["old_logp"], inp["ref_logp"],
                    loss_type=loss_type, max_completion_length=6, num_items_in_batch=n_items.float(), **s)
    got = lg.grpo_loss(**inp, config=lg.LossConfig(aggregation=loss_type, **s), backend="torch")
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)


# --- the loss types beyond the clip surrogate (issue 12): cispo, sapo, luspo, delta, KL x ratio ---
NEW_TYPES = [
    ("cispo", dict(beta=0.0, eps_low=0.2, eps_high=1.3)),
    ("cispo", dict(beta=0.05, eps_low=0.2, eps_high=1.1, use_bias_correction_kl=True)),
    # TRL forms its SAPO temperatures with torch.where over Python floats: fp32 (1.05 becomes
    # 1.0499999523, 1.3e-7 relative off). Temperatures exact in fp32 compare the formula itself.
    ("sapo", dict(beta=0.04, eps_low=0.2, eps_high=0.2, sapo_temperature_pos=1.5, sapo_temperature_neg=1.25)),
    ("luspo", dict(beta=0.0, eps_low=0.2, eps_high=0.28)),
    ("dapo", dict(beta=0.04, eps_low=0.2, eps_high=0.28, delta=1.4)),
    ("grpo", dict(beta=0.1, eps_low=0.2, eps_high=0.2, use_bias_correction_kl=True)),
    ("dr_grpo", dict(beta=0.1, eps_low=0.2, eps_high=0.28, delta=1.35, use_bias_correction_kl=True)),
    # GSPO: TRL's importance_sampling_level="sequence" (grpo and luspo are the types TRL allows it with)
    ("grpo", dict(beta=0.04, eps_low=0.2, eps_high=0.2, importance_sampling_level="sequence",
                  use_bias_correction_kl=True)),
    ("luspo", dict(beta=0.0, eps_low=0.1, eps_high=0.1, importance_sampling_level="sequence")),
    ("sapo", dict(beta=0.0, eps_low=0.2, eps_high=0.2, importance_sampling_level="sequence",
                  sapo_temperature_pos=1.5, sapo_temperature_neg=1.25)),
    # VESPO with TRL's get_gamma_weights itself: defaults, and other k / lambda
    ("vespo", dict(beta=0.04, eps_low=0.2, eps_high=0.2)),
    ("vespo", dict(beta=0.0, eps_low=0.2, eps_high=0.2,
                   vespo_kw=dict(k_pos=1.0, lambda_pos=0.5, k_neg=4.0, lambda_neg=1.0))),
]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("loss_type,setting", NEW_TYPES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(NEW_TYPES)])
def test_new_loss_types_match_trl(backend, loss_type, setting):
    inp = make_batch(B=6, T=7, V=11, G=3, dtype=torch.float64, seed=23, mask="empty_rows", with_ref=True)
    inp["old_logp"] = inp["old_logp"] - 0.15  # ratios above 1 + delta and eps_high occur
    max_len = 9
    n_items = inp["mask"].sum() + 3
    kw = dict(setting)
    vk = kw.get("vespo_kw", {})
    cfg = lambda_grpo_config_for(loss_type, beta=kw["beta"], eps_low=kw["eps_low"], eps_high=kw["eps_high"],
                                 delta=kw.get("delta"), kl_ratio_weighted=kw.get("use_bias_correction_kl", False),
                                 sapo_tau_pos=kw.get("sapo_temperature_pos", 1.0),
                                 sapo_tau_neg=kw.get("sapo_temperature_neg", 1.05), max_completion_length=max_len,
                                 importance_sampling=kw.get("importance_sampling_level", "token"),
                                 **{f"vespo_{k}": v for k, v in vk.items()})
    x1 = inp["logits"].clone().requires_grad_(True)
    want = trl_loss(x1, inp["tokens"], inp["mask"], inp["advantages"].double(), inp["old_logp"].double(),
                    inp["ref_logp"].double(), loss_type=loss_type, temperature=1.0, max_completion_length=max_len,
                    num_items_in_batch=n_items.double(), **kw)
    want.backward()
    x2 = inp["logits"].clone().requires_grad_(True)
    got = lg.grpo_loss(**dict(inp, logits=x2), config=cfg, backend=backend,
                       num_tokens=n_items if cfg.aggregation == "dapo" else None)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-9, atol=1e-12)
