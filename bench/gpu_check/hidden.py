"""Section 6, hidden (issue 20 target 4, and the hidden route's part of target 5): the loss from
hidden states and the LM head, `fused_linear_grpo_loss(backend="triton")`, where the (N, V)
logits never exist in full.

correct: ours against the float64 reference that materialises the logits (the public API's
  backend="reference" on float64 copies of hidden and weight), fused (dapo_fused) and two-pass
  (lambda_both_ratio) schedules, bf16, V = 151 936: loss, dhidden, dW, dlambda and metrics by the
  project's rule (tests/test_linear.py): plain torch is the LM head's matmul in bf16 followed by
  the reference loss with fp32 math (autograd's bf16 matmuls for dhidden and dW); scalars take
  its worst over the inputs and one-ulp moves of hidden and weight.
timing: fwd+bwd at N in {4096, 16 384} x H in {896, 2048}, V = 151 936, bf16, DAPO (eps 0.2/0.28,
  k3 KL beta 0.04): ours; Liger-Kernel's LigerFusedLinearGRPOLoss (its default torch.compile of
  the loss math on CUDA); TRL 1.16's chunked LM head (trl.kernels.chunked_logprob, as
  GRPOTrainer's fused head calls it) + our grpo_loss_from_logprobs; and the floor: the three
  matmuls alone (logits = h W^T, dhidden = dlogits W, dW = dlogits^T h, bf16, cuBLAS, over the
  valid tokens, which is all that ours computes; also over all N), measured in the same run.
  Time and peak memory above the baseline; the report's targets: ours <= 1.15x the floor, at
  most Liger's time and peak memory.
"""

from __future__ import annotations

import statistics
import time
import traceback
from types import SimpleNamespace
from typing import Dict, List

import torch

import lambda_grpo as lg

from ..cases import LOGIT_SCALE, LOGP_NOISE, _chunked_logp
from .common import (LAM, Budget, Peak, Plan, Results, cfg_of, cuda_clock, dtn_of, fail, fill_normal_, free,
                     random_mask, skip_spent, too_big, ulp_moved)
from .correct import SCALARS, _one_draw, add_metrics_row, judge, scalar_baselines

S = "hidden"


def make_hidden_inputs(B: int, T: int, H: int, V: int, dtype: torch.dtype, device: str, seed: int) -> dict:
    """hidden N(0, 1), weight N(0, (LOGIT_SCALE^2 / H)) (logits of scale ~LOGIT_SCALE, as the logits
    route's), tokens, right-padded mask with holes, advantages, old/ref = the current log-probs
    plus N(0, LOGP_NOISE^2)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    hidden = fill_normal_(torch.empty((B, T, H), dtype=dtype, device=device), g, 1.0)
    weight = fill_normal_(torch.empty((V, H), dtype=dtype, device=device), g, LOGIT_SCALE / H**0.5)
    tokens = torch.randint(0, V, (B, T), generator=g, device=device)
    mask = random_mask(B, T, g, device)
    adv = torch.randn(B, generator=g, device=device)
    with torch.no_grad():
        logp = _chunked_logp(lambda b: hidden[b] @ weight.T, B, tokens)
    old = logp + LOGP_NOISE * torch.randn((B, T), generator=g, device=device)
    ref = logp + LOGP_NOISE * torch.randn((B, T), generator=g, device=device)
    G = 4 if B % 4 == 0 else B
    return dict(hidden=hidden, weight=weight, tokens=tokens, mask=mask, advantages=adv, group_size=G,
                old_logp=old, ref_logp=ref)


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------
def _ours(inp: dict, cfg, lam: float, backend: str = "triton", as64: bool = False) -> dict:
    """loss, metrics, dh, dw, dlam (and the per-token ratio) of the public API."""
    def leaf(x):
        return (x.double() if as64 else x).detach().clone().requires_grad_(True)

    h, w = leaf(inp["hidden"]), leaf(inp["weight"])
    lam_t = torch.tensor(float(lam), dtype=torch.float32, requires_grad=True) if cfg.uses_lambda else None
    out = lg.fused_linear_grpo_loss(h, w, inp["tokens"], inp["mask"], inp["advantages"], inp["group_size"],
                                    old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], lam=lam_t, config=cfg,
                                    backend=backend, return_per_token=as64)
    out.loss.backward()
    res = dict(loss=out.loss.detach(), metrics={k: v.detach() for k, v in out.metrics.items()}, dh=h.grad,
               dw=w.grad, dlam=None if lam_t is None else lam_t.grad)
    if out.per_token is not None:
        res["ratio"] = out.per_token["ratio"]
    return res


def _plain(inp: dict, cfg_name: str, lam: float) -> dict:
    """Plain torch: logits = h W^T in bf16 (as a model computes them), the reference loss with fp32
    math (tests/_compare.run), dhidden and dW by autograd's bf16 matmuls from the bf16 dlogits."""
    from tests._compare import run

    with torch.no_grad():
        logits = inp["hidden"] @ inp["weight"].T
    keys = ("tokens", "mask", "advantages", "group_size", "old_logp", "ref_logp")
    r = run("reference", dict({k: inp[k] for k in keys}, logits=logits), cfg_of(cfg_name), lam, dtype=torch.float32)
    dl = r["dlogits"]
    B, T, H = inp["hidden"].shape
    r["dh"] = (dl.reshape(-1, dl.shape[-1]) @ inp["weight"]).reshape(B, T, H)
    r["dw"] = dl.reshape(-1, dl.shape[-1]).T @ inp["hidden"].reshape(-1, H)
    del r["dlogits"], logits
    r.pop("dlogits_compute", None)
    return r


