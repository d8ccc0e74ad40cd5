"""Packed (varlen) inputs, cu_seqlens (issue 12 point 2).

The property: a packed batch gives the result of the same batch right-padded to (B, T_max), for
every entry point (logits, log-probs, hidden states), every aggregation, trace style and mode and
lambda, on the reference, torch and triton backends (Triton under TRITON_INTERPRET=1 here):
the same loss, metrics, d(lambda) and per-token outputs, and the gradients equal the padded
gradients gathered back to the packed positions.

Equality rule. Packing changes an index map only: the row math runs on the same (B, T_max)
tensors in both layouts, so the row math agrees bit for bit. The vocabulary passes compute each
token's row of the logits independently, but the torch engine walks *runs of valid rows* in
chunks, and the runs differ between the layouts (padding splits them); torch's CPU reductions over
the vocabulary of a chunk (amax, sum, vecdot) may then vectorise differently, which moves a
log-prob or a gradient entry by an ulp or so. So: the reference and triton backends and the
entry point from log-probs are compared bit for bit (torch.equal); the torch engine's results from
logits or hidden states, and the reference from hidden states (torch's float64 matmul of (N, H)
rows and of (B*T_max, H) rows may block the sums differently), to within 8 ulp of each value's
size (rtol 2^-20, atol 2^-20 x the largest |value|), far below any real difference.

Also: empty and length-1 segments, per-token advantages (N,), group_lengths with packed rows,
the entry points of GRPOLoss, token_logprobs / linear_token_logprobs on (N, V) / (N, H), and the
bad-input rules of cu_seqlens and of the packed shapes.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lambda_grpo as lg
from tests._compare import gather, pad

AGGS = ("grpo", "bnpo", "dapo", "dr_grpo", "lambda_grpo", "token_sum", "seq_mean_token_sum")
TRACES = [(None, "ratio"), ("recent", "ratio"), ("both", "ratio"), ("recent", "weight"), ("both", "weight")]
BACKENDS = ("reference", "torch", "triton")
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def make_packed(lens, V=9, H=None, seed=0, per_token_adv=False, token_weights=False, holes=True):
    g = torch.Generator().manual_seed(seed)
    N, B = sum(lens), len(lens)
    cu = torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (N,), generator=g)
    mask = (torch.rand(N, generator=g) > 0.25) if holes else torch.ones(N, dtype=torch.bool)
    adv = torch.randn(N if per_token_adv else B, generator=g)
    base = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    old = (base + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    ref = (base + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    tw = (torch.rand(N, generator=g) * 1.5 + 0.25) if token_weights else None
    out = dict(logits=logits.float(), tokens=tokens, mask=mask, advantages=adv, old_logp=old, ref_logp=ref,
               token_weights=tw, cu_seqlens=cu)
    if H is not None:
        out["hidden"] = torch.randn(N, H, generator=g)
        out["weight"] = torch.randn(V, H, generator=g) / H**0.5
    return out


def padded_args(p, lens):
    """The same batch right-padded to (B, T_max): per-token inputs padded, masked outside."""
    return dict(tokens=pad(p["tokens"], lens), mask=pad(p["mask"], lens, False),
                advantages=pad(p["advantages"], lens) if p.get("_per_token_adv") else p["advantages"],
                old_logp=pad(p["old_logp"], lens), ref_logp=pad(p["ref_logp"], lens),
                token_weights=None if p["token_weights"] is None else pad(p["token_weights"], lens))


def _check(name, got, want, exact):
    if got is None or want is None:
        assert got is None and want is None, name
        return
    if exact:
        assert torch.equal(got, want), f"{name}: max |diff| {(got.double() - want.double()).abs().max().item()}"
    else:
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=2.0**-20, atol=2.0**-20 * max(scale, 1e-30), msg=name)


def _compare(got, want, dgot, dwant, lens, exact, grads=()):
    _check("loss", got.loss.detach(), want.loss.detach(), exact)
    assert set(got.metrics) == set(want.metrics)
    for k in want.metrics:
        _check(f"metric {k}", got.metrics[k], want.metrics[k], exact)
    if want.per_token is not None:
        for k in want.per_token:
            _check(f"per_token {k}", got.per_token[k], gather(want.per_token[k], lens), exact)
    for name, g, w, packed in grads:
        _check(name, g, gather(w, lens) if packed else w, exact)


# the policy-loss variants whose math is row-coupled (GSPO's sequence ratio, VESPO's sequence
# weight: a row reduction that must stop at a segment boundary) or detached (CISPO); a ratio-mode
# trace is refused with the first two, which then take the weight-mode trace
VARIANTS = ({}, dict(importance_sampling="sequence"), dict(surrogate="vespo"), dict(surrogate="cispo", eps_high=1.2))


def _config(agg, tr, beta, ent, variant):
    mode = "weight" if variant and "eps_high" not in variant and tr[0] is not None else tr[1]
    return lg.LossConfig(aggregation=agg, trace=tr[0], trace_mode=mode, beta=beta, entropy_coef=ent, **variant)


configs = st.builds(
    lambda agg, tr, beta, ent, lam, variant: (_config(agg, tr, beta, ent, variant), lam),
    st.sampled_from(AGGS), st.sampled_from(TRACES), st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 0.02]),
    st.sampled_from([0.0, 0.7, -1.5]), st.sampled_from(VARIANTS))
# B = 6 segments in groups of G = 2 or 3; lengths 0..5 (empty and length-1 segments included)
lengths = st.lists(st.integers(0, 5), min_size=6, max_size=6)


def _run_logits(p, lens, cfg, lam, backend, G, packed):
    x = (p["logits"] if packed else pad(p["logits"], lens)).clone().requires_grad_(True)
    lam_t = None if not cfg.uses_lambda else torch.tensor(float(lam), requires_grad=True)
    if packed:
        args = {k: p[k] for k in ("tokens", "mask", "advantages", "old_logp", "ref_logp", "token_weights",
                                  "cu_seqlens")}
    else:
        args = padded_args(p, lens)
    out = lg.grpo_loss(x, group_size=G, lam=lam_t, config=cfg, backend=backend, return_per_token=True, **args)
    out.loss.backward()
    return out, x.grad, None if lam_t is None else lam_t.grad


logits_cases = dict(cl=configs, lens=lengths, G=st.sampled_from([2, 3]), seed=st.integers(0, 10**6), tw=st.booleans(),
                    per_token_adv=st.booleans())


@pytest.mark.parametrize("backend", ["reference", "torch"])
@settings(max_examples=40, **SETTINGS)
@given(**logits_cases)
def test_logits_packed_equals_padded(backend, cl, lens, G, seed, tw, per_token_adv):
    _logits_case(backend, cl, lens, G, seed, tw, per_token_adv)


@settings(max_examples=12, **SETTINGS)  # the interpreter: ~0.6 ms per program
@given(**logits_cases)
def test_logits_packed_equals_padded_triton(cl, lens, G, seed, tw, per_token_adv):
    _logits_case("triton", cl, lens, G, seed, tw, per_token_adv)


def _logits_case(backend, cl, lens, G, seed, tw, per_token_adv):
    cfg, lam = cl
    per_token_adv = per_token_adv and sum(lens) != len(lens)  # N == B: a 1-d tensor is per segment (documented)
    p = make_packed(lens, seed=seed, per_token_adv=per_token_adv, token_weights=tw)
    p["_per_token_adv"] = per_token_adv
    got, dx, dlam = _run_logits(p, lens, cfg, lam, backend, G, True)
    want, dx_w, dlam_w = _run_logits(p, lens, cfg, lam, backend, G, False)
    assert dx.shape == p["logits"].shape
    _compare(got, want, dx, dx_w, lens, exact=backend != "torch",
             grads=[("dlogits", dx, dx_w, True), ("dlam", dlam, dlam_w, False)])


def _run_logprobs(p, lens, cfg, lam, G, packed):
    lsm = torch.log_softmax(p["logits"].double(), -1)
    logp = lsm.gather(-1, p["tokens"][:, None]).squeeze(-1).float()
    ent = -(lsm.exp() * lsm).sum(-1).float()
    if not packed:
        logp, ent = pad(logp, lens), pad(ent, lens)
    logp, ent = logp.requires_grad_(True), ent.requires_grad_(True)
    lam_t = None if not cfg.uses_lambda else torch.tensor(float(lam), requires_grad=True)
    if packed:
        args = {k: p[k] for k in ("mask", "advantages", "old_logp", "ref_logp", "token_weights", "cu_seqlens")}
    else:
        args = padded_args(p, lens)
        del args["tokens"]
    mask, adv = args.pop("mask"), args.pop("advantages")
    out = lg.grpo_loss_from_logprobs(logp, mask, adv, G, entropy=ent, lam=lam_t, config=cfg, return_per_token=True,
                                     **args)
    out.loss.backward()
    z = torch.zeros_like(logp)
    return out, (logp.grad if logp.grad is not None else z), (ent.grad if ent.grad is not None else z), \
        None if lam_t is None else lam_t.grad


@settings(max_examples=60, **SETTINGS)
@given(cl=configs, lens=lengths, G=st.sampled_from([2, 3]), seed=st.integers(0, 10**6), tw=st.booleans(),
       per_token_adv=st.booleans())
def test_logprobs_packed_equals_padded(cl, lens, G, seed, tw, per_token_adv):
    cfg, lam = cl
    per_token_adv = per_token_adv and sum(lens) != len(lens)  # N == B: a 1-d tensor is per segment (documented)
    p = make_packed(lens, seed=seed, per_token_adv=per_token_adv, token_weights=tw)
    p["_per_token_adv"] = per_token_adv
    got, dlp, dH, dlam = _run_logprobs(p, lens, cfg, lam, G, True)
    want, dlp_w, dH_w, dlam_w = _run_logprobs(p, lens, cfg, lam, G, False)
    assert dlp.shape == (sum(lens),) and dH.shape == (sum(lens),)
    _compare(got, want, None, None, lens, exact=True,
             grads=[("dlogp", dlp, dlp_w, True), ("dH", dH, dH_w, True), ("dlam", dlam, dlam_w, False)])


def _run_hidden(p, lens, cfg, lam, backend, G, packed):
    h = (p["hidden"] if packed else pad(p["hidden"], lens)).clone().requires_grad_(True)
    w = p["weight"].clone().requires_grad_(True)
    lam_t = None if not cfg.uses_lambda else torch.tensor(float(lam), requires_grad=True)
    if packed:
        args = {k: p[k] for k in ("tokens", "mask", "advantages", "old_logp", "ref_logp", "token_weights",
                                  "cu_seqlens")}
    else:
        args = padded_args(p, lens)
    tokens, mask, adv = args.pop("tokens"), args.pop("mask"), args.pop("advantages")
    out = lg.fused_linear_grpo_loss(h, w, tokens, mask, adv, G, lam=lam_t, config=cfg, backend=backend,
                                    return_per_token=True, **args)
    out.loss.backward()
    return out, h.grad, w.grad, None if lam_t is None else lam_t.grad


hidden_cases = dict(cl=configs, lens=lengths, G=st.sampled_from([2, 3]), seed=st.integers(0, 10**6), tw=st.booleans())


@pytest.mark.parametrize("backend", ["reference", "torch"])
@settings(max_examples=25, **SETTINGS)
@given(**hidden_cases)
def test_hidden_packed_equals_padded(backend, cl, lens, G, seed, tw):
    _hidden_case(backend, cl, lens, G, seed, tw)


@settings(max_examples=8, **SETTINGS)
@given(**hidden_cases)
def test_hidden_packed_equals_padded_triton(cl, lens, G, seed, tw):
    _hidden_case("triton", cl, lens, G, seed, tw)


def _hidden_case(backend, cl, lens, G, seed, tw):
    cfg, lam = cl
    p = make_packed(lens, V=11, H=8, seed=seed, token_weights=tw)
    got, dh, dw, dlam = _run_hidden(p, lens, cfg, lam, backend, G, True)
    want, dh_w, dw_w, dlam_w = _run_hidden(p, lens, cfg, lam, backend, G, False)
    assert dh.shape == p["hidden"].shape
    # reference: float64 matmuls of (N, H) and (B*T_max, H) rows; torch BLAS blocks them by shape
    exact = backend == "triton"
    _compare(got, want, None, None, lens, exact=exact,
             grads=[("dhidden", dh, dh_w, True), ("dweight", dw, dw_w, False), ("dlam", dlam, dlam_w, False)])


# --------------------------------------------------------------------------------------------
# Edge cases and the other entry points
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", [[0, 3, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [4, 0, 0, 1]])
def test_empty_and_length_one_segments(backend, lens):
    cfg = lg.LossConfig(aggregation="lambda_grpo", trace="both", beta=0.1, entropy_coef=0.01)
    p = make_packed(lens, seed=3, holes=False)
    got, dx, dlam = _run_logits(p, lens, cfg, 0.5, backend, 2, True)
    want, dx_w, dlam_w = _run_logits(p, lens, cfg, 0.5, backend, 2, False)
    _compare(got, want, dx, dx_w, lens, exact=backend != "torch",
             grads=[("dlogits", dx, dx_w, True), ("dlam", dlam, dlam_w, False)])
    assert torch.isfinite(got.loss)


def test_dr_grpo_default_length_is_longest_segment():
    """dr_grpo with max_completion_length=None divides by T_max = the longest segment."""
    lens = [2, 5, 0, 3]
    p = make_packed(lens, seed=5)
    a = lg.grpo_loss(p["logits"], p["tokens"], p["mask"], p["advantages"], 2, old_logp=p["old_logp"],
                     config=lg.LossConfig(aggregation="dr_grpo"), backend="torch", cu_seqlens=p["cu_seqlens"])
    b = lg.grpo_loss(p["logits"], p["tokens"], p["mask"], p["advantages"], 2, old_logp=p["old_logp"],
                     config=lg.LossConfig(aggregation="dr_grpo", max_completion_length=5), backend="torch",
                     cu_seqlens=p["cu_seqlens"])
    assert torch.equal(a.loss, b.loss)


@lg.check_values()  # the value rules raise (by default they poison the loss: tests/test_value_rules.py)
def test_group_lengths_with_packed_rows():
    lens = [3, 1, 4, 2]
    p = make_packed(lens, seed=9, holes=False)
    cfg = lg.LossConfig(aggregation="lambda_grpo")
    n = torch.tensor(lens)
    gl = n.view(2, 2).repeat_interleave(2, dim=0)
    gi = torch.arange(4) % 2
    lam = torch.tensor(0.6)
    kw = dict(old_logp=p["old_logp"], lam=lam, config=cfg, backend="torch", cu_seqlens=p["cu_seqlens"])
    a = lg.grpo_loss(p["logits"], p["tokens"], p["mask"], p["advantages"], 2, **kw)
    b = lg.grpo_loss(p["logits"], p["tokens"], p["mask"], p["advantages"], 2, group_lengths=gl, group_index=gi, **kw)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="group_lengths"):
        lg.grpo_loss(p["logits"], p["tokens"], p["mask"], p["advantages"], 2, group_lengths=gl.flip(0),
                     group_index=gi, **kw)


def test_grpo_loss_module_entry_points_take_cu_seqlens():
    lens = [2, 3, 0, 1]
    p = make_packed(lens, H=6, V=7, seed=11)
    cfg = lg.LossConfig(aggregation="lambda_grpo", trace="recent")
    m = lg.GRPOLoss(cfg, backend="torch", lam_init=0.3)
    f = lg.grpo_loss(p["logits"], p["tokens"], p["mask"], p["advantages"], 2, old_logp=p["old_logp"],
                     lam=torch.tensor(0.3), config=cfg, backend="torch", cu_seqlens=p["cu_seqlens"])
    out = m(p["logits"], p["tokens"], p["mask"], p["advantages"], 2, old_logp=p["old_logp"],
            cu_seqlens=p["cu_seqlens"])
    assert torch.equal(out.loss, f.loss)
    out.loss.backward()
    assert m.lam.grad is not None
    lp = lg.token_logprobs(p["logits"], p["tokens"], backend="torch")
    assert lp.shape == (sum(lens),)
    o2 = m.forward_logprobs(lp, p["mask"], p["advantages"], 2, old_logp=p["old_logp"], cu_seqlens=p["cu_seqlens"])
    torch.testing.assert_close(o2.loss, f.loss, rtol=1e-6, atol=1e-7)
    o3 = m.forward_hidden(p["hidden"], p["weight"], p["tokens"], p["mask"], p["advantages"], 2,
                          old_logp=p["old_logp"], cu_seqlens=p["cu_seqlens"])
    assert o3.loss.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_packed_layout(backend):
    p = make_packed([2, 3, 0, 1], H=6, V=7, seed=13)
    x = p["logits"].clone().requires_grad_(True)
    lp = lg.token_logprobs(x, p["tokens"], temperature=0.7, backend=backend)
    want = torch.log_softmax(p["logits"].double() / 0.7, -1).gather(-1, p["tokens"][:, None]).squeeze(-1)
    assert lp.shape == (6,)
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-6)
    lp.sum().backward()
    assert x.grad.shape == x.shape
    lp2, H = lg.linear_token_logprobs(p["hidden"], p["weight"], p["tokens"], backend=backend)
    want2 = torch.log_softmax(p["hidden"].double() @ p["weight"].double().T, -1).gather(
        -1, p["tokens"][:, None]).squeeze(-1)
    assert lp2.shape == (6,) and H.shape == (6,)
    torch.testing.assert_close(lp2.double(), want2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("trace", [None, "recent"])
def test_inplace_backward_packed(backend, trace):
    lens = [2, 3, 0, 1]
    p = make_packed(lens, seed=17)
    cfg = lg.LossConfig(aggregation="dapo", trace=trace)
    kw = dict(old_logp=p["old_logp"], config=cfg, backend=backend, cu_seqlens=p["cu_seqlens"])
    x1 = p["logits"].clone().requires_grad_(True)
    lg.grpo_loss(x1, p["tokens"], p["mask"], p["advantages"], 2, **kw).loss.backward()
    x2 = p["logits"].clone().requires_grad_(True)
    y = x2 * 1.0  # a non-leaf buffer the gradient is written over
    lg.grpo_loss(y, p["tokens"], p["mask"], p["advantages"], 2, inplace_backward=True, **kw).loss.backward()
    assert torch.equal(x1.grad, x2.grad)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def _call(p, **over):
    args = dict(logits=p["logits"], tokens=p["tokens"], mask=p["mask"], advantages=p["advantages"], group_size=2,
                old_logp=p["old_logp"], cu_seqlens=p["cu_seqlens"], backend="torch")
    args.update(over)
    return lg.grpo_loss(**args)


@pytest.mark.parametrize("bad, match", [
    ([0, 2, 5, 6], r"cu_seqlens: expected a torch.Tensor"),
    (torch.tensor([[0, 2, 5, 6]]), r"cu_seqlens: expected shape \(B \+ 1,\)"),
    (torch.zeros(0, dtype=torch.long), r"cu_seqlens: expected shape \(B \+ 1,\)"),
    (torch.tensor([0.0, 2, 5, 6]), r"cu_seqlens: expected an integer dtype"),
    (torch.tensor([True, False]), r"cu_seqlens: expected an integer dtype"),
    (torch.tensor([1, 2, 5, 6]), r"cu_seqlens: expected cu_seqlens\[0\] = 0, got cu_seqlens\[0\] = 1"),
    (torch.tensor([0, 3, 2, 6]), r"cu_seqlens: expected non-decreasing offsets, got cu_seqlens\[2\] = 2 < "),
    (torch.tensor([0, 2, 5, 7]), r"cu_seqlens: expected cu_seqlens\[-1\] = N = 6 .*, got cu_seqlens\[-1\] = 7"),
    (torch.tensor([0, 2, 5, 5]), r"cu_seqlens\[-1\] = N = 6"),
    (torch.tensor([0, 2, 5, 6], device="meta"), r"cu_seqlens: expected a tensor with values"),
])
def test_bad_cu_seqlens(bad, match):
    p = make_packed([2, 3, 1], seed=1)
    with pytest.raises(ValueError, match=match):
        _call(p, cu_seqlens=bad, group_size=1)


@lg.check_values()  # the value rules raise (by default they poison the loss: tests/test_value_rules.py)
def test_bad_packed_shapes():
    p = make_packed([2, 3, 1, 0], seed=1)  # N = 6, B = 4
    with pytest.raises(ValueError, match=r"group_size: expected a divisor of B = 4"):
        _call(p, group_size=3)
    with pytest.raises(ValueError, match=r"logits: expected shape \(N, V\) with 2 dims \(packed"):
        _call(p, logits=p["logits"][None])
    with pytest.raises(ValueError, match=r"mask: expected shape \(6,\) \(N of logits\)"):
        _call(p, mask=p["mask"][:5])
    with pytest.raises(ValueError, match=r"tokens: expected shape \(6,\) \(N of logits\)"):
        _call(p, tokens=p["tokens"][None])
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 9\)"):
        _call(p, tokens=torch.where(p["mask"], torch.full_like(p["tokens"], 9), p["tokens"]))
    for name in ("old_logp", "ref_logp", "token_weights"):
        with pytest.raises(ValueError, match=rf"{name}: expected shape \(6,\) \(N tokens of logits\) \(packed"):
            _call(p, **{name: torch.zeros(4, 2)})
    with pytest.raises(ValueError, match=r"advantages: expected shape \(6,\) .* or \(4,\) \(B segments"):
        _call(p, advantages=torch.zeros(5))
    with pytest.raises(ValueError, match=r"advantages: expected a tensor of shape \(4,\) or \(6,\)"):
        _call(p, advantages=None)
    with pytest.raises(ValueError, match=r"old_logp: expected a floating dtype"):
        _call(p, old_logp=torch.zeros(6, dtype=torch.long))
    # the other entry points
    lp = torch.zeros(6)
    with pytest.raises(ValueError, match=r"logp: expected shape \(N,\) with 1 dim \(packed"):
        lg.grpo_loss_from_logprobs(lp[None], p["mask"], p["advantages"], 2, cu_seqlens=p["cu_seqlens"])
    with pytest.raises(ValueError, match=r"entropy: expected shape \(6,\) \(that of logp\)"):
        lg.grpo_loss_from_logprobs(lp, p["mask"], p["advantages"], 2, entropy=torch.zeros(4, 2),
                                   cu_seqlens=p["cu_seqlens"])
    with pytest.raises(ValueError, match=r"cu_seqlens: expected cu_seqlens\[-1\] = N = 6"):
        lg.grpo_loss_from_logprobs(lp, p["mask"], p["advantages"], 2, cu_seqlens=torch.tensor([0, 1, 2, 3, 4]))
    h, w = torch.zeros(6, 4), torch.zeros(9, 4)
    with pytest.raises(ValueError, match=r"hidden: expected shape \(N, H\) with 2 dims \(packed"):
        lg.fused_linear_grpo_loss(h[None], w, p["tokens"], p["mask"], p["advantages"], 2, cu_seqlens=p["cu_seqlens"])
    with pytest.raises(ValueError, match=r"mask: expected shape \(6,\) \(N of hidden\)"):
        lg.fused_linear_grpo_loss(h, w, p["tokens"], p["mask"][:4], p["advantages"], 2, cu_seqlens=p["cu_seqlens"])
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing"):
        lg.fused_linear_grpo_loss(h, w, p["tokens"], p["mask"], p["advantages"], 2,
                                  cu_seqlens=torch.tensor([0, 4, 3, 5, 6]))
