"""The loss from hidden states and the LM head (issue 10 point 4), and linear_token_logprobs.

Grid, and why each case is there:
- hypothesis over every aggregation x trace style/mode x KL x entropy x token weights x lambda x
  masks, fp32 and bf16, bias or not, against the float64 reference that materialises the logits.
  The tolerance rule's baseline is plain torch (the LM head matmul in the inputs' dtype, the
  loss with fp32 math), taken as the worst of three evaluations on one-ulp moves of the inputs:
  a chunked matmul rounds bf16 logits in another order, and a single scalar can land lucky. Tiny
  chunks (2 tokens) so that every case spans several chunks and a partial last one;
- V = 151 936 (a real vocabulary, not a multiple of any block) at small N, one chunk and many;
- the Triton engine under the interpreter at small shapes, both schedules;
- gradcheck in float64 of the reference for dhidden, dW, dbias and dlam (the truth's own check);
- linear_token_logprobs: values and gradients against autograd through materialised logits;
- GRPOLoss.forward_hidden owns lam.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lambda_grpo as lg
import lambda_grpo._linear as linear_mod
from lambda_grpo._validate import validate, validate_linear
from lambda_grpo.reference import reference_linear_loss, reference_loss
from tests._compare import assert_close_to_truth, make_batch

AGGS = ("grpo", "bnpo", "dapo", "dr_grpo", "lambda_grpo")
TRACES = [(None, "ratio"), ("recent", "ratio"), ("both", "ratio"), ("recent", "weight"), ("both", "weight")]


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Two tokens per chunk whatever V and H: every case walks several chunks."""
    monkeypatch.setattr(linear_mod, "chunk_rows", lambda V, H, device: 2)


def _case(B, T, H, V, G, seed, mask, dtype, bias, tw):
    inp = make_batch(B=B, T=T, V=V, G=G, seed=seed, mask=mask)
    g = torch.Generator().manual_seed(seed + 7)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    weights = (torch.rand(B, T, generator=g) + 0.5) if tw else None
    return dict(hidden=hidden, weight=weight, bias=b, tokens=inp["tokens"], mask=inp["mask"],
                advantages=inp["advantages"], group_size=G, old_logp=inp["old_logp"], ref_logp=inp["ref_logp"],
                token_weights=weights)


def _run(route, c, cfg, lam, math_dtype=None):
    """Loss, metrics and gradients to hidden, weight, bias, lam: a backend (math_dtype None), the
    truth (float64: the reference on float64 copies of the same values), or plain torch
    (float32: the LM head's matmul in the inputs' dtype, as a model computes its logits, then
    the reference loss with fp32 math, autograd through both)."""
    as64 = math_dtype == torch.float64

    def leaf(x):
        if x is None:
            return None
        return (x.double() if as64 else x).detach().clone().requires_grad_(True)

    h, w, b = leaf(c["hidden"]), leaf(c["weight"]), leaf(c["bias"])
    lam_t = torch.tensor(float(lam), requires_grad=True) if cfg.uses_lambda else None
    kw = dict(old_logp=c["old_logp"], ref_logp=c["ref_logp"], lam=lam_t, config=cfg, token_weights=c["token_weights"])
    if math_dtype is None:
        out = lg.fused_linear_grpo_loss(h, w, c["tokens"], c["mask"], c["advantages"], c["group_size"], bias=b,
                                        backend=route, **kw)
    elif as64:
        batch = validate_linear(h, w, b, c["tokens"], c["mask"], c["advantages"], c["group_size"], c["old_logp"],
                                c["ref_logp"], lam_t, cfg, None, None, token_weights=c["token_weights"])
        out = reference_linear_loss(h, w, b, batch, cfg, dtype=math_dtype)
    else:
        logits = h @ w.T if b is None else h @ w.T + b
        batch = validate(logits, c["tokens"], c["mask"], c["advantages"], c["group_size"], c["old_logp"],
                         c["ref_logp"], lam_t, cfg, None, None, token_weights=c["token_weights"])
        out = reference_loss(batch, cfg, dtype=math_dtype)
    out.loss.backward()
    return dict(loss=out.loss.detach(), metrics={k: v.detach() for k, v in out.metrics.items()}, dh=h.grad,
                dw=w.grad, db=None if b is None else b.grad, dlam=None if lam_t is None else lam_t.grad)


