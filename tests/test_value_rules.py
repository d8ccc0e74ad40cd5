"""The value rules of the inputs without a host read (issue 17 point 1, docs/math.md §10).

Token ids out of [0, V) where counted, a non-bool mask's values other than 0/1, and group lengths
or indices that do not match the rows are checked on the device: by default a failed rule makes
the loss and every gradient NaN (never a finite wrong number), `LossOutput.input_errors` names the
rule with the very message `lg.check_values()` raises in the call, and `check_inputs()` raises it.
Rules that hold leave the loss alone and report nothing, garbage at masked positions included.
"""

from __future__ import annotations

import math

import pytest
import torch

import lambda_grpo as lg
from tests._compare import make_batch

B, T, V, G = 4, 5, 7, 2
ROUTES = ["logits", "logprobs", "hidden"]
BACKENDS = ["reference", "torch", "triton"]


def _inputs(**over):
    inp = make_batch(B=B, T=T, V=V, G=G, dtype=torch.float32, seed=3, mask="holes", with_ref=True)
    inp.update(over)
    return inp


def _first_valid(inp):
    return tuple(inp["mask"].nonzero()[0].tolist())


def _bad(rule):
    """(inputs with one broken value rule, extra keyword arguments)."""
    inp = _inputs()
    extra = {}
    if rule == "token >= V":
        tok = inp["tokens"].clone()
        tok[_first_valid(inp)] = V
        inp["tokens"] = tok
    elif rule == "token < 0":
        tok = inp["tokens"].clone()
        tok[_first_valid(inp)] = -1
        inp["tokens"] = tok
    elif rule == "mask value 2":
        m = inp["mask"].long()
        m[_first_valid(inp)] = 2
        inp["mask"] = m
    elif rule == "mask value nan":
        m = inp["mask"].float()
        m[_first_valid(inp)] = float("nan")
        inp["mask"] = m
    elif rule in ("group_lengths mismatch", "group_index out of range"):
        n = inp["mask"].sum(1)
        gl = n.view(-1, G).repeat_interleave(G, dim=0)
        gi = torch.arange(B) % G
        if rule == "group_lengths mismatch":
            gl = gl.clone()
            gl[2, gi[2]] += 1
        else:
            gi = gi.clone()
            gi[1] = G
        extra = dict(group_lengths=gl, group_index=gi)
    return inp, extra


RULES = ["token >= V", "token < 0", "mask value 2", "mask value nan", "group_lengths mismatch",
         "group_index out of range"]
CFG = lg.LossConfig(aggregation="lambda_grpo", beta=0.04, entropy_coef=0.01)


def _call(route, backend, inp, extra):
    lam = torch.tensor(0.3, requires_grad=True)
    kw = dict(old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], lam=lam, config=CFG, **extra)
    if route == "logits":
        x = inp["logits"].clone().requires_grad_(True)
        out = lg.grpo_loss(x, inp["tokens"], inp["mask"], inp["advantages"], G, backend=backend, **kw)
    elif route == "logprobs":
        if backend != "reference":
            pytest.skip("the log-probs entry point has one backend")
        lsm = torch.log_softmax(inp["logits"], -1)
        x = lsm.gather(-1, inp["tokens"].clamp(0, V - 1)[..., None]).squeeze(-1).clone().requires_grad_(True)
        ent = -(lsm.exp() * lsm).sum(-1)
        out = lg.grpo_loss_from_logprobs(x, inp["mask"], inp["advantages"], G, entropy=ent, **kw)
    else:
        g = torch.Generator().manual_seed(5)
        x = torch.randn(B, T, 6, generator=g, requires_grad=True)
        w = torch.randn(V, 6, generator=g)
        out = lg.fused_linear_grpo_loss(x, w, inp["tokens"], inp["mask"], inp["advantages"], G, backend=backend,
                                        **kw)
    return out, x, lam


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rule", RULES)
def test_a_failed_rule_poisons_the_loss_and_reports_itself(rule, route, backend):
    if route == "logprobs" and rule.startswith("token"):
        pytest.skip("the log-probs entry point takes no token ids")
    inp, extra = _bad(rule)
    with pytest.raises(ValueError) as raised, lg.check_values():
        _call(route, backend, inp, extra)
    out, x, lam = _call(route, backend, inp, extra)
    assert math.isnan(out.loss.item()), out.loss
    out.loss.backward()
    assert torch.isnan(x.grad).any() and torch.isnan(lam.grad), "the gradients are poisoned too"
    assert out.input_errors == [str(raised.value)]
    with pytest.raises(ValueError) as again:
        out.check_inputs()
    assert str(again.value) == str(raised.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route", ROUTES)
def test_rules_that_hold_report_nothing_whatever_is_masked(route, backend):
    inp, extra = _bad("group_lengths mismatch")
    extra["group_lengths"] = inp["mask"].sum(1).view(-1, G).repeat_interleave(G, dim=0)  # the right lengths
    hole = ~inp["mask"]
    tok = inp["tokens"].clone()
    tok[hole] = V + 100  # out of range, but masked
    inp["tokens"] = tok
    inp["mask"] = inp["mask"].long()  # 0/1 integers are fine
    out, x, lam = _call(route, backend, inp, extra)
    assert torch.isfinite(out.loss) and out.input_errors == []
    assert out.check_inputs() is out


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_marks_only_the_bad_positions(backend):
    inp = _inputs()
    tok = inp["tokens"].clone()
    tok[0, 1], tok[2, 3] = V, -5
    lp = lg.token_logprobs(inp["logits"], tok, backend=backend)
    bad = torch.zeros(B, T, dtype=torch.bool)
    bad[0, 1] = bad[2, 3] = True
    assert torch.isnan(lp[bad]).all() and torch.isfinite(lp[~bad]).all()
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 7\)"), lg.check_values():
        lg.token_logprobs(inp["logits"], tok, backend=backend)


