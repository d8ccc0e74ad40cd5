"""Agreement check run before anything is timed: every provider against the float64 truth.

The truth is the reference backend's math in float64 on a float64 copy of the very inputs the
providers get (for the "hidden" task the logits are formed in float64 too), with autograd
gradients. A provider agrees when

    |loss - loss*| / max(|loss*|, LOSS_FLOOR)       <= tol[dtype]["loss"]
    max|g - g*| / max|g*|         (for every leaf g) <= tol[dtype]["grad"]

The tolerances are per dtype. fp32 must agree to accumulated rounding (measured errors are
~1e-6; 1e-4 / 1e-3 leave room for other summation orders, and any formula or normaliser mistake
is orders of magnitude larger). bf16 inputs carry 8 mantissa bits and bf16 gradients are rounded
to them (measured 2.4e-3 of the largest gradient for every fp32-math provider), so 3e-2 is the
bound there. A provider that does the softmax itself in bf16 (TRL's bf16 path: log-probs rounded
to bf16, ~0.03 absolute at |logp| ~ 10) gets "bf16_math": loss within 1e-1, and its gradient is
judged per token: rounding a log-ratio by up to 0.03 moves tokens near the clip boundary to the
other side (zero gradient in one, full gradient in the other), so a few token rows legitimately
differ completely; at most 5% of the token rows may be off by more than 1e-1 of the largest
gradient. Its formula is still checked to fp32 precision by the fp32 cases, which every provider
also runs.
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from lambda_grpo._validate import validate
from lambda_grpo.reference import reference_loss

from .cases import Case, make_inputs
from .providers import Provider, fault_factor

TOL = {
    "fp32": {"loss": 1e-4, "grad": 1e-3},
    "bf16": {"loss": 3e-2, "grad": 3e-2},
    "bf16_math": {"loss": 1e-1, "grad": 1e-1, "rows_off": 0.05},
}
LOSS_FLOOR = 1e-2


def _truth(case: Case, inputs: dict) -> Dict[str, torch.Tensor]:
    cfg = case.config()
    leaves = {}
    if case.task == "logits":
        logits = inputs["logits"].detach().double().requires_grad_(True)
        leaves["logits"] = logits
    else:
        h = inputs["hidden"].detach().double().requires_grad_(True)
        w = inputs["weight"].detach().double().requires_grad_(True)
        leaves.update(hidden=h, weight=w)
        logits = F.linear(h, w)
    lam = None
    if inputs["lam"] is not None:
        lam = torch.tensor(float(inputs["lam"]), dtype=torch.float64, requires_grad=True)
        leaves["lam"] = lam
    batch = validate(logits, inputs["tokens"], inputs["mask"], inputs["advantages"], inputs["group_size"],
                     inputs["old_logp"], inputs["ref_logp"], lam, cfg, None, None)
    loss = reference_loss(batch, cfg, dtype=torch.float64).loss
    loss.backward()
    out = {"loss": loss.detach()}
    out.update({k: v.grad.detach() for k, v in leaves.items()})
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    scale = max(float(b.abs().max()) if b.numel() else 0.0, floor, 1e-300)
    return float((a - b).abs().max()) / scale


def _rows_off(g: torch.Tensor, t: torch.Tensor, tol: float) -> float:
    """Fraction of token rows (last dim = V) whose max error exceeds tol x the largest |t|."""
    g, t = g.detach().double().reshape(-1, g.shape[-1]), t.detach().double().reshape(-1, t.shape[-1])
    scale = max(float(t.abs().max()), 1e-300)
    return float(((g - t).abs().amax(dim=1) > tol * scale).double().mean())


def check_case(case: Case, providers: List[Provider], device: str, log=print) -> List[dict]:
    """Run every provider once on `case`, compare with the truth; one result dict per provider."""
    inputs = make_inputs(case)
    truth = _truth(case, inputs)
    results = []
    for p in providers:
        if not p.is_loss:
            continue
        tol = TOL["bf16_math"] if (case.dtype == "bf16" and p.low_precision_math) else TOL[case.dtype]
        t0 = time.perf_counter()
        reason = p.skip(case, device)
        if reason:
            results.append(dict(provider=p.name, status="skipped", reason=reason))
            continue
        try:
            runner = p.make(case, inputs, device)
            runner.zero_grad()
            out = runner.forward() * fault_factor(p.name)
            runner.run_backward(out)
            errs = {"loss": _rel_err(out.reshape(()), truth["loss"], LOSS_FLOOR)}
            for name, leaf in runner.leaves.items():
                g = leaf.grad
                if g is None:
                    errs[f"d{name}"] = float("inf")
                    continue
                if p.name == "liger_triton" and name == "logits":
                    g = g[:, : case.T]
                errs[f"d{name}"] = _rel_err(g.cpu(), truth[name])
                if "rows_off" in tol and name == "logits":
                    errs["dlogits_rows_off"] = _rows_off(g.cpu(), truth[name], tol["grad"])
            runner.zero_grad()

            def limit(k):
                if k == "loss":
                    return tol["loss"]
                if k == "dlogits" and "rows_off" in tol:
                    return float("inf")  # judged by the share of rows off instead
                return tol["rows_off"] if k.endswith("_rows_off") else tol["grad"]

            worst = {k: v for k, v in errs.items() if v > limit(k)}
            status = "ok" if not worst else "DISAGREES"
            results.append(dict(provider=p.name, status=status, errors=errs, tol=tol))
        except Exception as e:  # a provider that crashes on valid input is a failure, not a skip
            results.append(dict(provider=p.name, status="ERROR", reason=f"{type(e).__name__}: {e}"))
        finally:
            for t in (inputs.get("logits"), inputs.get("hidden"), inputs.get("weight")):
                if t is not None:
                    t.grad = None
                    t.requires_grad_(False)
        r = results[-1]
        errs = r.get("errors")
        detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items()) if errs else r.get("reason", "")
        log(f"  check {case.key():<40} {p.name:<15} {r['status']:<9} {detail}  [{time.perf_counter() - t0:.1f} s]")
    return results
