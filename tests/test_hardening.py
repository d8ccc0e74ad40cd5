"""Issue 8, "every bad input gets a clear answer": one test (or a group) per numbered finding.

Each test names its finding. Each failed on commit 2722551 (before the fixes) and passes now;
the issue-8 note lists which. Expected values are derived by hand in the comments or come from
the float64 reference, never from the backend under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lambda_grpo as lg
from tests._compare import make_batch, max_err

NAN, INF = float("nan"), float("inf")
HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference", "torch"] + (["triton"] if HAS_TRITON else [])
FAST = [b for b in BACKENDS if b != "reference"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _loss(backend, inp, cfg, lam=None, requires_grad=True, **kw):
    logits = inp["logits"].detach().clone().requires_grad_(requires_grad)
    lam_t = None if lam is None else torch.tensor(float(lam), requires_grad=True)
    out = lg.grpo_loss(**dict(inp, logits=logits), lam=lam_t, config=cfg, backend=backend, **kw)
    return out, logits, lam_t


# --- 1. non-finite input gives a non-finite loss on every backend ---------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan logit", "+inf logit", "nan old_logp"])
@pytest.mark.parametrize("trace", [None, "recent"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_1_non_finite_input_gives_non_finite_loss(backend, bad, trace, requires_grad):
    # No ref_logp: with one, beta * kl = 0 * nan hid the bug (the loss was nan by accident).
    # Positive advantages: the clipped branch min(rho A, clip(rho) A) is the one a NaN-dropping
    # min returned. On-policy for the logit cases (x = logp - logp), off-policy for old_logp.
    inp = make_batch(B=2, T=4, V=7, G=2, mask="full", seed=1, with_ref=False, off_policy=(bad == "nan old_logp"))
    inp["advantages"] = torch.tensor([1.0, 0.5])
    if bad == "nan logit":
        inp["logits"][1, 2, 3] = NAN
    elif bad == "+inf logit":
        inp["logits"][1, 2, 3] = INF
    else:
        inp["old_logp"][1, 2] = NAN
    out, _, _ = _loss(backend, inp, lg.LossConfig(aggregation="dapo", trace=trace), requires_grad=requires_grad)
    assert not torch.isfinite(out.loss), f"{backend}: finite loss {out.loss.item()} for {bad}"


# --- 2. backend="torch" under torch.inference_mode() with several worker threads -------------

@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_2_torch_backend_under_inference_mode(two_threads):
    # V = 2^17: 4 rows per chunk of the torch engine (2^19 elements), 16 rows -> 4 chunks, so
    # the chunks are split between 2 worker threads.
    inp = make_batch(B=4, T=4, V=1 << 17, G=2, mask="full", seed=2)
    cfg = lg.LossConfig(aggregation="dapo", entropy_coef=0.01)
    want = lg.grpo_loss(**inp, config=cfg, backend="reference").loss
    want_lp = lg.token_logprobs(inp["logits"], inp["tokens"], backend="reference")
    with torch.inference_mode():
        logits = inp["logits"].clone()  # an inference tensor, as a model's output would be
        got = lg.grpo_loss(**dict(inp, logits=logits), config=cfg, backend="torch").loss
        lp = lg.token_logprobs(logits, inp["tokens"], backend="torch")
    assert torch.get_num_threads() == 2
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    assert max_err(lp, want_lp) <= 1e-4


# --- 3. scaled losses back-propagated more than once ----------------------------------------

@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("trace", [None, "recent"])  # None: fused schedule; recent: two-pass
def test_3_backward_twice_and_three_times(backend, trace):
    cfg = lg.LossConfig(aggregation="lambda_grpo", trace=trace, beta=0.1, entropy_coef=0.01)
    inp = make_batch(B=4, T=5, V=11, G=2, seed=3)
    # the single gradient of 0.5 * loss, from a fresh graph
    out, x, _ = _loss(backend, inp, cfg, lam=0.4)
    (0.5 * out.loss).backward()
    half = x.grad.clone()
    # twice through one retained graph: exactly 2x (0.5 d is exact, d/2 + d/2 = d exactly)
    out, x, _ = _loss(backend, inp, cfg, lam=0.4)
    (0.5 * out.loss).backward(retain_graph=True)
    (0.5 * out.loss).backward(retain_graph=True)
    assert torch.equal(x.grad, 2 * half), max_err(x.grad, 2 * half)
    # loss.backward() three times on a leaf: each adds the same gradient g (2g + g = 3g exactly
    # as rounded once, like 3 * g)
    out, x, _ = _loss(backend, inp, cfg, lam=0.4)
    out.loss.backward(retain_graph=True)
    g = x.grad.clone()
    out.loss.backward(retain_graph=True)
    out.loss.backward()
    assert torch.equal(x.grad, 3 * g), max_err(x.grad, 3 * g)
    assert torch.equal(g, 2 * half)


# --- 5. reference: NaN logits at masked positions get exactly zero gradient -----------------

@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_5_reference_masked_non_finite_logits_zero_gradient(bad, entropy_coef):
    cfg = lg.LossConfig(aggregation="grpo", beta=0.1, entropy_coef=entropy_coef, trace="both")
    inp = make_batch(B=4, T=6, V=7, G=2, mask="holes", seed=5)
    clean, xc, _ = _loss("reference", inp, cfg)
    clean.loss.backward()
    hole = ~inp["mask"]
    dirty_logits = inp["logits"].clone()
    dirty_logits[hole] = bad
    dirty, xd, _ = _loss("reference", dict(inp, logits=dirty_logits), cfg)
    dirty.loss.backward()
    assert torch.equal(dirty.loss, clean.loss)
    assert torch.equal(xd.grad[hole], torch.zeros_like(xd.grad[hole]))
    assert torch.equal(xd.grad, xc.grad)


# --- 9. any finite lambda gives finite weights, loss and d(lambda) --------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam,r", [(1e4, 1 / 9), (-60.0, 1.0), (-1e4, 1.0), (1e4, 1.0), (1e30, 1 / 9)])
def test_9_extreme_lambda_is_finite(backend, lam, r):
    # G = 2 with lengths (3, 1): mu = 2, sigma = 1, z = (1, -1), h = (1 + r, max(1 - r, 1e-6)).
    # h^lam overflows float64 (lam ln h > 709), yet softmax(h^lam) is exact: for lam > 0 the
    # longer row (larger h) takes all the weight, f = (2, 0); for lam < 0 the shorter one,
    # f = (0, 2); df/dlam = f_i (v_i ln h_i - sum_j p_j v_j ln h_j) = 0 for both rows (the row
    # with all the weight has p = 1; the other has f = 2 exp(-huge) = 0).
    cfg = lg.LossConfig(aggregation="lambda_grpo", length_r=r)
    inp = make_batch(B=2, T=4, V=7, G=2, seed=9)
    inp["mask"] = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    out, x, lam_t = _loss(backend, inp, cfg, lam=lam)
    out.loss.backward()
    want_f = torch.tensor([2.0, 0.0]) if lam > 0 else torch.tensor([0.0, 2.0])
    assert torch.equal(out.metrics["seq_weight"], want_f), out.metrics["seq_weight"]
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    assert lam_t.grad is not None and torch.isfinite(lam_t.grad) and abs(lam_t.grad.item()) < 1e-30
    # the loss is that of the weighted rows: f_i S_i / N_tok, S from the reference at lam = 0
    per_row = []
    for i in range(2):
        keep = torch.zeros(2, 4, dtype=torch.bool)
        keep[i] = inp["mask"][i]
        part = lg.grpo_loss(**dict(inp, mask=keep), lam=torch.tensor(0.0), num_tokens=int(inp["mask"].sum()),
                            config=cfg, backend="reference").loss  # f = 1 at lam = 0: S_i / N_tok
        per_row.append(part.item())
    want = sum(f * s for f, s in zip(want_f.tolist(), per_row))
    assert abs(out.loss.item() - want) <= 1e-6 * max(1.0, abs(want))


# --- 10. Triton edge shapes: T = 0 and B = 0 ------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["dr_grpo", "grpo", "lambda_grpo"])
@pytest.mark.parametrize("shape", [(2, 0, 5), (0, 3, 5)])
def test_10_empty_shapes(backend, aggregation, shape):
    B, T, V = shape
    x = torch.zeros(B, T, V, requires_grad=True)
    lam = torch.tensor(0.5, requires_grad=True)
    try:
        out = lg.grpo_loss(x, torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.bool),
                           torch.ones(B), group_size=2 if B else 1, lam=lam,
                           config=lg.LossConfig(aggregation=aggregation), backend=backend)
    except ValueError as e:  # refusing an empty batch is allowed, naming a public argument
        assert str(e).split(":")[0] in ("logits", "tokens", "mask", "advantages", "group_size"), str(e)
        return
    # no valid token: the loss is 0 (an empty sum), not nan (dr_grpo divides by L = max(T, 1))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert x.grad.shape == x.shape


# --- 4. group_advantages: eps = 0 and bad eps ------------------------------------------------

@pytest.mark.parametrize("scale", ["std", "batch", "none"])
def test_4_group_advantages_equal_rewards_eps_zero(scale):
    # Equal rewards give exactly zero advantages (README), also at eps = 0 where the formula is
    # 0 / 0, and for values whose fp32 mean rounds (3 x 0.1).
    for rewards in (torch.ones(4), torch.full((6,), 0.1), torch.tensor([0.1, 0.1, 0.1, 0.7, 0.1, 0.1])):
        G = 2 if len(rewards) == 4 else 3
        a = lg.group_advantages(rewards, G, scale=scale, eps=0.0)
        groups = rewards.view(-1, G)
        equal = (groups == groups[:, :1]).all(1)
        assert torch.equal(a.view(-1, G)[equal], torch.zeros_like(a.view(-1, G)[equal])), a
        assert torch.isfinite(a).all(), a
    # eps = 0 elsewhere is the plain formula: [1, 0] -> (+-0.5) / std, std = sqrt(0.5)
    a = lg.group_advantages(torch.tensor([1.0, 0.0]), 2, eps=0.0)
    assert torch.allclose(a, torch.tensor([1.0, -1.0]) * 0.5 / math.sqrt(0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("eps,shown", [(-1e-4, "-0.0001"), (NAN, "nan"), (INF, "inf"), (True, "True"), ("0", "'0'")])
def test_4_group_advantages_bad_eps(eps, shown):
    with pytest.raises(ValueError) as e:
        lg.group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, eps=eps)
    msg = str(e.value)
    assert msg.startswith("eps:") and "expected" in msg and shown in msg, msg


# --- 6. token ids of any integer dtype -------------------------------------------------------

INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
              torch.uint64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_6_integer_token_dtypes(backend, dtype):
    inp = make_batch(B=2, T=3, V=7, G=2, seed=6)
    cfg = lg.LossConfig(aggregation="grpo", beta=0.1)
    want, _, _ = _loss(backend, inp, cfg)
    got, _, _ = _loss(backend, dict(inp, tokens=inp["tokens"].to(dtype)), cfg)
    assert torch.equal(got.loss, want.loss)
    lp_want = lg.token_logprobs(inp["logits"], inp["tokens"], backend=backend)
    lp = lg.token_logprobs(inp["logits"], inp["tokens"].to(dtype), backend=backend)
    assert torch.equal(lp, lp_want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int32])
def test_6_integer_token_dtypes_out_of_range(dtype):
    inp = make_batch(B=2, T=3, V=7, G=2, mask="full", seed=6)
    tokens = inp["tokens"].clone()
    tokens[1, 2] = 100
    for call in (lambda t: lg.grpo_loss(**dict(inp, tokens=t), config=lg.LossConfig(aggregation="dapo")),
                 lambda t: lg.token_logprobs(inp["logits"], t)):
        with pytest.raises(ValueError) as e, lg.check_values():  # the host check (tests/test_value_rules.py)
            call(tokens.to(dtype))
        msg = str(e.value)
        assert msg.startswith("tokens:") and "expected" in msg and "100" in msg, msg


# --- 8. tensor normalisers: no silent finite wrong loss --------------------------------------

# the normaliser each aggregation divides by
USES = {"dapo": "num_tokens", "lambda_grpo": "num_tokens", "grpo": "num_sequences", "dr_grpo": "num_sequences"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", sorted(USES))
@pytest.mark.parametrize("value", [-5.0, 0.0, 0, INF, -INF, NAN])
def test_8_bad_tensor_normaliser_gives_non_finite_loss(backend, aggregation, value):
    name = USES[aggregation]
    inp = make_batch(B=4, T=5, V=7, G=2, seed=8)
    lam = 0.3 if aggregation == "lambda_grpo" else None
    out, x, lam_t = _loss(backend, inp, lg.LossConfig(aggregation=aggregation), lam=lam,
                          **{name: torch.tensor(value)})
    assert torch.isnan(out.loss), f"{name}=tensor({value}): loss {out.loss.item()}"
    if lam_t is not None:
        out.loss.backward()
        assert torch.isnan(lam_t.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", sorted(USES))
def test_8_good_tensor_normaliser_equals_python_number(backend, aggregation):
    name = USES[aggregation]
    inp = make_batch(B=4, T=5, V=7, G=2, seed=8)
    lam = 0.3 if aggregation == "lambda_grpo" else None
    cfg = lg.LossConfig(aggregation=aggregation)
    a, _, _ = _loss(backend, inp, cfg, lam=lam, **{name: 37})
    b, _, _ = _loss(backend, inp, cfg, lam=lam, **{name: torch.tensor(37)})
    assert torch.isfinite(a.loss) and torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("name", ["num_tokens", "num_sequences"])
@pytest.mark.parametrize("value,shown", [(INF, "inf"), (-INF, "-inf"), (NAN, "nan"), (torch.tensor(True), "bool")])
def test_8_bad_python_normaliser_raises(name, value, shown):
    inp = make_batch(B=4, T=5, V=7, G=2, seed=8)
    with pytest.raises(ValueError) as e:
        lg.grpo_loss(**inp, config=lg.LossConfig(aggregation="dapo"), backend="reference", **{name: value})
    msg = str(e.value)
    assert msg.startswith(f"{name}:") and "expected" in msg and shown in msg, msg


# --- 11. token_logprobs(temperature=inf) -----------------------------------------------------

@pytest.mark.parametrize("tau,shown", [(INF, "inf"), (-INF, "-inf"), (NAN, "nan")])
def test_11_token_logprobs_non_finite_temperature(tau, shown):
    with pytest.raises(ValueError) as e:
        lg.token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=tau)
    msg = str(e.value)
    assert msg.startswith("temperature:") and "expected" in msg and shown in msg, msg


# --- 12. the message of a refused backend="triton" call on a CPU -----------------------------

REFUSAL_SCRIPT = textwrap.dedent(r"""
    import os, torch
    import lambda_grpo as lg
    x = torch.zeros(2, 3, 5)
    tok = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3, dtype=torch.bool)
    calls = [lambda: lg.grpo_loss(x, tok, mask, torch.ones(2), 2, config=lg.LossConfig(aggregation="dapo"),
                                  backend="triton"),
             lambda: lg.token_logprobs(x, tok, backend="triton")]
    for step in ("before", "after"):
        for call in calls:
            try:
                call()
                print(step, "RAN")
            except Exception as e:
                print(step, type(e).__name__, str(e).replace("\n", " "))
        os.environ["TRITON_INTERPRET"] = "1"  # what the old message suggested