def _ulp_moved(c, seed):
    """hidden, weight and bias moved by one ulp of their own dtype in random directions: an equally
    valid input for plain torch (our chunked matmuls round the bf16 logits in another order)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(c)
    for k in ("hidden", "weight", "bias"):
        v = c[k]
        if v is None:
            continue
        step = torch.where(torch.rand(v.shape, generator=g) < 0.5, 1, -1)
        if v.dtype in (torch.bfloat16, torch.float16):
            out[k] = (v.view(torch.int16) + step.to(torch.int16)).view(v.dtype)
        else:
            out[k] = torch.nextafter(v, torch.where(step > 0, float("inf"), float("-inf")).to(v.dtype))
    return out


def _baseline(c, cfg, lam):
    """Plain torch's error scale: the farthest from the truth, per quantity, of plain torch on the
    inputs and on two one-ulp moves of them (one evaluation of a scalar can land lucky)."""
    truth = _run(None, c, cfg, lam, torch.float64)
    runs = [_run(None, c, cfg, lam, torch.float32)] + [_run(None, _ulp_moved(c, s), cfg, lam, torch.float32)
                                                       for s in (1, 2)]

    def farthest(get):
        vals = [get(r) for r in runs]
        if vals[0] is None:
            return None
        return max(vals, key=lambda v: float((v.double() - get(truth).double()).abs().nan_to_num(0).max()))

    base = {k: farthest(lambda r, k=k: r[k]) for k in ("loss", "dh", "dw", "db", "dlam")}
    base["metrics"] = {k: farthest(lambda r, k=k: r["metrics"][k]) for k in truth["metrics"]}
    return truth, base


def _compare(got, truth, base, dtype):
    rule = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_to_truth("loss", got["loss"], truth["loss"], base["loss"], rule)
    for k in ("dh", "dw", "db", "dlam"):
        if truth[k] is not None:
            assert got[k].dtype == (truth[k].dtype if k == "dlam" else dtype), k
            assert_close_to_truth(k, got[k], truth[k], base[k], dtype if k != "dlam" else rule)
    assert set(got["metrics"]) == set(truth["metrics"])
    for k in ("ratio_mean", "kl_mean", "entropy_mean", "seq_weight", "lambda"):
        if k in truth["metrics"]:
            assert_close_to_truth(k, got["metrics"][k], truth["metrics"][k], base["metrics"][k], rule, atol=1e-6)


configs = st.builds(
    lambda agg, tr, kl, beta, ent, tau: lg.LossConfig(aggregation=agg, trace=tr[0], trace_mode=tr[1], kl_estimator=kl,
                                                      beta=beta, entropy_coef=ent, temperature=tau),
    st.sampled_from(AGGS), st.sampled_from(TRACES), st.sampled_from(["k1", "k2", "k3"]), st.sampled_from([0.0, 0.1]),
    st.sampled_from([0.0, 0.02]), st.sampled_from([1.0, 0.7]))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=configs, seed=st.integers(0, 10**6), mask=st.sampled_from(["holes", "empty_rows", "len1", "full"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans(), tw=st.booleans(),
       lam=st.sampled_from([0.0, 0.8]))
def test_torch_engine_matches_reference(tiny_chunks, cfg, seed, mask, dtype, bias, tw, lam):
    c = _case(4, 5, 6, 11, 2, seed, mask, dtype, bias, tw)
    truth, base = _baseline(c, cfg, lam)
    _compare(_run("torch", c, cfg, lam), truth, base, dtype)


@pytest.mark.parametrize("chunks", ["one", "tiny"])
def test_real_vocab(chunks, monkeypatch):
    if chunks == "tiny":
        monkeypatch.setattr(linear_mod, "chunk_rows", lambda V, H, device: 3)
    cfg = lg.LossConfig(aggregation="lambda_grpo", beta=0.05, entropy_coef=0.01, trace="recent")
    c = _case(2, 4, 16, 151936, 2, 5, "holes", torch.float32, True, False)
    truth, base = _baseline(c, cfg, 0.5)
    _compare(_run("torch", c, cfg, 0.5), truth, base, torch.float32)


@pytest.mark.parametrize("trace", [(None, "ratio"), ("both", "ratio"), ("recent", "weight")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_engine_matches_reference(tiny_chunks, trace, dtype):
    cfg = lg.LossConfig(aggregation="lambda_grpo", beta=0.1, entropy_coef=0.02, trace=trace[0], trace_mode=trace[1])
    c = _case(4, 5, 6, 37, 2, 11, "empty_rows", dtype, True, True)
    truth, base = _baseline(c, cfg, 0.6)
    _compare(_run("triton", c, cfg, 0.6), truth, base, dtype)


@pytest.mark.parametrize("cfg", [lg.LossConfig(aggregation="lambda_grpo", beta=0.1, entropy_coef=0.05, trace="both"),
                                 lg.LossConfig(aggregation="grpo", trace="recent", trace_mode="weight", beta=0.1)])
def test_reference_gradcheck(cfg):
    c = _case(2, 3, 3, 5, 2, 2, "holes", torch.float64, True, True)

    def f(h, w, b, lam):
        batch = validate_linear(h, w, b, c["tokens"], c["mask"], c["advantages"], 2, c["old_logp"].double(),
                                c["ref_logp"].double(), lam, cfg, None, None, token_weights=c["token_weights"])
        return reference_linear_loss(h, w, b, batch, cfg).loss

    args = [c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True),
            c["bias"].clone().requires_grad_(True), torch.tensor(0.4, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_token_logprobs(tiny_chunks, backend):
    c = _case(3, 4, 5, 23, 1, 4, "full", torch.float32, True, False)
    h = c["hidden"].clone().requires_grad_(True)
    w = c["weight"].clone().requires_grad_(True)
    b = c["bias"].clone().requires_grad_(True)
    lp, H = lg.linear_token_logprobs(h, w, c["tokens"], bias=b, temperature=0.8, backend=backend)
    g = torch.Generator().manual_seed(1)
    up_lp, up_h = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    ((lp * up_lp).sum() + (H * up_h).sum()).backward()

    h2, w2, b2 = (x.detach().double().requires_grad_(True) for x in (c["hidden"], w, b))
    lsm = torch.log_softmax((h2 @ w2.T + b2) / 0.8, -1)
    lp2 = lsm.gather(-1, c["tokens"][..., None]).squeeze(-1)
    H2 = -(lsm.exp() * lsm).sum(-1)
    ((lp2 * up_lp.double()).sum() + (H2 * up_h.double()).sum()).backward()
    torch.testing.assert_close(lp.double(), lp2.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(H.double(), H2.detach(), rtol=1e-5, atol=1e-5)
    for got, want in ((h.grad, h2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert lg.linear_token_logprobs(h, w, c["tokens"], return_entropy=False, backend=backend)[1] is None


def test_module_forward_hidden_owns_lambda():
    cfg = lg.LossConfig(aggregation="lambda_grpo")
    loss_fn = lg.GRPOLoss(cfg, backend="torch", lam_init=0.3)
    c = _case(4, 5, 6, 11, 2, 9, "holes", torch.float32, False, False)
    out = loss_fn.forward_hidden(c["hidden"], c["weight"], c["tokens"], c["mask"], c["advantages"], 2,
                                 old_logp=c["old_logp"])
    out.loss.backward()
    assert loss_fn.lam.grad is not None and float(out.metrics["lambda"]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="lam"):
        loss_fn.forward_hidden(c["hidden"], c["weight"], c["tokens"], c["mask"], c["advantages"], 2, lam=loss_fn.lam)
    with pytest.raises(ValueError, match="weight"):
        lg.fused_linear_grpo_loss(c["hidden"], c["weight"][:, :3], c["tokens"], c["mask"], c["advantages"], 2,
                                  config=cfg, lam=0.0)


@pytest.mark.parametrize("trace", [None, "both"])  # the fused schedule and the two-pass one
@pytest.mark.parametrize("bias_trainable", [False, True])
def test_frozen_head_skips_its_gradient(tiny_chunks, monkeypatch, trace, bias_trainable):
    """A frozen LM head (the trainer's --trainable-layers, LoRA): the loss and dhidden are those of a
    trainable head bit for bit, the weight gets no gradient and no (V, H) dW is computed; a
    trainable bias next to a frozen weight still gets its gradient."""
    cfg = lg.LossConfig(aggregation="lambda_grpo", trace=trace)
    c = _case(4, 5, 6, 11, 2, 3, "holes", torch.float32, True, False)
    addmm = []
    real = torch.Tensor.addmm_

    def spy(self, *a, **k):
        addmm.append(tuple(self.shape))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "addmm_", spy)
    outs = []
    for frozen in (False, True):
        h = c["hidden"].clone().requires_grad_(True)
        w = c["weight"].clone().requires_grad_(not frozen)
        b = c["bias"].clone().requires_grad_(not frozen or bias_trainable)
        lam = torch.tensor(0.2, requires_grad=True)
        addmm.clear()
        out = lg.fused_linear_grpo_loss(h, w, c["tokens"], c["mask"], c["advantages"], 2, bias=b, lam=lam, config=cfg,
                                        old_logp=c["old_logp"], backend="torch")
        out.loss.backward()
        outs.append((out.loss.detach(), h.grad, w.grad, b.grad, lam.grad, list(addmm)))
    (l0, h0, w0, b0, lam0, mm0), (l1, h1, w1, b1, lam1, mm1) = outs
    assert torch.equal(l0, l1) and torch.equal(h0, h1) and torch.equal(lam0, lam1)
    assert w0 is not None and w1 is None
    assert mm0 and (11, 6) in mm0
    if bias_trainable:
        assert torch.equal(b0, b1) and (11, 6) in mm1  # bias only: the head's gradients are computed
    else:
        assert b1 is None and (11, 6) not in mm1
