"""backend="torch" against the float64 reference (tests/_compare.py tolerance rule), and the
invariants of docs/math.md §1-§8 checked on both backends.

Shape grid (B, T, V, G) and why each shape is there:
- (4, 7, 13, 2): the generic case; V = 13 is prime, not a multiple of any block or vector width.
- (2, 5, 1, 1): V = 1, logp is identically 0 and the softmax gradient vanishes; G = 1 makes every
  group a single row (sigma = 0, f = 1).
- (4, 1, 9, 4): T = 1, length-1 rows; one group spans the batch.
- (3, 4, 2, 3): V = 2, the smallest real vocabulary; odd G.
- (6, 3, 64, 3): V a power of two (an exact multiple of every vector width).
- (8, 30, 3001, 4) [explicit test]: 240 rows at V = 3001 span several chunks of rows with a
  partial last chunk (the backend walks rows in chunks of a fixed element count).
- (4, 333, 5, 2) [explicit test]: rows of ~230 valid tokens, longer than a block of a blocked scan.
- V = 151 936 and 32 000 with N <= 8 [explicit test]: real vocabularies (Qwen2, Llama-2) where
  one chunk holds only a few rows.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lambda_grpo as lg
from tests._compare import assert_backend_matches, make_batch, max_err

AGGS = ("grpo", "bnpo", "dapo", "dr_grpo", "lambda_grpo")
BACKENDS = ("reference", "torch")
SMALL_SHAPES = [(4, 7, 13, 2), (2, 5, 1, 1), (4, 1, 9, 4), (3, 4, 2, 3), (6, 3, 64, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# eps is kept > 0: on-policy (ratio exactly 1) with eps = 0 sits on the clip kink, where any
# subgradient is correct and backends may legitimately pick different ones.
configs = st.builds(
    lambda agg, trace, mode, beta, est, tau, ent, dual, clampmin, el, eh, a, cent, mcl: lg.LossConfig(
        aggregation=agg, trace=trace, trace_mode=mode, beta=beta, kl_estimator=est, temperature=tau,
        entropy_coef=ent, dual_clip=dual, adv_clamp_min=clampmin, eps_low=el, eps_high=eh, trace_decay=a,
        compute_entropy=cent, max_completion_length=mcl),
    st.sampled_from(AGGS), st.sampled_from([None, "recent", "both"]), st.sampled_from(["ratio", "weight"]),
    st.sampled_from([0.0, 0.04, 0.5]), st.sampled_from(["k1", "k2", "k3"]), st.sampled_from([1.0, 0.7, 1.6]),
    st.sampled_from([0.0, 0.01, -0.03]), st.sampled_from([None, 1.5, 3.0]), st.sampled_from([None, -0.1]),
    st.sampled_from([0.2, 0.1]), st.sampled_from([0.2, 0.28]), st.sampled_from([0.99, 0.6, 1.0]),
    st.booleans(), st.sampled_from([None, 11]),
)
MASKS = ["holes", "empty_rows", "len1", "full", "prefix"]


def _inputs(shape, dtype, seed, mask, per_token, off_policy, with_ref, scale=2.0, equal=False):
    B, T, V, G = shape
    return make_batch(B=B, T=T, V=V, G=G, dtype=dtype, seed=seed, mask=mask, per_token_adv=per_token,
                      off_policy=off_policy, with_ref=with_ref, logit_scale=scale, equal_rewards=equal)


def _loss_and_grads(backend, inputs, cfg, lam=None, upstream=1.0, **kw):
    logits = inputs["logits"].detach().clone().requires_grad_(True)
    lam_t = None
    if cfg.aggregation == "lambda_grpo":
        lam_t = torch.tensor(float(0.0 if lam is None else lam), requires_grad=True)
    out = lg.grpo_loss(**dict(inputs, logits=logits), lam=lam_t, config=cfg, backend=backend, **kw)
    (out.loss * upstream).backward()
    return out, logits.grad, None if lam_t is None else lam_t.grad


# --------------------------------------------------------------------------------------------
# torch backend == reference
# --------------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None, derandomize=True, database=None)  # fixed examples: re-runnable
@given(cfg=configs, shape=st.sampled_from(SMALL_SHAPES), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 10**6), mask=st.sampled_from(MASKS), per_token=st.booleans(), off_policy=st.booleans(),
       with_ref=st.booleans(), equal=st.booleans(), lam=st.sampled_from([0.0, 0.5, -3.0, 8.0]))
def test_torch_matches_reference(cfg, shape, dtype, seed, mask, per_token, off_policy, with_ref, equal, lam):
    if cfg.beta > 0:
        with_ref = True
    inp = _inputs(shape, dtype, seed, mask, per_token, off_policy, with_ref, equal=equal)
    assert_backend_matches("torch", inp, cfg, lam)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)  # fixed examples: re-runnable
@given(cfg=configs, dtype=st.sampled_from(DTYPES), scale=st.sampled_from([50.0, 100.0]),
       seed=st.integers(0, 10**6), mask=st.sampled_from(MASKS))
def test_torch_matches_reference_extreme_logits(cfg, dtype, scale, seed, mask):
    # softmax saturates: p is 0 or 1 in fp32 for most entries, logp of unlikely tokens ~ -200
    inp = _inputs((4, 5, 17, 2), dtype, seed, mask, False, True, True, scale=scale)
    assert_backend_matches("torch", inp, cfg, lam=1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [
    lg.LossConfig(aggregation="lambda_grpo", beta=0.04, entropy_coef=0.01),  # fused single pass
    lg.LossConfig(aggregation="grpo", trace="both", trace_mode="ratio", temperature=0.9),  # two-pass
], ids=["fused", "ratio_trace"])
def test_torch_matches_reference_many_chunks(cfg, dtype):
    inp = _inputs((8, 30, 3001, 4), dtype, 7, "empty_rows", False, True, True)
    assert_backend_matches("torch", inp, cfg, lam=0.7)


@pytest.mark.parametrize("style, mode, a, dtype", [
    ("recent", "ratio", 0.99, torch.float32), ("both", "ratio", 0.99, torch.float32),
    ("recent", "ratio", 1.0, torch.float64), ("both", "ratio", 1.0, torch.float32),
    ("both", "ratio", 0.5, torch.float64), ("both", "weight", 0.99, torch.float32),
])
def test_torch_matches_reference_long_rows(style, mode, a, dtype):
    # rows of ~200-300 valid tokens: real completion lengths, and longer than any block a scan
    # may be cut into (the carry between blocks is exercised), with holes and one empty row
    cfg = lg.LossConfig(aggregation="lambda_grpo", trace=style, trace_mode=mode, trace_decay=a, beta=0.02)
    inp = make_batch(B=4, T=333, V=5, G=2, dtype=dtype, seed=13, mask="holes", logit_scale=1.0)
    inp["mask"][3] = False
    assert_backend_matches("torch", inp, cfg, lam=0.8)


@pytest.mark.parametrize("V, dtype, cfg", [
    (151936, torch.float32, lg.LossConfig(aggregation="lambda_grpo", beta=0.04, entropy_coef=0.01)),
    (151936, torch.bfloat16, lg.LossConfig(aggregation="dapo", trace="recent", trace_mode="ratio", beta=0.1)),
    (32000, torch.float16, lg.LossConfig(aggregation="dr_grpo", trace="both", trace_mode="weight", temperature=0.7)),
], ids=["qwen-fp32", "qwen-bf16-ratio-trace", "llama-fp16-weight-trace"])
def test_torch_matches_reference_real_vocab(V, dtype, cfg):
    inp = make_batch(B=4, T=2, V=V, G=2, dtype=dtype, seed=1, mask="holes", logit_scale=3.0)
    inp["mask"][0, 0] = True  # at least one valid token
    assert_backend_matches("torch", inp, cfg, lam=-1.0)


# --------------------------------------------------------------------------------------------
# Invariants, on both backends (float64 so the tolerances can be tight)
# --------------------------------------------------------------------------------------------

INVARIANT_CFGS = [
    lg.LossConfig(aggregation="lambda_grpo", beta=0.1, entropy_coef=0.02, dual_clip=2.0),
    lg.LossConfig(aggregation="grpo", trace="both", trace_mode="ratio", temperature=0.8, beta=0.05, kl_estimator="k2"),
    lg.LossConfig(aggregation="dr_grpo", trace="recent", trace_mode="weight", adv_clamp_min=-0.1, compute_entropy=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", INVARIANT_CFGS, ids=["lambda", "ratio_trace", "weight_trace"])
def test_constant_shift_of_logits_rows_changes_nothing(backend, cfg):
    inp = make_batch(B=4, T=6, V=11, G=2, dtype=torch.float64, seed=2, mask="empty_rows")
    shift = 40 * torch.randn(4, 6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    a, ga, la = _loss_and_grads(backend, inp, cfg, lam=0.6)
    b, gb, lb = _loss_and_grads(backend, dict(inp, logits=inp["logits"] + shift), cfg, lam=0.6)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, ga, rtol=1e-9, atol=1e-12)
    if la is not None:
        torch.testing.assert_close(lb, la, rtol=1e-9, atol=1e-12)
    for k in a.metrics:
        torch.testing.assert_close(b.metrics[k], a.metrics[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", INVARIANT_CFGS, ids=["lambda", "ratio_trace", "weight_trace"])
def test_masked_tokens_get_exactly_zero_gradient(backend, dtype, cfg):
    inp = make_batch(B=4, T=6, V=11, G=2, dtype=dtype, seed=3, mask="empty_rows", per_token_adv=True)
    _, g, _ = _loss_and_grads(backend, inp, cfg, lam=0.6)
    assert g.dtype == dtype
    assert torch.all(g[~inp["mask"]] == 0)
    assert torch.any(g[inp["mask"]] != 0)  # and the valid ones do get one


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trace", [None, "both"])
def test_masked_positions_ignore_garbage_tokens(backend, trace):
    # token ids out of [0, V) where mask = 0 are never read (docs/math.md §10: no out-of-bounds read)
    cfg = lg.LossConfig(aggregation="lambda_grpo", beta=0.1, trace=trace, entropy_coef=0.01)
    inp = make_batch(B=4, T=6, V=11, G=2, dtype=torch.float32, seed=4, mask="holes", per_token_adv=True)
    hole = ~inp["mask"]
    tokens = torch.where(hole, torch.full_like(inp["tokens"], 10**6), inp["tokens"])
    tokens[tuple(hole.nonzero()[0].tolist())] = -5
    a, ga, la = _loss_and_grads(backend, inp, cfg, lam=0.6)
    b, gb, lb = _loss_and_grads(backend, dict(inp, tokens=tokens), cfg, lam=0.6)
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)
    torch.testing.assert_close(lb, la, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["old_logp", "ref_logp", "advantages"])
@pytest.mark.parametrize("trace", [None, "both"])
def test_masked_positions_ignore_non_finite_inputs(backend, name, trace):
    # docs/math.md §1: masked positions take no part in anything. Padding of old/ref/advantages may hold
    # anything (nan, -inf from a padded log-prob); neither the loss nor any gradient may see it.
    cfg = lg.LossConfig(aggregation="lambda_grpo", beta=0.1, trace=trace, entropy_coef=0.01)
    inp = make_batch(B=4, T=6, V=11, G=2, dtype=torch.float32, seed=4, mask="holes", per_token_adv=True)
    hole = ~inp["mask"]
    a, ga, la = _loss_and_grads(backend, inp, cfg, lam=0.6)
    for bad in (float("nan"), float("-inf")):
        garbage = torch.where(hole, torch.full_like(inp[name], bad), inp[name])
        b, gb, lb = _loss_and_grads(backend, dict(inp, **{name: garbage}), cfg, lam=0.6)
        torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
        torch.testing.assert_close(gb, ga, rtol=0, atol=0)
        torch.testing.assert_close(lb, la, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["recent", "both"])
@pytest.mark.parametrize("agg", AGGS)
def test_trace_ratio_and_weight_mode_same_gradient_at_ratio_one(backend, style, agg):
    inp = make_batch(B=4, T=7, V=9, G=2, dtype=torch.float64, seed=5, mask="empty_rows", off_policy=False)
    base = dict(aggregation=agg, trace=style, trace_decay=0.8, beta=0.1, entropy_coef=0.01, dual_clip=2.0)
    _, gr, lr = _loss_and_grads(backend, inp, lg.LossConfig(trace_mode="ratio", **base), lam=0.9)
    _, gw, lw = _loss_and_grads(backend, inp, lg.LossConfig(trace_mode="weight", **base), lam=0.9)
    torch.testing.assert_close(gr, gw, rtol=1e-9, atol=1e-12)
    # and the trace does matter: without it the gradient differs
    _, gn, _ = _loss_and_grads(backend, inp, lg.LossConfig(**dict(base, trace=None)), lam=0.9)
    assert max_err(gn, gr) > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ["dapo", "grpo", "dr_grpo", "lambda_grpo"])
@pytest.mark.parametrize("trace", [None, "both"])
def test_micro_batches_of_whole_groups_sum_to_full_batch(backend, agg, trace):
    B, G = 8, 2
    inp = make_batch(B=B, T=6, V=10, G=G, dtype=torch.float64, seed=6, mask="empty_rows")
    cfg = lg.LossConfig(aggregation=agg, trace=trace, beta=0.05, entropy_coef=0.01)
    n_tok, n_seq = int(inp["mask"].sum()), B
    full, gfull, lfull = _loss_and_grads(backend, inp, cfg, lam=1.3, num_tokens=n_tok, num_sequences=n_seq)
    # the same with the local defaults: explicit global counts must equal them here
    dflt, _, _ = _loss_and_grads(backend, inp, cfg, lam=1.3)
    torch.testing.assert_close(dflt.loss, full.loss, rtol=1e-12, atol=1e-14)
    total, grads, dlam = 0.0, [], 0.0
    for lo, hi in ((0, 2), (2, 6), (6, 8)):
        part = {k: (v[lo:hi] if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
        out, g, dl = _loss_and_grads(backend, part, cfg, lam=1.3, num_tokens=torch.tensor(n_tok),
                                     num_sequences=n_seq)
        total = total + out.loss
        grads.append(g)
        if dl is not None:
            dlam = dlam + dl
    torch.testing.assert_close(total, full.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads), gfull, rtol=1e-10, atol=1e-12)
    if lfull is not None:
        torch.testing.assert_close(dlam, lfull, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trace", [None, "recent"])
def test_lambda_zero_equals_dapo(backend, trace):
    inp = make_batch(B=6, T=5, V=7, G=3, dtype=torch.float32, seed=5, mask="empty_rows")
    extra = dict(trace=trace, beta=0.2, entropy_coef=0.1)
    a, ga, dl = _loss_and_grads(backend, inp, lg.LossConfig(aggregation="lambda_grpo", **extra), lam=0.0)
    b, gb, _ = _loss_and_grads(backend, inp, lg.LossConfig(aggregation="dapo", **extra))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)
    assert torch.equal(a.metrics["seq_weight"], torch.ones(6))
    assert torch.isfinite(dl) and dl != 0  # lambda still learns at 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("trace", [None, "recent"])
def test_non_finite_logits_give_non_finite_loss(backend, dtype, bad, trace):
    inp = make_batch(B=4, T=5, V=7, G=2, dtype=dtype, seed=8, mask="full")
    inp["logits"][2, 3, 4] = bad
    out = lg.grpo_loss(**inp, lam=torch.tensor(0.3), config=lg.LossConfig(trace=trace), backend=backend)
    assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("trace", [None, "both"])
def test_upstream_gradient_scales_dlogits_and_dlam(trace):
    inp = make_batch(B=4, T=5, V=7, G=2, dtype=torch.float64, seed=10, mask="holes")
    cfg = lg.LossConfig(trace=trace, beta=0.1, entropy_coef=0.05)
    _, g1, l1 = _loss_and_grads("torch", inp, cfg, lam=0.4)
    _, g2, l2 = _loss_and_grads("torch", inp, cfg, lam=0.4, upstream=-2.5)
    torch.testing.assert_close(g2, -2.5 * g1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(l2, -2.5 * l1, rtol=1e-6, atol=0)  # lam is fp32: one rounding


@pytest.mark.parametrize("trace", [None, "both"])
def test_lam_gradient_without_logits_gradient(trace):
    inp = make_batch(B=4, T=5, V=7, G=2, dtype=torch.float32, seed=11, mask="holes")
    cfg = lg.LossConfig(trace=trace, beta=0.1)
    lam = torch.tensor(0.4, requires_grad=True)
    out = lg.grpo_loss(**inp, lam=lam, config=cfg, backend="torch")  # logits do not require grad
    out.loss.backward()
    _, _, want = _loss_and_grads("reference", inp, cfg, lam=0.4)
    torch.testing.assert_close(lam.grad, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        nog = lg.grpo_loss(**inp, lam=lam, config=cfg, backend="torch")
    torch.testing.assert_close(nog.loss, out.loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("trace", [None, "recent"])
def test_non_contiguous_logits_slice_of_model_output(trace):
    # the documented call: logits = model(ids).logits[:, P-1:-1]; the gradient reaches the full tensor
    inp = make_batch(B=4, T=5, V=7, G=2, dtype=torch.float32, seed=12, mask="holes")
    cfg = lg.LossConfig(trace=trace, beta=0.1)
    full = torch.randn(4, 9, 7).requires_grad_(True)
    with torch.no_grad():
        full[:, 3:8] = inp["logits"]
    out = lg.grpo_loss(**dict(inp, logits=full[:, 3:8]), lam=torch.tensor(0.2), config=cfg, backend="torch")
    out.loss.backward()
    ref, g, _ = _loss_and_grads("reference", inp, cfg, lam=0.2)
    torch.testing.assert_close(out.loss.detach(), ref.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(full.grad[:, 3:8], g, rtol=1e-4, atol=1e-7)
    assert torch.all(full.grad[:, :3] == 0) and torch.all(full.grad[:, 8:] == 0)
    # a transposed (non-contiguous) layout
    t_logits = inp["logits"].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    assert not t_logits.is_contiguous()
    out = lg.grpo_loss(**dict(inp, logits=t_logits), lam=torch.tensor(0.2), config=cfg, backend="torch")
    out.loss.backward()
    torch.testing.assert_close(t_logits.grad, g, rtol=1e-4, atol=1e-7)


def test_metrics_by_hand_on_torch_backend():
    # one token per case, V = 2 equal logits (logp = ln 0.5), ratio set through old_logp
    ratios = torch.tensor([[1.5], [0.5], [1.0], [1.1]], dtype=torch.float64)
    A = torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
    inp = dict(logits=torch.zeros(4, 1, 2), tokens=torch.zeros(4, 1, dtype=torch.long),
               mask=torch.ones(4, 1, dtype=torch.bool), advantages=A.float(), group_size=2,
               old_logp=(math.log(0.5) - ratios.log()).float(), ref_logp=torch.full((4, 1), math.log(0.5) + 0.2))
    out = lg.grpo_loss(**inp, config=lg.LossConfig(aggregation="dapo", compute_entropy=True), backend="torch")
    m = out.metrics
    assert float(m["clip_frac_high"]) == 0.25 and float(m["clip_frac_low"]) == 0.25 and float(m["clip_frac"]) == 0.5
    assert abs(float(m["ratio_mean"]) - 1.025) < 1e-6
    assert abs(float(m["kl_mean"]) - (math.exp(0.2) - 0.2 - 1)) < 1e-6
    assert abs(float(m["entropy_mean"]) - math.log(2)) < 1e-6
    assert torch.equal(m["seq_weight"], torch.ones(4))
    # loss: -(min(1.5, 1.2) + min(-0.5, -0.8) + min(2, 2) + min(-2.2, -1.1 * 2)) / 4
    assert abs(float(out.loss) - -(1.2 - 0.8 + 2.0 - 2.2) / 4) < 1e-6