""")


def test_12_triton_refusal_says_what_works():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the refusal is about CPU tensors; keep CUDA out of it
    res = subprocess.run([sys.executable, "-c", REFUSAL_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith(("before", "after"))]
    assert len(lines) == 4, res.stdout
    for line in lines:
        # a ValueError naming logits, not "RuntimeError: 0 active drivers", before and after the
        # user set TRITON_INTERPRET=1 inside the process
        assert line.split()[1] == "ValueError" and " logits: expected a CUDA tensor" in line, line
        # it says what works: backend='torch', or starting Python with the variable set, and
        # that setting it in the running process does not
        assert "backend='torch'" in line and "TRITON_INTERPRET=1 python" in line and "no effect" in line, line


def test_12_interpreter_started_with_the_variable_works():
    # the advice of the message, followed: the variable in the environment of a new process
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    script = ("import torch, lambda_grpo as lg\n"
              "x = torch.zeros(2, 3, 5); tok = torch.zeros(2, 3, dtype=torch.long)\n"
              "print('logp', float(lg.token_logprobs(x, tok, backend='triton')[0, 0]))\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert abs(float(res.stdout.split()[-1]) + math.log(5)) < 1e-6  # uniform over V = 5: -ln 5


# --- 13. inputs on the meta device ------------------------------------------------------------

def test_13_meta_device_inputs_are_refused_clearly():
    B, T, V = 2, 3, 5
    meta = dict(logits=torch.zeros(B, T, V, device="meta"), tokens=torch.zeros(B, T, dtype=torch.long, device="meta"),
                advantages=torch.ones(B, device="meta"), group_size=2)
    for mask in (torch.ones(B, T, dtype=torch.bool, device="meta"), torch.ones(B, T, dtype=torch.long, device="meta")):
        for backend in ("reference", "torch", "auto"):
            with pytest.raises(ValueError) as e:
                lg.grpo_loss(**meta, mask=mask, config=lg.LossConfig(aggregation="dapo"), backend=backend)
            assert str(e.value).startswith("logits:") and "meta" in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        lg.token_logprobs(meta["logits"], meta["tokens"])
    assert str(e.value).startswith("logits:") and "meta" in str(e.value), str(e.value)


# --- found while testing 1: beta = 0 with an infinite KL -------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
# (-inf logp with a ratio-mode trace makes the whole row NaN in every backend: the scan's 0 * -inf)
@pytest.mark.parametrize("where,trace", [("ref_logp", None), ("ref_logp", "recent"), ("logits", None)])
def test_beta_zero_infinite_kl_leaves_the_loss_alone(backend, trace, where):
    # With beta = 0 the KL is only reported (kl_mean); a legal -inf (ref_logp of -inf, or a -inf
    # logit at the sampled token, off-policy) makes it non-finite, and Triton's beta * kl = 0 * inf
    # made the loss NaN. The loss must equal the loss computed without ref_logp at all.
    cfg = lg.LossConfig(aggregation="dapo", trace=trace)
    inp = make_batch(B=2, T=4, V=7, G=2, mask="full", seed=1)
    if where == "ref_logp":
        inp["ref_logp"][0, 1] = -INF
    else:
        inp["logits"][0, 1, inp["tokens"][0, 1]] = -INF
    with_ref, x, _ = _loss(backend, inp, cfg)
    without, _, _ = _loss(backend, dict(inp, ref_logp=None), cfg)
    assert not torch.isfinite(with_ref.metrics["kl_mean"])  # inf (k3 of d = -inf), or nan (inf - inf)
    assert torch.equal(with_ref.loss, without.loss), (with_ref.loss, without.loss)
    with_ref.loss.backward()
    assert not torch.isnan(x.grad).any()


# --- found while calibrating the tolerance rule: p = exp(x - lse) with lse in one fp32 number ---
# The backward recomputed p = exp(x / tau - lse) with lse = max + log(sum) held as one fp32 number,
# which loses |lse| 2^-24 of log p (here |x / tau| ~ 200: p off by ~1e-5 relative, 6x plain torch's
# largest error); plain torch keeps x - max apart. Now both engines keep lse as [max, log sum]
# (failed on a0aef5a for the torch two-pass backward and both Triton schedules).


@pytest.mark.parametrize("backend,trace", [
    ("torch", None),  # the torch engine's fused schedule computes p from x - max
    ("torch", "recent"),  # two-pass backward
    ("triton", None),  # the fused kernel
    ("triton", "recent"),  # two-pass backward
])
def test_extreme_logits_softmax_precision(backend, trace):
    if backend not in BACKENDS:
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from tests._compare import assert_backend_matches

    cfg = lg.LossConfig(aggregation="grpo", trace=trace, beta=0.5, kl_estimator="k2", temperature=0.7)
    inp = make_batch(B=4, T=5, V=17, G=2, dtype=torch.float32, seed=1, mask="holes", logit_scale=50.0)
    assert_backend_matches(backend, inp, cfg, lam=1.5)
