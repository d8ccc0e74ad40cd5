"""Shared test helpers: random GRPO batches and the tolerance rule.

Tolerance rule (DEVELOPERS.md): a backend may be at most FACTOR x as far from the float64
truth as plain PyTorch in the same dtype, plus a small atol. "Plain PyTorch in the same
dtype" is the reference backend run with fp32 math (SPEC §4: per-token math is fp32 for
fp32/bf16/fp16 logits) on the very same input tensors, gradients landing in the logits'
dtype exactly as the backend's do. The truth is the reference in float64 on the same values.
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
RTOL = {torch.float64: 8 * 2.0**-52, torch.float32: 4 * 2.0**-23, torch.bfloat16: 4 * 2.0**-23, torch.float16: 4 * 2.0**-23}
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
    if backend == "reference" and dtype == torch.float64:
        logits = logits.double()  # the truth: same values, float64 leaf, float64 gradient
    logits.requires_grad_(True)
    lam_t = None
    if config.aggregation == "lambda_grpo":
        lam_t = torch.tensor(float(lam), dtype=torch.float32, requires_grad=True)
    args = dict(inputs, logits=logits)
    if backend == "reference" and dtype is not None:
        batch = validate(args["logits"], args["tokens"], args["mask"], args["advantages"], args["group_size"],
                         args.get("old_logp"), args.get("ref_logp"), lam_t, config, args.get("num_tokens"),
                         args.get("num_sequences"))
        out = reference_loss(batch, config, dtype=dtype)
    else:
        out = lg.grpo_loss(**args, lam=lam_t, config=config, backend=backend)
    out.loss.backward()
    return dict(loss=out.loss.detach(), metrics={k: v.detach() for k, v in out.metrics.items()},
                dlogits=logits.grad, dlam=None if lam_t is None else lam_t.grad)


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
    return out


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    d = (a - b).abs()
    d = torch.where(both_nan | same_inf, torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max()) if d.numel() else 0.0


def assert_close_to_truth(name: str, actual, truth, baseline, dtype, factor: float = FACTOR, atol: Optional[float] = None):
    """|actual - truth|_max <= factor * |baseline - truth|_max + atol + rtol * |truth|_max."""
    atol = ATOL[dtype] if atol is None else atol
    err = max_err(actual, truth)
    scale = float(truth.double().abs().nan_to_num(0, 0, 0).max()) if truth.numel() else 0.0
    allowed = factor * max_err(baseline, truth) + atol + RTOL[dtype] * scale
    assert err <= allowed, f"{name}: error {err:.3e} vs truth exceeds {allowed:.3e} (plain-torch error x{factor} + {atol:g} + rtol*|truth|)"


def assert_backend_matches(backend: str, inputs: dict, config: lg.LossConfig, lam: float = 0.0,
                           check_grad: bool = True):
    """Compare loss, metrics, dlogits and dlam of `backend` with the float64 truth."""
    dtype = inputs["logits"].dtype
    truth = run("reference", inputs, config, lam, dtype=torch.float64)
    if dtype != torch.float64:
        base = run("reference", inputs, config, lam, dtype=torch.float32)
    else:
        # the worst of three one-ulp input perturbations (a single draw can land lucky)
        runs = [run("reference", one_ulp_perturbed(inputs, seed), config, lam, dtype=torch.float64) for seed in range(3)]
        base = _farthest(runs, truth)
    got = run(backend, inputs, config, lam)
    assert got["loss"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_truth("loss", got["loss"], truth["loss"], base["loss"], dtype)
    assert set(got["metrics"]) == set(truth["metrics"]), (sorted(got["metrics"]), sorted(truth["metrics"]))
    for k in truth["metrics"]:
        if k.startswith("clip_frac"):
            # indicator means: a token at the clip boundary may flip; allow one token's worth
            n = max(1, int(inputs["mask"].sum()))
            assert max_err(got["metrics"][k], truth["metrics"][k]) <= max_err(base["metrics"][k], truth["metrics"][k]) * FACTOR + 1.0 / n + 1e-6, k
        else:
            assert_close_to_truth(f"metrics[{k}]", got["metrics"][k], truth["metrics"][k], base["metrics"][k], dtype)
    if check_grad:
        assert got["dlogits"].dtype == dtype
        assert_close_to_truth("dlogits", got["dlogits"], truth["dlogits"], base["dlogits"], dtype)
        if truth["dlam"] is not None:
            assert_close_to_truth("dlam", got["dlam"], truth["dlam"], base["dlam"], dtype)
    return got, truth
