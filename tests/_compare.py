"""Shared test helpers: random GRPO batches and the tolerance rule.

Tolerance rule (DEVELOPERS.md), element by element: each element of a backend's result may be
at most FACTOR x as far from the float64 truth as plain PyTorch in the same dtype, plus a small
per-dtype atol and a few units of fp32 roundoff of the element's own size. "Plain PyTorch in the
same dtype" is the reference backend run with fp32 math (docs/math.md §2: per-token math is fp32 for
fp32/bf16/fp16 logits) on the very same input tensors, gradients landing in the logits' dtype
exactly as the backend's do. The truth is the reference in float64 on the same values.

Plain torch's error has two parts, and the budget takes each at the scale where it is honest:
- the rounding of the result to its dtype (bf16/fp16 dlogits): per element, as plain torch's
  error at that element. With one budget for the whole tensor (the old rule: 2x plain torch's
  *largest* error) every element got the rounding of the largest one, which in bf16 is big enough
  to hide a dropped or 1.25x-scaled entropy gradient (issue 8);
- the fp32 arithmetic before it: over the whole tensor, as plain torch's largest fp32 error
  (measured on the unrounded fp32 gradient). Per element it is a single draw of roundoff that
  cancellation can amplify (k3/k2 KL and trace scans at extreme logits): taken per element, a
  lucky draw sets a budget that honest arithmetic cannot meet (seen: an element where plain torch
  was off by 5e-7 and the torch backend by 1.3e-5, within the 2.2e-6 relative error plain torch
  had elsewhere in the same tensor).
So budget_i = FACTOR x max(plain torch's error at i, plain torch's largest fp32 error) + atol +
rtol x |truth_i|, never above the old whole-tensor budget. For fp32 and float64 results the
two parts coincide and the rule is the old one with a per-element rtol. A failure names the worst
element with the three values (actual, truth, baseline).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

import lambda_grpo as lg
from lambda_grpo._validate import validate
from lambda_grpo.reference import reference_loss

FACTOR = 2.0
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
# A few units of roundoff of the compute dtype times the size of the value: a reduction of many
# fp32 terms can land 2-4 ulp from the truth while plain torch lands 0 ulp away by luck.
RTOL = {torch.float64: 8 * 2.0**-52, torch.float32: 4 * 2.0**-23, torch.bfloat16: 4 * 2.0**-23,
        torch.float16: 4 * 2.0**-23}
# Where make_batch puts its tensors by default: "cpu" (the Triton tests then run under
# TRITON_INTERPRET=1), or "cuda" to run the same tests natively on a GPU (bench/gpu_check.py sets it).
DEVICE = os.environ.get("LG_TEST_DEVICE", "cpu")


def make_batch(B=4, T=7, V=13, G=2, dtype=torch.float32, seed=0, mask="holes", per_token_adv=False,
               off_policy=True, with_ref=True, logit_scale=2.0, equal_rewards=False, device=None):
    """Random inputs for grpo_loss as a dict of keyword arguments (without config/backend).

    The values are drawn on the CPU (the same numbers on any machine), then moved to `device`
    (default: DEVICE, i.e. $LG_TEST_DEVICE or "cpu").

    mask: "full" | "holes" (random holes) | "empty_rows" (holes plus rows with no valid token)
          | "len1" (exactly one valid token per row) | "prefix" (right-padded, varied lengths).
    """
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * logit_scale).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    if mask == "full":
        m = torch.ones(B, T, dtype=torch.bool)
    elif mask == "holes":
        m = torch.rand(B, T, generator=g) > 0.3
    elif mask == "empty_rows":
        m = torch.rand(B, T, generator=g) > 0.3
        m[torch.rand(B, generator=g) < 0.35] = False
        m[0] = False
    elif mask == "len1":
        m = torch.zeros(B, T, dtype=torch.bool)
        m[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = True
    elif mask == "prefix":
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        m = torch.arange(T)[None, :] < lengths[:, None]
    else:
        raise ValueError(mask)
    if equal_rewards:
        adv = torch.zeros(B)
    elif per_token_adv:
        adv = torch.randn(B, T, generator=g)
    else:
        adv = torch.randn(B, generator=g)
    with torch.no_grad():
        base = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    old = (base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if off_policy else None
    ref = (base + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_ref else None
    device = DEVICE if device is None else device
    return dict(logits=logits.to(device), tokens=tokens.to(device), mask=m.to(device), advantages=adv.to(device),
                group_size=G, old_logp=None if old is None else old.to(device),
                ref_logp=None if ref is None else ref.to(device))


def run(backend: str, inputs: dict, config: lg.LossConfig, lam: Optional[float] = 0.0, dtype=None):
    """Loss, metrics, dlogits and dlam of one backend (or of the reference in `dtype`).

    backend="reference" with dtype=torch.float64 is the truth; with dtype=torch.float32 it is
    "plain torch in the same dtype"."""
    logits = inputs["logits"].detach().clone()
    out_dtype = logits.dtype
    if backend == "reference" and dtype == torch.float64:
        logits = logits.double()  # the truth: same values, float64 leaf, float64 gradient
    elif backend == "reference" and dtype == torch.float32 and logits.dtype in (torch.bfloat16, torch.float16):
        # plain torch: an fp32 leaf holding the same values, so that its fp32 gradient (before the
        # rounding to the logits' dtype) is seen too; dlogits is that gradient rounded to nearest,
        # exactly what autograd's cast back to bf16/fp16 gives
        logits = logits.float()
    logits.requires_grad_(True)
    lam_t = None
    if config.aggregation == "lambda_grpo":
        lam_t = torch.tensor(float(lam), dtype=torch.float32, requires_grad=True)
    args = dict(inputs, logits=logits)
    if backend == "reference" and dtype is not None:
        batch = validate(args["logits"], args["tokens"], args["mask"], args["advantages"], args["group_size"],
                         args.get("old_logp"), args.get("ref_logp"), lam_t, config, args.get("num_tokens"),
                         args.get("num_sequences"))
        out = reference_loss(batch, config, dtype=dtype, per_token=True)
    else:
        out = lg.grpo_loss(**args, lam=lam_t, config=config, backend=backend)
    out.loss.backward()
    res = dict(loss=out.loss.detach(), metrics={k: v.detach() for k, v in out.metrics.items()},
               dlogits=(logits.grad if out_dtype == logits.dtype or dtype == torch.float64
                        else logits.grad.to(out_dtype)),
               dlam=None if lam_t is None else lam_t.grad)
    if logits.dtype != out_dtype and dtype == torch.float32:
        res["dlogits_compute"] = logits.grad  # fp32, before the rounding to the logits' dtype
    if out.per_token is not None:
        res["ratio"] = out.per_token["ratio"]  # the rho that enters the clip (traced in ratio mode)
    return res


def one_ulp_perturbed(inputs: dict, seed: int = 0) -> dict:
    """The float64 inputs moved by one ulp in random directions.

    For float64 logits there is no higher precision to measure plain torch against, so the
    float64 "plain torch" error is taken as the reference's response to a one-ulp change of
    its inputs: how far any float64 evaluation may honestly land (it is large where the math
    amplifies roundoff, e.g. exp(ref - logp) of the k3 KL at extreme logits)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)
    for k in ("logits", "old_logp", "ref_logp"):
        v = inputs.get(k)
        if v is None:
            continue
        v = v.double()  # old/ref may be fp32: the reference reads them as float64
        up = (torch.rand(v.shape, generator=g) < 0.5).to(v.device)
        out[k] = torch.where(up, torch.nextafter(v, torch.full_like(v, float("inf"))),
                             torch.nextafter(v, torch.full_like(v, float("-inf"))))
    return out


