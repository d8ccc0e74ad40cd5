"""64-bit offsets: the vocab kernels address a logits row that starts past 2^31 elements.

The logits are a (3, 1, V) bf16 (or fp32) view with a row stride of 2^30 elements into one
2^31 + V element buffer (4.3 GB of address space in bf16, 8.6 GB in fp32, of which only the
three rows are ever touched), so row 2 starts at element 2^31 while the grid has 3 programs.
With int32 row offsets the address wraps to 2^31 elements *before* the buffer. The check runs
in a subprocess so that such a wild read fails this test instead of killing pytest. The fp32
twin is where the tolerance rule is tight enough to see small-entry errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)"),
]

SCRIPT = textwrap.dedent(r"""
    import os, sys
    import torch
    sys.path.insert(0, os.getcwd())
    import tests.conftest  # interpreter set-up, as under pytest
    import lambda_grpo as lg
    from lambda_grpo.kernels.vocab_bwd import vocab_backward
    from lambda_grpo.kernels.vocab_fwd import vocab_forward
    from tests._compare import assert_close_to_truth, max_err, run

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    DTYPE = getattr(torch, sys.argv[1])
    V, STRIDE = 151936, 2 ** 30
    big = torch.empty(2 * STRIDE + V, dtype=DTYPE, device=dev)
    g = torch.Generator().manual_seed(0)
    compact = (torch.randn(3, 1, V, generator=g) * 3).to(DTYPE)
    for i in range(3):
        big[i * STRIDE: i * STRIDE + V] = compact[i, 0].to(dev)
    strided = big.as_strided((3, 1, V), (STRIDE, STRIDE, 1))
    assert strided.storage_offset() + 2 * STRIDE >= 2 ** 31
    tokens = torch.tensor([[5], [V - 1], [77777]], device=dev)
    mask = torch.ones(3, 1, dtype=torch.bool, device=dev)

    # kernel level: forward, then the backward written in place into the strided rows
    x2 = strided.reshape(3, V)
    assert x2.stride(0) == STRIDE
    logp, lse, ent = vocab_forward(x2, tokens.view(-1), mask.view(-1), 1.0, True)
    ref = torch.log_softmax(compact.double().view(3, V), -1)
    want = ref.gather(-1, tokens.cpu().view(3, 1)).view(-1)
    assert max_err(logp.cpu(), want) < 1e-4, (logp, want)
    want_h = -(ref.exp() * ref).sum(-1)
    assert max_err(ent.cpu(), want_h) < 1e-3, (ent, want_h)
    coef = torch.tensor([1.0, -2.0, 0.5], device=dev)
    vocab_backward(x2, tokens.view(-1), mask.view(-1), lse, coef, torch.ones(1, device=dev), 1.0, out=x2)
    p = ref.exp()
    d = -coef.cpu().double()[:, None] * p
    d[torch.arange(3), tokens.cpu().view(-1)] += coef.cpu().double()
    for i in range(3):
        err = max_err(big[i * STRIDE: i * STRIDE + V].cpu(), d[i])
        # rounding of the output: half an ulp of the largest entry (bf16 2^-8 relative; fp32 2^-24,
        # with room for the fp32 math of p = exp(x - lse))
        rel = 2 ** -8 if DTYPE == torch.bfloat16 else 2 ** -20
        assert err <= rel * float(d[i].abs().max()) + 1e-6, (i, err)

    # whole loss through the public API, both paths, against the reference on a compact copy
    for i in range(3):
        big[i * STRIDE: i * STRIDE + V] = compact[i, 0].to(dev)
    adv = torch.tensor([1.0, -0.5, 0.3], device=dev)
    for cfg in (lg.LossConfig(aggregation="lambda_grpo", entropy_coef=0.01),
                lg.LossConfig(aggregation="grpo", trace="recent")):
        leaf = strided.detach().requires_grad_(True)  # a leaf that keeps the 2^30 row stride
        lam = torch.tensor(0.5, requires_grad=True)
        out = lg.grpo_loss(leaf, tokens, mask, adv, group_size=3, lam=lam, config=cfg, backend="triton")
        out.loss.backward()
        small = dict(logits=compact.to(dev), tokens=tokens, mask=mask, advantages=adv, group_size=3,
                     old_logp=None, ref_logp=None)
        truth = run("reference", small, cfg, 0.5, dtype=torch.float64)
        base = run("reference", small, cfg, 0.5, dtype=torch.float32)
        assert_close_to_truth("loss", out.loss.detach(), truth["loss"], base["loss"], DTYPE)
        assert_close_to_truth("dlogits", leaf.grad, truth["dlogits"], base["dlogits"], DTYPE,
                              compute=base.get("dlogits_compute"))
        if truth["dlam"] is not None:
            assert_close_to_truth("dlam", lam.grad, truth["dlam"], base["dlam"], DTYPE)
    print("OK")
""")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_offsets_past_2_pow_31(dtype):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SCRIPT, dtype], cwd=root, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), (
        f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}")
