"""Property tests of the surface added since the first hardening round (issue 18, "Done when"):
packed inputs, group_lengths / group_index over ranks, token weights, the new surrogates, on the
three entry points (grpo_loss from logits, grpo_loss_from_logprobs, fused_linear_grpo_loss from
hidden states) and every backend (reference, torch, triton; the entry from log-probs has one),
against the float64 reference. Public API only (`import lambda_grpo as lg`).

1. A random packed layout, with garbage at every masked position (NaN, +-inf or 1e30 in the
   logits / hidden rows, old_logp, ref_logp, token weights, per-token advantages, the log-probs and
   entropies given to the entry from log-probs; out-of-range token ids), gives the float64
   reference's result on the same batch right-padded to (B, T_max) with clean (finite, in-range)
   values there: loss, metrics, per-token outputs, the gradients (gathered to the packed rows;
   exactly zero at masked rows) and d(lambda).
2. The rows of a batch split at random over "ranks" (each rank's rows in any order, padded or
   packed, with garbage at masked positions; group_lengths / group_index for lambda-GRPO,
   num_tokens / num_sequences the global counts, max_completion_length fixed): the rank losses
   sum to the full batch's reference loss, and their gradients to its gradients.

Tolerance (tests/_compare.py): element by element at most FACTOR x plain torch's error in the same
dtype, + a per-dtype atol and a few ulp of the value, the worst element printed on failure. Plain
torch in fp32: the logits (hidden @ W^T + b for the hidden states) in fp32, torch's log_softmax and
entropy in fp32, then the loss's row math in fp32 (grpo_loss_from_logprobs on fp32 log-probs),
autograd through all of it; the farthest from the truth of that on the inputs and on two one-ulp
moves of them (one evaluation can land lucky). In float64 (no higher precision to measure against):
the farthest of the reference itself on three one-ulp moves of its float64 inputs.

Example counts are modest and derandomized; the Triton cases (interpreter: ~0.6 ms per program)
are tiny: B <= 6 rows of at most 4 tokens, V = 9.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lambda_grpo as lg
from tests._compare import FACTOR, RTOL, abs_err, assert_close_to_truth, gather, max_err, pad

V, H = 9, 6
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
AGGS = ("grpo", "bnpo", "dapo", "dr_grpo", "lambda_grpo", "token_sum", "seq_mean_token_sum")
SPLIT_AGGS = tuple(a for a in AGGS if a != "bnpo")  # bnpo divides by the local count: ranks do not sum
TRACES = [(None, "ratio"), ("recent", "ratio"), ("both", "ratio"), ("recent", "weight"), ("both", "weight")]
VARIANTS = ({}, dict(importance_sampling="sequence"), dict(surrogate="vespo"), dict(surrogate="cispo", eps_high=1.2),
            dict(surrogate="cispo_two_sided"), dict(surrogate="sapo"), dict(dual_clip=3.0))
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e30}
BAD_IDS = (-3, V, 10**9)


pytestmark = pytest.mark.usefixtures("two_threads")


def _config(agg, tr, beta, ent, tau, variant, max_len=None):
    kw = dict(aggregation=agg, trace=tr[0], trace_mode=tr[1], beta=beta, entropy_coef=ent, temperature=tau,
              max_completion_length=max_len, **variant)
    try:
        return lg.LossConfig(**kw)
    except ValueError:  # a ratio-mode trace with a row-coupled surrogate (GSPO, VESPO): the weight mode
        return lg.LossConfig(**dict(kw, trace_mode="weight"))


@dataclass
class Case:
    lens: List[int]
    G: int
    seed: int
    cfg: lg.LossConfig
    lam: float
    tw: bool
    per_token_adv: bool
    bias: bool
    bad: str
    bad_id: int
    dtype: torch.dtype


def case_strategy(max_len, dtypes, aggs, split=False):
    @st.composite
    def draw(d):
        G = d(st.sampled_from([2, 3]))
        B = G * d(st.integers(1 if not split else 2, 2))
        lens = d(st.lists(st.integers(0, max_len), min_size=B, max_size=B))
        cfg = _config(d(st.sampled_from(aggs)), d(st.sampled_from(TRACES)), d(st.sampled_from([0.0, 0.1])),
                      d(st.sampled_from([0.0, 0.02])), d(st.sampled_from([1.0, 0.7])), d(st.sampled_from(VARIANTS)),
                      max_len if split else None)
        per_token_adv = d(st.booleans()) and sum(lens) != B  # N == B: a 1-d tensor is per segment (documented)
        return Case(lens, G, d(st.integers(0, 2**31 - 1)), cfg, d(st.sampled_from([0.0, 0.7, -1.5])),
                    d(st.booleans()), per_token_adv, d(st.booleans()), d(st.sampled_from(sorted(BAD))),
                    d(st.sampled_from(BAD_IDS)), d(st.sampled_from(dtypes)))
    return draw()


# --------------------------------------------------------------------------------------------
# Data: every per-token tensor is made packed (N, ...); a layout turns it into a call's inputs
# --------------------------------------------------------------------------------------------
def make_data(c: Case, entry: str) -> dict:
    """The clean packed batch in the case's dtype (the garbage goes in per call, see `_inputs`)."""
    g = torch.Generator().manual_seed(c.seed)
    N, B, dt = sum(c.lens), len(c.lens), c.dtype
    d = dict(tokens=torch.randint(0, V, (N,), generator=g), mask=torch.rand(N, generator=g) > 0.25)
    if entry == "hidden":
        d["hidden"] = torch.randn(N, H, generator=g, dtype=torch.float64).to(dt)
        d["weight"] = (torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)).to(dt)
        d["bias"] = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dt) if c.bias else None
        logits = d["hidden"].double() @ d["weight"].double().T + (0 if d["bias"] is None else d["bias"].double())
    else:
        d["logits"] = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).to(dt)
        logits = d["logits"].double()
    base = torch.log_softmax(logits / c.cfg.temperature, -1).gather(-1, d["tokens"][:, None]).squeeze(-1)
    d["old_logp"] = (base + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).to(dt)
    d["ref_logp"] = (base + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).to(dt)
    d["advantages"] = torch.randn(N if c.per_token_adv else B, generator=g, dtype=torch.float64).to(dt)
    d["token_weights"] = (torch.rand(N, generator=g, dtype=torch.float64) * 1.5 + 0.25).to(dt) if c.tw else None
    return d


