"""Per-token outputs and the in-place backward (issue 9 points 5 and 6), on every backend.

Grid, and why each case is there:
- per-token: a fused-schedule config (weight-mode trace, KL, entropy) and a two-pass config
  (ratio-mode "both" trace), holes and empty rows, against the float64 reference's per-token
  values; and the identity sum(W * loss_t) = loss that ties them to the scalar.
- inplace_backward: the same two schedules: the gradient equals the out-of-place one, it lands
  in the logits' own storage (no new (B, T, V) buffer), a second backward is refused, and the
  flag is refused where it cannot hold (reference backend, non-contiguous logits).
"""

from __future__ import annotations

import pytest
import torch

import lambda_grpo as lg
from tests._compare import assert_close_to_truth, make_batch

FAST = ("torch", "triton")
CFGS = {
    "fused": lg.LossConfig(aggregation="lambda_grpo", beta=0.1, entropy_coef=0.02, trace="both", trace_mode="weight",
                           kl_estimator="k3"),
    "two_pass": lg.LossConfig(aggregation="grpo", beta=0.05, compute_entropy=True, trace="both", dual_clip=3.0),
}


def _loss(backend, inp, cfg, logits, **kw):
    lam = torch.tensor(0.4) if cfg.uses_lambda else None
    return lg.grpo_loss(**dict(inp, logits=logits), lam=lam, config=cfg, backend=backend, **kw)


@pytest.mark.parametrize("backend", FAST + ("reference",))
@pytest.mark.parametrize("name", list(CFGS))
def test_per_token_outputs_match_reference(backend, name):
    cfg = CFGS[name]
    inp = make_batch(B=4, T=6, V=11, G=2, seed=21, mask="empty_rows")
    truth = _loss("reference", dict(inp, logits=inp["logits"].double()), cfg, inp["logits"].double(),
                  return_per_token=True)
    base = _loss("reference", inp, cfg, inp["logits"], return_per_token=True)  # fp32 logits -> fp32 outputs
    got = _loss(backend, inp, cfg, inp["logits"], return_per_token=True)
    # the clip flags joined the per-token outputs in issue 17 (the one assertion that changed)
    assert set(got.per_token) == {"loss", "ratio", "kl", "entropy", "clip_low", "clip_high", "clip_dual"}
    mask = inp["mask"]
    for k, v in got.per_token.items():
        assert v.shape == mask.shape, k
        assert not v.requires_grad, k
        assert (v[~mask] == 0).all(), f"per_token[{k!r}] not zero at masked positions"
        assert_close_to_truth(f"per_token[{k!r}]", v, truth.per_token[k], base.per_token[k], torch.float32,
                              atol=1e-6)
    # the scalar loss is the weighted sum of the per-token losses (here: grpo has W = 1/(B n_i))
    if name == "two_pass":
        n = mask.sum(1, keepdim=True).clamp(min=1)
        total = (got.per_token["loss"].double() / (mask.shape[0] * n)).sum()
        torch.testing.assert_close(total, got.loss.double(), rtol=1e-5, atol=1e-7)
    assert _loss(backend, inp, cfg, inp["logits"]).per_token is None


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_equals_out_of_place(backend, name, dtype):
    cfg = CFGS[name]
    inp = make_batch(B=4, T=6, V=11, G=2, seed=22, mask="holes", dtype=dtype)
    # out of place, through a non-leaf (the usual case: logits come out of an LM head)
    w = torch.randn(11, 11, dtype=torch.float64).to(dtype)
    h = inp["logits"].detach().clone().requires_grad_(True)
    _loss(backend, inp, cfg, h @ w).loss.backward()
    want = h.grad.clone()

    h2 = inp["logits"].detach().clone().requires_grad_(True)
    logits = h2 @ w
    seen = {}
    logits.register_hook(lambda g: seen.__setitem__("ptr", g.data_ptr()))
    out = _loss(backend, inp, cfg, logits, inplace_backward=True)
    (0.5 * out.loss).backward(retain_graph=True)
    assert seen["ptr"] == logits.data_ptr(), "dlogits was not written over the logits buffer"
    torch.testing.assert_close(h2.grad, 0.5 * want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        out.loss.backward()


def test_inplace_backward_refused_where_it_cannot_hold():
    inp = make_batch(B=2, T=3, V=5, G=2)
    cfg = lg.LossConfig(aggregation="dapo")
    with pytest.raises(ValueError, match="inplace_backward"):
        lg.grpo_loss(**inp, config=cfg, backend="reference", inplace_backward=True)
    strided = inp["logits"].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match="inplace_backward"):
        lg.grpo_loss(**dict(inp, logits=strided), config=cfg, backend="torch", inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        lg.grpo_loss(**inp, config=cfg, backend="torch", inplace_backward=1)
    with pytest.raises(ValueError, match="return_per_token"):
        lg.grpo_loss(**inp, config=cfg, backend="torch", return_per_token="yes")