def check_hidden(P: Plan, R: Results, inp: dict, cfg_name: str, lam: float) -> None:
    cfg = cfg_of(cfg_name)
    dtype = inp["hidden"].dtype
    B, T, H = inp["hidden"].shape
    V = inp["weight"].shape[0]
    shp = dict(B=B, T=T, H=H, V=V, N=B * T, n_valid=int(inp["mask"].sum()), dtype=dtn_of(dtype),
               provider="triton")
    truth = _ours(inp, cfg, lam, backend="reference", as64=True)
    base = _plain(inp, cfg_name, lam)
    moved = (_plain(ulp_moved(inp, s, keys=("hidden", "weight"), upcast=False), cfg_name, lam)
             for s in range(P.scalar_moves))
    sb = scalar_baselines(truth, base, moved)
    got = _ours(inp, cfg, lam)
    name = f"fused_linear_grpo_loss {cfg_name} vs float64"
    rule = torch.float32  # the loss, dlambda and metrics are fp32 results
    for q in ("loss", "dh", "dw", "dlam"):
        if truth[q] is None:
            continue
        if q in SCALARS:
            ok, err, allowed, detail = judge(q, got[q], truth[q], sb[q], rule)
            detail += "; " + _one_draw(q, got[q], truth[q], base[q], rule, P.scalar_moves)
        else:
            ok, err, allowed, detail = judge(q, got[q], truth[q], base[q], dtype)
        R.add(S, f"{name}: {q}", "PASS" if ok else "FAIL", err=err, allowed=allowed, detail=detail, **shp)
    add_metrics_row(R, name, got, truth, base, sb, inp, cfg, rule, shp)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def _providers(P: Plan) -> List[tuple]:
    """(name, label, make(inputs) -> Runner, skip reason or None)."""
    from ..providers import Runner, _has_module, _make_trl_head, _skip_trl_head

    cfg = cfg_of("t_dapo")

    def ours(inputs):
        h = inputs["hidden"].requires_grad_(True)
        w = inputs["weight"].requires_grad_(True)
        kw = {k: inputs[k] for k in ("tokens", "mask", "advantages", "group_size")}
        return Runner(lambda: lg.fused_linear_grpo_loss(h, w, kw["tokens"], kw["mask"], kw["advantages"],
                                                        kw["group_size"], old_logp=inputs["old_logp"],
                                                        ref_logp=inputs["ref_logp"], config=cfg,
                                                        backend="triton").loss, {"hidden": h, "weight": w})

    def liger(inputs):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        h = inputs["hidden"].requires_grad_(True)
        w = inputs["weight"].requires_grad_(True)
        T = h.shape[1]
        mod = LigerFusedLinearGRPOLoss(beta=cfg.beta, use_ref_model=True, epsilon_low=cfg.eps_low,
                                       epsilon_high=cfg.eps_high, loss_type="dapo", max_completion_length=T,
                                       temperature=cfg.temperature, compiled=P.device == "cuda")
        mask = inputs["mask"].to(torch.int64)

        def fwd():
            loss, _ = mod(h, w, inputs["tokens"], mask, inputs["advantages"], ref_per_token_logps=inputs["ref_logp"],
                          old_per_token_logps=inputs["old_logp"])
            return loss
        return Runner(fwd, {"hidden": h, "weight": w})

    def trl(inputs):
        case = SimpleNamespace(config=lambda: cfg, T=inputs["hidden"].shape[1])
        return _make_trl_head(case, dict(inputs, lam=None), P.device)

    liger_skip = None if _has_module("liger_kernel") else "liger-kernel not importable (carry its 0.8.5 wheel)"
    trl_skip = _skip_trl_head(None, P.device)
    return [("ours_fused_linear", "ours fused_linear_grpo_loss (triton, dapo)", ours, None),
            ("liger_fused_linear", "Liger 0.8.5 LigerFusedLinearGRPOLoss (dapo" +
             (", torch.compile of the loss math)" if P.device == "cuda" else ", compiled=False on the CPU)"),
             liger, liger_skip),
            ("trl_chunked_head", "TRL 1.16 chunked LM head (ChunkedLogProbFunction) + our grpo_loss_from_logprobs",
             trl, trl_skip)]