def _ulp_moved(d: dict, seed: int) -> dict:
    """The float inputs of the batch moved by one ulp of their dtype in random directions."""
    g = torch.Generator().manual_seed(seed)
    out = dict(d)
    for k in ("logits", "hidden", "weight", "bias", "old_logp", "ref_logp"):
        v = d.get(k)
        if v is None:
            continue
        up = torch.rand(v.shape, generator=g) < 0.5
        out[k] = torch.nextafter(v, torch.where(up, float("inf"), float("-inf")).to(v.dtype))
    return out


# --------------------------------------------------------------------------------------------
# One call of an entry point on some rows of the batch, packed or padded, clean or with garbage
# --------------------------------------------------------------------------------------------
def _rows_index(lens, rows):
    """Packed token indices of the segments `rows` (in that order) and their lengths."""
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    idx = [torch.arange(starts[i], starts[i] + lens[i]) for i in rows]
    return (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)), [lens[i] for i in rows]


def call(entry: str, backend: Optional[str], c: Case, d: dict, leaves: dict, rows, packed: bool, garbage: bool,
         lam, split: Optional[dict] = None, reference_plain: bool = False, checks: Optional[list] = None):
    """The LossOutput of one call on the segments `rows`. `leaves` are the differentiable packed
    (N, ...) tensors (logits or hidden; weight and bias) in the call's dtype, shared by the calls
    of a split (their masked rows already hold the garbage, see `_leaves`); every other input
    comes from `d`. garbage: BAD / BAD_IDS at every masked position and at the padding.
    reference_plain: plain torch (the baseline), see the module docstring. checks: where the
    tensors whose gradient must be zero at masked positions are listed (the entry from log-probs)."""
    idx, lens = _rows_index(c.lens, rows)
    mask = d["mask"][idx]
    f_bad = BAD[c.bad] if garbage else 0.0
    i_bad = c.bad_id if garbage else 0

    def per_token(x, fill):  # (N_rows,) -> the layout; `fill` at masked positions and the padding
        x = torch.where(mask, x, torch.as_tensor(fill, dtype=x.dtype))
        return x if packed else pad(x, lens, fill)

    def rows_of(x):  # rows of a leaf (they hold what they should at masked positions); the padding gets f_bad
        x = x[idx]
        return x if packed else pad(x, lens, f_bad)

    kw = dict(old_logp=per_token(d["old_logp"][idx], f_bad), ref_logp=per_token(d["ref_logp"][idx], f_bad), lam=lam,
              config=c.cfg, return_per_token=True)
    if d["token_weights"] is not None:
        kw["token_weights"] = per_token(d["token_weights"][idx], f_bad)
    adv = d["advantages"]
    adv = per_token(adv[idx], f_bad) if c.per_token_adv else adv[torch.tensor(rows, dtype=torch.long)]
    m = mask if packed else pad(mask, lens, False)
    if packed:
        kw["cu_seqlens"] = torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist(),
                                        dtype=torch.int32)
    if split is not None:
        sel = torch.tensor(rows, dtype=torch.long)
        # group_lengths / group_index on every aggregation: a rank's rows need not be whole groups
        # (B % G is then not required; aggregations other than lambda_grpo ignore them)
        kw.update(num_tokens=split["num_tokens"], num_sequences=split["num_sequences"],
                  group_lengths=split["group_lengths"][sel], group_index=split["group_index"][sel])
    tau = c.cfg.temperature
    tok = per_token(d["tokens"][idx], i_bad)
    if entry == "hidden":
        hid = rows_of(leaves["hidden"])
        if reference_plain:
            logits = hid @ leaves["weight"].T + (0 if leaves.get("bias") is None else leaves["bias"])
            return _plain_rows(logits, tok, m, adv, c, kw, tau)
        return lg.fused_linear_grpo_loss(hid, leaves["weight"], tok, m, adv, c.G, bias=leaves.get("bias"),
                                         backend=backend, **kw)
    if entry == "logprobs" or reference_plain:
        return _plain_rows(rows_of(leaves["logits"]), tok, m, adv, c, kw, tau, garbage=f_bad if garbage else None,
                           checks=checks)
    return lg.grpo_loss(rows_of(leaves["logits"]), tok, m, adv, c.G, backend=backend, **kw)


