"""A MODEL of the GPU run's time per section, from the plan's sizes and run 1's figures (H200,
2026-11-30, docs/gpu.md): `python -m bench.gpu_check --estimate`.

Per-step times are taken from run 1 where it measured them and scaled with the bytes moved and the
copy bandwidth (an H100 SXM copies at ~0.86 of its 3.35 TB/s, as the H200 did: 4149 of 4800
GB/s); what run 1 did not measure (the hidden route, the float64 reference's cost, inductor's
compile time, Triton's compile time per kernel) is a stated guess. tests/test_gpu_check.py checks
that the modelled total stays under 8 minutes on both cards and each section within its budget.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

from .. import gpu_model
from .common import GPU_BUDGETS, gpu_plan

CARDS = {"H100 SXM 80 GB": dict(copy_gbps=2880.0, mem=80e9, bf16_tflops=600.0, fp32_tflops=50.0),
         "H200 141 GB": dict(copy_gbps=4149.0, mem=141e9, bf16_tflops=650.0, fp32_tflops=55.0)}
RUN1_GBPS = 4149.0
VALID = 0.594  # share of valid tokens of make_inputs' masks: lengths uniform in [T/4, T], 5% holes

# run 1 (H200) per-step figures, fwd+bwd, as achieved fractions of the copy bandwidth (byte model of
# bench/gpu_model.py) at N = 16 384, V = 151 936, and the fixed (host-bound) time at small N
STEP = {  # name: (fraction of copy bandwidth under its byte model, floor seconds, model)
    "ours_triton_fused": (0.60, 2.2e-3, "fused"), "ours_triton_fused_inplace": (0.42, 2.4e-3, "fused"),
    "ours_triton_2pass": (0.51, 3.6e-3, "two-pass"), "ours_triton_2pass_inplace": (0.45, 3.6e-3, "two-pass"),
    "liger_triton": (0.79, 1.1e-3, "liger"), "trl": (0.73, 1.6e-3, "trl")}
PER_LOGIT_RUN1 = {"eager_fp32": 23.2e-12, "eager_bf16": 12.3e-12, "ours_torch": 1.03e-9}  # s per logit at 4149 GB/s
MEM_PER_LOGIT = {"ours_triton_fused": 2, "ours_triton_fused_inplace": 1, "ours_triton_2pass": 2,
                 "ours_triton_2pass_inplace": 1, "liger_triton": 4, "trl": 8, "eager_fp32": 26, "eager_bf16": 14,
                 "ours_torch": 3}
# guesses (not measured in run 1)
STARTUP_S = 12.0  # imports (torch, triton, lambda_grpo, liger, trl), CUDA context
TRITON_COMPILE_S = 2.0  # per kernel specialisation, first use on a fresh machine
INDUCTOR_S = 20.0  # per compiled graph (dynamo + inductor + the Triton kernels it generates)
REF64_PER_LOGIT = 60e-12  # float64 reference fwd+bwd, s per logit at 4149 GB/s (~2.5x eager fp32)
JUDGE_PER_LOGIT = 30e-12  # tests/_compare.py's element-wise rule on one dlogits tensor (float64 passes)
ITEM_OVERHEAD_S = 0.3  # Python, allocation, synchronisation per check or per provider
REPORT_S = 4.0  # CSV, Markdown, PNG


def _calls(t: float, warmup: int, reps_min: int, reps_max: int, item_s: float) -> int:
    reps = max(reps_min, min(reps_max, math.ceil(item_s / max(t, 1e-9))))
    return warmup + reps


def _bytes(model: str, N: int, V: int) -> float:
    return gpu_model.traffic_bytes(gpu_model.SCHEDULES[model], int(VALID * N), N, V, 2)


def estimate(card: str) -> Dict[str, Tuple[float, str]]:
    c = CARDS[card]
    bw = c["copy_gbps"] * 1e9
    scale = RUN1_GBPS / c["copy_gbps"]
    P = gpu_plan(total_memory=int(c["mem"]))
    r = P.reps
    out: Dict[str, Tuple[float, str]] = {}
    out["startup"] = (STARTUP_S, "imports, CUDA context")
    out["device"] = (2.0 + 23 * 2 * P.copy_bytes / bw, "facts, nvidia-smi, 23 copies of 2 GiB")
    # correct: per check, inputs + truth + plain torch (+ moves) + ours + the judging, and the kernels' compiles
    t, n = 14 * TRITON_COMPILE_S, 0
    for B, T, V, dtn, cfg in P.correct + P.variants + P.packed + P.long_rows:
        L = B * T * V
        backends = 2 if (B, T, V, dtn, cfg) in P.correct else 1
        t += ITEM_OVERHEAD_S + L * (24 / bw + (REF64_PER_LOGIT + (1 + P.scalar_moves) * PER_LOGIT_RUN1["eager_fp32"]
                                               ) * scale + backends * 2 * JUDGE_PER_LOGIT * scale)
        t += (backends - 1) * L * PER_LOGIT_RUN1["ours_torch"] * scale
        n += 1
    if P.long_trace:
        B, T, V, _, _ = P.long_trace
        t += ITEM_OVERHEAD_S + B * T * V * (4 + P.scalar_moves) * PER_LOGIT_RUN1["ours_torch"] * scale
        n += 1
    B, T, V, _, cfgs = P.agree
    t += len(cfgs) * (ITEM_OVERHEAD_S + B * T * V * (24 / bw + PER_LOGIT_RUN1["ours_torch"] * scale))
    out["correct"] = (t, f"{n + len(cfgs)} checks; pytest (41 s in run 1) runs alongside")
    out["compile"] = (2 * (INDUCTOR_S + 8 * ITEM_OVERHEAD_S), "two graphs through inductor, checks")
    out["graph"] = (len(P.graph_cfgs) * (3 + (2 * r["graph_reps"] + 15) * 4e-3), "capture, replays, timed steps")
    # timing
    t, n = 0.0, 0
    for B, T, V in P.timing:
        N = B * T
        t += N * V * 24 / bw + ITEM_OVERHEAD_S
        for name, mem in MEM_PER_LOGIT.items():
            if mem * N * V > 0.85 * (c["mem"] - 2.2 * N * V * 2):
                continue
            if name == "ours_torch" and N > P.torch_engine_max_n:
                continue
            if name in STEP:
                frac, floor, model = STEP[name]
                step = max(floor, _bytes(model, N, V) / (frac * bw))
            else:
                step = PER_LOGIT_RUN1[name] * scale * N * V
            extra = N * V * 10 / bw if "inplace" in name else 0.0  # the logits redrawn before each call
            calls = _calls(step, int(r["warmup"]), int(r["reps_min"]), int(r["reps_max"]), r["item_s"])
            t += ITEM_OVERHEAD_S + calls * (step + extra + 2e-4)
            n += 1
        if (B, T, V) == tuple(P.profile_shape):
            t += len(P.profile_providers) * (2.0 + 3 * _bytes("fused", N, V) / (0.5 * bw))
    out["timing"] = (t + 8.0, f"{n} provider x shape measurements, profiles; the byte-model count runs alongside")
    # hidden: matmul time at the card's dense rates (ours: the dW matmul in fp32, lambda_grpo/_linear.py)
    t = 0.0
    for B, T, H, V, _, _ in P.hidden_correct:
        L = B * T * V
        t += ITEM_OVERHEAD_S + L * (REF64_PER_LOGIT + (1 + P.scalar_moves) * PER_LOGIT_RUN1["eager_fp32"]) * scale
    t += 10.0  # Liger's torch.compile of its loss math (first call)
    for B, T, H, V in P.hidden_timing:
        N = B * T
        mm = 2 * N * H * V / (c["bf16_tflops"] * 1e12)
        t += 2 * mm + 2 * (1 + r["floor_reps"]) * 3 * mm  # inputs (the log-probs), the floor (valid and all)
        for step in (2 * VALID * mm + VALID * 2 * N * H * V / (c["fp32_tflops"] * 1e12) + _bytes("fused", N, V) / bw,
                     4 * mm, 4 * VALID * mm):  # ours, Liger (guess), TRL's head (4 matmuls)
            calls = _calls(step, int(r["hidden_warmup"]), int(r["hidden_reps_min"]), int(r["hidden_reps_max"]),
                           r["hidden_item_s"])
            t += ITEM_OVERHEAD_S + calls * step
    out["hidden"] = (t, "correctness (2 configs), 4 shapes x (floor + 3 providers)")
    t = 0.0
    for B, T in P.rows:
        t += 3 * ITEM_OVERHEAD_S + 3 * (r["rows_reps"] + 2) * (0.6e-3 + 13e-3 * B * T / (64 * 8192))
    out["rows"] = (t, "row kernel vs torch row math")
    out["report"] = (REPORT_S, "CSV, Markdown, PNG")
    return out


def print_estimates() -> None:
    lines: List[str] = ["modelled GPU time per section (seconds; a MODEL from the plan's sizes and run 1's figures, "
                        "bench/gpu_check/estimate.py)", ""]
    est = {card: estimate(card) for card in CARDS}
    names = list(next(iter(est.values())).keys())
    lines.append(f"{'section':<10} {'budget':>7} " + " ".join(f"{c:>16}" for c in CARDS) + "  what")
    for s in names:
        budget = f"{GPU_BUDGETS[s]:.0f}" if s in GPU_BUDGETS else "-"
        lines.append(f"{s:<10} {budget:>7} " + " ".join(f"{est[c][s][0]:>16.0f}" for c in CARDS) +
                     f"  {est[next(iter(CARDS))][s][1]}")
    lines.append(f"{'total':<10} {'480':>7} " + " ".join(f"{sum(v[0] for v in est[c].values()):>16.0f}"
                                                          for c in CARDS))
    print("\n".join(lines))