def _time_runner(P: Plan, runner, budget: Budget):
    clock, probe = cuda_clock(P.device), Peak(P.device)
    times, peaks = [], []
    t0 = time.monotonic()
    for i in range(int(P.reps["hidden_warmup"])):
        runner.zero_grad()
        runner.run_backward(runner.forward())
    first_s = time.monotonic() - t0
    start = time.monotonic()
    while len(times) < P.reps["hidden_reps_max"] and (len(times) < P.reps["hidden_reps_min"] or
                                                      time.monotonic() - start < P.reps["hidden_item_s"]):
        runner.zero_grad()
        probe.start()
        a = clock.mark()
        runner.run_backward(runner.forward())
        times.append(clock.between(a, clock.mark()))
        peaks.append(probe.peak())
        if budget.over():
            break
    runner.zero_grad()
    return times, peaks, first_s


def time_shape(P: Plan, R: Results, shape, budget: Budget, seed: int) -> None:
    from ..worker import measure_matmul_floor

    B, T, H, V = shape
    N = B * T
    base = dict(B=B, T=T, H=H, V=V, N=N, dtype="bf16")
    reason = too_big(P.device, N * V * 2 * 2.5 + V * H * 12)
    if reason:
        R.add(S, f"N={N} H={H}", "SKIP", detail=reason, **base)
        return
    inp = make_hidden_inputs(B, T, H, V, torch.bfloat16, P.device, seed)
    n_valid = int(inp["mask"].sum())
    base["n_valid"] = n_valid
    floor: Dict[str, float] = {}
    try:
        fl = measure_matmul_floor(None, inp, {"device": P.device, "reps_min": int(P.reps["floor_reps"])})
        for which in ("valid", "all"):
            st = fl[f"mm_{which}"]
            floor[which] = st["median"]
            parts = ", ".join(f"{k} {fl[f'mm_{which}_{k}']['median'] * 1e3:.3f} ms"
                              for k in ("logits", "dhidden", "dW"))
            R.add(S, f"floor: three matmuls, {which} tokens", "OK", provider=f"floor_{which}",
                  median_ms=st["median"] * 1e3, min_ms=st["min"] * 1e3, max_ms=st["max"] * 1e3, repeats=st["n"],
                  value=f"{fl[f'mm_{which}_gflops'] / 1e3:.0f}", unit="TFLOP/s",
                  detail=f"{parts}; bf16 torch.mm into preallocated outputs (bench/worker.py); {P.timer}", **base)
        del fl
    except Exception as e:  # noqa: BLE001
        fail(R, S, "floor: three matmuls", e, **base)
    free(P.device)
    for name, label, make, skip in _providers(P):
        if budget.over():
            skip_spent(R, S, label, provider=name, **base)
            continue
        if skip:
            R.add(S, label, "SKIP", provider=name, detail=skip, **base)
            continue
        try:
            runner = make(inp)
            times, peaks, first_s = _time_runner(P, runner, budget)
            med = statistics.median(times)
            R.extra.setdefault("hidden", {})[(N, H, name)] = (med, max(peaks))
            x_floor = f"{med / floor['valid']:.2f}x the floor (valid tokens)" if floor.get("valid") else "no floor"
            R.add(S, label, "OK", provider=name, median_ms=med * 1e3, min_ms=min(times) * 1e3,
                  max_ms=max(times) * 1e3, repeats=len(times), peak_mem_bytes=max(peaks),
                  value=f"{med / floor['valid']:.3f}" if floor.get("valid") else None,
                  unit="x floor" if floor.get("valid") else "",
                  detail=f"{x_floor}; first call {first_s:.1f} s; {P.timer}; memory: {P.memory}", **base)
            del runner
        except Exception as e:  # noqa: BLE001
            tb = traceback.format_exc().strip().splitlines()
            print("\n".join(tb[-8:]), flush=True)
            R.add(S, label, "ERROR" if name != "ours_fused_linear" else "FAIL", provider=name,
                  detail=f"{type(e).__name__}: {str(e)[:300]}", **base)
        finally:
            for k in ("hidden", "weight"):
                inp[k].grad = None
                inp[k].requires_grad_(False)
            free(P.device)
    for which, t in floor.items():
        R.extra.setdefault("hidden", {})[(N, H, f"floor_{which}")] = (t, None)
    del inp
    free(P.device)


def run(P: Plan, R: Results, budget: Budget) -> None:
    dev = P.device
    for i, (B, T, H, V, dtn, c) in enumerate(P.hidden_correct):
        shp = dict(B=B, T=T, H=H, V=V, N=B * T, dtype=dtn)
        if budget.over():
            skip_spent(R, S, f"correct {c}", **shp)
            continue
        try:
            inp = make_hidden_inputs(B, T, H, V, torch.bfloat16 if dtn == "bf16" else torch.float32, dev, 700 + i)
            check_hidden(P, R, inp, c, LAM)
            del inp
        except Exception as e:  # noqa: BLE001
            fail(R, S, f"fused_linear_grpo_loss {c} vs float64", e, **shp)
        free(dev)
    for i, shape in enumerate(P.hidden_timing):
        B, T, H, V = shape
        if budget.over():
            skip_spent(R, S, f"N={B * T} H={H}", B=B, T=T, H=H, V=V, N=B * T)
            continue
        try:
            time_shape(P, R, shape, budget, seed=750 + i)
        except Exception as e:  # noqa: BLE001
            fail(R, S, f"N={B * T} H={H}", e, B=B, T=T, H=H, V=V, N=B * T)
        free(dev)