def _plain_rows(logits, tokens, mask, adv, c, kw, tau, garbage=None, checks=None):
    """log_softmax and entropy in plain torch in the logits' dtype, then grpo_loss_from_logprobs;
    garbage (not None): that value in the log-probs and entropies at masked positions (the
    library's gradient there must be zero: they are listed in `checks`)."""
    lsm = torch.log_softmax(logits / tau, -1)
    logp = lsm.gather(-1, tokens.clamp(0, V - 1)[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1) if c.cfg.needs_entropy else None
    if garbage is not None:
        bad = torch.as_tensor(garbage, dtype=logp.dtype)
        logp = torch.where(mask, logp, bad)
        ent = None if ent is None else torch.where(mask, ent, bad)
        for name, t in (("logp", logp), ("entropy", ent)):
            if t is not None and checks is not None:
                t.retain_grad()
                checks.append((name, t, mask))
    return lg.grpo_loss_from_logprobs(logp, mask, adv, c.G, entropy=ent, **kw)


# --------------------------------------------------------------------------------------------
# Runs: truth, baseline, the call under test
# --------------------------------------------------------------------------------------------
def _leaves(entry, d, dtype, c: Optional[Case] = None):
    """Leaf copies of the batch's large tensors in `dtype`; with c given, the masked rows of the
    logits / hidden states hold the case's garbage (the leaf is what the library reads, so its
    gradient there is the library's own). The entry from log-probs keeps clean logits: its
    garbage goes into the log-probs (see `_plain_rows`)."""
    names = ("hidden", "weight", "bias") if entry == "hidden" else ("logits",)
    out = {}
    for k in names:
        v = d.get(k)
        if v is None:
            out[k] = None
            continue
        v = v.detach().to(dtype)
        if c is not None and k in ("logits", "hidden") and entry != "logprobs":
            v = torch.where(d["mask"][:, None], v, torch.as_tensor(BAD[c.bad], dtype=dtype))
        out[k] = v.clone().requires_grad_(True)
    return out


def _lam(c, dtype):
    return torch.tensor(c.lam, dtype=dtype, requires_grad=True) if c.cfg.uses_lambda else None


def _result(outs, leaves, lam, lens_all, packed_outputs=True, checks=()):
    """Loss (summed over the calls), metrics and per-token outputs (of the one call, packed), the
    gradients of the leaves and lam; `checks` (name, tensor, mask): gradients that must be exactly
    zero at masked positions."""
    loss = sum(o.loss for o in outs)
    loss.backward()
    for name, t, mask in checks:
        gm = t.grad[~mask]
        assert torch.equal(gm, torch.zeros_like(gm)), f"d{name}: non-zero at masked positions: {gm}"
    res = dict(loss=loss.detach(), grads={k: v.grad for k, v in leaves.items() if v is not None},
               dlam=None if lam is None else lam.grad)
    if len(outs) == 1:
        o = outs[0]
        res["metrics"] = {k: v.detach() for k, v in o.metrics.items()}
        res["per_token"] = {k: (v if packed_outputs else gather(v, lens_all)).detach() for k, v in o.per_token.items()}
    return res


def truth_run(entry, c, d):
    """The float64 reference on the whole batch, padded, clean."""
    leaves = _leaves(entry, d, torch.float64)
    lam = _lam(c, torch.float64)
    dd = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in d.items()}
    out = call("hidden" if entry == "hidden" else "logits", "reference", c, dd, leaves, list(range(len(c.lens))),
               packed=False, garbage=False, lam=lam)
    return _result([out], leaves, lam, c.lens, packed_outputs=False)