def _farthest(runs, truth):
    """Per quantity, the run farthest from the truth (the largest plain-float64 error seen)."""
    def pick(get):
        return max((get(r) for r in runs), key=lambda v: max_err(v, get(truth)))
    out = dict(loss=pick(lambda r: r["loss"]), dlogits=pick(lambda r: r["dlogits"]),
               dlam=None if truth["dlam"] is None else pick(lambda r: r["dlam"]))
    out["metrics"] = {k: pick(lambda r, k=k: r["metrics"][k]) for k in truth["metrics"]}
    out["ratio"] = pick(lambda r: r["ratio"])
    return out


def abs_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| per element in float64; 0 where both are nan or the same infinity, inf where only
    one is nan."""
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    d = (a - b).abs()
    d = torch.where(both_nan | same_inf, torch.zeros_like(d), d)
    return torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    d = abs_err(a, b)
    return float(d.max()) if d.numel() else 0.0


def allowed_err(truth, baseline, dtype, factor: float = FACTOR, atol: Optional[float] = None,
                compute: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-element error budget (float64, the shape of truth), see the module docstring:
    factor x max(|baseline_i - truth_i|, max_j |compute_j - truth_j|) + atol + rtol x |truth_i|,
    capped by the old whole-tensor budget factor x max_j |baseline_j - truth_j| + atol +
    rtol x max_j |truth_j|. `compute` is plain torch's result before rounding to the output dtype
    (its fp32 gradient); None: the baseline itself (the rule is then the old one, per-element rtol)."""
    atol = ATOL[dtype] if atol is None else atol
    base = abs_err(baseline, truth)
    size = truth.double().abs().nan_to_num(0, 0, 0)
    if truth.numel() == 0:
        return base
    arith = max_err(baseline if compute is None else compute, truth)
    own = factor * torch.clamp(base, min=arith) + atol + RTOL[dtype] * size
    cap = factor * float(base.max()) + atol + RTOL[dtype] * float(size.max())
    return torch.clamp(own, max=cap)


