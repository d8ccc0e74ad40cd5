"""What backend="torch" allocates in a step (no timing): the gradient is the only (B, T, V)
buffer, and with inplace_backward there is none.

Both schedules are covered: fused (no ratio-mode trace: dlogits written by the forward) and
two-pass (ratio-mode trace: dlogits written by the backward).
"""

from __future__ import annotations

import resource
import sys

import pytest
import torch

import lambda_grpo as lg
from tests._compare import make_batch

SCHEDULES = {
    "fused": lg.LossConfig(aggregation="dapo", eps_high=0.28),
    "two_pass": lg.LossConfig(aggregation="lambda_grpo", trace="both"),
}


def _step(inputs, cfg, inplace, leaf=False):
    logits = inputs["logits"] if leaf else inputs["logits"].detach().clone().requires_grad_(True)
    lam = torch.tensor(0.3, requires_grad=True) if cfg.aggregation == "lambda_grpo" else None
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    out = lg.grpo_loss(logits, lam=lam, config=cfg, backend="torch", inplace_backward=inplace, **kw)
    return logits, out


# in place, the passes write into the rows they read: also with an entropy term (log p kept next
# to p), a temperature, and bf16 logits (math in fp32, written back to bf16)
INPLACE = {
    **SCHEDULES,
    "fused_entropy_tau": lg.LossConfig(aggregation="grpo", beta=0.04, entropy_coef=0.02, temperature=0.7),
    "two_pass_entropy_tau": lg.LossConfig(aggregation="lambda_grpo", trace="both", entropy_coef=0.02,
                                          temperature=0.7),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("schedule", sorted(INPLACE))
def test_inplace_gradient_is_the_logits_storage(schedule, dtype):
    """inplace_backward=True: .grad is the logits' own storage (autograd must not copy it into
    a new buffer) and equals the gradient of inplace_backward=False bit for bit."""
    cfg = INPLACE[schedule]
    inputs = make_batch(B=4, T=6, V=37, G=2, seed=3, dtype=dtype, mask="empty_rows")
    x, out = _step(inputs, cfg, False)
    out.loss.backward()
    y, out = _step(inputs, cfg, True)
    ptr = y.data_ptr()
    out.loss.backward()
    assert y.grad.data_ptr() == ptr
    torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults of fresh glibc mappings")
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_one_gradient_buffer_per_step(schedule, inplace):
    """Minor page faults of one forward + backward: about one (B, T, V) buffer (the gradient, a
    fresh mapping) without inplace_backward, a small fraction of one with it. Catches a second
    (B, T, V) buffer anywhere in the step (e.g. autograd materialising a zero gradient for an
    unused (B, T, V) output, or copying the in-place gradient)."""
    cfg = SCHEDULES[schedule]
    # 64 MiB of fp32 logits: above glibc's largest mmap threshold (32 MiB), so every (B, T, V) buffer
    # is a fresh mapping whose pages fault when first written
    inputs = make_batch(B=8, T=128, V=16384, G=2, seed=1, mask="full")
    pages = inputs["logits"].numel() * 4 // 4096
    for _ in range(2):  # the first step also faults in one-time allocations
        logits = inputs["logits"].detach().clone().requires_grad_(True)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _, out = _step({**inputs, "logits": logits}, cfg, inplace, leaf=True)
        out.loss.backward()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        del logits, out
    if inplace:
        assert faults < 0.25 * pages, (faults, pages)
    else:
        assert faults < 1.25 * pages, (faults, pages)