def baseline_run(entry, c, d):
    """Plain torch's error scale, per quantity the farthest from the truth of three runs (see the
    module docstring)."""
    truth = truth_run(entry, c, d)
    rows = list(range(len(c.lens)))
    runs = []
    for s in (None, 1, 2):
        dd = d if s is None else _ulp_moved(d, s)
        if c.dtype == torch.float64:
            if s is None:
                dd = _ulp_moved(d, 3)
            runs.append(truth_run(entry, c, dd))
            continue
        leaves = _leaves(entry, dd, c.dtype)
        lam = _lam(c, torch.float32)
        out = call(entry, None, c, dd, leaves, rows, packed=False, garbage=False, lam=lam, reference_plain=True)
        runs.append(_result([out], leaves, lam, c.lens, packed_outputs=False))

    def far(get):
        vals = [get(r) for r in runs]
        return None if vals[0] is None else max(vals, key=lambda v: max_err(v, get(truth)))

    base = dict(loss=far(lambda r: r["loss"]), dlam=far(lambda r: r["dlam"]),
                grads={k: far(lambda r, k=k: r["grads"][k]) for k in truth["grads"]},
                metrics={k: far(lambda r, k=k: r["metrics"][k]) for k in truth["metrics"]},
                per_token={k: far(lambda r, k=k: r["per_token"][k]) for k in truth["per_token"]})
    return truth, base


def _clip_slack(c: Case, d: dict, truth_ratio, base_ratio):
    """How far clip_frac_low / _high may honestly move: the share of valid tokens whose ratio is
    within FACTOR x plain torch's ratio error of the boundary on the side that counts (as
    tests/_compare.clip_slack, on the packed tokens)."""
    mask = d["mask"]
    n = max(1, int(mask.sum()))
    adv = d["advantages"].double()
    A = adv if c.per_token_adv else adv.repeat_interleave(torch.tensor(c.lens))
    if c.cfg.adv_clamp_min is not None:
        A = A.clamp(min=c.cfg.adv_clamp_min)
    t, b = truth_ratio.double(), base_ratio.double()
    reach = FACTOR * abs_err(b, t) + RTOL[torch.float32] * t.abs()
    lo_b, hi_b = (1 - c.cfg.eps_low, 1 + c.cfg.eps_high)
    if c.cfg.surrogate == "cispo":
        hi_b = c.cfg.eps_high
    two_sided = c.cfg.surrogate == "cispo_two_sided"
    near_lo = (t - lo_b).abs() <= reach
    near_hi = (t - hi_b).abs() <= reach
    lo = mask & near_lo & ((A < 0) | two_sided)
    hi = mask & near_hi & ((A > 0) | two_sided)
    return int(lo.sum()) / n, int(hi.sum()) / n


def compare(entry, c, d, got, truth, base, full_outputs=True):
    dt = c.dtype
    rule = torch.float64 if dt == torch.float64 else torch.float32
    assert_close_to_truth("loss", got["loss"], truth["loss"], base["loss"], rule)
    if truth["dlam"] is not None:
        assert_close_to_truth("dlam", got["dlam"], truth["dlam"], base["dlam"], rule)
    for k, t in truth["grads"].items():
        packed_rows = k in ("logits", "hidden")
        want = gather(t, c.lens) if packed_rows and t.dim() == 3 else t
        b = base["grads"][k]
        b = gather(b, c.lens) if packed_rows and b.dim() == 3 else b
        assert got["grads"][k].dtype == dt, (k, got["grads"][k].dtype)
        assert_close_to_truth(f"d{k}", got["grads"][k], want, b, dt)
        if packed_rows:  # the garbage rows get no gradient at all
            masked = got["grads"][k][~d["mask"]]
            assert torch.equal(masked, torch.zeros_like(masked)), f"d{k}: non-zero at masked rows"
    if not full_outputs:
        return
    assert set(got["metrics"]) == set(truth["metrics"]), (sorted(got["metrics"]), sorted(truth["metrics"]))
    lo, hi = _clip_slack(c, d, truth["per_token"]["ratio"], base["per_token"]["ratio"])
    for k, v in truth["metrics"].items():
        if k.startswith("clip_frac"):
            slack = {"clip_frac_low": lo, "clip_frac_high": hi, "clip_frac": lo + hi}[k]
            assert abs(float(got["metrics"][k]) - float(v)) <= slack + 1e-6, (k, float(got["metrics"][k]), float(v))
        else:
            assert_close_to_truth(f"metrics[{k}]", got["metrics"][k], v, base["metrics"][k], rule)
    for k, v in truth["per_token"].items():
        assert_close_to_truth(f"per_token[{k}]", got["per_token"][k], v, base["per_token"][k], rule)