def assert_close_to_truth(name: str, actual, truth, baseline, dtype, factor: float = FACTOR,
                          atol: Optional[float] = None,
                          compute: Optional[torch.Tensor] = None):
    """|actual - truth| <= `allowed_err` at every element (see the module docstring); on failure,
    the worst element with its three values. compute: plain torch before the output rounding."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} vs truth {tuple(truth.shape)}"
    if truth.numel() == 0:
        return
    err = abs_err(actual, truth)
    allowed = allowed_err(truth, baseline, dtype, factor, atol, compute)
    bad = ~(err <= allowed)  # inf <= inf holds: where plain torch overflows too, so may the backend
    if not bool(bad.any()):
        return
    over = torch.where(bad, torch.nan_to_num(err - allowed, nan=float("inf")), torch.full_like(err, -float("inf")))
    flat = int(torch.argmax(over))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), truth.shape)) if truth.dim() else ()
    a, t, b = (float(x.reshape(-1)[flat]) for x in (actual.double(), truth.double(), baseline.double()))
    n_bad = int(bad.sum())
    raise AssertionError(
        f"{name}: {n_bad} of {truth.numel()} elements outside the budget; worst at index {idx}: actual {a!r}, "
        f"truth {t!r}, plain torch {b!r}: error {float(err.reshape(-1)[flat]):.3e} > allowed "
        f"{float(allowed.reshape(-1)[flat]):.3e} (x{factor} the larger of plain torch's error there, {abs(b - t):.3e}, "
        f"and its largest fp32 error anywhere; + atol {ATOL[dtype] if atol is None else atol:g} + rtol*|truth|; "
        f"capped by the whole-tensor budget)")


def clip_slack(inputs: dict, config: lg.LossConfig, truth_ratio: torch.Tensor, base_ratio: torch.Tensor):
    """How far clip_frac_low / clip_frac_high may honestly differ from the truth: the fraction of
    valid tokens whose ratio lies within FACTOR x plain torch's ratio error (+ 4 fp32 ulps) of the
    clip boundary on the side that counts (A < 0 and 1 - eps_low, A > 0 and 1 + eps_high). Only
    those tokens may flip; with none near a boundary the fractions must match exactly (up to the
    fp32 rounding of the mean)."""
    mask = inputs["mask"] != 0
    n = max(1, int(mask.sum()))
    adv = inputs["advantages"].double()
    A = adv[:, None].expand(mask.shape) if adv.dim() == 1 else adv
    if config.adv_clamp_min is not None:
        A = A.clamp(min=config.adv_clamp_min)
    t, b = truth_ratio.double(), base_ratio.double()
    reach = FACTOR * abs_err(b, t) + RTOL[torch.float32] * t.abs()
    near_lo = (t - (1 - config.eps_low)).abs() <= reach
    near_hi = (t - (1 + config.eps_high)).abs() <= reach
    return int((mask & (A < 0) & near_lo).sum()) / n, int((mask & (A > 0) & near_hi).sum()) / n


def assert_clip_fractions_match(got_metrics: dict, truth: dict, base: dict, inputs: dict, config: lg.LossConfig):
    """clip_frac_low, clip_frac_high, clip_frac of a backend against the truth, with the slack of
    `clip_slack` (tokens at the boundary within plain torch's roundoff) and nothing more."""
    lo, hi = clip_slack(inputs, config, truth["ratio"], base["ratio"])
    for k, slack in (("clip_frac_low", lo), ("clip_frac_high", hi), ("clip_frac", lo + hi)):
        got, want = float(got_metrics[k]), float(truth["metrics"][k])
        assert abs(got - want) <= slack + 1e-6, (
            f"metrics[{k}]: {got!r} vs truth {want!r} (plain torch {float(base['metrics'][k])!r}); tokens within "
            f"roundoff of the clip boundary allow {slack:.4g}")


def assert_backend_matches(backend: str, inputs: dict, config: lg.LossConfig, lam: float = 0.0,
                           check_grad: bool = True):
    """Compare loss, metrics, dlogits and dlam of `backend` with the float64 truth."""
    dtype = inputs["logits"].dtype
    truth = run("reference", inputs, config, lam, dtype=torch.float64)
    if dtype != torch.float64:
        base = run("reference", inputs, config, lam, dtype=torch.float32)
    else:
        # the worst of three one-ulp input perturbations (a single draw can land lucky)
        runs = [run("reference", one_ulp_perturbed(inputs, seed), config, lam, dtype=torch.float64)
                for seed in range(3)]
        base = _farthest(runs, truth)
    got = run(backend, inputs, config, lam)
    assert got["loss"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_truth("loss", got["loss"], truth["loss"], base["loss"], dtype)
    assert set(got["metrics"]) == set(truth["metrics"]), (sorted(got["metrics"]), sorted(truth["metrics"]))
    # indicator means: only a token whose ratio is within roundoff of a clip boundary may flip
    assert_clip_fractions_match(got["metrics"], truth, base, inputs, config)
    for k in truth["metrics"]:
        if not k.startswith("clip_frac"):
            assert_close_to_truth(f"metrics[{k}]", got["metrics"][k], truth["metrics"][k], base["metrics"][k], dtype)
    if check_grad:
        assert got["dlogits"].dtype == dtype
        assert_close_to_truth("dlogits", got["dlogits"], truth["dlogits"], base["dlogits"], dtype,
                              compute=base.get("dlogits_compute"))
        if truth["dlam"] is not None:
            assert_close_to_truth("dlam", got["dlam"], truth["dlam"], base["dlam"], dtype)
    return got, truth


# --------------------------------------------------------------------------------------------
# Packed (cu_seqlens) and padded layouts of the same batch, for the packed tests
# --------------------------------------------------------------------------------------------
def _pos(lens, T):
    """Flat (B*T_max) positions of the packed tokens of segments of lengths `lens`."""
    return torch.cat([torch.arange(n) + i * T for i, n in enumerate(lens)]) if sum(lens) else \
        torch.zeros(0, dtype=torch.long)


def pad(x, lens, fill=0):
    """(N, ...) packed -> (B, T_max, ...) right-padded, `fill` at the padding; differentiable in x."""
    B, T = len(lens), max(lens, default=0)
    out = torch.full((B * T,) + tuple(x.shape[1:]), fill, dtype=x.dtype)
    return out.index_put((_pos(lens, T),), x).view(B, T, *x.shape[1:])


def gather(x, lens):
    """(B, T_max, ...) -> (N, ...): the packed positions."""
    B, T = len(lens), max(lens, default=0)
    return x.reshape(B * T, *x.shape[2:])[_pos(lens, T)]