def test_environment_variable_turns_the_host_checks_on(monkeypatch):
    import subprocess
    import sys

    code = ("import torch, lambda_grpo as lg\n"
            "try:\n"
            "    lg.token_logprobs(torch.zeros(1, 2, 3), torch.tensor([[0, 3]]))\n"
            "except ValueError as e:\n"
            "    print('raised', e)\n")
    env = dict(__import__("os").environ, LAMBDA_GRPO_CHECK_VALUES="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "raised tokens: expected ids in [0, 3)" in res.stdout, res.stdout + res.stderr[-2000:]


SCHEDULES = {
    # name: (config, inplace_backward, upstream gradient)
    "fused": (CFG, False, 1.0),
    "fused, upstream 2": (CFG, False, 2.0),
    "fused, inplace": (CFG, True, 1.0),
    "two-pass": (lg.LossConfig(aggregation="lambda_grpo", trace="both", beta=0.04), False, 1.0),
    "two-pass, inplace, upstream 2": (lg.LossConfig(aggregation="lambda_grpo", trace="both", beta=0.04), True, 2.0),
}


@pytest.mark.parametrize("int_mask", [False, True], ids=["bool mask", "int mask"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_a_failed_rule_poisons_every_gradient_of_every_schedule(schedule, backend, int_mask):
    """Where a rule is checked and its verdict applied differs by engine and schedule (the Triton
    engine checks the ids in its vocabulary kernels, into the 0-d poison that the mask rule of an
    int mask made, and applies it in its finish and scale kernels; validation and the op layer
    otherwise): whichever, a bad token id makes the loss, d(lambda) and every valid row of
    dlogits NaN, under any upstream gradient and in-place backward; the same inputs with the
    rule holding give finite ones."""
    cfg, inplace, upstream = SCHEDULES[schedule]
    for broken in (True, False):
        inp, _ = _bad("token >= V") if broken else (_inputs(), None)
        if int_mask:
            inp["mask"] = inp["mask"].long()
        lam = torch.tensor(0.3, requires_grad=True)
        x = inp["logits"].clone().requires_grad_(True)
        leaf = x
        if inplace:  # the in-place backward writes over a non-leaf's buffer
            x = x * 1.0
            x.retain_grad()
        out = lg.grpo_loss(x, inp["tokens"], inp["mask"], inp["advantages"], G, inp["old_logp"], inp["ref_logp"],
                           lam, config=cfg, backend=backend, inplace_backward=inplace)
        (out.loss * upstream).backward()
        grad = leaf.grad[inp["mask"].bool()]
        if broken:
            assert math.isnan(out.loss.item()), out.loss
            assert torch.isnan(grad).all(), f"{int(torch.isnan(grad).sum())} of {grad.numel()} dlogits are NaN"
            assert torch.isnan(lam.grad), lam.grad
        else:
            assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and torch.isfinite(lam.grad)
