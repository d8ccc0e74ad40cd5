"""Section 7, rows: the Triton row kernel against the torch row math (both reached through
bench/gpu_check/internals.py:row_pass_pair), at (B, T) = (16, 1024), (64, 8192), trace None /
recent / both, and each as a fraction of our vocab fwd+bwd at the same N (measured in the timing
section at the same N, or scaled linearly in N from the nearest one measured)."""

from __future__ import annotations

import statistics
from typing import Optional, Tuple

import torch

import lambda_grpo as lg

from . import internals
from .common import LAM, Budget, Plan, Results, cuda_clock, fail, skip_spent

S = "rows"


def vocab_step(R: Results, N: int, V: int) -> Optional[Tuple[float, str]]:
    """Median fwd+bwd of ours (two-pass, else fused) at V, measured at N or scaled linearly in N."""
    for prov in ("ours_triton_2pass", "ours_triton_fused"):
        got = sorted((n, t) for (n, v, p), t in R.timing.items() if v == V and p == prov)
        if got:
            n0, t0 = next(((n, t) for n, t in got if n == N), got[-1])
            how = "measured" if n0 == N else f"scaled linearly from N={n0}"
            return t0 * N / n0, f"vocab step = {prov} at V={V}, {how}: {t0 * N / n0 * 1e3:.3f} ms"
    return None


def run(P: Plan, R: Results, budget: Budget) -> None:
    dev = P.device
    clock = cuda_clock(dev)
    for B, T in P.rows:
        N = B * T
        g = torch.Generator(device=dev)
        g.manual_seed(600 + B)
        V = 8  # the row pass never reads the logits; validation only needs their shape
        logits = torch.zeros((B, T, V), dtype=torch.bfloat16, device=dev)
        tokens = torch.randint(0, V, (B, T), generator=g, device=dev)
        lengths = torch.randint(T // 4, T + 1, (B,), generator=g, device=dev)
        mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
        logp = -3.0 * torch.rand((B, T), generator=g, device=dev)
        ent = 2.0 + torch.rand((B, T), generator=g, device=dev)
        old = logp + 0.3 * torch.randn((B, T), generator=g, device=dev)
        ref = logp + 0.3 * torch.randn((B, T), generator=g, device=dev)
        adv = torch.randn(B, generator=g, device=dev)
        lam = torch.tensor(LAM, device=dev)
        G = 4 if B % 4 == 0 else B
        for trace in (None, "recent", "both"):
            name = f"row pass B={B} T={T} trace={trace}"
            shp = dict(B=B, T=T, N=N, dtype="fp32")
            if budget.over():
                skip_spent(R, S, name, **shp)
                continue
            try:
                cfg = lg.LossConfig(aggregation="lambda_grpo", trace=trace, trace_mode="ratio", beta=0.04,
                                    entropy_coef=0.01)
                fns = internals.row_pass_pair(logits, tokens, mask, adv, G, old, ref, lam, cfg, logp, ent)
                med = {}
                for which, fn in fns.items():
                    for _ in range(int(P.reps["warmup"])):
                        fn()
                    ts = []
                    for _ in range(int(P.reps["rows_reps"])):
                        a = clock.mark()
                        fn()
                        ts.append(clock.between(a, clock.mark()))
                    med[which] = statistics.median(ts)
                    vocab = vocab_step(R, N, max(v for _, _, v in P.timing))
                    R.add(S, f"{name}: {which}", "OK", provider=f"row_pass[{which}]", median_ms=med[which] * 1e3,
                          min_ms=min(ts) * 1e3, max_ms=max(ts) * 1e3, repeats=len(ts),
                          value=f"{med[which] / vocab[0]:.4f}" if vocab else None,
                          unit="x vocab fwd+bwd" if vocab else "",
                          detail=(vocab[1] if vocab else "no vocab timing to compare with") + f"; {P.timer}", **shp)
                a, b = fns["triton"](), fns["torch"]()
                err = float((a.loss - b.loss).abs() / b.loss.abs().clamp(min=1e-12))
                R.add(S, f"{name}: triton/torch time", "INFO", value=f"{med['triton'] / med['torch']:.3f}",
                      unit="ratio", detail=f"loss relative difference {err:.2g}", **shp)
            except Exception as e:  # noqa: BLE001
                fail(R, S, name, e, **shp)
