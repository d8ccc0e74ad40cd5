"""torch.compile(fullgraph=True) traces a training step's forward through grpo_loss (issue 3 §3).

On CPU the op dispatches to the torch backend through torch.library custom ops
(lambda_grpo/_ops.py). The compiled loss and gradients are compared with the float64
reference, and a change of lambda (a runtime tensor) must not recompile.
"""

import pytest
import torch

import lambda_grpo as lg
from tests._compare import assert_close_to_truth, make_batch, run

CFGS = {
    # fused schedule (dlogits written in the forward), KL and entropy terms, learnable lambda
    "lambda_fused": lg.LossConfig(aggregation="lambda_grpo", beta=0.1, entropy_coef=0.01),
    # two-pass schedule (ratio-mode trace: the backward op recomputes the softmax)
    "trace_two_pass": lg.LossConfig(aggregation="grpo", trace="both", entropy_coef=0.01, temperature=0.7),
}


@pytest.mark.parametrize("name", list(CFGS))
def test_fullgraph_compile_matches_reference(name):
    cfg = CFGS[name]
    torch._dynamo.reset()
    inp = make_batch(B=4, T=6, V=50, G=2, seed=3)
    torch.manual_seed(0)
    proj = torch.randn(16, 50, dtype=torch.float64)
    h = torch.randn(4, 6, 16, dtype=torch.float64)
    logits = (h @ proj).float()
    loss_fn = lg.GRPOLoss(cfg, backend="torch")

    def forward(x):
        out = loss_fn(x, inp["tokens"], inp["mask"], inp["advantages"], group_size=2,
                      old_logp=inp["old_logp"], ref_logp=inp["ref_logp"])
        return out.loss, out.metrics

    compiled = torch.compile(forward, fullgraph=True)
    x = logits.clone().requires_grad_(True)
    loss, metrics = compiled(x)
    loss.backward()

    inputs = dict(inp, logits=logits)
    lam = 0.0
    truth = run("reference", inputs, cfg, lam, dtype=torch.float64)
    base = run("reference", inputs, cfg, lam, dtype=torch.float32)
    assert_close_to_truth("loss", loss.detach(), truth["loss"], base["loss"], torch.float32)
    assert_close_to_truth("dlogits", x.grad, truth["dlogits"], base["dlogits"], torch.float32)
    for k in truth["metrics"]:
        assert_close_to_truth(k, metrics[k], truth["metrics"][k], base["metrics"][k], torch.float32, atol=1e-5)
    if cfg.aggregation == "lambda_grpo":
        assert_close_to_truth("dlam", loss_fn.lam.grad, truth["dlam"], base["dlam"], torch.float32)


def test_new_lambda_value_does_not_recompile():
    torch._dynamo.reset()
    cfg = CFGS["lambda_fused"]
    inp = make_batch(B=4, T=6, V=50, G=2, seed=5, mask="empty_rows")
    loss_fn = lg.GRPOLoss(cfg, backend="torch")

    def forward(x):
        return loss_fn(x, inp["tokens"], inp["mask"], inp["advantages"], group_size=2,
                       old_logp=inp["old_logp"], ref_logp=inp["ref_logp"]).loss

    compiled = torch.compile(forward, fullgraph=True)
    losses = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lam in (0.0, 0.7, -2.0):
            with torch.no_grad():
                loss_fn.lam.fill_(lam)
            x = inp["logits"].clone().requires_grad_(True)
            losses.append(compiled(x))
            losses[-1].backward()
    # lambda really reached the compiled graph: different values, different losses
    assert len({float(v) for v in losses}) == 3
