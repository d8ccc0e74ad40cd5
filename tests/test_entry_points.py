"""The loss from per-token log-probs, non-contiguous groups and per-token weights (issue 10).

Grid, and why each case is there:
- from log-probs against the float64 reference of the same row math, hypothesis over every
  aggregation x trace style/mode x KL x entropy x dual clip x token weights x masks (holes, empty
  rows, length 1), fp32/bf16/float64 log-probs: the closed-form gradients dL/dlogp, dL/dH and
  dL/dlam are what autograd of the reference gives;
- end to end: logits -> autograd log_softmax -> grpo_loss_from_logprobs equals
  grpo_loss(backend="reference") on the logits, loss and dlogits;
- split by rank: a batch shuffled and cut into row subsets, each with its group_lengths /
  group_index and the global normalisers, sums to the full-batch loss and gradients, for every
  aggregation whose normaliser is global (bnpo's is local by definition), with traces and lambda,
  on the torch and triton engines and from log-probs;
- token weights against a computation by hand;
- the new arguments' bad-input rules.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lambda_grpo as lg
from lambda_grpo._validate import validate_logprobs
from lambda_grpo.reference import reference_rows
from tests._compare import assert_close_to_truth, make_batch

AGGS = ("grpo", "bnpo", "dapo", "dr_grpo", "lambda_grpo")
TRACES = [(None, "ratio"), ("recent", "ratio"), ("both", "ratio"), ("recent", "weight"), ("both", "weight")]


def _logp_inputs(B, T, V, G, seed, mask, dtype, with_entropy=True, token_weights=False):
    inp = make_batch(B=B, T=T, V=V, G=G, seed=seed, mask=mask)
    with torch.no_grad():
        lsm = torch.log_softmax(inp["logits"].double(), -1)
        logp = lsm.gather(-1, inp["tokens"][..., None]).squeeze(-1)
        H = -(lsm.exp() * lsm).sum(-1)
    g = torch.Generator().manual_seed(seed + 1)
    tw = (torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5 + 0.25) if token_weights else None
    return dict(logp=logp.to(dtype), entropy=H.to(dtype) if with_entropy else None, mask=inp["mask"],
                advantages=inp["advantages"], group_size=G, old_logp=inp["old_logp"], ref_logp=inp["ref_logp"],
                token_weights=None if tw is None else tw.float())


def _rows_run(inputs, cfg, lam, math_dtype=None):
    """Loss, metrics and gradients to logp, entropy and lam: ours (math_dtype None) or the
    reference row math in math_dtype, on leaves holding the same values."""
    lp_dtype = torch.float64 if math_dtype == torch.float64 else inputs["logp"].dtype
    logp = inputs["logp"].detach().to(lp_dtype).requires_grad_(True)
    ent = inputs["entropy"]
    ent = None if ent is None else ent.detach().to(lp_dtype).requires_grad_(True)
    lam_t = torch.tensor(float(lam), requires_grad=True) if cfg.uses_lambda else None
    kw = {k: v for k, v in inputs.items() if k not in ("logp", "entropy", "mask", "advantages", "group_size")}
    if math_dtype is None:
        out = lg.grpo_loss_from_logprobs(logp, inputs["mask"], inputs["advantages"], inputs["group_size"],
                                         entropy=ent, lam=lam_t, config=cfg, **kw)
    else:
        batch = validate_logprobs(logp, ent, inputs["mask"], inputs["advantages"], inputs["group_size"],
                                  kw.get("old_logp"), kw.get("ref_logp"), lam_t, cfg, None, None,
                                  token_weights=kw.get("token_weights"))
        out_dtype = torch.float64 if lp_dtype == torch.float64 else torch.float32
        out = reference_rows(logp, ent if cfg.needs_entropy else None, batch, cfg, out_dtype, math_dtype)
    out.loss.backward()
    zero = torch.zeros_like(logp)
    return dict(loss=out.loss.detach(), metrics={k: v.detach() for k, v in out.metrics.items()},
                dlogp=logp.grad if logp.grad is not None else zero,
                dH=None if ent is None else (ent.grad if ent.grad is not None else torch.zeros_like(ent)),
                dlam=None if lam_t is None else lam_t.grad)


configs = st.builds(
    lambda agg, tr, kl, beta, ent, dual, adv_min: lg.LossConfig(
        aggregation=agg, trace=tr[0], trace_mode=tr[1], kl_estimator=kl, beta=beta, entropy_coef=ent,
        dual_clip=dual, adv_clamp_min=adv_min),
    st.sampled_from(AGGS), st.sampled_from(TRACES), st.sampled_from(["k1", "k2", "k3"]),
    st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 0.02]), st.sampled_from([None, 3.0]),
    st.sampled_from([None, -0.1]))


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, seed=st.integers(0, 10**6), mask=st.sampled_from(["holes", "empty_rows", "len1", "full"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), tw=st.booleans(),
       lam=st.sampled_from([0.0, 0.7, -1.5]))
def test_from_logprobs_matches_reference_rows(cfg, seed, mask, dtype, tw, lam):
    inputs = _logp_inputs(6, 5, 7, 3, seed, mask, dtype, with_entropy=True, token_weights=tw)
    truth = _rows_run(inputs, cfg, lam, torch.float64)
    base = _rows_run(inputs, cfg, lam, torch.float32) if dtype != torch.float64 else truth
    got = _rows_run(inputs, cfg, lam)
    rule = torch.float32 if dtype != torch.float64 else torch.float64
    assert_close_to_truth("loss", got["loss"], truth["loss"], base["loss"], rule)
    assert_close_to_truth("dlogp", got["dlogp"], truth["dlogp"], base["dlogp"], rule)
    assert_close_to_truth("dH", got["dH"], truth["dH"], base["dH"], rule)
    if truth["dlam"] is not None:
        assert_close_to_truth("dlam", got["dlam"], truth["dlam"], base["dlam"], rule)
    assert set(got["metrics"]) == set(truth["metrics"])
    for k in ("ratio_mean", "kl_mean", "entropy_mean", "seq_weight", "lambda"):
        if k in truth["metrics"]:
            assert_close_to_truth(k, got["metrics"][k], truth["metrics"][k], base["metrics"][k], rule, atol=1e-6)


@pytest.mark.parametrize("cfg", [
    lg.LossConfig(aggregation="lambda_grpo", beta=0.1, entropy_coef=0.02, trace="both", temperature=0.8),
    lg.LossConfig(aggregation="dr_grpo", beta=0.05, kl_estimator="k2", trace="recent", trace_mode="weight"),
])
def test_from_logprobs_end_to_end_equals_grpo_loss(cfg):
    """logits -> autograd log_softmax (at the caller's temperature) -> from_logprobs: the same loss
    and dlogits as grpo_loss(backend="reference") on the logits."""
    inp = make_batch(B=4, T=6, V=9, G=2, seed=31, mask="empty_rows", dtype=torch.float64)
    x1 = inp["logits"].clone().requires_grad_(True)
    lam1 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    want = lg.grpo_loss(**dict(inp, logits=x1), lam=lam1, config=cfg, backend="reference")
    want.loss.backward()

    x2 = inp["logits"].clone().requires_grad_(True)
    lam2 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    lsm = torch.log_softmax(x2 / cfg.temperature, -1)
    logp = lsm.gather(-1, inp["tokens"][..., None]).squeeze(-1)
    H = -(lsm.exp() * lsm).sum(-1)
    got = lg.grpo_loss_from_logprobs(logp, inp["mask"], inp["advantages"], 2, old_logp=inp["old_logp"],
                                     ref_logp=inp["ref_logp"], entropy=H, lam=lam2, config=cfg)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-13)
    if cfg.uses_lambda:
        torch.testing.assert_close(lam2.grad, lam1.grad, rtol=1e-10, atol=1e-13)
    for k, v in want.metrics.items():
        torch.testing.assert_close(got.metrics[k], v, rtol=1e-10, atol=1e-13)


def _split_case(seed):
    B, T, V, G = 8, 6, 7, 4
    inp = make_batch(B=B, T=T, V=V, G=G, seed=seed, mask="empty_rows", dtype=torch.float64)
    n = inp["mask"].sum(1)
    group_lengths = n.view(B // G, G).repeat_interleave(G, dim=0)  # row i: the lengths of its group
    group_index = torch.arange(B) % G
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B, generator=g)
    parts = [perm[:3], perm[3:5], perm[5:]]  # uneven "ranks", groups spread over all of them
    return inp, group_lengths, group_index, parts


def _grads(fn, inp):
    x = inp["logits"].clone().requires_grad_(True)
    lam = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    out = fn(x, lam)
    out.loss.backward()
    return out.loss.detach(), x.grad, lam.grad


@pytest.mark.parametrize("route", ["torch", "triton", "logprobs"])
@pytest.mark.parametrize("agg", ["grpo", "dapo", "dr_grpo", "lambda_grpo"])
@pytest.mark.parametrize("trace", [(None, "ratio"), ("both", "ratio"), ("recent", "weight")])
def test_split_by_rank_sums_to_full_batch(route, agg, trace):
    inp, gl, gi, parts = _split_case(seed=7)
    if route == "triton":
        inp = dict(inp, logits=inp["logits"].float())
    cfg = lg.LossConfig(aggregation=agg, trace=trace[0], trace_mode=trace[1], beta=0.05, entropy_coef=0.01)
    n_tok = int(inp["mask"].sum())
    n_seq = inp["mask"].shape[0]

    def loss(x, lam, rows=None):
        kw = dict(old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], lam=lam, config=cfg)
        if rows is None:  # the full batch, contiguous groups, local counts = global counts
            sel = dict(mask=inp["mask"], adv=inp["advantages"], extra=dict(group_size=4))
        else:
            kw.update(old_logp=inp["old_logp"][rows], ref_logp=inp["ref_logp"][rows], num_tokens=n_tok,
                      num_sequences=n_seq)
            sel = dict(mask=inp["mask"][rows], adv=inp["advantages"][rows],
                       extra=dict(group_size=4, group_lengths=gl[rows], group_index=gi[rows]))
        xs = x if rows is None else x[rows]
        toks = inp["tokens"] if rows is None else inp["tokens"][rows]
        if route == "logprobs":
            lsm = torch.log_softmax(xs, -1)
            H = -(lsm.exp() * lsm).sum(-1)
            extra = dict(sel["extra"])
            G = extra.pop("group_size")
            return lg.grpo_loss_from_logprobs(lsm.gather(-1, toks[..., None]).squeeze(-1), sel["mask"], sel["adv"],
                                              G, entropy=H, **extra, **kw)
        return lg.grpo_loss(xs, toks, sel["mask"], sel["adv"], backend=route, **sel["extra"], **kw)

    full = _grads(lambda x, lam: loss(x, lam), inp)
    x = inp["logits"].clone().requires_grad_(True)
    lam = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    total = sum(loss(x, lam, rows).loss for rows in parts)
    total.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if route == "triton" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total.detach().to(full[0].dtype), full[0], **tol)
    torch.testing.assert_close(x.grad, full[1], **tol)
    if cfg.uses_lambda:
        torch.testing.assert_close(lam.grad, full[2], **tol)


@pytest.mark.parametrize("route", ["reference", "torch", "triton", "logprobs"])
def test_token_weights_by_hand(route):
    """B = 1, T = 2, V = 2 with equal logits: on-policy, rho = 1, nothing clipped, logp = -ln 2.
    dapo: loss = -(w_0 A + w_1 A) / 2, and d loss / d logp_t = -w_t A rho / 2 = -w_t A / 2
    (drho/dlogp = rho). With A = 2, w = (0.5, 3): loss = -(1 + 6) / 2 = -3.5,
    d loss / d logp = (-0.5, -3). Through logp = x_y - lse: d logp_t / d x_tj = 1[j = y] - 1/2."""
    cfg = lg.LossConfig(aggregation="dapo")
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    tokens = torch.tensor([[0, 1]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([2.0])
    tw = torch.tensor([[0.5, 3.0]])
    if route == "logprobs":
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        out = lg.grpo_loss_from_logprobs(logp, mask, adv, 1, config=cfg, token_weights=tw)
    else:
        out = lg.grpo_loss(logits, tokens, mask, adv, group_size=1, config=cfg, backend=route, token_weights=tw)
    out.loss.backward()
    assert abs(float(out.loss.detach()) - (-3.5)) < 1e-6
    dlogp = torch.tensor([-0.5, -3.0])
    want = torch.stack([dlogp[0] * torch.tensor([0.5, -0.5]), dlogp[1] * torch.tensor([-0.5, 0.5])])[None]
    torch.testing.assert_close(logits.grad, want, rtol=0, atol=1e-6)


@lg.check_values()  # the value rules raise (by default they poison the loss: tests/test_value_rules.py)
def test_new_arguments_bad_input():
    inp = make_batch(B=4, T=5, V=7, G=2, seed=1)
    cfg = lg.LossConfig(aggregation="lambda_grpo")
    n = inp["mask"].sum(1)
    gl = torch.stack([n, n], 1)
    gi = torch.zeros(4, dtype=torch.long)
    lam = torch.tensor(0.0)
    with pytest.raises(ValueError, match="group_index"):
        lg.grpo_loss(**inp, lam=lam, config=cfg, backend="torch", group_lengths=gl)
    with pytest.raises(ValueError, match="group_lengths"):
        lg.grpo_loss(**inp, lam=lam, config=cfg, backend="torch", group_index=gi)
    bad = gl.clone()
    bad[2, 0] += 1
    with pytest.raises(ValueError, match=r"group_lengths.*row 2"):
        lg.grpo_loss(**inp, lam=lam, config=cfg, backend="torch", group_lengths=bad, group_index=gi)
    with pytest.raises(ValueError, match="group_index"):
        lg.grpo_loss(**inp, lam=lam, config=cfg, backend="torch", group_lengths=gl, group_index=gi + 2)
    with pytest.raises(ValueError, match="group_lengths"):
        lg.grpo_loss(**inp, lam=lam, config=cfg, backend="torch", group_lengths=gl.float(), group_index=gi)
    with pytest.raises(ValueError, match="token_weights"):
        lg.grpo_loss(**inp, lam=lam, config=cfg, backend="torch", token_weights=torch.ones(4, 4))
    ok = lg.grpo_loss(**dict(inp, group_size=2), lam=lam, config=cfg, backend="torch", group_lengths=gl, group_index=gi)
    assert torch.isfinite(ok.loss)
    logp = torch.randn(4, 5)
    with pytest.raises(ValueError, match="entropy"):
        lg.grpo_loss_from_logprobs(logp, inp["mask"], inp["advantages"], 2, lam=lam,
                                   config=lg.LossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="logp"):
        lg.grpo_loss_from_logprobs(logp[None], inp["mask"], inp["advantages"], 2, lam=lam, config=cfg)
    with pytest.raises(ValueError, match="mask"):
        lg.grpo_loss_from_logprobs(logp, inp["mask"][:, :3], inp["advantages"], 2, lam=lam, config=cfg)
    with pytest.raises(ValueError, match="lam"):
        lg.GRPOLoss(cfg).forward_logprobs(logp, inp["mask"], inp["advantages"], 2, lam=lam)
