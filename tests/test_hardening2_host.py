"""Hardening, second round (issue 18): the findings on the host path, one test each; every one
failed on bd63c12 (before the fixes) and passes now. Findings 1, 11, 12 and the property tests
are in tests/test_hardening2.py; 2, 5, 6 (the verl adapter) in tests/test_integration_verl.py."""

from __future__ import annotations

import pytest
import torch

import lambda_grpo as lg
from tests._compare import make_batch

B, T, V, G = 4, 5, 11, 2
FAST = ["torch", "triton"]


# --- 3. inplace_backward with a leaf logits: the docs say what the code does -------------------

@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("trace", [None, "recent"])  # fused schedule; two-pass schedule
def test_3_inplace_leaf_gradient_is_the_logits_storage_as_documented(backend, trace):
    """inplace_backward gives a leaf logits its own buffer as .grad, no copy (the memory the option
    exists to save; tests/test_torch_memory.py counts it): .grad shares the logits' storage, so
    zeroing the logits zeroes the gradient. bd63c12's README and docs/math.md §12 promised a copy;
    they now say this, and this test holds them to it."""
    from pathlib import Path

    inp = make_batch(B=B, T=T, V=V, G=G, seed=4)
    cfg = lg.LossConfig(aggregation="dapo", trace=trace)
    ref = inp["logits"].clone().requires_grad_(True)
    lg.grpo_loss(ref, inp["tokens"], inp["mask"], inp["advantages"], G, inp["old_logp"], config=cfg,
                 backend=backend).loss.backward()
    x = inp["logits"].clone().requires_grad_(True)
    lg.grpo_loss(x, inp["tokens"], inp["mask"], inp["advantages"], G, inp["old_logp"], config=cfg, backend=backend,
                 inplace_backward=True).loss.backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=0)
    assert x.grad.data_ptr() == x.data_ptr()
    with torch.no_grad():
        x.zero_()  # the user refills the logits buffer: the gradient goes with it, as documented
    assert not x.grad.any()
    root = Path(__file__).resolve().parent.parent
    math_md = (root / "docs" / "math.md").read_text()
    section = math_md.split("## 12. In-place backward", 1)[1].split("\n## ", 1)[0]
    assert "shares the logits' storage" in section and "copies it into" not in section
    readme = (root / "README.md").read_text()
    assert "`.grad` shares the logits' storage" in readme and "autograd copies the gradient into `.grad`" not in readme


# --- 4, 7. meta-device tensors on the entry points from log-probs and hidden states -----------

def test_4_logprobs_entry_refuses_meta_tensors():
    logp = torch.randn(B, T, device="meta")
    mask = torch.ones(B, T, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"^logp: expected a tensor with values .* got a tensor on the meta device"):
        lg.grpo_loss_from_logprobs(logp, mask, torch.zeros(B, device="meta"), G,
                                   config=lg.LossConfig(aggregation="dapo"))


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_7_hidden_entry_points_refuse_meta_tensors(which):
    h = torch.randn(B, T, 6)
    w = torch.randn(V, 6)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    if which == "hidden":
        h, tokens, mask = h.to("meta"), tokens.to("meta"), mask.to("meta")
    else:
        w = w.to("meta")
    msg = rf"^{which}: expected a tensor with values"
    with pytest.raises(ValueError, match=msg):
        lg.fused_linear_grpo_loss(h, w, tokens, mask, torch.zeros(B, device=h.device), G,
                                  config=lg.LossConfig(aggregation="dapo"), backend="torch")
    with pytest.raises(ValueError, match=msg):
        lg.linear_token_logprobs(h, w, tokens, backend="torch")


# --- 8. linear_token_logprobs: errors name its own arguments ----------------------------------

def test_8_linear_token_logprobs_names_tokens():
    h, w = torch.randn(B, T, 6), torch.randn(V, 6)
    with pytest.raises(ValueError, match=r"^tokens: expected a torch.Tensor, got list"):
        lg.linear_token_logprobs(h, w, [[0] * T] * B)
    with pytest.raises(ValueError, match=r"^tokens: expected shape \(20,\).* got shape \(20, 1\)"):
        lg.linear_token_logprobs(h.reshape(B * T, 6), w, torch.zeros(B * T, 1, dtype=torch.long))


# --- 9. float64 hidden states on backend="triton": the message names hidden -------------------

def test_9_triton_float64_hidden_names_hidden():
    h, w = torch.randn(B, T, 6, dtype=torch.float64), torch.randn(V, 6, dtype=torch.float64)
    tokens, mask = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^hidden: expected dtype in"):
        lg.fused_linear_grpo_loss(h, w, tokens, mask, torch.zeros(B), G, config=lg.LossConfig(aggregation="dapo"),
                                  backend="triton")
    with pytest.raises(ValueError, match=r"^hidden: expected dtype in"):
        lg.linear_token_logprobs(h, w, tokens, backend="triton")


# --- 10. logits with a non-unit stride along V on backend="triton" ----------------------------

@pytest.mark.parametrize("trace", [None, "recent"])
def test_10_triton_takes_logits_strided_along_v(trace):
    """The Triton kernels read rows with unit stride along V; other layouts are copied once, and the
    result and the gradient equal those of the contiguous logits (docs: README, Usage)."""
    inp = make_batch(B=B, T=T, V=V, G=G, seed=6)
    cfg = lg.LossConfig(aggregation="grpo", trace=trace)
    base = inp["logits"].clone().requires_grad_(True)
    want = lg.grpo_loss(base, inp["tokens"], inp["mask"], inp["advantages"], G, inp["old_logp"], config=cfg,
                        backend="triton")
    want.loss.backward()
    storage = inp["logits"].transpose(1, 2).contiguous().requires_grad_(True)  # (B, V, T)
    x = storage.transpose(1, 2)  # (B, T, V) with stride 1 along T, T along V
    assert x.stride(-1) != 1
    got = lg.grpo_loss(x, inp["tokens"], inp["mask"], inp["advantages"], G, inp["old_logp"], config=cfg,
                       backend="triton")
    got.loss.backward()
    assert torch.equal(got.loss, want.loss)
    assert torch.equal(storage.grad.transpose(1, 2), base.grad)
    # packed (N, V) logits, where a reshape keeps the stride: copied once, and the same numbers
    N = B * T
    cu = torch.arange(0, N + 1, T)
    flat = inp["logits"].reshape(N, V)
    base2 = flat.clone().requires_grad_(True)
    want2 = lg.grpo_loss(base2, inp["tokens"].reshape(N), inp["mask"].reshape(N), inp["advantages"], G,
                         inp["old_logp"].reshape(N), config=cfg, backend="triton", cu_seqlens=cu)
    want2.loss.backward()
    storage2 = flat.T.contiguous().requires_grad_(True)  # (V, N)
    got2 = lg.grpo_loss(storage2.T, inp["tokens"].reshape(N), inp["mask"].reshape(N), inp["advantages"], G,
                        inp["old_logp"].reshape(N), config=cfg, backend="triton", cu_seqlens=cu)
    got2.loss.backward()
    assert torch.equal(got2.loss, want2.loss) and torch.equal(storage2.grad.T, base2.grad)
    lp = lg.token_logprobs(storage2.T, inp["tokens"].reshape(N), backend="triton")
    assert torch.equal(lp, lg.token_logprobs(flat, inp["tokens"].reshape(N), backend="triton"))