# --------------------------------------------------------------------------------------------
# 1. packed + garbage == padded + clean, against the float64 reference
# --------------------------------------------------------------------------------------------
def _packed_case(entry, backend, c: Case):
    if backend == "reference":
        c = replace(c, dtype=torch.float64)
    d = make_data(c, entry)
    truth, base = baseline_run(entry, c, d)
    leaves = _leaves(entry, d, c.dtype, c)
    lam = _lam(c, c.dtype if c.dtype == torch.float64 else torch.float32)
    checks: list = []
    out = call(entry, backend, c, d, leaves, list(range(len(c.lens))), packed=True, garbage=True, lam=lam,
               checks=checks)
    got = _result([out], leaves, lam, c.lens, checks=checks)
    compare(entry, c, d, got, truth, base)


CHEAP = [("logits", "reference"), ("logits", "torch"), ("hidden", "reference"), ("hidden", "torch"),
         ("logprobs", None)]


@pytest.mark.parametrize("entry, backend", CHEAP)
@settings(max_examples=20, **SETTINGS)
@given(c=case_strategy(5, [torch.float32, torch.float64], AGGS))
def test_packed_with_garbage_matches_padded_reference(entry, backend, c):
    _packed_case(entry, backend, c)


@pytest.mark.parametrize("entry", ["logits", "hidden"])
@settings(max_examples=8, **SETTINGS)
@given(c=case_strategy(4, [torch.float32], AGGS))
def test_packed_with_garbage_matches_padded_reference_triton(entry, c):
    _packed_case(entry, "triton", c)


# --------------------------------------------------------------------------------------------
# 2. rows split over ranks: the rank losses and gradients sum to the full batch's
# --------------------------------------------------------------------------------------------
def _split_case(entry, backend, c: Case, parts_seed: int, layouts: List[bool]):
    if backend == "reference":
        c = replace(c, dtype=torch.float64)
    d = make_data(c, entry)
    B = len(c.lens)
    g = torch.Generator().manual_seed(parts_seed)
    perm = torch.randperm(B, generator=g).tolist()
    k = 2 + parts_seed % 2
    cuts = sorted(torch.randperm(B - 1, generator=g)[: k - 1].add(1).tolist())
    parts = [perm[a:b] for a, b in zip([0] + cuts, cuts + [B])]
    counts = torch.stack([d["mask"][_rows_index(c.lens, [i])[0]].sum() for i in range(B)])
    split = dict(num_tokens=max(int(counts.sum()), 1), num_sequences=B,
                 group_lengths=counts.view(B // c.G, c.G).repeat_interleave(c.G, dim=0),
                 group_index=torch.arange(B) % c.G)
    truth, base = baseline_run(entry, c, d)
    leaves = _leaves(entry, d, c.dtype, c)
    lam = _lam(c, c.dtype if c.dtype == torch.float64 else torch.float32)
    checks: list = []
    outs = [call(entry, backend, c, d, leaves, rows, packed=layouts[i % len(layouts)], garbage=True, lam=lam,
                 split=split, checks=checks) for i, rows in enumerate(parts)]
    got = _result(outs, leaves, lam, c.lens, checks=checks)
    compare(entry, c, d, got, truth, base, full_outputs=False)


split_args = dict(parts_seed=st.integers(0, 10**6), layouts=st.lists(st.booleans(), min_size=1, max_size=3))


@pytest.mark.parametrize("entry, backend", CHEAP)
@settings(max_examples=15, **SETTINGS)
@given(c=case_strategy(5, [torch.float32, torch.float64], SPLIT_AGGS, split=True), **split_args)
def test_rank_split_sums_to_full_batch_reference(entry, backend, c, parts_seed, layouts):
    _split_case(entry, backend, c, parts_seed, layouts)


@pytest.mark.parametrize("entry", ["logits", "hidden"])
@settings(max_examples=6, **SETTINGS)
@given(c=case_strategy(4, [torch.float32], SPLIT_AGGS, split=True), **split_args)
def test_rank_split_sums_to_full_batch_reference_triton(entry, c, parts_seed, layouts):
    _split_case(entry, "triton", c, parts_seed, layouts)
